//! North-south over IPv6 end to end, on the dual-stack multi-node bed
//! (every link has an fd00::/8 address next to its IPv4 one; the agents
//! get both node IPs): a dual-stack NodePort Service reached from outside
//! over both families, SNAT to the node's IPv6 address for remote pods and
//! the client kept for local ones, conntrack and `kpr ct list` for IPv6
//! flows, externalTrafficPolicy Local, the no-backend reject (ICMPv6), and
//! the same through XDP (generic and native).
//!
//! Needs root: every test is `#[ignore = "needs root"]`.

#[path = "support/nodeport.rs"]
mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use kpr::datapath::layout::CtDir;
use kpr::model::Protocol;
use kpr_testbed::cluster::{client_ip, client_ip6};
use kpr_testbed::nodeport_bed::{POD_TCP, POD_UDP};
use kpr_testbed::server::split_reply;
use kpr_testbed::{Cluster, ClusterNode, ClusterPlan, NodePortBed};
use support::*;

/// NodePorts of `dual` (a dual-stack Service, every pod of both nodes).
const DUAL_TCP: u16 = 30680;
const DUAL_UDP: u16 = 30653;
/// NodePort of `local6` (IPv6 only, externalTrafficPolicy Local, pods of
/// both nodes).
const LOCAL6_TCP: u16 = 30681;
/// NodePort of `empty6` (IPv6 only, no endpoints).
const EMPTY6_TCP: u16 = 30683;
/// The externalIP of `dual`'s IPv6 family, routed by the client to node1.
const EXTERNAL_IP6: &str = "fd00:0:ee::10";

/// The bed's Services: `dual` (both families, every pod), `local6` and
/// `empty6` (IPv6 only).
fn manifest(cluster: &Cluster) -> String {
    let endpoints = |v6: bool| -> String {
        cluster
            .nodes()
            .iter()
            .flat_map(|node| {
                let ips: Vec<IpAddr> = if v6 {
                    node.pod_ips6().into_iter().map(IpAddr::V6).collect()
                } else {
                    node.pod_ips().iter().map(|ip| IpAddr::V4(*ip)).collect()
                };
                ips.into_iter()
                    .map(move |ip| endpoint_line(ip, node.index()))
            })
            .collect()
    };
    let slice = |svc: &str, name: &str, family: &str, endpoints: &str| {
        format!(
            r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}, namespace: t, labels: {{kubernetes.io/service-name: {svc}}}}}
addressType: {family}
ports:
- {{name: http, protocol: TCP, port: {POD_TCP}}}
- {{name: dns, protocol: UDP, port: {POD_UDP}}}
endpoints:
{endpoints}"#
        )
    };
    let (v4, v6) = (endpoints(false), endpoints(true));
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: dual, namespace: t}}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, "fd00:96::20"]
  externalIPs: ["{EXTERNAL_IP6}"]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: {POD_TCP}, nodePort: {DUAL_TCP}}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: {POD_UDP}, nodePort: {DUAL_UDP}}}
{dual4}{dual6}---
apiVersion: v1
kind: Service
metadata: {{name: local6, namespace: t}}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  ipFamilies: [IPv6]
  clusterIP: "fd00:96::21"
  clusterIPs: ["fd00:96::21"]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: {POD_TCP}, nodePort: {LOCAL6_TCP}}}
{local6}---
apiVersion: v1
kind: Service
metadata: {{name: empty6, namespace: t}}
spec:
  type: NodePort
  ipFamilies: [IPv6]
  clusterIP: "fd00:96::22"
  clusterIPs: ["fd00:96::22"]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: {POD_TCP}, nodePort: {EMPTY6_TCP}}}
"#,
        dual4 = slice("dual", "dual-4", "IPv4", &v4),
        dual6 = slice("dual", "dual-6", "IPv6", &v6),
        local6 = slice("local6", "local6-6", "IPv6", &v6),
    )
}

fn dual_stack_plan(xdp_ready: bool) -> ClusterPlan {
    ClusterPlan {
        xdp_ready,
        dual_stack: true,
        ..ClusterPlan::default()
    }
}

fn node_port6(node: &ClusterNode, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(node.ext_ip6()), port)
}

/// Which node an IPv6 pod address (fd00:0:244:N::..) is behind.
fn node_of6(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V6(v6) => u8::try_from(v6.segments()[3]).unwrap_or(0),
        IpAddr::V4(_) => node_of(ip),
    }
}

/// Checks one reply of a backend reached over IPv6 through `node`: a
/// local backend saw the client itself, a remote one one of `node`'s IPv6
/// addresses. Returns the backend's pod address.
#[track_caller]
fn check_source6(node: &ClusterNode, reply: &str) -> IpAddr {
    let (identity, seen) = split_reply(reply);
    let backend: SocketAddr = identity.parse().expect("identity is ip:port");
    let seen = seen.expect("the server reports its peer");
    assert!(
        backend.is_ipv6(),
        "an IPv6 frontend reaches IPv6 pods: {reply}"
    );
    if node_of6(backend.ip()) == node.index() {
        assert_eq!(
            seen,
            IpAddr::V6(client_ip6(node.index())),
            "a local backend sees the client: {reply}"
        );
    } else {
        let ours: Vec<IpAddr> = node.addresses6().into_iter().map(IpAddr::V6).collect();
        assert!(
            ours.contains(&seen),
            "a remote backend sees node{}'s IPv6 address, not {seen}: {reply}",
            node.index()
        );
    }
    backend.ip()
}

fn all_pods6(bed: &NodePortBed) -> BTreeSet<IpAddr> {
    bed.cluster
        .nodes()
        .iter()
        .flat_map(|n| n.pod_ips6().into_iter().map(IpAddr::V6))
        .collect()
}

/// TCP (60 connections) and UDP (60 flows) to `target` reach every IPv6
/// pod of both nodes, each reply checked by [`check_source6`].
#[track_caller]
fn v6_reaches_every_pod(bed: &NodePortBed, n: u8, tcp: SocketAddr, udp: SocketAddr) {
    let node = bed.node(n);
    let client = bed.cluster.client();
    let r = tcp_requests(client, tcp, 60);
    let seen = tally(&r.identities, |reply| check_source6(node, reply));
    println!("node{n} TCP {tcp}: {seen:?}");
    assert_eq!(
        pods(&seen),
        all_pods6(bed),
        "TCP via {tcp}\n{}",
        bed.diagnostics()
    );
    let u = udp_connected(client, udp, 60);
    let seen = tally(&u.identities, |reply| check_source6(node, reply));
    println!("node{n} UDP {udp}: {seen:?}");
    assert_eq!(
        pods(&seen),
        all_pods6(bed),
        "UDP via {udp}\n{}",
        bed.diagnostics()
    );
    let u = udp_unconnected(client, udp, 10);
    assert_eq!(u.identities.len(), 1, "one flow, one backend: {u:?}");
}

/// The checks every attach mode must pass: both families of `dual` from
/// outside through both nodes, conntrack and `kpr ct list` for IPv6
/// flows, ETP Local, the no-backend reject.
fn serves_ipv6_north_south(bed: &NodePortBed) {
    for n in [1u8, 2] {
        let node = bed.node(n);
        v6_reaches_every_pod(
            bed,
            n,
            node_port6(node, DUAL_TCP),
            node_port6(node, DUAL_UDP),
        );
        // The same Service over IPv4, in the same run: IPv4 pods (60
        // random picks miss one of 4 pods once in 10^7 runs).
        let r = tcp_requests(
            bed.cluster.client(),
            SocketAddr::new(IpAddr::V4(node.ext_ip()), DUAL_TCP),
            60,
        );
        let seen = tally(&r.identities, |reply| check_source(node, reply));
        assert!(
            seen.keys().all(IpAddr::is_ipv4) && seen.len() == 4,
            "IPv4 to the dual-stack Service reaches the IPv4 pods: {seen:?}"
        );
    }

    // Conntrack: node1's IPv6 flows, pairs, SNATed to node1's IPv6
    // address toward node2 exactly when the backend is there.
    let entries = bed.ct(1).unwrap();
    let frontend = IpAddr::V6(bed.node(1).ext_ip6());
    let orig: Vec<_> = entries
        .iter()
        .filter(|e| e.dir == CtDir::Orig && e.dst.ip() == frontend)
        .collect();
    assert!(orig.len() >= 60, "{} IPv6 orig entries", orig.len());
    for e in &orig {
        let remote = node_of6(e.nat_dst.ip()) == 2;
        assert_eq!(e.snat, remote, "{e:?}");
        if remote {
            assert_eq!(e.nat_src.ip(), IpAddr::V6(bed.node(1).peer_ip6()), "{e:?}");
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
    let table = kpr_on(bed, 1, &["ct", "list"]);
    assert!(
        table.contains(&format!("[{}]:{DUAL_TCP}", bed.node(1).ext_ip6())),
        "{table}"
    );

    // externalIP over IPv6, routed to node1 by the client.
    bed.cluster
        .client()
        .ip(&[
            "-6",
            "route",
            "replace",
            EXTERNAL_IP6,
            "via",
            &bed.node(1).ext_ip6().to_string(),
        ])
        .unwrap();
    let ext: IpAddr = EXTERNAL_IP6.parse().unwrap();
    v6_reaches_every_pod(bed, 1, SocketAddr::new(ext, 80), SocketAddr::new(ext, 53));

    // ETP Local: node1's own pods only, the client address kept.
    let r = tcp_requests(
        bed.cluster.client(),
        node_port6(bed.node(1), LOCAL6_TCP),
        30,
    );
    let seen = tally(&r.identities, |reply| {
        let pod = check_source6(bed.node(1), reply);
        assert_eq!(node_of6(pod), 1, "Local policy: node1's pods only: {reply}");
        pod
    });
    assert_eq!(seen.len(), 2, "{seen:?}");

    // No endpoint: refused at once (ICMPv6 port unreachable).
    let before = bed.stats(1).unwrap().reject_no_backend;
    let c = tcp_connect(
        bed.cluster.client(),
        node_port6(bed.node(1), EMPTY6_TCP),
        3000,
    );
    assert_eq!(c.outcome(), "ECONNREFUSED", "{c:?}");
    assert!(bed.stats(1).unwrap().reject_no_backend > before);

    let stats = bed.stats(1).unwrap();
    println!("node1 counters: {stats:?}");
    assert_eq!((stats.drop_fib, stats.drop_ct), (0, 0), "{stats:?}");
    // The IPv4 client addresses are untouched by all this.
    assert_eq!(client_ip(1).to_string(), "192.0.2.9");
}

#[test]
#[ignore = "needs root"]
fn ipv6_nodeport_external_ip_and_local_policy_are_served_on_tc_and_a_dual_stack_service_answers_both_families(
) {
    require_root();
    let bed = Bed::with_manifest("np6tc", &dual_stack_plan(false), manifest, &[]);
    serves_ipv6_north_south(&bed);
}

#[test]
#[ignore = "needs root"]
fn an_agent_restart_under_ipv6_load_fails_no_connection() {
    require_root();
    let mut bed = Bed::with_manifest("np6rs", &dual_stack_plan(false), manifest, &[]);
    let target = node_port6(bed.node(1), DUAL_TCP);
    let r = under_tcp_load(&mut bed, target, |bed| {
        for crash in [true, false] {
            restart_agent(bed, 1, crash);
        }
    });
    let answered: u64 = r.identities.values().sum();
    println!("{answered} requests answered across two restarts: {r:?}");
    assert!(answered >= 100, "{answered}");
    assert!(
        r.failures.is_empty(),
        "{:?}\n{}",
        r.failures,
        bed.diagnostics()
    );
    let seen = tally(&r.identities, |reply| check_source6(bed.node(1), reply));
    assert_eq!(pods(&seen), all_pods6(&bed), "{seen:?}");
}

/// DSR has no IPv6 carrier yet: in `dsr` mode IPv6 flows to remote pods
/// are SNATed (the backend sees the node) and served.
#[test]
#[ignore = "needs root"]
fn in_dsr_mode_ipv6_flows_to_remote_backends_are_snated() {
    require_root();
    let plan = ClusterPlan {
        direct_return: true,
        ..dual_stack_plan(false)
    };
    let bed = Bed::with_manifest("np6ds", &plan, manifest, &["--nodeport-mode", "dsr"]);
    v6_reaches_every_pod(
        &bed,
        1,
        node_port6(bed.node(1), DUAL_TCP),
        node_port6(bed.node(1), DUAL_UDP),
    );
    let stats = bed.stats(1).unwrap();
    assert!(stats.flows_snat > 0 && stats.flows_dsr == 0, "{stats:?}");
}

/// The same through XDP in `mode`: XDP must have forwarded IPv6 packets
/// itself.
fn through_xdp(prefix: &str, mode: &str) {
    let bed = Bed::with_manifest(
        prefix,
        &dual_stack_plan(true),
        manifest,
        &["--nodeport-acceleration", mode],
    );
    let before = bed.stats(1).unwrap().xdp_fwd;
    v6_reaches_every_pod(
        &bed,
        1,
        node_port6(bed.node(1), DUAL_TCP),
        node_port6(bed.node(1), DUAL_UDP),
    );
    let stats = bed.stats(1).unwrap();
    println!("node1 XDP {mode}: {stats:?}");
    assert!(stats.xdp_fwd > before, "{stats:?}");
    serves_ipv6_north_south(&bed);
}

#[test]
#[ignore = "needs root"]
fn ipv6_nodeport_is_served_through_generic_xdp() {
    require_root();
    through_xdp("np6xg", "generic");
}

#[test]
#[ignore = "needs root"]
fn ipv6_nodeport_is_served_through_native_xdp() {
    require_root();
    through_xdp("np6xn", "native");
}
