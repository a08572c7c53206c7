//! A throw-away cgroup v2 for probe processes.
//!
//! kpr's socket load balancing hangs off cgroup v2 hooks, so a test needs a
//! cgroup whose members are exactly the probe processes it starts. The test
//! process itself never joins it: only child pids are written to its
//! `cgroup.procs`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::error::{Result, TestbedError};

/// How often Drop retries rmdir while the kernel finishes exiting members.
const RMDIR_ATTEMPTS: u32 = 50;
/// Pause between rmdir attempts (50 x 10 ms = at most 0.5 s).
const RMDIR_PAUSE: Duration = Duration::from_millis(10);

/// Finds where the cgroup2 file system is mounted (the first `cgroup2`
/// entry of /proc/self/mountinfo); kpr's agent uses it as its default
/// `--cgroup`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| TestbedError::io("read /proc/self/mountinfo", e))?;
    parse_cgroup2_mount(&info).ok_or(TestbedError::NoCgroup2)
}

/// Returns the mount point of the first `cgroup2` mount in a mountinfo
/// text (proc(5) format), with octal escapes such as `\040` decoded.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

/// Decodes mountinfo's `\NNN` octal escapes (space, tab, newline, backslash).
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'\\')
            .then(|| bytes.get(i + 1..i + 4))
            .flatten()
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .map(|d| d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0')));
        match escaped {
            Some(v) if v <= 0xff => {
                out.push(v as u8);
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A child cgroup `kpr-test-<prefix>-<pid>` directly under the cgroup2
/// mount, removed on Drop.
///
/// Drop first moves members that are ours (pids added through
/// [`TestCgroup::add_pid`] or children of this process) back to the parent,
/// then removes the directory with a bounded retry.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
    parent: PathBuf,
    added: Mutex<BTreeSet<u32>>,
}

impl TestCgroup {
    /// Creates the cgroup. `prefix` is 1..=8 characters of `[a-z0-9]`.
    pub fn create(prefix: &str) -> Result<TestCgroup> {
        super::validate_prefix(prefix)?;
        let parent = cgroup2_mount()?;
        let name = format!(
            "kpr-test-{prefix}-{}{}",
            std::process::id(),
            super::unique_suffix()
        );
        let path = parent.join(name);
        std::fs::create_dir(&path)
            .map_err(|e| TestbedError::io(format!("mkdir {}", path.display()), e))?;
        Ok(TestCgroup {
            path,
            parent,
            added: Mutex::new(BTreeSet::new()),
        })
    }

    /// The cgroup directory; what kpr attaches its programs to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup's `cgroup.procs`, for launchers that join a child to it
    /// between fork and exec.
    pub fn procs_path(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Moves process `pid` into the cgroup. Refuses the test process itself:
    /// it must stay outside so kpr's hooks see only probe traffic.
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        if pid == std::process::id() || pid == 0 {
            return Err(TestbedError::InvalidName {
                name: pid.to_string(),
                why: "the test process itself never joins the test cgroup",
            });
        }
        write_pid(&self.procs_path(), pid)?;
        if let Ok(mut added) = self.added.lock() {
            added.insert(pid);
        }
        Ok(())
    }

    /// The pids currently in the cgroup.
    pub fn pids(&self) -> Result<Vec<u32>> {
        read_pids(&self.procs_path())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let added = self
            .added
            .lock()
            .map(|a| a.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        let parent_procs = self.parent.join("cgroup.procs");
        for pid in read_pids(&self.procs_path()).unwrap_or_default() {
            if added.contains(&pid) || is_our_child(pid) {
                if let Err(e) = write_pid(&parent_procs, pid) {
                    tracing::debug!(pid, error = %e, "moving pid out of test cgroup failed");
                }
            } else {
                tracing::warn!(pid, cgroup = %self.path.display(), "foreign pid in test cgroup left alone");
            }
        }
        for attempt in 1..=RMDIR_ATTEMPTS {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if attempt == RMDIR_ATTEMPTS => {
                    tracing::warn!(cgroup = %self.path.display(), error = %e, "removing test cgroup failed");
                }
                Err(_) => std::thread::sleep(RMDIR_PAUSE),
            }
        }
    }
}

fn write_pid(procs: &Path, pid: u32) -> Result<()> {
    std::fs::write(procs, format!("{pid}\n"))
        .map_err(|e| TestbedError::io(format!("write pid {pid} to {}", procs.display()), e))
}

fn read_pids(procs: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(procs)
        .map_err(|e| TestbedError::io(format!("read {}", procs.display()), e))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Whether `pid`'s parent is this process, from /proc/PID/status.
fn is_our_child(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PPid:"))
                .and_then(|v| v.trim().parse::<u32>().ok())
        })
        == Some(std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_unified_mount_on_a_hybrid_host() {
        assert_eq!(
            parse_cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_a_cgroup2_mount_with_optional_fields_and_escapes() {
        let info = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
29 22 0:26 / /sys/fs/my\\040cgroup rw,nosuid shared:9 master:2 - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(
            parse_cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/my cgroup"))
        );
    }

    #[test]
    fn a_v1_only_host_has_no_cgroup2_mount() {
        let info = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_cgroup2_mount(info), None);
    }

    #[test]
    fn octal_unescape_leaves_other_backslashes_alone() {
        assert_eq!(unescape_octal(r"a\040b\134c"), r"a b\c");
        assert_eq!(unescape_octal(r"a\9b\04"), r"a\9b\04");
    }
}
