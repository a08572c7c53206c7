//! The seam between the reconciler and the datapath: what the load-balancer
//! maps hold, expressed in domain types, and the operations the reconciler
//! performs on them. `kernel::KernelMaps` implements it on pinned BPF maps,
//! `fake::FakeMaps` in memory (with fault injection) for tests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use crate::model::{BackendState, Frontend, FrontendOptions, L4Addr, Protocol, ServiceType};

/// Id of a backend in the backends map. 0 is invalid ("no backend").
pub type BackendId = u32;
/// Id of a frontend (Cilium's rev-NAT index). 0 is invalid.
pub type ServiceId = u32;

pub use crate::datapath::pins::MapName;

/// A key of the DSR map (`datapath::dsr`), in domain terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DsrKey {
    /// The frontend address (LoadBalancer, externalIP), or the family's
    /// unspecified address for a NodePort (any node's address).
    pub frontend: IpAddr,
    /// The local backend's address: the outer destination of the packet.
    pub backend: IpAddr,
    /// The frontend port.
    pub port: u16,
    pub proto: Protocol,
}

/// Maximum entries of the maps the reconciler fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Capacity {
    /// Entries of the services map: one master plus one per backend slot per frontend.
    pub services: usize,
    /// Entries of the backends map.
    pub backends: usize,
    /// Entries of the source-range map: one per (frontend, prefix).
    pub source_ranges: usize,
    /// Maglev tables: one per frontend with Maglev and backends.
    pub maglev: usize,
}

/// Slot 0 of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MasterEntry {
    pub svc_id: ServiceId,
    /// Number of backend slots (1..=count).
    pub count: u32,
    pub svc_type: ServiceType,
    pub options: FrontendOptions,
    /// The source-range map holds this frontend's loadBalancerSourceRanges
    /// (keyed by `svc_id`) and the datapath enforces them.
    pub source_ranges: bool,
}

/// A value of the services map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvcValue {
    Master(MasterEntry),
    Slot {
        backend_id: BackendId,
        svc_id: ServiceId,
    },
}

/// A value of the backends map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendEntry {
    pub addr: L4Addr,
    pub state: BackendState,
    /// The endpoint runs on this node (north-south: no SNAT).
    pub local: bool,
}

/// A frontend as the services map holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendEntries {
    pub master: MasterEntry,
    /// Backend id of slot i+1.
    pub slots: Vec<BackendId>,
}

/// A Maglev table: the backend id of every slot.
pub type MaglevTable = Arc<[BackendId]>;

/// What the reconciler keeps of a Maglev table in the maps: enough to tell
/// whether it is the one it would write, without holding every slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaglevTableInfo {
    /// Slots of the table.
    pub size: u32,
    /// A hash of its content (only compared within one process).
    pub digest: u64,
}

impl MaglevTableInfo {
    /// The size and digest of `table`.
    pub fn of(table: &[BackendId]) -> MaglevTableInfo {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        table.hash(&mut h);
        MaglevTableInfo {
            size: table.len() as u32,
            digest: h.finish(),
        }
    }
}

/// The content of the services, backends, source-range and Maglev maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub frontends: BTreeMap<Frontend, FrontendEntries>,
    pub backends: BTreeMap<BackendId, BackendEntry>,
    /// Allowed client prefixes per frontend id (IPv4 ones as IPv4).
    /// Entries of an id no frontend has are strays, removed on prune.
    pub source_ranges: BTreeMap<ServiceId, BTreeSet<IpNet>>,
    /// Maglev tables by frontend id (also tables no master points at any
    /// more, left by an interrupted apply; removed on prune).
    pub maglev: BTreeMap<ServiceId, MaglevTableInfo>,
    /// Service-map entries that belong to no consistent frontend: slots
    /// without a master or beyond its count, left by an interrupted apply.
    /// They are never selected by the datapath and are removed on prune.
    pub stray_entries: Vec<(Frontend, u16)>,
    /// ClusterIPs with a port-reject entry: a port or protocol no frontend
    /// of theirs has is refused (one services-map entry each).
    pub port_rejects: BTreeSet<IpAddr>,
}

impl Snapshot {
    /// Entries the services map holds for the consistent frontends.
    pub fn service_entries(&self) -> usize {
        self.frontends.values().map(|f| 1 + f.slots.len()).sum()
    }

    /// Builds a snapshot from raw map entries, sorting out inconsistent ones.
    pub fn from_entries(
        svc: impl IntoIterator<Item = (Frontend, u16, SvcValue)>,
        backends: BTreeMap<BackendId, BackendEntry>,
    ) -> Snapshot {
        let mut masters: BTreeMap<Frontend, MasterEntry> = BTreeMap::new();
        let mut slots: BTreeMap<(Frontend, u16), BackendId> = BTreeMap::new();
        let mut stray = Vec::new();
        for (fe, slot, val) in svc {
            match val {
                SvcValue::Master(m) if slot == 0 => {
                    masters.insert(fe, m);
                }
                SvcValue::Slot { backend_id, .. } if slot > 0 => {
                    slots.insert((fe, slot), backend_id);
                }
                _ => stray.push((fe, slot)),
            }
        }
        let mut frontends = BTreeMap::new();
        for (fe, master) in masters {
            // A master whose slots are incomplete (interrupted apply) keeps
            // the slots it has; the next sync rewrites the frontend.
            let mut list = Vec::with_capacity(master.count as usize);
            for slot in 1..=master.count {
                match slots.remove(&(fe, slot as u16)) {
                    Some(id) => list.push(id),
                    None => break,
                }
            }
            frontends.insert(
                fe,
                FrontendEntries {
                    master,
                    slots: list,
                },
            );
        }
        stray.extend(slots.into_keys());
        Snapshot {
            frontends,
            backends,
            source_ranges: BTreeMap::new(),
            maglev: BTreeMap::new(),
            stray_entries: stray,
            port_rejects: BTreeSet::new(),
        }
    }

    /// Entries the source-range map holds.
    pub fn source_range_entries(&self) -> usize {
        self.source_ranges.values().map(BTreeSet::len).sum()
    }
}

/// A failed map operation.
#[derive(Debug, thiserror::Error)]
#[error("{op} on BPF map {map}: {source}")]
pub struct MapError {
    pub op: &'static str,
    pub map: MapName,
    #[source]
    pub source: std::io::Error,
}

impl MapError {
    pub fn new(op: &'static str, map: MapName, source: std::io::Error) -> MapError {
        MapError { op, map, source }
    }
}

/// Operations on the load-balancer maps. Batches are applied in order;
/// deletes are idempotent (a missing entry is not an error).
pub trait LbMaps {
    fn capacity(&self) -> Capacity;
    /// Reads the services and backends maps.
    fn snapshot(&self) -> Result<Snapshot, MapError>;
    fn put_backends(&mut self, entries: &[(BackendId, BackendEntry)]) -> Result<(), MapError>;
    fn delete_backends(&mut self, ids: &[BackendId]) -> Result<(), MapError>;
    fn put_service_entries(
        &mut self,
        entries: &[(Frontend, u16, SvcValue)],
    ) -> Result<(), MapError>;
    fn delete_service_entries(&mut self, keys: &[(Frontend, u16)]) -> Result<(), MapError>;
    /// Writes the port-reject entries of these ClusterIPs (services map).
    fn put_port_rejects(&mut self, ips: &[IpAddr]) -> Result<(), MapError>;
    fn delete_port_rejects(&mut self, ips: &[IpAddr]) -> Result<(), MapError>;
    /// Adds allowed (frontend id, prefix) pairs to the source-range map.
    fn put_source_ranges(&mut self, entries: &[(ServiceId, IpNet)]) -> Result<(), MapError>;
    fn delete_source_ranges(&mut self, entries: &[(ServiceId, IpNet)]) -> Result<(), MapError>;
    /// Writes (or atomically replaces) the Maglev tables of frontends.
    /// Entries sharing one `Arc` may share one table in the datapath.
    fn put_maglev_tables(&mut self, tables: &[(ServiceId, MaglevTable)]) -> Result<(), MapError>;
    fn delete_maglev_tables(&mut self, ids: &[ServiceId]) -> Result<(), MapError>;
    /// Removes affinity entries for which `keep(svc_id, backend_id)` is false;
    /// returns how many were removed.
    fn prune_affinity(
        &mut self,
        keep: &mut dyn FnMut(ServiceId, BackendId) -> bool,
    ) -> Result<usize, MapError>;
}
