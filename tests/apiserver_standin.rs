//! The Kubernetes API stand-in (tests/support/apiserver.rs) against real
//! kube-rs: client list/get, `kube::runtime::watcher` through its initial
//! list, changes, dropped watches, compaction and an unreachable server, and
//! selectors — the behaviour kpr's Kubernetes source tests will lean on.
//! Every wait is bounded (10 s).

#[path = "support/apiserver.rs"]
mod apiserver;

use std::io::{Read, Write};
use std::pin::Pin;
use std::time::Duration;

use apiserver::selector::{FieldSelector, LabelSelector};
use apiserver::{ApiServer, Kind, Options};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, VersionMatch, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::Event;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

const PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

fn service(ns: &str, name: &str, labels: Value) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]},
    }))
    .expect("service fixture")
}

fn slice(ns: &str, name: &str, service: &str) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"port": 8080}],
        "endpoints": [{"addresses": ["10.244.0.11"]}],
    }))
    .expect("slice fixture")
}

fn node(name: &str) -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
    }))
    .expect("node fixture")
}

/// A client configured the way kpr is: from a kubeconfig file.
async fn client(server: &ApiServer) -> Client {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path).expect("write kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config from kubeconfig");
    Client::try_from(config).expect("client")
}

type Events<K> = Pin<Box<dyn Stream<Item = watcher::Result<Event<K>>> + Send>>;

fn watch<K>(api: Api<K>, config: watcher::Config) -> Events<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    Box::pin(watcher(api, config))
}

/// One watcher event, rendered for comparison: `Init`, `InitApply ns/name`,
/// `InitDone`, `Apply ns/name`, `Delete ns/name`, `Err 410`, `Err <text>`.
fn describe<K: Resource>(event: &watcher::Result<Event<K>>) -> String {
    let id = |o: &K| match o.meta().namespace.as_deref() {
        Some(ns) => format!("{ns}/{}", o.meta().name.as_deref().unwrap_or("")),
        None => o.meta().name.clone().unwrap_or_default(),
    };
    match event {
        Ok(Event::Init) => "Init".into(),
        Ok(Event::InitApply(o)) => format!("InitApply {}", id(o)),
        Ok(Event::InitDone) => "InitDone".into(),
        Ok(Event::Apply(o)) => format!("Apply {}", id(o)),
        Ok(Event::Delete(o)) => format!("Delete {}", id(o)),
        Err(watcher::Error::WatchError(status)) => format!("Err {}", status.code),
        Err(e) => format!("Err {e}"),
    }
}

/// The next `n` events, rendered.
async fn take<K: Resource>(events: &mut Events<K>, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let event = tokio::time::timeout(WAIT, events.next())
            .await
            .unwrap_or_else(|_| panic!("no watcher event within {WAIT:?}; so far {out:?}"))
            .expect("watcher streams never end");
        out.push(describe(&event));
    }
    out
}

/// The next `n` events that are not errors, rendered, and the errors seen
/// on the way.
async fn take_ok<K: Resource>(events: &mut Events<K>, n: usize) -> (Vec<String>, Vec<String>) {
    let (mut ok, mut errors) = (Vec::new(), Vec::new());
    while ok.len() < n {
        let event = tokio::time::timeout(WAIT, events.next())
            .await
            .unwrap_or_else(|_| {
                panic!("no watcher event within {WAIT:?}; so far {ok:?} {errors:?}")
            })
            .expect("watcher streams never end");
        let text = describe(&event);
        if event.is_ok() {
            ok.push(text);
        } else {
            errors.push(text);
        }
    }
    (ok, errors)
}

/// Polls until `done`, for at most [`WAIT`].
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {WAIT:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn names<K: Resource>(items: &[K]) -> Vec<String> {
    items
        .iter()
        .map(|o| o.meta().name.clone().unwrap_or_default())
        .collect()
}

fn api_error_code(e: &kube::Error) -> Option<(u16, String)> {
    match e {
        kube::Error::Api(status) => Some((status.code, status.reason.clone())),
        _ => None,
    }
}

#[tokio::test]
async fn kube_client_lists_and_gets_objects_with_server_filled_metadata() {
    let server = ApiServer::start();
    server.apply(&service("b", "db", json!({})));
    let web = server.apply(&service("a", "web", json!({"app": "web"})));
    server.apply(&slice("a", "web-1", "web"));
    server.apply(&node("n1"));
    let client = client(&server).await;

    let services = Api::<Service>::all(client.clone());
    let list = services.list(&ListParams::default()).await.expect("list");
    assert_eq!(
        names(&list.items),
        ["web", "db"],
        "etcd key order: namespace, name"
    );
    assert_eq!(
        list.metadata.resource_version,
        Some(server.resource_version().to_string())
    );
    for item in &list.items {
        let meta = item.meta();
        assert!(meta.resource_version.is_some(), "{meta:?}");
        assert!(meta.uid.is_some(), "{meta:?}");
        assert!(meta.creation_timestamp.is_some(), "{meta:?}");
        assert_eq!(meta.generation, Some(1));
    }
    assert_eq!(list.items[0].metadata, web.metadata);

    let in_a = Api::<Service>::namespaced(client.clone(), "a");
    let got = in_a.get("web").await.expect("get");
    assert_eq!(got.metadata.uid, web.metadata.uid);
    let missing = in_a.get("nope").await.expect_err("missing object");
    assert_eq!(api_error_code(&missing), Some((404, "NotFound".into())));
    assert!(
        missing.to_string().contains("services \"nope\" not found"),
        "{missing}"
    );

    let nodes = Api::<Node>::all(client.clone());
    assert_eq!(nodes.get("n1").await.expect("get node").name_any(), "n1");
    let slices = Api::<EndpointSlice>::all(client.clone());
    let slice_list = slices.list(&ListParams::default()).await.expect("slices");
    assert_eq!(names(&slice_list.items), ["web-1"]);

    let version = client.apiserver_version().await.expect("version");
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "33")
    );
    assert_eq!(server.list_requests(Kind::Service), 1);
    assert_eq!(server.list_requests(Kind::EndpointSlice), 1);
}

#[tokio::test]
async fn lists_paginate_over_a_consistent_snapshot_until_compacted() {
    let server = ApiServer::start();
    for i in 0..7 {
        server.apply(&service("t", &format!("s{i}"), json!({})));
    }
    let api = Api::<Service>::all(client(&server).await);

    let first = api
        .list(&ListParams::default().limit(3))
        .await
        .expect("page 1");
    assert_eq!(names(&first.items), ["s0", "s1", "s2"]);
    assert_eq!(first.metadata.remaining_item_count, Some(4));
    let token = first.metadata.continue_.clone().expect("continue token");
    // A change between pages is not in this list: pages share one version.
    server.apply(&service("t", "s3a", json!({})));
    let second = api
        .list(&ListParams::default().limit(3).continue_token(&token))
        .await
        .expect("page 2");
    assert_eq!(names(&second.items), ["s3", "s4", "s5"]);
    assert_eq!(
        second.metadata.resource_version,
        first.metadata.resource_version
    );
    let token2 = second.metadata.continue_.clone().expect("continue token");
    let third = api
        .list(&ListParams::default().limit(3).continue_token(&token2))
        .await
        .expect("page 3");
    assert_eq!(names(&third.items), ["s6"]);
    assert_eq!(third.metadata.continue_, None);

    server.compact();
    let expired = api
        .list(&ListParams::default().limit(3).continue_token(&token))
        .await
        .expect_err("continue after compaction");
    assert_eq!(api_error_code(&expired), Some((410, "Expired".into())));
    let old = first.metadata.resource_version.clone().expect("rv");
    let exact = ListParams::default().at(&old).matching(VersionMatch::Exact);
    let expired = api
        .list(&exact)
        .await
        .expect_err("exact list at a compacted version");
    assert_eq!(api_error_code(&expired), Some((410, "Expired".into())));
    let fresh = api
        .list(&ListParams::default().limit(500))
        .await
        .expect("relist");
    assert_eq!(fresh.items.len(), 8);
}

#[tokio::test]
async fn watcher_sees_the_initial_list_then_changes_through_its_label_selector() {
    let server = ApiServer::start();
    server.apply(&service("t", "web", json!({})));
    server.apply(&service("t", "db", json!({})));
    server.apply(&service("t", "other", json!({PROXY_NAME: "other"})));
    let api = Api::<Service>::all(client(&server).await);
    let config = watcher::Config::default().labels(&format!("!{PROXY_NAME}"));
    let mut events = watch(api, config);

    assert_eq!(
        take(&mut events, 4).await,
        ["Init", "InitApply t/db", "InitApply t/web", "InitDone"]
    );
    server.apply(&service("t", "api", json!({})));
    server.apply(&service(
        "t",
        "other",
        json!({PROXY_NAME: "other", "x": "y"}),
    ));
    let mut web = service("t", "web", json!({}));
    web.spec.as_mut().expect("spec").cluster_ip = Some("10.96.0.99".into());
    server.apply(&web);
    server.delete(Kind::Service, Some("t"), "db");
    // Gaining the label takes web out of the selection: DELETED.
    server.apply(&service("t", "web", json!({PROXY_NAME: "other"})));
    // Losing it brings `other` in: ADDED.
    server.apply(&service("t", "other", json!({})));
    assert_eq!(
        take(&mut events, 5).await,
        [
            "Apply t/api",
            "Apply t/web",
            "Delete t/db",
            "Delete t/web",
            "Apply t/other"
        ]
    );
    assert_eq!(server.list_requests(Kind::Service), 1);
    assert_eq!(server.watch_requests(Kind::Service), 1);
    // What kube's watcher asks for by default (pinned for kpr's integrator).
    let selector = "labelSelector=%21service.kubernetes.io%2Fservice-proxy-name";
    let listed_at = 4; // three applies, first version 1
    assert_eq!(
        server.requests(),
        [
            format!("GET /api/v1/services?&{selector}&limit=500"),
            format!(
                "GET /api/v1/services?&watch=true&timeoutSeconds=290&{selector}\
                 &allowWatchBookmarks=true&resourceVersion={listed_at}"
            ),
        ]
    );
}

#[tokio::test]
async fn watcher_resumes_after_dropped_watches_without_relisting() {
    let server = ApiServer::start();
    server.apply(&service("t", "web", json!({})));
    let api = Api::<Service>::all(client(&server).await);
    let mut events = watch(api, watcher::Config::default());
    assert_eq!(
        take(&mut events, 3).await,
        ["Init", "InitApply t/web", "InitDone"]
    );
    server.apply(&service("t", "a", json!({})));
    assert_eq!(take(&mut events, 1).await, ["Apply t/a"]);
    assert_eq!(server.open_watches_of(Kind::Service), 1);

    server.drop_watches();
    assert_eq!(server.open_watches(), 0);
    server.apply(&service("t", "b", json!({})));
    let (seen, errors) = take_ok(&mut events, 1).await;
    assert_eq!(seen, ["Apply t/b"]);
    assert!(
        errors.is_empty(),
        "kube resumes a cut stream silently: {errors:?}"
    );
    assert_eq!(
        server.list_requests(Kind::Service),
        1,
        "resumed, not relisted"
    );
    assert_eq!(server.watch_requests(Kind::Service), 2);
    assert_eq!(server.open_watches_of(Kind::Service), 1);
}

#[tokio::test]
async fn watcher_relists_after_compaction_and_a_delete_it_missed_is_gone() {
    let server = ApiServer::start();
    server.apply(&service("t", "a", json!({})));
    server.apply(&service("t", "b", json!({})));
    let api = Api::<Service>::all(client(&server).await);
    let mut events = watch(api, watcher::Config::default());
    assert_eq!(
        take(&mut events, 4).await,
        ["Init", "InitApply t/a", "InitApply t/b", "InitDone"]
    );
    server.apply(&service("t", "c", json!({})));
    assert_eq!(take(&mut events, 1).await, ["Apply t/c"]);

    // Not polled: the watcher cannot resume before the delete happens.
    server.compact();
    server.drop_watches();
    server.delete(Kind::Service, Some("t"), "b");
    let (seen, errors) = take_ok(&mut events, 4).await;
    assert_eq!(seen, ["Init", "InitApply t/a", "InitApply t/c", "InitDone"]);
    assert_eq!(errors, ["Err 410"], "the resume is refused as expired");
    assert_eq!(server.list_requests(Kind::Service), 2);

    // The relisted version is not itself expired.
    server.apply(&service("t", "d", json!({})));
    assert_eq!(take(&mut events, 1).await, ["Apply t/d"]);
    assert_eq!(server.list_requests(Kind::Service), 2);
}

#[tokio::test]
async fn a_watch_from_a_compacted_version_gets_one_expired_event_and_ends() {
    let server = ApiServer::start();
    server.apply(&service("t", "a", json!({})));
    let old = server.resource_version().to_string();
    server.compact();
    let api = Api::<Service>::all(client(&server).await);
    let stream = api
        .watch(&WatchParams::default(), &old)
        .await
        .expect("watch");
    let events: Vec<_> = tokio::time::timeout(WAIT, stream.collect::<Vec<_>>())
        .await
        .expect("the stream ends");
    assert_eq!(events.len(), 1, "{events:?}");
    match &events[0] {
        Ok(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert!(
                status
                    .message
                    .starts_with(&format!("too old resource version: {old} (")),
                "{}",
                status.message
            );
        }
        other => panic!("expected one ERROR event, got {other:?}"),
    }
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists_and_watches() {
    let server = ApiServer::start();
    server.apply(&service("a", "web", json!({"app": "web", "tier": "front"})));
    server.apply(&service("b", "web", json!({"app": "web"})));
    server.apply(&service("b", "db", json!({"app": "db"})));
    server.apply(&service("b", "bare", json!({})));
    let client = client(&server).await;
    let api = Api::<Service>::all(client.clone());
    let cases = [
        (
            ListParams::default().labels("app=web"),
            vec!["a/web", "b/web"],
        ),
        (
            ListParams::default().labels("app!=web"),
            vec!["b/bare", "b/db"],
        ),
        (
            ListParams::default().labels("app"),
            vec!["a/web", "b/db", "b/web"],
        ),
        (ListParams::default().labels("!app"), vec!["b/bare"]),
        (
            ListParams::default().labels("app=web,tier=front"),
            vec!["a/web"],
        ),
        (
            ListParams::default().labels("app in (db, web),!tier"),
            vec!["b/db", "b/web"],
        ),
        (
            ListParams::default().fields("metadata.name=web"),
            vec!["a/web", "b/web"],
        ),
        (
            ListParams::default().fields("metadata.namespace=b"),
            vec!["b/bare", "b/db", "b/web"],
        ),
        (
            ListParams::default()
                .fields("metadata.namespace=b,metadata.name!=web")
                .labels("app"),
            vec!["b/db"],
        ),
    ];
    for (params, want) in cases {
        let list = api.list(&params).await.expect("list");
        let got: Vec<String> = list
            .items
            .iter()
            .map(|s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
            .collect();
        assert_eq!(
            got, want,
            "{:?} {:?}",
            params.label_selector, params.field_selector
        );
    }
    let refused = api
        .list(&ListParams::default().fields("spec.clusterIP=10.96.0.10"))
        .await
        .expect_err("unsupported field");
    assert_eq!(api_error_code(&refused), Some((400, "BadRequest".into())));
    let in_b = Api::<Service>::namespaced(client, "b");
    assert_eq!(
        names(
            &in_b
                .list(&ListParams::default())
                .await
                .expect("ns list")
                .items
        ),
        ["bare", "db", "web"]
    );

    let mut events = watch(api, watcher::Config::default().fields("metadata.name=web"));
    assert_eq!(
        take(&mut events, 4).await,
        ["Init", "InitApply a/web", "InitApply b/web", "InitDone"]
    );
    server.apply(&service("b", "db", json!({"app": "db", "x": "1"})));
    server.delete(Kind::Service, Some("a"), "web");
    assert_eq!(take(&mut events, 1).await, ["Delete a/web"]);
}

#[tokio::test]
async fn idle_watches_get_bookmarks_with_the_latest_version_and_end_after_their_timeout() {
    let server = ApiServer::start_with(Options {
        bookmark_interval: Duration::from_millis(100),
        ..Options::default()
    });
    server.apply(&service("t", "a", json!({})));
    let start = server.resource_version();
    let api = Api::<Service>::all(client(&server).await);
    let params = WatchParams::default().timeout(2);
    let mut stream = api
        .watch(&params, &start.to_string())
        .await
        .expect("watch")
        .boxed();
    async fn next<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
        tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("an event in time")
    }
    match next(&mut stream).await {
        Some(Ok(WatchEvent::Bookmark(b))) => {
            assert_eq!(b.metadata.resource_version, start.to_string());
            assert_eq!(b.types.kind, "Service");
        }
        other => panic!("expected a bookmark, got {other:?}"),
    }
    // A change of another kind moves bookmarks on: it is progress too.
    server.apply(&node("n1"));
    let latest = server.resource_version().to_string();
    let mut found = false;
    while let Some(event) = next(&mut stream).await {
        match event {
            Ok(WatchEvent::Bookmark(b)) if b.metadata.resource_version == latest => found = true,
            Ok(WatchEvent::Bookmark(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        found,
        "no bookmark at {latest} before the 2 s timeout ended the stream"
    );
    eventually("the timed-out watch is closed", || {
        server.open_watches() == 0
    })
    .await;
}

#[tokio::test]
async fn watcher_pages_its_initial_list_with_continue_tokens() {
    let server = ApiServer::start();
    for name in ["a", "b", "c", "d", "e"] {
        server.apply(&service("t", name, json!({})));
    }
    let api = Api::<Service>::all(client(&server).await);
    let mut events = watch(api, watcher::Config::default().page_size(2));
    assert_eq!(
        take(&mut events, 7).await,
        [
            "Init",
            "InitApply t/a",
            "InitApply t/b",
            "InitApply t/c",
            "InitApply t/d",
            "InitApply t/e",
            "InitDone"
        ]
    );
    assert_eq!(server.list_requests(Kind::Service), 3);
    server.delete(Kind::Service, Some("t"), "c");
    assert_eq!(take(&mut events, 1).await, ["Delete t/c"]);
}

#[test]
fn the_server_handle_can_be_shared_across_threads_and_tasks() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<ApiServer>();
}

#[tokio::test]
async fn streaming_list_watcher_gets_initial_events_without_a_list_call() {
    let server = ApiServer::start();
    server.apply(&service("t", "a", json!({})));
    server.apply(&service("t", "b", json!({})));
    let api = Api::<Service>::all(client(&server).await);
    let mut events = watch(api, watcher::Config::default().streaming_lists());
    assert_eq!(
        take(&mut events, 4).await,
        ["Init", "InitApply t/a", "InitApply t/b", "InitDone"]
    );
    server.delete(Kind::Service, Some("t"), "a");
    assert_eq!(take(&mut events, 1).await, ["Delete t/a"]);
    assert_eq!(server.list_requests(Kind::Service), 0);
}

#[tokio::test]
async fn endpointslices_and_nodes_are_watched_like_services() {
    let server = ApiServer::start();
    server.apply(&slice("t", "web-1", "web"));
    server.apply(&node("n1"));
    let client = client(&server).await;
    let mut slices = watch(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
    );
    let mut nodes = watch(Api::<Node>::all(client), watcher::Config::default());
    assert_eq!(
        take(&mut slices, 3).await,
        ["Init", "InitApply t/web-1", "InitDone"]
    );
    assert_eq!(
        take(&mut nodes, 3).await,
        ["Init", "InitApply n1", "InitDone"]
    );
    server.apply(&slice("t", "web-2", "web"));
    server.delete(Kind::Node, None, "n1");
    assert_eq!(take(&mut slices, 1).await, ["Apply t/web-2"]);
    assert_eq!(take(&mut nodes, 1).await, ["Delete n1"]);
}

#[tokio::test]
async fn an_unavailable_server_refuses_connections_and_comes_back_on_the_same_port() {
    let server = ApiServer::start();
    server.apply(&service("t", "a", json!({})));
    let api = Api::<Service>::all(client(&server).await);
    // Driven in the background, as kpr drives it: with kube's default
    // backoff, so a refused reconnect is retried rather than spun on.
    let stream = watcher(api.clone(), watcher::Config::default()).default_backoff();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let forwarder = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if tx.send(describe(&event)).is_err() {
                return;
            }
        }
    });
    for want in ["Init", "InitApply t/a", "InitDone"] {
        assert_eq!(next_forwarded(&mut rx).await, want);
    }
    eventually("the watch is open", || server.open_watches() == 1).await;

    server.set_unavailable(true);
    assert_eq!(server.open_watches(), 0);
    let refused = std::net::TcpStream::connect(server.addr()).expect_err("refused");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    api.list(&ListParams::default())
        .await
        .expect_err("list while down");
    server.apply(&service("t", "b", json!({})));

    server.set_unavailable(false);
    assert_eq!(next_forwarded(&mut rx).await, "Apply t/b");
    assert_eq!(
        server.list_requests(Kind::Service),
        1,
        "resumed from its version"
    );
    let listed = api.list(&ListParams::default()).await.expect("list after");
    assert_eq!(names(&listed.items), ["a", "b"]);
    forwarder.abort();
}

/// The next forwarded event that is not an error.
async fn next_forwarded(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    loop {
        let event = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("an event in time")
            .expect("forwarder running");
        if !event.starts_with("Err") {
            return event;
        }
    }
}

/// A bare HTTP/1.1 GET (or other method); returns the status code and the
/// body as JSON.
fn raw_request(server: &ApiServer, method: &str, path: &str) -> (u16, Value) {
    let mut stream = std::net::TcpStream::connect(server.addr()).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read");
    let (head, body) = text.split_once("\r\n\r\n").expect("response head");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn control_api_and_raw_http_work_from_a_plain_test() {
    let server = ApiServer::start();
    let first = server.resource_version();
    let stored: Value = server.apply(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"ports": [{"port": 80}]},
    }));
    assert_eq!(stored["metadata"]["namespace"], "default");
    assert_eq!(
        stored["metadata"]["resourceVersion"],
        (first + 1).to_string()
    );
    let again: Value = server.apply(&stored);
    assert_eq!(again, stored, "an apply that changes nothing is a no-op");
    assert_eq!(server.resource_version(), first + 1);
    let got: Option<Service> = server.get(Kind::Service, Some("default"), "web");
    assert_eq!(
        got.and_then(|s| s.metadata.uid),
        stored["metadata"]["uid"].as_str().map(String::from)
    );

    let (code, list) = raw_request(&server, "GET", "/api/v1/services");
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "ServiceList");
    assert_eq!(list["metadata"]["resourceVersion"], (first + 1).to_string());
    assert_eq!(list["items"][0]["metadata"]["name"], "web");
    assert_eq!(
        list["items"][0].get("kind"),
        None,
        "no type meta on list items, as the apiserver"
    );
    let (code, obj) = raw_request(&server, "GET", "/api/v1/namespaces/default/services/web");
    assert_eq!((code, obj["kind"].as_str()), (200, Some("Service")));
    let (code, status) = raw_request(&server, "GET", "/api/v1/namespaces/default/services/nope");
    assert_eq!((code, status["reason"].as_str()), (404, Some("NotFound")));
    assert_eq!(status["message"], "services \"nope\" not found");
    let (code, status) = raw_request(
        &server,
        "GET",
        "/apis/discovery.k8s.io/v1/namespaces/x/endpointslices/nope",
    );
    assert_eq!(code, 404);
    assert_eq!(
        status["message"],
        "endpointslices.discovery.k8s.io \"nope\" not found"
    );
    assert_eq!(status["details"]["group"], "discovery.k8s.io");
    for path in [
        "/api/v1/pods",
        "/api/v1/namespaces/x/nodes",
        "/api/v1/services/web",
        "/apis",
    ] {
        let (code, status) = raw_request(&server, "GET", path);
        assert_eq!(
            (code, status["kind"].as_str()),
            (404, Some("Status")),
            "{path}"
        );
    }
    let (code, _) = raw_request(&server, "POST", "/api/v1/services");
    assert_eq!(code, 405);
    let (code, status) = raw_request(&server, "GET", "/api/v1/services?labelSelector=a%20in%20(");
    assert_eq!((code, status["code"].as_u64()), (400, Some(400)));
    let (code, status) = raw_request(
        &server,
        "GET",
        "/api/v1/services?resourceVersion=999&resourceVersionMatch=NotOlderThan",
    );
    assert_eq!((code, status["reason"].as_str()), (504, Some("Timeout")));
    assert_eq!(server.list_requests(Kind::Service), 3);

    assert!(server.delete(Kind::Service, Some("default"), "web"));
    assert!(!server.delete(Kind::Service, Some("default"), "web"));
    assert!(server.list::<Service>(Kind::Service).is_empty());
    server.apply(&node("n1"));
    assert_eq!(names(&server.list::<Node>(Kind::Node)), ["n1"]);
    let (code, obj) = raw_request(&server, "GET", "/api/v1/nodes/n1");
    assert_eq!((code, obj["metadata"].get("namespace")), (200, None));
}

/// Sends a raw watch request (keep-alive); returns the connection once the
/// server counts the watch as open.
fn raw_watch(server: &ApiServer, query: &str) -> std::net::TcpStream {
    let open = server.open_watches();
    let mut stream = std::net::TcpStream::connect(server.addr()).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(
        stream,
        "GET /api/v1/services?{query} HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .expect("send");
    let deadline = std::time::Instant::now() + WAIT;
    while server.open_watches() == open {
        assert!(std::time::Instant::now() < deadline, "watch not open");
        std::thread::sleep(Duration::from_millis(2));
    }
    stream
}

#[test]
fn watches_end_with_the_final_chunk_on_timeout_and_without_it_when_dropped() {
    let server = ApiServer::start();
    server.apply(&service("t", "a", json!({})));

    // Keep-alive, as kube-rs connects: the body is chunked and its end is
    // the final chunk, not the end of the connection.
    let mut timed_out = raw_watch(&server, "watch=1&timeoutSeconds=1");
    let mut bytes = Vec::new();
    while !bytes.ends_with(b"\r\n0\r\n\r\n") {
        let mut buf = [0u8; 4096];
        let n = timed_out
            .read(&mut buf)
            .expect("read until the final chunk");
        assert!(
            n > 0,
            "connection closed: {:?}",
            String::from_utf8_lossy(&bytes)
        );
        bytes.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("transfer-encoding: chunked"), "{text}");
    assert!(
        text.contains(r#"{"type":"ADDED","object":{"apiVersion":"v1","kind":"Service""#),
        "{text}"
    );

    let mut dropped = raw_watch(&server, "watch=true");
    server.drop_watches();
    let mut bytes = Vec::new();
    dropped
        .read_to_end(&mut bytes)
        .expect("read until the server cuts");
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains(r#""type":"ADDED""#), "{text}");
    assert!(!text.ends_with("0\r\n\r\n"), "an abrupt end: {text:?}");
    assert_eq!(server.open_watches(), 0);
}

#[test]
fn label_selectors_follow_kubernetes_semantics() {
    let obj = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
    let cases = [
        ("", true),
        ("app", true),
        ("!app", false),
        ("!service.kubernetes.io/service-proxy-name", true),
        ("app=web", true),
        ("app==web", true),
        ("app=db", false),
        ("app!=db", true),
        ("missing!=x", true),
        ("app in (db,web)", true),
        ("app notin (db,web)", false),
        ("missing notin (x)", true),
        ("app=web,tier=front", true),
        ("app=web,tier=back", false),
        ("app in (web, db),!missing", true),
    ];
    for (text, want) in cases {
        let sel = LabelSelector::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(sel.matches(&obj), want, "{text:?}");
    }
}

#[test]
fn malformed_label_selectors_are_refused() {
    for text in ["app in (a", "a b", "app=(x)", "=x", "app in x", "a)"] {
        assert!(LabelSelector::parse(text).is_err(), "{text:?}");
    }
}

#[test]
fn field_selectors_match_name_and_namespace_only() {
    let obj = json!({"metadata": {"name": "a", "namespace": "ns"}});
    let ok = |t: &str| FieldSelector::parse(t).expect(t).matches(&obj);
    assert!(ok("metadata.name=a"));
    assert!(ok("metadata.name==a,metadata.namespace=ns"));
    assert!(!ok("metadata.namespace!=ns"));
    assert!(ok("metadata.name!=b"));
    assert!(FieldSelector::parse("spec.clusterIP=1.2.3.4").is_err());
}
