//! The north-south test bed as the `nodeport*` tests use it: the
//! manifest of Services every bed starts with, the bed itself, and the
//! probes and checks the tests share (requests through a node, where
//! replies come from, what a backend saw).
//!
//! # Including it
//!
//! ```ignore
//! #[path = "support/nodeport.rs"]
//! mod support;
//! use support::*;
//! ```
//!
//! Needs root (namespaces, BPF, tc): every test is
//! `#[ignore = "needs root"]` and starts with [`require_root`].

#![allow(dead_code)] // each test crate uses its own part

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kpr::datapath::nodeport::AttachedDevice;
use kpr_testbed::cluster::client_ip;
use kpr_testbed::nodeport_bed::{nodeport_manifest, POD_TCP};
use kpr_testbed::probe::{ConnectReport, RequestsReport, UdpReport};
use kpr_testbed::server::split_reply;
use kpr_testbed::{
    Cluster, ClusterNode, ClusterPlan, Netns, NodePortBed, NsThread, ProbeResult, ProbeSpec,
};

pub use kpr_testbed::require_root;

/// The kpr binary under test.
pub const KPR: &str = env!("CARGO_BIN_EXE_kpr");
/// NodePort of `web`, TCP (every pod of both nodes behind it).
pub const NODE_PORT_TCP: u16 = 30080;
/// NodePort of `web`, UDP.
pub const NODE_PORT_UDP: u16 = 30053;

/// NodePort of `web-local` (externalTrafficPolicy Local, pods on both nodes).
pub const NODE_PORT_LOCAL: u16 = 30081;
/// NodePort of `one-local` (externalTrafficPolicy Local, pods on node1 only).
pub const NODE_PORT_ONE_LOCAL: u16 = 30082;
/// NodePort of `empty` (no endpoints), TCP.
pub const NODE_PORT_EMPTY: u16 = 30083;
/// NodePort of `empty`, UDP.
pub const NODE_PORT_EMPTY_UDP: u16 = 30085;
/// NodePort of `guarded` (LoadBalancer with loadBalancerSourceRanges).
pub const NODE_PORT_GUARDED: u16 = 30084;
/// The load balancer ingress IP of `guarded` (routed to node1).
pub const GUARDED_LB_IP: &str = "203.0.113.10";
/// The one client address `guarded` admits: the client's address on its
/// link to node1 (192.0.2.9).
pub const GUARDED_RANGE: &str = "192.0.2.9/32";
/// A second client address on the same link, outside the range.
pub const OUTSIDER: &str = "192.0.2.10";

/// The NodePort Service `web` (TCP and UDP) with every pod of both nodes as
/// endpoints, plus the Local-policy, endpoint-less and source-range
/// guarded Services above.
pub fn manifest(cluster: &Cluster) -> String {
    let (web, others) = manifest_parts(cluster);
    web + &others
}

/// [`manifest`] as `web` and the other Services.
pub fn manifest_parts(cluster: &Cluster) -> (String, String) {
    let endpoints = pod_endpoints(cluster, None);
    let node1_endpoints = pod_endpoints(cluster, Some(1));
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

/// One item of an EndpointSlice's `endpoints:`: pod `ip` on node `n`.
pub fn endpoint_line(ip: impl std::fmt::Display, n: u8) -> String {
    format!("- {{addresses: [{ip}], nodeName: node{n}}}\n")
}

/// The `endpoints:` items of every pod of node `only`, or of both nodes.
pub fn pod_endpoints(cluster: &Cluster, only: Option<u8>) -> String {
    cluster
        .nodes()
        .iter()
        .filter(|node| only.is_none_or(|n| n == node.index()))
        .flat_map(|node| {
            node.pod_ips()
                .iter()
                .map(|ip| endpoint_line(ip, node.index()))
        })
        .collect()
}

/// The bed, started with [`manifest`] unless said otherwise; `extra_args`
/// go to every agent.
pub struct Bed;

impl Bed {
    /// The default plan and [`manifest`].
    pub fn start(prefix: &str, extra_args: &[&str]) -> NodePortBed {
        Bed::start_with(prefix, &ClusterPlan::default(), extra_args)
    }

    /// `plan` and [`manifest`].
    pub fn start_with(prefix: &str, plan: &ClusterPlan, extra_args: &[&str]) -> NodePortBed {
        Bed::with_manifest(prefix, plan, manifest, extra_args)
    }

    /// `plan` and the Services and slices `manifest` writes.
    pub fn with_manifest(
        prefix: &str,
        plan: &ClusterPlan,
        manifest: impl Fn(&Cluster) -> String,
        extra_args: &[&str],
    ) -> NodePortBed {
        NodePortBed::start(prefix, Path::new(KPR), plan, manifest, extra_args)
            .expect("the NodePort bed starts")
    }
}

/// Runs `spec` inside `ns`; its result.
#[track_caller]
pub fn run_in(ns: &Netns, spec: ProbeSpec) -> ProbeResult {
    ns.enter_thread(|| spec.run())
        .expect("probe thread ran")
        .expect("probe spec ran")
}

/// `node`'s external address with `port`.
pub fn node_port(node: &ClusterNode, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(node.ext_ip()), port)
}

/// Which node a pod address is behind.
pub fn node_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(v4) => v4.octets()[2],
        IpAddr::V6(_) => 0,
    }
}

/// Checks one reply of a backend reached through `node`: the backend must
/// have seen the client itself when it is local to `node`, else one of
/// `node`'s addresses (SNAT). Returns the backend's pod address.
#[track_caller]
pub fn check_source(node: &ClusterNode, reply: &str) -> IpAddr {
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

/// The pods of both nodes.
pub fn all_pods(bed: &NodePortBed) -> BTreeSet<IpAddr> {
    bed.cluster
        .nodes()
        .iter()
        .flat_map(|n| n.pod_ips().iter().map(|ip| IpAddr::V4(*ip)))
        .collect()
}

/// Opens `flows` UDP sockets in the client namespace on fixed ports (or the
/// ports of `previous`), one exchange each with node's UDP NodePort;
/// returns client port -> backend that answered.
pub fn udp_flows_answers(
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

/// A TCP request from `local` (a fixed source port, SO_REUSEADDR so a
/// TIME_WAIT socket of the previous use does not block the bind) to
/// `target`; the reply line.
pub fn request_from(local: SocketAddr, target: SocketAddr) -> std::io::Result<String> {
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

/// Polls `ready` every 200 ms for at most `limit`; whether it became true.
pub fn wait_for(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
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

/// A second address of the client, on its loopback, that both nodes route
/// back to it: one client (address and port) whichever node it enters, as
/// behind ECMP or a DNS round robin over node addresses.
pub const SHARED_CLIENT: std::net::Ipv4Addr = std::net::Ipv4Addr::new(203, 0, 113, 9);

/// Adds [`SHARED_CLIENT`] to the client and routes it back from both
/// nodes.
pub fn add_shared_client_address(bed: &NodePortBed) {
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
                kpr_testbed::cluster::NODE_CLIENT_IF,
            ])
            .unwrap();
    }
}

/// For every source port in `ports`: the pod that answered a TCP request
/// from [`SHARED_CLIENT`]:port to node1's and to node2's `node_port`.
pub fn backends_by_port(
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
pub fn answers_by_port(
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
pub fn disagreeing(by_port: &BTreeMap<u16, [IpAddr; 2]>) -> Vec<(u16, [IpAddr; 2])> {
    by_port
        .iter()
        .filter(|(_, [a, b])| a != b)
        .map(|(p, pods)| (*p, *pods))
        .collect()
}

/// Pod -> requests it answered, each distinct reply of `identities`
/// checked by `check`, which names the pod that sent it.
#[track_caller]
pub fn tally(
    identities: &BTreeMap<String, u64>,
    mut check: impl FnMut(&str) -> IpAddr,
) -> BTreeMap<IpAddr, u64> {
    let mut seen: BTreeMap<IpAddr, u64> = BTreeMap::new();
    for (reply, count) in identities {
        *seen.entry(check(reply)).or_default() += count;
    }
    seen
}

/// The pods of a [`tally`].
pub fn pods(seen: &BTreeMap<IpAddr, u64>) -> BTreeSet<IpAddr> {
    seen.keys().copied().collect()
}

/// `count` TCP requests (a connection each) from `client` to `target`,
/// every one answered.
#[track_caller]
/// One datagram ("hi") over a connected UDP socket to `target` and its
/// answer; an ICMP error about it (port unreachable) fails the receive with
/// ECONNREFUSED. Call it inside the client's namespace.
pub fn udp_exchange(target: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.connect(target)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send(b"hi")?;
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The packets interface `dev` of `ns` counted in direction `dir` ("rx"
/// or "tx").
pub fn link_packets(ns: &Netns, dev: &str, dir: &str) -> u64 {
    let out = ns
        .ip_output(&["-s", "-j", "link", "show", "dev", dev])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["stats64"][dir]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no {dir} counter in {out}"))
}

/// The ifindex of interface `dev` of `ns`.
pub fn link_index(ns: &Netns, dev: &str) -> u32 {
    let out = ns.ip_output(&["-j", "link", "show", "dev", dev]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["ifindex"]
        .as_u64()
        .unwrap_or_else(|| panic!("no ifindex in {out}")) as u32
}

pub fn tcp_requests(client: &Netns, target: SocketAddr, count: u32) -> RequestsReport {
    let r = run_in(
        client,
        ProbeSpec::TcpRequests {
            target,
            count,
            timeout_ms: 2000,
        },
    );
    let r = r.as_requests().expect("a requests report").clone();
    assert!(r.failures.is_empty(), "{target}: {r:?}");
    r
}

/// `count` UDP exchanges from `client` to `target`, a new connected socket
/// (flow) each, every one answered.
#[track_caller]
pub fn udp_connected(client: &Netns, target: SocketAddr, count: u32) -> UdpReport {
    let r = run_in(
        client,
        ProbeSpec::UdpConnected {
            target,
            count,
            timeout_ms: 2000,
        },
    );
    let u = r.as_udp().expect("a UDP report").clone();
    assert!(u.failures.is_empty(), "{target}: {u:?}");
    u
}

/// `count` exchanges over one unconnected UDP socket (one flow) from
/// `client` to `target`: every one answered, every reply from `target`.
#[track_caller]
pub fn udp_unconnected(client: &Netns, target: SocketAddr, count: u32) -> UdpReport {
    let r = run_in(
        client,
        ProbeSpec::UdpUnconnected {
            target,
            count,
            timeout_ms: 2000,
        },
    );
    let u = r.as_udp().expect("a UDP report").clone();
    assert!(u.failures.is_empty(), "{u:?}");
    assert_eq!(
        u.reply_sources.iter().collect::<Vec<_>>(),
        [&target.to_string()]
    );
    u
}

/// One TCP connect from `client` to `target`, given up after `timeout_ms`.
#[track_caller]
pub fn tcp_connect(client: &Netns, target: SocketAddr, timeout_ms: u64) -> ConnectReport {
    let r = run_in(client, ProbeSpec::TcpConnectError { target, timeout_ms });
    r.as_connect().expect("a connect report").clone()
}

/// `kpr <args> --bpf-root <node n's>` inside node `n`'s namespace, as on
/// the node itself (classic tc filters are found by device name there):
/// its output.
#[track_caller]
pub fn kpr_on(bed: &NodePortBed, n: u8, args: &[&str]) -> String {
    let root = bed.bpf_root(n);
    let mut args = args.to_vec();
    args.extend(["--bpf-root", root.to_str().unwrap()]);
    bed.node(n)
        .ns()
        .enter_thread(|| bed.kpr(&args))
        .unwrap()
        .unwrap()
}

/// Node `n`'s north-south attachments (tcx links or classic tc filters).
#[track_caller]
pub fn attachments(bed: &NodePortBed, n: u8) -> Vec<AttachedDevice> {
    bed.attached_devices(n).unwrap()
}

/// How many tc attachments of `device` node `n` has.
#[track_caller]
pub fn attached_links(bed: &NodePortBed, n: u8, device: &str) -> usize {
    attachments(bed, n)
        .iter()
        .filter(|d| d.device == device && d.ifindex.is_some())
        .count()
}

/// `tc <args>` inside node `n`'s namespace, as an admin runs it there: its
/// output (it must succeed).
#[track_caller]
pub fn tc(bed: &NodePortBed, n: u8, args: &[&str]) -> String {
    let out = bed
        .node(n)
        .ns()
        .enter_thread(|| std::process::Command::new("tc").args(args).output())
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "tc {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The classic tc filters of `dev` in direction `dir` (`ingress` or
/// `egress`) on node `n`, as `tc filter show` lists them.
#[track_caller]
pub fn tc_filters(bed: &NodePortBed, n: u8, dev: &str, dir: &str) -> String {
    tc(bed, n, &["filter", "show", "dev", dev, dir])
}

/// Steady TCP load from `client` to `target` in batches of 20 requests (at
/// least 5 batches, at most 1000) until `stop` is set; what it met.
pub fn spawn_tcp_load(
    client: &Netns,
    target: SocketAddr,
    stop: &Arc<AtomicBool>,
) -> NsThread<RequestsReport> {
    let stop = stop.clone();
    client
        .spawn_thread(move || {
            let mut total = RequestsReport::default();
            let mut batches = 0;
            while batches < 1000 && (!stop.load(Ordering::Relaxed) || batches < 5) {
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
        .unwrap()
}

/// 60 TCP connections from the client through node `n`'s TCP NodePort
/// reach every pod of both nodes; `check` checks each reply and names the
/// pod that sent it. Pod -> requests it answered.
#[track_caller]
pub fn tcp_reaches_every_pod(
    bed: &NodePortBed,
    n: u8,
    check: impl FnMut(&str) -> IpAddr,
) -> BTreeMap<IpAddr, u64> {
    let target = node_port(bed.node(n), NODE_PORT_TCP);
    let r = tcp_requests(bed.cluster.client(), target, 60);
    let seen = tally(&r.identities, check);
    println!("node{n} TCP {target}: {seen:?}");
    assert_eq!(
        pods(&seen),
        all_pods(bed),
        "TCP through node{n} reaches every pod on both nodes"
    );
    seen
}

/// UDP through node `n`'s UDP NodePort: 60 flows (a new socket each)
/// reach every pod of both nodes, `check` checking each reply and naming
/// its pod as in [`tcp_reaches_every_pod`]; one unconnected socket is one
/// flow, kept on one backend, and answered from the NodePort address (a
/// connected socket accepts nothing else).
#[track_caller]
pub fn udp_reaches_every_pod_and_keeps_a_flow(
    bed: &NodePortBed,
    n: u8,
    check: impl FnMut(&str) -> IpAddr,
) {
    let client = bed.cluster.client();
    let target = node_port(bed.node(n), NODE_PORT_UDP);
    let u = udp_connected(client, target, 60);
    let seen = tally(&u.identities, check);
    println!("node{n} UDP {target}: {seen:?}");
    assert_eq!(pods(&seen), all_pods(bed));

    let u = udp_unconnected(client, target, 20);
    assert_eq!(u.identities.len(), 1, "one flow, one backend: {u:?}");
}

/// Waits (at most 30 s) until node `n`'s agent has attached both tc
/// programs of `device`.
#[track_caller]
pub fn wait_attached(bed: &NodePortBed, n: u8, device: &str) {
    assert!(
        wait_for(Duration::from_secs(30), || attached_links(bed, n, device)
            == 2),
        "{device} not attached: {:?}\n{}",
        attachments(bed, n),
        bed.agents[usize::from(n - 1)].log()
    );
}

/// Node `n`'s agent killed (`crash`) or stopped, and started again on the
/// same pins; returns once it is healthy.
#[track_caller]
pub fn restart_agent(bed: &mut NodePortBed, n: u8, crash: bool) {
    let agent = bed.agent(n);
    if crash {
        agent.kill().unwrap();
    } else {
        agent.stop().unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    agent.restart().unwrap();
    agent.wait_healthy(Duration::from_secs(30)).unwrap();
}

/// [`spawn_tcp_load`] to `target` from 200 ms before `meanwhile` until
/// 200 ms after it; what the load met.
pub fn under_tcp_load(
    bed: &mut NodePortBed,
    target: SocketAddr,
    meanwhile: impl FnOnce(&mut NodePortBed),
) -> RequestsReport {
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_tcp_load(bed.cluster.client(), target, &stop);
    std::thread::sleep(Duration::from_millis(200));
    meanwhile(bed);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap()
}

/// `kpr status` as text, run inside node `n`'s namespace (where its
/// agent's /status is). It must reach the agent: exit 0 (no problem) or 1
/// (problems the agent reports, such as a device it waits for), not 2.
pub fn status_text(bed: &NodePortBed, n: u8) -> String {
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
    assert!(matches!(out.status.code(), Some(0 | 1)), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// NodePorts on node1's node-to-node address (198.51.100.1, not a node IP
/// kpr knows; the client routes it through node1's client link): `web`'s
/// TCP and UDP ports spread over the pods of both nodes as on the node IP,
/// `check` checking each reply as in [`tcp_reaches_every_pod`]; one UDP
/// flow answered from that address; a Local-policy NodePort there keeps
/// to node1's pods; and a port that is no NodePort is left to the node,
/// which refuses it.
#[track_caller]
pub fn nodeport_on_another_local_address(bed: &NodePortBed, mut check: impl FnMut(&str) -> IpAddr) {
    let client = bed.cluster.client();
    let node1 = bed.node(1);
    let addr = IpAddr::V4(node1.peer_ip());

    let target = SocketAddr::new(addr, NODE_PORT_TCP);
    let r = tcp_requests(client, target, 60);
    let seen = tally(&r.identities, &mut check);
    println!("TCP {target}: {seen:?}");
    assert_eq!(pods(&seen), all_pods(bed), "TCP through {target}");

    let target = SocketAddr::new(addr, NODE_PORT_UDP);
    let u = run_in(
        client,
        ProbeSpec::UdpConnected {
            target,
            count: 60,
            timeout_ms: 2000,
        },
    );
    let u = u.as_udp().expect("a UDP report").clone();
    assert!(
        u.failures.is_empty(),
        "{target}: {u:?}\n{}",
        bed.diagnostics()
    );
    let seen = tally(&u.identities, &mut check);
    println!("UDP {target}: {seen:?}");
    assert_eq!(pods(&seen), all_pods(bed), "UDP through {target}");
    // Replies come from the address the client used.
    let u = udp_unconnected(client, target, 10);
    assert_eq!(u.identities.len(), 1, "one flow, one backend: {u:?}");

    let target = SocketAddr::new(addr, NODE_PORT_ONE_LOCAL);
    let r = tcp_requests(client, target, 20);
    let seen = tally(&r.identities, &mut check);
    assert!(
        seen.keys().all(|ip| node_of(*ip) == 1),
        "externalTrafficPolicy Local through {target}: {seen:?}"
    );

    let target = SocketAddr::new(addr, 30999);
    let c = tcp_connect(client, target, 3000);
    assert_eq!(
        c.outcome(),
        "ECONNREFUSED",
        "{target} is no NodePort: {c:?}"
    );
}
