//! Upgrade: an agent of this version takes over the pins an agent of the
//! previous version left, under load, with no failed connect. The
//! previous version is built from git once into `target/upgrade-base/`.
//! Needs root: the test is `#[ignore = "needs root"]` (run it with
//! `--include-ignored`) and fails at once without root.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kpr_testbed::bed::UNTRANSLATED;
use kpr_testbed::probe::RequestsReport;
use kpr_testbed::require_root;
use kpr_testbed::{AgentProcess, BedPlan, ProbeSpec, SocketLbBed};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");

/// The version whose pins this one must take over: the last commit before
/// the agent and datapath restructure. Bump it to the last release when
/// one is cut.
const PREVIOUS_VERSION: &str = "2cdfb23";

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
endpoints:
- addresses: [10.244.0.11]
- addresses: [10.244.0.12]
"#;

const BACKENDS: [&str; 2] = ["10.244.0.11:8080", "10.244.0.12:8080"];

fn vip() -> SocketAddr {
    "10.96.0.10:80".parse().unwrap()
}

fn git(repo: &Path, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running git {args:?}: {e}"))
}

/// The `kpr` binary of [`PREVIOUS_VERSION`], built once into
/// `target/upgrade-base/` and reused while its stamp names that version.
fn previous_version_kpr() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = repo.join("target/upgrade-base");
    let (src, target, stamp) = (base.join("src"), base.join("target"), base.join("stamp"));
    let exe = target.join("debug/kpr");
    if exe.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(PREVIOUS_VERSION) {
        println!(
            "previous version {PREVIOUS_VERSION}: reusing {}",
            exe.display()
        );
        return exe;
    }
    let commit = format!("{PREVIOUS_VERSION}^{{commit}}");
    assert!(
        git(repo, &["cat-file", "-e", &commit]).status.success(),
        "commit {PREVIOUS_VERSION} (PREVIOUS_VERSION) is not in the repository at {}: \
         a shallow clone? Fetch it (git fetch --unshallow) to run the upgrade test",
        repo.display()
    );
    let _ = std::fs::remove_file(&stamp);
    if src.exists() {
        std::fs::remove_dir_all(&src).unwrap();
    }
    std::fs::create_dir_all(&src).unwrap();
    let started = Instant::now();
    let archive = git(repo, &["archive", "--format=tar", PREVIOUS_VERSION]);
    assert!(
        archive.status.success(),
        "git archive {PREVIOUS_VERSION}: {}",
        String::from_utf8_lossy(&archive.stderr)
    );
    tar_extract(&archive.stdout, &src);
    // Its own workspace: otherwise cargo takes it for a stray member of
    // this repository's workspace (it lies under target/) and refuses it.
    let manifest = src.join("Cargo.toml");
    let mut toml = std::fs::read_to_string(&manifest).unwrap();
    if !toml.lines().any(|l| l.trim() == "[workspace]") {
        toml.push_str("\n[workspace]\n");
        std::fs::write(&manifest, toml).unwrap();
    }
    let status = Command::new(env!("CARGO"))
        .args(["build", "--locked", "--bin", "kpr"])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", &target)
        .env("CARGO_INCREMENTAL", "0")
        .status()
        .unwrap();
    assert!(
        status.success(),
        "building kpr {PREVIOUS_VERSION}: {status}"
    );
    assert!(exe.exists(), "no {} after the build", exe.display());
    std::fs::write(&stamp, PREVIOUS_VERSION).unwrap();
    println!(
        "previous version {PREVIOUS_VERSION}: built {} in {:.0?}",
        exe.display(),
        started.elapsed()
    );
    exe
}

fn tar_extract(archive: &[u8], into: &Path) {
    use std::io::Write;
    let mut tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(into)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tar.stdin.take().unwrap().write_all(archive).unwrap();
    let status = tar.wait().unwrap();
    assert!(status.success(), "tar -x into {}: {status}", into.display());
}

/// TCP requests to the VIP from inside the bed's cgroup, in batches of 20
/// (at least 5 batches, at most 2000) until `stop` is set; what they met.
fn steady_load(bed: &SocketLbBed, stop: &AtomicBool) -> RequestsReport {
    let mut total = RequestsReport::default();
    let mut batches = 0;
    while batches < 2000 && (!stop.load(Ordering::Relaxed) || batches < 5) {
        let spec = ProbeSpec::TcpRequests {
            target: vip(),
            count: 20,
            timeout_ms: 3000,
        };
        let r = bed.probe(&spec, true).expect("the probe runs");
        let r = r.as_requests().expect("a requests report");
        for (k, v) in &r.identities {
            *total.identities.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &r.failures {
            *total.failures.entry(k.clone()).or_default() += v;
        }
        batches += 1;
    }
    total
}

/// The last "datapath attached" line of an agent log (both agents append
/// to the same file).
fn last_attach_line(log: &str) -> &str {
    log.lines()
        .rfind(|l| l.contains("datapath attached") && !l.contains("north-south"))
        .unwrap_or_else(|| panic!("no \"datapath attached\" line:\n{log}"))
}

#[test]
#[ignore = "needs root"]
fn an_agent_of_this_version_takes_over_the_pins_of_the_previous_version_without_dropping_a_connect()
{
    require_root();
    let previous = previous_version_kpr();
    let plan = BedPlan {
        v4_backends: 2,
        v6_backends: 0,
        untranslated_vips: vec![vip()],
        ..BedPlan::default()
    };
    let mut bed = SocketLbBed::start("upgrade", Path::new(KPR), MANIFEST, &plan).unwrap();
    // The bed comes with an agent of this version: remove it and everything
    // it pinned and attached, so the previous version starts from nothing.
    bed.agent.stop().unwrap();
    let bpf_root = bed.agent.bpf_root.clone();
    let cgroup = bed.cgroup.path().to_path_buf();
    let manifests = bed.manifests_dir();
    let out = Command::new(KPR)
        .arg("cleanup")
        .arg("--bpf-root")
        .arg(&bpf_root)
        .arg("--cgroup")
        .arg(&cgroup)
        .output()
        .unwrap();
    assert!(out.status.success(), "kpr cleanup: {out:?}");
    assert!(
        !bpf_root.exists(),
        "{} survived cleanup",
        bpf_root.display()
    );

    // Dropped after both agents (whose Drops remove the pins).
    let _unmount = UnmountLeftover(bpf_root.clone());
    // Declared before `current`, so dropped after it: each Drop stops its
    // agent and removes the pins, which must not happen under a live agent.
    let mut old =
        AgentProcess::start_before_detection(&previous, &manifests, &cgroup, &bpf_root, &[])
            .unwrap();
    old.wait_healthy(Duration::from_secs(30)).unwrap();
    assert!(
        last_attach_line(&old.log()).contains("reused_maps=[]"),
        "the previous version did not start from an empty bpf root:\n{}",
        old.log()
    );
    let spread = bed.tcp_spread(vip(), 40).unwrap();
    assert_eq!(
        spread.keys().map(String::as_str).collect::<Vec<_>>(),
        BACKENDS,
        "the previous version translates the VIP"
    );
    let listing_before = bed.svc_list_json().unwrap();

    let stop = AtomicBool::new(false);
    let (report, current, healthy_after) = std::thread::scope(|s| {
        let load = s.spawn(|| steady_load(&bed, &stop));
        // Also on a panic here: the scope joins the load before unwinding.
        let _stop_load = SetOnDrop(&stop);
        std::thread::sleep(Duration::from_secs(1));
        let upgrade = Instant::now();
        old.stop().unwrap();
        let current = AgentProcess::start(Path::new(KPR), &manifests, &cgroup, &bpf_root, &[]);
        let healthy = current
            .and_then(|mut c| c.wait_healthy(Duration::from_secs(30)).map(|()| c))
            .map(|c| (c, upgrade.elapsed()));
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        let report = load.join().expect("the load thread panicked");
        let (current, healthy_after) = healthy.unwrap();
        (report, current, healthy_after)
    });

    let answered: u64 = report.identities.values().sum();
    let untranslated = report.identities.get(UNTRANSLATED).copied().unwrap_or(0);
    let failed: u64 = report.failures.values().sum();
    println!(
        "upgrade {PREVIOUS_VERSION} -> this version under load: {answered} connects answered \
         ({untranslated} untranslated), {failed} failed {:?}; the new agent was healthy \
         {healthy_after:.1?} after the old one got SIGTERM; spread {:?}",
        report.failures, report.identities
    );
    assert_eq!(failed, 0, "failed connects: {:?}", report.failures);
    assert_eq!(
        untranslated, 0,
        "untranslated connects: {:?}",
        report.identities
    );
    assert!(answered >= 100, "only {answered} connects in the load");
    assert_eq!(
        report
            .identities
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        BACKENDS
    );

    let log = current.log();
    let attached = last_attach_line(&log);
    println!("{attached}");
    assert!(
        attached.contains(
            "reused_maps=[Services, Backends, Affinity, SockRevNat, SourceRanges, Maglev]"
        ) && attached.contains("updated_links=[\"connect4\""),
        "this version did not take over every pinned map and link:\n{log}"
    );
    assert!(
        !log.contains("removed map of an older layout version"),
        "a pinned map was dropped as an older layout:\n{log}"
    );
    // The previous version keeps no record of Service names; this one
    // writes it: the names appear, nothing else of the listing changes.
    let listing_after = bed.svc_list_json().unwrap();
    assert!(
        listing_after
            .as_array()
            .unwrap()
            .iter()
            .all(|row| row["service"].is_string()),
        "this version names every frontend's Service: {listing_after}"
    );
    assert_eq!(
        without_service(listing_after),
        without_service(listing_before),
        "the frontends and backends changed across the upgrade"
    );
}

/// A `svc list -o json` listing without its `service` fields.
fn without_service(mut listing: serde_json::Value) -> serde_json::Value {
    for row in listing.as_array_mut().unwrap() {
        row.as_object_mut().unwrap().remove("service");
    }
    listing
}

/// Sets the flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Unmounts the bpffs the previous version mounted on the bpf root: it
/// writes no `kpr-mounted` marker, so this version's cleanup leaves it.
struct UnmountLeftover(PathBuf);

impl Drop for UnmountLeftover {
    fn drop(&mut self) {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let root = self.0.to_string_lossy();
        let mounted = mounts.lines().any(|l| {
            let mut fields = l.split(' ').skip(1);
            fields.next() == Some(&root) && fields.next() == Some("bpf")
        });
        if mounted {
            println!("unmounting the previous version's bpffs left at {root}");
            if let Err(e) = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("unmounting {root}: {e}");
            }
        }
    }
}
