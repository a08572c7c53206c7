//! North-south datapath end to end on a multi-node network: an external
//! client, two nodes each running its own kpr agent (own bpf root, own
//! devices, inside the node's namespace), pods behind each node, and a
//! NodePort Service whose endpoints are on both nodes.
//!
//! Needs root (namespaces, BPF, tcx); without it every test says so and
//! passes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kpr::datapath::layout::{CtDir, CtRecord};
use kpr::datapath::nodeport::attached_devices;
use kpr::model::Protocol;
use kpr::testbed::cluster::{client_ip, CLIENT_TO_NODE1_IF, NODE_PEER_IF};
use kpr::testbed::errno::error_name;
use kpr::testbed::nodeport_bed::{nodeport_manifest, POD_TCP, POD_UDP};
use kpr::testbed::probe::RequestsReport;
use kpr::testbed::server::split_reply;
use kpr::testbed::{
    run_probe, Cluster, ClusterNode, ClusterPlan, Netns, NodePortBed, NsThread, ProbeResult,
    ProbeSpec,
};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");
const NODE_PORT_TCP: u16 = 30080;
const NODE_PORT_UDP: u16 = 30053;

fn root() -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        eprintln!("!!! SKIPPED: NodePort tests need root (namespaces, BPF, tcx)");
    }
    root
}

/// NodePort of `web-local` (externalTrafficPolicy Local, pods on both nodes).
const NODE_PORT_LOCAL: u16 = 30081;
/// NodePort of `one-local` (externalTrafficPolicy Local, pods on node1 only).
const NODE_PORT_ONE_LOCAL: u16 = 30082;
/// NodePort of `empty` (no endpoints), TCP.
const NODE_PORT_EMPTY: u16 = 30083;
/// NodePort of `empty`, UDP.
const NODE_PORT_EMPTY_UDP: u16 = 30085;
/// NodePort of `guarded` (LoadBalancer with loadBalancerSourceRanges).
const NODE_PORT_GUARDED: u16 = 30084;
/// The load balancer ingress IP of `guarded` (routed to node1).
const GUARDED_LB_IP: &str = "203.0.113.10";
/// The one client address `guarded` admits: the client's address on its
/// link to node1 (192.0.2.9).
const GUARDED_RANGE: &str = "192.0.2.9/32";
/// A second client address on the same link, outside the range.
const OUTSIDER: &str = "192.0.2.10";

/// The NodePort Service `web` (TCP and UDP) with every pod of both nodes as
/// endpoints, plus the Local-policy, endpoint-less and source-range
/// guarded Services above.
fn manifest(cluster: &Cluster) -> String {
    let (web, others) = manifest_parts(cluster);
    web + &others
}

/// [`manifest`] as `web` and the other Services.
fn manifest_parts(cluster: &Cluster) -> (String, String) {
    let mut endpoints = String::new();
    let mut node1_endpoints = String::new();
    for node in cluster.nodes() {
        for ip in node.pod_ips() {
            let line = format!("- {{addresses: [{ip}], nodeName: node{}}}\n", node.index());
            if node.index() == 1 {
                node1_endpoints += &line;
            }
            endpoints += &line;
        }
    }
    let web = nodeport_manifest("np", "web", NODE_PORT_TCP, NODE_PORT_UDP, &endpoints);
    let local = |name: &str, cluster_ip: &str, node_port: u16, endpoints: &str| {
        format!(
            r#"
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: np}}
spec:
  type: NodePort
  clusterIP: {cluster_ip}
  externalTrafficPolicy: Local
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: {POD_TCP}, nodePort: {node_port}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: np, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: {POD_TCP}}}
endpoints:
{endpoints}"#
        )
    };
    let empty = format!(
        r#"
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: np}}
spec:
  type: NodePort
  clusterIP: 10.96.0.13
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: {POD_TCP}, nodePort: {NODE_PORT_EMPTY}}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: {NODE_PORT_EMPTY_UDP}}}
"#
    );
    // The invalid and IPv6 entries must change nothing for IPv4 clients.
    let guarded = format!(
        r#"
---
apiVersion: v1
kind: Service
metadata: {{name: guarded, namespace: np}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.14
  loadBalancerSourceRanges: ["{GUARDED_RANGE}", "not-a-cidr", "2001:db8::/64"]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: {POD_TCP}, nodePort: {NODE_PORT_GUARDED}}}
status:
  loadBalancer:
    ingress: [{{ip: {GUARDED_LB_IP}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: guarded-1, namespace: np, labels: {{kubernetes.io/service-name: guarded}}}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: {POD_TCP}}}
endpoints:
{endpoints}"#
    );
    let others = local("web-local", "10.96.0.11", NODE_PORT_LOCAL, &endpoints)
        + &local(
            "one-local",
            "10.96.0.12",
            NODE_PORT_ONE_LOCAL,
            &node1_endpoints,
        )
        + &empty
        + &guarded;
    (web, others)
}

/// The bed with this file's manifest; `extra_args` go to every agent.
struct Bed;

impl Bed {
    fn start(prefix: &str, extra_args: &[&str]) -> NodePortBed {
        Bed::start_with(prefix, &ClusterPlan::default(), extra_args)
    }

    fn start_with(prefix: &str, plan: &ClusterPlan, extra_args: &[&str]) -> NodePortBed {
        NodePortBed::start(prefix, Path::new(KPR), plan, manifest, extra_args)
            .expect("the NodePort bed starts")
    }
}

#[track_caller]
fn run_in(ns: &Netns, spec: ProbeSpec) -> ProbeResult {
    ns.enter_thread(|| spec.run())
        .expect("probe thread ran")
        .expect("probe spec ran")
}

fn node_port(node: &ClusterNode, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(node.ext_ip()), port)
}

/// Which node a pod address is behind.
fn node_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(v4) => v4.octets()[2],
        IpAddr::V6(_) => 0,
    }
}

/// Checks one reply of a backend reached through `node`: the backend must
/// have seen the client itself when it is local to `node`, else one of
/// `node`'s addresses (SNAT). Returns the backend's pod address.
#[track_caller]
fn check_source(node: &ClusterNode, reply: &str) -> IpAddr {
    let (identity, seen) = split_reply(reply);
    let backend: SocketAddr = identity.parse().expect("identity is ip:port");
    let seen = seen.expect("the server reports its peer");
    if node_of(backend.ip()) == node.index() {
        assert_eq!(
            seen,
            IpAddr::V4(client_ip(node.index())),
            "a local backend sees the client: {reply}"
        );
    } else {
        let ours: Vec<IpAddr> = node.addresses().into_iter().map(IpAddr::V4).collect();
        assert!(
            ours.contains(&seen),
            "a remote backend sees node{}'s address, not {seen}: {reply}",
            node.index()
        );
    }
    backend.ip()
}

fn all_pods(bed: &NodePortBed) -> BTreeSet<IpAddr> {
    bed.cluster
        .nodes()
        .iter()
        .flat_map(|n| n.pod_ips().iter().map(|ip| IpAddr::V4(*ip)))
        .collect()
}

#[test]
fn nodeport_on_both_nodes_spreads_over_backends_on_both_nodes_with_snat_for_remote_ones() {
    if !root() {
        return;
    }
    let bed = Bed::start("npsp", &[]);
    spreads_with_snat_for_remote_backends(&bed);
    check_conntrack_and_tools(&bed);
}

/// TCP and UDP to both nodes' NodePorts reach every pod of both nodes; a
/// local pod sees the client, a remote one the node; one UDP socket is one
/// flow on one backend, answered from the NodePort address.
fn spreads_with_snat_for_remote_backends(bed: &NodePortBed) {
    let client = bed.cluster.client();
    for n in [1u8, 2] {
        let node = bed.node(n);
        // TCP: every connection a new flow, spread over all four pods.
        let target = node_port(node, NODE_PORT_TCP);
        let r = run_in(
            client,
            ProbeSpec::TcpRequests {
                target,
                count: 60,
                timeout_ms: 2000,
            },
        );
        let r = r.as_requests().unwrap();
        assert!(r.failures.is_empty(), "{target}: {r:?}");
        let mut seen: BTreeMap<IpAddr, u64> = BTreeMap::new();
        for (reply, count) in &r.identities {
            *seen.entry(check_source(node, reply)).or_default() += count;
        }
        println!("node{n} TCP {target}: {seen:?}");
        assert_eq!(
            seen.keys().copied().collect::<BTreeSet<_>>(),
            all_pods(bed),
            "TCP through node{n} reaches every pod on both nodes"
        );

        // UDP, a new socket (flow) each time: spread too, and the reply
        // comes from the NodePort (a connected socket accepts nothing else).
        let target = node_port(node, NODE_PORT_UDP);
        let r = run_in(
            client,
            ProbeSpec::UdpConnected {
                target,
                count: 60,
                timeout_ms: 2000,
            },
        );
        let u = r.as_udp().unwrap();
        assert!(u.failures.is_empty(), "{target}: {u:?}");
        let mut seen: BTreeMap<IpAddr, u64> = BTreeMap::new();
        for (reply, count) in &u.identities {
            *seen.entry(check_source(node, reply)).or_default() += count;
        }
        println!("node{n} UDP {target}: {seen:?}");
        assert_eq!(seen.keys().copied().collect::<BTreeSet<_>>(), all_pods(bed));

        // One unconnected UDP socket is one flow: conntrack keeps it on one
        // backend, and replies come from the NodePort address.
        let r = run_in(
            client,
            ProbeSpec::UdpUnconnected {
                target,
                count: 20,
                timeout_ms: 2000,
            },
        );
        let u = r.as_udp().unwrap();
        assert!(u.failures.is_empty(), "{u:?}");
        assert_eq!(u.identities.len(), 1, "one flow, one backend: {u:?}");
        assert_eq!(
            u.reply_sources.iter().collect::<Vec<_>>(),
            [&target.to_string()]
        );
    }
}

/// Conntrack after [`spreads_with_snat_for_remote_backends`], the counters,
/// `kpr ct list` and `kpr status`.
fn check_conntrack_and_tools(bed: &NodePortBed) {
    // Conntrack: flows to node1's NodePorts, each an orig/reply pair,
    // SNATed exactly when the backend is on node2.
    let entries = bed.ct(1).unwrap();
    let orig: Vec<&CtRecord> = entries.iter().filter(|e| e.dir == CtDir::Orig).collect();
    assert!(orig.len() >= 60, "{} orig entries", orig.len());
    for e in &orig {
        assert_eq!(e.dst.ip(), IpAddr::V4(bed.node(1).ext_ip()), "{e:?}");
        let remote = node_of(e.nat_dst.ip()) == 2;
        assert_eq!(e.snat, remote, "{e:?}");
        if remote {
            assert_eq!(e.nat_src.ip(), IpAddr::V4(bed.node(1).peer_ip()), "{e:?}");
            assert!((61000..=65535).contains(&e.nat_src.port()), "{e:?}");
        } else {
            assert_eq!(e.nat_src, e.src, "no SNAT to a local backend: {e:?}");
        }
        let peer = entries.iter().find(|r| {
            r.dir == CtDir::Reply && r.src == e.nat_dst && r.dst == e.nat_src && r.proto == e.proto
        });
        let peer = peer.unwrap_or_else(|| panic!("no reply entry for {e:?}"));
        assert_eq!((peer.nat_src, peer.nat_dst), (e.dst, e.src), "{peer:?}");
        assert!(peer.established, "the backend answered: {peer:?}");
    }
    assert!(orig.iter().any(|e| e.proto == Protocol::Udp));
    let stats = bed.stats(1).unwrap();
    println!("node1 counters: {stats:?}");
    assert!(stats.flows_new >= 60 && stats.flows_snat > 0 && stats.packets_reply > 0);
    assert_eq!(
        (stats.drop_no_backend, stats.drop_fib, stats.drop_ct),
        (0, 0, 0)
    );
    let table = bed
        .kpr(&[
            "ct",
            "list",
            "--bpf-root",
            bed.bpf_root(1).to_str().unwrap(),
        ])
        .unwrap();
    println!("{}", table.lines().take(5).collect::<Vec<_>>().join("\n"));
    assert!(table.contains("192.0.2.11:30080") && table.contains("snat"));
    let status = bed
        .kpr(&["status", "--bpf-root", bed.bpf_root(1).to_str().unwrap()])
        .unwrap();
    assert!(
        status.contains(
            "North-south:          eth-c/egress eth-c/ingress eth-n/egress eth-n/ingress"
        ),
        "{status}"
    );
}

#[test]
fn an_agent_restart_under_load_keeps_programs_and_conntrack_without_failed_connections() {
    if !root() {
        return;
    }
    let mut bed = Bed::start("nprs", &[]);
    let target = node_port(bed.node(1), NODE_PORT_TCP);

    // Long-lived UDP flows: each keeps its backend only if conntrack survives.
    let flows = 8;
    let first = udp_flows_answers(bed.cluster.client(), bed.node(1), flows, None);

    // Steady load through node1, in batches until both restarts are done.
    let stop = Arc::new(AtomicBool::new(false));
    let load_stop = stop.clone();
    let load = bed
        .cluster
        .client()
        .spawn_thread(move || {
            let mut total = RequestsReport::default();
            let mut batches = 0;
            while batches < 1000 && (!load_stop.load(Ordering::Relaxed) || batches < 5) {
                let r = ProbeSpec::TcpRequests {
                    target,
                    count: 20,
                    timeout_ms: 3000,
                }
                .run()
                .expect("probe runs");
                let r = r.as_requests().expect("requests report").clone();
                for (k, v) in r.identities {
                    *total.identities.entry(k).or_default() += v;
                }
                for (k, v) in r.failures {
                    *total.failures.entry(k).or_default() += v;
                }
                batches += 1;
            }
            total
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    for crash in [true, false] {
        let agent = bed.agent(1);
        if crash {
            agent.kill().unwrap();
        } else {
            agent.stop().unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        agent.restart().unwrap();
        agent.wait_healthy(Duration::from_secs(30)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let r = load.join().unwrap();
    let answered: u64 = r.identities.values().sum();
    let failed: u64 = r.failures.values().sum();
    println!(
        "NodePort restart under load (kill + restart, stop + restart): {answered} requests answered, {failed} failed ({:?})",
        r.failures
    );
    assert_eq!(failed, 0, "{:?}", r.failures);
    assert!(answered >= 100, "{answered}");
    let log = bed.agent(1).log();
    assert!(
        log.matches(
            r#"updated_links=["eth-c/ingress", "eth-c/egress", "eth-n/ingress", "eth-n/egress"]"#
        )
        .count()
            >= 2,
        "both restarts swapped the programs behind the pinned tcx links:\n{log}"
    );
    assert!(log.matches("reused_ct=true").count() >= 2, "{log}");

    let again = udp_flows_answers(bed.cluster.client(), bed.node(1), flows, Some(&first));
    assert_eq!(
        first, again,
        "every UDP flow kept its backend across restarts"
    );
    let log = bed.agent(1).log();
    assert!(log.contains("reused_ct=true"), "{log}");
}

/// Opens `flows` UDP sockets in the client namespace on fixed ports (or the
/// ports of `previous`), one exchange each with node's UDP NodePort;
/// returns client port -> backend that answered.
fn udp_flows_answers(
    client: &Netns,
    node: &ClusterNode,
    flows: u16,
    previous: Option<&BTreeMap<u16, String>>,
) -> BTreeMap<u16, String> {
    let target = node_port(node, NODE_PORT_UDP);
    let local = client_ip(node.index());
    let ports: Vec<u16> = match previous {
        Some(p) => p.keys().copied().collect(),
        None => (0..flows).map(|i| 40100 + i).collect(),
    };
    client
        .enter_thread(move || {
            let mut out = BTreeMap::new();
            for port in ports {
                let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(local), port)).unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                sock.send_to(b"hi", target).unwrap();
                let mut buf = [0u8; 256];
                let (n, from) = sock.recv_from(&mut buf).unwrap();
                assert_eq!(from, target);
                let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
                out.insert(port, split_reply(&reply).0.to_string());
            }
            out
        })
        .unwrap()
}

#[test]
fn conntrack_entries_expire_and_are_collected_and_cleanup_detaches_tcx() {
    if !root() {
        return;
    }
    // A short UDP lifetime, so entries expire within the test.
    let mut bed = Bed::start("npgc", &["--ct-udp-timeout", "2s"]);
    let target = node_port(bed.node(2), NODE_PORT_UDP);
    let r = run_in(
        bed.cluster.client(),
        ProbeSpec::UdpConnected {
            target,
            count: 5,
            timeout_ms: 2000,
        },
    );
    assert!(r.as_udp().unwrap().failures.is_empty(), "{r:?}");
    let udp = |bed: &NodePortBed| {
        bed.ct(2)
            .unwrap()
            .into_iter()
            .filter(|e| e.proto == Protocol::Udp)
            .count()
    };
    assert_eq!(udp(&bed), 10, "five flows, two entries each");
    let deadline = Instant::now() + Duration::from_secs(10);
    while udp(&bed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(udp(&bed), 0, "expired flows are collected by the agent");
    let gc = bed
        .agent(2)
        .metric_value("kpr_ct_gc_deleted_entries_total", "")
        .unwrap();
    assert!(gc.unwrap_or(0.0) >= 10.0, "{gc:?}");

    // cleanup: no tcx link left, NodePorts no longer translated.
    let root2 = bed.bpf_root(2);
    assert_eq!(attached_devices(&root2).len(), 4);
    bed.agent(2).stop().unwrap();
    bed.kpr(&["cleanup", "--bpf-root", root2.to_str().unwrap()])
        .unwrap();
    assert!(attached_devices(&root2).is_empty());
    let r = run_in(
        bed.cluster.client(),
        ProbeSpec::TcpConnectError {
            target: node_port(bed.node(2), NODE_PORT_TCP),
            timeout_ms: 1000,
        },
    );
    assert_eq!(
        r.as_connect().unwrap().outcome(),
        "ECONNREFUSED",
        "node2's own stack answers: nothing translates any more"
    );
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_drops_without_local_backends() {
    if !root() {
        return;
    }
    let bed = Bed::start("npetp", &[]);
    let client = bed.cluster.client();
    for n in [1u8, 2] {
        let node = bed.node(n);
        let target = node_port(node, NODE_PORT_LOCAL);
        let r = run_in(
            client,
            ProbeSpec::TcpRequests {
                target,
                count: 30,
                timeout_ms: 2000,
            },
        );
        let r = r.as_requests().unwrap();
        assert!(r.failures.is_empty(), "{target}: {r:?}");
        let seen: BTreeSet<IpAddr> = r
            .identities
            .keys()
            .map(|reply| check_source(node, reply))
            .collect();
        let local: BTreeSet<IpAddr> = node.pod_ips().iter().map(|ip| IpAddr::V4(*ip)).collect();
        assert_eq!(seen, local, "only node{n}'s pods, which see the client");
    }
    // node2 has no endpoint of one-local: dropped, as kube-proxy drops
    // (the load balancer finds node1 through the health check node port),
    // also under the default --service-no-backend-response reject. `empty`
    // has no endpoint anywhere: rejected, as kube-proxy does.
    for (node, port, outcome) in [
        (2u8, NODE_PORT_ONE_LOCAL, "TIMEOUT"),
        (1, NODE_PORT_EMPTY, "ECONNREFUSED"),
    ] {
        let target = node_port(bed.node(node), port);
        let r = run_in(
            client,
            ProbeSpec::TcpConnectError {
                target,
                timeout_ms: 300,
            },
        );
        assert_eq!(r.as_connect().unwrap().outcome(), outcome, "{target}");
    }
    let (s1, s2) = (bed.stats(1).unwrap(), bed.stats(2).unwrap());
    assert!(
        s2.drop_no_backend > 0 && s2.reject_no_backend == 0,
        "{s2:?}"
    );
    assert!(s1.reject_no_backend > 0, "{s1:?}");
    // ... while node1 serves one-local from its own pods.
    let target = node_port(bed.node(1), NODE_PORT_ONE_LOCAL);
    let r = run_in(
        client,
        ProbeSpec::TcpRequests {
            target,
            count: 5,
            timeout_ms: 2000,
        },
    );
    assert!(r.as_requests().unwrap().failures.is_empty(), "{r:?}");
}

/// The spread/SNAT checks with XDP in `mode` in front of tc on both nodes;
/// XDP must have forwarded packets itself.
fn through_xdp(prefix: &str, mode: &str) {
    let plan = ClusterPlan {
        xdp_ready: true,
        ..ClusterPlan::default()
    };
    let bed = Bed::start_with(prefix, &plan, &["--nodeport-acceleration", mode]);
    spreads_with_snat_for_remote_backends(&bed);
    check_conntrack_and_tools(&bed);
    for n in [1u8, 2] {
        let stats = bed.stats(n).unwrap();
        println!("node{n} XDP {mode}: {stats:?}");
        assert!(
            stats.xdp_fwd > 0 && stats.xdp_fwd <= stats.packets_fwd + stats.packets_reply,
            "{stats:?}"
        );
    }
    let log = bed.agents[0].log();
    assert!(log.contains(&format!("eth-c/{mode}")), "{log}");
    // XDP hands a frontend without backend to tc, which rejects it.
    let target = node_port(bed.node(1), NODE_PORT_EMPTY);
    let r = run_in(
        bed.cluster.client(),
        ProbeSpec::TcpConnectError {
            target,
            timeout_ms: 3000,
        },
    );
    assert_eq!(r.as_connect().unwrap().outcome(), "ECONNREFUSED", "{r:?}");
    assert!(bed.stats(1).unwrap().reject_no_backend > 0);

    // A restart swaps the program behind the pinned XDP links; XDP keeps
    // forwarding, on the same conntrack.
    let mut bed = bed;
    let before = bed.stats(1).unwrap().xdp_fwd;
    bed.agent(1).restart().unwrap();
    bed.agent(1).wait_healthy(Duration::from_secs(30)).unwrap();
    let xdp_on = |bed: &NodePortBed| {
        bed.node(1)
            .ns()
            .ip_output(&["-d", "link", "show", "dev", "eth-c"])
            .unwrap()
    };
    assert!(xdp_on(&bed).contains("prog/xdp"), "{}", xdp_on(&bed));
    let target = node_port(bed.node(1), NODE_PORT_TCP);
    let r = run_in(
        bed.cluster.client(),
        ProbeSpec::TcpRequests {
            target,
            count: 10,
            timeout_ms: 2000,
        },
    );
    assert!(r.as_requests().unwrap().failures.is_empty(), "{r:?}");
    assert!(bed.stats(1).unwrap().xdp_fwd > before);

    // cleanup detaches XDP as well.
    bed.agent(1).stop().unwrap();
    bed.kpr(&["cleanup", "--bpf-root", bed.bpf_root(1).to_str().unwrap()])
        .unwrap();
    let link = xdp_on(&bed);
    assert!(
        !link.contains("prog/xdp") && !link.contains("xdpgeneric"),
        "{link}"
    );
}

#[test]
fn nodeport_through_generic_xdp_spreads_and_snats_like_tc() {
    if !root() {
        return;
    }
    through_xdp("npxg", "generic");
}

#[test]
fn nodeport_through_native_xdp_on_veth_spreads_and_snats_like_tc() {
    if !root() {
        return;
    }
    through_xdp("npxn", "native");
}

/// A TCP request from `local` (a fixed source port, SO_REUSEADDR so a
/// TIME_WAIT socket of the previous use does not block the bind) to
/// `target`; the reply line.
fn request_from(local: SocketAddr, target: SocketAddr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    let (SocketAddr::V4(local), SocketAddr::V4(target)) = (local, target) else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let sockaddr = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: plain socket syscalls on a descriptor owned by the TcpStream
    // built from it (closed on every path).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        // connect(2) gives up after SO_SNDTIMEO: a regression fails in
        // seconds, not after TCP's two-minute SYN retries.
        let limit = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&limit as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let l = sockaddr(local);
        if libc::bind(fd, (&l as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let t = sockaddr(target);
        if libc::connect(fd, (&t as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut stream = stream;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"hello\n")?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply.trim().to_string())
    }
}

/// Regression: a client reusing its source port toward a second frontend
/// of the same local backend used to get the SNAT fallback, whose reply
/// came in on the pod interface (no kpr program) and was answered by RST.
/// A closing flow's reply tuple now gives way to the new flow.
#[test]
fn a_client_port_reused_across_frontends_of_one_local_backend_still_connects() {
    if !root() {
        return;
    }
    let bed = Bed::start("npreuse", &[]);
    let node = bed.node(1);
    let (first, second) = (
        node_port(node, NODE_PORT_LOCAL),
        node_port(node, NODE_PORT_ONE_LOCAL),
    );
    let client = IpAddr::V4(client_ip(1));
    let outcome = bed
        .cluster
        .client()
        .enter_thread(move || {
            (0..8u16)
                .map(|i| {
                    let local = SocketAddr::new(client, 45000 + i);
                    let a = request_from(local, first);
                    let b = request_from(local, second);
                    (
                        local.port(),
                        a.map_err(|e| e.to_string()),
                        b.map_err(|e| e.to_string()),
                    )
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    let mut same_backend = 0;
    for (port, a, b) in &outcome {
        let (a, b) = match (a, b) {
            (Ok(a), Ok(b)) => (a, b),
            _ => panic!("source port {port}: {a:?} then {b:?}"),
        };
        if split_reply(a).0 == split_reply(b).0 {
            same_backend += 1;
        }
    }
    println!("{same_backend} of 8 source ports met the same backend twice");
}

/// Regression (found by benches/nodeport.rs): a client reusing the source
/// port of a finished NodePort flow to reach the same local backend
/// directly got its SYN-ACK rewritten to come from the NodePort by the
/// egress program, and never connected. A direct SYN now retires the
/// translated flow's entries.
#[test]
fn a_client_port_reused_to_reach_a_local_backend_directly_still_connects() {
    if !root() {
        return;
    }
    let bed = Bed::start("npdir", &[]);
    let via = node_port(bed.node(1), NODE_PORT_LOCAL);
    let client = IpAddr::V4(client_ip(1));
    let outcome = bed
        .cluster
        .client()
        .enter_thread(move || {
            (0..4u16)
                .map(|i| {
                    let local = SocketAddr::new(client, 46000 + i);
                    let first = request_from(local, via).map_err(|e| e.to_string())?;
                    let backend: SocketAddr = split_reply(&first)
                        .0
                        .parse()
                        .map_err(|e| format!("{first}: {e}"))?;
                    let direct = request_from(local, backend).map_err(|e| e.to_string())?;
                    Ok::<_, String>((first, direct))
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    for r in outcome {
        let (first, direct) = r.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            split_reply(&first),
            split_reply(&direct),
            "same backend, client seen both times"
        );
    }
}

/// NodePort bind protection (cgroup post_bind4/6): a process of the node
/// (its namespace, the agent's cgroup) cannot bind a NodePort a Service
/// uses, on the node IP, loopback or a wildcard, and gets EADDRINUSE as
/// with Cilium; other ports, other protocols, addresses that are no node IP
/// and pods' own namespaces are left alone; the port is free again once
/// its Service is gone.
#[test]
fn host_sockets_cannot_bind_a_nodeport_in_use_until_its_service_is_deleted() {
    if !root() {
        return;
    }
    let mut bed = Bed::start("npbind", &[]);
    // In node1's namespace, or (pods) its pods', always in its agent's cgroup.
    let bind =
        |bed: &NodePortBed, pods: bool, addrs: &[&str], udp: bool| -> BTreeMap<String, String> {
            let addrs = addrs.iter().map(|a| a.parse().unwrap()).collect();
            let node = bed.node(1);
            let ns = if pods { node.pods() } else { node.ns() };
            bed.probe_in_cgroup(1, ns, &ProbeSpec::Bind { addrs, udp })
                .unwrap()
                .as_bind()
                .unwrap()
                .clone()
        };
    let outcomes = |addrs: &[&str], outcome: &str| -> BTreeMap<String, String> {
        addrs
            .iter()
            .map(|a| {
                (
                    a.parse::<SocketAddr>().unwrap().to_string(),
                    outcome.to_string(),
                )
            })
            .collect()
    };
    let node_ip = format!("{}:{NODE_PORT_TCP}", bed.node(1).ext_ip());
    let taken = [
        "0.0.0.0:30080",
        node_ip.as_str(),
        "127.0.0.1:30080",
        "[::]:30080",
        "[::ffff:0.0.0.0]:30080",
    ];
    let got = bind(&bed, false, &taken, false);
    println!("node1, TCP: {got:?}");
    assert_eq!(got, outcomes(&taken, "EADDRINUSE"));

    // Not a NodePort, or not on a node IP (the node-to-node address is no
    // --node-ip), or another protocol: free.
    let peer_ip = format!("{}:{NODE_PORT_TCP}", bed.node(1).peer_ip());
    let free = ["0.0.0.0:30999", peer_ip.as_str(), "[::]:30999"];
    assert_eq!(bind(&bed, false, &free, false), outcomes(&free, "OK"));
    assert_eq!(
        bind(&bed, false, &["0.0.0.0:30080"], true),
        outcomes(&["0.0.0.0:30080"], "OK"),
        "no UDP NodePort 30080"
    );
    let udp_taken = ["0.0.0.0:30053", "127.0.0.1:30053"];
    assert_eq!(
        bind(&bed, false, &udp_taken, true),
        outcomes(&udp_taken, "EADDRINUSE")
    );
    // A pod in the same cgroup binds the NodePort in its own namespace.
    assert_eq!(
        bind(&bed, true, &["0.0.0.0:30080"], false),
        outcomes(&["0.0.0.0:30080"], "OK")
    );
    // Endpoint-less and Local-policy NodePorts are protected too.
    let others = ["0.0.0.0:30081", "0.0.0.0:30083"];
    assert_eq!(
        bind(&bed, false, &others, false),
        outcomes(&others, "EADDRINUSE")
    );

    // A restart swaps the programs behind the pinned post_bind links:
    // still protected, nothing re-attached.
    bed.agent(1).restart().unwrap();
    bed.agent(1).wait_healthy(Duration::from_secs(30)).unwrap();
    let log = bed.agent(1).log();
    assert!(
        log.contains(r#""getpeername6", "post_bind4", "post_bind6"] created_links=[]"#),
        "{log}"
    );
    assert_eq!(
        bind(&bed, false, &taken, false),
        outcomes(&taken, "EADDRINUSE")
    );

    // Without `web`, its NodePorts are free again (after the next sync).
    let (_, without_web) = manifest_parts(&bed.cluster);
    std::fs::write(bed.dir().join("manifests/services.yaml"), without_web).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = bind(&bed, false, &taken, false);
    while got != outcomes(&taken, "OK") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        got = bind(&bed, false, &taken, false);
    }
    assert_eq!(got, outcomes(&taken, "OK"), "web deleted");
    assert_eq!(
        bind(&bed, false, &udp_taken, true),
        outcomes(&udp_taken, "OK")
    );
    assert_eq!(
        bind(&bed, false, &others, false),
        outcomes(&others, "EADDRINUSE"),
        "the other Services keep theirs"
    );
    let status = bed
        .kpr(&["status", "--bpf-root", bed.bpf_root(1).to_str().unwrap()])
        .unwrap();
    assert!(status.contains("post_bind4 post_bind6"), "{status}");
}

/// Polls `ready` every 200 ms for at most `limit`; whether it became true.
fn wait_for(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The devices node1's agent reports in /status: (attached, missing).
fn agent_devices(bed: &mut NodePortBed) -> (Vec<String>, Vec<String>) {
    let status = bed.agent(1).status_json().unwrap();
    let list = |key: &str| -> Vec<String> {
        status["devices"][key]
            .as_array()
            .unwrap_or_else(|| panic!("no devices.{key} in {status:#}"))
            .iter()
            .map(|d| d.as_str().unwrap().to_string())
            .collect()
    };
    (list("attached"), list("missing"))
}

/// `kpr status` as text, run inside node `n`'s namespace (where its
/// agent's /status is).
fn status_text(bed: &NodePortBed, n: u8) -> String {
    let root = bed.bpf_root(n).to_str().unwrap().to_string();
    let addr = bed.agents[usize::from(n - 1)].metrics_addr.to_string();
    let out = bed
        .node(n)
        .ns()
        .enter_thread(move || {
            std::process::Command::new(KPR)
                .args(["status", "--bpf-root", &root, "--metrics-addr", &addr])
                .output()
        })
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `--devices` interface that does not exist when the agent starts is
/// not an error: the agent waits for it, attaches tcx as soon as it
/// appears (netlink link notification), NodePort traffic entering through
/// it is load-balanced, and when it goes its links are forgotten.
#[test]
fn a_device_that_appears_later_is_attached_and_serves_nodeport_traffic() {
    if !root() {
        return;
    }
    let mut bed = Bed::start("nplate", &["--devices", "eth-late"]);
    let root1 = bed.bpf_root(1);
    let late_attached = |root: &Path| {
        attached_devices(root)
            .iter()
            .filter(|d| d.device == "eth-late" && d.ifindex.is_some())
            .count()
    };
    assert_eq!(late_attached(&root1), 0);
    let (attached, missing) = agent_devices(&mut bed);
    assert_eq!((attached.len(), missing), (2, vec!["eth-late".to_string()]));
    let text = status_text(&bed, 1);
    assert!(
        text.contains("Devices:              eth-c eth-n (waiting for eth-late) [--devices eth-c,eth-n,eth-late]"),
        "{text}"
    );

    let client_addr = bed.cluster.add_late_link(1, "eth-late", "eth-l1").unwrap();
    let started = Instant::now();
    assert!(
        wait_for(Duration::from_secs(30), || late_attached(&root1) == 2),
        "eth-late not attached: {:?}\n{}",
        attached_devices(&root1),
        bed.agent(1).log()
    );
    println!(
        "eth-late attached {:?} after it appeared",
        started.elapsed()
    );
    let (attached, missing) = agent_devices(&mut bed);
    assert_eq!(attached, ["eth-c", "eth-late", "eth-n"]);
    assert!(missing.is_empty(), "{missing:?}");

    // NodePort traffic now enters node1 through eth-late, from the new
    // client address: spread over every pod, local ones see the client.
    let node = bed.node(1);
    let target = node_port(node, NODE_PORT_TCP);
    let r = run_in(
        bed.cluster.client(),
        ProbeSpec::TcpRequests {
            target,
            count: 40,
            timeout_ms: 2000,
        },
    );
    let r = r.as_requests().unwrap();
    assert!(r.failures.is_empty(), "{r:?}");
    let mut seen = BTreeSet::new();
    for reply in r.identities.keys() {
        let (identity, peer) = split_reply(reply);
        let backend: SocketAddr = identity.parse().unwrap();
        let peer = peer.unwrap();
        if node_of(backend.ip()) == 1 {
            assert_eq!(peer, IpAddr::V4(client_addr), "{reply}");
        } else {
            assert!(
                node.addresses().contains(&match peer {
                    IpAddr::V4(v4) => v4,
                    IpAddr::V6(_) => panic!("{reply}"),
                }),
                "{reply}"
            );
        }
        seen.insert(backend.ip());
    }
    assert_eq!(seen, all_pods(&bed), "every pod through eth-late");
    // Only eth-late's ingress program saw these flows (eth-c never did).
    let via_late = bed
        .ct(1)
        .unwrap()
        .into_iter()
        .filter(|e| e.dir == CtDir::Orig && e.src.ip() == IpAddr::V4(client_addr))
        .count();
    assert!(via_late >= 40, "{via_late} flows from {client_addr}");
    assert_eq!(
        bed.agent(1)
            .metric_value("kpr_nodeport_devices", "")
            .unwrap(),
        Some(3.0)
    );
    assert!(
        bed.agent(1)
            .metric_value("kpr_nodeport_device_syncs_total", "result=\"success\"")
            .unwrap()
            .unwrap_or(0.0)
            >= 1.0
    );
    let text = status_text(&bed, 1);
    assert!(
        text.contains("Devices:              eth-c eth-late eth-n [--devices")
            && text.contains("eth-late/ingress"),
        "{text}"
    );

    // Gone again: its links are detached and unpinned, the agent waits for
    // it anew, and traffic takes the old path through eth-c.
    bed.cluster.remove_late_link(1, "eth-late").unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || attached_devices(&root1)
            .iter()
            .all(|d| d.device != "eth-late")),
        "{:?}",
        attached_devices(&root1)
    );
    let (attached, missing) = agent_devices(&mut bed);
    assert_eq!(attached, ["eth-c", "eth-n"]);
    assert_eq!(missing, ["eth-late"]);
    let r = run_in(
        bed.cluster.client(),
        ProbeSpec::TcpRequests {
            target,
            count: 10,
            timeout_ms: 2000,
        },
    );
    assert!(r.as_requests().unwrap().failures.is_empty(), "{r:?}");
    assert!(bed.agent(1).log().contains("re-attached"));
}

/// LoadBalancer ingress IP of `lb` (routed by the client through node1;
/// not [`GUARDED_LB_IP`], which [`manifest`]'s `guarded` holds on port 80).
const LB_IP: &str = "203.0.113.11";
/// externalIP of `ext` (routed by the client through node2).
const EXTERNAL_IP: &str = "203.0.113.20";

/// [`manifest`] plus a LoadBalancer Service `lb` (TCP 80 and UDP 53, node
/// ports 30090 and 30091, ingress IP [`LB_IP`]) and a ClusterIP Service
/// `ext` with externalIP [`EXTERNAL_IP`] (TCP 8080), both with every pod.
fn external_manifest(cluster: &Cluster) -> String {
    let mut endpoints = String::new();
    for node in cluster.nodes() {
        for ip in node.pod_ips() {
            endpoints += &format!("- {{addresses: [{ip}], nodeName: node{}}}\n", node.index());
        }
    }
    let slice = |name: &str, ports: &str| {
        format!(
            r#"
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: np, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: {ports}
endpoints:
{endpoints}"#
        )
    };
    let pod_udp = kpr::testbed::nodeport_bed::POD_UDP;
    manifest(cluster)
        + &format!(
            r#"
---
apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: np}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: {POD_TCP}, nodePort: 30090}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: {pod_udp}, nodePort: 30091}}
status:
  loadBalancer:
    ingress: [{{ip: {LB_IP}}}]
"#
        )
        + &slice(
            "lb",
            &format!(
                "[{{name: http, protocol: TCP, port: {POD_TCP}}}, {{name: dns, protocol: UDP, port: {pod_udp}}}]"
            ),
        )
        + &format!(
            r#"
---
apiVersion: v1
kind: Service
metadata: {{name: ext, namespace: np}}
spec:
  clusterIP: 10.96.0.21
  externalIPs: [{EXTERNAL_IP}]
  ports:
  - {{name: http, protocol: TCP, port: 8080, targetPort: {POD_TCP}}}
"#
        )
        + &slice("ext", &format!("[{{name: http, protocol: TCP, port: {POD_TCP}}}]"))
}

/// `kpr svc list` rows: frontend -> (Service Type, number of backends).
fn svc_list_rows(table: &str) -> BTreeMap<String, (String, usize)> {
    let mut rows: BTreeMap<String, (String, usize)> = BTreeMap::new();
    let mut last: Option<String> = None;
    for line in table.lines().skip(1) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            // a continuation line: N => backend (state)
            [_, "=>", _, _] => {
                let fe = last.as_ref().expect("a continuation after a row");
                rows.get_mut(fe).unwrap().1 += 1;
            }
            // ID Frontend Type [N => backend (state)]
            [_, frontend, svc_type, ref backend @ ..] => {
                let n = usize::from(!backend.is_empty());
                rows.insert(frontend.to_string(), (svc_type.to_string(), n));
                last = Some(frontend.to_string());
            }
            _ => panic!("unexpected svc list line {line:?}"),
        }
    }
    rows
}

/// LoadBalancer ingress IPs and externalIPs reached from the external
/// client, routed through a node as a load balancer or router would: TCP
/// and UDP spread over the pods of both nodes with SNAT for remote ones,
/// replies from the frontend address; `kpr svc list` shows the NodePort,
/// LoadBalancer and ExternalIPs frontends as `cilium service list` does.
#[test]
fn loadbalancer_ips_and_external_ips_are_served_from_outside_and_listed() {
    if !root() {
        return;
    }
    let bed = NodePortBed::start(
        "nplbx",
        Path::new(KPR),
        &ClusterPlan::default(),
        external_manifest,
        &[],
    )
    .expect("the NodePort bed starts");
    let client = bed.cluster.client();
    for (ip, n) in [(LB_IP, 1u8), (EXTERNAL_IP, 2)] {
        let via = bed.node(n).ext_ip().to_string();
        client
            .ip(&["route", "add", &format!("{ip}/32"), "via", &via])
            .unwrap();
    }
    let frontends = [
        (SocketAddr::new(LB_IP.parse().unwrap(), 80), 1u8),
        (SocketAddr::new(EXTERNAL_IP.parse().unwrap(), 8080), 2),
    ];
    for (target, n) in frontends {
        let node = bed.node(n);
        let r = run_in(
            client,
            ProbeSpec::TcpRequests {
                target,
                count: 40,
                timeout_ms: 2000,
            },
        );
        let r = r.as_requests().unwrap();
        assert!(r.failures.is_empty(), "{target}: {r:?}");
        let seen: BTreeSet<IpAddr> = r
            .identities
            .keys()
            .map(|reply| check_source(node, reply))
            .collect();
        println!("{target} through node{n}: {:?}", r.identities);
        assert_eq!(seen, all_pods(&bed), "{target} reaches every pod");
    }
    // UDP to the LB IP: one flow per socket, spread, answered from the LB IP.
    let target = SocketAddr::new(LB_IP.parse().unwrap(), 53);
    let r = run_in(
        client,
        ProbeSpec::UdpConnected {
            target,
            count: 40,
            timeout_ms: 2000,
        },
    );
    let u = r.as_udp().unwrap();
    assert!(u.failures.is_empty(), "{u:?}");
    let seen: BTreeSet<IpAddr> = u
        .identities
        .keys()
        .map(|reply| check_source(bed.node(1), reply))
        .collect();
    assert_eq!(seen, all_pods(&bed));
    let r = run_in(
        client,
        ProbeSpec::UdpUnconnected {
            target,
            count: 5,
            timeout_ms: 2000,
        },
    );
    let u = r.as_udp().unwrap();
    assert!(u.failures.is_empty(), "{u:?}");
    assert_eq!(
        u.reply_sources.iter().collect::<Vec<_>>(),
        [&target.to_string()]
    );
    // Conntrack saw the frontends as the client addressed them.
    for (target, n) in frontends {
        let flows = bed
            .ct(n)
            .unwrap()
            .into_iter()
            .filter(|e| e.dir == CtDir::Orig && e.dst == target)
            .count();
        assert!(flows >= 40, "node{n}: {flows} flows to {target}");
    }

    let table = bed
        .kpr(&[
            "svc",
            "list",
            "--bpf-root",
            bed.bpf_root(1).to_str().unwrap(),
        ])
        .unwrap();
    println!("{table}");
    assert!(
        table.starts_with("ID   Frontend ")
            && table
                .lines()
                .next()
                .unwrap()
                .ends_with("Service Type   Backend"),
        "{table}"
    );
    let rows = svc_list_rows(&table);
    let want = |fe: &str, t: &str| (fe.to_string(), (t.to_string(), 4));
    for (fe, (t, n)) in [
        want(&format!("{LB_IP}:80/TCP"), "LoadBalancer"),
        want(&format!("{LB_IP}:53/UDP"), "LoadBalancer"),
        want("203.0.113.20:8080/TCP", "ExternalIPs"),
        want("192.0.2.11:30090/TCP", "NodePort"),
        want("192.0.2.11:30091/UDP", "NodePort"),
        want("127.0.0.1:30090/TCP", "NodePort"),
        want("192.0.2.11:30080/TCP", "NodePort"),
        want("10.96.0.20:80/TCP", "ClusterIP"),
        want("10.96.0.21:8080/TCP", "ClusterIP"),
    ] {
        assert_eq!(rows.get(&fe), Some(&(t.clone(), n)), "{fe} in\n{table}");
    }
    // Every backend line reads like Cilium's: `N => ip:port/PROTO (active)`.
    for line in table.lines().filter(|l| l.contains("=>")) {
        assert!(line.ends_with("(active)"), "{line}");
        assert!(
            line.contains(":8080/TCP") || line.contains(":5353/UDP"),
            "{line}"
        );
    }
}

/// One datagram over a connected UDP socket to `target` and its answer; a
/// rejected datagram's ICMP error fails the receive with ECONNREFUSED.
fn udp_exchange(target: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.connect(target)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send(b"hi")?;
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Polls node `n`'s agent until `kpr_nodeport_events_total{event}` reaches
/// `at_least` (the agent refreshes it every --ct-gc-interval, 1 s here).
#[track_caller]
fn wait_event_metric(bed: &NodePortBed, n: u8, event: &str, at_least: u64) -> f64 {
    let labels = format!("event=\"{event}\"");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = bed.agents[usize::from(n - 1)]
            .metric_value("kpr_nodeport_events_total", &labels)
            .unwrap()
            .unwrap_or(0.0);
        if v >= at_least as f64 || Instant::now() > deadline {
            assert!(v >= at_least as f64, "{event}: {v} < {at_least}");
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// kube-proxy's semantics: the ranges guard the load balancer IP only; a
/// client outside them gets no answer (dropped), the NodePort of the same
/// Service stays open to it, and node-local clients are checked too.
#[test]
fn load_balancer_source_ranges_admit_listed_clients_only_and_leave_the_node_port_open() {
    if !root() {
        return;
    }
    let bed = Bed::start("npsrc", &[]);
    let client = bed.cluster.client();
    let node1 = bed.node(1);
    // A second client address on the link to node1 (secondary: connections
    // keep 192.0.2.9 as their default source), and the LB IP via node1.
    client
        .ip(&[
            "addr",
            "add",
            &format!("{OUTSIDER}/29"),
            "dev",
            CLIENT_TO_NODE1_IF,
        ])
        .unwrap();
    client
        .ip(&[
            "route",
            "add",
            &format!("{GUARDED_LB_IP}/32"),
            "via",
            &node1.ext_ip().to_string(),
        ])
        .unwrap();
    let lb: SocketAddr = format!("{GUARDED_LB_IP}:80").parse().unwrap();

    // Inside the range: served like any LoadBalancer frontend.
    let r = run_in(
        client,
        ProbeSpec::TcpRequests {
            target: lb,
            count: 40,
            timeout_ms: 2000,
        },
    );
    let r = r.as_requests().unwrap();
    assert!(r.failures.is_empty(), "{lb} from {GUARDED_RANGE}: {r:?}");
    let seen: BTreeSet<IpAddr> = r
        .identities
        .keys()
        .map(|reply| check_source(node1, reply))
        .collect();
    assert_eq!(seen, all_pods(&bed));
    assert_eq!(bed.stats(1).unwrap().drop_source_range, 0);

    // Outside it: dropped, so the connect times out (not refused).
    let outsider = SocketAddr::new(OUTSIDER.parse().unwrap(), 0);
    let denied = client
        .enter_thread(move || request_from(outsider, lb))
        .unwrap()
        .expect_err("a client outside the ranges must not connect");
    let name = error_name(&denied);
    assert!(
        matches!(name.as_str(), "EINPROGRESS" | "TIMEOUT"),
        "dropped, so the connect times out: {denied} ({name})"
    );
    let dropped = bed.stats(1).unwrap().drop_source_range;
    assert!(dropped > 0, "every SYN of the attempt is counted");
    wait_event_metric(&bed, 1, "drop_source_range", dropped);

    // The NodePort of the same Service does not look at the ranges.
    let np = node_port(node1, NODE_PORT_GUARDED);
    let reply = client
        .enter_thread(move || request_from(outsider, np))
        .unwrap()
        .unwrap_or_else(|e| panic!("{np} from {OUTSIDER}: {e}"));
    let (identity, _) = split_reply(&reply);
    assert!(identity.parse::<SocketAddr>().is_ok(), "{reply}");

    // Node-local clients (socket LB, unbound socket: source unknown at
    // connect(), so the node's own address counts, and 192.0.2.11 is not
    // in the range): refused at once; the NodePort serves them.
    let local = |spec: ProbeSpec| {
        run_probe(
            Path::new(KPR),
            &["probe", "--spec"],
            node1.ns(),
            Some(bed.cgroup(1)),
            &spec,
            Duration::from_secs(30),
        )
        .expect("node-local probe runs")
    };
    let r = local(ProbeSpec::TcpConnectError {
        target: lb,
        timeout_ms: 2000,
    });
    assert_eq!(r.as_connect().unwrap().outcome(), "EPERM", "{r:?}");
    let r = local(ProbeSpec::TcpRequests {
        target: np,
        count: 4,
        timeout_ms: 2000,
    });
    assert!(r.as_requests().unwrap().failures.is_empty(), "{r:?}");

    // "not-a-cidr" was logged and counted, the rest applied.
    let skipped = bed.agents[0]
        .metric_value("kpr_skipped_objects_total", "reason=\"invalid_address\"")
        .unwrap();
    assert!(skipped.unwrap_or(0.0) >= 1.0, "{skipped:?}");
}

/// --service-no-backend-response reject (the default): TCP and UDP clients
/// of a frontend without any backend learn it at once from an ICMP port
/// unreachable, on both nodes; the rejects are counted.
#[test]
fn a_frontend_without_backends_rejects_tcp_and_udp_with_icmp_by_default() {
    if !root() {
        return;
    }
    let bed = Bed::start("nprej", &[]);
    let client = bed.cluster.client();
    for n in [1u8, 2] {
        let target = node_port(bed.node(n), NODE_PORT_EMPTY);
        let r = run_in(
            client,
            ProbeSpec::TcpConnectError {
                target,
                timeout_ms: 5000,
            },
        );
        let c = r.as_connect().unwrap();
        assert_eq!(c.outcome(), "ECONNREFUSED", "{target}: {c:?}");
        println!("TCP {target}: refused after {} us", c.elapsed_us);

        let target = node_port(bed.node(n), NODE_PORT_EMPTY_UDP);
        let err = client
            .enter_thread(move || udp_exchange(target, Duration::from_secs(5)))
            .unwrap()
            .expect_err("nothing answers a frontend without backend");
        assert_eq!(error_name(&err), "ECONNREFUSED", "UDP {target}: {err}");

        let stats = bed.stats(n).unwrap();
        assert!(
            stats.reject_no_backend >= 2 && stats.drop_no_backend == 0,
            "node{n}: {stats:?}"
        );
        wait_event_metric(&bed, n, "reject_no_backend", stats.reject_no_backend);
    }
    // Rejecting changed nothing for the Services that have backends.
    let target = node_port(bed.node(1), NODE_PORT_TCP);
    let r = run_in(
        client,
        ProbeSpec::TcpRequests {
            target,
            count: 5,
            timeout_ms: 2000,
        },
    );
    assert!(r.as_requests().unwrap().failures.is_empty(), "{r:?}");
}

/// --service-no-backend-response drop: no answer at all, so clients time
/// out (bounded here); the drops are counted.
#[test]
fn with_no_backend_response_drop_a_frontend_without_backends_stays_silent() {
    if !root() {
        return;
    }
    let bed = Bed::start("npdrop", &["--service-no-backend-response", "drop"]);
    let client = bed.cluster.client();
    let target = node_port(bed.node(1), NODE_PORT_EMPTY);
    let r = run_in(
        client,
        ProbeSpec::TcpConnectError {
            target,
            timeout_ms: 500,
        },
    );
    assert_eq!(r.as_connect().unwrap().outcome(), "TIMEOUT", "{r:?}");
    let target = node_port(bed.node(1), NODE_PORT_EMPTY_UDP);
    let err = client
        .enter_thread(move || udp_exchange(target, Duration::from_millis(500)))
        .unwrap()
        .expect_err("nothing answers a frontend without backend");
    assert_eq!(error_name(&err), "TIMEOUT", "UDP {target}: {err}");
    let stats = bed.stats(1).unwrap();
    assert!(
        stats.drop_no_backend >= 2 && stats.reject_no_backend == 0,
        "{stats:?}"
    );
    wait_event_metric(&bed, 1, "drop_no_backend", stats.drop_no_backend);
}

/// kube-proxy's worst UDP bugs are stale conntrack: a flow that met a
/// Service without endpoints stays blackholed after endpoints appear, and
/// a flow stays on a removed endpoint (kubernetes#48370, #19029). Here one
/// client socket, never reopened, keeps talking to a UDP NodePort while
/// its endpoints go from none to a remote pod to a local one: it is
/// rejected first, then answered by the remote pod, then by the local pod
/// as soon as the agents have synced, and conntrack holds the new backend.
#[test]
fn one_udp_flow_follows_endpoints_from_none_to_a_remote_pod_to_a_local_one() {
    if !root() {
        return;
    }
    const TCP: u16 = 30180;
    const UDP: u16 = 30153;
    let endpoints_of = |pod: Option<(IpAddr, u8)>| match pod {
        Some((ip, node)) => format!("- {{addresses: [{ip}], nodeName: node{node}}}\n"),
        None => "  []\n".to_string(),
    };
    let bed = NodePortBed::start(
        "npflow",
        Path::new(KPR),
        &ClusterPlan::default(),
        |_| nodeport_manifest("flows", "flow", TCP, UDP, &endpoints_of(None)),
        &[],
    )
    .expect("the NodePort bed starts");
    let remote = IpAddr::V4(bed.node(2).pod_ips()[0]);
    let local = IpAddr::V4(bed.node(1).pod_ips()[0]);
    let write_endpoints = |pod: (IpAddr, u8)| {
        let manifest = nodeport_manifest("flows", "flow", TCP, UDP, &endpoints_of(Some(pod)));
        std::fs::write(bed.dir().join("manifests/services.yaml"), manifest).unwrap();
    };
    let client_port = 40500;
    let source = SocketAddr::new(IpAddr::V4(client_ip(1)), client_port);
    let target = node_port(bed.node(1), UDP);
    let sock = bed
        .cluster
        .client()
        .enter_thread(move || {
            let sock = UdpSocket::bind(source)?;
            sock.connect(target)?;
            sock.set_read_timeout(Some(Duration::from_millis(500)))?;
            Ok::<_, std::io::Error>(sock)
        })
        .unwrap()
        .unwrap();
    // One datagram and its answer: the backend's address, or the error.
    let exchange = || -> Result<IpAddr, std::io::ErrorKind> {
        sock.send(b"hi").map_err(|e| e.kind())?;
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).map_err(|e| e.kind())?;
        let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
        let backend: SocketAddr = split_reply(&reply).0.parse().unwrap();
        Ok(backend.ip())
    };
    // Exchanges until `want` answers (at most 40, 20 s); the outcomes seen
    // on the way.
    let until = |want: IpAddr| -> Vec<Result<IpAddr, std::io::ErrorKind>> {
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.len() < 40 && Instant::now() < deadline {
            let r = exchange();
            seen.push(r);
            if r == Ok(want) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        seen
    };

    assert_eq!(
        exchange(),
        Err(std::io::ErrorKind::ConnectionRefused),
        "no endpoints: rejected"
    );
    write_endpoints((remote, 2));
    let seen = until(remote);
    println!("none -> remote pod: {seen:?}");
    assert_eq!(
        seen.last(),
        Some(&Ok(remote)),
        "the flow reaches the new endpoint"
    );
    write_endpoints((local, 1));
    let seen = until(local);
    println!("remote pod -> local pod: {seen:?}");
    assert_eq!(
        seen.last(),
        Some(&Ok(local)),
        "the flow leaves the removed endpoint"
    );
    for _ in 0..5 {
        assert_eq!(exchange(), Ok(local), "and stays on the new one");
    }
    let flow: Vec<_> = bed
        .ct(1)
        .unwrap()
        .into_iter()
        .filter(|e| e.dir == CtDir::Orig && e.src == source)
        .collect();
    assert_eq!(flow.len(), 1, "{flow:?}");
    assert_eq!(
        flow[0].nat_dst,
        SocketAddr::new(local, kpr::testbed::nodeport_bed::POD_UDP),
        "{flow:?}"
    );
    assert!(!flow[0].snat, "a local backend sees the client: {flow:?}");
}

/// A second address of the client, on its loopback, that both nodes route
/// back to it: one client (address and port) whichever node it enters, as
/// behind ECMP or a DNS round robin over node addresses.
const SHARED_CLIENT: std::net::Ipv4Addr = std::net::Ipv4Addr::new(203, 0, 113, 9);

fn add_shared_client_address(bed: &NodePortBed) {
    bed.cluster
        .client()
        .ip(&["addr", "add", &format!("{SHARED_CLIENT}/32"), "dev", "lo"])
        .unwrap();
    for n in [1u8, 2] {
        let via = client_ip(n).to_string();
        bed.node(n)
            .ns()
            .ip(&[
                "route",
                "add",
                &format!("{SHARED_CLIENT}/32"),
                "via",
                &via,
                "dev",
                kpr::testbed::cluster::NODE_CLIENT_IF,
            ])
            .unwrap();
    }
}

/// For every source port in `ports`: the pod that answered a TCP request
/// from [`SHARED_CLIENT`]:port to node1's and to node2's `node_port`.
fn backends_by_port(
    bed: &NodePortBed,
    ports: std::ops::Range<u16>,
    node_port_number: u16,
) -> BTreeMap<u16, [IpAddr; 2]> {
    answers_by_port(bed, ports, node_port_number)
        .into_iter()
        .map(|(port, [(a, _), (b, _)])| (port, [a, b]))
        .collect()
}

/// As [`backends_by_port`], each pod with the client address it saw:
/// (pod, peer).
fn answers_by_port(
    bed: &NodePortBed,
    ports: std::ops::Range<u16>,
    node_port_number: u16,
) -> BTreeMap<u16, [(IpAddr, IpAddr); 2]> {
    let targets = [
        node_port(bed.node(1), node_port_number),
        node_port(bed.node(2), node_port_number),
    ];
    let answers = bed
        .cluster
        .client()
        .enter_thread(move || {
            ports
                .map(|port| {
                    let local = SocketAddr::new(IpAddr::V4(SHARED_CLIENT), port);
                    let none = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
                    let mut pods = [(none, none); 2];
                    for (pod, target) in pods.iter_mut().zip(targets) {
                        let reply = request_from(local, target)
                            .map_err(|e| format!("{local} -> {target}: {e}"))?;
                        let (identity, peer) = split_reply(&reply);
                        let identity: SocketAddr =
                            identity.parse().map_err(|e| format!("{reply:?}: {e}"))?;
                        let peer = peer.ok_or_else(|| format!("{reply:?}: no peer"))?;
                        *pod = (identity.ip(), peer);
                    }
                    Ok::<_, String>((port, pods))
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    answers
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// Source ports whose two requests (through node1, through node2) met
/// different backends.
fn disagreeing(by_port: &BTreeMap<u16, [IpAddr; 2]>) -> Vec<(u16, [IpAddr; 2])> {
    by_port
        .iter()
        .filter(|(_, [a, b])| a != b)
        .map(|(p, pods)| (*p, *pods))
        .collect()
}

/// Polls `kpr svc list -o json` on both nodes until `done` holds for
/// both (bounded: 20 s).
#[track_caller]
fn wait_for_svc_list(bed: &NodePortBed, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lists: Vec<String> = [1u8, 2]
            .iter()
            .map(|n| {
                let root = bed.bpf_root(*n);
                bed.kpr(&[
                    "svc",
                    "list",
                    "-o",
                    "json",
                    "--bpf-root",
                    root.to_str().unwrap(),
                ])
                .unwrap()
            })
            .collect();
        if lists.iter().all(|l| done(l)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "both agents did not get to {what}:\n{}",
            lists.join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn maglev_sends_a_client_to_the_same_backend_through_either_node_and_keeps_flows_when_a_backend_goes(
) {
    if !root() {
        return;
    }
    let plan = ClusterPlan {
        pods_per_node: 3,
        ..ClusterPlan::default()
    };
    let bed = Bed::start_with("npmg", &plan, &["--lb-algorithm", "maglev"]);
    add_shared_client_address(&bed);
    let ports = 47000..47120;
    let flows = ports.len();

    let first = backends_by_port(&bed, ports.clone(), NODE_PORT_TCP);
    assert_eq!(
        disagreeing(&first),
        vec![],
        "through node1 and node2, each client port reaches one backend"
    );
    let mut shares: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for [pod, _] in first.values() {
        *shares.entry(*pod).or_default() += 1;
    }
    println!("maglev: {flows} client ports over 6 pods: {shares:?}");
    assert_eq!(
        shares.keys().copied().collect::<BTreeSet<_>>(),
        all_pods(&bed),
        "every pod gets flows"
    );
    // 20 expected each; a sound hash keeps every pod well above a third.
    assert!(shares.values().all(|n| *n >= 7 && *n <= 40), "{shares:?}");

    // The datapath uses Maglev for the NodePorts, not for the ClusterIP.
    let root1 = bed.bpf_root(1);
    let list = bed
        .kpr(&["svc", "list", "--bpf-root", root1.to_str().unwrap()])
        .unwrap();
    let row = |frontend: &str| {
        list.lines()
            .find(|l| l.contains(frontend))
            .unwrap_or_else(|| panic!("no {frontend} in\n{list}"))
            .to_string()
    };
    assert!(
        row("192.0.2.11:30080/TCP").contains("NodePort (maglev)"),
        "{list}"
    );
    assert!(!row("10.96.0.10:80/TCP").contains("maglev"), "{list}");

    // One pod of node2 goes.
    let removed = IpAddr::V4(bed.node(2).pod_ips()[0]);
    let manifest_path = bed.dir().join("manifests").join("services.yaml");
    let text = std::fs::read_to_string(&manifest_path).unwrap();
    let line = format!("- {{addresses: [{removed}], nodeName: node2}}\n");
    assert!(text.contains(&line), "{text}");
    std::fs::write(&manifest_path, text.replace(&line, "")).unwrap();
    let gone = format!("\"{removed}\"");
    wait_for_svc_list(&bed, "the removal", |l| {
        l.contains("\"port\": 30080") && !l.contains(&gone)
    });

    let second = backends_by_port(&bed, ports.clone(), NODE_PORT_TCP);
    assert_eq!(disagreeing(&second), vec![], "both nodes agree again");
    assert!(second.values().all(|[pod, _]| *pod != removed));
    let on_others: Vec<u16> = ports.filter(|p| first[p][0] != removed).collect();
    let kept = on_others
        .iter()
        .filter(|p| first[*p][0] == second[*p][0])
        .count();
    println!(
        "maglev: after removing {removed}, {kept} of {} flows on other pods kept their pod",
        on_others.len()
    );
    // Maglev moves only a few percent of them; a rehash would move ~80 %.
    assert!(
        kept * 10 >= on_others.len() * 8,
        "{kept} of {} kept",
        on_others.len()
    );
}

/// NodePort Services for the annotation test: `hashed` (annotated maglev),
/// `plain` (no annotation), `bad` (an unknown algorithm) and `sticky`
/// (maglev with ClientIP session affinity), every pod behind each.
fn annotated_manifest(cluster: &Cluster) -> String {
    let mut endpoints = String::new();
    for node in cluster.nodes() {
        for ip in node.pod_ips() {
            endpoints += &format!("- {{addresses: [{ip}], nodeName: node{}}}\n", node.index());
        }
    }
    let service = |name: &str, cluster_ip: &str, node_port: u16, annotation: &str, extra: &str| {
        let annotations = match annotation {
            "" => String::new(),
            a => format!("\n  annotations: {{service.kpr.io/lb-algorithm: {a}}}"),
        };
        format!(
            r#"
---
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: np{annotations}
spec:
  type: NodePort
  clusterIP: {cluster_ip}{extra}
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: {POD_TCP}, nodePort: {node_port}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: np, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: {POD_TCP}}}
endpoints:
{endpoints}"#
        )
    };
    service("hashed", "10.96.0.20", 30090, "maglev", "")
        + &service("plain", "10.96.0.21", 30091, "", "")
        + &service("bad", "10.96.0.22", 30092, "ring-hash", "")
        + &service(
            "sticky",
            "10.96.0.23",
            30093,
            "maglev",
            "\n  sessionAffinity: ClientIP",
        )
}

#[test]
fn the_lb_algorithm_annotation_switches_one_service_to_maglev_while_another_stays_random() {
    if !root() {
        return;
    }
    // Agents with the default --lb-algorithm random.
    let bed = NodePortBed::start(
        "npann",
        Path::new(KPR),
        &ClusterPlan::default(),
        annotated_manifest,
        &[],
    )
    .expect("the NodePort bed starts");
    add_shared_client_address(&bed);
    let ports = 47200..47240;

    let hashed = backends_by_port(&bed, ports.clone(), 30090);
    assert_eq!(disagreeing(&hashed), vec![], "maglev: both nodes agree");
    let distinct: BTreeSet<IpAddr> = hashed.values().map(|[p, _]| *p).collect();
    assert!(distinct.len() >= 3, "spread over the pods: {hashed:?}");

    // Random: with 4 pods, a client port meets the same pod through both
    // nodes about one time in four; all 40 agreeing has odds of 4^-40.
    for (name, port) in [("plain", 30091), ("bad", 30092)] {
        let by_port = backends_by_port(&bed, ports.clone(), port);
        let agree = by_port.len() - disagreeing(&by_port).len();
        println!(
            "{name}: {agree} of {} client ports met the same pod",
            by_port.len()
        );
        assert!(
            agree * 4 < by_port.len() * 3,
            "{name} is random: {by_port:?}"
        );
    }

    // Session affinity wins over the table: one client address, one pod,
    // whatever its port (the first flow's Maglev pick, on both nodes).
    let sticky = backends_by_port(&bed, ports.clone(), 30093);
    let pods: BTreeSet<IpAddr> = sticky.values().flatten().copied().collect();
    assert_eq!(pods.len(), 1, "affinity keeps one pod: {sticky:?}");

    // The maps say so too, and the bad annotation was counted, not fatal.
    let root1 = bed.bpf_root(1);
    let list = bed
        .kpr(&["svc", "list", "--bpf-root", root1.to_str().unwrap()])
        .unwrap();
    for line in list.lines().filter(|l| l.contains("192.0.2.11:")) {
        assert_eq!(
            line.contains("(maglev)"),
            line.contains(":30090/") || line.contains(":30093/"),
            "{line}\n{list}"
        );
    }
    // Annotating the running `plain` switches it: tables are written,
    // then the masters flag Maglev, and both nodes agree from then on.
    let manifest_path = bed.dir().join("manifests").join("services.yaml");
    let text = std::fs::read_to_string(&manifest_path).unwrap();
    let plain = "  name: plain\n  namespace: np\n";
    assert!(text.contains(plain), "{text}");
    let annotated = format!("{plain}  annotations: {{service.kpr.io/lb-algorithm: maglev}}\n");
    std::fs::write(&manifest_path, text.replace(plain, &annotated)).unwrap();
    wait_for_svc_list(&bed, "maglev on plain", |l| {
        let rows: Vec<serde_json::Value> = serde_json::from_str(l).unwrap_or_default();
        let plain: Vec<_> = rows
            .iter()
            .filter(|r| r["port"] == 30091 && r["type"] == "NodePort")
            .collect();
        !plain.is_empty() && plain.iter().all(|r| r["lb_algorithm"] == "maglev")
    });
    let switched = backends_by_port(&bed, ports.clone(), 30091);
    assert_eq!(disagreeing(&switched), vec![], "plain is Maglev now");

    let skipped = bed.agents[0]
        .metric_value("kpr_skipped_objects_total", "reason=\"invalid_annotation\"")
        .unwrap();
    assert!(skipped.unwrap_or(0.0) >= 1.0, "{skipped:?}");
    let log = bed.agents[0].log();
    assert!(
        log.contains("ring-hash") && log.contains("service.kpr.io/lb-algorithm"),
        "the bad annotation is logged with its value:\n{log}"
    );
}

#[test]
fn maglev_in_generic_xdp_sends_a_client_to_the_same_backend_through_either_node() {
    if !root() {
        return;
    }
    let plan = ClusterPlan {
        xdp_ready: true,
        ..ClusterPlan::default()
    };
    let bed = Bed::start_with(
        "npmgx",
        &plan,
        &[
            "--lb-algorithm",
            "maglev",
            "--nodeport-acceleration",
            "generic",
        ],
    );
    add_shared_client_address(&bed);
    let before: Vec<u64> = [1u8, 2].map(|n| bed.stats(n).unwrap().xdp_fwd).to_vec();
    let by_port = backends_by_port(&bed, 47300..47340, NODE_PORT_TCP);
    assert_eq!(disagreeing(&by_port), vec![], "both nodes agree in XDP");
    let distinct: BTreeSet<IpAddr> = by_port.values().map(|[p, _]| *p).collect();
    assert!(distinct.len() >= 3, "spread over the pods: {by_port:?}");
    for n in [1u8, 2] {
        let after = bed.stats(n).unwrap().xdp_fwd;
        assert!(
            after > before[usize::from(n - 1)],
            "node{n}: XDP forwarded the flows itself"
        );
    }
}

// --- direct server return ---------------------------------------------------

/// NodePort of `bulk` (TCP to [`BULK_PORT`] on node2's pods only: through
/// node1 every flow has a remote backend).
const NODE_PORT_BULK_TCP: u16 = 30090;
/// NodePort of `bulk`'s UDP port (to node2's UDP identity servers).
const NODE_PORT_BULK_UDP: u16 = 30091;
/// Port of the sinks the bulk tests start on node2's pods.
const BULK_PORT: u16 = 9000;
/// Bytes one bulk upload sends.
const BULK_BYTES: usize = 256 * 1024;
/// The smallest MTU of the bed's devices (veth default).
const BED_MTU: u32 = 1500;

/// This file's manifest plus `bulk`: NodePorts whose endpoints are node2's
/// pods only.
fn dsr_manifest(cluster: &Cluster) -> String {
    let endpoints: String = cluster
        .node(2)
        .pod_ips()
        .iter()
        .map(|ip| format!("- {{addresses: [{ip}], nodeName: node2}}\n"))
        .collect();
    manifest(cluster)
        + &format!(
            r#"
---
apiVersion: v1
kind: Service
metadata: {{name: bulk, namespace: np}}
spec:
  type: NodePort
  clusterIP: 10.96.0.15
  ports:
  - {{name: sink, protocol: TCP, port: 90, targetPort: {BULK_PORT}, nodePort: {NODE_PORT_BULK_TCP}}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: {POD_UDP}, nodePort: {NODE_PORT_BULK_UDP}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: bulk-1, namespace: np, labels: {{kubernetes.io/service-name: bulk}}}}
addressType: IPv4
ports:
- {{name: sink, protocol: TCP, port: {BULK_PORT}}}
- {{name: dns, protocol: UDP, port: {POD_UDP}}}
endpoints:
{endpoints}"#
        )
}

/// A bed whose nodes reach the client directly, in `mode`.
fn start_dsr_bed(prefix: &str, xdp: Option<&str>, mode: &str) -> NodePortBed {
    start_dsr_bed_with(prefix, xdp, mode, &[])
}

/// [`start_dsr_bed`] with `extra_args` for every agent.
fn start_dsr_bed_with(
    prefix: &str,
    xdp: Option<&str>,
    mode: &str,
    extra_args: &[&str],
) -> NodePortBed {
    let plan = ClusterPlan {
        xdp_ready: xdp.is_some(),
        direct_return: true,
        ..ClusterPlan::default()
    };
    let mut args = vec!["--nodeport-mode", mode];
    if let Some(xdp) = xdp {
        args.extend(["--nodeport-acceleration", xdp]);
    }
    args.extend(extra_args);
    let bed = NodePortBed::start(prefix, Path::new(KPR), &plan, dsr_manifest, &args)
        .expect("the NodePort bed starts");
    // The node-to-node links' packet counters tell whether replies come
    // back through a node: keep IPv6 autoconfiguration (router
    // solicitations, MLD reports of fresh links) out of them.
    for node in bed.cluster.nodes() {
        node.ns()
            .sysctl(&format!("net/ipv6/conf/{NODE_PEER_IF}/disable_ipv6"), "1")
            .unwrap();
    }
    bed
}

/// Packets `dev` of `ns` has received (`ip -s -j link`).
fn rx_packets(ns: &Netns, dev: &str) -> u64 {
    let out = ns
        .ip_output(&["-s", "-j", "link", "show", "dev", dev])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no rx counter in {out}"))
}

/// Where a reply came from as the backend saw it.
fn seen_source(reply: &str) -> (IpAddr, IpAddr) {
    let (identity, seen) = split_reply(reply);
    let backend: SocketAddr = identity.parse().expect("identity is ip:port");
    (backend.ip(), seen.expect("the server reports its peer"))
}

/// TCP and UDP through both nodes' NodePorts with DSR for TCP and, when
/// `udp_dsr`, UDP (hybrid: UDP is SNATed): every pod of both nodes answers,
/// each sees the client itself (SNATed UDP: the node), replies come from
/// the frontend, and replies of remote backends never enter the node the
/// client addressed (its node-to-node interface receives nothing).
fn dsr_spreads_with_the_client_address(bed: &NodePortBed, udp_dsr: bool) {
    let client = bed.cluster.client();
    for n in [1u8, 2] {
        let node = bed.node(n);
        let other = bed.node(3 - n);
        let client_addr = IpAddr::V4(client_ip(n));

        let target = node_port(node, NODE_PORT_TCP);
        let rx_before = rx_packets(node.ns(), NODE_PEER_IF);
        let r = run_in(
            client,
            ProbeSpec::TcpRequests {
                target,
                count: 60,
                timeout_ms: 2000,
            },
        );
        let rx_after = rx_packets(node.ns(), NODE_PEER_IF);
        let r = r.as_requests().unwrap();
        assert!(r.failures.is_empty(), "{target}: {r:?}");
        let mut seen: BTreeMap<IpAddr, u64> = BTreeMap::new();
        for (reply, count) in &r.identities {
            let (backend, source) = seen_source(reply);
            assert_eq!(
                source, client_addr,
                "every backend sees the client: {reply}"
            );
            *seen.entry(backend).or_default() += count;
        }
        println!(
            "node{n} TCP {target} (dsr): {seen:?}; node{n} {NODE_PEER_IF} received {} packets meanwhile",
            rx_after - rx_before
        );
        assert_eq!(seen.keys().copied().collect::<BTreeSet<_>>(), all_pods(bed));
        let remote: u64 = seen
            .iter()
            .filter(|(ip, _)| node_of(**ip) == other.index())
            .map(|(_, c)| c)
            .sum();
        assert!(remote > 0);
        // SNAT would bring at least three packets per remote request back
        // (SYN-ACK, reply data, FIN) over this link; DSR brings none.
        assert_eq!(
            rx_after - rx_before,
            0,
            "replies of node{}'s backends do not pass back through node{n}",
            other.index()
        );

        let target = node_port(node, NODE_PORT_UDP);
        let r = run_in(
            client,
            ProbeSpec::UdpConnected {
                target,
                count: 60,
                timeout_ms: 2000,
            },
        );
        let u = r.as_udp().unwrap();
        assert!(u.failures.is_empty(), "{target}: {u:?}");
        let mut seen: BTreeMap<IpAddr, u64> = BTreeMap::new();
        for (reply, count) in &u.identities {
            let backend = if udp_dsr || node_of(seen_source(reply).0) == n {
                let (backend, source) = seen_source(reply);
                assert_eq!(source, client_addr, "{reply}");
                backend
            } else {
                check_source(node, reply)
            };
            *seen.entry(backend).or_default() += count;
        }
        println!("node{n} UDP {target}: {seen:?}");
        assert_eq!(seen.keys().copied().collect::<BTreeSet<_>>(), all_pods(bed));

        // One unconnected socket is one flow: one backend, and every reply
        // from the NodePort address.
        let r = run_in(
            client,
            ProbeSpec::UdpUnconnected {
                target,
                count: 20,
                timeout_ms: 2000,
            },
        );
        let u = r.as_udp().unwrap();
        assert!(u.failures.is_empty(), "{u:?}");
        assert_eq!(u.identities.len(), 1, "one flow, one backend: {u:?}");
        assert_eq!(
            u.reply_sources.iter().collect::<Vec<_>>(),
            [&target.to_string()]
        );
    }
}

/// Conntrack and counters after [`dsr_spreads_with_the_client_address`]:
/// node1 holds one entry per DSR flow (no reply entry: replies never come
/// back), node2 a local backend's pair per flow it took in.
fn check_dsr_conntrack(bed: &NodePortBed, udp_dsr: bool) {
    let (n1, n2) = (bed.node(1), bed.node(2));
    let entries = bed.ct(1).unwrap();
    let dsr: Vec<&CtRecord> = entries.iter().filter(|e| e.dsr_encap).collect();
    assert!(!dsr.is_empty(), "node1 has DSR flows");
    for e in &dsr {
        assert_eq!(e.dir, CtDir::Orig, "{e:?}");
        assert!(!e.snat, "{e:?}");
        assert_eq!(e.dst.ip(), IpAddr::V4(n1.ext_ip()), "{e:?}");
        assert_eq!(node_of(e.nat_dst.ip()), 2, "{e:?}");
        assert_eq!(
            e.nat_src.ip(),
            IpAddr::V4(n1.peer_ip()),
            "outer source: {e:?}"
        );
        assert!(udp_dsr || e.proto == Protocol::Tcp, "{e:?}");
        assert!(
            !entries.iter().any(|r| r.dir == CtDir::Reply
                && r.src == e.nat_dst
                && r.proto == e.proto
                && r.dst.port() == e.src.port()),
            "no reply entry on node1 for {e:?}"
        );
    }
    assert!(dsr
        .iter()
        .any(|e| e.proto == Protocol::Tcp && e.established));
    // What node2 took in from node1: a local backend's pair, the client
    // preserved, the frontend node1's.
    let entries = bed.ct(2).unwrap();
    let taken: Vec<&CtRecord> = entries
        .iter()
        .filter(|e| e.dsr_decap && e.dir == CtDir::Orig)
        .collect();
    assert!(!taken.is_empty(), "node2 took DSR flows in");
    for e in &taken {
        assert_eq!(e.dst.ip(), IpAddr::V4(n1.ext_ip()), "{e:?}");
        assert_eq!(e.nat_src, e.src, "{e:?}");
        assert_eq!(node_of(e.nat_dst.ip()), 2, "{e:?}");
        let peer = entries
            .iter()
            .find(|r| r.dir == CtDir::Reply && r.src == e.nat_dst && r.dst == e.src)
            .unwrap_or_else(|| panic!("no reply entry on node2 for {e:?}"));
        assert_eq!((peer.nat_src, peer.nat_dst), (e.dst, e.src), "{peer:?}");
        assert!(peer.dsr_decap && peer.established, "{peer:?}");
    }
    let (s1, s2) = (bed.stats(1).unwrap(), bed.stats(2).unwrap());
    println!("node1 counters: {s1:?}\nnode2 counters: {s2:?}");
    for s in [&s1, &s2] {
        assert!(
            s.flows_dsr > 0 && s.dsr_decap > 0 && s.mss_clamped > 0,
            "{s:?}"
        );
        assert_eq!(
            (s.drop_no_backend, s.drop_fib, s.drop_ct),
            (0, 0, 0),
            "{s:?}"
        );
        assert_eq!(s.dsr_miss, 0, "{s:?}");
        if udp_dsr {
            assert_eq!(s.flows_snat, 0, "{s:?}");
        } else {
            assert!(s.flows_snat > 0, "hybrid SNATs UDP: {s:?}");
        }
    }
    let table = bed
        .kpr(&[
            "ct",
            "list",
            "--bpf-root",
            bed.bpf_root(1).to_str().unwrap(),
        ])
        .unwrap();
    assert!(
        table.contains(&format!("ipip {} -> 10.244.2.", n1.peer_ip()))
            && table.contains("dsr-encap"),
        "{table}"
    );
    let _ = n2;
}

/// Sinks on node2's pods at [`BULK_PORT`]: each connection is read to its
/// end and answered `BYTES <- PEER_IP`. They stop when `stop` is set (or
/// after a minute).
fn start_bulk_sinks(bed: &NodePortBed, stop: &Arc<AtomicBool>) -> Vec<NsThread<()>> {
    use std::io::{Read, Write};
    bed.node(2)
        .pod_ips()
        .iter()
        .map(|ip| {
            let addr = SocketAddr::new(IpAddr::V4(*ip), BULK_PORT);
            let stop = stop.clone();
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let thread = bed
                .node(2)
                .pods()
                .spawn_thread(move || {
                    let listener = std::net::TcpListener::bind(addr).unwrap();
                    listener.set_nonblocking(true).unwrap();
                    tx.send(()).unwrap();
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let (mut conn, peer) = match listener.accept() {
                            Ok(c) => c,
                            Err(_) => {
                                std::thread::sleep(Duration::from_millis(5));
                                continue;
                            }
                        };
                        conn.set_nonblocking(false).unwrap();
                        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let mut buf = vec![0u8; 65536];
                        let mut total = 0usize;
                        loop {
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => total += n,
                            }
                        }
                        let _ = conn.write_all(format!("{total} <- {}\n", peer.ip()).as_bytes());
                    }
                })
                .unwrap();
            rx.recv_timeout(Duration::from_secs(5)).expect("sink bound");
            thread
        })
        .collect()
}

/// One upload of [`BULK_BYTES`] through node1's `bulk` NodePort (backends
/// on node2 only, so DSR): the TCP MSS the client learns leaves room for
/// the encapsulation, every byte reaches one backend (one connection's
/// packets all go to the same backend: a second one would reset it), which
/// saw the client itself.
fn bulk_upload_through_node1(bed: &NodePortBed) -> u32 {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let target = node_port(bed.node(1), NODE_PORT_BULK_TCP);
    let (mss, reply) = bed
        .cluster
        .client()
        .enter_thread(move || {
            let mut s =
                std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut mss: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes an int into mss, len says its size.
            let rc = unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_MAXSEG,
                    (&mut mss as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(rc, 0);
            let data = vec![0x5a_u8; BULK_BYTES];
            s.write_all(&data).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).unwrap();
            (mss as u32, reply.trim().to_string())
        })
        .unwrap();
    println!("bulk upload through node1: MSS {mss}, reply {reply:?}");
    assert!(
        mss <= BED_MTU - 60,
        "the SYN-ACK's MSS leaves room for the outer header: {mss}"
    );
    assert_eq!(
        reply,
        format!("{BULK_BYTES} <- {}", client_ip(1)),
        "every byte reached one backend, which saw the client"
    );
    mss
}

/// A UDP datagram too big to encapsulate is answered with ICMP
/// fragmentation-needed: the client's path MTU toward the NodePort drops
/// by the 20 bytes of the outer header, and a datagram that fits then
/// gets its answer.
fn oversized_udp_gets_fragmentation_needed(bed: &NodePortBed) {
    let target = node_port(bed.node(1), NODE_PORT_BULK_UDP);
    let before = bed.stats(1).unwrap().drop_dsr_too_big;
    let (first, mtu, small) = bed
        .cluster
        .client()
        .enter_thread(move || {
            use std::os::fd::AsRawFd;
            let sock = UdpSocket::bind((client_ip(1), 0)).unwrap();
            sock.connect(target).unwrap();
            let on: libc::c_int = libc::IP_PMTUDISC_DO;
            // SAFETY: setsockopt reads an int.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            sock.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let big = vec![b'x'; BED_MTU as usize - 28];
            let _ = sock.send(&big);
            let mut buf = [0u8; 2048];
            let first = sock
                .recv(&mut buf)
                .map(|_| ())
                .map_err(|e| e.raw_os_error());
            let mut mtu: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes an int into mtu, len says its size.
            unsafe {
                libc::getsockopt(
                    sock.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_MTU,
                    (&mut mtu as *mut libc::c_int).cast(),
                    &mut len,
                );
            }
            let fits = vec![b'y'; mtu.max(100) as usize - 28];
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let small = sock
                .send(&fits)
                .and_then(|_| sock.recv(&mut buf))
                .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
                .map_err(|e| e.to_string());
            (first, mtu as u32, small)
        })
        .unwrap();
    println!("oversized UDP through node1: first {first:?}, IP_MTU {mtu}, then {small:?}");
    assert_eq!(
        first,
        Err(Some(libc::EMSGSIZE)),
        "the ICMP error reaches the socket"
    );
    assert_eq!(mtu, BED_MTU - 20, "path MTU lowered by the outer header");
    let small = small.expect("a datagram that fits is answered");
    assert_eq!(node_of(seen_source(&small).0), 2, "{small}");
    assert!(bed.stats(1).unwrap().drop_dsr_too_big > before);
}

/// Entries of node `n`'s DSR map, as its agent reports them.
fn dsr_entries(bed: &NodePortBed, n: u8) -> Option<f64> {
    bed.agents[usize::from(n - 1)]
        .metric_value("kpr_bpf_map_entries", r#"map="dsr""#)
        .unwrap()
}

/// The DSR map holds one entry per north-south frontend (NodePorts once,
/// whatever the node address) and local backend, and follows endpoint
/// changes: a node2 pod taken out of `bulk` is no longer reached by DSR.
fn dsr_map_follows_endpoints(bed: &NodePortBed) {
    // node1: web TCP+UDP x 2 pods, web-local x 2, one-local x 2, guarded
    // (NodePort and LoadBalancer IP) x 2; node2: web x 2 x 2, web-local x 2,
    // guarded x 2 x 2, bulk TCP+UDP x 2.
    assert_eq!(dsr_entries(bed, 1), Some(12.0));
    assert_eq!(dsr_entries(bed, 2), Some(14.0));
    let gone = bed.node(2).pod_ips()[1];
    let kept = bed.node(2).pod_ips()[0];
    let path = bed.dir().join("manifests").join("services.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let line = format!("- {{addresses: [{gone}], nodeName: node2}}\n");
    let at = text.rfind(&line).expect("bulk lists the pod last");
    let text = format!("{}{}", &text[..at], &text[at + line.len()..]);
    std::fs::write(&path, text).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while dsr_entries(bed, 2) != Some(12.0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        dsr_entries(bed, 2),
        Some(12.0),
        "two bulk entries of {gone} gone"
    );
    let r = run_in(
        bed.cluster.client(),
        ProbeSpec::UdpConnected {
            target: node_port(bed.node(1), NODE_PORT_BULK_UDP),
            count: 20,
            timeout_ms: 2000,
        },
    );
    let u = r.as_udp().unwrap();
    assert!(u.failures.is_empty(), "{u:?}");
    let seen: BTreeSet<IpAddr> = u.identities.keys().map(|r| seen_source(r).0).collect();
    assert_eq!(seen, BTreeSet::from([IpAddr::V4(kept)]), "{u:?}");
}

/// Everything DSR is checked for, on a dsr bed with `xdp` in front; the
/// bed, for more.
fn dsr_end_to_end(prefix: &str, xdp: Option<&str>) -> NodePortBed {
    let bed = start_dsr_bed(prefix, xdp, "dsr");
    dsr_spreads_with_the_client_address(&bed, true);
    check_dsr_conntrack(&bed, true);
    let stop = Arc::new(AtomicBool::new(false));
    let sinks = start_bulk_sinks(&bed, &stop);
    bulk_upload_through_node1(&bed);
    stop.store(true, Ordering::Relaxed);
    for s in sinks {
        s.join().unwrap();
    }
    oversized_udp_gets_fragmentation_needed(&bed);
    if let Some(mode) = xdp {
        for n in [1u8, 2] {
            let s = bed.stats(n).unwrap();
            println!("node{n} XDP {mode}: {s:?}");
            assert!(s.xdp_fwd > 0, "{s:?}");
        }
    }
    bed
}

#[test]
fn dsr_nodeport_reaches_backends_on_both_nodes_which_see_the_client_and_answer_it_directly() {
    if !root() {
        return;
    }
    let bed = dsr_end_to_end("npdsr", None);
    dsr_map_follows_endpoints(&bed);
}

#[test]
fn dsr_through_generic_xdp_encapsulates_and_decapsulates_in_xdp() {
    if !root() {
        return;
    }
    dsr_end_to_end("npdsrg", Some("generic"));
}

#[test]
fn dsr_through_native_xdp_on_veth_encapsulates_and_decapsulates_in_xdp() {
    if !root() {
        return;
    }
    dsr_end_to_end("npdsrn", Some("native"));
}

#[test]
fn hybrid_mode_returns_tcp_directly_and_snats_udp() {
    if !root() {
        return;
    }
    let bed = start_dsr_bed("nphyb", None, "hybrid");
    dsr_spreads_with_the_client_address(&bed, false);
    check_dsr_conntrack(&bed, false);
    // A UDP flow to node2's pods through node1 is SNATed: the backend sees
    // node1, and node1 tracks its reply.
    let entries = bed.ct(1).unwrap();
    assert!(entries
        .iter()
        .any(|e| e.proto == Protocol::Udp && e.snat && node_of(e.nat_dst.ip()) == 2));
    assert!(!entries
        .iter()
        .any(|e| e.proto == Protocol::Udp && e.dsr_encap));
}

/// Restart safety with DSR: both agents killed and restarted (the
/// backend's node first) under steady load through node1, whose flows go
/// half by DSR to node2. The DSR map, conntrack and the programs behind
/// the pinned links carry every connection over, and long-lived UDP flows
/// keep their backend.
#[test]
fn dsr_agents_restarted_under_load_fail_no_connection_and_keep_udp_flows() {
    if !root() {
        return;
    }
    let mut bed = start_dsr_bed("npdsrr", None, "dsr");
    let target = node_port(bed.node(1), NODE_PORT_TCP);
    let first = udp_flows_answers(bed.cluster.client(), bed.node(1), 8, None);

    let stop = Arc::new(AtomicBool::new(false));
    let load_stop = stop.clone();
    let load = bed
        .cluster
        .client()
        .spawn_thread(move || {
            let (mut answered, mut failed) = (0u64, BTreeMap::<String, u64>::new());
            let mut batches = 0;
            while batches < 1000 && (!load_stop.load(Ordering::Relaxed) || batches < 5) {
                let r = ProbeSpec::TcpRequests {
                    target,
                    count: 20,
                    timeout_ms: 3000,
                }
                .run()
                .expect("probe runs");
                let r = r.as_requests().expect("requests report").clone();
                answered += r.identities.values().sum::<u64>();
                for (k, v) in r.failures {
                    *failed.entry(k).or_default() += v;
                }
                batches += 1;
            }
            (answered, failed)
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let decap_before = bed.stats(2).unwrap().dsr_decap;
    for n in [2u8, 1] {
        let agent = bed.agent(n);
        agent.kill().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        agent.restart().unwrap();
        agent.wait_healthy(Duration::from_secs(30)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (answered, failed) = load.join().unwrap();
    let failures: u64 = failed.values().sum();
    println!(
        "DSR restart under load (node2 then node1 killed and restarted): {answered} requests answered, {failures} failed ({failed:?})"
    );
    assert_eq!(failures, 0, "{failed:?}");
    assert!(answered >= 100, "{answered}");
    assert!(bed.stats(2).unwrap().dsr_decap > decap_before);
    for n in [1u8, 2] {
        let log = bed.agent(n).log();
        assert!(log.matches("reused_ct=true").count() >= 1, "{log}");
    }
    let again = udp_flows_answers(bed.cluster.client(), bed.node(1), 8, Some(&first));
    assert_eq!(
        first, again,
        "every UDP flow kept its backend across restarts"
    );
}

/// Maglev and DSR together, with `xdp` in front (None: tc only): the node
/// a client enters picks from the frontend's Maglev table and sends the
/// flow by DSR; the backend's node follows the outer destination, so one
/// client port meets one backend through either node, and every backend,
/// remote ones too, sees the client itself. A frontend without backend
/// still rejects in dsr mode.
fn dsr_with_maglev(prefix: &str, xdp: Option<&str>) {
    let bed = start_dsr_bed_with(prefix, xdp, "dsr", &["--lb-algorithm", "maglev"]);
    add_shared_client_address(&bed);
    let before = [bed.stats(1).unwrap(), bed.stats(2).unwrap()];
    let answers = answers_by_port(&bed, 47000..47060, NODE_PORT_TCP);
    let pods: BTreeMap<u16, [IpAddr; 2]> = answers
        .iter()
        .map(|(port, [(a, _), (b, _)])| (*port, [*a, *b]))
        .collect();
    assert_eq!(
        disagreeing(&pods),
        vec![],
        "through node1 and node2, each client port reaches one backend"
    );
    let mut shares: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for (port, pair) in &answers {
        for (pod, peer) in pair {
            assert_eq!(
                *peer,
                IpAddr::V4(SHARED_CLIENT),
                "port {port}: {pod} sees the client"
            );
            *shares.entry(*pod).or_default() += 1;
        }
    }
    println!("dsr + maglev: {shares:?}");
    assert_eq!(
        shares.keys().copied().collect::<BTreeSet<_>>(),
        all_pods(&bed),
        "every pod gets flows"
    );
    for n in [1u8, 2] {
        let s = bed.stats(n).unwrap();
        let b = &before[usize::from(n - 1)];
        println!("node{n}: {s:?}");
        assert!(
            s.flows_dsr > b.flows_dsr && s.dsr_decap > b.dsr_decap,
            "node{n} sent and took in DSR flows: {s:?}"
        );
        assert_eq!(
            (s.flows_snat, s.dsr_miss, s.drop_no_backend, s.drop_ct),
            (0, 0, 0, 0),
            "node{n}: {s:?}"
        );
        if xdp.is_some() {
            assert!(s.xdp_fwd > b.xdp_fwd, "node{n}: {s:?}");
        }
    }
    let list = bed
        .kpr(&[
            "svc",
            "list",
            "--bpf-root",
            bed.bpf_root(1).to_str().unwrap(),
        ])
        .unwrap();
    assert!(
        list.lines().any(
            |l| l.contains(&format!("{}:{NODE_PORT_TCP}/TCP", bed.node(1).ext_ip()))
                && l.contains("NodePort (maglev)")
        ),
        "{list}"
    );

    let target = node_port(bed.node(1), NODE_PORT_EMPTY);
    let r = run_in(
        bed.cluster.client(),
        ProbeSpec::TcpConnectError {
            target,
            timeout_ms: 5000,
        },
    );
    let c = r.as_connect().unwrap();
    assert_eq!(c.outcome(), "ECONNREFUSED", "{target}: {c:?}");
}

#[test]
fn dsr_with_maglev_sends_a_client_to_one_backend_through_either_node_which_sees_the_client() {
    if !root() {
        return;
    }
    dsr_with_maglev("npdsrm", None);
}

#[test]
fn dsr_with_maglev_in_generic_xdp_sends_a_client_to_one_backend_through_either_node() {
    if !root() {
        return;
    }
    dsr_with_maglev("npdsrmg", Some("generic"));
}

/// The MTU [`dsr_follows_a_device_that_appears_later_and_its_mtu`] gives
/// the late device.
const LATE_MTU: u32 = 1400;

/// A `--devices` interface that appears on the backend's node while DSR
/// flows come in, and then gets a smaller MTU: each re-attachment keeps
/// the dsr mode and the DSR map, and the second lowers the MSS clamp to
/// the new smallest MTU minus 60, which the next connection's client
/// learns; both nodes' NodePorts still send remote flows by DSR.
#[test]
fn dsr_follows_a_device_that_appears_later_and_its_mtu() {
    if !root() {
        return;
    }
    let bed = start_dsr_bed_with("npdsrl", None, "dsr", &["--devices", "eth-late"]);
    let upload = |bed: &NodePortBed| -> u32 {
        let stop = Arc::new(AtomicBool::new(false));
        let sinks = start_bulk_sinks(bed, &stop);
        let mss = bulk_upload_through_node1(bed);
        stop.store(true, Ordering::Relaxed);
        for s in sinks {
            s.join().unwrap();
        }
        mss
    };
    let mss_before = upload(&bed);
    assert!(
        mss_before > LATE_MTU - 60,
        "clamped for the bed's MTU only: {mss_before}"
    );
    let clamped_before = bed.stats(2).unwrap().mss_clamped;

    let root2 = bed.bpf_root(2);
    let late_attached = |root: &Path| {
        attached_devices(root)
            .iter()
            .filter(|d| d.device == "eth-late" && d.ifindex.is_some())
            .count()
    };
    bed.cluster.add_late_link(2, "eth-late", "eth-l2").unwrap();
    // The client keeps reaching node2 through its own link (add_late_link
    // routed node2's address through the new one).
    bed.cluster
        .client()
        .ip(&["route", "del", &format!("{}/32", bed.node(2).ext_ip())])
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || late_attached(&root2) == 2),
        "eth-late not attached: {:?}\n{}",
        attached_devices(&root2),
        bed.agents[1].log()
    );
    bed.node(2)
        .ns()
        .ip(&[
            "link",
            "set",
            "dev",
            "eth-late",
            "mtu",
            &LATE_MTU.to_string(),
        ])
        .unwrap();
    let want = format!("dsr_mss={}", LATE_MTU - 60);
    assert!(
        wait_for(Duration::from_secs(30), || bed.agents[1]
            .log()
            .lines()
            .any(|l| l.contains("re-attached") && l.contains(&want))),
        "node2 did not re-attach with {want}:\n{}",
        bed.agents[1].log()
    );

    let mss_after = upload(&bed);
    println!("MSS through node1 to node2's pods: {mss_before} before, {mss_after} after");
    assert!(
        mss_after <= LATE_MTU - 60,
        "clamped for the late device's MTU: {mss_after}"
    );
    assert!(bed.stats(2).unwrap().mss_clamped > clamped_before);
    dsr_spreads_with_the_client_address(&bed, true);
    check_dsr_conntrack(&bed, true);
}
