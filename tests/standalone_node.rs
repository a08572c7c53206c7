//! The node in standalone mode (`kpr agent --manifests`): a v1 Node
//! document named as the agent's node gives its zone (topology hints) and
//! its addresses (NodePorts), as the Node object does in Kubernetes mode;
//! `--node-zone` gives the zone without one. Checked on what `kpr svc list`
//! prints from the pinned maps of a real agent.
//!
//! Root only (BPF, cgroups): `cargo test --test standalone_node -- --include-ignored`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kpr_testbed::{require_root, AgentProcess, TestCgroup};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");
/// Bound of every wait for the agent to react.
const REACT: Duration = Duration::from_secs(10);

/// A NodePort Service whose two endpoints carry zone hints (as the
/// EndpointSlice controller writes them for `trafficDistribution:
/// PreferClose`): 10.244.1.1 for zone-a, 10.244.1.2 for zone-b.
const HINTED: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.7.1
  trafficDistribution: PreferClose
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - {addresses: [10.244.1.1], nodeName: node-a, hints: {forZones: [{name: zone-a}]}}
  - {addresses: [10.244.1.2], nodeName: node-b, hints: {forZones: [{name: zone-b}]}}
";

fn node_document(zone: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Node\nmetadata: {{name: node-a, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n\
         status: {{addresses: [{{type: InternalIP, address: 192.0.2.77}}]}}\n"
    )
}

struct Agent {
    agent: AgentProcess,
    dir: tempfile::TempDir,
    _cgroup: TestCgroup,
}

impl Agent {
    fn start(prefix: &str, manifest: &str, extra: &[&str]) -> Agent {
        require_root();
        let cgroup = TestCgroup::create(prefix).unwrap();
        let dir = tempfile::Builder::new()
            .prefix(&format!("kpr-{prefix}-"))
            .tempdir()
            .unwrap();
        let file = dir.path().join("m.yaml");
        std::fs::write(&file, manifest).unwrap();
        let mut args = vec!["--node-name", "node-a"];
        args.extend_from_slice(extra);
        let mut agent = AgentProcess::start(
            Path::new(KPR),
            &file,
            cgroup.path(),
            &dir.path().join("bpf"),
            &args,
        )
        .unwrap();
        agent.wait_healthy(Duration::from_secs(30)).unwrap();
        Agent {
            agent,
            dir,
            _cgroup: cgroup,
        }
    }

    /// `kpr svc list` against the agent's pins.
    fn svc_list(&self) -> String {
        let out = Command::new(KPR)
            .args(["svc", "list", "--bpf-root"])
            .arg(&self.agent.bpf_root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The backends `kpr svc list` shows for `frontend` (rows go on with
    /// blank frontend columns until the next frontend).
    fn backends(&self, frontend: &str) -> Vec<String> {
        let table = self.svc_list();
        let mut out = Vec::new();
        let mut inside = false;
        for line in table.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if !line.starts_with(' ') {
                inside = fields.get(1) == Some(&frontend);
            }
            if inside {
                if let Some(at) = fields.iter().position(|f| *f == "=>") {
                    out.push(fields[at + 1].to_string());
                }
            }
        }
        out
    }

    /// Waits (bounded) until `frontend` has exactly `want` as backends.
    #[track_caller]
    fn wait_backends(&self, frontend: &str, want: &[&str]) {
        let deadline = Instant::now() + REACT;
        loop {
            let got = self.backends(frontend);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{frontend}: backends {got:?}, want {want:?}\n{}\n{}",
                self.svc_list(),
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
#[ignore = "needs root"]
fn a_node_document_gives_the_zone_hints_are_honoured_and_its_address_serves_the_node_port() {
    let manifest = format!("{HINTED}{}", node_document("zone-a"));
    let case = Agent::start("sndoc", &manifest, &[]);

    case.wait_backends("10.96.7.1:80/TCP", &["10.244.1.1:8080/TCP"]);
    case.wait_backends("192.0.2.77:30080/TCP", &["10.244.1.1:8080/TCP"]);

    // The node moves to zone-b: every Service is translated again.
    let moved = format!("{HINTED}{}", node_document("zone-b"));
    let tmp = case.dir.path().join(".m.yaml.tmp");
    std::fs::write(&tmp, moved).unwrap();
    std::fs::rename(&tmp, case.dir.path().join("m.yaml")).unwrap();
    case.wait_backends("10.96.7.1:80/TCP", &["10.244.1.2:8080/TCP"]);
}

#[test]
#[ignore = "needs root"]
fn the_node_zone_flag_gives_the_zone_without_a_node_document_and_wins_over_one() {
    let alone = Agent::start("snflag", HINTED, &["--node-zone", "zone-b"]);
    alone.wait_backends("10.96.7.1:80/TCP", &["10.244.1.2:8080/TCP"]);
    drop(alone);

    let manifest = format!("{HINTED}{}", node_document("zone-a"));
    let over = Agent::start("snover", &manifest, &["--node-zone", "zone-b"]);
    over.wait_backends("10.96.7.1:80/TCP", &["10.244.1.2:8080/TCP"]);
}

#[test]
#[ignore = "needs root"]
fn without_a_zone_hints_are_ignored_and_every_endpoint_serves() {
    let case = Agent::start("snnone", HINTED, &[]);
    case.wait_backends(
        "10.96.7.1:80/TCP",
        &["10.244.1.1:8080/TCP", "10.244.1.2:8080/TCP"],
    );
}
