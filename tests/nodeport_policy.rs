//! North-south policies end to end on the multi-node bed
//! (tests/support/nodeport.rs): externalTrafficPolicy Local,
//! loadBalancerSourceRanges, --service-no-backend-response and NodePort
//! bind protection.
//!
//! Needs root (namespaces, BPF, tcx): every test is `#[ignore = "needs
//! root"]` (run them with `--include-ignored`) and fails at once without
//! root.

#[path = "support/nodeport.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use kpr_testbed::cluster::CLIENT_TO_NODE1_IF;
use kpr_testbed::errno::error_name;
use kpr_testbed::server::split_reply;
use kpr_testbed::{run_probe, NodePortBed, ProbeSpec};
use support::*;

#[test]
#[ignore = "needs root"]
fn external_traffic_policy_local_keeps_the_client_address_and_drops_without_local_backends() {
    require_root();
    let bed = Bed::start("npetp", &[]);
    let client = bed.cluster.client();
    for n in [1u8, 2] {
        let node = bed.node(n);
        let target = node_port(node, NODE_PORT_LOCAL);
        let r = tcp_requests(client, target, 30);
        let seen = tally(&r.identities, |reply| check_source(node, reply));
        let local: BTreeSet<IpAddr> = node.pod_ips().iter().map(|ip| IpAddr::V4(*ip)).collect();
        assert_eq!(
            pods(&seen),
            local,
            "only node{n}'s pods, which see the client"
        );
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
        assert_eq!(
            tcp_connect(client, target, 300).outcome(),
            outcome,
            "{target}"
        );
    }
    let (s1, s2) = (bed.stats(1).unwrap(), bed.stats(2).unwrap());
    assert!(
        s2.drop_no_backend > 0 && s2.reject_no_backend == 0,
        "{s2:?}"
    );
    assert!(s1.reject_no_backend > 0, "{s1:?}");
    // ... while node1 serves one-local from its own pods.
    tcp_requests(client, node_port(bed.node(1), NODE_PORT_ONE_LOCAL), 5);
}

/// NodePort bind protection (cgroup post_bind4/6): a process of the node
/// (its namespace, the agent's cgroup) cannot bind a NodePort a Service
/// uses, on the node IP, loopback or a wildcard, and gets EADDRINUSE as
/// with Cilium; other ports, other protocols, addresses that are no node IP
/// and pods' own namespaces are left alone; the port is free again once
/// its Service is gone.
#[test]
#[ignore = "needs root"]
fn host_sockets_cannot_bind_a_nodeport_in_use_until_its_service_is_deleted() {
    require_root();
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
    // The node-to-node address is no --node-ip, but an address of the node:
    // NodePorts are served there too, so it is protected as well.
    let peer_ip = format!("{}:{NODE_PORT_TCP}", bed.node(1).peer_ip());
    let taken = [
        "0.0.0.0:30080",
        node_ip.as_str(),
        peer_ip.as_str(),
        "127.0.0.1:30080",
        "[::]:30080",
        "[::ffff:0.0.0.0]:30080",
    ];
    let got = bind(&bed, false, &taken, false);
    println!("node1, TCP: {got:?}");
    assert_eq!(got, outcomes(&taken, "EADDRINUSE"));

    // Not a NodePort, or another protocol: free.
    let peer_other = format!("{}:30999", bed.node(1).peer_ip());
    let free = ["0.0.0.0:30999", peer_other.as_str(), "[::]:30999"];
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
        log.contains(r#""post_bind4", "post_bind6", "skb_egress"] created_links=[]"#),
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
    let status = status_text(&bed, 1);
    assert!(status.contains("post_bind4 post_bind6"), "{status}");
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
#[ignore = "needs root"]
fn load_balancer_source_ranges_admit_listed_clients_only_and_leave_the_node_port_open() {
    require_root();
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

    // Inside the range (GUARDED_RANGE): served like any LoadBalancer
    // frontend.
    let r = tcp_requests(client, lb, 40);
    let seen = tally(&r.identities, |reply| check_source(node1, reply));
    assert_eq!(pods(&seen), all_pods(&bed));
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

    // `kpr svc list` shows what is enforced: the ranges under the LB
    // frontend only (the NodePort rows have none), in the table and JSON;
    // an IPv4 frontend holds the IPv4 ranges (2001:db8::/64 can match no
    // client of it).
    let table = kpr_on(&bed, 1, &["svc", "list"]);
    let lb_row = format!("{GUARDED_LB_IP}:80/TCP");
    let at = table
        .lines()
        .position(|l| l.contains(&lb_row))
        .unwrap_or_else(|| panic!("no {lb_row} in\n{table}"));
    let next = table.lines().nth(at + 1).unwrap_or_default();
    assert!(next.contains(&format!("allow {GUARDED_RANGE}")), "{table}");
    assert_eq!(table.matches("allow ").count(), 1, "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&kpr_on(&bed, 1, &["svc", "list", "-o", "json"])).unwrap();
    let guarded: Vec<&serde_json::Value> = json
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| {
            row["source_ranges"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
        })
        .collect();
    assert_eq!(guarded.len(), 1, "{json:#}");
    assert_eq!(guarded[0]["address"], GUARDED_LB_IP);

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
#[ignore = "needs root"]
fn a_frontend_without_backends_rejects_tcp_and_udp_with_icmp_by_default() {
    require_root();
    let bed = Bed::start("nprej", &[]);
    let client = bed.cluster.client();
    for n in [1u8, 2] {
        let target = node_port(bed.node(n), NODE_PORT_EMPTY);
        let c = tcp_connect(client, target, 5000);
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
    tcp_requests(client, node_port(bed.node(1), NODE_PORT_TCP), 5);
}

/// --service-no-backend-response drop: no answer at all, so clients time
/// out (bounded here); the drops are counted.
#[test]
#[ignore = "needs root"]
fn with_no_backend_response_drop_a_frontend_without_backends_stays_silent() {
    require_root();
    let bed = Bed::start("npdrop", &["--service-no-backend-response", "drop"]);
    let client = bed.cluster.client();
    let target = node_port(bed.node(1), NODE_PORT_EMPTY);
    let c = tcp_connect(client, target, 500);
    assert_eq!(c.outcome(), "TIMEOUT", "{c:?}");
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
