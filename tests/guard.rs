//! The agent guards itself and the node (issue 12): one agent per bpf root,
//! bpffs mounted only where it is safe, HTTP bounded so no client can
//! exhaust the agent, and every refusal before anything is pinned.
//!
//! Root-only: each test makes its own cgroup, bpf root and manifests, and
//! runs `kpr agent` as a child (its own launcher here, so a test can set the
//! agent's descriptor limit).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kpr::datapath::loader;
use kpr_testbed::agent::free_loopback_addr;
use kpr_testbed::{require_root, TestCgroup};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");

const WEB: &str = r#"
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

const API: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: api, namespace: t}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, namespace: t, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.0.12]}]
"#;

/// A test's own world: a cgroup, a manifests directory and a bpf root path
/// (not created: the agent creates it).
struct World {
    cgroup: TestCgroup,
    dir: tempfile::TempDir,
}

impl World {
    fn new(prefix: &str) -> World {
        let cgroup = TestCgroup::create(prefix).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("manifests")).unwrap();
        std::fs::write(dir.path().join("manifests/web.yaml"), WEB).unwrap();
        World { cgroup, dir }
    }

    fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    fn bpf_root(&self) -> PathBuf {
        self.dir.path().join("bpf")
    }

    fn agent(&self, name: &str, bpf_root: &Path, extra: &[&str]) -> Agent {
        Agent::spawn(self, name, self.cgroup.path(), bpf_root, extra, None)
    }
}

/// `kpr agent` as a child; stopped on Drop, and its pins removed when it
/// was the one that owned them.
struct Agent {
    child: Option<Child>,
    log: PathBuf,
    bpf_root: PathBuf,
    healthz: SocketAddr,
    owns_root: bool,
}

impl Agent {
    fn spawn(
        world: &World,
        name: &str,
        cgroup: &Path,
        bpf_root: &Path,
        extra: &[&str],
        nofile: Option<u64>,
    ) -> Agent {
        let log = world.dir.path().join(format!("{name}.log"));
        // A test's own --healthz-addr among `extra` wins (clap takes one).
        let healthz = extra
            .iter()
            .position(|a| *a == "--healthz-addr")
            .and_then(|i| extra.get(i + 1)?.parse().ok())
            .unwrap_or_else(|| free_loopback_addr().unwrap());
        let metrics = free_loopback_addr().unwrap();
        let mut command = Command::new(KPR);
        command
            .arg("agent")
            .arg("--manifests")
            .arg(world.manifests())
            .arg("--cgroup")
            .arg(cgroup)
            .arg("--bpf-root")
            .arg(bpf_root)
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            // This test's namespace is the machine's: no device detection.
            .arg("--devices=")
            .args(
                (!extra.contains(&"--healthz-addr"))
                    .then(|| ["--healthz-addr".to_string(), healthz.to_string()])
                    .into_iter()
                    .flatten(),
            )
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(limit) = nofile {
            // SAFETY: setrlimit only, between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        Agent {
            child: Some(command.spawn().unwrap()),
            log,
            bpf_root: bpf_root.to_path_buf(),
            healthz,
            owns_root: false,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for /healthz 200; from then on the agent owns its bpf root.
    #[track_caller]
    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited with {status}:\n{}", self.log());
            }
            if matches!(healthz(self.healthz), Some(200)) {
                self.owns_root = true;
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent not healthy within 30 s:\n{}", self.log());
    }

    /// The exit status of an agent expected to give up by itself.
    #[track_caller]
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        let child = self.child.as_mut().unwrap();
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the agent did not exit:\n{}", self.log());
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        if self.owns_root {
            if let Err(e) = loader::cleanup(&self.bpf_root) {
                eprintln!("cleaning up {}: {e:#}", self.bpf_root.display());
            }
        }
    }
}

/// The status of `GET /healthz`, None when nothing answered.
fn healthz(addr: SocketAddr) -> Option<u16> {
    kpr::http::blocking_get(addr, "/healthz")
        .ok()
        .map(|(s, _)| s)
}

/// `kpr svc list` of `bpf_root`.
fn svc_list(bpf_root: &Path) -> String {
    let out = Command::new(KPR)
        .args(["svc", "list", "--bpf-root"])
        .arg(bpf_root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Mount points at `path` or above it, from /proc/self/mountinfo.
fn mounts_covering(path: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| path.starts_with(m))
        .map(str::to_string)
        .collect()
}

/// Raises this test process's descriptor limit to the hard limit.
fn raise_own_nofile() {
    kpr::preflight::raise_nofile_limit().unwrap();
}

#[test]
#[ignore = "needs root"]
fn a_second_agent_on_the_same_bpf_root_is_refused_with_the_holders_pid() {
    require_root();
    let world = World::new("g2nd");
    let root = world.bpf_root();
    let mut first = world.agent("first", &root, &[]);
    first.wait_healthy();

    let mut second = world.agent("second", &root, &[]);
    let status = second.wait_exit();

    assert!(!status.success());
    let log = second.log();
    assert!(
        log.contains(&format!("in use by kpr pid {}", first.pid())),
        "{log}"
    );
    assert_eq!(healthz(first.healthz), Some(200), "the first keeps serving");
    assert!(svc_list(&root).contains("10.96.0.10:80/TCP"));
    // SIGHUP is ignored, and said so.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(healthz(first.healthz), Some(200));
    assert!(first.log().contains("SIGHUP ignored"), "{}", first.log());
}

#[test]
#[ignore = "needs root"]
fn cleanup_under_a_running_agent_is_refused_with_its_pid_unless_forced() {
    require_root();
    let world = World::new("gclean");
    let root = world.bpf_root();
    let mut agent = world.agent("agent", &root, &[]);
    agent.wait_healthy();

    let out = Command::new(KPR)
        .args(["cleanup", "--bpf-root"])
        .arg(&root)
        .output()
        .unwrap();

    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("kpr pid {}", agent.pid())), "{err}");
    assert!(
        svc_list(&root).contains("10.96.0.10:80/TCP"),
        "nothing removed"
    );

    let forced = Command::new(KPR)
        .args(["cleanup", "--force", "--bpf-root"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    // Forced, it removes everything (the running agent then restores its
    // pins: tests/lifecycle.rs).
    let out = String::from_utf8_lossy(&forced.stdout);
    assert!(out.contains("detached 11 program links"), "{out}");
}

#[test]
#[ignore = "needs root"]
fn a_cgroup_change_against_existing_pins_is_refused_unless_forced() {
    require_root();
    let world = World::new("gcg");
    let other = TestCgroup::create("gcg2").unwrap();
    let root = world.bpf_root();
    let mut first = world.agent("first", &root, &[]);
    first.wait_healthy();
    first.stop();

    let mut refused = Agent::spawn(&world, "moved", other.path(), &root, &[], None);
    let status = refused.wait_exit();
    assert!(!status.success());
    assert!(
        refused.log().contains("--force-cgroup-change"),
        "{}",
        refused.log()
    );
    let want =
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(world.cgroup.path()).unwrap());
    assert!(
        loader::attached_hooks(&root)
            .iter()
            .all(|h| h.cgroup_id == Some(want)),
        "the links stay on the first cgroup"
    );

    let forced = ["--force-cgroup-change"];
    let mut second = Agent::spawn(&world, "forced", other.path(), &root, &forced, None);
    second.wait_healthy();
    let moved_to = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(other.path()).unwrap());
    assert!(loader::attached_hooks(&root)
        .iter()
        .all(|h| h.cgroup_id == Some(moved_to)));
}

#[test]
#[ignore = "needs root"]
fn a_non_empty_bpf_root_is_refused_and_nothing_is_mounted() {
    require_root();
    let world = World::new("gfull");
    let root = world.dir.path().join("full");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("precious"), "mine").unwrap();
    let before = mounts_covering(&root);

    let mut agent = world.agent("full", &root, &[]);
    let status = agent.wait_exit();

    assert!(!status.success());
    assert!(agent.log().contains("holds files"), "{}", agent.log());
    assert_eq!(mounts_covering(&root), before, "a mount appeared");
    assert_eq!(
        std::fs::read_to_string(root.join("precious")).unwrap(),
        "mine"
    );
}

/// A read-only tmpfs the test mounts on an empty directory it made.
struct ReadOnlyDir(PathBuf);

impl Drop for ReadOnlyDir {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
#[ignore = "needs root"]
fn a_bpf_root_under_a_read_only_parent_is_refused_and_no_ancestor_is_mounted() {
    require_root();
    let world = World::new("gro");
    let parent = world.dir.path().join("ro");
    std::fs::create_dir(&parent).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &parent,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_RDONLY,
        Some("size=64k"),
    )
    .unwrap();
    let _ro = ReadOnlyDir(parent.clone());
    let root = parent.join("bpf");
    let before = mounts_covering(&root);

    let mut agent = world.agent("ro", &root, &[]);
    let status = agent.wait_exit();

    assert!(!status.success());
    assert!(
        agent.log().contains("never mounts bpffs over an ancestor"),
        "{}",
        agent.log()
    );
    assert_eq!(mounts_covering(&root), before, "a mount appeared");
}

#[test]
#[ignore = "needs root"]
fn a_taken_health_address_is_refused_before_anything_is_pinned() {
    require_root();
    let world = World::new("gbind");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let root = world.bpf_root();

    let mut agent = world.agent("bind", &root, &["--healthz-addr", &addr]);
    let status = agent.wait_exit();

    assert!(!status.success());
    let log = agent.log();
    assert!(
        log.contains(&format!("binding healthz endpoint {addr}")),
        "{log}"
    );
    assert!(log.contains("in use"), "{log}");
    assert!(!root.exists(), "the bpf root was created");
    assert!(loader::attached_hooks(&root).is_empty());
}

#[test]
#[ignore = "needs root"]
fn idle_connections_beyond_the_descriptor_limit_leave_health_and_syncs_working() {
    idle_connections_leave_the_reserve("gfd", 1024);
}

#[test]
#[ignore = "needs root"]
fn idle_connections_under_a_low_descriptor_limit_leave_the_reserve() {
    // 400: the process-wide connection budget, not the per-listener
    // limit (256, which would leave ~110 free), is what stops the flood.
    idle_connections_leave_the_reserve("gfd400", 400);
}

/// Descriptors the agent has open, from /proc.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// 1,100 idle connections to an agent limited to `nofile` descriptors:
/// health answers within 2 s, an edit is applied, no Service is lost, and
/// the descriptors held in reserve for syncs stay free.
fn idle_connections_leave_the_reserve(prefix: &str, nofile: u64) {
    require_root();
    raise_own_nofile();
    let world = World::new(prefix);
    let root = world.bpf_root();
    let mut agent = Agent::spawn(&world, "fd", world.cgroup.path(), &root, &[], Some(nofile));
    agent.wait_healthy();

    let idle: Vec<TcpStream> = (0..1100)
        .filter_map(|_| TcpStream::connect_timeout(&agent.healthz, Duration::from_secs(2)).ok())
        .collect();
    assert!(idle.len() >= 1000, "only {} connections opened", idle.len());
    let free = nofile as usize - open_descriptors(agent.pid());
    // Some of the reserve goes to what the agent opened after it took its
    // budget (the manifest watch, a pin check): 64 at most.
    assert!(
        free >= kpr::http::DESCRIPTOR_RESERVE - 64,
        "only {free} of {nofile} descriptors free under the flood"
    );

    let asked = Instant::now();
    assert_eq!(healthz(agent.healthz), Some(200), "{}", agent.log());
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(2), "/healthz took {took:?}");

    std::fs::write(world.manifests().join("api.yaml"), API).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut listed = svc_list(&root);
    while !listed.contains("10.96.0.20:80/TCP") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        listed = svc_list(&root);
    }
    assert!(
        listed.contains("10.96.0.20:80/TCP"),
        "edit not applied:\n{listed}\n{}",
        agent.log()
    );
    assert!(
        listed.contains("10.96.0.10:80/TCP"),
        "a Service was lost:\n{listed}"
    );
    assert_eq!(healthz(agent.healthz), Some(200));
    drop(idle);
}

#[test]
#[ignore = "needs root"]
fn half_sent_requests_are_closed_by_the_agent_within_the_timeout() {
    require_root();
    raise_own_nofile();
    let world = World::new("gslow");
    let root = world.bpf_root();
    let mut agent = world.agent("slow", &root, &[]);
    agent.wait_healthy();

    let mut half: Vec<TcpStream> = (0..2000)
        .filter_map(|_| {
            let mut s = TcpStream::connect_timeout(&agent.healthz, Duration::from_secs(2)).ok()?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").ok()?;
            s.set_nonblocking(true).ok()?;
            Some(s)
        })
        .collect();
    assert!(half.len() >= 1900, "only {} connections opened", half.len());
    assert_eq!(
        healthz(agent.healthz),
        Some(200),
        "health answers meanwhile"
    );

    // Idle and header timeouts are 5 s: all closed well within 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !half.is_empty() && Instant::now() < deadline {
        half.retain_mut(still_open);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        half.is_empty(),
        "{} connections still open after 10 s",
        half.len()
    );
}

/// The agent's resident memory in KiB (VmRSS of /proc/PID/status).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
#[ignore = "needs root"]
fn ten_thousand_half_sent_requests_leave_the_agents_memory_within_20_mb_of_the_start() {
    require_root();
    raise_own_nofile();
    let world = World::new("grss");
    let root = world.bpf_root();
    let mut agent = world.agent("rss", &root, &[]);
    agent.wait_healthy();
    // Warm up: the allocator's arenas and the runtime's first connections.
    for _ in 0..50 {
        healthz(agent.healthz);
    }
    let start = rss_kib(agent.pid());

    let mut half = Vec::new();
    let mut peak = start;
    for i in 0..10_000 {
        if let Ok(mut s) = TcpStream::connect_timeout(&agent.healthz, Duration::from_secs(2)) {
            // A request head cut short, with a header of a few KiB.
            let partial = format!(
                "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}",
                "a".repeat(4000)
            );
            if s.write_all(partial.as_bytes()).is_ok() {
                half.push(s);
            }
        }
        if i % 1000 == 999 {
            peak = peak.max(rss_kib(agent.pid()));
        }
    }
    assert!(half.len() >= 9_000, "only {} requests sent", half.len());
    assert_eq!(
        healthz(agent.healthz),
        Some(200),
        "health answers meanwhile"
    );
    drop(half);

    // Closed by the clients; the agent's timeouts are 5 s.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut now = rss_kib(agent.pid());
    while now > start + 20 * 1024 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        now = rss_kib(agent.pid());
    }
    eprintln!("agent VmRSS: start {start} KiB, peak {peak} KiB, after {now} KiB");
    assert!(
        now <= start + 20 * 1024,
        "VmRSS {now} KiB after the requests closed, {start} KiB at the start (peak {peak} KiB)"
    );
    assert_eq!(healthz(agent.healthz), Some(200));
}

/// Whether the agent has not closed `stream` yet (reads what it sent).
fn still_open(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}
