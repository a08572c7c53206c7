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
//!  4. their master entries (with the new count) are written;
//!  5. slots beyond a shrunk count are removed;
//!  6. removed frontends lose their master entry, then their slots; then
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
//! The unit of change is a Service (`namespace/name`): its frontends are
//! admitted or refused as a whole against the maps' capacity, and a
//! refused Service keeps what the maps held for it before.

pub mod ids;
#[cfg(test)]
mod maglev_tests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use ipnet::IpNet;

use crate::datapath::maps::{
    BackendEntry, BackendId, Capacity, FrontendEntries, LbMaps, MaglevTable, MaglevTableInfo,
    MapError, MapName, MasterEntry, ServiceId, Snapshot, SvcValue,
};
use crate::maglev::{MaglevError, MaglevParams};
use crate::model::{Backend, Frontend, FrontendSpec, L4Addr};
use ids::IdAllocator;

/// Most backend slots a frontend can have (slot numbers are 16-bit, 0 is
/// the master entry).
pub const MAX_SLOTS: usize = u16::MAX as usize;

/// A Service's frontends, keyed by frontend.
pub type ServiceFrontends = BTreeMap<Frontend, FrontendSpec>;
/// Desired state: `namespace/name` -> the Service's frontends.
pub type DesiredByService = BTreeMap<String, ServiceFrontends>;

/// Why a Service (or one of its frontends) was not programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// Programming it would overflow a map.
    Capacity {
        map: MapName,
        needed: usize,
        free: usize,
        capacity: usize,
    },
    /// Another Service already owns this frontend.
    FrontendConflict { frontend: Frontend, owner: String },
    /// No free backend or frontend id.
    IdsExhausted,
    /// More backends behind one frontend than slots can number.
    TooManyBackends { frontend: Frontend, backends: usize },
    /// The frontend's Maglev table cannot be built (more backends than
    /// the table has slots).
    Maglev {
        frontend: Frontend,
        error: MaglevError,
    },
}

/// A Service that was not (fully) programmed; its previous state stays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub service: String,
    pub reason: RefusalReason,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            RefusalReason::Capacity {
                map,
                needed,
                free,
                capacity,
            } => write!(
                f,
                "service {} not programmed: it needs {needed} more entries in BPF map {map} \
                 but only {free} of {capacity} are free; its previous state is kept \
                 (raise the map size or remove services)",
                self.service
            ),
            RefusalReason::FrontendConflict { frontend, owner } => write!(
                f,
                "service {}: frontend {} is already programmed for service {owner}; skipped",
                self.service, frontend.addr
            ),
            RefusalReason::TooManyBackends { frontend, backends } => write!(
                f,
                "service {}: frontend {} has {backends} backends, more than the {MAX_SLOTS} slots a frontend can hold; skipped",
                self.service, frontend.addr
            ),
            RefusalReason::Maglev { frontend, error } => write!(
                f,
                "service {}: frontend {} not programmed: {error}",
                self.service, frontend.addr
            ),
            RefusalReason::IdsExhausted => {
                write!(
                    f,
                    "service {} not programmed: no free backend or frontend id",
                    self.service
                )
            }
        }
    }
}

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
}

/// The writes of one sync, in the order they are applied.
#[derive(Default)]
struct Plan {
    put_backends: Vec<(BackendId, BackendEntry)>,
    put_slots: Vec<(Frontend, u16, SvcValue)>,
    put_ranges: Vec<(ServiceId, IpNet)>,
    put_maglev: Vec<(ServiceId, MaglevTable)>,
    put_masters: Vec<(Frontend, u16, SvcValue)>,
    delete_shrunk_slots: Vec<(Frontend, u16)>,
    delete_masters: Vec<(Frontend, u16)>,
    delete_removed_slots: Vec<(Frontend, u16)>,
    delete_ranges: Vec<(ServiceId, IpNet)>,
    delete_maglev: Vec<ServiceId>,
    delete_backends: Vec<BackendId>,
    prune_affinity: bool,
    /// Maglev tables built in this sync, by their sorted backend addresses:
    /// frontends with the same set get the same table (one `Arc`).
    tables: HashMap<Vec<L4Addr>, MaglevTable>,
}

/// What a frontend's Maglev table needs, decided before the frontend's
/// plan changes any state, so a table that cannot be built refuses the
/// frontend cleanly.
enum TableNeed {
    /// No table: the frontend does not use Maglev, or has no backend.
    Absent,
    /// The maps hold the right table.
    Current,
    /// A table for `sources` (sorted backend addresses); `index` gives each
    /// slot's position in `sources`, None when this sync built it already.
    Write {
        sources: Vec<L4Addr>,
        index: Option<Vec<u32>>,
    },
}

impl Plan {
    fn writes(&self) -> usize {
        self.put_backends.len()
            + self.put_slots.len()
            + self.put_ranges.len()
            + self.put_maglev.len()
            + self.put_masters.len()
            + self.delete_shrunk_slots.len()
            + self.delete_masters.len()
            + self.delete_removed_slots.len()
            + self.delete_ranges.len()
            + self.delete_maglev.len()
            + self.delete_backends.len()
    }
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
    /// Frontends last applied per Service.
    applied: HashMap<String, ServiceFrontends>,
    /// Affinity entries have not been checked since the maps were read:
    /// a previous agent may have left entries for ids that are gone.
    affinity_unchecked: bool,
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

    /// Services currently programmed.
    pub fn service_count(&self) -> usize {
        self.applied.len()
    }

    /// Entries the services map holds.
    pub fn service_entries(&self) -> usize {
        self.actual.service_entries() + self.actual.stray_entries.len()
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
            // Changed, and not an empty Service that was never programmed.
            .filter(|(key, fes)| {
                self.applied.get(*key) != Some(*fes)
                    && (!fes.is_empty() || self.applied.contains_key(*key))
            })
            .map(|(key, fes)| (key.clone(), fes.clone()))
            .collect();
        changes.extend(
            self.applied
                .keys()
                .filter(|key| !desired.contains_key(*key))
                .map(|key| (key.clone(), ServiceFrontends::new())),
        );
        self.apply(changes, prune)
    }

    /// Applies the new state of some Services (an empty map removes one).
    pub fn sync_services(
        &mut self,
        changes: Vec<(String, ServiceFrontends)>,
    ) -> Result<SyncOutcome, SyncError> {
        self.apply(changes, false)
    }

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
        let mut touched_backends: HashSet<BackendId> = HashSet::new();
        let mut released_svc_ids = Vec::new();

        for (service, frontends) in &admitted {
            let previous: Vec<Frontend> = self
                .applied
                .get(service)
                .map(|fes| fes.keys().copied().collect())
                .unwrap_or_default();
            let mut programmed = ServiceFrontends::new();
            for (fe, spec) in frontends {
                if spec.backends.len() > MAX_SLOTS {
                    outcome.refused.push(Refusal {
                        service: service.clone(),
                        reason: RefusalReason::TooManyBackends {
                            frontend: *fe,
                            backends: spec.backends.len(),
                        },
                    });
                    continue;
                }
                if let Some(owner) = self.owners.get(fe).filter(|o| *o != service) {
                    outcome.refused.push(Refusal {
                        service: service.clone(),
                        reason: RefusalReason::FrontendConflict {
                            frontend: *fe,
                            owner: owner.clone(),
                        },
                    });
                    continue;
                }
                match self.plan_frontend(fe, spec, &mut plan, &mut touched_backends) {
                    Ok(()) => {
                        self.owners.insert(*fe, service.clone());
                        programmed.insert(*fe, spec.clone());
                    }
                    Err(reason) => outcome.refused.push(Refusal {
                        service: service.clone(),
                        reason,
                    }),
                }
            }
            for fe in previous.iter().filter(|fe| !programmed.contains_key(*fe)) {
                if let Some(svc_id) =
                    self.plan_frontend_removal(fe, &mut plan, &mut touched_backends)
                {
                    released_svc_ids.push(svc_id);
                }
            }
            if programmed.is_empty() {
                self.applied.remove(service);
            } else {
                self.applied.insert(service.clone(), programmed);
            }
            outcome.applied_services += 1;
        }

        if prune {
            let unowned: Vec<Frontend> = self
                .actual
                .frontends
                .keys()
                .filter(|fe| !self.owners.contains_key(*fe))
                .copied()
                .collect();
            for fe in &unowned {
                if let Some(svc_id) =
                    self.plan_frontend_removal(fe, &mut plan, &mut touched_backends)
                {
                    released_svc_ids.push(svc_id);
                }
            }
            outcome.pruned_frontends = unowned.len();
            // Stray entries of an interrupted sync, unless this sync just
            // rewrote the same key for a frontend that is now whole.
            let stray = std::mem::take(&mut self.actual.stray_entries);
            plan.delete_removed_slots
                .extend(stray.into_iter().filter(|(fe, slot)| {
                    !self
                        .actual
                        .frontends
                        .get(fe)
                        .is_some_and(|e| *slot == 0 || (*slot as usize) <= e.slots.len())
                }));
            touched_backends.extend(self.actual.backends.keys().copied());
            // Maglev tables no frontend uses (an interrupted sync's).
            let used: HashSet<ServiceId> = self
                .actual
                .frontends
                .values()
                .filter(|e| e.master.options.maglev && !e.slots.is_empty())
                .map(|e| e.master.svc_id)
                .collect();
            let unused: Vec<ServiceId> = self
                .actual
                .maglev
                .keys()
                .filter(|id| !used.contains(*id))
                .copied()
                .collect();
            for id in unused {
                self.actual.maglev.remove(&id);
                self.maglev_sources.remove(&id);
                plan.delete_maglev.push(id);
            }
            // Source ranges of ids no frontend has (an interrupted sync).
            let ids: HashSet<ServiceId> = self
                .actual
                .frontends
                .values()
                .map(|e| e.master.svc_id)
                .collect();
            let stray: Vec<ServiceId> = self
                .actual
                .source_ranges
                .keys()
                .filter(|id| !ids.contains(id))
                .copied()
                .collect();
            for id in stray {
                let nets = self.actual.source_ranges.remove(&id).unwrap_or_default();
                plan.delete_ranges.extend(nets.into_iter().map(|n| (id, n)));
            }
        }

        // Backends nothing points at any more.
        let mut released_backends = Vec::new();
        for id in touched_backends {
            if self.backend_refs.get(&id).copied().unwrap_or(0) == 0 {
                self.backend_refs.remove(&id);
                if let Some(b) = self.actual.backends.remove(&id) {
                    if self.backend_by_addr.get(&b.addr) == Some(&id) {
                        self.backend_by_addr.remove(&b.addr);
                    }
                    plan.delete_backends.push(id);
                    released_backends.push(id);
                }
            }
        }
        plan.delete_backends.sort_unstable();

        outcome.writes = plan.writes();
        if let Err(e) = self.execute(&plan) {
            // The maps are consistent but not what we planned: re-read them
            // and forget what was applied for the Services of this sync so
            // the next sync retries them.
            for (service, _) in &admitted {
                self.applied.remove(service);
            }
            self.reload()?;
            return Err(SyncError(e));
        }
        self.affinity_unchecked = false;
        for id in released_backends {
            self.backend_ids.release(id);
        }
        for id in released_svc_ids {
            self.svc_ids.release(id);
        }
        Ok(outcome)
    }

    /// Keeps the changes that fit the maps; the others are refused and keep
    /// their state. Entries are only freed at the end of a sync (removals
    /// come after additions), so what must fit is the peak: every entry in
    /// use now plus every key this sync adds.
    fn admit(
        &self,
        changes: Vec<(String, ServiceFrontends)>,
        refused: &mut Vec<Refusal>,
    ) -> Vec<(String, ServiceFrontends)> {
        let cap = self.maps.capacity();
        let mut svc_used = self.service_entries();
        let mut be_used = self.actual.backends.len();
        let mut ranges_used = self.actual.source_range_entries();
        let mut maglev_used = self.actual.maglev.len();
        let mut new_backends: HashSet<L4Addr> = HashSet::new();
        let mut admitted = Vec::with_capacity(changes.len());
        // What is programmed for a frontend now.
        let programmed = |fe: &Frontend| self.actual.frontends.get(fe);
        for (service, fes) in changes {
            let added_keys: usize = fes
                .iter()
                .map(|(fe, spec)| {
                    let existing = programmed(fe).map_or(0, |e| 1 + e.slots.len());
                    (1 + spec.backends.len()).saturating_sub(existing)
                })
                .sum();
            let added_ranges: usize = fes
                .iter()
                .map(|(fe, spec)| {
                    let existing = programmed(fe)
                        .and_then(|e| self.actual.source_ranges.get(&e.master.svc_id));
                    spec.source_ranges
                        .iter()
                        .filter(|n| !existing.is_some_and(|e| e.contains(&n.trunc())))
                        .count()
                })
                .sum();
            let added_backends: HashSet<L4Addr> = fes
                .values()
                .flat_map(|s| s.backends.iter().map(|b| b.addr))
                .filter(|a| !self.backend_by_addr.contains_key(a) && !new_backends.contains(a))
                .collect();
            // Tables this sync adds (a rewritten table replaces its entry).
            let added_tables = fes
                .iter()
                .filter(|(fe, spec)| {
                    spec.options.maglev
                        && !spec.backends.is_empty()
                        && !programmed(fe)
                            .is_some_and(|e| self.actual.maglev.contains_key(&e.master.svc_id))
                })
                .count();
            let (map, needed, used, capacity) = if svc_used + added_keys > cap.services {
                (MapName::Services, added_keys, svc_used, cap.services)
            } else if be_used + added_backends.len() > cap.backends {
                (
                    MapName::Backends,
                    added_backends.len(),
                    be_used,
                    cap.backends,
                )
            } else if ranges_used + added_ranges > cap.source_ranges {
                (
                    MapName::SourceRanges,
                    added_ranges,
                    ranges_used,
                    cap.source_ranges,
                )
            } else if maglev_used + added_tables > cap.maglev {
                (MapName::Maglev, added_tables, maglev_used, cap.maglev)
            } else {
                svc_used += added_keys;
                be_used += added_backends.len();
                ranges_used += added_ranges;
                maglev_used += added_tables;
                new_backends.extend(added_backends);
                admitted.push((service, fes));
                continue;
            };
            refused.push(Refusal {
                service,
                reason: RefusalReason::Capacity {
                    map,
                    needed,
                    free: capacity.saturating_sub(used),
                    capacity,
                },
            });
        }
        admitted
    }

    /// Plans the writes that make `fe` match `spec`; refuses when ids ran
    /// out or its Maglev table cannot be built.
    fn plan_frontend(
        &mut self,
        fe: &Frontend,
        spec: &FrontendSpec,
        plan: &mut Plan,
        touched: &mut HashSet<BackendId>,
    ) -> Result<(), RefusalReason> {
        let table = self
            .table_need(fe, spec, plan)
            .map_err(|error| RefusalReason::Maglev {
                frontend: *fe,
                error,
            })?;
        let mut slots = Vec::with_capacity(spec.backends.len());
        for b in &spec.backends {
            slots.push(
                self.plan_backend(b, plan)
                    .ok_or(RefusalReason::IdsExhausted)?,
            );
        }
        let existing = self.actual.frontends.get(fe);
        let svc_id = match existing {
            Some(e) => e.master.svc_id,
            None => self.svc_ids.allocate().ok_or(RefusalReason::IdsExhausted)?,
        };
        let master = MasterEntry {
            svc_id,
            count: slots.len() as u32,
            svc_type: spec.svc_type,
            options: spec.options,
            source_ranges: !spec.source_ranges.is_empty(),
        };
        // Ranges are keyed by id: what an id holds (also strays of an
        // interrupted sync under a reused id) becomes exactly the spec's.
        let old_ranges = self
            .actual
            .source_ranges
            .remove(&svc_id)
            .unwrap_or_default();
        let new_ranges: BTreeSet<IpNet> = spec.source_ranges.iter().map(IpNet::trunc).collect();
        plan.put_ranges
            .extend(new_ranges.difference(&old_ranges).map(|n| (svc_id, *n)));
        plan.delete_ranges
            .extend(old_ranges.difference(&new_ranges).map(|n| (svc_id, *n)));
        if !new_ranges.is_empty() {
            self.actual.source_ranges.insert(svc_id, new_ranges);
        }
        let old_master = existing.map(|e| e.master);
        let old_slots: Vec<BackendId> = existing.map(|e| e.slots.clone()).unwrap_or_default();
        for (i, id) in slots.iter().enumerate() {
            if old_slots.get(i) != Some(id) {
                plan.put_slots.push((
                    *fe,
                    i as u16 + 1,
                    SvcValue::Slot {
                        backend_id: *id,
                        svc_id,
                    },
                ));
            }
        }
        self.plan_maglev(svc_id, table, plan);
        if old_master != Some(master) {
            plan.put_masters.push((*fe, 0, SvcValue::Master(master)));
        }
        for slot in slots.len()..old_slots.len() {
            plan.delete_shrunk_slots.push((*fe, slot as u16 + 1));
        }
        // Affinity entries of this frontend may point at backends it lost:
        // also when affinity was just turned off, or an id is reused later.
        let had_affinity = old_master.is_some_and(|m| m.options.affinity_timeout.is_some());
        if (had_affinity || spec.options.affinity_timeout.is_some())
            && old_slots.iter().any(|id| !slots.contains(id))
        {
            plan.prune_affinity = true;
        }
        for id in &old_slots {
            self.unref_backend(*id, touched);
        }
        for id in &slots {
            *self.backend_refs.entry(*id).or_default() += 1;
        }
        self.actual
            .frontends
            .insert(*fe, FrontendEntries { master, slots });
        Ok(())
    }

    /// Whether `fe`'s Maglev table must be written for `spec`, and the
    /// table's slots when they must be computed.
    fn table_need(
        &self,
        fe: &Frontend,
        spec: &FrontendSpec,
        plan: &Plan,
    ) -> Result<TableNeed, MaglevError> {
        if !spec.options.maglev || spec.backends.is_empty() {
            return Ok(TableNeed::Absent);
        }
        let mut sources: Vec<L4Addr> = spec.backends.iter().map(|b| b.addr).collect();
        sources.sort_unstable();
        sources.dedup();
        let svc_id = self.actual.frontends.get(fe).map(|e| e.master.svc_id);
        let current = svc_id.is_some_and(|id| {
            self.maglev_sources.get(&id) == Some(&sources)
                && self
                    .actual
                    .maglev
                    .get(&id)
                    .is_some_and(|t| t.size == self.maglev.table_size())
        });
        if current {
            return Ok(TableNeed::Current);
        }
        let index = match plan.tables.contains_key(&sources) {
            true => None,
            false => Some(self.maglev.build(&sources)?),
        };
        Ok(TableNeed::Write { sources, index })
    }

    /// Plans the Maglev table of frontend `svc_id` (its backends are
    /// planned already): written unless the maps hold the same, removed
    /// when no longer needed.
    fn plan_maglev(&mut self, svc_id: ServiceId, need: TableNeed, plan: &mut Plan) {
        let (sources, index) = match need {
            TableNeed::Current => return,
            TableNeed::Absent => {
                self.maglev_sources.remove(&svc_id);
                if self.actual.maglev.remove(&svc_id).is_some() {
                    plan.delete_maglev.push(svc_id);
                }
                return;
            }
            TableNeed::Write { sources, index } => (sources, index),
        };
        let table = match (plan.tables.get(&sources), index) {
            (Some(table), _) => table.clone(),
            (None, index) => {
                // Every source was just planned as a backend of the
                // frontend, so it has an id (0, "none", cannot happen).
                let ids: Vec<BackendId> = sources
                    .iter()
                    .map(|a| self.backend_by_addr.get(a).copied().unwrap_or(0))
                    .collect();
                let table: MaglevTable = index
                    .unwrap_or_default()
                    .iter()
                    .map(|i| ids[*i as usize])
                    .collect();
                plan.tables.insert(sources.clone(), table.clone());
                table
            }
        };
        let info = MaglevTableInfo::of(&table);
        if self.actual.maglev.get(&svc_id) != Some(&info) {
            plan.put_maglev.push((svc_id, table));
            self.actual.maglev.insert(svc_id, info);
        }
        self.maglev_sources.insert(svc_id, sources);
    }

    /// The id of the backend at `b.addr`, allocating and writing it if new.
    fn plan_backend(&mut self, b: &Backend, plan: &mut Plan) -> Option<BackendId> {
        let addr = &b.addr;
        let entry = BackendEntry {
            addr: b.addr,
            state: b.state,
            local: b.local,
        };
        if let Some(id) = self.backend_by_addr.get(addr).copied() {
            if self.actual.backends.get(&id) != Some(&entry) {
                // A backend shared by several Services takes the state last written.
                plan.put_backends.push((id, entry));
                self.actual.backends.insert(id, entry);
            }
            return Some(id);
        }
        let id = self.backend_ids.allocate()?;
        plan.put_backends.push((id, entry));
        self.actual.backends.insert(id, entry);
        self.backend_by_addr.insert(*addr, id);
        Some(id)
    }

    fn unref_backend(&mut self, id: BackendId, touched: &mut HashSet<BackendId>) {
        if let Some(n) = self.backend_refs.get_mut(&id) {
            *n = n.saturating_sub(1);
        }
        touched.insert(id);
    }

    /// Plans the removal of a frontend; returns its id for release.
    fn plan_frontend_removal(
        &mut self,
        fe: &Frontend,
        plan: &mut Plan,
        touched: &mut HashSet<BackendId>,
    ) -> Option<ServiceId> {
        self.owners.remove(fe);
        let entries = self.actual.frontends.remove(fe)?;
        plan.delete_masters.push((*fe, 0));
        let svc_id = entries.master.svc_id;
        if let Some(nets) = self.actual.source_ranges.remove(&svc_id) {
            plan.delete_ranges
                .extend(nets.into_iter().map(|n| (svc_id, n)));
        }
        for slot in 1..=entries.slots.len() {
            plan.delete_removed_slots.push((*fe, slot as u16));
        }
        for id in &entries.slots {
            self.unref_backend(*id, touched);
        }
        if entries.master.options.affinity_timeout.is_some() {
            plan.prune_affinity = true;
        }
        self.maglev_sources.remove(&svc_id);
        if self.actual.maglev.remove(&svc_id).is_some() {
            plan.delete_maglev.push(svc_id);
        }
        Some(svc_id)
    }

    fn execute(&mut self, plan: &Plan) -> Result<(), MapError> {
        self.maps.put_backends(&plan.put_backends)?;
        self.maps.put_service_entries(&plan.put_slots)?;
        self.maps.put_source_ranges(&plan.put_ranges)?;
        // Tables before the masters that use them.
        self.maps.put_maglev_tables(&plan.put_maglev)?;
        // Internal-scope masters first: an External master that says "use
        // the internal entry" must never be visible before that entry.
        let (internal, external): (Vec<_>, Vec<_>) = plan
            .put_masters
            .iter()
            .partition(|(fe, _, _)| fe.scope == crate::model::Scope::Internal);
        self.maps.put_service_entries(&internal)?;
        self.maps.put_service_entries(&external)?;
        self.maps
            .delete_service_entries(&plan.delete_shrunk_slots)?;
        self.maps.delete_service_entries(&plan.delete_masters)?;
        self.maps
            .delete_service_entries(&plan.delete_removed_slots)?;
        self.maps.delete_source_ranges(&plan.delete_ranges)?;
        self.maps.delete_maglev_tables(&plan.delete_maglev)?;
        self.maps.delete_backends(&plan.delete_backends)?;
        if plan.prune_affinity {
            let valid: HashMap<ServiceId, HashSet<BackendId>> = self
                .actual
                .frontends
                .values()
                .filter(|e| e.master.options.affinity_timeout.is_some())
                .map(|e| (e.master.svc_id, e.slots.iter().copied().collect()))
                .collect();
            self.maps.prune_affinity(&mut |svc_id, backend_id| {
                valid
                    .get(&svc_id)
                    .is_some_and(|slots| slots.contains(&backend_id))
            })?;
        }
        Ok(())
    }
}
