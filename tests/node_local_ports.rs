//! Ports of the node served to node-local clients by the socket hooks:
//!
//! - `[::]:nodePort`: an IPv6 NodePort is served on every IPv6 address of
//!   the node (the socket hooks find the node's addresses in the host
//!   address map and the NodePort on its `[::]` stand-in frontend), not
//!   only on the node IPs translation knows, and the node's sockets cannot
//!   bind it, on a node address or the IPv6 wildcard;
//! - HostPort: a Pod document's `hostPort` (standalone mode) is served on
//!   the node's addresses, IPv4 and IPv6, and `kpr svc list` shows it with
//!   type `HostPort`.
//!
//! One network namespace is the node: the agent runs in it, without
//! --node-ip, so no frontend names the node's address; backend servers
//! listen on other addresses of it.
//!
//! Root only: `cargo test --test node_local_ports -- --include-ignored`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kpr_testbed::{require_root, run_probe, AgentProcess, Netns, ProbeSpec, Server, TestCgroup};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");
/// The node's own addresses (no frontend has them).
const NODE_V6: &str = "fd00:192:168:7::7";
const NODE_V4: &str = "192.0.2.71";
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
    _servers: Vec<Server>,
    _dir: tempfile::TempDir,
}

impl Node {
    /// The node, with backend servers on `backends` and the agent on `manifest_text`.
    fn start(tag: &str, manifest_text: &str, backends: &[&str]) -> Node {
        require_root();
        let ns = Netns::create(&format!("kpr-{tag}-{}", std::process::id())).unwrap();
        for addr in [NODE_V4, "10.244.0.71"] {
            ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"])
                .unwrap();
        }
        for addr in [NODE_V6, "fd00:10:244::71"] {
            let net = format!("{addr}/128");
            ns.ip(&["-6", "addr", "add", &net, "dev", "lo", "nodad"])
                .unwrap();
        }
        let servers: Vec<Server> = backends
            .iter()
            .map(|b| Server::tcp(&ns, b.parse().unwrap(), None).unwrap())
            .collect();
        let cgroup = TestCgroup::create(tag).unwrap();
        let dir = tempfile::Builder::new()
            .prefix(&format!("kpr-{tag}-"))
            .tempdir()
            .unwrap();
        let manifest = dir.path().join("m.yaml");
        std::fs::write(&manifest, manifest_text).unwrap();
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
            _servers: servers,
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

    fn svc_list(&self) -> String {
        let out = Command::new(KPR)
            .args(["svc", "list", "--bpf-root"])
            .arg(&self.agent.bpf_root)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Asserts that TCP requests from the node to `target` all reach `backend`.
    #[track_caller]
    fn assert_reaches(&self, target: &str, backend: &str) {
        let target: SocketAddr = target.parse().unwrap();
        let r = self.probe(&ProbeSpec::TcpRequests {
            target,
            count: 5,
            timeout_ms: 2000,
        });
        let r = r.as_requests().unwrap();
        assert!(
            r.failures.is_empty(),
            "{target}: {r:?}\n{}",
            self.agent.log()
        );
        assert_eq!(
            r.identities.keys().collect::<Vec<_>>(),
            [backend],
            "{target}: {r:?}"
        );
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
    let node = Node::start("n6h", MANIFEST, &[BACKEND]);

    let list = node.svc_list();
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

/// A pod of this node with a hostPort, dual-stack.
const HOST_PORT_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: t}
spec:
  nodeName: n6
  containers:
  - name: web
    image: web
    ports: [{containerPort: 8080, hostPort: 8081}]
status:
  phase: Running
  podIP: 10.244.0.71
  podIPs: [{ip: 10.244.0.71}, {ip: "fd00:10:244::71"}]
"#;

#[test]
#[ignore = "needs root"]
fn a_pods_host_port_is_served_from_the_node_on_ipv4_and_ipv6_and_listed_as_host_port() {
    let node = Node::start("hpn", HOST_PORT_POD, &["10.244.0.71:8080", BACKEND]);

    let list = node.svc_list();
    // The node's own addresses are no --node-ip: the stand-ins serve them.
    for frontend in ["127.0.0.1:8081/TCP", "[::]:8081/TCP"] {
        assert!(
            list.lines()
                .any(|l| l.contains(frontend) && l.contains("HostPort")),
            "{frontend} not a HostPort:\n{list}"
        );
    }

    node.assert_reaches(&format!("{NODE_V4}:8081"), "10.244.0.71:8080");
    node.assert_reaches("127.0.0.1:8081", "10.244.0.71:8080");
    node.assert_reaches(&format!("[{NODE_V6}]:8081"), BACKEND);
}
