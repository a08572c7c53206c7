//! What the north-south datapath is configured with: plain types, free of
//! any CLI library (src/cli.rs gives them their flags), each with the
//! datapath value it stands for.

#![deny(unsafe_code)]

use anyhow::Result;
use serde::{Deserialize, Serialize};

pub use crate::datapath::devices::DeviceSelection;

/// How NodePort traffic reaches a backend on another node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodePortMode {
    /// Source-NAT to the node: replies come back through this node.
    Snat,
    /// Direct server return: the packet goes IPIP-encapsulated to the
    /// backend's node (which needs kpr too), the backend sees the client's
    /// address and its reply goes straight to the client.
    Dsr,
    /// DSR for TCP, SNAT for UDP.
    Hybrid,
}

impl NodePortMode {
    /// The datapath's `enum np_mode` value.
    pub(crate) fn bpf_value(self) -> u32 {
        use crate::datapath::skel::nodeport::types::np_mode;
        match self {
            NodePortMode::Snat => np_mode::NP_MODE_SNAT.0,
            NodePortMode::Dsr => np_mode::NP_MODE_DSR.0,
            NodePortMode::Hybrid => np_mode::NP_MODE_HYBRID.0,
        }
    }
}

/// Whether north-south ingress is handled in XDP before the stack (tc
/// stays attached for what XDP hands on and for egress).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Acceleration {
    /// tc (tcx) only.
    Disabled,
    /// XDP in the driver (XDP_FLAGS_DRV_MODE); fails on devices without it.
    Native,
    /// XDP in generic (skb) mode, on any device.
    Generic,
}

impl Acceleration {
    /// `native` or `generic`; None when disabled.
    pub(crate) fn xdp_mode(self) -> Option<&'static str> {
        match self {
            Acceleration::Disabled => None,
            Acceleration::Native => Some("native"),
            Acceleration::Generic => Some("generic"),
        }
    }

    pub(crate) fn xdp_flags(self) -> u32 {
        match self {
            Acceleration::Disabled => 0,
            Acceleration::Native => libbpf_sys::XDP_FLAGS_DRV_MODE,
            Acceleration::Generic => libbpf_sys::XDP_FLAGS_SKB_MODE,
        }
    }
}

/// How the north-south tc programs are attached (`--tc-attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcAttach {
    /// tcx where the kernel has it (6.6+), classic tc otherwise.
    #[default]
    Auto,
    /// tcx: pinned BPF links; a restart swaps the program behind them.
    Tcx,
    /// Classic tc: a clsact qdisc and one cls_bpf direct-action filter per
    /// direction; a restart replaces the filter in place (same handle and
    /// priority, NLM_F_REPLACE).
    Legacy,
}

impl TcAttach {
    /// What `self` comes to on a kernel with or without tcx: `Tcx` or
    /// `Legacy`, never `Auto`.
    pub fn resolve(self, tcx_available: bool) -> TcAttach {
        match self {
            TcAttach::Auto if tcx_available => TcAttach::Tcx,
            TcAttach::Auto => TcAttach::Legacy,
            forced => forced,
        }
    }

    /// `auto`, `tcx` or `legacy`, as the flag spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            TcAttach::Auto => "auto",
            TcAttach::Tcx => "tcx",
            TcAttach::Legacy => "legacy",
        }
    }
}

/// What a north-south client opening a flow to a frontend without any
/// backend gets (Cilium's --service-no-backend-response).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NoBackendResponse {
    /// ICMP destination unreachable (port unreachable), for TCP and UDP
    /// alike: what kube-proxy's REJECT sends.
    Reject,
    /// Nothing: the packet is dropped.
    Drop,
}

/// Conntrack lifetimes, in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CtTimeouts {
    /// TCP until the backend answers.
    pub tcp_syn: u32,
    /// TCP established.
    pub tcp: u32,
    /// TCP after FIN or RST.
    pub tcp_closing: u32,
    /// UDP since the last packet.
    pub udp: u32,
}

impl Default for CtTimeouts {
    fn default() -> Self {
        CtTimeouts {
            tcp_syn: 60,
            tcp: 21600,
            tcp_closing: 10,
            udp: 60,
        }
    }
}

/// An inclusive port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl std::str::FromStr for PortRange {
    type Err = String;

    /// `61000-65535`.
    fn from_str(s: &str) -> Result<PortRange, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not a port range MIN-MAX"))?;
        let port = |t: &str| {
            t.trim()
                .parse::<u16>()
                .map_err(|e| format!("{t:?} in {s:?}: {e}"))
        };
        let (min, max) = (port(a)?, port(b)?);
        if min == 0 || min > max {
            return Err(format!("{s:?}: need 1 <= MIN <= MAX"));
        }
        Ok(PortRange { min, max })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

/// Default SNAT ports: above Linux's default ephemeral range (32768-60999),
/// so SNATed flows never take a port a local socket of the node may use.
pub const DEFAULT_SNAT_PORTS: PortRange = PortRange {
    min: 61000,
    max: 65535,
};

/// Everything the north-south datapath needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodePortConfig {
    /// Interfaces to attach to (tc ingress and egress): `--devices` names
    /// or prefix patterns, or the node's devices, detected (see
    /// [`super::devices`]).
    pub devices: DeviceSelection,
    pub mode: NodePortMode,
    pub acceleration: Acceleration,
    /// tcx or classic tc; `Auto` is resolved by probing the kernel.
    pub tc_attach: TcAttach,
    pub snat_ports: PortRange,
    /// Answer to new flows to frontends without backend.
    pub no_backend: NoBackendResponse,
    /// Packets for local backends go straight into the pod's namespace
    /// (the agent lists the pods' devices, `datapath::peer_devices`).
    pub redirect_peer: bool,
    pub timeouts: CtTimeouts,
    /// Table size and flow hash seed of Maglev selection (the tables
    /// themselves are the reconciler's).
    pub maglev: crate::maglev::MaglevParams,
}

impl NodePortConfig {
    /// Refuses a configuration the datapath cannot run: an empty
    /// `--devices` list, or a malformed entry (named).
    pub fn validate(&self) -> Result<()> {
        self.devices.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_print_as_min_dash_max() {
        let r: PortRange = "61000-65535".parse().unwrap();
        assert_eq!(r, DEFAULT_SNAT_PORTS);
        assert_eq!(r.to_string(), "61000-65535");
        assert!("65535-61000".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("61000".parse::<PortRange>().is_err());
        assert!("1-70000".parse::<PortRange>().is_err());
    }

    #[test]
    fn every_mode_and_acceleration_is_accepted_with_devices() {
        let ok = NodePortConfig {
            devices: DeviceSelection::Named(vec!["eth0".into()]),
            mode: NodePortMode::Snat,
            acceleration: Acceleration::Disabled,
            tc_attach: TcAttach::Auto,
            snat_ports: DEFAULT_SNAT_PORTS,
            no_backend: NoBackendResponse::Reject,
            redirect_peer: true,
            timeouts: CtTimeouts::default(),
            maglev: Default::default(),
        };
        for mode in [NodePortMode::Snat, NodePortMode::Dsr, NodePortMode::Hybrid] {
            for acceleration in [
                Acceleration::Disabled,
                Acceleration::Native,
                Acceleration::Generic,
            ] {
                let c = NodePortConfig {
                    mode,
                    acceleration,
                    ..ok.clone()
                };
                assert!(c.validate().is_ok(), "{c:?}");
            }
        }
        let bad = NodePortConfig {
            devices: DeviceSelection::Named(vec!["eth0".into(), "a/b".into()]),
            ..ok.clone()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("\"a/b\""), "{err}");
        let none = NodePortConfig {
            devices: DeviceSelection::Named(Vec::new()),
            ..ok.clone()
        };
        assert!(none.validate().is_err());
        let detected = NodePortConfig {
            devices: DeviceSelection::Detected,
            ..ok
        };
        assert!(detected.validate().is_ok());
    }

    #[test]
    fn auto_attach_is_tcx_where_the_kernel_has_it_and_classic_tc_elsewhere() {
        assert_eq!(TcAttach::Auto.resolve(true), TcAttach::Tcx);
        assert_eq!(TcAttach::Auto.resolve(false), TcAttach::Legacy);
        assert_eq!(TcAttach::Legacy.resolve(true), TcAttach::Legacy);
        assert_eq!(TcAttach::Tcx.resolve(false), TcAttach::Tcx);
    }

    #[test]
    fn modes_map_to_the_datapath_enum() {
        assert_eq!(NodePortMode::Snat.bpf_value(), 0);
        assert_eq!(NodePortMode::Dsr.bpf_value(), 1);
        assert_eq!(NodePortMode::Hybrid.bpf_value(), 2);
    }
}
