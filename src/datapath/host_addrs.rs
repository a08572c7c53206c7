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

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::datapath::kernel::to_io;
#[cfg(doc)]
use crate::datapath::netlink_events::NetlinkEvents;

/// Pinned name of the host address map (its suffix is the layout version).
pub const HOSTADDR_PIN: &str = "kpr_hostaddr_v1";

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
fn key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
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

/// What one [`HostAddrTable::sync`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HostAddrSync {
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
}

/// The pinned host address map and what it holds.
pub struct HostAddrTable {
    map: MapHandle,
    current: BTreeSet<IpAddr>,
}

impl HostAddrTable {
    /// Opens the map pinned under `bpf_root` (by the socket-LB load) and
    /// reads what it holds.
    pub fn open(bpf_root: &Path) -> Result<HostAddrTable> {
        let pin = bpf_root.join(HOSTADDR_PIN);
        let map = MapHandle::from_pinned_path(&pin)
            .with_context(|| format!("opening the host address map {}", pin.display()))?;
        let mut table = HostAddrTable {
            map,
            current: BTreeSet::new(),
        };
        table.reload()?;
        Ok(table)
    }

    fn reload(&mut self) -> Result<()> {
        // Keys are 16 bytes (the map's BTF), so every one decodes.
        self.current = self.map.keys().filter_map(|k| decode(&k)).collect();
        Ok(())
    }

    /// The map's capacity.
    pub fn capacity(&self) -> usize {
        self.map.max_entries() as usize
    }

    /// Addresses the map holds.
    pub fn addresses(&self) -> &BTreeSet<IpAddr> {
        &self.current
    }

    /// Makes the map hold exactly `desired`: additions first, then
    /// removals. On an error the table re-reads the map, so the next sync
    /// retries what is missing.
    pub fn sync(&mut self, desired: &BTreeSet<IpAddr>) -> Result<HostAddrSync> {
        let result = self.apply(desired);
        if result.is_err() {
            self.reload()?;
        }
        result
    }

    fn apply(&mut self, desired: &BTreeSet<IpAddr>) -> Result<HostAddrSync> {
        let mut report = HostAddrSync::default();
        for ip in desired.difference(&self.current) {
            self.map
                .update(&key(*ip), &[1u8], MapFlags::ANY)
                .map_err(to_io)
                .with_context(|| format!("adding host address {ip}"))?;
            report.added.push(*ip);
        }
        for ip in self.current.difference(desired) {
            match self.map.delete(&key(*ip)) {
                Ok(()) => {}
                Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(to_io(e)).with_context(|| format!("removing host address {ip}"))
                }
            }
            report.removed.push(*ip);
        }
        self.current = desired.clone();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_ipv4_mapped_and_decode_back() {
        for ip in ["192.0.2.1", "127.0.0.1", "2001:db8::1", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(decode(&key(ip)), Some(ip));
        }
        let v4 = key("198.51.100.1".parse().unwrap());
        assert_eq!(&v4[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&v4[12..], &[198, 51, 100, 1]);
        assert_eq!(decode(&[0u8; 4]), None);
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
