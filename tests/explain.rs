//! `kpr explain` agrees with what real connects did: for a Maglev NodePort
//! (north-south, the multi-node bed) it predicts the backend of each of 200
//! client ports before they connect; for a ClientIP-affinity ClusterIP
//! (socket LB) it says random among the backends before, and names the
//! one backend 200 connects all went to after.
//!
//! Needs root: every test is `#[ignore = "needs root"]` (run them with
//! `--include-ignored`) and fails at once without root.

#[path = "support/nodeport.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;

use kpr_testbed::{BedPlan, ClusterPlan, SocketLbBed};
use support::*;

fn explain_json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The address of a decision's backend (`10.244.1.11:8080/TCP`).
fn backend_ip(decision: &serde_json::Value) -> IpAddr {
    let b = decision["backend"]
        .as_str()
        .unwrap_or_else(|| panic!("no backend: {decision}"));
    let addr = b.split('/').next().unwrap();
    addr.parse::<SocketAddr>().unwrap().ip()
}

#[test]
#[ignore = "needs root"]
fn explain_predicts_the_maglev_backend_of_200_connects_to_a_node_port() {
    require_root();
    let plan = ClusterPlan {
        pods_per_node: 3,
        ..ClusterPlan::default()
    };
    let bed = Bed::start_with("npexp", &plan, &["--lb-algorithm", "maglev"]);
    add_shared_client_address(&bed);
    let target = node_port(bed.node(1), NODE_PORT_TCP);
    let frontend = format!("{target}/TCP");
    let ports = 47000u16..47200;

    // Before any connect: the Maglev slot and backend of every port.
    let mut predicted: BTreeMap<u16, IpAddr> = BTreeMap::new();
    for port in ports.clone() {
        let client = format!("{SHARED_CLIENT}:{port}");
        let e = explain_json(&kpr_on(
            &bed,
            1,
            &[
                "explain",
                "--frontend",
                &frontend,
                "--client",
                &client,
                "-o",
                "json",
            ],
        ));
        assert_eq!(e["service"], "np/web:http", "{e}");
        let ns = &e["decisions"][0];
        assert_eq!(ns["path"], "north-south (tc/XDP)", "{e}");
        assert_eq!(ns["selection"], "maglev", "{e}");
        assert!(ns["maglev_slot"].as_u64().is_some(), "{e}");
        predicted.insert(port, backend_ip(ns));
    }
    let spread: std::collections::BTreeSet<IpAddr> = predicted.values().copied().collect();
    assert!(
        spread.len() > 1,
        "every port hashed to one backend: {spread:?}"
    );

    // 200 client ports connect (through node1, and node2 for good measure).
    let seen = backends_by_port(&bed, ports.clone(), NODE_PORT_TCP);
    let wrong: Vec<_> = seen
        .iter()
        .filter(|(port, [via1, _])| predicted[port] != *via1)
        .collect();
    assert!(
        wrong.is_empty(),
        "explain predicted otherwise for {wrong:?}"
    );

    // After: the same backend, by the flow's conntrack entry or the slot.
    let client = format!("{SHARED_CLIENT}:{}", ports.start);
    let e = explain_json(&kpr_on(
        &bed,
        1,
        &[
            "explain",
            "--frontend",
            &frontend,
            "--client",
            &client,
            "-o",
            "json",
        ],
    ));
    let ns = &e["decisions"][0];
    assert!(
        ns["selection"] == "conntrack" || ns["selection"] == "maglev",
        "{e}"
    );
    assert_eq!(backend_ip(ns), predicted[&ports.start], "{e}");
    println!(
        "{}",
        kpr_on(
            &bed,
            1,
            &["explain", "--frontend", &frontend, "--client", &client]
        )
    );
}

const STICKY: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: t}
spec:
  clusterIP: 10.96.0.60
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 3600}}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky-1, namespace: t, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.11]}, {addresses: [10.244.0.12]}, {addresses: [10.244.0.13]}]
"#;

#[test]
#[ignore = "needs root"]
fn explain_names_the_affinity_backend_200_socket_connects_went_to() {
    require_root();
    let bed = SocketLbBed::start(
        "explaff",
        Path::new(KPR),
        STICKY,
        &BedPlan {
            v4_backends: 3,
            v6_backends: 0,
            ..BedPlan::default()
        },
    )
    .expect("bed");
    let explain = || {
        let out = Command::new(KPR)
            .args(["explain", "--frontend", "10.96.0.60:80/TCP"])
            .args(["--client", "192.0.2.1:40000", "-o", "json", "--bpf-root"])
            .arg(&bed.agent.bpf_root)
            .output()
            .expect("kpr explain");
        assert!(out.status.success(), "{out:?}");
        explain_json(&String::from_utf8_lossy(&out.stdout))
    };
    // No client yet: random among the three.
    let before = explain();
    let sock = &before["decisions"][1];
    assert_eq!(sock["path"], "socket (connect/sendmsg)", "{before}");
    assert_eq!(sock["selection"], "random", "{before}");
    assert_eq!(sock["candidates"].as_array().unwrap().len(), 3, "{before}");
    assert_eq!(before["affinity_timeout_seconds"], 3600, "{before}");

    let spread = bed
        .tcp_spread("10.96.0.60:80".parse().unwrap(), 200)
        .expect("200 connects");
    assert_eq!(spread.len(), 1, "affinity held: {spread:?}");
    let (identity, count) = spread.iter().next().unwrap();
    assert_eq!(*count, 200);

    let after = explain();
    let sock = &after["decisions"][1];
    assert_eq!(sock["selection"], "affinity", "{after}");
    assert_eq!(sock["backend"], format!("{identity}/TCP"), "{after}");
}
