//! Datapath lifecycle: `kpr cleanup` removes every attachment and pin, and
//! maps of an older layout version are dropped when a new agent takes over.
//! Needs root: every test is `#[ignore = "needs root"]` (run them with
//! `--include-ignored`) and fails at once without root.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kpr_testbed::bed::UNTRANSLATED;
use kpr_testbed::require_root;
use kpr_testbed::{BedPlan, ProbeSpec, SocketLbBed};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");

const MANIFEST: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: t}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: t, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.0.11]}]
"#;

fn bed(prefix: &str) -> SocketLbBed {
    let plan = BedPlan {
        v4_backends: 1,
        v6_backends: 0,
        untranslated_vips: vec!["10.96.0.10:80".parse().unwrap()],
        ..BedPlan::default()
    };
    SocketLbBed::start(prefix, Path::new(KPR), MANIFEST, &plan).unwrap()
}

/// Who answers a TCP request to the VIP from inside the cgroup.
fn vip_answer(bed: &SocketLbBed) -> String {
    let target: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let r = bed
        .probe(
            &ProbeSpec::TcpRequests {
                target,
                count: 1,
                timeout_ms: 2000,
            },
            true,
        )
        .unwrap();
    let r = r.as_requests().unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    r.identities.keys().next().unwrap().clone()
}

fn kpr(args: &[&str]) -> String {
    let out = Command::new(KPR).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "kpr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// kpr programs (name `kpr_*`) linked to `cgroup`, pinned or not, as the
/// kernel lists its links: what `bpftool cgroup show` would print.
fn kpr_links_on(cgroup: &Path) -> Vec<String> {
    use libbpf_rs::query::{LinkInfoIter, LinkTypeInfo, ProgInfoIter};
    use std::os::unix::fs::MetadataExt;
    let cgroup_id = std::fs::metadata(cgroup).unwrap().ino();
    let kpr_progs: std::collections::HashMap<u32, String> = ProgInfoIter::default()
        .filter(|p| p.name.to_string_lossy().starts_with("kpr_"))
        .map(|p| (p.id, p.name.to_string_lossy().into_owned()))
        .collect();
    LinkInfoIter::default()
        .filter(|l| matches!(&l.info, LinkTypeInfo::Cgroup(c) if c.cgroup_id == cgroup_id))
        .filter_map(|l| kpr_progs.get(&l.prog_id).cloned())
        .collect()
}

#[test]
#[ignore = "needs root"]
fn cleanup_detaches_every_program_and_removes_every_pin() {
    require_root();
    let mut bed = bed("clean");
    assert_eq!(vip_answer(&bed), "10.244.0.11:8080");
    bed.agent.stop().unwrap();
    assert_eq!(
        vip_answer(&bed),
        "10.244.0.11:8080",
        "a stopped agent leaves the datapath in place"
    );

    assert_eq!(kpr_links_on(bed.cgroup.path()).len(), 11);

    // What the uninstall DaemonSet (docs/kpr-cleanup.yaml) runs on a node.
    let root = bed.agent.bpf_root.to_str().unwrap().to_string();
    let cgroup = bed.cgroup.path().to_str().unwrap().to_string();
    let out = kpr(&["cleanup", "--bpf-root", &root, "--cgroup", &cgroup]);
    assert!(out.contains("detached 11 program links"), "{out}");
    assert!(!Path::new(&root).exists(), "bpf root {root} still exists");
    assert!(kpr::datapath::loader::attached_hooks(Path::new(&root)).is_empty());
    assert_eq!(
        kpr_links_on(bed.cgroup.path()),
        Vec::<String>::new(),
        "kpr programs still linked to the cgroup"
    );
    assert_eq!(
        vip_answer(&bed),
        UNTRANSLATED,
        "translation goes on after cleanup"
    );
    // Idempotent.
    assert!(kpr(&["cleanup", "--bpf-root", &root]).contains("detached 0 program links"));
}

#[test]
#[ignore = "needs root"]
fn cleanup_with_a_cgroup_detaches_kpr_programs_pinned_elsewhere() {
    require_root();
    let bed = bed("cgclean");
    let elsewhere = tempfile::tempdir().unwrap();
    let other_root = elsewhere.path().join("bpf");
    let out = kpr(&[
        "cleanup",
        "--bpf-root",
        other_root.to_str().unwrap(),
        "--cgroup",
        bed.cgroup.path().to_str().unwrap(),
    ]);
    assert!(out.contains("detached 11 program links"), "{out}");
    assert_eq!(vip_answer(&bed), UNTRANSLATED);
    assert_eq!(kpr_links_on(bed.cgroup.path()), Vec::<String>::new());
}

#[test]
#[ignore = "needs root"]
fn maps_of_an_older_layout_version_are_removed_when_a_new_agent_takes_over() {
    require_root();
    use libbpf_rs::{MapHandle, MapType};
    let mut bed = bed("layout");
    bed.agent.stop().unwrap();
    // What an older kpr would have left: a services map of layout v0.
    let old = bed.agent.bpf_root.join("kpr_svc_v0");
    let opts = libbpf_sys::bpf_map_create_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
        ..Default::default()
    };
    let mut map = MapHandle::create(MapType::Hash, Some("kpr_svc_v0"), 16, 16, 16, &opts).unwrap();
    map.pin(&old).unwrap();
    drop(map);
    bed.agent.restart().unwrap();
    bed.agent
        .wait_healthy(std::time::Duration::from_secs(30))
        .unwrap();
    assert!(!old.exists(), "the v0 map is still pinned");
    assert!(
        bed.agent
            .log()
            .contains("removed map of an older layout version"),
        "{}",
        bed.agent.log()
    );
    assert_eq!(vip_answer(&bed), "10.244.0.11:8080");
}

/// Polls `f` every 100 ms for up to `within`; true once it holds.
fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

/// `GET /healthz` of the bed's agent: its status, 0 when nothing answered.
fn healthz(bed: &SocketLbBed) -> u16 {
    kpr::http::blocking_get(bed.agent.healthz_addr, "/healthz").map_or(0, |(s, _)| s)
}

#[test]
#[ignore = "needs root"]
fn a_forced_cleanup_under_a_running_agent_is_restored_within_seconds() {
    require_root();
    let bed = bed("restore");
    assert_eq!(vip_answer(&bed), "10.244.0.11:8080");
    let root = bed.agent.bpf_root.to_str().unwrap().to_string();

    let out = kpr(&["cleanup", "--force", "--bpf-root", &root]);
    assert!(out.contains("detached 11 program links"), "{out}");
    let cleaned = Instant::now();

    // Within a few seconds the agent has its pins back and translates.
    assert!(
        eventually(Duration::from_secs(8), || Path::new(&root)
            .join("links/sock_connect4")
            .exists()),
        "the links were not pinned again:\n{}",
        bed.agent.log()
    );
    assert_eq!(vip_answer(&bed), "10.244.0.11:8080");
    let restored = cleaned.elapsed();
    assert!(restored < Duration::from_secs(8), "{restored:?}");
    assert_eq!(
        kpr_links_on(bed.cgroup.path()).len(),
        11,
        "one link per hook, no more"
    );
    let list = kpr(&["svc", "list", "--bpf-root", &root]);
    assert!(list.contains("10.96.0.10:80/TCP"), "{list}");
    assert_eq!(healthz(&bed), 200);
    assert!(
        bed.agent
            .log()
            .contains("pins removed under the agent: restored"),
        "{}",
        bed.agent.log()
    );
    // The restored root is held again: cleanup is refused as before.
    let refused = Command::new(KPR)
        .args(["cleanup", "--bpf-root", &root])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "cleanup was not refused");
}

#[test]
#[ignore = "needs root"]
fn a_pin_replaced_under_a_running_agent_turns_it_unhealthy_with_the_reason() {
    require_root();
    use libbpf_rs::{MapHandle, MapType};
    let bed = bed("replaced");
    assert_eq!(healthz(&bed), 200);
    let pin = bed.agent.bpf_root.join("kpr_svc_v1");
    std::fs::remove_file(&pin).unwrap();
    let opts = libbpf_sys::bpf_map_create_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
        ..Default::default()
    };
    let mut foreign = MapHandle::create(MapType::Hash, Some("foreign"), 16, 16, 16, &opts).unwrap();
    foreign.pin(&pin).unwrap();

    assert!(
        eventually(Duration::from_secs(6), || healthz(&bed) == 503),
        "still healthy with a foreign services map:\n{}",
        bed.agent.log()
    );
    let status = bed.agent.status_json().unwrap();
    let reason = status["watchers"]["pins"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("pin kpr_svc_v1 replaced"), "{status}");
    assert_eq!(
        vip_answer(&bed),
        "10.244.0.11:8080",
        "the programs keep the agent's map"
    );

    // The foreign pin goes: the agent's map is pinned again, health back.
    std::fs::remove_file(&pin).unwrap();
    assert!(
        eventually(Duration::from_secs(6), || healthz(&bed) == 200),
        "not healthy again:\n{}",
        bed.agent.log()
    );
    let list = kpr(&[
        "svc",
        "list",
        "--bpf-root",
        bed.agent.bpf_root.to_str().unwrap(),
    ]);
    assert!(list.contains("10.96.0.10:80/TCP"), "{list}");
}

/// The agent comes last: bindings drop in reverse order, so the agent's
/// cleanup (which unmounts the bpffs it made) runs before the directory
/// holding that mount is removed, not after it was emptied under the mount.
fn agent_with_missing_feature(
    prefix: &str,
    mode: &str,
    missing: &str,
) -> (
    tempfile::TempDir,
    kpr_testbed::TestCgroup,
    kpr_testbed::AgentProcess,
) {
    let cgroup = kpr_testbed::TestCgroup::create(prefix).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("svc.yaml"), MANIFEST).unwrap();
    let agent = kpr_testbed::AgentProcess::start_with_env(
        Path::new(KPR),
        &dir.path().join("svc.yaml"),
        cgroup.path(),
        &dir.path().join("bpf"),
        &["--kube-proxy-replacement", mode],
        &[("KPR_TEST_MISSING_FEATURES", missing)],
    )
    .unwrap();
    (dir, cgroup, agent)
}

#[test]
#[ignore = "needs root"]
fn strict_mode_refuses_to_start_without_a_required_feature_and_names_it() {
    require_root();
    let (_dir, _cgroup, mut agent) =
        agent_with_missing_feature("strict", "strict", "cgroup_getpeername6");
    let status = agent
        .wait_exit(std::time::Duration::from_secs(20))
        .expect("the agent did not exit");
    assert!(!status.success());
    let log = agent.log();
    assert!(
        log.contains("cgroup_getpeername6") && log.contains("CONFIG_CGROUP_BPF"),
        "{log}"
    );
    assert!(
        kpr::datapath::loader::attached_hooks(&agent.bpf_root).is_empty(),
        "strict mode attached something"
    );
}

#[test]
#[ignore = "needs root"]
fn partial_mode_runs_without_the_missing_hook() {
    require_root();
    let (_dir, _cgroup, mut agent) = agent_with_missing_feature(
        "partial",
        "partial",
        "cgroup_getpeername6,helper_set_retval,cgroup_post_bind6,cgroup_skb_egress",
    );
    agent
        .wait_healthy(std::time::Duration::from_secs(30))
        .unwrap();
    let hooks: Vec<&str> = kpr::datapath::loader::attached_hooks(&agent.bpf_root)
        .iter()
        .map(|h| h.attach_point)
        .collect();
    // Bind protection goes whole (post_bind4 too), reported, not fatal;
    // without the egress hook, pods' sockets are judged as the node's.
    assert_eq!(hooks.len(), 7, "{hooks:?}");
    assert!(!hooks.contains(&"getpeername6"));
    assert!(!hooks.contains(&"post_bind4") && !hooks.contains(&"post_bind6"));
    assert!(!hooks.contains(&"skb_egress"));
    let log = agent.log();
    assert!(log.contains("running without"), "{log}");
    assert!(log.contains("NodePort bind protection is off"), "{log}");
    assert!(log.contains("pods' sockets are judged"), "{log}");
}

#[test]
#[ignore = "needs root"]
fn status_reports_the_agent_the_hooks_and_the_map_fill() {
    require_root();
    let bed = bed("status");
    let root = bed.agent.bpf_root.to_str().unwrap().to_string();
    let addr = bed.agent.metrics_addr.to_string();
    let json: serde_json::Value = serde_json::from_str(&kpr(&[
        "status",
        "--bpf-root",
        &root,
        "--metrics-addr",
        &addr,
        "-o",
        "json",
    ]))
    .unwrap();
    let agent = &json["agent"];
    assert_eq!(json["health"], "healthy", "{json:#}");
    assert_eq!(json["exit_code"], 0);
    assert_eq!(json["error"], serde_json::Value::Null);
    assert_eq!(agent["source"], "manifests", "{json:#}");
    assert_eq!(agent["kube_proxy_replacement"], "strict");
    assert_eq!(agent["last_sync_ok"], true);
    assert_eq!(json["attached_hooks"].as_array().unwrap().len(), 11);
    assert_eq!(json["frontends"], 1);
    assert_eq!(json["backends"], 1);
    let services = json["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["map"] == "services")
        .unwrap();
    // The frontend's master and slot, and its ClusterIP's port-reject entry.
    assert_eq!(services["entries"], 3);
    let text = kpr(&["status", "--bpf-root", &root, "--metrics-addr", &addr]);
    assert!(
        text.contains("KubeProxyReplacement Details:") && text.contains("connect4"),
        "{text}"
    );
    assert!(
        text.contains("Backend selection:    random (Maglev table size 16381)"),
        "{text}"
    );
    println!("{text}");
}
