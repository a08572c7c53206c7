//! `[::]:nodePort`: an IPv6 NodePort is served to node-local clients on
//! every IPv6 address of the node (the socket hooks find the node's
//! addresses in the host address map and the NodePort on its `[::]`
//! stand-in frontend), not only on the node IPs translation knows, and the
//! node's sockets cannot bind it, on a node address or the IPv6 wildcard.
//!
//! One network namespace is the node: the agent runs in it, without
//! --node-ip, so no frontend names the node's address; a backend server
//! listens on another address of it.
//!
//! Root only: `cargo test --test nodeport_v6_host -- --include-ignored`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kpr_testbed::{require_root, run_probe, AgentProcess, Netns, ProbeSpec, Server, TestCgroup};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");
/// The node's own IPv6 address (no frontend has it).
const NODE_V6: &str = "fd00:192:168:7::7";
/// The backend, on the node.
const BACKEND: &str = "[fd00:10:244::71]:8080";

const MANIFEST: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: six, namespace: t}
spec:
  type: NodePort
  ipFamilies: [IPv6]
  clusterIP: "fd00:10:96::71"
  ports: [{port: 80, targetPort: 8080, nodePort: 30680}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: six-1, namespace: t, labels: {kubernetes.io/service-name: six}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ["fd00:10:244::71"]}]
"#;

struct Node {
    agent: AgentProcess,
    ns: Netns,
    cgroup: TestCgroup,
    _server: Server,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start() -> Node {
        require_root();
        let ns = Netns::create(&format!("kpr-n6h-{}", std::process::id())).unwrap();
        for addr in [NODE_V6, "fd00:10:244::71"] {
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{addr}/128"),
                "dev",
                "lo",
                "nodad",
            ])
            .unwrap();
        }
        let server = Server::tcp(&ns, BACKEND.parse().unwrap(), None).unwrap();
        let cgroup = TestCgroup::create("n6h").unwrap();
        let dir = tempfile::Builder::new()
            .prefix("kpr-n6h-")
            .tempdir()
            .unwrap();
        let manifest = dir.path().join("six.yaml");
        std::fs::write(&manifest, MANIFEST).unwrap();
        let mut agent = AgentProcess::start_in_netns(
            Path::new(KPR),
            &manifest,
            cgroup.path(),
            &dir.path().join("bpf"),
            &["--node-name", "n6"],
            &ns,
        )
        .unwrap();
        agent.wait_healthy(Duration::from_secs(30)).unwrap();
        Node {
            agent,
            ns,
            cgroup,
            _server: server,
            _dir: dir,
        }
    }

    /// Runs `spec` in a process of the node, in the agent's cgroup.
    fn probe(&self, spec: &ProbeSpec) -> kpr_testbed::ProbeResult {
        run_probe(
            Path::new(KPR),
            &["probe", "--spec"],
            &self.ns,
            Some(&self.cgroup),
            spec,
            Duration::from_secs(30),
        )
        .unwrap()
    }

    fn bind(&self, addrs: &[&str]) -> BTreeMap<String, String> {
        let addrs = addrs.iter().map(|a| a.parse().unwrap()).collect();
        self.probe(&ProbeSpec::Bind { addrs, udp: false })
            .as_bind()
            .unwrap()
            .clone()
    }
}

#[test]
#[ignore = "needs root"]
fn an_ipv6_node_port_is_served_from_the_node_on_every_node_address_and_bind_protected() {
    let node = Node::start();

    let list = Command::new(KPR)
        .args(["svc", "list", "--bpf-root"])
        .arg(&node.agent.bpf_root)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        list.lines()
            .any(|l| l.contains("[::]:30680/TCP") && l.contains("NodePort")),
        "{list}"
    );

    for target in [format!("[{NODE_V6}]:30680"), "[::1]:30680".to_string()] {
        let target: SocketAddr = target.parse().unwrap();
        let r = node.probe(&ProbeSpec::TcpRequests {
            target,
            count: 5,
            timeout_ms: 2000,
        });
        let r = r.as_requests().unwrap();
        assert!(
            r.failures.is_empty(),
            "{target}: {r:?}\n{}",
            node.agent.log()
        );
        assert_eq!(
            r.identities.keys().collect::<Vec<_>>(),
            [BACKEND],
            "{target}: {r:?}"
        );
    }
    // Another port of the node's address is no NodePort: refused as usual.
    let other = node.probe(&ProbeSpec::TcpConnectError {
        target: format!("[{NODE_V6}]:30999").parse().unwrap(),
        timeout_ms: 2000,
    });
    assert_eq!(other.as_connect().unwrap().outcome(), "ECONNREFUSED");

    let taken = [format!("[{NODE_V6}]:30680"), "[::]:30680".to_string()];
    let taken: Vec<&str> = taken.iter().map(String::as_str).collect();
    let got = node.bind(&taken);
    assert!(got.values().all(|o| o == "EADDRINUSE"), "{got:?}");
    let free = node.bind(&["[::]:30681", "0.0.0.0:30680"]);
    assert!(free.values().all(|o| o == "OK"), "{free:?}");
}
