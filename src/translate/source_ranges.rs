//! `spec.loadBalancerSourceRanges` (kube-proxy: `serviceport.go`,
//! `MapCIDRsByIPFamily`, the firewall chains of the iptables and nftables
//! proxiers): who may open flows to a LoadBalancer Service's ingress IPs.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::ServiceSpec;

use super::{IpFamily, Skips};
use crate::skip::SkipReason;

/// `spec.loadBalancerSourceRanges` as kube-proxy reads them: trimmed,
/// empty entries ignored, the others parsed as CIDRs (IPv4 octets with
/// leading zeros taken as decimal, as Go's ParseCIDRSloppy does), invalid
/// ones skipped; host bits cleared, IPv4-mapped IPv6 prefixes made IPv4;
/// sorted and deduplicated.
pub(super) fn source_ranges_of(spec: &ServiceSpec, skips: &mut Skips<'_>) -> Vec<IpNet> {
    let mut out = BTreeSet::new();
    for raw in spec.load_balancer_source_ranges.iter().flatten() {
        let text = raw.trim();
        if text.is_empty() {
            continue;
        }
        match parse_cidr_sloppy(text) {
            Some(net) => {
                out.insert(net);
            }
            None => skips.push(
                SkipReason::InvalidAddress,
                format!("loadBalancerSourceRanges entry {raw:?} is not a CIDR; ignored"),
            ),
        }
    }
    out.into_iter().collect()
}

/// The prefixes of `ranges` in `family`: the ranges of that family's
/// LoadBalancer frontends. None of them means open to all, as for
/// kube-proxy (each family is filtered on its own).
pub(super) fn family_ranges(ranges: &[IpNet], family: IpFamily) -> Vec<IpNet> {
    ranges
        .iter()
        .filter(|n| IpFamily::of(n.addr()) == family)
        .copied()
        .collect()
}

/// Whether a prefix of `ranges` holds one of the node's addresses: node-local
/// clients, whose source is not known at `connect()`, are then let in (see
/// `bpf/sock_lb.bpf.c`).
pub(super) fn ranges_admit_node(ranges: &[IpNet], node_ips: &BTreeSet<IpAddr>) -> bool {
    node_ips
        .iter()
        .any(|ip| ranges.iter().any(|n| n.contains(ip)))
}

/// A CIDR as Go's `netutils.ParseCIDRSloppy` takes it, normalised: host
/// bits cleared, an IPv6 prefix of IPv4-mapped addresses (/96 or longer)
/// made the IPv4 prefix it is.
pub(super) fn parse_cidr_sloppy(text: &str) -> Option<IpNet> {
    let (addr, len) = text.split_once('/')?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    let ip = if addr.contains(':') {
        addr.parse::<IpAddr>().ok()?
    } else {
        IpAddr::V4(parse_ipv4_decimal(addr)?)
    };
    let net = IpNet::new(ip, len).ok()?.trunc();
    Some(match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new(v4, v6.prefix_len() - 96).ok()?),
            None => net,
        },
        net => net,
    })
}

/// A dotted-quad IPv4 address whose octets may have leading zeros, read
/// as decimal ("010" is 10), not octal.
fn parse_ipv4_decimal(addr: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = addr.split('.');
    for o in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *o = part.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}
