//! The agent's HTTP endpoints as tasks: /metrics with /status on the
//! metrics address (error texts and paths stay on the loopback-only
//! address), /healthz and /livez on the health address load balancers and
//! kubelet probes reach; the web view (`/ui`) on the metrics address. Both listeners were bound by the preflight
//! checks, before anything was attached, so a taken port stops the agent
//! before it touches the datapath.

use std::sync::Arc;

use anyhow::Result;
use tokio::task::JoinHandle;

use super::Shutdown;
use crate::http::{self, Health};
use crate::metrics::Metrics;
use crate::status::{status_router, StatusHandle};

/// Serves both endpoints on their bound (metrics, healthz) listeners until
/// `shutdown`; /status only to loopback clients.
pub(super) fn spawn(
    (metrics_listener, healthz_listener): (std::net::TcpListener, std::net::TcpListener),
    metrics: &Arc<Metrics>,
    health: &Health,
    status: &StatusHandle,
    ui: axum::Router,
    shutdown: &Shutdown,
) -> Result<Vec<JoinHandle<()>>> {
    let metrics_listener = http::from_std(metrics_listener, "metrics")?;
    let healthz_listener = http::from_std(healthz_listener, "healthz")?;
    let metrics_server = http::serve_metrics_with_status(
        metrics_listener,
        metrics.clone(),
        ui,
        status_router(status.clone()),
        shutdown.requested(),
    );
    let healthz_server = http::serve_healthz(
        healthz_listener,
        health.clone(),
        metrics.kube_proxy().probes(),
        shutdown.requested(),
    );
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
