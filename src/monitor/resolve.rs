//! Names for the ids and numbers of an event, from what the node holds
//! without the agent: frontend and backend ids from the pinned maps, the
//! frontend's Service from the agent's record (crate::applied_state), the
//! client's cgroup path from cgroup2 (a directory's inode is its id), and
//! the pod from that path when it is a kubelet's (`.../pod<uid>/...`).

#![deny(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::applied_state::{self, frontend_label};
use crate::datapath::kernel::KernelMaps;
use crate::datapath::maps::LbMaps;
use crate::model::L4Addr;

/// Where cgroup v2 is mounted on a node.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// At most this many directories are walked to find a cgroup id.
const CGROUP_WALK_MAX: usize = 100_000;
/// A missing id reloads the maps at most this often.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Resolves ids to addresses and cgroup ids to paths, with caches.
pub struct Resolver {
    bpf_root: PathBuf,
    frontends: BTreeMap<u32, L4Addr>,
    /// Frontend id -> `namespace/name:port-name`, for the frontends the
    /// agent's record names.
    services: BTreeMap<u32, String>,
    backends: BTreeMap<u32, L4Addr>,
    loaded: Option<Instant>,
    cgroups: HashMap<u64, Option<String>>,
}

impl Resolver {
    pub fn new(bpf_root: &Path) -> Resolver {
        let mut r = Resolver {
            bpf_root: bpf_root.to_path_buf(),
            frontends: BTreeMap::new(),
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            loaded: None,
            cgroups: HashMap::new(),
        };
        r.reload();
        r
    }

    /// Reads the frontends (masters) and backends of the pinned maps, and
    /// the Service names of the agent's record (none without a record).
    fn reload(&mut self) {
        self.loaded = Some(Instant::now());
        let Ok(Ok(snapshot)) = KernelMaps::open(&self.bpf_root).map(|m| m.snapshot()) else {
            return;
        };
        let names = applied_state::read(&self.bpf_root)
            .ok()
            .flatten()
            .map(|state| state.names())
            .unwrap_or_default();
        self.services = snapshot
            .frontends
            .iter()
            .filter_map(|(fe, e)| Some((e.master.svc_id, names.get(&frontend_label(fe))?.clone())))
            .collect();
        self.frontends = snapshot
            .frontends
            .iter()
            .map(|(fe, e)| (e.master.svc_id, fe.addr))
            .collect();
        self.backends = snapshot
            .backends
            .iter()
            .map(|(id, b)| (*id, b.addr))
            .collect();
    }

    fn reload_for_miss(&mut self) {
        if self.loaded.is_none_or(|t| t.elapsed() >= RELOAD_EVERY) {
            self.reload();
        }
    }

    /// The frontend of id `id` (0: none).
    pub fn frontend(&mut self, id: u32) -> Option<L4Addr> {
        if id == 0 {
            return None;
        }
        if !self.frontends.contains_key(&id) {
            self.reload_for_miss();
        }
        self.frontends.get(&id).copied()
    }

    /// The Service of frontend `id`, when the agent's record names it.
    pub fn service(&mut self, id: u32) -> Option<String> {
        if id == 0 {
            return None;
        }
        if !self.services.contains_key(&id) {
            self.reload_for_miss();
        }
        self.services.get(&id).cloned()
    }

    /// The backend of id `id` (0: none).
    pub fn backend(&mut self, id: u32) -> Option<L4Addr> {
        if id == 0 {
            return None;
        }
        if !self.backends.contains_key(&id) {
            self.reload_for_miss();
        }
        self.backends.get(&id).copied()
    }

    /// The cgroup v2 path (below the mount) of cgroup id `id`, when it
    /// still exists.
    pub fn cgroup(&mut self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        self.cgroups
            .entry(id)
            .or_insert_with(|| find_cgroup(Path::new(CGROUP_ROOT), id))
            .clone()
    }
}

/// Walks `root` (bounded) for the directory whose inode is `id`.
fn find_cgroup(root: &Path, id: u64) -> Option<String> {
    let mut stack = vec![root.to_path_buf()];
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        seen += 1;
        if seen > CGROUP_WALK_MAX {
            return None;
        }
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        if meta.ino() == id {
            let rel = dir.strip_prefix(root).unwrap_or(&dir);
            return Some(format!("/{}", rel.display()));
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    None
}

/// The pod UID a kubelet cgroup path names: `.../pod<uid>/...` (cgroupfs
/// driver) or `...-pod<uid>.slice` (systemd driver, `_` for `-`).
pub fn pod_uid(cgroup_path: &str) -> Option<String> {
    cgroup_path.split('/').rev().find_map(|seg| {
        let seg = seg.strip_suffix(".slice").unwrap_or(seg);
        let at = seg.rfind("pod")?;
        let uid = &seg[at + 3..];
        let ok = uid.len() >= 32
            && uid
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_');
        ok.then(|| uid.replace('_', "-"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_uids_come_from_both_cgroup_drivers() {
        assert_eq!(
            pod_uid("/kubepods/burstable/pod0a1b2c3d-0000-1111-2222-333344445555/abc").as_deref(),
            Some("0a1b2c3d-0000-1111-2222-333344445555")
        );
        assert_eq!(
            pod_uid("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0a1b2c3d_0000_1111_2222_333344445555.slice/cri-containerd-1.scope").as_deref(),
            Some("0a1b2c3d-0000-1111-2222-333344445555")
        );
        assert_eq!(pod_uid("/user.slice/user-0.slice/session-1.scope"), None);
    }

    #[test]
    fn a_cgroup_is_found_by_its_inode() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        std::fs::create_dir_all(&sub).unwrap();
        let ino = std::fs::metadata(&sub).unwrap().ino();
        assert_eq!(find_cgroup(dir.path(), ino).as_deref(), Some("/a/b"));
        assert_eq!(find_cgroup(dir.path(), 1), None);
    }
}
