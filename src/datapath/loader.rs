//! Loading the BPF programs, pinning their maps and attaching them to a
//! cgroup with pinned links — and undoing all of it (`kpr cleanup`).
//!
//! Restart safety: maps are pinned under the bpf root and reused by the
//! next agent (libbpf reuses a pinned map whose definition matches), and
//! every attachment is a pinned bpf_link. A restarted agent atomically
//! swaps the program behind each existing link (BPF_LINK_UPDATE) instead
//! of detaching and re-attaching, so translation never stops; SIGKILL
//! leaves links and maps in place and traffic keeps being translated.

use std::fs;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use libbpf_rs::query::LinkTypeInfo;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapHandle, OpenMapMut, ProgramMut};
use serde::Serialize;

use crate::datapath::host_addrs;
use crate::datapath::maps::MapName;
use crate::datapath::skel::sock_lb::{SockLbSkel, SockLbSkelBuilder};

/// Default --bpf-root.
pub const DEFAULT_BPF_ROOT: &str = "/sys/fs/bpf/kpr";

/// Where a map is pinned.
pub fn pin_path(bpf_root: &Path, map: MapName) -> PathBuf {
    bpf_root.join(map.pin_name())
}

fn links_dir(bpf_root: &Path) -> PathBuf {
    bpf_root.join("links")
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
    fn get(&self, map: MapName) -> u32 {
        match map {
            MapName::Services => self.services,
            MapName::Backends => self.backends,
            MapName::Affinity => self.affinity,
            MapName::SockRevNat => self.sock_revnat,
            MapName::SourceRanges => self.source_ranges,
            MapName::Maglev => self.maglev,
        }
    }
}

/// A socket-LB hook: program name in bpf/sock_lb.bpf.c and attach point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Hook {
    pub attach_point: &'static str,
    program: &'static str,
}

/// Every socket-LB hook: the sock_addr ones (translation), then post_bind4
/// and post_bind6 (NodePort bind protection).
pub const SOCK_HOOKS: [Hook; 10] = [
    Hook {
        attach_point: "connect4",
        program: "kpr_connect4",
    },
    Hook {
        attach_point: "connect6",
        program: "kpr_connect6",
    },
    Hook {
        attach_point: "sendmsg4",
        program: "kpr_sendmsg4",
    },
    Hook {
        attach_point: "sendmsg6",
        program: "kpr_sendmsg6",
    },
    Hook {
        attach_point: "recvmsg4",
        program: "kpr_recvmsg4",
    },
    Hook {
        attach_point: "recvmsg6",
        program: "kpr_recvmsg6",
    },
    Hook {
        attach_point: "getpeername4",
        program: "kpr_getpeername4",
    },
    Hook {
        attach_point: "getpeername6",
        program: "kpr_getpeername6",
    },
    Hook {
        attach_point: "post_bind4",
        program: "kpr_post_bind4",
    },
    Hook {
        attach_point: "post_bind6",
        program: "kpr_post_bind6",
    },
];

fn link_pin(bpf_root: &Path, hook: &Hook) -> PathBuf {
    links_dir(bpf_root).join(format!("sock_{}", hook.attach_point))
}

/// What loading did, for logs and `kpr status`.
#[derive(Debug, Default, Serialize)]
pub struct LoadReport {
    /// Maps that were already pinned and are reused with their content.
    pub reused_maps: Vec<MapName>,
    /// Hooks whose pinned link got the new program (agent restart).
    pub updated_links: Vec<&'static str>,
    /// Hooks attached anew.
    pub created_links: Vec<&'static str>,
    /// Pins of another layout version removed after the switch.
    pub removed_old_pins: Vec<PathBuf>,
}

/// Makes sure `bpf_root` is a directory on a BPF filesystem, by the safe
/// mount rules of [`crate::bpf_root`].
pub fn ensure_bpffs(bpf_root: &Path) -> Result<()> {
    crate::bpf_root::ensure(bpf_root).map(drop)
}

/// The cgroup id of a cgroup v2 directory (its inode number).
fn cgroup_id(cgroup: &Path) -> Result<u64> {
    Ok(fs::metadata(cgroup)
        .with_context(|| format!("cgroup {}", cgroup.display()))?
        .ino())
}

/// Sizes and pins one of the load balancer's maps (keeping the capacity of
/// an existing pin, so libbpf can reuse it).
pub(crate) fn set_map_size(
    map: &mut OpenMapMut<'_>,
    bpf_root: &Path,
    name: MapName,
    sizes: &MapSizes,
    report: &mut LoadReport,
) -> Result<()> {
    let pin = pin_path(bpf_root, name);
    let size = if pin.exists() {
        // Keep the pinned map's capacity so libbpf can reuse it.
        let pinned = MapHandle::from_pinned_path(&pin)
            .with_context(|| format!("opening pinned map {}", pin.display()))?;
        report.reused_maps.push(name);
        if pinned.max_entries() != sizes.get(name) {
            tracing::warn!(map = %name, pinned = pinned.max_entries(), requested = sizes.get(name),
                "pinned map keeps its capacity; run `kpr cleanup` to resize");
        }
        pinned.max_entries()
    } else {
        sizes.get(name)
    };
    map.set_max_entries(size)
        .with_context(|| format!("sizing map {name}"))?;
    map.set_pin_path(&pin)
        .with_context(|| format!("pin path for map {name}"))?;
    Ok(())
}

/// Sizes a map and sets its pin: an existing pin keeps its capacity (and
/// its content: libbpf reuses it), a new one gets `size`.
pub(crate) fn size_and_pin(map: &mut OpenMapMut<'_>, pin: &Path, size: u32) -> Result<()> {
    let name = map.name().to_string_lossy().into_owned();
    let size = if pin.exists() {
        let pinned = MapHandle::from_pinned_path(pin)
            .with_context(|| format!("opening pinned map {}", pin.display()))?;
        if pinned.max_entries() != size {
            tracing::warn!(map = %name, pinned = pinned.max_entries(), requested = size,
                "pinned map keeps its capacity; run `kpr cleanup` to resize");
        }
        pinned.max_entries()
    } else {
        size
    };
    map.set_max_entries(size)
        .with_context(|| format!("sizing map {name}"))?;
    map.set_pin_path(pin)
        .with_context(|| format!("pin path for map {name}"))?;
    Ok(())
}

/// Opens the socket-LB object with its maps sized and pinned under
/// `bpf_root`, loads it and hands the loaded skeleton to `f`.
fn with_loaded<R>(
    bpf_root: &Path,
    sizes: &MapSizes,
    options: &DatapathOptions,
    report: &mut LoadReport,
    f: impl FnOnce(&SockLbSkel<'_>, &mut LoadReport) -> Result<R>,
) -> Result<R> {
    ensure_bpffs(bpf_root)?;
    let mut storage = MaybeUninit::uninit();
    let mut open = SockLbSkelBuilder::default()
        .open(&mut storage)
        .context("opening the socket-LB BPF object")?;
    // Hooks the kernel lacks (--kube-proxy-replacement partial) are not loaded.
    for mut prog in open.open_object_mut().progs_mut() {
        let name = prog.name().to_string_lossy().into_owned();
        if SOCK_HOOKS
            .iter()
            .any(|h| h.program == name && options.skip_hooks.contains(&h.attach_point))
        {
            prog.set_autoload(false);
        }
    }
    if let Some(rodata) = open.maps.rodata_data.as_mut() {
        rodata.use_set_retval = u8::from(options.use_set_retval);
        rodata.host_netns_cookie = options.host_netns_cookie;
    }
    let maps = &mut open.maps;
    set_map_size(
        &mut maps.kpr_svc_v1,
        bpf_root,
        MapName::Services,
        sizes,
        report,
    )?;
    set_map_size(
        &mut maps.kpr_backends_v1,
        bpf_root,
        MapName::Backends,
        sizes,
        report,
    )?;
    set_map_size(
        &mut maps.kpr_affinity_v1,
        bpf_root,
        MapName::Affinity,
        sizes,
        report,
    )?;
    set_map_size(
        &mut maps.kpr_sockrnat_v1,
        bpf_root,
        MapName::SockRevNat,
        sizes,
        report,
    )?;
    set_map_size(
        &mut maps.kpr_srcrange_v1,
        bpf_root,
        MapName::SourceRanges,
        sizes,
        report,
    )?;
    set_map_size(
        &mut maps.kpr_maglev_v1,
        bpf_root,
        MapName::Maglev,
        sizes,
        report,
    )?;
    // The node's addresses: a handful; the agent keeps them
    // (datapath::host_addrs).
    let hostaddr_size = maps.kpr_hostaddr_v1.max_entries();
    size_and_pin(
        &mut maps.kpr_hostaddr_v1,
        &bpf_root.join(host_addrs::HOSTADDR_PIN),
        hostaddr_size,
    )?;
    let skel: SockLbSkel = open.load().context(
        "loading the socket-LB BPF programs (a pinned map of an incompatible definition? run `kpr cleanup`)",
    )?;
    f(&skel, report)
}

/// Creates (or reuses) the pinned maps without attaching any program: for
/// benchmarks and tools that exercise the maps alone.
pub fn create_maps(bpf_root: &Path, sizes: &MapSizes) -> Result<LoadReport> {
    let mut report = LoadReport::default();
    with_loaded(
        bpf_root,
        sizes,
        &DatapathOptions::default(),
        &mut report,
        |_, _| Ok(()),
    )?;
    Ok(report)
}

/// What the kernel lets the datapath use (`--kube-proxy-replacement partial`).
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// Attach points the kernel lacks: left out.
    pub skip_hooks: Vec<&'static str>,
    /// bpf_set_retval exists (5.18+): rejected connects get ECONNREFUSED
    /// and rejected binds EADDRINUSE, else both EPERM.
    pub use_set_retval: bool,
    /// Network namespace cookie of the node's own sockets, the ones bind
    /// protection applies to (the agent's namespace); 0: none.
    pub host_netns_cookie: u64,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        DatapathOptions {
            skip_hooks: Vec::new(),
            use_set_retval: true,
            host_netns_cookie: 0,
        }
    }
}

/// Loads the socket-LB programs with their maps pinned under `bpf_root`
/// and attaches them to `cgroup` (a cgroup v2 directory), reusing pinned
/// maps and links.
pub fn load_and_attach(
    bpf_root: &Path,
    cgroup: &Path,
    sizes: &MapSizes,
    options: &DatapathOptions,
) -> Result<LoadReport> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x63677270;
    let fs = nix::sys::statfs::statfs(cgroup)
        .with_context(|| format!("--cgroup {}", cgroup.display()))?;
    if fs.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
        bail!(
            "--cgroup {} is not a cgroup v2 directory (socket LB attaches to cgroup2 only)",
            cgroup.display()
        );
    }
    let cgroup_dir =
        fs::File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    let want_cgroup = cgroup_id(cgroup)?;
    let mut report = LoadReport::default();
    with_loaded(bpf_root, sizes, options, &mut report, |skel, report| {
        fs::create_dir_all(links_dir(bpf_root)).context("creating links directory")?;
        for hook in SOCK_HOOKS
            .iter()
            .filter(|h| !options.skip_hooks.contains(&h.attach_point))
        {
            let prog = program(skel, hook)?;
            attach_hook(
                bpf_root,
                hook,
                prog,
                cgroup_dir.as_raw_fd(),
                want_cgroup,
                report,
            )
            .with_context(|| {
                format!(
                    "attaching {} to cgroup {}",
                    hook.attach_point,
                    cgroup.display()
                )
            })?;
        }
        Ok(())
    })?;
    report.removed_old_pins = remove_old_layout_pins(bpf_root)?;
    Ok(report)
}

fn program<'a>(skel: &'a SockLbSkel<'_>, hook: &Hook) -> Result<&'a ProgramMut<'a>> {
    let p = &skel.progs;
    Ok(match hook.program {
        "kpr_connect4" => &p.kpr_connect4,
        "kpr_connect6" => &p.kpr_connect6,
        "kpr_sendmsg4" => &p.kpr_sendmsg4,
        "kpr_sendmsg6" => &p.kpr_sendmsg6,
        "kpr_recvmsg4" => &p.kpr_recvmsg4,
        "kpr_recvmsg6" => &p.kpr_recvmsg6,
        "kpr_getpeername4" => &p.kpr_getpeername4,
        "kpr_getpeername6" => &p.kpr_getpeername6,
        "kpr_post_bind4" => &p.kpr_post_bind4,
        "kpr_post_bind6" => &p.kpr_post_bind6,
        other => bail!("no program {other} in the socket-LB object"),
    })
}

/// The cgroup a pinned link is attached to; None when it is detached.
fn link_cgroup(link: &Link) -> Option<u64> {
    match link.info().ok()?.info {
        LinkTypeInfo::Cgroup(c) if c.cgroup_id != 0 => Some(c.cgroup_id),
        _ => None,
    }
}

fn attach_hook(
    bpf_root: &Path,
    hook: &Hook,
    prog: &ProgramMut<'_>,
    cgroup_fd: i32,
    want_cgroup: u64,
    report: &mut LoadReport,
) -> Result<()> {
    let pin = link_pin(bpf_root, hook);
    if pin.exists() {
        let mut link =
            Link::open(&pin).with_context(|| format!("opening pinned link {}", pin.display()))?;
        if link_cgroup(&link) == Some(want_cgroup) {
            link.update_prog(prog)
                .context("replacing the program of the pinned link")?;
            report.updated_links.push(hook.attach_point);
            return Ok(());
        }
        // Attached elsewhere (another --cgroup) or defunct: attach the new
        // one first, then drop the old, so there is no gap on the new cgroup.
        let mut new = prog.attach_cgroup(cgroup_fd).context("attaching")?;
        let _ = link.detach();
        fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        new.pin(&pin)
            .with_context(|| format!("pinning link at {}", pin.display()))?;
        report.created_links.push(hook.attach_point);
        return Ok(());
    }
    let mut link = prog.attach_cgroup(cgroup_fd).context("attaching")?;
    link.pin(&pin)
        .with_context(|| format!("pinning link at {}", pin.display()))?;
    report.created_links.push(hook.attach_point);
    Ok(())
}

/// Pins of kpr maps from another layout version: unused once the programs
/// of this version are attached.
fn remove_old_layout_pins(bpf_root: &Path) -> Result<Vec<PathBuf>> {
    let current: Vec<&str> = MapName::ALL
        .iter()
        .map(|m| m.pin_name())
        .chain([host_addrs::HOSTADDR_PIN])
        .chain(crate::datapath::nodeport::PINS)
        .collect();
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

/// A hook as found in the bpf root, for `kpr status` and tests.
#[derive(Debug, Serialize)]
pub struct AttachedHook {
    pub attach_point: &'static str,
    pub cgroup_id: Option<u64>,
}

/// The socket-LB hooks that have a pinned link under `bpf_root`.
pub fn attached_hooks(bpf_root: &Path) -> Vec<AttachedHook> {
    SOCK_HOOKS
        .iter()
        .filter_map(|hook| {
            let pin = link_pin(bpf_root, hook);
            let link = Link::open(pin.exists().then_some(pin)?).ok()?;
            Some(AttachedHook {
                attach_point: hook.attach_point,
                cgroup_id: link_cgroup(&link),
            })
        })
        .collect()
}

/// What `kpr cleanup` removed.
#[derive(Debug, Default, Serialize)]
pub struct CleanupReport {
    pub detached: Vec<String>,
    pub removed_pins: Vec<PathBuf>,
    pub unmounted: bool,
}

/// Detaches every program kpr attached under `bpf_root` and removes every
/// pin, then the root itself. Idempotent.
pub fn cleanup(bpf_root: &Path) -> Result<CleanupReport> {
    let mut report = CleanupReport::default();
    if !bpf_root.exists() {
        return Ok(report);
    }
    let links = links_dir(bpf_root);
    if links.exists() {
        for entry in fs::read_dir(&links)? {
            let path = entry?.path();
            match Link::open(&path) {
                Ok(link) => {
                    // Best effort: a link whose cgroup is gone is already detached.
                    let _ = link.detach();
                    report.detached.push(
                        path.file_name()
                            .unwrap_or_default()
                            .to_string_lossy()
                            .into_owned(),
                    );
                }
                Err(e) => {
                    tracing::warn!(pin = %path.display(), error = %e, "not a link; removing the pin")
                }
            }
            remove_pin(&path, &mut report)?;
        }
        fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
    }
    for entry in fs::read_dir(bpf_root)? {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("kpr_"))
        {
            remove_pin(&path, &mut report)?;
        }
    }
    // Only a mount kpr made (and recorded) is undone.
    report.unmounted = crate::bpf_root::release(bpf_root)?;
    match fs::remove_dir(bpf_root) {
        Ok(()) => {}
        Err(e)
            if e.kind() == io::ErrorKind::DirectoryNotEmpty
                || e.kind() == io::ErrorKind::ResourceBusy =>
        {
            tracing::warn!(root = %bpf_root.display(), "bpf root holds files or a mount kpr did not create; left in place")
        }
        Err(e) => return Err(e).with_context(|| format!("removing {}", bpf_root.display())),
    }
    Ok(report)
}

/// Detaches every kpr program (name `kpr_*`) linked to `cgroup`, pinned or
/// not: the way out when pins were lost (a bpffs unmounted under a running
/// node, a wiped bpf root). Returns the attach points detached.
pub fn detach_from_cgroup(cgroup: &Path) -> Result<Vec<String>> {
    use libbpf_rs::query::{LinkInfoIter, ProgInfoIter};
    let cgroup_id = cgroup_id(cgroup)?;
    let kpr_progs: std::collections::HashMap<u32, String> = ProgInfoIter::default()
        .filter(|p| p.name.to_string_lossy().starts_with("kpr_"))
        .map(|p| (p.id, p.name.to_string_lossy().into_owned()))
        .collect();
    let mut detached = Vec::new();
    for link in LinkInfoIter::default() {
        let LinkTypeInfo::Cgroup(info) = &link.info else {
            continue;
        };
        let Some(name) = kpr_progs.get(&link.prog_id) else {
            continue;
        };
        if info.cgroup_id != cgroup_id {
            continue;
        }
        // SAFETY: plain syscall wrappers; the fd is closed right after use.
        let fd = unsafe { libbpf_sys::bpf_link_get_fd_by_id(link.id) };
        if fd < 0 {
            continue; // gone meanwhile
        }
        let ret = unsafe { libbpf_sys::bpf_link_detach(fd) };
        unsafe { libc::close(fd) };
        if ret != 0 {
            bail!(
                "detaching link {} ({name}) from {}: {}",
                link.id,
                cgroup.display(),
                io::Error::last_os_error()
            );
        }
        detached.push(name.clone());
    }
    Ok(detached)
}

fn remove_pin(path: &Path, report: &mut CleanupReport) -> Result<()> {
    fs::remove_file(path).with_context(|| format!("removing pin {}", path.display()))?;
    report.removed_pins.push(path.to_path_buf());
    Ok(())
}
