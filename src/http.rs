//! The agent's two HTTP endpoints, kept apart as kube-proxy keeps them: the
//! metrics endpoint (`GET /metrics`, kube-proxy's default 127.0.0.1:10249)
//! for Prometheus, and the health endpoint (`GET /healthz`, `GET /livez`,
//! kube-proxy's default 0.0.0.0:10256) for kubelet probes and load balancer
//! health checks.
//!
//! [`Health`] is the single source of truth for `/healthz`: the syncer
//! records each sync, the endpoint reports whether the last one succeeded.
//! Both endpoints share one server loop ([`serve`]) with graceful shutdown,
//! bounded in connections, time and memory per connection (see
//! [`bounded`]): health answers keep coming while clients misbehave.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

mod bounded;
pub use bounded::{Limits, Routes};

/// The content type of `GET /metrics`: OpenMetrics text, as
/// [`Metrics::encode`] produces.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

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
/// completes; see [`serve`] and [`healthz_router`].
///
/// # Errors
/// [`HttpError::Serve`]; with axum 0.8 this does not happen in practice.
pub async fn serve_healthz(
    listener: TcpListener,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    serve(listener, "healthz", healthz_router(health), shutdown).await
}

/// `GET /metrics`: 200 with [`Metrics::encode`]'s text as [`OPENMETRICS_CONTENT_TYPE`].
pub fn metrics_router(metrics: Arc<Metrics>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                let content_type = HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE);
                ([(header::CONTENT_TYPE, content_type)], metrics.encode())
            }
        }),
    )
}

/// `GET /healthz`: 200 when [`HealthState::healthy`], else 503, with a JSON
/// body like kube-proxy's (see [`HealthState::to_json`]). `GET /livez`: 200
/// while the process serves requests.
pub fn healthz_router(health: Health) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(move || {
                let health = health.clone();
                async move { healthz_response(health.state(), SystemTime::now()) }
            }),
        )
        .route("/livez", get(|| async { "ok\n" }))
}

fn healthz_response(state: HealthState, now: SystemTime) -> Response {
    let status = if state.healthy() {
        StatusCode::OK
    } else {
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

/// Serves `GET /metrics` to everyone and `status` (the `/status` routes:
/// paths, node name, error texts) only to clients connecting from a
/// loopback address, on `listener`, until `shutdown` completes. So with
/// `--metrics-addr 0.0.0.0:10249` Prometheus scrapes from anywhere while
/// `kpr status` works on the node only; a request for `/status` from
/// elsewhere gets 404.
pub async fn serve_metrics_with_status(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    status: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    let public = metrics_router(metrics);
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
}

/// What [`Health`] knows at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HealthState {
    /// When the last successful sync finished; `None` before the first one.
    pub last_updated: Option<SystemTime>,
    /// Whether the last sync succeeded; `None` before the first sync.
    pub last_sync_ok: Option<bool>,
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
        }
    }

    /// The current state.
    pub fn state(&self) -> HealthState {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl HealthState {
    /// Healthy: at least one sync happened and the last one succeeded.
    pub fn healthy(&self) -> bool {
        self.last_sync_ok == Some(true)
    }

    /// The `/healthz` body, shaped like kube-proxy's:
    /// `{"lastUpdated": "2023-11-14T22:13:20.5Z", "currentTime": "...", "healthy": true}`.
    /// Times are RFC 3339 in UTC; `lastUpdated` (the last successful sync) is
    /// `null` before the first one.
    pub fn to_json(&self, now: SystemTime) -> String {
        serde_json::json!({
            "lastUpdated": self.last_updated.map(rfc3339),
            "currentTime": rfc3339(now),
            "healthy": self.healthy(),
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
mod tests {
    use super::*;
    use std::error::Error as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    /// Generous: this VM can pause for 500 ms.
    const TIMEOUT: Duration = Duration::from_secs(5);

    struct Reply {
        status: u16,
        head: String,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.head.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.eq_ignore_ascii_case(name).then(|| value.trim())
            })
        }
    }

    /// A minimal HTTP/1.1 GET over a fresh connection (`Connection: close`).
    async fn get(addr: SocketAddr, path: &str) -> Reply {
        let exchange = async {
            let mut stream = TcpStream::connect(addr).await.expect("connecting");
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.expect("sending");
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.expect("receiving");
            String::from_utf8(raw).expect("a UTF-8 reply")
        };
        let raw = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| panic!("GET {path}: no reply within {TIMEOUT:?}"));
        let (head, body) = raw.split_once("\r\n\r\n").expect("a header/body separator");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head:?}"));
        Reply {
            status,
            head: head.to_string(),
            body: body.to_string(),
        }
    }

    struct Server {
        addr: SocketAddr,
        stop: oneshot::Sender<()>,
        task: JoinHandle<Result<(), HttpError>>,
    }

    impl Server {
        async fn start(endpoint: &'static str, router: Router, grace: Duration) -> Server {
            let listener = bind("127.0.0.1:0".parse().unwrap(), endpoint)
                .await
                .unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = oneshot::channel::<()>();
            let shutdown = async move {
                let _ = stopped.await;
            };
            let task = tokio::spawn(serve_with_grace(
                listener, endpoint, router, shutdown, grace,
            ));
            Server { addr, stop, task }
        }

        async fn stop(self) {
            let _ = self.stop.send(());
            let result = tokio::time::timeout(TIMEOUT, self.task)
                .await
                .expect("the server stops within the timeout")
                .expect("the server task does not panic");
            assert!(result.is_ok());
        }
    }

    #[tokio::test]
    async fn healthz_is_503_until_a_sync_succeeds_and_again_after_a_failure() {
        let health = Health::new();
        let server = Server::start("healthz", healthz_router(health.clone()), SHUTDOWN_GRACE).await;

        assert_eq!(get(server.addr, "/livez").await.status, 200);
        let before = get(server.addr, "/healthz").await;
        assert_eq!(before.status, 503);
        assert_eq!(before.header("content-type"), Some("application/json"));
        let json: serde_json::Value = serde_json::from_str(&before.body).unwrap();
        assert_eq!(json["healthy"], false);
        assert_eq!(json["lastUpdated"], serde_json::Value::Null);
        assert!(json["currentTime"].as_str().unwrap().ends_with('Z'));

        health.record_sync(true);
        let after_success = get(server.addr, "/healthz").await;
        assert_eq!(after_success.status, 200);
        let json: serde_json::Value = serde_json::from_str(&after_success.body).unwrap();
        assert_eq!(json["healthy"], true);
        let last_updated = json["lastUpdated"].as_str().unwrap().to_string();

        health.record_sync(false);
        let after_failure = get(server.addr, "/healthz").await;
        assert_eq!(after_failure.status, 503);
        let json: serde_json::Value = serde_json::from_str(&after_failure.body).unwrap();
        assert_eq!(json["healthy"], false);
        assert_eq!(json["lastUpdated"], last_updated.as_str());
        assert_eq!(get(server.addr, "/livez").await.status, 200);

        health.record_sync(true);
        assert_eq!(get(server.addr, "/healthz").await.status, 200);
        server.stop().await;
    }

    #[tokio::test]
    async fn metrics_are_served_as_openmetrics_text() {
        let metrics = Arc::new(Metrics::new());
        metrics.observe_sync(Duration::from_millis(2));
        let server = Server::start("metrics", metrics_router(metrics), SHUTDOWN_GRACE).await;

        let reply = get(server.addr, "/metrics").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some(OPENMETRICS_CONTENT_TYPE));
        assert!(reply
            .body
            .contains("\nkubeproxy_sync_proxy_rules_duration_seconds_count 1\n"));
        assert!(reply.body.ends_with("# EOF\n"));
        assert_eq!(get(server.addr, "/healthz").await.status, 404);
        server.stop().await;
    }

    #[tokio::test]
    async fn the_public_serve_functions_stop_on_shutdown() {
        let (stop, stopped) = oneshot::channel::<()>();
        let (stop2, stopped2) = oneshot::channel::<()>();
        let any = "127.0.0.1:0".parse().unwrap();
        let metrics_listener = bind(any, "metrics").await.unwrap();
        let healthz_listener = bind(any, "healthz").await.unwrap();
        let metrics_addr = metrics_listener.local_addr().unwrap();
        let healthz_addr = healthz_listener.local_addr().unwrap();
        let metrics = tokio::spawn(serve(
            metrics_listener,
            "metrics",
            metrics_router(Arc::new(Metrics::new())),
            async move {
                let _ = stopped.await;
            },
        ));
        let healthz = tokio::spawn(serve_healthz(healthz_listener, Health::new(), async move {
            let _ = stopped2.await;
        }));

        assert_eq!(get(metrics_addr, "/metrics").await.status, 200);
        assert_eq!(get(healthz_addr, "/healthz").await.status, 503);

        let _ = stop.send(());
        let _ = stop2.send(());
        for task in [metrics, healthz] {
            let result = tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap();
            assert!(result.is_ok());
        }
    }

    #[tokio::test]
    async fn a_stuck_client_delays_shutdown_only_for_the_grace_period() {
        let grace = Duration::from_millis(200);
        let server = Server::start("healthz", healthz_router(Health::new()), grace).await;
        // Half a request: the connection is busy, not idle.
        let mut stuck = TcpStream::connect(server.addr).await.unwrap();
        stuck.write_all(b"GET /livez HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;

        server.stop().await;
        drop(stuck);
    }

    /// Serves `router` under `limits` on a loopback port until the
    /// returned sender is dropped.
    async fn start_bounded(
        router: Router,
        limits: Limits,
    ) -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
        let listener = bind("127.0.0.1:0".parse().unwrap(), "test").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopping) = tokio::sync::watch::channel(false);
        tokio::spawn(bounded::accept_loop(
            listener,
            "test",
            Routes::all(router),
            limits,
            stopping,
        ));
        (addr, stop)
    }

    /// Whether the server closed `stream` within `within` (EOF or reset).
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 256];
        let read = async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        };
        tokio::time::timeout(within, read).await.is_ok()
    }

    #[tokio::test]
    async fn at_the_connection_limit_the_least_active_connection_is_shed_and_health_answers() {
        let limits = Limits {
            max_connections: 4,
            idle_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(60),
            ..Limits::default()
        };
        let (addr, _stop) = start_bounded(healthz_router(Health::new()), limits).await;
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(TcpStream::connect(addr).await.unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        assert_eq!(get(addr, "/livez").await.status, 200);

        assert!(
            closed_within(&mut idle[0], TIMEOUT).await,
            "the oldest is shed"
        );
        assert!(!closed_within(&mut idle[3], Duration::from_millis(200)).await);
    }

    #[tokio::test]
    async fn idle_and_half_sent_connections_are_closed_after_the_idle_timeout() {
        let limits = Limits {
            idle_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, _stop) = start_bounded(healthz_router(Health::new()), limits).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /livez HTTP/1.1\r\n").await.unwrap();

        assert!(closed_within(&mut idle, Duration::from_secs(3)).await);
        assert!(closed_within(&mut half, Duration::from_secs(3)).await);
        assert_eq!(get(addr, "/livez").await.status, 200);
    }

    #[tokio::test]
    async fn status_is_served_to_loopback_clients_only() {
        let status = Router::new().route("/status", axum::routing::get(|| async { "{}" }));
        let routes = Routes {
            loopback: metrics_router(Arc::new(Metrics::new())).merge(status),
            public: metrics_router(Arc::new(Metrics::new())),
        };
        let listener = bind("127.0.0.1:0".parse().unwrap(), "metrics")
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, stopping) = tokio::sync::watch::channel(false);
        tokio::spawn(bounded::accept_loop(
            listener,
            "metrics",
            routes.clone(),
            Limits::default(),
            stopping,
        ));
        assert_eq!(get(addr, "/status").await.status, 200, "from 127.0.0.1");
        assert!(routes.is_loopback_peer("[::ffff:127.0.0.1]:1".parse().unwrap()));
        assert!(routes.is_loopback_peer("[::1]:1".parse().unwrap()));
        assert!(!routes.is_loopback_peer("192.0.2.1:1".parse().unwrap()));
        assert!(!routes.is_loopback_peer("[fd00::1]:1".parse().unwrap()));
    }

    #[tokio::test]
    async fn binding_a_taken_port_names_the_endpoint_and_the_address() {
        let taken = bind("127.0.0.1:0".parse().unwrap(), "metrics")
            .await
            .unwrap();
        let addr = taken.local_addr().unwrap();

        let err = bind(addr, "metrics").await.unwrap_err();

        assert_eq!(err.to_string(), format!("binding metrics endpoint {addr}"));
        let source = err.source().and_then(|s| s.downcast_ref::<io::Error>());
        assert_eq!(source.map(io::Error::kind), Some(io::ErrorKind::AddrInUse));
    }

    #[test]
    fn times_are_rfc3339_utc_with_a_trimmed_fraction() {
        let at = |secs: u64, nanos: u32| UNIX_EPOCH + Duration::new(secs, nanos);
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(951_782_400, 0)), "2000-02-29T00:00:00Z");
        assert_eq!(
            rfc3339(at(1_700_000_000, 500_000_000)),
            "2023-11-14T22:13:20.5Z"
        );
        assert_eq!(
            rfc3339(at(4_102_444_799, 123_456_789)),
            "2099-12-31T23:59:59.123456789Z"
        );
        assert_eq!(
            rfc3339(at(4_102_444_800, 1_000)),
            "2100-01-01T00:00:00.000001Z"
        );
    }

    #[test]
    fn health_is_unhealthy_before_any_sync_and_follows_the_last_one() {
        let health = Health::new();
        assert!(!health.state().healthy());
        let t1 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        health.record_sync_at(false, t1);
        assert_eq!(
            health.state(),
            HealthState {
                last_updated: None,
                last_sync_ok: Some(false)
            }
        );
        health.record_sync_at(true, t1);
        assert!(health.state().healthy());
        assert_eq!(
            health.state().to_json(t1),
            r#"{"currentTime":"2023-11-14T22:13:20Z","healthy":true,"lastUpdated":"2023-11-14T22:13:20Z"}"#
        );
    }
}
