//! kpr's test beds: real networks in network namespaces with real traffic,
//! for the integration tests and the benches (a dev-only crate; nothing
//! here ships in `kpr`).
//!
//! The two-namespace socket-LB bed, the identity servers, the probe and
//! the agent launcher are the ones `kpr selftest` uses, re-exported from
//! [`kpr::selftest`]; this crate adds what only tests and benches need:
//! the routed multi-node [`Cluster`] and its [`NodePortBed`], CPU pinning
//! for benches, and [`require_root`].
//!
//! Nothing here attaches BPF to or creates interfaces in the host's root
//! namespace: every link is created inside a namespace the bed owns.

#![warn(missing_docs)]

pub mod cluster;
pub mod cpu;
pub mod nodeport_bed;

pub use kpr::selftest::{
    agent, bed, cgroup, errno, error, launch, netns, prefix, probe, server, sweep, topology,
};

pub use agent::AgentProcess;
pub use bed::{BedPlan, SocketLbBed};
pub use cgroup::{cgroup2_mount, TestCgroup};
pub use cluster::{Cluster, ClusterNode, ClusterPlan};
pub use cpu::{pin_to_cpu0, CpuPin};
pub use error::{Result, TestbedError};
pub use launch::run_probe;
pub use netns::{Netns, NsThread};
pub use nodeport_bed::{NodePortBed, TC_ATTACH_ENV};
pub use probe::{probe_main, ProbeResult, ProbeSpec};
pub use server::Server;
pub use sweep::sweep_stale;
pub use topology::Topology;

/// Panics unless the process runs as root (effective uid 0).
///
/// Every root-only test is `#[ignore = "needs root"]` and calls this first:
/// a plain `cargo test` reports it as ignored, and one run with
/// `--include-ignored` (or `--ignored`) without root fails loudly instead
/// of passing without having tested anything.
#[track_caller]
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (network namespaces, cgroups, BPF); run the \
         suite as root: cargo test --locked -- --include-ignored"
    );
}
