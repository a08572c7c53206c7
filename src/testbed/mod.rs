//! Test bed: real networks in network namespaces with real traffic.
//!
//! `kpr selftest`, the root integration tests and the datapath benchmark all
//! need the same thing: a client namespace whose sockets kpr translates, a
//! backends namespace with servers that say who they are, a cgroup the
//! client probe runs in, and everything gone again afterwards, also on panic.
//!
//! ```text
//!  client netns  "<prefix>c<pid>"            backends netns "<prefix>b<pid>"
//!  +-----------------------------+          +------------------------------+
//!  | probe process (test cgroup) |          | Server threads (TCP / UDP)   |
//!  | veth-c 10.244.0.1/24        |<-------->| veth-b 10.244.0.254/24       |
//!  |        fd00:10:244::1/64    |   veth   |        fd00:10:244::fe/64    |
//!  | 10.96.0.0/12 via .254       |          |        + backends /32, /128  |
//!  | fd00:10:96::/112 via ::fe   |          | lo: untranslated VIPs        |
//!  +-----------------------------+          +------------------------------+
//! ```
//!
//! Nothing here attaches BPF or touches the host's root namespace: the veth
//! pair is created inside the client namespace with its peer placed directly
//! in the backends namespace.

#![warn(missing_docs)]

pub mod agent;
pub mod bed;
pub mod cgroup;
pub mod cluster;
pub mod cpu;
pub mod errno;
pub mod error;
pub mod launch;
pub mod netns;
pub mod nodeport_bed;
pub mod probe;
pub mod server;
pub mod sweep;
pub mod topology;

pub use agent::AgentProcess;
pub use bed::{BedPlan, SocketLbBed};
pub use cgroup::{cgroup2_mount, TestCgroup};
pub use cluster::{Cluster, ClusterNode, ClusterPlan};
pub use cpu::{pin_to_cpu0, CpuPin};
pub use error::{Result, TestbedError};
pub use launch::run_probe;
pub use netns::{Netns, NsThread};
pub use nodeport_bed::NodePortBed;
pub use probe::{probe_main, ProbeResult, ProbeSpec};
pub use server::Server;
pub use sweep::sweep_stale;
pub use topology::Topology;

use std::sync::atomic::{AtomicU32, Ordering};

/// Longest accepted caller prefix, so derived names stay short
/// (`<prefix>c<pid>-<n>` and `kpr-test-<prefix>-<pid>-<n>`).
pub const MAX_PREFIX_LEN: usize = 8;

/// Checks a caller-given prefix: 1..=8 characters of `[a-z0-9]`, so that
/// every name derived from it is short, unambiguous and shell-safe.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(TestbedError::InvalidName {
            name: prefix.to_string(),
            why: "a prefix is 1 to 8 characters of [a-z0-9]",
        })
    }
}

/// A suffix that keeps names unique when one process builds several test
/// beds with the same prefix: empty the first time, `-1`, `-2`, ... after.
pub(crate) fn unique_suffix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    match NEXT.fetch_add(1, Ordering::Relaxed) {
        0 => String::new(),
        n => format!("-{n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_short_lowercase_alphanumerics() {
        assert!(validate_prefix("st").is_ok());
        assert!(validate_prefix("bench01").is_ok());
        assert!(validate_prefix("").is_err());
        assert!(validate_prefix("toolongname").is_err());
        assert!(validate_prefix("a-b").is_err());
        assert!(validate_prefix("A").is_err());
        assert!(validate_prefix("a/b").is_err());
    }
}
