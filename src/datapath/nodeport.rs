//! The north-south datapath's lifecycle: loading bpf/nodeport.bpf.c (and
//! bpf/nodeport_xdp.bpf.c) with their knobs, sharing the load balancer's
//! pinned maps, pinning their own, and attaching to the devices
//! `--devices` means (without it, the node's devices, detected) on tc
//! ingress and egress (and XDP): tcx with pinned links, or classic tc
//! filters where the kernel has no tcx ([`classic_tc`], `--tc-attach`);
//! and what is attached, for `kpr status`.
//!
//! Restart safety is the socket path's ([`link::attach_or_swap`]) or the
//! filter's in-place replacement, and conntrack survives in its pinned
//! map. Attaching in one tc mode detaches what the other left (the new
//! first, then the old). `--devices` names or patterns
//! are resolved against the links present ([`super::devices`]): a device
//! no longer meant by them, or gone, is detached and its pins removed; one
//! that does not exist yet is reported and attached when it appears (the
//! agent calls [`load_and_attach`] again on link changes). `kpr cleanup`
//! detaches every link under the bpf root, tcx ones included, and kpr's
//! classic tc filters.

#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::fs;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::OpenObject;
use serde::Serialize;

use crate::datapath::classic_tc;
pub use crate::datapath::config::{
    Acceleration, CtTimeouts, DeviceSelection, NoBackendResponse, NodePortConfig, NodePortMode,
    PortRange, TcAttach, DEFAULT_SNAT_PORTS,
};
use crate::datapath::devices;
pub use crate::datapath::devices::{devices_dsr_mss, dsr_mss};
use crate::datapath::interfaces;
use crate::datapath::link::{self, Attached, Attachment, Target};
use crate::datapath::pins::{
    self, MapName, MapSizes, TCX_LINK_PREFIX, TC_MARKER_PREFIX, XDP_LINK_PREFIX,
};
use crate::datapath::skel::nodeport::{NodeportSkel, NodeportSkelBuilder};
use crate::datapath::skel::nodeport_xdp::{NodeportXdpSkel, NodeportXdpSkelBuilder};

/// A direction of a tc attachment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// `ingress` or `egress`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    fn attach_type(self) -> u32 {
        match self {
            Direction::Ingress => libbpf_sys::BPF_TCX_INGRESS,
            Direction::Egress => libbpf_sys::BPF_TCX_EGRESS,
        }
    }

    fn tc_attach_point(self) -> libbpf_rs::TcAttachPoint {
        match self {
            Direction::Ingress => libbpf_rs::TC_INGRESS,
            Direction::Egress => libbpf_rs::TC_EGRESS,
        }
    }
}

/// The pin of a tcx link: `links/tcx_<device>_<direction>`.
fn tcx_link_pin(bpf_root: &Path, device: &str, dir: Direction) -> PathBuf {
    pins::link_pin(
        bpf_root,
        TCX_LINK_PREFIX,
        &format!("{device}_{}", dir.as_str()),
    )
}

/// The marker of a classic tc filter: `links/tc_<device>_<direction>`.
fn tc_marker_pin(bpf_root: &Path, device: &str, dir: Direction) -> PathBuf {
    pins::link_pin(
        bpf_root,
        TC_MARKER_PREFIX,
        &format!("{device}_{}", dir.as_str()),
    )
}

/// The pin of an XDP link: `links/xdp_<device>_<native|generic>`.
fn xdp_link_pin(bpf_root: &Path, device: &str, mode: &str) -> PathBuf {
    pins::link_pin(bpf_root, XDP_LINK_PREFIX, &format!("{device}_{mode}"))
}

/// What attaching did, for logs and `kpr status`.
#[derive(Debug, Default, Serialize)]
pub struct NodePortReport {
    /// How the tc programs are attached: `Tcx` or `Legacy`.
    pub tc_attach: TcAttach,
    /// `device/direction` whose pinned link got the new program.
    pub updated_links: Vec<String>,
    /// `device/direction` attached anew.
    pub created_links: Vec<String>,
    /// `device/direction` detached because the device left --devices.
    pub detached_links: Vec<String>,
    /// `device/mode` of the XDP programs attached or updated.
    pub xdp_links: Vec<String>,
    /// The conntrack map was pinned already (its flows go on).
    pub reused_ct: bool,
    /// The TCP MSS DSR SYN-ACKs are clamped to (0: no clamp).
    pub dsr_mss: u16,
    /// The devices attached to, name -> ifindex: every one present that
    /// `--devices` means.
    pub devices: BTreeMap<String, u32>,
    /// `--devices` names no interface has yet: attached when they appear.
    pub missing_devices: Vec<String>,
}

/// Held while the north-south programs are loaded and attached.
static ATTACHING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Loads the north-south programs (maps shared with the socket path and
/// pinned under `bpf_root`, which `loader::load_and_attach` set up) and
/// attaches them to every device present that `config` means; detaches
/// from every other device (gone, or no longer meant).
pub fn load_and_attach(
    bpf_root: &Path,
    sizes: &MapSizes,
    config: &NodePortConfig,
) -> Result<NodePortReport> {
    config.validate()?;
    // The device watcher and a map switch-over both attach: one at a time.
    let _one_at_a_time = ATTACHING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let present = devices::resolve(&config.devices).context("listing the network interfaces")?;
    // Set whatever the mode: a node takes DSR flows in from nodes in dsr
    // or hybrid mode also while it runs in snat mode itself. Read on every
    // (re-)attachment, so a device that appears later counts too.
    let mss = devices_dsr_mss(&present)?;
    // The agent resolves `auto` once at start; resolved here for callers
    // that did not.
    let mode = config
        .tc_attach
        .resolve(crate::datapath::sys::tcx_supported());
    let mut report = NodePortReport {
        tc_attach: mode,
        reused_ct: pins::pin_path(bpf_root, MapName::Conntrack).exists(),
        dsr_mss: mss,
        missing_devices: devices::missing(&config.devices, &present),
        devices: present.clone(),
        ..NodePortReport::default()
    };
    let devices: Vec<(String, u32)> = present.into_iter().collect();
    let mut storage = MaybeUninit::uninit();
    let skel = load_tc(&mut storage, bpf_root, sizes, config, mss)?;

    fs::create_dir_all(pins::links_dir(bpf_root)).context("creating links directory")?;
    for (device, index) in &devices {
        for dir in Direction::BOTH {
            let prog = match dir {
                Direction::Ingress => &skel.progs.kpr_np_ingress,
                Direction::Egress => &skel.progs.kpr_np_egress,
            };
            let what = format!("{device}/{}", dir.as_str());
            let attached = if mode == TcAttach::Legacy {
                let marker = tc_marker_pin(bpf_root, device, dir);
                classic_tc::attach_or_replace(&marker, prog, *index, dir.tc_attach_point())
                    .with_context(|| format!("attaching to classic tc {what}"))?
            } else {
                let target = Target::Tcx {
                    ifindex: *index,
                    attach_type: dir.attach_type(),
                };
                link::attach_or_swap(&tcx_link_pin(bpf_root, device, dir), prog, target)
                    .with_context(|| format!("attaching to tcx {what}"))?
            };
            match attached {
                Attached::Created => report.created_links.push(what),
                Attached::Swapped => report.updated_links.push(what),
            }
        }
    }
    let names: Vec<String> = report.devices.keys().cloned().collect();
    report.detached_links = detach_other_devices(bpf_root, &names, Some(mode))?;

    // XDP last: tc is in place for everything it hands on.
    let mut xdp_storage = MaybeUninit::uninit();
    let xdp_skel = match config.acceleration.xdp_mode() {
        None => None,
        Some(_) => Some(load_xdp(&mut xdp_storage, bpf_root, sizes, config, mss)?),
    };
    let keep: Vec<(String, &'static str)> = match (&xdp_skel, config.acceleration.xdp_mode()) {
        (Some(skel), Some(mode)) => {
            let skel: &NodeportXdpSkel = skel;
            for (device, index) in &devices {
                let target = Target::Xdp {
                    ifindex: *index,
                    flags: config.acceleration.xdp_flags(),
                };
                link::attach_or_swap(
                    &xdp_link_pin(bpf_root, device, mode),
                    &skel.progs.kpr_np_xdp,
                    target,
                )
                .with_context(|| format!("attaching XDP ({mode}) to {device}"))?;
                report.xdp_links.push(format!("{device}/{mode}"));
            }
            devices.iter().map(|(d, _)| (d.clone(), mode)).collect()
        }
        _ => Vec::new(),
    };
    report
        .detached_links
        .extend(detach_other_xdp(bpf_root, &keep)?);
    Ok(report)
}

/// Creates (or reuses) the north-south maps pinned under `bpf_root`
/// without attaching a program: an upgrade's new maps, filled before the
/// programs are swapped ([`super::loader::fill_before_attach`]).
pub fn create_maps(bpf_root: &Path, sizes: &MapSizes, config: &NodePortConfig) -> Result<()> {
    let mut storage = MaybeUninit::uninit();
    load_tc(&mut storage, bpf_root, sizes, config, 0).map(drop)
}

/// Opens and loads the tc object (bpf/nodeport.bpf.c) with `config`'s
/// knobs, `dsr_mss` as its MSS clamp and its maps shared or pinned under
/// `bpf_root`, attaching nothing: [`load_and_attach`]'s first step, and
/// what tests and benchmarks run with BPF_PROG_TEST_RUN.
pub fn load_tc<'obj>(
    storage: &'obj mut MaybeUninit<OpenObject>,
    bpf_root: &Path,
    sizes: &MapSizes,
    config: &NodePortConfig,
    dsr_mss: u16,
) -> Result<NodeportSkel<'obj>> {
    let mss = dsr_mss;
    let mut open = NodeportSkelBuilder::default()
        .open(storage)
        .context("opening the north-south BPF object")?;
    configure_open!(open, config, sizes, bpf_root, mss);
    // The tc object's own, sized as it defines them: the pods' devices it
    // hands packets through (datapath::peer_devices keeps it) and the
    // fragments' datagrams.
    let maps = &mut open.maps;
    pins::size_and_pin(
        &mut maps.kpr_peerdev_v1,
        bpf_root,
        MapName::PeerDevices,
        sizes,
    )?;
    pins::size_and_pin(&mut maps.kpr_frag_v1, bpf_root, MapName::Fragments, sizes)?;
    open.load().context(
        "loading the north-south BPF programs (a pinned map of an incompatible definition? run `kpr cleanup`)",
    )
}

/// Opens and loads the XDP object (bpf/nodeport_xdp.bpf.c) as [`load_tc`]
/// does the tc one, attaching nothing; its maps are the tc object's pins,
/// so [`load_tc`] comes first.
pub fn load_xdp<'obj>(
    storage: &'obj mut MaybeUninit<OpenObject>,
    bpf_root: &Path,
    sizes: &MapSizes,
    config: &NodePortConfig,
    dsr_mss: u16,
) -> Result<NodeportXdpSkel<'obj>> {
    let mss = dsr_mss;
    let mut open = NodeportXdpSkelBuilder::default()
        .open(storage)
        .context("opening the north-south XDP object")?;
    configure_open!(open, config, sizes, bpf_root, mss);
    open.load().context("loading the north-south XDP program")
}

/// Sets the knobs and map pins shared by the tc and XDP objects on an
/// open skeleton (their generated types differ, their fields do not).
macro_rules! configure_open {
    ($open:ident, $config:ident, $sizes:ident, $bpf_root:ident, $mss:ident) => {{
        let rodata = $open
            .maps
            .rodata_data
            .as_deref_mut()
            .context("the north-south object has no read-only data")?;
        rodata.snat_port_min = $config.snat_ports.min;
        rodata.snat_port_max = $config.snat_ports.max;
        rodata.ct_timeout_tcp_syn = $config.timeouts.tcp_syn;
        rodata.ct_timeout_tcp = $config.timeouts.tcp;
        rodata.ct_timeout_tcp_closing = $config.timeouts.tcp_closing;
        rodata.ct_timeout_udp = $config.timeouts.udp;
        rodata.nodeport_mode.0 = $config.mode.bpf_value();
        rodata.dsr_mss_max = $mss;
        rodata.no_backend_reject = u8::from($config.no_backend == NoBackendResponse::Reject);
        rodata.maglev_table_size = $config.maglev.table_size();
        rodata.maglev_hash_seed = $config.maglev.flow_hash_seed();
        // The load balancer's maps are the socket path's pins, reused;
        // then the north-south maps both objects share.
        let maps = &mut $open.maps;
        for (map, name) in pins::load_balancer_maps!(maps) {
            pins::size_and_pin(map, $bpf_root, name, $sizes)?;
        }
        for (map, name) in pins::observability_maps!(maps) {
            pins::size_and_pin(map, $bpf_root, name, $sizes)?;
        }
        for (map, name) in [
            (&mut maps.kpr_ct_v1, MapName::Conntrack),
            (&mut maps.kpr_dsr_v1, MapName::Dsr),
            (&mut maps.kpr_npstats_v2, MapName::NodePortStats),
        ] {
            pins::size_and_pin(map, $bpf_root, name, $sizes)?;
        }
    }};
}
use configure_open;

/// Detaches and unpins XDP links other than `keep` (device, mode).
fn detach_other_xdp(bpf_root: &Path, keep: &[(String, &str)]) -> Result<Vec<String>> {
    let mut detached = Vec::new();
    for (rest, pin) in pins::pinned_links(bpf_root, XDP_LINK_PREFIX)? {
        if keep.iter().any(|(d, m)| rest == format!("{d}_{m}")) {
            continue;
        }
        link::detach_and_unpin(&pin)?;
        detached.push(format!("xdp:{rest}"));
    }
    Ok(detached)
}

/// Detaches tc attachments of devices not in `keep` and every one of
/// the other mode than `mode` (all of them without a mode), tcx links and
/// classic tc filters alike, and removes their pins.
fn detach_other_devices(
    bpf_root: &Path,
    keep: &[String],
    mode: Option<TcAttach>,
) -> Result<Vec<String>> {
    let kept = |device: &String, of: TcAttach| mode == Some(of) && keep.contains(device);
    let mut detached = Vec::new();
    for (device, dir, pin) in pinned_by_direction(bpf_root, TCX_LINK_PREFIX)? {
        if kept(&device, TcAttach::Tcx) {
            continue;
        }
        link::detach_and_unpin(&pin)?;
        detached.push(format!("{device}/{}", dir.as_str()));
    }
    detached.extend(detach_markers(bpf_root, |device| {
        kept(device, TcAttach::Legacy)
    })?);
    Ok(detached)
}

/// Removes kpr's classic tc filters of the devices `keep` refuses, and
/// their markers; `device/direction` of each.
fn detach_markers(bpf_root: &Path, keep: impl Fn(&String) -> bool) -> Result<Vec<String>> {
    let markers: Vec<_> = pinned_by_direction(bpf_root, TC_MARKER_PREFIX)?
        .into_iter()
        .filter(|(device, ..)| !keep(device))
        .collect();
    if markers.is_empty() {
        return Ok(Vec::new());
    }
    // A device gone took its filters along: only the marker is left.
    let present = interfaces::by_name().context("listing the network interfaces")?;
    let mut detached = Vec::new();
    for (device, dir, marker) in markers {
        let index = present.get(&device).copied();
        classic_tc::detach(&marker, index, dir.tc_attach_point())
            .with_context(|| format!("detaching classic tc {device}/{}", dir.as_str()))?;
        detached.push(format!("{device}/{}", dir.as_str()));
    }
    Ok(detached)
}

/// (device, direction, pin) of every pin under `bpf_root` named
/// `links/<prefix><device>_<direction>`: tcx links or classic tc markers.
fn pinned_by_direction(bpf_root: &Path, prefix: &str) -> Result<Vec<(String, Direction, PathBuf)>> {
    Ok(pins::pinned_links(bpf_root, prefix)?
        .into_iter()
        .filter_map(|(rest, pin)| {
            Direction::BOTH.into_iter().find_map(|d| {
                rest.strip_suffix(&format!("_{}", d.as_str()))
                    .map(|dev| (dev.to_string(), d, pin.clone()))
            })
        })
        .collect())
}

/// A tc attachment as found in the bpf root, for `kpr status` and tests.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct AttachedDevice {
    pub device: String,
    pub direction: Direction,
    /// `Tcx` (a pinned link) or `Legacy` (a classic tc filter).
    pub attach: TcAttach,
    /// The interface index it is attached to; None when defunct (for a
    /// classic tc filter: when kpr's filter is not on the device).
    pub ifindex: Option<u32>,
}

/// The tc attachments pinned under `bpf_root`: tcx links, then classic
/// tc filters.
pub fn attached_devices(bpf_root: &Path) -> Vec<AttachedDevice> {
    let tcx = pinned_by_direction(bpf_root, TCX_LINK_PREFIX)
        .unwrap_or_default()
        .into_iter()
        .map(|(device, direction, pin)| AttachedDevice {
            device,
            direction,
            attach: TcAttach::Tcx,
            ifindex: match link::attachment_of(&pin) {
                Some(Attachment::Tcx { ifindex, .. }) => Some(ifindex),
                _ => None,
            },
        });
    let markers = pinned_by_direction(bpf_root, TC_MARKER_PREFIX).unwrap_or_default();
    let present = if markers.is_empty() {
        BTreeMap::new()
    } else {
        interfaces::by_name().unwrap_or_default()
    };
    let classic = markers.into_iter().map(|(device, direction, marker)| {
        let ifindex = present
            .get(&device)
            .copied()
            .filter(|index| classic_tc::is_attached(&marker, *index, direction.tc_attach_point()));
        AttachedDevice {
            device,
            direction,
            attach: TcAttach::Legacy,
            ifindex,
        }
    });
    tcx.chain(classic).collect()
}

/// The XDP attachments pinned under `bpf_root`, as `device/xdp-<mode>`.
pub fn attached_xdp(bpf_root: &Path) -> Vec<String> {
    let mut out: Vec<String> = pins::pinned_links(bpf_root, XDP_LINK_PREFIX)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(rest, _)| {
            let (device, mode) = rest.rsplit_once('_')?;
            Some(format!("{device}/xdp-{mode}"))
        })
        .collect();
    out.sort();
    out
}

/// Turns the north-south datapath off: detaches every tcx and XDP link and
/// classic tc filter and removes the pins of its own maps (an agent
/// started without --devices).
pub fn remove(bpf_root: &Path) -> Result<Vec<String>> {
    let mut detached = detach_other_xdp(bpf_root, &[])?;
    detached.extend(detach_other_devices(bpf_root, &[], None)?);
    for map in MapName::NORTH_SOUTH {
        let path = pins::pin_path(bpf_root, map);
        if path.exists() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(detached)
}

/// Warns when the SNAT ports overlap this namespace's ephemeral port range:
/// a local socket of the node and a SNATed flow could then share a tuple.
pub fn check_port_range(snat: PortRange) {
    let Ok(text) = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let mut it = text
        .split_whitespace()
        .filter_map(|t| t.parse::<u16>().ok());
    if let (Some(lo), Some(hi)) = (it.next(), it.next()) {
        if snat.min <= hi && lo <= snat.max {
            tracing::warn!(
                snat = %snat,
                ephemeral = %format!("{lo}-{hi}"),
                "the NodePort SNAT range overlaps net.ipv4.ip_local_port_range; \
                 move one of them (or list the SNAT range in ip_local_reserved_ports)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcx_link_pins_name_device_and_direction() {
        let p = tcx_link_pin(Path::new("/b"), "eth-c", Direction::Egress);
        assert_eq!(p, Path::new("/b/links/tcx_eth-c_egress"));
        let t = tc_marker_pin(Path::new("/b"), "eth-c", Direction::Ingress);
        assert_eq!(t, Path::new("/b/links/tc_eth-c_ingress"));
        let x = xdp_link_pin(Path::new("/b"), "eth-c", "native");
        assert_eq!(x, Path::new("/b/links/xdp_eth-c_native"));
    }
}
