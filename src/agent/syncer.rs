//! The syncer: the reconciler with the reporting around it. Both sources
//! hand it what translation made of their objects; it writes the maps, keeps
//! the DSR map in step, and reflects every sync in metrics, health and
//! `kpr status`. [`PolicyState`] keeps what translation says besides
//! frontends (health checks, Local-policy frontends without a local
//! endpoint) per Service, so that incremental syncs can update it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::applied_record::AppliedRecord;
use super::events::ServiceEvents;
use super::stale_sockets::StaleUdpSockets;
use super::switch_over::SwitchOver;
use super::unprogrammed::Unprogrammed;
use crate::datapath::dsr::{self, DsrTable};
use crate::datapath::kernel::KernelMaps;
use crate::datapath::maps::MapName;
use crate::datapath::resize::Demand;
use crate::healthcheck::HealthCheckServer;
use crate::http::Health;
use crate::metrics::TrafficPolicy as MetricPolicy;
use crate::metrics::{DatapathNames, FrontendLabel, MapLabel, Metrics, SyncErrorReason, SyncScope};
use crate::reconcile::{
    DesiredByService, Reconciler, RefusalReason, ServiceFrontends, SyncError, SyncOutcome,
};
use crate::source::manifests::Rejected;
use crate::source::store::ObjectStore;
use crate::status::StatusHandle;
use crate::translate::{
    self, HealthCheck, NoLocalEndpoints, NodeContext, ServiceTranslation, Skipped, TrafficPolicy,
    Translation,
};
use crate::web_ui::EventSink;

/// The reconciler with the reporting around it: every sync is timed,
/// counted and reflected in health.
pub struct Syncer {
    reconciler: Reconciler<KernelMaps>,
    metrics: Arc<Metrics>,
    health: Health,
    status: StatusHandle,
    /// The Services not programmed now, kept exact across full and
    /// incremental syncs.
    unprogrammed: Unprogrammed,
    /// Kubernetes mode: Warning Events on the unprogrammed Services.
    events: Option<ServiceEvents>,
    /// Destroys connected UDP sockets to the backends a sync removed.
    stale_udp: Option<StaleUdpSockets>,
    /// The DSR map, kept in step with the services map after every sync
    /// that wrote to it (north-south datapath only).
    dsr: Option<DsrTable>,
    /// The metric labels of frontend and backend ids (`DatapathCounters`),
    /// refreshed after each sync while detailed labels are on.
    datapath_names: Option<(Arc<RwLock<DatapathNames>>, usize)>,
    /// The DSR map may differ from the services map: just opened, or its
    /// last sync failed.
    dsr_stale: bool,
    /// Whether the source read everything at its last try: health needs
    /// both the maps and the source (a source that cannot read keeps its
    /// last state, which must not look healthy).
    source_healthy: bool,
    bpf_root: PathBuf,
    /// A sync of a complete source state succeeded: the maps hold it all.
    filled: bool,
    /// Grows the maps and switches the programs over (the agent's; None:
    /// the maps are what they are).
    switch_over: Option<SwitchOver>,
    /// Why the pinned datapath is not the agent's (pins removed or
    /// replaced and not restored): health stays red while there is one.
    datapath_fault: Option<String>,
    /// Counts the switch-overs (maps grown, programs moved to new maps):
    /// pins the agent itself replaced, for `pin_watch` to take again.
    switch_overs: u64,
    /// The record of what the maps hold, for `kpr svc list` (names) and
    /// `--verify`.
    applied_record: AppliedRecord,
    /// Where each sync that changed something is told (the web view's tail).
    events_sink: Option<Arc<dyn EventSink>>,
}

/// How a sync ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Synced {
    /// The maps hold everything the source asked for.
    Clean,
    /// The maps are written, but some Services were refused (capacity,
    /// conflicts); they keep their previous state.
    Refused,
    /// A map write failed; the maps are consistent but behind.
    Failed,
}

impl Syncer {
    pub fn new(
        bpf_root: &Path,
        maglev: crate::maglev::MaglevParams,
        metrics: Arc<Metrics>,
        health: Health,
        status: StatusHandle,
    ) -> Result<Syncer> {
        let maps = KernelMaps::open(bpf_root).context("opening the pinned maps")?;
        let reconciler =
            Reconciler::with_maglev(maps, maglev).context("reading the pinned maps")?;
        let s = reconciler.snapshot();
        tracing::info!(
            frontends = s.frontends.len(),
            backends = s.backends.len(),
            "restored state from pinned maps"
        );
        Ok(Syncer {
            reconciler,
            metrics,
            health,
            status,
            unprogrammed: Unprogrammed::default(),
            events: None,
            stale_udp: None,
            dsr: None,
            datapath_names: None,
            dsr_stale: true,
            source_healthy: true,
            bpf_root: bpf_root.to_path_buf(),
            filled: false,
            switch_over: None,
            datapath_fault: None,
            switch_overs: 0,
            applied_record: AppliedRecord::new(bpf_root),
            events_sink: None,
        })
    }

    /// Lets the syncer grow the maps, and switch the programs over to new
    /// ones once they are filled.
    /// Keeps `names` current for the datapath metrics, while the Services
    /// are at most `max` (their labels are off above).
    pub(super) fn with_datapath_names(
        mut self,
        names: Arc<RwLock<DatapathNames>>,
        max: usize,
    ) -> Syncer {
        self.datapath_names = Some((names, max));
        self
    }

    /// Refreshes the datapath metrics' names of frontend and backend ids.
    fn update_datapath_names(&self) {
        let Some((names, max)) = &self.datapath_names else {
            return;
        };
        let r = &self.reconciler;
        let mut next = DatapathNames {
            services: r.service_count(),
            ..DatapathNames::default()
        };
        if next.services <= *max {
            for (id, fe, service) in r.frontend_services() {
                let frontend = fe.addr.to_string();
                next.frontends
                    .insert(id, FrontendLabel { frontend, service });
            }
            for (id, b) in &r.snapshot().backends {
                next.backends.insert(*id, b.addr.to_string());
            }
        }
        if let Ok(mut n) = names.write() {
            *n = next;
        }
    }

    pub(super) fn with_switch_over(mut self, switch_over: SwitchOver) -> Syncer {
        self.switch_over = Some(switch_over);
        self
    }

    /// Also destroys the connected UDP sockets to removed backends, in the
    /// network namespaces of `cgroup`'s processes.
    pub(super) fn with_stale_udp_sockets(mut self, bpf_root: &Path, cgroup: &Path) -> Syncer {
        self.stale_udp = Some(StaleUdpSockets::new(bpf_root, cgroup));
        self
    }

    /// Also keeps the DSR map pinned under `bpf_root` (created by the
    /// north-south datapath's load) in step with every sync.
    pub fn with_dsr(mut self, bpf_root: &Path) -> Result<Syncer> {
        self.dsr = Some(DsrTable::open(bpf_root)?);
        Ok(self)
    }

    /// Also tells `sink` of every sync that changed the maps, refused a
    /// Service or failed, as a JSON line (`"kind":"sync"`).
    pub fn with_event_sink(mut self, sink: Arc<dyn EventSink>) -> Syncer {
        self.events_sink = Some(sink);
        self
    }

    /// Also records a Warning Event on each Service it cannot program.
    pub fn with_events(mut self, events: ServiceEvents) -> Syncer {
        self.events = Some(events);
        self
    }

    /// Brings the DSR map to what the services map now holds, when the
    /// services map `changed` or the DSR map is stale. False when a write
    /// failed (logged and counted; the next sync retries).
    fn sync_dsr(&mut self, changed: bool) -> bool {
        let Some(table) = self.dsr.as_mut() else {
            return true;
        };
        if !changed && !self.dsr_stale {
            return true;
        }
        let desired = dsr::desired(self.reconciler.snapshot());
        let ok = match table.sync(&desired) {
            Ok(done) => {
                if done.written + done.deleted > 0 {
                    tracing::debug!(
                        written = done.written,
                        deleted = done.deleted,
                        "DSR map synced"
                    );
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "DSR map not synced; will retry");
                self.metrics.inc_sync_error(SyncErrorReason::MapUpdate);
                false
            }
        };
        self.metrics
            .set_map(MapLabel::Dsr, table.len(), table.capacity());
        self.dsr_stale = !ok;
        ok
    }

    /// The Services the manifest source's validation refused (standalone
    /// mode), by `namespace/name`; shown as unprogrammed from the next sync.
    pub(super) fn set_rejected(&mut self, rejected: &BTreeMap<String, Rejected>) {
        self.unprogrammed.replace_rejected(
            rejected
                .iter()
                .map(|(service, r)| (service, r.reason, r.detail.as_str())),
        );
    }

    /// Whether the source read everything; recorded in health by the next sync.
    pub fn set_source_health(&mut self, healthy: bool) {
        self.source_healthy = healthy;
    }

    /// How many switch-overs the syncer has made (or tried): each may
    /// replace pins, which are then the agent's own.
    pub(super) fn switch_overs(&self) -> u64 {
        self.switch_overs
    }

    /// Why the pinned datapath is not the agent's, or None once it is;
    /// a fault turns health red at once, its end with the next sync.
    pub fn set_datapath_fault(&mut self, fault: Option<String>) {
        if fault.is_some() {
            self.health.record_sync(false);
        }
        self.datapath_fault = fault;
    }

    /// Syncs the maps to `desired`; `complete` says the source delivered
    /// its whole state, so entries nobody claims may be pruned.
    pub fn sync_full(&mut self, desired: DesiredByService, complete: bool) -> Synced {
        let grown = self.grow_ahead(desired.values());
        self.sync_switching(SyncScope::Full, complete, None, grown, |r| {
            r.sync_full_owned(desired, complete)
        })
    }

    /// Syncs the maps for the Services in `changes` only.
    pub fn sync_services(&mut self, changes: Vec<(String, ServiceFrontends)>) -> Synced {
        let grown = self.grow_ahead(changes.iter().map(|(_, fes)| fes));
        let synced: Vec<String> = changes.iter().map(|(key, _)| key.clone()).collect();
        self.sync_switching(SyncScope::Partial, false, Some(&synced), grown, |r| {
            r.sync_services(changes)
        })
    }

    /// Grows the maps (programs switched over to larger copies) before a
    /// sync that would not fit them: the peak use is computed as admission
    /// computes it, so the sync then refuses nothing for room unless the
    /// maps may not grow (a fixed --lb-map-max, or the ceiling).
    fn grow_ahead<'a>(
        &mut self,
        services: impl IntoIterator<Item = &'a ServiceFrontends>,
    ) -> Result<()> {
        if self.switch_over.is_none() {
            return Ok(());
        }
        let peak = self.reconciler.peak_use(services);
        let cap = self.reconciler.capacity();
        let short = |needed: usize, capacity: usize| if needed > capacity { needed } else { 0 };
        let demand = Demand {
            services: short(peak.services, cap.services),
            backends: short(peak.backends, cap.backends),
            source_ranges: short(peak.source_ranges, cap.source_ranges),
            maglev: short(peak.maglev, cap.maglev),
        };
        if demand != Demand::default() {
            self.grow(&demand)?;
        }
        Ok(())
    }

    /// Runs `sync` (a failed growth before it, `grown`, fails it too); then
    /// switches the programs over if new maps waited to be filled, once a
    /// sync of the source's `complete` state has filled them. Timed as a
    /// sync of `scope`. `synced`: the Services synced, or None for all.
    fn sync_switching(
        &mut self,
        scope: SyncScope,
        complete: bool,
        synced: Option<&[String]>,
        grown: Result<()>,
        sync: impl FnOnce(&mut Reconciler<KernelMaps>) -> Result<SyncOutcome, SyncError>,
    ) -> Synced {
        let metrics = self.metrics.clone();
        let timer = metrics.sync_timer();
        let mut result = sync(&mut self.reconciler);
        if let Err(e) = grown {
            result = Err(switch_over_failed(e));
        }
        self.filled |= complete && result.is_ok();
        if result.is_ok() && self.filled {
            if let Some(switch) = self.switch_over.as_mut().filter(|s| s.pending()) {
                // Counted tried or not: a failed one may have moved pins.
                self.switch_overs += 1;
                if let Err(e) = switch.attach() {
                    result = Err(switch_over_failed(e));
                }
            }
        }
        let elapsed = timer.stop();
        metrics.kube_proxy().observe_sync(scope, elapsed);
        self.report(elapsed, result, synced)
    }

    /// Grows the maps for `demand` and points the reconciler and the DSR
    /// table at the new pins; false when they do not grow.
    fn grow(&mut self, demand: &Demand) -> Result<bool> {
        let Some(switch) = self.switch_over.as_mut() else {
            return Ok(false);
        };
        self.switch_overs += 1;
        let outcome = switch.grow(demand);
        // A growth that failed after renaming pins left the pinned maps
        // new: write those, which the programs get once the swap (retried
        // by the next sync) succeeds, never the old ones.
        if !matches!(outcome, Ok(None)) {
            let maps = KernelMaps::open(&self.bpf_root).context("opening the grown maps")?;
            *self.reconciler.maps_mut() = maps;
            if self.dsr.is_some() {
                self.dsr =
                    Some(DsrTable::open(&self.bpf_root).context("opening the grown DSR map")?);
                self.dsr_stale = true;
            }
        }
        let Some(grown) = outcome? else {
            return Ok(false);
        };
        for g in &grown {
            self.metrics.inc_map_growth(g.map);
        }
        Ok(true)
    }

    /// Logs, counts and publishes a sync that took `elapsed` (already
    /// observed by the sync timer) of every Service (`synced` None) or of
    /// the Services `synced`.
    fn report(
        &mut self,
        elapsed: Duration,
        result: Result<SyncOutcome, SyncError>,
        synced: Option<&[String]>,
    ) -> Synced {
        // A failed sync re-read the maps: what they hold may have moved.
        let changed = result
            .as_ref()
            .map_or(true, |o| o.writes > 0 || o.pruned_frontends > 0);
        let synced = match result {
            Ok(outcome) => {
                if let Some(stale) = &mut self.stale_udp {
                    stale.backends_removed(&outcome.removed_backends);
                }
                let known = self.unprogrammed.messages();
                match synced {
                    None => self.unprogrammed.replace_refused(&outcome.refused),
                    Some(keys) => self.unprogrammed.update_refused(keys, &outcome.refused),
                }
                for refusal in &outcome.refused {
                    // Counted every time, logged when new: a refusal repeats
                    // on every retry until the cause goes away.
                    let text = refusal.to_string();
                    if !known.contains(&text) {
                        tracing::error!("{text}");
                    }
                    self.metrics.inc_sync_error(match refusal.reason {
                        RefusalReason::Capacity { .. }
                        | RefusalReason::IdsExhausted
                        | RefusalReason::TooManyBackends { .. }
                        | RefusalReason::Maglev { .. } => SyncErrorReason::Capacity,
                        RefusalReason::FrontendConflict { .. } => SyncErrorReason::Source,
                    });
                }
                if outcome.writes > 0 || outcome.pruned_frontends > 0 || !outcome.refused.is_empty()
                {
                    self.publish_sync(elapsed, Some(&outcome));
                }
                if outcome.writes > 0 || outcome.pruned_frontends > 0 {
                    tracing::info!(
                        services = outcome.applied_services,
                        writes = outcome.writes,
                        pruned = outcome.pruned_frontends,
                        elapsed_us = elapsed.as_micros() as u64,
                        "synced"
                    );
                }
                if outcome.refused.is_empty() {
                    Synced::Clean
                } else {
                    Synced::Refused
                }
            }
            Err(e) => {
                self.publish_sync(elapsed, None);
                tracing::error!(error = %e, "sync failed; will retry");
                self.metrics.inc_sync_error(SyncErrorReason::MapUpdate);
                Synced::Failed
            }
        };
        // A DSR map that lags only affects flows other nodes send here by
        // DSR: retried like a refusal, without failing health.
        let synced = if !self.sync_dsr(changed) && synced == Synced::Clean {
            Synced::Refused
        } else {
            synced
        };
        // Health follows the maps, not single Services: a Service the maps
        // refuse (too big, conflicting) must not make load balancers drain
        // the node and with it every other Service.
        let maps_ok = synced != Synced::Failed;
        // Before health: a node that reports healthy names its Services.
        if maps_ok {
            let refused = self.unprogrammed.list().into_iter().map(|u| u.service);
            self.applied_record.after_sync(
                &self.reconciler,
                changed,
                self.filled,
                refused.collect(),
            );
        }
        self.metrics.record_sync_result(maps_ok, SystemTime::now());
        self.health
            .record_sync(maps_ok && self.source_healthy && self.datapath_fault.is_none());
        self.status.record_sync(maps_ok, self.unprogrammed.list());
        self.unprogrammed.publish(&self.metrics);
        self.update_gauges();
        synced
    }

    /// Tells the event sink of a sync (`outcome` None: it failed).
    fn publish_sync(&self, elapsed: Duration, outcome: Option<&SyncOutcome>) {
        if let Some(sink) = &self.events_sink {
            sink.publish(super::sync_event::line(elapsed, outcome));
        }
    }

    fn update_gauges(&self) {
        self.update_datapath_names();
        let r = &self.reconciler;
        let cap = r.capacity();
        self.metrics.set_services(r.service_count());
        self.metrics.set_frontends(r.snapshot().frontends.len());
        self.metrics.set_backends(r.snapshot().backends.len());
        self.metrics
            .set_map(MapLabel::Services, r.service_entries(), cap.services);
        self.metrics.set_map(
            MapLabel::Backends,
            r.snapshot().backends.len(),
            cap.backends,
        );
        self.metrics.set_map(
            MapLabel::SourceRanges,
            r.snapshot().source_range_entries(),
            cap.source_ranges,
        );
        // A full Maglev map refuses Services: its fill is exported too.
        self.metrics
            .set_map(MapLabel::Maglev, r.snapshot().maglev.len(), cap.maglev);
    }

    /// Refreshes the fill of the LRU maps (a key walk, so not on every sync).
    pub fn update_lru_gauges(&self) {
        let maps = self.reconciler.maps();
        for (name, label) in [
            (MapName::Affinity, MapLabel::Affinity),
            (MapName::SockRevNat, MapLabel::SockRevNat),
        ] {
            self.metrics
                .set_map(label, maps.entry_count(name), maps.max_entries(name));
        }
    }

    pub fn record_skipped(&self, skipped: &[Skipped]) {
        for s in skipped {
            tracing::warn!(object = %s.object, reason = %s.reason, detail = %s.detail, "skipped");
            self.metrics.inc_skipped(s.reason);
        }
    }

    /// Translates every Service of `store` and syncs the maps to the
    /// result; what it does not name is pruned only when the store is
    /// `complete` (both sources' guard against pruning on a partial read).
    pub(super) fn sync_everything(
        &mut self,
        policies: &mut PolicyState,
        store: &ObjectStore,
        node: &NodeContext,
        complete: bool,
    ) -> Synced {
        // One Service's slices rebuilt at a time: never all of them at once.
        let mut translation = Translation::default();
        for (key, svc) in store.services_by_key() {
            let slices = store.slices_of(key);
            let slices: Vec<&EndpointSlice> = slices.iter().collect();
            translation.add(key.clone(), svc, &slices, node);
        }
        for (key, pod) in store.pods_by_key() {
            let frontends = translate::translate_host_ports(pod, node, &mut translation.skipped);
            if !frontends.is_empty() {
                translation.desired.insert(key.clone(), frontends);
            }
        }
        let mut translation = translation.finish();
        self.record_skipped(&translation.skipped);
        policies.replace_all(&translation);
        self.unprogrammed.replace_invalid(&translation);
        let synced = self.sync_full(std::mem::take(&mut translation.desired), complete);
        drop(translation);
        crate::sys::release_free_memory();
        self.send_events(store);
        synced
    }

    /// Offers the Warning Events of the unprogrammed Services (Kubernetes
    /// mode).
    fn send_events(&mut self, store: &ObjectStore) {
        if let Some(events) = self.events.as_mut() {
            events.update(&self.unprogrammed.list(), store);
        }
    }

    /// Translates only the Services named in `changed` (one gone from the
    /// store to nothing, which removes it) and syncs just their frontends.
    pub(super) fn sync_changed(
        &mut self,
        policies: &mut PolicyState,
        store: &ObjectStore,
        node: &NodeContext,
        changed: &BTreeSet<String>,
    ) -> Synced {
        let mut skipped = Vec::new();
        let mut updates: Vec<(String, ServiceFrontends)> = Vec::new();
        for key in changed {
            let (t, present) = match store.service(key) {
                Some(svc) => {
                    let slices = store.slices_of(key);
                    let slices: Vec<&EndpointSlice> = slices.iter().collect();
                    (
                        translate::translate_service(svc, &slices, node, &mut skipped),
                        true,
                    )
                }
                None => match store.pod(key) {
                    Some(pod) => {
                        let frontends = translate::translate_host_ports(pod, node, &mut skipped);
                        let t = ServiceTranslation {
                            frontends,
                            ..ServiceTranslation::default()
                        };
                        (t, true)
                    }
                    None => (ServiceTranslation::default(), false),
                },
            };
            policies.replace_service(key, &t);
            self.unprogrammed
                .update_invalid(key, present.then_some(&t), &skipped);
            updates.push((key.clone(), t.frontends));
        }
        self.record_skipped(&skipped);
        let synced = self.sync_services(updates);
        self.send_events(store);
        synced
    }
}

/// A failed growth or switch-over, as the sync error it makes: health
/// turns unhealthy and the next sync retries.
fn switch_over_failed(e: anyhow::Error) -> SyncError {
    SyncError(crate::datapath::MapError::new(
        "switch over",
        MapName::Services,
        std::io::Error::other(format!("{e:#}")),
    ))
}

/// What translation says besides frontends, kept per Service so that
/// incremental syncs can update it: health check node ports to serve and
/// Local-policy frontends without a local endpoint.
#[derive(Default)]
pub(super) struct PolicyState {
    health_checks: BTreeMap<String, HealthCheck>,
    no_local: BTreeMap<String, Vec<NoLocalEndpoints>>,
}

impl PolicyState {
    pub(super) fn replace_all(&mut self, t: &Translation) {
        self.health_checks = t
            .health_checks
            .iter()
            .map(|h| (h.service.clone(), h.clone()))
            .collect();
        self.no_local.clear();
        for n in &t.no_local_endpoints {
            self.no_local
                .entry(n.service.service_key())
                .or_default()
                .push(n.clone());
        }
    }

    pub(super) fn replace_service(&mut self, key: &str, t: &ServiceTranslation) {
        match &t.health_check {
            Some(h) => self.health_checks.insert(key.to_string(), h.clone()),
            None => self.health_checks.remove(key),
        };
        if t.no_local_endpoints.is_empty() {
            self.no_local.remove(key);
        } else {
            self.no_local
                .insert(key.to_string(), t.no_local_endpoints.clone());
        }
    }

    /// Publishes the no-local-endpoint counts and serves the health checks.
    pub(super) async fn publish(&self, metrics: &Metrics, health_checks: &HealthCheckServer) {
        for (policy, label) in [
            (TrafficPolicy::Internal, MetricPolicy::Internal),
            (TrafficPolicy::External, MetricPolicy::External),
        ] {
            let n = self
                .no_local
                .values()
                .flatten()
                .filter(|n| n.policy == policy)
                .count();
            metrics.set_no_local_endpoints(label, n);
        }
        let checks: Vec<HealthCheck> = self.health_checks.values().cloned().collect();
        health_checks.update(&checks).await;
    }
}
