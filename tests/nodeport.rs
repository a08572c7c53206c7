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
use kpr::testbed::cluster::client_ip;
use kpr::testbed::nodeport_bed::{nodeport_manifest, POD_TCP};
use kpr::testbed::probe::RequestsReport;
use kpr::testbed::server::split_reply;
use kpr::testbed::{Cluster, ClusterNode, ClusterPlan, Netns, NodePortBed, ProbeResult, ProbeSpec};

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
                    let mut pods = [IpAddr::V4(SHARED_CLIENT); 2];
                    for (pod, target) in pods.iter_mut().zip(targets) {
                        let reply = request_from(local, target)
                            .map_err(|e| format!("{local} -> {target}: {e}"))?;
                        let identity: SocketAddr = split_reply(&reply)
                            .0
                            .parse()
                            .map_err(|e| format!("{reply:?}: {e}"))?;
                        *pod = identity.ip();
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
