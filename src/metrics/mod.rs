//! The agent's Prometheus metrics, in one registry with typed families.
//!
//! Where a metric means what kube-proxy's does, it has kube-proxy's name and
//! buckets (`kubeproxy_sync_proxy_rules_*`), so existing dashboards and
//! alerts keep working after the switch; everything else is `kpr_*`. Every
//! label value comes from a fixed enum, never from object names or error
//! text, and every label value is created up front so that zeros are
//! exported before the first event.

#![deny(unsafe_code)]

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::skip::SkipReason;
use crate::source::manifests::ReadErrorReason;

mod datapath;
mod exposition;
mod kube_proxy;
mod labels;
mod process;
pub use datapath::{DatapathCounters, DatapathNames, FrontendLabel, DEFAULT_PER_FRONTEND_MAX};
pub use exposition::{Format, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_TEXT_CONTENT_TYPE};
pub use kube_proxy::{KubeProxyMetrics, ProbeCounters, SyncScope};
pub use labels::{
    GcStatus, MapLabel, MapName, NodePortEvent, ProbeCode, SyncErrorReason, SyncResult,
    TrafficPolicy, UnprogrammedReason, WatchKind,
};

/// kube-proxy's sync duration buckets: `0.001 * 2^i` s for i in 0..15, i.e.
/// 1 ms to 16.384 s, plus the implicit `+Inf` (16 `le` series in all).
pub const SYNC_DURATION_BUCKETS: (f64, f64, u16) = (0.001, 2.0, 15);

/// Buckets of `kubeproxy_network_programming_duration_seconds`: kube-proxy's
/// (0.25 s .. 300 s) preceded by finer ones, since kpr programs in
/// milliseconds and kube-proxy's first bucket would hold every sample.
fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1];
    b.extend([0.25, 0.5]);
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: MapName,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncErrorLabels {
    reason: SyncErrorReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SkipLabels {
    reason: SkipReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UnprogrammedLabels {
    reason: UnprogrammedReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadErrorLabels {
    reason: ReadErrorReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncResultLabels {
    result: SyncResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TrafficPolicyLabels {
    traffic_policy: TrafficPolicy,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchKindLabels {
    kind: WatchKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GcStatusLabels {
    status: GcStatus,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodePortEventLabels {
    event: NodePortEvent,
}

/// The agent's metrics. Cheap to update from any thread; share it as
/// `Arc<Metrics>` between the syncer and the metrics endpoint.
///
/// Exposed (see [`Metrics::render`] for the formats):
///
/// | name | type | labels |
/// |------|------|--------|
/// | `kubeproxy_sync_proxy_rules_duration_seconds` | histogram | |
/// | `kubeproxy_sync_proxy_rules_last_timestamp_seconds` | gauge (unix s) | |
/// | `kpr_services`, `kpr_frontends`, `kpr_backends` | gauge | |
/// | `kpr_bpf_map_entries`, `kpr_bpf_map_capacity` | gauge | `map` ([`MapName`]) |
/// | `kpr_bpf_map_grown_total` | counter | `map` ([`MapName`]) |
/// | `kpr_sync_errors_total` | counter | `reason` ([`SyncErrorReason`]) |
/// | `kpr_services_unprogrammed` | gauge | `reason` ([`UnprogrammedReason`]) |
/// | `kpr_skipped_objects_total` | counter | `reason` ([`SkipReason`]) |
/// | `kpr_source_read_errors_total` | counter | `reason` ([`ReadErrorReason`]) |
/// | `kpr_syncs_total` | counter | `result` ([`SyncResult`]) |
/// | `kpr_ct_gc_runs_total` | counter | `status` ([`GcStatus`]) |
/// | `kpr_ct_gc_deleted_entries_total` | counter | |
/// | `kpr_ct_entries` | gauge (after the last GC pass) | |
/// | `kpr_socket_source_range_drops_total` | counter | |
/// | `kpr_nodeport_events_total` | counter | `event` ([`NodePortEvent`]); kept for the chart's alerts and dashboard, superseded by the three below |
/// | `kpr_nodeport_flow_events_total`, `kpr_nodeport_packet_events_total` | counter | `event` |
/// | `kpr_nodeport_drops_total` | counter | `reason` |
/// | `kpr_socket_lb_decisions_total`, `kpr_nodeport_new_flows_total` | counter | `verdict` (+ frontend labels) |
/// | `kpr_nodeport_frontend_{packets,bytes}_total` | counter | `direction` (+ frontend labels) |
/// | `kpr_nodeport_backend_{packets,bytes}_total` | counter | `direction` (+ `backend`) |
/// | `kpr_monitor_events_total` | counter | `outcome` |
/// | `kpr_nodeport_devices` | gauge | |
/// | `kpr_nodeport_device_syncs_total` | counter | `result` ([`SyncResult`]) |
/// | kube-proxy's queue, full/partial sync and probe metrics | see [`KubeProxyMetrics`] | |
/// | `process_*` (CPU, memory, descriptors, start time) | counter, gauges | |
/// | `kpr_build_info` | gauge (1) | `version`, `revision`, `rustc` |
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    last_sync: Gauge<f64, AtomicU64>,
    services: Gauge,
    frontends: Gauge,
    backends: Gauge,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    map_grown: Family<MapLabels, Counter>,
    sync_errors: Family<SyncErrorLabels, Counter>,
    unprogrammed: Family<UnprogrammedLabels, Gauge>,
    skipped: Family<SkipLabels, Counter>,
    source_read_errors: Family<ReadErrorLabels, Counter>,
    syncs: Family<SyncResultLabels, Counter>,
    network_programming: Histogram,
    endpoint_changes: Counter,
    service_changes: Counter,
    no_local_endpoints: Family<TrafficPolicyLabels, Gauge>,
    watch_errors: Family<WatchKindLabels, Counter>,
    relists: Family<WatchKindLabels, Counter>,
    ct_gc_runs: Family<GcStatusLabels, Counter>,
    ct_gc_deleted: Counter,
    ct_entries: Gauge,
    nodeport_events: Family<NodePortEventLabels, Counter>,
    socket_source_range_drops: Counter,
    nodeport_devices: Gauge,
    device_syncs: Family<SyncResultLabels, Counter>,
    kube_proxy: KubeProxyMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A count as a gauge value, saturating at `i64::MAX`.
fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Metrics {
    /// Creates the registry with every family registered and every label
    /// value of the fixed sets present (at zero).
    pub fn new() -> Metrics {
        let (start, factor, count) = SYNC_DURATION_BUCKETS;
        let metrics = Metrics {
            registry: Registry::default(),
            sync_duration: Histogram::new(exponential_buckets(start, factor, count)),
            last_sync: Gauge::default(),
            services: Gauge::default(),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            map_grown: Family::default(),
            sync_errors: Family::default(),
            unprogrammed: Family::default(),
            skipped: Family::default(),
            source_read_errors: Family::default(),
            syncs: Family::default(),
            network_programming: Histogram::new(network_programming_buckets()),
            endpoint_changes: Counter::default(),
            service_changes: Counter::default(),
            no_local_endpoints: Family::default(),
            watch_errors: Family::default(),
            relists: Family::default(),
            ct_gc_runs: Family::default(),
            ct_gc_deleted: Counter::default(),
            ct_entries: Gauge::default(),
            nodeport_events: Family::default(),
            socket_source_range_drops: Counter::default(),
            nodeport_devices: Gauge::default(),
            device_syncs: Family::default(),
            kube_proxy: KubeProxyMetrics::default(),
        };
        for &status in GcStatus::ALL {
            let _ = metrics.ct_gc_runs.get_or_create(&GcStatusLabels { status });
        }
        for &event in NodePortEvent::ALL {
            let _ = metrics
                .nodeport_events
                .get_or_create(&NodePortEventLabels { event });
        }
        for &traffic_policy in TrafficPolicy::ALL {
            let _ = metrics
                .no_local_endpoints
                .get_or_create(&TrafficPolicyLabels { traffic_policy });
        }
        for &kind in WatchKind::ALL {
            let _ = metrics
                .watch_errors
                .get_or_create(&WatchKindLabels { kind });
            let _ = metrics.relists.get_or_create(&WatchKindLabels { kind });
        }
        // `get_or_create` creates the series; the returned guard is not needed.
        for map in MapName::FILL_EXPORTED {
            let _ = metrics.map_entries.get_or_create(&MapLabels { map });
            let _ = metrics.map_capacity.get_or_create(&MapLabels { map });
        }
        for &reason in SyncErrorReason::ALL {
            let _ = metrics
                .sync_errors
                .get_or_create(&SyncErrorLabels { reason });
        }
        for &reason in UnprogrammedReason::ALL {
            let _ = metrics
                .unprogrammed
                .get_or_create(&UnprogrammedLabels { reason });
        }
        for reason in SkipReason::ALL {
            let _ = metrics.skipped.get_or_create(&SkipLabels { reason });
        }
        for reason in ReadErrorReason::ALL {
            let _ = metrics
                .source_read_errors
                .get_or_create(&ReadErrorLabels { reason });
        }
        for &result in SyncResult::ALL {
            let _ = metrics.syncs.get_or_create(&SyncResultLabels { result });
            let _ = metrics
                .device_syncs
                .get_or_create(&SyncResultLabels { result });
        }
        metrics.register()
    }

    fn register(mut self) -> Metrics {
        let r = &mut self.registry;
        // The unit is appended by prometheus-client: the names below are the
        // exposed names without `_seconds`, and counters get `_total`.
        r.register_with_unit(
            "kubeproxy_sync_proxy_rules_duration",
            "SyncProxyRules latency in seconds",
            Unit::Seconds,
            self.sync_duration.clone(),
        );
        r.register_with_unit(
            "kubeproxy_sync_proxy_rules_last_timestamp",
            "The last time proxy rules were successfully synced",
            Unit::Seconds,
            self.last_sync.clone(),
        );
        r.register(
            "kpr_services",
            "Services programmed into the maps",
            self.services.clone(),
        );
        r.register(
            "kpr_frontends",
            "Frontends (address, port, protocol) programmed into the maps",
            self.frontends.clone(),
        );
        r.register(
            "kpr_backends",
            "Backends programmed into the maps",
            self.backends.clone(),
        );
        r.register(
            "kpr_bpf_map_entries",
            "Entries in a BPF map",
            self.map_entries.clone(),
        );
        r.register(
            "kpr_bpf_map_capacity",
            "Maximum entries of a BPF map",
            self.map_capacity.clone(),
        );
        r.register(
            "kpr_bpf_map_grown",
            "Times a BPF map was replaced by a larger copy (the cluster outgrew it)",
            self.map_grown.clone(),
        );
        r.register(
            "kpr_sync_errors",
            "Errors during syncs, by reason",
            self.sync_errors.clone(),
        );
        r.register(
            "kpr_services_unprogrammed",
            "Services not programmed now (each listed by kpr status), by reason",
            self.unprogrammed.clone(),
        );
        r.register(
            "kpr_skipped_objects",
            "Manifest documents, objects, ports or endpoints skipped, by reason",
            self.skipped.clone(),
        );
        r.register(
            "kpr_source_read_errors",
            "Errors reading the manifests (the last good state of the path is kept), by reason",
            self.source_read_errors.clone(),
        );
        r.register(
            "kpr_syncs",
            "Syncs of the maps, by result",
            self.syncs.clone(),
        );
        r.register_with_unit(
            "kubeproxy_network_programming_duration",
            "In Cluster Network Programming Latency in seconds: from the EndpointSlice change to the map update",
            Unit::Seconds,
            self.network_programming.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative EndpointSlice changes",
            self.endpoint_changes.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative Service changes",
            self.service_changes.clone(),
        );
        // A gauge with kube-proxy's (counter-like) name, as kube-proxy has it.
        r.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            self.no_local_endpoints.clone(),
        );
        r.register(
            "kpr_watch_errors",
            "Kubernetes watch failures (the watcher retries with backoff), by kind",
            self.watch_errors.clone(),
        );
        r.register(
            "kpr_relists",
            "Relists after the initial list (watch expired or restarted), by kind",
            self.relists.clone(),
        );
        r.register(
            "kpr_ct_gc_runs",
            "Garbage collection passes over the north-south conntrack map, by status",
            self.ct_gc_runs.clone(),
        );
        r.register(
            "kpr_ct_gc_deleted_entries",
            "Expired conntrack entries removed by garbage collection",
            self.ct_gc_deleted.clone(),
        );
        r.register(
            "kpr_ct_entries",
            "Entries in the north-south conntrack map after the last GC pass",
            self.ct_entries.clone(),
        );
        r.register(
            "kpr_nodeport_events",
            "Flows and packets of the north-south datapath, by event (drops by reason)",
            self.nodeport_events.clone(),
        );
        r.register(
            "kpr_socket_source_range_drops",
            "Packets of pods' sockets dropped: their source is outside the frontend's loadBalancerSourceRanges",
            self.socket_source_range_drops.clone(),
        );
        r.register(
            "kpr_nodeport_devices",
            "Interfaces the north-south programs are attached to",
            self.nodeport_devices.clone(),
        );
        r.register(
            "kpr_nodeport_device_syncs",
            "Re-attachments of the north-south programs after link changes, by result",
            self.device_syncs.clone(),
        );
        self.kube_proxy.register(r);
        r.register_collector(Box::new(process::ProcessCollector));
        r.register_collector(Box::new(process::BuildInfo::default()));
        self
    }

    /// kube-proxy's sync-queue, full/partial duration and probe metrics.
    pub fn kube_proxy(&self) -> &KubeProxyMetrics {
        &self.kube_proxy
    }

    /// Records the devices attached to after a (re-)attachment; `ok` is
    /// false when it failed (the count is then what stayed attached).
    pub fn record_device_sync(&self, ok: bool, attached: usize) {
        self.nodeport_devices.set(gauge_value(attached));
        let result = if ok {
            SyncResult::Success
        } else {
            SyncResult::Failure
        };
        self.device_syncs
            .get_or_create(&SyncResultLabels { result })
            .inc();
    }

    /// Sets `kpr_nodeport_devices` (at start, before any link change).
    pub fn set_nodeport_devices(&self, attached: usize) {
        self.nodeport_devices.set(gauge_value(attached));
    }

    /// Records a completed conntrack GC pass: the entries it deleted and
    /// the entries left.
    pub fn record_ct_gc(&self, deleted: usize, alive: usize) {
        self.ct_gc_runs
            .get_or_create(&GcStatusLabels {
                status: GcStatus::Completed,
            })
            .inc();
        self.ct_gc_deleted.inc_by(deleted as u64);
        self.ct_entries.set(gauge_value(alive));
    }

    /// Adds the datapath's load-balancing counters, read from the pinned
    /// maps at each scrape; returns the names table the syncer keeps.
    pub fn with_datapath_counters(
        mut self,
        counters: DatapathCounters,
    ) -> (Metrics, std::sync::Arc<std::sync::RwLock<DatapathNames>>) {
        let names = counters.names();
        self.registry.register_collector(Box::new(counters));
        (self, names)
    }

    /// Records a conntrack GC pass that failed.
    pub fn record_ct_gc_failure(&self) {
        self.ct_gc_runs
            .get_or_create(&GcStatusLabels {
                status: GcStatus::Failed,
            })
            .inc();
    }

    /// Sets `kpr_nodeport_events_total{event}` to the datapath's count
    /// (counters only grow: a smaller value, after `kpr cleanup`, is ignored).
    pub fn set_nodeport_event(&self, event: NodePortEvent, total: u64) {
        let c = self
            .nodeport_events
            .get_or_create(&NodePortEventLabels { event });
        let now = c.get();
        if total > now {
            c.inc_by(total - now);
        }
    }

    /// Sets `kpr_socket_source_range_drops_total` to the datapath's count
    /// (only grows, as [`Metrics::set_nodeport_event`]).
    pub fn set_socket_source_range_drops(&self, total: u64) {
        let now = self.socket_source_range_drops.get();
        if total > now {
            self.socket_source_range_drops.inc_by(total - now);
        }
    }

    /// Records a network programming latency (`kubeproxy_network_programming_duration_seconds`).
    pub fn observe_network_programming(&self, seconds: f64) {
        self.network_programming.observe(seconds);
    }

    /// Counts Service and EndpointSlice changes handled by a sync.
    pub fn add_changes(&self, services: u64, endpoints: u64) {
        self.service_changes.inc_by(services);
        self.endpoint_changes.inc_by(endpoints);
    }

    /// Sets the number of Services with a Local policy and no local endpoint.
    pub fn set_no_local_endpoints(&self, traffic_policy: TrafficPolicy, services: usize) {
        self.no_local_endpoints
            .get_or_create(&TrafficPolicyLabels { traffic_policy })
            .set(gauge_value(services));
    }

    pub fn inc_watch_error(&self, kind: WatchKind) {
        self.watch_errors
            .get_or_create(&WatchKindLabels { kind })
            .inc();
    }

    pub fn inc_relist(&self, kind: WatchKind) {
        self.relists.get_or_create(&WatchKindLabels { kind }).inc();
    }

    /// Records how long one sync took (`kubeproxy_sync_proxy_rules_duration_seconds`).
    pub fn observe_sync(&self, duration: Duration) {
        self.sync_duration.observe(duration.as_secs_f64());
    }

    /// Starts timing a sync; the duration is observed when the timer is
    /// dropped or [stopped](SyncTimer::stop), whichever comes first.
    pub fn sync_timer(&self) -> SyncTimer<'_> {
        SyncTimer {
            metrics: self,
            started: Instant::now(),
            observed: false,
        }
    }

    /// Counts a finished sync in `kpr_syncs_total{result}`; on success also
    /// sets `kubeproxy_sync_proxy_rules_last_timestamp_seconds` to `at`.
    pub fn record_sync_result(&self, ok: bool, at: SystemTime) {
        let result = if ok {
            SyncResult::Success
        } else {
            SyncResult::Failure
        };
        self.syncs.get_or_create(&SyncResultLabels { result }).inc();
        if ok {
            let unix = at
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.last_sync.set(unix);
        }
    }

    /// Counts one error in `kpr_sync_errors_total{reason}`.
    pub fn inc_sync_error(&self, reason: SyncErrorReason) {
        self.sync_errors
            .get_or_create(&SyncErrorLabels { reason })
            .inc();
    }

    /// Counts one failed read of a manifest path in
    /// `kpr_source_read_errors_total{reason}`.
    pub fn inc_source_read_error(&self, reason: ReadErrorReason) {
        self.source_read_errors
            .get_or_create(&ReadErrorLabels { reason })
            .inc();
    }

    /// Counts one skipped document or object in `kpr_skipped_objects_total{reason}`.
    pub fn inc_skipped(&self, reason: SkipReason) {
        self.skipped.get_or_create(&SkipLabels { reason }).inc();
    }

    /// Sets `kpr_services_unprogrammed{reason}`: Services not programmed
    /// now for `reason`.
    pub fn set_unprogrammed(&self, reason: UnprogrammedReason, services: usize) {
        self.unprogrammed
            .get_or_create(&UnprogrammedLabels { reason })
            .set(gauge_value(services));
    }

    /// Sets `kpr_services`: Services programmed.
    pub fn set_services(&self, count: usize) {
        self.services.set(gauge_value(count));
    }

    /// Sets `kpr_frontends`: frontends (address, port, protocol) programmed.
    pub fn set_frontends(&self, count: usize) {
        self.frontends.set(gauge_value(count));
    }

    /// Sets `kpr_backends`: backends programmed.
    pub fn set_backends(&self, count: usize) {
        self.backends.set(gauge_value(count));
    }

    /// Sets `kpr_bpf_map_entries{map}` and `kpr_bpf_map_capacity{map}`
    /// (entries, and the map's max_entries).
    pub fn set_map(&self, map: MapName, entries: usize, capacity: usize) {
        let labels = MapLabels { map };
        self.map_entries
            .get_or_create(&labels)
            .set(gauge_value(entries));
        self.map_capacity
            .get_or_create(&labels)
            .set(gauge_value(capacity));
    }

    /// Counts `map` replaced by a larger copy.
    pub fn inc_map_growth(&self, map: MapName) {
        self.map_grown.get_or_create(&MapLabels { map }).inc();
    }
}

/// Times one sync for `kubeproxy_sync_proxy_rules_duration_seconds`; see
/// [`Metrics::sync_timer`].
#[derive(Debug)]
#[must_use = "the sync is timed until the timer is dropped"]
pub struct SyncTimer<'a> {
    metrics: &'a Metrics,
    started: Instant,
    observed: bool,
}

impl SyncTimer<'_> {
    /// Observes the elapsed time now and returns it.
    pub fn stop(mut self) -> Duration {
        self.observe()
    }

    fn observe(&mut self) -> Duration {
        let elapsed = self.started.elapsed();
        if !self.observed {
            self.observed = true;
            self.metrics.observe_sync(elapsed);
        }
        elapsed
    }
}

impl Drop for SyncTimer<'_> {
    fn drop(&mut self) {
        self.observe();
    }
}

#[cfg(test)]
mod tests;
