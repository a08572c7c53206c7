//! The agent's web view in a real headless browser (Debian's chromium,
//! tools/setup-deps): the page loads from the metrics address and lists
//! the selftest's Services with their frontends and backends; its event
//! stream delivers the sync a manifest change causes and the flow of a
//! connect made while it is open. The screenshot's
//! path is printed (`screenshot: ...`) for CI to keep.
//!
//! Needs root (the socket-LB bed): every test is `#[ignore = "needs root"]`
//! and fails at once without root. Every wait is bounded.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kpr_testbed::require_root;
use kpr_testbed::{BedPlan, SocketLbBed};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");

/// Runs chromium headless with `args` on `url`, killed after `limit`; its stdout.
fn chromium(args: &[&str], url: &str, limit: Duration) -> String {
    let profile = tempfile::tempdir().expect("a profile directory");
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("chromium (apt-get install chromium; tools/setup-deps)");
    // chromium's helpers (renderer, GPU) are its children: killed with it
    // through its process group on a timeout.
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("waiting for chromium").is_none() {
        if Instant::now() > deadline {
            // The group chromium leads (process_group(0) above), no other.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
            panic!("chromium did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("chromium's output");
    out
}

/// Reads `/ui/events` until a `data:` line containing `want` (bounded);
/// `trigger` runs once the stream is open.
fn event_after(addr: SocketAddr, want: &str, trigger: impl FnOnce()) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics address");
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    write!(
        s,
        "GET /ui/events HTTP/1.1\r\nHost: kpr\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let mut trigger = Some(trigger);
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(_) => {}
        }
        if seen.contains("text/event-stream") {
            if let Some(t) = trigger.take() {
                t();
            }
        }
        if let Some(line) = seen
            .lines()
            .find(|l| l.starts_with("data:") && l.contains(want))
        {
            return line.to_string();
        }
    }
    panic!("no event with {want:?} in:\n{seen}");
}

/// The body of `GET path` (HTTP/1.0, so the server closes; bounded).
fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics address");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: kpr\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(out)
}

const EXTRA: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: added, namespace: selftest}
spec:
  clusterIP: 10.96.0.99
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

#[test]
#[ignore = "needs root"]
fn the_web_view_lists_the_selftest_services_in_a_browser_and_streams_syncs_and_flows() {
    require_root();
    let bed = SocketLbBed::start(
        "webui",
        Path::new(KPR),
        kpr::selftest::MANIFEST,
        &BedPlan::default(),
    )
    .expect("bed");
    let addr = bed.agent.metrics_addr;
    // Without the event stream: headless virtual time stops at an open one
    // (the stream is checked below, over plain HTTP).
    let url = format!("http://{addr}/ui?tail=off");
    let rows = bed.svc_list_json().expect("svc list");
    let services: Vec<String> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["service"].as_str().map(String::from))
        .collect();
    assert!(!services.is_empty(), "svc list names no Service: {rows}");

    // The page, rendered: every frontend and Service of svc list is there.
    let dom = chromium(
        &["--virtual-time-budget=5000", "--dump-dom"],
        &url,
        Duration::from_secs(60),
    );
    for row in rows.as_array().unwrap() {
        let frontend = row["frontend"].as_str().unwrap();
        assert!(dom.contains(frontend), "no {frontend} in the page:\n{dom}");
    }
    for s in &services {
        assert!(dom.contains(s.as_str()), "no {s} in the page:\n{dom}");
    }
    assert!(dom.contains("frontends, updated"), "{dom}");

    let shot: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web_ui.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &[
            "--virtual-time-budget=5000",
            "--window-size=1280,900",
            &format!("--screenshot={}", shot.display()),
        ],
        &url,
        Duration::from_secs(60),
    );
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 1000),
        "no screenshot at {}",
        shot.display()
    );
    println!("screenshot: {}", shot.display());

    // The live tail: a manifest change is a sync event on the stream.
    let line = event_after(addr, "\"kind\":\"sync\"", || {
        bed.write_manifest("added.yaml", EXTRA).expect("manifest");
    });
    assert!(line.contains("\"result\":\"ok\""), "{line}");

    // A connect made while the page listens is a flow on the stream, with
    // its Service and backend (the reader joins as a monitor within a
    // fraction of a second of the page opening; connects are repeated,
    // bounded, until then).
    let line = event_after(addr, "\"kind\":\"flow\"", || {
        for _ in 0..10 {
            let _ = bed.tcp_spread("10.96.0.10:80".parse().unwrap(), 1);
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    assert!(line.contains("\"service\":\"selftest/web:http\""), "{line}");
    assert!(
        line.contains("\"frontend\":\"10.96.0.10:80/TCP\""),
        "{line}"
    );
    assert!(line.contains("\"verdict\":\"translated\""), "{line}");

    // The page's counters (/ui/counters) now hold those connects: the
    // socket hooks' translated decisions of that frontend.
    let counters: serde_json::Value =
        serde_json::from_str(&get(addr, "/ui/counters")).expect("counters are JSON");
    let translated = counters
        .as_array()
        .expect("a list of samples")
        .iter()
        .find(|c| {
            c["family"] == "kpr_socket_lb_decisions_total"
                && c["labels"]["frontend"] == "10.96.0.10:80/TCP"
                && c["labels"]["verdict"] == "translated"
        })
        .unwrap_or_else(|| panic!("no translated decisions of 10.96.0.10:80/TCP in {counters}"));
    assert!(translated["value"].as_f64().unwrap() >= 1.0, "{translated}");
}
