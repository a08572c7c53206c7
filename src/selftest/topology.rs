//! Two namespaces joined by a veth pair: a client side whose sockets kpr
//! translates, and a backends side with pod addresses and untranslated VIPs.
//!
//! ```text
//!  client netns  "<prefix>c<pid>"            backends netns "<prefix>b<pid>"
//!  +-----------------------------+          +------------------------------+
//!  | probe process (test cgroup) |          | Server threads (TCP / UDP)   |
//!  | veth-c 10.244.0.1/24        |<-------->| veth-b 10.244.0.254/24       |
//!  |        fd00:10:244::1/64    |   veth   |        fd00:10:244::fe/64    |
//!  | 10.96.0.0/12 via .254       |          |        + backends /32, /128  |
//!  | fd00:10:96::/112 via ::fe   |          | lo: untranslated VIPs        |
//!  +-----------------------------+          +------------------------------+
//! ```
//!
//! The veth pair is created inside the client namespace with its peer
//! placed directly in the backends namespace.
//!
//! Neighbour entries are static, IPv6 addresses skip DAD, and every step
//! waits (bounded) until the kernel has really finished it (link watch,
//! IPv6 local routes), so the first packet of a test is never lost or
//! delayed; rp_filter is off on both sides so asymmetric test routes are
//! not dropped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::error::{Result, TestbedError};
use super::netns::Netns;

/// The client's pod address.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The client's IPv6 pod address.
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 1);
/// The backends side's veth address; the client's gateway to the VIP ranges.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 254);
/// The backends side's IPv6 veth address; the client's IPv6 gateway.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0xfe);
/// Service VIP range routed from the client to the backends side.
pub const VIP_RANGE_V4: &str = "10.96.0.0/12";
/// IPv6 service VIP range routed from the client to the backends side.
pub const VIP_RANGE_V6: &str = "fd00:10:96::/112";
/// The veth end inside the client namespace.
pub const CLIENT_IF: &str = "veth-c";
/// The veth end inside the backends namespace.
pub const BACKENDS_IF: &str = "veth-b";
/// Fixed, locally administered MAC of [`CLIENT_IF`], for static neighbours.
pub const CLIENT_MAC: &str = "02:6b:70:72:00:01";
/// Fixed, locally administered MAC of [`BACKENDS_IF`].
pub const BACKENDS_MAC: &str = "02:6b:70:72:00:02";

/// How long `build` waits for the veth carrier (and an IPv6 address for
/// its local route).
const LINK_WAIT: Duration = Duration::from_secs(3);
/// Poll interval for that wait.
const LINK_POLL: Duration = Duration::from_millis(20);
/// Poll interval while an IPv6 address is being installed.
const ROUTE_POLL: Duration = Duration::from_millis(2);

/// IPv4 address of backend `n` (1..=200): 10.244.0.11, .12, ...
pub fn backend_v4(n: u16) -> Result<Ipv4Addr> {
    let host = backend_host(n)?;
    Ok(Ipv4Addr::new(10, 244, 0, host as u8))
}

/// IPv6 address of backend `n` (1..=200): fd00:10:244::11, ::12, ...
/// (hex digits, so the last group reads like the IPv4 host part up to 99).
pub fn backend_v6(n: u16) -> Result<Ipv6Addr> {
    let host = backend_host(n)?;
    // 11 -> 0x11: keep the decimal digits readable in the hex group.
    let group = u16::from_str_radix(&host.to_string(), 16).unwrap_or(host);
    Ok(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, group))
}

fn backend_host(n: u16) -> Result<u16> {
    if (1..=200).contains(&n) {
        Ok(10 + n)
    } else {
        Err(TestbedError::BackendIndex(n))
    }
}

/// The two-namespace test network. Dropping it deletes both namespaces
/// (and with them the veth pair and every address).
#[derive(Debug)]
pub struct Topology {
    client: Netns,
    backends: Netns,
}

impl Topology {
    /// Builds the network: namespaces `<prefix>c<pid>` and `<prefix>b<pid>`
    /// (prefix: 1..=8 of `[a-z0-9]`), the veth pair, addresses, VIP routes
    /// and static neighbours; returns once the link is up.
    pub fn build(prefix: &str) -> Result<Topology> {
        super::prefix::validate_prefix(prefix)?;
        let pid = std::process::id();
        let suffix = super::prefix::unique_suffix();
        let client = Netns::create(&format!("{prefix}c{pid}{suffix}"))?;
        let backends = Netns::create(&format!("{prefix}b{pid}{suffix}"))?;
        let topo = Topology { client, backends };
        topo.configure()?;
        Ok(topo)
    }

    fn configure(&self) -> Result<()> {
        for ns in [&self.client, &self.backends] {
            for key in [
                "net/ipv4/conf/all/rp_filter",
                "net/ipv4/conf/default/rp_filter",
                "net/ipv6/conf/all/accept_dad",
                "net/ipv6/conf/default/accept_dad",
            ] {
                ns.sysctl(key, "0")?;
            }
        }
        // Created inside the client namespace with the peer placed straight
        // into the backends one: the root namespace never sees either end.
        self.client.ip(&[
            "link",
            "add",
            CLIENT_IF,
            "address",
            CLIENT_MAC,
            "type",
            "veth",
            "peer",
            "name",
            BACKENDS_IF,
            "address",
            BACKENDS_MAC,
            "netns",
            self.backends.name(),
        ])?;

        let b = &self.backends;
        b.ip(&[
            "addr",
            "add",
            &format!("{GATEWAY_V4}/24"),
            "dev",
            BACKENDS_IF,
        ])?;
        b.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{GATEWAY_V6}/64"),
            "dev",
            BACKENDS_IF,
            "nodad",
        ])?;
        b.ip(&["link", "set", BACKENDS_IF, "up"])?;

        let c = &self.client;
        c.ip(&["addr", "add", &format!("{CLIENT_V4}/24"), "dev", CLIENT_IF])?;
        c.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{CLIENT_V6}/64"),
            "dev",
            CLIENT_IF,
            "nodad",
        ])?;
        c.ip(&["link", "set", CLIENT_IF, "up"])?;

        wait_link_up(c, CLIENT_IF)?;
        wait_link_up(b, BACKENDS_IF)?;
        wait_local_route(c, CLIENT_V6)?;
        wait_local_route(b, GATEWAY_V6)?;

        for (ns, dev, ip, mac) in [
            (c, CLIENT_IF, IpAddr::V4(GATEWAY_V4), BACKENDS_MAC),
            (c, CLIENT_IF, IpAddr::V6(GATEWAY_V6), BACKENDS_MAC),
            (b, BACKENDS_IF, IpAddr::V4(CLIENT_V4), CLIENT_MAC),
            (b, BACKENDS_IF, IpAddr::V6(CLIENT_V6), CLIENT_MAC),
        ] {
            static_neighbour(ns, dev, ip, mac)?;
        }

        let gw4 = GATEWAY_V4.to_string();
        let gw6 = GATEWAY_V6.to_string();
        c.ip(&["route", "add", VIP_RANGE_V4, "via", &gw4, "dev", CLIENT_IF])?;
        c.ip(&[
            "-6",
            "route",
            "add",
            VIP_RANGE_V6,
            "via",
            &gw6,
            "dev",
            CLIENT_IF,
        ])?;
        Ok(())
    }

    /// The client namespace, where probes run and kpr translates.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// The backends namespace, where servers run.
    pub fn backends(&self) -> &Netns {
        &self.backends
    }

    /// Adds a backend (pod) address to the backends side's veth
    /// (/32 or /128 without DAD) and a static neighbour for it on the
    /// client, so the client reaches it directly and at once.
    pub fn add_backend_ip(&self, ip: IpAddr) -> Result<()> {
        self.add_address(ip, BACKENDS_IF)?;
        static_neighbour(&self.client, CLIENT_IF, ip, BACKENDS_MAC)
    }

    /// Adds a VIP as a local address on the backends side's `lo`.
    ///
    /// A connect the client makes to the VIP that kpr did NOT translate is
    /// routed to the backends side and answered there, by a server the test
    /// binds on the VIP (typically with identity "untranslated"), instead of
    /// timing out. The VIP must be inside the routed VIP ranges.
    pub fn add_untranslated_vip(&self, ip: IpAddr) -> Result<()> {
        self.add_address(ip, "lo")
    }

    fn add_address(&self, ip: IpAddr, dev: &str) -> Result<()> {
        match ip {
            IpAddr::V4(v4) => self
                .backends
                .ip(&["addr", "add", &format!("{v4}/32"), "dev", dev]),
            IpAddr::V6(v6) => {
                let net = format!("{v6}/128");
                self.backends
                    .ip(&["-6", "addr", "add", &net, "dev", dev, "nodad"])?;
                wait_local_route(&self.backends, v6)
            }
        }
    }
}

/// Sets a permanent neighbour entry, so no first packet waits for ARP/ND.
pub fn static_neighbour(ns: &Netns, dev: &str, ip: IpAddr, mac: &str) -> Result<()> {
    ns.ip(&[
        "neigh",
        "replace",
        &ip.to_string(),
        "lladdr",
        mac,
        "nud",
        "permanent",
        "dev",
        dev,
    ])
}

/// Waits (bounded) until `dev` can carry packets.
///
/// Carrier (`LOWER_UP`) is not enough: the kernel's link watch work sets
/// the operational state and swaps the `noop` qdisc, which drops every
/// packet, for the real one asynchronously, and a SYN lost there costs a
/// one-second retransmit. So wait for `state UP` and a qdisc other than
/// `noop` as well.
pub fn wait_link_up(ns: &Netns, dev: &str) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < LINK_WAIT {
        let out = ns.ip_output(&["-o", "link", "show", "dev", dev])?;
        if link_ready(&out) {
            return Ok(());
        }
        std::thread::sleep(LINK_POLL);
    }
    Err(TestbedError::Timeout {
        what: format!("carrier on {dev} in netns {}", ns.name()),
        waited_ms: LINK_WAIT.as_millis() as u64,
    })
}

/// Waits (bounded) until the local route of an IPv6 address exists.
///
/// Even with `nodad`, the kernel finishes adding an IPv6 address from a
/// work queue: until then packets to it count as `Ip6InNoRoutes` and are
/// answered with "unreachable", which a connecting socket may drop
/// (`TCPLockDroppedIcmps`) and then wait a second to retransmit. IPv4
/// addresses are usable when `ip addr add` returns.
fn wait_local_route(ns: &Netns, ip: Ipv6Addr) -> Result<()> {
    let addr = ip.to_string();
    let start = Instant::now();
    while start.elapsed() < LINK_WAIT {
        let out = ns.ip_output(&["-6", "route", "show", "table", "local", &addr])?;
        if out.lines().any(|l| l.starts_with("local ")) {
            return Ok(());
        }
        std::thread::sleep(ROUTE_POLL);
    }
    Err(TestbedError::Timeout {
        what: format!("local route for {addr} in netns {}", ns.name()),
        waited_ms: LINK_WAIT.as_millis() as u64,
    })
}

/// Whether one `ip -o link show` line describes a link that forwards.
fn link_ready(line: &str) -> bool {
    line.contains("LOWER_UP") && line.contains(" state UP ") && !line.contains(" qdisc noop ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_is_ready_only_with_carrier_operstate_up_and_a_real_qdisc() {
        let ready = "7: veth-c@if6: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT";
        let no_qdisc = "7: veth-c@if6: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noop state UP mode DEFAULT";
        let operstate_pending = "7: veth-c@if6: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noop state DOWN mode DEFAULT";
        let no_carrier = "7: veth-c@if6: <NO-CARRIER,BROADCAST,MULTICAST,UP> mtu 1500 qdisc noqueue state LOWERLAYERDOWN";
        assert!(link_ready(ready));
        assert!(!link_ready(no_qdisc));
        assert!(!link_ready(operstate_pending));
        assert!(!link_ready(no_carrier));
    }

    #[test]
    fn backend_addresses_start_at_eleven() {
        assert_eq!(backend_v4(1).unwrap(), Ipv4Addr::new(10, 244, 0, 11));
        assert_eq!(backend_v4(200).unwrap(), Ipv4Addr::new(10, 244, 0, 210));
        assert_eq!(backend_v6(1).unwrap().to_string(), "fd00:10:244::11");
        assert_eq!(backend_v6(2).unwrap().to_string(), "fd00:10:244::12");
        assert!(backend_v4(0).is_err());
        assert!(backend_v6(201).is_err());
    }

    #[test]
    fn backend_v6_addresses_are_distinct() {
        let all: std::collections::BTreeSet<_> =
            (1..=200).map(|n| backend_v6(n).unwrap()).collect();
        assert_eq!(all.len(), 200);
    }
}
