//! A routed multi-node network for the north-south datapath: an external
//! client, two nodes that forward, and a pod namespace behind each node.
//!
//! ```text
//!                         client  "<prefix>-client-<pid>"
//!            eth-n1 192.0.2.9/29             eth-n2 192.0.2.17/29
//!                  |                                   |
//!            eth-c 192.0.2.11/29              eth-c 192.0.2.21/29
//!   node1 "<prefix>-node1-<pid>"               node2 "<prefix>-node2-<pid>"
//!            eth-n 198.51.100.1/24 <-------> eth-n 198.51.100.2/24
//!            eth-p 10.244.1.1/24              eth-p 10.244.2.1/24
//!                  |                                   |
//!            eth0 10.244.1.11.. /24            eth0 10.244.2.11.. /24
//!   be1 "<prefix>-be1-<pid>"                   be2 "<prefix>-be2-<pid>"
//! ```
//!
//! Every link is a veth pair created inside one of its two namespaces with
//! the peer moved straight into the other: the root namespace never sees
//! an interface. Routes: the client reaches both nodes' addresses and both
//! pod subnets (through the node that owns each); each node reaches the
//! other's pod subnet and client link over the node-to-node link; pods
//! default-route through their node. Nodes forward (`ip_forward`), every
//! namespace has rp_filter off (SNAT and test routes are asymmetric), and
//! all neighbours are static so no first packet waits for ARP.
//!
//! With [`ClusterPlan::direct_return`] each node reaches the other node's
//! client link through its own client link instead (the client answers
//! on either), as DSR needs: a backend's node then sends replies straight
//! to the client, never through the node the client addressed.
//!
//! Dropping the cluster deletes all five namespaces and with them every
//! interface, address and route.

use std::net::{IpAddr, Ipv4Addr};

use super::error::{Result, TestbedError};
use super::netns::Netns;
use super::topology::{static_neighbour, wait_link_up};

#[path = "cluster6.rs"]
mod ipv6;
pub use ipv6::{client_ip6, node_ext_ip6, node_peer_ip6, pod_subnet6};

/// The client's interface toward node1.
pub const CLIENT_TO_NODE1_IF: &str = "eth-n1";
/// The client's interface toward node2.
pub const CLIENT_TO_NODE2_IF: &str = "eth-n2";
/// A node's interface toward the client (a north-south device).
pub const NODE_CLIENT_IF: &str = "eth-c";
/// A node's interface toward the other node (a north-south device: SNAT
/// replies from the other node's pods arrive here).
pub const NODE_PEER_IF: &str = "eth-n";
/// A node's interface toward its pods (not a north-south device).
pub const NODE_PODS_IF: &str = "eth-p";
/// The pods' interface toward their node.
pub const PODS_IF: &str = "eth0";

/// Most pod addresses per node (10.244.N.11 ..= 10.244.N.60).
pub const MAX_PODS_PER_NODE: u8 = 50;

/// What to build.
#[derive(Clone, Debug)]
pub struct ClusterPlan {
    /// Pod addresses behind each node, 1..=[`MAX_PODS_PER_NODE`].
    pub pods_per_node: u8,
    /// Make the senders (client, pods) behave like hosts behind a wire for
    /// XDP on the nodes: TX checksum offload off, so packets carry full
    /// checksums as they would from a NIC, and GRO on, so the veths that
    /// nodes redirect XDP frames into accept them (native XDP on veth
    /// needs NAPI on the receiving end).
    pub xdp_ready: bool,
    /// Route each node's traffic to the other node's client link (client
    /// addresses included) out of its own client link, so a backend's node
    /// reaches any client directly, as direct server return needs. Off:
    /// over the node-to-node link (replies to a client that addressed the
    /// other node pass through that node).
    pub direct_return: bool,
    /// Give every link an IPv6 address too (cluster6.rs), for IPv6 and
    /// dual-stack Services; the agents then get both node IPs.
    pub dual_stack: bool,
}

impl Default for ClusterPlan {
    fn default() -> Self {
        ClusterPlan {
            pods_per_node: 2,
            xdp_ready: false,
            direct_return: false,
            dual_stack: false,
        }
    }
}

/// One node and the pod namespace behind it.
#[derive(Debug)]
pub struct ClusterNode {
    index: u8,
    ns: Netns,
    pods: Netns,
    pod_ips: Vec<Ipv4Addr>,
}

impl ClusterNode {
    /// 1 or 2.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The node's namespace, where its kpr agent runs.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The namespace of the node's pods, where backend servers run.
    pub fn pods(&self) -> &Netns {
        &self.pods
    }

    /// The node's address on the client link: what clients address
    /// NodePorts on (192.0.2.11, 192.0.2.21).
    pub fn ext_ip(&self) -> Ipv4Addr {
        node_ext_ip(self.index)
    }

    /// The node's address on the node-to-node link (198.51.100.1, .2).
    pub fn peer_ip(&self) -> Ipv4Addr {
        node_peer_ip(self.index)
    }

    /// The node's address on its pod link, the pods' gateway (10.244.N.1).
    pub fn pod_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.index, 1)
    }

    /// Every address of the node (what a backend may see as the source of
    /// SNATed traffic).
    pub fn addresses(&self) -> Vec<Ipv4Addr> {
        vec![self.ext_ip(), self.peer_ip(), self.pod_gateway()]
    }

    /// The pod addresses behind the node, in order (10.244.N.11, ...).
    pub fn pod_ips(&self) -> &[Ipv4Addr] {
        &self.pod_ips
    }

    /// The north-south devices of the node: what `kpr agent --devices` takes.
    pub fn devices(&self) -> [&'static str; 2] {
        [NODE_CLIENT_IF, NODE_PEER_IF]
    }
}

/// Node `n`'s address on the client link.
pub fn node_ext_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 1 + 10 * n)
}

/// The client's address on its link to node `n` (192.0.2.9, 192.0.2.17).
pub fn client_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 1 + 8 * n)
}

/// Node `n`'s address on the node-to-node link.
pub fn node_peer_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, n)
}

/// The client-link subnet of node `n` (192.0.2.8/29, 192.0.2.16/29).
fn client_subnet(n: u8) -> String {
    format!("192.0.2.{}/29", 8 * n)
}

/// The pod subnet of node `n`.
pub fn pod_subnet(n: u8) -> String {
    format!("10.244.{n}.0/24")
}

/// The fixed MAC of one end of a link: `02:6b:70:72:<link>:<side>`.
fn mac(link: u8, side: u8) -> String {
    format!("02:6b:70:72:{link:02x}:{side:02x}")
}

/// The namespaces and links of the diagram above; all gone on Drop.
#[derive(Debug)]
pub struct Cluster {
    client: Netns,
    nodes: [ClusterNode; 2],
    xdp_ready: bool,
    direct_return: bool,
    dual_stack: bool,
}

impl Cluster {
    /// Builds the network (prefix: 1..=8 of `[a-z0-9]`) and returns once
    /// every link forwards.
    pub fn build(prefix: &str, plan: &ClusterPlan) -> Result<Cluster> {
        kpr::selftest::prefix::validate_prefix(prefix)?;
        if plan.pods_per_node == 0 || plan.pods_per_node > MAX_PODS_PER_NODE {
            return Err(TestbedError::InvalidSpec(format!(
                "pods_per_node {} is outside 1..={MAX_PODS_PER_NODE}",
                plan.pods_per_node
            )));
        }
        let tag = format!(
            "{}{}",
            std::process::id(),
            kpr::selftest::prefix::unique_suffix()
        );
        let ns = |role: &str| Netns::create(&format!("{prefix}-{role}-{tag}"));
        // Each namespace is owned as soon as it exists, so an error on the
        // way drops (deletes) the ones created before.
        let client = ns("client")?;
        let node = |index: u8| -> Result<ClusterNode> {
            let node_ns = ns(&format!("node{index}"))?;
            let pods = ns(&format!("be{index}"))?;
            let pod_ips = (0..plan.pods_per_node)
                .map(|i| Ipv4Addr::new(10, 244, index, 11 + i))
                .collect();
            Ok(ClusterNode {
                index,
                ns: node_ns,
                pods,
                pod_ips,
            })
        };
        let nodes = [node(1)?, node(2)?];
        let cluster = Cluster {
            client,
            nodes,
            xdp_ready: plan.xdp_ready,
            direct_return: plan.direct_return,
            dual_stack: plan.dual_stack,
        };
        cluster.configure()?;
        Ok(cluster)
    }

    /// Whether the links have IPv6 addresses too ([`ClusterPlan::dual_stack`]).
    pub fn dual_stack(&self) -> bool {
        self.dual_stack
    }

    /// The external client's namespace.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// Node 1 or 2.
    ///
    /// # Panics
    /// When `n` is not 1 or 2 (a bug in the calling test).
    pub fn node(&self, n: u8) -> &ClusterNode {
        assert!(n == 1 || n == 2, "the cluster has nodes 1 and 2, not {n}");
        &self.nodes[usize::from(n - 1)]
    }

    /// Both nodes.
    pub fn nodes(&self) -> &[ClusterNode; 2] {
        &self.nodes
    }

    /// Adds a second client link to node `n` after the fact (a device that
    /// appears while the agent runs): `node_if` in the node with
    /// 192.0.2.25/29, `client_if` in the client with 192.0.2.26/29, and the
    /// client's route to node `n`'s client-link address moved onto it, so
    /// NodePort traffic to [`ClusterNode::ext_ip`] now enters through
    /// `node_if` (from source 192.0.2.26). Returns the client's address.
    /// Deleting the link ([`Cluster::remove_late_link`]) takes the route
    /// with it, and the old path is used again.
    pub fn add_late_link(&self, n: u8, node_if: &str, client_if: &str) -> Result<Ipv4Addr> {
        let node = self.node(n);
        let (client_ip, node_ip) = (Ipv4Addr::new(192, 0, 2, 26), Ipv4Addr::new(192, 0, 2, 25));
        Link {
            a: &self.client,
            a_if: client_if,
            a_ip: client_ip,
            b: &node.ns,
            b_if: node_if,
            b_ip: node_ip,
            prefix_len: 29,
            link: 0x16,
        }
        .create()?;
        if self.xdp_ready {
            ethtool_set(&self.client, client_if, ETHTOOL_STXCSUM, false)?;
            ethtool_set(&self.client, client_if, ETHTOOL_SGRO, true)?;
        }
        self.client.ip(&[
            "route",
            "add",
            &format!("{}/32", node.ext_ip()),
            "via",
            &node_ip.to_string(),
            "dev",
            client_if,
        ])?;
        Ok(client_ip)
    }

    /// Deletes a link made by [`Cluster::add_late_link`] (both ends).
    pub fn remove_late_link(&self, n: u8, node_if: &str) -> Result<()> {
        self.node(n).ns.ip(&["link", "del", node_if])
    }

    fn configure(&self) -> Result<()> {
        let all =
            std::iter::once(&self.client).chain(self.nodes.iter().flat_map(|n| [&n.ns, &n.pods]));
        for ns in all {
            for key in [
                "net/ipv4/conf/all/rp_filter",
                "net/ipv4/conf/default/rp_filter",
            ] {
                ns.sysctl(key, "0")?;
            }
        }
        for node in &self.nodes {
            node.ns.sysctl("net/ipv4/ip_forward", "1")?;
        }

        let [n1, n2] = &self.nodes;
        // client <-> node N
        for (node, client_if, link) in [
            (n1, CLIENT_TO_NODE1_IF, 0x11),
            (n2, CLIENT_TO_NODE2_IF, 0x12),
        ] {
            let n = node.index;
            Link {
                a: &self.client,
                a_if: client_if,
                a_ip: client_ip(n),
                b: &node.ns,
                b_if: NODE_CLIENT_IF,
                b_ip: node_ext_ip(n),
                prefix_len: 29,
                link,
            }
            .create()?;
        }
        // node1 <-> node2
        Link {
            a: &n1.ns,
            a_if: NODE_PEER_IF,
            a_ip: n1.peer_ip(),
            b: &n2.ns,
            b_if: NODE_PEER_IF,
            b_ip: n2.peer_ip(),
            prefix_len: 24,
            link: 0x13,
        }
        .create()?;
        // node N <-> its pods
        for (node, link) in [(n1, 0x14), (n2, 0x15)] {
            let (first, more) = node
                .pod_ips
                .split_first()
                .ok_or_else(|| TestbedError::InvalidSpec("a node without pods".into()))?;
            Link {
                a: &node.ns,
                a_if: NODE_PODS_IF,
                a_ip: node.pod_gateway(),
                b: &node.pods,
                b_if: PODS_IF,
                b_ip: *first,
                prefix_len: 24,
                link,
            }
            .create()?;
            for ip in more {
                node.pods
                    .ip(&["addr", "add", &format!("{ip}/24"), "dev", PODS_IF])?;
                static_neighbour(&node.ns, NODE_PODS_IF, IpAddr::V4(*ip), &mac(link, 2))?;
            }
            node.pods.ip(&[
                "route",
                "add",
                "default",
                "via",
                &node.pod_gateway().to_string(),
            ])?;
        }

        if self.xdp_ready {
            for (ns, dev) in [
                (&self.client, CLIENT_TO_NODE1_IF),
                (&self.client, CLIENT_TO_NODE2_IF),
                (&n1.pods, PODS_IF),
                (&n2.pods, PODS_IF),
            ] {
                ethtool_set(ns, dev, ETHTOOL_STXCSUM, false)?;
                ethtool_set(ns, dev, ETHTOOL_SGRO, true)?;
            }
        }
        if self.dual_stack {
            self.configure_ipv6()?;
        }

        // The client reaches each pod subnet (and the node link) through
        // the node that owns it.
        for node in &self.nodes {
            let via = node.ext_ip().to_string();
            self.client
                .ip(&["route", "add", &pod_subnet(node.index), "via", &via])?;
        }
        self.client.ip(&[
            "route",
            "add",
            "198.51.100.0/24",
            "via",
            &n1.ext_ip().to_string(),
        ])?;
        // Each node reaches the other's pods over the node-to-node link,
        // and the other's client link over it too or, for direct return,
        // through the client on its own client link.
        for (node, other) in [(n1, n2), (n2, n1)] {
            let via = other.peer_ip().to_string();
            node.ns.ip(&[
                "route",
                "add",
                &pod_subnet(other.index),
                "via",
                &via,
                "dev",
                NODE_PEER_IF,
            ])?;
            let client_net = client_subnet(other.index);
            if self.direct_return {
                let client = client_ip(node.index).to_string();
                node.ns.ip(&[
                    "route",
                    "add",
                    &client_net,
                    "via",
                    &client,
                    "dev",
                    NODE_CLIENT_IF,
                ])?;
            } else {
                node.ns.ip(&[
                    "route",
                    "add",
                    &client_net,
                    "via",
                    &via,
                    "dev",
                    NODE_PEER_IF,
                ])?;
            }
        }
        Ok(())
    }
}

/// `ethtool -K` by ioctl (no ethtool binary needed): legacy commands
/// from linux/ethtool.h taking a `struct ethtool_value`.
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_SGRO: u32 = 0x2c;
const SIOCETHTOOL: libc::c_ulong = 0x8946;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// Sets one offload of `dev` inside `ns`.
fn ethtool_set(ns: &Netns, dev: &str, cmd: u32, on: bool) -> Result<()> {
    let name = dev.as_bytes().to_vec();
    if name.len() >= libc::IFNAMSIZ {
        return Err(TestbedError::InvalidName {
            name: dev.to_string(),
            why: "an interface name is shorter than IFNAMSIZ",
        });
    }
    let outcome = ns.enter_thread(move || -> std::io::Result<()> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: socket(2) has no memory preconditions.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut value = EthtoolValue {
            cmd,
            data: u32::from(on),
        };
        // SAFETY: ifreq is plain data; all-zero is a valid (empty) request.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(&name) {
            *dst = *src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
        // SAFETY: SIOCETHTOOL with a valid ifreq whose data points at a
        // live ethtool_value for the duration of the call.
        let ret = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut ifr) };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })?;
    outcome.map_err(|e| {
        TestbedError::io(
            format!("ethtool cmd {cmd:#x} on {dev} in netns {}", ns.name()),
            e,
        )
    })
}

/// A veth pair between two namespaces with one IPv4 address on each end.
struct Link<'a> {
    a: &'a Netns,
    a_if: &'a str,
    a_ip: Ipv4Addr,
    b: &'a Netns,
    b_if: &'a str,
    b_ip: Ipv4Addr,
    prefix_len: u8,
    /// Link number, for the MACs.
    link: u8,
}

impl Link<'_> {
    fn create(&self) -> Result<()> {
        let (a_mac, b_mac) = (mac(self.link, 1), mac(self.link, 2));
        self.a.ip(&[
            "link",
            "add",
            self.a_if,
            "address",
            &a_mac,
            "type",
            "veth",
            "peer",
            "name",
            self.b_if,
            "address",
            &b_mac,
            "netns",
            self.b.name(),
        ])?;
        for (ns, dev, ip) in [
            (self.a, self.a_if, self.a_ip),
            (self.b, self.b_if, self.b_ip),
        ] {
            ns.ip(&[
                "addr",
                "add",
                &format!("{ip}/{}", self.prefix_len),
                "dev",
                dev,
            ])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        wait_link_up(self.a, self.a_if)?;
        wait_link_up(self.b, self.b_if)?;
        static_neighbour(self.a, self.a_if, IpAddr::V4(self.b_ip), &b_mac)?;
        static_neighbour(self.b, self.b_if, IpAddr::V4(self.a_ip), &a_mac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_diagram() {
        assert_eq!(node_ext_ip(1).to_string(), "192.0.2.11");
        assert_eq!(node_ext_ip(2).to_string(), "192.0.2.21");
        assert_eq!(client_ip(1).to_string(), "192.0.2.9");
        assert_eq!(client_ip(2).to_string(), "192.0.2.17");
        assert_eq!(client_subnet(1), "192.0.2.8/29");
        assert_eq!(client_subnet(2), "192.0.2.16/29");
        assert_eq!(node_peer_ip(2).to_string(), "198.51.100.2");
        assert_eq!(pod_subnet(2), "10.244.2.0/24");
        assert_eq!(mac(0x13, 2), "02:6b:70:72:13:02");
        // Each client address shares its /29 with its node's address.
        for n in [1u8, 2] {
            let net: ipnet::Ipv4Net = client_subnet(n).parse().unwrap();
            assert!(net.contains(&client_ip(n)) && net.contains(&node_ext_ip(n)));
        }
    }

    #[test]
    fn bad_plans_are_refused_before_anything_is_created() {
        let plan = ClusterPlan {
            pods_per_node: 0,
            ..ClusterPlan::default()
        };
        assert!(Cluster::build("ok", &plan).is_err());
        assert!(Cluster::build("Bad", &ClusterPlan::default()).is_err());
    }
}
