//! The end-to-end scale bench (issue 11), driven only through kpr's CLI:
//! N Services × 10 endpoints (10 % NodePort) given to a release
//! `kpr agent` with default flags, from manifests (`--manifests DIR`) and
//! from the Kubernetes API stand-in (tests/support/apiserver.rs). Per
//! source and size it measures:
//!
//! - full sync: from spawning the agent to `kpr_services` = N on /metrics
//!   (polled every 5 ms), checked afterwards with `kpr svc list -o json`;
//! - one endpoint change: from the manifest's atomic rename (or the API
//!   update) to the Service's master entry in the pinned services map
//!   holding the new backend count, polled by key in a tight loop;
//! - the agent's RSS (VmRSS after the first sync, VmHWM its peak);
//! - map memory: `memlock` of the agent's BPF map fds (/proc/PID/fdinfo).
//!
//! Root only. Only the safety flags are added to the agent's defaults: a
//! network namespace of its own (a veth pair, one end holding the node
//! address, so nothing attaches to the host's devices), a test cgroup
//! under the cgroup2 mount and a new bpf root under /tmp; all removed on
//! exit, also on failure. Everything after `--` goes to the agent as is
//! (e.g. `-- --lb-map-max 262144`). See docs/benchmarks.md.
//!
//! `cargo bench --bench scale -- [--sizes 1000,10000,100000]
//!  [--source manifests|kubernetes|both] [--changes 5] [--kpr PATH] [-- AGENT ARGS]`

#[path = "../tests/support/apiserver.rs"]
mod apiserver;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use apiserver::ApiServer;
use kpr::datapath::kernel::KernelMaps;
use kpr::datapath::maps::SvcValue;
use kpr::model::{Frontend, Protocol};
use kpr::selftest::agent::AgentProcess;
use kpr::selftest::cgroup::TestCgroup;
use kpr::selftest::netns::Netns;

const KPR: &str = env!("CARGO_BIN_EXE_kpr");
const ENDPOINTS: usize = 10;
const SERVICES_PER_FILE: usize = 100;
const NODE: &str = "scale-node";
const NODE_IP: &str = "192.0.2.10";
const NODE_PORT_MIN: usize = 30000;
/// Nodeports the default --service-node-port-range holds (30000-32767).
const DEFAULT_NODE_PORTS: usize = 2768;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Source {
    Manifests,
    Kubernetes,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Manifests => "manifests",
            Source::Kubernetes => "kubernetes",
        }
    }
}

struct Args {
    sizes: Vec<usize>,
    sources: Vec<Source>,
    changes: usize,
    /// The kpr binary (default: the one this bench was built with).
    kpr: PathBuf,
    agent_args: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        sizes: vec![1000, 10_000],
        sources: vec![Source::Manifests, Source::Kubernetes],
        changes: 5,
        kpr: PathBuf::from(KPR),
        agent_args: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--sizes" => {
                args.sizes = value()?
                    .split(',')
                    .map(|s| s.trim().parse().context("--sizes"))
                    .collect::<Result<_>>()?
            }
            "--source" => {
                args.sources = match value()?.as_str() {
                    "manifests" => vec![Source::Manifests],
                    "kubernetes" => vec![Source::Kubernetes],
                    "both" => vec![Source::Manifests, Source::Kubernetes],
                    other => bail!("--source {other}: manifests, kubernetes or both"),
                }
            }
            "--changes" => args.changes = value()?.parse().context("--changes")?,
            "--kpr" => args.kpr = PathBuf::from(value()?),
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--" => args.agent_args = it.by_ref().collect(),
            other => bail!("unknown argument {other}"),
        }
    }
    if args.changes == 0 || args.sizes.iter().any(|&n| n == 0 || n > 1_000_000) {
        bail!("--changes >= 1 and sizes 1..=1000000");
    }
    Ok(args)
}

/// One run's figures.
struct Row {
    source: Source,
    services: usize,
    full_sync: Duration,
    changes: Vec<Duration>,
    rss_kib: u64,
    hwm_kib: u64,
    map_memlock: u64,
}

fn main() {
    kpr_testbed::require_root();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("scale: {e:#}");
            std::process::exit(2);
        }
    };
    let mut rows = Vec::new();
    let mut failed = false;
    for &source in &args.sources {
        for &n in &args.sizes {
            eprintln!("scale: {} x {n} ...", source.name());
            match run(source, n, &args) {
                Ok(row) => {
                    print_rows(std::slice::from_ref(&row));
                    rows.push(row);
                }
                Err(e) => {
                    failed = true;
                    eprintln!("scale: {} x {n} failed: {e:#}", source.name());
                }
            }
        }
    }
    println!(
        "\nkpr scale bench ({} endpoints per Service, 10 % NodePort; agent args: {:?})",
        ENDPOINTS, args.agent_args
    );
    print_rows(&rows);
    if failed {
        std::process::exit(1);
    }
}

fn print_rows(rows: &[Row]) {
    println!(
        "{:<11} {:>8} | {:>18} | {:>26} | {:>26} | {:>10}",
        "source",
        "services",
        "full sync",
        "1 endpoint change p50/max",
        "RSS after sync / peak",
        "map memory"
    );
    for r in rows {
        let at_10k = r.services == 10_000;
        let target = |t: &str| {
            if at_10k {
                format!(" ({t})")
            } else {
                String::new()
            }
        };
        let mut sorted = r.changes.clone();
        sorted.sort();
        let p50 = sorted[sorted.len() / 2];
        let max = sorted[sorted.len() - 1];
        println!(
            "{:<11} {:>8} | {:>18} | {:>26} | {:>26} | {:>10}",
            r.source.name(),
            r.services,
            format!("{:.3} s{}", r.full_sync.as_secs_f64(), target("<= 1 s")),
            format!("{:.1}/{:.1} ms{}", ms(p50), ms(max), target("<= 20 ms")),
            format!(
                "{:.1}/{:.1} MiB{}",
                mib(r.rss_kib * 1024),
                mib(r.hwm_kib * 1024),
                target("<= 64")
            ),
            format!("{:.1} MiB", mib(r.map_memlock)),
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The ClusterIP of Service `i`: 10.96.0.0/12 from 10.96.0.10 on.
fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + i as u32)
}

/// Endpoint `j` of Service `i`: unique across Services (10.244.0.0/16;
/// the port moves on every 6553 Services, so a slice shares one port).
fn endpoint(i: usize, j: usize) -> (Ipv4Addr, u16) {
    let k = (i % 6553) * ENDPOINTS + j;
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + k as u32);
    (ip, 8080 + (i / 6553) as u16)
}

fn node_port(i: usize) -> Option<usize> {
    i.is_multiple_of(10).then_some(NODE_PORT_MIN + i / 10)
}

fn service(i: usize, with_server_fields: bool) -> Value {
    let name = format!("svc-{i}");
    let mut spec = json!({
        "clusterIP": cluster_ip(i).to_string(),
        "clusterIPs": [cluster_ip(i).to_string()],
        "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
        "internalTrafficPolicy": "Cluster", "sessionAffinity": "None",
        "selector": {"app": name},
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        "type": "ClusterIP",
    });
    if let Some(port) = node_port(i) {
        spec["type"] = json!("NodePort");
        spec["externalTrafficPolicy"] = json!("Cluster");
        spec["ports"][0]["nodePort"] = json!(port);
    }
    let mut svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "scale", "labels": {"app": name}},
        "spec": spec,
    });
    if with_server_fields {
        // What the API server returns besides: annotations, managedFields, status.
        svc["metadata"]["annotations"] = json!({"kubectl.kubernetes.io/last-applied-configuration":
            serde_json::to_string(&svc).unwrap_or_default()});
        svc["metadata"]["managedFields"] = json!([{"apiVersion": "v1", "fieldsType": "FieldsV1",
            "manager": "kubectl-client-side-apply", "operation": "Update", "time": "2026-01-01T00:00:00Z",
            "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}},
                "f:labels": {".": {}, "f:app": {}}},
                "f:spec": {"f:internalTrafficPolicy": {}, "f:ports": {".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {
                    ".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}},
                    "f:selector": {}, "f:sessionAffinity": {}, "f:type": {}}}}]);
        svc["status"] = json!({"loadBalancer": {}});
    }
    svc
}

fn slice(i: usize, endpoints: usize, with_server_fields: bool) -> Value {
    let name = format!("svc-{i}");
    let eps: Vec<Value> = (0..endpoints)
        .map(|j| {
            let (ip, _) = endpoint(i, j);
            json!({"addresses": [ip.to_string()],
                   "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": format!("node-{}", j % 50),
                   "targetRef": {"kind": "Pod", "name": format!("{name}-pod-{j}"), "namespace": "scale",
                                 "uid": format!("00000000-0000-4000-8000-{:012}", i * ENDPOINTS + j)}})
        })
        .collect();
    let mut s = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-abcde"), "namespace": "scale",
                     "labels": {"kubernetes.io/service-name": name,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": endpoint(i, 0).1, "protocol": "TCP"}],
        "endpoints": eps,
    });
    if with_server_fields {
        s["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "Service", "name": name,
            "uid": format!("10000000-0000-4000-8000-{i:012}"), "controller": true, "blockOwnerDeletion": true}]);
        s["metadata"]["annotations"] =
            json!({"endpoints.kubernetes.io/last-change-trigger-time": "2026-01-01T00:00:00Z"});
        s["metadata"]["managedFields"] = json!([{"apiVersion": "discovery.k8s.io/v1", "fieldsType": "FieldsV1",
            "manager": "kube-controller-manager", "operation": "Update", "time": "2026-01-01T00:00:00Z",
            "fieldsV1": {"f:addressType": {}, "f:endpoints": {}, "f:metadata": {"f:annotations": {}, "f:labels": {},
                "f:ownerReferences": {}}, "f:ports": {}}}]);
    }
    s
}

fn manifest_file(dir: &Path, chunk: usize) -> PathBuf {
    dir.join(format!("services-{chunk:05}.yaml"))
}

/// The text of one manifest file: Services `chunk*100..`, each followed
/// by its slice; Service `changed` has `endpoints` endpoints.
fn manifest_text(chunk: usize, n: usize, changed: Option<(usize, usize)>) -> Result<String> {
    let mut text = String::new();
    for i in chunk * SERVICES_PER_FILE..((chunk + 1) * SERVICES_PER_FILE).min(n) {
        let eps = match changed {
            Some((c, e)) if c == i => e,
            _ => ENDPOINTS,
        };
        for doc in [service(i, false), slice(i, eps, false)] {
            text.push_str("---\n");
            text.push_str(&serde_yaml_ng::to_string(&doc)?);
        }
    }
    Ok(text)
}

fn write_manifests(dir: &Path, n: usize) -> Result<()> {
    for chunk in 0..n.div_ceil(SERVICES_PER_FILE) {
        std::fs::write(manifest_file(dir, chunk), manifest_text(chunk, n, None)?)?;
    }
    Ok(())
}

/// What the bench created; dropped in reverse order (agent first).
struct Bed {
    agent: AgentProcess,
    api: Option<ApiServer>,
    _cgroup: TestCgroup,
    _netns: Netns,
    _dir: tempfile::TempDir,
}

fn run(source: Source, n: usize, args: &Args) -> Result<Row> {
    let dir = tempfile::Builder::new()
        .prefix("kpr-scale-")
        .tempdir_in("/tmp")?;
    let manifests = dir.path().join("manifests");
    let bpf_root = dir.path().join("bpf");
    // kpr mounts bpffs only on a directory it creates itself.
    std::fs::create_dir(&manifests)?;
    let netns = Netns::create(&format!("kpr-scale-{}", std::process::id()))?;
    netns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ])?;
    netns.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"])?;
    netns.ip(&["link", "set", "eth0", "up"])?;
    let cgroup = TestCgroup::create("scale")?;
    let mut agent_args: Vec<String> = args.agent_args.clone();
    if n / 10 > DEFAULT_NODE_PORTS {
        // As a real API server would need it widened for this many NodePorts.
        agent_args.push("--service-node-port-range".into());
        agent_args.push(format!("{NODE_PORT_MIN}-{}", NODE_PORT_MIN + n / 10));
    }
    let agent_args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let (agent, api, started) = match source {
        Source::Manifests => {
            write_manifests(&manifests, n)?;
            let started = Instant::now();
            let agent = AgentProcess::start_in_netns(
                &args.kpr,
                &manifests,
                cgroup.path(),
                &bpf_root,
                &agent_args,
                &netns,
            )?;
            (agent, None, started)
        }
        Source::Kubernetes => {
            // Listening inside the agent's namespace; filled in-process.
            let api = netns
                .enter_thread(|| ApiServer::try_start_with(apiserver::Options::default()))??;
            api.apply(
                &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
                "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}}),
            );
            for i in 0..n {
                api.apply(&service(i, true));
                api.apply(&slice(i, ENDPOINTS, true));
            }
            let kubeconfig = dir.path().join("kubeconfig");
            api.write_kubeconfig(&kubeconfig)?;
            let started = Instant::now();
            let agent = AgentProcess::start_kubernetes_in_netns(
                &args.kpr,
                &kubeconfig,
                NODE,
                cgroup.path(),
                &bpf_root,
                &agent_args,
                &netns,
            )?;
            (agent, Some(api), started)
        }
    };
    let mut bed = Bed {
        agent,
        api,
        _cgroup: cgroup,
        _netns: netns,
        _dir: dir,
    };
    let full_sync = wait_programmed(&bed.agent, n, started)?;
    let pid = bed.agent.pid().ok_or_else(|| anyhow!("agent exited"))?;
    let (rss_kib, hwm_kib) = memory_kib(pid)?;
    let map_memlock = map_memlock(pid)?;
    check_svc_list(&args.kpr, &bpf_root, n)?;
    let changes = endpoint_changes(&mut bed, source, n, args.changes)?;
    bed.agent.stop()?;
    Ok(Row {
        source,
        services: n,
        full_sync,
        changes,
        rss_kib,
        hwm_kib,
        map_memlock,
    })
}

/// From `started` until the agent reports `n` Services programmed.
fn wait_programmed(agent: &AgentProcess, n: usize, started: Instant) -> Result<Duration> {
    let limit = Duration::from_secs(60) + Duration::from_millis(n as u64);
    loop {
        if let Ok(Some(v)) = agent.metric_value("kpr_services", "") {
            if v as usize >= n {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > limit {
            let got = agent.metric_value("kpr_services", "").ok().flatten();
            bail!(
                "{got:?} of {n} Services programmed after {limit:?}; log:\n{}",
                tail(&agent.log())
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// VmRSS and VmHWM of `pid`, in KiB.
fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Sum of `memlock` over the distinct BPF maps `pid` holds open.
fn map_memlock(pid: u32) -> Result<u64> {
    let mut seen = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let is_map = std::fs::read_link(entry.path())
            .is_ok_and(|l| l.to_string_lossy() == "anon_inode:bpf-map");
        if !is_map {
            continue;
        }
        let fdinfo = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        let Ok(info) = std::fs::read_to_string(fdinfo) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            seen.insert(id, memlock);
        }
    }
    Ok(seen.values().sum())
}

/// `kpr svc list -o json` shows every Service's ClusterIP frontend.
fn check_svc_list(kpr: &Path, bpf_root: &Path, n: usize) -> Result<()> {
    let out = std::process::Command::new(kpr)
        .args(["svc", "list", "-o", "json", "--bpf-root"])
        .arg(bpf_root)
        .output()?;
    if !out.status.success() {
        bail!("kpr svc list: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    let cluster_ips = rows
        .iter()
        .filter(|r| r["port"] == 80)
        .filter(|r| {
            r["address"]
                .as_str()
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
                .is_some_and(|a| {
                    let first = u32::from(cluster_ip(0));
                    (first..first + n as u32).contains(&u32::from(a))
                })
        })
        .count();
    if cluster_ips != n {
        bail!("kpr svc list shows {cluster_ips} of {n} ClusterIP frontends");
    }
    Ok(())
}

/// `count` endpoint changes of one Service, each timed from its write
/// (rename into place, or API update) to its master entry in the map.
fn endpoint_changes(
    bed: &mut Bed,
    source: Source,
    n: usize,
    count: usize,
) -> Result<Vec<Duration>> {
    let i = n / 2 + 1;
    let fe = Frontend::new(IpAddr::V4(cluster_ip(i)), 80, Protocol::Tcp);
    let full = ENDPOINTS;
    let mut out = Vec::new();
    for round in 0..count {
        let want = if round % 2 == 0 { full - 1 } else { full };
        // Opened each round: a map that grew is pinned anew.
        let maps = KernelMaps::open(&bed.agent.bpf_root)?;
        let started = match source {
            Source::Manifests => {
                let dir = bed
                    .agent
                    .manifests
                    .clone()
                    .ok_or_else(|| anyhow!("no manifests"))?;
                let chunk = i / SERVICES_PER_FILE;
                let path = manifest_file(&dir, chunk);
                let tmp = dir.join(format!(".services-{chunk:05}.yaml.tmp"));
                std::fs::write(&tmp, manifest_text(chunk, n, Some((i, want)))?)?;
                let started = Instant::now();
                std::fs::rename(&tmp, &path)?;
                started
            }
            Source::Kubernetes => {
                let api = bed.api.as_ref().ok_or_else(|| anyhow!("no API server"))?;
                let s = slice(i, want, true);
                let started = Instant::now();
                api.apply(&s);
                started
            }
        };
        out.push(wait_master_count(&maps, &fe, want, started)?);
    }
    Ok(out)
}

/// Polls the master entry of `fe` until it holds `want` backends.
fn wait_master_count(
    maps: &KernelMaps,
    fe: &Frontend,
    want: usize,
    started: Instant,
) -> Result<Duration> {
    let limit = Duration::from_secs(20);
    for _ in 0..100_000_000u64 {
        if let Some(SvcValue::Master(m)) = maps.service_entry(fe, 0)? {
            if m.count as usize == want {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > limit {
            break;
        }
    }
    bail!("{} did not reach {want} backends within {limit:?}", fe.addr)
}
