//! The IPv6 half of a dual-stack [`Cluster`] ([`ClusterPlan::dual_stack`]):
//! every link of the diagram gets an address of fd00::/8 next to its IPv4
//! one, with the same routes and permanent neighbours, so each IPv4 path
//! has an IPv6 twin.
//!
//! ```text
//!   client  fd00:0:c:N::9 on its link to node N    node N  fd00:0:c:N::1
//!   node N  fd00:0:e::N on the node-to-node link
//!   node N  fd00:0:244:N::1 toward its pods        pods    fd00:0:244:N::11..
//! ```
//!
//! Addresses are added with `nodad` (no duplicate address detection: the
//! links are point-to-point and the first packet must not wait).

use std::net::{IpAddr, Ipv6Addr};

use super::{mac, Cluster, ClusterNode, NODE_CLIENT_IF, NODE_PEER_IF, NODE_PODS_IF, PODS_IF};
use super::{CLIENT_TO_NODE1_IF, CLIENT_TO_NODE2_IF};
use crate::error::Result;
use crate::netns::Netns;
use crate::topology::static_neighbour;

/// Node `n`'s IPv6 address on the client link.
pub fn node_ext_ip6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0xc, u16::from(n), 0, 0, 0, 1)
}

/// The client's IPv6 address on its link to node `n`.
pub fn client_ip6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0xc, u16::from(n), 0, 0, 0, 9)
}

/// Node `n`'s IPv6 address on the node-to-node link.
pub fn node_peer_ip6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0xe, 0, 0, 0, 0, u16::from(n))
}

/// The IPv6 pod subnet of node `n`.
pub fn pod_subnet6(n: u8) -> String {
    format!("fd00:0:244:{n}::/64")
}

fn client_subnet6(n: u8) -> String {
    format!("fd00:0:c:{n}::/64")
}

impl ClusterNode {
    /// The node's IPv6 address on the client link (dual-stack clusters).
    pub fn ext_ip6(&self) -> Ipv6Addr {
        node_ext_ip6(self.index)
    }

    /// The node's IPv6 address on the node-to-node link.
    pub fn peer_ip6(&self) -> Ipv6Addr {
        node_peer_ip6(self.index)
    }

    /// The node's IPv6 address on its pod link, the pods' gateway.
    pub fn pod_gateway6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0, 0x244, u16::from(self.index), 0, 0, 0, 1)
    }

    /// The IPv6 pod addresses behind the node, in the order of
    /// [`ClusterNode::pod_ips`] (fd00:0:244:N::11, ...).
    pub fn pod_ips6(&self) -> Vec<Ipv6Addr> {
        (0..self.pod_ips.len())
            .map(|i| {
                let last = 0x11 + u16::try_from(i).unwrap_or(0);
                Ipv6Addr::new(0xfd00, 0, 0x244, u16::from(self.index), 0, 0, 0, last)
            })
            .collect()
    }

    /// Every IPv6 address of the node (what a backend may see as the
    /// source of SNATed IPv6 traffic).
    pub fn addresses6(&self) -> Vec<Ipv6Addr> {
        vec![self.ext_ip6(), self.peer_ip6(), self.pod_gateway6()]
    }
}

/// One end of an IPv6 link: its namespace, device and address.
struct End<'a> {
    ns: &'a Netns,
    dev: &'a str,
    ip: Ipv6Addr,
}

/// Adds `a` and `b` (the two ends of an existing link, MACs `a_mac` and
/// `b_mac`) to a /64 with permanent neighbours.
fn link6(a: End<'_>, b: End<'_>, a_mac: &str, b_mac: &str) -> Result<()> {
    for end in [&a, &b] {
        end.ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", end.ip),
            "dev",
            end.dev,
            "nodad",
        ])?;
    }
    static_neighbour(a.ns, a.dev, IpAddr::V6(b.ip), b_mac)?;
    static_neighbour(b.ns, b.dev, IpAddr::V6(a.ip), a_mac)
}

impl Cluster {
    /// Gives every link its IPv6 address, route and neighbours (after the
    /// IPv4 configuration, which created the links).
    pub(super) fn configure_ipv6(&self) -> Result<()> {
        let [n1, n2] = &self.nodes;
        for node in &self.nodes {
            node.ns.sysctl("net/ipv6/conf/all/forwarding", "1")?;
        }
        for (node, client_if, link) in [
            (n1, CLIENT_TO_NODE1_IF, 0x11),
            (n2, CLIENT_TO_NODE2_IF, 0x12),
        ] {
            let n = node.index;
            link6(
                End {
                    ns: &self.client,
                    dev: client_if,
                    ip: client_ip6(n),
                },
                End {
                    ns: &node.ns,
                    dev: NODE_CLIENT_IF,
                    ip: node_ext_ip6(n),
                },
                &mac(link, 1),
                &mac(link, 2),
            )?;
        }
        link6(
            End {
                ns: &n1.ns,
                dev: NODE_PEER_IF,
                ip: n1.peer_ip6(),
            },
            End {
                ns: &n2.ns,
                dev: NODE_PEER_IF,
                ip: n2.peer_ip6(),
            },
            &mac(0x13, 1),
            &mac(0x13, 2),
        )?;
        for (node, link) in [(n1, 0x14), (n2, 0x15)] {
            let pods = node.pod_ips6();
            let (first, more) = pods.split_first().ok_or_else(|| {
                crate::error::TestbedError::InvalidSpec("a node without pods".into())
            })?;
            link6(
                End {
                    ns: &node.ns,
                    dev: NODE_PODS_IF,
                    ip: node.pod_gateway6(),
                },
                End {
                    ns: &node.pods,
                    dev: PODS_IF,
                    ip: *first,
                },
                &mac(link, 1),
                &mac(link, 2),
            )?;
            for ip in more {
                node.pods.ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{ip}/64"),
                    "dev",
                    PODS_IF,
                    "nodad",
                ])?;
                static_neighbour(&node.ns, NODE_PODS_IF, IpAddr::V6(*ip), &mac(link, 2))?;
            }
            node.pods.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &node.pod_gateway6().to_string(),
            ])?;
        }
        for node in &self.nodes {
            let via = node.ext_ip6().to_string();
            self.client
                .ip(&["-6", "route", "add", &pod_subnet6(node.index), "via", &via])?;
        }
        self.client.ip(&[
            "-6",
            "route",
            "add",
            "fd00:0:e::/64",
            "via",
            &n1.ext_ip6().to_string(),
        ])?;
        for (node, other) in [(n1, n2), (n2, n1)] {
            let via = other.peer_ip6().to_string();
            node.ns.ip(&[
                "-6",
                "route",
                "add",
                &pod_subnet6(other.index),
                "via",
                &via,
                "dev",
                NODE_PEER_IF,
            ])?;
            let client_net = client_subnet6(other.index);
            let (via, dev) = if self.direct_return {
                (client_ip6(node.index).to_string(), NODE_CLIENT_IF)
            } else {
                (via, NODE_PEER_IF)
            };
            node.ns
                .ip(&["-6", "route", "add", &client_net, "via", &via, "dev", dev])?;
        }
        Ok(())
    }
}
