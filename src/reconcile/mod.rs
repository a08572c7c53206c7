//! The reconciler: keeps the services and backends maps equal to the
//! desired state with minimal, ordered writes.
//!
//! Every sync runs in ordered steps, so a connect() racing with it at any
//! point finds a consistent frontend:
//!  1. new and changed backends are written;
//!  2. backend slots of new and changed frontends are written, and the
//!     source ranges they gain (before the master that enforces them);
//!  3. Maglev tables of new and changed frontends are written (before a
//!     master flags Maglev, and before it counts the backends they hold);
//!  4. their master entries (with the new count) are written, then the
//!     port-reject entries of new ClusterIPs (`port_reject`);
//!  5. slots beyond a shrunk count are removed;
//!  6. removed frontends lose their master entry, then their slots, then
//!     the port-reject entry of a ClusterIP left without frontend; then
//!     source ranges no frontend wants any more go (after the master that
//!     stopped enforcing them, so a client is never refused by a range
//!     set halfway between the old and the new one), and Maglev tables no
//!     master uses any more;
//!  7. backends no longer referenced are removed, and affinity entries that
//!     point at backends a frontend no longer has.
//!
//! A Maglev table is a function of the frontend's backend addresses, the
//! table size and the seed, so it is rewritten only when the set of
//! backend addresses changes; frontends with the same set (a NodePort on
//! every node address) share one table in a sync's writes.
//!
//! Ids are released only after a sync, so an id is never reused while a
//! slot written before the sync may still point at it.
//!
//! Where the steps are: `admit` (capacity), `plan` (per Service and
//! frontend), `maglev_plan`, `prune` (complete syncs), `execute` (the
//! ordered map writes).
//!
//! The unit of change is a Service (`namespace/name`): its frontends are
//! admitted or refused as a whole against the maps' capacity, and a
//! refused Service keeps what the maps held for it before.

mod admit;
mod execute;
pub mod ids;
mod maglev_plan;
#[cfg(test)]
mod maglev_tests;
mod plan;
mod port_reject;
mod prune;
mod refusal;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};

use crate::datapath::maps::{BackendId, Capacity, LbMaps, MapError, ServiceId, Snapshot};
use crate::maglev::MaglevParams;
use crate::model::{Frontend, FrontendSpec, L4Addr, ServiceRef};
use ids::IdAllocator;
use plan::Plan;

// What the reconciler tests (`use super::*`) name.
#[cfg(test)]
use {
    crate::datapath::maps::{BackendEntry, MaglevTable, MapName, MasterEntry, SvcValue},
    ipnet::IpNet,
    std::collections::HashSet,
};

pub use refusal::{Refusal, RefusalReason};

/// Most backend slots a frontend can have (slot numbers are 16-bit, 0 is
/// the master entry).
pub const MAX_SLOTS: usize = u16::MAX as usize;

/// A Service's frontends, keyed by frontend.
pub type ServiceFrontends = BTreeMap<Frontend, FrontendSpec>;
/// Desired state: `namespace/name` -> the Service's frontends.
pub type DesiredByService = BTreeMap<String, ServiceFrontends>;

/// A sync that could not be applied. The maps are consistent (every step is
/// ordered) and the reconciler has re-read them; the next sync retries.
#[derive(Debug, thiserror::Error)]
#[error("applying service changes to the BPF maps: {0}")]
pub struct SyncError(#[from] pub MapError);

/// What a sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    /// Services whose desired state differed and were applied.
    pub applied_services: usize,
    pub refused: Vec<Refusal>,
    /// Map entries written or deleted.
    pub writes: usize,
    /// Frontends removed because no Service claims them any more.
    pub pruned_frontends: usize,
    /// Backends deleted from the maps (no frontend has them any more).
    pub removed_backends: Vec<L4Addr>,
}

pub struct Reconciler<M: LbMaps> {
    maps: M,
    /// What the maps hold, kept in step with every write.
    actual: Snapshot,
    backend_ids: IdAllocator,
    svc_ids: IdAllocator,
    backend_by_addr: HashMap<L4Addr, BackendId>,
    backend_refs: HashMap<BackendId, u32>,
    /// Which Service programmed a frontend. Frontends restored from pinned
    /// maps have no owner until a Service claims them or they are pruned.
    owners: HashMap<Frontend, String>,
    /// Frontends last applied per Service, in frontend order: a slice, not
    /// a map (a map's node of 11 specs is ~1.8 KB, for one or two).
    applied: HashMap<String, Box<[(Frontend, FrontendSpec)]>>,
    /// Affinity entries have not been checked since the maps were read:
    /// a previous agent may have left entries for ids that are gone.
    affinity_unchecked: bool,
    /// Port-reject entries have not been checked since the maps were read.
    port_rejects_unchecked: bool,
    /// Table size and seed of Maglev tables.
    maglev: MaglevParams,
    /// Maglev tables known to be right (written or checked since the maps
    /// were read): frontend id -> the sorted backend addresses of the table.
    maglev_sources: HashMap<ServiceId, Vec<L4Addr>>,
}

impl<M: LbMaps> Reconciler<M> {
    /// A reconciler that starts from what the maps hold (pinned maps of a
    /// previous agent keep serving until the first complete sync prunes),
    /// with the default Maglev table size and seed.
    pub fn new(maps: M) -> Result<Reconciler<M>, MapError> {
        Reconciler::with_maglev(maps, MaglevParams::default())
    }

    /// As [`Reconciler::new`], writing Maglev tables with `maglev`'s size
    /// and seed. Tables in the maps built otherwise (another size or seed)
    /// are rewritten by the first sync that touches their frontend.
    pub fn with_maglev(maps: M, maglev: MaglevParams) -> Result<Reconciler<M>, MapError> {
        let mut r = Reconciler {
            maglev,
            maglev_sources: HashMap::new(),
            maps,
            actual: Snapshot::default(),
            backend_ids: IdAllocator::default(),
            svc_ids: IdAllocator::default(),
            backend_by_addr: HashMap::new(),
            backend_refs: HashMap::new(),
            owners: HashMap::new(),
            applied: HashMap::new(),
            affinity_unchecked: true,
            port_rejects_unchecked: true,
        };
        r.reload()?;
        Ok(r)
    }

    /// Re-reads the maps and rebuilds every index from them.
    fn reload(&mut self) -> Result<(), MapError> {
        self.actual = self.maps.snapshot()?;
        self.backend_ids = IdAllocator::from_used(self.actual.backends.keys().copied());
        self.svc_ids =
            IdAllocator::from_used(self.actual.frontends.values().map(|f| f.master.svc_id));
        self.backend_by_addr.clear();
        for (id, b) in &self.actual.backends {
            self.backend_by_addr.entry(b.addr).or_insert(*id);
        }
        self.backend_refs.clear();
        for fe in self.actual.frontends.values() {
            for id in &fe.slots {
                *self.backend_refs.entry(*id).or_default() += 1;
            }
        }
        let actual = &self.actual;
        self.owners
            .retain(|fe, _| actual.frontends.contains_key(fe));
        self.maglev_sources.clear();
        self.port_rejects_unchecked = true;
        Ok(())
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    pub fn into_maps(self) -> M {
        self.maps
    }

    /// What the maps hold.
    pub fn snapshot(&self) -> &Snapshot {
        &self.actual
    }

    pub fn capacity(&self) -> Capacity {
        self.maps.capacity()
    }

    /// Every frontend programmed, with the spec it was programmed from
    /// (Services in no order, frontends of one in frontend order).
    pub fn applied_frontends(&self) -> impl Iterator<Item = &(Frontend, FrontendSpec)> {
        self.applied.values().flat_map(|fes| fes.iter())
    }

    /// Table size and seed of the Maglev tables it writes.
    pub fn maglev_params(&self) -> MaglevParams {
        self.maglev
    }

    /// Services currently programmed.
    pub fn service_count(&self) -> usize {
        self.applied.len()
    }

    /// Every programmed frontend's id, address and Service (metric labels).
    pub fn frontend_services(&self) -> Vec<(ServiceId, Frontend, ServiceRef)> {
        self.applied
            .values()
            .flat_map(|fes| fes.iter())
            .filter_map(|(fe, spec)| {
                let id = self.actual.frontends.get(fe)?.master.svc_id;
                Some((id, *fe, spec.service.clone()))
            })
            .collect()
    }

    /// Entries the services map holds.
    pub fn service_entries(&self) -> usize {
        self.actual.service_entries()
            + self.actual.stray_entries.len()
            + self.actual.port_rejects.len()
    }

    /// Brings the maps to `desired`, touching only Services that changed.
    /// With `prune`, frontends no Service claims (restored from a previous
    /// run, or left by an interrupted sync) are removed: pass it only once
    /// the source has delivered its complete initial state.
    pub fn sync_full(
        &mut self,
        desired: &DesiredByService,
        prune: bool,
    ) -> Result<SyncOutcome, SyncError> {
        let mut changes: Vec<(String, ServiceFrontends)> = desired
            .iter()
            .filter(|(key, fes)| self.changes(key, fes))
            .map(|(key, fes)| (key.clone(), fes.clone()))
            .collect();
        changes.extend(self.gone(desired));
        self.apply(changes, prune)
    }

    /// [`Reconciler::sync_full`] of a desired state it may consume: the
    /// frontends of changed Services are moved into the applied state, not
    /// copied (a full sync at scale held two copies at once).
    pub fn sync_full_owned(
        &mut self,
        desired: DesiredByService,
        prune: bool,
    ) -> Result<SyncOutcome, SyncError> {
        let gone = self.gone(&desired);
        let mut changes: Vec<(String, ServiceFrontends)> = desired
            .into_iter()
            .filter(|(key, fes)| self.changes(key, fes))
            .collect();
        changes.extend(gone);
        self.apply(changes, prune)
    }

    /// Whether `fes` changes the Service `key`: it differs from what was
    /// applied, and is not an empty Service that was never programmed.
    fn changes(&self, key: &str, fes: &ServiceFrontends) -> bool {
        !self
            .applied
            .get(key)
            .is_some_and(|applied| applied.iter().map(|(f, s)| (f, s)).eq(fes.iter()))
            && (!fes.is_empty() || self.applied.contains_key(key))
    }

    /// The Services applied that `desired` no longer has, each as a removal.
    fn gone(&self, desired: &DesiredByService) -> Vec<(String, ServiceFrontends)> {
        self.applied
            .keys()
            .filter(|key| !desired.contains_key(*key))
            .map(|key| (key.clone(), ServiceFrontends::new()))
            .collect()
    }

    /// Applies the new state of some Services (an empty map removes one).
    pub fn sync_services(
        &mut self,
        changes: Vec<(String, ServiceFrontends)>,
    ) -> Result<SyncOutcome, SyncError> {
        self.apply(changes, false)
    }

    /// One sync, in named steps: admission against the maps' capacity,
    /// the plan of each admitted Service, pruning (complete syncs only),
    /// unreferenced backends; then the plan is executed in order and the
    /// freed ids are released.
    fn apply(
        &mut self,
        changes: Vec<(String, ServiceFrontends)>,
        prune: bool,
    ) -> Result<SyncOutcome, SyncError> {
        let mut outcome = SyncOutcome::default();
        let admitted = self.admit(changes, &mut outcome.refused);
        let mut plan = Plan {
            prune_affinity: self.affinity_unchecked,
            ..Plan::default()
        };
        let mut planned = Vec::with_capacity(admitted.len());
        for (service, frontends) in admitted {
            self.plan_service(&service, frontends, &mut plan, &mut outcome.refused);
            outcome.applied_services += 1;
            planned.push(service);
        }
        if prune {
            outcome.pruned_frontends = self.plan_prune(&mut plan);
        }
        self.plan_unreferenced_backends(&mut plan);
        self.plan_port_rejects(&mut plan);
        outcome.writes = plan.writes();
        if let Err(e) = self.execute(&plan) {
            // The maps are consistent but not what we planned: re-read them
            // and forget what was applied for the Services of this sync so
            // the next sync retries them.
            for service in &planned {
                self.applied.remove(service);
            }
            self.reload()?;
            return Err(SyncError(e));
        }
        self.affinity_unchecked = false;
        self.port_rejects_unchecked = false;
        outcome.removed_backends = std::mem::take(&mut plan.removed_backend_addrs);
        self.release_ids(plan);
        Ok(outcome)
    }

    /// Ids are released only after a sync, so an id is never reused while
    /// a slot written before the sync may still point at it.
    fn release_ids(&mut self, plan: Plan) {
        for id in plan.released_backends {
            self.backend_ids.release(id);
        }
        for id in plan.released_svc_ids {
            self.svc_ids.release(id);
        }
    }
}
