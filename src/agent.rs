//! The agent: loads and attaches the datapath, then keeps the maps equal to
//! the Services its source delivers, and reports through metrics and health.
//!
//! Stopping the agent (any signal, or SIGKILL) leaves programs attached and
//! maps pinned: translation goes on from the last synced state, and the next
//! agent takes over the same maps.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use tokio::sync::watch;

use crate::datapath::devices;
use crate::datapath::dsr::{self, DsrTable};
use crate::datapath::host_addrs::{self, HostAddrTable};
use crate::datapath::kernel::KernelMaps;
use crate::datapath::loader::{self, MapSizes};
use crate::datapath::maps::MapName;
use crate::datapath::netlink_events::NetlinkEvents;
use crate::datapath::nodeport::{self, NodePortConfig};
use crate::datapath::peer_devices::{self, PeerDeviceTable};
use crate::features::{self, KprMode};
use crate::healthcheck::HealthCheckServer;
use crate::http::{self, Health};
use crate::metrics::TrafficPolicy as MetricPolicy;
use crate::metrics::WatchKind;
use crate::metrics::{MapLabel, Metrics, SyncErrorReason};
use crate::reconcile::ServiceFrontends;
use crate::reconcile::{DesiredByService, Reconciler, RefusalReason};
use crate::source::kube::{self as kube_source, ApiConfig, WatchEvent};
use crate::source::manifests;
use crate::source::store::{Kind, ObjectStore, Watched};
use crate::status::{status_router, AgentStatus, DeviceStatus, StatusHandle};
use crate::translate::{
    self, HealthCheck, NoLocalEndpoints, NodeContext, ServiceTranslation, Skipped, TrafficPolicy,
    Translation,
};
use k8s_openapi::api::core::v1::Node;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// Standalone: manifest files and directories, watched.
    Manifests(Vec<PathBuf>),
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
    pub source: SourceConfig,
    pub cgroup: PathBuf,
    pub bpf_root: PathBuf,
    pub metrics_addr: SocketAddr,
    pub healthz_addr: SocketAddr,
    pub map_sizes: MapSizes,
    pub debounce: Duration,
    pub kpr_mode: KprMode,
    /// This node's name (standalone mode: decides which endpoints are local).
    pub node_name: String,
    /// Node addresses added to those of the Node object (NodePort frontends).
    pub node_ips: Vec<IpAddr>,
    /// Address the health check node port listeners bind to.
    pub health_check_bind: IpAddr,
    /// The north-south datapath (`--devices`); None: off.
    pub nodeport: Option<NodePortConfig>,
    /// How often expired conntrack entries are removed.
    pub ct_gc_interval: Duration,
    /// North-south backend selection of Services without the annotation.
    pub lb_algorithm: crate::model::LbAlgorithm,
    /// Maglev table size and seed (the same on every node).
    pub maglev: crate::maglev::MaglevParams,
}

/// The reconciler with the reporting around it: every sync is timed,
/// counted and reflected in health.
pub struct Syncer {
    reconciler: Reconciler<KernelMaps>,
    metrics: Arc<Metrics>,
    health: Health,
    status: StatusHandle,
    /// Refusals of the last sync, to log each only when it first appears.
    refused: BTreeSet<String>,
    /// The DSR map, kept in step with the services map after every sync
    /// that wrote to it (north-south datapath only).
    dsr: Option<DsrTable>,
    /// The DSR map may differ from the services map: just opened, or its
    /// last sync failed.
    dsr_stale: bool,
}

/// How a sync ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Synced {
    /// The maps hold everything the source asked for.
    Clean,
    /// The maps are written, but some Services were refused (capacity,
    /// conflicts); they keep their previous state.
    Refused,
    /// A map write failed; the maps are consistent but behind.
    Failed,
}

impl Synced {
    /// When to try again: soon after a write error; refusals only clear when
    /// something changes, so they are retried slowly.
    fn retry_at(self) -> Option<tokio::time::Instant> {
        let after = match self {
            Synced::Clean => return None,
            Synced::Refused => REFUSED_RETRY_PERIOD,
            Synced::Failed => RETRY_PERIOD,
        };
        Some(tokio::time::Instant::now() + after)
    }
}

impl Syncer {
    pub fn new(
        bpf_root: &Path,
        maglev: crate::maglev::MaglevParams,
        metrics: Arc<Metrics>,
        health: Health,
        status: StatusHandle,
    ) -> Result<Syncer> {
        let maps = KernelMaps::open(bpf_root).context("opening the pinned maps")?;
        let reconciler =
            Reconciler::with_maglev(maps, maglev).context("reading the pinned maps")?;
        let s = reconciler.snapshot();
        tracing::info!(
            frontends = s.frontends.len(),
            backends = s.backends.len(),
            "restored state from pinned maps"
        );
        Ok(Syncer {
            reconciler,
            metrics,
            health,
            status,
            refused: BTreeSet::new(),
            dsr: None,
            dsr_stale: true,
        })
    }

    /// Also keeps the DSR map pinned under `bpf_root` (created by the
    /// north-south datapath's load) in step with every sync.
    pub fn with_dsr(mut self, bpf_root: &Path) -> Result<Syncer> {
        self.dsr = Some(DsrTable::open(bpf_root)?);
        Ok(self)
    }

    /// Brings the DSR map to what the services map now holds, when the
    /// services map `changed` or the DSR map is stale. False when a write
    /// failed (logged and counted; the next sync retries).
    fn sync_dsr(&mut self, changed: bool) -> bool {
        let Some(table) = self.dsr.as_mut() else {
            return true;
        };
        if !changed && !self.dsr_stale {
            return true;
        }
        let desired = dsr::desired(self.reconciler.snapshot());
        let ok = match table.sync(&desired) {
            Ok(done) => {
                if done.written + done.deleted > 0 {
                    tracing::debug!(
                        written = done.written,
                        deleted = done.deleted,
                        "DSR map synced"
                    );
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "DSR map not synced; will retry");
                self.metrics.inc_sync_error(SyncErrorReason::MapUpdate);
                false
            }
        };
        self.metrics
            .set_map(MapLabel::Dsr, table.len(), table.capacity());
        self.dsr_stale = !ok;
        ok
    }

    /// Syncs the maps to `desired`; `complete` says the source delivered
    /// its whole state, so entries nobody claims may be pruned.
    pub fn sync_full(&mut self, desired: &DesiredByService, complete: bool) -> Synced {
        let started = Instant::now();
        let result = self.reconciler.sync_full(desired, complete);
        self.report(started, result)
    }

    /// Syncs the maps for the Services in `changes` only.
    pub fn sync_services(&mut self, changes: Vec<(String, ServiceFrontends)>) -> Synced {
        let started = Instant::now();
        let result = self.reconciler.sync_services(changes);
        self.report(started, result)
    }

    fn report(
        &mut self,
        started: Instant,
        result: Result<crate::reconcile::SyncOutcome, crate::reconcile::SyncError>,
    ) -> Synced {
        let elapsed = started.elapsed();
        self.metrics.observe_sync(elapsed);
        // A failed sync re-read the maps: what they hold may have moved.
        let changed = result
            .as_ref()
            .map_or(true, |o| o.writes > 0 || o.pruned_frontends > 0);
        let synced = match result {
            Ok(outcome) => {
                let refused: BTreeSet<String> =
                    outcome.refused.iter().map(|r| r.to_string()).collect();
                for (refusal, text) in outcome
                    .refused
                    .iter()
                    .zip(outcome.refused.iter().map(|r| r.to_string()))
                {
                    // Counted every time, logged when new: a refusal repeats
                    // on every retry until the cause goes away.
                    if !self.refused.contains(&text) {
                        tracing::error!("{text}");
                    }
                    self.metrics.inc_sync_error(match refusal.reason {
                        RefusalReason::Capacity { .. }
                        | RefusalReason::IdsExhausted
                        | RefusalReason::TooManyBackends { .. }
                        | RefusalReason::Maglev { .. } => SyncErrorReason::Capacity,
                        RefusalReason::FrontendConflict { .. } => SyncErrorReason::Source,
                    });
                }
                self.refused = refused;
                if outcome.writes > 0 || outcome.pruned_frontends > 0 {
                    tracing::info!(
                        services = outcome.applied_services,
                        writes = outcome.writes,
                        pruned = outcome.pruned_frontends,
                        elapsed_us = elapsed.as_micros() as u64,
                        "synced"
                    );
                }
                if outcome.refused.is_empty() {
                    Synced::Clean
                } else {
                    Synced::Refused
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "sync failed; will retry");
                self.metrics.inc_sync_error(SyncErrorReason::MapUpdate);
                Synced::Failed
            }
        };
        // A DSR map that lags only affects flows other nodes send here by
        // DSR: retried like a refusal, without failing health.
        let synced = if !self.sync_dsr(changed) && synced == Synced::Clean {
            Synced::Refused
        } else {
            synced
        };
        // Health follows the maps, not single Services: a Service the maps
        // refuse (too big, conflicting) must not make load balancers drain
        // the node and with it every other Service.
        let maps_ok = synced != Synced::Failed;
        self.metrics.record_sync_result(maps_ok, SystemTime::now());
        self.health.record_sync(maps_ok);
        self.status
            .record_sync(maps_ok, self.refused.iter().cloned().collect());
        self.update_gauges();
        synced
    }

    fn update_gauges(&self) {
        let r = &self.reconciler;
        let cap = r.capacity();
        self.metrics.set_services(r.service_count());
        self.metrics.set_frontends(r.snapshot().frontends.len());
        self.metrics.set_backends(r.snapshot().backends.len());
        self.metrics
            .set_map(MapLabel::Services, r.service_entries(), cap.services);
        self.metrics.set_map(
            MapLabel::Backends,
            r.snapshot().backends.len(),
            cap.backends,
        );
        self.metrics.set_map(
            MapLabel::SourceRanges,
            r.snapshot().source_range_entries(),
            cap.source_ranges,
        );
    }

    /// Refreshes the fill of the LRU maps (a key walk, so not on every sync).
    pub fn update_lru_gauges(&self) {
        let maps = self.reconciler.maps();
        for (name, label) in [
            (MapName::Affinity, MapLabel::Affinity),
            (MapName::SockRevNat, MapLabel::SockRevNat),
        ] {
            self.metrics
                .set_map(label, maps.entry_count(name), maps.max_entries(name));
        }
    }

    pub fn record_skipped(&self, skipped: &[Skipped]) {
        for s in skipped {
            tracing::warn!(object = %s.object, reason = %s.reason, detail = %s.detail, "skipped");
            self.metrics.inc_skipped(s.reason);
        }
    }
}

/// What translation says besides frontends, kept per Service so that
/// incremental syncs can update it: health check node ports to serve and
/// Local-policy frontends without a local endpoint.
#[derive(Default)]
struct PolicyState {
    health_checks: BTreeMap<String, HealthCheck>,
    no_local: BTreeMap<String, Vec<NoLocalEndpoints>>,
}

impl PolicyState {
    fn replace_all(&mut self, t: &Translation) {
        self.health_checks = t
            .health_checks
            .iter()
            .map(|h| (h.service.clone(), h.clone()))
            .collect();
        self.no_local.clear();
        for n in &t.no_local_endpoints {
            self.no_local
                .entry(n.service.service_key())
                .or_default()
                .push(n.clone());
        }
    }

    fn replace_service(&mut self, key: &str, t: &ServiceTranslation) {
        match &t.health_check {
            Some(h) => self.health_checks.insert(key.to_string(), h.clone()),
            None => self.health_checks.remove(key),
        };
        if t.no_local_endpoints.is_empty() {
            self.no_local.remove(key);
        } else {
            self.no_local
                .insert(key.to_string(), t.no_local_endpoints.clone());
        }
    }

    /// Publishes the no-local-endpoint counts and serves the health checks.
    async fn publish(&self, metrics: &Metrics, health_checks: &HealthCheckServer) {
        for (policy, label) in [
            (TrafficPolicy::Internal, MetricPolicy::Internal),
            (TrafficPolicy::External, MetricPolicy::External),
        ] {
            let n = self
                .no_local
                .values()
                .flatten()
                .filter(|n| n.policy == policy)
                .count();
            metrics.set_no_local_endpoints(label, n);
        }
        let checks: Vec<HealthCheck> = self.health_checks.values().cloned().collect();
        health_checks.update(&checks).await;
    }
}

/// The node's identity for translation: its name, zone label and
/// addresses (from its Node object) plus any --node-ip, and the agent's
/// --lb-algorithm.
pub fn node_context(
    node_name: &str,
    node: Option<&Node>,
    extra_ips: &[IpAddr],
    lb_algorithm: crate::model::LbAlgorithm,
) -> NodeContext {
    let zone = node
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get("topology.kubernetes.io/zone"))
        .cloned();
    let mut node_ips: Vec<IpAddr> = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    for ip in extra_ips {
        if !node_ips.contains(ip) {
            node_ips.push(*ip);
        }
    }
    NodeContext {
        node_name: node_name.to_string(),
        zone,
        node_ips,
        lb_algorithm,
    }
}

/// Wait before retrying a sync that refused Services (the room a removal
/// frees is only usable on the sync after it).
const REFUSED_RETRY_PERIOD: Duration = Duration::from_secs(5);
/// Wait before retrying a sync whose map writes failed.
const RETRY_PERIOD: Duration = Duration::from_secs(2);
/// How often the LRU map gauges are refreshed.
const LRU_GAUGE_PERIOD: Duration = Duration::from_secs(10);

/// Probes the kernel. Strict: any missing feature is an error naming it and
/// its kernel option. Partial: logs what is missing and returns the socket
/// hooks to leave out (bind protection goes whole when any part of it is
/// missing: it is reported, never fatal).
fn check_features(mode: KprMode) -> Result<(Vec<&'static str>, Vec<features::Feature>)> {
    let probed = features::probe();
    let missing = features::missing(&probed);
    for rules in features::kube_proxy_rules() {
        tracing::warn!(found = %rules, "kube-proxy's rules are on this node: they will intercept Service traffic too; remove kube-proxy and flush its rules");
    }
    if missing.is_empty() {
        return Ok((Vec::new(), probed));
    }
    if mode == KprMode::Strict {
        anyhow::bail!(
            "--kube-proxy-replacement strict: the kernel lacks {} required feature(s):\n  {}\n(use --kube-proxy-replacement partial to run without them)",
            missing.len(),
            missing.join("\n  ")
        );
    }
    for m in &missing {
        tracing::warn!(feature = %m, "--kube-proxy-replacement partial: running without");
    }
    let lacks = |name: &str| probed.iter().any(|f| f.name == name && !f.available);
    let mut skip = features::HOOK_ATTACH_TYPES
        .iter()
        .map(|(hook, _)| *hook)
        .filter(|hook| lacks(features::hook_feature_name(hook)))
        .collect::<Vec<_>>();
    if skip.len() == features::HOOK_ATTACH_TYPES.len() || lacks("cgroup_sock_addr") {
        anyhow::bail!("no socket-LB hook is available: {}", missing.join("; "));
    }
    let bind_hooks = features::BIND_HOOK_ATTACH_TYPES.map(|(hook, _)| hook);
    if lacks(features::NETNS_COOKIE_SOCKOPT)
        || bind_hooks
            .iter()
            .any(|hook| lacks(features::hook_feature_name(hook)))
    {
        tracing::warn!("--kube-proxy-replacement partial: NodePort bind protection is off (host sockets may bind NodePorts)");
        skip.extend(bind_hooks);
    }
    Ok((skip, probed))
}

/// Resolves when the agent is asked to stop (SIGINT or SIGTERM).
async fn stop_requested() {
    let mut sigterm = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: AgentConfig) -> Result<()> {
    if let Some(np) = &config.nodeport {
        np.validate()?;
    }
    let (skip_hooks, features) = check_features(config.kpr_mode)?;
    let status = StatusHandle::new(AgentStatus {
        source: match &config.source {
            SourceConfig::Manifests(_) => "manifests".into(),
            SourceConfig::Kubernetes(_) => "kubernetes".into(),
        },
        api_server: match &config.source {
            SourceConfig::Kubernetes(k) => k.api.api_server.clone().or_else(|| {
                k.api
                    .kubeconfig
                    .as_ref()
                    .map(|p| format!("from {}", p.display()))
            }),
            SourceConfig::Manifests(_) => None,
        },
        node_name: match &config.source {
            SourceConfig::Kubernetes(_) => Some(config.node_name.clone()),
            SourceConfig::Manifests(_) => Some(config.node_name.clone()),
        },
        kube_proxy_replacement: format!("{:?}", config.kpr_mode).to_lowercase(),
        cgroup: config.cgroup.display().to_string(),
        features: features
            .iter()
            .map(|f| (f.name.to_string(), f.available))
            .collect(),
        lb_algorithm: Some(config.lb_algorithm.to_string()),
        maglev_table_size: Some(config.maglev.table_size()),
        nodeport_mode: config.nodeport.as_ref().map(|np| value_name(np.mode)),
        nodeport_acceleration: config
            .nodeport
            .as_ref()
            .map(|np| value_name(np.acceleration)),
        ..AgentStatus::default()
    });
    let use_set_retval = features
        .iter()
        .any(|f| f.name == "helper_set_retval" && f.available);
    // Bind protection is for the node's own sockets: those of the agent's
    // network namespace.
    let host_netns_cookie = features::own_netns_cookie().unwrap_or(0);
    let options = loader::DatapathOptions {
        skip_hooks,
        use_set_retval,
        host_netns_cookie,
    };
    let report = loader::load_and_attach(
        &config.bpf_root,
        &config.cgroup,
        &config.map_sizes,
        &options,
    )
    .context("setting up the datapath")?;
    tracing::info!(
        cgroup = %config.cgroup.display(),
        bpf_root = %config.bpf_root.display(),
        reused_maps = ?report.reused_maps,
        updated_links = ?report.updated_links,
        created_links = ?report.created_links,
        "datapath attached"
    );
    // What the device watcher starts from: the link subscription (taken
    // before the links are first listed, so no change is missed) and the
    // devices attached.
    let mut device_watch = None;
    match &config.nodeport {
        Some(np) => {
            nodeport::check_port_range(np.snat_ports);
            let events = NetlinkEvents::links()
                .map_err(|e| tracing::warn!(error = %e, "no netlink link subscription; devices are rescanned every {}s only", DEVICE_RESCAN_PERIOD.as_secs()))
                .ok();
            let report = nodeport::load_and_attach(&config.bpf_root, &config.map_sizes, np)
                .context("setting up the north-south datapath")?;
            tracing::info!(
                devices = ?np.devices,
                attached = ?report.devices.keys().collect::<Vec<_>>(),
                mode = ?np.mode,
                snat_ports = %np.snat_ports,
                dsr_mss = report.dsr_mss,
                reused_ct = report.reused_ct,
                updated_links = ?report.updated_links,
                created_links = ?report.created_links,
                detached_links = ?report.detached_links,
                xdp_links = ?report.xdp_links,
                "north-south datapath attached"
            );
            if !report.missing_devices.is_empty() {
                tracing::warn!(missing = ?report.missing_devices, "--devices names no interface has yet: attached when they appear");
            }
            status.update(|s| {
                s.devices = Some(DeviceStatus {
                    patterns: np.devices.clone(),
                    attached: report.devices.keys().cloned().collect(),
                    missing: report.missing_devices.clone(),
                    ..DeviceStatus::default()
                })
            });
            let mut peer_devices =
                peer_devices::open(&config.bpf_root).context("opening the peer device map")?;
            sync_peer_devices(&mut peer_devices, &report.devices, np.redirect_peer);
            device_watch = Some((events, report.devices, report.dsr_mss, peer_devices));
        }
        None => {
            let detached = nodeport::remove(&config.bpf_root)
                .context("turning the north-south datapath off")?;
            if !detached.is_empty() {
                tracing::info!(?detached, "no --devices: north-south datapath detached");
            }
        }
    }

    // The node's addresses for the socket hooks: subscribed before the
    // first listing, so no change is missed; written before traffic is
    // counted on (a failure is logged and retried, never fatal).
    let address_events = NetlinkEvents::addresses()
        .map_err(|e| tracing::warn!(error = %e, "no netlink address subscription; addresses are rescanned every {}s only", HOST_ADDR_RESCAN_PERIOD.as_secs()))
        .ok();
    let mut host_addrs =
        host_addrs::open(&config.bpf_root).context("opening the host address map")?;
    sync_host_addresses(&mut host_addrs);

    let metrics = Arc::new(Metrics::new());
    let health = Health::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let metrics_listener = http::bind(config.metrics_addr, "metrics").await?;
    let healthz_listener = http::bind(config.healthz_addr, "healthz").await?;
    // /status (error texts, paths) goes with /metrics on the loopback-only
    // address, not on the health port load balancers reach.
    let metrics_router = http::metrics_router(metrics.clone()).merge(status_router(status.clone()));
    let metrics_server = tokio::spawn(http::serve(
        metrics_listener,
        "metrics",
        metrics_router,
        stopped(stop_rx.clone()),
    ));
    let healthz_server = tokio::spawn(http::serve_healthz(
        healthz_listener,
        health.clone(),
        stopped(stop_rx.clone()),
    ));
    let device_watcher = match (&config.nodeport, device_watch) {
        (Some(np), Some((events, attached, dsr_mss, peer_devices))) => {
            metrics.set_nodeport_devices(attached.len());
            Some(tokio::spawn(device_watch_loop(
                DeviceWatch {
                    bpf_root: config.bpf_root.clone(),
                    sizes: config.map_sizes,
                    config: np.clone(),
                    metrics: metrics.clone(),
                    status: status.clone(),
                    peer_devices,
                },
                events,
                attached,
                dsr_mss,
                stopped(stop_rx.clone()),
            )))
        }
        _ => None,
    };
    let host_addr_watcher = tokio::spawn(host_addr_watch_loop(
        host_addrs,
        address_events,
        metrics.clone(),
        stopped(stop_rx.clone()),
    ));
    let ct_gc = config.nodeport.as_ref().map(|_| {
        tokio::spawn(ct_gc_loop(
            config.bpf_root.clone(),
            config.ct_gc_interval,
            metrics.clone(),
            stopped(stop_rx.clone()),
        ))
    });

    let mut syncer = Syncer::new(
        &config.bpf_root,
        config.maglev,
        metrics.clone(),
        health.clone(),
        status.clone(),
    )?;
    if config.nodeport.is_some() {
        syncer = syncer
            .with_dsr(&config.bpf_root)
            .context("opening the DSR map")?;
    }
    let health_checks =
        HealthCheckServer::new(config.health_check_bind).with_proxy_health(health.clone());
    let ctx = LoopContext {
        metrics: &metrics,
        status: &status,
        health_checks: &health_checks,
        config: &config,
    };
    let result = match &config.source {
        SourceConfig::Manifests(paths) => run_manifests(syncer, paths, config.debounce, &ctx).await,
        SourceConfig::Kubernetes(kube) => run_kubernetes(syncer, kube, &ctx).await,
    };
    tracing::info!("stopping; programs stay attached and maps pinned");
    let _ = stop_tx.send(true);
    let _ = metrics_server.await;
    let _ = healthz_server.await;
    if let Some(gc) = ct_gc {
        let _ = gc.await;
    }
    if let Some(w) = device_watcher {
        let _ = w.await;
    }
    let _ = host_addr_watcher.await;
    result
}

/// Safety net of the host address watcher: addresses are listed again
/// this often even without a netlink notification.
const HOST_ADDR_RESCAN_PERIOD: Duration = Duration::from_secs(10);

/// Lists this namespace's addresses and writes them to the host address
/// map; logs what changed, or the failure (retried by the next call).
fn sync_host_addresses(table: &mut HostAddrTable) {
    let synced = host_addrs::local_addresses()
        .context("listing the node's addresses")
        .and_then(|desired| table.sync(&desired));
    match synced {
        Ok(r) if r.added.is_empty() && r.removed.is_empty() => {}
        Ok(r) => {
            tracing::info!(added = ?r.added, removed = ?r.removed, "node addresses changed: NodePorts follow them on the socket path")
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "updating the host address map; retried on the next address change")
        }
    }
}

/// Keeps the host address map equal to the node's addresses: woken by
/// address changes (netlink) and every [`HOST_ADDR_RESCAN_PERIOD`].
async fn host_addr_watch_loop(
    mut table: HostAddrTable,
    mut events: Option<NetlinkEvents>,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut rescan = tokio::time::interval(HOST_ADDR_RESCAN_PERIOD);
    tokio::pin!(stop);
    loop {
        metrics.set_map(
            MapLabel::HostAddresses,
            table.keys().len(),
            table.capacity(),
        );
        tokio::select! {
            r = async {
                match events.as_mut() {
                    Some(e) => e.changed().await,
                    None => std::future::pending().await,
                }
            } => if let Err(e) = r {
                tracing::warn!(error = %e, "netlink address subscription failed; rescanning every {}s only", HOST_ADDR_RESCAN_PERIOD.as_secs());
                events = None;
            },
            _ = rescan.tick() => {}
            _ = &mut stop => return,
        }
        sync_host_addresses(&mut table);
    }
}

/// Safety net of the device watcher: links are listed again this often
/// even without a netlink notification.
const DEVICE_RESCAN_PERIOD: Duration = Duration::from_secs(10);

/// What the device watcher needs besides its subscription.
struct DeviceWatch {
    bpf_root: PathBuf,
    sizes: MapSizes,
    config: NodePortConfig,
    metrics: Arc<Metrics>,
    status: StatusHandle,
    peer_devices: PeerDeviceTable,
}

/// Writes the pods' devices (veth/netkit with a peer in another namespace,
/// other than the north-south devices, which lead to other hosts) to the
/// peer device map; logs what changed, or the failure (retried on the next
/// link change or rescan). Without a pod device listed, packets to its
/// pods take the plain redirect: slower, never lost.
/// With `enabled` false (--nodeport-redirect-peer=false) the map is kept
/// empty, also of what an earlier agent listed.
fn sync_peer_devices(
    table: &mut PeerDeviceTable,
    north_south: &BTreeMap<String, u32>,
    enabled: bool,
) {
    let listed = if enabled {
        peer_devices::peer_devices().context("listing the pods' devices (netlink)")
    } else {
        Ok(Default::default())
    };
    let synced = listed.and_then(|mut desired| {
        for index in north_south.values() {
            desired.remove(index);
        }
        table.sync(&desired)
    });
    match synced {
        Ok(r) if r.is_empty() => {}
        Ok(r) => {
            tracing::info!(added = ?r.added, removed = ?r.removed, "pod devices changed: packets to their local backends are redirected into the pod namespace")
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "updating the peer device map; retried on the next link change")
        }
    }
}

/// Keeps the north-south programs on exactly the interfaces `--devices`
/// means, as links appear, go or are re-created (new ifindex): woken by
/// link changes (netlink) and every [`DEVICE_RESCAN_PERIOD`], it lists the
/// links and, when the matching set differs from what is attached or the
/// DSR MSS clamp their MTUs call for changed (an MTU changed, or a device
/// came or went), runs the attachment again (existing links get the
/// program swapped in, with the same --nodeport-mode and the MSS read
/// then; new devices are attached, gone ones detached and unpinned; the
/// pinned maps, the DSR map among them, stay as they are). A failure is
/// logged, counted and shown by `kpr status`, and retried on the next
/// change; it never stops the agent. Each wake-up also brings the peer
/// device map up to date (pods' devices come and go with their pods).
async fn device_watch_loop(
    mut w: DeviceWatch,
    mut events: Option<NetlinkEvents>,
    mut attached: BTreeMap<String, u32>,
    mut attached_mss: u16,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut rescan = tokio::time::interval(DEVICE_RESCAN_PERIOD);
    rescan.tick().await;
    tokio::pin!(stop);
    loop {
        w.metrics.set_map(
            MapLabel::PeerDevices,
            w.peer_devices.keys().len(),
            w.peer_devices.capacity(),
        );
        let mut lost = false;
        tokio::select! {
            r = async {
                match events.as_mut() {
                    Some(e) => e.changed().await,
                    None => std::future::pending().await,
                }
            } => if let Err(e) = r {
                tracing::warn!(error = %e, "netlink link subscription failed; rescanning every {}s only", DEVICE_RESCAN_PERIOD.as_secs());
                lost = true;
            },
            _ = rescan.tick() => {}
            _ = &mut stop => return,
        }
        if lost {
            events = None;
        }
        let present = match devices::matching(&w.config.devices) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "listing the network interfaces");
                continue;
            }
        };
        // The devices --devices means now are north-south ones, attached
        // below if they are not yet: never pod devices.
        sync_peer_devices(&mut w.peer_devices, &present, w.config.redirect_peer);
        let mss = match nodeport::devices_dsr_mss(&present) {
            Ok(m) => m,
            // A device gone since the listing: the next event says so.
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "reading the devices' MTUs");
                continue;
            }
        };
        if present == attached && mss == attached_mss {
            continue;
        }
        let (root, sizes, config) = (w.bpf_root.clone(), w.sizes, w.config.clone());
        let outcome =
            tokio::task::spawn_blocking(move || nodeport::load_and_attach(&root, &sizes, &config))
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r);
        match outcome {
            Ok(report) => {
                tracing::info!(
                    attached = ?report.devices.keys().collect::<Vec<_>>(),
                    dsr_mss = report.dsr_mss,
                    created_links = ?report.created_links,
                    detached_links = ?report.detached_links,
                    xdp_links = ?report.xdp_links,
                    missing = ?report.missing_devices,
                    "devices changed: north-south datapath re-attached"
                );
                w.metrics.record_device_sync(true, report.devices.len());
                w.status.update(|s| {
                    if let Some(d) = s.devices.as_mut() {
                        d.attached = report.devices.keys().cloned().collect();
                        d.missing = report.missing_devices.clone();
                        d.last_error = None;
                        d.changes += 1;
                    }
                });
                attached = report.devices;
                attached_mss = report.dsr_mss;
            }
            Err(e) => {
                let error = format!("{e:#}");
                tracing::error!(%error, devices = ?present.keys().collect::<Vec<_>>(), "devices changed but attaching failed; retried on the next link change");
                let still = nodeport::attached_devices(&w.bpf_root)
                    .iter()
                    .filter(|d| d.direction == nodeport::Direction::Ingress && d.ifindex.is_some())
                    .count();
                w.metrics.record_device_sync(false, still);
                w.status.update(|s| {
                    if let Some(d) = s.devices.as_mut() {
                        d.last_error = Some(error);
                        d.changes += 1;
                    }
                });
                // Not retried until the links change again: a device that
                // cannot take the programs would fail every time.
                attached = present;
                attached_mss = mss;
            }
        }
    }
}

/// Removes expired conntrack entries every `interval` and publishes the
/// conntrack fill and the datapath's counters, until `stop` resolves.
///
/// Only expired entries go: a flow's entries share one expiry, so pairs
/// leave together, and a restarted agent never drops live flows (the
/// lesson of cilium#29667).
async fn ct_gc_loop(
    bpf_root: PathBuf,
    interval: Duration,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) {
    use crate::datapath::ct::{monotonic_ns, CtMap, NodePortStats};
    use crate::metrics::NodePortEvent;
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => return,
        }
        let root = bpf_root.clone();
        let pass = tokio::task::spawn_blocking(move || {
            let ct = CtMap::open(&root)?;
            let report = ct.gc(monotonic_ns())?;
            let stats = NodePortStats::read(&root)?;
            anyhow::Ok((report, ct.max_entries(), stats))
        })
        .await;
        match pass {
            Ok(Ok((report, capacity, stats))) => {
                metrics.record_ct_gc(report.deleted, report.alive);
                metrics.set_map(MapLabel::Conntrack, report.alive, capacity);
                for (event, n) in [
                    (NodePortEvent::FlowNew, stats.flows_new),
                    (NodePortEvent::FlowSnat, stats.flows_snat),
                    (NodePortEvent::Forward, stats.packets_fwd),
                    (NodePortEvent::Reply, stats.packets_reply),
                    (NodePortEvent::DropNoBackend, stats.drop_no_backend),
                    (NodePortEvent::DropSnatExhausted, stats.drop_snat_exhausted),
                    (NodePortEvent::DropFib, stats.drop_fib),
                    (NodePortEvent::DropConntrack, stats.drop_ct),
                    (NodePortEvent::DropTtl, stats.drop_ttl),
                    (NodePortEvent::XdpForward, stats.xdp_fwd),
                    (NodePortEvent::RejectNoBackend, stats.reject_no_backend),
                    (NodePortEvent::DropSourceRange, stats.drop_source_range),
                    (NodePortEvent::FlowDsr, stats.flows_dsr),
                    (NodePortEvent::DsrDecap, stats.dsr_decap),
                    (NodePortEvent::DsrMiss, stats.dsr_miss),
                    (NodePortEvent::DropDsrTooBig, stats.drop_dsr_too_big),
                    (NodePortEvent::MssClamp, stats.mss_clamped),
                    (NodePortEvent::PortRemap, stats.port_remapped),
                    (NodePortEvent::PeerRedirect, stats.peer_redirects),
                    (NodePortEvent::IcmpError, stats.icmp_errors),
                    (NodePortEvent::FragmentFollowed, stats.fragments_followed),
                    (NodePortEvent::FragmentUnknown, stats.fragments_unknown),
                ] {
                    metrics.set_nodeport_event(event, n);
                }
                if report.deleted > 0 {
                    tracing::debug!(
                        deleted = report.deleted,
                        alive = report.alive,
                        "conntrack GC"
                    );
                }
            }
            Ok(Err(e)) => {
                metrics.record_ct_gc_failure();
                tracing::warn!(error = %format!("{e:#}"), "conntrack GC failed");
            }
            Err(e) => {
                metrics.record_ct_gc_failure();
                tracing::warn!(error = %e, "conntrack GC task failed");
            }
        }
    }
}

/// What both source loops share.
struct LoopContext<'a> {
    metrics: &'a Metrics,
    status: &'a StatusHandle,
    health_checks: &'a HealthCheckServer,
    config: &'a AgentConfig,
}

/// Standalone mode: the manifests on disk are the whole truth on every read.
async fn run_manifests(
    mut syncer: Syncer,
    paths: &[PathBuf],
    debounce: Duration,
    ctx: &LoopContext<'_>,
) -> Result<()> {
    let mut watch = manifests::watch(paths, debounce).context("watching the manifests")?;
    let mut lru_tick = tokio::time::interval(LRU_GAUGE_PERIOD);
    let stop = stop_requested();
    tokio::pin!(stop);
    let mut reload = true;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut desired = DesiredByService::new();
    let mut policies = PolicyState::default();
    // No Node object in standalone mode: --node-name and --node-ip say
    // which endpoints are local and where NodePorts listen.
    let node = node_context(
        &ctx.config.node_name,
        None,
        &ctx.config.node_ips,
        ctx.config.lb_algorithm,
    );
    loop {
        if reload {
            let paths = paths.to_vec();
            let set = tokio::task::spawn_blocking(move || manifests::load(&paths)).await?;
            for doc in &set.skipped {
                ctx.metrics.inc_skipped(doc.reason);
            }
            let translation = translate::translate(&set.services, &set.slices, &node);
            syncer.record_skipped(&translation.skipped);
            policies.replace_all(&translation);
            desired = translation.desired;
        }
        if reload || retry_at.is_some_and(|at| at <= tokio::time::Instant::now()) {
            let synced = syncer.sync_full(&desired, true);
            policies.publish(ctx.metrics, ctx.health_checks).await;
            retry_at = synced.retry_at();
        }
        reload = false;
        tokio::select! {
            _ = watch.changed() => reload = true,
            _ = sleep_until_opt(retry_at) => {}
            _ = lru_tick.tick() => syncer.update_lru_gauges(),
            _ = &mut stop => return Ok(()),
        }
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn watch_kind(kind: Kind) -> WatchKind {
    match kind {
        Kind::Service => WatchKind::Service,
        Kind::EndpointSlice => WatchKind::EndpointSlice,
        Kind::Node => WatchKind::Node,
    }
}

/// Kubernetes mode: watchers feed the object store; changed Services are
/// translated and synced at most once per `min_sync_period`; everything
/// is re-synced every `sync_period`. Nothing is written before every
/// watcher's initial list is complete, so a restart while the API is
/// unreachable keeps the pinned state serving.
async fn run_kubernetes(
    mut syncer: Syncer,
    config: &KubeSourceConfig,
    ctx: &LoopContext<'_>,
) -> Result<()> {
    let (metrics, status) = (ctx.metrics, ctx.status);
    for kind in Kind::ALL {
        status.watcher(watch_kind(kind).as_label(), |w| w.state = "starting".into());
    }
    let client = kube_source::client(&config.api).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let watchers = kube_source::spawn_watchers(client, &ctx.config.node_name, tx);
    let mut store = ObjectStore::new();
    let mut policies = PolicyState::default();
    let mut lru_tick = tokio::time::interval(LRU_GAUGE_PERIOD);
    let mut resync = tokio::time::interval(config.sync_period);
    resync.tick().await;
    let stop = stop_requested();
    tokio::pin!(stop);
    let mut synced_once = false;
    let mut last_sync: Option<tokio::time::Instant> = None;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut force_full = false;
    let mut warned_no_node = false;

    loop {
        // Bounded frequency: a change is synced at once unless the last
        // sync was less than min_sync_period ago.
        let due = if store.initial_lists_complete() && (store.has_changes() || force_full) {
            let earliest =
                last_sync.map_or_else(tokio::time::Instant::now, |t| t + config.min_sync_period);
            Some(retry_at.map_or(earliest, |r| r.max(earliest)))
        } else {
            retry_at.filter(|_| synced_once)
        };
        tokio::select! {
            event = rx.recv() => match event {
                Some(event) => handle_watch_event(&mut store, event, metrics, status),
                None => anyhow::bail!("the Kubernetes watchers stopped"),
            },
            _ = sleep_until_opt(due) => {
                let changes = store.take_changes();
                let full = !synced_once || changes.all || force_full || retry_at.is_some();
                if store.node().is_none() && !warned_no_node {
                    warned_no_node = true;
                    tracing::warn!(node = %ctx.config.node_name, "no Node object with this name (check --node-name / NODE_NAME): no node IPs for NodePorts, no zone, and no endpoint counts as local");
                }
                status.update(|s| s.own_node_found = Some(store.node().is_some()));
                let node = node_context(&ctx.config.node_name, store.node(), &ctx.config.node_ips, ctx.config.lb_algorithm);
                let synced = if full {
                    let services: Vec<_> = store.services().cloned().collect();
                    let slices: Vec<_> = store.slices().cloned().collect();
                    let translation = translate::translate(&services, &slices, &node);
                    syncer.record_skipped(&translation.skipped);
                    policies.replace_all(&translation);
                    syncer.sync_full(&translation.desired, true)
                } else {
                    let mut skipped = Vec::new();
                    let mut updates: Vec<(String, ServiceFrontends)> = Vec::new();
                    for key in &changes.services {
                        let t = match store.service(key) {
                            Some(svc) => translate::translate_service(svc, &store.slices_of(key), &node, &mut skipped),
                            None => ServiceTranslation::default(),
                        };
                        policies.replace_service(key, &t);
                        updates.push((key.clone(), t.frontends));
                    }
                    syncer.record_skipped(&skipped);
                    syncer.sync_services(updates)
                };
                policies.publish(metrics, ctx.health_checks).await;
                metrics.add_changes(changes.service_changes, changes.endpoint_changes);
                if synced != Synced::Failed {
                    let now = k8s_openapi::jiff::Timestamp::now();
                    for t in &changes.trigger_times {
                        let latency = now.duration_since(*t).as_secs_f64();
                        if latency >= 0.0 {
                            metrics.observe_network_programming(latency);
                        }
                    }
                }
                synced_once = true;
                force_full = false;
                last_sync = Some(tokio::time::Instant::now());
                retry_at = synced.retry_at();
            }
            _ = resync.tick() => force_full = synced_once,
            _ = lru_tick.tick() => syncer.update_lru_gauges(),
            _ = &mut stop => break,
        }
    }
    for w in watchers {
        w.abort();
    }
    Ok(())
}

fn handle_watch_event(
    store: &mut ObjectStore,
    event: WatchEvent,
    metrics: &Metrics,
    status: &StatusHandle,
) {
    match event {
        WatchEvent::Service(e) => on_watcher_event(store, e, metrics, status),
        WatchEvent::EndpointSlice(e) => on_watcher_event(store, e, metrics, status),
        WatchEvent::Node(e) => on_watcher_event(store, e, metrics, status),
        WatchEvent::Failed(kind, error) => {
            metrics.inc_watch_error(watch_kind(kind));
            status.watcher(watch_kind(kind).as_label(), |w| {
                w.state = "failing".into();
                w.errors += 1;
                w.last_error = Some(error.clone());
            });
            tracing::warn!(?kind, %error, "watch failed; retrying with backoff");
        }
    }
}

/// One watcher event into the store; a (re)list is buffered until done.
fn on_watcher_event<K: Watched>(
    store: &mut ObjectStore,
    event: kube::runtime::watcher::Event<K>,
    metrics: &Metrics,
    status: &StatusHandle,
) {
    use kube::runtime::watcher::Event;
    let label = watch_kind(K::KIND).as_label();
    match event {
        Event::Init => {
            status.watcher(label, |w| w.state = "listing".into());
            store.begin_relist(K::KIND)
        }
        Event::InitApply(o) => o.relist(store),
        Event::InitDone => {
            status.watcher(label, |w| w.state = "watching".into());
            if store.is_listed(K::KIND) {
                metrics.inc_relist(watch_kind(K::KIND));
                status.watcher(label, |w| w.relists += 1);
                tracing::info!(kind = ?K::KIND, "relisted");
            }
            store.end_relist(K::KIND)
        }
        Event::Apply(o) => o.apply(store),
        Event::Delete(o) => o.delete(store),
    }
}

/// A flag value as it is spelled on the command line.
fn value_name(value: impl clap::ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}
