//! Table-driven translation cases: Service + EndpointSlices (YAML, as a
//! user writes them) and a node -> the frontends and backends kube-proxy
//! would program, plus the no-local-endpoints cases and health checks.

use super::*;
use crate::model::BackendState;

/// The node a case is translated for.
struct TestNode {
    name: &'static str,
    zone: Option<&'static str>,
    ips: &'static [&'static str],
}

impl TestNode {
    fn context(&self) -> NodeContext {
        NodeContext {
            node_name: self.name.into(),
            zone: self.zone.map(Into::into),
            node_ips: self.ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            ..Default::default()
        }
    }
}

/// A dual-stack node in zone-a.
const NODE_A: TestNode = TestNode {
    name: "node-a",
    zone: Some("zone-a"),
    ips: &["192.168.1.10", "fd00:192:168:1::10"],
};

/// A node the agent knows nothing about (`NodeContext::default()`).
const NODE_UNKNOWN: TestNode = TestNode {
    name: "",
    zone: None,
    ips: &[],
};

/// node-a without a zone label.
const NODE_A_NO_ZONE: TestNode = TestNode {
    name: "node-a",
    zone: None,
    ips: &["192.168.1.10"],
};

struct Case {
    name: &'static str,
    service: &'static str,
    slices: &'static [&'static str],
    node: TestNode,
    /// Sorted lines: `frontend[/i] Type [options] => backend, backend`,
    /// backends in slot order with a `~` suffix when terminating; then
    /// `# no-local-endpoints <policy> <service:port> <family>` and
    /// `# health-check <port> <service> local=<n>` (they sort first).
    expect: &'static [&'static str],
    skips: &'static [SkipReason],
}

fn render(t: &Translation) -> Vec<String> {
    let mut lines: Vec<String> = t
        .desired
        .values()
        .flat_map(|fes| fes.iter())
        .map(|(fe, spec)| {
            let backends: Vec<String> = spec
                .backends
                .iter()
                .map(|b| match b.state {
                    BackendState::Terminating => format!("{}~", b.addr),
                    BackendState::Active => b.addr.to_string(),
                })
                .collect();
            let o = &spec.options;
            let mut opts = String::new();
            if let Some(t) = o.affinity_timeout {
                opts.push_str(&format!(" affinity={t}"));
            }
            for (set, flag) in [
                (o.internal_traffic_local, "itp-local"),
                (o.external_traffic_local, "etp-local"),
                (o.has_internal_scope, "has-int"),
                (o.maglev, "maglev"),
            ] {
                if set {
                    opts.push(' ');
                    opts.push_str(flag);
                }
            }
            if !spec.source_ranges.is_empty() {
                let nets: Vec<String> = spec.source_ranges.iter().map(|n| n.to_string()).collect();
                opts.push_str(&format!(" src={}", nets.join(",")));
                if o.source_ranges_admit_node {
                    opts.push_str(" src-node");
                }
            }
            let scope = match fe.scope {
                Scope::External => "",
                Scope::Internal => "/i",
            };
            format!(
                "{}{scope} {}{opts} => {}",
                fe.addr,
                spec.svc_type,
                backends.join(", ")
            )
        })
        .chain(t.no_local_endpoints.iter().map(|n| {
            format!(
                "# no-local-endpoints {} {} {}",
                n.policy, n.service, n.family
            )
        }))
        .chain(t.health_checks.iter().map(|h| {
            format!(
                "# health-check {} {} local={}",
                h.port, h.service, h.local_endpoints
            )
        }))
        .collect();
    lines.sort();
    lines
}

const SVC_WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports:
  - {name: http, port: 80, targetPort: 8080}
"#;

const SLICE_WEB_A: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.0.12]
- addresses: [10.244.0.11]
  conditions: {ready: true}
"#;

const SLICE_WEB_B: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.0.13]
- addresses: [10.244.0.11]
- addresses: [10.244.0.14]
  conditions: {ready: false}
"#;

/// Endpoints of Service `pol`: one ready on node-a, one ready on node-b.
const SLICE_POL: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: pol-1, namespace: demo, labels: {kubernetes.io/service-name: pol}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.1], nodeName: node-a}
- {addresses: [10.244.2.1], nodeName: node-b}
"#;

/// Endpoints of Service `pol`, none on node-a.
const SLICE_POL_REMOTE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: pol-1, namespace: demo, labels: {kubernetes.io/service-name: pol}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.2.1], nodeName: node-b}
- {addresses: [10.244.3.1], nodeName: node-c}
"#;

/// Endpoints of Service `pol`: node-a's is terminating (still serving),
/// node-b's is ready.
const SLICE_POL_LOCAL_TERMINATING: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: pol-1, namespace: demo, labels: {kubernetes.io/service-name: pol}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.1.1]
  nodeName: node-a
  conditions: {ready: false, serving: true, terminating: true}
- {addresses: [10.244.2.1], nodeName: node-b}
"#;

/// Endpoints of Service `zoned`, all hinted: two for zone-a, one for zone-b.
const SLICE_ZONED_HINTED: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: zoned-1, namespace: demo, labels: {kubernetes.io/service-name: zoned}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.1], nodeName: node-a, zone: zone-a, hints: {forZones: [{name: zone-a}]}}
- {addresses: [10.244.1.2], nodeName: node-a2, zone: zone-a, hints: {forZones: [{name: zone-a}]}}
- {addresses: [10.244.2.1], nodeName: node-b, zone: zone-b, hints: {forZones: [{name: zone-b}]}}
"#;

const SVC_ZONED: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: zoned, namespace: demo}
spec: {clusterIP: 10.96.2.1, ports: [{name: http, port: 80}]}
"#;

const CASES: &[Case] = &[
    // --- ClusterIP basics ---------------------------------------------------
    Case {
        name: "ready endpoints of two slices are merged, deduplicated and ordered; not-ready ones left out",
        service: SVC_WEB,
        slices: &[SLICE_WEB_A, SLICE_WEB_B],
        node: NODE_A,
        expect: &["10.96.0.10:80/TCP ClusterIP => 10.244.0.11:8080/TCP, 10.244.0.12:8080/TCP, 10.244.0.13:8080/TCP"],
        skips: &[],
    },
    Case {
        name: "a service without slices gets a frontend with no backend",
        service: SVC_WEB,
        slices: &[],
        node: NODE_A,
        expect: &["10.96.0.10:80/TCP ClusterIP => "],
        skips: &[],
    },
    Case {
        name: "a slice of another service is ignored",
        service: SVC_WEB,
        slices: &[r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: other, namespace: demo, labels: {kubernetes.io/service-name: other}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.9.9]}]
"#],
        node: NODE_A,
        expect: &["10.96.0.10:80/TCP ClusterIP => "],
        skips: &[],
    },
    Case {
        name: "ports are matched by name, so each service port gets its own target port",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: multi, namespace: demo}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: http, port: 80, targetPort: web}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
"#,
        slices: &[r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: multi-1, namespace: demo, labels: {kubernetes.io/service-name: multi}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.244.0.21]}]
"#],
        node: NODE_A,
        expect: &[
            "10.96.0.20:53/UDP ClusterIP => 10.244.0.21:5353/UDP",
            "10.96.0.20:80/TCP ClusterIP => 10.244.0.21:8080/TCP",
        ],
        skips: &[],
    },
    Case {
        name: "one port name with two protocols is matched per protocol",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: demo}
spec:
  clusterIP: 10.96.0.53
  ports:
  - {name: dns-tcp, port: 53, protocol: TCP}
  - {name: dns, port: 53, protocol: UDP}
"#,
        slices: &[r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: demo, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns-tcp, port: 5053, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}, {name: dns, port: 6363, protocol: TCP}]
endpoints: [{addresses: [10.244.0.53]}]
"#],
        node: NODE_A,
        expect: &[
            "10.96.0.53:53/TCP ClusterIP => 10.244.0.53:5053/TCP",
            "10.96.0.53:53/UDP ClusterIP => 10.244.0.53:5353/UDP",
        ],
        skips: &[],
    },
    Case {
        name: "dual-stack clusterIPs get one frontend per family with that family's endpoints",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: ds, namespace: demo}
spec:
  clusterIP: 10.96.0.30
  clusterIPs: [10.96.0.30, "fd00:10:96::30"]
  ports: [{port: 80}]
"#,
        slices: &[
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-v4, namespace: demo, labels: {kubernetes.io/service-name: ds}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.0.31]}]
"#,
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-v6, namespace: demo, labels: {kubernetes.io/service-name: ds}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ["fd00:10:244::31"]}]
"#,
        ],
        node: NODE_A,
        expect: &[
            "10.96.0.30:80/TCP ClusterIP => 10.244.0.31:8080/TCP",
            "[fd00:10:96::30]:80/TCP ClusterIP => [fd00:10:244::31]:8080/TCP",
        ],
        skips: &[],
    },
    Case {
        name: "headless services are not programmed",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: hl, namespace: demo}
spec: {clusterIP: None, ports: [{port: 80}]}
"#,
        slices: &[],
        node: NODE_A,
        expect: &[],
        skips: &[],
    },
    Case {
        name: "a service without a clusterIP is not programmed",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: noip, namespace: demo}
spec: {ports: [{port: 80}]}
"#,
        slices: &[],
        node: NODE_A,
        expect: &[],
        skips: &[],
    },
    Case {
        name: "ExternalName services are not programmed",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: demo}
spec: {type: ExternalName, externalName: example.com, clusterIP: 10.96.0.99, ports: [{port: 80}]}
"#,
        slices: &[],
        node: NODE_A,
        expect: &[],
        skips: &[],
    },
    Case {
        name: "an unknown service type is a counted skip",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: odd, namespace: demo}
spec: {type: Magic, clusterIP: 10.96.0.98, ports: [{port: 80}]}
"#,
        slices: &[],
        node: NODE_A,
        expect: &[],
        skips: &[SkipReason::UnsupportedType],
    },
    Case {
        name: "SCTP ports are a counted skip; the other ports are programmed",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: sctp, namespace: demo}
spec:
  clusterIP: 10.96.0.40
  ports: [{name: a, port: 9, protocol: SCTP}, {name: b, port: 80}]
"#,
        slices: &[r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sctp-1, namespace: demo, labels: {kubernetes.io/service-name: sctp}}
addressType: IPv4
ports: [{name: a, port: 9, protocol: SCTP}, {name: b, port: 8080}]
endpoints: [{addresses: [10.244.0.41]}]
"#],
        node: NODE_A,
        expect: &["10.96.0.40:80/TCP ClusterIP => 10.244.0.41:8080/TCP"],
        skips: &[SkipReason::UnsupportedProtocol],
    },
    Case {
        name: "an invalid clusterIP is a counted skip",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: demo}
spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
"#,
        slices: &[],
        node: NODE_A,
        expect: &[],
        skips: &[SkipReason::InvalidAddress],
    },
    Case {
        name: "a second clusterIP of one family is a counted skip; the first one is programmed",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: two, namespace: demo}
spec:
  clusterIPs: [10.96.0.80, 10.96.0.81]
  ports: [{port: 80}]
"#,
        slices: &[],
        node: NODE_A,
        expect: &["10.96.0.80:80/TCP ClusterIP => "],
        skips: &[SkipReason::InvalidAddress],
    },
    Case {
        name: "service ports 0 and 70000 are counted skips",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: ports, namespace: demo}
spec:
  clusterIP: 10.96.0.60
  ports: [{name: zero, port: 0}, {name: big, port: 70000}, {name: ok, port: 80}]
"#,
        slices: &[],
        node: NODE_A,
        expect: &["10.96.0.60:80/TCP ClusterIP => "],
        skips: &[SkipReason::InvalidPort, SkipReason::InvalidPort],
    },
    Case {
        name: "slice ports 0 and 70000 and bad endpoint addresses are counted skips, once each",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: badeps, namespace: demo}
spec:
  clusterIP: 10.96.0.61
  clusterIPs: [10.96.0.61, "fd00:10:96::61"]
  ports: [{name: a, port: 80}, {name: b, port: 81}, {name: c, port: 82}]
"#,
        slices: &[r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: badeps-1, namespace: demo, labels: {kubernetes.io/service-name: badeps}}
addressType: IPv4
ports: [{name: a, port: 0}, {name: b, port: 70000}, {name: c, port: 8082}]
endpoints:
- addresses: [10.244.0.300]
- addresses: ["fd00::1"]
- addresses: [10.244.0.61]
"#],
        node: NODE_A,
        expect: &[
            "10.96.0.61:80/TCP ClusterIP => ",
            "10.96.0.61:81/TCP ClusterIP => ",
            "10.96.0.61:82/TCP ClusterIP => 10.244.0.61:8082/TCP",
            "[fd00:10:96::61]:80/TCP ClusterIP => ",
            "[fd00:10:96::61]:81/TCP ClusterIP => ",
            "[fd00:10:96::61]:82/TCP ClusterIP => ",
        ],
        skips: &[
            SkipReason::InvalidPort,
            SkipReason::InvalidPort,
            SkipReason::InvalidAddress,
            SkipReason::InvalidAddress,
        ],
    },
    Case {
        name: "FQDN slices are ignored without a skip",
        service: SVC_WEB,
        slices: &[r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-fqdn, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: FQDN
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [backend.example.com]}]
"#],
        node: NODE_A,
        expect: &["10.96.0.10:80/TCP ClusterIP => "],
        skips: &[],
    },
    Case {
        name: "a slice port of another protocol does not match",
        service: SVC_WEB,
        slices: &[r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-u, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: UDP}]
endpoints: [{addresses: [10.244.0.71]}]
"#],
        node: NODE_A,
        expect: &["10.96.0.10:80/TCP ClusterIP => "],
        skips: &[],
    },
    // --- affinity -----------------------------------------------------------
    Case {
        name: "sessionAffinity ClientIP defaults to a 10800 s timeout",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: demo}
spec: {clusterIP: 10.96.0.50, sessionAffinity: ClientIP, ports: [{port: 80}]}
"#,
        slices: &[],
        node: NODE_A,
        expect: &["10.96.0.50:80/TCP ClusterIP affinity=10800 => "],
        skips: &[],
    },
    Case {
        name: "sessionAffinityConfig sets the timeout on every frontend of the service",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.0.50
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  externalIPs: [203.0.113.50]
  ports: [{port: 80, nodePort: 30050}]
"#,
        slices: &[],
        node: NODE_A,
        expect: &[
            "10.96.0.50:80/TCP ClusterIP affinity=60 => ",
            "127.0.0.1:30050/TCP NodePort affinity=60 => ",
            "192.168.1.10:30050/TCP NodePort affinity=60 => ",
            "203.0.113.50:80/TCP ExternalIP affinity=60 => ",
        ],
        skips: &[],
    },
    // --- terminating endpoints (KEP-1669) -----------------------------------
    Case {
        name: "with no ready endpoint, serving terminating endpoints are used",
        service: SVC_WEB,
        slices: &[r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-t, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.0.61]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.244.0.62]
  conditions: {ready: false, serving: false, terminating: true}
- addresses: [10.244.0.63]
  conditions: {ready: false, terminating: true}
"#],
        node: NODE_A,
        // kube-proxy reads an unset serving as true.
        expect: &["10.96.0.10:80/TCP ClusterIP => 10.244.0.61:8080/TCP~, 10.244.0.63:8080/TCP~"],
        skips: &[],
    },
    Case {
        name: "terminating endpoints are left out while one endpoint is ready",
        service: SVC_WEB,
        slices: &[r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-t, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.0.61]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.244.0.64]
"#],
        node: NODE_A,
        expect: &["10.96.0.10:80/TCP ClusterIP => 10.244.0.64:8080/TCP"],
        skips: &[],
    },
    Case {
        name: "an endpoint repeated across slices counts once, the ready copy winning",
        service: SVC_WEB,
        slices: &[
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-old, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.0.81]
  conditions: {ready: false, serving: true, terminating: true}
"#,
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-new, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.0.81]
- addresses: [10.244.0.82]
  conditions: {ready: false, serving: true, terminating: true}
"#,
        ],
        node: NODE_A,
        expect: &["10.96.0.10:80/TCP ClusterIP => 10.244.0.81:8080/TCP"],
        skips: &[],
    },
    // --- labels -------------------------------------------------------------
    Case {
        name: "a service labelled service-proxy-name belongs to another proxy: nothing, no skip",
        service: r#"
apiVersion: v1
kind: Service
metadata:
  name: other-proxy
  namespace: demo
  labels: {service.kubernetes.io/service-proxy-name: some-other-proxy}
spec: {clusterIP: 10.96.0.70, ports: [{port: 80}]}
"#,
        slices: &[],
        node: NODE_A,
        expect: &[],
        skips: &[],
    },
    Case {
        name: "a service labelled headless is not programmed",
        service: r#"
apiVersion: v1
kind: Service
metadata:
  name: labelled
  namespace: demo
  labels: {service.kubernetes.io/headless: ""}
spec: {clusterIP: 10.96.0.71, ports: [{port: 80}]}
"#,
        slices: &[],
        node: NODE_A,
        expect: &[],
        skips: &[],
    },
    Case {
        name: "slices labelled headless or service-proxy-name are ignored",
        service: SVC_WEB,
        slices: &[
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-hl
  namespace: demo
  labels: {kubernetes.io/service-name: web, service.kubernetes.io/headless: ""}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.91]}]
"#,
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-px
  namespace: demo
  labels: {kubernetes.io/service-name: web, service.kubernetes.io/service-proxy-name: other}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.92]}]
"#,
            SLICE_WEB_A,
        ],
        node: NODE_A,
        expect: &["10.96.0.10:80/TCP ClusterIP => 10.244.0.11:8080/TCP, 10.244.0.12:8080/TCP"],
        skips: &[],
    },
    // --- NodePort -----------------------------------------------------------
    Case {
        name: "a NodePort service gets the clusterIP plus the nodePort on each node IP of its family and 127.0.0.1",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: np, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.1.1
  ports: [{name: http, port: 80, nodePort: 30080}]
"#,
        slices: &[r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-1, namespace: demo, labels: {kubernetes.io/service-name: np}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.1.1], nodeName: node-b}]
"#],
        node: NODE_A,
        expect: &[
            "10.96.1.1:80/TCP ClusterIP => 10.244.1.1:8080/TCP",
            "127.0.0.1:30080/TCP NodePort => 10.244.1.1:8080/TCP",
            "192.168.1.10:30080/TCP NodePort => 10.244.1.1:8080/TCP",
        ],
        skips: &[],
    },
    Case {
        name: "a dual-stack UDP NodePort gets IPv6 node IPs too, and [::] for every other IPv6 address of the node",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: np6, namespace: demo}
spec:
  type: NodePort
  clusterIPs: [10.96.1.2, "fd00:10:96::1:2"]
  ports: [{name: dns, port: 53, protocol: UDP, nodePort: 30053}]
"#,
        slices: &[r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np6-v6, namespace: demo, labels: {kubernetes.io/service-name: np6}}
addressType: IPv6
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: ["fd00:10:244::1:2"]}]
"#],
        node: NODE_A,
        expect: &[
            "10.96.1.2:53/UDP ClusterIP => ",
            "127.0.0.1:30053/UDP NodePort => ",
            "192.168.1.10:30053/UDP NodePort => ",
            "[::]:30053/UDP NodePort => [fd00:10:244::1:2]:5353/UDP",
            "[fd00:10:96::1:2]:53/UDP ClusterIP => [fd00:10:244::1:2]:5353/UDP",
            "[fd00:192:168:1::10]:30053/UDP NodePort => [fd00:10:244::1:2]:5353/UDP",
        ],
        skips: &[],
    },
    Case {
        name: "with no known node IP a NodePort is served on 127.0.0.1 only",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: np, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.1.1
  ports: [{name: http, port: 80, nodePort: 30080}]
"#,
        slices: &[],
        node: NODE_UNKNOWN,
        expect: &[
            "10.96.1.1:80/TCP ClusterIP => ",
            "127.0.0.1:30080/TCP NodePort => ",
        ],
        skips: &[],
    },
    Case {
        name: "an out-of-range nodePort is a counted skip; the clusterIP is programmed",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: np, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.1.1
  ports: [{name: http, port: 80, nodePort: 70000}]
"#,
        slices: &[],
        node: NODE_A,
        expect: &["10.96.1.1:80/TCP ClusterIP => "],
        skips: &[SkipReason::InvalidPort],
    },
    Case {
        name: "a nodePort on a ClusterIP service is a counted skip",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: cnp, namespace: demo}
spec:
  clusterIP: 10.96.1.3
  ports: [{name: http, port: 80, nodePort: 30081}]
"#,
        slices: &[],
        node: NODE_A,
        expect: &["10.96.1.3:80/TCP ClusterIP => "],
        skips: &[SkipReason::InvalidPort],
    },
    Case {
        name: "an externalIP equal to a node IP on the nodePort is a counted duplicate",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: clash, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.1.4
  externalIPs: [192.168.1.10]
  ports: [{name: http, port: 30084, nodePort: 30084}]
"#,
        slices: &[],
        node: NODE_A,
        expect: &[
            "10.96.1.4:30084/TCP ClusterIP => ",
            "127.0.0.1:30084/TCP NodePort => ",
            "192.168.1.10:30084/TCP NodePort => ",
        ],
        skips: &[SkipReason::Duplicate],
    },
    // --- LoadBalancer and externalIPs ---------------------------------------
    Case {
        name: "a LoadBalancer gets ClusterIP, NodePort and its VIP-mode ingress IPs; Proxy-mode and hostname ingress are not programmed",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: demo}
spec:
  type: LoadBalancer
  clusterIP: 10.96.3.1
  ports: [{name: http, port: 80, nodePort: 30180}]
status:
  loadBalancer:
    ingress:
    - {ip: 198.51.100.1}
    - {ip: 198.51.100.2, ipMode: VIP}
    - {ip: 198.51.100.3, ipMode: Proxy}
    - {hostname: lb.example.com}
"#,
        slices: &[SLICE_POL],
        node: NODE_A,
        expect: &[
            "10.96.3.1:80/TCP ClusterIP => ",
            "127.0.0.1:30180/TCP NodePort => ",
            "192.168.1.10:30180/TCP NodePort => ",
            "198.51.100.1:80/TCP LoadBalancer => ",
            "198.51.100.2:80/TCP LoadBalancer => ",
        ],
        skips: &[],
    },
    Case {
        name: "loadBalancerSourceRanges restrict the LoadBalancer frontends only, each family to its own prefixes; invalid entries are counted skips",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: guarded, namespace: demo}
spec:
  type: LoadBalancer
  clusterIPs: [10.96.3.9, "fd00:10:96::39"]
  ipFamilies: [IPv4, IPv6]
  externalIPs: [203.0.113.99]
  loadBalancerSourceRanges:
  - " 192.0.2.0/24 "
  - 010.1.2.3/8
  - not-a-cidr
  - ""
  - 2001:db8::/32
  - ::ffff:203.0.113.0/120
  - 192.0.2.0/24
  ports: [{name: http, port: 80, nodePort: 30190}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.9}, {ip: "2001:db8:ff::9"}]
"#,
        slices: &[],
        node: NODE_A,
        expect: &[
            "10.96.3.9:80/TCP ClusterIP => ",
            "127.0.0.1:30190/TCP NodePort => ",
            "192.168.1.10:30190/TCP NodePort => ",
            "198.51.100.9:80/TCP LoadBalancer src=10.0.0.0/8,192.0.2.0/24,203.0.113.0/24 => ",
            "203.0.113.99:80/TCP ExternalIP => ",
            "[2001:db8:ff::9]:80/TCP LoadBalancer src=2001:db8::/32 => ",
            "[::]:30190/TCP NodePort => ",
            "[fd00:10:96::39]:80/TCP ClusterIP => ",
            "[fd00:192:168:1::10]:30190/TCP NodePort => ",
        ],
        skips: &[SkipReason::InvalidAddress],
    },
    Case {
        name: "source ranges holding a node address let node-local clients in; with externalTrafficPolicy Local they sit on the External entry",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: guarded-local, namespace: demo}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  clusterIP: 10.96.3.10
  externalTrafficPolicy: Local
  healthCheckNodePort: 31090
  loadBalancerSourceRanges: [192.168.0.0/16]
  ports: [{name: http, port: 80}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.10}]
"#,
        slices: &[],
        node: NODE_A,
        expect: &[
            "# health-check 31090 demo/guarded-local local=0",
            "10.96.3.10:80/TCP ClusterIP => ",
            "198.51.100.10:80/TCP LoadBalancer etp-local has-int src=192.168.0.0/16 src-node => ",
            "198.51.100.10:80/TCP/i LoadBalancer => ",
        ],
        skips: &[],
    },
    Case {
        name: "loadBalancerSourceRanges are ignored on a NodePort Service",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: np-ranges, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.3.11
  loadBalancerSourceRanges: [192.0.2.0/24]
  ports: [{name: http, port: 80, nodePort: 30191}]
"#,
        slices: &[],
        node: NODE_A_NO_ZONE,
        expect: &[
            "10.96.3.11:80/TCP ClusterIP => ",
            "127.0.0.1:30191/TCP NodePort => ",
            "192.168.1.10:30191/TCP NodePort => ",
        ],
        skips: &[],
    },
    Case {
        name: "a LoadBalancer whose source ranges are all invalid is open to every client, as for kube-proxy",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: lb-bad-ranges, namespace: demo}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  clusterIP: 10.96.3.12
  loadBalancerSourceRanges: [10.0.0.0/33, 10.0.0/8]
  ports: [{name: http, port: 80}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.12}]
"#,
        slices: &[],
        node: NODE_A_NO_ZONE,
        expect: &[
            "10.96.3.12:80/TCP ClusterIP => ",
            "198.51.100.12:80/TCP LoadBalancer => ",
        ],
        skips: &[SkipReason::InvalidAddress, SkipReason::InvalidAddress],
    },
    Case {
        name: "a LoadBalancer without node ports (allocateLoadBalancerNodePorts false) gets ClusterIP and LoadBalancer only",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  clusterIP: 10.96.3.2
  ports: [{name: http, port: 80}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.4}]
"#,
        slices: &[SLICE_POL],
        node: NODE_A,
        expect: &[
            "10.96.3.2:80/TCP ClusterIP => 10.244.1.1:8080/TCP, 10.244.2.1:8080/TCP",
            "198.51.100.4:80/TCP LoadBalancer => 10.244.1.1:8080/TCP, 10.244.2.1:8080/TCP",
        ],
        skips: &[],
    },
    Case {
        name: "load balancer ingress is read only for type LoadBalancer",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: was-lb, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.3.5
  ports: [{name: http, port: 80, nodePort: 30185}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.5}]}}
"#,
        slices: &[],
        node: NODE_A_NO_ZONE,
        expect: &[
            "10.96.3.5:80/TCP ClusterIP => ",
            "127.0.0.1:30185/TCP NodePort => ",
            "192.168.1.10:30185/TCP NodePort => ",
        ],
        skips: &[],
    },
    Case {
        name: "externalIPs become ExternalIP frontends on the service port",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec:
  clusterIP: 10.96.3.3
  externalIPs: [203.0.113.3, 203.0.113.4]
  ports: [{name: http, port: 80}]
"#,
        slices: &[SLICE_POL],
        node: NODE_A,
        expect: &[
            "10.96.3.3:80/TCP ClusterIP => 10.244.1.1:8080/TCP, 10.244.2.1:8080/TCP",
            "203.0.113.3:80/TCP ExternalIP => 10.244.1.1:8080/TCP, 10.244.2.1:8080/TCP",
            "203.0.113.4:80/TCP ExternalIP => 10.244.1.1:8080/TCP, 10.244.2.1:8080/TCP",
        ],
        skips: &[],
    },
    Case {
        name: "external addresses that do not parse or lack a clusterIP of their family are counted skips",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: fam, namespace: demo}
spec:
  type: LoadBalancer
  clusterIP: 10.96.3.4
  externalIPs: [203.0.113.300, "2001:db8::4", 203.0.113.5]
  ports: [{name: http, port: 80}]
status:
  loadBalancer:
    ingress: [{ip: "2001:db8::5"}, {ip: not-an-ip}]
"#,
        slices: &[],
        node: NODE_A,
        expect: &[
            "10.96.3.4:80/TCP ClusterIP => ",
            "203.0.113.5:80/TCP ExternalIP => ",
        ],
        skips: &[
            SkipReason::InvalidAddress,
            SkipReason::InvalidAddress,
            SkipReason::InvalidAddress,
            SkipReason::InvalidAddress,
        ],
    },
    // --- internalTrafficPolicy (KEP-2086) -----------------------------------
    Case {
        name: "internalTrafficPolicy Local gives the clusterIP only this node's endpoints",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec: {clusterIP: 10.96.4.1, internalTrafficPolicy: Local, ports: [{name: http, port: 80}]}
"#,
        slices: &[SLICE_POL],
        node: NODE_A,
        expect: &["10.96.4.1:80/TCP ClusterIP itp-local => 10.244.1.1:8080/TCP"],
        skips: &[],
    },
    Case {
        name: "internalTrafficPolicy Local without local endpoints: no backend, counted",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec: {clusterIP: 10.96.4.1, internalTrafficPolicy: Local, ports: [{name: http, port: 80}]}
"#,
        slices: &[SLICE_POL_REMOTE],
        node: NODE_A,
        expect: &[
            "# no-local-endpoints internal demo/pol:http IPv4",
            "10.96.4.1:80/TCP ClusterIP itp-local => ",
        ],
        skips: &[],
    },
    Case {
        name: "internalTrafficPolicy Local with no endpoint anywhere is not a no-local-endpoints case",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec: {clusterIP: 10.96.4.1, internalTrafficPolicy: Local, ports: [{name: http, port: 80}]}
"#,
        slices: &[],
        node: NODE_A,
        expect: &["10.96.4.1:80/TCP ClusterIP itp-local => "],
        skips: &[],
    },
    Case {
        name: "internalTrafficPolicy Local falls back to local serving terminating endpoints, not to remote ready ones",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec: {clusterIP: 10.96.4.1, internalTrafficPolicy: Local, ports: [{name: http, port: 80}]}
"#,
        slices: &[SLICE_POL_LOCAL_TERMINATING],
        node: NODE_A,
        expect: &["10.96.4.1:80/TCP ClusterIP itp-local => 10.244.1.1:8080/TCP~"],
        skips: &[],
    },
    Case {
        name: "internalTrafficPolicy Local on a node without a name finds no local endpoint",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec: {clusterIP: 10.96.4.1, internalTrafficPolicy: Local, ports: [{name: http, port: 80}]}
"#,
        slices: &[SLICE_POL],
        node: NODE_UNKNOWN,
        expect: &[
            "# no-local-endpoints internal demo/pol:http IPv4",
            "10.96.4.1:80/TCP ClusterIP itp-local => ",
        ],
        skips: &[],
    },
    Case {
        name: "an endpoint repeated across slices is local if any copy is",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec: {clusterIP: 10.96.4.1, internalTrafficPolicy: Local, ports: [{name: http, port: 80}]}
"#,
        slices: &[
            SLICE_POL_REMOTE,
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: pol-2, namespace: demo, labels: {kubernetes.io/service-name: pol}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.2.1], nodeName: node-a}
"#,
        ],
        node: NODE_A,
        expect: &["10.96.4.1:80/TCP ClusterIP itp-local => 10.244.2.1:8080/TCP"],
        skips: &[],
    },
    // --- externalTrafficPolicy ----------------------------------------------
    Case {
        name: "externalTrafficPolicy Local: external entries get local endpoints, internal-scope twins the cluster set, the clusterIP is unaffected",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIP: 10.96.5.1
  ports: [{name: http, port: 80, nodePort: 30500}]
"#,
        slices: &[SLICE_POL],
        node: NODE_A,
        expect: &[
            "10.96.5.1:80/TCP ClusterIP => 10.244.1.1:8080/TCP, 10.244.2.1:8080/TCP",
            "127.0.0.1:30500/TCP NodePort etp-local has-int => 10.244.1.1:8080/TCP",
            "127.0.0.1:30500/TCP/i NodePort => 10.244.1.1:8080/TCP, 10.244.2.1:8080/TCP",
            "192.168.1.10:30500/TCP NodePort etp-local has-int => 10.244.1.1:8080/TCP",
            "192.168.1.10:30500/TCP/i NodePort => 10.244.1.1:8080/TCP, 10.244.2.1:8080/TCP",
        ],
        skips: &[],
    },
    Case {
        name: "externalTrafficPolicy Local without local endpoints: external entries empty, counted; node-local clients still reach all",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIP: 10.96.5.1
  ports: [{name: http, port: 80, nodePort: 30500}]
"#,
        slices: &[SLICE_POL_REMOTE],
        node: NODE_A,
        expect: &[
            "# no-local-endpoints external demo/pol:http IPv4",
            "10.96.5.1:80/TCP ClusterIP => 10.244.2.1:8080/TCP, 10.244.3.1:8080/TCP",
            "127.0.0.1:30500/TCP NodePort etp-local has-int => ",
            "127.0.0.1:30500/TCP/i NodePort => 10.244.2.1:8080/TCP, 10.244.3.1:8080/TCP",
            "192.168.1.10:30500/TCP NodePort etp-local has-int => ",
            "192.168.1.10:30500/TCP/i NodePort => 10.244.2.1:8080/TCP, 10.244.3.1:8080/TCP",
        ],
        skips: &[],
    },
    Case {
        name: "externalTrafficPolicy Local falls back to local terminating endpoints on the external entries only",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec:
  clusterIP: 10.96.5.2
  externalTrafficPolicy: Local
  externalIPs: [203.0.113.52]
  ports: [{name: http, port: 80}]
"#,
        slices: &[SLICE_POL_LOCAL_TERMINATING],
        node: NODE_A,
        expect: &[
            "10.96.5.2:80/TCP ClusterIP => 10.244.2.1:8080/TCP",
            "203.0.113.52:80/TCP ExternalIP etp-local has-int => 10.244.1.1:8080/TCP~",
            "203.0.113.52:80/TCP/i ExternalIP => 10.244.2.1:8080/TCP",
        ],
        skips: &[],
    },
    Case {
        name: "externalTrafficPolicy Local on a LoadBalancer serves its health check node port with the local ready count",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 32100
  clusterIP: 10.96.5.3
  ports: [{name: http, port: 80, nodePort: 30503}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.53}]}}
"#,
        slices: &[SLICE_POL],
        node: NODE_A_NO_ZONE,
        expect: &[
            "# health-check 32100 demo/pol local=1",
            "10.96.5.3:80/TCP ClusterIP => 10.244.1.1:8080/TCP, 10.244.2.1:8080/TCP",
            "127.0.0.1:30503/TCP NodePort etp-local has-int => 10.244.1.1:8080/TCP",
            "127.0.0.1:30503/TCP/i NodePort => 10.244.1.1:8080/TCP, 10.244.2.1:8080/TCP",
            "192.168.1.10:30503/TCP NodePort etp-local has-int => 10.244.1.1:8080/TCP",
            "192.168.1.10:30503/TCP/i NodePort => 10.244.1.1:8080/TCP, 10.244.2.1:8080/TCP",
            "198.51.100.53:80/TCP LoadBalancer etp-local has-int => 10.244.1.1:8080/TCP",
            "198.51.100.53:80/TCP/i LoadBalancer => 10.244.1.1:8080/TCP, 10.244.2.1:8080/TCP",
        ],
        skips: &[],
    },
    Case {
        name: "a health check counts only local ready endpoints: terminating ones drain the node",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  externalTrafficPolicy: Local
  healthCheckNodePort: 32101
  clusterIP: 10.96.5.4
  ports: [{name: http, port: 80}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.54}]}}
"#,
        slices: &[SLICE_POL_LOCAL_TERMINATING],
        node: NODE_A,
        expect: &[
            "# health-check 32101 demo/pol local=0",
            "10.96.5.4:80/TCP ClusterIP => 10.244.2.1:8080/TCP",
            "198.51.100.54:80/TCP LoadBalancer etp-local has-int => 10.244.1.1:8080/TCP~",
            "198.51.100.54:80/TCP/i LoadBalancer => 10.244.2.1:8080/TCP",
        ],
        skips: &[],
    },
    Case {
        name: "externalTrafficPolicy Local on a LoadBalancer without healthCheckNodePort is a counted skip",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  externalTrafficPolicy: Local
  clusterIP: 10.96.5.5
  ports: [{name: http, port: 80}]
"#,
        slices: &[SLICE_POL],
        node: NODE_A,
        expect: &["10.96.5.5:80/TCP ClusterIP => 10.244.1.1:8080/TCP, 10.244.2.1:8080/TCP"],
        skips: &[SkipReason::InvalidPort],
    },
    Case {
        name: "externalTrafficPolicy Local on a ClusterIP service without externalIPs changes nothing",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec: {clusterIP: 10.96.5.6, externalTrafficPolicy: Local, ports: [{name: http, port: 80}]}
"#,
        slices: &[SLICE_POL_REMOTE],
        node: NODE_A,
        expect: &["10.96.5.6:80/TCP ClusterIP => 10.244.2.1:8080/TCP, 10.244.3.1:8080/TCP"],
        skips: &[],
    },
    Case {
        name: "both policies Local: clusterIP and external entries local, internal-scope twins the cluster set; two counts",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  clusterIP: 10.96.5.7
  ports: [{name: http, port: 80, nodePort: 30507}]
"#,
        slices: &[SLICE_POL_REMOTE],
        node: NODE_A_NO_ZONE,
        expect: &[
            "# no-local-endpoints external demo/pol:http IPv4",
            "# no-local-endpoints internal demo/pol:http IPv4",
            "10.96.5.7:80/TCP ClusterIP itp-local => ",
            "127.0.0.1:30507/TCP NodePort etp-local has-int => ",
            "127.0.0.1:30507/TCP/i NodePort => 10.244.2.1:8080/TCP, 10.244.3.1:8080/TCP",
            "192.168.1.10:30507/TCP NodePort etp-local has-int => ",
            "192.168.1.10:30507/TCP/i NodePort => 10.244.2.1:8080/TCP, 10.244.3.1:8080/TCP",
        ],
        skips: &[],
    },
    // --- topology (KEP-2433, KEP-4444, KEP-3015) ----------------------------
    Case {
        name: "zone hints: when every ready endpoint is hinted and some for our zone, only those are used",
        service: SVC_ZONED,
        slices: &[SLICE_ZONED_HINTED],
        node: NODE_A,
        expect: &["10.96.2.1:80/TCP ClusterIP => 10.244.1.1:8080/TCP, 10.244.1.2:8080/TCP"],
        skips: &[],
    },
    Case {
        name: "zone hints: one ready endpoint without a hint disables them",
        service: SVC_ZONED,
        slices: &[
            SLICE_ZONED_HINTED,
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: zoned-2, namespace: demo, labels: {kubernetes.io/service-name: zoned}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.2.2], zone: zone-b}
"#,
        ],
        node: NODE_A,
        expect: &["10.96.2.1:80/TCP ClusterIP => 10.244.1.1:8080/TCP, 10.244.1.2:8080/TCP, 10.244.2.1:8080/TCP, 10.244.2.2:8080/TCP"],
        skips: &[],
    },
    Case {
        name: "zone hints: a not-ready endpoint without a hint does not disable them",
        service: SVC_ZONED,
        slices: &[
            SLICE_ZONED_HINTED,
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: zoned-2, namespace: demo, labels: {kubernetes.io/service-name: zoned}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.2.2], zone: zone-b, conditions: {ready: false}}
"#,
        ],
        node: NODE_A,
        expect: &["10.96.2.1:80/TCP ClusterIP => 10.244.1.1:8080/TCP, 10.244.1.2:8080/TCP"],
        skips: &[],
    },
    Case {
        name: "zone hints: none for our zone means all endpoints",
        service: SVC_ZONED,
        slices: &[r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: zoned-1, namespace: demo, labels: {kubernetes.io/service-name: zoned}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.2.1], zone: zone-b, hints: {forZones: [{name: zone-b}]}}
- {addresses: [10.244.3.1], zone: zone-c, hints: {forZones: [{name: zone-c}]}}
"#],
        node: NODE_A,
        expect: &["10.96.2.1:80/TCP ClusterIP => 10.244.2.1:8080/TCP, 10.244.3.1:8080/TCP"],
        skips: &[],
    },
    Case {
        name: "zone hints: a node without a zone label uses all endpoints",
        service: SVC_ZONED,
        slices: &[SLICE_ZONED_HINTED],
        node: NODE_A_NO_ZONE,
        expect: &["10.96.2.1:80/TCP ClusterIP => 10.244.1.1:8080/TCP, 10.244.1.2:8080/TCP, 10.244.2.1:8080/TCP"],
        skips: &[],
    },
    Case {
        name: "trafficDistribution PreferClose acts through the hints the controller writes",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: zoned, namespace: demo}
spec: {clusterIP: 10.96.2.1, trafficDistribution: PreferClose, ports: [{name: http, port: 80}]}
"#,
        slices: &[SLICE_ZONED_HINTED],
        node: NODE_A,
        expect: &["10.96.2.1:80/TCP ClusterIP => 10.244.1.1:8080/TCP, 10.244.1.2:8080/TCP"],
        skips: &[],
    },
    Case {
        name: "trafficDistribution PreferClose without hints (yet) uses all endpoints",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec: {clusterIP: 10.96.2.2, trafficDistribution: PreferClose, ports: [{name: http, port: 80}]}
"#,
        slices: &[SLICE_POL],
        node: NODE_A,
        expect: &["10.96.2.2:80/TCP ClusterIP => 10.244.1.1:8080/TCP, 10.244.2.1:8080/TCP"],
        skips: &[],
    },
    Case {
        name: "node hints (PreferSameNode) take precedence over zone hints",
        service: SVC_ZONED,
        slices: &[r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: zoned-1, namespace: demo, labels: {kubernetes.io/service-name: zoned}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.1], nodeName: node-a, hints: {forNodes: [{name: node-a}], forZones: [{name: zone-a}]}}
- {addresses: [10.244.1.2], nodeName: node-a2, hints: {forNodes: [{name: node-a2}], forZones: [{name: zone-a}]}}
"#],
        node: NODE_A,
        expect: &["10.96.2.1:80/TCP ClusterIP => 10.244.1.1:8080/TCP"],
        skips: &[],
    },
    Case {
        name: "hints do not apply to terminating fallback endpoints",
        service: SVC_ZONED,
        slices: &[r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: zoned-1, namespace: demo, labels: {kubernetes.io/service-name: zoned}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.1], hints: {forZones: [{name: zone-a}]}, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.2.1], hints: {forZones: [{name: zone-b}]}, conditions: {ready: false, serving: true, terminating: true}}
"#],
        node: NODE_A,
        expect: &["10.96.2.1:80/TCP ClusterIP => 10.244.1.1:8080/TCP~, 10.244.2.1:8080/TCP~"],
        skips: &[],
    },
    Case {
        name: "internalTrafficPolicy Local takes precedence over hints",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: zoned, namespace: demo}
spec: {clusterIP: 10.96.2.1, internalTrafficPolicy: Local, ports: [{name: http, port: 80}]}
"#,
        slices: &[r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: zoned-1, namespace: demo, labels: {kubernetes.io/service-name: zoned}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.1], nodeName: node-a, hints: {forZones: [{name: zone-b}]}}
- {addresses: [10.244.2.1], nodeName: node-b, hints: {forZones: [{name: zone-a}]}}
"#],
        node: NODE_A,
        expect: &["10.96.2.1:80/TCP ClusterIP itp-local => 10.244.1.1:8080/TCP"],
        skips: &[],
    },
    Case {
        name: "externalTrafficPolicy Local ignores hints; the internal-scope twin and the clusterIP follow them",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: zoned, namespace: demo}
spec:
  clusterIP: 10.96.2.1
  externalTrafficPolicy: Local
  externalIPs: [203.0.113.21]
  ports: [{name: http, port: 80}]
"#,
        slices: &[r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: zoned-1, namespace: demo, labels: {kubernetes.io/service-name: zoned}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.1], nodeName: node-a, hints: {forZones: [{name: zone-b}]}}
- {addresses: [10.244.2.1], nodeName: node-b, hints: {forZones: [{name: zone-a}]}}
"#],
        node: NODE_A,
        expect: &[
            "10.96.2.1:80/TCP ClusterIP => 10.244.2.1:8080/TCP",
            "203.0.113.21:80/TCP ExternalIP etp-local has-int => 10.244.1.1:8080/TCP",
            "203.0.113.21:80/TCP/i ExternalIP => 10.244.2.1:8080/TCP",
        ],
        skips: &[],
    },
    // --- lb-algorithm annotation --------------------------------------------
    Case {
        name: "the maglev annotation sets Maglev on NodePort, LoadBalancer and externalIP frontends, not on the ClusterIP",
        service: r#"
apiVersion: v1
kind: Service
metadata:
  name: hashed
  namespace: demo
  annotations: {service.kpr.io/lb-algorithm: maglev}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.60
  externalIPs: [203.0.113.60]
  ports: [{port: 80, nodePort: 30060}]
status: {loadBalancer: {ingress: [{ip: 198.51.100.60}]}}
"#,
        slices: &[],
        node: NODE_A,
        expect: &[
            "10.96.0.60:80/TCP ClusterIP => ",
            "127.0.0.1:30060/TCP NodePort maglev => ",
            "192.168.1.10:30060/TCP NodePort maglev => ",
            "198.51.100.60:80/TCP LoadBalancer maglev => ",
            "203.0.113.60:80/TCP ExternalIP maglev => ",
        ],
        skips: &[],
    },
    Case {
        name: "with externalTrafficPolicy Local, Maglev is on the external-scope entry only (node-local clients use the socket hooks)",
        service: r#"
apiVersion: v1
kind: Service
metadata:
  name: hashed
  namespace: demo
  annotations: {service.kpr.io/lb-algorithm: maglev}
spec:
  type: NodePort
  clusterIP: 10.96.0.61
  externalTrafficPolicy: Local
  ports: [{port: 80, nodePort: 30061}]
"#,
        slices: &[],
        node: NODE_A_NO_ZONE,
        expect: &[
            "10.96.0.61:80/TCP ClusterIP => ",
            "127.0.0.1:30061/TCP NodePort etp-local has-int maglev => ",
            "127.0.0.1:30061/TCP/i NodePort => ",
            "192.168.1.10:30061/TCP NodePort etp-local has-int maglev => ",
            "192.168.1.10:30061/TCP/i NodePort => ",
        ],
        skips: &[],
    },
    Case {
        name: "an unknown lb-algorithm annotation is a counted skip and the flag's algorithm applies",
        service: r#"
apiVersion: v1
kind: Service
metadata:
  name: hashed
  namespace: demo
  annotations: {service.kpr.io/lb-algorithm: Maglev}
spec:
  type: NodePort
  clusterIP: 10.96.0.62
  ports: [{port: 80, nodePort: 30062}]
"#,
        slices: &[],
        node: NODE_A_NO_ZONE,
        expect: &[
            "10.96.0.62:80/TCP ClusterIP => ",
            "127.0.0.1:30062/TCP NodePort => ",
            "192.168.1.10:30062/TCP NodePort => ",
        ],
        skips: &[SkipReason::InvalidAnnotation],
    },
];

#[test]
fn translation_table() {
    assert!(CASES.len() >= 40, "the table has {} cases", CASES.len());
    let mut failures = Vec::new();
    for case in CASES {
        let svc: Service =
            serde_yaml_ng::from_str(case.service).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let slices: Vec<EndpointSlice> = case
            .slices
            .iter()
            .map(|s| serde_yaml_ng::from_str(s).unwrap_or_else(|e| panic!("{}: {e}", case.name)))
            .collect();
        let t = translate(&[svc], &slices, &case.node.context());
        let got = render(&t);
        let want: Vec<String> = case.expect.iter().map(|s| s.to_string()).collect();
        let skips: Vec<SkipReason> = t.skipped.iter().map(|s| s.reason).collect();
        if got != want || skips != case.skips {
            failures.push(format!(
                "{}:\n  got  {got:#?} skips {skips:?} ({:?})\n  want {want:#?} skips {:?}",
                case.name, t.skipped, case.skips
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} case(s) failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn a_second_service_with_the_same_name_is_a_counted_duplicate() {
    let svc: Service = serde_yaml_ng::from_str(SVC_WEB).unwrap();
    let t = translate(&[svc.clone(), svc], &[], &NodeContext::default());
    assert_eq!(t.desired.len(), 1);
    assert_eq!(
        t.skipped.iter().map(|s| s.reason).collect::<Vec<_>>(),
        vec![SkipReason::Duplicate]
    );
}

#[test]
fn no_local_endpoints_are_counted_per_service_port_and_family() {
    let svc: Service = serde_yaml_ng::from_str(
        r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec:
  clusterIPs: [10.96.4.1, "fd00:10:96::4:1"]
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80}, {name: other, port: 81}]
"#,
    )
    .unwrap();
    let v6: EndpointSlice = serde_yaml_ng::from_str(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: pol-v6, namespace: demo, labels: {kubernetes.io/service-name: pol}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ["fd00:10:244::2:1"], nodeName: node-b}]
"#,
    )
    .unwrap();
    let v4: EndpointSlice = serde_yaml_ng::from_str(SLICE_POL_REMOTE).unwrap();
    let t = translate(&[svc], &[v4, v6], &NODE_A.context());
    // Port "other" has no endpoints anywhere: not counted.
    assert_eq!(t.no_local_endpoints_count(TrafficPolicy::Internal), 2);
    assert_eq!(t.no_local_endpoints_count(TrafficPolicy::External), 0);
    let families: Vec<IpFamily> = t.no_local_endpoints.iter().map(|n| n.family).collect();
    assert_eq!(families, vec![IpFamily::V4, IpFamily::V6]);
}

#[test]
fn a_dual_stack_health_check_counts_local_pods_not_addresses() {
    let svc: Service = serde_yaml_ng::from_str(
        r#"
apiVersion: v1
kind: Service
metadata: {name: pol, namespace: demo}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 32200
  clusterIPs: [10.96.5.9, "fd00:10:96::5:9"]
  ports: [{name: http, port: 80, nodePort: 30509}, {name: admin, port: 9000, nodePort: 30510}]
"#,
    )
    .unwrap();
    let slices: Vec<EndpointSlice> = [
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: pol-v4, namespace: demo, labels: {kubernetes.io/service-name: pol}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: admin, port: 9090}]
endpoints:
- {addresses: [10.244.1.1], nodeName: node-a}
- {addresses: [10.244.1.2], nodeName: node-a}
- {addresses: [10.244.2.1], nodeName: node-b}
"#,
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: pol-v6, namespace: demo, labels: {kubernetes.io/service-name: pol}}
addressType: IPv6
ports: [{name: http, port: 8080}, {name: admin, port: 9090}]
endpoints:
- {addresses: ["fd00:10:244::1:1"], nodeName: node-a}
- {addresses: ["fd00:10:244::1:2"], nodeName: node-a}
"#,
    ]
    .iter()
    .map(|s| serde_yaml_ng::from_str(s).unwrap())
    .collect();
    let t = translate(&[svc], &slices, &NODE_A.context());
    assert_eq!(
        t.health_checks,
        vec![HealthCheck {
            port: 32200,
            service: "demo/pol".into(),
            local_endpoints: 2,
        }]
    );
}

#[test]
fn translation_does_not_depend_on_slice_order() {
    let svc: Service = serde_yaml_ng::from_str(SVC_WEB).unwrap();
    let a: EndpointSlice = serde_yaml_ng::from_str(SLICE_WEB_A).unwrap();
    let b: EndpointSlice = serde_yaml_ng::from_str(SLICE_WEB_B).unwrap();
    let node = NODE_A.context();
    let ab = translate(std::slice::from_ref(&svc), &[a.clone(), b.clone()], &node);
    let ba = translate(&[svc], &[b, a], &node);
    assert_eq!(ab, ba);
}

#[test]
fn backends_on_this_node_are_marked_local_for_the_north_south_path() {
    let svc: Service = serde_yaml_ng::from_str(
        r#"
apiVersion: v1
kind: Service
metadata: {name: np, namespace: demo}
spec:
  type: NodePort
  clusterIP: 10.96.5.1
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
"#,
    )
    .unwrap();
    let slice: EndpointSlice = serde_yaml_ng::from_str(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-1, namespace: demo, labels: {kubernetes.io/service-name: np}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.11], nodeName: node-a}
- {addresses: [10.244.2.11], nodeName: node-b}
- {addresses: [10.244.3.11]}
"#,
    )
    .unwrap();
    let t = translate(&[svc], &[slice], &NODE_A.context());
    let fes = t
        .desired
        .values()
        .next()
        .expect("the service is programmed");
    let node_port = Frontend::new("192.168.1.10".parse().unwrap(), 30080, Protocol::Tcp);
    let local: Vec<(String, bool)> = fes[&node_port]
        .backends
        .iter()
        .map(|b| (b.addr.ip.to_string(), b.local))
        .collect();
    assert_eq!(
        local,
        [
            ("10.244.1.11".to_string(), true),
            ("10.244.2.11".to_string(), false),
            ("10.244.3.11".to_string(), false),
        ]
    );
}

#[test]
fn the_lb_algorithm_flag_applies_without_the_annotation_and_the_annotation_wins() {
    let svc = |name: &str, annotation: Option<&str>| -> Service {
        let annotations = annotation
            .map(|a| format!("annotations: {{{LB_ALGORITHM_ANNOTATION}: {a:?}}}"))
            .unwrap_or_default();
        serde_yaml_ng::from_str(&format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo, {annotations}}}
spec: {{type: NodePort, clusterIP: 10.96.0.70, ports: [{{port: 80, nodePort: 30070}}]}}
"#
        ))
        .unwrap()
    };
    let maglev_node = NodeContext {
        node_ips: vec!["192.168.1.10".parse().unwrap()],
        lb_algorithm: LbAlgorithm::Maglev,
        ..Default::default()
    };
    let maglev_of = |t: &Translation| -> Vec<(ServiceType, bool)> {
        let mut v: Vec<(ServiceType, bool)> = t
            .desired
            .values()
            .flat_map(|fes| fes.values().map(|s| (s.svc_type, s.options.maglev)))
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let np = ServiceType::NodePort;
    let cip = ServiceType::ClusterIP;
    for (annotation, node, want) in [
        (None, &maglev_node, true),
        (None, &NodeContext::default(), false),
        (Some("random"), &maglev_node, false),
        (Some("maglev"), &NodeContext::default(), true),
        (Some("consistent"), &maglev_node, true),
        (Some(""), &NodeContext::default(), false),
    ] {
        let t = translate(&[svc("web", annotation)], &[], node);
        assert_eq!(
            maglev_of(&t),
            vec![(cip, false), (np, want)],
            "annotation {annotation:?}, flag {}",
            node.lb_algorithm
        );
        let invalid = matches!(annotation, Some(a) if a != "random" && a != "maglev");
        assert_eq!(t.skipped.len(), usize::from(invalid), "{:?}", t.skipped);
        if invalid {
            let s = &t.skipped[0];
            assert_eq!(s.reason, SkipReason::InvalidAnnotation);
            assert_eq!(s.object, "Service demo/web");
            assert!(
                s.detail.contains(LB_ALGORITHM_ANNOTATION)
                    && s.detail.contains(&format!("{:?}", annotation.unwrap()))
                    && s.detail
                        .contains(&format!("--lb-algorithm {}", node.lb_algorithm)),
                "{}",
                s.detail
            );
        }
    }
    // One Service's bad annotation leaves the others alone.
    let t = translate(
        &[svc("bad", Some("nope")), svc("good", Some("maglev"))],
        &[],
        &NodeContext::default(),
    );
    assert_eq!(t.skipped.len(), 1);
    assert!(t.desired["demo/good"].values().any(|s| s.options.maglev));
    assert!(t.desired["demo/bad"].values().all(|s| !s.options.maglev));
}

#[test]
fn source_range_cidrs_parse_like_go_parse_cidr_sloppy() {
    let ok = |s: &str| parse_cidr_sloppy(s).map(|n| n.to_string());
    assert_eq!(ok("192.0.2.0/24").as_deref(), Some("192.0.2.0/24"));
    // Host bits cleared, leading zeros decimal.
    assert_eq!(ok("192.0.2.77/24").as_deref(), Some("192.0.2.0/24"));
    assert_eq!(ok("010.001.0.0/16").as_deref(), Some("10.1.0.0/16"));
    assert_eq!(ok("0.0.0.0/0").as_deref(), Some("0.0.0.0/0"));
    assert_eq!(ok("2001:DB8::1/32").as_deref(), Some("2001:db8::/32"));
    assert_eq!(ok("::/0").as_deref(), Some("::/0"));
    // IPv4-mapped IPv6 prefixes are IPv4, as Go's To4() makes them.
    assert_eq!(ok("::ffff:192.0.2.0/120").as_deref(), Some("192.0.2.0/24"));
    assert_eq!(ok("::ffff:0:0/96").as_deref(), Some("0.0.0.0/0"));
    assert_eq!(ok("::fffe:0:0/95").as_deref(), Some("::fffe:0:0/95"));
    for bad in [
        "192.0.2.0",
        "192.0.2.0/33",
        "192.0.2/24",
        "192.0.2.0.1/24",
        "192.0.2.256/24",
        "192.0.2.0/-1",
        "192.0.2.0/+8",
        "192.0.2.0/",
        "/8",
        "fd00::/129",
        "fd00::g/64",
        "not-a-cidr",
    ] {
        assert_eq!(parse_cidr_sloppy(bad), None, "{bad}");
    }
}

#[test]
fn source_ranges_reach_only_load_balancer_frontends_with_node_admission_per_family() {
    let svc: Service = serde_yaml_ng::from_str(
        r#"
apiVersion: v1
kind: Service
metadata: {name: g, namespace: demo}
spec:
  type: LoadBalancer
  clusterIPs: [10.96.3.20, "fd00:10:96::320"]
  loadBalancerSourceRanges: [192.168.1.0/24, "2001:db8::/32"]
  ports: [{name: http, port: 80, nodePort: 30200}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.20}, {ip: "2001:db8:ff::20"}]
"#,
    )
    .unwrap();
    let t = translate(&[svc], &[], &NODE_A.context());
    let fes = &t.desired["demo/g"];
    let lb = |ip: &str| &fes[&Frontend::new(ip.parse().unwrap(), 80, Protocol::Tcp)];
    // node-a is 192.168.1.10 (in the IPv4 prefix) and fd00:192:168:1::10
    // (not in the IPv6 one).
    let v4 = lb("198.51.100.20");
    assert_eq!(
        v4.source_ranges,
        ["192.168.1.0/24".parse::<IpNet>().unwrap()]
    );
    assert!(v4.options.source_ranges_admit_node);
    let v6 = lb("2001:db8:ff::20");
    assert_eq!(
        v6.source_ranges,
        ["2001:db8::/32".parse::<IpNet>().unwrap()]
    );
    assert!(!v6.options.source_ranges_admit_node);
    for (fe, spec) in fes {
        if spec.svc_type != ServiceType::LoadBalancer {
            assert!(spec.source_ranges.is_empty(), "{fe:?}");
        }
    }
    assert!(t.skipped.is_empty(), "{:?}", t.skipped);
}
