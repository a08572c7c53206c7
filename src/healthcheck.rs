//! Health check node ports: kube-proxy's service health server. A
//! LoadBalancer Service with `externalTrafficPolicy: Local` names a
//! `healthCheckNodePort`; the cloud load balancer probes it on every node
//! and sends traffic only to nodes that answer 200, i.e. nodes with a local
//! ready endpoint. Without this, external traffic would be sent to nodes
//! that drop it.
//!
//! [`HealthCheckServer`] keeps one HTTP listener per port in the set the
//! translation returns ([`crate::translate::HealthCheck`]): [`update`]
//! opens new ports, closes dropped ones and changes the answers of the rest
//! without rebinding. Every path and method gets the same answer, as from
//! kube-proxy (`pkg/proxy/healthcheck/service_health.go`):
//!
//! ```text
//! 200 (or 503 when localEndpoints is 0 or the proxy is unhealthy)
//! Content-Type: application/json
//! X-Content-Type-Options: nosniff
//!
//! {"service":{"namespace":"ns","name":"svc"},"localEndpoints":1,"serviceProxyHealthy":true}
//! ```
//!
//! A port that cannot be bound (in use, no permission) is logged and
//! counted, never fatal: the other ports keep being served and the next
//! [`update`] tries again, as kube-proxy does.
//!
//! [`update`]: HealthCheckServer::update

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::http::Health;
use crate::translate::HealthCheck;

/// kube-proxy's default: every address of the node.
pub const DEFAULT_BIND_ADDR: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// What one port answers for.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CheckState {
    namespace: String,
    name: String,
    local_endpoints: usize,
}

impl CheckState {
    fn of(check: &HealthCheck) -> CheckState {
        let (namespace, name) = check
            .service
            .split_once('/')
            .unwrap_or(("", check.service.as_str()));
        CheckState {
            namespace: namespace.into(),
            name: name.into(),
            local_endpoints: check.local_endpoints,
        }
    }
}

struct Listener {
    state: Arc<RwLock<CheckState>>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

/// What an [`HealthCheckServer::update`] changed; each list in port order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpdateReport {
    /// Ports now listening that were not before.
    pub opened: Vec<u16>,
    /// Ports no longer listening.
    pub closed: Vec<u16>,
    /// Ports that should listen but could not be bound, or that a second
    /// Service claimed (the first one in the list keeps the port).
    pub failed: Vec<u16>,
}

/// The set of health check listeners. Share it as `Arc<HealthCheckServer>`;
/// dropping it closes every listener.
pub struct HealthCheckServer {
    bind: IpAddr,
    proxy_health: Option<Health>,
    listeners: Mutex<BTreeMap<u16, Listener>>,
    bind_failures: AtomicU64,
}

impl HealthCheckServer {
    /// A server with no listener yet, binding ports on `bind` (see
    /// [`DEFAULT_BIND_ADDR`]; `0.0.0.0` is IPv4 only, `::` takes both
    /// families where IPv6 is enabled). `serviceProxyHealthy` is always true.
    pub fn new(bind: IpAddr) -> HealthCheckServer {
        HealthCheckServer {
            bind,
            proxy_health: None,
            listeners: Mutex::new(BTreeMap::new()),
            bind_failures: AtomicU64::new(0),
        }
    }

    /// Reports `serviceProxyHealthy` from `health` (the agent's `/healthz`
    /// state) and answers 503 while it is unhealthy, as kube-proxy does: a
    /// node whose maps are stale should not get new load balancer traffic.
    pub fn with_proxy_health(mut self, health: Health) -> HealthCheckServer {
        self.proxy_health = Some(health);
        self
    }

    /// Makes the listeners match `checks`: opens, closes and updates counts.
    /// Bind errors are logged, counted ([`Self::bind_failures`]) and
    /// reported, never returned: the next update retries them.
    pub async fn update(&self, checks: &[HealthCheck]) -> UpdateReport {
        let mut report = UpdateReport::default();
        let mut wanted: BTreeMap<u16, CheckState> = BTreeMap::new();
        for check in checks {
            if let Some(first) = wanted.get(&check.port) {
                tracing::error!(
                    port = check.port,
                    service = %check.service,
                    owner = %format!("{}/{}", first.namespace, first.name),
                    "health check node port already used by another service"
                );
                self.bind_failures.fetch_add(1, Ordering::Relaxed);
                report.failed.push(check.port);
                continue;
            }
            wanted.insert(check.port, CheckState::of(check));
        }

        let mut listeners = self.listeners.lock().await;
        let gone: Vec<u16> = listeners
            .keys()
            .filter(|port| !wanted.contains_key(port))
            .copied()
            .collect();
        for port in gone {
            if let Some(l) = listeners.remove(&port) {
                l.task.abort();
                // Wait until the task (and so the socket) is gone, so the
                // port can be bound again at once.
                let _ = l.task.await;
                tracing::info!(port, "closed health check node port");
                report.closed.push(port);
            }
        }
        for (port, state) in wanted {
            if let Some(l) = listeners.get(&port) {
                *l.state.write().unwrap_or_else(PoisonError::into_inner) = state;
                continue;
            }
            let addr = SocketAddr::new(self.bind, port);
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(error) => {
                    tracing::error!(%addr, service = %format!("{}/{}", state.namespace, state.name), %error,
                        "binding health check node port failed; retrying on the next sync");
                    self.bind_failures.fetch_add(1, Ordering::Relaxed);
                    report.failed.push(port);
                    continue;
                }
            };
            let addr = listener.local_addr().unwrap_or(addr);
            let state = Arc::new(RwLock::new(state));
            let router = router(state.clone(), self.proxy_health.clone());
            // Bounded as the agent's own endpoints (connections, timeouts,
            // the process's descriptor budget); stopped by aborting the task.
            let task = tokio::spawn(async move {
                let serving = crate::http::serve(
                    listener,
                    "health check node port",
                    router,
                    std::future::pending(),
                );
                if let Err(error) = serving.await {
                    tracing::error!(%addr, %error, "health check node port stopped");
                }
            });
            tracing::info!(%addr, "serving health check node port");
            listeners.insert(port, Listener { state, addr, task });
            report.opened.push(port);
        }
        report
    }

    /// The listening ports and their bound addresses.
    pub async fn local_addrs(&self) -> BTreeMap<u16, SocketAddr> {
        let listeners = self.listeners.lock().await;
        listeners.iter().map(|(port, l)| (*port, l.addr)).collect()
    }

    /// Ports that could not be served, since the start (for a counter).
    pub fn bind_failures(&self) -> u64 {
        self.bind_failures.load(Ordering::Relaxed)
    }
}

impl Drop for HealthCheckServer {
    fn drop(&mut self) {
        for l in self.listeners.get_mut().values() {
            l.task.abort();
        }
    }
}

/// The JSON body, fields in kube-proxy's order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: ServiceName<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct ServiceName<'a> {
    namespace: &'a str,
    name: &'a str,
}

fn router(state: Arc<RwLock<CheckState>>, proxy_health: Option<Health>) -> Router {
    Router::new().fallback(move || {
        let state = state.read().unwrap_or_else(PoisonError::into_inner).clone();
        let healthy = proxy_health.as_ref().is_none_or(|h| h.state().healthy());
        async move { response(&state, healthy) }
    })
}

fn response(state: &CheckState, proxy_healthy: bool) -> Response {
    let status = if state.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Body {
        service: ServiceName {
            namespace: &state.namespace,
            name: &state.name,
        },
        local_endpoints: state.local_endpoints,
        service_proxy_healthy: proxy_healthy,
    };
    let json = serde_json::to_string(&body).unwrap_or_default();
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
    (status, headers, json).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Generous: this VM can pause for 500 ms.
    const TIMEOUT: Duration = Duration::from_secs(5);
    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// `N` distinct ports that were free a moment ago.
    fn free_ports<const N: usize>() -> [u16; N] {
        let held: Vec<std::net::TcpListener> = (0..N)
            .map(|_| std::net::TcpListener::bind((LOCALHOST, 0)).unwrap())
            .collect();
        std::array::from_fn(|i| held[i].local_addr().unwrap().port())
    }

    fn free_port() -> u16 {
        free_ports::<1>()[0]
    }

    fn check(port: u16, service: &str, local_endpoints: usize) -> HealthCheck {
        HealthCheck {
            port,
            service: service.into(),
            local_endpoints,
        }
    }

    /// GET `path` on 127.0.0.1:`port`: (status, lowercase head, body).
    async fn get(port: u16, path: &str) -> (u16, String, serde_json::Value) {
        let exchange = async {
            let mut s = TcpStream::connect((LOCALHOST, port)).await.unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut raw = String::new();
            s.read_to_string(&mut raw).await.unwrap();
            raw
        };
        let raw = tokio::time::timeout(TIMEOUT, exchange).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (
            status,
            head.to_ascii_lowercase(),
            serde_json::from_str(body).unwrap(),
        )
    }

    async fn refused(port: u16) -> bool {
        TcpStream::connect((LOCALHOST, port)).await.is_err()
    }

    #[tokio::test]
    async fn answers_200_with_local_endpoints_and_503_without() {
        let server = HealthCheckServer::new(LOCALHOST);
        let [a, b] = free_ports();
        let report = server
            .update(&[check(a, "demo/web", 2), check(b, "demo/idle", 0)])
            .await;
        let mut opened = vec![a, b];
        opened.sort();
        assert_eq!(report.opened, opened);

        let (status, head, body) = get(a, "/healthz").await;
        assert_eq!(status, 200);
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{head}");
        assert_eq!(
            body,
            serde_json::json!({
                "service": {"namespace": "demo", "name": "web"},
                "localEndpoints": 2,
                "serviceProxyHealthy": true,
            })
        );
        let (status, _, body) = get(b, "/").await;
        assert_eq!(status, 503);
        assert_eq!(body["localEndpoints"], 0);
        assert_eq!(body["service"]["name"], "idle");
    }

    #[tokio::test]
    async fn a_count_change_is_answered_without_rebinding() {
        let server = HealthCheckServer::new(LOCALHOST);
        let port = free_port();
        server.update(&[check(port, "demo/web", 1)]).await;
        let before = server.local_addrs().await;
        let report = server.update(&[check(port, "demo/web", 0)]).await;
        assert_eq!(report, UpdateReport::default());
        assert_eq!(server.local_addrs().await, before);
        assert_eq!(get(port, "/healthz").await.0, 503);
        server.update(&[check(port, "demo/web", 3)]).await;
        let (status, _, body) = get(port, "/any/path").await;
        assert_eq!((status, body["localEndpoints"].clone()), (200, 3.into()));
    }

    #[tokio::test]
    async fn removed_ports_are_closed_and_can_be_opened_again() {
        let server = HealthCheckServer::new(LOCALHOST);
        let [a, b] = free_ports();
        server
            .update(&[check(a, "demo/a", 1), check(b, "demo/b", 1)])
            .await;
        let report = server.update(&[check(b, "demo/b", 1)]).await;
        assert_eq!(report.closed, vec![a]);
        assert!(refused(a).await);
        assert_eq!(get(b, "/healthz").await.0, 200);

        let report = server.update(&[check(a, "demo/a", 1)]).await;
        assert_eq!((report.opened, report.closed), (vec![a], vec![b]));
        assert_eq!(get(a, "/healthz").await.0, 200);
        assert!(refused(b).await);
    }

    #[tokio::test]
    async fn a_port_in_use_is_counted_and_retried_while_the_others_serve() {
        let server = HealthCheckServer::new(LOCALHOST);
        let taken = std::net::TcpListener::bind((LOCALHOST, 0)).unwrap();
        let busy = taken.local_addr().unwrap().port();
        let ok = free_port();
        let checks = [check(busy, "demo/busy", 1), check(ok, "demo/ok", 1)];

        let report = server.update(&checks).await;
        assert_eq!((report.opened, report.failed), (vec![ok], vec![busy]));
        assert_eq!(server.bind_failures(), 1);
        assert_eq!(get(ok, "/healthz").await.0, 200);

        drop(taken);
        let report = server.update(&checks).await;
        assert_eq!((report.opened, report.failed), (vec![busy], vec![]));
        assert_eq!(server.bind_failures(), 1);
        assert_eq!(get(busy, "/healthz").await.2["service"]["name"], "busy");
    }

    #[tokio::test]
    async fn a_port_claimed_twice_goes_to_the_first_service() {
        let server = HealthCheckServer::new(LOCALHOST);
        let port = free_port();
        let report = server
            .update(&[check(port, "demo/first", 1), check(port, "demo/second", 1)])
            .await;
        assert_eq!((report.opened, report.failed), (vec![port], vec![port]));
        assert_eq!(server.bind_failures(), 1);
        assert_eq!(get(port, "/").await.2["service"]["name"], "first");
    }

    #[tokio::test]
    async fn an_unhealthy_proxy_answers_503_even_with_local_endpoints() {
        let health = Health::new();
        let server = HealthCheckServer::new(LOCALHOST).with_proxy_health(health.clone());
        let port = free_port();
        server.update(&[check(port, "demo/web", 1)]).await;
        let (status, _, body) = get(port, "/healthz").await;
        assert_eq!(
            (status, body["serviceProxyHealthy"].clone()),
            (503, false.into())
        );

        health.record_sync(true);
        let (status, _, body) = get(port, "/healthz").await;
        assert_eq!(
            (status, body["serviceProxyHealthy"].clone()),
            (200, true.into())
        );
    }

    #[tokio::test]
    async fn dropping_the_server_closes_its_ports() {
        let server = HealthCheckServer::new(LOCALHOST);
        let port = free_port();
        server.update(&[check(port, "demo/web", 1)]).await;
        assert_eq!(get(port, "/").await.0, 200);
        drop(server);
        // Aborted tasks are dropped on the runtime's next turn.
        let closed = async {
            while !refused(port).await {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(TIMEOUT, closed).await.unwrap();
    }
}
