//! Maglev on the north-south path end to end on the multi-node bed
//! (tests/support/nodeport.rs): one client, whichever node it enters,
//! meets one backend; the per-Service annotation; Maglev in XDP.
//!
//! Needs root (namespaces, BPF, tcx): every test is `#[ignore = "needs
//! root"]` (run them with `--include-ignored`) and fails at once without
//! root.

#[path = "support/nodeport.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use kpr_testbed::cluster::client_ip;
use kpr_testbed::nodeport_bed::POD_TCP;
use kpr_testbed::server::split_reply;
use kpr_testbed::{Cluster, ClusterPlan, NodePortBed};
use support::*;

/// Polls `kpr svc list -o json` on both nodes until `done` holds for
/// both (bounded: 20 s).
#[track_caller]
fn wait_for_svc_list(bed: &NodePortBed, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lists: Vec<String> = [1u8, 2]
            .iter()
            .map(|n| kpr_on(bed, *n, &["svc", "list", "-o", "json"]))
            .collect();
        if lists.iter().all(|l| done(l)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "both agents did not get to {what}:\n{}",
            lists.join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "needs root"]
fn maglev_sends_a_client_to_the_same_backend_through_either_node_and_keeps_flows_when_a_backend_goes(
) {
    require_root();
    let plan = ClusterPlan {
        pods_per_node: 3,
        ..ClusterPlan::default()
    };
    let bed = Bed::start_with("npmg", &plan, &["--lb-algorithm", "maglev"]);
    add_shared_client_address(&bed);
    let ports = 47000..47120;
    let flows = ports.len();

    let first = backends_by_port(&bed, ports.clone(), NODE_PORT_TCP);
    assert_eq!(
        disagreeing(&first),
        vec![],
        "through node1 and node2, each client port reaches one backend"
    );
    let mut shares: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for [pod, _] in first.values() {
        *shares.entry(*pod).or_default() += 1;
    }
    println!("maglev: {flows} client ports over 6 pods: {shares:?}");
    assert_eq!(
        shares.keys().copied().collect::<BTreeSet<_>>(),
        all_pods(&bed),
        "every pod gets flows"
    );
    // 20 expected each; a sound hash keeps every pod well above a third.
    assert!(shares.values().all(|n| *n >= 7 && *n <= 40), "{shares:?}");

    // The datapath uses Maglev for the NodePorts, not for the ClusterIP.
    let list = kpr_on(&bed, 1, &["svc", "list"]);
    let row = |frontend: &str| {
        list.lines()
            .find(|l| l.contains(frontend))
            .unwrap_or_else(|| panic!("no {frontend} in\n{list}"))
            .to_string()
    };
    assert!(
        row("192.0.2.11:30080/TCP").contains("NodePort (maglev)"),
        "{list}"
    );
    assert!(!row("10.96.0.10:80/TCP").contains("maglev"), "{list}");

    // One pod of node2 goes.
    let removed = IpAddr::V4(bed.node(2).pod_ips()[0]);
    let manifest_path = bed.dir().join("manifests").join("services.yaml");
    let text = std::fs::read_to_string(&manifest_path).unwrap();
    let line = endpoint_line(removed, 2);
    assert!(text.contains(&line), "{text}");
    std::fs::write(&manifest_path, text.replace(&line, "")).unwrap();
    let gone = format!("\"{removed}\"");
    wait_for_svc_list(&bed, "the removal", |l| {
        l.contains("\"port\": 30080") && !l.contains(&gone)
    });

    let second = backends_by_port(&bed, ports.clone(), NODE_PORT_TCP);
    assert_eq!(disagreeing(&second), vec![], "both nodes agree again");
    assert!(second.values().all(|[pod, _]| *pod != removed));
    let on_others: Vec<u16> = ports.filter(|p| first[p][0] != removed).collect();
    let kept = on_others
        .iter()
        .filter(|p| first[*p][0] == second[*p][0])
        .count();
    println!(
        "maglev: after removing {removed}, {kept} of {} flows on other pods kept their pod",
        on_others.len()
    );
    // Maglev moves only a few percent of them; a rehash would move ~80 %.
    assert!(
        kept * 10 >= on_others.len() * 8,
        "{kept} of {} kept",
        on_others.len()
    );
}

/// NodePort Services for the annotation test: `hashed` (annotated maglev),
/// `plain` (no annotation), `bad` (an unknown algorithm) and `sticky`
/// (maglev with ClientIP session affinity), every pod behind each.
fn annotated_manifest(cluster: &Cluster) -> String {
    let endpoints = pod_endpoints(cluster, None);
    let service = |name: &str, cluster_ip: &str, node_port: u16, annotation: &str, extra: &str| {
        let annotations = match annotation {
            "" => String::new(),
            a => format!("\n  annotations: {{service.kpr.io/lb-algorithm: {a}}}"),
        };
        format!(
            r#"
---
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: np{annotations}
spec:
  type: NodePort
  clusterIP: {cluster_ip}{extra}
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: {POD_TCP}, nodePort: {node_port}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: np, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: {POD_TCP}}}
endpoints:
{endpoints}"#
        )
    };
    service("hashed", "10.96.0.20", 30090, "maglev", "")
        + &service("plain", "10.96.0.21", 30091, "", "")
        + &service("bad", "10.96.0.22", 30092, "ring-hash", "")
        + &service(
            "sticky",
            "10.96.0.23",
            30093,
            "maglev",
            "\n  sessionAffinity: ClientIP",
        )
}

#[test]
#[ignore = "needs root"]
fn the_lb_algorithm_annotation_switches_one_service_to_maglev_while_another_stays_random() {
    require_root();
    // Agents with the default --lb-algorithm random.
    let bed = Bed::with_manifest("npann", &ClusterPlan::default(), annotated_manifest, &[]);
    add_shared_client_address(&bed);
    let ports = 47200..47240;

    let hashed = backends_by_port(&bed, ports.clone(), 30090);
    assert_eq!(disagreeing(&hashed), vec![], "maglev: both nodes agree");
    let distinct: BTreeSet<IpAddr> = hashed.values().map(|[p, _]| *p).collect();
    assert!(distinct.len() >= 3, "spread over the pods: {hashed:?}");

    // Random: with 4 pods, a client port meets the same pod through both
    // nodes about one time in four; all 40 agreeing has odds of 4^-40.
    for (name, port) in [("plain", 30091), ("bad", 30092)] {
        let by_port = backends_by_port(&bed, ports.clone(), port);
        let agree = by_port.len() - disagreeing(&by_port).len();
        println!(
            "{name}: {agree} of {} client ports met the same pod",
            by_port.len()
        );
        assert!(
            agree * 4 < by_port.len() * 3,
            "{name} is random: {by_port:?}"
        );
    }

    // Session affinity wins over the table: one client address, one pod,
    // whatever its port (the first flow's Maglev pick, on both nodes).
    let sticky = backends_by_port(&bed, ports.clone(), 30093);
    let pods: BTreeSet<IpAddr> = sticky.values().flatten().copied().collect();
    assert_eq!(pods.len(), 1, "affinity keeps one pod: {sticky:?}");

    // The maps say so too, and the bad annotation was counted, not fatal.
    let list = kpr_on(&bed, 1, &["svc", "list"]);
    for line in list.lines().filter(|l| l.contains("192.0.2.11:")) {
        assert_eq!(
            line.contains("(maglev)"),
            line.contains(":30090/") || line.contains(":30093/"),
            "{line}\n{list}"
        );
    }
    // Annotating the running `plain` switches it: tables are written,
    // then the masters flag Maglev, and both nodes agree from then on.
    let manifest_path = bed.dir().join("manifests").join("services.yaml");
    let text = std::fs::read_to_string(&manifest_path).unwrap();
    let plain = "  name: plain\n  namespace: np\n";
    assert!(text.contains(plain), "{text}");
    let annotated = format!("{plain}  annotations: {{service.kpr.io/lb-algorithm: maglev}}\n");
    std::fs::write(&manifest_path, text.replace(plain, &annotated)).unwrap();
    wait_for_svc_list(&bed, "maglev on plain", |l| {
        let rows: Vec<serde_json::Value> = serde_json::from_str(l).unwrap_or_default();
        let plain: Vec<_> = rows
            .iter()
            .filter(|r| r["port"] == 30091 && r["type"] == "NodePort")
            .collect();
        !plain.is_empty() && plain.iter().all(|r| r["lb_algorithm"] == "maglev")
    });
    let switched = backends_by_port(&bed, ports.clone(), 30091);
    assert_eq!(disagreeing(&switched), vec![], "plain is Maglev now");

    let skipped = bed.agents[0]
        .metric_value("kpr_skipped_objects_total", "reason=\"invalid_annotation\"")
        .unwrap();
    assert!(skipped.unwrap_or(0.0) >= 1.0, "{skipped:?}");
    let log = bed.agents[0].log();
    assert!(
        log.contains("ring-hash") && log.contains("service.kpr.io/lb-algorithm"),
        "the bad annotation is logged with its value:\n{log}"
    );
}

#[test]
#[ignore = "needs root"]
fn maglev_in_generic_xdp_sends_a_client_to_the_same_backend_through_either_node() {
    require_root();
    let plan = ClusterPlan {
        xdp_ready: true,
        ..ClusterPlan::default()
    };
    let bed = Bed::start_with(
        "npmgx",
        &plan,
        &[
            "--lb-algorithm",
            "maglev",
            "--nodeport-acceleration",
            "generic",
        ],
    );
    add_shared_client_address(&bed);
    let before: Vec<u64> = [1u8, 2].map(|n| bed.stats(n).unwrap().xdp_fwd).to_vec();
    let by_port = backends_by_port(&bed, 47300..47340, NODE_PORT_TCP);
    assert_eq!(disagreeing(&by_port), vec![], "both nodes agree in XDP");
    let distinct: BTreeSet<IpAddr> = by_port.values().map(|[p, _]| *p).collect();
    assert!(distinct.len() >= 3, "spread over the pods: {by_port:?}");
    for n in [1u8, 2] {
        let after = bed.stats(n).unwrap().xdp_fwd;
        assert!(
            after > before[usize::from(n - 1)],
            "node{n}: XDP forwarded the flows itself"
        );
    }
}

/// One client source port toward two frontends of one Service on node1:
/// the NodePort on the node IP and on node1's other address. Maglev
/// leaves the frontend address out of the hash, so both flows pick one
/// backend; when it is a local pod, both would have one reply tuple (pod
/// -> client:port). The second flow gets another source port (counted),
/// as netfilter's NAT does to keep tuples unique: both flows are
/// answered, each from the address the client used, and the pod sees the
/// client's own address. (Before, the second flow was dropped: a lost
/// datagram in about one DSR test run in six.)
#[test]
#[ignore = "needs root"]
fn one_client_port_to_two_frontends_of_a_local_backend_keeps_both_flows() {
    require_root();
    let bed = Bed::start("npmgr", &["--lb-algorithm", "maglev"]);
    let node1 = bed.node(1);
    let frontends = [
        node_port(node1, NODE_PORT_UDP),
        SocketAddr::new(IpAddr::V4(node1.peer_ip()), NODE_PORT_UDP),
    ];
    let client = IpAddr::V4(client_ip(1));
    let ports = 47400..47416u16;
    let before = bed.stats(1).unwrap().port_remapped;
    let outcome = bed
        .cluster
        .client()
        .enter_thread(move || {
            ports
                .map(|port| {
                    let exchange = || -> std::io::Result<Vec<(SocketAddr, SocketAddr, String)>> {
                        let sock = UdpSocket::bind(SocketAddr::new(client, port))?;
                        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
                        let mut buf = [0u8; 512];
                        // Each flow twice: the second packets follow conntrack.
                        [0, 1, 0, 1]
                            .map(|i| frontends[i])
                            .into_iter()
                            .map(|target| {
                                sock.send_to(b"which", target)?;
                                let (n, from) = sock.recv_from(&mut buf)?;
                                Ok((
                                    target,
                                    from,
                                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                                ))
                            })
                            .collect()
                    };
                    (port, exchange().map_err(|e| e.to_string()))
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    let mut local = 0;
    for (port, replies) in &outcome {
        let replies = replies
            .as_ref()
            .unwrap_or_else(|e| panic!("client port {port}: {e}\n{}", bed.diagnostics()));
        for (target, from, _) in replies {
            assert_eq!(from, target, "client port {port}: {replies:?}");
        }
        let backends: BTreeSet<&str> = replies.iter().map(|(_, _, r)| split_reply(r).0).collect();
        assert_eq!(
            backends.len(),
            1,
            "one backend per client port: {replies:?}"
        );
        let backend: SocketAddr = backends.first().unwrap().parse().unwrap();
        if node_of(backend.ip()) == 1 {
            local += 1;
            for (_, _, reply) in replies {
                assert_eq!(
                    split_reply(reply).1,
                    Some(client),
                    "the pod sees the client: {reply}"
                );
            }
        }
    }
    let remapped = bed.stats(1).unwrap().port_remapped - before;
    println!(
        "{local} of 16 client ports met a local pod; {remapped} flows got another source port"
    );
    assert!(local > 0, "no client port met a local pod: {outcome:?}");
    assert_eq!(
        remapped, local,
        "one remapped flow per client port with a local pod"
    );
}
