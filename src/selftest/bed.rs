//! A complete socket-LB bed: the two-namespace topology with identity
//! servers on every backend, a test cgroup, manifests in a temporary
//! directory and a kpr agent attached to the cgroup. Shared by `kpr
//! selftest`, the integration tests and the datapath benchmark.
//!
//! Fields drop in declaration order: the agent (and its pins) first, then
//! the servers, the namespaces, the cgroup and the directory.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::agent::AgentProcess;
use super::cgroup::TestCgroup;
use super::error::{Result, TestbedError};
use super::launch::run_probe;
use super::probe::{ProbeResult, ProbeSpec};
use super::server::Server;
use super::topology::Topology;
use super::topology::{backend_v4, backend_v6};

/// Port of the TCP identity servers on every backend address.
pub const BACKEND_TCP_PORT: u16 = 8080;
/// Port of the UDP identity servers on every backend address.
pub const BACKEND_UDP_PORT: u16 = 5353;
/// Identity of the servers that answer on VIPs when nothing translated.
pub const UNTRANSLATED: &str = "untranslated";

/// What to build.
#[derive(Clone, Debug)]
pub struct BedPlan {
    /// Backends 1..=n on IPv4 (10.244.0.11, ...).
    pub v4_backends: u16,
    /// Backends 1..=n on IPv6 (fd00:10:244::11, ...).
    pub v6_backends: u16,
    /// VIPs that also get an "untranslated" TCP server (same port as the
    /// frontend) in the backends namespace, to tell untranslated traffic apart.
    pub untranslated_vips: Vec<SocketAddr>,
    /// Extra `kpr agent` arguments.
    pub agent_args: Vec<String>,
    /// Run the agent against this kubeconfig's API server as this node,
    /// instead of on the manifest.
    pub kubernetes: Option<(PathBuf, String)>,
}

impl Default for BedPlan {
    fn default() -> Self {
        BedPlan {
            v4_backends: 3,
            v6_backends: 2,
            untranslated_vips: Vec::new(),
            agent_args: Vec::new(),
            kubernetes: None,
        }
    }
}

/// A running bed; everything is removed on Drop.
pub struct SocketLbBed {
    /// The agent under test.
    pub agent: AgentProcess,
    /// Identity servers, TCP and UDP, on every backend address.
    pub servers: Vec<Server>,
    /// The namespaces.
    pub topo: Topology,
    /// The cgroup the agent attaches to; probes run inside it.
    pub cgroup: TestCgroup,
    dir: tempfile::TempDir,
    exe: PathBuf,
}

impl SocketLbBed {
    /// Builds the bed, writes `manifest` as `manifests/services.yaml`,
    /// starts `exe agent` and waits until it is healthy.
    pub fn start(prefix: &str, exe: &Path, manifest: &str, plan: &BedPlan) -> Result<SocketLbBed> {
        let topo = Topology::build(prefix)?;
        let cgroup = TestCgroup::create(prefix)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("kpr-{prefix}-"))
            .tempdir()
            .map_err(|e| TestbedError::io("creating a temporary directory", e))?;
        let mut servers = Vec::new();
        let backends = (1..=plan.v4_backends)
            .map(|n| backend_v4(n).map(IpAddr::V4))
            .chain((1..=plan.v6_backends).map(|n| backend_v6(n).map(IpAddr::V6)));
        for ip in backends {
            let ip = ip?;
            topo.add_backend_ip(ip)?;
            servers.push(Server::tcp(
                topo.backends(),
                SocketAddr::new(ip, BACKEND_TCP_PORT),
                None,
            )?);
            servers.push(Server::udp(
                topo.backends(),
                SocketAddr::new(ip, BACKEND_UDP_PORT),
                None,
            )?);
        }
        for vip in &plan.untranslated_vips {
            topo.add_untranslated_vip(vip.ip())?;
            servers.push(Server::tcp(
                topo.backends(),
                *vip,
                Some(UNTRANSLATED.into()),
            )?);
        }
        let manifests = dir.path().join("manifests");
        std::fs::create_dir(&manifests)
            .map_err(|e| TestbedError::io("creating the manifests directory", e))?;
        write_file(&manifests.join("services.yaml"), manifest)?;
        let args: Vec<&str> = plan.agent_args.iter().map(String::as_str).collect();
        let bpf_root = dir.path().join("bpf");
        let mut agent = match &plan.kubernetes {
            Some((kubeconfig, node)) => {
                // The bed's own copy: it lives as long as the bed (restarts
                // read it again) and goes with it.
                let own = dir.path().join("kubeconfig");
                std::fs::copy(kubeconfig, &own)
                    .map_err(|e| TestbedError::io("copying the kubeconfig", e))?;
                AgentProcess::start_kubernetes(exe, &own, node, cgroup.path(), &bpf_root, &args)?
            }
            None => AgentProcess::start(exe, &manifests, cgroup.path(), &bpf_root, &args)?,
        };
        agent.wait_healthy(Duration::from_secs(30))?;
        Ok(SocketLbBed {
            agent,
            servers,
            topo,
            cgroup,
            dir,
            exe: exe.to_path_buf(),
        })
    }

    /// The manifests directory the agent watches.
    pub fn manifests_dir(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    /// Replaces (or adds) a manifest file in the watched directory,
    /// atomically, as an editor or a ConfigMap update would.
    pub fn write_manifest(&self, name: &str, content: &str) -> Result<()> {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        write_file(&tmp, content)?;
        std::fs::rename(&tmp, self.manifests_dir().join(name))
            .map_err(|e| TestbedError::io(format!("renaming to {name}"), e))
    }

    /// Runs a probe in the client namespace, inside the bed's cgroup
    /// (translated) or outside it (untranslated).
    pub fn probe(&self, spec: &ProbeSpec, in_cgroup: bool) -> Result<ProbeResult> {
        run_probe(
            &self.exe,
            &["probe", "--spec"],
            self.topo.client(),
            in_cgroup.then_some(&self.cgroup),
            spec,
            Duration::from_secs(60),
        )
    }

    /// Reply identity -> count of `count` TCP requests to `target` from
    /// inside the cgroup; any failed request is an error naming the failures.
    pub fn tcp_spread(
        &self,
        target: SocketAddr,
        count: u32,
    ) -> Result<std::collections::BTreeMap<String, u64>> {
        let result = self.probe(
            &ProbeSpec::TcpRequests {
                target,
                count,
                timeout_ms: 2000,
            },
            true,
        )?;
        let report = result
            .as_requests()
            .ok_or_else(|| TestbedError::Agent("not a TCP requests report".into()))?;
        if !report.failures.is_empty() {
            return Err(TestbedError::Agent(format!(
                "requests to {target} failed: {:?}",
                report.failures
            )));
        }
        Ok(report.identities.clone())
    }

    /// `kpr svc list -o json` for the bed's bpf root.
    pub fn svc_list_json(&self) -> Result<serde_json::Value> {
        let out = self.kpr(&["svc", "list", "-o", "json"])?;
        serde_json::from_str(&out)
            .map_err(|e| TestbedError::Agent(format!("svc list output is not JSON: {e}: {out}")))
    }

    /// `kpr svc list` (table) for the bed's bpf root.
    pub fn svc_list(&self) -> Result<String> {
        self.kpr(&["svc", "list"])
    }

    fn kpr(&self, args: &[&str]) -> Result<String> {
        let out = std::process::Command::new(&self.exe)
            .args(args)
            .arg("--bpf-root")
            .arg(&self.agent.bpf_root)
            .output()
            .map_err(|e| TestbedError::io("running kpr", e))?;
        if !out.status.success() {
            return Err(TestbedError::Agent(format!(
                "kpr {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn write_file(path: &Path, content: &str) -> Result<()> {
    std::fs::write(path, content)
        .map_err(|e| TestbedError::io(format!("writing {}", path.display()), e))
}
