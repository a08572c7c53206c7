//! Standalone mode's source loop: the manifest source reloads what changed
//! on disk into its object store, and the Services it marks changed are
//! translated and synced (all of them when the agent's Node document
//! changed). Every sync is full until a complete read has
//! pruned the maps once (so a restart with a file that cannot be read
//! prunes nothing); a path that cannot be read keeps its last state and
//! turns health red. A sync that did not end clean is retried on its own,
//! as a full one (see [`retry_delay`]), and so is one after the pins were
//! restored (see `pin_watch`).

use anyhow::{Context, Result};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::node::node_context;
use super::pin_watch::PinWatch;
use super::schedule::retry_delay;
use super::syncer::{PolicyState, Synced, Syncer};
use super::LRU_GAUGE_PERIOD;
use super::{pin_ticks, sleep_until_opt, stop_requested, AgentConfig, SourceContext};
use crate::datapath::fake::FakeMaps;
use crate::datapath::resize::Demand;
use crate::reconcile::Reconciler;
use crate::source::manifests::{ManifestOptions, ManifestSource, ReloadReport};
use crate::source::store::ObjectStore;
use crate::status::WatcherState;
use crate::translate::translate_service;

/// The first read of the manifests: done before the datapath loads, so
/// the maps are created large enough for it ([`first_demand`]).
pub(super) type FirstRead = (ManifestSource, ReloadReport);

/// Starts watching the manifests of `options` and reading them, on the
/// blocking pool (a file's documents are decoded on several threads).
pub(super) fn read_ahead(options: &ManifestOptions) -> Result<JoinHandle<FirstRead>> {
    let mut source = ManifestSource::open(options).context("watching the manifests")?;
    Ok(tokio::task::spawn_blocking(move || {
        let report = source.reload();
        (source, report)
    }))
}

/// Syncs the maps to the manifests read by `first` (then watched) until
/// the agent is asked to stop.
pub(super) async fn run(
    mut syncer: Syncer,
    pins: &mut PinWatch,
    first: FirstRead,
    ctx: &SourceContext<'_>,
) -> Result<()> {
    let (mut source, first_report) = first;
    let mut first_report = Some(first_report);
    let mut lru_tick = tokio::time::interval(LRU_GAUGE_PERIOD);
    let mut pin_tick = pin_ticks();
    let stop = stop_requested();
    tokio::pin!(stop);
    let mut reload = true;
    let mut retry_at: Option<Instant> = None;
    let mut pruned = false;
    let mut policies = PolicyState::default();
    loop {
        if reload {
            let report = match first_report.take() {
                Some(report) => report,
                None => {
                    let (reloaded, report) = tokio::task::spawn_blocking(move || {
                        let report = source.reload();
                        (source, report)
                    })
                    .await?;
                    source = reloaded;
                    report
                }
            };
            for doc in &report.skipped {
                ctx.metrics.inc_skipped(doc.reason);
            }
            for error in &report.read_errors {
                ctx.metrics.inc_source_read_error(error.reason);
            }
            let health = source.health();
            ctx.status.watcher("manifests", |w| {
                w.state = if health.is_ok() {
                    WatcherState::Watching
                } else {
                    WatcherState::Failing
                };
                w.errors += report.read_errors.len() as u64;
                if let Err(e) = &health {
                    w.last_error = Some(e.clone());
                }
            });
            // Not healthy before the first complete read: a file still being
            // written at start is not served yet.
            syncer.set_source_health(health.is_ok() && (pruned || source.is_complete()));
            syncer.set_rejected(&source.rejected_services());
        }
        if reload || retry_at.is_some_and(|at| at <= Instant::now()) {
            let changes = source.take_changes();
            let store = source.store();
            // The Node document named --node-name, if any, with the flags:
            // a change of it marks every Service changed (`changes.all`).
            let node = node_context(&ctx.config.node_name, store.node(), ctx.config.node_flags());
            let synced = if !pruned || retry_at.is_some() || changes.all {
                let complete = source.is_complete();
                let synced = syncer.sync_everything(&mut policies, store, &node, complete);
                pruned |= complete && synced != Synced::Failed;
                synced
            } else {
                syncer.sync_changed(&mut policies, store, &node, &changes.services)
            };
            policies.publish(ctx.metrics, ctx.health_checks).await;
            ctx.metrics
                .add_changes(changes.service_changes, changes.endpoint_changes);
            retry_at = retry_delay(synced).map(|delay| Instant::now() + delay);
        }
        reload = false;
        tokio::select! {
            () = source.changed() => {
                reload = true;
                ctx.health.change_queued();
                ctx.metrics.kube_proxy().record_queued(std::time::SystemTime::now());
            }
            _ = sleep_until_opt(retry_at) => {}
            _ = lru_tick.tick() => syncer.update_lru_gauges(),
            _ = pin_tick.tick() => if pins.check(&mut syncer, ctx.status) {
                // Restored: a full sync, as a retry is.
                retry_at = Some(Instant::now());
            },
            _ = &mut stop => return Ok(()),
        }
    }
}

/// Entries the Services of `store` need in each growable map when the
/// maps are empty: what the first sync's admission would count, without
/// the backends Services share (each counted per Service, an upper bound
/// at worst). Translated one Service at a time, nothing kept.
pub(super) fn first_demand(store: &ObjectStore, config: &AgentConfig) -> Result<Demand> {
    let node = node_context(&config.node_name, store.node(), config.node_flags());
    let empty = Reconciler::new(FakeMaps::new()).context("sizing the maps")?;
    let mut demand = Demand::default();
    let mut skipped = Vec::new();
    for (key, svc) in store.services_by_key() {
        let slices = store.slices_of(key);
        let slices: Vec<&EndpointSlice> = slices.iter().collect();
        let translated = translate_service(svc, &slices, &node, &mut skipped);
        skipped.clear();
        let used = empty.peak_use([&translated.frontends]);
        demand.services += used.services;
        demand.backends += used.backends;
        demand.source_ranges += used.source_ranges;
        demand.maglev += used.maglev;
    }
    Ok(demand)
}
