//! The bpf root (`--bpf-root`): where kpr pins its maps and links, how it
//! comes to be on a BPF filesystem, and who owns it.
//!
//! Safe mounts. bpffs is mounted only on an empty directory kpr has just
//! created itself; a directory that already exists must already be on
//! bpffs. Never on an ancestor (a read-only parent is an error, not a reason
//! to cover the parent), never on a non-empty directory, never under /proc,
//! /dev or /sys (except /sys/fs/bpf). The path is resolved first, so a
//! symlink cannot lead there. The mount is `mode=0700` (bpffs adds the
//! sticky bit: `drwx-----T`), owned by root. A mount kpr made holds the
//! directory [`MOUNT_MARKER`]; `kpr cleanup` unmounts exactly those (the
//! record lives and dies with the mount, so it cannot go stale; bpffs holds
//! no plain files and no names with dots, hence a directory).
//!
//! One owner. A running agent holds an exclusive `flock` on the root
//! directory for its whole life ([`Owner`]); a second agent, or `kpr
//! cleanup`, finds it taken and names the holder's pid, which the kernel
//! keeps in /proc/locks (bpffs holds no file the pid could be written to).

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The directory inside a bpffs mount that says kpr made the mount.
pub const MOUNT_MARKER: &str = "kpr-mounted";
/// Mount options of a bpffs kpr mounts: only root may look inside.
const MOUNT_DATA: &str = "mode=0700";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Makes sure `root` is a directory on a BPF filesystem, mounting bpffs on
/// it only when kpr creates it now; see the module doc for the rules.
/// Returns the resolved path (symlinks followed).
pub fn ensure(root: &Path) -> Result<PathBuf> {
    ensure_with(root, &mut mount_bpffs)
}

/// [`ensure`] with the mount done by `mount` (tests record instead).
pub fn ensure_with(root: &Path, mount: &mut dyn FnMut(&Path) -> Result<()>) -> Result<PathBuf> {
    let (path, exists) = resolve(root)?;
    if exists {
        let meta = fs::metadata(&path).with_context(|| format!("--bpf-root {}", path.display()))?;
        if !meta.is_dir() {
            bail!("--bpf-root {} is not a directory", path.display());
        }
        if is_bpffs(&path)? {
            return Ok(path);
        }
        let what = if is_empty(&path)? {
            "an existing directory kpr did not create"
        } else {
            "a directory that holds files (bpffs would hide them)"
        };
        bail!(
            "--bpf-root {} is not on a BPF filesystem and is {what}: kpr mounts bpffs only on a \
             directory it creates itself; give a path that does not exist yet, or mount bpffs \
             there first (mount -t bpf -o mode=0700 bpffs {})",
            path.display(),
            path.display()
        );
    }
    let created = create_dirs(&path)?;
    if is_bpffs(&path)? {
        // Created inside an existing bpffs (/sys/fs/bpf/kpr): nothing to mount.
        return Ok(path);
    }
    let mounted = is_empty(&path).and_then(|empty| {
        if !empty {
            bail!("{} filled up while kpr was creating it", path.display());
        }
        mount(&path)?;
        if let Err(e) = fs::create_dir(path.join(MOUNT_MARKER)) {
            let _ = nix::mount::umount(&path);
            return Err(e).with_context(|| format!("recording the mount in {}", path.display()));
        }
        Ok(())
    });
    if let Err(e) = mounted {
        // Leave nothing behind: the directories made above are empty.
        for dir in created.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
        return Err(e);
    }
    tracing::info!(root = %path.display(), options = MOUNT_DATA, "mounted bpffs");
    Ok(path)
}

/// Unmounts `root` if kpr mounted it (a bpffs mount point holding
/// [`MOUNT_MARKER`]); true when it did. A mount kpr did not make is left
/// in place.
pub fn release(root: &Path) -> Result<bool> {
    if !root.is_dir() || !is_mountpoint(root)? || !is_bpffs(root)? {
        return Ok(false);
    }
    let marker = root.join(MOUNT_MARKER);
    if !marker.is_dir() {
        tracing::warn!(root = %root.display(), "bpffs mounted here by someone else; left in place");
        return Ok(false);
    }
    fs::remove_dir(&marker).with_context(|| format!("removing {}", marker.display()))?;
    // Busy while another process still holds a descriptor of it (a child
    // that inherited one, a reader of the pins, the cleanup's own lock):
    // detached now, gone once the last one closes.
    match nix::mount::umount(root) {
        Err(nix::errno::Errno::EBUSY) => {
            nix::mount::umount2(root, nix::mount::MntFlags::MNT_DETACH)
        }
        other => other,
    }
    .with_context(|| format!("unmounting {}", root.display()))?;
    Ok(true)
}

/// `root` made absolute and resolved: the deepest existing ancestor
/// canonicalized (symlinks followed), the rest appended; true when all of
/// it exists. Refuses paths kpr must never mount on.
pub fn resolve(root: &Path) -> Result<(PathBuf, bool)> {
    let absolute = if root.is_absolute() {
        root.to_path_buf()
    } else {
        std::env::current_dir()
            .context("the current directory (--bpf-root is relative)")?
            .join(root)
    };
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    let canonical = loop {
        match fs::canonicalize(existing) {
            Ok(c) => break c,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    bail!("--bpf-root {}: no existing ancestor", root.display());
                };
                rest.push(name.to_os_string());
                existing = parent;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("--bpf-root {}", existing.display()));
            }
        }
    };
    // What does not exist yet cannot be a symlink; `file_name` never
    // yields `.` or `..`, so nothing climbs out of the resolved ancestor.
    let path = rest.iter().rev().fold(canonical, |p, name| p.join(name));
    check_allowed(&path).with_context(|| format!("--bpf-root {}", root.display()))?;
    Ok((path, rest.is_empty()))
}

/// Refuses the places bpffs must never cover: the root directory, /proc,
/// /dev, and /sys outside /sys/fs/bpf.
fn check_allowed(path: &Path) -> Result<()> {
    if path == Path::new("/") {
        bail!("resolves to /");
    }
    for kernel in ["/proc", "/dev", "/sys"] {
        if path.starts_with(kernel) && !path.starts_with("/sys/fs/bpf") {
            bail!(
                "resolves to {}, under {kernel}: kpr never mounts there",
                path.display()
            );
        }
    }
    Ok(())
}

/// Creates `path` and the missing directories above it; returns those it
/// created, outermost first. A failure is the end: never an ancestor instead.
fn create_dirs(path: &Path) -> Result<Vec<PathBuf>> {
    let mut missing: Vec<PathBuf> = path
        .ancestors()
        .take_while(|a| !a.exists())
        .map(Path::to_path_buf)
        .collect();
    missing.reverse();
    let mut created = Vec::new();
    for dir in missing {
        if let Err(e) = fs::create_dir(&dir) {
            for made in created.iter().rev() {
                let _ = fs::remove_dir(made);
            }
            return Err(e).with_context(|| {
                format!(
                    "--bpf-root {}: cannot create {} (a read-only or non-directory parent?); \
                     kpr never mounts bpffs over an ancestor",
                    path.display(),
                    dir.display()
                )
            });
        }
        created.push(dir);
    }
    Ok(created)
}

fn mount_bpffs(at: &Path) -> Result<()> {
    nix::mount::mount(
        Some("bpffs"),
        at,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some(MOUNT_DATA),
    )
    .map_err(|e| match e {
        nix::errno::Errno::EPERM => anyhow::anyhow!(
            "mounting bpffs at {} needs CAP_SYS_ADMIN (or mount bpffs there beforehand)",
            at.display()
        ),
        e => anyhow::Error::from(e).context(format!("mounting bpffs at {}", at.display())),
    })
}

/// Whether `path` is on a BPF filesystem.
pub fn is_bpffs(path: &Path) -> Result<bool> {
    let st =
        nix::sys::statfs::statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    Ok(st.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

fn is_empty(dir: &Path) -> Result<bool> {
    Ok(fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .next()
        .is_none())
}

fn is_mountpoint(path: &Path) -> Result<bool> {
    let meta = fs::metadata(path)?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    Ok(meta.dev() != fs::metadata(parent)?.dev())
}

/// The agent's hold on its bpf root: an exclusive `flock` on the root
/// directory, released when dropped (or when the process dies).
#[derive(Debug)]
pub struct Owner {
    lock: Flock<fs::File>,
}

/// Why the bpf root could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    /// Another process holds the lock.
    #[error("--bpf-root {root} is in use by {holder}: one kpr agent per bpf root")]
    Held {
        /// The bpf root.
        root: PathBuf,
        /// "kpr pid N", or "another process" when /proc/locks does not say.
        holder: String,
        /// The holder's pid, when known.
        pid: Option<u32>,
    },
    /// The root could not be opened or locked.
    #[error("locking --bpf-root {root}")]
    Io {
        /// The bpf root.
        root: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

impl Owner {
    /// Takes the bpf root `root` (an existing directory), or says who has it.
    pub fn acquire(root: &Path) -> Result<Owner, OwnerError> {
        let io_err = |source| OwnerError::Io {
            root: root.to_path_buf(),
            source,
        };
        let dir = fs::File::open(root).map_err(io_err)?;
        match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Owner { lock }),
            Err((dir, Errno::EWOULDBLOCK)) => {
                let pid = holder_pid(&dir);
                Err(OwnerError::Held {
                    root: root.to_path_buf(),
                    holder: pid
                        .map_or_else(|| "another process".into(), |p| format!("kpr pid {p}")),
                    pid,
                })
            }
            Err((_, errno)) => Err(io_err(io::Error::from(errno))),
        }
    }
}

impl Owner {
    /// Whether the lock is on the directory now at `root` (not on one
    /// removed, or unmounted, since).
    pub fn holds(&self, root: &Path) -> bool {
        match (self.lock.metadata(), fs::metadata(root)) {
            (Ok(locked), Ok(now)) => locked.dev() == now.dev() && locked.ino() == now.ino(),
            _ => false,
        }
    }
}

/// The pid holding a write flock on `file`'s inode, from /proc/locks
/// (`1: FLOCK  ADVISORY  WRITE 1234 00:28:1 0 EOF`, device in hex).
fn holder_pid(file: &fs::File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let id = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    let locks = fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Blocked waiters are listed as "1: -> FLOCK ...": skipped.
        (fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&id.as_str()))
            .then(|| fields.get(4)?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Runs [`ensure_with`] recording where it would mount.
    fn ensure_recorded(root: &Path) -> (Result<PathBuf>, Vec<PathBuf>) {
        let calls = RefCell::new(Vec::new());
        let result = ensure_with(root, &mut |at| {
            calls.borrow_mut().push(at.to_path_buf());
            Ok(())
        });
        (result, calls.into_inner())
    }

    #[test]
    fn a_directory_kpr_creates_is_the_only_place_it_mounts() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("a/b/bpf");
        let (result, mounts) = ensure_recorded(&root);
        let resolved = result.unwrap();
        assert_eq!(mounts, vec![resolved.clone()]);
        assert!(resolved.ends_with("a/b/bpf"));
        assert!(
            resolved.join(MOUNT_MARKER).is_dir(),
            "the mount is recorded"
        );
    }

    #[test]
    fn a_non_empty_directory_is_refused_and_not_mounted() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("full");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("precious"), "x").unwrap();
        let (result, mounts) = ensure_recorded(&root);
        let err = format!("{:#}", result.unwrap_err());
        assert!(err.contains("holds files"), "{err}");
        assert!(mounts.is_empty());
        assert!(root.join("precious").exists());
    }

    #[test]
    fn an_existing_empty_directory_kpr_did_not_create_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (result, mounts) = ensure_recorded(tmp.path());
        let err = format!("{:#}", result.unwrap_err());
        assert!(err.contains("did not create"), "{err}");
        assert!(mounts.is_empty());
    }

    #[test]
    fn an_ancestor_is_never_mounted_when_the_root_cannot_be_created() {
        let tmp = tempfile::tempdir().unwrap();
        // A parent that is a file: mkdir fails as on a read-only parent.
        let file = tmp.path().join("file");
        fs::write(&file, "x").unwrap();
        let (result, mounts) = ensure_recorded(&file.join("bpf"));
        let err = format!("{:#}", result.unwrap_err());
        assert!(err.contains("never mounts bpffs over an ancestor"), "{err}");
        assert!(mounts.is_empty(), "mounted {mounts:?}");
    }

    #[test]
    fn a_failed_mount_leaves_no_directory_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("x/bpf");
        let result = ensure_with(&root, &mut |_| bail!("no mount for you"));
        assert!(result.is_err());
        assert!(!tmp.path().join("x").exists());
    }

    #[test]
    fn paths_under_proc_dev_and_sys_are_refused() {
        for path in [
            "/proc/kpr",
            "/proc",
            "/dev/shm/kpr",
            "/sys/kernel/kpr",
            "/sys/fs",
            "/",
        ] {
            let (result, mounts) = ensure_recorded(Path::new(path));
            let err = format!("{:#}", result.unwrap_err());
            assert!(err.contains("resolves to"), "{path}: {err}");
            assert!(mounts.is_empty(), "{path}");
        }
        assert!(check_allowed(Path::new("/sys/fs/bpf/kpr")).is_ok());
        assert!(check_allowed(Path::new("/run/kpr")).is_ok());
    }

    #[test]
    fn a_symlink_into_proc_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("innocent");
        std::os::unix::fs::symlink("/proc/self", &link).unwrap();
        let (result, mounts) = ensure_recorded(&link.join("bpf"));
        let err = format!("{:#}", result.unwrap_err());
        assert!(err.contains("under /proc"), "{err}");
        assert!(mounts.is_empty());
    }

    #[test]
    fn dot_dot_in_the_missing_part_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let sneaky = tmp.path().join("nope/../../../proc/x");
        let (result, mounts) = ensure_recorded(&sneaky);
        assert!(result.is_err());
        assert!(mounts.is_empty());
    }

    #[test]
    fn a_second_owner_is_refused_with_the_holders_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let first = Owner::acquire(tmp.path()).unwrap();
        let err = Owner::acquire(tmp.path()).unwrap_err();
        match &err {
            OwnerError::Held { pid, .. } => assert_eq!(*pid, Some(std::process::id())),
            other => panic!("{other:?}"),
        }
        assert!(
            err.to_string()
                .contains(&format!("kpr pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        assert!(Owner::acquire(tmp.path()).is_ok(), "released on drop");
    }
}
