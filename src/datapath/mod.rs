//! The BPF side of kpr as the control plane sees it: the generated
//! skeletons, the encoding of map entries, the `LbMaps` seam with a kernel
//! and an in-memory implementation, and the loader that pins maps and
//! attaches programs.

pub mod ct;
pub mod devices;
pub mod dsr;
pub mod fake;
pub mod host_addrs;
pub mod kernel;
pub mod layout;
pub mod loader;
pub mod maps;
pub mod netlink_events;
pub mod nodeport;
pub mod peer_devices;
pub mod pinned_set;
pub mod skel;

pub use maps::{
    BackendEntry, BackendId, Capacity, FrontendEntries, LbMaps, MapError, MapName, MasterEntry,
    ServiceId, Snapshot, SvcValue,
};
