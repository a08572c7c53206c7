//! The agent: loads and attaches the datapath, then keeps the maps equal to
//! the Services its source delivers, and reports through metrics and health.
//!
//! Stopping the agent (any signal, or SIGKILL) leaves programs attached and
//! maps pinned: translation goes on from the last synced state, and the next
//! agent takes over the same maps.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use tokio::sync::watch;

use crate::datapath::kernel::KernelMaps;
use crate::datapath::loader::{self, MapSizes};
use crate::datapath::maps::MapName;
use crate::http::{self, Health};
use crate::metrics::{MapLabel, Metrics, SyncErrorReason};
use crate::reconcile::{DesiredByService, Reconciler, RefusalReason};
use crate::source::manifests;
use crate::translate::{self, Skipped};

/// Everything `kpr agent` needs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub manifests: Vec<PathBuf>,
    pub cgroup: PathBuf,
    pub bpf_root: PathBuf,
    pub metrics_addr: SocketAddr,
    pub healthz_addr: SocketAddr,
    pub map_sizes: MapSizes,
    pub debounce: Duration,
}

/// The reconciler with the reporting around it: every sync is timed,
/// counted and reflected in health.
pub struct Syncer {
    reconciler: Reconciler<KernelMaps>,
    metrics: Arc<Metrics>,
    health: Health,
}

impl Syncer {
    pub fn new(bpf_root: &Path, metrics: Arc<Metrics>, health: Health) -> Result<Syncer> {
        let maps = KernelMaps::open(bpf_root).context("opening the pinned maps")?;
        let reconciler = Reconciler::new(maps).context("reading the pinned maps")?;
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
        })
    }

    /// Syncs the maps to `desired`; `complete` says the source delivered
    /// its whole state, so entries nobody claims may be pruned. Returns
    /// whether the sync fully succeeded.
    pub fn sync_full(&mut self, desired: &DesiredByService, complete: bool) -> bool {
        let started = Instant::now();
        let result = self.reconciler.sync_full(desired, complete);
        let elapsed = started.elapsed();
        self.metrics.observe_sync(elapsed);
        let ok = match result {
            Ok(outcome) => {
                for refusal in &outcome.refused {
                    tracing::error!("{refusal}");
                    let reason = match refusal.reason {
                        RefusalReason::Capacity { .. } | RefusalReason::IdsExhausted => {
                            SyncErrorReason::Capacity
                        }
                        RefusalReason::FrontendConflict { .. } => SyncErrorReason::Source,
                    };
                    self.metrics.inc_sync_error(reason);
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
                outcome.refused.is_empty()
            }
            Err(e) => {
                tracing::error!(error = %e, "sync failed; will retry");
                self.metrics.inc_sync_error(SyncErrorReason::MapUpdate);
                false
            }
        };
        self.metrics.record_sync_result(ok, SystemTime::now());
        self.health.record_sync(ok);
        self.update_gauges();
        ok
    }

    fn update_gauges(&self) {
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
}

/// Wait before retrying a sync that did not fully succeed.
const RETRY_PERIOD: Duration = Duration::from_secs(2);
/// How often the LRU map gauges are refreshed.
const LRU_GAUGE_PERIOD: Duration = Duration::from_secs(10);

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: AgentConfig) -> Result<()> {
    let report = loader::load_and_attach(&config.bpf_root, &config.cgroup, &config.map_sizes)
        .context("setting up the datapath")?;
    tracing::info!(
        cgroup = %config.cgroup.display(),
        bpf_root = %config.bpf_root.display(),
        reused_maps = ?report.reused_maps,
        updated_links = ?report.updated_links,
        created_links = ?report.created_links,
        "datapath attached"
    );

    let metrics = Arc::new(Metrics::new());
    let health = Health::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let metrics_listener = http::bind(config.metrics_addr, "metrics").await?;
    let healthz_listener = http::bind(config.healthz_addr, "healthz").await?;
    let metrics_server = tokio::spawn(http::serve_metrics(
        metrics_listener,
        metrics.clone(),
        stopped(stop_rx.clone()),
    ));
    let healthz_server = tokio::spawn(http::serve_healthz(
        healthz_listener,
        health.clone(),
        stopped(stop_rx.clone()),
    ));

    let mut syncer = Syncer::new(&config.bpf_root, metrics.clone(), health.clone())?;
    let mut watch =
        manifests::watch(&config.manifests, config.debounce).context("watching the manifests")?;
    let mut lru_tick = tokio::time::interval(LRU_GAUGE_PERIOD);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;

    let mut reload = true;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut desired = DesiredByService::new();
    // TODO(integration): build from --node-name (node name, zone label,
    // addresses). Until then no endpoint is local: Local traffic policies
    // leave their frontends without backends, and NodePorts are served on
    // 127.0.0.1 only.
    let node = translate::NodeContext::default();
    loop {
        if reload {
            let paths = config.manifests.clone();
            let set = tokio::task::spawn_blocking(move || manifests::load(&paths)).await?;
            for doc in &set.skipped {
                metrics.inc_skipped(doc.reason);
            }
            let translation = translate::translate(&set.services, &set.slices, &node);
            syncer.record_skipped(&translation.skipped);
            desired = translation.desired;
        }
        if reload || retry_at.is_some_and(|at| at <= tokio::time::Instant::now()) {
            // Manifests on disk are the whole truth on every read: prune.
            let ok = syncer.sync_full(&desired, true);
            retry_at = (!ok).then(|| tokio::time::Instant::now() + RETRY_PERIOD);
        }
        reload = false;
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = watch.changed() => reload = true,
            _ = retry => {}
            _ = lru_tick.tick() => syncer.update_lru_gauges(),
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    tracing::info!("stopping; programs stay attached and maps pinned");
    let _ = stop_tx.send(true);
    let _ = metrics_server.await;
    let _ = healthz_server.await;
    Ok(())
}
