//! "Attach or swap a pinned link": the one way kpr attaches a program, for
//! the socket hooks (cgroup), tc (tcx) and XDP.
//!
//! Restart safety: a restarted agent finds the link pinned and swaps the
//! program behind it (BPF_LINK_UPDATE), so packets and connects are never
//! seen by no program. A pinned link attached elsewhere (another cgroup, a
//! re-created device with a new ifindex) or defunct is replaced: the new
//! link first, then the old one goes — except where only one program fits
//! (XDP), where the old one goes first. A kind of attachment without links
//! (classic tc) would be one more [`Target`] with its own attach and
//! "where is it attached" query.

#![deny(unsafe_code)]

use std::fs;
use std::os::fd::BorrowedFd;
use std::path::Path;

use anyhow::{Context, Result};
use libbpf_rs::query::LinkTypeInfo;
use libbpf_rs::{Link, ProgramMut};

use crate::datapath::sys;

/// Where a program is attached.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// A cgroup v2 directory: its open descriptor and its id (inode).
    Cgroup { fd: BorrowedFd<'a>, id: u64 },
    /// tcx on a device, in the direction of the program's attach type.
    Tcx { ifindex: u32, attach_type: u32 },
    /// XDP on a device, with the mode's XDP_FLAGS_*.
    Xdp { ifindex: u32, flags: u32 },
}

/// Where a pinned link is attached, as the kernel tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    Cgroup { id: u64 },
    Tcx { ifindex: u32, attach_type: u32 },
    Xdp { ifindex: u32 },
}

impl Target<'_> {
    fn attachment(&self) -> Attachment {
        match *self {
            Target::Cgroup { id, .. } => Attachment::Cgroup { id },
            Target::Tcx {
                ifindex,
                attach_type,
            } => Attachment::Tcx {
                ifindex,
                attach_type,
            },
            Target::Xdp { ifindex, .. } => Attachment::Xdp { ifindex },
        }
    }

    /// Only one program of this kind fits the target.
    fn exclusive(&self) -> bool {
        matches!(self, Target::Xdp { .. })
    }
}

/// What [`attach_or_swap`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// The pinned link got the new program.
    Swapped,
    /// A link was created (and pinned).
    Created,
}

/// Where the link pinned at `pin` is attached; None when it is defunct
/// (its cgroup or device gone) or not a link.
pub fn attachment_of(pin: &Path) -> Option<Attachment> {
    attachment(&Link::open(pin).ok()?)
}

/// Where `link` is attached; None when it is defunct.
pub fn attachment(link: &Link) -> Option<Attachment> {
    match link.info().ok()?.info {
        LinkTypeInfo::Cgroup(c) if c.cgroup_id != 0 => Some(Attachment::Cgroup { id: c.cgroup_id }),
        LinkTypeInfo::Tcx(t) if t.ifindex != 0 => Some(Attachment::Tcx {
            ifindex: t.ifindex,
            attach_type: t.attach_type as u32,
        }),
        LinkTypeInfo::Xdp(x) if x.ifindex != 0 => Some(Attachment::Xdp { ifindex: x.ifindex }),
        _ => None,
    }
}

/// Attaches `prog` to `target` with a link pinned at `pin`, or swaps it
/// into the link pinned there when that one is attached to `target`.
pub fn attach_or_swap(pin: &Path, prog: &ProgramMut<'_>, target: Target<'_>) -> Result<Attached> {
    if !pin.exists() {
        attach_pinned(pin, prog, target)?;
        return Ok(Attached::Created);
    }
    let mut link =
        Link::open(pin).with_context(|| format!("opening pinned link {}", pin.display()))?;
    if attachment(&link) == Some(target.attachment()) {
        link.update_prog(prog)
            .context("replacing the program of the pinned link")?;
        return Ok(Attached::Swapped);
    }
    if target.exclusive() {
        detach_and_unpin(pin)?;
        attach_pinned(pin, prog, target)?;
        return Ok(Attached::Created);
    }
    // No gap on the target: the new link first, then the old one goes.
    let mut new = attach(prog, target)?;
    let _ = link.detach();
    fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))?;
    new.pin(pin)
        .with_context(|| format!("pinning link at {}", pin.display()))?;
    Ok(Attached::Created)
}

fn attach(prog: &ProgramMut<'_>, target: Target<'_>) -> Result<Link> {
    match target {
        Target::Cgroup { fd, .. } => {
            use std::os::fd::AsRawFd;
            prog.attach_cgroup(fd.as_raw_fd()).context("attaching")
        }
        Target::Tcx {
            ifindex,
            attach_type,
        } => {
            // The program's expected attach type decides the direction; it
            // comes from its SEC() name, so check it rather than trust the
            // caller.
            if prog.attach_type() as u32 != attach_type {
                anyhow::bail!(
                    "program {} has not the tcx attach type {attach_type}",
                    prog.name().to_string_lossy()
                );
            }
            let index = i32::try_from(ifindex).context("ifindex out of range")?;
            sys::attach_tcx(prog, index).context("bpf_program__attach_tcx")
        }
        Target::Xdp { .. } => anyhow::bail!("XDP links are created pinned"),
    }
}

fn attach_pinned(pin: &Path, prog: &ProgramMut<'_>, target: Target<'_>) -> Result<()> {
    if let Target::Xdp { ifindex, flags } = target {
        let index = i32::try_from(ifindex).context("ifindex out of range")?;
        return sys::attach_xdp_pinned(prog, index, flags, pin).with_context(|| {
            format!(
                "creating the XDP link pinned at {} (native mode needs driver support)",
                pin.display()
            )
        });
    }
    let mut link = attach(prog, target)?;
    link.pin(pin)
        .with_context(|| format!("pinning link at {}", pin.display()))
}

/// Detaches the link pinned at `pin` (best effort: a defunct one is
/// detached already) and removes the pin.
pub fn detach_and_unpin(pin: &Path) -> Result<()> {
    if let Ok(link) = Link::open(pin) {
        let _ = link.detach();
    }
    fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))
}
