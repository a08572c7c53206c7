//! The BPF side of kpr as the control plane sees it: the generated
//! skeletons, the encoding of map entries, the `LbMaps` seam with a kernel
//! and an in-memory implementation, and the loaders that pin maps and
//! attach programs.
//!
//! Layers (a module imports only from layers above it):
//! - `skel`, `sys` (the FFI boundary), `pins` (names, paths, sizing),
//!   `maps` (domain types), `config`, `hooks`, `interfaces`, `counters`;
//! - `routes`, `node_devices` (device detection);
//! - `layout` (encoding), `link` (attach or swap), `pinned_table`;
//! - `classic_tc` (tc filters where tcx is missing);
//! - `kernel`, `fake`, `ct`, `dsr`, `host_addrs`, `peer_devices`,
//!   `devices`, `netlink_events`, `cleanup`, `resize`, `held_pins`;
//! - `loader` (socket LB), `nodeport` (north-south).

#![deny(unsafe_code)]

pub mod classic_tc;
pub mod cleanup;
pub mod config;
pub mod counters;
pub mod ct;
pub mod devices;
pub mod dsr;
pub mod fake;
pub mod held_pins;
pub mod hooks;
pub mod host_addrs;
pub mod interfaces;
pub mod kernel;
pub mod layout;
pub mod lb_stats;
pub mod link;
pub mod loader;
pub mod maps;
pub mod netlink_events;
pub mod node_devices;
pub mod nodeport;
pub mod peer_devices;
pub mod pinned_table;
pub mod pins;
pub mod resize;
pub mod routes;
pub mod skel;
pub mod sock_destroy;
pub mod sys;

pub use maps::{
    BackendEntry, BackendId, Capacity, FrontendEntries, LbMaps, MapError, MapName, MasterEntry,
    ServiceId, Snapshot, SvcValue,
};
