//! Pruning, on a complete sync only (once the source has delivered its
//! whole initial state): what no Service claims any more, or what an
//! interrupted sync or a previous agent left in the maps.

use std::collections::HashSet;

use super::plan::Plan;
use super::{LbMaps, Reconciler};
use crate::datapath::maps::ServiceId;
use crate::model::Frontend;

impl<M: LbMaps> Reconciler<M> {
    /// Plans every pruning step; returns how many frontends were unowned.
    pub(super) fn plan_prune(&mut self, plan: &mut Plan) -> usize {
        let pruned = self.plan_unowned_frontends(plan);
        self.plan_stray_entries(plan);
        // Every backend is checked for references, not only those touched.
        plan.touched_backends
            .extend(self.actual.backends.keys().copied());
        self.plan_unused_maglev_tables(plan);
        self.plan_stray_source_ranges(plan);
        pruned
    }

    /// Removes frontends no Service claims (restored from pinned maps of a
    /// previous run and not claimed since).
    fn plan_unowned_frontends(&mut self, plan: &mut Plan) -> usize {
        let unowned: Vec<Frontend> = self
            .actual
            .frontends
            .keys()
            .filter(|fe| !self.owners.contains_key(*fe))
            .copied()
            .collect();
        for fe in &unowned {
            self.plan_frontend_removal(fe, plan);
        }
        unowned.len()
    }

    /// Removes stray entries of an interrupted sync, unless this sync just
    /// rewrote the same key for a frontend that is now whole.
    fn plan_stray_entries(&mut self, plan: &mut Plan) {
        let stray = std::mem::take(&mut self.actual.stray_entries);
        let frontends = &self.actual.frontends;
        plan.delete_removed_slots
            .extend(stray.into_iter().filter(|(fe, slot)| {
                !frontends
                    .get(fe)
                    .is_some_and(|e| *slot == 0 || (*slot as usize) <= e.slots.len())
            }));
    }

    /// Removes Maglev tables no frontend uses (an interrupted sync's).
    fn plan_unused_maglev_tables(&mut self, plan: &mut Plan) {
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
    }

    /// Removes source ranges of ids no frontend has (an interrupted sync's).
    fn plan_stray_source_ranges(&mut self, plan: &mut Plan) {
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
}
