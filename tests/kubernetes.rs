//! kpr against a Kubernetes API (the project's stand-in, speaking the real
//! list/watch protocol) with the datapath live in network namespaces: every
//! check is real traffic plus `kpr svc list -o json`. Needs root: every
//! test is `#[ignore = "needs root"]` (run them with `--include-ignored`)
//! and fails at once without root.

#[path = "support/apiserver.rs"]
mod apiserver;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use apiserver::{ApiServer, Kind};
use kpr_testbed::require_root;
use kpr_testbed::{BedPlan, ProbeSpec, SocketLbBed};
use serde_json::{json, Value};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");
const NODE: &str = "node-a";

fn service(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "t"}, "spec": spec})
}

fn slice(name: &str, svc: &str, ports: Value, endpoints: Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "t", "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints
    })
}

fn ep(ip: &str) -> Value {
    json!({"addresses": [ip], "nodeName": "node-b"})
}

fn node() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.244.0.1"}]}
    })
}

/// An API server with this node, and a bed whose agent watches it.
fn start(prefix: &str, api: &ApiServer, v4_backends: u16) -> SocketLbBed {
    start_with(prefix, api, v4_backends, &[])
}

/// [`start`] with extra agent arguments.
fn start_with(prefix: &str, api: &ApiServer, v4_backends: u16, args: &[&str]) -> SocketLbBed {
    api.apply(&node());
    let kubeconfig =
        std::env::temp_dir().join(format!("kpr-{prefix}-{}.kubeconfig", std::process::id()));
    api.write_kubeconfig(&kubeconfig).unwrap();
    let plan = BedPlan {
        v4_backends,
        v6_backends: 2,
        kubernetes: Some((kubeconfig, NODE.to_string())),
        agent_args: args.iter().map(|a| a.to_string()).collect(),
        ..BedPlan::default()
    };
    let bed = SocketLbBed::start(prefix, Path::new(KPR), "", &plan);
    // The bed keeps its own copy of the kubeconfig.
    if let Some((kubeconfig, _)) = &plan.kubernetes {
        let _ = std::fs::remove_file(kubeconfig);
    }
    bed.unwrap_or_else(|e| panic!("bed {prefix}: {e}"))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[track_caller]
fn spread(bed: &SocketLbBed, target: &str, count: u32) -> BTreeMap<String, u64> {
    bed.tcp_spread(addr(target), count).unwrap()
}

fn reached(s: &BTreeMap<String, u64>) -> BTreeSet<String> {
    s.keys().cloned().collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Backends of a frontend in `svc list -o json`, as "ip:port".
fn backends_of(json: &Value, frontend: &str) -> Option<BTreeSet<String>> {
    let row = json
        .as_array()?
        .iter()
        .find(|r| r["frontend"] == frontend)?;
    Some(
        row["backends"]
            .as_array()?
            .iter()
            .map(|b| format!("{}:{}", b["address"].as_str().unwrap(), b["port"]))
            .collect(),
    )
}

/// Waits (bounded) until the maps show `want` behind `frontend` (None: absent).
#[track_caller]
fn wait_backends(bed: &SocketLbBed, frontend: &str, want: Option<&[&str]>) {
    let want = want.map(set);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let json = bed.svc_list_json().unwrap();
        if backends_of(&json, frontend) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{frontend}: want {want:?}, maps: {json:#}\nagent log:\n{}",
            bed.agent.log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
#[ignore = "needs root"]
fn services_and_slices_are_followed_through_create_update_and_delete() {
    require_root();
    let api = ApiServer::start();
    let bed = start("kcrud", &api, 4);
    // Named targetPort: the slice port "web" carries 8080.
    api.apply(&service("web", json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": "web"}]})));
    api.apply(&slice(
        "web-a",
        "web",
        json!([{"name": "http", "port": 8080}]),
        json!([ep("10.244.0.11"), ep("10.244.0.12")]),
    ));
    wait_backends(
        &bed,
        "10.96.0.10:80/TCP",
        Some(&["10.244.0.11:8080", "10.244.0.12:8080"]),
    );
    assert_eq!(
        reached(&spread(&bed, "10.96.0.10:80", 60)),
        set(&["10.244.0.11:8080", "10.244.0.12:8080"])
    );

    // A second slice for the same service adds its endpoints.
    api.apply(&slice(
        "web-b",
        "web",
        json!([{"name": "http", "port": 8080}]),
        json!([ep("10.244.0.13")]),
    ));
    wait_backends(
        &bed,
        "10.96.0.10:80/TCP",
        Some(&["10.244.0.11:8080", "10.244.0.12:8080", "10.244.0.13:8080"]),
    );
    assert_eq!(reached(&spread(&bed, "10.96.0.10:80", 90)).len(), 3);

    // Update: an endpoint leaves one slice.
    api.apply(&slice(
        "web-a",
        "web",
        json!([{"name": "http", "port": 8080}]),
        json!([ep("10.244.0.11")]),
    ));
    wait_backends(
        &bed,
        "10.96.0.10:80/TCP",
        Some(&["10.244.0.11:8080", "10.244.0.13:8080"]),
    );
    assert_eq!(
        reached(&spread(&bed, "10.96.0.10:80", 60)),
        set(&["10.244.0.11:8080", "10.244.0.13:8080"])
    );

    // The service moves to another port.
    api.apply(&service("web", json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 81, "targetPort": "web"}]})));
    wait_backends(&bed, "10.96.0.10:80/TCP", None);
    wait_backends(
        &bed,
        "10.96.0.10:81/TCP",
        Some(&["10.244.0.11:8080", "10.244.0.13:8080"]),
    );

    // Delete: the frontend and its backends go.
    api.delete(Kind::Service, Some("t"), "web");
    wait_backends(&bed, "10.96.0.10:81/TCP", None);
    let json = bed.svc_list_json().unwrap();
    assert_eq!(json.as_array().unwrap().len(), 0, "{json:#}");
}

#[test]
#[ignore = "needs root"]
fn kube_proxy_semantics_on_live_traffic() {
    require_root();
    let api = ApiServer::start();
    let bed = start("ksem", &api, 4);
    // Terminating fallback: no ready endpoint, one serving+terminating.
    api.apply(&service(
        "drain",
        json!({"clusterIP": "10.96.0.20", "ports": [{"port": 80, "targetPort": 8080}]}),
    ));
    api.apply(&slice("drain-a", "drain", json!([{"port": 8080}]), json!([
        {"addresses": ["10.244.0.11"], "conditions": {"ready": false, "serving": true, "terminating": true}},
        {"addresses": ["10.244.0.12"], "conditions": {"ready": false, "serving": false, "terminating": true}}
    ])));
    // internalTrafficPolicy Local: only this node's endpoint.
    api.apply(&service("local", json!({"clusterIP": "10.96.0.21", "internalTrafficPolicy": "Local", "ports": [{"port": 80, "targetPort": 8080}]})));
    api.apply(&slice("local-a", "local", json!([{"port": 8080}]), json!([
        {"addresses": ["10.244.0.13"], "nodeName": NODE}, {"addresses": ["10.244.0.14"], "nodeName": "node-b"}
    ])));
    // ITP Local without a local endpoint: connects fail.
    api.apply(&service("nolocal", json!({"clusterIP": "10.96.0.22", "internalTrafficPolicy": "Local", "ports": [{"port": 80, "targetPort": 8080}]})));
    api.apply(&slice(
        "nolocal-a",
        "nolocal",
        json!([{"port": 8080}]),
        json!([ep("10.244.0.14")]),
    ));
    // Skipped: another proxy's service, and a headless-labelled slice.
    let mut other = service(
        "other-proxy",
        json!({"clusterIP": "10.96.0.23", "ports": [{"port": 80, "targetPort": 8080}]}),
    );
    other["metadata"]["labels"] =
        json!({"service.kubernetes.io/service-proxy-name": "someone-else"});
    api.apply(&other);
    api.apply(&service(
        "hl",
        json!({"clusterIP": "10.96.0.24", "ports": [{"port": 80, "targetPort": 8080}]}),
    ));
    let mut hl = slice(
        "hl-a",
        "hl",
        json!([{"port": 8080}]),
        json!([ep("10.244.0.11")]),
    );
    hl["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    api.apply(&hl);
    // Dual-stack.
    api.apply(&service("ds", json!({"clusterIP": "10.96.0.25", "clusterIPs": ["10.96.0.25", "fd00:10:96::25"], "ports": [{"port": 80, "targetPort": 8080}]})));
    api.apply(&slice(
        "ds-4",
        "ds",
        json!([{"port": 8080}]),
        json!([ep("10.244.0.12")]),
    ));
    let mut ds6 = slice(
        "ds-6",
        "ds",
        json!([{"port": 8080}]),
        json!([{"addresses": ["fd00:10:244::11"]}]),
    );
    ds6["addressType"] = json!("IPv6");
    api.apply(&ds6);
    // NodePort: node-local access through the node IP and 127.0.0.1.
    api.apply(&service("np", json!({"type": "NodePort", "clusterIP": "10.96.0.26", "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}]})));
    api.apply(&slice(
        "np-a",
        "np",
        json!([{"port": 8080}]),
        json!([ep("10.244.0.13")]),
    ));

    wait_backends(
        &bed,
        "[fd00:10:96::25]:80/TCP",
        Some(&["fd00:10:244::11:8080"]),
    );
    wait_backends(&bed, "127.0.0.1:30080/TCP", Some(&["10.244.0.13:8080"]));
    let json = bed.svc_list_json().unwrap();
    assert_eq!(
        backends_of(&json, "10.96.0.20:80/TCP"),
        Some(set(&["10.244.0.11:8080"])),
        "terminating fallback"
    );
    assert_eq!(
        json.as_array()
            .unwrap()
            .iter()
            .find(|r| r["frontend"] == "10.96.0.20:80/TCP")
            .unwrap()["backends"][0]["state"],
        "terminating"
    );
    assert_eq!(
        backends_of(&json, "10.96.0.21:80/TCP"),
        Some(set(&["10.244.0.13:8080"])),
        "ITP Local"
    );
    assert_eq!(
        backends_of(&json, "10.96.0.22:80/TCP"),
        Some(BTreeSet::new()),
        "ITP Local, none local"
    );
    assert_eq!(
        backends_of(&json, "10.96.0.23:80/TCP"),
        None,
        "service-proxy-name must be skipped"
    );
    assert_eq!(
        backends_of(&json, "10.96.0.24:80/TCP"),
        Some(BTreeSet::new()),
        "a headless-labelled slice is ignored"
    );
    assert_eq!(
        backends_of(&json, "10.244.0.1:30080/TCP"),
        Some(set(&["10.244.0.13:8080"])),
        "NodePort on the node IP"
    );

    assert_eq!(
        reached(&spread(&bed, "10.96.0.20:80", 10)),
        set(&["10.244.0.11:8080"])
    );
    assert_eq!(
        reached(&spread(&bed, "10.96.0.21:80", 20)),
        set(&["10.244.0.13:8080"])
    );
    let r = bed
        .probe(
            &ProbeSpec::TcpConnectError {
                target: addr("10.96.0.22:80"),
                timeout_ms: 2000,
            },
            true,
        )
        .unwrap();
    assert_eq!(
        r.as_connect().unwrap().error.as_deref(),
        Some("ECONNREFUSED")
    );
    assert_eq!(
        reached(&spread(&bed, "[fd00:10:96::25]:80", 10)),
        set(&["[fd00:10:244::11]:8080"])
    );
    assert_eq!(
        reached(&spread(&bed, "10.96.0.25:80", 10)),
        set(&["10.244.0.12:8080"])
    );
    assert_eq!(
        reached(&spread(&bed, "10.244.0.1:30080", 10)),
        set(&["10.244.0.13:8080"])
    );
    // 127.0.0.1:30080 from the client namespace: translated before routing.
    assert_eq!(
        reached(&spread(&bed, "127.0.0.1:30080", 10)),
        set(&["10.244.0.13:8080"])
    );
    let no_local = bed
        .agent
        .metric_value(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "traffic_policy=\"internal\"",
        )
        .unwrap();
    assert_eq!(no_local, Some(1.0));
}

#[test]
#[ignore = "needs root"]
fn session_affinity_from_the_api_holds_and_lapses() {
    require_root();
    let api = ApiServer::start();
    let bed = start("kaff", &api, 3);
    api.apply(&service("sticky", json!({"clusterIP": "10.96.0.30", "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 1}}, "ports": [{"port": 80, "targetPort": 8080}]})));
    api.apply(&slice(
        "sticky-a",
        "sticky",
        json!([{"port": 8080}]),
        json!([ep("10.244.0.11"), ep("10.244.0.12"), ep("10.244.0.13")]),
    ));
    wait_backends(
        &bed,
        "10.96.0.30:80/TCP",
        Some(&["10.244.0.11:8080", "10.244.0.12:8080", "10.244.0.13:8080"]),
    );
    let first = reached(&spread(&bed, "10.96.0.30:80", 50));
    assert_eq!(first.len(), 1, "affinity must hold within its timeout");
    assert_eq!(
        reached(&spread(&bed, "10.96.0.30:80", 10)),
        first,
        "affinity must hold across connections"
    );
    // Once lapsed, each pick is random over 3 backends: up to 16 picks
    // (all equal by chance: 3^-15), stopping at the first change.
    let mut picks = BTreeSet::new();
    for _ in 0..16 {
        picks.extend(reached(&spread(&bed, "10.96.0.30:80", 1)));
        if picks.len() > 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1500));
    }
    assert!(picks.len() > 1, "affinity never lapsed: {picks:?}");
}

#[test]
#[ignore = "needs root"]
fn dropped_watches_and_410_gone_relist_and_apply_deletions_made_while_disconnected() {
    require_root();
    let api = ApiServer::start();
    let bed = start("kgone", &api, 4);
    api.apply(&service(
        "keep",
        json!({"clusterIP": "10.96.0.40", "ports": [{"port": 80, "targetPort": 8080}]}),
    ));
    api.apply(&slice(
        "keep-a",
        "keep",
        json!([{"port": 8080}]),
        json!([ep("10.244.0.11")]),
    ));
    api.apply(&service(
        "gone",
        json!({"clusterIP": "10.96.0.41", "ports": [{"port": 80, "targetPort": 8080}]}),
    ));
    api.apply(&slice(
        "gone-a",
        "gone",
        json!([{"port": 8080}]),
        json!([ep("10.244.0.12")]),
    ));
    api.apply(&service(
        "shrink",
        json!({"clusterIP": "10.96.0.42", "ports": [{"port": 80, "targetPort": 8080}]}),
    ));
    api.apply(&slice(
        "shrink-a",
        "shrink",
        json!([{"port": 8080}]),
        json!([ep("10.244.0.13"), ep("10.244.0.14")]),
    ));
    wait_backends(
        &bed,
        "10.96.0.42:80/TCP",
        Some(&["10.244.0.13:8080", "10.244.0.14:8080"]),
    );

    // A watch dropped mid-stream: the agent resumes and follows.
    api.drop_watches();
    api.apply(&slice(
        "keep-a",
        "keep",
        json!([{"port": 8080}]),
        json!([ep("10.244.0.11"), ep("10.244.0.12")]),
    ));
    wait_backends(
        &bed,
        "10.96.0.40:80/TCP",
        Some(&["10.244.0.11:8080", "10.244.0.12:8080"]),
    );

    // The API becomes unreachable; meanwhile objects are deleted and the
    // history compacted, so the agent's resume gets 410 Gone and must relist.
    let lists_before = api.list_requests(Kind::Service);
    api.set_unavailable(true);
    api.delete(Kind::Service, Some("t"), "gone");
    api.delete(Kind::EndpointSlice, Some("t"), "gone-a");
    api.apply(&slice(
        "shrink-a",
        "shrink",
        json!([{"port": 8080}]),
        json!([ep("10.244.0.13")]),
    ));
    api.compact();
    // Unaffected services keep flowing while the API is away.
    assert_eq!(
        reached(&spread(&bed, "10.96.0.40:80", 20)),
        set(&["10.244.0.11:8080", "10.244.0.12:8080"])
    );
    api.set_unavailable(false);
    wait_backends(&bed, "10.96.0.41:80/TCP", None);
    wait_backends(&bed, "10.96.0.42:80/TCP", Some(&["10.244.0.13:8080"]));
    assert!(
        api.list_requests(Kind::Service) > lists_before,
        "no relist happened"
    );
    let json = bed.svc_list_json().unwrap();
    assert!(
        !json.to_string().contains("10.244.0.12:8080")
            || backends_of(&json, "10.96.0.40:80/TCP")
                .unwrap()
                .contains("10.244.0.12:8080")
    );
    assert_eq!(
        json.as_array().unwrap().len(),
        2,
        "stale frontends remain: {json:#}"
    );
    let relists = bed
        .agent
        .metric_value("kpr_relists_total", "kind=\"service\"")
        .unwrap();
    assert!(
        relists.is_some_and(|v| v >= 1.0),
        "kpr_relists_total{{kind=service}} = {relists:?}"
    );
    assert_eq!(
        reached(&spread(&bed, "10.96.0.42:80", 20)),
        set(&["10.244.0.13:8080"])
    );
}

#[test]
#[ignore = "needs root"]
fn a_restart_while_the_api_is_unreachable_keeps_the_pinned_state_until_it_returns() {
    require_root();
    let api = ApiServer::start();
    let mut bed = start("kdown", &api, 3);
    api.apply(&service(
        "web",
        json!({"clusterIP": "10.96.0.50", "ports": [{"port": 80, "targetPort": 8080}]}),
    ));
    api.apply(&slice(
        "web-a",
        "web",
        json!([{"port": 8080}]),
        json!([ep("10.244.0.11"), ep("10.244.0.12")]),
    ));
    wait_backends(
        &bed,
        "10.96.0.50:80/TCP",
        Some(&["10.244.0.11:8080", "10.244.0.12:8080"]),
    );
    // The agent writes its record of names right after the maps: wait for
    // it too, so `before` is the listing as it stays.
    let deadline = Instant::now() + Duration::from_secs(10);
    let before = loop {
        let table = bed.svc_list().unwrap();
        if table.contains("t/web") || Instant::now() > deadline {
            break table;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        before.contains("t/web"),
        "no Service name in
{before}"
    );

    api.set_unavailable(true);
    bed.agent.restart().unwrap();
    // The new agent cannot list anything: it must not prune, and traffic flows.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(bed.svc_list().unwrap(), before);
    assert_eq!(
        reached(&spread(&bed, "10.96.0.50:80", 40)),
        set(&["10.244.0.11:8080", "10.244.0.12:8080"])
    );
    let (status, _) = kpr_testbed::agent::http_get(bed.agent.healthz_addr, "/healthz").unwrap();
    assert_eq!(status, 503, "healthy before any sync with the API");

    // The API returns with a change: the agent converges on it.
    api.apply(&slice(
        "web-a",
        "web",
        json!([{"port": 8080}]),
        json!([ep("10.244.0.13")]),
    ));
    api.set_unavailable(false);
    bed.agent.wait_healthy(Duration::from_secs(30)).unwrap();
    wait_backends(&bed, "10.96.0.50:80/TCP", Some(&["10.244.0.13:8080"]));
    assert_eq!(
        reached(&spread(&bed, "10.96.0.50:80", 20)),
        set(&["10.244.0.13:8080"])
    );
}

/// `/healthz`'s status and its `nodeEligible`, once they are `want`
/// (bounded wait).
#[track_caller]
fn wait_healthz(bed: &SocketLbBed, want: (u16, bool)) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) =
            kpr_testbed::agent::http_get(bed.agent.healthz_addr, "/healthz").unwrap();
        let body: Value = serde_json::from_str(&body).unwrap();
        let got = (status, body["nodeEligible"].as_bool().unwrap());
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz: want {want:?}, got {got:?} {body}\nagent log:\n{}",
            bed.agent.log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
#[ignore = "needs root"]
fn healthz_is_503_while_the_node_is_tainted_for_removal_or_being_deleted() {
    require_root();
    let api = ApiServer::start();
    let mut bed = start("kelig", &api, 1);
    bed.agent.wait_healthy(Duration::from_secs(30)).unwrap();
    wait_healthz(&bed, (200, true));

    // KEP-3836: the Cluster Autoscaler's taint before it deletes the node.
    let mut tainted = node();
    tainted["spec"] = json!({"taints": [
        {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}
    ]});
    api.apply(&tainted);
    wait_healthz(&bed, (503, false));
    let (livez, _) = kpr_testbed::agent::http_get(bed.agent.healthz_addr, "/livez").unwrap();
    assert_eq!(livez, 200, "the agent itself is alive");

    api.apply(&node());
    wait_healthz(&bed, (200, true));

    let mut deleting = node();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    api.apply(&deleting);
    wait_healthz(&bed, (503, false));

    let metrics = bed.agent.metrics().unwrap();
    let answered = |code: &str| {
        bed.agent
            .metric_value("kubeproxy_proxy_healthz_total", &format!("code=\"{code}\""))
            .unwrap()
            .unwrap_or_else(|| panic!("no healthz {code} counter in\n{metrics}"))
    };
    assert!(
        answered("200") >= 2.0 && answered("503") >= 2.0,
        "{metrics}"
    );
}

#[test]
#[ignore = "needs root"]
fn kube_proxys_queue_and_sync_scope_metrics_follow_changes() {
    require_root();
    let api = ApiServer::start();
    let bed = start("kqueue", &api, 2);
    let metric = |name: &str| {
        bed.agent
            .metric_value(name, "")
            .unwrap()
            .unwrap_or_else(|| panic!("no {name} in\n{}", bed.agent.metrics().unwrap()))
    };
    api.apply(&service(
        "web",
        json!({"clusterIP": "10.96.0.60", "ports": [{"port": 80, "targetPort": 8080}]}),
    ));
    api.apply(&slice(
        "web-a",
        "web",
        json!([{"port": 8080}]),
        json!([ep("10.244.0.11")]),
    ));
    wait_backends(&bed, "10.96.0.60:80/TCP", Some(&["10.244.0.11:8080"]));
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let partial_before = metric("kubeproxy_sync_partial_proxy_rules_duration_seconds_count");

    api.apply(&slice(
        "web-a",
        "web",
        json!([{"port": 8080}]),
        json!([ep("10.244.0.11"), ep("10.244.0.12")]),
    ));
    wait_backends(
        &bed,
        "10.96.0.60:80/TCP",
        Some(&["10.244.0.11:8080", "10.244.0.12:8080"]),
    );

    assert!(metric("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds") >= before - 1.0);
    assert!(metric("kubeproxy_sync_partial_proxy_rules_duration_seconds_count") > partial_before);
    assert!(metric("kubeproxy_sync_full_proxy_rules_duration_seconds_count") >= 1.0);
    assert_eq!(
        metric("kubeproxy_sync_proxy_rules_endpoint_changes_pending"),
        0.0
    );
    assert_eq!(
        metric("kubeproxy_sync_proxy_rules_service_changes_pending"),
        0.0
    );
}

/// p-quantile upper bound (seconds) from an OpenMetrics histogram's buckets.
fn histogram_quantile(metrics: &str, name: &str, q: f64) -> Option<f64> {
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{name}_bucket{{le=\"")))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.split_whitespace().next()?.parse().ok()?))
        })
        .collect();
    let total = buckets.last()?.1;
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}

#[test]
#[ignore = "needs root"]
fn network_programming_latency_with_1000_services() {
    require_root();
    let api = ApiServer::start();
    for i in 0..1000 {
        let name = format!("s{i}");
        api.apply(&service(&name, json!({"clusterIP": format!("10.97.{}.{}", i / 250, i % 250 + 1), "ports": [{"port": 80, "targetPort": 8080}]})));
        api.apply(&slice(
            &format!("{name}-a"),
            &name,
            json!([{"port": 8080}]),
            json!([ep("10.244.0.11"), ep("10.244.0.12")]),
        ));
    }
    let bed = start("klat", &api, 3);
    wait_backends(
        &bed,
        "10.97.3.250:80/TCP",
        Some(&["10.244.0.11:8080", "10.244.0.12:8080"]),
    );
    let count_of = |bed: &SocketLbBed| {
        bed.agent
            .metric_value("kubeproxy_network_programming_duration_seconds_count", "")
            .unwrap()
            .unwrap_or(0.0)
    };
    let changes = 200;
    let started = Instant::now();
    for n in 0..changes {
        let i = (n * 37) % 1000;
        let name = format!("s{i}");
        let mut s = slice(
            &format!("{name}-a"),
            &name,
            json!([{"port": 8080}]),
            json!([
                ep("10.244.0.11"),
                ep(if n % 2 == 0 {
                    "10.244.0.13"
                } else {
                    "10.244.0.12"
                })
            ]),
        );
        s["metadata"]["annotations"] = json!({"endpoints.kubernetes.io/last-change-trigger-time": k8s_openapi::jiff::Timestamp::now().to_string()});
        let before = count_of(&bed);
        api.apply(&s);
        let deadline = Instant::now() + Duration::from_secs(10);
        while count_of(&bed) <= before {
            assert!(
                Instant::now() < deadline,
                "change {n} not programmed; log:\n{}",
                bed.agent.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let metrics = bed.agent.metrics().unwrap();
    let p50 = histogram_quantile(
        &metrics,
        "kubeproxy_network_programming_duration_seconds",
        0.5,
    )
    .unwrap();
    let p99 = histogram_quantile(
        &metrics,
        "kubeproxy_network_programming_duration_seconds",
        0.99,
    )
    .unwrap();
    let sum = bed
        .agent
        .metric_value("kubeproxy_network_programming_duration_seconds_sum", "")
        .unwrap()
        .unwrap();
    let count = count_of(&bed);
    println!(
        "network programming latency, 1000 services, {changes} EndpointSlice changes in {:?}: p50 <= {} ms, p99 <= {} ms (bucket bounds), mean {:.2} ms",
        started.elapsed(),
        p50 * 1000.0,
        p99 * 1000.0,
        1000.0 * sum / count
    );
    // Target p99 <= 50 ms; asserted with room for this VM's pauses.
    assert!(p99 <= 0.5, "p99 {p99} s");
}

/// `kpr status` against the bed's agent: (exit code, stdout).
fn kpr_status(bed: &SocketLbBed, extra: &[&str]) -> (i32, String) {
    let root = bed.agent.bpf_root.to_str().unwrap().to_string();
    let addr = bed.agent.metrics_addr.to_string();
    let mut args = vec!["status", "--bpf-root", &root, "--metrics-addr", &addr];
    args.extend_from_slice(extra);
    let out = std::process::Command::new(KPR)
        .args(&args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `kpr_services_unprogrammed{reason}` of the bed's agent.
fn unprogrammed(bed: &SocketLbBed, reason: &str) -> f64 {
    bed.agent
        .metric_value("kpr_services_unprogrammed", &format!("reason=\"{reason}\""))
        .unwrap()
        .unwrap_or(-1.0)
}

/// Waits (bounded) until `check` holds.
#[track_caller]
fn wait_until(what: &str, bed: &SocketLbBed, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what}; agent log:\n{}",
            bed.agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The Events the stand-in recorded about Service t/`name`.
fn events_about(api: &ApiServer, name: &str) -> Vec<Value> {
    api.events()
        .into_iter()
        .filter(|e| e["regarding"]["kind"] == "Service" && e["regarding"]["name"] == name)
        .collect()
}

#[test]
#[ignore = "needs root"]
fn an_unprogrammable_service_shows_in_the_gauge_in_status_and_as_one_event() {
    require_root();
    let api = ApiServer::start();
    // Full syncs every second: a refused Service is retried (and would be
    // re-announced, were Events not deduplicated) on each.
    let bed = start_with("kunprog", &api, 2, &["--sync-period", "1s"]);
    api.apply(&service(
        "first",
        json!({"clusterIP": "10.96.0.30", "ports": [{"port": 80, "targetPort": 8080}]}),
    ));
    api.apply(&slice(
        "first-a",
        "first",
        json!([{"port": 8080}]),
        json!([ep("10.244.0.11")]),
    ));
    wait_backends(&bed, "10.96.0.30:80/TCP", Some(&["10.244.0.11:8080"]));
    // Refused by the maps: its frontend is the first one's.
    api.apply(&service(
        "second",
        json!({"clusterIP": "10.96.0.30", "ports": [{"port": 80, "targetPort": 9090}]}),
    ));
    // Refused by translation: kpr balances no SCTP, and the Service has
    // nothing else.
    api.apply(&service(
        "sctp",
        json!({"clusterIP": "10.96.0.31", "ports": [{"port": 80, "protocol": "SCTP"}]}),
    ));

    wait_until("the gauge counts both", &bed, || {
        unprogrammed(&bed, "frontend_conflict") == 1.0 && unprogrammed(&bed, "invalid") == 1.0
    });
    assert_eq!(unprogrammed(&bed, "capacity"), 0.0);

    let (code, text) = kpr_status(&bed, &[]);
    assert_eq!(
        code, 1,
        "kpr status must fail with unprogrammed Services:\n{text}"
    );
    assert!(
        text.contains("  Unprogrammed:         2 Services NOT programmed\n"),
        "{text}"
    );
    assert!(
        text.contains("    t/second (frontend_conflict): service t/second: frontend 10.96.0.30:80/TCP is already programmed for service t/first"),
        "{text}"
    );
    assert!(text.contains("    t/sctp (invalid): "), "{text}");
    let (code, json) = kpr_status(&bed, &["-o", "json"]);
    assert_eq!(code, 1);
    let json: Value = serde_json::from_str(&json).unwrap();
    let listed: Vec<(String, String)> = json["agent"]["unprogrammed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            assert!(!u["message"].as_str().unwrap().is_empty(), "{u}");
            (
                u["service"].as_str().unwrap().into(),
                u["reason"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("t/sctp".to_string(), "invalid".to_string()),
            ("t/second".to_string(), "frontend_conflict".to_string()),
        ]
    );

    // One Warning Event each, against the Service by uid...
    wait_until("an Event on each", &bed, || {
        !events_about(&api, "second").is_empty() && !events_about(&api, "sctp").is_empty()
    });
    let uid = api
        .get::<Value>(Kind::Service, Some("t"), "second")
        .unwrap()["metadata"]["uid"]
        .clone();
    let event = &events_about(&api, "second")[0];
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "ServiceNotProgrammed");
    assert_eq!(event["metadata"]["namespace"], "t");
    assert_eq!(event["regarding"]["uid"], uid);
    assert!(
        event["note"].as_str().unwrap().contains("t/first"),
        "{event}"
    );
    // ...and not one per sync: several full syncs later, still one.
    let syncs = || {
        bed.agent
            .metric_value("kpr_syncs_total", "result=\"success\"")
            .unwrap()
            .unwrap_or(0.0)
    };
    let before = syncs();
    wait_until("three more syncs", &bed, || syncs() >= before + 3.0);
    assert_eq!(events_about(&api, "second").len(), 1, "{:#?}", api.events());
    assert_eq!(events_about(&api, "sctp").len(), 1, "{:#?}", api.events());
    // /healthz keeps kube-proxy's meaning: one Service does not fail the node.
    let (health, _) = kpr_testbed::agent::http_get(bed.agent.healthz_addr, "/healthz").unwrap();
    assert_eq!(health, 200);

    // The conflict goes: the second Service is programmed, the gauge drops.
    api.delete(Kind::Service, Some("t"), "first");
    api.delete(Kind::Service, Some("t"), "sctp");
    wait_until("the gauge back at zero", &bed, || {
        unprogrammed(&bed, "frontend_conflict") == 0.0 && unprogrammed(&bed, "invalid") == 0.0
    });
    let (code, text) = kpr_status(&bed, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("Unprogrammed"), "{text}");
}
