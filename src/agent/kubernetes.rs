//! Kubernetes mode's source loop: watchers feed the object store; the
//! [`SyncScheduler`] says when to sync and whether every Service or only
//! the changed ones are translated; the syncer writes the result. The
//! watchers' states and errors are reported in metrics and `kpr status`,
//! the own Node's eligibility for traffic (KEP-3836) in `/healthz`.

use std::time::SystemTime;

use anyhow::Result;
use tokio::time::Instant;

use super::events::ServiceEvents;
use super::node::{node_context, node_eligible};
use super::pin_watch::PinWatch;
use super::schedule::{Scope, SyncScheduler};
use super::syncer::{PolicyState, Synced, Syncer};
use super::{pin_ticks, stop_requested, KubeSourceConfig, SourceContext, LRU_GAUGE_PERIOD};
use crate::metrics::{Metrics, WatchKind};
use crate::source::kube::{self as kube_source, WatchEvent};
use crate::source::store::{Changes, Kind, ObjectStore, Watched};
use crate::status::{StatusHandle, WatcherState};

/// Syncs the maps to the API's Services and EndpointSlices until the agent
/// is asked to stop. Nothing is written before every watcher's initial list
/// is complete, so a restart while the API is unreachable keeps the pinned
/// state serving.
pub(super) async fn run(
    syncer: Syncer,
    pins: &mut PinWatch,
    config: &KubeSourceConfig,
    ctx: &SourceContext<'_>,
) -> Result<()> {
    let (metrics, status) = (ctx.metrics, ctx.status);
    for kind in Kind::ALL {
        status.watcher(watch_kind(kind).as_label(), |w| {
            w.state = WatcherState::Starting
        });
    }
    let client = kube_source::client(&config.api).await?;
    let mut syncer =
        syncer.with_events(ServiceEvents::spawn(client.clone(), &ctx.config.node_name));
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let watchers = kube_source::spawn_watchers(client, &ctx.config.node_name, tx);
    let mut state = SourceState {
        store: ObjectStore::new(),
        policies: PolicyState::default(),
        warned_no_node: false,
    };
    let mut lru_tick = tokio::time::interval(LRU_GAUGE_PERIOD);
    let mut pin_tick = pin_ticks();
    let mut schedule =
        SyncScheduler::new(config.min_sync_period, config.sync_period, Instant::now());
    let stop = stop_requested();
    tokio::pin!(stop);

    loop {
        let wake = schedule.next_wake(Instant::now());
        tokio::select! {
            event = rx.recv() => match event {
                Some(event) => {
                    let node_event = matches!(event, WatchEvent::Node(_));
                    handle_watch_event(&mut state.store, event, metrics, status);
                    if node_event {
                        ctx.health.set_node_eligible(node_eligible(state.store.node()));
                    }
                    if state.store.initial_lists_complete() {
                        schedule.lists_complete();
                    }
                    if state.store.has_changes() {
                        schedule.changed();
                        // Timed by /livez once a sync may apply it.
                        if state.store.initial_lists_complete() {
                            ctx.health.change_queued();
                        }
                        metrics.kube_proxy().record_queued(SystemTime::now());
                    }
                    publish_pending(&state.store, metrics);
                }
                None => anyhow::bail!("the Kubernetes watchers stopped"),
            },
            _ = tokio::time::sleep_until(wake) => if schedule.due(Instant::now()) {
                let changes = state.store.take_changes();
                let scope = schedule.start(&changes);
                let synced = state.sync(&mut syncer, changes, scope, ctx).await;
                schedule.finished(synced, Instant::now());
                publish_pending(&state.store, metrics);
            },
            _ = lru_tick.tick() => syncer.update_lru_gauges(),
            _ = pin_tick.tick() => if pins.check(&mut syncer, status) {
                schedule.resync_now();
            },
            _ = &mut stop => break,
        }
    }
    for w in watchers {
        w.abort();
    }
    Ok(())
}

/// What the loop keeps between syncs besides the schedule.
struct SourceState {
    store: ObjectStore,
    policies: PolicyState,
    /// The missing Node object was warned about (once).
    warned_no_node: bool,
}

impl SourceState {
    /// Translates what `scope` says, as the store now holds it, syncs the
    /// maps and publishes the rest; `changes` (taken from the store) are
    /// counted and their network programming latency observed.
    async fn sync(
        &mut self,
        syncer: &mut Syncer,
        changes: Changes,
        scope: Scope,
        ctx: &SourceContext<'_>,
    ) -> Synced {
        let (metrics, status, store) = (ctx.metrics, ctx.status, &self.store);
        if store.node().is_none() && !self.warned_no_node {
            self.warned_no_node = true;
            tracing::warn!(node = %ctx.config.node_name, "no Node object with this name (check --node-name / NODE_NAME): no node IPs for NodePorts, no zone, and no endpoint counts as local");
        }
        status.update(|s| s.own_node_found = Some(store.node().is_some()));
        let node = node_context(&ctx.config.node_name, store.node(), ctx.config.node_flags());
        let synced = match scope {
            Scope::Everything => syncer.sync_everything(&mut self.policies, store, &node, true),
            Scope::Changed => {
                syncer.sync_changed(&mut self.policies, store, &node, &changes.services)
            }
        };
        self.policies.publish(metrics, ctx.health_checks).await;
        metrics.add_changes(changes.service_changes, changes.endpoint_changes);
        if synced != Synced::Failed {
            let now = k8s_openapi::jiff::Timestamp::now();
            for t in &changes.trigger_times {
                let latency = now.duration_since(*t).as_secs_f64();
                if latency >= 0.0 {
                    metrics.observe_network_programming(latency);
                }
            }
        }
        synced
    }
}

/// kube-proxy's pending-changes gauges: the events the store holds for
/// the next sync.
fn publish_pending(store: &ObjectStore, metrics: &Metrics) {
    let pending = store.pending();
    metrics
        .kube_proxy()
        .set_pending(pending.service_changes, pending.endpoint_changes);
}

fn watch_kind(kind: Kind) -> WatchKind {
    match kind {
        Kind::Service => WatchKind::Service,
        Kind::EndpointSlice => WatchKind::EndpointSlice,
        Kind::Node => WatchKind::Node,
    }
}

fn handle_watch_event(
    store: &mut ObjectStore,
    event: WatchEvent,
    metrics: &Metrics,
    status: &StatusHandle,
) {
    match event {
        WatchEvent::Service(e) => on_watcher_event(store, e, metrics, status),
        WatchEvent::EndpointSlice(e) => on_watcher_event(store, e, metrics, status),
        WatchEvent::Node(e) => on_watcher_event(store, e, metrics, status),
        WatchEvent::Failed(kind, error) => {
            metrics.inc_watch_error(watch_kind(kind));
            status.watcher(watch_kind(kind).as_label(), |w| {
                w.state = WatcherState::Failing;
                w.errors += 1;
                w.last_error = Some(error.clone());
            });
            tracing::warn!(?kind, %error, "watch failed; retrying with backoff");
        }
    }
}

/// One watcher event into the store; a (re)list is buffered until done.
fn on_watcher_event<K: Watched>(
    store: &mut ObjectStore,
    event: kube::runtime::watcher::Event<K>,
    metrics: &Metrics,
    status: &StatusHandle,
) {
    use kube::runtime::watcher::Event;
    let label = watch_kind(K::KIND).as_label();
    match event {
        Event::Init => {
            status.watcher(label, |w| w.state = WatcherState::Listing);
            store.begin_relist(K::KIND)
        }
        Event::InitApply(o) => o.relist(store),
        Event::InitDone => {
            status.watcher(label, |w| w.state = WatcherState::Watching);
            if store.is_listed(K::KIND) {
                metrics.inc_relist(watch_kind(K::KIND));
                status.watcher(label, |w| w.relists += 1);
                tracing::info!(kind = ?K::KIND, "relisted");
            }
            store.end_relist(K::KIND)
        }
        Event::Apply(o) => o.apply(store),
        Event::Delete(o) => o.delete(store),
    }
}
