//! North-south datapath end to end on a multi-node network: an external
//! client, two nodes each running its own kpr agent (own bpf root, own
//! devices, inside the node's namespace), pods behind each node, and a
//! NodePort Service whose endpoints are on both nodes. This file: SNAT,
//! conntrack, restarts, XDP, LoadBalancer and external IPs, devices that
//! come later. DSR, Maglev and the policies (traffic policy, source
//! ranges, no-backend response, bind protection) have their own
//! `nodeport_*.rs`; the bed is tests/support/nodeport.rs.
//!
//! Needs root (namespaces, BPF, tc): every test is `#[ignore = "needs
//! root"]` (run them with `--include-ignored`) and fails at once without
//! root.

#[path = "support/nodeport.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use kpr::datapath::layout::{CtDir, CtRecord};
use kpr::datapath::{host_addrs, peer_devices};
use kpr::model::Protocol;
use kpr_testbed::cluster::{client_ip, NODE_CLIENT_IF, NODE_PEER_IF, NODE_PODS_IF};
use kpr_testbed::nodeport_bed::{nodeport_manifest, POD_TCP};
use kpr_testbed::server::split_reply;
use kpr_testbed::{Cluster, ClusterPlan, NodePortBed, ProbeSpec};
use support::*;

#[test]
#[ignore = "needs root"]
fn nodeport_on_both_nodes_spreads_over_backends_on_both_nodes_with_snat_for_remote_ones() {
    require_root();
    let bed = Bed::start("npsp", &[]);
    spreads_with_snat_for_remote_backends(&bed);
    check_conntrack_and_tools(&bed);
}

/// TCP and UDP to both nodes' NodePorts reach every pod of both nodes; a
/// local pod sees the client, a remote one the node; one UDP socket is one
/// flow on one backend, answered from the NodePort address.
fn spreads_with_snat_for_remote_backends(bed: &NodePortBed) {
    for n in [1u8, 2] {
        let node = bed.node(n);
        // Every connection and every UDP socket a new flow, spread over
        // all four pods.
        tcp_reaches_every_pod(bed, n, |reply| check_source(node, reply));
        udp_reaches_every_pod_and_keeps_a_flow(bed, n, |reply| check_source(node, reply));
    }
}

/// A NodePort is served on every local address of the node, not only on
/// the node IPs: node1's node-to-node address, which the client routes
/// through node1, spreads over the pods of both nodes and answers from
/// that address; a port that is no NodePort stays the node's own. The
/// same holds for the node's own clients (socket path), also on an
/// address added while the agent runs.
#[test]
#[ignore = "needs root"]
fn nodeport_is_served_on_another_local_address_of_the_node() {
    require_root();
    let bed = Bed::start("npwc", &[]);
    nodeport_on_another_local_address(&bed, |reply| check_source(bed.node(1), reply));
    // Conntrack keeps the address the client used as the frontend.
    let peer = IpAddr::V4(bed.node(1).peer_ip());
    let entries = bed.ct(1).unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e.dir == CtDir::Orig && e.dst.ip() == peer),
        "{entries:?}"
    );

    // Node-local clients, through the socket hooks (which learn the node's
    // addresses from the host address map, not from a FIB lookup).
    let node1 = bed.node(1);
    let local = |spec: ProbeSpec| bed.probe_in_cgroup(1, node1.ns(), &spec).unwrap();
    let requests = |target: SocketAddr, count: u32, timeout_ms: u64| {
        local(ProbeSpec::TcpRequests {
            target,
            count,
            timeout_ms,
        })
        .as_requests()
        .unwrap()
        .clone()
    };
    let target = SocketAddr::new(peer, NODE_PORT_TCP);
    let r = requests(target, 40, 2000);
    assert!(r.failures.is_empty(), "{target} from node1: {r:?}");
    let seen = tally(&r.identities, |reply| {
        split_reply(reply).0.parse::<SocketAddr>().unwrap().ip()
    });
    assert_eq!(pods(&seen), all_pods(&bed), "from node1 through {target}");
    let target = SocketAddr::new(peer, NODE_PORT_UDP);
    let u = local(ProbeSpec::UdpConnected {
        target,
        count: 10,
        timeout_ms: 2000,
    });
    let u = u.as_udp().unwrap();
    assert!(u.failures.is_empty(), "{u:?}");
    let want = BTreeSet::from([target.to_string()]);
    assert_eq!(
        (&u.reply_sources, &u.peer_names),
        (&want, &want),
        "the application sees the address it used"
    );
    let other = local(ProbeSpec::TcpConnectError {
        target: SocketAddr::new(peer, 30999),
        timeout_ms: 2000,
    });
    assert_eq!(other.as_connect().unwrap().outcome(), "ECONNREFUSED");

    // An address added to the node is served as soon as the agent hears of
    // it (netlink), and forgotten when it goes.
    let late: Ipv4Addr = "192.0.2.200".parse().unwrap();
    let table = || host_addrs::open(&bed.bpf_root(1)).unwrap();
    assert!(!table().keys().contains(&IpAddr::V4(late)));
    node1
        .ns()
        .ip(&["addr", "add", &format!("{late}/32"), "dev", "lo"])
        .unwrap();
    let added = Instant::now();
    let target = SocketAddr::new(IpAddr::V4(late), NODE_PORT_TCP);
    assert!(
        wait_for(Duration::from_secs(20), || requests(target, 1, 500)
            .failures
            .is_empty()),
        "{target} not served from node1:\n{}",
        bed.agents[0].log()
    );
    println!("{late} served {:?} after it was added", added.elapsed());
    let r = requests(target, 20, 2000);
    assert!(r.failures.is_empty(), "{r:?}");
    node1
        .ns()
        .ip(&["addr", "del", &format!("{late}/32"), "dev", "lo"])
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || !table()
            .keys()
            .contains(&IpAddr::V4(late))),
        "{late} still in the host address map"
    );
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
    let table = kpr_on(bed, 1, &["ct", "list"]);
    println!("{}", table.lines().take(5).collect::<Vec<_>>().join("\n"));
    assert!(table.contains("192.0.2.11:30080") && table.contains("snat"));
    let status = status_text(bed, 1);
    assert!(
        status.contains(
            "North-south:          eth-c/egress eth-c/ingress eth-n/egress eth-n/ingress"
        ),
        "{status}"
    );
}

#[test]
#[ignore = "needs root"]
fn an_agent_restart_under_load_keeps_programs_and_conntrack_without_failed_connections() {
    require_root();
    let mut bed = Bed::start("nprs", &[]);
    let target = node_port(bed.node(1), NODE_PORT_TCP);

    // Long-lived UDP flows: each keeps its backend only if conntrack survives.
    let flows = 8;
    let first = udp_flows_answers(bed.cluster.client(), bed.node(1), flows, None);

    // Steady load through node1, in batches until both restarts are done.
    let r = under_tcp_load(&mut bed, target, |bed| {
        for crash in [true, false] {
            restart_agent(bed, 1, crash);
        }
    });
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
        "both restarts swapped the programs in place (tcx links or tc filters):\n{log}"
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

#[test]
#[ignore = "needs root"]
fn conntrack_entries_expire_and_are_collected_and_cleanup_detaches_tc() {
    require_root();
    // A short UDP lifetime, so entries expire within the test.
    let mut bed = Bed::start("npgc", &["--ct-udp-timeout", "2s"]);
    let target = node_port(bed.node(2), NODE_PORT_UDP);
    udp_connected(bed.cluster.client(), target, 5);
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

    // cleanup: no tc program left (tcx link or classic tc filter), no
    // NodePort translated any more.
    assert_eq!(attachments(&bed, 2).len(), 4);
    bed.agent(2).stop().unwrap();
    kpr_on(&bed, 2, &["cleanup"]);
    assert!(attachments(&bed, 2).is_empty());
    for dev in ["eth-c", "eth-n"] {
        for dir in ["ingress", "egress"] {
            let filters = tc_filters(&bed, 2, dev, dir);
            assert!(!filters.contains("kpr_"), "{dev} {dir}: {filters}");
        }
    }
    let target = node_port(bed.node(2), NODE_PORT_TCP);
    assert_eq!(
        tcp_connect(bed.cluster.client(), target, 1000).outcome(),
        "ECONNREFUSED",
        "node2's own stack answers: nothing translates any more"
    );
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
    nodeport_on_another_local_address(&bed, |reply| check_source(bed.node(1), reply));
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
    let c = tcp_connect(bed.cluster.client(), target, 3000);
    assert_eq!(c.outcome(), "ECONNREFUSED", "{c:?}");
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
    tcp_requests(
        bed.cluster.client(),
        node_port(bed.node(1), NODE_PORT_TCP),
        10,
    );
    assert!(bed.stats(1).unwrap().xdp_fwd > before);

    // cleanup detaches XDP as well.
    bed.agent(1).stop().unwrap();
    kpr_on(&bed, 1, &["cleanup"]);
    let link = xdp_on(&bed);
    assert!(
        !link.contains("prog/xdp") && !link.contains("xdpgeneric"),
        "{link}"
    );
}

#[test]
#[ignore = "needs root"]
fn nodeport_through_generic_xdp_spreads_and_snats_like_tc() {
    require_root();
    through_xdp("npxg", "generic");
}

#[test]
#[ignore = "needs root"]
fn nodeport_through_native_xdp_on_veth_spreads_and_snats_like_tc() {
    require_root();
    through_xdp("npxn", "native");
}

/// Regression: a client reusing its source port toward a second frontend
/// of the same local backend used to get the SNAT fallback, whose reply
/// came in on the pod interface (no kpr program) and was answered by RST.
/// A closing flow's reply tuple now gives way to the new flow.
#[test]
#[ignore = "needs root"]
fn a_client_port_reused_across_frontends_of_one_local_backend_still_connects() {
    require_root();
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
#[ignore = "needs root"]
fn a_client_port_reused_to_reach_a_local_backend_directly_still_connects() {
    require_root();
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

/// Node1's devices once its status reports `attached` (or after 30 s):
/// the agent pins a device's links before it updates its status, so a
/// test that saw the pins waits for the status too.
fn agent_devices_once_attached(
    bed: &mut NodePortBed,
    attached: &[&str],
) -> (Vec<String>, Vec<String>) {
    let mut last = agent_devices(bed);
    wait_for(Duration::from_secs(30), || {
        last = agent_devices(bed);
        last.0 == attached
    });
    last
}

/// A `--devices` interface that does not exist when the agent starts is
/// not an error: the agent waits for it, attaches tc as soon as it
/// appears (netlink link notification), NodePort traffic entering through
/// it is load-balanced, and when it goes its links are forgotten.
#[test]
#[ignore = "needs root"]
fn a_device_that_appears_later_is_attached_and_serves_nodeport_traffic() {
    require_root();
    let mut bed = Bed::start("nplate", &["--devices", "eth-late"]);
    assert_eq!(attached_links(&bed, 1, "eth-late"), 0);
    let (attached, missing) = agent_devices(&mut bed);
    assert_eq!((attached.len(), missing), (2, vec!["eth-late".to_string()]));
    let text = status_text(&bed, 1);
    assert!(
        text.contains("Devices:              eth-c eth-n (waiting for eth-late) [--devices eth-c,eth-n,eth-late]"),
        "{text}"
    );
    assert!(
        text.contains("NodePort mode:        snat, XDP acceleration disabled"),
        "{text}"
    );

    let client_addr = bed.cluster.add_late_link(1, "eth-late", "eth-l1").unwrap();
    let started = Instant::now();
    wait_attached(&bed, 1, "eth-late");
    println!(
        "eth-late attached {:?} after it appeared",
        started.elapsed()
    );
    let (attached, missing) =
        agent_devices_once_attached(&mut bed, &["eth-c", "eth-late", "eth-n"]);
    assert_eq!(attached, ["eth-c", "eth-late", "eth-n"]);
    assert!(missing.is_empty(), "{missing:?}");

    // NodePort traffic now enters node1 through eth-late, from the new
    // client address: spread over every pod, local ones see the client.
    let node = bed.node(1);
    let target = node_port(node, NODE_PORT_TCP);
    let r = tcp_requests(bed.cluster.client(), target, 40);
    let seen = tally(&r.identities, |reply| {
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
        backend.ip()
    });
    assert_eq!(pods(&seen), all_pods(&bed), "every pod through eth-late");
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
        wait_for(Duration::from_secs(30), || attachments(&bed, 1)
            .iter()
            .all(|d| d.device != "eth-late")),
        "{:?}",
        attachments(&bed, 1)
    );
    let (attached, missing) = agent_devices_once_attached(&mut bed, &["eth-c", "eth-n"]);
    assert_eq!(attached, ["eth-c", "eth-n"]);
    assert_eq!(missing, ["eth-late"]);
    tcp_requests(bed.cluster.client(), target, 10);
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
    let endpoints = pod_endpoints(cluster, None);
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
    let pod_udp = kpr_testbed::nodeport_bed::POD_UDP;
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
            // a continuation line: [allow PREFIX] N => backend (state)
            [_, "=>", _, _] | ["allow", _, _, "=>", _, _] => {
                let fe = last.as_ref().expect("a continuation after a row");
                rows.get_mut(fe).unwrap().1 += 1;
            }
            // a source range line without a backend
            ["allow", _] => {}
            // ID Frontend Service Type [N => backend (state)]
            [_, frontend, _service, svc_type, ref backend @ ..] => {
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
#[ignore = "needs root"]
fn loadbalancer_ips_and_external_ips_are_served_from_outside_and_listed() {
    require_root();
    let bed = Bed::with_manifest("nplbx", &ClusterPlan::default(), external_manifest, &[]);
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
        let r = tcp_requests(client, target, 40);
        let seen = tally(&r.identities, |reply| check_source(node, reply));
        println!("{target} through node{n}: {:?}", r.identities);
        assert_eq!(pods(&seen), all_pods(&bed), "{target} reaches every pod");
    }
    // UDP to the LB IP: one flow per socket, spread, answered from the LB IP.
    let target = SocketAddr::new(LB_IP.parse().unwrap(), 53);
    let u = udp_connected(client, target, 40);
    let seen = tally(&u.identities, |reply| check_source(bed.node(1), reply));
    assert_eq!(pods(&seen), all_pods(&bed));
    udp_unconnected(client, target, 5);
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

    let table = kpr_on(&bed, 1, &["svc", "list"]);
    println!("{table}");
    let header = table.lines().next().unwrap();
    assert!(
        table.starts_with("ID   Frontend ")
            && header.split_whitespace().collect::<Vec<_>>()
                == ["ID", "Frontend", "Service", "Service", "Type", "Backend"],
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

/// kube-proxy's worst UDP bugs are stale conntrack: a flow that met a
/// Service without endpoints stays blackholed after endpoints appear, and
/// a flow stays on a removed endpoint (kubernetes#48370, #19029). Here one
/// client socket, never reopened, keeps talking to a UDP NodePort while
/// its endpoints go from none to a remote pod to a local one: it is
/// rejected first, then answered by the remote pod, then by the local pod
/// as soon as the agents have synced, and conntrack holds the new backend.
#[test]
#[ignore = "needs root"]
fn one_udp_flow_follows_endpoints_from_none_to_a_remote_pod_to_a_local_one() {
    require_root();
    const TCP: u16 = 30180;
    const UDP: u16 = 30153;
    let endpoints_of = |pod: Option<(IpAddr, u8)>| match pod {
        Some((ip, node)) => endpoint_line(ip, node),
        None => "  []\n".to_string(),
    };
    let bed = Bed::with_manifest(
        "npflow",
        &ClusterPlan::default(),
        |_| nodeport_manifest("flows", "flow", TCP, UDP, &endpoints_of(None)),
        &[],
    );
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
        SocketAddr::new(local, kpr_testbed::nodeport_bed::POD_UDP),
        "{flow:?}"
    );
    assert!(!flow[0].snat, "a local backend sees the client: {flow:?}");
}

/// A packet for a local pod goes from the node's device straight into the
/// pod's namespace (bpf_redirect_peer through the pod's veth, which the
/// agent learns from netlink): the host side of the pod link transmits
/// nothing for the requests and the pod answers every one. The node's
/// north-south devices (veths to other hosts here) are never taken for
/// pod devices, and a pod device that comes later, or goes, is followed.
#[test]
#[ignore = "needs root"]
fn packets_to_local_pods_enter_the_pod_namespace_directly_and_pod_devices_are_followed() {
    require_root();
    let bed = Bed::start("nppeer", &[]);
    let node = bed.node(1);
    let listed = || peer_devices::open(&bed.bpf_root(1)).unwrap().keys().clone();
    let pod_link = link_index(node.ns(), NODE_PODS_IF);
    assert!(
        wait_for(Duration::from_secs(20), || listed().contains(&pod_link)),
        "{NODE_PODS_IF} ({pod_link}) not in the peer device map: {:?}",
        listed()
    );
    for dev in [NODE_CLIENT_IF, NODE_PEER_IF] {
        let index = link_index(node.ns(), dev);
        assert!(
            !listed().contains(&index),
            "north-south device {dev} listed"
        );
    }
    let status = status_text(&bed, 1);
    assert!(status.contains("Pod devices:          1 "), "{status}");

    let requests = 50;
    let (redirected, transmitted) = requests_to_a_local_pod(&bed, requests);
    // SYN, ACK, request and FIN of each connection at least.
    assert!(
        redirected >= 4 * u64::from(requests),
        "{redirected} peer redirects"
    );
    assert!(
        transmitted < u64::from(requests),
        "the host side transmitted {transmitted} packets for {requests} requests"
    );

    // A pod device added while the agent runs is listed, and unlisted
    // once it is gone; a veth with both ends on the node never is.
    let pods = node.pods();
    let added = Instant::now();
    node.ns()
        .ip(&[
            "link",
            "add",
            "pod-late",
            "type",
            "veth",
            "peer",
            "name",
            "eth9",
            "netns",
            pods.name(),
        ])
        .unwrap();
    node.ns()
        .ip(&[
            "link", "add", "loop-a", "type", "veth", "peer", "name", "loop-b",
        ])
        .unwrap();
    let late = link_index(node.ns(), "pod-late");
    let local_pair = [
        link_index(node.ns(), "loop-a"),
        link_index(node.ns(), "loop-b"),
    ];
    assert!(
        wait_for(Duration::from_secs(20), || listed().contains(&late)),
        "pod-late ({late}) never listed: {:?}",
        listed()
    );
    println!("pod-late listed {:?} after it appeared", added.elapsed());
    assert!(
        local_pair.iter().all(|i| !listed().contains(i)),
        "{:?}",
        listed()
    );
    node.ns().ip(&["link", "del", "pod-late"]).unwrap();
    node.ns().ip(&["link", "del", "loop-a"]).unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || !listed().contains(&late)),
        "pod-late ({late}) still listed after its deletion"
    );
    assert!(listed().contains(&pod_link));
}

/// `requests` TCP requests to node1's NodePort whose pods are all on node1,
/// every one answered: (packets node1 redirected into the pods' namespace,
/// packets transmitted on the host side of the pods' link).
fn requests_to_a_local_pod(bed: &NodePortBed, requests: u32) -> (u64, u64) {
    let node = bed.node(1);
    let (redirected_before, tx_before) = (
        bed.stats(1).unwrap().peer_redirects,
        link_packets(node.ns(), NODE_PODS_IF, "tx"),
    );
    // ETP Local with pods on node1 only: every flow stays on node1.
    let target = node_port(node, NODE_PORT_ONE_LOCAL);
    let r = tcp_requests(bed.cluster.client(), target, requests);
    assert_eq!(r.identities.values().sum::<u64>(), u64::from(requests));
    let redirected = bed.stats(1).unwrap().peer_redirects - redirected_before;
    let transmitted = link_packets(node.ns(), NODE_PODS_IF, "tx") - tx_before;
    println!(
        "{requests} requests: {redirected} packets redirected into the pods' namespace, \
         {transmitted} transmitted on {NODE_PODS_IF}"
    );
    (redirected, transmitted)
}

/// --nodeport-redirect-peer=false: no pod device is listed and packets for
/// local pods are transmitted on the host side of their link (where a
/// CNI bandwidth plugin's qdisc sees them), and still answered.
#[test]
#[ignore = "needs root"]
fn without_peer_redirect_packets_to_local_pods_take_the_host_side_of_their_link() {
    require_root();
    let bed = Bed::start("npnopr", &["--nodeport-redirect-peer=false"]);
    let requests = 50;
    let (redirected, transmitted) = requests_to_a_local_pod(&bed, requests);
    assert_eq!(redirected, 0);
    assert!(
        transmitted >= 4 * u64::from(requests),
        "{transmitted} packets on {NODE_PODS_IF}"
    );
    assert!(peer_devices::open(&bed.bpf_root(1))
        .unwrap()
        .keys()
        .is_empty());
    let status = status_text(&bed, 1);
    assert!(status.contains("Pod devices:          0 "), "{status}");
}
