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

/// Finds where the cgroup2 file system is mounted; see [`crate::host::cgroup2_mount`].
pub fn cgroup2_mount() -> Result<PathBuf> {
    crate::host::cgroup2_mount().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TestbedError::NoCgroup2,
        _ => TestbedError::io("read /proc/self/mountinfo", e),
    })
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
        super::prefix::validate_prefix(prefix)?;
        let parent = cgroup2_mount()?;
        let name = format!(
            "kpr-test-{prefix}-{}{}",
            std::process::id(),
            super::prefix::unique_suffix()
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
