//! North-south datapath cost, one run each, figures printed:
//!
//! 1. connect + request + close through node2's NodePort (backend on node2:
//!    DNAT on the way in, source rewrite on the way out) against the same
//!    requests routed straight to the backend through node2, interleaved per
//!    request; p50/p90 and their ratio (target p50 ratio <= 1.05). Once with
//!    tc only and once with generic XDP in front.
//! 2. the same requests through node1's NodePort to the backend on node2
//!    (remote backend), in snat and in dsr mode (tc only), each against
//!    the requests routed straight to the backend.
//! 3. the measurement of 1 over IPv6 (a dual-stack bed, tc only): node2's
//!    IPv6 NodePort against its pod's IPv6 address.
//! 4. a bounded UDP flood from the client to node2's NodePort, counted at
//!    the backend, with tc only, generic XDP and native XDP on veth; the
//!    delivered rate of each XDP mode over tc's is printed as "x tc".
//!
//! The latency runs (1 to 3) pin client, servers and agents to one CPU
//! (see `kpr_testbed::pin_to_cpu0`); the flood runs on every CPU.
//!
//! Needs root; without it, it says so and measures nothing.
//! `cargo bench --bench nodeport` (KPR_BENCH_REQUESTS, KPR_BENCH_DATAGRAMS);
//! `cargo bench --bench nodeport -- ipv6` runs 3 only.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use kpr_testbed::cluster::client_ip;
use kpr_testbed::nodeport_bed::{nodeport_manifest, POD_TCP, POD_UDP};
use kpr_testbed::{Cluster, ClusterPlan, NodePortBed, ProbeSpec};

const NODE_PORT_TCP: u16 = 30080;
const NODE_PORT_UDP: u16 = 30053;

/// One Service whose only endpoint is node2's first pod.
fn manifest(cluster: &Cluster) -> String {
    let pod = cluster.node(2).pod_ips()[0];
    let endpoints = format!("- {{addresses: [{pod}], nodeName: node2}}\n");
    nodeport_manifest("bench", "bench", NODE_PORT_TCP, NODE_PORT_UDP, &endpoints)
}

/// A dual-stack Service whose only endpoints are node2's first pod's two
/// addresses.
fn manifest_dual_stack(cluster: &Cluster) -> String {
    let node2 = cluster.node(2);
    let (pod4, pod6) = (node2.pod_ips()[0], node2.pod_ips6()[0]);
    let slice = |family: &str, ip: &str| {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: bench-{}, namespace: bench, labels: {{kubernetes.io/service-name: bench}}}}\n\
             addressType: {family}\nports:\n- {{name: http, protocol: TCP, port: {POD_TCP}}}\n\
             endpoints:\n- {{addresses: [\"{ip}\"], nodeName: node2}}\n",
            family.to_lowercase()
        )
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: bench, namespace: bench}}\nspec:\n  \
         type: NodePort\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  \
         clusterIPs: [10.96.0.10, \"fd00:96::10\"]\n  ports:\n  \
         - {{name: http, protocol: TCP, port: 80, targetPort: {POD_TCP}, nodePort: {NODE_PORT_TCP}}}\n{}{}",
        slice("IPv4", &pod4.to_string()),
        slice("IPv6", &pod6.to_string())
    )
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn bed(prefix: &str, accel: &str) -> NodePortBed {
    bed_in_mode(prefix, accel, "snat")
}

/// A bed in `mode` whose nodes reach the client directly (as DSR needs).
fn bed_in_mode(prefix: &str, accel: &str, mode: &str) -> NodePortBed {
    let plan = ClusterPlan {
        xdp_ready: true,
        direct_return: true,
        ..ClusterPlan::default()
    };
    NodePortBed::start(
        prefix,
        Path::new(env!("CARGO_BIN_EXE_kpr")),
        &plan,
        manifest,
        &["--nodeport-acceleration", accel, "--nodeport-mode", mode],
    )
    .expect("bed")
}

/// p50/p90 (us) via node `via_node`'s NodePort and direct, interleaved per
/// request.
fn latency(bed: &NodePortBed, via_node: u8, rounds: u32) -> ((f64, f64), (f64, f64)) {
    let via = SocketAddr::new(IpAddr::V4(bed.node(via_node).ext_ip()), NODE_PORT_TCP);
    let direct = SocketAddr::new(IpAddr::V4(bed.node(2).pod_ips()[0]), POD_TCP);
    latency_between(bed, via, direct, rounds)
}

/// p50/p90 (us) to `via` and to `direct`, interleaved per request.
fn latency_between(
    bed: &NodePortBed,
    via: SocketAddr,
    direct: SocketAddr,
    rounds: u32,
) -> ((f64, f64), (f64, f64)) {
    let run = |count| {
        let spec = ProbeSpec::TcpInterleaved {
            targets: vec![via, direct],
            count,
            timeout_ms: 2000,
        };
        bed.cluster
            .client()
            .enter_thread(|| spec.run())
            .expect("probe thread")
            .expect("probe")
    };
    run(50); // warm-up
    let r = run(rounds);
    let by = r.as_interleaved().expect("interleaved report");
    let sorted = |t: &SocketAddr| {
        let rep = &by[&t.to_string()];
        assert!(rep.failures.is_empty(), "{t}: {:?}", rep.failures);
        let mut d = rep.durations_ns.clone();
        d.sort_unstable();
        let us = |ns: u64| ns as f64 / 1000.0;
        (us(percentile(&d, 0.5)), us(percentile(&d, 0.9)))
    };
    (sorted(&via), sorted(&direct))
}

/// Sends `n` datagrams as fast as one socket can to node2's UDP NodePort;
/// returns (sent per second, delivered per second at the backend).
fn flood(bed: &NodePortBed, n: u64) -> (f64, f64) {
    let target = SocketAddr::new(IpAddr::V4(bed.node(2).ext_ip()), NODE_PORT_UDP);
    let server = bed
        .servers()
        .iter()
        .find(|s| s.addr() == SocketAddr::new(IpAddr::V4(bed.node(2).pod_ips()[0]), POD_UDP))
        .expect("the backend's UDP server");
    let before = server.hits();
    let local = IpAddr::V4(client_ip(2));
    let elapsed = bed
        .cluster
        .client()
        .enter_thread(move || {
            let sock = UdpSocket::bind(SocketAddr::new(local, 0)).expect("bind");
            let start = Instant::now();
            for _ in 0..n {
                // A full socket buffer is the flood's own back-pressure.
                let _ = sock.send_to(b"flood", target);
            }
            start.elapsed()
        })
        .expect("flood thread");
    std::thread::sleep(Duration::from_millis(500));
    let delivered = server.hits() - before;
    let secs = elapsed.as_secs_f64();
    (n as f64 / secs, delivered as f64 / secs)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("!!! benches/nodeport needs root (namespaces, BPF, tcx, XDP): NOT MEASURED");
        return;
    }
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let rounds = env("KPR_BENCH_REQUESTS", 3000) as u32;
    let datagrams = env("KPR_BENCH_DATAGRAMS", 200_000);
    let only_ipv6 = std::env::args().skip(1).any(|a| a == "ipv6");
    if only_ipv6 {
        let _one_cpu = kpr_testbed::pin_to_cpu0().expect("pinning to cpu 0");
        ipv6_latency(rounds);
        return;
    }

    println!("NodePort (node2, local backend) vs direct to the backend through node2: connect + request + close, {rounds} requests each, interleaved");
    println!(
        "{:<26}{:>12}{:>12}{:>12}{:>12}{:>10}{:>10}",
        "", "NP p50 us", "NP p90 us", "dir p50 us", "dir p90 us", "p50 x", "p90 x"
    );
    // Client, servers and agents on one CPU for the latency runs (see
    // pin_to_cpu0); the flood below gets every CPU back, as a receiver
    // draining a NIC would have.
    let one_cpu = kpr_testbed::pin_to_cpu0().expect("pinning to cpu 0");
    for (prefix, accel) in [("npbt", "disabled"), ("npbg", "generic")] {
        let bed = bed(prefix, accel);
        let ((v50, v90), (d50, d90)) = latency(&bed, 2, rounds);
        println!(
            "{:<26}{v50:>12.1}{v90:>12.1}{d50:>12.1}{d90:>12.1}{:>10.3}{:>10.3}",
            format!("tc + XDP {accel}"),
            v50 / d50,
            v90 / d90
        );
    }

    println!("\nNodePort on node1 to the backend on node2 vs direct to the backend: connect + request + close, {rounds} requests each, interleaved");
    println!(
        "{:<26}{:>12}{:>12}{:>12}{:>12}{:>10}{:>10}",
        "", "NP p50 us", "NP p90 us", "dir p50 us", "dir p90 us", "p50 x", "p90 x"
    );
    for (prefix, mode) in [("npbrs", "snat"), ("npbrd", "dsr")] {
        let bed = bed_in_mode(prefix, "disabled", mode);
        let ((v50, v90), (d50, d90)) = latency(&bed, 1, rounds);
        println!(
            "{:<26}{v50:>12.1}{v90:>12.1}{d50:>12.1}{d90:>12.1}{:>10.3}{:>10.3}",
            format!("tc, {mode}"),
            v50 / d50,
            v90 / d90
        );
    }

    ipv6_latency(rounds);
    drop(one_cpu);

    println!("\nUDP flood to node2's NodePort, {datagrams} datagrams from one socket, counted at the backend");
    println!(
        "{:<26}{:>14}{:>16}{:>10}{:>10}",
        "", "sent/s", "delivered/s", "share", "x tc"
    );
    let mut tc_delivered = None;
    for (prefix, accel) in [
        ("npbt", "disabled"),
        ("npbg", "generic"),
        ("npbn", "native"),
    ] {
        let bed = bed(prefix, accel);
        let (sent, delivered) = flood(&bed, datagrams);
        let stats = bed.stats(2).expect("counters");
        let tc = *tc_delivered.get_or_insert(delivered);
        println!(
            "{:<26}{sent:>14.0}{delivered:>16.0}{:>10.3}{:>10.2}   (node2 XDP-forwarded {})",
            format!("XDP {accel}"),
            delivered / sent,
            delivered / tc,
            stats.xdp_fwd
        );
    }
}

/// Section 3: node2's IPv6 NodePort (local backend) vs the pod's IPv6
/// address through node2, tc only.
fn ipv6_latency(rounds: u32) {
    println!("\nIPv6: NodePort (node2, local backend) vs direct to the backend through node2: connect + request + close, {rounds} requests each, interleaved");
    println!(
        "{:<26}{:>12}{:>12}{:>12}{:>12}{:>10}{:>10}",
        "", "NP p50 us", "NP p90 us", "dir p50 us", "dir p90 us", "p50 x", "p90 x"
    );
    let plan = ClusterPlan {
        dual_stack: true,
        ..ClusterPlan::default()
    };
    let bed = NodePortBed::start(
        "npb6",
        Path::new(env!("CARGO_BIN_EXE_kpr")),
        &plan,
        manifest_dual_stack,
        &["--nodeport-acceleration", "disabled"],
    )
    .expect("bed");
    let via = SocketAddr::new(IpAddr::V6(bed.node(2).ext_ip6()), NODE_PORT_TCP);
    let direct = SocketAddr::new(IpAddr::V6(bed.node(2).pod_ips6()[0]), POD_TCP);
    let ((v50, v90), (d50, d90)) = latency_between(&bed, via, direct, rounds);
    println!(
        "{:<26}{v50:>12.1}{v90:>12.1}{d50:>12.1}{d90:>12.1}{:>10.3}{:>10.3}",
        "tc, IPv6",
        v50 / d50,
        v90 / d90
    );
}
