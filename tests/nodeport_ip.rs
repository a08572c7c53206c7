//! ICMP errors and IP fragments of translated north-south flows, end to
//! end on the multi-node bed (tests/support/nodeport.rs).
//!
//! ICMP errors: a UDP backend with nothing
//! listening answers "port unreachable", which must reach the client as
//! an error about its own packet to the NodePort (ECONNREFUSED at once, not
//! a timeout), for a local backend and for a remote one behind SNAT; and a
//! "fragmentation needed" about a NodePort reply, sent back to the
//! frontend, must reach the backend, which lowers its path MTU (no path
//! MTU black hole).
//!
//! Fragments: a UDP datagram larger than the MTU to a NodePort, and its
//! echo, arrive whole, for a local and for a remote backend.
//!
//! Needs root (namespaces, BPF, tcx, raw sockets): every test is
//! `#[ignore = "needs root"]` (run them with `--include-ignored`) and
//! fails at once without root.

#[path = "support/nodeport.rs"]
mod support;

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kpr_testbed::cluster::client_ip;
use kpr_testbed::nodeport_bed::POD_UDP;
use kpr_testbed::{Cluster, ClusterPlan, NodePortBed};
use support::*;

/// A UDP port nothing in the pods listens on.
const CLOSED_PORT: u16 = 9;
/// NodePorts of the Services below.
const NP_CLOSED_LOCAL: u16 = 30091;
const NP_CLOSED_REMOTE: u16 = 30092;
const NP_ECHO_LOCAL: u16 = 30093;
const NP_ECHO_REMOTE: u16 = 30094;
const NP_BIG_LOCAL: u16 = 30095;
const NP_BIG_REMOTE: u16 = 30096;
/// The port of the test's own echo servers (payload echoed whole).
const ECHO_PORT: u16 = 7000;
/// The path MTU the forged "fragmentation needed" reports.
const REPORTED_MTU: u16 = 1300;

fn udp_service(
    name: &str,
    vip: u8,
    node_port: u16,
    target: u16,
    pod: Ipv4Addr,
    node: u8,
) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: icmp}}
spec:
  type: NodePort
  clusterIP: 10.96.0.{vip}
  ports:
  - {{name: dns, protocol: UDP, port: 53, targetPort: {target}, nodePort: {node_port}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: icmp, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports:
- {{name: dns, protocol: UDP, port: {target}}}
endpoints:
{}---
"#,
        endpoint_line(pod, node)
    )
}

/// Four UDP NodePorts, each with one pod: closed or echoing, on node1 or
/// node2.
fn manifest(cluster: &Cluster) -> String {
    let (pod1, pod2) = (cluster.node(1).pod_ips()[0], cluster.node(2).pod_ips()[0]);
    [
        udp_service("closed-local", 20, NP_CLOSED_LOCAL, CLOSED_PORT, pod1, 1),
        udp_service("closed-remote", 21, NP_CLOSED_REMOTE, CLOSED_PORT, pod2, 2),
        udp_service("echo-local", 22, NP_ECHO_LOCAL, POD_UDP, pod1, 1),
        udp_service("echo-remote", 23, NP_ECHO_REMOTE, POD_UDP, pod2, 2),
        udp_service("big-local", 24, NP_BIG_LOCAL, ECHO_PORT, pod1, 1),
        udp_service("big-remote", 25, NP_BIG_REMOTE, ECHO_PORT, pod2, 2),
    ]
    .concat()
}

fn bed(prefix: &str) -> NodePortBed {
    Bed::with_manifest(prefix, &ClusterPlan::default(), manifest, &[])
}

#[test]
#[ignore = "needs root"]
fn a_closed_udp_backend_port_refuses_the_client_at_once_local_or_remote() {
    require_root();
    let bed = bed("npicmpu");
    let node1 = bed.node(1);
    let before = bed.stats(1).unwrap().icmp_errors;
    for (port, backend) in [
        (NP_CLOSED_LOCAL, "local"),
        (NP_CLOSED_REMOTE, "remote, SNAT"),
    ] {
        let target = node_port(node1, port);
        let outcome = bed
            .cluster
            .client()
            .enter_thread(move || udp_exchange(target, Duration::from_secs(3)))
            .unwrap();
        match outcome {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            other => panic!("{target} ({backend} backend, nothing listening): {other:?}"),
        }
    }
    // The echoing ones answer as ever.
    for port in [NP_ECHO_LOCAL, NP_ECHO_REMOTE] {
        let target = node_port(node1, port);
        let answer = bed
            .cluster
            .client()
            .enter_thread(move || udp_exchange(target, Duration::from_secs(3)))
            .unwrap();
        assert!(answer.is_ok(), "{target}: {answer:?}");
    }
    let translated = bed.stats(1).unwrap().icmp_errors - before;
    assert!(
        translated >= 2,
        "{translated} ICMP errors translated on node1"
    );
}

/// RFC 1071 checksum of `data`.
fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP "fragmentation needed, next-hop MTU `mtu`" about the UDP packet
/// `quoted_src` -> `quoted_dst` (the ICMP message; the kernel adds the
/// outer IP header).
fn frag_needed(quoted_src: SocketAddrV4, quoted_dst: SocketAddrV4, mtu: u16) -> Vec<u8> {
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&(20u16 + 8 + 1200).to_be_bytes());
    ip.extend_from_slice(&quoted_src.ip().octets());
    ip.extend_from_slice(&quoted_dst.ip().octets());
    let check = inet_checksum(&ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    let mut udp = Vec::new();
    udp.extend_from_slice(&quoted_src.port().to_be_bytes());
    udp.extend_from_slice(&quoted_dst.port().to_be_bytes());
    udp.extend_from_slice(&(8u16 + 1200).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend(ip);
    icmp.extend(udp);
    let check = inet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    icmp
}

/// Sends the ICMP message `icmp` to `to` from a raw socket of the calling
/// thread's namespace.
fn send_icmp(to: Ipv4Addr, icmp: &[u8]) -> std::io::Result<()> {
    // SAFETY: socket(2) has no memory preconditions; the fd is owned at once.
    let sock = unsafe {
        let raw = libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        );
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(raw)
    };
    // SAFETY: sockaddr_in is plain data; all-zero then filled is valid.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_addr.s_addr = u32::from_ne_bytes(to.octets());
    // SAFETY: sendto reads icmp.len() bytes of a live buffer and a
    // sockaddr_in of the size given.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            icmp.as_ptr().cast(),
            icmp.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The MTU `ip route get dst` reports in `ns` (a path MTU exception), if any.
fn route_mtu(ns: &kpr_testbed::Netns, dst: Ipv4Addr) -> Option<u16> {
    let out = ns
        .ip_output(&["-4", "route", "get", &dst.to_string()])
        .unwrap();
    let mut words = out.split_whitespace();
    words.find(|w| *w == "mtu")?;
    words.next()?.parse().ok()
}

/// A router on the way to the client reports that a NodePort reply was
/// too big: the error, addressed to the frontend (the reply's source),
/// about frontend -> client, must reach the backend as an error about its
/// own packet, backend -> client (local backend) or backend -> node1's
/// SNAT address (remote backend), so that it lowers its path MTU.
#[test]
#[ignore = "needs root"]
fn fragmentation_needed_for_a_nodeport_reply_reaches_the_backend_local_or_remote() {
    require_root();
    let bed = bed("npicmpf");
    let node1 = bed.node(1);
    let client = client_ip(1);
    let cases = [
        // (NodePort, local client port, backend's namespace, the address its
        // replies go to)
        (NP_ECHO_LOCAL, 47001, node1.pods(), client),
        (NP_ECHO_REMOTE, 47002, bed.node(2).pods(), node1.peer_ip()),
    ];
    for (port, client_port, pods, reply_dst) in cases {
        assert_eq!(route_mtu(pods, reply_dst), None, "no exception before");
        let frontend = SocketAddrV4::new(node1.ext_ip(), port);
        let local = SocketAddrV4::new(client, client_port);
        let before = bed.stats(1).unwrap().icmp_errors;
        let answer = bed
            .cluster
            .client()
            .enter_thread(move || {
                let sock = UdpSocket::bind(local)?;
                sock.connect(frontend)?;
                sock.set_read_timeout(Some(Duration::from_secs(3)))?;
                sock.send(b"hi")?;
                let mut buf = [0u8; 256];
                let n = sock.recv(&mut buf)?;
                // The flow is tracked now: report its reply as too big.
                send_icmp(*frontend.ip(), &frag_needed(frontend, local, REPORTED_MTU))?;
                Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
            })
            .unwrap();
        assert!(answer.is_ok(), "{frontend}: {answer:?}");
        let reached = wait_for(Duration::from_secs(10), || {
            route_mtu(pods, reply_dst) == Some(REPORTED_MTU)
        });
        let out = pods
            .ip_output(&["-4", "route", "get", &reply_dst.to_string()])
            .unwrap();
        assert!(
            reached,
            "NodePort {port}: the backend's route to {reply_dst}: {out}"
        );
        println!(
            "NodePort {port}: backend's route to {reply_dst}: {}",
            out.trim()
        );
        assert!(bed.stats(1).unwrap().icmp_errors > before);
    }
}

/// `Icmp: InDestUnreachs` of the namespace `ns`: destination unreachable
/// errors its own stack received.
fn dest_unreachs_received(ns: &kpr_testbed::Netns) -> u64 {
    let snmp = ns
        .enter_thread(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))
        .unwrap()
        .unwrap();
    let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp:"));
    let (names, values) = (icmp.next().unwrap(), icmp.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "InDestUnreachs")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// An ICMP error about a flow kpr does not track is none of its business:
/// it reaches the node's own stack untouched (not translated, not dropped).
#[test]
#[ignore = "needs root"]
fn an_icmp_error_about_an_untracked_packet_reaches_the_node_itself() {
    require_root();
    let bed = bed("npicmpn");
    let node1 = bed.node(1);
    let before = (
        bed.stats(1).unwrap().icmp_errors,
        dest_unreachs_received(node1.ns()),
    );
    let quoted_src = SocketAddrV4::new(node1.ext_ip(), 30999);
    let quoted_dst = SocketAddrV4::new(client_ip(1), 47003);
    bed.cluster
        .client()
        .enter_thread(move || {
            send_icmp(*quoted_src.ip(), &frag_needed(quoted_src, quoted_dst, 1300))
        })
        .unwrap()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || dest_unreachs_received(
            node1.ns()
        ) > before.1),
        "node1's stack never received the error"
    );
    assert_eq!(bed.stats(1).unwrap().icmp_errors, before.0);
}

/// Echoes every datagram to `addr` back whole, from a thread inside `ns`,
/// until `stop` is set (or 60 s have passed). Returns once the socket is
/// bound, so that no datagram sent after it meets a closed port.
fn echo_server(
    ns: &kpr_testbed::Netns,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> kpr_testbed::NsThread<std::io::Result<u64>> {
    let (bound_tx, bound_rx) = std::sync::mpsc::sync_channel::<()>(1);
    let thread = ns
        .spawn_thread(move || {
            let sock = UdpSocket::bind(addr)?;
            let _ = bound_tx.send(());
            serve_echo(sock, &stop)
        })
        .unwrap();
    bound_rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("the echo server on {addr} did not bind"));
    thread
}

/// The echo loop of [`echo_server`]: the datagrams echoed.
fn serve_echo(sock: UdpSocket, stop: &AtomicBool) -> std::io::Result<u64> {
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = vec![0u8; 65536];
    let mut echoed = 0;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match sock.recv_from(&mut buf) {
            Ok((n, peer)) => {
                sock.send_to(&buf[..n], peer)?;
                echoed += 1;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(echoed)
}

/// A 4000-byte datagram (three fragments at MTU 1500) to a NodePort
/// reaches the backend whole, and its 4000-byte echo reaches the client
/// whole, with the NodePort as its source: for a local backend (the echo
/// leaves through node1's egress) and a remote one behind SNAT (the echo
/// comes back through node1's ingress).
#[test]
#[ignore = "needs root"]
fn a_udp_datagram_larger_than_the_mtu_and_its_echo_cross_a_nodeport_whole() {
    require_root();
    let bed = bed("npfrag");
    let (followed, attempts) = big_datagrams_cross_whole(&bed);
    assert_eq!(attempts, [1, 1], "each datagram crossed the first time");
    // Two later fragments per 4000-byte datagram: each request on the way
    // in, the remote backend's echo on its way back in, the local
    // backend's echo on its way out.
    assert!(
        followed >= 8,
        "{followed} later fragments followed on node1"
    );
}

/// The same in DSR mode. The remote backend's first fragment does not fit
/// the tunnel (20 bytes more than the MTU), may not be refused with
/// "fragmentation needed" (fragments have DF clear) and a tc program
/// cannot fragment it: its flow is SNATed instead of dropped, and the
/// datagram crosses the first time.
#[test]
#[ignore = "needs root"]
fn in_dsr_mode_a_datagram_too_big_for_the_tunnel_opens_a_snat_flow_and_crosses_whole() {
    require_root();
    let plan = ClusterPlan {
        direct_return: true,
        ..ClusterPlan::default()
    };
    let bed = Bed::with_manifest("npfragd", &plan, manifest, &["--nodeport-mode", "dsr"]);
    let before = bed.stats(1).unwrap();
    let (followed, attempts) = big_datagrams_cross_whole(&bed);
    assert_eq!(attempts, [1, 1], "each datagram crossed the first time");
    assert!(
        followed >= 8,
        "{followed} later fragments followed on node1"
    );
    let after = bed.stats(1).unwrap();
    assert_eq!(after.flows_dsr, before.flows_dsr, "no DSR flow: {after:?}");
    assert_eq!(after.flows_snat, before.flows_snat + 1, "{after:?}");
    assert_eq!(after.drop_dsr_too_big, before.drop_dsr_too_big);
    // A small datagram still opens a DSR flow.
    let target = node_port(bed.node(1), NP_BIG_REMOTE);
    let stop = Arc::new(AtomicBool::new(false));
    let pod = bed.node(2).pod_ips()[0];
    let server = echo_server(
        bed.node(2).pods(),
        SocketAddr::new(IpAddr::V4(pod), ECHO_PORT),
        stop.clone(),
    );
    let small = bed
        .cluster
        .client()
        .enter_thread(move || udp_exchange(target, Duration::from_secs(3)))
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    assert_eq!(server.join().unwrap().unwrap(), 1);
    assert_eq!(small.unwrap(), "hi");
    assert_eq!(bed.stats(1).unwrap().flows_dsr, before.flows_dsr + 1);
}

/// Sends a 4000-byte datagram to node1's big-local and big-remote
/// NodePorts, a second time if the first gets no echo in 2 s, and checks
/// each echo. Returns the later fragments node1 followed and the attempts
/// each datagram took.
fn big_datagrams_cross_whole(bed: &NodePortBed) -> (u64, [u32; 2]) {
    let stop = Arc::new(AtomicBool::new(false));
    let servers = [1u8, 2].map(|n| {
        let pod = bed.node(n).pod_ips()[0];
        echo_server(
            bed.node(n).pods(),
            SocketAddr::new(IpAddr::V4(pod), ECHO_PORT),
            stop.clone(),
        )
    });
    let node1 = bed.node(1);
    let before = bed.stats(1).unwrap().fragments_followed;
    let payload: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
    let mut attempts = [0u32; 2];
    for (i, (port, backend)) in [(NP_BIG_LOCAL, "local"), (NP_BIG_REMOTE, "remote")]
        .into_iter()
        .enumerate()
    {
        let target = node_port(node1, port);
        let sent = payload.clone();
        let outcome = bed
            .cluster
            .client()
            .enter_thread(move || {
                let sock = UdpSocket::bind("0.0.0.0:0")?;
                sock.connect(target)?;
                sock.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut buf = vec![0u8; 65536];
                let mut last = None;
                for attempt in 1..=2u32 {
                    sock.send(&sent)?;
                    match sock.recv_from(&mut buf) {
                        Ok((n, from)) => return Ok((buf[..n].to_vec(), from, attempt)),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.expect("two attempts"))
            })
            .unwrap();
        let (echo, from, took) = outcome.unwrap_or_else(|e| {
            panic!(
                "{target} ({backend} backend): {e}\nnode1 {:?}\nnode2 {:?}\nclient: {}",
                bed.stats(1),
                bed.stats(2),
                bed.cluster
                    .client()
                    .ip_output(&["-4", "route", "get", &node1.ext_ip().to_string()])
                    .unwrap_or_default()
            )
        });
        attempts[i] = took;
        assert_eq!(from, target, "{backend}: the echo comes from the NodePort");
        assert!(
            echo == payload,
            "{backend}: {} bytes came back, not the 4000 sent",
            echo.len()
        );
    }
    let followed = bed.stats(1).unwrap().fragments_followed - before;
    println!("node1 followed {followed} later fragments");
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        let echoed = s.join().unwrap().unwrap();
        assert_eq!(echoed, 1, "each backend got its datagram whole once");
    }
    (followed, attempts)
}
