//! The node's own addresses in `kpr_hostaddr_v1` (bpf/include/lb_hostaddr.h),
//! for the socket hooks: a node-local client connecting to any IPv4 address
//! of the node on a NodePort is load-balanced, and a node socket binding
//! such an address and port is refused, as for the node IPs. (The tc and
//! XDP programs ask the FIB instead; the socket hooks cannot.)
//!
//! The set is every address of the agent's network namespace
//! ([`local_addresses`], getifaddrs), rewritten by the agent whenever
//! addresses change (a netlink subscription, [`NetlinkEvents::addresses`])
//! and on a slow rescan. Writes come
//! before deletes. A stale entry costs little: an address that is gone
//! takes no traffic; one not there yet is served once the event arrives.

#![deny(unsafe_code)]

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;

use anyhow::Result;

#[cfg(doc)]
use crate::datapath::netlink_events::NetlinkEvents;
use crate::datapath::pinned_table::{PinnedSet, TableKey};
use crate::datapath::pins::MapName;

/// Every address of this network namespace's interfaces, loopback included.
pub fn local_addresses() -> io::Result<BTreeSet<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addrs
        .filter_map(|ifa| {
            let addr = ifa.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

/// The map key: 16 bytes, IPv4 as IPv4-mapped, network order.
impl TableKey for IpAddr {
    fn encode(&self) -> Vec<u8> {
        match self {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        }
    }

    fn decode(bytes: &[u8]) -> Option<IpAddr> {
        let octets: [u8; 16] = bytes.try_into().ok()?;
        let v6 = Ipv6Addr::from(octets);
        Some(match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        })
    }
}

/// The pinned host address map and what it holds.
pub type HostAddrTable = PinnedSet<IpAddr>;

/// Opens the host address map pinned under `bpf_root` (by the socket-LB
/// load) and reads what it holds.
pub fn open(bpf_root: &Path) -> Result<HostAddrTable> {
    PinnedSet::open(bpf_root, MapName::HostAddresses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_ipv4_mapped_and_decode_back() {
        for ip in ["192.0.2.1", "127.0.0.1", "2001:db8::1", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(IpAddr::decode(&ip.encode()), Some(ip));
        }
        let v4 = "198.51.100.1".parse::<IpAddr>().unwrap().encode();
        assert_eq!(&v4[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&v4[12..], &[198, 51, 100, 1]);
        assert_eq!(IpAddr::decode(&[0u8; 4]), None);
    }

    #[test]
    fn this_namespace_has_the_loopback_address() {
        let addrs = local_addresses().unwrap();
        assert!(
            addrs.contains(&"127.0.0.1".parse::<IpAddr>().unwrap()),
            "{addrs:?}"
        );
    }
}
