//! Maps that grow and maps of a new layout, under load: the programs are
//! switched over to new maps only once those are complete, so no connect
//! through a VIP fails or goes untranslated while the cluster outgrows the
//! maps or an upgrade brings a new layout. Needs root: every test is
//! `#[ignore = "needs root"]` (run them with `--include-ignored`) and
//! fails at once without root.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kpr_testbed::bed::UNTRANSLATED;
use kpr_testbed::probe::RequestsReport;
use kpr_testbed::require_root;
use kpr_testbed::{run_probe, BedPlan, ProbeSpec, SocketLbBed, TestCgroup, Topology};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");

const VIP: &str = "10.96.0.10:80";

const MANIFEST: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: t}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: t, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.0.11]}, {addresses: [10.244.0.12]}]
"#;

fn bed(prefix: &str, agent_args: &[&str]) -> SocketLbBed {
    let plan = BedPlan {
        v4_backends: 2,
        v6_backends: 0,
        untranslated_vips: vec![VIP.parse().unwrap()],
        agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
        ..BedPlan::default()
    };
    SocketLbBed::start(prefix, Path::new(KPR), MANIFEST, &plan).unwrap()
}

/// `count` Services of 3 endpoints each (ClusterIPs 10.96.1.0/24 and up).
fn many_services(count: u32) -> String {
    let mut out = String::new();
    for i in 0..count {
        let (hi, lo) = (1 + i / 250, 1 + i % 250);
        write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: grow}}\n\
             spec: {{clusterIP: 10.96.{hi}.{lo}, ports: [{{port: 80, targetPort: 8080}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: s{i}-1, namespace: grow, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [10.244.{hi}.{lo}]}}, \
             {{addresses: [10.244.{hi}.{}]}}, {{addresses: [10.244.{}.{lo}]}}]\n",
            (lo + 1) % 250 + 1,
            hi + 100,
        )
        .unwrap();
    }
    out
}

/// Runs `during` under a steady load: batches of TCP requests to the VIP
/// from inside the cgroup, one after another, from before `during` starts
/// until one batch after it ended (bounded: at most 2 minutes). Returns
/// every batch's outcome, summed. (The client side of the bed is passed
/// apart from its agent, which `during` may restart.)
fn under_load(client: &Topology, cgroup: &TestCgroup, during: impl FnOnce()) -> RequestsReport {
    const BATCH: u32 = 200;
    let target: SocketAddr = VIP.parse().unwrap();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let load = s.spawn(|| {
            let mut total = RequestsReport::default();
            let (start, mut batches_after) = (Instant::now(), 0);
            while batches_after < 1 && start.elapsed() < Duration::from_secs(120) {
                if done.load(Ordering::Acquire) {
                    batches_after += 1;
                }
                let result = run_probe(
                    Path::new(KPR),
                    &["probe", "--spec"],
                    client.client(),
                    Some(cgroup),
                    &ProbeSpec::TcpRequests {
                        target,
                        count: BATCH,
                        timeout_ms: 2000,
                    },
                    Duration::from_secs(60),
                )
                .unwrap();
                let batch = result.as_requests().unwrap();
                for (k, v) in &batch.identities {
                    *total.identities.entry(k.clone()).or_default() += v;
                }
                for (k, v) in &batch.failures {
                    *total.failures.entry(k.clone()).or_default() += v;
                }
            }
            total
        });
        // The load is under way before anything changes.
        std::thread::sleep(Duration::from_millis(300));
        during();
        done.store(true, Ordering::Release);
        load.join().unwrap()
    })
}

/// Polls `check` every 50 ms for up to `timeout`.
fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

fn metric(bed: &SocketLbBed, name: &str, labels: &str) -> f64 {
    bed.agent.metric_value(name, labels).unwrap().unwrap_or(0.0)
}

fn assert_all_translated(report: &RequestsReport) {
    assert!(
        report.failures.is_empty(),
        "failed requests: {:?}",
        report.failures
    );
    assert!(
        !report.identities.contains_key(UNTRANSLATED),
        "untranslated requests: {:?}",
        report.identities
    );
    let answered: u64 = report.identities.values().sum();
    println!(
        "{answered} requests, all translated: {:?}",
        report.identities
    );
}

#[test]
#[ignore = "needs root"]
fn maps_grow_past_their_size_under_load_without_a_failed_or_untranslated_connect() {
    require_root();
    // Maps created for 64 entries, with growth on (no --lb-map-max).
    let bed = bed("grow", &["--lb-map-initial", "64"]);
    let capacity = |map: &str| metric(&bed, "kpr_bpf_map_capacity", &format!("map=\"{map}\""));
    assert_eq!(capacity("services"), 64.0);
    let report = under_load(&bed.topo, &bed.cgroup, || {
        // 300 Services x 3 endpoints: 1,200 services map entries, 900 backends.
        bed.write_manifest("grow.yaml", &many_services(300))
            .unwrap();
        wait_until("301 Services programmed", Duration::from_secs(30), || {
            metric(&bed, "kpr_services", "") == 301.0
        });
    });
    assert_all_translated(&report);
    assert!(capacity("services") >= 1200.0, "services map not grown");
    assert!(capacity("backends") >= 900.0, "backends map not grown");
    assert!(metric(&bed, "kpr_bpf_map_grown_total", "map=\"services\"") >= 1.0);
    assert_eq!(
        metric(&bed, "kpr_sync_errors_total", "reason=\"capacity\""),
        0.0,
        "a Service was refused for capacity on the way"
    );
    let listed = bed.svc_list_json().unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 301, "frontends listed");
    let log = bed.agent.log();
    assert!(log.contains("maps grown: programs switched over"), "{log}");
    // The programs read the maps the agent now writes: an endpoint
    // removed after the growth is no longer chosen.
    bed.write_manifest(
        "services.yaml",
        &MANIFEST.replace(", {addresses: [10.244.0.12]}", ""),
    )
    .unwrap();
    wait_until("one backend left", Duration::from_secs(30), || {
        bed.tcp_spread(VIP.parse().unwrap(), 40)
            .is_ok_and(|s| s.keys().eq(["10.244.0.11:8080"].iter()))
    });
    // A restart keeps the grown maps and their content.
    let listed = bed.svc_list_json().unwrap();
    let mut bed = bed;
    bed.agent.restart().unwrap();
    bed.agent.wait_healthy(Duration::from_secs(30)).unwrap();
    assert!(
        metric(&bed, "kpr_bpf_map_capacity", "map=\"services\"") >= 1200.0,
        "the restarted agent does not use the grown map"
    );
    assert_eq!(bed.svc_list_json().unwrap(), listed);
}

#[test]
#[ignore = "needs root"]
fn an_explicit_lb_map_max_is_a_fixed_size_and_refusals_show() {
    require_root();
    let bed = bed("fixed", &["--lb-map-max", "64"]);
    bed.write_manifest("grow.yaml", &many_services(30)).unwrap();
    wait_until("capacity refusals counted", Duration::from_secs(30), || {
        metric(&bed, "kpr_sync_errors_total", "reason=\"capacity\"") > 0.0
    });
    assert_eq!(
        metric(&bed, "kpr_bpf_map_capacity", "map=\"services\""),
        64.0
    );
    assert_eq!(
        metric(&bed, "kpr_bpf_map_grown_total", "map=\"services\""),
        0.0
    );
}

#[test]
#[ignore = "needs root"]
fn an_upgrade_to_a_new_map_layout_switches_over_only_once_the_new_maps_are_filled() {
    require_root();
    let mut bed = bed("relayout", &[]);
    bed.write_manifest("grow.yaml", &many_services(200))
        .unwrap();
    wait_until("201 Services programmed", Duration::from_secs(30), || {
        metric(&bed, "kpr_services", "") == 201.0
    });
    bed.agent.stop().unwrap();
    // What a version with another services map layout finds: the running
    // programs' services map pinned under another layout's name, and no
    // map of its own layout yet.
    let root = bed.agent.bpf_root.clone();
    std::fs::rename(root.join("kpr_svc_v1"), root.join("kpr_svc_v0")).unwrap();
    let report = under_load(&bed.topo, &bed.cgroup, || {
        bed.agent.restart().unwrap();
        bed.agent.wait_healthy(Duration::from_secs(30)).unwrap();
        wait_until(
            "the old layout's map removed",
            Duration::from_secs(30),
            || !root.join("kpr_svc_v0").exists(),
        );
    });
    assert_all_translated(&report);
    let log = bed.agent.log();
    assert!(log.contains("maps of a new layout created"), "{log}");
    assert!(log.contains("programs switched over"), "{log}");
    assert_eq!(bed.svc_list_json().unwrap().as_array().unwrap().len(), 201);
}
