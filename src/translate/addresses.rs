//! The addresses a Service is reached at, per IP family: its clusterIPs,
//! `spec.externalIPs`, load-balancer ingress IPs, and the node addresses
//! its NodePorts are served on.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{Service, ServiceSpec};

use super::Skips;
use crate::skip::SkipReason;

/// An IP family, as kube-proxy's `ip_family` metric label spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// `IPv4` or `IPv6` (also the EndpointSlice `addressType`).
    pub fn as_label(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_label())
    }
}

/// The clusterIP of each family: the first one of the family in
/// `clusterIPs` (or `clusterIP` when that is empty), as kube-proxy's
/// `GetClusterIPByFamily`. None when the Service is headless or has no
/// clusterIP. Unparsable addresses and extra ones of a family are skips.
pub(super) fn cluster_ips_by_family(
    spec: &ServiceSpec,
    skips: &mut Skips<'_>,
) -> Option<BTreeMap<IpFamily, IpAddr>> {
    let mut ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.as_deref());
    }
    ips.retain(|ip| !ip.is_empty());
    if ips.is_empty() || ips.contains(&"None") {
        return None;
    }
    let mut out = BTreeMap::new();
    for ip in ips {
        match ip.parse::<IpAddr>() {
            Ok(addr) => match out.entry(IpFamily::of(addr)) {
                Entry::Vacant(e) => {
                    e.insert(addr);
                }
                Entry::Occupied(e) => skips.push(
                    SkipReason::InvalidAddress,
                    format!("clusterIP {ip} is a second {} clusterIP", e.key()),
                ),
            },
            Err(_) => skips.push(
                SkipReason::InvalidAddress,
                format!("clusterIP {ip:?} is not an IP address"),
            ),
        }
    }
    Some(out)
}

/// `spec.externalIPs` of the families the Service has a clusterIP of.
pub(super) fn external_ips(
    spec: &ServiceSpec,
    cluster_ips: &BTreeMap<IpFamily, IpAddr>,
    skips: &mut Skips<'_>,
) -> Vec<IpAddr> {
    let raw = spec.external_ips.iter().flatten().map(String::as_str);
    addresses_of(raw, "externalIP", cluster_ips, skips)
}

/// The `status.loadBalancer.ingress[].ip` addresses kube-proxy programs:
/// those whose `ipMode` is `VIP` or unset (its `IsVIPMode`). A `Proxy`
/// load balancer delivers to the node itself, so its IP is not a frontend.
pub(super) fn load_balancer_vips(
    svc: &Service,
    cluster_ips: &BTreeMap<IpFamily, IpAddr>,
    skips: &mut Skips<'_>,
) -> Vec<IpAddr> {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter(|ing| matches!(ing.ip_mode.as_deref(), None | Some("VIP")))
        .filter_map(|ing| ing.ip.as_deref())
        .filter(|ip| !ip.is_empty());
    addresses_of(ingress, "load balancer ingress IP", cluster_ips, skips)
}

/// Parses `what` addresses, keeping those of a family the Service has a
/// clusterIP of (kube-proxy programs each family from its clusterIP);
/// the others are skips.
fn addresses_of<'a>(
    raw: impl Iterator<Item = &'a str>,
    what: &str,
    cluster_ips: &BTreeMap<IpFamily, IpAddr>,
    skips: &mut Skips<'_>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for ip in raw {
        match ip.parse::<IpAddr>() {
            Ok(addr) if cluster_ips.contains_key(&IpFamily::of(addr)) => out.push(addr),
            Ok(addr) => skips.push(
                SkipReason::InvalidAddress,
                format!(
                    "{what} {ip} is {} but the Service has no {} clusterIP",
                    IpFamily::of(addr),
                    IpFamily::of(addr)
                ),
            ),
            Err(_) => skips.push(
                SkipReason::InvalidAddress,
                format!("{what} {ip:?} is not an IP address"),
            ),
        }
    }
    out
}

/// The addresses a NodePort is served on in `family`: the node's addresses
/// of that family, plus the family's stand-in for every other address of
/// the node, which the socket hooks look up for a node address no frontend
/// has (`bpf/include/lb_hostaddr.h`): `127.0.0.1` for IPv4 (itself served:
/// kube-proxy's iptables mode serves localhost NodePorts), `[::]` for IPv6
/// (Cilium's `[::]:nodePort`: node-local clients reach an IPv6 NodePort on
/// every IPv6 address of the node, `[::1]` included, as with Cilium).
pub(super) fn node_port_addresses(
    node_ips: &BTreeSet<IpAddr>,
    family: IpFamily,
) -> BTreeSet<IpAddr> {
    let every_address = match family {
        IpFamily::V4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpFamily::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    of_family(node_ips, family).chain([every_address]).collect()
}

/// The addresses of `ips` in `family`, in their order.
pub(super) fn of_family<'a>(
    ips: impl IntoIterator<Item = &'a IpAddr>,
    family: IpFamily,
) -> impl Iterator<Item = IpAddr> {
    ips.into_iter()
        .copied()
        .filter(move |ip| IpFamily::of(*ip) == family)
}
