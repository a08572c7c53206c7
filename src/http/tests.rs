//! Tests of the HTTP endpoints and their bounds.

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
    get_with(addr, path, "").await
}

/// [`get`] with extra header lines (each ending in `\r\n`).
async fn get_with(addr: SocketAddr, path: &str, headers: &str) -> Reply {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connecting");
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n");
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
async fn livez_fails_while_a_queued_change_stays_unapplied_past_the_timeout() {
    let health = Health::new();
    assert_eq!(health.liveness().timeout, Duration::from_secs(60));
    health.set_liveness_timeout(Duration::from_millis(200));
    let server = Server::start(
        "healthz",
        healthz_router(health.clone(), ProbeCounters::default()),
        SHUTDOWN_GRACE,
    )
    .await;

    health.change_queued();
    assert_eq!(
        get(server.addr, "/livez").await.status,
        200,
        "within the timeout"
    );
    // A failed sync applies nothing: the change keeps waiting.
    health.record_sync(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stuck = get(server.addr, "/livez").await;
    assert_eq!(stuck.status, 503);
    assert!(
        stuck.body.contains("a queued change has not been applied"),
        "{}",
        stuck.body
    );

    health.record_sync(true);
    assert_eq!(get(server.addr, "/livez").await.status, 200, "applied");
    server.stop().await;
}

#[tokio::test]
async fn healthz_is_503_until_a_sync_succeeds_and_again_after_a_failure() {
    let health = Health::new();
    let server = Server::start(
        "healthz",
        healthz_router(health.clone(), ProbeCounters::default()),
        SHUTDOWN_GRACE,
    )
    .await;

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
async fn metrics_are_openmetrics_for_prometheus_and_text_0_0_4_for_text_plain() {
    let metrics = Arc::new(Metrics::new());
    metrics.observe_sync(Duration::from_millis(2));
    let server = Server::start("metrics", metrics_router(metrics), SHUTDOWN_GRACE).await;
    let prometheus = "Accept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n";

    let reply = get_with(server.addr, "/metrics", prometheus).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some(OPENMETRICS_CONTENT_TYPE));
    assert!(reply
        .body
        .contains("\nkubeproxy_sync_proxy_rules_duration_seconds_count 1\n"));
    assert!(reply.body.contains("\n# TYPE kpr_syncs counter\n"));
    assert!(reply.body.contains("\n# UNIT "));
    assert!(reply.body.ends_with("# EOF\n"));

    for accept in ["Accept: text/plain\r\n", ""] {
        let reply = get_with(server.addr, "/metrics", accept).await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8"),
            "{accept:?}"
        );
        let body = &reply.body;
        assert!(body.contains("\nkubeproxy_sync_proxy_rules_duration_seconds_count 1\n"));
        assert!(
            body.contains("\n# TYPE kpr_syncs_total counter\n"),
            "{body}"
        );
        assert!(body.contains("\n# HELP kpr_syncs_total "), "{body}");
        assert!(
            !body.contains("# EOF") && !body.contains("# UNIT"),
            "{body}"
        );
        assert!(!body.contains("_created"), "{body}");
    }
    assert_eq!(get(server.addr, "/healthz").await.status, 404);
    server.stop().await;
}

#[tokio::test]
async fn healthz_is_503_while_the_node_is_ineligible_and_every_answer_is_counted() {
    let health = Health::new();
    let metrics = Metrics::new();
    let router = healthz_router(health.clone(), metrics.kube_proxy().probes());
    let server = Server::start("healthz", router, SHUTDOWN_GRACE).await;
    health.record_sync(true);
    let json = |r: &Reply| serde_json::from_str::<serde_json::Value>(&r.body).unwrap();

    let eligible = get(server.addr, "/healthz").await;
    assert_eq!(eligible.status, 200);
    assert_eq!(json(&eligible)["nodeEligible"], true);

    health.set_node_eligible(false);
    let leaving = get(server.addr, "/healthz").await;
    assert_eq!(leaving.status, 503);
    assert_eq!(json(&leaving)["nodeEligible"], false);
    assert_eq!(json(&leaving)["healthy"], true, "the sync itself is fine");
    assert_eq!(get(server.addr, "/livez").await.status, 200);

    health.set_node_eligible(true);
    assert_eq!(get(server.addr, "/healthz").await.status, 200);
    server.stop().await;

    let text = metrics.render(crate::metrics::Format::PrometheusText);
    for line in [
        "kubeproxy_proxy_healthz_total{code=\"200\"} 2\n",
        "kubeproxy_proxy_healthz_total{code=\"503\"} 1\n",
        "kubeproxy_proxy_livez_total{code=\"200\"} 1\n",
        "kubeproxy_proxy_livez_total{code=\"503\"} 0\n",
    ] {
        assert!(text.contains(line), "{line:?} not in\n{text}");
    }
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
    let healthz = tokio::spawn(serve_healthz(
        healthz_listener,
        Health::new(),
        ProbeCounters::default(),
        async move {
            let _ = stopped2.await;
        },
    ));

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
    let server = Server::start(
        "healthz",
        healthz_router(Health::new(), ProbeCounters::default()),
        grace,
    )
    .await;
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
    let (addr, _stop) = start_bounded(
        healthz_router(Health::new(), ProbeCounters::default()),
        limits,
    )
    .await;
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
    let (addr, _stop) = start_bounded(
        healthz_router(Health::new(), ProbeCounters::default()),
        limits,
    )
    .await;
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
            last_sync_ok: Some(false),
            node_eligible: true,
        }
    );
    health.record_sync_at(true, t1);
    assert!(health.state().healthy());
    assert_eq!(
        health.state().to_json(t1),
        r#"{"currentTime":"2023-11-14T22:13:20Z","healthy":true,"lastUpdated":"2023-11-14T22:13:20Z","nodeEligible":true}"#
    );
}

#[test]
fn http_clients_never_get_the_descriptors_held_in_reserve() {
    // 1,024 descriptors, 60 open at start: 708 for clients, 256 kept.
    assert_eq!(connection_budget(1024, 60), 1024 - 60 - DESCRIPTOR_RESERVE);
    assert_eq!(DESCRIPTOR_RESERVE, 256);
    // A raised limit leaves the reserve as it is.
    assert_eq!(
        connection_budget(1 << 20, 60),
        (1 << 20) - 60 - DESCRIPTOR_RESERVE
    );
    // A limit too low for the reserve still serves a few health checks.
    assert_eq!(connection_budget(256, 60), 16);
}
