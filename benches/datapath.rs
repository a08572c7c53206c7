//! Datapath latency: connect + request + close through a VIP (socket-LB
//! translation) against the same requests sent straight to the backends,
//! in one run on one bed, interleaved in rounds so host noise hits both.
//! Prints p50/p90 side by side and the ratio (target: p50 ratio <= 1.02),
//! with the always-on counters counting (they cannot be turned off) and no
//! monitor; then the same with a `kpr monitor` reading every event (no
//! sampling, no rate limit, output to /dev/null), and the cost per connect
//! that adds.
//!
//! Needs root; without it, it says so and measures nothing.
//! `cargo bench --bench datapath` (KPR_BENCH_REQUESTS to change the count).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use kpr_testbed::{BedPlan, ProbeSpec, SocketLbBed};

const MANIFEST: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: bench, namespace: bench}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: bench-1, namespace: bench, labels: {kubernetes.io/service-name: bench}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.0.11]
- addresses: [10.244.0.12]
- addresses: [10.244.0.13]
"#;

/// Mean of the middle half: finer than a percentile of whole microseconds,
/// and as insensitive to outliers.
fn interquartile_mean(sorted: &[u64]) -> f64 {
    let mid = &sorted[sorted.len() / 4..sorted.len() * 3 / 4];
    mid.iter().sum::<u64>() as f64 / mid.len() as f64
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Per-request durations (us) by target of `rounds` x one request to each
/// of `targets` in turn (a target listed twice gets two requests a round).
fn interleaved(bed: &SocketLbBed, targets: &[&str], rounds: u32) -> BTreeMap<String, Vec<u64>> {
    let targets: Vec<SocketAddr> = targets.iter().map(|t| t.parse().unwrap()).collect();
    let spec = ProbeSpec::TcpInterleaved {
        targets,
        count: rounds,
        timeout_ms: 2000,
    };
    let r = bed.probe(&spec, true).expect("probe");
    r.as_interleaved()
        .expect("interleaved report")
        .iter()
        .map(|(t, r)| {
            assert!(r.failures.is_empty(), "failures to {t}: {:?}", r.failures);
            (t.clone(), r.durations_ns.clone())
        })
        .collect()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("!!! benches/datapath needs root (namespaces, cgroups, BPF): NOT MEASURED");
        return;
    }
    let total: u32 = std::env::var("KPR_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6000);
    // One CPU for client, servers and agent (see pin_to_cpu0).
    let _one_cpu = kpr_testbed::pin_to_cpu0().expect("pinning to cpu 0");
    let bed = SocketLbBed::start(
        "bench",
        Path::new(env!("CARGO_BIN_EXE_kpr")),
        MANIFEST,
        &BedPlan {
            v6_backends: 0,
            ..BedPlan::default()
        },
    )
    .expect("bed");
    // Each round: one request through the VIP, then one straight to each
    // backend, so both paths see the same conditions; the VIP gets three
    // requests per round to match the direct count.
    let targets = [
        "10.96.0.10:80",
        "10.244.0.11:8080",
        "10.96.0.10:80",
        "10.244.0.12:8080",
        "10.96.0.10:80",
        "10.244.0.13:8080",
    ];
    interleaved(&bed, &targets, 50); // warm-up
    let mut runs = interleaved(&bed, &targets, total / 3);
    let mut via_vip = runs.remove("10.96.0.10:80").expect("VIP durations");
    let mut direct: Vec<u64> = runs.into_values().flatten().collect();
    via_vip.sort_unstable();
    direct.sort_unstable();
    let us = |ns: u64| ns as f64 / 1000.0;
    let (v50, v90) = (us(percentile(&via_vip, 0.5)), us(percentile(&via_vip, 0.9)));
    let (d50, d90) = (us(percentile(&direct, 0.5)), us(percentile(&direct, 0.9)));
    println!("connect + request + close, {} requests each way (3 backends, one bed, interleaved per request)", via_vip.len());
    let (dm, vm) = (
        interquartile_mean(&direct) / 1000.0,
        interquartile_mean(&via_vip) / 1000.0,
    );
    println!(
        "{:<28}{:>10}{:>10}{:>12}",
        "", "p50 us", "p90 us", "IQ-mean us"
    );
    println!(
        "{:<28}{:>10}{:>10}{:>12.2}",
        "direct to backends", d50, d90, dm
    );
    println!(
        "{:<28}{:>10}{:>10}{:>12.2}",
        "via VIP (kpr socket-LB)", v50, v90, vm
    );
    if std::env::var_os("KPR_BENCH_HISTOGRAM").is_some() {
        for (name, d) in [("direct", &direct), ("vip", &via_vip)] {
            let p: Vec<u64> = [0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.99]
                .iter()
                .map(|q| percentile(d, *q))
                .collect();
            println!("{name:<8} p10/25/40/50/60/75/90/99 {p:?}");
        }
    }
    println!(
        "ratio p50 {:.3}  p90 {:.3}  IQ-mean {:.3}  (counters on, monitor off; target p50 <= 1.02)",
        v50 / d50,
        v90 / d90,
        vm / dm
    );
    monitor_cost(&bed, &targets, total / 3, (v50, vm), (d50, dm));
}

/// The same rounds with a `kpr monitor` reporting every decision: the
/// VIP's p50 and IQ-mean beside the first run's, against this run's
/// direct floor (host drift between the two runs shows there).
fn monitor_cost(
    bed: &SocketLbBed,
    targets: &[&str],
    rounds: u32,
    (off50, off_mean): (f64, f64),
    (floor50, floor_mean): (f64, f64),
) {
    let mut monitor = std::process::Command::new(env!("CARGO_BIN_EXE_kpr"))
        .args([
            "monitor",
            "-o",
            "json",
            "--sample-every",
            "1",
            "--rate",
            "0",
        ])
        .args(["--duration", "600s", "--bpf-root"])
        .arg(&bed.agent.bpf_root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("kpr monitor");
    // Bounded wait until it has turned the reporting on.
    let switch = bed.agent.bpf_root.join("kpr_monstats_v1");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let emitted = || {
        kpr::datapath::lb_stats::MonitorStats::read(&bed.agent.bpf_root).map_or(0, |s| s.emitted)
    };
    let before = emitted();
    while emitted() == before && std::time::Instant::now() < deadline {
        interleaved(bed, &targets[..1], 1);
    }
    assert!(
        switch.exists() && emitted() > before,
        "kpr monitor did not start"
    );
    let mut runs = interleaved(bed, targets, rounds);
    // Ctrl-C: it turns the reporting off as it leaves.
    let pid = nix::unistd::Pid::from_raw(monitor.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
    let _ = monitor.wait();
    let mut via_vip = runs.remove("10.96.0.10:80").expect("VIP durations");
    let mut direct: Vec<u64> = runs.into_values().flatten().collect();
    via_vip.sort_unstable();
    direct.sort_unstable();
    let v50 = percentile(&via_vip, 0.5) as f64 / 1000.0;
    let d50 = percentile(&direct, 0.5) as f64 / 1000.0;
    let (vm, dm) = (
        interquartile_mean(&via_vip) / 1000.0,
        interquartile_mean(&direct) / 1000.0,
    );
    println!(
        "monitor on (every event): via VIP p50 {v50} us, IQ-mean {vm:.2} us; direct p50 {d50} us, IQ-mean {dm:.2} us; ratio p50 {:.3}",
        v50 / d50
    );
    // Against each run's own floor, so drift between the runs cancels.
    let cost = (vm - dm) - (off_mean - floor_mean);
    println!(
        "monitor cost per connect: {cost:.2} us IQ-mean ({:.2} us p50) over monitor off (p50 {off50} us)",
        (v50 - d50) - (off50 - floor50)
    );
}
