//! The north-south tc and XDP programs on their own, through
//! BPF_PROG_TEST_RUN: crafted packets in, verdict, packet out and counters
//! checked, with the maps written by the agent's own code (see
//! `support/packet_node.rs`). Fixture tables in Katran's manner, one per
//! node configuration; the cases of a table run in order and share the
//! node's conntrack, as packets of a real node do.
//!
//! Root only (`#[ignore = "needs root"]`): `cargo test --test bpf_prog --
//! --include-ignored`. Seconds, no test bed.

#[path = "support/packet.rs"]
mod packet;
#[path = "support/packet_node.rs"]
mod packet_node;

use kpr::maglev::jhash_3words;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use kpr::datapath::nodeport::{NodePortMode, PortRange, DEFAULT_SNAT_PORTS};
use kpr::model::Protocol;

use packet::*;
use packet_node::*;

/// Stand-ins for SNAT ports in a table: the port the program picks from
/// the SNAT range for flow A (B, ...). The first expected output that
/// holds one learns it (and checks it is in the range); later inputs and
/// outputs use what was learned. No real packet here uses ports below 10.
const SNAT_A: u16 = 1;
const SNAT_B: u16 = 2;
const SNAT_C: u16 = 3;
const SNAT_D: u16 = 4;

/// What a case expects out of the program.
enum Out {
    /// The packet as it went in.
    Unchanged,
    /// This packet (every checksum must hold).
    Frame(Frame),
}

/// One fixture: a packet through one program and what must come out.
struct Case {
    what: &'static str,
    hook: Hook,
    input: Frame,
    verdict: Verdict,
    output: Out,
    /// Counters that must move, and by how much; every other one stays.
    counts: &'static [(&'static str, u64)],
}

/// Runs a table on `node`, in order.
#[track_caller]
fn run_table(node: &TestNode, cases: Vec<Case>) {
    let mut learned = BTreeMap::new();
    for case in cases {
        let before = node.counters();
        let mut input = case.input.clone();
        for_each_port(&mut input.ip, &mut |p| {
            if *p < 10 {
                *p = *learned
                    .get(p)
                    .unwrap_or_else(|| panic!("{}: SNAT port #{p} not learned yet", case.what));
            }
        });
        let out = node.run(case.hook, &input.build(), 1);
        assert_eq!(
            out.verdict, case.verdict,
            "{}: verdict (packet out: {:02x?})",
            case.what, out.bytes
        );
        match case.output {
            Out::Unchanged => assert_eq!(
                out.bytes,
                input.build(),
                "{}: the packet must go on unchanged",
                case.what
            ),
            Out::Frame(mut expected) => {
                let actual = Frame::parse(&out.bytes)
                    .unwrap_or_else(|e| panic!("{}: output does not parse: {e}", case.what));
                learn_snat_ports(
                    &mut expected.ip,
                    &actual.ip,
                    node.config.snat_ports,
                    &mut learned,
                    case.what,
                );
                assert_eq!(actual, expected, "{}: packet out", case.what);
            }
        }
        let after = node.counters();
        let moved: BTreeMap<&str, u64> = after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(v))
            .map(|(k, v)| (k.as_str(), v - before.get(k).copied().unwrap_or(0)))
            .collect();
        let want: BTreeMap<&str, u64> = case.counts.iter().copied().collect();
        assert_eq!(moved, want, "{}: counters moved", case.what);
    }
}

/// Calls `f` on the TCP/UDP ports of `ip`, of an IPIP packet's inner one
/// and of an ICMP error's quote.
fn for_each_port(ip: &mut Ipv4, f: &mut dyn FnMut(&mut u16)) {
    match &mut ip.payload {
        L4::Tcp(t) => {
            f(&mut t.sport);
            f(&mut t.dport);
        }
        L4::Udp(u) => {
            f(&mut u.sport);
            f(&mut u.dport);
        }
        L4::Ipip(inner) => for_each_port(inner, f),
        L4::Icmp(i) if i.quote.len() >= 24 && matches!(i.quote[9], PROTO_TCP | PROTO_UDP) => {
            for at in [20, 22] {
                let mut p = u16::from_be_bytes([i.quote[at], i.quote[at + 1]]);
                f(&mut p);
                i.quote[at..at + 2].copy_from_slice(&p.to_be_bytes());
            }
        }
        _ => {}
    }
}

/// Replaces the SNAT stand-ins of `expected` with the ports `actual` has
/// in their place, checking they are in `range` and agree with what was
/// learned before.
fn learn_snat_ports(
    expected: &mut Ipv4,
    actual: &Ipv4,
    range: PortRange,
    learned: &mut BTreeMap<u16, u16>,
    what: &str,
) {
    let mut got = Vec::new();
    for_each_port(&mut actual.clone(), &mut |p| got.push(*p));
    let mut i = 0;
    for_each_port(expected, &mut |p| {
        let seen = got.get(i).copied();
        i += 1;
        if *p >= 10 {
            return;
        }
        let Some(seen) = seen else { return };
        assert!(
            (range.min..=range.max).contains(&seen),
            "{what}: SNAT port {seen} is outside {range}"
        );
        let port = *learned.entry(*p).or_insert(seen);
        *p = port;
    });
}

fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Ipv4 {
    Ipv4::new(src.0, dst.0, L4::Tcp(Tcp::new(src.1, dst.1, flags)))
}

fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Ipv4 {
    Ipv4::new(src.0, dst.0, L4::Udp(Udp::new(src.1, dst.1, payload)))
}

/// A frame from the client's link (or node2's) to the node.
fn from(mac: Mac, ip: Ipv4) -> Frame {
    Frame::new(mac, NODE_MAC, ip)
}

/// The ICMP port unreachable the tc program turns `p` (from the client) into.
fn port_unreachable(p: &Ipv4) -> Frame {
    let ip = Ipv4 {
        tos: 0xc0,
        id: 0,
        df: false,
        ..Ipv4::new(p.dst, p.src, L4::Icmp(Icmp::error(3, 3, [0; 4], p)))
    };
    Frame::new(NODE_MAC, CLIENT_MAC, ip)
}

const C: Ipv4Addr = CLIENT_IP;
const N: Ipv4Addr = NODE_IP;

#[test]
fn the_packet_builder_s_frames_parse_back_to_what_built_them() {
    for payload in [
        L4::Tcp(Tcp::new(40000, NP_REMOTE_TCP, TCP_SYN)),
        L4::Udp(Udp::new(40000, NP_REMOTE_UDP, b"hello")),
    ] {
        let f = from(CLIENT_MAC, Ipv4::new(C, N, payload));
        assert_eq!(Frame::parse(&f.build()), Ok(f));
    }
    let mut broken = from(CLIENT_MAC, tcp((C, 40000), (N, 80), TCP_SYN)).build();
    broken[14 + 8] -= 1; // the TTL, its checksum left as it was
    assert!(Frame::parse(&broken).is_err());
}

#[test]
#[ignore = "needs root"]
fn snat_node_translates_flows_both_ways_and_leaves_other_traffic_alone() {
    require_root();
    let node = TestNode::start(config());
    let syn = tcp((C, 40000), (N, NP_REMOTE_TCP), TCP_SYN);
    let ack = tcp((C, 40000), (N, NP_REMOTE_TCP), TCP_ACK);
    let synack = |ttl| tcp((REMOTE_POD, POD_TCP), (N, SNAT_A), TCP_SYN | TCP_ACK).with_ttl(ttl);
    let other = tcp((C, 40000), (N, 22), TCP_SYN);
    let no_backend = tcp((C, 40010), (N, NP_EMPTY_TCP), TCP_SYN);
    let no_backend_udp = udp((C, 40011), (N, NP_EMPTY_UDP), b"query");
    let frag_needed_about = tcp((N, SNAT_A), (REMOTE_POD, POD_TCP), TCP_ACK).with_ttl(63);
    let mtu_1400 = [0, 0, 0x05, 0x78];
    // The reply as it reached the client, and as the backend sent it.
    let reply_seen = tcp((N, NP_REMOTE_TCP), (C, 40000), TCP_ACK).with_ttl(62);
    let reply_sent = tcp((REMOTE_POD, POD_TCP), (N, SNAT_A), TCP_ACK).with_ttl(62);
    let local_syn = tcp((C, 40020), (N, NP_LOCAL), TCP_SYN);
    let local_synack = tcp((LOCAL_POD, POD_TCP), (C, 40020), TCP_SYN | TCP_ACK).with_ttl(63);
    let unrouted = tcp((C, 40030), (N, NP_UNROUTED), TCP_SYN);
    let dns = udp((C, 40040), (N, NP_REMOTE_UDP), b"query");
    let cases = vec![
        Case {
            what: "XDP: a new TCP flow to a NodePort goes to its remote backend, DNATed and SNATed",
            hook: Hook::Xdp,
            input: from(CLIENT_MAC, syn.clone()),
            verdict: Verdict::XdpRedirect,
            output: Out::Frame(Frame::new(
                NODE_MAC,
                NODE2_MAC,
                tcp((N, SNAT_A), (REMOTE_POD, POD_TCP), TCP_SYN).with_ttl(63),
            )),
            counts: &[
                ("flows_new", 1),
                ("flows_snat", 1),
                ("packets_fwd", 1),
                ("xdp_fwd", 1),
            ],
        },
        Case {
            what: "tc: the flow's next packet hits conntrack: same backend, same SNAT port",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, ack.clone()),
            verdict: Verdict::TcRedirect,
            output: Out::Frame(Frame::new(
                NODE_MAC,
                NODE2_MAC,
                tcp((N, SNAT_A), (REMOTE_POD, POD_TCP), TCP_ACK).with_ttl(63),
            )),
            counts: &[("packets_fwd", 1)],
        },
        Case {
            what: "XDP: the same, established",
            hook: Hook::Xdp,
            input: from(CLIENT_MAC, ack),
            verdict: Verdict::XdpRedirect,
            output: Out::Frame(Frame::new(
                NODE_MAC,
                NODE2_MAC,
                tcp((N, SNAT_A), (REMOTE_POD, POD_TCP), TCP_ACK).with_ttl(63),
            )),
            counts: &[("packets_fwd", 1), ("xdp_fwd", 1)],
        },
        Case {
            what: "XDP: the backend's reply to the SNAT port goes back to the client from the frontend",
            hook: Hook::Xdp,
            input: from(NODE2_MAC, synack(63)),
            verdict: Verdict::XdpRedirect,
            output: Out::Frame(Frame::new(
                NODE_MAC,
                CLIENT_MAC,
                tcp((N, NP_REMOTE_TCP), (C, 40000), TCP_SYN | TCP_ACK).with_ttl(62),
            )),
            counts: &[("packets_reply", 1), ("xdp_fwd", 1)],
        },
        Case {
            what: "tc: the same reply",
            hook: Hook::TcIngress,
            input: from(NODE2_MAC, synack(63)),
            verdict: Verdict::TcRedirect,
            output: Out::Frame(Frame::new(
                NODE_MAC,
                CLIENT_MAC,
                tcp((N, NP_REMOTE_TCP), (C, 40000), TCP_SYN | TCP_ACK).with_ttl(62),
            )),
            counts: &[("packets_reply", 1)],
        },
        Case {
            what: "tc: ICMP fragmentation-needed from the backend's side about the SNATed flow \
                   reaches the client, about its own packet, from the frontend",
            hook: Hook::TcIngress,
            input: from(
                NODE2_MAC,
                Ipv4 {
                    tos: 0xc0,
                    df: false,
                    ..Ipv4::new(
                        NODE2_IP,
                        N,
                        L4::Icmp(Icmp::error(3, 4, mtu_1400, &frag_needed_about)),
                    )
                },
            ),
            verdict: Verdict::TcRedirect,
            output: Out::Frame(Frame::new(
                NODE_MAC,
                CLIENT_MAC,
                Ipv4 {
                    tos: 0xc0,
                    df: false,
                    ttl: 63,
                    ..Ipv4::new(
                        N,
                        C,
                        L4::Icmp(Icmp::error(
                            3,
                            4,
                            mtu_1400,
                            &tcp((C, 40000), (N, NP_REMOTE_TCP), TCP_ACK).with_ttl(63),
                        )),
                    )
                },
            )),
            counts: &[("icmp_errors", 1)],
        },
        Case {
            what: "tc: ICMP fragmentation-needed from the client's side about the backend's \
                   reply reaches the backend, about its own packet, from the SNAT address",
            hook: Hook::TcIngress,
            input: from(
                CLIENT_MAC,
                Ipv4 {
                    tos: 0xc0,
                    df: false,
                    ..Ipv4::new(C, N, L4::Icmp(Icmp::error(3, 4, mtu_1400, &reply_seen)))
                },
            ),
            verdict: Verdict::TcRedirect,
            output: Out::Frame(Frame::new(
                NODE_MAC,
                NODE2_MAC,
                Ipv4 {
                    tos: 0xc0,
                    df: false,
                    ttl: 63,
                    ..Ipv4::new(
                        N,
                        REMOTE_POD,
                        L4::Icmp(Icmp::error(3, 4, mtu_1400, &reply_sent)),
                    )
                },
            )),
            counts: &[("icmp_errors", 1)],
        },
        Case {
            what: "tc: a new UDP flow to a NodePort, SNATed to its remote backend",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, dns),
            verdict: Verdict::TcRedirect,
            output: Out::Frame(Frame::new(
                NODE_MAC,
                NODE2_MAC,
                udp((N, SNAT_B), (REMOTE_POD, POD_UDP), b"query").with_ttl(63),
            )),
            counts: &[("flows_new", 1), ("flows_snat", 1), ("packets_fwd", 1)],
        },
        Case {
            what: "XDP: a packet to no frontend goes on untouched",
            hook: Hook::Xdp,
            input: from(CLIENT_MAC, other.clone()),
            verdict: Verdict::XdpPass,
            output: Out::Unchanged,
            counts: &[],
        },
        Case {
            what: "tc: a packet to no frontend goes on untouched",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, other.clone()),
            verdict: Verdict::TcNext,
            output: Out::Unchanged,
            counts: &[],
        },
        Case {
            what: "tc egress: a packet of no flow goes on untouched",
            hook: Hook::TcEgress,
            input: Frame::new(NODE_MAC, CLIENT_MAC, other.with_addrs(N, C)),
            verdict: Verdict::TcNext,
            output: Out::Unchanged,
            counts: &[],
        },
        Case {
            what: "XDP: a SYN to a frontend without backend goes on to tc, which answers it",
            hook: Hook::Xdp,
            input: from(CLIENT_MAC, no_backend.clone()),
            verdict: Verdict::XdpPass,
            output: Out::Unchanged,
            counts: &[],
        },
        Case {
            what: "tc: a SYN to a frontend without backend becomes ICMP port unreachable, sent back",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, no_backend.clone()),
            verdict: Verdict::TcRedirect,
            output: Out::Frame(port_unreachable(&no_backend)),
            counts: &[("reject_no_backend", 1)],
        },
        Case {
            what: "tc: so does a UDP datagram",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, no_backend_udp.clone()),
            verdict: Verdict::TcRedirect,
            output: Out::Frame(port_unreachable(&no_backend_udp)),
            counts: &[("reject_no_backend", 1)],
        },
        Case {
            what: "tc: a RST to a frontend without backend is dropped, not answered",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, tcp((C, 40012), (N, NP_EMPTY_TCP), TCP_RST)),
            verdict: Verdict::TcShot,
            output: Out::Unchanged,
            counts: &[("drop_no_backend", 1)],
        },
        Case {
            what: "XDP: a new flow from outside loadBalancerSourceRanges is dropped",
            hook: Hook::Xdp,
            input: from(
                CLIENT_MAC,
                tcp((OUTSIDER_IP, 40050), (GUARDED_LB_IP, 80), TCP_SYN),
            ),
            verdict: Verdict::XdpDrop,
            output: Out::Unchanged,
            counts: &[("drop_source_range", 1)],
        },
        Case {
            what: "tc: the same",
            hook: Hook::TcIngress,
            input: from(
                CLIENT_MAC,
                tcp((OUTSIDER_IP, 40050), (GUARDED_LB_IP, 80), TCP_SYN),
            ),
            verdict: Verdict::TcShot,
            output: Out::Unchanged,
            counts: &[("drop_source_range", 1)],
        },
        Case {
            what: "XDP: a client inside the ranges gets through",
            hook: Hook::Xdp,
            input: from(CLIENT_MAC, tcp((C, 40051), (GUARDED_LB_IP, 80), TCP_SYN)),
            verdict: Verdict::XdpRedirect,
            output: Out::Frame(Frame::new(
                NODE_MAC,
                NODE2_MAC,
                tcp((N, SNAT_C), (GUARDED_POD, POD_TCP), TCP_SYN).with_ttl(63),
            )),
            counts: &[
                ("flows_new", 1),
                ("flows_snat", 1),
                ("packets_fwd", 1),
                ("xdp_fwd", 1),
            ],
        },
        Case {
            what: "XDP: a packet to a frontend whose TTL would run out is dropped",
            hook: Hook::Xdp,
            input: from(
                CLIENT_MAC,
                tcp((C, 40060), (N, NP_REMOTE_TCP), TCP_SYN).with_ttl(1),
            ),
            verdict: Verdict::XdpDrop,
            output: Out::Unchanged,
            counts: &[("drop_ttl", 1)],
        },
        Case {
            what: "XDP: a new flow whose next hop has no neighbour entry goes on to tc, no state written",
            hook: Hook::Xdp,
            input: from(CLIENT_MAC, unrouted.clone()),
            verdict: Verdict::XdpPass,
            output: Out::Unchanged,
            counts: &[],
        },
        Case {
            what: "tc: which translates it and leaves the MACs to the neighbour subsystem",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, unrouted),
            verdict: Verdict::TcRedirect,
            output: Out::Frame(Frame::new(
                CLIENT_MAC,
                NODE_MAC,
                tcp((N, SNAT_D), (UNRESOLVED_POD, POD_TCP), TCP_SYN).with_ttl(63),
            )),
            counts: &[("flows_new", 1), ("flows_snat", 1), ("packets_fwd", 1)],
        },
        Case {
            what: "tc: a new flow to a local backend is DNATed only: the pod sees the client",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, local_syn),
            verdict: Verdict::TcRedirect,
            output: Out::Frame(Frame::new(
                POD_DEV_MAC,
                LOCAL_POD_MAC,
                tcp((C, 40020), (LOCAL_POD, POD_TCP), TCP_SYN).with_ttl(63),
            )),
            counts: &[("flows_new", 1), ("packets_fwd", 1)],
        },
        Case {
            what: "tc egress: the local backend's reply leaves with the frontend as source",
            hook: Hook::TcEgress,
            input: Frame::new(NODE_MAC, CLIENT_MAC, local_synack),
            verdict: Verdict::TcNext,
            output: Out::Frame(Frame::new(
                NODE_MAC,
                CLIENT_MAC,
                tcp((N, NP_LOCAL), (C, 40020), TCP_SYN | TCP_ACK).with_ttl(63),
            )),
            counts: &[("packets_reply", 1)],
        },
    ];
    run_table(&node, cases);
}

/// UDP fragments to the local backend: no SNAT port, so every byte is
/// known in advance.
#[test]
#[ignore = "needs root"]
fn a_cluster_ip_on_a_port_or_protocol_its_service_lacks_is_answered_as_an_empty_service() {
    require_root();
    let node = TestNode::start(config());
    // Service remote: ClusterIP 10.96.0.10 with TCP 80 and UDP 53.
    let cluster_ip = Ipv4Addr::new(10, 96, 0, 10);
    let bad_port = tcp((C, 40100), (cluster_ip, 81), TCP_SYN);
    let udp_side_of_tcp_port = udp((C, 40101), (cluster_ip, 80), b"query");
    let tcp_side_of_udp_port = tcp((C, 40102), (cluster_ip, 53), TCP_SYN);
    let defined_port = tcp((C, 40103), (cluster_ip, 80), TCP_SYN);
    let no_cluster_ip = tcp((C, 40104), (Ipv4Addr::new(10, 96, 0, 99), 81), TCP_SYN);
    let node_ip_other_port = tcp((C, 40105), (N, 22), TCP_SYN);
    let cases = vec![
        Case {
            what:
                "XDP: a SYN to a ClusterIP port the Service lacks goes on to tc, which answers it",
            hook: Hook::Xdp,
            input: from(CLIENT_MAC, bad_port.clone()),
            verdict: Verdict::XdpPass,
            output: Out::Unchanged,
            counts: &[],
        },
        Case {
            what: "tc: that SYN becomes ICMP port unreachable from the ClusterIP, sent back",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, bad_port.clone()),
            verdict: Verdict::TcRedirect,
            output: Out::Frame(port_unreachable(&bad_port)),
            counts: &[("reject_no_backend", 1)],
        },
        Case {
            what: "tc: so does UDP to a port the Service has for TCP only",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, udp_side_of_tcp_port.clone()),
            verdict: Verdict::TcRedirect,
            output: Out::Frame(port_unreachable(&udp_side_of_tcp_port)),
            counts: &[("reject_no_backend", 1)],
        },
        Case {
            what: "tc: and TCP to a port the Service has for UDP only",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, tcp_side_of_udp_port.clone()),
            verdict: Verdict::TcRedirect,
            output: Out::Frame(port_unreachable(&tcp_side_of_udp_port)),
            counts: &[("reject_no_backend", 1)],
        },
        Case {
            what: "tc: a RST to such a port is dropped, not answered",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, tcp((C, 40106), (cluster_ip, 81), TCP_RST)),
            verdict: Verdict::TcShot,
            output: Out::Unchanged,
            counts: &[("drop_no_backend", 1)],
        },
        Case {
            what: "tc: a port the Service defines goes on untouched (ClusterIPs are not served \
                   north-south)",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, defined_port),
            verdict: Verdict::TcNext,
            output: Out::Unchanged,
            counts: &[],
        },
        Case {
            what: "tc: an address that is no ClusterIP goes on untouched",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, no_cluster_ip),
            verdict: Verdict::TcNext,
            output: Out::Unchanged,
            counts: &[],
        },
        Case {
            what: "tc: the node's own address on a port that is no NodePort goes on untouched",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, node_ip_other_port),
            verdict: Verdict::TcNext,
            output: Out::Unchanged,
            counts: &[],
        },
    ];
    run_table(&node, cases);
}

#[test]
#[ignore = "needs root"]
fn fragments_follow_their_first_fragment_s_flow() {
    require_root();
    let node = TestNode::start(config());
    let payload: Vec<u8> = (0..64).collect();
    let datagram = |id| Ipv4 {
        id,
        ..udp((C, 40100), (N, NP_LOCAL_UDP), &payload)
    };
    let [first, later] = datagram(7).fragments(24);
    let [out_first, out_later] = Ipv4 {
        id: 7,
        ttl: 63,
        ..udp((C, 40100), (LOCAL_POD, POD_UDP), &payload)
    }
    .fragments(24);
    let [_, stray] = datagram(8).fragments(24);
    let cases = vec![
        Case {
            what: "XDP: fragments go on to tc",
            hook: Hook::Xdp,
            input: from(CLIENT_MAC, first.clone()),
            verdict: Verdict::XdpPass,
            output: Out::Unchanged,
            counts: &[],
        },
        Case {
            what: "tc: the first fragment opens the flow and is DNATed (its UDP checksum \
                   covers the whole datagram)",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, first),
            verdict: Verdict::TcRedirect,
            output: Out::Frame(Frame::new(POD_DEV_MAC, LOCAL_POD_MAC, out_first)),
            counts: &[("flows_new", 1), ("packets_fwd", 1)],
        },
        Case {
            what: "tc: a later fragment gets the first one's ports and follows the flow",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, later),
            verdict: Verdict::TcRedirect,
            output: Out::Frame(Frame::new(POD_DEV_MAC, LOCAL_POD_MAC, out_later)),
            counts: &[("packets_fwd", 1), ("fragments_followed", 1)],
        },
        Case {
            what: "tc: a later fragment whose first one was not seen goes on untouched",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, stray),
            verdict: Verdict::TcNext,
            output: Out::Unchanged,
            counts: &[("fragments_unknown", 1)],
        },
    ];
    run_table(&node, cases);
}

/// A SNAT range of two ports: a client port inside it is kept, the next
/// flow to the same backend gets the other one, the third finds none.
#[test]
#[ignore = "needs root"]
fn snat_ports_come_from_the_range_and_running_out_drops_counted() {
    require_root();
    let range = PortRange {
        min: 61000,
        max: 61001,
    };
    let node = TestNode::start(config_with(NodePortMode::Snat, range));
    let syn = |port| tcp((C, port), (N, NP_REMOTE_TCP), TCP_SYN);
    let out = |port| {
        Out::Frame(Frame::new(
            NODE_MAC,
            NODE2_MAC,
            tcp((N, port), (REMOTE_POD, POD_TCP), TCP_SYN).with_ttl(63),
        ))
    };
    let cases = vec![
        Case {
            what: "XDP: a client port inside the SNAT range is kept",
            hook: Hook::Xdp,
            input: from(CLIENT_MAC, syn(61001)),
            verdict: Verdict::XdpRedirect,
            output: out(61001),
            counts: &[
                ("flows_new", 1),
                ("flows_snat", 1),
                ("packets_fwd", 1),
                ("xdp_fwd", 1),
            ],
        },
        Case {
            what: "tc: the next flow gets the range's other port",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, syn(40001)),
            verdict: Verdict::TcRedirect,
            output: out(61000),
            counts: &[("flows_new", 1), ("flows_snat", 1), ("packets_fwd", 1)],
        },
        Case {
            what: "tc: a third flow finds every port taken: dropped, counted",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, syn(40002)),
            verdict: Verdict::TcShot,
            output: Out::Unchanged,
            counts: &[("drop_snat_exhausted", 1)],
        },
        Case {
            what: "XDP: the same",
            hook: Hook::Xdp,
            input: from(CLIENT_MAC, syn(40003)),
            verdict: Verdict::XdpDrop,
            output: Out::Unchanged,
            counts: &[("drop_snat_exhausted", 1)],
        },
        Case {
            what: "tc: the flows that have a port keep it",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, tcp((C, 40001), (N, NP_REMOTE_TCP), TCP_ACK)),
            verdict: Verdict::TcRedirect,
            output: Out::Frame(Frame::new(
                NODE_MAC,
                NODE2_MAC,
                tcp((N, 61000), (REMOTE_POD, POD_TCP), TCP_ACK).with_ttl(63),
            )),
            counts: &[("packets_fwd", 1)],
        },
    ];
    run_table(&node, cases);
}

#[test]
#[ignore = "needs root"]
fn dsr_node_encapsulates_toward_remote_backends_and_decapsulates_for_local_ones() {
    require_root();
    let node = TestNode::start(config_with(NodePortMode::Dsr, DEFAULT_SNAT_PORTS));
    let ipip = |src, dst, inner: Ipv4| Ipv4 {
        id: 0,
        ..Ipv4::new(src, dst, L4::Ipip(Box::new(inner)))
    };
    let encapsulated = |port| {
        Out::Frame(Frame::new(
            NODE_MAC,
            NODE2_MAC,
            ipip(
                N,
                REMOTE_POD,
                tcp((C, port), (N, NP_REMOTE_TCP), TCP_SYN).with_ttl(63),
            ),
        ))
    };
    // What node2 sends this node for its NodePort 30081, whose backend is
    // this node's pod.
    let from_node2 = |port| {
        from(
            NODE2_MAC,
            ipip(
                NODE2_IP,
                LOCAL_POD,
                tcp((C, port), (NODE2_IP, NP_LOCAL), TCP_SYN).with_ttl(63),
            ),
        )
    };
    let decapsulated = |port| {
        Out::Frame(Frame::new(
            POD_DEV_MAC,
            LOCAL_POD_MAC,
            tcp((C, port), (LOCAL_POD, POD_TCP), TCP_SYN).with_ttl(62),
        ))
    };
    let mss = |t: Tcp, mss: u16| {
        let mut t = t;
        t.options = [vec![2, 4], mss.to_be_bytes().to_vec()].concat();
        t
    };
    let backend_synack = |mss_value| {
        Ipv4::new(
            LOCAL_POD,
            C,
            L4::Tcp(mss(Tcp::new(POD_TCP, 41003, TCP_SYN | TCP_ACK), mss_value)),
        )
    };
    let client_synack = Ipv4::new(
        NODE2_IP,
        C,
        L4::Tcp(mss(Tcp::new(NP_LOCAL, 41003, TCP_SYN | TCP_ACK), 1440)),
    );
    let big = Ipv4::new(
        C,
        N,
        L4::Tcp(Tcp {
            payload: vec![0x55; 1460],
            ..Tcp::new(41004, NP_REMOTE_TCP, TCP_ACK)
        }),
    );
    let too_big = Frame::new(
        NODE_MAC,
        CLIENT_MAC,
        Ipv4 {
            id: 0,
            df: false,
            ..Ipv4::new(N, C, L4::Icmp(Icmp::error(3, 4, [0, 0, 0x05, 0xc8], &big)))
        },
    );
    let cases = vec![
        Case {
            what: "XDP: a new TCP flow to a remote backend goes IPIP-encapsulated toward it",
            hook: Hook::Xdp,
            input: from(CLIENT_MAC, tcp((C, 41000), (N, NP_REMOTE_TCP), TCP_SYN)),
            verdict: Verdict::XdpRedirect,
            output: encapsulated(41000),
            counts: &[
                ("flows_new", 1),
                ("flows_dsr", 1),
                ("packets_fwd", 1),
                ("xdp_fwd", 1),
            ],
        },
        Case {
            what: "tc: the same",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, tcp((C, 41001), (N, NP_REMOTE_TCP), TCP_SYN)),
            verdict: Verdict::TcRedirect,
            output: encapsulated(41001),
            counts: &[("flows_new", 1), ("flows_dsr", 1), ("packets_fwd", 1)],
        },
        Case {
            what: "tc: a packet too big to encapsulate is answered with fragmentation-needed",
            hook: Hook::TcIngress,
            input: from(CLIENT_MAC, big.clone()),
            verdict: Verdict::TcRedirect,
            output: Out::Frame(too_big),
            counts: &[
                ("flows_new", 1),
                ("flows_dsr", 1),
                ("packets_fwd", 1),
                ("drop_dsr_too_big", 1),
            ],
        },
        Case {
            what: "XDP: another node's DSR packet for a local backend is decapsulated and DNATed",
            hook: Hook::Xdp,
            input: from_node2(41002),
            verdict: Verdict::XdpRedirect,
            output: decapsulated(41002),
            counts: &[
                ("flows_new", 1),
                ("packets_fwd", 1),
                ("dsr_decap", 1),
                ("xdp_fwd", 1),
            ],
        },
        Case {
            what: "tc: the same",
            hook: Hook::TcIngress,
            input: from_node2(41003),
            verdict: Verdict::TcRedirect,
            output: decapsulated(41003),
            counts: &[("flows_new", 1), ("packets_fwd", 1), ("dsr_decap", 1)],
        },
        Case {
            what: "tc egress: the backend's SYN-ACK leaves from the frontend the client \
                   addressed, its MSS clamped for the tunnel (1500 - 60)",
            hook: Hook::TcEgress,
            input: Frame::new(NODE_MAC, CLIENT_MAC, backend_synack(1460)),
            verdict: Verdict::TcNext,
            output: Out::Frame(Frame::new(NODE_MAC, CLIENT_MAC, client_synack)),
            counts: &[("packets_reply", 1), ("mss_clamped", 1)],
        },
        Case {
            what: "tc: an IPIP packet for no local backend goes on untouched, counted",
            hook: Hook::TcIngress,
            input: from(
                NODE2_MAC,
                ipip(
                    NODE2_IP,
                    Ipv4Addr::new(10, 244, 1, 99),
                    tcp((C, 41005), (NODE2_IP, NP_LOCAL), TCP_SYN).with_ttl(63),
                ),
            ),
            verdict: Verdict::TcNext,
            output: Out::Unchanged,
            counts: &[("dsr_miss", 1)],
        },
    ];
    run_table(&node, cases);
}

#[test]
#[ignore = "needs root"]
fn maglev_frontends_send_each_new_flow_to_the_backend_its_table_names() {
    require_root();
    let node = TestNode::start(config());
    let table = node.maglev_table(node.svc_id(NP_MAGLEV, Protocol::Tcp));
    assert_eq!(table.len(), MAGLEV_TABLE_SIZE as usize);
    let seed = node.config.maglev.flow_hash_seed();
    let mut picked = BTreeMap::new();
    for i in 0..16u16 {
        let port = 42000 + i;
        let hook = if i % 2 == 0 {
            Hook::Xdp
        } else {
            Hook::TcIngress
        };
        let frame = from(CLIENT_MAC, tcp((C, port), (N, NP_MAGLEV), TCP_SYN));
        let out = node.run(hook, &frame.build(), 1);
        assert!(
            matches!(out.verdict, Verdict::XdpRedirect | Verdict::TcRedirect),
            "port {port}: {:?}",
            out.verdict
        );
        let got = Frame::parse(&out.bytes).expect("output parses").ip.dst;
        let hash = jhash_3words(
            u32::from(C),
            (u32::from(port) << 16) | u32::from(NP_MAGLEV),
            u32::from(PROTO_TCP),
            seed,
        );
        let want = node.backend_ip(table[(hash % MAGLEV_TABLE_SIZE) as usize]);
        assert_eq!(IpAddr::V4(got), want, "{hook:?}, client port {port}");
        assert!(MAGLEV_PODS.contains(&got));
        *picked.entry(got).or_insert(0) += 1;
    }
    assert!(
        picked.len() >= 2,
        "16 flows all went to one backend: {picked:?}"
    );
}
