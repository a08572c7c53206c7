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
use kpr::testbed::cluster::{client_ip, NODE_PEER_IF};
use kpr::testbed::nodeport_bed::{nodeport_manifest, POD_TCP, POD_UDP};
use kpr::testbed::probe::RequestsReport;
use kpr::testbed::server::split_reply;
use kpr::testbed::{
    Cluster, ClusterNode, ClusterPlan, Netns, NodePortBed, NsThread, ProbeResult, ProbeSpec,
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
/// NodePort of `empty` (no endpoints).
const NODE_PORT_EMPTY: u16 = 30083;

/// The NodePort Service `web` (TCP and UDP) with every pod of both nodes as
/// endpoints, plus the Local-policy and endpoint-less Services above.
fn manifest(cluster: &Cluster) -> String {
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
"#
    );
    web + &local("web-local", "10.96.0.11", NODE_PORT_LOCAL, &endpoints)
        + &local(
            "one-local",
            "10.96.0.12",
            NODE_PORT_ONE_LOCAL,
            &node1_endpoints,
        )
        + &empty
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
    // node2 has no endpoint of one-local, and `empty` has none anywhere:
    // both are dropped (kube-proxy drops the first and rejects the second;
    // kpr has no --service-no-backend-response yet).
    for (node, port) in [(2u8, NODE_PORT_ONE_LOCAL), (1, NODE_PORT_EMPTY)] {
        let target = node_port(bed.node(node), port);
        let r = run_in(
            client,
            ProbeSpec::TcpConnectError {
                target,
                timeout_ms: 300,
            },
        );
        assert_eq!(r.as_connect().unwrap().outcome(), "TIMEOUT", "{target}");
    }
    assert!(bed.stats(2).unwrap().drop_no_backend > 0);
    assert!(bed.stats(1).unwrap().drop_no_backend > 0);
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
  clusterIP: 10.96.0.14
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
    let plan = ClusterPlan {
        xdp_ready: xdp.is_some(),
        direct_return: true,
        ..ClusterPlan::default()
    };
    let mut args = vec!["--nodeport-mode", mode];
    if let Some(xdp) = xdp {
        args.extend(["--nodeport-acceleration", xdp]);
    }
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
fn bulk_upload_through_node1(bed: &NodePortBed) {
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
    // node1: web TCP+UDP x 2 pods, web-local x 2, one-local x 2; node2:
    // web x 2 x 2, web-local x 2, bulk TCP+UDP x 2.
    assert_eq!(dsr_entries(bed, 1), Some(8.0));
    assert_eq!(dsr_entries(bed, 2), Some(10.0));
    let gone = bed.node(2).pod_ips()[1];
    let kept = bed.node(2).pod_ips()[0];
    let path = bed.dir().join("manifests").join("services.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let line = format!("- {{addresses: [{gone}], nodeName: node2}}\n");
    let at = text.rfind(&line).expect("bulk lists the pod last");
    let text = format!("{}{}", &text[..at], &text[at + line.len()..]);
    std::fs::write(&path, text).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while dsr_entries(bed, 2) != Some(8.0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        dsr_entries(bed, 2),
        Some(8.0),
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
