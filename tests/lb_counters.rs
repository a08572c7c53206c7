//! The always-on load-balancing counters (bpf/include/lb_verdict.h) as an
//! operator reads them, through the agent's /metrics: every decision of
//! the socket hooks is counted exactly once under its frontend and
//! verdict, for IPv4 and IPv6. Root only, on the socket-LB bed.

use std::net::SocketAddr;
use std::path::Path;

use kpr_testbed::require_root;
use kpr_testbed::{BedPlan, ProbeSpec, SocketLbBed};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: t}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:10:96::10"]
  ports:
  - {name: http, port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: t, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.0.11]
- addresses: [10.244.0.12]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-6, namespace: t, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints:
- addresses: ["fd00:10:244::11"]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: t}
spec:
  clusterIP: 10.96.0.30
  clusterIPs: [10.96.0.30, "fd00:10:96::30"]
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: t}
spec:
  clusterIP: 10.96.0.40
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: t, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.0.12]
  nodeName: another-node
"#;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn bed(prefix: &str) -> SocketLbBed {
    SocketLbBed::start(
        prefix,
        Path::new(KPR),
        SERVICES,
        &BedPlan {
            v4_backends: 2,
            v6_backends: 1,
            ..BedPlan::default()
        },
    )
    .unwrap_or_else(|e| panic!("bed {prefix}: {e}"))
}

/// `kpr_socket_lb_decisions_total` of one verdict and frontend (0 when
/// the series does not exist yet).
#[track_caller]
fn decisions(bed: &SocketLbBed, verdict: &str, frontend: &str) -> u64 {
    let labels = format!("verdict=\"{verdict}\",frontend=\"{frontend}\"");
    bed.agent
        .metric_value("kpr_socket_lb_decisions_total", &labels)
        .unwrap()
        .unwrap_or(0.0) as u64
}

/// `count` connects to `target` that must all fail with `errno`.
#[track_caller]
fn refused(bed: &SocketLbBed, target: &str, count: usize, errno: &str) {
    for _ in 0..count {
        let r = bed
            .probe(
                &ProbeSpec::TcpConnectError {
                    target: addr(target),
                    timeout_ms: 3000,
                },
                true,
            )
            .unwrap();
        let r = r.as_connect().unwrap();
        assert_eq!(r.error.as_deref(), Some(errno), "{target}: {r:?}");
    }
}

#[test]
#[ignore = "needs root"]
fn every_socket_decision_is_counted_once_under_its_frontend_and_verdict() {
    require_root();
    let bed = bed("lbcnt");
    let cases: [(&str, &str, &str); 5] = [
        ("translated", "10.96.0.10:80/TCP", "10.96.0.10:80"),
        (
            "translated",
            "[fd00:10:96::10]:80/TCP",
            "[fd00:10:96::10]:80",
        ),
        ("no_backend", "10.96.0.30:80/TCP", "10.96.0.30:80"),
        (
            "no_backend",
            "[fd00:10:96::30]:80/TCP",
            "[fd00:10:96::30]:80",
        ),
        ("local_policy", "10.96.0.40:80/TCP", "10.96.0.40:80"),
    ];
    let before: Vec<u64> = cases
        .iter()
        .map(|(v, fe, _)| decisions(&bed, v, fe))
        .collect();
    let invalid_before = decisions(&bed, "invalid_port", "none");

    bed.tcp_spread(addr("10.96.0.10:80"), 20).unwrap();
    bed.tcp_spread(addr("[fd00:10:96::10]:80"), 7).unwrap();
    refused(&bed, "10.96.0.30:80", 3, "ECONNREFUSED");
    refused(&bed, "[fd00:10:96::30]:80", 2, "ECONNREFUSED");
    refused(&bed, "10.96.0.40:80", 4, "ECONNREFUSED");
    // A port the ClusterIP's Service does not define: no frontend.
    refused(&bed, "10.96.0.10:81", 5, "ECONNREFUSED");

    let want = [20, 7, 3, 2, 4];
    for (i, (verdict, fe, _)) in cases.iter().enumerate() {
        let got = decisions(&bed, verdict, fe) - before[i];
        assert_eq!(
            got,
            want[i],
            "{verdict} for {fe}; /metrics:\n{}",
            bed.agent.metrics().unwrap_or_default()
        );
    }
    assert_eq!(decisions(&bed, "invalid_port", "none") - invalid_before, 5);
    // The Service's identity is on the series.
    let named = bed
        .agent
        .metric_value(
            "kpr_socket_lb_decisions_total",
            "frontend=\"10.96.0.10:80/TCP\",namespace=\"t\",name=\"web\",port_name=\"http\"",
        )
        .unwrap();
    assert!(named.is_some_and(|v| v >= 20.0), "{named:?}");
}
