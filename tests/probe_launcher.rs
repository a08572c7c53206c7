//! Root-only: `run_probe` starts a real probe process inside the client
//! namespace and test cgroup. This binary is its own probe: started as
//! `<this> probe --spec JSON` it behaves like `kpr probe --spec JSON`;
//! otherwise it runs the tests below (custom harness, libtest-style output).
//!
//! Like every root-only test, these are ignored ("needs root") unless run
//! with `--include-ignored` or `--ignored`, and then each starts with
//! `require_root()`, so a run without root fails instead of passing.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kpr_testbed::probe::{ProbeResult, ProbeSpec};
use kpr_testbed::topology::{backend_v4, backend_v6};
use kpr_testbed::{probe_main, require_root, run_probe, Netns, Server, TestCgroup, Topology};

/// What kpr passes before the spec JSON.
const PROBE_ARGS: &[&str] = &["probe", "--spec"];

const TESTS: &[(&str, fn())] = &[
    (
        "probe_runs_in_the_client_namespace_and_test_cgroup",
        probe_runs_in_the_client_namespace_and_test_cgroup,
    ),
    (
        "probe_reaches_servers_over_tcp_and_udp_on_v4_and_v6",
        probe_reaches_servers_over_tcp_and_udp_on_v4_and_v6,
    ),
    (
        "probe_without_cgroup_still_runs_in_the_namespace",
        probe_without_cgroup_still_runs_in_the_namespace,
    ),
    (
        "a_hanging_probe_is_killed_at_the_timeout",
        a_hanging_probe_is_killed_at_the_timeout,
    ),
    (
        "probe_failures_and_garbage_output_are_errors_with_stderr",
        probe_failures_and_garbage_output_are_errors_with_stderr,
    ),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let [_, probe, spec_flag, spec] = args.as_slice() {
        if [probe.as_str(), spec_flag.as_str()] == PROBE_ARGS {
            return match probe_main(spec) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("probe: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
    }
    if args.iter().any(|a| a == "--list") {
        for (name, _) in TESTS {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    run_tests(&args[1..])
}

fn run_tests(args: &[String]) -> ExitCode {
    let filters: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let exact = args.iter().any(|a| a == "--exact");
    // Every test here needs root, so all are `#[ignore = "needs root"]` in
    // libtest's terms: they run only when ignored tests are asked for.
    let run_ignored = args
        .iter()
        .any(|a| a == "--include-ignored" || a == "--ignored");
    let selected: Vec<_> = TESTS
        .iter()
        .filter(|(name, _)| {
            filters.is_empty()
                || filters
                    .iter()
                    .any(|f| if exact { name == f } else { name.contains(f) })
        })
        .collect();
    let filtered_out = TESTS.len() - selected.len();
    let start = Instant::now();
    println!("\nrunning {} tests", selected.len());
    if !run_ignored {
        for (name, _) in &selected {
            println!("test {name} ... ignored, needs root");
        }
        println!(
            "\ntest result: ok. 0 passed; 0 failed; {} ignored; 0 measured; {filtered_out} filtered out; finished in 0.00s\n",
            selected.len()
        );
        return ExitCode::SUCCESS;
    }
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, test) in selected {
        match catch_unwind(AssertUnwindSafe(test)) {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok");
            }
            Err(_) => {
                failed.push(*name);
                println!("test {name} ... FAILED");
            }
        }
    }
    let verdict = if failed.is_empty() { "ok" } else { "FAILED" };
    if !failed.is_empty() {
        println!("\nfailures:");
        for name in &failed {
            println!("    {name}");
        }
    }
    println!(
        "\ntest result: {verdict}. {passed} passed; {} failed; 0 ignored; 0 measured; {filtered_out} filtered out; finished in {:.2}s\n",
        failed.len(),
        start.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn this_exe() -> PathBuf {
    std::env::current_exe().expect("own executable path")
}

#[track_caller]
fn probe(netns: &Netns, cgroup: Option<&TestCgroup>, spec: ProbeSpec) -> ProbeResult {
    run_probe(
        &this_exe(),
        PROBE_ARGS,
        netns,
        cgroup,
        &spec,
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("probe {spec:?} failed: {e}"))
}

fn probe_runs_in_the_client_namespace_and_test_cgroup() {
    require_root();
    let topo = Topology::build("plp").expect("topology builds");
    let cgroup = TestCgroup::create("plp").expect("cgroup is created");
    let r = probe(topo.client(), Some(&cgroup), ProbeSpec::Placement {});
    let p = r.as_placement().expect("placement result");
    let name = cgroup.path().file_name().unwrap().to_string_lossy();
    assert_eq!(p.cgroup, format!("/{name}"));
    let client_ino = std::fs::metadata(topo.client().path()).unwrap().ino();
    assert_eq!(p.netns_inode, client_ino);
    // The probe has exited; the test process never joined.
    assert!(cgroup.pids().unwrap().is_empty());
}

fn probe_reaches_servers_over_tcp_and_udp_on_v4_and_v6() {
    require_root();
    let topo = Topology::build("plr").expect("topology builds");
    let cgroup = TestCgroup::create("plr").expect("cgroup is created");
    let b = topo.backends();
    let v4 = IpAddr::V4(backend_v4(1).unwrap());
    let v6 = IpAddr::V6(backend_v6(1).unwrap());
    let vip6: IpAddr = "fd00:10:96::a".parse().unwrap();
    topo.add_backend_ip(v4).unwrap();
    topo.add_backend_ip(v6).unwrap();
    topo.add_untranslated_vip(vip6).unwrap();
    let tcp4 = Server::tcp(b, SocketAddr::new(v4, 80), None).unwrap();
    let tcp6 = Server::tcp(b, SocketAddr::new(v6, 80), None).unwrap();
    let udp6 = Server::udp(b, SocketAddr::new(v6, 53), None).unwrap();
    let vip = Server::tcp(b, SocketAddr::new(vip6, 80), Some("untranslated".into())).unwrap();
    let c = topo.client();
    let cg = Some(&cgroup);

    for (server, count) in [(&tcp4, 20), (&tcp6, 7)] {
        let spec = ProbeSpec::TcpRequests {
            target: server.addr(),
            count,
            timeout_ms: 1000,
        };
        let r = probe(c, cg, spec);
        let r = r.as_requests().unwrap();
        assert_eq!(r.identities.get(server.identity()), Some(&u64::from(count)));
        assert!(r.failures.is_empty(), "{r:?}");
        assert_eq!(r.durations_ns.len(), count as usize);
        assert_eq!(server.hits(), u64::from(count));
    }

    let r = probe(
        c,
        cg,
        ProbeSpec::UdpUnconnected {
            target: udp6.addr(),
            count: 3,
            timeout_ms: 1000,
        },
    );
    let u = r.as_udp().unwrap();
    assert_eq!(u.identities.get("[fd00:10:244::11]:53"), Some(&3), "{u:?}");
    assert!(u.reply_sources.contains("[fd00:10:244::11]:53"), "{u:?}");

    let r = probe(
        c,
        cg,
        ProbeSpec::UdpConnected {
            target: udp6.addr(),
            count: 2,
            timeout_ms: 1000,
        },
    );
    let u = r.as_udp().unwrap();
    assert_eq!(u.identities.get("[fd00:10:244::11]:53"), Some(&2), "{u:?}");
    assert!(u.peer_names.contains("[fd00:10:244::11]:53"), "{u:?}");

    let r = probe(
        c,
        cg,
        ProbeSpec::TcpPeerName {
            target: vip.addr(),
            timeout_ms: 1000,
        },
    );
    let p = r.as_peer_name().unwrap();
    assert_eq!(p.identity.as_deref(), Some("untranslated"), "{p:?}");
    assert_eq!(p.peer.as_deref(), Some("[fd00:10:96::a]:80"));

    let r = probe(
        c,
        cg,
        ProbeSpec::TcpConnectError {
            target: SocketAddr::new(v6, 81),
            timeout_ms: 1000,
        },
    );
    assert_eq!(r.as_connect().unwrap().outcome(), "ECONNREFUSED");

    let r = probe(
        c,
        cg,
        ProbeSpec::TcpRequests {
            target: SocketAddr::new(v4, 81),
            count: 2,
            timeout_ms: 1000,
        },
    );
    let r = r.as_requests().unwrap();
    assert_eq!(r.failures.get("connect:ECONNREFUSED"), Some(&2), "{r:?}");
}

fn probe_without_cgroup_still_runs_in_the_namespace() {
    require_root();
    let topo = Topology::build("pln").expect("topology builds");
    let r = probe(topo.client(), None, ProbeSpec::Placement {});
    let client_ino = std::fs::metadata(topo.client().path()).unwrap().ino();
    assert_eq!(r.as_placement().unwrap().netns_inode, client_ino);
}

/// A spec the shell scripts below ignore; only the launcher reads it.
fn any_spec() -> ProbeSpec {
    ProbeSpec::Placement {}
}

fn a_hanging_probe_is_killed_at_the_timeout() {
    require_root();
    let topo = Topology::build("plt").expect("topology builds");
    let cgroup = TestCgroup::create("plt").expect("cgroup is created");
    let start = Instant::now();
    // `exec`, so the pid the launcher kills is the sleeping one.
    let err = run_probe(
        "/bin/sh".as_ref(),
        &["-c", "exec sleep 10", "sh"],
        topo.client(),
        Some(&cgroup),
        &any_spec(),
        Duration::from_millis(300),
    )
    .unwrap_err();
    assert!(err.to_string().contains("timeout"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(cgroup.pids().unwrap().is_empty(), "killed and reaped");
}

fn probe_failures_and_garbage_output_are_errors_with_stderr() {
    require_root();
    let topo = Topology::build("plf").expect("topology builds");
    let run = |script: &str| {
        run_probe(
            "/bin/sh".as_ref(),
            &["-c", script, "sh"],
            topo.client(),
            None,
            &any_spec(),
            Duration::from_secs(5),
        )
    };
    let err = run("echo boom >&2; exit 3").unwrap_err().to_string();
    assert!(err.contains("boom") && err.contains("exit"), "{err}");
    let err = run("echo notjson").unwrap_err().to_string();
    assert!(err.contains("not a probe result"), "{err}");
    let err = run(r#"echo '{"op":"tcp_connect_error","error":null,"elapsed_us":1}'"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("asked for placement"), "{err}");
    let missing = run_probe(
        "/nonexistent/kpr".as_ref(),
        PROBE_ARGS,
        topo.client(),
        None,
        &any_spec(),
        Duration::from_secs(5),
    );
    assert!(missing.is_err());
}
