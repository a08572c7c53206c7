//! The default routes of the agent's network namespace, from one netlink
//! RTM_GETROUTE dump (every table, IPv4 and IPv6): which links carry one,
//! for device detection (`datapath::node_devices`). Only the outgoing
//! interfaces are kept, of plain routes and of each next hop of a
//! multipath one.

#![deny(unsafe_code)]

use std::collections::BTreeSet;
use std::io;

use crate::datapath::interfaces::{attributes, dump, u16_at, u32_at};

// rtnetlink, from <linux/rtnetlink.h>.
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
/// struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope,
/// type (one byte each), flags (u32).
const RTMSG_LEN: usize = 12;
const RTN_UNICAST: u8 = 1;
const RTA_OIF: u16 = 4;
const RTA_MULTIPATH: u16 = 9;
/// struct rtnexthop: len (u16), flags, hops (u8 each), ifindex (i32).
const RTNH_LEN: usize = 8;

/// The ifindexes of the links a default route (IPv4 or IPv6, any table)
/// leaves through.
pub fn default_route_links() -> io::Result<BTreeSet<u32>> {
    Ok(dump(RTM_GETROUTE, RTMSG_LEN, RTM_NEWROUTE)?
        .iter()
        .flat_map(|m| default_route_oifs(m))
        .collect())
}

/// The outgoing interfaces of one RTM_NEWROUTE payload when it is a
/// unicast default route (destination length 0); none otherwise.
fn default_route_oifs(payload: &[u8]) -> Vec<u32> {
    let (Some(&dst_len), Some(&kind)) = (payload.get(1), payload.get(7)) else {
        return Vec::new();
    };
    if dst_len != 0 || kind != RTN_UNICAST {
        return Vec::new();
    }
    let mut oifs = Vec::new();
    for (attr, data) in attributes(payload.get(RTMSG_LEN..).unwrap_or_default()) {
        match attr {
            RTA_OIF => oifs.extend(u32_at(data, 0)),
            RTA_MULTIPATH => oifs.extend(next_hop_oifs(data)),
            _ => {}
        }
    }
    oifs.retain(|&i| i != 0);
    oifs
}

/// The interfaces of the rtnexthop entries packed in an RTA_MULTIPATH.
fn next_hop_oifs(mut b: &[u8]) -> Vec<u32> {
    let mut oifs = Vec::new();
    // Bounded by the attribute's length: each entry is at least RTNH_LEN.
    while let (Some(len), Some(index)) = (u16_at(b, 0), u32_at(b, 4)) {
        let len = usize::from(len);
        if len < RTNH_LEN {
            break;
        }
        oifs.push(index);
        b = b.get((len + 3) & !3..).unwrap_or_default();
    }
    oifs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(data);
        a.resize((a.len() + 3) & !3, 0);
        a
    }

    fn route(dst_len: u8, kind: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut p = vec![0u8; RTMSG_LEN];
        p[0] = libc::AF_INET as u8;
        p[1] = dst_len;
        p[7] = kind;
        for a in attrs {
            p.extend_from_slice(a);
        }
        p
    }

    fn next_hop(index: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&(RTNH_LEN as u16).to_ne_bytes());
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&index.to_ne_bytes());
        h
    }

    #[test]
    fn a_unicast_default_route_names_its_interface() {
        let r = route(0, RTN_UNICAST, &[attr(RTA_OIF, &3u32.to_ne_bytes())]);
        assert_eq!(default_route_oifs(&r), [3]);
    }

    #[test]
    fn a_multipath_default_route_names_every_next_hop() {
        let hops = [next_hop(2), next_hop(5)].concat();
        let r = route(0, RTN_UNICAST, &[attr(RTA_MULTIPATH, &hops)]);
        assert_eq!(default_route_oifs(&r), [2, 5]);
    }

    #[test]
    fn other_routes_name_nothing() {
        let oif = attr(RTA_OIF, &3u32.to_ne_bytes());
        assert!(default_route_oifs(&route(24, RTN_UNICAST, std::slice::from_ref(&oif))).is_empty());
        // RTN_UNREACHABLE, RTN_LOCAL, ...: not a way out.
        assert!(default_route_oifs(&route(0, 7, std::slice::from_ref(&oif))).is_empty());
        assert!(default_route_oifs(&route(0, 2, &[oif])).is_empty());
        assert!(default_route_oifs(&[0u8; 4]).is_empty());
    }
}
