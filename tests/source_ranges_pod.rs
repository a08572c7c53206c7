//! loadBalancerSourceRanges decided by the address a client really uses
//! (issue 12, finding 9): a pod's unbound socket is judged by the pod's
//! address at its first packet (cgroup_skb/egress), never by the node's
//! addresses; the node's own sockets keep the decision at connect() by the
//! node's addresses. The 20 canary Services of another file stay intact.
//!
//! ```text
//!  node netns (agent, --node-ip 192.0.2.77)
//!  pod netns  10.244.0.1  --veth--  backends netns 10.244.0.11 (TCP 8080, UDP 5353)
//! ```
//!
//! The node namespace has no route to the backends: a node socket that is
//! let through gets ENETUNREACH, so nothing leaves the test's namespaces.
//!
//! Root only: `cargo test --test source_ranges_pod -- --include-ignored`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use kpr_testbed::topology::{backend_v4, CLIENT_V4};
use kpr_testbed::{
    require_root, run_probe, AgentProcess, Netns, ProbeResult, ProbeSpec, Server, TestCgroup,
    Topology,
};

#[path = "support/canaries.rs"]
mod canaries;
use canaries::{canaries, canary_damage, frontends};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");
/// The node's address (`--node-ip`); no interface holds it.
const NODE_IP: &str = "192.0.2.77";
/// LoadBalancer IP of `pod-in`, whose ranges hold the pod but no node address.
const POD_IN_LB: &str = "203.0.113.21";
/// LoadBalancer IP of `node-in`, whose ranges hold the node but not the pod.
const NODE_IN_LB: &str = "203.0.113.22";

/// A LoadBalancer Service (TCP 80 -> 8080, UDP 53 -> 5353) on `backend`,
/// open to `range` only.
fn guarded(name: &str, cluster_ip: &str, lb_ip: &str, range: &str, backend: IpAddr) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: src}}
spec:
  type: LoadBalancer
  clusterIP: {cluster_ip}
  loadBalancerSourceRanges: ["{range}"]
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 5353}}
status:
  loadBalancer:
    ingress: [{{ip: {lb_ip}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: src, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}, {{name: dns, protocol: UDP, port: 5353}}]
endpoints: [{{addresses: [{backend}]}}]
---
"#
    )
}

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Runs `spec` in `ns`, inside `cgroup` (translated).
#[track_caller]
fn probe(ns: &Netns, cgroup: &TestCgroup, spec: ProbeSpec) -> ProbeResult {
    run_probe(
        Path::new(KPR),
        &["probe", "--spec"],
        ns,
        Some(cgroup),
        &spec,
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("probe {spec:?}: {e}"))
}

#[test]
#[ignore = "needs root"]
fn source_ranges_from_a_pod_netns_are_decided_by_the_pods_address() {
    require_root();
    let topo = Topology::build("srcpod").unwrap();
    let node = Netns::create(&format!(
        "srcpodn{}{}",
        std::process::id(),
        kpr_testbed::prefix::unique_suffix()
    ))
    .unwrap();
    let cgroup = TestCgroup::create("srcpod").unwrap();
    let backend = IpAddr::V4(backend_v4(1).unwrap());
    topo.add_backend_ip(backend).unwrap();
    let _servers = [
        Server::tcp(topo.backends(), SocketAddr::new(backend, 8080), None).unwrap(),
        Server::udp(topo.backends(), SocketAddr::new(backend, 5353), None).unwrap(),
    ];
    let dir = tempfile::Builder::new()
        .prefix("kpr-srcpod-")
        .tempdir()
        .unwrap();
    let manifests = dir.path().join("m");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(manifests.join("canaries.yaml"), canaries()).unwrap();
    let pod_range = format!("{CLIENT_V4}/32");
    let node_range = format!("{NODE_IP}/32");
    let services = guarded("pod-in", "10.96.0.41", POD_IN_LB, &pod_range, backend)
        + &guarded("node-in", "10.96.0.42", NODE_IN_LB, &node_range, backend);
    std::fs::write(manifests.join("guarded.yaml"), services).unwrap();
    let bpf_root = dir.path().join("bpf");
    let mut agent = AgentProcess::start_in_netns(
        Path::new(KPR),
        &manifests,
        cgroup.path(),
        &bpf_root,
        &["--node-ip", NODE_IP],
        &node,
    )
    .unwrap();
    agent.wait_healthy(Duration::from_secs(30)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !frontends(&bpf_root).contains_key(&format!("{NODE_IN_LB}:53/UDP")) {
        assert!(Instant::now() < deadline, "not synced:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let hooks = kpr::datapath::loader::attached_hooks(&bpf_root);
    assert!(
        hooks.iter().any(|h| h.attach_point == "skb_egress"),
        "{hooks:?}"
    );
    let pod = topo.client();
    let identity = format!("{backend}:8080");

    // Ranges with the pod's address and no node address: the pod is served.
    let r = probe(
        pod,
        &cgroup,
        ProbeSpec::TcpRequests {
            target: at(POD_IN_LB, 80),
            count: 5,
            timeout_ms: 2000,
        },
    );
    let r = r.as_requests().unwrap();
    assert!(r.failures.is_empty(), "{r:?}\n{}", agent.log());
    assert_eq!(r.identities.get(&identity), Some(&5), "{r:?}");
    for spec in [
        ProbeSpec::UdpUnconnected {
            target: at(POD_IN_LB, 53),
            count: 5,
            timeout_ms: 2000,
        },
        ProbeSpec::UdpConnected {
            target: at(POD_IN_LB, 53),
            count: 3,
            timeout_ms: 2000,
        },
    ] {
        let r = probe(pod, &cgroup, spec.clone());
        let u = r.as_udp().unwrap();
        assert!(u.failures.is_empty(), "{spec:?}: {u:?}");
        assert_eq!(
            u.identities.values().sum::<u64>(),
            spec_count(&spec),
            "{u:?}"
        );
    }

    assert_eq!(drops(&agent), 0.0, "nothing dropped yet");

    // Ranges with a node address and not the pod's: the pod's connect does
    // not establish (its SYNs are dropped), its datagrams do not leave.
    let r = probe(
        pod,
        &cgroup,
        ProbeSpec::TcpConnectError {
            target: at(NODE_IN_LB, 80),
            timeout_ms: 1000,
        },
    );
    assert_eq!(r.as_connect().unwrap().outcome(), "TIMEOUT", "{r:?}");
    for spec in [
        ProbeSpec::UdpUnconnected {
            target: at(NODE_IN_LB, 53),
            count: 3,
            timeout_ms: 300,
        },
        ProbeSpec::UdpConnected {
            target: at(NODE_IN_LB, 53),
            count: 3,
            timeout_ms: 300,
        },
    ] {
        let r = probe(pod, &cgroup, spec.clone());
        let u = r.as_udp().unwrap();
        assert!(u.identities.is_empty(), "{spec:?} got answers: {u:?}");
        // Dropped on the way out: the send itself fails.
        assert_eq!(u.failures.get("send:EPERM"), Some(&3), "{spec:?}: {u:?}");
    }
    // Counted: at least the first SYN and the six datagrams.
    let deadline = Instant::now() + Duration::from_secs(10);
    while drops(&agent) < 7.0 {
        assert!(
            Instant::now() < deadline,
            "drops not counted: {}",
            drops(&agent)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // After the refusals, the pod's sockets to the open frontend still work
    // (no mark outlives its decision).
    let r = probe(
        pod,
        &cgroup,
        ProbeSpec::TcpRequests {
            target: at(POD_IN_LB, 80),
            count: 2,
            timeout_ms: 2000,
        },
    );
    assert!(r.as_requests().unwrap().failures.is_empty(), "{r:?}");

    // The node's own sockets keep the decision at connect() by the node's
    // addresses: refused at once where no node address is in the ranges,
    // translated where one is (and then unroutable from the node namespace).
    let r = probe(
        &node,
        &cgroup,
        ProbeSpec::TcpConnectError {
            target: at(POD_IN_LB, 80),
            timeout_ms: 1000,
        },
    );
    assert_eq!(r.as_connect().unwrap().outcome(), "EPERM", "{r:?}");
    let r = probe(
        &node,
        &cgroup,
        ProbeSpec::TcpConnectError {
            target: at(NODE_IN_LB, 80),
            timeout_ms: 1000,
        },
    );
    assert_eq!(r.as_connect().unwrap().outcome(), "ENETUNREACH", "{r:?}");

    let damage = canary_damage(&frontends(&bpf_root));
    assert!(damage.is_empty(), "canaries lost or changed: {damage:?}");
    agent.stop().unwrap();
}

/// `kpr_socket_source_range_drops_total`.
fn drops(agent: &AgentProcess) -> f64 {
    agent
        .metric_value("kpr_socket_source_range_drops_total", "")
        .unwrap()
        .unwrap_or(-1.0)
}

fn spec_count(spec: &ProbeSpec) -> u64 {
    match spec {
        ProbeSpec::UdpUnconnected { count, .. } | ProbeSpec::UdpConnected { count, .. } => {
            u64::from(*count)
        }
        _ => 0,
    }
}
