//! The agent's configuration: what `kpr agent` runs with, built from its
//! flags (defaults resolved from the environment, combinations checked) so
//! that the rest of the agent never reads the command line.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cli::AgentArgs;
use crate::datapath::loader::MapSizes;
use crate::datapath::nodeport::{
    Acceleration, CtTimeouts, DeviceSelection, NodePortConfig, NodePortMode,
};
use crate::features::KprMode;
use crate::host;
use crate::maglev::MaglevParams;
use crate::model::LbAlgorithm;
use crate::source::kube::ApiConfig;
use crate::source::manifests::{self, ManifestOptions};

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// Standalone: manifest files and directories, watched.
    Manifests(ManifestOptions),
    /// The Kubernetes API.
    Kubernetes(KubeSourceConfig),
}

/// The Kubernetes source's settings.
#[derive(Clone, Debug)]
pub struct KubeSourceConfig {
    pub api: ApiConfig,
    /// Shortest time between two syncs: bursts of changes are coalesced
    /// (kube-proxy's minSyncPeriod).
    pub min_sync_period: Duration,
    /// Period of full resyncs (kube-proxy's syncPeriod).
    pub sync_period: Duration,
}

/// Everything `kpr agent` needs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Where Services and EndpointSlices come from.
    pub source: SourceConfig,
    /// cgroup v2 directory the socket-LB programs are attached to.
    pub cgroup: PathBuf,
    /// bpffs directory of the pinned maps and links.
    pub bpf_root: PathBuf,
    /// Address of /metrics and /status.
    pub metrics_addr: SocketAddr,
    /// Address of /healthz and /livez.
    pub healthz_addr: SocketAddr,
    /// Per-frontend metric labels up to this many Services (0: never).
    pub metrics_frontend_labels_max: usize,
    /// Capacities of maps when they are created.
    pub map_sizes: MapSizes,
    /// The load balancer's maps grow when the cluster outgrows them (no
    /// explicit --lb-map-max).
    pub map_growth: bool,
    /// Whether a missing kernel feature is fatal.
    pub kpr_mode: KprMode,
    /// This node's name (standalone mode: decides which endpoints are local).
    pub node_name: String,
    /// Node addresses added to those of the Node object (NodePort frontends).
    pub node_ips: Vec<IpAddr>,
    /// `--node-zone`: the node's zone over its Node's label.
    pub node_zone: Option<String>,
    /// Address the health check node port listeners bind to.
    pub health_check_bind: IpAddr,
    /// The north-south datapath (on the devices `--devices` names, or on
    /// the detected ones without it); None: off (`--devices=`).
    pub nodeport: Option<NodePortConfig>,
    /// How often expired conntrack entries are removed.
    pub ct_gc_interval: Duration,
    /// North-south backend selection of Services without the annotation.
    pub lb_algorithm: LbAlgorithm,
    /// Maglev table size and seed (the same on every node).
    pub maglev: MaglevParams,
}

impl AgentConfig {
    /// What the flags say about the node, for [`super::node::node_context`].
    pub fn node_flags(&self) -> super::node::NodeFlags<'_> {
        super::node::NodeFlags {
            ips: &self.node_ips,
            zone: self.node_zone.as_deref(),
            lb_algorithm: self.lb_algorithm,
        }
    }

    /// The configuration `kpr agent` runs with: --cgroup defaults to the
    /// root of the cgroup2 mount, --node-name to $NODE_NAME, else the
    /// hostname; `--devices` absent means detected devices, empty means
    /// off, and flags that need the north-south datapath are refused
    /// when it is off.
    pub fn from_args(args: AgentArgs) -> Result<AgentConfig> {
        let cgroup = match args.cgroup {
            Some(c) => c,
            None => host::cgroup2_mount()
                .context("finding the cgroup2 mount for the default --cgroup")?,
        };
        let node_name = match args.node_name.or_else(|| std::env::var("NODE_NAME").ok()) {
            Some(n) => n,
            None => nix::unistd::gethostname()
                .context("no --node-name, no $NODE_NAME and no hostname")?
                .to_string_lossy()
                .into_owned(),
        };
        let source = if args.manifests.is_empty() {
            SourceConfig::Kubernetes(KubeSourceConfig {
                api: ApiConfig {
                    kubeconfig: args.kubeconfig,
                    api_server: args.k8s_api_server,
                },
                min_sync_period: args.min_sync_period,
                sync_period: args.sync_period,
            })
        } else {
            SourceConfig::Manifests(ManifestOptions {
                paths: manifests::resolve_paths(&args.manifests).map_err(anyhow::Error::msg)?,
                debounce: Duration::from_millis(args.debounce_ms),
                limits: manifests::Limits {
                    max_file_bytes: args.manifest_max_file_bytes,
                    max_document_bytes: args.manifest_max_document_bytes,
                    max_depth: args.manifest_max_depth,
                },
                rules: manifests::Rules {
                    node_port_range: (
                        args.service_node_port_range.min,
                        args.service_node_port_range.max,
                    ),
                },
                node_name: node_name.clone(),
            })
        };
        let secs = |d: Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
        // The size was checked by the flag's parser; this cannot fail.
        let maglev = MaglevParams::new(args.maglev_table_size, args.maglev_hash_seed)?;
        let nodeport = device_selection(args.devices).map(|devices| NodePortConfig {
            devices,
            mode: args.nodeport_mode,
            acceleration: args.nodeport_acceleration,
            tc_attach: args.tc_attach,
            snat_ports: args.nodeport_snat_ports,
            no_backend: args.service_no_backend_response,
            redirect_peer: args.nodeport_redirect_peer,
            timeouts: CtTimeouts {
                tcp_syn: secs(args.ct_tcp_syn_timeout),
                tcp: secs(args.ct_tcp_timeout),
                tcp_closing: secs(args.ct_tcp_closing_timeout),
                udp: secs(args.ct_udp_timeout),
            },
            maglev,
        });
        if nodeport.is_none()
            && (args.nodeport_mode != NodePortMode::Snat
                || args.nodeport_acceleration != Acceleration::Disabled)
        {
            anyhow::bail!(
                "--nodeport-mode and --nodeport-acceleration need the north-south datapath, \
                 which --devices= (empty) turns off"
            );
        }
        if nodeport.is_none() && args.lb_algorithm == LbAlgorithm::Maglev {
            anyhow::bail!(
                "--lb-algorithm maglev needs the north-south datapath (it selects backends \
                 for north-south traffic), which --devices= (empty) turns off"
            );
        }
        let lb_map_size = args.lb_map_max.unwrap_or(args.lb_map_initial);
        Ok(AgentConfig {
            source,
            cgroup,
            bpf_root: args.bpf_root.bpf_root,
            metrics_addr: args.metrics_addr,
            healthz_addr: args.healthz_addr,
            metrics_frontend_labels_max: args.metrics_frontend_labels_max,
            map_sizes: MapSizes {
                services: lb_map_size,
                backends: lb_map_size,
                source_ranges: lb_map_size,
                ct: args.ct_map_max,
                maglev: lb_map_size,
                ..MapSizes::default()
            },
            map_growth: args.lb_map_max.is_none(),
            nodeport,
            ct_gc_interval: args.ct_gc_interval,
            kpr_mode: args.kube_proxy_replacement,
            node_name,
            node_ips: args.node_ips,
            node_zone: args.node_zone.filter(|z| !z.is_empty()),
            health_check_bind: args.health_check_bind_address,
            lb_algorithm: args.lb_algorithm,
            maglev,
        })
    }
}

/// What `--devices` asks for: absent, the node's devices, detected; empty
/// (`--devices=`, or only empty entries), nothing: the north-south
/// datapath is off; else the names and patterns given.
fn device_selection(flag: Option<Vec<String>>) -> Option<DeviceSelection> {
    match flag {
        None => Some(DeviceSelection::Detected),
        Some(entries) => {
            let named: Vec<String> = entries.into_iter().filter(|e| !e.is_empty()).collect();
            (!named.is_empty()).then_some(DeviceSelection::Named(named))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(items: &[&str]) -> Option<Vec<String>> {
        Some(items.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn no_devices_flag_detects_an_empty_one_turns_north_south_off() {
        assert_eq!(device_selection(None), Some(DeviceSelection::Detected));
        assert_eq!(device_selection(entries(&[])), None);
        assert_eq!(device_selection(entries(&[""])), None);
        assert_eq!(
            device_selection(entries(&["eth0", "", "eth+"])),
            Some(DeviceSelection::Named(vec!["eth0".into(), "eth+".into()]))
        );
    }
}
