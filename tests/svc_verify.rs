//! `kpr svc list` names each frontend's Service, and `kpr svc list
//! --verify` proves the pinned maps equal to what the agent programmed:
//! 0 on a synced node, the difference named and 1 after a map entry is
//! changed behind the agent's back. The record survives a restart and goes
//! with `kpr cleanup`. A real agent on the socket-LB bed.
//!
//! Needs root: every test is `#[ignore = "needs root"]` (run them with
//! `--include-ignored`) and fails at once without root.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kpr::datapath::kernel::KernelMaps;
use kpr::datapath::maps::BackendEntry;
use kpr::datapath::LbMaps;
use kpr::model::{Frontend, Protocol};
use kpr_testbed::require_root;
use kpr_testbed::{BedPlan, SocketLbBed};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: t}
spec:
  clusterIP: 10.96.0.10
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
"#;

fn kpr(bpf_root: &Path, args: &[&str]) -> Output {
    Command::new(KPR)
        .args(args)
        .arg("--bpf-root")
        .arg(bpf_root)
        .output()
        .expect("running kpr")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `svc list` until it names `service` (bounded: 10 s); the table.
#[track_caller]
fn wait_for_name(bpf_root: &Path, service: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let table = stdout(&kpr(bpf_root, &["svc", "list"]));
        if table.contains(service) {
            return table;
        }
        assert!(Instant::now() < deadline, "no {service} in\n{table}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs root"]
fn svc_list_names_services_and_verify_names_a_backend_changed_behind_the_agent() {
    require_root();
    let mut bed = SocketLbBed::start(
        "svcvfy",
        Path::new(KPR),
        WEB,
        &BedPlan {
            v4_backends: 2,
            v6_backends: 0,
            ..BedPlan::default()
        },
    )
    .expect("bed");
    let root = bed.agent.bpf_root.clone();

    // The Service column, and the JSON field.
    let table = wait_for_name(&root, "t/web:http");
    let row = table
        .lines()
        .find(|l| l.contains("10.96.0.10:80/TCP"))
        .unwrap_or_else(|| panic!("no row in\n{table}"));
    let words: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        words[1..4],
        ["10.96.0.10:80/TCP", "t/web:http", "ClusterIP"],
        "{table}"
    );
    assert!(table.contains("t/web:dns"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&kpr(&root, &["svc", "list", "-o", "json"]))).unwrap();
    let udp = json
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["frontend"] == "10.96.0.10:53/UDP")
        .expect("the UDP frontend");
    assert_eq!(udp["service"], "t/web:dns");

    // In sync: exit 0.
    let ok = kpr(&root, &["svc", "list", "--verify"]);
    assert_eq!(ok.status.code(), Some(0), "{}", stdout(&ok));
    assert!(
        stdout(&ok).starts_with("in sync: 2 frontends"),
        "{}",
        stdout(&ok)
    );

    // A backend entry rewritten behind the agent's back (another port).
    let mut maps = KernelMaps::open(&root).expect("the pinned maps");
    let snapshot = maps.snapshot().unwrap();
    let fe = Frontend::new("10.96.0.10".parse().unwrap(), 80, Protocol::Tcp);
    let id = snapshot.frontends[&fe].slots[0];
    let original = snapshot.backends[&id];
    let moved = BackendEntry {
        addr: kpr::model::L4Addr {
            port: 9999,
            ..original.addr
        },
        ..original
    };
    maps.put_backends(&[(id, moved)]).unwrap();
    let drift = kpr(&root, &["svc", "list", "--verify"]);
    let text = stdout(&drift);
    assert_eq!(drift.status.code(), Some(1), "{text}");
    for line in [
        format!(
            "missing backend 10.96.0.10:80/TCP (t/web:http): {}",
            original.addr
        ),
        format!(
            "extra backend 10.96.0.10:80/TCP (t/web:http): {}",
            moved.addr
        ),
        "2 difference(s)".to_string(),
    ] {
        assert!(text.contains(&line), "no {line:?} in\n{text}");
    }
    let json: serde_json::Value = serde_json::from_str(&stdout(&kpr(
        &root,
        &["svc", "list", "--verify", "-o", "json"],
    )))
    .unwrap();
    assert_eq!(json["in_sync"], false);
    assert_eq!(json["differences"][0]["kind"], "missing-backend");

    // Put back: in sync again.
    maps.put_backends(&[(id, original)]).unwrap();
    assert_eq!(
        kpr(&root, &["svc", "list", "--verify"]).status.code(),
        Some(0)
    );

    // A restarted agent keeps the names (and rewrites the record).
    bed.agent.restart().expect("restart");
    bed.agent
        .wait_healthy(Duration::from_secs(30))
        .expect("healthy after restart");
    wait_for_name(&root, "t/web:http");
    assert_eq!(
        kpr(&root, &["svc", "list", "--verify"]).status.code(),
        Some(0)
    );

    // Cleanup removes the record with the pins.
    let record = kpr::applied_state::path_for(&root);
    assert!(record.exists(), "{}", record.display());
    bed.agent.stop().expect("stop");
    let cleaned = kpr(&root, &["cleanup"]);
    assert!(cleaned.status.success(), "{cleaned:?}");
    assert!(!record.exists(), "{} left behind", record.display());
    let gone = kpr(&root, &["svc", "list", "--verify"]);
    assert_eq!(gone.status.code(), Some(2), "{gone:?}");
}
