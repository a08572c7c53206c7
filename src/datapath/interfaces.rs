//! The links of the agent's network namespace, from one netlink
//! RTM_GETLINK dump: the one way kpr lists interfaces (`--devices`
//! resolution, device detection, the pods' devices). Names, indexes,
//! kinds, flags, masters and whether a link's peer lives in another
//! namespace all come from it. The dump itself ([`dump`]) also serves
//! the route listing (`datapath::routes`).

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
    /// ifi_flags: IFF_UP, IFF_LOOPBACK, IFF_SLAVE, ...
    pub flags: u32,
    /// IFLA_MASTER: the bridge, bond or VRF this link is enslaved to.
    pub master: Option<u32>,
}

impl Link {
    /// Administratively up (IFF_UP).
    pub fn is_up(&self) -> bool {
        self.flags & libc::IFF_UP as u32 != 0
    }

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
const IFLA_MASTER: u16 = 10;
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

/// Every link of this network namespace (one RTM_GETLINK dump).
pub fn list_links() -> io::Result<Vec<Link>> {
    Ok(dump(RTM_GETLINK, IFINFOMSG_LEN, RTM_NEWLINK)?
        .iter()
        .map(|m| parse_link(m))
        .collect())
}

/// The payloads of the `reply` messages of one netlink dump of `request`
/// (AF_UNSPEC, its `header_len`-byte family header zeroed: no filter);
/// again, up to three times, when a change interrupted it.
pub(crate) fn dump(request: u16, header_len: usize, reply: u16) -> io::Result<Vec<Vec<u8>>> {
    let mut last = None;
    for _ in 0..3 {
        match dump_once(request, header_len, reply) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => last = Some(e),
            other => return other,
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("netlink dump interrupted")))
}

fn dump_once(request: u16, header_len: usize, reply: u16) -> io::Result<Vec<Vec<u8>>> {
    let sock = sys::netlink_route_socket(0, false)?;
    // A dump answers at once; the timeout only bounds a kernel that would not.
    sys::set_recv_timeout(sock.as_fd(), 2)?;
    let seq: u32 = 1;
    sys::send(sock.as_fd(), &dump_request(request, header_len, seq))?;
    let mut messages = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    // Each datagram holds whole messages; the dump ends with NLMSG_DONE.
    // Bounded: far more datagrams than a namespace's links or routes fill.
    for _ in 0..100_000 {
        let n = sys::recv(sock.as_fd(), &mut buf, 0)?;
        if parse_dump(&buf[..n], seq, (reply, header_len), &mut messages)? {
            return Ok(messages);
        }
    }
    Err(io::Error::other("netlink dump did not end"))
}

/// `request` with NLM_F_DUMP and an empty family header (AF_UNSPEC).
fn dump_request(request: u16, header_len: usize, seq: u32) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + header_len;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&request.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    m.resize(len, 0); // family header: AF_UNSPEC, no filter
    m
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The attributes (type without flag bits, payload) packed in `b`.
pub(crate) fn attributes(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
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

/// Parses one datagram of the dump answering `seq`: the payloads of its
/// `reply.0` messages at least `reply.1` bytes long go to `out`; true once
/// the dump is done.
fn parse_dump(
    mut b: &[u8],
    seq: u32,
    reply: (u16, usize),
    out: &mut Vec<Vec<u8>>,
) -> io::Result<bool> {
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
                "netlink dump interrupted by a change",
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
            k if k == reply.0 && payload.len() >= reply.1 => out.push(payload.to_vec()),
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
        flags: u32_at(payload, 8).unwrap_or(0),
        master: None,
    };
    for (kind, data) in attributes(&payload[IFINFOMSG_LEN..]) {
        match kind {
            IFLA_IFNAME => link.name = c_string(data),
            IFLA_LINK_NETNSID => link.link_in_other_netns = true,
            IFLA_MASTER => link.master = u32_at(data, 0).filter(|&m| m != 0),
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

    const LINKS: (u16, usize) = (RTM_NEWLINK, IFINFOMSG_LEN);

    /// [`parse_dump`] of a link dump, parsed into `links`.
    fn parse_links(d: &[u8], seq: u32, links: &mut Vec<Link>) -> io::Result<bool> {
        let mut payloads = Vec::new();
        let done = parse_dump(d, seq, LINKS, &mut payloads)?;
        links.extend(payloads.iter().map(|p| parse_link(p)));
        Ok(done)
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
        assert!(!parse_links(&d, 7, &mut links).unwrap());
        assert!(parse_links(&message(NLMSG_DONE, 7, &[0; 4]), 7, &mut links).unwrap());
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
    fn a_link_carries_its_flags_and_master() {
        let mut p = newlink(3, "eth1", None, false);
        p[8..12].copy_from_slice(&(libc::IFF_UP as u32 | libc::IFF_SLAVE as u32).to_ne_bytes());
        p.extend(attr(IFLA_MASTER, &9u32.to_ne_bytes()));
        let link = parse_link(&p);
        assert!(link.is_up());
        assert_eq!(link.flags & libc::IFF_SLAVE as u32, libc::IFF_SLAVE as u32);
        assert_eq!(link.master, Some(9));
        let free = parse_link(&newlink(4, "eth2", None, false));
        assert!(!free.is_up());
        assert_eq!(free.master, None);
    }

    #[test]
    fn an_interrupted_dump_or_one_that_failed_part_way_is_an_error() {
        let mut intr = message(RTM_NEWLINK, 3, &newlink(2, "x", None, false));
        intr[6..8].copy_from_slice(&NLM_F_DUMP_INTR.to_ne_bytes());
        let e = parse_dump(&intr, 3, LINKS, &mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
        let done = message(NLMSG_DONE, 3, &(-libc::ENOBUFS).to_ne_bytes());
        let e = parse_dump(&done, 3, LINKS, &mut Vec::new()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOBUFS));
    }

    #[test]
    fn a_netlink_error_or_a_bad_length_is_an_error() {
        let err = message(NLMSG_ERROR, 1, &(-libc::EPERM).to_ne_bytes());
        let e = parse_dump(&err, 1, LINKS, &mut Vec::new()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        let mut short = message(RTM_NEWLINK, 1, &newlink(2, "x", None, false));
        short[0] = 200; // longer than the datagram
        assert!(parse_dump(&short, 1, LINKS, &mut Vec::new()).is_err());
    }

    #[test]
    fn this_namespace_lists_its_loopback_device() {
        let links = list_links().unwrap();
        let lo = links.iter().find(|l| l.name == "lo").expect("lo");
        assert_eq!(lo.index, 1);
        assert!(!lo.has_foreign_peer());
    }
}
