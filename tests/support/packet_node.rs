//! A node for packet tests: the north-south tc and XDP programs loaded as
//! the agent loads them (`nodeport::load_tc`/`load_xdp`, the same knobs),
//! their maps written by the agent's own path (manifest -> translation ->
//! `Reconciler` on `KernelMaps` -> DSR table), run with BPF_PROG_TEST_RUN.
//! Nothing is attached anywhere and no packet leaves the kernel's test
//! runner: a redirect is only a verdict.
//!
//! The programs ask the FIB where a packet goes (`bpf_fib_lookup`), which
//! reads the routes and neighbours of the calling thread's network
//! namespace. So that the answers are the same on every machine, and the
//! host's tables are never read nor touched, [`TestNode::start`] moves the
//! calling thread into a network namespace of its own holding one veth
//! pair with fixed addresses, routes and permanent neighbours (no traffic
//! crosses it); the namespace goes with the thread. Every call on a node
//! must come from the thread that started it.
//!
//! The maps live on a bpffs the node mounts on an empty directory it
//! created, and unmounts on drop (also when a test panics).

#![allow(dead_code)] // each test crate uses its own part

use std::collections::BTreeMap;
use std::io::Write;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use libbpf_rs::{MapCore, MapFlags, MapHandle, OpenObject, ProgramInput, ProgramMut};

use kpr::datapath::ct::{CtMap, NodePortStats};
use kpr::datapath::dsr::{self, DsrTable};
use kpr::datapath::kernel::KernelMaps;
use kpr::datapath::loader::{self, MapSizes};
use kpr::datapath::nodeport::{
    self, Acceleration, CtTimeouts, NoBackendResponse, NodePortConfig, NodePortMode, PortRange,
    TcAttach, DEFAULT_SNAT_PORTS,
};
use kpr::datapath::skel::nodeport::NodeportSkel;
use kpr::datapath::skel::nodeport_xdp::NodeportXdpSkel;
use kpr::datapath::Snapshot;
use kpr::maglev::MaglevParams;
use kpr::model::{LbAlgorithm, Protocol, Scope};
use kpr::reconcile::Reconciler;
use kpr::source::manifests;
use kpr::translate::{self, NodeContext};

/// Panics unless running as root; the caller is `#[ignore = "needs root"]`
/// (the convention every root-only test follows, see `kpr_testbed`).
#[allow(unused_imports)] // benches/packet.rs includes this file too
pub use kpr_testbed::require_root;

/// The node's address on its device `ext0`: the NodePort address.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// A client on ext0's link.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x09];
/// A client on ext0's link outside `guarded`'s source ranges.
pub const OUTSIDER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Another node, next hop to its pods (10.244.2.0/24).
pub const NODE2_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// A router on ext0's link without a neighbour entry, next hop to
/// 10.244.3.0/24.
pub const UNRESOLVED_ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
/// The local pods' device (ext0's veth peer) and the local pod behind it.
pub const POD_DEV_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x00];
pub const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
pub const LOCAL_POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x11];
/// `remote`'s endpoint, on node2.
pub const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 21);
/// `maglev`'s endpoints, on node2.
pub const MAGLEV_PODS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(10, 244, 2, 31),
    Ipv4Addr::new(10, 244, 2, 32),
    Ipv4Addr::new(10, 244, 2, 33),
    Ipv4Addr::new(10, 244, 2, 34),
];
/// `guarded`'s endpoint, on node2, and its load balancer address.
pub const GUARDED_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 41);
pub const GUARDED_LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// `unrouted`'s endpoint, behind [`UNRESOLVED_ROUTER`].
pub const UNRESOLVED_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 51);

/// The IPv6 side of the same link: the node's NodePort address, the
/// client, node2 (next hop to fd00:0:244:2::/64) and the pods.
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0xc, 0, 0, 0, 0, 1);
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0xc, 0, 0, 0, 0, 9);
pub const NODE2_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0xc, 0, 0, 0, 0, 2);
pub const LOCAL_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0x244, 1, 0, 0, 0, 0x11);
pub const REMOTE_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0x244, 2, 0, 0, 0, 0x21);

/// Pods' ports.
pub const POD_TCP: u16 = 8080;
pub const POD_UDP: u16 = 5353;
/// NodePorts of the Services in [`MANIFEST`].
pub const NP_REMOTE_TCP: u16 = 30080;
pub const NP_REMOTE_UDP: u16 = 30053;
pub const NP_LOCAL: u16 = 30081;
pub const NP_LOCAL_UDP: u16 = 30054;
pub const NP_MAGLEV: u16 = 30082;
pub const NP_EMPTY_TCP: u16 = 30083;
pub const NP_EMPTY_UDP: u16 = 30085;
pub const NP_GUARDED: u16 = 30084;
pub const NP_UNROUTED: u16 = 30086;
/// NodePorts of the IPv6-only Services `remote6` (TCP, UDP) and `local6`.
pub const NP6_REMOTE_TCP: u16 = 30090;
pub const NP6_REMOTE_UDP: u16 = 30092;
pub const NP6_LOCAL: u16 = 30091;
/// NodePort of `guarded6` (LoadBalancer [`GUARDED_LB_IP6`], source range
/// [`CLIENT_IP6`]/128 only, a pod behind node2).
pub const NP6_GUARDED: u16 = 30093;
/// NodePort of `maglev6` (Maglev, [`MAGLEV_PODS6`] behind node2).
pub const NP6_MAGLEV: u16 = 30094;
pub const MAGLEV_PODS6: [Ipv6Addr; 4] = [
    Ipv6Addr::new(0xfd00, 0, 0x244, 2, 0, 0, 0, 0x31),
    Ipv6Addr::new(0xfd00, 0, 0x244, 2, 0, 0, 0, 0x32),
    Ipv6Addr::new(0xfd00, 0, 0x244, 2, 0, 0, 0, 0x33),
    Ipv6Addr::new(0xfd00, 0, 0x244, 2, 0, 0, 0, 0x34),
];
pub const GUARDED_LB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0xb, 0, 0, 0, 0, 0x10);
pub const GUARDED_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0x244, 2, 0, 0, 0, 0x41);
/// Maglev table size of the node (one of the allowed primes).
pub const MAGLEV_TABLE_SIZE: u32 = 251;

/// The Services the node programs, translated as the agent translates them
/// for node `node1` with node IP [`NODE_IP`].
pub const MANIFEST: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: remote, namespace: t}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: remote-1, namespace: t, labels: {kubernetes.io/service-name: remote}}
addressType: IPv4
ports:
- {name: http, protocol: TCP, port: 8080}
- {name: dns, protocol: UDP, port: 5353}
endpoints:
- {addresses: [10.244.2.21], nodeName: node2}
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: t}
spec:
  type: NodePort
  clusterIP: 10.96.0.11
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30081}
  - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30054}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: t, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports:
- {name: http, protocol: TCP, port: 8080}
- {name: dns, protocol: UDP, port: 5353}
endpoints:
- {addresses: [10.244.1.11], nodeName: node1}
---
apiVersion: v1
kind: Service
metadata:
  name: maglev
  namespace: t
  annotations: {service.kpr.io/lb-algorithm: maglev}
spec:
  type: NodePort
  clusterIP: 10.96.0.12
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30082}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: maglev-1, namespace: t, labels: {kubernetes.io/service-name: maglev}}
addressType: IPv4
ports:
- {name: http, protocol: TCP, port: 8080}
endpoints:
- {addresses: [10.244.2.31], nodeName: node2}
- {addresses: [10.244.2.32], nodeName: node2}
- {addresses: [10.244.2.33], nodeName: node2}
- {addresses: [10.244.2.34], nodeName: node2}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: t}
spec:
  type: NodePort
  clusterIP: 10.96.0.13
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30083}
  - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30085}
---
apiVersion: v1
kind: Service
metadata: {name: guarded, namespace: t}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.14
  loadBalancerSourceRanges: ["192.0.2.9/32"]
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30084}
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.10}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: guarded-1, namespace: t, labels: {kubernetes.io/service-name: guarded}}
addressType: IPv4
ports:
- {name: http, protocol: TCP, port: 8080}
endpoints:
- {addresses: [10.244.2.41], nodeName: node2}
---
apiVersion: v1
kind: Service
metadata: {name: unrouted, namespace: t}
spec:
  type: NodePort
  clusterIP: 10.96.0.15
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30086}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: unrouted-1, namespace: t, labels: {kubernetes.io/service-name: unrouted}}
addressType: IPv4
ports:
- {name: http, protocol: TCP, port: 8080}
endpoints:
- {addresses: [10.244.3.51], nodeName: node3}
---
apiVersion: v1
kind: Service
metadata: {name: remote6, namespace: t}
spec:
  type: NodePort
  ipFamilies: [IPv6]
  clusterIP: "fd00:96::16"
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30090}
  - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30092}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: remote6-1, namespace: t, labels: {kubernetes.io/service-name: remote6}}
addressType: IPv6
ports:
- {name: http, protocol: TCP, port: 8080}
- {name: dns, protocol: UDP, port: 5353}
endpoints:
- {addresses: ["fd00:0:244:2::21"], nodeName: node2}
---
apiVersion: v1
kind: Service
metadata: {name: local6, namespace: t}
spec:
  type: NodePort
  ipFamilies: [IPv6]
  clusterIP: "fd00:96::17"
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30091}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local6-1, namespace: t, labels: {kubernetes.io/service-name: local6}}
addressType: IPv6
ports:
- {name: http, protocol: TCP, port: 8080}
endpoints:
- {addresses: ["fd00:0:244:1::11"], nodeName: node1}
---
apiVersion: v1
kind: Service
metadata: {name: guarded6, namespace: t}
spec:
  type: LoadBalancer
  ipFamilies: [IPv6]
  clusterIP: "fd00:96::18"
  loadBalancerSourceRanges: ["fd00:0:c::9/128"]
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30093}
status:
  loadBalancer:
    ingress: [{ip: "fd00:0:b::10"}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: guarded6-1, namespace: t, labels: {kubernetes.io/service-name: guarded6}}
addressType: IPv6
ports:
- {name: http, protocol: TCP, port: 8080}
endpoints:
- {addresses: ["fd00:0:244:2::41"], nodeName: node2}
---
apiVersion: v1
kind: Service
metadata:
  name: maglev6
  namespace: t
  annotations: {service.kpr.io/lb-algorithm: maglev}
spec:
  type: NodePort
  ipFamilies: [IPv6]
  clusterIP: "fd00:96::19"
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30094}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: maglev6-1, namespace: t, labels: {kubernetes.io/service-name: maglev6}}
addressType: IPv6
ports:
- {name: http, protocol: TCP, port: 8080}
endpoints:
- {addresses: ["fd00:0:244:2::31"], nodeName: node2}
- {addresses: ["fd00:0:244:2::32"], nodeName: node2}
- {addresses: ["fd00:0:244:2::33"], nodeName: node2}
- {addresses: ["fd00:0:244:2::34"], nodeName: node2}
"#;

/// The network of the node's namespace, for `ip -batch -`.
const NETWORK: &str = "\
link set lo up
link add ext0 address 02:00:00:00:00:01 type veth peer name pod0 address 02:00:00:00:01:00
link set ext0 up
link set pod0 up
addr add 192.0.2.1/24 dev ext0
neigh add 192.0.2.9 lladdr 02:00:00:00:00:09 dev ext0 nud permanent
neigh add 192.0.2.10 lladdr 02:00:00:00:00:0a dev ext0 nud permanent
neigh add 192.0.2.2 lladdr 02:00:00:00:00:02 dev ext0 nud permanent
route add 10.244.2.0/24 via 192.0.2.2 dev ext0
route add 10.244.3.0/24 via 192.0.2.3 dev ext0
route add 10.244.1.0/24 dev pod0
neigh add 10.244.1.11 lladdr 02:00:00:00:01:11 dev pod0 nud permanent
addr add fd00:0:c::1/64 dev ext0 nodad
neigh add fd00:0:c::9 lladdr 02:00:00:00:00:09 dev ext0 nud permanent
neigh add fd00:0:c::2 lladdr 02:00:00:00:00:02 dev ext0 nud permanent
route add fd00:0:244:2::/64 via fd00:0:c::2 dev ext0
route add fd00:0:244:1::/64 dev pod0
neigh add fd00:0:244:1::11 lladdr 02:00:00:00:01:11 dev pod0 nud permanent
";

/// The agent's north-south configuration for the node: `ext0`, SNAT mode,
/// reject, default ports and timeouts, Maglev tables of
/// [`MAGLEV_TABLE_SIZE`].
pub fn config() -> NodePortConfig {
    NodePortConfig {
        devices: kpr::datapath::nodeport::DeviceSelection::Named(vec!["ext0".into()]),
        mode: NodePortMode::Snat,
        acceleration: Acceleration::Native,
        tc_attach: TcAttach::Auto,
        snat_ports: DEFAULT_SNAT_PORTS,
        no_backend: NoBackendResponse::Reject,
        redirect_peer: true,
        timeouts: CtTimeouts::default(),
        maglev: MaglevParams::new(MAGLEV_TABLE_SIZE, 0).expect("Maglev parameters"),
    }
}

/// `config()` with another mode and SNAT port range.
pub fn config_with(mode: NodePortMode, snat_ports: PortRange) -> NodePortConfig {
    NodePortConfig {
        mode,
        snat_ports,
        ..config()
    }
}

/// Small maps: enough for the tests and the bench, quick to create.
const SIZES: MapSizes = MapSizes {
    services: 1024,
    backends: 1024,
    affinity: 1024,
    sock_revnat: 1024,
    source_ranges: 1024,
    ct: 65536,
    maglev: 64,
};

/// A program of the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// kpr_np_xdp, as on ext0.
    Xdp,
    /// kpr_np_ingress, as on ext0's tcx ingress.
    TcIngress,
    /// kpr_np_egress, as on ext0's tcx egress.
    TcEgress,
}

/// A program's return value, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// TC_ACT_UNSPEC (-1): on to the next tcx program or the stack.
    TcNext,
    TcOk,
    TcShot,
    TcRedirect,
    XdpDrop,
    XdpPass,
    XdpTx,
    XdpRedirect,
    Other(Hook, u32),
}

impl Verdict {
    fn of(hook: Hook, rc: u32) -> Verdict {
        match (hook, rc) {
            (Hook::Xdp, 1) => Verdict::XdpDrop,
            (Hook::Xdp, 2) => Verdict::XdpPass,
            (Hook::Xdp, 3) => Verdict::XdpTx,
            (Hook::Xdp, 4) => Verdict::XdpRedirect,
            (Hook::Xdp, _) => Verdict::Other(hook, rc),
            (_, u32::MAX) => Verdict::TcNext,
            (_, 0) => Verdict::TcOk,
            (_, 2) => Verdict::TcShot,
            (_, 7) => Verdict::TcRedirect,
            _ => Verdict::Other(hook, rc),
        }
    }
}

/// What one run of a program did.
#[derive(Debug)]
pub struct Outcome {
    pub verdict: Verdict,
    /// The packet as the program left it.
    pub bytes: Vec<u8>,
    /// The kernel's measure of one run (average over the repeats).
    pub duration: Duration,
}

/// bpffs mounted on an empty directory made for it; unmounted on drop.
struct BpfMount {
    at: PathBuf,
}

impl BpfMount {
    fn mount(at: &Path) -> BpfMount {
        std::fs::create_dir(at).expect("creating the bpffs mount point");
        nix::mount::mount(
            Some("bpffs"),
            at,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mounting bpffs");
        BpfMount {
            at: at.to_path_buf(),
        }
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        // Lazily: maps still open elsewhere keep it busy until closed.
        let _ = nix::mount::umount2(&self.at, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The node. Fields drop in order: programs, then the mount, then the
/// temporary directory.
pub struct TestNode {
    pub tc: NodeportSkel<'static>,
    pub xdp: NodeportXdpSkel<'static>,
    /// What the reconciler wrote.
    pub snapshot: Snapshot,
    pub config: NodePortConfig,
    pub ext_ifindex: u32,
    pub pod_ifindex: u32,
    bpf_root: PathBuf,
    _mount: BpfMount,
    _dir: tempfile::TempDir,
}

impl TestNode {
    /// Moves this thread into a network namespace of its own, sets up its
    /// network, mounts bpffs, loads the programs with `config` and
    /// programs [`MANIFEST`] as the agent would.
    pub fn start(config: NodePortConfig) -> TestNode {
        enter_own_netns();
        let dir = tempfile::tempdir().expect("temporary directory");
        let mount = BpfMount::mount(&dir.path().join("bpffs"));
        let bpf_root = mount.at.join("kpr");
        loader::create_maps(&bpf_root, &SIZES).expect("creating the load balancer's maps");
        let mss = nodeport::dsr_mss(&[1500]);
        let tc = nodeport::load_tc(storage(), &bpf_root, &SIZES, &config, mss)
            .expect("loading the tc programs");
        let xdp = nodeport::load_xdp(storage(), &bpf_root, &SIZES, &config, mss)
            .expect("loading the XDP program");

        let manifest = dir.path().join("services.yaml");
        std::fs::write(&manifest, MANIFEST).expect("writing the manifest");
        let set = manifests::load(&[manifest]);
        assert!(set.skipped.is_empty(), "{:?}", set.skipped);
        let node = NodeContext {
            node_name: "node1".into(),
            zone: None,
            node_ips: vec![IpAddr::V4(NODE_IP), IpAddr::V6(NODE_IP6)],
            lb_algorithm: LbAlgorithm::Random,
        };
        let translation = translate::translate(&set.services, &set.slices, &node);
        assert!(translation.skipped.is_empty(), "{:?}", translation.skipped);
        let maps = KernelMaps::open(&bpf_root).expect("opening the pinned maps");
        let mut reconciler =
            Reconciler::with_maglev(maps, config.maglev).expect("reading the pinned maps");
        let outcome = reconciler
            .sync_full(&translation.desired, true)
            .expect("programming the Services");
        assert!(outcome.refused.is_empty(), "{:?}", outcome.refused);
        DsrTable::open(&bpf_root)
            .and_then(|mut t| t.sync(&dsr::desired(reconciler.snapshot())))
            .expect("writing the DSR map");
        TestNode {
            tc,
            xdp,
            snapshot: reconciler.snapshot().clone(),
            config,
            ext_ifindex: ifindex("ext0"),
            pod_ifindex: ifindex("pod0"),
            bpf_root,
            _mount: mount,
            _dir: dir,
        }
    }

    pub fn bpf_root(&self) -> &Path {
        &self.bpf_root
    }

    fn program(&self, hook: Hook) -> &ProgramMut<'static> {
        match hook {
            Hook::Xdp => &self.xdp.progs.kpr_np_xdp,
            Hook::TcIngress => &self.tc.progs.kpr_np_ingress,
            Hook::TcEgress => &self.tc.progs.kpr_np_egress,
        }
    }

    /// Runs `hook`'s program `repeat` times on `frame` as it would on
    /// ext0 (ingress, or egress for [`Hook::TcEgress`]).
    #[track_caller]
    pub fn run(&self, hook: Hook, frame: &[u8], repeat: u32) -> Outcome {
        let mut ctx = match hook {
            Hook::Xdp => xdp_md(self.ext_ifindex, frame.len()),
            Hook::TcIngress => sk_buff(self.ext_ifindex, self.ext_ifindex),
            Hook::TcEgress => sk_buff(0, self.ext_ifindex),
        };
        let mut out = vec![0u8; 4096];
        let input = ProgramInput {
            context_in: Some(&mut ctx),
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        };
        let output = self
            .program(hook)
            .test_run(input)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {hook:?}: {e}"));
        let len = output.data.as_ref().map_or(0, |d| d.len());
        let (rc, duration) = (output.return_value, output.duration);
        out.truncate(len);
        Outcome {
            verdict: Verdict::of(hook, rc),
            bytes: out,
            duration,
        }
    }

    /// The north-south counters, by name (`NodePortStats`' fields).
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let stats = NodePortStats::read(&self.bpf_root).expect("reading the counters");
        match serde_json::to_value(stats).expect("counters as JSON") {
            serde_json::Value::Object(m) => m
                .into_iter()
                .map(|(k, v)| (k, v.as_u64().unwrap_or_default()))
                .collect(),
            other => panic!("counters are not an object: {other}"),
        }
    }

    /// The conntrack map, as `kpr ct list` reads it.
    pub fn ct(&self) -> CtMap {
        CtMap::open(&self.bpf_root).expect("opening the conntrack map")
    }

    /// Forgets every flow (the agent's GC with every entry expired).
    pub fn clear_ct(&self) {
        self.ct().gc(u64::MAX).expect("clearing the conntrack map");
    }

    /// The frontend id of NodePort `port` on the node IP.
    pub fn svc_id(&self, port: u16, proto: Protocol) -> u32 {
        self.svc_id_at(IpAddr::V4(NODE_IP), port, proto)
    }

    /// The id of the External frontend `ip:port/proto`.
    pub fn svc_id_at(&self, ip: IpAddr, port: u16, proto: Protocol) -> u32 {
        self.snapshot
            .frontends
            .iter()
            .find(|(fe, _)| {
                fe.scope == Scope::External
                    && fe.addr.ip == ip
                    && fe.addr.port == port
                    && fe.addr.proto == proto
            })
            .map(|(_, e)| e.master.svc_id)
            .unwrap_or_else(|| panic!("no frontend {ip}:{port}/{proto:?}"))
    }

    /// The address of backend `id`.
    pub fn backend_ip(&self, id: u32) -> IpAddr {
        self.snapshot
            .backends
            .get(&id)
            .map(|b| b.addr.ip)
            .unwrap_or_else(|| panic!("no backend {id}"))
    }

    /// Slot -> backend id of frontend `svc_id`'s Maglev table, read from
    /// the pinned map.
    pub fn maglev_table(&self, svc_id: u32) -> Vec<u32> {
        let outer = MapHandle::from_pinned_path(self.bpf_root.join("kpr_maglev_v1"))
            .expect("opening the Maglev map");
        let inner_id = outer
            .lookup(&svc_id.to_ne_bytes(), MapFlags::ANY)
            .expect("reading the Maglev map")
            .unwrap_or_else(|| panic!("no Maglev table for frontend {svc_id}"));
        let table = MapHandle::from_map_id(u32::from_ne_bytes(inner_id[..4].try_into().unwrap()))
            .expect("opening the Maglev table");
        (0..table.max_entries())
            .map(|slot| {
                let v = table
                    .lookup(&slot.to_ne_bytes(), MapFlags::ANY)
                    .expect("reading a Maglev slot")
                    .expect("a Maglev slot");
                u32::from_ne_bytes(v[..4].try_into().unwrap())
            })
            .collect()
    }
}

/// A home for one skeleton's open object, for as long as the test runs.
fn storage() -> &'static mut MaybeUninit<OpenObject> {
    Box::leak(Box::new(MaybeUninit::uninit()))
}

fn ifindex(name: &str) -> u32 {
    nix::net::if_::if_nametoindex(name).unwrap_or_else(|e| panic!("ifindex of {name}: {e}"))
}

/// A `struct __sk_buff` context: the device the packet is on and, at
/// ingress, the one it came in on. Only its head is given (the kernel
/// takes a shorter context as zero-filled); the offsets are UAPI.
fn sk_buff(ingress_ifindex: u32, ifindex: u32) -> Vec<u8> {
    const INGRESS_IFINDEX: usize = 36;
    const IFINDEX: usize = 40;
    let mut ctx = vec![0u8; IFINDEX + 4];
    ctx[INGRESS_IFINDEX..INGRESS_IFINDEX + 4].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx[IFINDEX..IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// A `struct xdp_md` context for a frame of `len` bytes received on
/// `ifindex` (queue 0).
fn xdp_md(ifindex: u32, len: usize) -> Vec<u8> {
    let mut ctx = vec![0u8; std::mem::size_of::<libbpf_sys::xdp_md>()];
    let at = std::mem::offset_of!(libbpf_sys::xdp_md, data_end);
    ctx[at..at + 4].copy_from_slice(&(len as u32).to_ne_bytes());
    let at = std::mem::offset_of!(libbpf_sys::xdp_md, ingress_ifindex);
    ctx[at..at + 4].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// Moves the calling thread into a new network namespace and sets up
/// [`NETWORK`] there, with forwarding on. Refuses to touch a namespace
/// that is not new.
fn enter_own_netns() {
    let ns = || std::fs::read_link("/proc/thread-self/ns/net").expect("this thread's namespace");
    let before = ns();
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("a network namespace for this thread");
    assert_ne!(
        ns(),
        before,
        "still in the namespace this thread started in"
    );
    // Children inherit the calling thread's namespace.
    let mut ip = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("running ip");
    ip.stdin
        .take()
        .expect("ip's stdin")
        .write_all(NETWORK.as_bytes())
        .expect("writing to ip");
    let status = ip.wait().expect("waiting for ip");
    assert!(status.success(), "ip -batch failed: {status}");
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("forwarding on");
    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").expect("IPv6 forwarding on");
}
