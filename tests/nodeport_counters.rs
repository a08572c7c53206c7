//! The always-on load-balancing counters of the north-south path (tc), as
//! an operator reads them through the agent's /metrics: every new flow is
//! counted once under its frontend and verdict, with its packets and bytes
//! per frontend and per backend. Root only, on the two-node NodePort bed
//! (tests/support/nodeport.rs). IPv4 (the north-south path's family).

#[path = "support/nodeport.rs"]
mod support;

use kpr_testbed::NodePortBed;
use support::*;

/// A counter of node `n`'s agent whose labels contain `labels` (0 when
/// the series does not exist yet).
#[track_caller]
fn counter(bed: &NodePortBed, n: u8, metric: &str, labels: &str) -> u64 {
    bed.agents[usize::from(n - 1)]
        .metric_value(metric, labels)
        .unwrap()
        .unwrap_or(0.0) as u64
}

/// `kpr_nodeport_new_flows_total` of `verdict` for node `n`'s NodePort `port`.
#[track_caller]
fn new_flows(bed: &NodePortBed, n: u8, port: u16, verdict: &str) -> u64 {
    let fe = format!("{}/TCP", node_port(bed.node(n), port));
    let labels = format!("verdict=\"{verdict}\",frontend=\"{fe}\"");
    counter(bed, n, "kpr_nodeport_new_flows_total", &labels)
}

#[test]
#[ignore = "needs root"]
fn every_new_flow_is_counted_once_under_its_frontend_with_its_packets_and_bytes() {
    require_root();
    let bed = Bed::start("npcnt", &[]);
    let client = bed.cluster.client();
    let fe = format!("frontend=\"{}/TCP\"", node_port(bed.node(1), NODE_PORT_TCP));
    let translated = new_flows(&bed, 1, NODE_PORT_TCP, "translated");
    let packets = counter(&bed, 1, "kpr_nodeport_frontend_packets_total", &fe);
    let empty = new_flows(&bed, 1, NODE_PORT_EMPTY, "no_backend");
    let local = new_flows(&bed, 2, NODE_PORT_ONE_LOCAL, "local_policy");

    tcp_requests(client, node_port(bed.node(1), NODE_PORT_TCP), 30);
    for _ in 0..3 {
        let r = tcp_connect(client, node_port(bed.node(1), NODE_PORT_EMPTY), 2000);
        assert_eq!(r.outcome(), "ECONNREFUSED");
    }
    // node2 has no endpoint of one-local: dropped (one SYN in 300 ms).
    for _ in 0..2 {
        let r = tcp_connect(client, node_port(bed.node(2), NODE_PORT_ONE_LOCAL), 300);
        assert_eq!(r.outcome(), "TIMEOUT");
    }

    let metrics = || bed.agents[0].metrics().unwrap_or_default();
    assert_eq!(
        new_flows(&bed, 1, NODE_PORT_TCP, "translated") - translated,
        30,
        "{}",
        metrics()
    );
    assert_eq!(new_flows(&bed, 1, NODE_PORT_EMPTY, "no_backend") - empty, 3);
    assert_eq!(
        new_flows(&bed, 2, NODE_PORT_ONE_LOCAL, "local_policy") - local,
        2
    );
    // A request and its answer: several packets each way per flow.
    let orig = format!("direction=\"original\",{fe}");
    let fwd = counter(&bed, 1, "kpr_nodeport_frontend_packets_total", &orig) - packets;
    assert!(fwd >= 3 * 30, "{fwd} packets for 30 flows:\n{}", metrics());
    assert!(counter(&bed, 1, "kpr_nodeport_frontend_bytes_total", &orig) > 60 * fwd);
    let reply = format!("direction=\"reply\",{fe}");
    assert!(counter(&bed, 1, "kpr_nodeport_frontend_packets_total", &reply) >= 30);
    // Per backend, too (one series per backend reached).
    assert!(
        counter(
            &bed,
            1,
            "kpr_nodeport_backend_packets_total",
            "direction=\"original\",backend=\"10.244."
        ) > 0,
        "{}",
        metrics()
    );
    // The split of kpr_nodeport_events_total, one unit each.
    assert!(
        counter(
            &bed,
            1,
            "kpr_nodeport_flow_events_total",
            "event=\"flow_new\""
        ) >= 30
    );
    assert!(counter(&bed, 2, "kpr_nodeport_drops_total", "reason=\"no_backend\"") >= 2);
}
