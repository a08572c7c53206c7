//! Which interfaces the north-south programs belong on, now and as links
//! come and go: those `--devices` names, or, without it, the node's
//! devices as [`node_devices`] detects them.
//!
//! An entry of `--devices` is an interface name (`eth0`) or a prefix
//! pattern: a trailing `+` (Cilium's spelling, `eth+`) or `*` (`eth*`)
//! matches every name that starts with what precedes it. The set is
//! resolved against the links of the agent's network namespace whenever
//! they change: a netlink subscription to link changes (and, when
//! detecting, address and route changes: [`NetlinkEvents::devices`]) is
//! the trigger; the agent then resolves the set again ([`resolve`]) and
//! attaches to what is new, detaches from what is gone. A named device
//! that does not exist yet is not an error: it is attached when it
//! appears.

#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::io;

use anyhow::{bail, Context, Result};

use crate::datapath::{interfaces, node_devices, sys};

#[cfg(doc)]
use crate::datapath::netlink_events::NetlinkEvents;

/// Which interfaces carry north-south traffic.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceSelection {
    /// `--devices`: names and prefix patterns.
    Named(Vec<String>),
    /// No `--devices`: the node's devices, detected ([`node_devices`]).
    Detected,
}

impl DeviceSelection {
    /// `--devices` as given; empty when detecting.
    pub fn patterns(&self) -> &[String] {
        match self {
            DeviceSelection::Named(p) => p,
            DeviceSelection::Detected => &[],
        }
    }

    /// Refuses a malformed or empty `--devices` list.
    pub fn validate(&self) -> Result<()> {
        match self {
            DeviceSelection::Named(p) if p.is_empty() => {
                bail!("the north-south datapath needs at least one device (--devices)")
            }
            DeviceSelection::Named(p) => validate(p),
            DeviceSelection::Detected => Ok(()),
        }
    }
}

/// The interfaces of this namespace `selection` means now, name -> ifindex.
pub fn resolve(selection: &DeviceSelection) -> io::Result<BTreeMap<String, u32>> {
    match selection {
        DeviceSelection::Named(patterns) => matching(patterns),
        DeviceSelection::Detected => node_devices::detect(),
    }
}

/// Checks `--devices` entries: interface names (at most 15 bytes, no `/`,
/// no whitespace) with an optional trailing `+` or `*`, which may stand
/// alone (every interface).
pub fn validate(patterns: &[String]) -> Result<()> {
    for p in patterns {
        let name = p.strip_suffix(['+', '*']).unwrap_or(p);
        if name.len() >= libc::IFNAMSIZ
            || name.contains(['/', '+', '*'])
            || name.chars().any(char::is_whitespace)
            || (name.is_empty() && !is_pattern(p))
        {
            bail!(
                "--devices {p:?}: not an interface name (1-15 characters, no '/' or spaces) \
                 or a prefix pattern with a trailing '+' or '*'"
            );
        }
    }
    Ok(())
}

/// Whether `pattern` is a prefix pattern rather than one name.
pub fn is_pattern(pattern: &str) -> bool {
    pattern.ends_with(['+', '*'])
}

/// Whether interface `name` is meant by `pattern`.
pub fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix(['+', '*']) {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

/// The interfaces of this network namespace, name -> ifindex.
pub fn links() -> io::Result<BTreeMap<String, u32>> {
    interfaces::by_name()
}

/// The interfaces of this namespace that `patterns` mean, name -> ifindex.
pub fn matching(patterns: &[String]) -> io::Result<BTreeMap<String, u32>> {
    Ok(links()?
        .into_iter()
        .filter(|(name, _)| patterns.iter().any(|p| matches(p, name)))
        .collect())
}

/// The plain names of `selection` that no interface has (yet).
pub fn missing(selection: &DeviceSelection, present: &BTreeMap<String, u32>) -> Vec<String> {
    selection
        .patterns()
        .iter()
        .filter(|p| !is_pattern(p) && !present.contains_key(p.as_str()))
        .cloned()
        .collect()
}

/// The MTU of `device` in this network namespace (SIOCGIFMTU).
pub fn device_mtu(device: &str) -> Result<u32> {
    let mtu = sys::device_mtu(device).with_context(|| format!("reading the MTU of {device}"))?;
    u32::try_from(mtu).with_context(|| format!("MTU {mtu} of {device}"))
}

/// Bytes a DSR packet needs besides its TCP payload: outer and inner IPv4
/// headers and the TCP header (20 each).
const DSR_MSS_OVERHEAD: u32 = 60;

/// The MSS DSR SYN-ACKs are clamped to: the smallest MTU of `mtus` minus
/// [`DSR_MSS_OVERHEAD`]; 0 (no clamp) without any MTU.
pub fn dsr_mss(mtus: &[u32]) -> u16 {
    mtus.iter()
        .min()
        .map(|m| m.saturating_sub(DSR_MSS_OVERHEAD).min(u32::from(u16::MAX)) as u16)
        .unwrap_or(0)
}

/// The MSS DSR SYN-ACKs are clamped to on `devices` (name -> ifindex):
/// [`dsr_mss`] of their MTUs, read now. The agent reads it on every
/// (re-)attachment, and its device watcher attaches again when it changes
/// (a device's MTU changed).
pub fn devices_dsr_mss(devices: &std::collections::BTreeMap<String, u32>) -> Result<u16> {
    let mtus: Vec<u32> = devices
        .keys()
        .map(|d| device_mtu(d))
        .collect::<Result<_>>()?;
    Ok(dsr_mss(&mtus))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_match_exactly_and_patterns_by_prefix() {
        assert!(matches("eth0", "eth0"));
        assert!(!matches("eth0", "eth01"));
        assert!(!matches("eth", "eth0"));
        for p in ["eth+", "eth*"] {
            assert!(matches(p, "eth0") && matches(p, "eth-late") && matches(p, "eth"));
            assert!(!matches(p, "veth0") && !matches(p, "lo"));
        }
        assert!(matches("+", "anything") && matches("*", "lo"));
    }

    #[test]
    fn bad_entries_are_refused_by_name() {
        assert!(validate(&v(&["eth0", "eth+", "ens*", "*", "bond0.100"])).is_ok());
        for bad in ["", "a/b", "eth 0", "e+th", "eth**", "averyveryverylongname"] {
            let err = validate(&v(&[bad])).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }

    #[test]
    fn only_plain_names_can_be_missing() {
        let present: BTreeMap<String, u32> = [("eth-c".to_string(), 2)].into();
        let named = DeviceSelection::Named(v(&["eth-c", "eth-late", "ens+"]));
        assert_eq!(missing(&named, &present), ["eth-late"]);
        assert!(missing(&DeviceSelection::Detected, &present).is_empty());
    }

    #[test]
    fn the_dsr_mss_leaves_room_for_both_ip_headers_and_tcp() {
        assert_eq!(dsr_mss(&[1500, 9000]), 1440);
        assert_eq!(dsr_mss(&[9000]), 8940);
        assert_eq!(dsr_mss(&[]), 0);
        assert_eq!(dsr_mss(&[40]), 0);
    }

    #[test]
    fn this_namespace_has_loopback() {
        let links = links().unwrap();
        assert!(links.contains_key("lo"), "{links:?}");
        let lo = matching(&v(&["l+"])).unwrap();
        assert!(lo.contains_key("lo"));
    }
}
