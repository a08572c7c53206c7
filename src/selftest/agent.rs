//! A kpr agent run as a child process against a bed: its own bpf root, the
//! bed's cgroup, manifests in a directory, metrics and health on free
//! loopback ports. Stopped (SIGTERM, then SIGKILL) and its pins removed on
//! Drop, so a failing test leaves no attachment behind.
//!
//! An agent in the caller's own network namespace (no `netns`) shares the
//! machine's devices: it gets `--devices=` (north-south off) unless the
//! caller names devices, so that device detection never attaches to an
//! interface the test did not create.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use super::error::{Result, TestbedError};
use super::netns::Netns;

/// A running `kpr agent` child process.
pub struct AgentProcess {
    child: Option<Child>,
    exe: PathBuf,
    /// The agent's --bpf-root.
    pub bpf_root: PathBuf,
    /// The agent's --cgroup.
    pub cgroup: PathBuf,
    /// The agent's --manifests; None runs it against the Kubernetes API
    /// (its `--kubeconfig` among the extra arguments).
    pub manifests: Option<PathBuf>,
    /// Where the agent serves /metrics.
    pub metrics_addr: SocketAddr,
    /// Where the agent serves /healthz.
    pub healthz_addr: SocketAddr,
    extra_args: Vec<String>,
    /// Extra environment of the agent process.
    pub env: Vec<(String, String)>,
    /// The network namespace the agent runs in (its pinned file); None:
    /// the test's own. Metrics and health are then reached from inside it.
    pub netns: Option<PathBuf>,
    /// Pass `--devices=` (no netns of its own, no --devices given, and a
    /// version that has device detection).
    north_south_off: bool,
    log: PathBuf,
}

/// Whether an agent started with `extra_args` in `netns` must be told
/// `--devices=`: it would otherwise detect the devices of the namespace
/// the test runs in, which the test did not create.
fn needs_north_south_off(netns: Option<&Path>, extra_args: &[&str]) -> bool {
    netns.is_none() && !extra_args.iter().any(|a| a.starts_with("--devices"))
}

/// A free loopback TCP port (bound and released; good enough for tests).
pub fn free_loopback_addr() -> Result<SocketAddr> {
    let l =
        TcpListener::bind("127.0.0.1:0").map_err(|e| TestbedError::io("binding 127.0.0.1:0", e))?;
    l.local_addr()
        .map_err(|e| TestbedError::io("local_addr", e))
}

impl AgentProcess {
    /// Starts `exe agent` with the given paths; `extra_args` are appended.
    /// The agent's stderr goes to `<bpf_root>.log`.
    pub fn start(
        exe: &Path,
        manifests: &Path,
        cgroup: &Path,
        bpf_root: &Path,
        extra_args: &[&str],
    ) -> Result<AgentProcess> {
        AgentProcess::launch(
            exe,
            Some(manifests),
            cgroup,
            bpf_root,
            extra_args,
            &[],
            None,
        )
    }

    /// Like [`AgentProcess::start`], with the agent inside network
    /// namespace `netns` (it joins between fork and exec, so its devices,
    /// routes and loopback are the namespace's).
    pub fn start_in_netns(
        exe: &Path,
        manifests: &Path,
        cgroup: &Path,
        bpf_root: &Path,
        extra_args: &[&str],
        netns: &Netns,
    ) -> Result<AgentProcess> {
        AgentProcess::launch(
            exe,
            Some(manifests),
            cgroup,
            bpf_root,
            extra_args,
            &[],
            Some(netns.path()),
        )
    }

    /// Like [`AgentProcess::start`], for a kpr from before device
    /// detection (there no `--devices` meant north-south off, and
    /// `--devices=` is refused): nothing is added to `extra_args`.
    pub fn start_before_detection(
        exe: &Path,
        manifests: &Path,
        cgroup: &Path,
        bpf_root: &Path,
        extra_args: &[&str],
    ) -> Result<AgentProcess> {
        let mut agent = AgentProcess::new(
            exe,
            Some(manifests),
            cgroup,
            bpf_root,
            extra_args,
            &[],
            None,
        )?;
        agent.north_south_off = false;
        agent.spawn()?;
        Ok(agent)
    }

    /// Like [`AgentProcess::start`], with extra environment variables.
    pub fn start_with_env(
        exe: &Path,
        manifests: &Path,
        cgroup: &Path,
        bpf_root: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<AgentProcess> {
        AgentProcess::launch(
            exe,
            Some(manifests),
            cgroup,
            bpf_root,
            extra_args,
            env,
            None,
        )
    }

    /// Starts `exe agent` against the API server of `kubeconfig` as node
    /// `node_name`; `extra_args` are appended.
    pub fn start_kubernetes(
        exe: &Path,
        kubeconfig: &Path,
        node_name: &str,
        cgroup: &Path,
        bpf_root: &Path,
        extra_args: &[&str],
    ) -> Result<AgentProcess> {
        let kubeconfig = kubeconfig.to_string_lossy();
        let mut args = vec!["--kubeconfig", &kubeconfig, "--node-name", node_name];
        args.extend_from_slice(extra_args);
        AgentProcess::launch(exe, None, cgroup, bpf_root, &args, &[], None)
    }

    /// Like [`AgentProcess::start_kubernetes`], with the agent inside
    /// network namespace `netns` (the API server must listen there).
    pub fn start_kubernetes_in_netns(
        exe: &Path,
        kubeconfig: &Path,
        node_name: &str,
        cgroup: &Path,
        bpf_root: &Path,
        extra_args: &[&str],
        netns: &Netns,
    ) -> Result<AgentProcess> {
        let kubeconfig = kubeconfig.to_string_lossy();
        let mut args = vec!["--kubeconfig", &kubeconfig, "--node-name", node_name];
        args.extend_from_slice(extra_args);
        AgentProcess::launch(exe, None, cgroup, bpf_root, &args, &[], Some(netns.path()))
    }

    fn launch(
        exe: &Path,
        manifests: Option<&Path>,
        cgroup: &Path,
        bpf_root: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
        netns: Option<&Path>,
    ) -> Result<AgentProcess> {
        let mut agent =
            AgentProcess::new(exe, manifests, cgroup, bpf_root, extra_args, env, netns)?;
        agent.spawn()?;
        Ok(agent)
    }

    fn new(
        exe: &Path,
        manifests: Option<&Path>,
        cgroup: &Path,
        bpf_root: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
        netns: Option<&Path>,
    ) -> Result<AgentProcess> {
        Ok(AgentProcess {
            north_south_off: needs_north_south_off(netns, extra_args),
            netns: netns.map(Path::to_path_buf),
            child: None,
            exe: exe.to_path_buf(),
            bpf_root: bpf_root.to_path_buf(),
            cgroup: cgroup.to_path_buf(),
            manifests: manifests.map(Path::to_path_buf),
            metrics_addr: free_loopback_addr()?,
            healthz_addr: free_loopback_addr()?,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: bpf_root.with_extension("log"),
        })
    }

    /// The exit status once the agent has exited by itself (waits up to `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| TestbedError::io(format!("opening {}", self.log.display()), e))?;
        let mut command = Command::new(&self.exe);
        // Opened before the fork, closed (close-on-exec) by the exec.
        let netns_fd = self
            .netns
            .as_ref()
            .map(|p| {
                std::fs::File::open(p)
                    .map_err(|e| TestbedError::io(format!("opening {}", p.display()), e))
            })
            .transpose()?;
        if let Some(fd) = &netns_fd {
            let raw = fd.as_raw_fd();
            crate::sys::enter_before_exec(&mut command, None, raw);
        }
        command.arg("agent");
        if let Some(manifests) = &self.manifests {
            command.arg("--manifests").arg(manifests);
        }
        let child = command
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--bpf-root")
            .arg(&self.bpf_root)
            .arg("--metrics-addr")
            .arg(self.metrics_addr.to_string())
            .arg("--healthz-addr")
            .arg(self.healthz_addr.to_string())
            .args(self.north_south_off.then_some("--devices="))
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| TestbedError::io(format!("starting {} agent", self.exe.display()), e))?;
        self.child = Some(child);
        Ok(())
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until /healthz answers 200 (the first complete sync is done).
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(TestbedError::Agent(format!(
                        "agent exited with {status}:\n{}",
                        self.log()
                    )));
                }
            }
            if let Ok((200, _)) = self.get(self.healthz_addr, "/healthz") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(TestbedError::Agent(format!(
                    "agent not healthy within {timeout:?}:\n{}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's /metrics text.
    pub fn metrics(&self) -> Result<String> {
        let (status, body) = self.get(self.metrics_addr, "/metrics")?;
        if status != 200 {
            return Err(TestbedError::Agent(format!("/metrics answered {status}")));
        }
        Ok(body)
    }

    /// The agent's /status JSON (what `kpr status` reads from it).
    pub fn status_json(&self) -> Result<serde_json::Value> {
        let (status, body) = self.get(self.metrics_addr, "/status")?;
        if status != 200 {
            return Err(TestbedError::Agent(format!("/status answered {status}")));
        }
        serde_json::from_str(&body)
            .map_err(|e| TestbedError::Agent(format!("/status is not JSON: {e}")))
    }

    /// The value of the first sample of `metric` whose labels contain `labels`.
    pub fn metric_value(&self, metric: &str, labels: &str) -> Result<Option<f64>> {
        Ok(self.metrics()?.lines().find_map(|line| {
            let rest = line.strip_prefix(metric)?;
            let (head, value) = rest.rsplit_once(' ')?;
            (head.is_empty() || head.starts_with('{')).then_some(())?;
            head.contains(labels).then(|| value.parse().ok())?
        }))
    }

    /// A bounded HTTP GET to the agent, from inside its namespace.
    fn get(&self, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
        let Some(netns) = &self.netns else {
            return http_get(addr, path);
        };
        let fd = std::fs::File::open(netns)
            .map_err(|e| TestbedError::io(format!("opening {}", netns.display()), e))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    TestbedError::io(format!("setns into {}", netns.display()), e.into())
                })?;
                http_get(addr, path)
            })
            .join()
            .unwrap_or_else(|_| Err(TestbedError::Agent("HTTP thread panicked".into())))
        })
    }

    /// Kills the agent with SIGKILL, leaving its pins (a crash).
    pub fn kill(&mut self) -> Result<()> {
        self.signal(nix::sys::signal::Signal::SIGKILL)
    }

    /// Stops the agent with SIGTERM (bounded wait, then SIGKILL).
    pub fn stop(&mut self) -> Result<()> {
        self.signal(nix::sys::signal::Signal::SIGTERM)
    }

    fn signal(&mut self, sig: nix::sys::signal::Signal) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, sig);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Ok(());
                }
            }
        }
    }

    /// Starts the agent again with the same arguments (after kill or stop).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.stop();
        if let Err(e) = crate::datapath::loader::cleanup(&self.bpf_root) {
            eprintln!("testbed: cleaning up {}: {e:#}", self.bpf_root.display());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A bounded HTTP GET: (status, body). See [`crate::http::blocking_get`].
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    crate::http::blocking_get(addr, path)
        .map_err(|e| TestbedError::Agent(format!("GET http://{addr}{path}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_sharing_the_callers_namespace_has_north_south_off_unless_devices_are_named() {
        assert!(needs_north_south_off(None, &["--ct-gc-interval", "1s"]));
        assert!(!needs_north_south_off(None, &["--devices", "eth-c"]));
        assert!(!needs_north_south_off(None, &["--devices=eth-c"]));
        let own = Path::new("/run/netns/t");
        assert!(!needs_north_south_off(Some(own), &[]));
    }
}
