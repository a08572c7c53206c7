//! The agent's record of what it made the maps hold: every frontend with its
//! Service (`namespace/name:port`), type, flags and backends, as of the
//! agent's last sync after a complete read of its source. `kpr svc list`
//! takes the Service names from it and `kpr svc list --verify` compares the
//! pinned maps with it, both without the agent.
//!
//! Where. bpffs holds no plain files, so the record lives beside the bpf
//! root, not in it: `/run/kpr/applied/<bpf root, '/' as %2F>.json` (a tmpfs,
//! emptied by a reboot just as bpffs is). It is written to a temporary file
//! and renamed into place, so a reader sees the old or the new record,
//! never half of one. Frontends are keyed by address, port, protocol and
//! scope, never by map ids, so a growth or a switch-over (which may
//! renumber nothing, but copies maps) leaves it true; `kpr cleanup` removes
//! it with the pins.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::datapath::maps::{FrontendEntries, Snapshot};
use crate::maglev::MaglevParams;
use crate::model::{Frontend, FrontendOptions, FrontendSpec, Scope};

/// Directory of the records, one per bpf root.
pub const STATE_DIR: &str = "/run/kpr/applied";
/// Layout version of the record; a reader refuses another.
pub const VERSION: u32 = 1;

/// What the agent applied, as written to the record.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AppliedState {
    pub version: u32,
    /// When the agent wrote it (Unix seconds).
    pub written_at: u64,
    /// Every frontend the agent programmed, in frontend order.
    pub frontends: Vec<AppliedFrontend>,
    /// Services the agent could not program (`namespace/name`): the maps
    /// keep what they held for them before, which --verify does not count
    /// as drift.
    pub refused: Vec<String>,
    /// `--maglev-table-size` and `--maglev-hash-seed` of the agent: what
    /// its tables and the datapath's flow hash were built with.
    pub maglev_table_size: u32,
    pub maglev_hash_seed: u64,
}

/// One frontend as the agent programmed it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppliedFrontend {
    /// As `svc list` shows it: `10.96.0.1:443/TCP`, `/i` for internal scope.
    pub frontend: String,
    /// `namespace/name:port-name` (`namespace/name` for an unnamed port).
    pub service: String,
    #[serde(flatten)]
    pub state: FrontendState,
}

/// What the datapath acts on for one frontend: the part `--verify` compares.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrontendState {
    /// ClusterIP, NodePort, LoadBalancer or ExternalIP.
    #[serde(rename = "type")]
    pub svc_type: String,
    /// The master entry's flags (see [`flag_names`]).
    pub flags: Vec<String>,
    pub affinity_timeout_seconds: Option<u32>,
    /// Enforced loadBalancerSourceRanges; empty: every client.
    pub source_ranges: Vec<String>,
    /// Backends in slot order.
    pub backends: Vec<BackendState>,
}

/// One backend of a frontend.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BackendState {
    /// `10.244.1.2:8080/TCP`.
    pub address: String,
    /// `active` or `terminating`.
    pub state: String,
    /// The endpoint runs on this node.
    pub local: bool,
}

/// The frontend's label in `svc list` and in the record.
pub fn frontend_label(fe: &Frontend) -> String {
    match fe.scope {
        Scope::External => fe.addr.to_string(),
        Scope::Internal => format!("{}/i", fe.addr),
    }
}

/// The names of the flags set in `o` (affinity has its own field).
pub fn flag_names(o: &FrontendOptions) -> Vec<String> {
    [
        (o.has_internal_scope, "internal-scope"),
        (o.external_traffic_local, "external-local"),
        (o.internal_traffic_local, "internal-local"),
        (o.source_ranges_admit_node, "source-ranges-admit-node"),
        (o.maglev, "maglev"),
    ]
    .into_iter()
    .filter(|(set, _)| *set)
    .map(|(_, name)| name.to_string())
    .collect()
}

impl FrontendState {
    /// What the agent asks for `spec`.
    pub fn of_spec(spec: &FrontendSpec) -> FrontendState {
        FrontendState {
            svc_type: spec.svc_type.to_string(),
            flags: flag_names(&spec.options),
            affinity_timeout_seconds: spec.options.affinity_timeout,
            source_ranges: spec.source_ranges.iter().map(ToString::to_string).collect(),
            backends: spec
                .backends
                .iter()
                .map(|b| BackendState {
                    address: b.addr.to_string(),
                    state: b.state.as_str().into(),
                    local: b.local,
                })
                .collect(),
        }
    }

    /// What the maps hold for a frontend; a slot whose backend entry is
    /// missing shows as `backend ID missing`.
    pub fn of_maps(entries: &FrontendEntries, snapshot: &Snapshot) -> FrontendState {
        let m = &entries.master;
        FrontendState {
            svc_type: m.svc_type.to_string(),
            flags: flag_names(&m.options),
            affinity_timeout_seconds: m.options.affinity_timeout,
            source_ranges: match m.source_ranges {
                true => snapshot
                    .source_ranges
                    .get(&m.svc_id)
                    .map(|set| set.iter().map(ToString::to_string).collect())
                    .unwrap_or_default(),
                false => Vec::new(),
            },
            backends: entries
                .slots
                .iter()
                .map(|id| match snapshot.backends.get(id) {
                    Some(b) => BackendState {
                        address: b.addr.to_string(),
                        state: b.state.as_str().into(),
                        local: b.local,
                    },
                    None => BackendState {
                        address: format!("backend {id} missing"),
                        state: "?".into(),
                        local: false,
                    },
                })
                .collect(),
        }
    }
}

impl AppliedState {
    /// The record of `frontends` (what the reconciler applied) and the
    /// Services it `refused`, stamped now.
    pub fn new<'a>(
        frontends: impl IntoIterator<Item = &'a (Frontend, FrontendSpec)>,
        refused: Vec<String>,
        maglev: MaglevParams,
    ) -> AppliedState {
        let mut list: Vec<(&Frontend, &FrontendSpec)> =
            frontends.into_iter().map(|(f, s)| (f, s)).collect();
        list.sort_by_key(|(f, _)| **f);
        AppliedState {
            version: VERSION,
            written_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            frontends: list
                .into_iter()
                .map(|(fe, spec)| AppliedFrontend {
                    frontend: frontend_label(fe),
                    service: spec.service.to_string(),
                    state: FrontendState::of_spec(spec),
                })
                .collect(),
            refused,
            maglev_table_size: maglev.table_size(),
            maglev_hash_seed: maglev.seed(),
        }
    }

    /// The agent's Maglev parameters (the defaults if the record's are
    /// not valid).
    pub fn maglev(&self) -> MaglevParams {
        MaglevParams::new(self.maglev_table_size, self.maglev_hash_seed).unwrap_or_default()
    }

    /// Frontend label -> Service name.
    pub fn names(&self) -> BTreeMap<String, String> {
        self.frontends
            .iter()
            .map(|f| (f.frontend.clone(), f.service.clone()))
            .collect()
    }
}

/// The record's path for `bpf_root` (resolved, so that the agent and the
/// CLI agree however it was spelled).
pub fn path_for(bpf_root: &Path) -> PathBuf {
    let root = fs::canonicalize(bpf_root).unwrap_or_else(|_| bpf_root.to_path_buf());
    let name = root
        .to_string_lossy()
        .replace('%', "%25")
        .replace('/', "%2F");
    Path::new(STATE_DIR).join(format!("{name}.json"))
}

/// Writes `state` to `path` atomically (temporary file, then rename).
pub fn write(path: &Path, state: &AppliedState) -> Result<()> {
    let dir = path.parent().context("record path without a directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_vec(state).context("encoding the applied state")?;
    let mut file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(&json)
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(file);
    fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}

/// The record of the agent of `bpf_root`; None when there is none (no agent
/// has completed a sync there since boot, or after `kpr cleanup`).
pub fn read(bpf_root: &Path) -> Result<Option<AppliedState>> {
    let path = path_for(bpf_root);
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let state: AppliedState =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
    anyhow::ensure!(
        state.version == VERSION,
        "{}: version {} (this kpr reads {VERSION})",
        path.display(),
        state.version
    );
    Ok(Some(state))
}

/// Removes the record of `bpf_root`; true when there was one.
pub fn remove(bpf_root: &Path) -> Result<bool> {
    let path = path_for(bpf_root);
    match fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_names_the_bpf_root_and_cannot_collide() {
        let a = path_for(Path::new("/no/such/a-b"));
        let b = path_for(Path::new("/no/such/a/b"));
        assert_eq!(a, Path::new("/run/kpr/applied/%2Fno%2Fsuch%2Fa-b.json"));
        assert_ne!(a, b);
    }

    #[test]
    fn a_written_record_reads_back_equal() {
        let dir = std::env::temp_dir().join(format!("kpr-applied-{}", std::process::id()));
        let path = dir.join("r.json");
        let mut state = AppliedState::new(&[], vec!["prod/api".into()], MaglevParams::default());
        state.frontends.push(AppliedFrontend {
            frontend: "10.96.0.1:443/TCP".into(),
            service: "default/kubernetes:https".into(),
            state: FrontendState {
                svc_type: "ClusterIP".into(),
                flags: vec!["maglev".into()],
                affinity_timeout_seconds: Some(10),
                source_ranges: vec![],
                backends: vec![BackendState {
                    address: "10.0.0.1:6443/TCP".into(),
                    state: "active".into(),
                    local: false,
                }],
            },
        });
        write(&path, &state).unwrap();
        let back: AppliedState = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(back, state);
        assert_eq!(
            back.names()["10.96.0.1:443/TCP"],
            "default/kubernetes:https"
        );
    }
}
