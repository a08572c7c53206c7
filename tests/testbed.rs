//! The test bed builds real namespaces, servers answer real traffic from
//! the client side, and nothing is left behind after Drop. Root-only tests
//! are `#[ignore = "needs root"]` (run them with `--include-ignored`) and
//! fail at once without root.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kpr_testbed::probe::{ProbeResult, ProbeSpec};
use kpr_testbed::require_root;
use kpr_testbed::topology::{backend_v4, backend_v6};
use kpr_testbed::{cgroup2_mount, Server, TestCgroup, Topology};

fn netns_names() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[track_caller]
fn run_in(topo: &Topology, spec: ProbeSpec) -> ProbeResult {
    topo.client()
        .enter_thread(|| spec.run())
        .expect("probe thread ran")
        .expect("probe spec ran")
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
#[ignore = "needs root"]
fn servers_answer_the_client_directly_on_v4_and_v6_and_drop_removes_everything() {
    require_root();
    let (client_name, backends_name, cgroup_dir);
    {
        let topo = Topology::build("tbd").expect("topology builds");
        let cgroup = TestCgroup::create("tbd").expect("cgroup is created");
        client_name = topo.client().name().to_string();
        backends_name = topo.backends().name().to_string();
        cgroup_dir = cgroup.path().to_path_buf();
        assert!(cgroup_dir.is_dir());
        assert!(netns_names().contains(&client_name));
        assert!(netns_names().contains(&backends_name));

        let b1v4 = IpAddr::V4(backend_v4(1).unwrap());
        let b2v4 = IpAddr::V4(backend_v4(2).unwrap());
        let b1v6 = IpAddr::V6(backend_v6(1).unwrap());
        for ip in [b1v4, b2v4, b1v6] {
            topo.add_backend_ip(ip).expect("backend address added");
        }
        let b = topo.backends();
        let tcp1 = Server::tcp(b, SocketAddr::new(b1v4, 8080), None).unwrap();
        let tcp2 = Server::tcp(b, SocketAddr::new(b1v6, 8080), Some("six".into())).unwrap();
        let udp = Server::udp(b, SocketAddr::new(b2v4, 5353), None).unwrap();
        assert_eq!(tcp1.identity(), "10.244.0.11:8080");
        assert_eq!(udp.identity(), "10.244.0.12:5353");

        let r = run_in(
            &topo,
            ProbeSpec::TcpRequests {
                target: tcp1.addr(),
                count: 5,
                timeout_ms: 1000,
            },
        );
        let r = r.as_requests().unwrap();
        assert_eq!(r.identities.get("10.244.0.11:8080"), Some(&5), "{r:?}");
        assert!(r.failures.is_empty(), "{r:?}");
        assert_eq!(r.durations_ns.len(), 5);

        let r = run_in(
            &topo,
            ProbeSpec::TcpRequests {
                target: tcp2.addr(),
                count: 3,
                timeout_ms: 1000,
            },
        );
        assert_eq!(r.as_requests().unwrap().identities.get("six"), Some(&3));

        let r = run_in(
            &topo,
            ProbeSpec::UdpUnconnected {
                target: udp.addr(),
                count: 4,
                timeout_ms: 1000,
            },
        );
        let u = r.as_udp().unwrap();
        assert_eq!(u.identities.get("10.244.0.12:5353"), Some(&4), "{u:?}");
        assert_eq!(
            u.reply_sources.iter().collect::<Vec<_>>(),
            ["10.244.0.12:5353"]
        );

        let r = run_in(
            &topo,
            ProbeSpec::UdpConnected {
                target: udp.addr(),
                count: 2,
                timeout_ms: 1000,
            },
        );
        let u = r.as_udp().unwrap();
        assert_eq!(u.identities.get("10.244.0.12:5353"), Some(&2), "{u:?}");
        assert_eq!(
            u.peer_names.iter().collect::<Vec<_>>(),
            ["10.244.0.12:5353"]
        );

        let r = run_in(
            &topo,
            ProbeSpec::TcpConnectError {
                target: SocketAddr::new(b1v4, 9),
                timeout_ms: 1000,
            },
        );
        assert_eq!(r.as_connect().unwrap().outcome(), "ECONNREFUSED");

        assert_eq!(tcp1.hits(), 5);
        assert_eq!(tcp2.hits(), 3);
        assert_eq!(udp.hits(), 6);
        let stop = Instant::now();
        drop((tcp1, tcp2, udp));
        assert!(stop.elapsed() < ms(500), "servers stop promptly");
    }
    let left = netns_names();
    assert!(!left.contains(&client_name), "{left:?}");
    assert!(!left.contains(&backends_name), "{left:?}");
    assert!(!Path::new("/run/netns").join(&client_name).exists());
    assert!(!cgroup_dir.exists(), "{}", cgroup_dir.display());
}

#[test]
#[ignore = "needs root"]
fn an_untranslated_vip_is_answered_by_the_server_on_the_vip() {
    require_root();
    let topo = Topology::build("tbv").expect("topology builds");
    let vip4: IpAddr = "10.96.0.10".parse().unwrap();
    let vip6: IpAddr = "fd00:10:96::a".parse().unwrap();
    let b = topo.backends();
    let mut servers = Vec::new();
    for vip in [vip4, vip6] {
        topo.add_untranslated_vip(vip).expect("VIP on lo");
        let tcp = SocketAddr::new(vip, 80);
        let udp = SocketAddr::new(vip, 53);
        servers.push(Server::tcp(b, tcp, Some("untranslated".into())).unwrap());
        servers.push(Server::udp(b, udp, Some("untranslated".into())).unwrap());

        let r = run_in(
            &topo,
            ProbeSpec::TcpPeerName {
                target: tcp,
                timeout_ms: 1000,
            },
        );
        let p = r.as_peer_name().unwrap();
        assert_eq!(p.identity.as_deref(), Some("untranslated"), "{p:?}");
        assert_eq!(p.peer.as_deref(), Some(tcp.to_string().as_str()));

        let r = run_in(
            &topo,
            ProbeSpec::UdpUnconnected {
                target: udp,
                count: 2,
                timeout_ms: 1000,
            },
        );
        let u = r.as_udp().unwrap();
        assert_eq!(u.identities.get("untranslated"), Some(&2), "{u:?}");
        assert!(u.reply_sources.contains(&udp.to_string()), "{u:?}");
    }
}

#[test]
#[ignore = "needs root"]
fn enter_thread_moves_only_that_thread_into_the_namespace() {
    require_root();
    let topo = Topology::build("tbe").expect("topology builds");
    let own = || {
        std::fs::metadata("/proc/thread-self/ns/net")
            .expect("own netns")
            .ino()
    };
    let before = own();
    let inside = topo.client().enter_thread(own).unwrap();
    let pinned = std::fs::metadata(topo.client().path()).unwrap().ino();
    assert_eq!(inside, pinned);
    assert_ne!(inside, before);
    assert_eq!(own(), before);

    let panicked = topo.client().enter_thread(|| panic!("on purpose"));
    assert!(format!("{}", panicked.unwrap_err()).contains("on purpose"));
}

#[test]
#[ignore = "needs root"]
fn the_test_cgroup_takes_child_pids_but_never_the_test_process() {
    require_root();
    let mount = cgroup2_mount().expect("cgroup2 is mounted");
    let cgroup = TestCgroup::create("tbc").expect("cgroup is created");
    assert_eq!(cgroup.path().parent(), Some(mount.as_path()));
    assert!(cgroup.add_pid(std::process::id()).is_err());

    let mut child = Command::new("sleep")
        .arg("5")
        .spawn()
        .expect("sleep starts");
    cgroup.add_pid(child.id()).expect("child joins");
    assert_eq!(cgroup.pids().unwrap(), vec![child.id()]);

    // Dropping with a live member moves it out first, then removes the dir.
    let dir = cgroup.path().to_path_buf();
    drop(cgroup);
    assert!(!dir.exists());
    let root_procs = std::fs::read_to_string(mount.join("cgroup.procs")).unwrap();
    assert!(root_procs.lines().any(|l| l == child.id().to_string()));
    child.kill().expect("our own child is killed");
    child.wait().expect("and reaped");
}

#[test]
fn bad_prefixes_are_rejected_before_anything_is_created() {
    // No root needed: validation comes first.
    assert!(Topology::build("Bad-Prefix").is_err());
    assert!(TestCgroup::create("").is_err());
}

#[test]
#[ignore = "needs root"]
fn a_panic_while_the_test_bed_is_up_still_removes_it() {
    require_root();
    let mut names = Vec::new();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::build("tbp").expect("topology builds");
        let cgroup = TestCgroup::create("tbp").expect("cgroup is created");
        names.push(topo.client().name().to_string());
        names.push(topo.backends().name().to_string());
        names.push(cgroup.path().display().to_string());
        let addr = SocketAddr::new(IpAddr::V4(backend_v4(1).unwrap()), 80);
        topo.add_backend_ip(addr.ip()).unwrap();
        let _server = Server::tcp(topo.backends(), addr, None).unwrap();
        panic!("test failed mid-way");
    }));
    assert!(outcome.is_err());
    let left = netns_names();
    assert!(
        !left.contains(&names[0]) && !left.contains(&names[1]),
        "{left:?}"
    );
    assert!(!Path::new(&names[2]).exists());
}

#[test]
#[ignore = "needs root"]
fn sweeping_removes_leftovers_of_dead_runs_but_not_live_test_beds() {
    require_root();
    let mut gone = Command::new("true").spawn().expect("true starts");
    let dead = gone.id();
    gone.wait().expect("true exits");
    let stale_ns = format!("tbsc{dead}");
    let stale_cg = cgroup2_mount()
        .unwrap()
        .join(format!("kpr-test-tbs-{dead}"));
    let ok = Command::new("ip")
        .args(["netns", "add", &stale_ns])
        .status()
        .unwrap();
    assert!(ok.success());
    std::fs::create_dir(&stale_cg).unwrap();

    let live = Topology::build("tbs").expect("topology builds");
    let live_cg = TestCgroup::create("tbs").expect("cgroup is created");
    let swept = kpr_testbed::sweep_stale("tbs").expect("sweep runs");
    assert_eq!(swept.netns, vec![stale_ns.clone()]);
    assert_eq!(swept.cgroups, vec![stale_cg.display().to_string()]);
    assert!(!netns_names().contains(&stale_ns));
    assert!(!stale_cg.exists());
    assert!(netns_names().contains(&live.client().name().to_string()));
    assert!(live_cg.path().exists());
}

/// Runs `spec` on a thread inside `ns`.
#[track_caller]
fn run_in_ns(ns: &kpr_testbed::Netns, spec: ProbeSpec) -> ProbeResult {
    ns.enter_thread(|| spec.run())
        .expect("probe thread ran")
        .expect("probe spec ran")
}

#[test]
#[ignore = "needs root"]
fn a_cluster_routes_client_nodes_and_pods_without_kpr_and_drop_removes_it() {
    require_root();
    use kpr_testbed::cluster::client_ip;
    use kpr_testbed::server::split_reply;
    use kpr_testbed::{Cluster, ClusterPlan};

    let names;
    {
        let cluster = Cluster::build("tbk", &ClusterPlan::default()).expect("cluster builds");
        names = std::iter::once(cluster.client())
            .chain(cluster.nodes().iter().flat_map(|n| [n.ns(), n.pods()]))
            .map(|ns| ns.name().to_string())
            .collect::<Vec<_>>();
        let listed = netns_names();
        assert!(
            names.iter().all(|n| listed.contains(n)),
            "{names:?} in {listed:?}"
        );

        let mut servers = Vec::new();
        for node in cluster.nodes() {
            for ip in node.pod_ips() {
                let ip = IpAddr::V4(*ip);
                servers.push(
                    Server::tcp_reporting_peer(node.pods(), SocketAddr::new(ip, 8080), None)
                        .unwrap(),
                );
                servers.push(
                    Server::udp_reporting_peer(node.pods(), SocketAddr::new(ip, 5353), None)
                        .unwrap(),
                );
            }
        }
        // client -> every pod, through the node that owns it: forwarded, not NATed.
        for node in cluster.nodes() {
            for ip in node.pod_ips() {
                let target = SocketAddr::new(IpAddr::V4(*ip), 8080);
                let r = run_in_ns(
                    cluster.client(),
                    ProbeSpec::TcpRequests {
                        target,
                        count: 3,
                        timeout_ms: 1000,
                    },
                );
                let r = r.as_requests().unwrap();
                assert!(r.failures.is_empty(), "{target}: {r:?}");
                let reply = r.identities.keys().next().unwrap();
                assert_eq!(
                    split_reply(reply),
                    (
                        target.to_string().as_str(),
                        Some(IpAddr::V4(client_ip(node.index())))
                    )
                );
                let udp = SocketAddr::new(IpAddr::V4(*ip), 5353);
                let r = run_in_ns(
                    cluster.client(),
                    ProbeSpec::UdpUnconnected {
                        target: udp,
                        count: 2,
                        timeout_ms: 1000,
                    },
                );
                let u = r.as_udp().unwrap();
                assert_eq!(u.identities.values().sum::<u64>(), 2, "{udp}: {u:?}");
            }
        }
        // node1 -> node2's pods over the node-to-node link, and back.
        let n1 = cluster.node(1);
        let n2 = cluster.node(2);
        let target = SocketAddr::new(IpAddr::V4(n2.pod_ips()[0]), 8080);
        let r = run_in_ns(
            n1.ns(),
            ProbeSpec::TcpRequests {
                target,
                count: 2,
                timeout_ms: 1000,
            },
        );
        let r = r.as_requests().unwrap();
        assert!(r.failures.is_empty(), "{r:?}");
        let (_, peer) = split_reply(r.identities.keys().next().unwrap());
        assert_eq!(peer, Some(IpAddr::V4(n1.peer_ip())));
        // The client reaches both node addresses on their links.
        for node in cluster.nodes() {
            let target = SocketAddr::new(IpAddr::V4(node.ext_ip()), 9);
            let r = run_in_ns(
                cluster.client(),
                ProbeSpec::TcpConnectError {
                    target,
                    timeout_ms: 1000,
                },
            );
            assert_eq!(
                r.as_connect().unwrap().outcome(),
                "ECONNREFUSED",
                "{target}"
            );
        }
        // A pod reaches the other node's pods (both nodes forward).
        let target = SocketAddr::new(IpAddr::V4(n1.pod_ips()[1]), 8080);
        let r = run_in_ns(
            n2.pods(),
            ProbeSpec::TcpRequests {
                target,
                count: 1,
                timeout_ms: 1000,
            },
        );
        let (_, peer) = split_reply(
            r.as_requests()
                .unwrap()
                .identities
                .keys()
                .next()
                .expect("answered"),
        );
        assert_eq!(peer, Some(IpAddr::V4(n2.pod_ips()[0])));
    }
    let left = netns_names();
    assert!(names.iter().all(|n| !left.contains(n)), "{left:?}");
}
