//! Ethernet/IPv4 frames for packet tests, as values: a [`Frame`] builds the
//! bytes a program is fed (checksums computed) and parses the bytes it
//! hands back (checksums verified), so a test compares what came out with
//! what it expected field by field, Katran-style.
//!
//! Only what the north-south datapath handles: IPv4 without options; TCP
//! (with options), UDP, ICMP errors (the quoted header and ports), IPIP,
//! and fragments (a later fragment's bytes are opaque).

#![allow(dead_code)] // each test crate uses its own part

use std::net::Ipv4Addr;

pub const ETH_P_IP: u16 = 0x0800;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A MAC address.
pub type Mac = [u8; 6];

/// An Ethernet frame carrying IPv4.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub dst_mac: Mac,
    pub src_mac: Mac,
    pub ip: Ipv4,
}

/// An IPv4 packet without options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub tos: u8,
    pub id: u16,
    pub df: bool,
    /// More fragments follow.
    pub mf: bool,
    /// Fragment offset in 8-byte units.
    pub frag_offset: u16,
    pub ttl: u8,
    pub payload: L4,
}

/// What an IPv4 packet carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp(Tcp),
    Udp(Udp),
    Icmp(Icmp),
    /// IP in IP: the inner packet.
    Ipip(Box<Ipv4>),
    /// Bytes of protocol `proto` (a later fragment's payload, or the part
    /// of a datagram a first fragment holds: its L4 header comes first).
    Raw {
        proto: u8,
        bytes: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// TCP options, padded to 4 bytes by the builder.
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Udp {
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
}

/// An ICMP message: type, code, the 4 bytes after the checksum (the MTU of
/// a fragmentation-needed), and the quoted packet's start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Icmp {
    pub icmp_type: u8,
    pub code: u8,
    pub rest: [u8; 4],
    pub quote: Vec<u8>,
}

/// The fields of a quoted packet (an ICMP error's payload) that tell which
/// flow it is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quote {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

impl Frame {
    pub fn new(src_mac: Mac, dst_mac: Mac, ip: Ipv4) -> Frame {
        Frame {
            dst_mac,
            src_mac,
            ip,
        }
    }

    /// The frame's bytes, every checksum computed.
    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        out.extend_from_slice(&ETH_P_IP.to_be_bytes());
        out.extend_from_slice(&self.ip.build());
        out
    }

    /// Parses an Ethernet frame; every checksum must hold.
    pub fn parse(bytes: &[u8]) -> Result<Frame, String> {
        if bytes.len() < 14 {
            return Err(format!("{} bytes: no Ethernet header", bytes.len()));
        }
        let ethertype = u16::from_be_bytes([bytes[12], bytes[13]]);
        if ethertype != ETH_P_IP {
            return Err(format!("ethertype {ethertype:#06x} is not IPv4"));
        }
        Ok(Frame {
            dst_mac: bytes[0..6].try_into().unwrap(),
            src_mac: bytes[6..12].try_into().unwrap(),
            ip: Ipv4::parse(&bytes[14..])?,
        })
    }
}

impl Ipv4 {
    /// A packet with TTL 64, DF set, id 1, TOS 0.
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, payload: L4) -> Ipv4 {
        Ipv4 {
            src,
            dst,
            tos: 0,
            id: 1,
            df: true,
            mf: false,
            frag_offset: 0,
            ttl: 64,
            payload,
        }
    }

    pub fn proto(&self) -> u8 {
        match &self.payload {
            L4::Tcp(_) => PROTO_TCP,
            L4::Udp(_) => PROTO_UDP,
            L4::Icmp(_) => PROTO_ICMP,
            L4::Ipip(_) => PROTO_IPIP,
            L4::Raw { proto, .. } => *proto,
        }
    }

    fn l4_bytes(&self) -> Vec<u8> {
        match &self.payload {
            L4::Tcp(t) => t.build(self.src, self.dst),
            L4::Udp(u) => u.build(self.src, self.dst),
            L4::Icmp(i) => i.build(),
            L4::Ipip(inner) => inner.build(),
            L4::Raw { bytes, .. } => bytes.clone(),
        }
    }

    /// The packet's bytes, every checksum computed.
    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let mut h = self.header(20 + l4.len());
        h.extend_from_slice(&l4);
        h
    }

    fn header(&self, total_len: usize) -> Vec<u8> {
        let flags = (u16::from(self.df) << 14) | (u16::from(self.mf) << 13) | self.frag_offset;
        let mut h = Vec::with_capacity(total_len);
        h.extend_from_slice(&[0x45, self.tos]);
        h.extend_from_slice(&(total_len as u16).to_be_bytes());
        h.extend_from_slice(&self.id.to_be_bytes());
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&[self.ttl, self.proto(), 0, 0]);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        let c = checksum(&[&h]);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    /// The two fragments of this datagram, the first holding `first_len`
    /// bytes of its L4 data (a multiple of 8), same id, DF cleared.
    pub fn fragments(&self, first_len: usize) -> [Ipv4; 2] {
        assert!(
            first_len.is_multiple_of(8),
            "fragment data comes in 8-byte units"
        );
        let l4 = self.l4_bytes();
        let proto = self.proto();
        let first = Ipv4 {
            df: false,
            mf: true,
            payload: L4::Raw {
                proto,
                bytes: l4[..first_len].to_vec(),
            },
            ..self.clone()
        };
        let later = Ipv4 {
            df: false,
            mf: false,
            frag_offset: (first_len / 8) as u16,
            payload: L4::Raw {
                proto,
                bytes: l4[first_len..].to_vec(),
            },
            ..self.clone()
        };
        [first, later]
    }

    /// Parses an IPv4 packet; its header checksum must hold, and so must
    /// its L4 checksum unless it is a fragment.
    pub fn parse(bytes: &[u8]) -> Result<Ipv4, String> {
        if bytes.len() < 20 || bytes[0] != 0x45 {
            return Err(format!("not an IPv4 header without options: {bytes:02x?}"));
        }
        let total = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
        if total < 20 || total > bytes.len() {
            return Err(format!(
                "IPv4 total length {total} of {} bytes",
                bytes.len()
            ));
        }
        if checksum(&[&bytes[..20]]) != 0 {
            return Err(format!("bad IPv4 header checksum: {:02x?}", &bytes[..20]));
        }
        let flags = u16::from_be_bytes([bytes[6], bytes[7]]);
        let src = Ipv4Addr::from(<[u8; 4]>::try_from(&bytes[12..16]).unwrap());
        let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&bytes[16..20]).unwrap());
        let (mf, frag_offset) = (flags & 0x2000 != 0, flags & 0x1fff);
        let data = &bytes[20..total];
        let proto = bytes[9];
        let payload = if mf || frag_offset != 0 {
            L4::Raw {
                proto,
                bytes: data.to_vec(),
            }
        } else {
            match proto {
                PROTO_TCP => L4::Tcp(Tcp::parse(data, src, dst)?),
                PROTO_UDP => L4::Udp(Udp::parse(data, src, dst)?),
                PROTO_ICMP => L4::Icmp(Icmp::parse(data)?),
                PROTO_IPIP => L4::Ipip(Box::new(Ipv4::parse(data)?)),
                _ => L4::Raw {
                    proto,
                    bytes: data.to_vec(),
                },
            }
        };
        Ok(Ipv4 {
            src,
            dst,
            tos: bytes[1],
            id: u16::from_be_bytes([bytes[4], bytes[5]]),
            df: flags & 0x4000 != 0,
            mf,
            frag_offset,
            ttl: bytes[8],
            payload,
        })
    }

    /// The TCP segment, or a panic saying what the packet is instead.
    #[track_caller]
    pub fn tcp(&self) -> &Tcp {
        match &self.payload {
            L4::Tcp(t) => t,
            other => panic!("expected TCP, got {other:?}"),
        }
    }

    /// (source port, destination port) of a TCP or UDP packet.
    #[track_caller]
    pub fn ports(&self) -> (u16, u16) {
        match &self.payload {
            L4::Tcp(t) => (t.sport, t.dport),
            L4::Udp(u) => (u.sport, u.dport),
            other => panic!("expected TCP or UDP, got {other:?}"),
        }
    }

    /// Sets the ports of a TCP or UDP packet.
    pub fn with_ports(mut self, sport: u16, dport: u16) -> Ipv4 {
        match &mut self.payload {
            L4::Tcp(t) => (t.sport, t.dport) = (sport, dport),
            L4::Udp(u) => (u.sport, u.dport) = (sport, dport),
            other => panic!("no ports in {other:?}"),
        }
        self
    }

    pub fn with_addrs(mut self, src: Ipv4Addr, dst: Ipv4Addr) -> Ipv4 {
        (self.src, self.dst) = (src, dst);
        self
    }

    pub fn with_ttl(mut self, ttl: u8) -> Ipv4 {
        self.ttl = ttl;
        self
    }
}

impl Tcp {
    /// A segment with `flags`, seq 1000, no options, no payload.
    pub fn new(sport: u16, dport: u16, flags: u8) -> Tcp {
        Tcp {
            sport,
            dport,
            seq: 1000,
            ack: if flags & TCP_ACK != 0 { 2000 } else { 0 },
            flags,
            options: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// The MSS option's value, if the segment has one first.
    pub fn mss(&self) -> Option<u16> {
        match self.options.as_slice() {
            [2, 4, a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
            _ => None,
        }
    }

    fn build(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut options = self.options.clone();
        while !options.len().is_multiple_of(4) {
            options.push(0);
        }
        let hlen = 20 + options.len();
        let mut s = Vec::with_capacity(hlen + self.payload.len());
        s.extend_from_slice(&self.sport.to_be_bytes());
        s.extend_from_slice(&self.dport.to_be_bytes());
        s.extend_from_slice(&self.seq.to_be_bytes());
        s.extend_from_slice(&self.ack.to_be_bytes());
        s.extend_from_slice(&[((hlen / 4) as u8) << 4, self.flags]);
        s.extend_from_slice(&64240u16.to_be_bytes());
        s.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        s.extend_from_slice(&options);
        s.extend_from_slice(&self.payload);
        let c = checksum(&[&pseudo_header(src, dst, PROTO_TCP, s.len()), &s]);
        s[16..18].copy_from_slice(&c.to_be_bytes());
        s
    }

    fn parse(data: &[u8], src: Ipv4Addr, dst: Ipv4Addr) -> Result<Tcp, String> {
        if data.len() < 20 {
            return Err(format!("TCP segment of {} bytes", data.len()));
        }
        let hlen = usize::from(data[12] >> 4) * 4;
        if hlen < 20 || hlen > data.len() {
            return Err(format!("TCP header length {hlen}"));
        }
        if checksum(&[&pseudo_header(src, dst, PROTO_TCP, data.len()), data]) != 0 {
            return Err(format!("bad TCP checksum: {data:02x?}"));
        }
        Ok(Tcp {
            sport: u16::from_be_bytes([data[0], data[1]]),
            dport: u16::from_be_bytes([data[2], data[3]]),
            seq: u32::from_be_bytes(data[4..8].try_into().unwrap()),
            ack: u32::from_be_bytes(data[8..12].try_into().unwrap()),
            flags: data[13],
            options: data[20..hlen].to_vec(),
            payload: data[hlen..].to_vec(),
        })
    }
}

impl Udp {
    pub fn new(sport: u16, dport: u16, payload: &[u8]) -> Udp {
        Udp {
            sport,
            dport,
            payload: payload.to_vec(),
        }
    }

    fn build(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let len = 8 + self.payload.len();
        let mut d = Vec::with_capacity(len);
        d.extend_from_slice(&self.sport.to_be_bytes());
        d.extend_from_slice(&self.dport.to_be_bytes());
        d.extend_from_slice(&(len as u16).to_be_bytes());
        d.extend_from_slice(&[0, 0]);
        d.extend_from_slice(&self.payload);
        let c = match checksum(&[&pseudo_header(src, dst, PROTO_UDP, len), &d]) {
            0 => 0xffff,
            c => c,
        };
        d[6..8].copy_from_slice(&c.to_be_bytes());
        d
    }

    fn parse(data: &[u8], src: Ipv4Addr, dst: Ipv4Addr) -> Result<Udp, String> {
        if data.len() < 8 {
            return Err(format!("UDP datagram of {} bytes", data.len()));
        }
        let len = usize::from(u16::from_be_bytes([data[4], data[5]]));
        if len != data.len() {
            return Err(format!("UDP length {len} of {} bytes", data.len()));
        }
        let sum = u16::from_be_bytes([data[6], data[7]]);
        if sum != 0 && checksum(&[&pseudo_header(src, dst, PROTO_UDP, len), data]) != 0 {
            return Err(format!("bad UDP checksum: {data:02x?}"));
        }
        Ok(Udp {
            sport: u16::from_be_bytes([data[0], data[1]]),
            dport: u16::from_be_bytes([data[2], data[3]]),
            payload: data[8..].to_vec(),
        })
    }
}

impl Icmp {
    /// An error of `icmp_type`/`code` quoting `about`'s IP header and the
    /// first 8 bytes of its payload (RFC 792).
    pub fn error(icmp_type: u8, code: u8, rest: [u8; 4], about: &Ipv4) -> Icmp {
        let bytes = about.build();
        Icmp {
            icmp_type,
            code,
            rest,
            quote: bytes[..28.min(bytes.len())].to_vec(),
        }
    }

    /// The quoted packet's addresses and ports; its header checksum must
    /// hold.
    #[track_caller]
    pub fn quoted(&self) -> Quote {
        let q = &self.quote;
        assert!(q.len() >= 28, "quote of {} bytes", q.len());
        assert_eq!(
            checksum(&[&q[..20]]),
            0,
            "bad quoted header checksum: {q:02x?}"
        );
        Quote {
            src: Ipv4Addr::from(<[u8; 4]>::try_from(&q[12..16]).unwrap()),
            dst: Ipv4Addr::from(<[u8; 4]>::try_from(&q[16..20]).unwrap()),
            proto: q[9],
            sport: u16::from_be_bytes([q[20], q[21]]),
            dport: u16::from_be_bytes([q[22], q[23]]),
        }
    }

    fn build(&self) -> Vec<u8> {
        let mut m = vec![self.icmp_type, self.code, 0, 0];
        m.extend_from_slice(&self.rest);
        m.extend_from_slice(&self.quote);
        let c = checksum(&[&m]);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        m
    }

    fn parse(data: &[u8]) -> Result<Icmp, String> {
        if data.len() < 8 {
            return Err(format!("ICMP message of {} bytes", data.len()));
        }
        if checksum(&[data]) != 0 {
            return Err(format!("bad ICMP checksum: {data:02x?}"));
        }
        Ok(Icmp {
            icmp_type: data[0],
            code: data[1],
            rest: data[4..8].try_into().unwrap(),
            quote: data[8..].to_vec(),
        })
    }
}

fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

/// The Internet checksum (RFC 1071) over `parts` in a row (each but the
/// last of even length): the value of a checksum field when the field
/// holds 0, and 0 when verifying bytes whose field is filled in.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for pair in part.chunks(2) {
            let word = match pair {
                [a, b] => u16::from_be_bytes([*a, *b]),
                [a] => u16::from_be_bytes([*a, 0]),
                _ => 0,
            };
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
