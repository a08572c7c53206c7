//! The agent's web view, on the metrics address under `/ui` (loopback by
//! default: exposing it is the operator's choice of `--metrics-addr`):
//! the Services, frontends and backends as `kpr svc list` shows them (the
//! pinned maps, named by the agent's record), their live counters (the
//! registry's per-Service and per-frontend samples, [`counters`]), and a
//! live tail of events over server-sent events ([`feed`]). The page is
//! three static files embedded in the binary; nothing is fetched from
//! elsewhere.
//!
//! Routes: `GET /ui` (the page), `/ui/app.js`, `/ui/style.css`,
//! `/ui/services` (JSON: `svc list -o json`'s rows), `/ui/counters` (JSON
//! samples), `/ui/events` (`text/event-stream`, one JSON line per event).

pub mod counters;
pub mod feed;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::broadcast::error::RecvError;

pub use feed::{EventFeed, EventSink};

use crate::datapath::kernel::KernelMaps;
use crate::datapath::LbMaps;
use crate::metrics::{Format, Metrics};

const INDEX_HTML: &str = include_str!("static/index.html");
const APP_JS: &str = include_str!("static/app.js");
const STYLE_CSS: &str = include_str!("static/style.css");

/// Keep-alive comments on an idle event stream: well inside the server's
/// 5 s idle timeout.
const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// The `/ui` routes for the agent of `bpf_root`.
pub fn router(bpf_root: PathBuf, metrics: Arc<Metrics>, feed: EventFeed) -> Router {
    let root = Arc::new(bpf_root);
    Router::new()
        .route(
            "/ui",
            get(|| async { page("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/",
            get(|| async { page("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { page("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { page("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route(
            "/ui/services",
            get(move || {
                let root = root.clone();
                async move { services(root).await }
            }),
        )
        .route(
            "/ui/counters",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    Json(counters::per_frontend(
                        &metrics.render(Format::PrometheusText),
                    ))
                }
            }),
        )
        .route(
            "/ui/events",
            get(move || {
                let feed = feed.clone();
                async move { events(&feed) }
            }),
        )
}

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `svc list -o json`'s rows, read from the pinned maps off the runtime.
async fn services(root: Arc<PathBuf>) -> Response {
    let read = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let maps = KernelMaps::open(&root)?;
        let names = crate::applied_state::read(&root)?
            .map(|s| s.names())
            .unwrap_or_default();
        Ok(crate::svc_list::rows(&maps.snapshot()?, &names))
    })
    .await;
    match read {
        Ok(Ok(rows)) => Json(rows).into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The feed as server-sent events; a receiver that lagged gets a
/// `{"kind":"lost","events":N}` line instead of what it missed.
fn events(feed: &EventFeed) -> impl IntoResponse {
    let rx = feed.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let line: Arc<str> = match rx.recv().await {
            Ok(line) => line,
            Err(RecvError::Lagged(n)) => format!(r#"{{"kind":"lost","events":{n}}}"#).into(),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok::<_, Infallible>(Event::default().data(&*line)), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}
