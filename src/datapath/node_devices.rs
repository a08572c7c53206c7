//! Which interfaces are the node's devices when `--devices` is not given:
//! device detection, by Cilium's rule (its devices controller), so that
//! north-south traffic is served, and SNATed replies reverse-translated,
//! on every interface traffic from outside can arrive on.
//!
//! A link is a node device when all of these hold:
//! - it is up (IFF_UP) and not loopback;
//! - it is nobody's port: no master (a bridge port, a bond slave, a VRF
//!   member; the bridge, bond or VRF itself is judged instead);
//! - its kind is not a bridge, Open vSwitch, tunnel (vxlan, geneve, ipip,
//!   sit, gre, ...), wireguard, tun/tap, dummy, ifb or VRF device;
//! - its name does not start with one of Cilium's excluded prefixes
//!   (`cilium_`, `lxc`, `cni`, `docker`, `lo`) or `kube-ipvs`;
//! - it carries a default route (IPv4 or IPv6, any table), or holds a
//!   global unicast address (not loopback, link-local, multicast or
//!   unspecified; private ranges count);
//! - a veth or netkit device (the host side of a pod's, or a node in a
//!   container as kind runs it) only with a default route, or with a
//!   global address on a subnet (a prefix shorter than /32 or /128):
//!   Cilium takes veths with a default route only; a pod's host-side
//!   device holds no address, or only its gateway as a host address
//!   (point-to-point CNIs such as kindnet), while a veth that holds a
//!   subnet address links the node to a network of hosts.
//!
//! The agent evaluates the rule again on every link, address and route
//! change (and on its periodic rescan): [`detect`] lists links, addresses
//! and default routes afresh each time, and [`select`] is the rule alone.

#![deny(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;

use crate::datapath::interfaces::{list_links, Link};
use crate::datapath::routes::default_route_links;

/// Kinds of link that never carry the node's north-south traffic: bridges
/// and switches (their ports' traffic is the pods'), tunnels (overlay
/// traffic, decapsulated before it reaches a Service), and virtual
/// devices nothing arrives on from outside.
pub const EXCLUDED_KINDS: [&str; 19] = [
    "bridge",
    "openvswitch",
    "vxlan",
    "geneve",
    "ipip",
    "ip6tnl",
    "sit",
    "gre",
    "gretap",
    "ip6gre",
    "ip6gretap",
    "erspan",
    "ip6erspan",
    "wireguard",
    "tun",
    "dummy",
    "ifb",
    "vrf",
    "nlmon",
];

/// Name prefixes of devices that are never the node's: Cilium's list
/// (its own devices, pod devices of common CNIs, docker's bridge, lo)
/// and kube-proxy's IPVS dummy device.
pub const EXCLUDED_PREFIXES: [&str; 6] = ["cilium_", "lxc", "cni", "docker", "lo", "kube-ipvs"];

/// Kinds of link whose other end is another namespace's device.
const PAIR_KINDS: [&str; 2] = ["veth", "netkit"];

/// An address of a link and its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkAddr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl LinkAddr {
    /// A global unicast address (Go's IsGlobalUnicast, as Cilium asks):
    /// not unspecified, loopback, link-local, multicast nor broadcast.
    pub fn is_global_unicast(&self) -> bool {
        match self.addr {
            IpAddr::V4(a) => {
                !(a.is_unspecified()
                    || a.is_loopback()
                    || a.is_link_local()
                    || a.is_multicast()
                    || a.is_broadcast())
            }
            IpAddr::V6(a) => {
                !(a.is_unspecified()
                    || a.is_loopback()
                    || a.is_multicast()
                    || (a.segments()[0] & 0xffc0) == 0xfe80)
            }
        }
    }

    /// On a subnet: a prefix shorter than the whole address.
    fn on_subnet(&self) -> bool {
        let host = if self.addr.is_ipv4() { 32 } else { 128 };
        self.prefix_len < host
    }
}

/// Why [`judge`] leaves a link out, for logs and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    Down,
    Loopback,
    Enslaved,
    ExcludedKind,
    ExcludedName,
    /// No default route and no global unicast address.
    NotConnected,
    /// A veth or netkit device without a default route or a subnet
    /// address: a pod's.
    PodDevice,
}

/// Whether `link`, holding `addrs` and carrying a default route or not,
/// is a node device (the rule of the module's documentation).
pub fn judge(link: &Link, addrs: &[LinkAddr], default_route: bool) -> Result<(), Skip> {
    if !link.is_up() {
        return Err(Skip::Down);
    }
    if link.flags & libc::IFF_LOOPBACK as u32 != 0 {
        return Err(Skip::Loopback);
    }
    if link.master.is_some() || link.flags & libc::IFF_SLAVE as u32 != 0 {
        return Err(Skip::Enslaved);
    }
    let kind = link.kind.as_deref().unwrap_or("");
    if EXCLUDED_KINDS.contains(&kind) {
        return Err(Skip::ExcludedKind);
    }
    if EXCLUDED_PREFIXES.iter().any(|p| link.name.starts_with(p)) {
        return Err(Skip::ExcludedName);
    }
    let mut global = addrs.iter().filter(|a| a.is_global_unicast());
    if PAIR_KINDS.contains(&kind) {
        if default_route || global.any(LinkAddr::on_subnet) {
            return Ok(());
        }
        return Err(Skip::PodDevice);
    }
    if default_route || global.next().is_some() {
        return Ok(());
    }
    Err(Skip::NotConnected)
}

/// The node devices among `links`, name -> ifindex, given each link's
/// addresses (by ifindex) and the links that carry a default route.
pub fn select(
    links: &[Link],
    addrs: &BTreeMap<u32, Vec<LinkAddr>>,
    default_routes: &BTreeSet<u32>,
) -> BTreeMap<String, u32> {
    links
        .iter()
        .filter(|l| {
            let own = addrs.get(&l.index).map(Vec::as_slice).unwrap_or_default();
            judge(l, own, default_routes.contains(&l.index)).is_ok()
        })
        .map(|l| (l.name.clone(), l.index))
        .collect()
}

/// The node devices of this network namespace now, name -> ifindex: its
/// links, addresses (getifaddrs) and default routes listed afresh.
pub fn detect() -> io::Result<BTreeMap<String, u32>> {
    let links = list_links()?;
    let by_name: BTreeMap<&str, u32> = links.iter().map(|l| (l.name.as_str(), l.index)).collect();
    let mut addrs: BTreeMap<u32, Vec<LinkAddr>> = BTreeMap::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        let Some(&index) = by_name.get(ifa.interface_name.as_str()) else {
            continue;
        };
        let (Some(addr), Some(mask)) = (ifa.address, ifa.netmask) else {
            continue;
        };
        let found = match (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
            (Some(a), Some(m)) => Some((IpAddr::V4(a.ip()), m.ip().to_bits().count_ones())),
            _ => match (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
                (Some(a), Some(m)) => Some((IpAddr::V6(a.ip()), m.ip().to_bits().count_ones())),
                _ => None,
            },
        };
        if let Some((addr, ones)) = found {
            addrs.entry(index).or_default().push(LinkAddr {
                addr,
                prefix_len: ones as u8,
            });
        }
    }
    Ok(select(&links, &addrs, &default_route_links()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: u32 = libc::IFF_UP as u32;

    fn link(index: u32, name: &str, kind: Option<&str>) -> Link {
        Link {
            index,
            name: name.into(),
            kind: kind.map(str::to_string),
            link_in_other_netns: kind.is_some(),
            flags: UP,
            master: None,
        }
    }

    fn addr(s: &str) -> LinkAddr {
        let (a, p) = s.split_once('/').unwrap();
        LinkAddr {
            addr: a.parse().unwrap(),
            prefix_len: p.parse().unwrap(),
        }
    }

    #[test]
    fn a_physical_device_with_a_node_address_or_a_default_route_is_selected() {
        let eth = link(2, "eth0", None);
        assert_eq!(judge(&eth, &[addr("192.0.2.11/29")], false), Ok(()));
        assert_eq!(judge(&eth, &[addr("2001:db8::1/64")], false), Ok(()));
        // A cloud node's /32 on a NIC is a node address too.
        assert_eq!(judge(&eth, &[addr("10.0.0.5/32")], false), Ok(()));
        assert_eq!(judge(&eth, &[], true), Ok(()));
        let bond = link(3, "bond0", Some("bond"));
        assert_eq!(judge(&bond, &[addr("198.51.100.1/24")], false), Ok(()));
        let vlan = link(4, "eth0.100", Some("vlan"));
        assert_eq!(judge(&vlan, &[addr("198.51.100.1/24")], false), Ok(()));
    }

    #[test]
    fn link_local_loopback_and_no_address_do_not_make_a_node_device() {
        let eth = link(2, "eth1", None);
        for only in ["fe80::1/64", "169.254.1.1/16", "127.0.0.2/8", "::1/128"] {
            assert_eq!(
                judge(&eth, &[addr(only)], false),
                Err(Skip::NotConnected),
                "{only}"
            );
        }
        assert_eq!(judge(&eth, &[], false), Err(Skip::NotConnected));
    }

    #[test]
    fn down_loopback_and_enslaved_links_are_left_out() {
        let a = [addr("192.0.2.1/24")];
        let mut down = link(2, "eth0", None);
        down.flags = 0;
        assert_eq!(judge(&down, &a, true), Err(Skip::Down));
        let mut lo = link(1, "lo", None);
        lo.flags |= libc::IFF_LOOPBACK as u32;
        assert_eq!(judge(&lo, &a, false), Err(Skip::Loopback));
        let mut port = link(3, "eth2", None);
        port.master = Some(9);
        assert_eq!(judge(&port, &a, true), Err(Skip::Enslaved));
        let mut slave = link(4, "eth3", None);
        slave.flags |= libc::IFF_SLAVE as u32;
        assert_eq!(judge(&slave, &a, false), Err(Skip::Enslaved));
    }

    #[test]
    fn bridges_tunnels_and_virtual_devices_are_left_out_by_kind_or_name() {
        let a = [addr("10.0.0.1/24")];
        for kind in [
            "bridge",
            "vxlan",
            "geneve",
            "ipip",
            "wireguard",
            "dummy",
            "openvswitch",
        ] {
            assert_eq!(
                judge(&link(5, "x0", Some(kind)), &a, true),
                Err(Skip::ExcludedKind),
                "{kind}"
            );
        }
        for name in ["cilium_host", "lxc12ab", "cni0", "docker0", "kube-ipvs0"] {
            assert_eq!(
                judge(&link(6, name, None), &a, true),
                Err(Skip::ExcludedName),
                "{name}"
            );
        }
    }

    #[test]
    fn a_pods_veth_is_left_out_and_a_nodes_veth_is_taken() {
        let pod = link(7, "veth1a2b", Some("veth"));
        assert_eq!(judge(&pod, &[], false), Err(Skip::PodDevice));
        assert_eq!(
            judge(&pod, &[addr("fe80::1/64")], false),
            Err(Skip::PodDevice)
        );
        // Point-to-point CNIs put the pod's gateway on the host side, /32.
        assert_eq!(
            judge(&pod, &[addr("10.244.0.1/32")], false),
            Err(Skip::PodDevice)
        );
        let nk = link(8, "nk0", Some("netkit"));
        assert_eq!(judge(&nk, &[], false), Err(Skip::PodDevice));
        // kind's node: eth0 is a veth with the default route.
        let kind_node = link(9, "eth0", Some("veth"));
        assert_eq!(judge(&kind_node, &[], true), Ok(()));
        // A veth linking the node to a subnet of hosts.
        assert_eq!(judge(&kind_node, &[addr("192.0.2.11/29")], false), Ok(()));
    }

    #[test]
    fn select_takes_each_links_own_addresses_and_routes() {
        let links = [
            link(2, "eth-c", Some("veth")),
            link(3, "eth-b", Some("veth")),
            link(4, "vpod", Some("veth")),
            link(5, "eth9", None),
        ];
        let addrs = BTreeMap::from([
            (2, vec![addr("192.0.2.11/29")]),
            (4, vec![addr("10.244.1.1/32")]),
        ]);
        let selected = select(&links, &addrs, &BTreeSet::from([3]));
        assert_eq!(
            selected,
            BTreeMap::from([("eth-b".to_string(), 3), ("eth-c".to_string(), 2)])
        );
    }
}
