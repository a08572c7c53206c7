//! Planning a sync: the map writes that bring the changed Services to
//! their desired state, grouped in the order [`super::execute`] applies
//! them. Planning keeps the reconciler's view of the maps (`actual`, the
//! backend index and reference counts) in step with the planned writes.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::{LbMaps, Reconciler, Refusal, RefusalReason, ServiceFrontends, MAX_SLOTS};
use crate::datapath::maps::{
    BackendEntry, BackendId, FrontendEntries, MaglevTable, MasterEntry, ServiceId, SvcValue,
};
use crate::model::{Backend, Frontend, FrontendSpec, L4Addr};

/// The writes of one sync, in the order they are applied, and the ids the
/// sync frees once applied.
#[derive(Default)]
pub(super) struct Plan {
    pub put_backends: Vec<(BackendId, BackendEntry)>,
    pub put_slots: Vec<(Frontend, u16, SvcValue)>,
    pub put_ranges: Vec<(ServiceId, IpNet)>,
    pub put_maglev: Vec<(ServiceId, MaglevTable)>,
    pub put_masters: Vec<(Frontend, u16, SvcValue)>,
    pub delete_shrunk_slots: Vec<(Frontend, u16)>,
    pub delete_masters: Vec<(Frontend, u16)>,
    pub delete_removed_slots: Vec<(Frontend, u16)>,
    pub delete_ranges: Vec<(ServiceId, IpNet)>,
    pub delete_maglev: Vec<ServiceId>,
    pub delete_backends: Vec<BackendId>,
    /// ClusterIPs that gain or lose their port-reject entry.
    pub put_port_rejects: Vec<IpAddr>,
    pub delete_port_rejects: Vec<IpAddr>,
    pub prune_affinity: bool,
    /// Maglev tables built in this sync, by their sorted backend addresses:
    /// frontends with the same set get the same table (one `Arc`).
    pub tables: HashMap<Vec<L4Addr>, MaglevTable>,
    /// Backends that lost a reference: removed if none is left.
    pub touched_backends: HashSet<BackendId>,
    /// Ids freed by this sync, released only once it is applied.
    pub released_svc_ids: Vec<ServiceId>,
    pub released_backends: Vec<BackendId>,
    /// Addresses of the deleted backends that no backend keeps (a removed
    /// backend's connected UDP sockets are destroyed once it is applied).
    pub removed_backend_addrs: Vec<L4Addr>,
}

impl Plan {
    /// Map entries written or deleted.
    pub fn writes(&self) -> usize {
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
            + self.put_port_rejects.len()
            + self.delete_port_rejects.len()
    }
}

impl<M: LbMaps> Reconciler<M> {
    /// Plans one admitted Service: each frontend it wants (or a refusal),
    /// then the removal of the frontends it had and no longer programs.
    pub(super) fn plan_service(
        &mut self,
        service: &String,
        frontends: ServiceFrontends,
        plan: &mut Plan,
        refused: &mut Vec<Refusal>,
    ) {
        let previous: Vec<Frontend> = self
            .applied
            .get(service)
            .map(|fes| fes.iter().map(|(fe, _)| *fe).collect())
            .unwrap_or_default();
        // In frontend order, as `frontends` iterates.
        let mut programmed = Vec::with_capacity(frontends.len());
        for (fe, spec) in frontends {
            match self.plan_owned_frontend(service, &fe, &spec, plan) {
                // Moved, not copied: the applied state is the one copy kept.
                Ok(()) => programmed.push((fe, spec)),
                Err(reason) => refused.push(Refusal {
                    service: service.clone(),
                    reason,
                }),
            }
        }
        for fe in previous
            .iter()
            .filter(|fe| programmed.binary_search_by(|(p, _)| p.cmp(fe)).is_err())
        {
            self.plan_frontend_removal(fe, plan);
        }
        if programmed.is_empty() {
            self.applied.remove(service);
        } else {
            self.applied
                .insert(service.clone(), programmed.into_boxed_slice());
        }
    }

    /// Plans `fe` for `service`, refusing it when it has more backends than
    /// slots or another Service owns it.
    fn plan_owned_frontend(
        &mut self,
        service: &String,
        fe: &Frontend,
        spec: &FrontendSpec,
        plan: &mut Plan,
    ) -> Result<(), RefusalReason> {
        if spec.backends.len() > MAX_SLOTS {
            return Err(RefusalReason::TooManyBackends {
                frontend: *fe,
                backends: spec.backends.len(),
            });
        }
        if let Some(owner) = self.owners.get(fe).filter(|o| *o != service) {
            return Err(RefusalReason::FrontendConflict {
                frontend: *fe,
                owner: owner.clone(),
            });
        }
        self.plan_frontend(fe, spec, plan)?;
        self.owners.insert(*fe, service.clone());
        Ok(())
    }

    /// Plans the writes that make `fe` match `spec`; refuses when ids ran
    /// out or its Maglev table cannot be built.
    fn plan_frontend(
        &mut self,
        fe: &Frontend,
        spec: &FrontendSpec,
        plan: &mut Plan,
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
        let old_master = existing.map(|e| e.master);
        let old_slots: Vec<BackendId> = existing.map(|e| e.slots.clone()).unwrap_or_default();
        self.plan_source_ranges(svc_id, spec, plan);
        plan_slots(fe, svc_id, &slots, &old_slots, plan);
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
            self.unref_backend(*id, plan);
        }
        for id in &slots {
            *self.backend_refs.entry(*id).or_default() += 1;
        }
        self.actual
            .frontends
            .insert(*fe, FrontendEntries { master, slots });
        Ok(())
    }

    /// Plans the source ranges of frontend `svc_id`. Ranges are keyed by
    /// id: what an id holds (also strays of an interrupted sync under a
    /// reused id) becomes exactly the spec's.
    fn plan_source_ranges(&mut self, svc_id: ServiceId, spec: &FrontendSpec, plan: &mut Plan) {
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

    fn unref_backend(&mut self, id: BackendId, plan: &mut Plan) {
        if let Some(n) = self.backend_refs.get_mut(&id) {
            *n = n.saturating_sub(1);
        }
        plan.touched_backends.insert(id);
    }

    /// Plans the removal of a frontend: master, slots, source ranges,
    /// Maglev table; its id is released after the sync.
    pub(super) fn plan_frontend_removal(&mut self, fe: &Frontend, plan: &mut Plan) {
        self.owners.remove(fe);
        let Some(entries) = self.actual.frontends.remove(fe) else {
            return;
        };
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
            self.unref_backend(*id, plan);
        }
        if entries.master.options.affinity_timeout.is_some() {
            plan.prune_affinity = true;
        }
        self.maglev_sources.remove(&svc_id);
        if self.actual.maglev.remove(&svc_id).is_some() {
            plan.delete_maglev.push(svc_id);
        }
        plan.released_svc_ids.push(svc_id);
    }

    /// Plans the removal of backends nothing points at any more (of those
    /// the sync touched).
    pub(super) fn plan_unreferenced_backends(&mut self, plan: &mut Plan) {
        for id in std::mem::take(&mut plan.touched_backends) {
            if self.backend_refs.get(&id).copied().unwrap_or(0) != 0 {
                continue;
            }
            self.backend_refs.remove(&id);
            if let Some(b) = self.actual.backends.remove(&id) {
                if self.backend_by_addr.get(&b.addr) == Some(&id) {
                    self.backend_by_addr.remove(&b.addr);
                    plan.removed_backend_addrs.push(b.addr);
                }
                plan.delete_backends.push(id);
                plan.released_backends.push(id);
            }
        }
        plan.delete_backends.sort_unstable();
    }
}

/// Plans the slots (1..) of frontend `svc_id` that differ from `old_slots`.
fn plan_slots(
    fe: &Frontend,
    svc_id: ServiceId,
    slots: &[BackendId],
    old_slots: &[BackendId],
    plan: &mut Plan,
) {
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
}
