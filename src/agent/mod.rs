//! The agent: loads and attaches the datapath, then keeps the maps equal to
//! the Services its source delivers, and reports through metrics and health.
//!
//! Stopping the agent (any signal, or SIGKILL) leaves programs attached and
//! maps pinned: translation goes on from the last synced state, and the next
//! agent takes over the same maps.
//!
//! One module per task, composed by [`run`]:
//! - `startup`: feature checks, datapath setup, what `kpr status` starts with;
//! - `standalone` and `kubernetes`: the source loops, which translate what
//!   their source delivers and hand it to the `syncer`; the Kubernetes loop
//!   syncs when the `schedule` (a pure state machine) says;
//! - `devices`, `addresses`: the north-south device and host address watchers;
//! - `ct_gc`: conntrack garbage collection and datapath counters;
//! - `socket_stats`: the socket hooks' counters;
//! - `pin_watch`: the pins compared with what the agent holds, restored
//!   when removed under it (checked from the source loops);
//! - `serve`: the metrics, status and health endpoints.

mod addresses;
mod applied_record;
mod config;
mod ct_gc;
mod devices;
mod events;
mod kubernetes;
mod node;
mod pin_watch;
mod schedule;
mod serve;
mod socket_stats;
mod stale_sockets;
mod standalone;
mod startup;
mod switch_over;
mod sync_event;
mod syncer;
mod unprogrammed;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use config::{AgentConfig, KubeSourceConfig, SourceConfig};
pub use node::node_context;
pub use syncer::{Synced, Syncer};

use crate::healthcheck::HealthCheckServer;
use crate::http::Health;
use crate::metrics::{DatapathCounters, Metrics};
use crate::status::StatusHandle;

/// How often the LRU map gauges are refreshed.
const LRU_GAUGE_PERIOD: Duration = Duration::from_secs(10);

/// Runs the agent until SIGINT or SIGTERM, with what
/// [`crate::preflight::check`] found in order (the bound listeners, the hold
/// on the bpf root, kept until the agent ends).
pub async fn run(mut config: AgentConfig, held: crate::preflight::Held) -> Result<()> {
    // Standalone: the manifests are read before the datapath loads, and
    // the maps created large enough for them: the first sync then needs
    // no growth, whose switch-over would load the programs again.
    let first_read = match &config.source {
        SourceConfig::Manifests(options) => Some(standalone::read_ahead(options)?.await?),
        SourceConfig::Kubernetes(_) => None,
    };
    if let Some((source, _)) = &first_read {
        let demand = standalone::first_demand(source.store(), &config)?;
        let growth = startup::growth(&config)?;
        config.map_sizes = switch_over::sized_for(config.map_sizes, growth, &demand);
    }
    let started = startup::start(&config)?;
    let status = started.status;
    let (metrics, datapath_names) = Metrics::new().with_datapath_counters(DatapathCounters::new(
        config.bpf_root.clone(),
        config.metrics_frontend_labels_max,
        config.nodeport.is_some(),
    ));
    let metrics = Arc::new(metrics);
    let health = Health::new();
    if let SourceConfig::Kubernetes(kube) = &config.source {
        // kube-proxy's health timeout: twice the sync period.
        health.set_liveness_timeout(kube.sync_period.saturating_mul(2));
    }
    let shutdown = Shutdown::new();
    let listeners = (held.metrics, held.healthz);
    // The web view's live tail; the syncer and the ring buffer reader
    // publish to it.
    let feed = crate::web_ui::EventFeed::new();
    let ui = crate::web_ui::router(config.bpf_root.clone(), metrics.clone(), feed.clone());
    let mut tasks = serve::spawn(listeners, &metrics, &health, &status, ui, &shutdown)?;
    if let Some(watch) = started.devices {
        tasks.push(devices::spawn(watch, metrics.clone(), shutdown.requested()));
    }
    tasks.push(tokio::spawn(addresses::run(
        started.addresses,
        metrics.clone(),
        shutdown.requested(),
    )));
    tasks.push(tokio::spawn(crate::monitor::tail::run(
        config.bpf_root.clone(),
        feed.clone(),
        shutdown.requested(),
    )));
    tasks.push(tokio::spawn(socket_stats::run(
        config.bpf_root.clone(),
        metrics.clone(),
        shutdown.requested(),
    )));
    if config.nodeport.is_some() {
        tasks.push(tokio::spawn(ct_gc::run(
            config.bpf_root.clone(),
            config.ct_gc_interval,
            metrics.clone(),
            shutdown.requested(),
        )));
    }

    let mut syncer = Syncer::new(
        &config.bpf_root,
        config.maglev,
        metrics.clone(),
        health.clone(),
        status.clone(),
    )?
    .with_event_sink(Arc::new(feed));
    if config.nodeport.is_some() {
        syncer = syncer
            .with_dsr(&config.bpf_root)
            .context("opening the DSR map")?;
    }
    let syncer = syncer
        .with_switch_over(started.switch_over)
        .with_datapath_names(datapath_names, config.metrics_frontend_labels_max)
        .with_stale_udp_sockets(&config.bpf_root, &config.cgroup);
    // Holds the bpf root from here on (and moves the hold to a root made
    // again after a cleanup).
    let mut pins = pin_watch::PinWatch::new(&config, held.owner, started.socket_lb)?;
    let health_checks =
        HealthCheckServer::new(config.health_check_bind).with_proxy_health(health.clone());
    let ctx = SourceContext {
        metrics: &metrics,
        health: &health,
        status: &status,
        health_checks: &health_checks,
        config: &config,
    };
    let result = match &config.source {
        SourceConfig::Manifests(_) => match first_read {
            Some(first) => standalone::run(syncer, &mut pins, first, &ctx).await,
            None => Err(anyhow::anyhow!("the manifests were not read")),
        },
        SourceConfig::Kubernetes(kube) => kubernetes::run(syncer, &mut pins, kube, &ctx).await,
    };
    tracing::info!("stopping; programs stay attached and maps pinned");
    shutdown.stop(tasks).await;
    result
}

/// What both source loops share.
struct SourceContext<'a> {
    metrics: &'a Metrics,
    /// Told of every change queued (for `/livez`) and of the node's
    /// eligibility (KEP-3836, from the Kubernetes source).
    health: &'a Health,
    status: &'a StatusHandle,
    health_checks: &'a HealthCheckServer,
    config: &'a AgentConfig,
}

/// Tells the agent's tasks to stop once the source loop has ended.
struct Shutdown {
    tx: watch::Sender<bool>,
}

impl Shutdown {
    fn new() -> Shutdown {
        Shutdown {
            tx: watch::channel(false).0,
        }
    }

    /// Resolves when the tasks are to stop.
    fn requested(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// Tells the tasks to stop and waits until they have.
    async fn stop(self, tasks: Vec<JoinHandle<()>>) {
        self.tx.send_replace(true);
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// Resolves when the agent is asked to stop (SIGINT or SIGTERM).
async fn stop_requested() {
    let mut sigterm = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
    }
}

/// The pin check's ticks: the first one period after start.
fn pin_ticks() -> tokio::time::Interval {
    let mut ticks = tokio::time::interval_at(
        Instant::now() + pin_watch::PIN_CHECK_PERIOD,
        pin_watch::PIN_CHECK_PERIOD,
    );
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

/// Sleeps until `at`; forever when None.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
