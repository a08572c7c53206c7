//! The links of the agent's network namespace, from one netlink
//! RTM_GETLINK dump: the one way kpr lists interfaces (`--devices`
//! resolution, the pods' devices). Names, indexes, kinds and whether a
//! link's peer lives in another namespace all come from it.

#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsFd;

use crate::datapath::sys;

/// Device kinds that have a peer device the kernel can redirect to.
const PEER_KINDS: [&str; 2] = ["veth", "netkit"];

/// One link of this namespace, as a netlink dump tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// IFLA_INFO_KIND ("veth", "netkit", "bridge", ...); none for a
    /// physical device.
    pub kind: Option<String>,
    /// IFLA_LINK_NETNSID is present: the device's link (a veth's peer)
    /// lives in another network namespace.
    pub link_in_other_netns: bool,
}

impl Link {
    /// Whether a packet may be handed through this device to its peer.
    pub fn has_foreign_peer(&self) -> bool {
        self.link_in_other_netns
            && self
                .kind
                .as_deref()
                .is_some_and(|k| PEER_KINDS.contains(&k))
    }
}

// rtnetlink, from <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h>.
const NLMSG_HDR_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// The dump was interrupted by a change: its list may be inconsistent.
const NLM_F_DUMP_INTR: u16 = 0x10;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const IFINFOMSG_LEN: usize = 16;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_INFO_KIND: u16 = 1;
/// The flag bits of an attribute's type (NLA_F_NESTED, NLA_F_NET_BYTEORDER).
const NLA_TYPE_MASK: u16 = 0x3fff;

/// The interfaces of this network namespace, name -> ifindex.
pub fn by_name() -> io::Result<BTreeMap<String, u32>> {
    Ok(list_links()?
        .into_iter()
        .map(|l| (l.name, l.index))
        .collect())
}

/// Every link of this network namespace (one RTM_GETLINK dump; again, up
/// to three times, when a change interrupted it).
pub fn list_links() -> io::Result<Vec<Link>> {
    let mut last = None;
    for _ in 0..3 {
        match dump_links() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => last = Some(e),
            other => return other,
        }
    }
    Err(last.expect("three attempts"))
}

fn dump_links() -> io::Result<Vec<Link>> {
    let sock = sys::netlink_route_socket(0, false)?;
    // A dump answers at once; the timeout only bounds a kernel that would not.
    sys::set_recv_timeout(sock.as_fd(), 2)?;
    let seq: u32 = 1;
    sys::send(sock.as_fd(), &dump_request(seq))?;
    let mut links = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    // Each datagram holds whole messages; the dump ends with NLMSG_DONE.
    // Bounded: a namespace has far fewer links than this many datagrams.
    for _ in 0..100_000 {
        let n = sys::recv(sock.as_fd(), &mut buf, 0)?;
        if parse_dump(&buf[..n], seq, &mut links)? {
            return Ok(links);
        }
    }
    Err(io::Error::other("netlink link dump did not end"))
}

/// RTM_GETLINK with NLM_F_DUMP and an empty ifinfomsg (every family).
fn dump_request(seq: u32) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + IFINFOMSG_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    m.resize(len, 0); // ifinfomsg: AF_UNSPEC, no filter
    m
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The attributes (type without flag bits, payload) packed in `b`.
fn attributes(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = u16_at(b, at)? as usize;
        let kind = u16_at(b, at + 2)? & NLA_TYPE_MASK;
        let payload = b.get(at + 4..at + len)?;
        at += align4(len.max(4));
        Some((kind, payload))
    })
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Parses one datagram of the dump answering `seq` into `links`; true
/// once the dump is done.
fn parse_dump(mut b: &[u8], seq: u32, links: &mut Vec<Link>) -> io::Result<bool> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {what}"));
    while b.len() >= NLMSG_HDR_LEN {
        let len = u32_at(b, 0).ok_or_else(|| bad("short header"))? as usize;
        if len < NLMSG_HDR_LEN || len > b.len() {
            return Err(bad("message length"));
        }
        let kind = u16_at(b, 4).ok_or_else(|| bad("short header"))?;
        let flags = u16_at(b, 6).ok_or_else(|| bad("short header"))?;
        let msg_seq = u32_at(b, 8).ok_or_else(|| bad("short header"))?;
        let payload = &b[NLMSG_HDR_LEN..len];
        b = b.get(align4(len)..).unwrap_or_default();
        if msg_seq != seq {
            continue;
        }
        if flags & NLM_F_DUMP_INTR != 0 {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "netlink link dump interrupted by a change",
            ));
        }
        match kind {
            NLMSG_DONE => {
                // The dump's own error, if it failed part way.
                let errno = u32_at(payload, 0).unwrap_or(0) as i32;
                if errno < 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                return Ok(true);
            }
            NLMSG_ERROR => {
                let errno = u32_at(payload, 0).ok_or_else(|| bad("short error"))? as i32;
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
            }
            RTM_NEWLINK if payload.len() >= IFINFOMSG_LEN => {
                links.push(parse_link(payload));
            }
            _ => {}
        }
    }
    Ok(false)
}

/// One RTM_NEWLINK payload: ifinfomsg, then attributes.
fn parse_link(payload: &[u8]) -> Link {
    let mut link = Link {
        index: u32_at(payload, 4).unwrap_or(0),
        name: String::new(),
        kind: None,
        link_in_other_netns: false,
    };
    for (kind, data) in attributes(&payload[IFINFOMSG_LEN..]) {
        match kind {
            IFLA_IFNAME => link.name = c_string(data),
            IFLA_LINK_NETNSID => link.link_in_other_netns = true,
            IFLA_LINKINFO => {
                link.kind = attributes(data)
                    .find(|(k, _)| *k == IFLA_INFO_KIND)
                    .map(|(_, d)| c_string(d));
            }
            _ => {}
        }
    }
    link
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(data);
        a.resize(align4(a.len()), 0);
        a
    }

    fn message(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDR_LEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(align4(m.len()), 0);
        m
    }

    fn newlink(index: u32, name: &str, kind: Option<&str>, netnsid: bool) -> Vec<u8> {
        let mut p = vec![0u8; IFINFOMSG_LEN];
        p[4..8].copy_from_slice(&index.to_ne_bytes());
        p.extend(attr(IFLA_IFNAME, format!("{name}\0").as_bytes()));
        if let Some(kind) = kind {
            let info = attr(IFLA_INFO_KIND, format!("{kind}\0").as_bytes());
            p.extend(attr(IFLA_LINKINFO | 0x8000, &info));
        }
        if netnsid {
            p.extend(attr(IFLA_LINK_NETNSID, &0i32.to_ne_bytes()));
        }
        p
    }

    #[test]
    fn a_dump_yields_each_link_with_its_kind_and_peer_namespace() {
        let mut d = message(RTM_NEWLINK, 7, &newlink(1, "lo", None, false));
        d.extend(message(
            RTM_NEWLINK,
            7,
            &newlink(4, "eth-p", Some("veth"), true),
        ));
        d.extend(message(
            RTM_NEWLINK,
            7,
            &newlink(5, "v-a", Some("veth"), false),
        ));
        d.extend(message(
            RTM_NEWLINK,
            7,
            &newlink(6, "nk0", Some("netkit"), true),
        ));
        d.extend(message(
            RTM_NEWLINK,
            7,
            &newlink(7, "br0", Some("bridge"), true),
        ));
        // Another request's answer is not ours.
        d.extend(message(
            RTM_NEWLINK,
            8,
            &newlink(9, "other", Some("veth"), true),
        ));
        let mut links = Vec::new();
        assert!(!parse_dump(&d, 7, &mut links).unwrap());
        assert!(parse_dump(&message(NLMSG_DONE, 7, &[0; 4]), 7, &mut links).unwrap());
        let names: Vec<_> = links.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["lo", "eth-p", "v-a", "nk0", "br0"]);
        assert_eq!(links[1].kind.as_deref(), Some("veth"));
        let peers: Vec<u32> = links
            .iter()
            .filter(|l| l.has_foreign_peer())
            .map(|l| l.index)
            .collect();
        assert_eq!(peers, [4, 6], "veth and netkit with a peer elsewhere only");
    }

    #[test]
    fn an_interrupted_dump_or_one_that_failed_part_way_is_an_error() {
        let mut intr = message(RTM_NEWLINK, 3, &newlink(2, "x", None, false));
        intr[6..8].copy_from_slice(&NLM_F_DUMP_INTR.to_ne_bytes());
        let e = parse_dump(&intr, 3, &mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
        let done = message(NLMSG_DONE, 3, &(-libc::ENOBUFS).to_ne_bytes());
        let e = parse_dump(&done, 3, &mut Vec::new()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOBUFS));
    }

    #[test]
    fn a_netlink_error_or_a_bad_length_is_an_error() {
        let err = message(NLMSG_ERROR, 1, &(-libc::EPERM).to_ne_bytes());
        let e = parse_dump(&err, 1, &mut Vec::new()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        let mut short = message(RTM_NEWLINK, 1, &newlink(2, "x", None, false));
        short[0] = 200; // longer than the datagram
        assert!(parse_dump(&short, 1, &mut Vec::new()).is_err());
    }

    #[test]
    fn this_namespace_lists_its_loopback_device() {
        let links = list_links().unwrap();
        let lo = links.iter().find(|l| l.name == "lo").expect("lo");
        assert_eq!(lo.index, 1);
        assert!(!lo.has_foreign_peer());
    }
}
