//! The agent's two HTTP endpoints, kept apart as kube-proxy keeps them: the
//! metrics endpoint (`GET /metrics`, kube-proxy's default 127.0.0.1:10249)
//! for Prometheus, and the health endpoint (`GET /healthz`, `GET /livez`,
//! kube-proxy's default 0.0.0.0:10256) for kubelet probes and load balancer
//! health checks.
//!
//! [`Health`] is the single source of truth for `/healthz`: the syncer
//! records each sync, the Kubernetes source whether the node is eligible
//! (KEP-3836), the endpoint reports both.
//! Both endpoints share one server loop ([`serve`]) with graceful shutdown,
//! bounded in connections, time and memory per connection (see
//! [`bounded`]): health answers keep coming while clients misbehave.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::metrics::{Format, Metrics, ProbeCode, ProbeCounters};

mod bounded;
mod liveness;
pub use bounded::{connection_budget, Limits, Routes, DESCRIPTOR_RESERVE};
pub use liveness::{Liveness, DEFAULT_LIVENESS_TIMEOUT};

pub use crate::metrics::{OPENMETRICS_CONTENT_TYPE, PROMETHEUS_TEXT_CONTENT_TYPE};

/// After shutdown is requested, how long open connections may take to finish
/// before the server stops waiting for them (a stuck client must not hold up
/// the agent's exit).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why an endpoint could not be served. `endpoint` is the endpoint's name
/// ("metrics", "healthz"); the I/O error is the `source`, so `{:#}` prints
/// e.g. `binding metrics endpoint 0.0.0.0:10249: Address in use (os error 98)`.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The listening socket could not be bound (address in use, no permission, no such address).
    #[error("binding {endpoint} endpoint {addr}")]
    Bind {
        /// The endpoint's name.
        endpoint: &'static str,
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The bind error.
        #[source]
        source: io::Error,
    },
    /// The server stopped with an error.
    #[error("serving {endpoint} endpoint")]
    Serve {
        /// The endpoint's name.
        endpoint: &'static str,
        /// The server's error.
        #[source]
        source: io::Error,
    },
}

/// Binds the listening socket of endpoint `endpoint` (a name for errors and
/// logs, e.g. "metrics") on `addr`. Binding first, then [`serve`]-ing, lets
/// the agent fail before starting anything else, and lets tests bind port 0
/// and read the chosen port from the listener.
///
/// # Errors
/// [`HttpError::Bind`], naming the endpoint and the address.
pub async fn bind(addr: SocketAddr, endpoint: &'static str) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind {
            endpoint,
            addr,
            source,
        })
}

/// Serves `GET /healthz` and `GET /livez` on `listener` until `shutdown`
/// completes, counting the answers in `probes`; see [`serve`] and
/// [`healthz_router`].
///
/// # Errors
/// [`HttpError::Serve`]; with axum 0.8 this does not happen in practice.
pub async fn serve_healthz(
    listener: TcpListener,
    health: Health,
    probes: ProbeCounters,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    serve(
        listener,
        "healthz",
        healthz_router(health, probes),
        shutdown,
    )
    .await
}

/// `GET /metrics`: 200 with [`Metrics::render`]'s text in the format the
/// `Accept` header asks for ([`Format::negotiate`]): OpenMetrics for
/// Prometheus, the Prometheus text format 0.0.4 for `text/plain` and
/// clients that name neither.
pub fn metrics_router(metrics: Arc<Metrics>) -> Router {
    Router::new().route(
        "/metrics",
        get(move |headers: HeaderMap| {
            let metrics = metrics.clone();
            async move {
                let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
                let format = Format::negotiate(accept);
                let content_type = HeaderValue::from_static(format.content_type());
                (
                    [(header::CONTENT_TYPE, content_type)],
                    metrics.render(format),
                )
            }
        }),
    )
}

/// `GET /healthz`: 200 when [`HealthState::serving`] (the last sync
/// succeeded and the node is eligible), else 503, with a JSON body like
/// kube-proxy's (see [`HealthState::to_json`]). `GET /livez`: 200 unless a
/// queued change has stayed unapplied past the health timeout (see
/// [`Liveness`]), then 503 saying for how long. Every answer is counted in
/// `probes` by status.
pub fn healthz_router(health: Health, probes: ProbeCounters) -> Router {
    let live = health.clone();
    let livez_probes = probes.clone();
    Router::new()
        .route(
            "/healthz",
            get(move || {
                let (health, probes) = (health.clone(), probes.clone());
                async move { healthz_response(health.state(), SystemTime::now(), &probes) }
            }),
        )
        .route(
            "/livez",
            get(move || {
                let (live, probes) = (live.clone(), livez_probes.clone());
                async move { livez_response(live.liveness(), tokio::time::Instant::now(), &probes) }
            }),
        )
}

fn livez_response(
    liveness: Liveness,
    now: tokio::time::Instant,
    probes: &ProbeCounters,
) -> Response {
    let overdue = liveness.overdue(now);
    probes.count_livez(match overdue {
        None => ProbeCode::Ok,
        Some(_) => ProbeCode::Unavailable,
    });
    match overdue {
        None => "ok\n".into_response(),
        Some(waited) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "a queued change has not been applied for {}s (timeout {}s)\n",
                waited.as_secs(),
                liveness.timeout.as_secs()
            ),
        )
            .into_response(),
    }
}

fn healthz_response(state: HealthState, now: SystemTime, probes: &ProbeCounters) -> Response {
    let status = if state.serving() {
        probes.count_healthz(ProbeCode::Ok);
        StatusCode::OK
    } else {
        probes.count_healthz(ProbeCode::Unavailable);
        StatusCode::SERVICE_UNAVAILABLE
    };
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
    ];
    (status, headers, state.to_json(now)).into_response()
}

/// Serves `router` on `listener` until `shutdown` completes, then stops
/// accepting, lets open connections finish for up to [`SHUTDOWN_GRACE`] and
/// returns. `endpoint` names the endpoint in logs and errors.
///
/// # Errors
/// [`HttpError::Serve`]; with axum 0.8 this does not happen in practice.
pub async fn serve(
    listener: TcpListener,
    endpoint: &'static str,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    serve_with_grace(listener, endpoint, router, shutdown, SHUTDOWN_GRACE).await
}

async fn serve_with_grace(
    listener: TcpListener,
    endpoint: &'static str,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<(), HttpError> {
    serve_routes(listener, endpoint, Routes::all(router), shutdown, grace).await;
    Ok(())
}

/// Serves `routes` on `listener` within [`Limits::default`] until
/// `shutdown` completes, then lets open connections finish for up to
/// `grace`.
async fn serve_routes(
    listener: TcpListener,
    endpoint: &'static str,
    routes: Routes,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(endpoint, %addr, "serving");
    }
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let server = bounded::accept_loop(listener, endpoint, routes, Limits::default(), stopping);
    let grace_over = async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        () = server => {}
        () = grace_over => {
            tracing::warn!(endpoint, ?grace, "connections still open after the shutdown grace period; not waiting for them");
        }
    }
}

/// Serves `GET /metrics` and the `ui` routes (the web view) to everyone and `status` (the `/status` routes:
/// paths, node name, error texts) only to clients connecting from a
/// loopback address, on `listener`, until `shutdown` completes. So with
/// `--metrics-addr 0.0.0.0:10249` Prometheus scrapes from anywhere while
/// `kpr status` works on the node only; a request for `/status` from
/// elsewhere gets 404.
pub async fn serve_metrics_with_status(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ui: Router,
    status: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    let public = metrics_router(metrics).merge(ui);
    let routes = Routes {
        loopback: public.clone().merge(status),
        public,
    };
    serve_routes(listener, "metrics", routes, shutdown, SHUTDOWN_GRACE).await;
    Ok(())
}

/// Binds endpoint `endpoint`'s listening socket outside any runtime (the
/// agent binds before it touches the datapath); hand it to a server with
/// [`from_std`].
///
/// # Errors
/// [`HttpError::Bind`], naming the endpoint and the address.
pub fn bind_std(
    addr: SocketAddr,
    endpoint: &'static str,
) -> Result<std::net::TcpListener, HttpError> {
    let bind_err = |source| HttpError::Bind {
        endpoint,
        addr,
        source,
    };
    let listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

/// A listener from [`bind_std`] for the running tokio runtime.
///
/// # Errors
/// [`HttpError::Bind`] when the runtime cannot register it.
pub fn from_std(
    listener: std::net::TcpListener,
    endpoint: &'static str,
) -> Result<TcpListener, HttpError> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    TcpListener::from_std(listener).map_err(|source| HttpError::Bind {
        endpoint,
        addr,
        source,
    })
}

/// Whether the agent keeps the node's maps in sync; cheap to clone (one
/// `Arc`), shared by the syncer (which records) and `/healthz` (which reads).
#[derive(Clone, Debug, Default)]
pub struct Health {
    state: Arc<Mutex<HealthState>>,
    /// What `/livez` judges: changes queued and not yet applied.
    liveness: Arc<Mutex<Liveness>>,
}

/// What [`Health`] knows at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthState {
    /// When the last successful sync finished; `None` before the first one.
    pub last_updated: Option<SystemTime>,
    /// Whether the last sync succeeded; `None` before the first sync.
    pub last_sync_ok: Option<bool>,
    /// KEP-3836: false while the agent's Node is being deleted or tainted
    /// `ToBeDeletedByClusterAutoscaler`, so load balancers drain the node
    /// before it goes. True until the Node says otherwise (and always in
    /// standalone mode), as kube-proxy's.
    pub node_eligible: bool,
}

impl Default for HealthState {
    fn default() -> Self {
        HealthState {
            last_updated: None,
            last_sync_ok: None,
            node_eligible: true,
        }
    }
}

impl Health {
    /// Unhealthy until the first successful sync is recorded.
    pub fn new() -> Health {
        Health::default()
    }

    /// Records the outcome of a sync of the complete desired state (record
    /// partial syncs, such as those before an initial list is complete, only
    /// if they should count).
    pub fn record_sync(&self, ok: bool) {
        self.record_sync_at(ok, SystemTime::now());
    }

    /// [`Health::record_sync`] with an explicit completion time.
    pub fn record_sync_at(&self, ok: bool, at: SystemTime) {
        // The state is plain data, valid even if a holder panicked.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.last_sync_ok = Some(ok);
        if ok {
            state.last_updated = Some(at);
            self.liveness
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .applied();
        }
    }

    /// A change was queued for the next sync (what `/livez` times).
    pub fn change_queued(&self) {
        self.liveness
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .queued(tokio::time::Instant::now());
    }

    /// How long a queued change may stay unapplied before `/livez` fails
    /// (default [`DEFAULT_LIVENESS_TIMEOUT`]).
    pub fn set_liveness_timeout(&self, timeout: Duration) {
        self.liveness
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .timeout = timeout;
    }

    /// What `/livez` judges now.
    pub fn liveness(&self) -> Liveness {
        *self.liveness.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records whether the node is eligible for traffic (KEP-3836; see
    /// [`HealthState::node_eligible`]).
    pub fn set_node_eligible(&self, eligible: bool) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.node_eligible = eligible;
    }

    /// The current state.
    pub fn state(&self) -> HealthState {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl HealthState {
    /// Healthy: at least one sync happened and the last one succeeded
    /// (what the healthCheckNodePorts follow: the node's eligibility is not
    /// theirs, as in kube-proxy).
    pub fn healthy(&self) -> bool {
        self.last_sync_ok == Some(true)
    }

    /// What `/healthz` answers 200 for: [`HealthState::healthy`] and the
    /// node eligible.
    pub fn serving(&self) -> bool {
        self.healthy() && self.node_eligible
    }

    /// The `/healthz` body, shaped like kube-proxy's:
    /// `{"lastUpdated": "2023-11-14T22:13:20.5Z", "currentTime": "...", "healthy": true, "nodeEligible": true}`.
    /// Times are RFC 3339 in UTC; `lastUpdated` (the last successful sync) is
    /// `null` before the first one; `healthy` is the sync's health alone.
    pub fn to_json(&self, now: SystemTime) -> String {
        serde_json::json!({
            "lastUpdated": self.last_updated.map(rfc3339),
            "currentTime": rfc3339(now),
            "healthy": self.healthy(),
            "nodeEligible": self.node_eligible,
        })
        .to_string()
    }
}

/// `t` as RFC 3339 in UTC with the fraction trimmed of trailing zeros, as Go's
/// RFC3339Nano (e.g. `2023-11-14T22:13:20.5Z`). Times before 1970 print as 1970.
fn rfc3339(t: SystemTime) -> String {
    let since_epoch = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    let mut out = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    let nanos = since_epoch.subsec_nanos();
    if nanos > 0 {
        let fraction = format!("{nanos:09}");
        out.push('.');
        out.push_str(fraction.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// (year, month, day) of the `days`th day after 1970-01-01, proleptic
/// Gregorian (Howard Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// A bounded HTTP/1.0 GET (2 s to connect, 5 s to read): (status, body).
/// For `kpr status` and the test bed; not for anything on a hot path.
pub fn blocking_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response")
        })?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests;
