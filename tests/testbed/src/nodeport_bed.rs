//! A complete north-south bed: the multi-node [`Cluster`], identity servers
//! (reporting the peer they saw) on every pod, the caller's manifest, and
//! a kpr agent per node running inside the node's namespace with its own
//! bpf root, cgroup and `--devices` (or none: the agent detects the node's
//! devices). Shared by `tests/nodeport*.rs` (through
//! tests/support/nodeport.rs) and `benches/nodeport.rs`.
//!
//! Fields drop in declaration order: the agents (and their pins and
//! attachments) first, then the servers, the cgroups, the network and the
//! directory.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::agent::AgentProcess;
use super::cgroup::TestCgroup;
use super::cluster::{Cluster, ClusterNode, ClusterPlan};
use super::error::{Result, TestbedError};
use super::server::Server;
use super::sweep::sweep_stale;
use kpr::datapath::ct::{CtMap, NodePortStats};
use kpr::datapath::layout::CtRecord;
use kpr::datapath::nodeport::{attached_devices, AttachedDevice, TcAttach};

/// Port of the TCP identity servers on every pod.
pub const POD_TCP: u16 = 8080;
/// Port of the UDP identity servers on every pod.
pub const POD_UDP: u16 = 5353;

/// A NodePort Service `namespace/name` (clusterIP 10.96.0.10; TCP 80 on
/// node port `tcp_node_port` to pods' [`POD_TCP`], UDP 53 on `udp_node_port`
/// to [`POD_UDP`]) and one EndpointSlice with `endpoints` (YAML list items,
/// one `- {addresses: [...], nodeName: ...}` per line).
pub fn nodeport_manifest(
    namespace: &str,
    name: &str,
    tcp_node_port: u16,
    udp_node_port: u16,
    endpoints: &str,
) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: {POD_TCP}, nodePort: {tcp_node_port}}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: {POD_UDP}, nodePort: {udp_node_port}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: {namespace}, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports:
- {{name: http, protocol: TCP, port: {POD_TCP}}}
- {{name: dns, protocol: UDP, port: {POD_UDP}}}
endpoints:
{endpoints}"#
    )
}

/// The environment variable that runs every bed's agents with
/// `--tc-attach <its value>` (`tcx` or `legacy`) unless a test gives
/// `--tc-attach` itself: CI runs the north-south suites once without it
/// (tcx on its kernel) and once with `legacy` (classic tc). The bed checks
/// that the agents attached that way.
pub const TC_ATTACH_ENV: &str = "KPR_TEST_TC_ATTACH";

/// `--tc-attach` from [`TC_ATTACH_ENV`]; None when unset or when
/// `extra_args` choose it.
fn tc_attach_from_env(extra_args: &[&str]) -> Result<Option<TcAttach>> {
    let Ok(value) = std::env::var(TC_ATTACH_ENV) else {
        return Ok(None);
    };
    if extra_args.contains(&"--tc-attach") {
        return Ok(None);
    }
    match value.as_str() {
        "tcx" => Ok(Some(TcAttach::Tcx)),
        "legacy" => Ok(Some(TcAttach::Legacy)),
        _ => Err(TestbedError::InvalidName {
            name: value,
            why: "KPR_TEST_TC_ATTACH is tcx or legacy",
        }),
    }
}

/// A running bed; everything is removed on Drop.
pub struct NodePortBed {
    /// The agents, node1's first.
    pub agents: Vec<AgentProcess>,
    servers: Vec<Server>,
    cgroups: Vec<TestCgroup>,
    /// The network.
    pub cluster: Cluster,
    dir: tempfile::TempDir,
    exe: PathBuf,
}

impl NodePortBed {
    /// Builds the cluster of `plan` (after sweeping leftovers of `prefix`,
    /// 1..=7 of `[a-z0-9]`),
    /// writes `manifest(&cluster)` and starts `exe agent` on every node
    /// with `--node-name nodeN --node-ip <ext ip> --devices eth-c,eth-n`
    /// (and `--node-ip <ext IPv6>` on a dual-stack plan, whose pods'
    /// IPv6 addresses get identity servers too) and `extra_args`; returns
    /// once every agent is healthy.
    pub fn start(
        prefix: &str,
        exe: &Path,
        plan: &ClusterPlan,
        manifest: impl Fn(&Cluster) -> String,
        extra_args: &[&str],
    ) -> Result<NodePortBed> {
        NodePortBed::launch(prefix, exe, plan, manifest, extra_args, true)
    }

    /// Like [`NodePortBed::start`], with agents started without
    /// `--devices`: each detects its node's devices. (Safe: every agent
    /// runs in its node's namespace, whose links the bed created.)
    pub fn start_detecting_devices(
        prefix: &str,
        exe: &Path,
        plan: &ClusterPlan,
        manifest: impl Fn(&Cluster) -> String,
        extra_args: &[&str],
    ) -> Result<NodePortBed> {
        NodePortBed::launch(prefix, exe, plan, manifest, extra_args, false)
    }

    fn launch(
        prefix: &str,
        exe: &Path,
        plan: &ClusterPlan,
        manifest: impl Fn(&Cluster) -> String,
        extra_args: &[&str],
        name_devices: bool,
    ) -> Result<NodePortBed> {
        // The node cgroups are `<prefix>1` and `<prefix>2`.
        if prefix.len() >= kpr::selftest::prefix::MAX_PREFIX_LEN {
            return Err(TestbedError::InvalidName {
                name: prefix.to_string(),
                why: "a NodePort bed prefix is 1 to 7 characters of [a-z0-9]",
            });
        }
        let tc_attach = tc_attach_from_env(extra_args)?;
        sweep_stale(prefix)?;
        let cluster = Cluster::build(prefix, plan)?;
        let mut servers = Vec::new();
        for node in cluster.nodes() {
            let v6 = node.pod_ips6().into_iter().map(IpAddr::V6);
            let v6 = v6.filter(|_| cluster.dual_stack());
            for ip in node.pod_ips().iter().map(|ip| IpAddr::V4(*ip)).chain(v6) {
                servers.push(Server::tcp_reporting_peer(
                    node.pods(),
                    SocketAddr::new(ip, POD_TCP),
                    None,
                )?);
                servers.push(Server::udp_reporting_peer(
                    node.pods(),
                    SocketAddr::new(ip, POD_UDP),
                    None,
                )?);
            }
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("kpr-{prefix}-"))
            .tempdir()
            .map_err(|e| TestbedError::io("creating a temporary directory", e))?;
        let manifests = dir.path().join("manifests");
        std::fs::create_dir(&manifests)
            .map_err(|e| TestbedError::io("creating the manifests directory", e))?;
        std::fs::write(manifests.join("services.yaml"), manifest(&cluster))
            .map_err(|e| TestbedError::io("writing the manifest", e))?;
        let mut bed = NodePortBed {
            agents: Vec::new(),
            servers,
            cgroups: Vec::new(),
            cluster,
            dir,
            exe: exe.to_path_buf(),
        };
        for n in [1u8, 2] {
            let node = bed.cluster.node(n);
            // Socket LB needs a cgroup: an empty one of its own per node.
            let cgroup = TestCgroup::create(&format!("{prefix}{n}"))?;
            let name = format!("node{n}");
            let ip = node.ext_ip().to_string();
            let ip6 = node.ext_ip6().to_string();
            let devices = node.devices().join(",");
            let mut args = vec!["--node-name", &name, "--node-ip", &ip];
            if bed.cluster.dual_stack() {
                args.extend(["--node-ip", &ip6]);
            }
            if name_devices {
                args.extend(["--devices", &devices]);
            }
            args.extend(["--ct-gc-interval", "1s"]);
            args.extend_from_slice(extra_args);
            if let Some(mode) = tc_attach {
                args.extend(["--tc-attach", mode.as_str()]);
            }
            let agent = AgentProcess::start_in_netns(
                exe,
                &manifests,
                cgroup.path(),
                &bed.bpf_root(n),
                &args,
                node.ns(),
            )?;
            bed.cgroups.push(cgroup);
            bed.agents.push(agent);
        }
        for agent in &mut bed.agents {
            agent.wait_healthy(Duration::from_secs(30))?;
        }
        if let Some(mode) = tc_attach {
            for n in [1u8, 2] {
                let found = bed.attached_devices(n)?;
                if found.is_empty() || found.iter().any(|d| d.attach != mode) {
                    return Err(TestbedError::Agent(format!(
                        "node{n}: {TC_ATTACH_ENV}={} but attached {found:?}",
                        mode.as_str()
                    )));
                }
            }
        }
        Ok(bed)
    }

    /// Node 1 or 2 (panics otherwise, see [`Cluster::node`]).
    pub fn node(&self, n: u8) -> &ClusterNode {
        self.cluster.node(n)
    }

    /// Node `n`'s agent.
    pub fn agent(&mut self, n: u8) -> &mut AgentProcess {
        &mut self.agents[usize::from(n - 1)]
    }

    /// Node `n`'s agent's --cgroup: a process in it (and in the node's
    /// namespace) is a host process of that node to kpr.
    pub fn cgroup(&self, n: u8) -> &TestCgroup {
        &self.cgroups[usize::from(n - 1)]
    }

    /// Runs `spec` in a probe process in node `n`'s agent's cgroup and in
    /// `netns` (the node's own, or a pod namespace), as `kpr probe` does.
    pub fn probe_in_cgroup(
        &self,
        n: u8,
        netns: &super::netns::Netns,
        spec: &super::probe::ProbeSpec,
    ) -> Result<super::probe::ProbeResult> {
        super::launch::run_probe(
            &self.exe,
            &["probe", "--spec"],
            netns,
            Some(self.cgroup(n)),
            spec,
            Duration::from_secs(20),
        )
    }

    /// Node `n`'s agent's --bpf-root.
    pub fn bpf_root(&self, n: u8) -> PathBuf {
        self.dir.path().join(format!("bpf-node{n}"))
    }

    /// Node `n`'s conntrack entries.
    pub fn ct(&self, n: u8) -> Result<Vec<CtRecord>> {
        CtMap::open(&self.bpf_root(n))
            .and_then(|ct| ct.entries())
            .map_err(|e| TestbedError::Agent(format!("reading node{n}'s conntrack: {e:#}")))
    }

    /// Node `n`'s north-south counters.
    pub fn stats(&self, n: u8) -> Result<NodePortStats> {
        NodePortStats::read(&self.bpf_root(n))
            .map_err(|e| TestbedError::Agent(format!("reading node{n}'s counters: {e:#}")))
    }

    /// Runs `kpr ARGS...` and returns its stdout.
    pub fn kpr(&self, args: &[&str]) -> Result<String> {
        let out = std::process::Command::new(&self.exe)
            .args(args)
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

    /// Node `n`'s north-south attachments, read inside its namespace (a
    /// classic tc filter is found by its device's name there).
    pub fn attached_devices(&self, n: u8) -> Result<Vec<AttachedDevice>> {
        let root = self.bpf_root(n);
        self.node(n)
            .ns()
            .enter_thread(move || attached_devices(&root))
    }

    /// The directory holding the manifests and bpf roots.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The identity servers, TCP and UDP per pod, in pod order.
    pub fn servers(&self) -> &[Server] {
        &self.servers
    }

    /// Both nodes' counters and every server's hits, for a failing test's
    /// message: where a lost packet went missing.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for n in [1u8, 2] {
            out.push_str(&format!("node{n}: {:?}\n", self.stats(n)));
        }
        for s in &self.servers {
            out.push_str(&format!(
                "{} ({}): {} hits\n",
                s.addr(),
                s.identity(),
                s.hits()
            ));
        }
        out
    }
}
