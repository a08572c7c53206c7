//! The bpf root itself — mounted by the safe rules of `crate::bpf_root` — and undoing
//! everything kpr put there (`kpr cleanup`), or attached to a cgroup when
//! the pins were lost.

#![deny(unsafe_code)]

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use libbpf_rs::query::LinkTypeInfo;
use libbpf_rs::Link;
use serde::Serialize;

use crate::datapath::classic_tc;
use crate::datapath::pins;
use crate::datapath::sys;

/// The cgroup id of a cgroup v2 directory (its inode number).
pub(crate) fn cgroup_id(cgroup: &Path) -> Result<u64> {
    Ok(fs::metadata(cgroup)
        .with_context(|| format!("cgroup {}", cgroup.display()))?
        .ino())
}

/// Makes sure `bpf_root` is a directory on a BPF filesystem, by the safe
/// mount rules of [`crate::bpf_root`].
pub fn ensure_bpffs(bpf_root: &Path) -> Result<()> {
    crate::bpf_root::ensure(bpf_root).map(drop)
}

/// What `kpr cleanup` removed.
#[derive(Debug, Default, Serialize)]
pub struct CleanupReport {
    pub detached: Vec<String>,
    pub removed_pins: Vec<PathBuf>,
    pub unmounted: bool,
    /// The agent's record of what it applied (`crate::applied_state`).
    pub removed_record: bool,
}

/// Detaches every program kpr attached under `bpf_root` and removes every
/// pin, then the root itself, and the agent's record of what it applied.
/// Idempotent.
pub fn cleanup(bpf_root: &Path) -> Result<CleanupReport> {
    // The agent's record goes first: its name follows the resolved root.
    let mut report = CleanupReport {
        removed_record: crate::applied_state::remove(bpf_root)?,
        ..CleanupReport::default()
    };
    if !bpf_root.exists() {
        return Ok(report);
    }
    // Filters have no link to detach: removed by their markers first.
    report.detached = classic_tc::detach_all(bpf_root)?;
    let links = pins::links_dir(bpf_root);
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
        match sys::detach_link_by_id(link.id) {
            Ok(true) => detached.push(name.clone()),
            Ok(false) => {} // gone meanwhile
            Err(e) => bail!(
                "detaching link {} ({name}) from {}: {e}",
                link.id,
                cgroup.display()
            ),
        }
    }
    Ok(detached)
}

fn remove_pin(path: &Path, report: &mut CleanupReport) -> Result<()> {
    fs::remove_file(path).with_context(|| format!("removing pin {}", path.display()))?;
    report.removed_pins.push(path.to_path_buf());
    Ok(())
}
