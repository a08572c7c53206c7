//! Applying a [`Plan`] to the maps in the order that keeps every frontend
//! consistent for a `connect()` racing with the sync (see the module
//! documentation of [`crate::reconcile`]). Each step is one batch of map
//! calls; a failed call stops the sync there, and the fault-injection
//! tests check the maps are consistent after a failure at every call.

use std::collections::{HashMap, HashSet};

use super::plan::Plan;
use super::{LbMaps, Reconciler};
use crate::datapath::maps::{BackendId, MapError, ServiceId};
use crate::model::Scope;

impl<M: LbMaps> Reconciler<M> {
    pub(super) fn execute(&mut self, plan: &Plan) -> Result<(), MapError> {
        self.write_backends(plan)?;
        self.write_slots(plan)?;
        self.write_maglev_tables(plan)?;
        self.write_masters(plan)?;
        self.write_port_rejects(plan)?;
        self.remove_shrunk_slots(plan)?;
        self.remove_frontends(plan)?;
        self.remove_unreferenced(plan)?;
        if plan.prune_affinity {
            self.prune_affinity()?;
        }
        Ok(())
    }

    /// 1. New and changed backends, before any slot points at them.
    fn write_backends(&mut self, plan: &Plan) -> Result<(), MapError> {
        self.maps.put_backends(&plan.put_backends)
    }

    /// 2. Backend slots of new and changed frontends, and the source ranges
    ///    they gain, before the master that counts or enforces them.
    fn write_slots(&mut self, plan: &Plan) -> Result<(), MapError> {
        self.maps.put_service_entries(&plan.put_slots)?;
        self.maps.put_source_ranges(&plan.put_ranges)
    }

    /// 3. Maglev tables, before a master flags Maglev or counts the
    ///    backends they hold.
    fn write_maglev_tables(&mut self, plan: &Plan) -> Result<(), MapError> {
        self.maps.put_maglev_tables(&plan.put_maglev)
    }

    /// 4. Master entries, Internal-scope first: an External master that says
    ///    "use the internal entry" must never be visible before that entry.
    fn write_masters(&mut self, plan: &Plan) -> Result<(), MapError> {
        let (internal, external): (Vec<_>, Vec<_>) = plan
            .put_masters
            .iter()
            .partition(|(fe, _, _)| fe.scope == Scope::Internal);
        self.maps.put_service_entries(&internal)?;
        self.maps.put_service_entries(&external)
    }

    /// 4b. Port-reject entries of new ClusterIPs, after their masters: a
    ///     port about to be served is never refused.
    fn write_port_rejects(&mut self, plan: &Plan) -> Result<(), MapError> {
        self.maps.put_port_rejects(&plan.put_port_rejects)
    }

    /// 5. Slots beyond a shrunk count (the master no longer counts them).
    fn remove_shrunk_slots(&mut self, plan: &Plan) -> Result<(), MapError> {
        self.maps.delete_service_entries(&plan.delete_shrunk_slots)
    }

    /// 6. Removed frontends: master first, then their slots, then the
    ///    port-reject entries of ClusterIPs left without any frontend; then
    ///    source ranges no frontend wants any more (after the master that
    ///    stopped enforcing them, so a client is never refused by a range
    ///    set halfway between the old and the new one), and unused Maglev
    ///    tables.
    fn remove_frontends(&mut self, plan: &Plan) -> Result<(), MapError> {
        self.maps.delete_service_entries(&plan.delete_masters)?;
        self.maps
            .delete_service_entries(&plan.delete_removed_slots)?;
        self.maps.delete_port_rejects(&plan.delete_port_rejects)?;
        self.maps.delete_source_ranges(&plan.delete_ranges)?;
        self.maps.delete_maglev_tables(&plan.delete_maglev)
    }

    /// 7. Backends no slot points at any more.
    fn remove_unreferenced(&mut self, plan: &Plan) -> Result<(), MapError> {
        self.maps.delete_backends(&plan.delete_backends)
    }

    /// 8. Affinity entries that point at a backend their frontend no longer
    ///    has (or of a frontend without affinity, or gone).
    fn prune_affinity(&mut self) -> Result<(), MapError> {
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
        Ok(())
    }
}
