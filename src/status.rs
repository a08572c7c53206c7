//! `kpr status`: the agent's view (source, API connectivity, watchers, last
//! sync, kernel features, mode), served by the agent at `/status` on its
//! metrics address, combined with what the pinned datapath shows (attached
//! hooks, map fill, service and backend counts) — the information of
//! `cilium status --verbose`'s KubeProxyReplacement block. What it
//! concludes, and its exit code, is [`outcome`]'s.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::datapath::kernel::KernelMaps;
use crate::datapath::loader;
use crate::datapath::maps::{LbMaps, MapName};
use crate::datapath::nodeport::{Acceleration, NodePortMode, TcAttach};
use crate::features::KprMode;
use crate::model::LbAlgorithm;

pub mod outcome;
pub use outcome::{AgentError, AgentErrorKind, Health};

/// What a watcher is doing (`state` in `/status`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WatcherState {
    /// Created, no list sent yet.
    #[default]
    Starting,
    /// Listing: the initial state (or a relist) is being read.
    Listing,
    /// The list is complete and changes are being watched.
    Watching,
    /// The last request failed; the watcher retries.
    Failing,
}

/// Where the agent reads Services and EndpointSlices from (`source` in
/// `/status`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// `--manifests`: YAML files.
    #[default]
    Manifests,
    /// The Kubernetes API.
    Kubernetes,
}

/// What a watcher is doing.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct WatcherStatus {
    pub state: WatcherState,
    pub last_error: Option<String>,
    pub errors: u64,
    pub relists: u64,
}

/// The agent's own state, as `/status` serves it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    pub source: SourceKind,
    pub api_server: Option<String>,
    pub node_name: Option<String>,
    /// Kubernetes mode: whether the Node object of `node_name` exists.
    #[serde(default)]
    pub own_node_found: Option<bool>,
    /// `--kube-proxy-replacement`.
    pub kube_proxy_replacement: KprMode,
    pub cgroup: String,
    pub watchers: BTreeMap<String, WatcherStatus>,
    /// RFC 3339 time of the last fully successful sync.
    pub last_successful_sync: Option<String>,
    pub last_sync_ok: Option<bool>,
    pub syncs: u64,
    /// Services not programmed now (refused by the maps, or by
    /// translation), one entry each, sorted by Service.
    #[serde(default)]
    pub unprogrammed: Vec<UnprogrammedService>,
    /// Kernel features: name -> available.
    pub features: BTreeMap<String, bool>,
    /// North-south backend selection without annotation (`--lb-algorithm`).
    #[serde(default)]
    pub lb_algorithm: Option<LbAlgorithm>,
    /// Slots of a Maglev table (`--maglev-table-size`).
    #[serde(default)]
    pub maglev_table_size: Option<u32>,
    /// How remote backends are reached (`--nodeport-mode`); None with
    /// `--devices=`.
    #[serde(default)]
    pub nodeport_mode: Option<NodePortMode>,
    /// `--nodeport-acceleration`; None with `--devices=`.
    #[serde(default)]
    pub nodeport_acceleration: Option<Acceleration>,
    /// How the north-south tc programs are attached, `--tc-attach`
    /// resolved (`tcx` or `legacy`); None with `--devices=`.
    #[serde(default)]
    pub tc_attach: Option<TcAttach>,
    /// The north-south devices, unless `--devices=` turned it off.
    #[serde(default)]
    pub devices: Option<DeviceStatus>,
}

/// A Service that is not programmed, and why (`unprogrammed` in `/status`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnprogrammedService {
    /// `namespace/name`.
    pub service: String,
    /// The `reason` label of `kpr_services_unprogrammed`.
    pub reason: String,
    /// What a person needs to fix it.
    pub message: String,
}

/// What `--devices` (or device detection) means right now.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DeviceStatus {
    /// `--devices` as given (names and patterns); empty when detected.
    pub patterns: Vec<String>,
    /// No `--devices`: the node's devices are detected.
    #[serde(default)]
    pub detected: bool,
    /// Interfaces the north-south programs are attached to.
    pub attached: Vec<String>,
    /// Names in `--devices` no interface has yet (attached when they appear).
    pub missing: Vec<String>,
    /// The last failure to attach after a link change, if the last attempt failed.
    pub last_error: Option<String>,
    /// Re-attachments after link changes since the agent started.
    pub changes: u64,
}

/// Shared, updatable agent status.
#[derive(Clone, Debug, Default)]
pub struct StatusHandle(Arc<Mutex<AgentStatus>>);

impl StatusHandle {
    pub fn new(status: AgentStatus) -> StatusHandle {
        StatusHandle(Arc::new(Mutex::new(status)))
    }

    pub fn update(&self, f: impl FnOnce(&mut AgentStatus)) {
        if let Ok(mut s) = self.0.lock() {
            f(&mut s);
        }
    }

    pub fn get(&self) -> AgentStatus {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn record_sync(&self, ok: bool, unprogrammed: Vec<UnprogrammedService>) {
        self.update(|s| {
            s.syncs += 1;
            s.last_sync_ok = Some(ok);
            s.unprogrammed = unprogrammed;
            if ok {
                s.last_successful_sync = Some(k8s_openapi::jiff::Timestamp::now().to_string());
            }
        });
    }

    pub fn watcher(&self, kind: &str, f: impl FnOnce(&mut WatcherStatus)) {
        self.update(|s| f(s.watchers.entry(kind.to_string()).or_default()));
    }
}

/// `GET /status`.
pub fn status_router(status: StatusHandle) -> Router {
    Router::new().route(
        "/status",
        get(move || {
            let status = status.clone();
            async move { Json(status.get()) }
        }),
    )
}

/// Fill of one map.
#[derive(Debug, Serialize)]
pub struct MapFill {
    pub map: MapName,
    pub entries: usize,
    pub capacity: usize,
}

/// Everything `kpr status` reports; `-o json` prints it as it is.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The conclusion; [`Report::exit_code`] follows it.
    pub health: Health,
    /// The exit code of `kpr status` (see [`outcome`]).
    pub exit_code: u8,
    /// The problems the agent reports, in words (empty when healthy or
    /// unreachable).
    pub problems: Vec<String>,
    /// The agent's status; null when it could not be read.
    pub agent: Option<AgentStatus>,
    /// Why the agent's status could not be read; null when it was.
    pub error: Option<AgentError>,
    pub bpf_root: String,
    pub attached_hooks: Vec<String>,
    /// North-south tcx attachments, `device/direction`.
    pub nodeport_devices: Vec<String>,
    /// Conntrack entries and capacity, when the north-south datapath is on.
    pub conntrack: Option<(usize, usize)>,
    /// Pod devices the north-south datapath redirects into
    /// (`kpr_peerdev_v1`), when it is on.
    pub pod_devices: Option<usize>,
    pub maps: Vec<MapFill>,
    pub frontends: usize,
    pub backends: usize,
}

/// Gathers the report: the agent's `/status` at `agent_addr` (its metrics
/// address) and the
/// pinned datapath under `bpf_root`.
pub fn gather(agent_addr: SocketAddr, bpf_root: &Path) -> Report {
    let agent = outcome::fetch(agent_addr);
    let health = outcome::health(&agent);
    let problems = agent.as_ref().map(outcome::problems).unwrap_or_default();
    let (agent, error) = match agent {
        Ok(a) => (Some(a), None),
        Err(e) => (None, Some(e)),
    };
    let attached_hooks = loader::attached_hooks(bpf_root)
        .iter()
        .map(|h| h.attach_point.to_string())
        .collect();
    let (mut maps, mut frontends, mut backends) = (Vec::new(), 0, 0);
    if let Ok(kernel) = KernelMaps::open(bpf_root) {
        for map in MapName::LOAD_BALANCER {
            maps.push(MapFill {
                map,
                entries: kernel.entry_count(map),
                capacity: kernel.max_entries(map),
            });
        }
        if let Ok(snapshot) = kernel.snapshot() {
            frontends = snapshot.frontends.len();
            backends = snapshot.backends.len();
        }
    }
    Report {
        health,
        exit_code: health.exit_code(),
        problems,
        agent,
        error,
        bpf_root: bpf_root.display().to_string(),
        attached_hooks,
        nodeport_devices: crate::datapath::nodeport::attached_devices(bpf_root)
            .iter()
            .map(|d| format!("{}/{}", d.device, d.direction.as_str()))
            .chain(crate::datapath::nodeport::attached_xdp(bpf_root))
            .collect(),
        conntrack: crate::datapath::ct::CtMap::open(bpf_root)
            .ok()
            .and_then(|ct| Some((ct.entries().ok()?.len(), ct.max_entries()))),
        pod_devices: crate::datapath::peer_devices::open(bpf_root)
            .ok()
            .map(|t| t.keys().len()),
        maps,
        frontends,
        backends,
    }
}

/// How the north-south programs are attached, and why when not by tcx.
fn tc_attachment(a: &AgentStatus, attach: TcAttach) -> String {
    match attach {
        TcAttach::Legacy => {
            let why = if a.features.get(crate::features::TCX) == Some(&false) {
                "the kernel has no tcx"
            } else {
                "--tc-attach legacy"
            };
            format!("classic tc (clsact qdisc, cls_bpf filters; {why})")
        }
        other => other.as_str().to_string(),
    }
}

impl Report {
    /// The exit code of `kpr status` for this report.
    pub fn exit_code(&self) -> u8 {
        self.health.exit_code()
    }

    /// The agent's status, or why it could not be read.
    fn agent_or_error(&self) -> Result<&AgentStatus, &str> {
        match (&self.agent, &self.error) {
            (Some(a), _) => Ok(a),
            (None, Some(e)) => Err(&e.message),
            (None, None) => Err("no answer"),
        }
    }
}

/// The report as text, in the spirit of `cilium status --verbose`.
pub fn format_text(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "KubeProxyReplacement Details:");
    match r.agent_or_error() {
        Ok(a) => {
            let _ = writeln!(
                o,
                "  Mode:                 {}",
                name(&a.kube_proxy_replacement)
            );
            let _ = writeln!(o, "  Source:               {}", name(&a.source));
            if let Some(api) = &a.api_server {
                let _ = writeln!(o, "  API server:           {api}");
            }
            if let Some(node) = &a.node_name {
                let found = match a.own_node_found {
                    Some(false) => " (NO Node object with this name)",
                    _ => "",
                };
                let _ = writeln!(o, "  Node:                 {node}{found}");
            }
            for (kind, w) in &a.watchers {
                let err = w
                    .last_error
                    .as_deref()
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default();
                let _ = writeln!(
                    o,
                    "  Watcher {kind:<13} {} (errors {}, relists {}{err})",
                    name(&w.state),
                    w.errors,
                    w.relists
                );
            }
            let _ = writeln!(
                o,
                "  Last successful sync: {} ({} syncs, last {})",
                a.last_successful_sync.as_deref().unwrap_or("never"),
                a.syncs,
                match a.last_sync_ok {
                    Some(true) => "ok",
                    Some(false) => "FAILED",
                    None => "-",
                }
            );
            write_unprogrammed(&mut o, &a.unprogrammed);
            let missing: Vec<&str> = a
                .features
                .iter()
                .filter(|(_, ok)| !**ok)
                .map(|(f, _)| f.as_str())
                .collect();
            let _ = writeln!(
                o,
                "  Kernel features:      {}",
                if missing.is_empty() {
                    "all present".to_string()
                } else {
                    format!("missing {}", missing.join(", "))
                }
            );
            let _ = writeln!(o, "  Socket LB cgroup:     {}", a.cgroup);
            if let Some(alg) = &a.lb_algorithm {
                let size = a
                    .maglev_table_size
                    .map(|n| format!(" (Maglev table size {n})"))
                    .unwrap_or_default();
                let _ = writeln!(o, "  Backend selection:    {alg}{size}");
            }
            if let (Some(mode), Some(accel)) = (a.nodeport_mode, a.nodeport_acceleration) {
                let carrier = match mode {
                    NodePortMode::Snat => "",
                    NodePortMode::Dsr | NodePortMode::Hybrid => " (IPIP)",
                };
                let _ = writeln!(
                    o,
                    "  NodePort mode:        {}{carrier}, XDP acceleration {}",
                    name(&mode),
                    name(&accel)
                );
            }
            if let Some(attach) = a.tc_attach {
                let _ = writeln!(o, "  tc attachment:        {}", tc_attachment(a, attach));
            }
            if let Some(d) = &a.devices {
                let mut line = if d.attached.is_empty() {
                    "none present".to_string()
                } else {
                    d.attached.join(" ")
                };
                if !d.missing.is_empty() {
                    let _ = write!(line, " (waiting for {})", d.missing.join(" "));
                }
                if let Some(e) = &d.last_error {
                    let _ = write!(line, " (last attach FAILED: {e})");
                }
                let how = if d.detected {
                    "detected".to_string()
                } else {
                    format!("--devices {}", d.patterns.join(","))
                };
                let _ = writeln!(o, "  Devices:              {line} [{how}]");
            }
        }
        Err(e) => {
            let _ = writeln!(o, "  Agent:                {e}");
        }
    }
    let _ = writeln!(
        o,
        "  Socket LB hooks:      {}",
        if r.attached_hooks.is_empty() {
            "none".into()
        } else {
            r.attached_hooks.join(" ")
        }
    );
    let _ = writeln!(
        o,
        "  North-south:          {}",
        if r.nodeport_devices.is_empty() {
            "off (no device attached)".into()
        } else {
            r.nodeport_devices.join(" ")
        }
    );
    if let Some((entries, capacity)) = r.conntrack {
        let _ = writeln!(o, "  Conntrack:            {entries} / {capacity} entries");
    }
    if let Some(n) = r.pod_devices {
        let _ = writeln!(
            o,
            "  Pod devices:          {n} (local backends behind them get packets straight into their namespace)"
        );
    }
    let _ = writeln!(
        o,
        "  Services:             {} frontends, {} backends",
        r.frontends, r.backends
    );
    let _ = writeln!(o, "  BPF maps ({}):", r.bpf_root);
    for m in &r.maps {
        let pct = if m.capacity > 0 {
            100.0 * m.entries as f64 / m.capacity as f64
        } else {
            0.0
        };
        let _ = writeln!(
            o,
            "    {:<12} {:>8} / {:<8} ({pct:.1}%)",
            m.map.as_str(),
            m.entries,
            m.capacity
        );
    }
    if !r.problems.is_empty() {
        let _ = writeln!(o, "  Problems:             {}", r.problems.join("; "));
    }
    o
}

/// One line per Service the agent could not program, under a count
/// (nothing when every Service is programmed).
fn write_unprogrammed(o: &mut String, services: &[UnprogrammedService]) {
    if services.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "  Unprogrammed:         {} Services NOT programmed",
        services.len()
    );
    for u in services {
        let _ = writeln!(o, "    {} ({}): {}", u.service, u.reason, u.message);
    }
}

/// A value as `/status` spells it (its serde name): the text shows the
/// same words as the JSON.
fn name(value: &impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> AgentStatus {
        let mut a = AgentStatus {
            source: SourceKind::Kubernetes,
            kube_proxy_replacement: KprMode::Partial,
            lb_algorithm: Some(LbAlgorithm::Maglev),
            maglev_table_size: Some(16381),
            nodeport_mode: Some(NodePortMode::Hybrid),
            nodeport_acceleration: Some(Acceleration::Disabled),
            ..AgentStatus::default()
        };
        a.watchers.insert(
            "services".into(),
            WatcherStatus {
                state: WatcherState::Watching,
                ..WatcherStatus::default()
            },
        );
        a
    }

    #[test]
    fn status_json_spells_typed_values_as_the_flags_do() {
        let json = serde_json::to_value(agent()).unwrap();
        assert_eq!(json["source"], "kubernetes");
        assert_eq!(json["kube_proxy_replacement"], "partial");
        assert_eq!(json["lb_algorithm"], "maglev");
        assert_eq!(json["nodeport_mode"], "hybrid");
        assert_eq!(json["nodeport_acceleration"], "disabled");
        assert_eq!(json["watchers"]["services"]["state"], "watching");
        let back: AgentStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back.nodeport_mode, Some(NodePortMode::Hybrid));
    }

    #[test]
    fn status_text_names_mode_source_watchers_and_nodeport_mode() {
        let report = Report {
            health: Health::Healthy,
            exit_code: 0,
            problems: Vec::new(),
            agent: Some(agent()),
            error: None,
            bpf_root: "/sys/fs/bpf/kpr".into(),
            attached_hooks: Vec::new(),
            nodeport_devices: Vec::new(),
            conntrack: None,
            pod_devices: None,
            maps: Vec::new(),
            frontends: 0,
            backends: 0,
        };
        let text = format_text(&report);
        for line in [
            "  Mode:                 partial\n",
            "  Source:               kubernetes\n",
            "  Watcher services      watching (errors 0, relists 0)\n",
            "  Backend selection:    maglev (Maglev table size 16381)\n",
            "  NodePort mode:        hybrid (IPIP), XDP acceleration disabled\n",
        ] {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
        assert!(!text.contains("tc attachment"), "none without --devices");
    }

    #[test]
    fn status_text_says_how_north_south_attaches_and_why_not_by_tcx() {
        let line = |attach, tcx: bool| {
            let mut a = agent();
            a.features.insert("tcx".into(), tcx);
            tc_attachment(&a, attach)
        };
        assert_eq!(line(TcAttach::Tcx, true), "tcx");
        assert_eq!(
            line(TcAttach::Legacy, false),
            "classic tc (clsact qdisc, cls_bpf filters; the kernel has no tcx)"
        );
        assert_eq!(
            line(TcAttach::Legacy, true),
            "classic tc (clsact qdisc, cls_bpf filters; --tc-attach legacy)"
        );
        let mut legacy = agent();
        legacy.tc_attach = Some(TcAttach::Legacy);
        let report = Report {
            health: Health::Healthy,
            exit_code: 0,
            problems: Vec::new(),
            agent: Some(legacy.clone()),
            error: None,
            bpf_root: String::new(),
            attached_hooks: Vec::new(),
            nodeport_devices: Vec::new(),
            conntrack: None,
            pod_devices: None,
            maps: Vec::new(),
            frontends: 0,
            backends: 0,
        };
        assert!(format_text(&report).contains("  tc attachment:        classic tc ("));
        let json = serde_json::to_value(legacy).unwrap();
        assert_eq!(json["tc_attach"], "legacy");
    }
}
