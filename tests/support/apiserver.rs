//! A Kubernetes API stand-in for tests: an HTTP server on 127.0.0.1 that
//! speaks the apiserver's list/watch protocol for v1 Services,
//! discovery.k8s.io/v1 EndpointSlices and v1 Nodes, so kube-rs clients and
//! `kube::runtime::watcher` run against it as against a real cluster, and
//! tests can inject the faults a real cluster produces (dropped watches,
//! compaction, an unreachable apiserver).
//!
//! # Including it
//!
//! Test support, never built into the binary. An integration test pulls it
//! in with
//!
//! ```ignore
//! #[path = "support/apiserver.rs"]
//! mod apiserver;
//! use apiserver::{ApiServer, Kind};
//! ```
//!
//! (its submodules live in `tests/support/apiserver/`). It needs the
//! dev-dependencies `bytes`, `form_urlencoded`, `futures`, `http-body-util`,
//! `hyper` (server, http1) and `hyper-util` (tokio).
//!
//! # Threads
//!
//! The server runs on its own two-thread tokio runtime, on its own thread;
//! the control API is plain blocking Rust behind a mutex. So it works from a
//! sync `#[test]` and from `#[tokio::test]` alike (the calls that wait —
//! `start`, `drop_watches`, `set_unavailable`, drop — block for at most a
//! few milliseconds normally, 5 s at worst). Dropping the [`ApiServer`]
//! stops the runtime and closes every connection.
//!
//! # Protocol
//!
//! - `GET /api/v1/services`, `/api/v1/namespaces/{ns}/services` (and
//!   `.../{name}`), the same under `/apis/discovery.k8s.io/v1/` for
//!   `endpointslices`, `/api/v1/nodes` and `/api/v1/nodes/{name}`, and
//!   `/version`. No discovery endpoints (typed `Api` does not use them).
//!   Anything else: 404 `Status`.
//! - `POST` of Events (`events.k8s.io/v1` and core v1), validated as the
//!   apiserver does and recorded ([`ApiServer::events`]); other methods and
//!   other `POST`s: 405.
//! - One global resourceVersion counter for all kinds, like etcd's revision.
//!   Objects get `resourceVersion`, `uid`, `creationTimestamp` and (Service,
//!   EndpointSlice) `generation` filled in as the apiserver fills them.
//! - List: `{kind: XList, apiVersion, metadata: {resourceVersion,
//!   continue?, remainingItemCount?}, items}` in etcd key order
//!   (namespace, name). Items carry no kind/apiVersion, like the real
//!   apiserver (kubernetes/kubernetes#3030), unless
//!   [`Options::list_items_with_type_meta`]. `limit` + `continue` paginate a
//!   consistent snapshot; `resourceVersion` unset or `0` is the current
//!   state, `N` with `resourceVersionMatch=NotOlderThan` is the current
//!   state (504 if N is in the future), `N` with `Exact` (or with a limit and
//!   no match, the legacy rule) is the state at N (410 if compacted). A
//!   continue token older than the compaction point: HTTP 410 `Expired`.
//! - Watch (`watch=true|1`): 200, chunked, one JSON event per line. With
//!   `resourceVersion=N` every change after N; unset or `0`: synthetic
//!   ADDED events for the current state first (also with
//!   `sendInitialEvents=true`, which then ends the initial state with a
//!   BOOKMARK annotated `k8s.io/initial-events-end: "true"`, so the
//!   watcher's streaming-list mode works too). Selectors filter as the watch
//!   cache does: an object that starts to match is ADDED, one that stops
//!   matching is DELETED. DELETED carries the last state stamped with the
//!   deletion's resourceVersion. BOOKMARK events every
//!   [`Options::bookmark_interval`] when `allowWatchBookmarks=true`. The
//!   stream ends cleanly after `timeoutSeconds` (1800 s if unset). N older
//!   than the compaction point: 200 with one `ERROR` event (Status 410
//!   `Expired`, "too old resource version: N (oldest)"), then the end.
//!
//! # Faults
//!
//! - [`ApiServer::drop_watches`] aborts every open watch body mid-stream
//!   (the connection is cut without the final chunk).
//! - [`ApiServer::compact`] makes every resourceVersion issued so far too
//!   old. It also issues one fresh version (no object changes) that lists
//!   report from then on, so a relist is not expired at once; bookmarks of
//!   watches open before keep the old, expired version.
//! - [`ApiServer::set_unavailable`] closes the listener and cuts every
//!   connection (clients get connection refused), then reopens on the same
//!   port.

#![allow(dead_code)] // each test crate uses its own part of the API

// Paths are spelled out: this file is included by `#[path]`, which
// resolves child modules next to it rather than in `apiserver/`.
#[path = "apiserver/events.rs"]
mod events;
#[path = "apiserver/selector.rs"]
pub mod selector;
#[path = "apiserver/server.rs"]
mod server;
#[path = "apiserver/store.rs"]
pub mod store;

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use server::{Command, Shared};
pub use store::Kind;

/// How long control calls wait for the server side before panicking.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// Server knobs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Period of BOOKMARK events on watches that allow them. Default 1 s
    /// (the real apiserver sends about one a minute); at least 1 ms.
    pub bookmark_interval: Duration,
    /// Whether list items carry `kind` and `apiVersion`. Default false,
    /// which is what the real apiserver does.
    pub list_items_with_type_meta: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bookmark_interval: Duration::from_secs(1),
            list_items_with_type_meta: false,
        }
    }
}

/// A running stand-in; see the module docs.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    runtime: tokio::runtime::Handle,
    commands: Option<mpsc::UnboundedSender<Command>>,
    thread: Option<JoinHandle<()>>,
    unavailable: Mutex<bool>,
}

impl ApiServer {
    /// Starts a server on 127.0.0.1 and an ephemeral port, default options.
    /// Panics if it cannot (a test cannot go on without it).
    pub fn start() -> ApiServer {
        Self::start_with(Options::default())
    }

    /// [`start`](Self::start) with options.
    pub fn start_with(options: Options) -> ApiServer {
        Self::try_start_with(options)
            .unwrap_or_else(|e| panic!("apiserver stand-in: cannot start: {e}"))
    }

    /// Starts a server, or says why it could not.
    pub fn try_start_with(options: Options) -> io::Result<ApiServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("apiserver-standin")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let shared = Arc::new(Shared::new(options));
        let listener = bind(&handle, SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = listener.local_addr()?;
        let (commands, receiver) = mpsc::unbounded_channel();
        let _ = commands.send(Command::Listen(listener));
        let loop_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("apiserver-standin".into())
            .spawn(move || {
                runtime.block_on(server::accept_loop(loop_shared, receiver));
                // Drops every connection and watch still running.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(ApiServer {
            shared,
            addr,
            runtime: handle,
            commands: Some(commands),
            thread: Some(thread),
            unavailable: Mutex::new(false),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address (the same across `set_unavailable`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig for this server: plain http, no credentials, context
    /// `kpr-standin`, namespace `default`.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: kpr-standin\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: kpr-standin\n  user: {{}}\n\
             contexts:\n\
             - name: kpr-standin\n  context:\n    cluster: kpr-standin\n    user: kpr-standin\n    namespace: default\n\
             current-context: kpr-standin\n",
            url = self.url()
        )
    }

    /// Writes [`kubeconfig_yaml`](Self::kubeconfig_yaml) to `path`, for
    /// `KUBECONFIG` or `kube::Config::from_custom_kubeconfig`.
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
    }

    /// A `kube::Config` for this server without a file.
    pub fn kube_config(&self) -> kube::Config {
        let url = self
            .url()
            .parse()
            .unwrap_or_else(|e| panic!("apiserver stand-in: url {}: {e}", self.url()));
        kube::Config::new(url)
    }

    /// Creates or replaces a Service, EndpointSlice or Node (a k8s-openapi
    /// object or JSON with `apiVersion` and `kind`), as an update through
    /// the API would: a new resourceVersion and an ADDED or MODIFIED event.
    /// Namespaced objects without a namespace go to `default`; a Node's
    /// namespace is dropped. The server-owned fields (resourceVersion, uid,
    /// creationTimestamp, generation) are the server's whatever `obj` says,
    /// so there are no conflicts. An apply that changes nothing issues no
    /// version and no event. Returns the stored object. Panics on an object
    /// the stand-in does not serve or without `metadata.name`.
    pub fn apply<T: Serialize + DeserializeOwned>(&self, obj: &T) -> T {
        let json = serde_json::to_value(obj)
            .unwrap_or_else(|e| panic!("apiserver stand-in: apply: encode: {e}"));
        let (stored, change) = self
            .shared
            .store()
            .apply(json)
            .unwrap_or_else(|e| panic!("apiserver stand-in: apply: {e}"));
        if let Some(change) = change {
            self.shared.changed.send_replace(change.rv);
        }
        decode(stored)
    }

    /// Deletes an object (DELETED event carrying its last state at the
    /// deletion's resourceVersion). `namespace` is `None` for Nodes.
    /// Returns whether it existed.
    pub fn delete(&self, kind: Kind, namespace: Option<&str>, name: &str) -> bool {
        let change = self.shared.store().delete(&key(kind, namespace, name));
        if let Some(c) = &change {
            self.shared.changed.send_replace(c.rv);
        }
        change.is_some()
    }

    /// The stored object, if any.
    pub fn get<T: DeserializeOwned>(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<T> {
        let obj = self
            .shared
            .store()
            .get(&key(kind, namespace, name))
            .cloned();
        obj.map(decode)
    }

    /// Every stored object of a kind, in list order.
    pub fn list<T: DeserializeOwned>(&self, kind: Kind) -> Vec<T> {
        let store = self.shared.store();
        let objects = store.snapshot(kind, store.rv());
        drop(store);
        objects.into_iter().map(|(_, v)| decode(v)).collect()
    }

    /// The last resourceVersion issued.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv()
    }

    /// Aborts every watch stream open now, mid-stream, and waits until the
    /// server has closed them all. Watches opened afterwards (a client
    /// reconnecting) are not affected.
    pub fn drop_watches(&self) {
        let victims: Vec<u64> = self.shared.open_watches().keys().copied().collect();
        self.shared.drop_epoch.send_modify(|e| *e += 1);
        wait_until("drop_watches: watches still open", || {
            let open = self.shared.open_watches();
            victims.iter().all(|id| !open.contains_key(id))
        });
    }

    /// Makes every resourceVersion issued so far too old: a watch or a
    /// continue from any of them gets 410 Expired; an exact list at one of
    /// them too. Open watches go on (drop them to force a resume).
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// `true`: close the listener and cut every connection, so clients get
    /// connection refused; returns once no connection is left. `false`:
    /// listen again on the same port. Idempotent.
    pub fn set_unavailable(&self, unavailable: bool) {
        let mut state = self.unavailable.lock().unwrap_or_else(|e| e.into_inner());
        if *state == unavailable {
            return;
        }
        if unavailable {
            let (ack, acked) = std::sync::mpsc::channel();
            self.command(Command::Close(ack));
            acked
                .recv_timeout(CONTROL_TIMEOUT)
                .unwrap_or_else(|e| panic!("apiserver stand-in: close listener: {e}"));
            wait_until("set_unavailable: connections still open", || {
                self.shared.live_connections.load(Ordering::SeqCst) == 0
            });
        } else {
            let listener = retry_bind(&self.runtime, self.addr);
            self.command(Command::Listen(listener));
        }
        *state = unavailable;
    }

    /// List requests (not watches, not gets) received for `kind`, failed
    /// ones included.
    pub fn list_requests(&self, kind: Kind) -> u64 {
        self.shared.lists[kind.index()].load(Ordering::SeqCst)
    }

    /// Watch requests received for `kind`, refused ones included.
    pub fn watch_requests(&self, kind: Kind) -> u64 {
        self.shared.watches[kind.index()].load(Ordering::SeqCst)
    }

    /// `METHOD path?query` of every request so far, in arrival order, as
    /// sent (query still percent-encoded).
    pub fn requests(&self) -> Vec<String> {
        let log = self.shared.requests.lock();
        log.unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The Events created so far (`POST .../events`), as stored, in
    /// arrival order.
    pub fn events(&self) -> Vec<Value> {
        let events = self.shared.events.lock();
        events.unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Watch streams open now, all kinds.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches().len()
    }

    /// Watch streams open now for `kind`.
    pub fn open_watches_of(&self, kind: Kind) -> usize {
        self.shared
            .open_watches()
            .values()
            .filter(|&&k| k == kind)
            .count()
    }

    fn command(&self, command: Command) {
        let sent = self.commands.as_ref().map(|c| c.send(command).is_ok());
        assert_eq!(sent, Some(true), "apiserver stand-in: server loop is gone");
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // Closing the command channel ends the accept loop; the server
        // thread then shuts its runtime down.
        self.commands.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn key(kind: Kind, namespace: Option<&str>, name: &str) -> store::Key {
    assert_eq!(
        kind.namespaced(),
        namespace.is_some(),
        "apiserver stand-in: {} is {}namespaced",
        kind.name(),
        if kind.namespaced() { "" } else { "not " }
    );
    (
        kind,
        namespace.unwrap_or_default().to_string(),
        name.to_string(),
    )
}

fn decode<T: DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value)
        .unwrap_or_else(|e| panic!("apiserver stand-in: decode stored object: {e}"))
}

/// A listener with SO_REUSEADDR, so the port can be bound again while
/// connections of the previous listener are in TIME_WAIT.
fn bind(runtime: &tokio::runtime::Handle, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let _guard = runtime.enter();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

fn retry_bind(runtime: &tokio::runtime::Handle, addr: SocketAddr) -> tokio::net::TcpListener {
    let deadline = Instant::now() + CONTROL_TIMEOUT;
    loop {
        match bind(runtime, addr) {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("apiserver stand-in: rebind {addr}: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("apiserver stand-in: rebind {addr}: {e}"),
        }
    }
}

/// Polls `done` every 2 ms for up to [`CONTROL_TIMEOUT`].
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + CONTROL_TIMEOUT;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "apiserver stand-in: {what} after {CONTROL_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}
