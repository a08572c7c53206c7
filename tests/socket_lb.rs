//! Socket-LB end to end: a real agent on a bed of network namespaces,
//! real sockets from a probe process inside (or outside) the agent's
//! cgroup. Needs root: every test is `#[ignore = "needs root"]` (run them
//! with `--include-ignored`) and fails at once without root.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use kpr_testbed::bed::UNTRANSLATED;
use kpr_testbed::require_root;
use kpr_testbed::{BedPlan, ProbeSpec, SocketLbBed};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const WEB_AND_OTHER: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: t}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:10:96::10"]
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: t, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- addresses: [10.244.0.11]
- addresses: [10.244.0.12]
- addresses: [10.244.0.13]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-6, namespace: t, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- addresses: ["fd00:10:244::11"]
- addresses: ["fd00:10:244::12"]
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: t}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: other-1, namespace: t, labels: {kubernetes.io/service-name: other}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.0.14]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: t}
spec:
  clusterIP: 10.96.0.30
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

fn bed(prefix: &str, manifest: &str, plan: BedPlan) -> SocketLbBed {
    SocketLbBed::start(prefix, Path::new(KPR), manifest, &plan)
        .unwrap_or_else(|e| panic!("bed {prefix}: {e}"))
}

fn default_bed(prefix: &str) -> SocketLbBed {
    bed(
        prefix,
        WEB_AND_OTHER,
        BedPlan {
            v4_backends: 4,
            v6_backends: 2,
            untranslated_vips: vec![addr("10.96.0.10:80")],
            ..BedPlan::default()
        },
    )
}

/// Counts per backend identity of `count` TCP requests to `target` from inside the cgroup.
#[track_caller]
fn tcp_spread(
    bed: &SocketLbBed,
    target: &str,
    count: u32,
) -> std::collections::BTreeMap<String, u64> {
    bed.tcp_spread(addr(target), count).unwrap()
}

#[track_caller]
fn assert_spread_over(
    spread: &std::collections::BTreeMap<String, u64>,
    backends: &[&str],
    min_share: f64,
) {
    let total: u64 = spread.values().sum();
    let got: BTreeSet<&str> = spread.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = backends.iter().copied().collect();
    assert_eq!(got, want, "reached backends {spread:?}");
    for b in backends {
        let n = spread[*b];
        assert!(
            n as f64 >= min_share * total as f64,
            "{b} got {n} of {total}: {spread:?}"
        );
    }
}

/// Waits (bounded) until `svc list -o json` satisfies `done`.
#[track_caller]
fn wait_for_maps(
    bed: &SocketLbBed,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let json = bed.svc_list_json().unwrap();
        if done(&json) {
            return json;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; maps: {json:#}\nagent log:\n{}",
            bed.agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn frontend<'a>(json: &'a serde_json::Value, fe: &str) -> Option<&'a serde_json::Value> {
    json.as_array()?.iter().find(|r| r["frontend"] == fe)
}

fn backend_addrs(json: &serde_json::Value, fe: &str) -> Vec<String> {
    frontend(json, fe)
        .map(|r| {
            r["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| format!("{}:{}", b["address"].as_str().unwrap(), b["port"]))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
#[ignore = "needs root"]
fn tcp_connects_to_a_vip_spread_over_its_endpoints_only() {
    require_root();
    let bed = default_bed("tcp");
    let spread = tcp_spread(&bed, "10.96.0.10:80", 200);
    println!("200 connects to 10.96.0.10:80: {spread:?}");
    // Never 10.244.0.14, which belongs to another service.
    assert_spread_over(
        &spread,
        &["10.244.0.11:8080", "10.244.0.12:8080", "10.244.0.13:8080"],
        0.10,
    );
    let other = tcp_spread(&bed, "10.96.0.20:80", 20);
    assert_spread_over(&other, &["10.244.0.14:8080"], 1.0);
}

#[test]
#[ignore = "needs root"]
fn a_process_outside_the_cgroup_is_not_translated() {
    require_root();
    let bed = default_bed("out");
    let r = bed
        .probe(
            &ProbeSpec::TcpRequests {
                target: addr("10.96.0.10:80"),
                count: 10,
                timeout_ms: 2000,
            },
            false,
        )
        .unwrap();
    let r = r.as_requests().unwrap();
    assert_eq!(
        r.identities.get(UNTRANSLATED),
        Some(&10),
        "{:?}",
        r.identities
    );
    assert_eq!(r.identities.len(), 1);
}

#[test]
#[ignore = "needs root"]
fn udp_replies_come_from_the_vip_and_getpeername_reports_it() {
    require_root();
    let bed = default_bed("udp");
    let udp_backends = ["10.244.0.11:5353", "10.244.0.12:5353", "10.244.0.13:5353"];

    let r = bed
        .probe(
            &ProbeSpec::UdpUnconnected {
                target: addr("10.96.0.10:53"),
                count: 90,
                timeout_ms: 2000,
            },
            true,
        )
        .unwrap();
    let r = r.as_udp().unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_spread_over(&r.identities, &udp_backends, 0.05);
    assert_eq!(
        r.reply_sources,
        BTreeSet::from(["10.96.0.10:53".to_string()])
    );

    let r = bed
        .probe(
            &ProbeSpec::UdpConnected {
                target: addr("10.96.0.10:53"),
                count: 90,
                timeout_ms: 2000,
            },
            true,
        )
        .unwrap();
    let r = r.as_udp().unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_spread_over(&r.identities, &udp_backends, 0.05);
    assert_eq!(
        r.reply_sources,
        BTreeSet::from(["10.96.0.10:53".to_string()])
    );
    assert_eq!(r.peer_names, BTreeSet::from(["10.96.0.10:53".to_string()]));

    let r = bed
        .probe(
            &ProbeSpec::TcpPeerName {
                target: addr("10.96.0.10:80"),
                timeout_ms: 2000,
            },
            true,
        )
        .unwrap();
    let r = r.as_peer_name().unwrap();
    assert_eq!(r.peer.as_deref(), Some("10.96.0.10:80"));
    assert!(
        r.identity
            .as_deref()
            .is_some_and(|i| i.starts_with("10.244.0.1")),
        "{r:?}"
    );
}

#[test]
#[ignore = "needs root"]
fn an_ipv6_vip_reaches_ipv6_endpoints() {
    require_root();
    let bed = default_bed("six");
    let spread = tcp_spread(&bed, "[fd00:10:96::10]:80", 100);
    assert_spread_over(
        &spread,
        &["[fd00:10:244::11]:8080", "[fd00:10:244::12]:8080"],
        0.10,
    );
    let r = bed
        .probe(
            &ProbeSpec::UdpUnconnected {
                target: addr("[fd00:10:96::10]:53"),
                count: 20,
                timeout_ms: 2000,
            },
            true,
        )
        .unwrap();
    let r = r.as_udp().unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(
        r.reply_sources,
        BTreeSet::from(["[fd00:10:96::10]:53".to_string()])
    );
}

#[test]
#[ignore = "needs root"]
fn connecting_to_a_service_without_endpoints_fails_at_once_with_econnrefused() {
    require_root();
    let bed = default_bed("empty");
    let mut elapsed = Vec::new();
    for _ in 0..5 {
        let r = bed
            .probe(
                &ProbeSpec::TcpConnectError {
                    target: addr("10.96.0.30:80"),
                    timeout_ms: 3000,
                },
                true,
            )
            .unwrap();
        let r = r.as_connect().unwrap();
        assert_eq!(r.error.as_deref(), Some("ECONNREFUSED"), "{r:?}");
        elapsed.push(r.elapsed_us);
    }
    elapsed.sort();
    println!("connect() to an empty service failed after {elapsed:?} us");
    // The median of five is immune to one host pause; the bound is the issue's 100 ms.
    assert!(elapsed[2] < 100_000, "median {} us", elapsed[2]);
}

#[test]
#[ignore = "needs root"]
fn a_port_or_protocol_a_cluster_ip_does_not_define_is_refused_at_once_as_an_empty_service() {
    require_root();
    // No untranslated server on the VIP: nothing but kpr may refuse.
    let bed = bed(
        "badport",
        WEB_AND_OTHER,
        BedPlan {
            v4_backends: 4,
            v6_backends: 2,
            ..BedPlan::default()
        },
    );
    // web: TCP 80 and UDP 53 on 10.96.0.10 and fd00:10:96::10.
    for target in [
        "10.96.0.10:81",
        "[fd00:10:96::10]:81",
        // The TCP side of a UDP-only port.
        "10.96.0.10:53",
        "[fd00:10:96::10]:53",
    ] {
        let started = Instant::now();
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
        assert_eq!(r.error.as_deref(), Some("ECONNREFUSED"), "{target}: {r:?}");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{target}: refused only after {:?}",
            started.elapsed()
        );
    }
    // UDP, unconnected (sendmsg) and connected (connect), both families;
    // the UDP side of a TCP-only port too.
    for (target, connected, failure) in [
        ("10.96.0.10:54", false, "send:ECONNREFUSED"),
        ("[fd00:10:96::10]:54", false, "send:ECONNREFUSED"),
        ("10.96.0.10:80", true, "connect:ECONNREFUSED"),
        ("[fd00:10:96::10]:80", true, "connect:ECONNREFUSED"),
    ] {
        let (target, count, timeout_ms) = (addr(target), 3, 1000);
        let spec = if connected {
            ProbeSpec::UdpConnected {
                target,
                count,
                timeout_ms,
            }
        } else {
            ProbeSpec::UdpUnconnected {
                target,
                count,
                timeout_ms,
            }
        };
        let r = bed.probe(&spec, true).unwrap();
        let r = r.as_udp().unwrap();
        assert_eq!(
            r.failures,
            std::collections::BTreeMap::from([(failure.to_string(), 3)]),
            "{target}: {r:?}"
        );
    }
    // An address that is no ClusterIP is left alone (here nothing answers).
    let r = bed
        .probe(
            &ProbeSpec::TcpConnectError {
                target: addr("10.96.0.99:81"),
                timeout_ms: 300,
            },
            true,
        )
        .unwrap();
    assert_eq!(r.as_connect().unwrap().outcome(), "TIMEOUT", "{r:?}");
    // The ports the Service defines are served as before.
    assert_eq!(
        tcp_spread(&bed, "10.96.0.10:80", 12).values().sum::<u64>(),
        12
    );
    assert_eq!(
        tcp_spread(&bed, "[fd00:10:96::10]:80", 6)
            .values()
            .sum::<u64>(),
        6
    );
    let r = bed
        .probe(
            &ProbeSpec::UdpUnconnected {
                target: addr("10.96.0.10:53"),
                count: 3,
                timeout_ms: 2000,
            },
            true,
        )
        .unwrap();
    assert!(r.as_udp().unwrap().failures.is_empty(), "{r:?}");
}

#[test]
#[ignore = "needs root"]
fn an_endpoint_edit_moves_new_connections_and_frees_the_removed_backend_id() {
    require_root();
    let bed = bed(
        "edit",
        WEB_AND_OTHER,
        BedPlan {
            v4_backends: 6,
            v6_backends: 2,
            ..BedPlan::default()
        },
    );
    let before = bed.svc_list_json().unwrap();
    let id_of = |json: &serde_json::Value, address: &str| -> Option<u64> {
        json.as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r["backends"].as_array().unwrap())
            .find(|b| b["address"] == address)
            .and_then(|b| b["id"].as_u64())
    };
    let removed_id = id_of(&before, "10.244.0.12").expect("10.244.0.12 has an id");

    // 10.244.0.12 leaves, 10.244.0.15 joins.
    bed.write_manifest(
        "services.yaml",
        &WEB_AND_OTHER.replace("- addresses: [10.244.0.12]", "- addresses: [10.244.0.15]"),
    )
    .unwrap();
    let after = wait_for_maps(&bed, "the edit", |j| {
        backend_addrs(j, "10.96.0.10:80/TCP").contains(&"10.244.0.15:8080".to_string())
    });
    assert_eq!(
        backend_addrs(&after, "10.96.0.10:80/TCP"),
        vec!["10.244.0.11:8080", "10.244.0.13:8080", "10.244.0.15:8080"]
    );
    assert_eq!(
        id_of(&after, "10.244.0.12"),
        None,
        "the removed backend is still in the maps"
    );
    let spread = tcp_spread(&bed, "10.96.0.10:80", 120);
    assert_spread_over(
        &spread,
        &["10.244.0.11:8080", "10.244.0.13:8080", "10.244.0.15:8080"],
        0.10,
    );

    // The freed id is handed to the next new backend.
    bed.write_manifest(
        "services.yaml",
        &WEB_AND_OTHER.replace(
            "- addresses: [10.244.0.12]",
            "- addresses: [10.244.0.15]\n- addresses: [10.244.0.16]",
        ),
    )
    .unwrap();
    let again = wait_for_maps(&bed, "the second edit", |j| {
        backend_addrs(j, "10.96.0.10:80/TCP").len() == 4
    });
    assert_eq!(id_of(&again, "10.244.0.16"), Some(removed_id), "{again:#}");
}

#[test]
#[ignore = "needs root"]
fn translation_survives_sigkill_and_a_restarted_agent_adopts_the_same_maps() {
    require_root();
    let mut bed = default_bed("kill");
    let table_before = bed.svc_list().unwrap();
    bed.agent.kill().unwrap();
    // No agent: the pinned programs and maps keep balancing.
    let spread = tcp_spread(&bed, "10.96.0.10:80", 150);
    assert_spread_over(
        &spread,
        &["10.244.0.11:8080", "10.244.0.12:8080", "10.244.0.13:8080"],
        0.10,
    );
    assert_eq!(bed.svc_list().unwrap(), table_before);

    bed.agent.restart().unwrap();
    bed.agent.wait_healthy(Duration::from_secs(30)).unwrap();
    let log = bed.agent.log();
    assert!(
        log.contains(
            "reused_maps=[Services, Backends, Affinity, SockRevNat, SourceRanges, Maglev]"
        ),
        "{log}"
    );
    assert!(
        log.contains("updated_links=[\"connect4\""),
        "links were not reused: {log}"
    );
    // Same ids, same slots: identical listing, and the restart wrote nothing
    // (a sync that writes logs "synced").
    assert_eq!(bed.svc_list().unwrap(), table_before);
    let restarted = log.rsplit("reused_maps=").next().unwrap();
    assert!(
        !restarted.contains("synced"),
        "the restarted agent rewrote entries: {restarted}"
    );
    let json = bed.svc_list_json().unwrap();
    let ids: Vec<u64> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids.len(),
        ids.iter().collect::<BTreeSet<_>>().len(),
        "duplicate frontend ids: {ids:?}"
    );
    let spread = tcp_spread(&bed, "10.96.0.10:80", 90);
    assert_spread_over(
        &spread,
        &["10.244.0.11:8080", "10.244.0.12:8080", "10.244.0.13:8080"],
        0.10,
    );
}

#[test]
#[ignore = "needs root"]
fn a_malformed_document_is_counted_and_the_other_services_keep_working() {
    require_root();
    let bed = default_bed("bad");
    bed.write_manifest(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: t}\nspec:\n  ports: [{port: \"eighty\"}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: fine, namespace: t}\nspec: {clusterIP: 10.96.0.40, ports: [{port: 80, targetPort: 8080}]}\n",
    )
    .unwrap();
    // The good document next to the broken one is programmed...
    wait_for_maps(&bed, "the good document of broken.yaml", |j| {
        frontend(j, "10.96.0.40:80/TCP").is_some()
    });
    // ...the broken one is counted...
    let skipped = bed
        .agent
        .metric_value("kpr_skipped_objects_total", "reason=\"malformed\"")
        .unwrap();
    assert!(
        skipped.is_some_and(|v| v >= 1.0),
        "kpr_skipped_objects_total{{reason=\"malformed\"}} = {skipped:?}"
    );
    assert!(
        bed.agent.log().contains("broken.yaml"),
        "the skip is not logged with its file"
    );
    // ...and the other services keep working.
    let spread = tcp_spread(&bed, "10.96.0.10:80", 60);
    assert_spread_over(
        &spread,
        &["10.244.0.11:8080", "10.244.0.12:8080", "10.244.0.13:8080"],
        0.10,
    );
}

#[test]
#[ignore = "needs root"]
fn a_service_that_overflows_the_maps_is_refused_and_the_earlier_ones_are_unaffected() {
    require_root();
    // 16 entries: web (2 frontends x 4 entries + 2 x 3 for IPv6 = 14)... keep
    // it simple: only `other` and `empty` fit comfortably.
    let small = WEB_AND_OTHER
        .split("---\napiVersion: v1\nkind: Service\nmetadata: {name: other")
        .nth(1)
        .unwrap();
    let manifest = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: other{small}");
    let bed = bed(
        "full",
        &manifest,
        BedPlan {
            v4_backends: 4,
            v6_backends: 0,
            agent_args: vec!["--lb-map-max".into(), "16".into()],
            ..BedPlan::default()
        },
    );
    let table_before = bed.svc_list().unwrap();
    // 20 endpoints do not fit in 16 entries.
    let endpoints: String = (1..=20)
        .map(|i| format!("- addresses: [10.244.1.{i}]\n"))
        .collect();
    bed.write_manifest(
        "big.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: big, namespace: t}}\nspec: {{clusterIP: 10.96.0.50, ports: [{{name: http, port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: big-1, namespace: t, labels: {{kubernetes.io/service-name: big}}}}\naddressType: IPv4\nports: [{{name: http, port: 80}}]\nendpoints:\n{endpoints}"
        ),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while bed
        .agent
        .metric_value("kpr_sync_errors_total", "reason=\"capacity\"")
        .unwrap()
        .unwrap_or(0.0)
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "no capacity error counted; log:\n{}",
            bed.agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = bed.agent.log();
    // A master, 20 slots and the ClusterIP's port-reject entry.
    assert!(
        log.contains("service t/big not programmed: it needs 22 more entries in BPF map services"),
        "{log}"
    );
    // One refused Service must not drain the node: load balancers probe
    // /healthz, and 503 would take every other Service down with it.
    let (status, _) = kpr_testbed::agent::http_get(bed.agent.healthz_addr, "/healthz").unwrap();
    assert_eq!(
        status, 200,
        "a refused Service must not make the node unhealthy"
    );
    assert_eq!(bed.svc_list().unwrap(), table_before);
    let spread = tcp_spread(&bed, "10.96.0.20:80", 10);
    assert_spread_over(&spread, &["10.244.0.14:8080"], 1.0);
}

const STICKY: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: t}
spec:
  clusterIP: 10.96.0.60
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 3600}}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: brief, namespace: t}
spec:
  clusterIP: 10.96.0.61
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky-1, namespace: t, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.0.11]}, {addresses: [10.244.0.12]}, {addresses: [10.244.0.13]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: brief-1, namespace: t, labels: {kubernetes.io/service-name: brief}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.0.11]}, {addresses: [10.244.0.12]}, {addresses: [10.244.0.13]}]
"#;

#[test]
#[ignore = "needs root"]
fn client_ip_affinity_holds_within_its_timeout_and_lapses_after_it() {
    require_root();
    let bed = bed(
        "sticky",
        STICKY,
        BedPlan {
            v4_backends: 3,
            v6_backends: 0,
            ..BedPlan::default()
        },
    );
    // Within the timeout every connection of this client lands on one backend.
    let first = tcp_spread(&bed, "10.96.0.60:80", 100);
    assert_eq!(first.len(), 1, "affinity did not hold: {first:?}");
    let second = tcp_spread(&bed, "10.96.0.60:80", 20);
    assert_eq!(
        second.keys().collect::<Vec<_>>(),
        first.keys().collect::<Vec<_>>(),
        "affinity did not hold across probes"
    );

    // A 1 s timeout lapses between rounds 1.5 s apart: picks are random
    // again, so 8 rounds all on one backend would happen with p = (1/3)^7.
    let mut picks = BTreeSet::new();
    for _ in 0..8 {
        picks.extend(tcp_spread(&bed, "10.96.0.61:80", 1).into_keys());
        std::thread::sleep(Duration::from_millis(1500));
    }
    assert!(picks.len() > 1, "affinity never lapsed: {picks:?}");
}
