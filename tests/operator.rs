//! The operator's command line as a script or a monitoring check sees it:
//! `kpr status`'s exit codes and JSON error object (against a stand-in
//! agent serving kpr's own `/status` router), `kpr completion`, and
//! `kpr agent --log-format json` (root: a real agent in a test bed).

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use kpr::status::{status_router, AgentStatus, StatusHandle};
use serde_json::Value;

const KPR: &str = env!("CARGO_BIN_EXE_kpr");

/// An HTTP server on a loopback port serving `router` on its own runtime,
/// until dropped.
struct StandIn {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl StandIn {
    fn serve(router: Router) -> StandIn {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let listener = runtime
            .block_on(kpr::http::bind(
                "127.0.0.1:0".parse().expect("an address"),
                "status",
            ))
            .expect("a loopback port");
        let addr = listener.local_addr().expect("bound");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        runtime.spawn(kpr::http::serve(listener, "status", router, async move {
            let _ = stopped.await;
        }));
        StandIn {
            addr,
            stop: Some(stop),
            runtime: Some(runtime),
        }
    }

    /// An agent whose `/status` says `status`.
    fn agent(status: AgentStatus) -> StandIn {
        StandIn::serve(status_router(StatusHandle::new(status)))
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// A loopback address nothing listens on (bound, then released).
fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    listener.local_addr().expect("bound")
}

/// `kpr status` against `addr`, with an empty directory as its bpf root
/// (no datapath: only the agent's answer decides), plus `args`.
fn status(addr: SocketAddr, args: &[&str]) -> Output {
    let root = tempfile::tempdir().expect("a temp dir");
    let root = root.path().join("bpf");
    Command::new(KPR)
        .args(["status", "--metrics-addr", &addr.to_string(), "--bpf-root"])
        .arg(&root)
        .args(args)
        .output()
        .expect("kpr status ran")
}

#[track_caller]
fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn synced(ok: bool) -> AgentStatus {
    AgentStatus {
        last_sync_ok: Some(ok),
        syncs: 1,
        ..AgentStatus::default()
    }
}

#[test]
fn status_exits_0_when_the_agent_reports_no_problem() {
    let agent = StandIn::agent(synced(true));

    let json = status(agent.addr, &["-o", "json"]);
    let text = status(agent.addr, &[]);

    assert_eq!(json.status.code(), Some(0));
    let json = json_of(&json);
    assert_eq!(json["health"], "healthy");
    assert_eq!(json["exit_code"], 0);
    assert_eq!(json["problems"], serde_json::json!([]));
    assert_eq!(json["agent"]["last_sync_ok"], true);
    assert_eq!(json["error"], Value::Null);
    assert_eq!(text.status.code(), Some(0));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("KubeProxyReplacement Details:") && !text.contains("Problems:"));
}

#[test]
fn status_exits_1_when_the_agent_reports_problems_and_names_them() {
    let agent = StandIn::agent(AgentStatus {
        unprogrammed: vec![kpr::status::UnprogrammedService {
            service: "t/big".into(),
            reason: "too_many_backends".into(),
            message: "70000 backends do not fit".into(),
        }],
        ..synced(false)
    });

    let json = status(agent.addr, &["-o", "json"]);
    let text = status(agent.addr, &[]);

    assert_eq!(json.status.code(), Some(1));
    let json = json_of(&json);
    assert_eq!(json["health"], "problems");
    assert_eq!(json["exit_code"], 1);
    assert_eq!(
        json["problems"],
        serde_json::json!(["the last sync failed", "1 Service(s) not programmed"])
    );
    assert_eq!(text.status.code(), Some(1));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(
            "  Problems:             the last sync failed; 1 Service(s) not programmed\n"
        ),
        "{text}"
    );

    let never_synced = StandIn::agent(AgentStatus::default());
    assert_eq!(status(never_synced.addr, &[]).status.code(), Some(1));
}

#[test]
fn status_exits_2_with_an_error_object_when_nothing_listens() {
    let addr = closed_port();

    let json = status(addr, &["-o", "json"]);
    let text = status(addr, &[]);

    assert_eq!(json.status.code(), Some(2));
    let json = json_of(&json);
    assert_eq!(json["health"], "unreachable");
    assert_eq!(json["exit_code"], 2);
    assert_eq!(json["agent"], Value::Null);
    let error = &json["error"];
    assert_eq!(error["kind"], "unreachable", "{json:#}");
    assert_eq!(error["address"], addr.to_string());
    assert_eq!(error["http_status"], Value::Null);
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("not reachable")),
        "{error}"
    );
    assert!(json.get("Ok").is_none() && json["agent"].get("Err").is_none());
    assert_eq!(text.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&text.stdout).contains("agent not reachable at"));
}

#[test]
fn status_exits_2_when_the_agent_answers_an_error_or_not_its_status() {
    // A server without /status, e.g. asked from a non-loopback address.
    let not_found = StandIn::serve(Router::new());
    let out = status(not_found.addr, &["-o", "json"]);
    assert_eq!(out.status.code(), Some(2));
    let json = json_of(&out);
    assert_eq!(json["error"]["kind"], "http_status");
    assert_eq!(json["error"]["http_status"], 404);

    let stranger = StandIn::serve(Router::new().route("/status", get(|| async { "hello" })));
    let out = status(stranger.addr, &["-o", "json"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(json_of(&out)["error"]["kind"], "bad_answer");
}

#[test]
fn status_exits_3_on_bad_usage_while_other_commands_keep_claps_2() {
    for args in [
        &["--no-such-flag"][..],
        &["-o", "yaml"],
        &["--metrics-addr", "x"],
    ] {
        let out = Command::new(KPR)
            .arg("status")
            .args(args)
            .output()
            .expect("kpr ran");
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        assert!(
            !out.stderr.is_empty(),
            "{args:?}: the usage error is printed"
        );
    }
    let help = Command::new(KPR)
        .args(["status", "--help"])
        .output()
        .expect("kpr ran");
    assert_eq!(help.status.code(), Some(0));
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("Exit codes") && help.contains("3 bad usage"),
        "{help}"
    );

    let other = Command::new(KPR)
        .args(["svc", "list", "--no-such-flag"])
        .output()
        .expect("kpr ran");
    assert_eq!(other.status.code(), Some(2));
}

#[test]
fn status_exits_3_when_its_report_cannot_be_written() {
    let agent = StandIn::agent(synced(true));
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let root = tempfile::tempdir().expect("a temp dir");

    let out = Command::new(KPR)
        .args([
            "status",
            "--metrics-addr",
            &agent.addr.to_string(),
            "--bpf-root",
        ])
        .arg(root.path().join("bpf"))
        .stdout(Stdio::from(full))
        .stderr(Stdio::piped())
        .output()
        .expect("kpr status ran");

    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("writing the status report"));
}

#[test]
fn completion_scripts_are_printed_for_every_shell_and_bash_completes_the_subcommands() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = Command::new(KPR)
            .args(["completion", shell])
            .output()
            .expect("kpr ran");
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains("agent") && script.contains("status"),
            "{shell}"
        );
    }
    let bash = Command::new(KPR)
        .args(["completion", "bash"])
        .output()
        .expect("kpr ran");
    let script = String::from_utf8_lossy(&bash.stdout);
    assert!(script.contains("_kpr() {"), "{script}");
    assert!(script.contains("complete -F _kpr"), "{script}");
    for word in ["agent", "svc", "ct", "status", "cleanup", "completion"] {
        assert!(script.contains(word), "{word} not offered");
    }
    assert!(script.contains("--log-format") && script.contains("--metrics-addr"));

    // Bash reads it, and completing `kpr s` offers svc, status, selftest.
    let check = format!(
        "{script}\nCOMP_WORDS=(kpr s); COMP_CWORD=1; _kpr kpr s kpr; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    );
    let out = Command::new("bash")
        .args(["--norc", "-c", &check])
        .output()
        .expect("bash ran");
    let offered = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for word in ["svc", "status", "selftest"] {
        assert!(
            offered.lines().any(|l| l == word),
            "{word} not in {offered:?}"
        );
    }

    let bad = Command::new(KPR)
        .args(["completion", "tcsh"])
        .output()
        .expect("kpr ran");
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
#[ignore = "needs root"]
fn the_agent_logs_one_json_object_per_line_with_level_and_message() {
    kpr_testbed::require_root();
    const MANIFEST: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: t}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}
"#;
    let plan = kpr_testbed::BedPlan {
        v4_backends: 1,
        v6_backends: 0,
        agent_args: vec!["--log-format".into(), "json".into()],
        ..kpr_testbed::BedPlan::default()
    };
    let mut bed =
        kpr_testbed::SocketLbBed::start("jsonlog", std::path::Path::new(KPR), MANIFEST, &plan)
            .expect("a bed");
    bed.agent.stop().expect("the agent stops");
    let log = bed.agent.log();

    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{log}");
    let mut levels = std::collections::BTreeSet::new();
    for line in &lines {
        let event: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\nwhole log:\n{log}"));
        let level = event["level"]
            .as_str()
            .unwrap_or_else(|| panic!("no level: {line}"));
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level),
            "{line}"
        );
        assert!(event["message"].is_string(), "no message: {line}");
        assert!(event["timestamp"].is_string(), "no timestamp: {line}");
        levels.insert(level.to_string());
    }
    assert!(levels.contains("INFO"), "{log}");
    assert!(
        log.contains(r#""message":"stopping; programs stay attached and maps pinned""#),
        "{log}"
    );
}
