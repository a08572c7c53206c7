//! Table-driven translation cases: Service + EndpointSlices (YAML, as a
//! user writes them) -> the frontends and backends kube-proxy would program.

use super::*;

struct Case {
    name: &'static str,
    service: &'static str,
    slices: &'static [&'static str],
    /// `frontend => backend, backend` lines, sorted; backends in slot order,
    /// `~` suffix for a terminating backend, `affinity=N` when set.
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
                .map(|(a, s)| {
                    format!(
                        "{a}{}",
                        if *s == BackendState::Terminating {
                            "~"
                        } else {
                            ""
                        }
                    )
                })
                .collect();
            let affinity = spec
                .options
                .affinity_timeout
                .map(|t| format!(" affinity={t}"))
                .unwrap_or_default();
            format!("{}{affinity} => {}", fe.addr, backends.join(", "))
        })
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

const CASES: &[Case] = &[
    Case {
        name: "ready endpoints of two slices are merged, deduplicated and ordered; not-ready ones left out",
        service: SVC_WEB,
        slices: &[SLICE_WEB_A, SLICE_WEB_B],
        expect: &["10.96.0.10:80/TCP => 10.244.0.11:8080/TCP, 10.244.0.12:8080/TCP, 10.244.0.13:8080/TCP"],
        skips: &[],
    },
    Case {
        name: "a service without slices gets a frontend with no backend",
        service: SVC_WEB,
        slices: &[],
        expect: &["10.96.0.10:80/TCP => "],
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
        expect: &["10.96.0.10:80/TCP => "],
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
        expect: &["10.96.0.20:53/UDP => 10.244.0.21:5353/UDP", "10.96.0.20:80/TCP => 10.244.0.21:8080/TCP"],
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
        expect: &["10.96.0.30:80/TCP => 10.244.0.31:8080/TCP", "[fd00:10:96::30]:80/TCP => [fd00:10:244::31]:8080/TCP"],
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
        expect: &[],
        skips: &[],
    },
    Case {
        name: "ExternalName services are not programmed",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: demo}
spec: {type: ExternalName, externalName: example.com}
"#,
        slices: &[],
        expect: &[],
        skips: &[],
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
        slices: &[],
        expect: &["10.96.0.40:80/TCP => "],
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
        expect: &[],
        skips: &[SkipReason::InvalidAddress],
    },
    Case {
        name: "sessionAffinity ClientIP defaults to a 10800 s timeout",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: demo}
spec: {clusterIP: 10.96.0.50, sessionAffinity: ClientIP, ports: [{port: 80}]}
"#,
        slices: &[],
        expect: &["10.96.0.50:80/TCP affinity=10800 => "],
        skips: &[],
    },
    Case {
        name: "sessionAffinityConfig sets the timeout",
        service: r#"
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: demo}
spec:
  clusterIP: 10.96.0.50
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports: [{port: 80}]
"#,
        slices: &[],
        expect: &["10.96.0.50:80/TCP affinity=60 => "],
        skips: &[],
    },
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
"#],
        expect: &["10.96.0.10:80/TCP => 10.244.0.61:8080/TCP~"],
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
        expect: &["10.96.0.10:80/TCP => "],
        skips: &[],
    },
];

#[test]
fn translation_table() {
    let mut failures = Vec::new();
    for case in CASES {
        let svc: Service =
            serde_yaml_ng::from_str(case.service).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let slices: Vec<EndpointSlice> = case
            .slices
            .iter()
            .map(|s| serde_yaml_ng::from_str(s).unwrap_or_else(|e| panic!("{}: {e}", case.name)))
            .collect();
        let t = translate(&[svc], &slices);
        let got = render(&t);
        let want: Vec<String> = case.expect.iter().map(|s| s.to_string()).collect();
        let skips: Vec<SkipReason> = t.skipped.iter().map(|s| s.reason).collect();
        if got != want || skips != case.skips {
            failures.push(format!(
                "{}:\n  got  {got:?} skips {skips:?}\n  want {want:?} skips {:?}",
                case.name, case.skips
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn a_second_service_with_the_same_name_is_a_counted_duplicate() {
    let svc: Service = serde_yaml_ng::from_str(SVC_WEB).unwrap();
    let t = translate(&[svc.clone(), svc], &[]);
    assert_eq!(t.desired.len(), 1);
    assert_eq!(
        t.skipped.iter().map(|s| s.reason).collect::<Vec<_>>(),
        vec![SkipReason::Duplicate]
    );
}
