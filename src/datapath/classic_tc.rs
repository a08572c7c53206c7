//! Classic tc: the north-south attachment on kernels without tcx (before
//! 6.6), as Cilium does it there — a clsact qdisc on the device and one
//! cls_bpf filter in direct-action mode per direction.
//!
//! A filter is no BPF link, so nothing of it can be pinned. kpr's filter
//! is found by its fixed place instead, handle [`HANDLE`] at priority
//! [`PRIORITY`] (protocol all), and recorded by a marker: the attached
//! program pinned at `links/tc_<device>_<direction>`, which says "kpr
//! attached here" to a restarted agent and to `kpr cleanup`.
//!
//! Restart safety as with tcx: a restarted agent replaces the program of
//! its filter in one netlink request (RTM_NEWTFILTER with NLM_F_REPLACE,
//! libbpf's BPF_TC_F_REPLACE), so no packet meets no program. A filter at
//! kpr's place whose program is not kpr's is never replaced nor removed.
//!
//! The clsact qdisc is created when missing and never deleted: other
//! tools attach to it too, and a qdisc cannot be deleted "only if empty"
//! in one step (deleting it drops every filter on it, someone else's
//! added a moment before included). An empty clsact qdisc passes packets
//! unchanged.

#![deny(unsafe_code)]

use std::fs;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use libbpf_rs::query::ProgInfoIter;
use libbpf_rs::{Program, ProgramMut, TcAttachPoint, TcHook, TC_EGRESS, TC_INGRESS};

use crate::datapath::interfaces;
use crate::datapath::link::Attached;
use crate::datapath::pins::TC_MARKER_PREFIX;

/// The handle of kpr's filters (`kp`).
pub const HANDLE: u32 = 0x6b70;
/// The priority of kpr's filters: first, before any other filter.
pub const PRIORITY: u32 = 1;
/// Programs whose name starts so are kpr's north-south ones.
const KPR_PROG_PREFIX: &str = "kpr_np_";

/// kpr's filter place on `ifindex` in direction `point`, for the program
/// behind `fd` (queries and detaches ignore it).
fn hook(fd: BorrowedFd<'_>, ifindex: u32, point: TcAttachPoint) -> Result<TcHook> {
    let index = i32::try_from(ifindex).context("ifindex out of range")?;
    let mut hook = TcHook::new(fd);
    hook.ifindex(index)
        .attach_point(point)
        .handle(HANDLE)
        .priority(PRIORITY);
    Ok(hook)
}

/// The id of the program in kpr's filter place; None when there is no
/// filter there (or no clsact qdisc at all).
fn program_in_place(hook: &mut TcHook) -> Option<u32> {
    hook.query().ok().filter(|id| *id != 0)
}

/// Whether the program of id `id` is one of kpr's north-south programs.
fn is_kprs(id: u32) -> bool {
    ProgInfoIter::default()
        .find(|p| p.id == id)
        .is_some_and(|p| p.name.to_string_lossy().starts_with(KPR_PROG_PREFIX))
}

/// Attaches `prog` as kpr's filter on `ifindex` in direction `point`
/// (creating the clsact qdisc when missing), or replaces the program of
/// the filter there atomically; `marker` is pinned to the new program.
pub fn attach_or_replace(
    marker: &Path,
    prog: &ProgramMut<'_>,
    ifindex: u32,
    point: TcAttachPoint,
) -> Result<Attached> {
    let mut hook = hook(prog.as_fd(), ifindex, point)?;
    let before = program_in_place(&mut hook);
    if before.is_none() {
        // A qdisc there already is fine (libbpf-rs takes EEXIST as success).
        hook.create()
            .context("creating the clsact qdisc (CONFIG_NET_SCH_INGRESS)")?;
    }
    if let Some(id) = before.filter(|id| !is_kprs(*id)) {
        bail!(
            "the tc filter at handle {HANDLE:#x} priority {PRIORITY} holds program {id}, not kpr's; \
             not replacing it"
        );
    }
    // The marker first when there is none, so an attached filter always
    // has one; else the new program is pinned aside and moved over it
    // once attached (a rename replaces a bpffs entry in one step).
    let staged = if marker.exists() {
        let aside = aside(marker);
        let _ = fs::remove_file(&aside);
        pin(prog, &aside)?;
        Some(aside)
    } else {
        pin(prog, marker)?;
        None
    };
    hook.replace(true)
        .attach()
        .context("attaching the cls_bpf filter (CONFIG_NET_CLS_BPF)")?;
    if let Some(aside) = staged {
        fs::rename(&aside, marker)
            .with_context(|| format!("moving {} to {}", aside.display(), marker.display()))?;
    }
    Ok(if before.is_some() {
        Attached::Swapped
    } else {
        Attached::Created
    })
}

/// Whether kpr's filter is on `ifindex` in direction `point` (its program
/// one of kpr's).
pub fn is_attached(marker: &Path, ifindex: u32, point: TcAttachPoint) -> bool {
    let Ok(fd) = Program::fd_from_pinned_path(marker) else {
        return false;
    };
    let Ok(mut hook) = hook(fd.as_fd(), ifindex, point) else {
        return false;
    };
    program_in_place(&mut hook).is_some_and(is_kprs)
}

/// Removes kpr's filter from `ifindex` (when the device is still there)
/// in direction `point`, then the marker. A filter at kpr's place with
/// another program is left alone. Returns whether a filter was removed.
pub fn detach(marker: &Path, ifindex: Option<u32>, point: TcAttachPoint) -> Result<bool> {
    let mut removed = false;
    if let (Some(index), Ok(fd)) = (ifindex, Program::fd_from_pinned_path(marker)) {
        let mut hook = hook(fd.as_fd(), index, point)?;
        match program_in_place(&mut hook) {
            Some(id) if is_kprs(id) => {
                hook.detach().context("removing kpr's cls_bpf filter")?;
                removed = true;
            }
            Some(id) => tracing::warn!(
                marker = %marker.display(),
                prog_id = id,
                "the tc filter at kpr's place runs a program that is not kpr's; left alone"
            ),
            None => {}
        }
    }
    fs::remove_file(marker).with_context(|| format!("removing {}", marker.display()))?;
    Ok(removed)
}

/// Removes every classic tc filter a marker under `bpf_root` records,
/// and the markers: `kpr cleanup`'s part for them, done before it detaches
/// the pinned links. The marker names `tc_<device>_<direction>` of each.
pub fn detach_all(bpf_root: &Path) -> Result<Vec<String>> {
    let markers = crate::datapath::pins::pinned_links(bpf_root, TC_MARKER_PREFIX)?;
    if markers.is_empty() {
        return Ok(Vec::new());
    }
    // A device gone took its filters along: only the marker is left.
    let present = interfaces::by_name().context("listing the network interfaces")?;
    let mut detached = Vec::new();
    for (rest, marker) in markers {
        let found = [("_ingress", TC_INGRESS), ("_egress", TC_EGRESS)]
            .into_iter()
            .find_map(|(suffix, point)| Some((rest.strip_suffix(suffix)?, point)));
        let index = found.and_then(|(device, _)| present.get(device).copied());
        let point = found.map_or(TC_INGRESS, |(_, point)| point);
        detach(&marker, index, point)?;
        detached.push(format!("{TC_MARKER_PREFIX}{rest}"));
    }
    Ok(detached)
}

/// Where the next program is pinned before it replaces the marker:
/// `links/tcnew_<device>_<direction>` (not the marker prefix, so never
/// taken for one; `kpr cleanup` removes it with the rest). bpffs refuses
/// names with a dot.
fn aside(marker: &Path) -> PathBuf {
    let name = marker
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let rest = name.strip_prefix(TC_MARKER_PREFIX).unwrap_or(&name);
    marker.with_file_name(format!("tcnew_{rest}"))
}

fn pin(prog: &ProgramMut<'_>, at: &Path) -> Result<()> {
    crate::datapath::sys::pin_fd(prog.as_fd(), at)
        .with_context(|| format!("pinning the tc marker {}", at.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_program_is_staged_beside_the_marker_under_no_marker_name() {
        let staged = aside(Path::new("/b/links/tc_eth0_ingress"));
        assert_eq!(staged, Path::new("/b/links/tcnew_eth0_ingress"));
        assert!(!"tcnew_eth0_ingress".starts_with(TC_MARKER_PREFIX));
    }
}
