//! The HTTP side: an accept loop whose listener can be closed and reopened,
//! connections that can all be cut at once, routing of the list, get and
//! watch paths, and errors as `metav1.Status`.
//!
//! Written on hyper directly rather than axum: faults need control below
//! the router (refuse connections, cut keep-alive connections, abort a
//! chunked body mid-stream).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::events;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{Change, Key, Kind, Store, VersionError};
use super::Options;

/// Watches without `timeoutSeconds` last this long (the apiserver picks at
/// random between its `--min-request-timeout`, 1800 s, and twice that).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// State shared by the control API and every connection.
pub struct Shared {
    pub store: Mutex<Store>,
    pub options: Options,
    /// The last resourceVersion changed; wakes every open watch.
    pub changed: watch::Sender<u64>,
    /// Bumped by `drop_watches`: every watch open at that moment aborts.
    pub drop_epoch: watch::Sender<u64>,
    /// Bumped when the server goes unavailable: every connection is cut.
    pub conn_epoch: watch::Sender<u64>,
    pub live_connections: AtomicUsize,
    pub lists: [AtomicU64; 3],
    pub watches: [AtomicU64; 3],
    /// Open watch streams by id.
    pub open: Mutex<HashMap<u64, Kind>>,
    next_watch_id: AtomicU64,
    /// `METHOD path?query` of every request, in arrival order.
    pub requests: Mutex<Vec<String>>,
    /// Events created, as stored, in arrival order.
    pub events: Mutex<Vec<Value>>,
}

impl Shared {
    pub fn new(options: Options) -> Self {
        Shared {
            store: Mutex::new(Store::new()),
            options,
            changed: watch::channel(0).0,
            drop_epoch: watch::channel(0).0,
            conn_epoch: watch::channel(0).0,
            live_connections: AtomicUsize::new(0),
            lists: Default::default(),
            watches: Default::default(),
            open: Mutex::new(HashMap::new()),
            next_watch_id: AtomicU64::new(1),
            requests: Mutex::new(Vec::new()),
            events: Mutex::new(Vec::new()),
        }
    }

    /// The store; a panic elsewhere while holding it does not poison the
    /// stand-in for the rest of the test.
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn open_watches(&self) -> MutexGuard<'_, HashMap<u64, Kind>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Orders for the accept loop.
pub enum Command {
    /// Serve on this listener.
    Listen(TcpListener),
    /// Close the listener and cut every connection, then acknowledge.
    Close(std::sync::mpsc::Sender<()>),
}

/// Accepts connections until the command channel closes.
pub async fn accept_loop(shared: Arc<Shared>, mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut listener: Option<TcpListener> = None;
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None => return,
                Some(Command::Listen(l)) => listener = Some(l),
                Some(Command::Close(ack)) => {
                    listener = None;
                    shared.conn_epoch.send_modify(|e| *e += 1);
                    let _ = ack.send(());
                }
            },
            accepted = accept(listener.as_ref()) => match accepted {
                Ok(stream) => {
                    // Subscribe here, not in the task, so a `Close` that
                    // follows cannot miss this connection.
                    let kill = shared.conn_epoch.subscribe();
                    shared.live_connections.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(serve_connection(shared.clone(), stream, kill));
                }
                Err(e) => {
                    tracing::debug!("apiserver stand-in: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

async fn accept(listener: Option<&TcpListener>) -> io::Result<TcpStream> {
    match listener {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream, mut kill: watch::Receiver<u64>) {
    struct Live(Arc<Shared>);
    impl Drop for Live {
        fn drop(&mut self) {
            self.0.live_connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let live = Live(shared.clone());
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move {
            if req.method() != Method::POST {
                return Ok::<_, Infallible>(handle(&shared, &req));
            }
            log_request(&shared, &req);
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| e.to_string());
            Ok(events::post(&shared, &parts, body))
        }
    });
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        result = conn => {
            if let Err(e) = result {
                tracing::debug!("apiserver stand-in: connection: {e}");
            }
        }
        // Dropping the connection closes the socket mid-whatever.
        _ = kill.changed() => {}
    }
    drop(live);
}

/// Why a watch body ended abruptly.
#[derive(Debug)]
pub struct Aborted;

impl std::fmt::Display for Aborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("watch dropped by the test (drop_watches)")
    }
}

impl std::error::Error for Aborted {}

pub type Body = UnsyncBoxBody<Bytes, Aborted>;

/// Where a request points.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
}

fn log_request(shared: &Shared, req: &Request<Incoming>) {
    shared
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(format!("{} {}", req.method(), req.uri()));
}

fn handle(shared: &Arc<Shared>, req: &Request<Incoming>) -> Response<Body> {
    log_request(shared, req);
    let path = req.uri().path();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if req.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("the stand-in serves GET only, not {}", req.method()),
        );
    }
    if segments == ["version"] {
        return json_response(StatusCode::OK, &version());
    }
    let Some(target) = route(&segments) else {
        return error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".into(),
        );
    };
    let raw_query = req.uri().query().unwrap_or("");
    if target.name.is_none() {
        // Counted before the query is validated: refused requests count.
        let counters = if is_watch(raw_query) {
            &shared.watches
        } else {
            &shared.lists
        };
        counters[target.kind.index()].fetch_add(1, Ordering::SeqCst);
    }
    let query = match Query::parse(raw_query) {
        Ok(q) => q,
        Err(message) => return error(StatusCode::BAD_REQUEST, "BadRequest", message),
    };
    match (&target.name, query.watch) {
        (Some(name), _) => get(shared, &target, name),
        (None, false) => list(shared, &target, &query),
        (None, true) => start_watch(shared, &target, &query),
    }
}

/// `/api/v1/...` and `/apis/discovery.k8s.io/v1/...`, namespaced or not,
/// with or without a name.
fn route(segments: &[&str]) -> Option<Target> {
    let (group, rest) = match segments {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, "v1", rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        _ => return None,
    };
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.group() == group && k.plural() == plural)?;
    let bad_namespace = match namespace {
        Some(ns) => !kind.namespaced() || ns.is_empty(),
        // A namespaced kind is read by name only inside its namespace.
        None => kind.namespaced() && name.is_some(),
    };
    if bad_namespace || name == Some("") {
        return None;
    }
    Some(Target {
        kind,
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
    })
}

/// The query parameters of list and watch requests.
struct Query {
    watch: bool,
    resource_version: Option<String>,
    resource_version_match: Option<String>,
    limit: Option<usize>,
    continue_token: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    timeout: Option<Duration>,
    bookmarks: bool,
    send_initial_events: bool,
}

impl Query {
    fn parse(raw: &str) -> Result<Self, String> {
        let mut q = Query {
            watch: false,
            resource_version: None,
            resource_version_match: None,
            limit: None,
            continue_token: None,
            labels: LabelSelector::default(),
            fields: FieldSelector::default(),
            timeout: None,
            bookmarks: false,
            send_initial_events: false,
        };
        for (key, value) in form_urlencoded::parse(raw.as_bytes()) {
            let non_empty = || Some(value.to_string()).filter(|v| !v.is_empty());
            match key.as_ref() {
                "watch" => q.watch = parse_bool(&key, &value)?,
                "resourceVersion" => q.resource_version = non_empty(),
                "resourceVersionMatch" => q.resource_version_match = non_empty(),
                "limit" => q.limit = Some(parse_number(&key, &value)?).filter(|&l| l > 0),
                "continue" => q.continue_token = non_empty(),
                "labelSelector" => q.labels = LabelSelector::parse(&value)?,
                "fieldSelector" => q.fields = FieldSelector::parse(&value)?,
                "timeoutSeconds" => {
                    // Capped at a day, so a deadline never overflows.
                    let secs = parse_number(&key, &value)?.min(86_400);
                    q.timeout = Some(Duration::from_secs(secs as u64))
                }
                "allowWatchBookmarks" => q.bookmarks = parse_bool(&key, &value)?,
                "sendInitialEvents" => q.send_initial_events = parse_bool(&key, &value)?,
                _ => {} // the apiserver ignores parameters it does not know
            }
        }
        Ok(q)
    }
}

/// Whether a query asks for a watch (a malformed flag is not one).
fn is_watch(raw: &str) -> bool {
    form_urlencoded::parse(raw.as_bytes())
        .any(|(k, v)| k == "watch" && parse_bool(&k, &v) == Ok(true))
}

/// Go's `strconv.ParseBool`, which the apiserver uses for query flags.
fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "" | "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("invalid value for {key}: {value:?}")),
    }
}

fn parse_number(key: &str, value: &str) -> Result<usize, String> {
    value
        .parse()
        .map_err(|_| format!("invalid value for {key}: {value:?}"))
}

fn parse_version(value: &str) -> Result<u64, String> {
    value
        .parse()
        .map_err(|_| format!("invalid resource version: {value:?}"))
}

/// Whether an object passes a request's namespace and selectors.
struct Filter {
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn new(target: &Target, query: &Query) -> Self {
        Filter {
            namespace: target.namespace.clone(),
            labels: query.labels.clone(),
            fields: query.fields.clone(),
        }
    }

    fn matches(&self, key: &Key, obj: &Value) -> bool {
        self.namespace.as_ref().is_none_or(|ns| *ns == key.1)
            && self.labels.matches(obj)
            && self.fields.matches(obj)
    }
}

fn get(shared: &Shared, target: &Target, name: &str) -> Response<Body> {
    let key = (
        target.kind,
        target.namespace.clone().unwrap_or_default(),
        name.to_string(),
    );
    match shared.store().get(&key) {
        Some(obj) => json_response(StatusCode::OK, obj),
        None => not_found(target.kind, name),
    }
}

fn not_found(kind: Kind, name: &str) -> Response<Body> {
    let mut details = json!({"name": name, "kind": kind.plural()});
    if !kind.group().is_empty() {
        details["group"] = json!(kind.group());
    }
    let body = status_json(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{} \"{name}\" not found", kind.qualified_plural()),
        Some(details),
    );
    json_response(StatusCode::NOT_FOUND, &body)
}

/// Continue tokens are opaque to clients; this one is
/// `<resourceVersion>:<namespace>/<name>` of the last item returned.
fn continue_token(rv: u64, key: &Key) -> String {
    format!("{rv}:{}/{}", key.1, key.2)
}

fn parse_continue(token: &str) -> Option<(u64, String, String)> {
    let (rv, rest) = token.split_once(':')?;
    let (ns, name) = rest.split_once('/')?;
    Some((rv.parse().ok()?, ns.to_string(), name.to_string()))
}

fn list(shared: &Shared, target: &Target, query: &Query) -> Response<Body> {
    let store = shared.store();
    let ListAt { rv, after } = match list_at(&store, query) {
        Ok(at) => at,
        Err(refused) => return refused.into_response(),
    };
    let filter = Filter::new(target, query);
    let (matching, remaining) = store.page(
        target.kind,
        rv,
        after.as_ref(),
        |key, obj| filter.matches(key, obj),
        query.limit,
    );
    drop(store);

    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if remaining > 0 {
        if let Some((last, _)) = matching.last() {
            metadata["continue"] = json!(continue_token(rv, last));
        }
        // Like the apiserver: only exact when no selector thins the list.
        if query.labels.is_empty() && query.fields.is_empty() {
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    let items: Vec<Value> = matching
        .into_iter()
        .map(|(_, mut obj)| {
            if !shared.options.list_items_with_type_meta {
                // The real apiserver leaves kind/apiVersion off list items
                // (kubernetes/kubernetes#3030).
                if let Some(o) = obj.as_object_mut() {
                    o.remove("kind");
                    o.remove("apiVersion");
                }
            }
            obj
        })
        .collect();
    let body = json!({
        "kind": format!("{}List", target.kind.name()),
        "apiVersion": target.kind.api_version(),
        "metadata": metadata,
        "items": items,
    });
    json_response(StatusCode::OK, &body)
}

/// Where a list reads: the version and the key it continues after.
struct ListAt {
    rv: u64,
    after: Option<(String, String)>,
}

/// Why a list is refused.
enum ListRefused {
    BadRequest(String),
    /// 410: the version or continue token is compacted away.
    Expired(String),
    /// 504: the version has not been issued yet.
    TooLarge {
        rv: u64,
        current: u64,
    },
}

impl ListRefused {
    fn into_response(self) -> Response<Body> {
        match self {
            ListRefused::BadRequest(m) => error(StatusCode::BAD_REQUEST, "BadRequest", m),
            ListRefused::Expired(m) => error(StatusCode::GONE, "Expired", m),
            ListRefused::TooLarge { rv, current } => {
                let details = json!({
                    "causes": [{"reason": "ResourceVersionTooLarge",
                                "message": "Too large resource version"}],
                    "retryAfterSeconds": 1,
                });
                let body = status_json(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Timeout",
                    &format!("Timeout: Too large resource version: {rv}, current: {current}"),
                    Some(details),
                );
                json_response(StatusCode::GATEWAY_TIMEOUT, &body)
            }
        }
    }
}

/// Where a list reads, following the resourceVersion /
/// resourceVersionMatch / continue rules of the API conventions.
fn list_at(store: &Store, query: &Query) -> Result<ListAt, ListRefused> {
    let bad = |m: &str| ListRefused::BadRequest(m.to_string());
    if let Some(token) = &query.continue_token {
        if query.resource_version.is_some() {
            return Err(bad(
                "specifying resource version is not allowed when using continue",
            ));
        }
        let (rv, ns, name) =
            parse_continue(token).ok_or_else(|| bad("continue key is not valid"))?;
        return match store.check_version(rv) {
            Ok(()) => Ok(ListAt {
                rv,
                after: Some((ns, name)),
            }),
            Err(VersionError::Expired { .. }) => Err(ListRefused::Expired(
                "The provided continue parameter is too old to display a consistent list result. \
                 You can start a new list without the continue parameter, or use the continue \
                 value from the response to get the rest of the list."
                    .into(),
            )),
            Err(VersionError::TooLarge { .. }) => Err(bad("continue key is not valid")),
        };
    }
    let current = ListAt {
        rv: store.rv(),
        after: None,
    };
    let Some(requested) = &query.resource_version else {
        if query.resource_version_match.is_some() {
            return Err(bad(
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        return Ok(current); // most recent: a quorum read
    };
    if requested == "0" {
        return Ok(current); // any version: our cache is always current
    }
    let rv = parse_version(requested).map_err(|m| bad(&m))?;
    let exact = match query.resource_version_match.as_deref() {
        Some("Exact") => true,
        Some("NotOlderThan") => false,
        // Legacy semantics: with a limit the version is exact.
        None => query.limit.is_some(),
        Some(other) => return Err(bad(&format!("invalid resourceVersionMatch: {other:?}"))),
    };
    match store.check_version(rv) {
        Ok(()) if exact => Ok(ListAt { rv, after: None }),
        Ok(()) => Ok(current),
        Err(VersionError::Expired { .. }) if !exact => Ok(current),
        Err(VersionError::Expired { oldest }) => Err(ListRefused::Expired(format!(
            "too old resource version: {rv} ({oldest})"
        ))),
        Err(VersionError::TooLarge { current }) => Err(ListRefused::TooLarge { rv, current }),
    }
}

/// Keeps a watch in `Shared::open` while its body lives.
struct OpenWatch {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.shared.open_watches().remove(&self.id);
    }
}

/// One watch response body being produced.
struct WatchState {
    kind: Kind,
    filter: Filter,
    /// The last version looked at; bookmarks carry it.
    cursor: u64,
    pending: VecDeque<Bytes>,
    /// End the stream once `pending` is drained (expired watches).
    finish: bool,
    deadline: Instant,
    changed: watch::Receiver<u64>,
    dropped: watch::Receiver<u64>,
    bookmarks: Option<Interval>,
    shared: Arc<Shared>,
    _open: OpenWatch,
}

fn start_watch(shared: &Arc<Shared>, target: &Target, query: &Query) -> Response<Body> {
    let kind = target.kind;
    let start = match query.resource_version.as_deref() {
        None | Some("0") => None,
        Some(v) => match parse_version(v) {
            Ok(rv) => Some(rv),
            Err(m) => return error(StatusCode::BAD_REQUEST, "BadRequest", m),
        },
    };
    let id = shared.next_watch_id.fetch_add(1, Ordering::SeqCst);
    shared.open_watches().insert(id, kind);
    let open = OpenWatch {
        shared: shared.clone(),
        id,
    };
    // Subscribe before reading the store so no change slips between.
    let changed = shared.changed.subscribe();
    let dropped = shared.drop_epoch.subscribe();
    let bookmarks = query.bookmarks.then(|| {
        let period = shared
            .options
            .bookmark_interval
            .max(Duration::from_millis(1));
        let mut i = tokio::time::interval_at(Instant::now() + period, period);
        i.set_missed_tick_behavior(MissedTickBehavior::Delay);
        i
    });
    let mut state = WatchState {
        kind,
        filter: Filter::new(target, query),
        cursor: 0,
        pending: VecDeque::new(),
        finish: false,
        deadline: Instant::now() + query.timeout.unwrap_or(DEFAULT_WATCH_TIMEOUT),
        changed,
        dropped,
        bookmarks,
        shared: shared.clone(),
        _open: open,
    };
    {
        let store = shared.store();
        match start {
            Some(rv) if rv < store.oldest() => {
                // What the apiserver does: 200, one ERROR event, close.
                let status = status_json(
                    StatusCode::GONE,
                    "Expired",
                    &format!("too old resource version: {rv} ({})", store.oldest()),
                    None,
                );
                state.push_event("ERROR", &status);
                state.finish = true;
            }
            Some(rv) if !query.send_initial_events => state.cursor = rv,
            _ => {
                // No version (or "0"), or sendInitialEvents: synthetic ADDED
                // events for the current state first.
                state.cursor = store.rv();
                for (key, obj) in store.snapshot(kind, state.cursor) {
                    if state.filter.matches(&key, &obj) {
                        state.push_event("ADDED", &obj);
                    }
                }
                if query.send_initial_events {
                    let mut end = state.bookmark();
                    end["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                    state.push_event("BOOKMARK", &end);
                }
            }
        }
        if !state.finish {
            state.collect(&store);
        }
    }
    let stream = futures::stream::unfold(state, |mut state| async move {
        let item = state.next_frame().await?;
        Some((item, state))
    });
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

impl WatchState {
    /// Queues `{"type":..,"object":..}` and a newline, `type` first as the
    /// apiserver writes it.
    fn push_event(&mut self, kind: &str, object: &Value) {
        let object = serde_json::to_string(object)
            .unwrap_or_else(|e| panic!("apiserver stand-in: encode event: {e}"));
        let line = format!("{{\"type\":\"{kind}\",\"object\":{object}}}\n");
        self.pending.push_back(Bytes::from(line));
    }

    /// A BOOKMARK object: the kind with only the resourceVersion.
    fn bookmark(&self) -> Value {
        json!({
            "kind": self.kind.name(),
            "apiVersion": self.kind.api_version(),
            "metadata": {"resourceVersion": self.cursor.to_string()},
        })
    }

    /// Queues the events for changes after the cursor, as the apiserver's
    /// watch cache reports them through a filter: an object that starts to
    /// match is ADDED, one that stops matching is DELETED.
    fn collect(&mut self, store: &Store) {
        let (changes, last) = store.changes_after(self.kind, self.cursor);
        for change in &changes {
            if let Some((kind, object)) = self.event_for(change) {
                self.push_event(kind, &object);
            }
        }
        self.cursor = self.cursor.max(last);
    }

    fn event_for(&self, c: &Change) -> Option<(&'static str, Value)> {
        let passes = |o: &Option<Value>| o.as_ref().is_some_and(|o| self.filter.matches(&c.key, o));
        match (passes(&c.old), passes(&c.new)) {
            (false, true) => Some(("ADDED", c.new.clone()?)),
            (true, true) => Some(("MODIFIED", c.new.clone()?)),
            (true, false) => Some(("DELETED", c.old_at_this_version()?)),
            (false, false) => None,
        }
    }

    async fn next_frame(&mut self) -> Option<Result<Frame<Bytes>, Aborted>> {
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some(Ok(Frame::data(line)));
            }
            if self.finish {
                return None;
            }
            tokio::select! {
                biased;
                // `drop_watches`, or the server going away: end abruptly,
                // so hyper cuts the connection without the final chunk.
                _ = self.dropped.changed() => {
                    self.finish = true;
                    return Some(Err(Aborted));
                }
                _ = tokio::time::sleep_until(self.deadline) => return None,
                woke = self.changed.changed() => {
                    if woke.is_err() {
                        return None;
                    }
                    let shared = self.shared.clone();
                    self.collect(&shared.store());
                }
                _ = tick(self.bookmarks.as_mut()) => {
                    let bookmark = self.bookmark();
                    self.push_event("BOOKMARK", &bookmark);
                }
            }
        }
    }
}

async fn tick(interval: Option<&mut Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-kpr-standin",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// A `metav1.Status` failure body.
pub fn status_json(code: StatusCode, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    if let Some(d) = details {
        status["details"] = d;
    }
    status
}

pub fn error(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    json_response(code, &status_json(code, reason, &message, None))
}

pub fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body)
        .unwrap_or_else(|e| panic!("apiserver stand-in: encode response: {e}"));
    let mut response = Response::new(
        Full::new(Bytes::from(bytes))
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
