//! Refuse before you touch: everything `kpr agent` can find wrong with its
//! privileges, flags and surroundings is checked before a program is
//! loaded, attached or pinned, and named as what it is (not as a kernel
//! feature that seems to be missing, or a map that seems incompatible).
//!
//! [`check`] runs the checks in order and hands back what the agent keeps
//! for its life: the bound listeners and the hold on the bpf root.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::bpf_root::{self, Owner};
use crate::datapath::loader::{self, MapSizes};
use crate::datapath::maps::MapName;

/// What the checks look at.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    pub cgroup: &'a Path,
    pub bpf_root: &'a Path,
    pub metrics_addr: SocketAddr,
    pub healthz_addr: SocketAddr,
    pub map_sizes: MapSizes,
    /// `--force-cgroup-change`: move existing pinned links to `cgroup`.
    pub force_cgroup_change: bool,
}

/// What passed the checks and stays with the agent.
#[derive(Debug)]
pub struct Held {
    /// The bpf root, resolved (symlinks followed).
    pub bpf_root: PathBuf,
    /// The metrics endpoint's socket, bound.
    pub metrics: std::net::TcpListener,
    /// The health endpoint's socket, bound.
    pub healthz: std::net::TcpListener,
    /// The exclusive hold on the bpf root; released on drop.
    pub owner: Owner,
}

/// Runs every check, in this order: privileges, `--cgroup`, the
/// listening addresses (bound now, served later), the bpf root (made safe,
/// then locked), a `--cgroup` change against existing pins, map sizes.
pub fn check(input: &Input<'_>) -> Result<Held> {
    check_privileges(effective_capabilities()?)?;
    check_cgroup(input.cgroup)?;
    let metrics = crate::http::bind_std(input.metrics_addr, "metrics")
        .context("checking the listening addresses before touching the datapath")?;
    let healthz = crate::http::bind_std(input.healthz_addr, "healthz")
        .context("checking the listening addresses before touching the datapath")?;
    let bpf_root = bpf_root::ensure(input.bpf_root)?;
    let owner = Owner::acquire(&bpf_root)?;
    check_cgroup_change(&bpf_root, input.cgroup, input.force_cgroup_change)?;
    check_map_sizes(&bpf_root, &input.map_sizes)?;
    Ok(Held {
        bpf_root,
        metrics,
        healthz,
        owner,
    })
}

/// Raises the soft limit on open descriptors to the hard limit (the
/// agent's sockets, maps and manifest reads share it); returns the new
/// limit.
pub fn raise_nofile_limit() -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising RLIMIT_NOFILE")?;
    }
    Ok(hard)
}

/// SIGHUP is ignored: the agent has no configuration file to reload (it
/// watches the manifests or the API) and a closing terminal must not stop
/// it. Each SIGHUP is logged. Call before the async runtime starts (the
/// ignore covers the moment until [`log_sighups`] takes over).
pub fn ignore_sighup() -> Result<()> {
    crate::sys::ignore_signal(nix::sys::signal::Signal::SIGHUP).context("ignoring SIGHUP")
}

/// Logs every SIGHUP (and otherwise ignores it) for as long as it runs.
pub async fn log_sighups() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        return;
    };
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP ignored (nothing to reload: manifests and the API are watched; SIGTERM stops the agent)");
    }
}

/// Capability numbers (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capability set of this process (/proc/self/status CapEff).
pub fn effective_capabilities() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff in /proc/self/status")?;
    u64::from_str_radix(hex.trim(), 16).context("parsing CapEff")
}

/// Refuses to go on without what loading and attaching need: CAP_BPF and
/// CAP_PERFMON (or CAP_SYS_ADMIN, which implies both) and CAP_NET_ADMIN
/// (cgroup socket programs, tc and XDP). Mounting bpffs also needs
/// CAP_SYS_ADMIN; that is said where it happens.
pub fn check_privileges(effective: u64) -> Result<()> {
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        return Ok(());
    }
    let who = if nix::unistd::Uid::effective().is_root() {
        "running as root but without"
    } else {
        "not running as root, and without"
    };
    bail!(
        "kpr agent needs root or the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN \
         (CAP_SYS_ADMIN stands for the first two and is needed to mount bpffs); {who} {}",
        missing.join(", ")
    )
}

/// `--cgroup` must be a directory of the cgroup v2 file system.
pub fn check_cgroup(cgroup: &Path) -> Result<()> {
    let meta =
        std::fs::metadata(cgroup).with_context(|| format!("--cgroup {}", cgroup.display()))?;
    if !meta.is_dir() {
        bail!(
            "--cgroup {} is not a directory (give a cgroup v2 directory, e.g. /sys/fs/cgroup)",
            cgroup.display()
        );
    }
    loader::ensure_cgroup2(cgroup)
}

/// Refuses to move pinned links that attach kpr to another cgroup (the
/// other cgroup would silently lose translation) unless `force`.
pub fn check_cgroup_change(bpf_root: &Path, cgroup: &Path, force: bool) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let want = std::fs::metadata(cgroup)
        .with_context(|| format!("--cgroup {}", cgroup.display()))?
        .ino();
    let elsewhere: Vec<(&str, u64)> = loader::attached_hooks(bpf_root)
        .iter()
        .filter_map(|h| {
            h.cgroup_id
                .filter(|id| *id != want)
                .map(|id| (h.attach_point, id))
        })
        .collect();
    let Some((_, other)) = elsewhere.first() else {
        return Ok(());
    };
    if force {
        tracing::warn!(cgroup = %cgroup.display(), previous_cgroup_id = other, "--force-cgroup-change: moving the pinned links to --cgroup; the previous cgroup loses translation");
        return Ok(());
    }
    bail!(
        "--bpf-root {}: its pinned links attach kpr to another cgroup (id {other}); --cgroup {} would \
         move them and that cgroup would lose translation. Use the same --cgroup, another \
         --bpf-root, or pass --force-cgroup-change",
        bpf_root.display(),
        cgroup.display()
    )
}

/// Asks the kernel for a map of each capacity that will be created (maps
/// already pinned keep theirs), so a size it refuses is named as such.
pub fn check_map_sizes(bpf_root: &Path, sizes: &MapSizes) -> Result<()> {
    let flags = [
        (
            "--lb-map-max/--lb-map-initial",
            sizes.services,
            MapName::Services,
        ),
        (
            "--lb-map-max/--lb-map-initial",
            sizes.backends,
            MapName::Backends,
        ),
    ];
    for (flag, entries, map) in flags {
        if loader::pin_path(bpf_root, map).exists() {
            continue;
        }
        crate::datapath::sys::probe_hash_map(entries).map_err(|e| {
            anyhow::anyhow!(
                "{flag} {entries}: the kernel refuses a map of {entries} entries ({e}); \
                 choose a smaller size"
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_capabilities_are_named_not_blamed_on_the_kernel() {
        let err = check_privileges(0).unwrap_err().to_string();
        assert!(err.contains("CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"), "{err}");
        let bpf_only = 1u64 << CAP_BPF | 1u64 << CAP_PERFMON;
        let err = check_privileges(bpf_only).unwrap_err().to_string();
        assert!(err.ends_with("without CAP_NET_ADMIN"), "{err}");
        assert!(check_privileges(1u64 << CAP_SYS_ADMIN | 1u64 << CAP_NET_ADMIN).is_ok());
        assert!(check_privileges(bpf_only | 1u64 << CAP_NET_ADMIN).is_ok());
    }

    #[test]
    fn a_cgroup_that_is_a_file_is_named_as_not_a_directory() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let err = check_cgroup(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("is not a directory"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let err = check_cgroup(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a cgroup v2 directory"), "{err}");
    }

    #[test]
    fn the_soft_descriptor_limit_is_raised_to_the_hard_one() {
        let hard = raise_nofile_limit().unwrap();
        let limits = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE);
        assert_eq!(limits.unwrap(), (hard, hard));
    }
}
