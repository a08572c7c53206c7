//! The north-south datapath's lifecycle: loading bpf/nodeport.bpf.c with
//! its knobs, sharing the load balancer's pinned maps, pinning the
//! conntrack, DSR and counter maps, and attaching to `--devices` on tcx
//! ingress and egress with pinned links.
//!
//! Restart safety is the socket path's: a restarted agent swaps the
//! program behind each pinned tcx link (BPF_LINK_UPDATE), so packets are
//! never seen by no program, and conntrack survives in its pinned map.
//! `--devices` names or patterns are resolved against the links present
//! ([`super::devices`]): a device no longer meant by them, or gone, is
//! detached and its pins removed; one that does not exist yet is reported
//! and attached when it appears (the agent calls [`load_and_attach`] again
//! on link changes). `kpr cleanup` detaches every link under the bpf root,
//! tcx ones included.

use std::ffi::CString;
use std::fs;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use anyhow::{bail, Context, Result};
use libbpf_rs::query::LinkTypeInfo;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{AsRawLibbpf, Link, OpenObject, ProgramMut};
use serde::Serialize;

use crate::datapath::devices;
use crate::datapath::loader::{self, LoadReport, MapSizes};
use crate::datapath::maps::MapName;
use crate::datapath::peer_devices::PEERDEV_PIN;
use crate::datapath::skel::nodeport::{NodeportSkel, NodeportSkelBuilder};
use crate::datapath::skel::nodeport_xdp::{NodeportXdpSkel, NodeportXdpSkelBuilder};
use std::os::fd::{AsFd, AsRawFd, FromRawFd};

/// Pinned name of the conntrack map (its suffix is the layout version).
pub const CT_PIN: &str = "kpr_ct_v1";
/// Pinned name of the north-south counters (v2: room for 32 counters, so
/// a new one is no layout change).
pub const STATS_PIN: &str = "kpr_npstats_v2";
/// Pinned name of the DSR map (frontend, local backend -> backend id),
/// which `datapath::dsr` keeps in step with the services map.
pub const DSR_PIN: &str = "kpr_dsr_v1";
/// Pinned name of the fragment map (a datagram's ports, from its first
/// fragment, for the later ones): pinned so that fragments crossing an
/// agent restart or a re-attachment still find their datagram.
pub const FRAG_PIN: &str = "kpr_frag_v1";
/// The pins only the north-south datapath creates.
pub const PINS: [&str; 5] = [CT_PIN, STATS_PIN, DSR_PIN, PEERDEV_PIN, FRAG_PIN];

/// How NodePort traffic reaches a backend on another node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
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
    fn bpf_value(self) -> u32 {
        use crate::datapath::skel::nodeport::types::np_mode;
        match self {
            NodePortMode::Snat => np_mode::NP_MODE_SNAT.0,
            NodePortMode::Dsr => np_mode::NP_MODE_DSR.0,
            NodePortMode::Hybrid => np_mode::NP_MODE_HYBRID.0,
        }
    }
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

/// Whether north-south ingress is handled in XDP before the stack (tc
/// stays attached for what XDP hands on and for egress).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
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
    fn xdp_mode(self) -> Option<&'static str> {
        match self {
            Acceleration::Disabled => None,
            Acceleration::Native => Some("native"),
            Acceleration::Generic => Some("generic"),
        }
    }

    fn xdp_flags(self) -> u32 {
        match self {
            Acceleration::Disabled => 0,
            Acceleration::Native => libbpf_sys::XDP_FLAGS_DRV_MODE,
            Acceleration::Generic => libbpf_sys::XDP_FLAGS_SKB_MODE,
        }
    }
}

/// What a north-south client opening a flow to a frontend without any
/// backend gets (Cilium's --service-no-backend-response).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
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
    /// Interfaces to attach to (tcx ingress and egress): names, or prefix
    /// patterns with a trailing `+` or `*` (see [`super::devices`]).
    pub devices: Vec<String>,
    pub mode: NodePortMode,
    pub acceleration: Acceleration,
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
    /// Refuses a configuration the datapath cannot run: no `--devices`
    /// entry, or a malformed one (named).
    pub fn validate(&self) -> Result<()> {
        if self.devices.is_empty() {
            bail!("the north-south datapath needs at least one device (--devices)");
        }
        devices::validate(&self.devices)
    }
}

/// A direction of a tcx attachment.
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
}

/// Prefix of the pinned tcx links: `links/tcx_<device>_<direction>`.
const TCX_LINK_PREFIX: &str = "tcx_";

fn tcx_link_pin(bpf_root: &Path, device: &str, dir: Direction) -> PathBuf {
    bpf_root
        .join("links")
        .join(format!("{TCX_LINK_PREFIX}{device}_{}", dir.as_str()))
}

/// The interface index of `device` in this network namespace.
pub fn ifindex(device: &str) -> Result<u32> {
    let name = CString::new(device).with_context(|| format!("device name {device:?}"))?;
    // SAFETY: a NUL-terminated string; if_nametoindex only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!(
            "device {device:?} not found in this network namespace: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(index)
}

/// The MTU of `device` in this network namespace (SIOCGIFMTU).
pub fn device_mtu(device: &str) -> Result<u32> {
    use std::os::fd::OwnedFd;
    let name = device.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        bail!("device name {device:?} is too long");
    }
    // SAFETY: socket(2) has no memory preconditions.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for SIOCGIFMTU");
    }
    // SAFETY: a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain data; all-zero is a valid (empty) request.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU reads the name and writes ifru_mtu of a valid ifreq.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU as _, &mut ifr) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("reading the MTU of {device}"));
    }
    // SAFETY: SIOCGIFMTU filled the ifru_mtu member.
    let mtu = unsafe { ifr.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).with_context(|| format!("MTU {mtu} of {device}"))
}

/// What attaching did, for logs and `kpr status`.
#[derive(Debug, Default, Serialize)]
pub struct NodePortReport {
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
    pub devices: std::collections::BTreeMap<String, u32>,
    /// `--devices` names no interface has yet: attached when they appear.
    pub missing_devices: Vec<String>,
}

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
    let present = devices::matching(&config.devices).context("listing the network interfaces")?;
    // Set whatever the mode: a node takes DSR flows in from nodes in dsr
    // or hybrid mode also while it runs in snat mode itself. Read on every
    // (re-)attachment, so a device that appears later counts too.
    let mss = devices_dsr_mss(&present)?;
    let mut report = NodePortReport {
        reused_ct: bpf_root.join(CT_PIN).exists(),
        dsr_mss: mss,
        missing_devices: devices::missing(&config.devices, &present),
        devices: present.clone(),
        ..NodePortReport::default()
    };
    let devices: Vec<(String, u32)> = present.into_iter().collect();
    let mut storage = MaybeUninit::uninit();
    let skel = load_tc(&mut storage, bpf_root, sizes, config, mss)?;

    fs::create_dir_all(bpf_root.join("links")).context("creating links directory")?;
    for (device, index) in &devices {
        for dir in Direction::BOTH {
            let prog = match dir {
                Direction::Ingress => &skel.progs.kpr_np_ingress,
                Direction::Egress => &skel.progs.kpr_np_egress,
            };
            let what = format!("{device}/{}", dir.as_str());
            let created = attach_tcx(bpf_root, device, *index, dir, prog)
                .with_context(|| format!("attaching to tcx {what}"))?;
            if created {
                report.created_links.push(what);
            } else {
                report.updated_links.push(what);
            }
        }
    }
    let names: Vec<String> = report.devices.keys().cloned().collect();
    report.detached_links = detach_other_devices(bpf_root, &names)?;

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
                attach_xdp(
                    bpf_root,
                    device,
                    *index,
                    config.acceleration,
                    &skel.progs.kpr_np_xdp,
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
    for (map, pin) in [
        (&mut maps.kpr_peerdev_v1, PEERDEV_PIN),
        (&mut maps.kpr_frag_v1, FRAG_PIN),
    ] {
        let size = map.max_entries();
        loader::size_and_pin(map, &bpf_root.join(pin), size)?;
    }
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
        // The load balancer's maps are the socket path's pins, reused.
        let mut shared = LoadReport::default();
        let maps = &mut $open.maps;
        for (map, name) in [
            (&mut maps.kpr_svc_v1, MapName::Services),
            (&mut maps.kpr_backends_v1, MapName::Backends),
            (&mut maps.kpr_affinity_v1, MapName::Affinity),
            (&mut maps.kpr_sockrnat_v1, MapName::SockRevNat),
            (&mut maps.kpr_srcrange_v1, MapName::SourceRanges),
            (&mut maps.kpr_maglev_v1, MapName::Maglev),
        ] {
            loader::set_map_size(map, $bpf_root, name, $sizes, &mut shared)?;
        }
        loader::size_and_pin(&mut maps.kpr_ct_v1, &$bpf_root.join(CT_PIN), $sizes.ct)?;
        // One entry per north-south frontend and local backend: never more
        // than the services map has slots.
        loader::size_and_pin(
            &mut maps.kpr_dsr_v1,
            &$bpf_root.join(DSR_PIN),
            $sizes.services,
        )?;
        let stats_size = maps.kpr_npstats_v2.max_entries();
        loader::size_and_pin(
            &mut maps.kpr_npstats_v2,
            &$bpf_root.join(STATS_PIN),
            stats_size,
        )?;
    }};
}
use configure_open;

/// Prefix of the pinned XDP links: `links/xdp_<device>_<native|generic>`.
const XDP_LINK_PREFIX: &str = "xdp_";

fn xdp_link_pin(bpf_root: &Path, device: &str, mode: &str) -> PathBuf {
    bpf_root
        .join("links")
        .join(format!("{XDP_LINK_PREFIX}{device}_{mode}"))
}

/// Attaches the XDP program to `device` in the mode of `accel`, or swaps
/// it into the pinned link already there.
fn attach_xdp(
    bpf_root: &Path,
    device: &str,
    index: u32,
    accel: Acceleration,
    prog: &ProgramMut<'_>,
) -> Result<()> {
    let mode = accel.xdp_mode().context("XDP is disabled")?;
    let pin = xdp_link_pin(bpf_root, device, mode);
    if pin.exists() {
        let mut link =
            Link::open(&pin).with_context(|| format!("opening pinned link {}", pin.display()))?;
        let target = match link.info().ok().map(|i| i.info) {
            Some(LinkTypeInfo::Xdp(x)) => Some(x.ifindex),
            _ => None,
        };
        if target == Some(index) {
            link.update_prog(prog)
                .context("replacing the program of the pinned link")?;
            return Ok(());
        }
        // Device re-created or link defunct: only one XDP program fits a
        // device, so the old link goes first.
        let _ = link.detach();
        fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
    }
    let index = i32::try_from(index).context("ifindex out of range")?;
    // SAFETY: an all-zero bpf_link_create_opts is its "no options" value;
    // only sz and flags are set.
    let mut opts: libbpf_sys::bpf_link_create_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of::<libbpf_sys::bpf_link_create_opts>() as libbpf_sys::size_t;
    opts.flags = accel.xdp_flags();
    let prog_fd = prog.as_fd().as_raw_fd();
    // SAFETY: plain syscall wrappers on a loaded program's fd and a valid
    // opts; the returned fd is owned here and closed after pinning.
    let fd = unsafe { libbpf_sys::bpf_link_create(prog_fd, index, libbpf_sys::BPF_XDP, &opts) };
    if fd < 0 {
        return Err(std::io::Error::from_raw_os_error(-fd)).with_context(|| {
            format!("creating the XDP link ({mode} mode; native needs driver support)")
        });
    }
    // SAFETY: fd is a fresh link fd we own.
    let link_fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let path = CString::new(pin.as_os_str().as_encoded_bytes()).context("pin path")?;
    // SAFETY: a valid fd and NUL-terminated path.
    let ret = unsafe { libbpf_sys::bpf_obj_pin(link_fd.as_raw_fd(), path.as_ptr()) };
    if ret != 0 {
        return Err(std::io::Error::from_raw_os_error(-ret))
            .with_context(|| format!("pinning the XDP link at {}", pin.display()));
    }
    Ok(())
}

/// Detaches and unpins XDP links other than `keep` (device, mode).
fn detach_other_xdp(bpf_root: &Path, keep: &[(String, &str)]) -> Result<Vec<String>> {
    let dir = bpf_root.join("links");
    let mut detached = Vec::new();
    if !dir.exists() {
        return Ok(detached);
    }
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(XDP_LINK_PREFIX) else {
            continue;
        };
        if keep
            .iter()
            .any(|(d, m)| rest == format!("{d}_{m}").as_str())
        {
            continue;
        }
        if let Ok(link) = Link::open(entry.path()) {
            let _ = link.detach();
        }
        fs::remove_file(entry.path())
            .with_context(|| format!("removing {}", entry.path().display()))?;
        detached.push(format!("xdp:{rest}"));
    }
    Ok(detached)
}

/// The ifindex and direction a pinned tcx link is attached to, if any.
fn tcx_target(link: &Link) -> Option<(u32, u32)> {
    match link.info().ok()?.info {
        LinkTypeInfo::Tcx(t) if t.ifindex != 0 => Some((t.ifindex, t.attach_type as u32)),
        _ => None,
    }
}

/// Attaches `prog` to `device` or swaps it into the pinned link already
/// there. Returns whether a new link was created.
fn attach_tcx(
    bpf_root: &Path,
    device: &str,
    index: u32,
    dir: Direction,
    prog: &ProgramMut<'_>,
) -> Result<bool> {
    let pin = tcx_link_pin(bpf_root, device, dir);
    if pin.exists() {
        let mut link =
            Link::open(&pin).with_context(|| format!("opening pinned link {}", pin.display()))?;
        if tcx_target(&link) == Some((index, dir.attach_type())) {
            link.update_prog(prog)
                .context("replacing the program of the pinned link")?;
            return Ok(false);
        }
        // The device was re-created (new ifindex) or the link is defunct:
        // attach anew first, then drop the old one.
        let mut new = tcx_attach(prog, index, dir)?;
        let _ = link.detach();
        fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        new.pin(&pin)
            .with_context(|| format!("pinning link at {}", pin.display()))?;
        return Ok(true);
    }
    let mut link = tcx_attach(prog, index, dir)?;
    link.pin(&pin)
        .with_context(|| format!("pinning link at {}", pin.display()))?;
    Ok(true)
}

/// bpf_program__attach_tcx, which libbpf-rs 0.27 does not wrap.
fn tcx_attach(prog: &ProgramMut<'_>, ifindex: u32, dir: Direction) -> Result<Link> {
    let opts = libbpf_sys::bpf_tcx_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_tcx_opts>() as libbpf_sys::size_t,
        ..Default::default()
    };
    let index = i32::try_from(ifindex).context("ifindex out of range")?;
    // The program's expected attach type decides the direction; it comes
    // from its SEC() name, so check it rather than trust the caller.
    if prog.attach_type() as u32 != dir.attach_type() {
        bail!(
            "program {} is not a tcx {} program",
            prog.name().to_string_lossy(),
            dir.as_str()
        );
    }
    // SAFETY: the program is loaded and outlives the call; opts is a valid
    // bpf_tcx_opts with its size set. libbpf returns NULL with errno set on
    // failure, or a link that we own from here on.
    let ptr = unsafe {
        libbpf_sys::bpf_program__attach_tcx(prog.as_libbpf_object().as_ptr(), index, &opts)
    };
    match NonNull::new(ptr) {
        // SAFETY: a valid, owned bpf_link from libbpf.
        Some(ptr) => Ok(unsafe { Link::from_ptr(ptr) }),
        None => Err(std::io::Error::last_os_error()).context("bpf_program__attach_tcx"),
    }
}

/// Detaches and unpins tcx links of devices not in `keep`.
fn detach_other_devices(bpf_root: &Path, keep: &[String]) -> Result<Vec<String>> {
    let mut detached = Vec::new();
    for (device, dir, pin) in pinned_tcx_links(bpf_root)? {
        if keep.contains(&device) {
            continue;
        }
        if let Ok(link) = Link::open(&pin) {
            let _ = link.detach();
        }
        fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        detached.push(format!("{device}/{}", dir.as_str()));
    }
    Ok(detached)
}

/// (device, direction, pin) of every pinned tcx link under `bpf_root`.
fn pinned_tcx_links(bpf_root: &Path) -> Result<Vec<(String, Direction, PathBuf)>> {
    let dir = bpf_root.join("links");
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(TCX_LINK_PREFIX) else {
            continue;
        };
        let parsed = Direction::BOTH.into_iter().find_map(|d| {
            rest.strip_suffix(&format!("_{}", d.as_str()))
                .map(|dev| (dev.to_string(), d))
        });
        if let Some((device, d)) = parsed {
            out.push((device, d, entry.path()));
        }
    }
    out.sort_by(|a, b| a.2.cmp(&b.2));
    Ok(out)
}

/// A tcx attachment as found in the bpf root, for `kpr status` and tests.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct AttachedDevice {
    pub device: String,
    pub direction: Direction,
    /// The interface index it is attached to; None when defunct.
    pub ifindex: Option<u32>,
}

/// The tcx attachments pinned under `bpf_root`.
pub fn attached_devices(bpf_root: &Path) -> Vec<AttachedDevice> {
    pinned_tcx_links(bpf_root)
        .unwrap_or_default()
        .into_iter()
        .map(|(device, direction, pin)| AttachedDevice {
            device,
            direction,
            ifindex: Link::open(&pin)
                .ok()
                .and_then(|l| tcx_target(&l))
                .map(|(i, _)| i),
        })
        .collect()
}

/// The XDP attachments pinned under `bpf_root`, as `device/xdp-<mode>`.
pub fn attached_xdp(bpf_root: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(bpf_root.join("links")) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix(XDP_LINK_PREFIX)?;
            let (device, mode) = rest.rsplit_once('_')?;
            Some(format!("{device}/xdp-{mode}"))
        })
        .collect();
    out.sort();
    out
}

/// Turns the north-south datapath off: detaches every tcx link and removes
/// the conntrack and counter pins (an agent started without --devices).
pub fn remove(bpf_root: &Path) -> Result<Vec<String>> {
    let mut detached = detach_other_xdp(bpf_root, &[])?;
    detached.extend(detach_other_devices(bpf_root, &[])?);
    for pin in PINS {
        let path = bpf_root.join(pin);
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
            devices: vec!["eth0".into()],
            mode: NodePortMode::Snat,
            acceleration: Acceleration::Disabled,
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
            devices: vec!["eth0".into(), "a/b".into()],
            ..ok.clone()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("\"a/b\""), "{err}");
        let none = NodePortConfig {
            devices: Vec::new(),
            ..ok
        };
        assert!(none.validate().is_err());
    }

    #[test]
    fn the_dsr_mss_leaves_room_for_both_ip_headers_and_tcp() {
        assert_eq!(dsr_mss(&[1500, 9000]), 1440);
        assert_eq!(dsr_mss(&[9000]), 8940);
        assert_eq!(dsr_mss(&[]), 0);
        assert_eq!(dsr_mss(&[40]), 0);
    }

    #[test]
    fn modes_map_to_the_datapath_enum() {
        assert_eq!(NodePortMode::Snat.bpf_value(), 0);
        assert_eq!(NodePortMode::Dsr.bpf_value(), 1);
        assert_eq!(NodePortMode::Hybrid.bpf_value(), 2);
    }

    #[test]
    fn tcx_link_pins_name_device_and_direction() {
        let p = tcx_link_pin(Path::new("/b"), "eth-c", Direction::Egress);
        assert_eq!(p, Path::new("/b/links/tcx_eth-c_egress"));
    }
}
