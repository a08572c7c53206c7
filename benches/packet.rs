//! Per-packet cost of the north-south programs on their own, through
//! BPF_PROG_TEST_RUN: nanoseconds per packet, as the kernel measures
//! around the program, for XDP and tc ingress on each path of a NodePort
//! flow to a remote backend (SNAT mode): a new flow, an established flow,
//! the backend's reply, and a packet to no frontend (miss). The node is
//! the packet tests' (`tests/support/packet_node.rs`): maps written by the
//! agent's own code, nothing attached.
//!
//! What is measured: BPF_PROG_TEST_RUN's `repeat` runs the program again on
//! the packet the previous run left, and a translated packet is no longer
//! the one sent (an established flow's packet, rewritten to the backend,
//! takes the miss path from the second run on). So every path but the miss
//! is timed one packet per call (repeat 1), over many calls, and reported
//! as median / mean of the kernel's per-call figure; that figure includes
//! the test runner's own timing overhead, which the miss path, whose packet
//! is left unchanged, also shows at repeat 1 and, without it, at repeat
//! 100000 (the difference is that floor). A new flow gets a new client
//! port every call; the conntrack map is emptied every 500 flows
//! (untimed), so the SNAT port search sees at most 500 ports of the 4536
//! taken.
//!
//! Needs root (bpffs, BPF, a network namespace of its own); without it,
//! it says so and measures nothing. `cargo bench --bench packet`
//! (KPR_BENCH_PACKETS to change the 20000 calls per path).

#[path = "../tests/support/packet.rs"]
mod packet;
#[path = "../tests/support/packet_node.rs"]
mod packet_node;

use std::time::Duration;

use packet::*;
use packet_node::*;

/// Repeat of the one-call miss measure.
const REPEAT: u32 = 100_000;
/// New flows between two emptyings of the conntrack map.
const FLOWS_PER_BATCH: usize = 500;

/// Median and mean of per-call durations, in ns.
struct Figure {
    median: u128,
    mean: u128,
}

impl Figure {
    fn of(mut d: Vec<Duration>) -> Figure {
        d.sort();
        let ns: Vec<u128> = d.iter().map(Duration::as_nanos).collect();
        Figure {
            median: ns[ns.len() / 2],
            mean: ns.iter().sum::<u128>() / ns.len() as u128,
        }
    }

    fn cell(&self) -> String {
        format!("{:>5} / {:<5}", self.median, self.mean)
    }
}

fn client_syn(port: u16) -> Vec<u8> {
    Frame::new(
        CLIENT_MAC,
        NODE_MAC,
        Ipv4::new(
            CLIENT_IP,
            NODE_IP,
            L4::Tcp(Tcp::new(port, NP_REMOTE_TCP, TCP_SYN)),
        ),
    )
    .build()
}

fn client_ack(port: u16, dport: u16) -> Vec<u8> {
    Frame::new(
        CLIENT_MAC,
        NODE_MAC,
        Ipv4::new(CLIENT_IP, NODE_IP, L4::Tcp(Tcp::new(port, dport, TCP_ACK))),
    )
    .build()
}

fn backend_ack(snat_port: u16) -> Vec<u8> {
    Frame::new(
        NODE2_MAC,
        NODE_MAC,
        Ipv4::new(
            REMOTE_POD,
            NODE_IP,
            L4::Tcp(Tcp::new(POD_TCP, snat_port, TCP_ACK)),
        ),
    )
    .build()
}

/// `calls` runs of `hook` on `frame(i)`, each expected to end in `verdict`.
fn timed(
    node: &TestNode,
    hook: Hook,
    verdict: Verdict,
    calls: usize,
    mut frame: impl FnMut(usize) -> Vec<u8>,
) -> Figure {
    let mut d = Vec::with_capacity(calls);
    for i in 0..calls {
        let out = node.run(hook, &frame(i), 1);
        assert_eq!(out.verdict, verdict, "{hook:?}, call {i}");
        d.push(out.duration);
    }
    Figure::of(d)
}

/// The four paths through `hook`, on a fresh conntrack.
fn paths(node: &TestNode, hook: Hook, calls: usize) -> [Figure; 5] {
    let (fwd, pass) = match hook {
        Hook::Xdp => (Verdict::XdpRedirect, Verdict::XdpPass),
        _ => (Verdict::TcRedirect, Verdict::TcNext),
    };
    node.clear_ct();
    let new_flow = timed(node, hook, fwd, calls, |i| {
        if i % FLOWS_PER_BATCH == 0 {
            node.clear_ct();
        }
        client_syn(20000 + (i % FLOWS_PER_BATCH) as u16)
    });
    node.clear_ct();
    // One flow, opened by the program; its SNAT port from what it sent.
    let opened = node.run(hook, &client_syn(50000), 1);
    assert_eq!(opened.verdict, fwd);
    let snat_port = Frame::parse(&opened.bytes)
        .expect("the SYN as sent on")
        .ip
        .ports()
        .0;
    let established = timed(node, hook, fwd, calls, |_| client_ack(50000, NP_REMOTE_TCP));
    let reply = timed(node, hook, fwd, calls, |_| backend_ack(snat_port));
    let miss_frame = client_ack(50000, 22);
    let miss = timed(node, hook, pass, calls, |_| miss_frame.clone());
    let repeated = node.run(hook, &miss_frame, REPEAT);
    assert_eq!(repeated.verdict, pass);
    let miss_repeat = Figure {
        median: repeated.duration.as_nanos(),
        mean: repeated.duration.as_nanos(),
    };
    [new_flow, established, reply, miss, miss_repeat]
}

/// How many of `REPEAT` runs on an established flow's packet took the
/// established path (the rest saw the packet as the first run left it).
fn established_runs_under_repeat(node: &TestNode) -> u64 {
    node.clear_ct();
    let opened = node.run(Hook::TcIngress, &client_syn(50001), 1);
    assert_eq!(opened.verdict, Verdict::TcRedirect);
    let before = node.counters()["packets_fwd"];
    node.run(Hook::TcIngress, &client_ack(50001, NP_REMOTE_TCP), 1000);
    node.counters()["packets_fwd"] - before
}

fn main() {
    // `cargo bench` passes --bench; a filter would mean nothing here.
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!(
            "!!! packet bench: needs root (bpffs, BPF, a network namespace); measured nothing"
        );
        return;
    }
    let calls: usize = std::env::var("KPR_BENCH_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let node = TestNode::start(config());
    let xdp = paths(&node, Hook::Xdp, calls);
    let tc = paths(&node, Hook::TcIngress, calls);
    let under_repeat = established_runs_under_repeat(&node);

    println!();
    println!(
        "north-south programs, BPF_PROG_TEST_RUN, ns per packet (kernel-measured), \
         median / mean of {calls} calls of one packet"
    );
    println!("NodePort TCP flow to a remote backend, SNAT mode");
    println!();
    println!("{:<34}{:>15}{:>15}", "path", "XDP", "tc ingress");
    let rows = [
        "new flow (pick, SNAT, 2 CT writes)",
        "established (CT hit)",
        "reply (SNAT port, CT hit)",
        "miss (no frontend)",
    ];
    for (i, row) in rows.iter().enumerate() {
        println!("{row:<34}{:>15}{:>15}", xdp[i].cell(), tc[i].cell());
    }
    println!(
        "{:<34}{:>15}{:>15}",
        format!("miss, repeat {REPEAT} (one call)"),
        format!("{:>5}        ", xdp[4].median),
        format!("{:>5}        ", tc[4].median),
    );
    println!();
    println!(
        "Per-call figures include the test runner's timing floor: miss at repeat 1 \
         minus miss at repeat {REPEAT} (XDP {} ns, tc {} ns).",
        xdp[3].median.saturating_sub(xdp[4].median),
        tc[3].median.saturating_sub(tc[4].median)
    );
    println!(
        "Why not repeat for the other paths: of 1000 repeated runs of an established \
         packet through tc, {under_repeat} took the established path (the rest saw the \
         packet already rewritten)."
    );
}
