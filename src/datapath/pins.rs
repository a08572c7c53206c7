//! Where kpr's BPF objects live under the bpf root: the identity and
//! pinned name of every map, the pins of the links, and the sizing rule
//! "a map already pinned keeps its capacity".
//!
//! Versions: each map's pinned name ends in its own layout version
//! (`kpr_svc_v1`, `kpr_npstats_v2`). A change of a map's key or value
//! layout (or of its type or flags) bumps that map's suffix and nothing
//! else; the next agent creates the new map, and once its programs are
//! attached [`remove_other_versions`] removes the pins of names no
//! [`MapName`] has any more. Maps whose layout did not change are reused
//! with their content, so an upgrade keeps translating throughout.

#![deny(unsafe_code)]

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapHandle, OpenMapMut};
use serde::Serialize;

/// Default --bpf-root.
pub const DEFAULT_BPF_ROOT: &str = "/sys/fs/bpf/kpr";

/// Every map kpr pins: the one identity used for pin names, metrics
/// (`map` label), `kpr status` and capacity errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MapName {
    /// Frontend slot 0 (master) and backend slots.
    Services,
    Backends,
    /// Session affinity (LRU).
    Affinity,
    /// Socket reverse NAT for `getpeername` and UDP replies (LRU).
    SockRevNat,
    /// loadBalancerSourceRanges: (frontend id, prefix), an LPM trie.
    SourceRanges,
    /// Frontend id -> Maglev table (north-south).
    Maglev,
    /// The node's own addresses, for the socket hooks (`host_addrs`).
    HostAddresses,
    /// North-south conntrack (LRU).
    Conntrack,
    /// North-south frontends' local backends for DSR (`dsr`).
    Dsr,
    /// The pods' devices packets may be redirected into (`peer_devices`).
    PeerDevices,
    /// The north-south counters (per-CPU array, enum np_stat).
    NodePortStats,
    /// Later IP fragments' ports, by datagram.
    Fragments,
    /// The socket hooks' counters (per-CPU array, enum sock_stat).
    SocketStats,
    /// Verdicts, packets and bytes per frontend id (per CPU; lb_verdict.h).
    FrontendStats,
    /// North-south packets and bytes per backend id (per CPU).
    BackendStats,
    /// `kpr monitor`'s ring buffer of load-balancing events (lb_monitor.h).
    Events,
    /// `kpr monitor`'s switch, sampling and rate (one entry).
    MonitorControl,
    /// Events emitted, sampled out, rate-limited and lost (per CPU).
    MonitorStats,
}

impl MapName {
    /// Every pinned map.
    pub const ALL: [MapName; 18] = [
        MapName::Services,
        MapName::Backends,
        MapName::Affinity,
        MapName::SockRevNat,
        MapName::SourceRanges,
        MapName::Maglev,
        MapName::HostAddresses,
        MapName::Conntrack,
        MapName::Dsr,
        MapName::PeerDevices,
        MapName::NodePortStats,
        MapName::Fragments,
        MapName::SocketStats,
        MapName::FrontendStats,
        MapName::BackendStats,
        MapName::Events,
        MapName::MonitorControl,
        MapName::MonitorStats,
    ];

    /// The observability maps: created by the socket-LB object and shared
    /// by the north-south ones (every hook counts and reports into them).
    pub const OBSERVABILITY: [MapName; 5] = [
        MapName::FrontendStats,
        MapName::BackendStats,
        MapName::Events,
        MapName::MonitorControl,
        MapName::MonitorStats,
    ];

    /// The load balancer's maps (the `LbMaps` seam): created by the
    /// socket-LB object and shared by the north-south ones.
    pub const LOAD_BALANCER: [MapName; 6] = [
        MapName::Services,
        MapName::Backends,
        MapName::Affinity,
        MapName::SockRevNat,
        MapName::SourceRanges,
        MapName::Maglev,
    ];

    /// The maps only the north-south datapath creates (removed when it is
    /// turned off).
    pub const NORTH_SOUTH: [MapName; 5] = [
        MapName::Conntrack,
        MapName::NodePortStats,
        MapName::Dsr,
        MapName::PeerDevices,
        MapName::Fragments,
    ];

    /// The maps whose fill is exported (`kpr_bpf_map_entries` and
    /// `kpr_bpf_map_capacity`): every map that can be full.
    pub const FILL_EXPORTED: [MapName; 10] = [
        MapName::Services,
        MapName::Backends,
        MapName::Affinity,
        MapName::SockRevNat,
        MapName::Conntrack,
        MapName::Dsr,
        MapName::SourceRanges,
        MapName::HostAddresses,
        MapName::PeerDevices,
        MapName::Maglev,
    ];

    /// The pinned name; its `_vN` suffix is this map's layout version.
    pub fn pin_name(self) -> &'static str {
        match self {
            MapName::Services => "kpr_svc_v1",
            MapName::Backends => "kpr_backends_v1",
            MapName::Affinity => "kpr_affinity_v1",
            MapName::SockRevNat => "kpr_sockrnat_v1",
            MapName::SourceRanges => "kpr_srcrange_v1",
            MapName::Maglev => "kpr_maglev_v1",
            MapName::HostAddresses => "kpr_hostaddr_v1",
            MapName::Conntrack => "kpr_ct_v1",
            MapName::Dsr => "kpr_dsr_v1",
            MapName::PeerDevices => "kpr_peerdev_v1",
            // v2: room for NP_STAT_SLOTS counters, so a new one is no
            // layout change.
            MapName::NodePortStats => "kpr_npstats_v2",
            MapName::Fragments => "kpr_frag_v1",
            MapName::SocketStats => "kpr_sockstats_v1",
            MapName::FrontendStats => "kpr_festats_v1",
            MapName::BackendStats => "kpr_bestats_v1",
            MapName::Events => "kpr_events_v1",
            MapName::MonitorControl => "kpr_monitor_v1",
            MapName::MonitorStats => "kpr_monstats_v1",
        }
    }

    /// The name in metrics (`map` label), status and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            MapName::Services => "services",
            MapName::Backends => "backends",
            MapName::Affinity => "affinity",
            MapName::SockRevNat => "sock_revnat",
            MapName::SourceRanges => "source_ranges",
            MapName::Maglev => "maglev",
            MapName::HostAddresses => "host_addresses",
            MapName::Conntrack => "conntrack",
            MapName::Dsr => "dsr",
            MapName::PeerDevices => "peer_devices",
            MapName::NodePortStats => "nodeport_stats",
            MapName::Fragments => "fragments",
            MapName::SocketStats => "socket_stats",
            MapName::FrontendStats => "frontend_stats",
            MapName::BackendStats => "backend_stats",
            MapName::Events => "events",
            MapName::MonitorControl => "monitor_control",
            MapName::MonitorStats => "monitor_stats",
        }
    }
}

impl fmt::Display for MapName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where `map` is pinned.
pub fn pin_path(bpf_root: &Path, map: MapName) -> PathBuf {
    bpf_root.join(map.pin_name())
}

/// The directory of the pinned links.
pub fn links_dir(bpf_root: &Path) -> PathBuf {
    bpf_root.join("links")
}

/// Prefix of the socket-LB links: `links/sock_<attach point>`.
pub const SOCK_LINK_PREFIX: &str = "sock_";
/// Prefix of the tcx links: `links/tcx_<device>_<ingress|egress>`.
pub const TCX_LINK_PREFIX: &str = "tcx_";
/// Prefix of the classic tc markers (the program of a cls_bpf filter, no
/// link): `links/tc_<device>_<ingress|egress>`.
pub const TC_MARKER_PREFIX: &str = "tc_";
/// Prefix of the XDP links: `links/xdp_<device>_<native|generic>`.
pub const XDP_LINK_PREFIX: &str = "xdp_";

/// The pin of a link: `links/<prefix><name>`.
pub fn link_pin(bpf_root: &Path, prefix: &str, name: &str) -> PathBuf {
    links_dir(bpf_root).join(format!("{prefix}{name}"))
}

/// (name after the prefix, pin) of every link pinned with `prefix`, sorted.
pub fn pinned_links(bpf_root: &Path, prefix: &str) -> Result<Vec<(String, PathBuf)>> {
    let dir = links_dir(bpf_root);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix(prefix) {
            out.push((rest.to_string(), entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Capacities for newly created maps. Maps that are already pinned keep
/// the capacity they were created with (changing it needs `kpr cleanup`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub affinity: u32,
    pub sock_revnat: u32,
    /// loadBalancerSourceRanges: one entry per (frontend, prefix).
    pub source_ranges: u32,
    /// North-south conntrack (two entries per flow).
    pub ct: u32,
    /// Maglev tables (one per north-south frontend with Maglev); each
    /// table's memory is its own, `4 x --maglev-table-size` bytes.
    pub maglev: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            services: 65536,
            backends: 65536,
            affinity: 65536,
            sock_revnat: 262144,
            source_ranges: 65536,
            ct: 131072,
            maglev: 65536,
        }
    }
}

impl MapSizes {
    /// The capacity asked for `map`; None for the maps sized as the BPF
    /// object defines them.
    pub fn requested(&self, map: MapName) -> Option<u32> {
        match map {
            MapName::Services => Some(self.services),
            MapName::Backends => Some(self.backends),
            MapName::Affinity => Some(self.affinity),
            MapName::SockRevNat => Some(self.sock_revnat),
            MapName::SourceRanges => Some(self.source_ranges),
            MapName::Maglev => Some(self.maglev),
            MapName::Conntrack => Some(self.ct),
            // One entry per north-south frontend and local backend: never
            // more than the services map has slots.
            MapName::Dsr => Some(self.services),
            // One entry per frontend or backend id: never more than the
            // services and backends maps have entries.
            MapName::FrontendStats => Some(self.services),
            MapName::BackendStats => Some(self.backends),
            MapName::HostAddresses
            | MapName::PeerDevices
            | MapName::NodePortStats
            | MapName::Fragments
            | MapName::SocketStats
            | MapName::Events
            | MapName::MonitorControl
            | MapName::MonitorStats => None,
        }
    }
}

/// Sizes `map` (of an open object) and sets its pin to `name`'s: an
/// existing pin keeps its capacity (and its content: libbpf reuses it), a
/// new one gets `sizes`' (or the object's own). Returns whether the pin
/// existed.
pub fn size_and_pin(
    map: &mut OpenMapMut<'_>,
    bpf_root: &Path,
    name: MapName,
    sizes: &MapSizes,
) -> Result<bool> {
    let pin = pin_path(bpf_root, name);
    let requested = sizes.requested(name).unwrap_or_else(|| map.max_entries());
    let reused = pin.exists();
    let size = if reused {
        let pinned = MapHandle::from_pinned_path(&pin)
            .with_context(|| format!("opening pinned map {}", pin.display()))?;
        if pinned.max_entries() != requested {
            tracing::warn!(map = %name, pinned = pinned.max_entries(), requested,
                "pinned map keeps its capacity; run `kpr cleanup` to resize");
        }
        pinned.max_entries()
    } else {
        requested
    };
    map.set_max_entries(size)
        .with_context(|| format!("sizing map {name}"))?;
    map.set_pin_path(&pin)
        .with_context(|| format!("pin path for map {name}"))?;
    Ok(reused)
}

/// Removes the pins of kpr maps no [`MapName`] has (another layout
/// version): unused once the programs of this version are attached.
pub fn remove_other_versions(bpf_root: &Path) -> Result<Vec<PathBuf>> {
    let current: Vec<&str> = MapName::ALL.iter().map(|m| m.pin_name()).collect();
    let mut removed = Vec::new();
    for entry in
        fs::read_dir(bpf_root).with_context(|| format!("reading {}", bpf_root.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("kpr_") && !current.contains(&name.as_str()) {
            fs::remove_file(entry.path()).with_context(|| format!("removing old pin {name}"))?;
            tracing::info!(pin = %name, "removed map of an older layout version");
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

/// The load-balancer maps ([`MapName::LOAD_BALANCER`]) of an open
/// skeleton, each with its identity: every object that shares them (the
/// socket hooks, tc, XDP) pins them from this one list, so their skeleton
/// fields and names cannot drift apart.
macro_rules! load_balancer_maps {
    ($maps:expr) => {
        [
            (&mut $maps.kpr_svc_v1, MapName::Services),
            (&mut $maps.kpr_backends_v1, MapName::Backends),
            (&mut $maps.kpr_affinity_v1, MapName::Affinity),
            (&mut $maps.kpr_sockrnat_v1, MapName::SockRevNat),
            (&mut $maps.kpr_srcrange_v1, MapName::SourceRanges),
            (&mut $maps.kpr_maglev_v1, MapName::Maglev),
        ]
    };
}
pub(crate) use load_balancer_maps;

/// The observability maps ([`MapName::OBSERVABILITY`]) of an open
/// skeleton, each with its identity, as [`load_balancer_maps`].
macro_rules! observability_maps {
    ($maps:expr) => {
        [
            (&mut $maps.kpr_festats_v1, MapName::FrontendStats),
            (&mut $maps.kpr_bestats_v1, MapName::BackendStats),
            (&mut $maps.kpr_events_v1, MapName::Events),
            (&mut $maps.kpr_monitor_v1, MapName::MonitorControl),
            (&mut $maps.kpr_monstats_v1, MapName::MonitorStats),
        ]
    };
}
pub(crate) use observability_maps;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn every_map_has_its_own_versioned_pin_and_name() {
        let pins: BTreeSet<&str> = MapName::ALL.iter().map(|m| m.pin_name()).collect();
        let names: BTreeSet<&str> = MapName::ALL.iter().map(|m| m.as_str()).collect();
        assert_eq!(pins.len(), MapName::ALL.len());
        assert_eq!(names.len(), MapName::ALL.len());
        for pin in pins {
            let version = pin.rsplit_once("_v").map(|(_, v)| v);
            assert!(
                pin.starts_with("kpr_") && version.is_some_and(|v| v.parse::<u32>().is_ok()),
                "{pin}"
            );
        }
    }

    #[test]
    fn the_pins_of_the_previous_version_are_the_current_ones() {
        // A node upgrades from pins of these names: renaming one loses its
        // content (and a layout change must bump its version instead).
        let pins: Vec<&str> = MapName::ALL.iter().map(|m| m.pin_name()).collect();
        assert_eq!(
            pins,
            [
                "kpr_svc_v1",
                "kpr_backends_v1",
                "kpr_affinity_v1",
                "kpr_sockrnat_v1",
                "kpr_srcrange_v1",
                "kpr_maglev_v1",
                "kpr_hostaddr_v1",
                "kpr_ct_v1",
                "kpr_dsr_v1",
                "kpr_peerdev_v1",
                "kpr_npstats_v2",
                "kpr_frag_v1",
                "kpr_sockstats_v1",
                "kpr_festats_v1",
                "kpr_bestats_v1",
                "kpr_events_v1",
                "kpr_monitor_v1",
                "kpr_monstats_v1",
            ]
        );
    }

    #[test]
    fn link_pins_name_prefix_and_target() {
        let p = link_pin(Path::new("/b"), TCX_LINK_PREFIX, "eth-c_egress");
        assert_eq!(p, Path::new("/b/links/tcx_eth-c_egress"));
    }
}
