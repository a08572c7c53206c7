//! `kpr selftest`: the README's first command. On a bare machine it builds
//! a throw-away network (two namespaces, identity servers on five backends),
//! a cgroup and a bpf root, runs the agent on the embedded example manifest
//! (manifests/selftest.yaml), sends real TCP and UDP traffic through the
//! VIPs and reports per check, with per-backend counts. Everything is
//! removed afterwards, also on failure or Ctrl-C.
//!
//! Its submodules are the bed it builds; the integration tests and benches
//! reuse them through the dev-only `kpr-testbed` crate (tests/testbed/),
//! which adds the multi-node beds only tests need. `probe` is also the
//! `kpr probe` subcommand the bed runs inside its namespaces and cgroup.
//! Nothing here attaches BPF to or creates interfaces in the host's root
//! namespace.

#![warn(missing_docs)]

pub mod agent;
pub mod bed;
pub mod cgroup;
pub mod errno;
pub mod error;
pub mod launch;
pub mod netns;
pub mod prefix;
pub mod probe;
pub mod server;
pub mod sweep;
pub mod topology;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};

use bed::{BedPlan, SocketLbBed, UNTRANSLATED};
use probe::ProbeSpec;
use sweep::sweep_stale;

/// The example manifest selftest programs.
pub const MANIFEST: &str = include_str!("../../manifests/selftest.yaml");
const PREFIX: &str = "kprst";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; removing what selftest created");
    }
    Ok(())
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("selftest addresses are literals")
}

/// One check's verdict.
struct Verdict {
    name: String,
    passed: bool,
    detail: String,
}

fn spread(identities: &BTreeMap<String, u64>) -> String {
    identities
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Requests reached exactly `backends` (by identity), each with at least
/// `min_share` of them, and none failed.
fn balanced(
    identities: &BTreeMap<String, u64>,
    failures: &BTreeMap<String, u64>,
    backends: &[&str],
    min_share: f64,
) -> bool {
    let total: u64 = identities.values().sum();
    failures.is_empty()
        && identities.len() == backends.len()
        && backends.iter().all(|b| {
            identities
                .get(*b)
                .is_some_and(|n| *n as f64 >= min_share * total as f64)
        })
}

/// Runs `kpr selftest`: builds the bed, runs the checks, prints a verdict
/// per check; fails when one failed (or without root).
pub fn run() -> Result<ExitCode> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("selftest needs root: it creates network namespaces, a cgroup and BPF programs");
    }
    // The handler only stores to an atomic.
    crate::sys::on_signals(
        &[
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::Signal::SIGTERM,
        ],
        on_signal,
    )
    .context("installing the interrupt handler")?;
    let swept = sweep_stale(PREFIX).context("removing leftovers of an interrupted selftest")?;
    if !swept.netns.is_empty() {
        println!("removed leftovers of an earlier run: {:?}", swept.netns);
    }
    let exe = std::env::current_exe().context("locating the kpr binary")?;
    println!("kpr selftest: building namespaces, a cgroup and a bpf root; starting the agent");
    let plan = BedPlan {
        untranslated_vips: vec![addr("10.96.0.10:80")],
        ..BedPlan::default()
    };
    let bed =
        SocketLbBed::start(PREFIX, &exe, MANIFEST, &plan).context("setting up the selftest bed")?;
    let verdicts = checks(&bed)?;

    println!("\n$ kpr svc list\n{}", bed.svc_list()?);
    let passed = verdicts.iter().filter(|v| v.passed).count();
    for v in &verdicts {
        println!(
            "[{}] {}: {}",
            if v.passed { "PASS" } else { "FAIL" },
            v.name,
            v.detail
        );
    }
    drop(bed);
    println!(
        "\nselftest: {passed} passed, {} failed",
        verdicts.len() - passed
    );
    Ok(if passed == verdicts.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn checks(bed: &SocketLbBed) -> Result<Vec<Verdict>> {
    let v4 = ["10.244.0.11:8080", "10.244.0.12:8080", "10.244.0.13:8080"];
    let v6 = ["[fd00:10:244::11]:8080", "[fd00:10:244::12]:8080"];
    let udp = ["10.244.0.11:5353", "10.244.0.12:5353", "10.244.0.13:5353"];
    let mut out = Vec::new();

    check_interrupted()?;
    let r = bed.probe(
        &ProbeSpec::TcpRequests {
            target: addr("10.96.0.10:80"),
            count: 200,
            timeout_ms: 2000,
        },
        true,
    )?;
    let r = r.as_requests().context("tcp probe result")?;
    out.push(Verdict {
        name: "TCP 10.96.0.10:80, 200 connections".into(),
        passed: balanced(&r.identities, &r.failures, &v4, 0.10),
        detail: format!("{} failures {:?}", spread(&r.identities), r.failures),
    });

    check_interrupted()?;
    let r = bed.probe(
        &ProbeSpec::TcpRequests {
            target: addr("[fd00:10:96::10]:80"),
            count: 100,
            timeout_ms: 2000,
        },
        true,
    )?;
    let r = r.as_requests().context("tcp6 probe result")?;
    out.push(Verdict {
        name: "TCP [fd00:10:96::10]:80, 100 connections".into(),
        passed: balanced(&r.identities, &r.failures, &v6, 0.10),
        detail: format!("{} failures {:?}", spread(&r.identities), r.failures),
    });

    check_interrupted()?;
    let r = bed.probe(
        &ProbeSpec::UdpUnconnected {
            target: addr("10.96.0.10:53"),
            count: 60,
            timeout_ms: 2000,
        },
        true,
    )?;
    let r = r.as_udp().context("udp probe result")?;
    let vip_only =
        r.reply_sources.iter().all(|s| s == "10.96.0.10:53") && !r.reply_sources.is_empty();
    out.push(Verdict {
        name: "UDP sendto/recvfrom 10.96.0.10:53, 60 datagrams".into(),
        passed: balanced(&r.identities, &r.failures, &udp, 0.05) && vip_only,
        detail: format!(
            "{} reply sources {:?}",
            spread(&r.identities),
            r.reply_sources
        ),
    });

    check_interrupted()?;
    let r = bed.probe(
        &ProbeSpec::UdpConnected {
            target: addr("10.96.0.10:53"),
            count: 60,
            timeout_ms: 2000,
        },
        true,
    )?;
    let r = r.as_udp().context("connected udp probe result")?;
    let vip_only = r
        .reply_sources
        .iter()
        .chain(&r.peer_names)
        .all(|s| s == "10.96.0.10:53");
    out.push(Verdict {
        name: "UDP connected 10.96.0.10:53, 60 sockets".into(),
        passed: balanced(&r.identities, &r.failures, &udp, 0.05) && vip_only,
        detail: format!("{} peers {:?}", spread(&r.identities), r.peer_names),
    });

    check_interrupted()?;
    let r = bed.probe(
        &ProbeSpec::TcpPeerName {
            target: addr("10.96.0.10:80"),
            timeout_ms: 2000,
        },
        true,
    )?;
    let r = r.as_peer_name().context("getpeername probe result")?;
    out.push(Verdict {
        name: "getpeername() on a translated TCP socket".into(),
        passed: r.peer.as_deref() == Some("10.96.0.10:80")
            && r.identity.as_deref().is_some_and(|i| v4.contains(&i)),
        detail: format!("peer {:?}, served by {:?}", r.peer, r.identity),
    });

    check_interrupted()?;
    let r = bed.probe(
        &ProbeSpec::TcpConnectError {
            target: addr("10.96.0.11:80"),
            timeout_ms: 2000,
        },
        true,
    )?;
    let r = r.as_connect().context("connect probe result")?;
    out.push(Verdict {
        name: "service without endpoints 10.96.0.11:80".into(),
        passed: r.error.as_deref() == Some("ECONNREFUSED") && r.elapsed_us < 100_000,
        detail: format!("connect: {} after {} us", r.outcome(), r.elapsed_us),
    });

    check_interrupted()?;
    let r = bed.probe(
        &ProbeSpec::TcpRequests {
            target: addr("10.96.0.10:80"),
            count: 5,
            timeout_ms: 2000,
        },
        false,
    )?;
    let r = r.as_requests().context("untranslated probe result")?;
    out.push(Verdict {
        name: "a process outside the cgroup is not translated".into(),
        passed: r.identities.keys().all(|k| k == UNTRANSLATED)
            && r.identities.get(UNTRANSLATED) == Some(&5),
        detail: spread(&r.identities),
    });
    Ok(out)
}
