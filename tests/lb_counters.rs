//! The always-on load-balancing counters (bpf/include/lb_verdict.h) as an
//! operator reads them, through the agent's /metrics: every decision of
//! the socket hooks is counted exactly once under its frontend and
//! verdict, for IPv4 and IPv6. Root only, on the socket-LB bed.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use kpr_testbed::require_root;
use kpr_testbed::{BedPlan, ProbeSpec, SocketLbBed};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: t}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:10:96::10"]
  ports:
  - {name: http, port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: t, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.0.11]
- addresses: [10.244.0.12]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-6, namespace: t, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints:
- addresses: ["fd00:10:244::11"]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: t}
spec:
  clusterIP: 10.96.0.30
  clusterIPs: [10.96.0.30, "fd00:10:96::30"]
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: t}
spec:
  clusterIP: 10.96.0.40
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: t, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.0.12]
  nodeName: another-node
"#;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn bed(prefix: &str) -> SocketLbBed {
    SocketLbBed::start(
        prefix,
        Path::new(KPR),
        SERVICES,
        &BedPlan {
            v4_backends: 2,
            v6_backends: 1,
            ..BedPlan::default()
        },
    )
    .unwrap_or_else(|e| panic!("bed {prefix}: {e}"))
}

/// `kpr_socket_lb_decisions_total` of one verdict and frontend (0 when
/// the series does not exist yet).
#[track_caller]
fn decisions(bed: &SocketLbBed, verdict: &str, frontend: &str) -> u64 {
    let labels = format!("verdict=\"{verdict}\",frontend=\"{frontend}\"");
    bed.agent
        .metric_value("kpr_socket_lb_decisions_total", &labels)
        .unwrap()
        .unwrap_or(0.0) as u64
}

/// `count` connects to `target` that must all fail with `errno`.
#[track_caller]
fn refused(bed: &SocketLbBed, target: &str, count: usize, errno: &str) {
    for _ in 0..count {
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
        assert_eq!(r.error.as_deref(), Some(errno), "{target}: {r:?}");
    }
}

#[test]
#[ignore = "needs root"]
fn every_socket_decision_is_counted_once_under_its_frontend_and_verdict() {
    require_root();
    let bed = bed("lbcnt");
    let cases: [(&str, &str, &str); 5] = [
        ("translated", "10.96.0.10:80/TCP", "10.96.0.10:80"),
        (
            "translated",
            "[fd00:10:96::10]:80/TCP",
            "[fd00:10:96::10]:80",
        ),
        ("no_backend", "10.96.0.30:80/TCP", "10.96.0.30:80"),
        (
            "no_backend",
            "[fd00:10:96::30]:80/TCP",
            "[fd00:10:96::30]:80",
        ),
        ("local_policy", "10.96.0.40:80/TCP", "10.96.0.40:80"),
    ];
    let before: Vec<u64> = cases
        .iter()
        .map(|(v, fe, _)| decisions(&bed, v, fe))
        .collect();
    let invalid_before = decisions(&bed, "invalid_port", "none");

    bed.tcp_spread(addr("10.96.0.10:80"), 20).unwrap();
    bed.tcp_spread(addr("[fd00:10:96::10]:80"), 7).unwrap();
    refused(&bed, "10.96.0.30:80", 3, "ECONNREFUSED");
    refused(&bed, "[fd00:10:96::30]:80", 2, "ECONNREFUSED");
    refused(&bed, "10.96.0.40:80", 4, "ECONNREFUSED");
    // A port the ClusterIP's Service does not define: no frontend.
    refused(&bed, "10.96.0.10:81", 5, "ECONNREFUSED");

    let want = [20, 7, 3, 2, 4];
    for (i, (verdict, fe, _)) in cases.iter().enumerate() {
        let got = decisions(&bed, verdict, fe) - before[i];
        assert_eq!(
            got,
            want[i],
            "{verdict} for {fe}; /metrics:\n{}",
            bed.agent.metrics().unwrap_or_default()
        );
    }
    assert_eq!(decisions(&bed, "invalid_port", "none") - invalid_before, 5);
    // The Service's identity is on the series.
    let named = bed
        .agent
        .metric_value(
            "kpr_socket_lb_decisions_total",
            "frontend=\"10.96.0.10:80/TCP\",namespace=\"t\",name=\"web\",port_name=\"http\"",
        )
        .unwrap();
    assert!(named.is_some_and(|v| v >= 20.0), "{named:?}");
}

/// A running `kpr monitor`, its output lines gathered by threads.
struct Monitor {
    child: std::process::Child,
    stdout: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Monitor {
    /// Starts `kpr monitor -o json ARGS` on the bed's maps and waits
    /// (bounded) until it listens.
    fn start(bed: &SocketLbBed, args: &[&str]) -> Monitor {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(KPR)
            .args(["monitor", "-o", "json", "--bpf-root"])
            .arg(&bed.agent.bpf_root)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = |r: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(r).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
            rx
        };
        let stdout = lines(Box::new(child.stdout.take().unwrap()));
        let stderr = lines(Box::new(child.stderr.take().unwrap()));
        let m = Monitor {
            child,
            stdout,
            stderr,
        };
        let first = m.stderr.recv_timeout(Duration::from_secs(10));
        assert!(
            first.as_deref().is_ok_and(|l| l.contains("listening")),
            "monitor did not start: {first:?}"
        );
        m
    }

    /// Waits (bounded) for the monitor to stop on its own; its JSON event
    /// lines and its summary.
    fn finish(mut self) -> (Vec<serde_json::Value>, serde_json::Value) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("kpr monitor did not stop within its bounds");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let events = self
            .stdout
            .try_iter()
            .map(|l| serde_json::from_str(&l).unwrap())
            .collect();
        let summary = self
            .stderr
            .recv_timeout(Duration::from_secs(5))
            .ok()
            .and_then(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
            .unwrap_or_default();
        (events, summary["summary"].clone())
    }
}

#[test]
#[ignore = "needs root"]
fn monitor_shows_a_connect_s_frontend_backend_and_reason_and_a_refusal_s_verdict() {
    require_root();
    let bed = bed("lbmon");
    let m = Monitor::start(&bed, &["--count", "2", "--duration", "20s"]);
    // One reader at a time: a second monitor is refused with the pid.
    let second = std::process::Command::new(KPR)
        .args(["monitor", "--bpf-root"])
        .arg(&bed.agent.bpf_root)
        .args(["--duration", "1s"])
        .output()
        .unwrap();
    let second_err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{second_err}");
    assert!(
        second_err.contains("reads the events already"),
        "{second_err}"
    );
    bed.tcp_spread(addr("10.96.0.10:80"), 1).unwrap();
    refused(&bed, "10.96.0.30:80", 1, "ECONNREFUSED");
    let (events, summary) = m.finish();
    assert_eq!(events.len(), 2, "{events:#?}");
    let connect = &events[0];
    assert_eq!(connect["hook"], "connect");
    assert_eq!(connect["verdict"], "translated");
    assert_eq!(connect["reason"], "random");
    assert_eq!(connect["frontend"], "10.96.0.10:80/TCP");
    assert_eq!(connect["service"], "t/web:http", "{connect}");
    let backend = connect["backend"].as_str().unwrap_or_default();
    assert!(
        ["10.244.0.11:8080/TCP", "10.244.0.12:8080/TCP"].contains(&backend),
        "{connect}"
    );
    assert!(connect["netns_cookie"].as_u64().is_some_and(|c| c != 0));
    assert!(connect["cgroup"].as_str().is_some(), "{connect}");
    let refusal = &events[1];
    assert_eq!(refusal["verdict"], "no_backend");
    assert_eq!(refusal["frontend"], "10.96.0.30:80/TCP");
    assert_eq!(refusal["service"], "t/empty:http", "{refusal}");
    assert!(refusal["backend"].is_null());
    assert_eq!(summary["shown"], 2, "{summary}");
    let emitted = summary["datapath"]["emitted"].as_u64().unwrap();
    assert!(emitted >= 2, "{summary}");

    // --service: only the named Service's decisions.
    let only_empty = Monitor::start(
        &bed,
        &["--service", "t/empty", "--count", "1", "--duration", "20s"],
    );
    bed.tcp_spread(addr("10.96.0.10:80"), 1).unwrap();
    refused(&bed, "10.96.0.30:80", 3, "ECONNREFUSED");
    let (of_empty, _) = only_empty.finish();
    assert_eq!(of_empty.len(), 1, "{of_empty:#?}");
    assert_eq!(of_empty[0]["service"], "t/empty:http", "{of_empty:#?}");
}

#[test]
#[ignore = "needs root"]
fn a_flood_is_sampled_and_rate_limited_and_the_monitor_says_how_much() {
    require_root();
    let bed = bed("lbflood");
    let m = Monitor::start(
        &bed,
        &[
            "--sample-every",
            "2",
            "--rate",
            "20",
            "--burst",
            "5",
            "--duration",
            "6s",
        ],
    );
    bed.tcp_spread(addr("10.96.0.10:80"), 300).unwrap();
    let (events, summary) = m.finish();
    let d = &summary["datapath"];
    let n = |k: &str| d[k].as_u64().unwrap_or_else(|| panic!("{summary}"));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    // Every decision went one of three ways; one in two was sampled out.
    assert_eq!(
        n("emitted") + n("sampled_out") + n("rate_limited") + n("lost"),
        300,
        "{summary}"
    );
    assert!(n("sampled_out").abs_diff(150) <= cpus, "{summary}");
    // 150 sampled in, far more than 5 at once + 20/s per CPU over the run.
    assert!(n("rate_limited") > 0, "{summary}");
    assert!(n("emitted") <= cpus * (5 + 20 * 7), "{summary}");
    assert_eq!(events.len() as u64, summary["shown"].as_u64().unwrap());
    assert_eq!(n("lost"), 0, "{summary}");
}
