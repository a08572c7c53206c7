//! Device detection end to end: agents started without `--devices` on the
//! multi-node bed (tests/support/nodeport.rs). Node1 takes the clients on
//! one interface (eth-c) and reaches the backends' host, node2, through
//! another (eth-n): NodePort, LoadBalancer and externalIP requests from
//! the client reach node2's pods, with SNAT (whose replies come back on
//! eth-n and must be reverse-translated there) and with DSR; a device
//! added later is attached; pods' devices and a bridge are not.
//!
//! Every agent runs in its node's namespace, whose links the bed created:
//! detection never sees a device of the machine.
//!
//! Needs root (namespaces, BPF, tcx): every test is `#[ignore = "needs
//! root"]` (run them with `--include-ignored`) and fails at once without
//! root.

#[path = "support/nodeport.rs"]
mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use kpr_testbed::cluster::client_ip;
use kpr_testbed::nodeport_bed::{POD_TCP, POD_UDP};
use kpr_testbed::server::split_reply;
use kpr_testbed::{Cluster, ClusterPlan, NodePortBed};
use support::*;

/// NodePorts of `remote` (TCP, UDP) and `lb` (TCP).
const NP_TCP: u16 = 30070;
const NP_UDP: u16 = 30071;
const NP_LB: u16 = 30072;
/// LoadBalancer ingress IP of `lb` and externalIP of `ext`, both routed by
/// the client through node1.
const LB_IP: &str = "203.0.113.30";
const EXTERNAL_IP: &str = "203.0.113.31";

/// Services whose endpoints are node2's pods only, so that through node1
/// every flow has a backend behind node1's other interface: `remote`
/// (NodePort TCP and UDP), `lb` (LoadBalancer, [`LB_IP`]:80) and `ext`
/// (externalIP [`EXTERNAL_IP`]:8080).
fn remote_manifest(cluster: &Cluster) -> String {
    let endpoints = pod_endpoints(cluster, Some(2));
    let slice = |name: &str| {
        format!(
            r#"
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: nd, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: {POD_TCP}}}]
endpoints:
{endpoints}"#
        )
    };
    kpr_testbed::nodeport_bed::nodeport_manifest("nd", "remote", NP_TCP, NP_UDP, &endpoints)
        + &format!(
            r#"
---
apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: nd}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: {POD_TCP}, nodePort: {NP_LB}}}
status:
  loadBalancer:
    ingress: [{{ip: {LB_IP}}}]
"#
        )
        + &slice("lb")
        + &format!(
            r#"
---
apiVersion: v1
kind: Service
metadata: {{name: ext, namespace: nd}}
spec:
  clusterIP: 10.96.0.21
  externalIPs: [{EXTERNAL_IP}]
  ports:
  - {{name: http, protocol: TCP, port: 8080, targetPort: {POD_TCP}}}
"#
        )
        + &slice("ext")
}

/// The bed of `plan` with agents that detect their devices (`extra_args`
/// to both), and the client's routes to [`LB_IP`] and [`EXTERNAL_IP`]
/// through node1.
fn bed(prefix: &str, plan: &ClusterPlan, extra_args: &[&str]) -> NodePortBed {
    let bed = NodePortBed::start_detecting_devices(
        prefix,
        Path::new(KPR),
        plan,
        remote_manifest,
        extra_args,
    )
    .expect("the NodePort bed starts");
    let via = bed.node(1).ext_ip().to_string();
    for ip in [LB_IP, EXTERNAL_IP] {
        bed.cluster
            .client()
            .ip(&["route", "add", &format!("{ip}/32"), "via", &via])
            .unwrap();
    }
    bed
}

/// Node `n`'s devices with both tcx links attached, as the kernel tells
/// (the pinned links' attachment ifindex), by name.
fn attached_by_kernel(bed: &NodePortBed, n: u8) -> BTreeSet<String> {
    let devices = attachments(bed, n);
    devices
        .iter()
        .filter(|d| attached_links(bed, n, &d.device) == 2)
        .map(|d| d.device.clone())
        .collect()
}

/// Node `n`'s agent's status: the devices attached, and whether detected.
fn status_devices(bed: &mut NodePortBed, n: u8) -> (Vec<String>, bool) {
    let status = bed.agent(n).status_json().unwrap();
    let devices = &status["devices"];
    let attached = devices["attached"]
        .as_array()
        .unwrap_or_else(|| panic!("no devices.attached in {status:#}"))
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    (attached, devices["detected"] == true)
}

/// The pods behind node2.
fn node2_pods(bed: &NodePortBed) -> BTreeSet<IpAddr> {
    bed.node(2)
        .pod_ips()
        .iter()
        .map(|ip| IpAddr::V4(*ip))
        .collect()
}

/// The address a node2 pod must have seen for a flow through node1: one
/// of node1's (SNAT), or the client itself (DSR).
#[derive(Clone, Copy)]
enum Seen {
    Node1,
    Client,
}

/// Checks one reply from a pod reached through node1 and names the pod.
#[track_caller]
fn check_remote(bed: &NodePortBed, seen: Seen, reply: &str) -> IpAddr {
    let (identity, peer) = split_reply(reply);
    let backend: SocketAddr = identity.parse().expect("identity is ip:port");
    let peer = peer.expect("the server reports its peer");
    assert_eq!(node_of(backend.ip()), 2, "only node2's pods: {reply}");
    match seen {
        Seen::Node1 => assert!(
            bed.node(1)
                .addresses()
                .iter()
                .any(|a| IpAddr::V4(*a) == peer),
            "SNAT: the pod sees a node1 address, not {peer}: {reply}"
        ),
        Seen::Client => assert_eq!(
            peer,
            IpAddr::V4(client_ip(1)),
            "DSR: the pod sees the client: {reply}"
        ),
    }
    backend.ip()
}

/// NodePort (TCP and UDP), LoadBalancer and externalIP requests from the
/// client through node1 all reach node2's pods, every one answered (the
/// probes fail on any lost request), each pod seeing `seen`.
#[track_caller]
fn served_through_node1(bed: &NodePortBed, seen: Seen) {
    let client = bed.cluster.client();
    let targets = [
        node_port(bed.node(1), NP_TCP),
        SocketAddr::new(LB_IP.parse().unwrap(), 80),
        SocketAddr::new(EXTERNAL_IP.parse().unwrap(), 8080),
    ];
    for target in targets {
        let r = tcp_requests(client, target, 30);
        let pods_seen = tally(&r.identities, |reply| check_remote(bed, seen, reply));
        println!("TCP {target}: {pods_seen:?}");
        assert_eq!(pods(&pods_seen), node2_pods(bed), "{target}");
    }
    let target = node_port(bed.node(1), NP_UDP);
    let u = udp_connected(client, target, 30);
    let pods_seen = tally(&u.identities, |reply| check_remote(bed, seen, reply));
    println!("UDP {target}: {pods_seen:?}");
    assert_eq!(pods(&pods_seen), node2_pods(bed), "{target}");
    assert!(
        u.identities
            .keys()
            .all(|k| k.contains(&format!(":{POD_UDP}"))),
        "{u:?}"
    );
}

/// Adds to node1 devices detection must leave out: pods' veths (peers in
/// node1's pod namespace), one without address (as most CNIs leave them),
/// one holding only the pod's gateway as a /32 (point-to-point CNIs); and
/// a bridge with an address.
fn add_devices_that_are_not_the_nodes(bed: &NodePortBed) {
    let node = bed.node(1).ns();
    let pods = bed.node(1).pods();
    for (dev, addr) in [("vpod0", Some("10.244.9.1/32")), ("vpod1", None)] {
        let peer = format!("{dev}p");
        node.ip(&[
            "link",
            "add",
            dev,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            pods.name(),
        ])
        .unwrap();
        if let Some(addr) = addr {
            node.ip(&["addr", "add", addr, "dev", dev]).unwrap();
        }
        node.ip(&["link", "set", dev, "up"]).unwrap();
        pods.ip(&["link", "set", &peer, "up"]).unwrap();
    }
    node.ip(&["link", "add", "br-t", "type", "bridge"]).unwrap();
    node.ip(&["addr", "add", "10.244.7.1/24", "dev", "br-t"])
        .unwrap();
    node.ip(&["link", "set", "br-t", "up"]).unwrap();
}

/// The devices node1 is expected to detect: its client link, its link to
/// node2 and its link to its pods' subnet (a veth holding the subnet's
/// gateway, 10.244.1.1/24: a node address on a subnet, as a physical link
/// to a pod network would be).
const NODE1_DEVICES: [&str; 3] = ["eth-c", "eth-n", "eth-p"];

/// Without `--devices`, in SNAT mode: node1 attaches to its devices (the
/// kernel shows both tcx links of each; `kpr status` says "detected"), and
/// requests through node1 to backends behind its other interface are all
/// answered: the SNAT replies arriving on eth-n are reverse-translated
/// there. A device that appears later (a third veth with a node address)
/// is attached and serves NodePort traffic; pods' veths and a bridge are
/// not attached, until an address or a default route makes a veth a node
/// device.
#[test]
#[ignore = "needs root"]
fn without_devices_snat_requests_reach_backends_behind_the_other_interface() {
    require_root();
    let mut bed = bed("ndsnat", &ClusterPlan::default(), &[]);
    let want: BTreeSet<String> = NODE1_DEVICES.iter().map(|d| d.to_string()).collect();
    assert_eq!(attached_by_kernel(&bed, 1), want);
    let (attached, detected) = status_devices(&mut bed, 1);
    assert_eq!(attached, NODE1_DEVICES);
    assert!(detected);
    let text = status_text(&bed, 1);
    assert!(
        text.contains("Devices:              eth-c eth-n eth-p [detected]"),
        "{text}"
    );

    let before = bed.stats(1).unwrap();
    served_through_node1(&bed, Seen::Node1);
    let after = bed.stats(1).unwrap();
    assert!(
        after.flows_snat >= before.flows_snat + 120,
        "every flow was SNATed: {after:?}"
    );
    assert!(
        after.packets_reply >= before.packets_reply + 120,
        "the replies were reverse-translated on node1: {after:?}"
    );

    add_devices_that_are_not_the_nodes(&bed);
    let client_addr = bed.cluster.add_late_link(1, "eth-late", "eth-l1").unwrap();
    wait_attached(&bed, 1, "eth-late");
    let late = link_index(bed.node(1).ns(), "eth-late");
    let on_late: Vec<_> = attachments(&bed, 1)
        .into_iter()
        .filter(|d| d.device == "eth-late")
        .map(|d| d.ifindex)
        .collect();
    assert_eq!(
        on_late,
        [Some(late), Some(late)],
        "both tcx links on eth-late"
    );
    let mut want = want;
    want.insert("eth-late".into());
    // The watcher saw the pods' veths and the bridge before eth-late
    // appeared; none of them is attached.
    assert_eq!(attached_by_kernel(&bed, 1), want);
    assert!(wait_for(Duration::from_secs(10), || {
        status_devices(&mut bed, 1).0 == ["eth-c", "eth-late", "eth-n", "eth-p"]
    }));

    // NodePort traffic now enters node1 through eth-late.
    let target = node_port(bed.node(1), NP_TCP);
    let r = tcp_requests(bed.cluster.client(), target, 30);
    let seen = tally(&r.identities, |reply| {
        check_remote(&bed, Seen::Node1, reply)
    });
    assert_eq!(pods(&seen), node2_pods(&bed), "through eth-late");
    let via_late = bed
        .ct(1)
        .unwrap()
        .into_iter()
        .filter(|e| e.src.ip() == IpAddr::V4(client_addr))
        .count();
    assert!(via_late >= 30, "{via_late} flows from the eth-late client");

    // Gone again: its links are detached and forgotten.
    bed.cluster.remove_late_link(1, "eth-late").unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || attached_links(
            &bed, 1, "eth-late"
        ) == 0),
        "{:?}",
        attachments(&bed, 1)
    );

    // Addresses and routes change the set too: a subnet address makes the
    // address-less pod veth a node device, its removal ends that; a
    // default route through the /32 one makes it one.
    let node = bed.node(1).ns();
    let attached_within = |dev: &str, links: usize| {
        let started = std::time::Instant::now();
        let ok = wait_for(Duration::from_secs(30), || {
            attached_links(&bed, 1, dev) == links
        });
        println!("{dev}: {links} links after {:?}", started.elapsed());
        assert!(ok, "{dev}: {:?}", attachments(&bed, 1));
    };
    node.ip(&["addr", "add", "10.244.6.1/24", "dev", "vpod1"])
        .unwrap();
    attached_within("vpod1", 2);
    node.ip(&["addr", "del", "10.244.6.1/24", "dev", "vpod1"])
        .unwrap();
    attached_within("vpod1", 0);
    node.ip(&["route", "add", "default", "dev", "vpod0"])
        .unwrap();
    attached_within("vpod0", 2);
}

/// Without `--devices`, in DSR mode: requests through node1 reach node2's
/// pods IPIP-encapsulated over eth-n (node2 detects eth-n too and
/// decapsulates there), and the pods see the client and answer it
/// directly.
#[test]
#[ignore = "needs root"]
fn without_devices_dsr_requests_reach_backends_behind_the_other_interface() {
    require_root();
    let plan = ClusterPlan {
        direct_return: true,
        ..ClusterPlan::default()
    };
    let bed = bed("nddsr", &plan, &["--nodeport-mode", "dsr"]);
    for n in [1, 2] {
        let want: BTreeSet<String> = NODE1_DEVICES.iter().map(|d| d.to_string()).collect();
        assert_eq!(attached_by_kernel(&bed, n), want, "node{n}");
    }
    let (before1, before2) = (bed.stats(1).unwrap(), bed.stats(2).unwrap());
    served_through_node1(&bed, Seen::Client);
    let (after1, after2) = (bed.stats(1).unwrap(), bed.stats(2).unwrap());
    assert!(
        after1.flows_dsr >= before1.flows_dsr + 120,
        "node1 opened DSR flows: {after1:?}"
    );
    assert!(
        after2.dsr_decap >= before2.dsr_decap + 120,
        "node2 decapsulated them: {after2:?}"
    );
}
