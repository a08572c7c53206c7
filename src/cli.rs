//! Command-line interface. Every flag states its default.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::datapath::loader::DEFAULT_BPF_ROOT;
use crate::datapath::nodeport::{
    Acceleration, NoBackendResponse, NodePortMode, PortRange, TcAttach,
};
use crate::features::KprMode;
use crate::healthcheck;
use crate::maglev;
use crate::model::LbAlgorithm;

#[derive(Debug, Parser)]
#[command(
    name = "kpr",
    version,
    about = "kpr: a kube-proxy replacement on BPF socket-level load balancing"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: load and attach the datapath, keep its maps equal to the Services.
    /// SIGINT and SIGTERM stop it (the datapath stays); SIGHUP is ignored, with a log line.
    Agent(Box<AgentArgs>),
    /// Inspect services as the datapath holds them.
    Svc {
        #[command(subcommand)]
        command: SvcCommand,
    },
    /// Inspect north-south connection tracking.
    Ct {
        #[command(subcommand)]
        command: CtCommand,
    },
    /// Show the agent's and the datapath's state (like `cilium status --verbose`).
    ///
    /// Exit codes (as monitoring plugins): 0 the agent reports no problem;
    /// 1 the agent reports problems (no sync yet, the last sync failed,
    /// Services refused, a watcher failing, no Node object, devices missing
    /// or failing); 2 the agent could not be asked (nothing listens, an
    /// HTTP error, not kpr's answer); 3 bad usage or the report could not
    /// be written. With -o json, `health`, `exit_code` and `problems` say
    /// the same, and `error` is an object {kind, address, http_status,
    /// message} when the agent could not be asked (`agent` is then null).
    Status {
        #[command(flatten)]
        bpf_root: BpfRootArg,
        /// The agent's metrics address, where it also serves /status.
        #[arg(long, default_value = "127.0.0.1:10249")]
        metrics_addr: SocketAddr,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Say from the pinned maps what the datapath would do with a new flow
    /// from --client to --frontend, and why: the frontend and its Service,
    /// scope and traffic policy, the source-range verdict, and the backend
    /// with its reason (conntrack entry, session affinity, Maglev slot, or
    /// random with the candidates), for packets from outside the node
    /// (tc/XDP) and for sockets on it. Works without the agent.
    Explain(ExplainArgs),
    /// Print the load balancer's decisions as they happen (connects,
    /// datagrams, binds, north-south flows): client, frontend, backend,
    /// why that backend, verdict. Reads the pinned ring buffer; works
    /// without the agent. Turns the datapath's reporting on while it runs
    /// and off at exit (Ctrl-C too); says at exit how many events were
    /// sampled out, rate-limited or lost.
    Monitor(MonitorArgs),
    /// Detach every kpr program and remove every pinned map and link.
    Cleanup(CleanupArgs),
    /// Print the shell completion script for SHELL to stdout, e.g.
    /// `kpr completion bash > /etc/bash_completion.d/kpr` or
    /// `source <(kpr completion zsh)`.
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Build a throw-away network, run the agent on an example manifest, send
    /// real TCP and UDP traffic through the VIPs, report and remove everything.
    Selftest,
    /// Test-bed client used by selftest and the tests (runs one probe spec).
    #[command(hide = true)]
    Probe {
        /// The probe specification as JSON.
        #[arg(long)]
        spec: String,
    },
}

#[derive(Debug, Args)]
pub struct BpfRootArg {
    /// Directory on a BPF filesystem where kpr pins its maps and links.
    /// When it does not exist, kpr creates it and, unless it is inside a
    /// bpffs already, mounts bpffs there (mode 0700); an existing directory
    /// must be on bpffs. Never under /proc, /dev or /sys (but /sys/fs/bpf).
    #[arg(long, default_value = DEFAULT_BPF_ROOT)]
    pub bpf_root: PathBuf,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Standalone mode: Service and EndpointSlice manifests, a YAML/JSON file
    /// or a directory of them; repeatable. Edits are applied while the agent
    /// runs. Without it the agent watches the Kubernetes API.
    #[arg(long = "manifests", value_name = "PATH")]
    pub manifests: Vec<PathBuf>,
    /// kubeconfig for the API server [default: $KUBECONFIG, else the in-cluster config].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// API server URL, overriding the kubeconfig's, for nodes where nothing
    /// serves the `kubernetes` ClusterIP yet (Cilium's k8sServiceHost).
    #[arg(long, value_name = "URL")]
    pub k8s_api_server: Option<String>,
    /// This node's name [default: $NODE_NAME, else the hostname].
    #[arg(long)]
    pub node_name: Option<String>,
    /// An address of this node for NodePort frontends, added to the Node
    /// object's; repeatable (standalone mode has no Node object).
    #[arg(long = "node-ip", value_name = "IP")]
    pub node_ips: Vec<std::net::IpAddr>,
    /// This node's zone, compared with EndpointSlice zone hints (topology
    /// aware routing, `trafficDistribution: PreferClose`); over the Node's
    /// `topology.kubernetes.io/zone` label [default: that label; without
    /// a Node, no zone: hints are ignored].
    #[arg(long, value_name = "ZONE")]
    pub node_zone: Option<String>,
    /// Address the healthCheckNodePort listeners bind to.
    #[arg(long, default_value_t = healthcheck::DEFAULT_BIND_ADDR)]
    pub health_check_bind_address: std::net::IpAddr,
    /// How the agent writes its log lines to stderr. text: for people
    /// (colored on a terminal). json: one JSON object per line, with
    /// `timestamp`, `level`, `message`, `target` and the event's fields,
    /// for log collectors. The level filter is $KPR_LOG [default: info].
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Shortest time between two syncs; changes within it are coalesced
    /// (kube-proxy's --iptables-min-sync-period).
    #[arg(long, default_value = "10ms", value_parser = parse_period)]
    pub min_sync_period: std::time::Duration,
    /// Period of full resyncs of every Service (kube-proxy's --iptables-sync-period).
    #[arg(long, default_value = "30s", value_parser = parse_period)]
    pub sync_period: std::time::Duration,
    /// cgroup v2 directory whose processes get socket-level load balancing
    /// [default: the root of the host's cgroup2 mount].
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    #[command(flatten)]
    pub bpf_root: BpfRootArg,
    /// Let this agent move the pinned links of --bpf-root to --cgroup when
    /// an earlier agent attached them to another cgroup (which then loses
    /// translation). Default: such a change is refused.
    #[arg(long)]
    pub force_cgroup_change: bool,
    /// Address of the Prometheus metrics endpoint (/metrics) and of /status;
    /// /status answers only clients connecting from a loopback address
    /// (kube-proxy's default: loopback only).
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_addr: SocketAddr,
    /// The per-frontend load-balancing metrics carry the frontend and its
    /// Service (namespace, name, port name), and the per-backend ones the
    /// backend, while the node programs at most this many Services; above
    /// it they are summed over frontends (one series per verdict). 0: never.
    #[arg(long, default_value_t = crate::metrics::DEFAULT_PER_FRONTEND_MAX)]
    pub metrics_frontend_labels_max: usize,
    /// Address of the health endpoint (/healthz, /livez).
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_addr: SocketAddr,
    /// Fixed capacity of the services, backends and source-range maps, in
    /// entries, when they are created (pinned maps keep theirs). Without
    /// it the maps start at --lb-map-initial and grow on their own as the
    /// cluster needs (up to 1/32 of the node's memory), switched over with
    /// no connection lost; with it they never grow and Services that do
    /// not fit are refused (counted, shown by `kpr status`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(16..))]
    pub lb_map_max: Option<u32>,
    /// Capacity the services, backends and source-range maps are created
    /// with when --lb-map-max is not given (at least; standalone mode
    /// creates them large enough for the manifests' first read); they
    /// grow from there.
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(16..))]
    pub lb_map_initial: u32,
    /// strict: every kernel feature kpr uses must be there, or the agent
    /// exits naming the missing one; partial: run with what there is.
    #[arg(long, value_enum, default_value_t = KprMode::Strict)]
    pub kube_proxy_replacement: KprMode,
    /// Wait after a manifest change before syncing, so a burst of edits is one sync (ms).
    /// A completed write (a close after writing, a rename into place) is
    /// applied at once, without this wait.
    #[arg(long, default_value_t = 100)]
    pub debounce_ms: u64,
    /// Largest manifest file read, in bytes; a larger file is skipped
    /// (standalone mode).
    #[arg(long, default_value_t = 64 << 20, value_name = "BYTES")]
    pub manifest_max_file_bytes: u64,
    /// Largest manifest document parsed, in bytes; a larger one is skipped
    /// (standalone mode).
    #[arg(long, default_value_t = 3 << 20, value_name = "BYTES")]
    pub manifest_max_document_bytes: usize,
    /// Deepest nesting of lists and maps in a manifest document; a deeper one
    /// is skipped before it is parsed (standalone mode).
    #[arg(long, default_value_t = 64, value_name = "LEVELS")]
    pub manifest_max_depth: usize,
    /// The NodePort range, MIN-MAX (kube-apiserver's flag): in standalone
    /// mode a Service whose nodePort or healthCheckNodePort lies outside it
    /// is skipped, as the API server would refuse it.
    #[arg(long, default_value = "30000-32767", value_name = "MIN-MAX")]
    pub service_node_port_range: PortRange,
    /// Interfaces that carry north-south traffic (NodePort, LoadBalancer and
    /// externalIP frontends reached from outside the node), comma-separated
    /// or repeated; kpr attaches to their tc (tcx) ingress and egress. A
    /// trailing `+` or `*` matches by prefix (`eth+`, as Cilium). Interfaces
    /// are followed as they come and go: one that appears later is attached
    /// then, one that goes is forgotten (a named one missing at start is
    /// waited for, not an error). Default (no flag): the node's devices are
    /// detected, as Cilium does: every interface that is up and holds a
    /// global unicast address or a default route, without loopback, pod,
    /// tunnel, bridge and other virtual devices (docs/north-south.md), and
    /// followed as links, addresses and routes change. `--devices=` (empty)
    /// turns the north-south datapath off (socket LB only).
    #[arg(long, value_delimiter = ',', num_args = 0.., value_name = "DEV")]
    pub devices: Option<Vec<String>>,
    /// How north-south traffic reaches a backend on another node. snat:
    /// source-NAT to this node, replies return through it. dsr: the packet
    /// goes IPIP-encapsulated to the backend's node, which must run kpr
    /// too; the backend sees the client's address and replies straight to
    /// the client (pod addresses routed between nodes, and a route from
    /// every node to the clients, are needed). hybrid: dsr for TCP, snat
    /// for UDP. Default: snat.
    #[arg(long, value_enum, default_value_t = NodePortMode::Snat)]
    pub nodeport_mode: NodePortMode,
    /// XDP in front of the tc ingress program on every --devices interface.
    /// disabled: tc only. native: XDP in the driver (the agent fails on a
    /// device without driver support). generic: XDP in the stack, any
    /// device. XDP assumes packets carry full checksums, as from a wire.
    #[arg(long, value_enum, default_value_t = Acceleration::Disabled)]
    pub nodeport_acceleration: Acceleration,
    /// How the north-south programs attach to --devices. auto: tcx where
    /// the kernel has it (6.6+), else classic tc. tcx: tcx links (refused
    /// on a kernel without tcx). legacy: classic tc, a clsact qdisc and a
    /// cls_bpf direct-action filter per direction (any kernel kpr runs
    /// on). Switching mode moves the attachments over on start. Default:
    /// auto.
    #[arg(long, value_enum, default_value_t = TcAttach::Auto)]
    pub tc_attach: TcAttach,
    /// Hand packets for a local backend straight into its pod's network
    /// namespace (bpf_redirect_peer through the pod's veth or netkit
    /// device), skipping the host side of the pod's link. false: transmit
    /// them on the host side, through its qdisc and tc programs (the CNI
    /// bandwidth plugin shapes a pod's ingress there).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    pub nodeport_redirect_peer: bool,
    /// Source ports of SNATed north-south flows, MIN-MAX; keep them out of
    /// net.ipv4.ip_local_port_range (the agent warns on overlap).
    #[arg(long, default_value = "61000-65535", value_name = "MIN-MAX")]
    pub nodeport_snat_ports: PortRange,
    /// What a north-south client opening a flow to a frontend without any
    /// backend gets. reject: an ICMP port unreachable (its connect() fails
    /// at once with ECONNREFUSED), as kube-proxy and Cilium do. drop:
    /// nothing (it times out). A Local external traffic policy without a
    /// local backend always drops, as kube-proxy does; node-local clients
    /// (socket LB) always get ECONNREFUSED at once.
    #[arg(long, value_enum, default_value_t = NoBackendResponse::Reject)]
    pub service_no_backend_response: NoBackendResponse,
    /// Capacity of the north-south conntrack map, in entries (two per flow),
    /// when it is created (a pinned map keeps its own).
    #[arg(long, default_value_t = 131072)]
    pub ct_map_max: u32,
    /// Conntrack lifetime of an established TCP flow since its last packet.
    #[arg(long, default_value = "6h", value_parser = humantime::parse_duration)]
    pub ct_tcp_timeout: std::time::Duration,
    /// Conntrack lifetime of a TCP flow the backend has not answered yet.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub ct_tcp_syn_timeout: std::time::Duration,
    /// Conntrack lifetime of a TCP flow after FIN or RST.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub ct_tcp_closing_timeout: std::time::Duration,
    /// Conntrack lifetime of a UDP flow since its last packet.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub ct_udp_timeout: std::time::Duration,
    /// How often the agent removes expired conntrack entries.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub ct_gc_interval: std::time::Duration,
    /// How the north-south datapath picks the backend of a new flow
    /// (needs --devices). random: uniformly. maglev: Maglev consistent
    /// hashing of the client's address and port, so every node picks the
    /// same backend for the same client and removing a backend moves few
    /// other flows. The annotation service.kpr.io/lb-algorithm: random|maglev
    /// overrides it per Service. Node-local clients (socket LB) always get
    /// a random backend.
    #[arg(long, value_enum, default_value_t = LbAlgorithm::Random)]
    pub lb_algorithm: LbAlgorithm,
    /// Slots of every Maglev table: one of the primes 251, 509, 1021, 2039,
    /// 4093, 8191, 16381, 32749, 65521, 131071. At least 100 x a Service's
    /// backends keeps their shares even; a Service with more backends than
    /// slots is refused. Each table takes 4 bytes a slot (16381: 64 KiB)
    /// per north-south frontend with Maglev. Must be equal on every node.
    #[arg(long, default_value_t = maglev::DEFAULT_TABLE_SIZE, value_parser = maglev::parse_table_size)]
    pub maglev_table_size: u32,
    /// Seed of the Maglev tables and of the flow hash, any 64-bit number.
    /// Must be equal on every node.
    #[arg(long, default_value_t = maglev::DEFAULT_HASH_SEED)]
    pub maglev_hash_seed: u64,
}

#[derive(Debug, Subcommand)]
pub enum SvcCommand {
    /// List frontends and their backends, like `cilium service list`, with
    /// each frontend's Service from the agent's record.
    List {
        #[command(flatten)]
        bpf_root: BpfRootArg,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
        /// Instead of the list, compare the maps with the agent's record of
        /// what it programmed and print every difference (missing, extra or
        /// stale frontend or backend, a wrong Maglev table). Exit status: 0
        /// in sync, 1 a difference, 2 no record (no agent has synced this
        /// --bpf-root since boot) or the maps cannot be read. Default: off.
        #[arg(long)]
        verify: bool,
    },
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub bpf_root: BpfRootArg,
    /// The frontend, IP:PORT/PROTO (`10.96.0.10:80/TCP`, `[fd00::1]:53/UDP`;
    /// PROTO defaults to TCP).
    #[arg(long, value_parser = parse_frontend)]
    pub frontend: crate::model::L4Addr,
    /// The client's address and source port, IP:PORT.
    #[arg(long)]
    pub client: SocketAddr,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// `IP:PORT[/PROTO]`, PROTO TCP or UDP (any case), TCP when left out.
fn parse_frontend(s: &str) -> Result<crate::model::L4Addr, String> {
    use crate::model::{L4Addr, Protocol};
    let (addr, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    let proto = match proto.to_ascii_uppercase().as_str() {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        other => return Err(format!("protocol {other:?} is not TCP or UDP")),
    };
    let sa: SocketAddr = addr
        .parse()
        .map_err(|e| format!("{addr:?} is not IP:PORT: {e}"))?;
    Ok(L4Addr {
        ip: sa.ip(),
        port: sa.port(),
        proto,
    })
}

#[derive(Debug, Subcommand)]
pub enum CtCommand {
    /// List conntrack entries (two per flow: orig and reply), like
    /// `cilium bpf ct list global`.
    List {
        #[command(flatten)]
        bpf_root: BpfRootArg,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct MonitorArgs {
    #[command(flatten)]
    pub bpf_root: BpfRootArg,
    /// Output: readable lines (table) or JSON lines.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Only events of this frontend: `10.96.0.10:80/TCP`, `10.96.0.10:80`,
    /// `10.96.0.10` or its id.
    #[arg(long)]
    pub frontend: Option<String>,
    /// Only events of this Service: `namespace/name` or
    /// `namespace/name:port-name`, as `svc list` names it (from the agent's
    /// record of what it programmed).
    #[arg(long)]
    pub service: Option<String>,
    /// Only events whose chosen backend is this one (address, address:port or id).
    #[arg(long)]
    pub backend: Option<String>,
    /// Only events of this verdict (translated, no_backend, source_range,
    /// local_policy, invalid_port, bind_refused, flow_failed).
    #[arg(long, value_parser = crate::monitor::parse_verdict)]
    pub verdict: Option<crate::datapath::lb_stats::Verdict>,
    /// Stop after this many events shown.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this long (e.g. `30s`, `5m`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<std::time::Duration>,
    /// Keep one decision in this many (1: every one).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub sample_every: u32,
    /// Events a second per CPU the datapath may report (0: unlimited).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u32,
    /// Events per CPU reported at once above --rate.
    #[arg(long, default_value_t = 1_000)]
    pub burst: u32,
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    #[command(flatten)]
    pub bpf_root: BpfRootArg,
    /// Also detach kpr programs linked to this cgroup v2 directory whose
    /// pins are gone [default: only what is pinned under --bpf-root].
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Clean up even while an agent holds --bpf-root (it keeps running,
    /// translating nothing). Default: refused, naming the agent's pid.
    #[arg(long)]
    pub force: bool,
    /// Instead of kpr's datapath, remove kube-proxy's leftovers from this
    /// network namespace, as `kube-proxy --cleanup`: its iptables and
    /// ip6tables chains (legacy and nft backends) and the rules jumping to
    /// them, its nftables tables and the IPVS device kube-ipvs0. kpr's own
    /// programs keep running. Default: false.
    #[arg(long, conflicts_with_all = ["cgroup", "force"])]
    pub kube_proxy: bool,
}

/// Gives a config type of the datapath its flag values: the type itself
/// knows nothing of clap. Each value is listed with its help, in order.
macro_rules! value_enum {
    ($t:ty { $($variant:ident => $name:literal: $help:literal,)+ }) => {
        impl ValueEnum for $t {
            fn value_variants<'a>() -> &'a [Self] {
                &[$(<$t>::$variant),+]
            }

            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(match self {
                    $(<$t>::$variant => clap::builder::PossibleValue::new($name).help($help),)+
                })
            }
        }
    };
}

value_enum!(NodePortMode {
    Snat => "snat": "Source-NAT to the node: replies come back through this node",
    Dsr => "dsr": "Direct server return: the packet goes IPIP-encapsulated to the backend's node (which needs kpr too), the backend sees the client's address and its reply goes straight to the client",
    Hybrid => "hybrid": "DSR for TCP, SNAT for UDP",
});

value_enum!(Acceleration {
    Disabled => "disabled": "tc (tcx) only",
    Native => "native": "XDP in the driver (XDP_FLAGS_DRV_MODE); fails on devices without it",
    Generic => "generic": "XDP in generic (skb) mode, on any device",
});

value_enum!(TcAttach {
    Auto => "auto": "tcx where the kernel has it (6.6+), classic tc otherwise",
    Tcx => "tcx": "tcx links; refused on a kernel without tcx",
    Legacy => "legacy": "Classic tc: clsact qdisc and cls_bpf direct-action filters",
});

value_enum!(NoBackendResponse {
    Reject => "reject": "ICMP destination unreachable (port unreachable), for TCP and UDP alike: what kube-proxy's REJECT sends",
    Drop => "drop": "Nothing: the packet is dropped",
});

value_enum!(KprMode {
    Strict => "strict": "Every feature is required; a missing one is a start-up error",
    Partial => "partial": "Run with the features the kernel has; report the missing ones",
});

/// A duration such as `10ms` or `30s`; zero is refused (a zero period would
/// spin).
fn parse_period(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(args: &[&str]) -> Result<AgentArgs, String> {
        let argv = ["kpr", "agent"].iter().chain(args);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Agent(a) => Ok(*a),
            other => Err(format!("not the agent: {other:?}")),
        }
    }

    #[test]
    fn maglev_flags_default_to_random_16381_and_seed_0() {
        let a = agent(&[]).unwrap();
        assert_eq!(a.lb_algorithm, LbAlgorithm::Random);
        assert_eq!(a.maglev_table_size, 16381);
        assert_eq!(a.maglev_hash_seed, 0);
        let a = agent(&[
            "--lb-algorithm",
            "maglev",
            "--maglev-table-size",
            "65521",
            "--maglev-hash-seed",
            "18446744073709551615",
        ])
        .unwrap();
        assert_eq!(
            (a.lb_algorithm, a.maglev_table_size, a.maglev_hash_seed),
            (LbAlgorithm::Maglev, 65521, u64::MAX)
        );
    }

    #[test]
    fn devices_absent_empty_and_named_are_three_different_things() {
        assert_eq!(agent(&[]).unwrap().devices, None, "absent: detect");
        for off in [&["--devices="][..], &["--devices"], &["--devices", ""]] {
            let d = agent(off).unwrap().devices;
            let d = d.expect("given");
            assert!(d.iter().all(String::is_empty), "{off:?}: {d:?}");
        }
        let named = agent(&["--devices=eth0,eth+", "--devices", "bond0"]).unwrap();
        assert_eq!(
            named.devices.as_deref(),
            Some(&["eth0".to_string(), "eth+".into(), "bond0".into()][..])
        );
    }

    #[test]
    fn logs_are_text_unless_json_is_asked_for() {
        assert_eq!(agent(&[]).unwrap().log_format, LogFormat::Text);
        assert_eq!(
            agent(&["--log-format", "json"]).unwrap().log_format,
            LogFormat::Json
        );
        let err = agent(&["--log-format", "xml"]).unwrap_err();
        assert!(err.contains("text") && err.contains("json"), "{err}");
    }

    #[test]
    fn bad_maglev_flags_are_refused_with_the_allowed_values() {
        let err = agent(&["--maglev-table-size", "16384"]).unwrap_err();
        assert!(
            err.contains("--maglev-table-size") && err.contains("16384") && err.contains("16381"),
            "{err}"
        );
        let err = agent(&["--lb-algorithm", "round-robin"]).unwrap_err();
        assert!(err.contains("random") && err.contains("maglev"), "{err}");
        let err = agent(&["--maglev-hash-seed=-1"]).unwrap_err();
        assert!(err.contains("--maglev-hash-seed"), "{err}");
    }
}
