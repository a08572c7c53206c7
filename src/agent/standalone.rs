//! Standalone mode's source loop: Service and EndpointSlice manifests on
//! disk, watched. The files are the whole truth on every read, so every
//! change is a full translation and sync; a sync that did not end clean is
//! retried on its own (see [`retry_delay`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::time::Instant;

use super::node::node_context;
use super::schedule::retry_delay;
use super::syncer::{PolicyState, Syncer};
use super::{sleep_until_opt, stop_requested, SourceContext, LRU_GAUGE_PERIOD};
use crate::reconcile::DesiredByService;
use crate::source::manifests;
use crate::translate;

/// Syncs the maps to the manifests under `paths` until the agent is asked
/// to stop; a burst of edits within `debounce` is one reload.
pub(super) async fn run(
    mut syncer: Syncer,
    paths: &[PathBuf],
    debounce: Duration,
    ctx: &SourceContext<'_>,
) -> Result<()> {
    let mut watch = manifests::watch(paths, debounce).context("watching the manifests")?;
    let mut lru_tick = tokio::time::interval(LRU_GAUGE_PERIOD);
    let stop = stop_requested();
    tokio::pin!(stop);
    let mut reload = true;
    let mut retry_at: Option<Instant> = None;
    let mut desired = DesiredByService::new();
    let mut policies = PolicyState::default();
    // No Node object in standalone mode: --node-name and --node-ip say
    // which endpoints are local and where NodePorts listen.
    let node = node_context(
        &ctx.config.node_name,
        None,
        &ctx.config.node_ips,
        ctx.config.lb_algorithm,
    );
    loop {
        if reload {
            let paths = paths.to_vec();
            let set = tokio::task::spawn_blocking(move || manifests::load(&paths)).await?;
            for doc in &set.skipped {
                ctx.metrics.inc_skipped(doc.reason);
            }
            let translation = translate::translate(&set.services, &set.slices, &node);
            syncer.record_skipped(&translation.skipped);
            policies.replace_all(&translation);
            desired = translation.desired;
        }
        if reload || retry_at.is_some_and(|at| at <= Instant::now()) {
            let synced = syncer.sync_full(&desired, true);
            policies.publish(ctx.metrics, ctx.health_checks).await;
            retry_at = retry_delay(synced).map(|delay| Instant::now() + delay);
        }
        reload = false;
        tokio::select! {
            _ = watch.changed() => reload = true,
            _ = sleep_until_opt(retry_at) => {}
            _ = lru_tick.tick() => syncer.update_lru_gauges(),
            _ = &mut stop => return Ok(()),
        }
    }
}
