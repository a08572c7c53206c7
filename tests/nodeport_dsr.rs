//! Direct server return (--nodeport-mode dsr and hybrid) end to end on
//! the multi-node bed (tests/support/nodeport.rs), with nodes that reach
//! the client directly: remote backends see the client and answer it
//! without passing back through the node it addressed.
//!
//! Needs root (namespaces, BPF, tcx): every test is `#[ignore = "needs
//! root"]` (run them with `--include-ignored`) and fails at once without
//! root.

#[path = "support/nodeport.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kpr::datapath::layout::{CtDir, CtRecord};
use kpr::model::Protocol;
use kpr_testbed::cluster::{client_ip, NODE_PEER_IF};
use kpr_testbed::nodeport_bed::POD_UDP;
use kpr_testbed::server::split_reply;
use kpr_testbed::{Cluster, ClusterPlan, Netns, NodePortBed, NsThread};
use support::*;

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
    let endpoints = pod_endpoints(cluster, Some(2));
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
    let bed = Bed::with_manifest(prefix, &plan, dsr_manifest, &args);
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
    link_packets(ns, dev, "rx")
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
    for n in [1u8, 2] {
        let node = bed.node(n);
        let other = bed.node(3 - n);
        let client_addr = IpAddr::V4(client_ip(n));

        let rx_before = rx_packets(node.ns(), NODE_PEER_IF);
        let seen = tcp_reaches_every_pod(bed, n, |reply| {
            let (backend, source) = seen_source(reply);
            assert_eq!(
                source, client_addr,
                "every backend sees the client: {reply}"
            );
            backend
        });
        let rx_after = rx_packets(node.ns(), NODE_PEER_IF);
        println!(
            "node{n} (dsr): node{n} {NODE_PEER_IF} received {} packets meanwhile",
            rx_after - rx_before
        );
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

        udp_reaches_every_pod_and_keeps_a_flow(bed, n, |reply| {
            if udp_dsr || node_of(seen_source(reply).0) == n {
                let (backend, source) = seen_source(reply);
                assert_eq!(source, client_addr, "{reply}");
                backend
            } else {
                check_source(node, reply)
            }
        });
    }
}

/// Conntrack and counters after [`dsr_spreads_with_the_client_address`]:
/// node1 holds one entry per DSR flow (no reply entry: replies never come
/// back), node2 a local backend's pair per flow it took in.
fn check_dsr_conntrack(bed: &NodePortBed, udp_dsr: bool) {
    let n1 = bed.node(1);
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
    let table = kpr_on(bed, 1, &["ct", "list"]);
    assert!(
        table.contains(&format!("ipip {} -> 10.244.2.", n1.peer_ip()))
            && table.contains("dsr-encap"),
        "{table}"
    );
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

/// [`bulk_upload_through_node1`] with [`start_bulk_sinks`] running for
/// it; the MSS the client learnt.
fn bulk_upload_to_sinks(bed: &NodePortBed) -> u32 {
    let stop = Arc::new(AtomicBool::new(false));
    let sinks = start_bulk_sinks(bed, &stop);
    let mss = bulk_upload_through_node1(bed);
    stop.store(true, Ordering::Relaxed);
    for s in sinks {
        s.join().unwrap();
    }
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
    let line = endpoint_line(gone, 2);
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
    let target = node_port(bed.node(1), NODE_PORT_BULK_UDP);
    let u = udp_connected(bed.cluster.client(), target, 20);
    let seen: BTreeSet<IpAddr> = u.identities.keys().map(|r| seen_source(r).0).collect();
    assert_eq!(seen, BTreeSet::from([IpAddr::V4(kept)]), "{u:?}");
}

/// Everything DSR is checked for, on a dsr bed with `xdp` in front; the
/// bed, for more.
fn dsr_end_to_end(prefix: &str, xdp: Option<&str>) -> NodePortBed {
    let bed = start_dsr_bed(prefix, xdp, "dsr");
    dsr_spreads_with_the_client_address(&bed, true);
    check_dsr_conntrack(&bed, true);
    bulk_upload_to_sinks(&bed);
    oversized_udp_gets_fragmentation_needed(&bed);
    // Through node1's node-to-node address too: node2's backends get the
    // flow encapsulated and answer from that address themselves.
    let client_addr = IpAddr::V4(client_ip(1));
    nodeport_on_another_local_address(&bed, |reply| {
        let (backend, source) = seen_source(reply);
        assert_eq!(
            source, client_addr,
            "every backend sees the client: {reply}"
        );
        backend
    });
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
#[ignore = "needs root"]
fn dsr_nodeport_reaches_backends_on_both_nodes_which_see_the_client_and_answer_it_directly() {
    require_root();
    let bed = dsr_end_to_end("npdsr", None);
    dsr_map_follows_endpoints(&bed);
}

#[test]
#[ignore = "needs root"]
fn dsr_through_generic_xdp_encapsulates_and_decapsulates_in_xdp() {
    require_root();
    dsr_end_to_end("npdsrg", Some("generic"));
}

#[test]
#[ignore = "needs root"]
fn dsr_through_native_xdp_on_veth_encapsulates_and_decapsulates_in_xdp() {
    require_root();
    dsr_end_to_end("npdsrn", Some("native"));
}

#[test]
#[ignore = "needs root"]
fn hybrid_mode_returns_tcp_directly_and_snats_udp() {
    require_root();
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
    let status = status_text(&bed, 1);
    assert!(
        status.contains("NodePort mode:        hybrid (IPIP), XDP acceleration disabled"),
        "{status}"
    );
}

/// Restart safety with DSR: both agents killed and restarted (the
/// backend's node first) under steady load through node1, whose flows go
/// half by DSR to node2. The DSR map, conntrack and the programs behind
/// the pinned links carry every connection over, and long-lived UDP flows
/// keep their backend.
#[test]
#[ignore = "needs root"]
fn dsr_agents_restarted_under_load_fail_no_connection_and_keep_udp_flows() {
    require_root();
    let mut bed = start_dsr_bed("npdsrr", None, "dsr");
    let target = node_port(bed.node(1), NODE_PORT_TCP);
    let first = udp_flows_answers(bed.cluster.client(), bed.node(1), 8, None);

    let mut decap_before = 0;
    let r = under_tcp_load(&mut bed, target, |bed| {
        decap_before = bed.stats(2).unwrap().dsr_decap;
        for n in [2u8, 1] {
            restart_agent(bed, n, true);
        }
    });
    let (answered, failed) = (r.identities.values().sum::<u64>(), r.failures);
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
    let list = kpr_on(&bed, 1, &["svc", "list"]);
    assert!(
        list.lines().any(
            |l| l.contains(&format!("{}:{NODE_PORT_TCP}/TCP", bed.node(1).ext_ip()))
                && l.contains("NodePort (maglev)")
        ),
        "{list}"
    );

    let target = node_port(bed.node(1), NODE_PORT_EMPTY);
    let c = tcp_connect(bed.cluster.client(), target, 5000);
    assert_eq!(c.outcome(), "ECONNREFUSED", "{target}: {c:?}");
}

#[test]
#[ignore = "needs root"]
fn dsr_with_maglev_sends_a_client_to_one_backend_through_either_node_which_sees_the_client() {
    require_root();
    dsr_with_maglev("npdsrm", None);
}

#[test]
#[ignore = "needs root"]
fn dsr_with_maglev_in_generic_xdp_sends_a_client_to_one_backend_through_either_node() {
    require_root();
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
#[ignore = "needs root"]
fn dsr_follows_a_device_that_appears_later_and_its_mtu() {
    require_root();
    let bed = start_dsr_bed_with("npdsrl", None, "dsr", &["--devices", "eth-late"]);
    let mss_before = bulk_upload_to_sinks(&bed);
    assert!(
        mss_before > LATE_MTU - 60,
        "clamped for the bed's MTU only: {mss_before}"
    );
    let clamped_before = bed.stats(2).unwrap().mss_clamped;

    bed.cluster.add_late_link(2, "eth-late", "eth-l2").unwrap();
    // The client keeps reaching node2 through its own link (add_late_link
    // routed node2's address through the new one).
    bed.cluster
        .client()
        .ip(&["route", "del", &format!("{}/32", bed.node(2).ext_ip())])
        .unwrap();
    wait_attached(&bed, 2, "eth-late");
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

    let mss_after = bulk_upload_to_sinks(&bed);
    println!("MSS through node1 to node2's pods: {mss_before} before, {mss_after} after");
    assert!(
        mss_after <= LATE_MTU - 60,
        "clamped for the late device's MTU: {mss_after}"
    );
    assert!(bed.stats(2).unwrap().mss_clamped > clamped_before);
    dsr_spreads_with_the_client_address(&bed, true);
    check_dsr_conntrack(&bed, true);
}
