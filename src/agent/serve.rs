//! The agent's HTTP endpoints as tasks: /metrics with /status on the
//! metrics address (error texts and paths stay on the loopback-only
//! address), /healthz and /livez on the health address load balancers and
//! kubelet probes reach. Both listeners are bound before anything is
//! served, so a taken port stops the agent at once.

use std::sync::Arc;

use anyhow::Result;
use tokio::task::JoinHandle;

use super::{AgentConfig, Shutdown};
use crate::http::{self, Health};
use crate::metrics::Metrics;
use crate::status::{status_router, StatusHandle};

/// Binds both endpoints and serves them until `shutdown`.
pub(super) async fn spawn(
    config: &AgentConfig,
    metrics: &Arc<Metrics>,
    health: &Health,
    status: &StatusHandle,
    shutdown: &Shutdown,
) -> Result<Vec<JoinHandle<()>>> {
    let metrics_listener = http::bind(config.metrics_addr, "metrics").await?;
    let healthz_listener = http::bind(config.healthz_addr, "healthz").await?;
    let metrics_router = http::metrics_router(metrics.clone()).merge(status_router(status.clone()));
    let metrics_server = http::serve(
        metrics_listener,
        "metrics",
        metrics_router,
        shutdown.requested(),
    );
    let healthz_server =
        http::serve_healthz(healthz_listener, health.clone(), shutdown.requested());
    Ok(vec![
        tokio::spawn(async move {
            if let Err(e) = metrics_server.await {
                tracing::error!(error = %e, "the metrics endpoint stopped");
            }
        }),
        tokio::spawn(async move {
            if let Err(e) = healthz_server.await {
                tracing::error!(error = %e, "the health endpoint stopped");
            }
        }),
    ])
}
