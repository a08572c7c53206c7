//! Hostile inputs and operator mistakes against a real agent in standalone
//! mode (`kpr agent --manifests`): whatever happens to one manifest, the 20
//! canary Services of another file stay in the maps, unchanged. Each case
//! also checks its own expectation (skipped and counted, unhealthy, applied).
//!
//! Root only (BPF, cgroups): `cargo test --test manifests_hostile -- --include-ignored`.
//! `manifest_change_latency_at_10000_services` prints the time from a rename
//! to the map; `KPR_BENCH_EXE=/path/to/kpr` measures another build.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kpr_testbed::{require_root, AgentProcess, TestCgroup};

#[path = "support/canaries.rs"]
mod canaries;
use canaries::{canaries, canary_damage, frontends, service};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");
/// Bound of every wait for the agent to react.
const REACT: Duration = Duration::from_secs(10);

/// An agent on `canaries.yaml` and the directory `m/`, plus `extra` args.
struct Case {
    agent: AgentProcess,
    dir: tempfile::TempDir,
    _cgroup: TestCgroup,
}

impl Case {
    fn start(prefix: &str, extra: &[&str]) -> Case {
        require_root();
        let cgroup = TestCgroup::create(prefix).unwrap();
        let dir = tempfile::Builder::new()
            .prefix(&format!("kpr-{prefix}-"))
            .tempdir()
            .unwrap();
        std::fs::write(dir.path().join("canaries.yaml"), canaries()).unwrap();
        std::fs::create_dir(dir.path().join("m")).unwrap();
        let m = dir.path().join("m").to_string_lossy().into_owned();
        let mut args = vec!["--manifests", &m];
        args.extend_from_slice(extra);
        let mut agent = AgentProcess::start(
            Path::new(KPR),
            &dir.path().join("canaries.yaml"),
            cgroup.path(),
            &dir.path().join("bpf"),
            &args,
        )
        .unwrap();
        agent.wait_healthy(Duration::from_secs(30)).unwrap();
        let case = Case {
            agent,
            dir,
            _cgroup: cgroup,
        };
        case.assert_canaries();
        case
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `m/<name>` the safe way: a temporary file renamed into place.
    fn put(&self, name: &str, text: &str) {
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.path("m").join(name)).unwrap();
    }

    fn maps(&self) -> BTreeMap<String, Vec<String>> {
        frontends(&self.agent.bpf_root)
    }

    #[track_caller]
    fn assert_canaries(&self) {
        let damage = canary_damage(&self.maps());
        assert!(
            damage.is_empty(),
            "canaries lost or changed: {damage:?}\n{}",
            self.agent.log()
        );
    }

    /// Waits (bounded) until `check` holds on the maps.
    #[track_caller]
    fn wait_maps(&self, what: &str, check: impl Fn(&BTreeMap<String, Vec<String>>) -> bool) {
        let deadline = Instant::now() + REACT;
        while !check(&self.maps()) {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {REACT:?}\n{}",
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn healthz(&self) -> u16 {
        kpr_testbed::agent::http_get(self.agent.healthz_addr, "/healthz")
            .map_or(0, |(code, _)| code)
    }

    #[track_caller]
    fn wait_health(&self, code: u16) {
        let deadline = Instant::now() + REACT;
        while self.healthz() != code {
            assert!(
                Instant::now() < deadline,
                "/healthz not {code} within {REACT:?}\n{}",
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn skipped(&self, reason: &str) -> f64 {
        self.agent
            .metric_value("kpr_skipped_objects_total", &format!("reason=\"{reason}\""))
            .unwrap()
            .unwrap_or(0.0)
    }

    /// `kpr_services_unprogrammed{reason="invalid"}`.
    fn unprogrammed(&self) -> f64 {
        self.agent
            .metric_value("kpr_services_unprogrammed", "reason=\"invalid\"")
            .unwrap()
            .unwrap_or(-1.0)
    }

    #[track_caller]
    fn wait_unprogrammed(&self, n: f64) {
        let deadline = Instant::now() + REACT;
        while self.unprogrammed() != n {
            assert!(
                Instant::now() < deadline,
                "{} invalid Services, not {n}\n{}",
                self.unprogrammed(),
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kpr status`: its exit code and output.
    fn status(&self) -> (i32, String) {
        let out = std::process::Command::new(KPR)
            .arg("status")
            .arg("--bpf-root")
            .arg(&self.agent.bpf_root)
            .arg("--metrics-addr")
            .arg(self.agent.metrics_addr.to_string())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    #[track_caller]
    fn wait_skipped(&self, reason: &str, at_least: f64) {
        let deadline = Instant::now() + REACT;
        while self.skipped(reason) < at_least {
            assert!(
                Instant::now() < deadline,
                "{reason} skips not counted\n{}",
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn has(fe: &str) -> impl Fn(&BTreeMap<String, Vec<String>>) -> bool + '_ {
    move |maps| maps.contains_key(fe)
}

#[test]
#[ignore = "needs root"]
fn a_missing_manifest_path_on_restart_is_refused_and_prunes_nothing() {
    let mut case = Case::start("hmiss", &[]);
    case.agent.manifests = Some(case.path("canaries-typo.yaml"));
    case.agent.restart().unwrap();
    let status = case.agent.wait_exit(REACT).expect("the agent kept running");
    assert!(!status.success());
    let log = case.agent.log();
    assert!(
        log.contains("canaries-typo.yaml") && log.contains("no such file"),
        "{log}"
    );
    assert_eq!(case.healthz(), 0, "something answers /healthz");
    case.assert_canaries();
}

#[test]
#[ignore = "needs root"]
fn a_file_that_vanishes_or_is_replaced_by_a_directory_or_a_fifo_keeps_its_services() {
    let case = Case::start("hgone", &[]);
    let victim = case.path("victim.yaml");
    std::fs::write(
        &victim,
        service("v", "victim", "10.96.101.1", &["10.244.101.1".into()]),
    )
    .unwrap();
    // A second agent argument would need a restart: the victim lives in m/.
    std::fs::rename(&victim, case.path("m").join("victim.yaml")).unwrap();
    let victim = case.path("m").join("victim.yaml");
    case.wait_maps("victim applied", has("10.96.101.1:80/TCP"));

    std::fs::remove_file(&victim).unwrap();
    std::fs::create_dir(&victim).unwrap();
    case.wait_health(503);
    assert!(case.maps().contains_key("10.96.101.1:80/TCP"));
    case.assert_canaries();
    let status = case.agent.status_json().unwrap();
    let manifests = &status["watchers"]["manifests"];
    assert_eq!(manifests["state"], "failing", "{status:#}");
    assert!(
        manifests["last_error"]
            .as_str()
            .unwrap()
            .contains("not_regular_file"),
        "{status:#}"
    );

    std::fs::remove_dir(&victim).unwrap();
    nix::unistd::mkfifo(&victim, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(case.healthz(), 503);
    assert!(case.maps().contains_key("10.96.101.1:80/TCP"));
    case.assert_canaries();

    std::fs::remove_file(&victim).unwrap();
    std::fs::write(
        &victim,
        service("v", "victim", "10.96.101.1", &["10.244.101.2".into()]),
    )
    .unwrap();
    case.wait_health(200);
    case.wait_maps("victim updated", |m| {
        m.get("10.96.101.1:80/TCP") == Some(&vec!["10.244.101.2".to_string()])
    });
    case.assert_canaries();
}

#[test]
#[ignore = "needs root"]
fn a_vanished_manifest_file_keeps_its_services_and_turns_health_red() {
    let victim = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        victim.path(),
        service("v", "solo", "10.96.102.1", &["10.244.102.1".into()]),
    )
    .unwrap();
    let path = victim.path().to_string_lossy().into_owned();
    let case = Case::start("hvanish", &["--manifests", &path]);
    assert!(case.maps().contains_key("10.96.102.1:80/TCP"));

    std::fs::remove_file(victim.path()).unwrap();
    case.wait_health(503);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        case.maps().contains_key("10.96.102.1:80/TCP"),
        "pruned on a read failure"
    );
    case.assert_canaries();

    std::fs::write(
        victim.path(),
        service("v", "solo", "10.96.102.1", &["10.244.102.1".into()]),
    )
    .unwrap();
    case.wait_health(200);
    case.assert_canaries();
}

#[test]
#[ignore = "needs root"]
fn a_hundred_thousand_nested_brackets_are_skipped_fast_and_block_nothing() {
    let case = Case::start("hdeep", &[]);
    let bomb = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: bomb}}\nspec: {}\n",
        "[".repeat(100_000)
    );
    let started = Instant::now();
    case.put("bomb.yaml", &bomb);
    case.put(
        "after.yaml",
        &service("a", "after", "10.96.103.1", &["10.244.103.1".into()]),
    );
    case.wait_maps(
        "a Service written after the bomb",
        has("10.96.103.1:80/TCP"),
    );
    let took = started.elapsed();
    case.wait_skipped("too_deep", 1.0);
    println!("100,000 nested brackets skipped and the next file applied in {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(case.healthz(), 200);
    case.assert_canaries();
}

#[test]
#[ignore = "needs root"]
fn a_fifo_is_skipped_and_the_agent_stays_healthy() {
    let case = Case::start("hfifo", &[]);
    let fifo = case.path("m").join("pipe.yaml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    case.wait_skipped("not_regular_file", 1.0);
    case.put(
        "after.yaml",
        &service("a", "after", "10.96.104.1", &["10.244.104.1".into()]),
    );
    case.wait_maps(
        "a Service written after the FIFO",
        has("10.96.104.1:80/TCP"),
    );
    assert_eq!(case.healthz(), 200);
    case.assert_canaries();
}

#[test]
#[ignore = "needs root"]
fn invalid_addresses_ports_and_names_are_skipped_counted_and_logged_escaped() {
    let case = Case::start("hinval", &["--node-ip", "192.0.2.1"]);
    let svc = |name: &str, spec: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bad}}\nspec: {spec}\n---\n")
    };
    let text = [
        svc("cip-loopback", "{clusterIP: 127.0.0.1, ports: [{port: 80}]}"),
        svc("cip-any", "{clusterIP: 0.0.0.0, ports: [{port: 80}]}"),
        svc("cip-bcast", "{clusterIP: 255.255.255.255, ports: [{port: 80}]}"),
        svc("eip-loopback", "{clusterIP: 10.96.105.1, externalIPs: [127.0.0.1], ports: [{port: 80}]}"),
        svc("eip-metadata", "{clusterIP: 10.96.105.2, externalIPs: [169.254.169.254], ports: [{port: 80}]}"),
        svc("np-ssh", "{type: NodePort, clusterIP: 10.96.105.3, ports: [{port: 80, nodePort: 2222}]}"),
        svc("hc-7", "{type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 7, clusterIP: 10.96.105.4, ports: [{port: 80, nodePort: 30999}]}"),
        svc("\"a/b\"", "{clusterIP: 10.96.105.5, ports: [{port: 80}]}"),
        svc("\"evil\\nFORGED level=ERROR\"", "{clusterIP: 10.96.105.6, ports: [{port: 80}]}"),
        service("bad", "ep-loopback", "10.96.105.7", &["127.0.0.1".into()]),
        service("bad", "ep-linklocal", "10.96.105.8", &["169.254.0.1".into()]),
        service("bad", "good", "10.96.105.9", &["10.244.105.9".into()]),
    ]
    .concat();
    case.put("bad.yaml", &text);
    case.wait_maps("the valid Service", has("10.96.105.9:80/TCP"));
    case.wait_skipped("invalid_address", 7.0);
    case.wait_skipped("invalid_port", 2.0);
    case.wait_skipped("invalid_name", 2.0);
    let maps = case.maps();
    for i in 1..=6 {
        let fe = format!("10.96.105.{i}:80/TCP");
        assert!(!maps.contains_key(&fe), "{fe} programmed");
    }
    // The Services of the refused EndpointSlices stand, without endpoints.
    for i in 7..=8 {
        let fe = format!("10.96.105.{i}:80/TCP");
        assert_eq!(maps.get(&fe), Some(&Vec::new()), "{fe}");
    }
    let special = |a: &String| a.starts_with("127.") || a.starts_with("169.254.");
    assert!(
        maps.iter()
            .all(|(fe, b)| !special(fe) && !b.iter().any(special)),
        "{maps:?}"
    );
    let log = case.agent.log();
    assert!(
        log.contains(r"evil\nFORGED"),
        "the name is not in the log, escaped:\n{log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a forged log line:\n{log}"
    );
    // The nine refused Services are unprogrammed, and shown as such.
    case.wait_unprogrammed(9.0);
    let (code, text) = case.status();
    assert_eq!(
        code, 1,
        "kpr status must fail with unprogrammed Services:\n{text}"
    );
    assert!(
        text.contains("  Unprogrammed:         9 Services NOT programmed\n"),
        "{text}"
    );
    assert!(
        text.contains("    bad/np-ssh (invalid): service bad/np-ssh not programmed: ")
            && text.contains("2222"),
        "{text}"
    );
    assert!(
        !text.lines().any(|l| l.starts_with("FORGED")),
        "a forged status line:\n{text}"
    );
    // Fixed: nothing unprogrammed, status exits 0.
    case.put(
        "bad.yaml",
        &service("bad", "good", "10.96.105.9", &["10.244.105.9".into()]),
    );
    case.wait_unprogrammed(0.0);
    let (code, text) = case.status();
    assert_eq!(code, 0, "{text}");
    case.assert_canaries();
}

#[test]
#[ignore = "needs root"]
fn a_slow_in_place_writer_never_makes_a_service_flap() {
    let case = Case::start("hslow", &[]);
    let backends: Vec<String> = (1..=3).map(|i| format!("10.244.106.{i}")).collect();
    let text = service("slow", "slow", "10.96.106.1", &backends);
    case.put("slow.yaml", &text);
    let fe = "10.96.106.1:80/TCP";
    case.wait_maps("the slow Service", has(fe));

    let stop = std::sync::atomic::AtomicBool::new(false);
    let (samples, bad) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let (mut samples, mut bad) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let maps = case.maps();
                samples += 1;
                if maps.get(fe).map_or(0, Vec::len) != 3 {
                    bad.push(format!("{fe}: {:?}", maps.get(fe)));
                }
                bad.extend(canary_damage(&maps));
                std::thread::sleep(Duration::from_millis(20));
            }
            (samples, bad)
        });
        for _ in 0..2 {
            use std::io::Write as _;
            let mut file = std::fs::File::create(case.path("m").join("slow.yaml")).unwrap();
            for line in text.split_inclusive('\n') {
                file.write_all(line.as_bytes()).unwrap();
                file.flush().unwrap();
                std::thread::sleep(Duration::from_millis(150));
            }
            drop(file);
            std::thread::sleep(Duration::from_millis(500));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        sampler.join().unwrap()
    });
    println!(
        "slow writer: {samples} samples, {} with a Service missing or short",
        bad.len()
    );
    assert!(samples > 50, "only {samples} samples");
    assert!(
        bad.is_empty(),
        "{} bad samples, first: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}

#[test]
#[ignore = "needs root"]
fn edits_under_a_relative_manifests_path_are_applied() {
    require_root();
    let cgroup = TestCgroup::create("hrel").unwrap();
    let dir = tempfile::Builder::new()
        .prefix("kpr-hrel-")
        .tempdir()
        .unwrap();
    let m = dir.path().join("m");
    std::fs::create_dir(&m).unwrap();
    std::fs::write(m.join("canaries.yaml"), canaries()).unwrap();
    let cwd = std::env::current_dir().unwrap();
    let up = "../".repeat(cwd.components().count() - 1);
    let relative = PathBuf::from(format!(
        "{up}{}",
        m.display().to_string().trim_start_matches('/')
    ));
    assert!(relative.is_relative() && relative.exists(), "{relative:?}");
    let mut agent = AgentProcess::start(
        Path::new(KPR),
        &relative,
        cgroup.path(),
        &dir.path().join("bpf"),
        &[],
    )
    .unwrap();
    agent.wait_healthy(Duration::from_secs(30)).unwrap();

    std::fs::write(
        m.join("added.yaml"),
        service("r", "added", "10.96.107.1", &["10.244.107.1".into()]),
    )
    .unwrap();
    let deadline = Instant::now() + REACT;
    while !frontends(&agent.bpf_root).contains_key("10.96.107.1:80/TCP") {
        assert!(
            Instant::now() < deadline,
            "a file added under {relative:?} was not applied\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(canary_damage(&frontends(&agent.bpf_root)).is_empty());
}

#[test]
#[ignore = "needs root"]
fn manifest_change_latency_at_10000_services() {
    require_root();
    const SERVICES: usize = 10_000;
    const ENDPOINTS: usize = 10;
    let exe = std::env::var("KPR_BENCH_EXE").unwrap_or_else(|_| KPR.to_string());
    let cgroup = TestCgroup::create("hbench").unwrap();
    let dir = tempfile::Builder::new()
        .prefix("kpr-hbench-")
        .tempdir()
        .unwrap();
    let m = dir.path().join("m");
    std::fs::create_dir(&m).unwrap();
    let manifest = |first: &str| -> String {
        (0..SERVICES)
            .map(|i| {
                let backends: Vec<String> = (0..ENDPOINTS)
                    .map(|j| match (i, j) {
                        (0, 0) => first.to_string(),
                        _ => format!("10.244.{}.{}", j, i % 250 + 1),
                    })
                    .collect();
                service(
                    "bench",
                    &format!("s{i}"),
                    &format!("10.96.{}.{}", i / 250, i % 250 + 1),
                    &backends,
                )
            })
            .collect()
    };
    std::fs::write(m.join("services.yaml"), manifest("10.244.0.1")).unwrap();
    let started = Instant::now();
    let mut agent = AgentProcess::start(
        Path::new(&exe),
        &m,
        cgroup.path(),
        &dir.path().join("bpf"),
        &["--lb-map-max", "262144"],
    )
    .unwrap();
    agent.wait_healthy(Duration::from_secs(120)).unwrap();
    let full_sync = started.elapsed();
    let fe = kpr::model::Frontend::new("10.96.0.1".parse().unwrap(), 80, kpr::model::Protocol::Tcp);

    let mut samples = Vec::new();
    for round in 0..5 {
        let new = format!("10.245.0.{}", round + 1);
        let want: std::net::IpAddr = new.parse().unwrap();
        let text = manifest(&new);
        let tmp = dir.path().join(".services.yaml.tmp");
        std::fs::write(&tmp, &text).unwrap();
        // Let the agent settle, so each round measures one change.
        std::thread::sleep(Duration::from_millis(500));
        let renamed = Instant::now();
        std::fs::rename(&tmp, m.join("services.yaml")).unwrap();
        let deadline = renamed + Duration::from_secs(30);
        loop {
            if slot_has(&agent.bpf_root, &fe, want) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the change never reached the map\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        samples.push(renamed.elapsed());
    }
    samples.sort();
    println!(
        "{SERVICES} Services x {ENDPOINTS} endpoints ({exe}): healthy after {full_sync:?}; one endpoint change, rename to map: min {:?} median {:?} max {:?}",
        samples[0],
        samples[samples.len() / 2],
        samples[samples.len() - 1]
    );
}

/// Whether any slot of the frontend points at a backend with address `want`.
fn slot_has(bpf_root: &Path, fe: &kpr::model::Frontend, want: std::net::IpAddr) -> bool {
    use kpr::datapath::layout;
    use kpr::datapath::maps::{MapName, SvcValue};
    use libbpf_rs::{MapCore as _, MapFlags, MapHandle};
    let open =
        |name| MapHandle::from_pinned_path(kpr::datapath::loader::pin_path(bpf_root, name)).ok();
    let (Some(services), Some(backends)) = (open(MapName::Services), open(MapName::Backends))
    else {
        return false;
    };
    (1..=16u16).any(|slot| {
        let key = layout::svc_key(fe, slot);
        let Some(raw) = services
            .lookup(layout::as_bytes(&key), MapFlags::ANY)
            .ok()
            .flatten()
        else {
            return false;
        };
        let Some(SvcValue::Slot { backend_id, .. }) =
            layout::from_bytes(&raw).and_then(|v| layout::decode_svc_value(slot, &v))
        else {
            return false;
        };
        backends
            .lookup(&backend_id.to_ne_bytes(), MapFlags::ANY)
            .ok()
            .flatten()
            .and_then(|raw| layout::from_bytes(&raw))
            .and_then(|b| layout::decode_backend(&b))
            .is_some_and(|b| b.addr.ip == want)
    })
}
