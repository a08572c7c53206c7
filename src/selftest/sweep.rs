//! Removing what a killed run left behind.
//!
//! Drop cleans up on success and on panic, but not after SIGKILL (a CI
//! timeout, an OOM kill). Names carry the owner's pid, so a later run can
//! tell leftovers from live test beds: only names of this exact shape whose
//! pid no longer exists are removed.

use std::path::Path;
use std::process::Command;

use super::cgroup::cgroup2_mount;
use super::error::{Result, TestbedError};
use super::netns::run;

/// What [`sweep_stale`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Namespace names deleted.
    pub netns: Vec<String>,
    /// Cgroup directories removed (empty ones only).
    pub cgroups: Vec<String>,
}

/// Deletes namespaces `<prefix>{c,b}<pid>[-<n>]` (two-namespace
/// topologies), `<prefix>-<role>-<pid>[-<n>]` (clusters) and empty cgroups
/// `kpr-test-<prefix>-<pid>[-<n>]` whose pid is not running; call it
/// before building a test bed so one killed run does not break the next.
pub fn sweep_stale(prefix: &str) -> Result<Swept> {
    super::prefix::validate_prefix(prefix)?;
    let mut swept = Swept::default();
    let list = run(Command::new("ip").args(["netns", "list"]))?;
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        if stale_netns_pid(prefix, name).is_some_and(|pid| !pid_running(pid)) {
            run(Command::new("ip").args(["netns", "del", name]))?;
            swept.netns.push(name.to_string());
        }
    }
    let mount = cgroup2_mount()?;
    let entries = std::fs::read_dir(&mount)
        .map_err(|e| TestbedError::io(format!("read {}", mount.display()), e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if stale_cgroup_pid(prefix, &name).is_some_and(|pid| !pid_running(pid)) {
            let path = mount.join(&name);
            // rmdir only succeeds on an empty cgroup; a populated one is
            // someone's live processes and stays.
            match std::fs::remove_dir(&path) {
                Ok(()) => swept.cgroups.push(path.display().to_string()),
                Err(e) => {
                    tracing::warn!(cgroup = %path.display(), error = %e, "stale test cgroup not removed")
                }
            }
        }
    }
    Ok(swept)
}

/// The owner pid of a test namespace name made from `prefix`, if `name`
/// has exactly that shape.
fn stale_netns_pid(prefix: &str, name: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    if let Some(cluster) = rest.strip_prefix('-') {
        let (role, pid) = cluster.split_once('-')?;
        return CLUSTER_ROLES
            .contains(&role)
            .then(|| pid_and_suffix(pid))
            .flatten();
    }
    let rest = rest.strip_prefix('c').or_else(|| rest.strip_prefix('b'))?;
    pid_and_suffix(rest)
}

/// The namespace roles of a [`super::cluster::Cluster`].
const CLUSTER_ROLES: [&str; 5] = ["client", "node1", "node2", "be1", "be2"];

/// The owner pid of a test cgroup name made from `prefix`.
fn stale_cgroup_pid(prefix: &str, name: &str) -> Option<u32> {
    let rest = name.strip_prefix("kpr-test-")?.strip_prefix(prefix)?;
    pid_and_suffix(rest.strip_prefix('-')?)
}

/// Parses `<pid>` or `<pid>-<n>`, both all digits.
fn pid_and_suffix(s: &str) -> Option<u32> {
    let (pid, suffix) = s.split_once('-').unwrap_or((s, "0"));
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if digits(pid) && digits(suffix) {
        pid.parse().ok()
    } else {
        None
    }
}

fn pid_running(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_of_the_exact_shape_are_candidates() {
        assert_eq!(stale_netns_pid("st", "stc1234"), Some(1234));
        assert_eq!(stale_netns_pid("st", "stb1234-2"), Some(1234));
        assert_eq!(stale_netns_pid("st", "stx1234"), None);
        assert_eq!(stale_netns_pid("st", "stc"), None);
        assert_eq!(stale_netns_pid("st", "stc12a"), None);
        assert_eq!(stale_netns_pid("st", "stc12-"), None);
        assert_eq!(stale_netns_pid("s", "stc1234"), None);
        assert_eq!(stale_netns_pid("st", "prod"), None);
        assert_eq!(stale_netns_pid("np", "np-node1-1234"), Some(1234));
        assert_eq!(stale_netns_pid("np", "np-client-1234-1"), Some(1234));
        assert_eq!(stale_netns_pid("np", "np-router-1234"), None);
        assert_eq!(stale_netns_pid("np", "np-be1-"), None);
        assert_eq!(stale_netns_pid("np", "npx-be1-12"), None);
        assert_eq!(stale_cgroup_pid("st", "kpr-test-st-99"), Some(99));
        assert_eq!(stale_cgroup_pid("st", "kpr-test-st-99-3"), Some(99));
        assert_eq!(stale_cgroup_pid("st", "kpr-test-stx-99"), None);
        assert_eq!(stale_cgroup_pid("st", "system.slice"), None);
    }

    #[test]
    fn this_process_is_running() {
        assert!(pid_running(std::process::id()));
    }
}
