//! Loading the socket-LB programs, pinning their maps (and with them the
//! load balancer's maps every object shares) and attaching them to a
//! cgroup with pinned links.
//!
//! Restart safety: maps are pinned under the bpf root and reused by the
//! next agent (libbpf reuses a pinned map whose definition matches), and
//! every attachment is a pinned bpf_link whose program a restarted agent
//! swaps atomically ([`link::attach_or_swap`]), so translation never
//! stops; SIGKILL leaves links and maps in place and traffic keeps being
//! translated. Undoing all of it is [`cleanup`](super::cleanup).

#![deny(unsafe_code)]

use std::fs;
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use serde::Serialize;

use crate::datapath::cleanup::cgroup_id;
pub use crate::datapath::cleanup::{cleanup, detach_from_cgroup, ensure_bpffs, CleanupReport};
use crate::datapath::hooks::SockHook;
use crate::datapath::link::{self, Attached, Attachment, Target};
use crate::datapath::pins::{self, MapName, SOCK_LINK_PREFIX};
pub use crate::datapath::pins::{pin_path, MapSizes, DEFAULT_BPF_ROOT};
use crate::datapath::skel::sock_lb::{SockLbSkel, SockLbSkelBuilder};

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

/// The pin of a hook's link.
fn hook_pin(bpf_root: &Path, hook: SockHook) -> PathBuf {
    pins::link_pin(bpf_root, SOCK_LINK_PREFIX, hook.attach_point())
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
        if options.skip_hooks.iter().any(|h| h.program_name() == name) {
            prog.set_autoload(false);
        }
    }
    if let Some(rodata) = open.maps.rodata_data.as_mut() {
        rodata.use_set_retval = u8::from(options.use_set_retval);
        rodata.host_netns_cookie = options.host_netns_cookie;
        // Pods' sockets wait for their packets only where one is judged.
        rodata.defer_pod_src_ranges = u8::from(!options.skip_hooks.contains(&SockHook::SkbEgress));
    }
    let maps = &mut open.maps;
    for (map, name) in pins::load_balancer_maps!(maps) {
        if pins::size_and_pin(map, bpf_root, name, sizes)? {
            report.reused_maps.push(name);
        }
    }
    for (map, name) in pins::observability_maps!(maps) {
        pins::size_and_pin(map, bpf_root, name, sizes)?;
    }
    // The node's addresses: a handful; the agent keeps them
    // (datapath::host_addrs).
    pins::size_and_pin(
        &mut maps.kpr_hostaddr_v1,
        bpf_root,
        MapName::HostAddresses,
        sizes,
    )?;
    // The socket hooks' counters: a few slots.
    pins::size_and_pin(
        &mut maps.kpr_sockstats_v1,
        bpf_root,
        MapName::SocketStats,
        sizes,
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

/// Whether programs of an earlier agent are attached (pinned socket-LB
/// links) while one of the load balancer's maps is not pinned: an upgrade
/// to a new layout version of that map. Its new map must then be filled
/// (create it with [`create_maps`], sync) before [`load_and_attach`] swaps
/// the programs, or they would serve from an empty map meanwhile.
pub fn fill_before_attach(bpf_root: &Path) -> bool {
    let links = pins::pinned_links(bpf_root, SOCK_LINK_PREFIX).unwrap_or_default();
    !links.is_empty()
        && MapName::LOAD_BALANCER
            .iter()
            .any(|m| !pin_path(bpf_root, *m).exists())
}

/// What the kernel lets the datapath use (`--kube-proxy-replacement partial`).
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// Hooks the kernel lacks: left out.
    pub skip_hooks: Vec<SockHook>,
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

/// `cgroup` must be on the cgroup v2 file system: socket LB attaches to
/// cgroup2 only.
pub fn ensure_cgroup2(cgroup: &Path) -> Result<()> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x63677270;
    let fs = nix::sys::statfs::statfs(cgroup)
        .with_context(|| format!("--cgroup {}", cgroup.display()))?;
    if fs.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
        bail!(
            "--cgroup {} is not a cgroup v2 directory (socket LB attaches to cgroup2 only)",
            cgroup.display()
        );
    }
    Ok(())
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
    ensure_cgroup2(cgroup)?;
    let cgroup_dir =
        fs::File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    let target = Target::Cgroup {
        fd: cgroup_dir.as_fd(),
        id: cgroup_id(cgroup)?,
    };
    let mut report = LoadReport::default();
    with_loaded(bpf_root, sizes, options, &mut report, |skel, report| {
        fs::create_dir_all(pins::links_dir(bpf_root)).context("creating links directory")?;
        for hook in SockHook::ALL
            .into_iter()
            .filter(|h| !options.skip_hooks.contains(h))
        {
            let attached =
                link::attach_or_swap(&hook_pin(bpf_root, hook), hook.program(skel), target)
                    .with_context(|| format!("attaching {hook} to cgroup {}", cgroup.display()))?;
            match attached {
                Attached::Swapped => report.updated_links.push(hook.attach_point()),
                Attached::Created => report.created_links.push(hook.attach_point()),
            }
        }
        Ok(())
    })?;
    report.removed_old_pins = pins::remove_other_versions(bpf_root)?;
    Ok(report)
}

/// A hook as found in the bpf root, for `kpr status` and tests.
#[derive(Debug, Serialize)]
pub struct AttachedHook {
    pub attach_point: &'static str,
    pub cgroup_id: Option<u64>,
}

/// The socket-LB hooks that have a pinned link under `bpf_root`.
pub fn attached_hooks(bpf_root: &Path) -> Vec<AttachedHook> {
    SockHook::ALL
        .into_iter()
        .filter_map(|hook| {
            let pin = hook_pin(bpf_root, hook);
            let link = libbpf_rs::Link::open(pin.exists().then_some(&pin)?).ok()?;
            Some(AttachedHook {
                attach_point: hook.attach_point(),
                cgroup_id: match link::attachment(&link) {
                    Some(Attachment::Cgroup { id }) => Some(id),
                    _ => None,
                },
            })
        })
        .collect()
}
