//! The north-south tc and XDP programs on IPv6 packets, through
//! BPF_PROG_TEST_RUN, as tests/bpf_prog.rs does for IPv4: crafted frames
//! in, verdict, frame out (every checksum checked) and counters. The node
//! (`support/packet_node.rs`) has an IPv6 NodePort address on ext0 and the
//! IPv6-only Services `remote6` (a pod behind node2) and `local6` (a pod
//! behind pod0).
//!
//! Root only (`#[ignore = "needs root"]`).

#[path = "support/packet_node.rs"]
mod packet_node;

use kpr::maglev::jhash_3words;
use std::collections::BTreeMap;
use std::net::Ipv6Addr;

use kpr::datapath::nodeport::DEFAULT_SNAT_PORTS;
use kpr::model::Protocol;
use packet_node::*;
use std::net::IpAddr;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// An IPv6 frame with a TCP or UDP (or opaque ICMPv6) payload.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Frame6 {
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop_limit: u8,
    proto: u8,
    sport: u16,
    dport: u16,
    /// TCP flags; 0 for UDP.
    flags: u8,
    /// UDP payload, or the ICMPv6 message after its checksum.
    payload: Vec<u8>,
}

fn tcp6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), flags: u8) -> Frame6 {
    Frame6 {
        dst_mac: NODE_MAC,
        src_mac: CLIENT_MAC,
        src: src.0,
        dst: dst.0,
        hop_limit: 64,
        proto: PROTO_TCP,
        sport: src.1,
        dport: dst.1,
        flags,
        payload: Vec::new(),
    }
}

fn udp6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), payload: &[u8]) -> Frame6 {
    Frame6 {
        proto: PROTO_UDP,
        flags: 0,
        payload: payload.to_vec(),
        ..tcp6(src, dst, 0)
    }
}

impl Frame6 {
    fn macs(self, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Frame6 {
        Frame6 {
            src_mac,
            dst_mac,
            ..self
        }
    }

    fn hop(self, hop_limit: u8) -> Frame6 {
        Frame6 { hop_limit, ..self }
    }

    /// The L4 segment with its checksum filled in.
    fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        match self.proto {
            PROTO_TCP => {
                l4.extend(self.sport.to_be_bytes());
                l4.extend(self.dport.to_be_bytes());
                l4.extend(1u32.to_be_bytes()); // seq
                l4.extend(0u32.to_be_bytes()); // ack
                l4.extend([0x50, self.flags]);
                l4.extend(65535u16.to_be_bytes()); // window
                l4.extend([0, 0, 0, 0]); // checksum, urgent
            }
            PROTO_UDP => {
                l4.extend(self.sport.to_be_bytes());
                l4.extend(self.dport.to_be_bytes());
                let len = u16::try_from(8 + self.payload.len()).unwrap();
                l4.extend(len.to_be_bytes());
                l4.extend([0, 0]);
                l4.extend(&self.payload);
            }
            _ => {
                l4.extend([self.payload[0], self.payload[1], 0, 0]);
                l4.extend(&self.payload[2..]);
            }
        }
        let at = match self.proto {
            PROTO_TCP => 16,
            PROTO_UDP => 6,
            _ => 2,
        };
        let mut sum = checksum(self.src, self.dst, self.proto, &l4);
        if self.proto == PROTO_UDP && sum == 0 {
            sum = 0xffff;
        }
        l4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        l4
    }

    fn build(&self) -> Vec<u8> {
        let l4 = self.l4();
        let mut f = Vec::new();
        f.extend(self.dst_mac);
        f.extend(self.src_mac);
        f.extend(0x86ddu16.to_be_bytes());
        f.extend([0x60, 0, 0, 0]);
        f.extend(u16::try_from(l4.len()).unwrap().to_be_bytes());
        f.extend([self.proto, self.hop_limit]);
        f.extend(self.src.octets());
        f.extend(self.dst.octets());
        f.extend(l4);
        f
    }

    /// Parses a frame [`Frame6::build`] could have made; its L4 checksum
    /// must hold.
    fn parse(b: &[u8]) -> Result<Frame6, String> {
        if b.len() < 54 || b[12..14] != [0x86, 0xdd] {
            return Err(format!("not an IPv6 frame: {b:02x?}"));
        }
        let addr = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&b[at..at + 16]).unwrap());
        let plen = usize::from(u16::from_be_bytes([b[18], b[19]]));
        let l4 = b.get(54..54 + plen).ok_or("short payload")?;
        let (src, dst, proto) = (addr(22), addr(38), b[20]);
        if checksum(src, dst, proto, l4) != 0 {
            return Err(format!("bad L4 checksum: {b:02x?}"));
        }
        let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
        let (sport, dport, flags, payload) = match proto {
            PROTO_TCP => (port(0), port(2), l4[13], Vec::new()),
            PROTO_UDP => (port(0), port(2), 0, l4[8..].to_vec()),
            _ => (0, 0, 0, [&l4[..2], &l4[4..]].concat()),
        };
        Ok(Frame6 {
            dst_mac: b[0..6].try_into().unwrap(),
            src_mac: b[6..12].try_into().unwrap(),
            src,
            dst,
            hop_limit: b[21],
            proto,
            sport,
            dport,
            flags,
            payload,
        })
    }
}

/// The Internet checksum of `l4` with the IPv6 pseudo-header (0 over a
/// segment whose checksum field holds).
fn checksum(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4: &[u8]) -> u16 {
    let mut words = Vec::new();
    words.extend(src.octets());
    words.extend(dst.octets());
    words.extend(u32::try_from(l4.len()).unwrap().to_be_bytes());
    words.extend([0, 0, 0, proto]);
    words.extend(l4);
    if words.len() % 2 == 1 {
        words.push(0);
    }
    let mut sum: u32 = words
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(u16::try_from(sum).unwrap())
}

/// Runs `frame` through `hook` and checks the verdict; the frame out.
#[track_caller]
fn run(node: &TestNode, hook: Hook, frame: &Frame6, verdict: Verdict, what: &str) -> Vec<u8> {
    let out = node.run(hook, &frame.build(), 1);
    assert_eq!(
        out.verdict, verdict,
        "{what}: verdict (out {:02x?})",
        out.bytes
    );
    out.bytes
}

/// What moved in the counters between `before` and now.
fn moved(node: &TestNode, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    node.counters()
        .into_iter()
        .filter(|(k, v)| before.get(k) != Some(v))
        .map(|(k, v)| {
            let d = v - before.get(&k).copied().unwrap_or(0);
            (k, d)
        })
        .collect()
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

const C6: Ipv6Addr = CLIENT_IP6;
const N6: Ipv6Addr = NODE_IP6;

#[test]
fn the_ipv6_frame_builder_s_frames_parse_back_and_a_broken_checksum_is_caught() {
    for f in [
        tcp6((C6, 40000), (N6, NP6_REMOTE_TCP), TCP_SYN),
        udp6((C6, 40000), (N6, NP6_REMOTE_UDP), b"hello"),
    ] {
        assert_eq!(Frame6::parse(&f.build()), Ok(f));
    }
    let mut broken = tcp6((C6, 40000), (N6, 80), TCP_SYN).build();
    broken[14 + 8] ^= 1; // a source address byte, the checksum left as it was
    assert!(Frame6::parse(&broken).is_err());
}

#[test]
#[ignore = "needs root"]
fn ipv6_nodeport_flows_are_snated_to_remote_backends_kept_for_local_ones_and_translated_back() {
    require_root();
    let node = TestNode::start(config());
    let snat = DEFAULT_SNAT_PORTS;

    // tc: a new TCP flow to the IPv6 NodePort goes to node2's pod, DNATed
    // and SNATed to the node's IPv6 address and a port of the range.
    let before = node.counters();
    let syn = tcp6((C6, 40000), (N6, NP6_REMOTE_TCP), TCP_SYN);
    let out = run(&node, Hook::TcIngress, &syn, Verdict::TcRedirect, "tc SYN");
    let out = Frame6::parse(&out).unwrap();
    let port = out.sport;
    assert!((snat.min..=snat.max).contains(&port), "SNAT port {port}");
    let toward = |flags| {
        tcp6((N6, port), (REMOTE_POD6, POD_TCP), flags)
            .macs(NODE_MAC, NODE2_MAC)
            .hop(63)
    };
    assert_eq!(out, toward(TCP_SYN));
    assert_eq!(
        moved(&node, &before),
        counts(&[("flows_new", 1), ("flows_snat", 1), ("packets_fwd", 1)])
    );

    // XDP: the flow's next packet, same backend and port.
    let before = node.counters();
    let ack = tcp6((C6, 40000), (N6, NP6_REMOTE_TCP), TCP_ACK);
    let out = run(&node, Hook::Xdp, &ack, Verdict::XdpRedirect, "XDP ACK");
    assert_eq!(Frame6::parse(&out).unwrap(), toward(TCP_ACK));
    assert_eq!(
        moved(&node, &before),
        counts(&[("packets_fwd", 1), ("xdp_fwd", 1)])
    );

    // The backend's reply, on XDP and on tc: back to the client from the
    // frontend.
    let reply = tcp6((REMOTE_POD6, POD_TCP), (N6, port), TCP_SYN | TCP_ACK)
        .macs(NODE2_MAC, NODE_MAC)
        .hop(63);
    let back = tcp6((N6, NP6_REMOTE_TCP), (C6, 40000), TCP_SYN | TCP_ACK)
        .macs(NODE_MAC, CLIENT_MAC)
        .hop(62);
    for (hook, verdict, extra) in [
        (Hook::Xdp, Verdict::XdpRedirect, Some(("xdp_fwd", 1))),
        (Hook::TcIngress, Verdict::TcRedirect, None),
    ] {
        let before = node.counters();
        let out = run(&node, hook, &reply, verdict, "reply");
        assert_eq!(Frame6::parse(&out).unwrap(), back, "{hook:?}");
        let mut want = vec![("packets_reply", 1)];
        want.extend(extra);
        assert_eq!(moved(&node, &before), counts(&want), "{hook:?}");
    }

    // Packet Too Big about the flow, from either side: translated and sent
    // where the flow goes, about the packet its receiver sent (the ICMPv6
    // checksum, which covers addresses and quote, must hold).
    let quote = |f: Frame6| f.build()[14..14 + 48].to_vec();
    let too_big = |src: Ipv6Addr, dst: Ipv6Addr, quoted: Frame6| Frame6 {
        proto: PROTO_ICMPV6,
        payload: [&[2u8, 0][..], &1280u32.to_be_bytes(), &quote(quoted)].concat(),
        ..tcp6((src, 0), (dst, 0), 0)
    };
    let cases = [
        (
            "from the backend's side, to the client",
            too_big(
                NODE2_IP6,
                N6,
                tcp6((N6, port), (REMOTE_POD6, POD_TCP), TCP_ACK).hop(63),
            )
            .macs(NODE2_MAC, NODE_MAC),
            too_big(
                N6,
                C6,
                tcp6((C6, 40000), (N6, NP6_REMOTE_TCP), TCP_ACK).hop(63),
            )
            .macs(NODE_MAC, CLIENT_MAC)
            .hop(63),
        ),
        (
            "from the client's side, to the backend",
            too_big(
                C6,
                N6,
                tcp6((N6, NP6_REMOTE_TCP), (C6, 40000), TCP_ACK).hop(62),
            )
            .macs(CLIENT_MAC, NODE_MAC),
            too_big(
                N6,
                REMOTE_POD6,
                tcp6((REMOTE_POD6, POD_TCP), (N6, port), TCP_ACK).hop(62),
            )
            .macs(NODE_MAC, NODE2_MAC)
            .hop(63),
        ),
    ];
    for (what, input, expected) in cases {
        let before = node.counters();
        let out = run(&node, Hook::TcIngress, &input, Verdict::TcRedirect, what);
        assert_eq!(Frame6::parse(&out), Ok(expected), "{what}");
        assert_eq!(
            moved(&node, &before),
            counts(&[("icmp_errors", 1)]),
            "{what}"
        );
        // XDP leaves ICMPv6 to tc.
        let out = run(&node, Hook::Xdp, &input, Verdict::XdpPass, what);
        assert_eq!(out, input.build(), "{what}");
    }

    // The flow is an IPv6 pair in conntrack.
    let entries = node.ct().entries().unwrap();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert!(
        entries.iter().all(|e| e.snat && e.src.is_ipv6()),
        "{entries:?}"
    );

    // UDP likewise (XDP first).
    let before = node.counters();
    let q = udp6((C6, 40001), (N6, NP6_REMOTE_UDP), b"query");
    let out = Frame6::parse(&run(&node, Hook::Xdp, &q, Verdict::XdpRedirect, "UDP")).unwrap();
    assert_eq!(
        out,
        udp6((N6, out.sport), (REMOTE_POD6, POD_UDP), b"query")
            .macs(NODE_MAC, NODE2_MAC)
            .hop(63)
    );
    assert_eq!(
        moved(&node, &before),
        counts(&[
            ("flows_new", 1),
            ("flows_snat", 1),
            ("packets_fwd", 1),
            ("xdp_fwd", 1)
        ])
    );

    // A local backend sees the client; its reply gets the frontend as
    // source at egress.
    let before = node.counters();
    let syn = tcp6((C6, 40002), (N6, NP6_LOCAL), TCP_SYN);
    let out = run(
        &node,
        Hook::TcIngress,
        &syn,
        Verdict::TcRedirect,
        "local SYN",
    );
    assert_eq!(
        Frame6::parse(&out).unwrap(),
        tcp6((C6, 40002), (LOCAL_POD6, POD_TCP), TCP_SYN)
            .macs(POD_DEV_MAC, LOCAL_POD_MAC)
            .hop(63)
    );
    assert_eq!(
        moved(&node, &before),
        counts(&[("flows_new", 1), ("packets_fwd", 1)])
    );
    let before = node.counters();
    let synack = tcp6((LOCAL_POD6, POD_TCP), (C6, 40002), TCP_SYN | TCP_ACK)
        .macs(NODE_MAC, CLIENT_MAC)
        .hop(63);
    let out = run(
        &node,
        Hook::TcEgress,
        &synack,
        Verdict::TcNext,
        "local reply",
    );
    assert_eq!(
        Frame6::parse(&out).unwrap(),
        tcp6((N6, NP6_LOCAL), (C6, 40002), TCP_SYN | TCP_ACK)
            .macs(NODE_MAC, CLIENT_MAC)
            .hop(63)
    );
    assert_eq!(moved(&node, &before), counts(&[("packets_reply", 1)]));

    // loadBalancerSourceRanges over IPv6: the client's /128 opens a flow
    // to the load balancer address, another address of its link is
    // dropped, counted, on both hooks.
    let before = node.counters();
    let allowed = tcp6((C6, 40004), (GUARDED_LB_IP6, 80), TCP_SYN);
    let out = run(&node, Hook::Xdp, &allowed, Verdict::XdpRedirect, "in range");
    let out = Frame6::parse(&out).unwrap();
    assert_eq!((out.dst, out.dport, out.src), (GUARDED_POD6, POD_TCP, N6));
    let outsider: Ipv6Addr = "fd00:0:c::a".parse().unwrap();
    let refused = tcp6((outsider, 40005), (GUARDED_LB_IP6, 80), TCP_SYN);
    run(
        &node,
        Hook::Xdp,
        &refused,
        Verdict::XdpDrop,
        "outside the range",
    );
    run(
        &node,
        Hook::TcIngress,
        &refused,
        Verdict::TcShot,
        "outside the range",
    );
    assert_eq!(
        moved(&node, &before),
        counts(&[
            ("flows_new", 1),
            ("flows_snat", 1),
            ("packets_fwd", 1),
            ("xdp_fwd", 1),
            ("drop_source_range", 2)
        ])
    );

    // Not ours: another port of the node, and neighbour discovery, go on
    // untouched on both hooks.
    let other = tcp6((C6, 40003), (N6, 22), TCP_SYN);
    let ns = Frame6 {
        proto: PROTO_ICMPV6,
        hop_limit: 255,
        payload: [&[135u8, 0][..], &[0; 4], &N6.octets()].concat(),
        ..tcp6((C6, 0), (N6, 0), 0)
    };
    for f in [other, ns] {
        let before = node.counters();
        for (hook, verdict) in [
            (Hook::Xdp, Verdict::XdpPass),
            (Hook::TcIngress, Verdict::TcNext),
            (Hook::TcEgress, Verdict::TcNext),
        ] {
            let out = run(&node, hook, &f, verdict, "not ours");
            assert_eq!(out, f.build(), "{hook:?}: unchanged");
        }
        assert!(moved(&node, &before).is_empty());
    }
}

/// lb_flow_hash6 of lb_nodeport6.h: the IPv6 flow hash, a function of the
/// packet and the seed only, so every node picks the same backend.
fn flow_hash6(src: Ipv6Addr, sport: u16, dport: u16, proto: u8, seed: u32) -> u32 {
    let w: Vec<u32> = src
        .octets()
        .chunks(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let h = jhash_3words(w[0], w[1], w[2], seed);
    jhash_3words(
        h ^ w[3],
        (u32::from(sport) << 16) | u32::from(dport),
        u32::from(proto),
        seed,
    )
}

#[test]
#[ignore = "needs root"]
fn ipv6_maglev_frontends_send_each_new_flow_to_the_backend_its_table_names() {
    require_root();
    let node = TestNode::start(config());
    let svc = node.svc_id_at(IpAddr::V6(N6), NP6_MAGLEV, Protocol::Tcp);
    let table = node.maglev_table(svc);
    let seed = node.config.maglev.flow_hash_seed();
    let mut picked = BTreeMap::new();
    for i in 0..16u16 {
        let port = 42000 + i;
        let (hook, verdict) = if i % 2 == 0 {
            (Hook::Xdp, Verdict::XdpRedirect)
        } else {
            (Hook::TcIngress, Verdict::TcRedirect)
        };
        let syn = tcp6((C6, port), (N6, NP6_MAGLEV), TCP_SYN);
        let got = Frame6::parse(&run(&node, hook, &syn, verdict, "maglev"))
            .unwrap()
            .dst;
        let hash = flow_hash6(C6, port, NP6_MAGLEV, PROTO_TCP, seed);
        let want = node.backend_ip(table[(hash % MAGLEV_TABLE_SIZE) as usize]);
        assert_eq!(IpAddr::V6(got), want, "{hook:?}, client port {port}");
        assert!(MAGLEV_PODS6.contains(&got));
        *picked.entry(got).or_insert(0) += 1;
    }
    assert!(
        picked.len() >= 2,
        "16 flows all went to one backend: {picked:?}"
    );
}
