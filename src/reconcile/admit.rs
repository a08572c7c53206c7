//! Admission: which Services of a sync fit the maps. Entries are only
//! freed at the end of a sync (removals come after additions), so what
//! must fit is the peak: every entry in use now plus every key this sync
//! adds. A Service that does not fit is refused as a whole and keeps its
//! state.

use std::collections::HashSet;

use super::{LbMaps, Reconciler, Refusal, RefusalReason, ServiceFrontends};
use crate::datapath::maps::{Capacity, FrontendEntries, MapName};
use crate::model::{Frontend, L4Addr};

/// Entries in use (or added by a Service) in each map admission checks.
#[derive(Clone, Copy, Debug, Default)]
struct MapUse {
    services: usize,
    backends: usize,
    source_ranges: usize,
    maglev: usize,
}

impl MapUse {
    /// The first map `self + added` overflows: (map, needed, used, capacity).
    fn overflow(&self, added: &MapUse, cap: &Capacity) -> Option<(MapName, usize, usize, usize)> {
        [
            (
                MapName::Services,
                added.services,
                self.services,
                cap.services,
            ),
            (
                MapName::Backends,
                added.backends,
                self.backends,
                cap.backends,
            ),
            (
                MapName::SourceRanges,
                added.source_ranges,
                self.source_ranges,
                cap.source_ranges,
            ),
            (MapName::Maglev, added.maglev, self.maglev, cap.maglev),
        ]
        .into_iter()
        .find(|(_, needed, used, capacity)| used + needed > *capacity)
    }

    fn add(&mut self, added: &MapUse) {
        self.services += added.services;
        self.backends += added.backends;
        self.source_ranges += added.source_ranges;
        self.maglev += added.maglev;
    }
}

impl<M: LbMaps> Reconciler<M> {
    /// Keeps the changes that fit the maps; the others are refused and keep
    /// their state.
    pub(super) fn admit(
        &self,
        changes: Vec<(String, ServiceFrontends)>,
        refused: &mut Vec<Refusal>,
    ) -> Vec<(String, ServiceFrontends)> {
        let cap = self.maps.capacity();
        let mut used = MapUse {
            services: self.service_entries(),
            backends: self.actual.backends.len(),
            source_ranges: self.actual.source_range_entries(),
            maglev: self.actual.maglev.len(),
        };
        let mut new_backends: HashSet<L4Addr> = HashSet::new();
        let mut admitted = Vec::with_capacity(changes.len());
        for (service, fes) in changes {
            let added_backends = self.added_backends(&fes, &new_backends);
            let added = MapUse {
                backends: added_backends.len(),
                ..self.added_entries(&fes)
            };
            match used.overflow(&added, &cap) {
                None => {
                    used.add(&added);
                    new_backends.extend(added_backends);
                    admitted.push((service, fes));
                }
                Some((map, needed, used, capacity)) => refused.push(Refusal {
                    service,
                    reason: RefusalReason::Capacity {
                        map,
                        needed,
                        free: capacity.saturating_sub(used),
                        capacity,
                    },
                }),
            }
        }
        admitted
    }

    /// Entries each map would hold at the peak of a sync that admitted
    /// every one of `services` (what admission checks against capacity):
    /// what the maps must hold for none to be refused.
    pub fn peak_use<'a>(
        &self,
        services: impl IntoIterator<Item = &'a ServiceFrontends>,
    ) -> Capacity {
        let mut used = MapUse {
            services: self.service_entries(),
            backends: self.actual.backends.len(),
            source_ranges: self.actual.source_range_entries(),
            maglev: self.actual.maglev.len(),
        };
        let mut new_backends: HashSet<L4Addr> = HashSet::new();
        for fes in services {
            let added_backends = self.added_backends(fes, &new_backends);
            used.add(&MapUse {
                backends: added_backends.len(),
                ..self.added_entries(fes)
            });
            new_backends.extend(added_backends);
        }
        Capacity {
            services: used.services,
            backends: used.backends,
            source_ranges: used.source_ranges,
            maglev: used.maglev,
        }
    }

    /// What is programmed for a frontend now.
    fn programmed(&self, fe: &Frontend) -> Option<&FrontendEntries> {
        self.actual.frontends.get(fe)
    }

    /// Services-map keys, source ranges and Maglev tables `fes` adds to
    /// what the maps hold (a rewritten table replaces its entry).
    fn added_entries(&self, fes: &ServiceFrontends) -> MapUse {
        let services = fes
            .iter()
            .map(|(fe, spec)| {
                let existing = self.programmed(fe).map_or(0, |e| 1 + e.slots.len());
                (1 + spec.backends.len()).saturating_sub(existing)
            })
            .sum::<usize>()
            + self.added_port_rejects(fes);
        let source_ranges = fes
            .iter()
            .map(|(fe, spec)| {
                let existing = self
                    .programmed(fe)
                    .and_then(|e| self.actual.source_ranges.get(&e.master.svc_id));
                spec.source_ranges
                    .iter()
                    .filter(|n| !existing.is_some_and(|e| e.contains(&n.trunc())))
                    .count()
            })
            .sum();
        let maglev = fes
            .iter()
            .filter(|(fe, spec)| {
                spec.options.maglev
                    && !spec.backends.is_empty()
                    && !self
                        .programmed(fe)
                        .is_some_and(|e| self.actual.maglev.contains_key(&e.master.svc_id))
            })
            .count();
        MapUse {
            services,
            backends: 0,
            source_ranges,
            maglev,
        }
    }

    /// Backend addresses of `fes` neither in the maps nor added by a Service
    /// admitted before in this sync.
    fn added_backends(
        &self,
        fes: &ServiceFrontends,
        new_backends: &HashSet<L4Addr>,
    ) -> HashSet<L4Addr> {
        fes.values()
            .flat_map(|s| s.backends.iter().map(|b| b.addr))
            .filter(|a| !self.backend_by_addr.contains_key(a) && !new_backends.contains(a))
            .collect()
    }
}
