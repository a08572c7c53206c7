//! The devices of the agent's network namespace that the tc ingress
//! program may hand a packet through, straight into the namespace of the
//! device's peer (bpf_redirect_peer; bpf/include/lb_peerdev.h): veth and
//! netkit devices whose peer is in another namespace — a pod's.
//!
//! The kernel drops a peer redirect to any other device, and a device's
//! kind and its peer's namespace are netlink attributes only (not in
//! /sys of another namespace, nor in an ioctl), so the agent lists the
//! links with one netlink dump ([`list_links`]) and keeps `kpr_peerdev_v1`
//! equal to the qualifying ifindexes ([`PeerDeviceTable`]): on every link
//! change the device watcher sees, and on its slow rescan. A device not
//! listed yet only misses the shortcut; a listed one that is gone cannot
//! be routed to.

#![deny(unsafe_code)]

use std::collections::BTreeSet;
use std::io;
use std::path::Path;

use anyhow::Result;

pub use crate::datapath::interfaces::{list_links, Link};
use crate::datapath::pinned_table::{PinnedSet, TableKey};
use crate::datapath::pins::MapName;

/// The map key: the ifindex, native order (a `__u32` key).
impl TableKey for u32 {
    fn encode(&self) -> Vec<u8> {
        self.to_ne_bytes().to_vec()
    }

    fn decode(bytes: &[u8]) -> Option<u32> {
        Some(u32::from_ne_bytes(bytes.try_into().ok()?))
    }
}

/// The pinned peer device map and the ifindexes it holds.
pub type PeerDeviceTable = PinnedSet<u32>;

/// Opens the peer device map pinned under `bpf_root` (by the north-south
/// load) and reads what it holds.
pub fn open(bpf_root: &Path) -> Result<PeerDeviceTable> {
    PinnedSet::open(bpf_root, MapName::PeerDevices)
}

/// The ifindexes of this namespace's devices with a peer in another one.
pub fn peer_devices() -> io::Result<BTreeSet<u32>> {
    Ok(list_links()?
        .into_iter()
        .filter(Link::has_foreign_peer)
        .map(|l| l.index)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_native_order_ifindexes() {
        assert_eq!(u32::decode(&7u32.encode()), Some(7));
        assert_eq!(u32::decode(&[1, 2]), None);
    }
}
