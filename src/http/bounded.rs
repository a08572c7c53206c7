//! The accept loop behind every endpoint, bounded so that no client can
//! exhaust the agent's descriptors or memory, nor starve health checks.
//!
//! - At most [`Limits::max_connections`] connections per listener. At the
//!   limit a new connection is still accepted and the connection with the
//!   oldest activity is closed instead: idle or stalled clients are shed,
//!   a health check (connect, ask, go) gets through.
//! - Descriptors in reserve: all listeners of the process together hold at
//!   most [`connection_budget`] connections, what the descriptor limit
//!   leaves after the descriptors open when serving starts and
//!   [`DESCRIPTOR_RESERVE`] more. So an accept flood never takes what a
//!   sync needs (map descriptors, Maglev tables, manifest files): over the
//!   budget a listener sheds its own oldest connection, or refuses the new
//!   one when it holds none.
//! - A request head must arrive within [`Limits::header_read_timeout`]
//!   (hyper's timer) and at most [`Limits::max_buf_size`] bytes are buffered
//!   per connection; no endpoint reads a request body.
//! - A connection with no byte in either direction for
//!   [`Limits::idle_timeout`] is closed (idle keep-alive, half-sent requests).
//! - Requests from a loopback peer may see more routes than others
//!   (`/status`, see [`super::serve_metrics_with_status`]).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;

/// What one listener allows its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open connections per listener (default 256).
    pub max_connections: usize,
    /// Time to send a complete request head (default 5 s).
    pub header_read_timeout: Duration,
    /// Time without a byte either way before a connection is closed
    /// (default 5 s).
    pub idle_timeout: Duration,
    /// Read buffer per connection, the largest request head (default 16 KiB;
    /// hyper's floor is 8 KiB).
    pub max_buf_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            max_buf_size: 16 * 1024,
        }
    }
}

/// Descriptors no HTTP client may take: those a sync needs (a descriptor
/// per Maglev table it writes, the manifest files it reads, pins it opens),
/// netlink's and the runtime's.
pub const DESCRIPTOR_RESERVE: usize = 256;

/// The fewest connections the budget allows, however low the limit.
const MIN_BUDGET: usize = 16;

/// How many connections all listeners together may hold when `open`
/// descriptors are in use and the limit is `nofile`: the rest, less
/// [`DESCRIPTOR_RESERVE`].
pub fn connection_budget(nofile: u64, open: usize) -> usize {
    let nofile = usize::try_from(nofile).unwrap_or(usize::MAX);
    nofile
        .saturating_sub(open)
        .saturating_sub(DESCRIPTOR_RESERVE)
        .max(MIN_BUDGET)
}

/// Open connections of every listener of the process.
static OPEN_CONNECTIONS: AtomicUsize = AtomicUsize::new(0);

/// The process's budget, taken when the first listener starts serving
/// (after the datapath is set up, so its descriptors are counted).
fn process_budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
        let budget = connection_budget(nofile, open);
        tracing::debug!(nofile, open, budget, "HTTP connection budget");
        budget
    })
}

/// One connection in [`OPEN_CONNECTIONS`], for as long as it lives (also
/// when its task is dropped unfinished).
struct Counted;

impl Counted {
    fn new() -> Counted {
        OPEN_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        Counted
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        OPEN_CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The routes of one listener: what every client gets, and what a client
/// from a loopback address gets.
#[derive(Clone)]
pub struct Routes {
    pub public: Router,
    pub loopback: Router,
}

impl Routes {
    /// The same routes for every client.
    pub fn all(router: Router) -> Routes {
        Routes {
            public: router.clone(),
            loopback: router,
        }
    }

    fn for_peer(&self, peer: SocketAddr) -> Router {
        if self.is_loopback_peer(peer) {
            self.loopback.clone()
        } else {
            self.public.clone()
        }
    }

    /// Whether `peer` connects from a loopback address (IPv4-mapped too).
    pub fn is_loopback_peer(&self, peer: SocketAddr) -> bool {
        match peer.ip() {
            std::net::IpAddr::V4(ip) => ip.is_loopback(),
            std::net::IpAddr::V6(ip) => {
                ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        }
    }
}

/// The open connections of one listener, oldest activity first to go.
#[derive(Default)]
struct Registry {
    next_id: u64,
    open: BTreeMap<u64, Slot>,
}

struct Slot {
    activity: Arc<Activity>,
    close: Arc<Notify>,
}

/// Milliseconds since the listener started at the last byte read or written.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Accepts on `listener` until `stopping` turns true, serving each
/// connection within `limits`; then asks open connections to finish and
/// returns once they have (the caller bounds that wait).
pub(super) async fn accept_loop(
    listener: TcpListener,
    endpoint: &'static str,
    routes: Routes,
    limits: Limits,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let registry = Arc::new(Mutex::new(Registry::default()));
    let epoch = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut shed: u64 = 0;
    let budget = process_budget();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => Some(accepted),
            _ = stopping.wait_for(|s| *s) => None,
        };
        let (stream, peer) = match accepted {
            None => break,
            Some(Ok(a)) => a,
            Some(Err(e)) => {
                // EMFILE and friends: back off a little instead of spinning.
                tracing::warn!(endpoint, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        while tasks.try_join_next().is_some() {}
        let activity = Arc::new(Activity {
            epoch,
            last_ms: AtomicU64::new(0),
        });
        activity.touch();
        let close = Arc::new(Notify::new());
        let over_budget = OPEN_CONNECTIONS.load(Ordering::Relaxed) >= budget;
        let id = {
            let mut reg = registry.lock().unwrap_or_else(PoisonError::into_inner);
            if over_budget && reg.open.is_empty() {
                // The other listeners hold the budget: refused, so that
                // the reserve stays (they shed their own within seconds).
                drop(stream);
                continue;
            }
            if reg.open.len() >= limits.max_connections || over_budget {
                let oldest = reg
                    .open
                    .iter()
                    .min_by_key(|(_, slot)| slot.activity.last_ms.load(Ordering::Relaxed))
                    .map(|(id, _)| *id);
                if let Some(slot) = oldest.and_then(|id| reg.open.remove(&id)) {
                    slot.close.notify_one();
                    shed += 1;
                    if shed.is_power_of_two() {
                        tracing::warn!(
                            endpoint,
                            limit = limits.max_connections,
                            budget,
                            shed,
                            "connection limit reached: closing the least active connections"
                        );
                    }
                }
            }
            reg.next_id += 1;
            let id = reg.next_id;
            reg.open.insert(
                id,
                Slot {
                    activity: activity.clone(),
                    close: close.clone(),
                },
            );
            id
        };
        if over_budget {
            // The shed connection closes in its own task: wait for it
            // (briefly), so the descriptors in use outgrow the budget by
            // this one connection at most.
            for _ in 0..20 {
                if OPEN_CONNECTIONS.load(Ordering::Relaxed) < budget {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let registry = registry.clone();
        let router = routes.for_peer(peer);
        let stopping = stopping.clone();
        let counted = Counted::new();
        tasks.spawn(async move {
            let _counted = counted;
            serve_connection(stream, router, limits, activity, close, stopping).await;
            registry
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .open
                .remove(&id);
        });
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    limits: Limits,
    activity: Arc<Activity>,
    close: Arc<Notify>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: activity.clone(),
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_buf_size)
        .keep_alive(true);
    let conn = builder.serve_connection(io, TowerToHyperService::new(router));
    tokio::pin!(conn);
    let mut graceful = false;
    loop {
        let idle_deadline = activity.last() + limits.idle_timeout;
        tokio::select! {
            _ = conn.as_mut() => return,
            () = close.notified() => return,
            () = tokio::time::sleep_until(idle_deadline) => {
                if activity.last() + limits.idle_timeout <= Instant::now() {
                    return;
                }
            }
            _ = stopping.wait_for(|s| *s), if !graceful => {
                graceful = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// A stream that records when bytes last moved.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
