//! Maglev tables in a sync. A table is a function of the frontend's
//! backend addresses, the table size and the seed, so it is rewritten only
//! when the set of backend addresses changes; frontends with the same set
//! (a NodePort on every node address) share one table in a sync's writes.

use super::plan::Plan;
use super::{LbMaps, Reconciler};
use crate::datapath::maps::{BackendId, MaglevTable, MaglevTableInfo, ServiceId};
use crate::maglev::MaglevError;
use crate::model::{Frontend, FrontendSpec, L4Addr};

/// What a frontend's Maglev table needs, decided before the frontend's
/// plan changes any state, so a table that cannot be built refuses the
/// frontend cleanly.
pub(super) enum TableNeed {
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

impl<M: LbMaps> Reconciler<M> {
    /// Whether `fe`'s Maglev table must be written for `spec`, and the
    /// table's slots when they must be computed.
    pub(super) fn table_need(
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
    pub(super) fn plan_maglev(&mut self, svc_id: ServiceId, need: TableNeed, plan: &mut Plan) {
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
}
