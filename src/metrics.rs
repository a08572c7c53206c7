//! The agent's Prometheus metrics, in one registry with typed families.
//!
//! Where a metric means what kube-proxy's does, it has kube-proxy's name and
//! buckets (`kubeproxy_sync_proxy_rules_*`), so existing dashboards and
//! alerts keep working after the switch; everything else is `kpr_*`. Every
//! label value comes from a fixed enum, never from object names or error
//! text, and every label value is created up front so that zeros are
//! exported before the first event.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::skip::SkipReason;

/// kube-proxy's sync duration buckets: `0.001 * 2^i` s for i in 0..15, i.e.
/// 1 ms to 16.384 s, plus the implicit `+Inf` (16 `le` series in all).
pub const SYNC_DURATION_BUCKETS: (f64, f64, u16) = (0.001, 2.0, 15);

/// Defines a label enum: the variants with their label values, `ALL` in label
/// order, `as_label`, `Display` and Prometheus label encoding. Adding a
/// variant here is all it takes to export it.
macro_rules! label_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in label order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The metric label value.
            pub fn as_label(self) -> &'static str {
                match self {
                    $( $name::$variant => $label, )+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_label())
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_label(), encoder)
            }
        }
    };
}

label_enum! {
    /// A BPF map, as the `map` label of `kpr_bpf_map_entries` and
    /// `kpr_bpf_map_capacity`.
    pub enum MapLabel {
        /// The services (frontend and backend slot) map.
        Services => "services",
        /// The backends map.
        Backends => "backends",
        /// The session affinity LRU map.
        Affinity => "affinity",
        /// The socket reverse-NAT LRU map (for `getpeername` and UDP replies).
        SockRevNat => "sock_revnat",
        /// The north-south conntrack LRU map (zero without --devices).
        Conntrack => "conntrack",
        /// The DSR map: north-south frontends' local backends (zero
        /// without --devices).
        Dsr => "dsr",
        /// The loadBalancerSourceRanges LPM trie.
        SourceRanges => "source_ranges",
        /// The node's own addresses (NodePorts on every address, socket path).
        HostAddresses => "host_addresses",
        /// The pods' devices the north-south datapath redirects into
        /// (zero without --devices).
        PeerDevices => "peer_devices",
    }
}

label_enum! {
    /// The outcome of a conntrack GC pass, as the `status` label of
    /// `kpr_ct_gc_runs_total` (Cilium's `datapath_conntrack_gc_runs_total`).
    pub enum GcStatus {
        /// The pass walked the whole map.
        Completed => "completed",
        /// The map could not be read or an entry not deleted.
        Failed => "failed",
    }
}

label_enum! {
    /// What the north-south datapath did with a packet or flow, as the
    /// `event` label of `kpr_nodeport_events_total` (enum np_stat).
    pub enum NodePortEvent {
        /// A flow was created.
        FlowNew => "flow_new",
        /// A flow was created with SNAT (remote backend).
        FlowSnat => "flow_snat",
        /// A packet was translated toward a backend.
        Forward => "forward",
        /// A reply was translated back toward the client.
        Reply => "reply",
        /// Dropped: the frontend has no usable backend (drop mode, a Local
        /// external policy without local backend, or a reject that could
        /// not be built).
        DropNoBackend => "drop_no_backend",
        /// Dropped: no free port in the SNAT range.
        DropSnatExhausted => "drop_snat_exhausted",
        /// Dropped: no route or neighbour toward the backend or client.
        DropFib => "drop_fib",
        /// Dropped: a conntrack entry could not be written.
        DropConntrack => "drop_conntrack",
        /// Dropped: TTL exhausted.
        DropTtl => "drop_ttl",
        /// A packet XDP translated and redirected itself.
        XdpForward => "xdp_forward",
        /// A new flow to a frontend without backend was answered with ICMP
        /// port unreachable (--service-no-backend-response reject).
        RejectNoBackend => "reject_no_backend",
        /// Dropped: the source is outside the frontend's loadBalancerSourceRanges.
        DropSourceRange => "drop_source_range",
        /// A flow was created with DSR (remote backend, IPIP to its node).
        FlowDsr => "flow_dsr",
        /// A packet another node encapsulated for DSR reached a local backend.
        DsrDecap => "dsr_decap",
        /// An IPIP packet matched no local backend of a frontend (left alone).
        DsrMiss => "dsr_miss",
        /// Dropped: too big to encapsulate for DSR (ICMP fragmentation-needed sent).
        DropDsrTooBig => "drop_dsr_too_big",
        /// A DSR SYN-ACK's TCP MSS was lowered to leave room for the encapsulation.
        MssClamp => "mss_clamp",
        /// A flow to a local backend got another client source port: its
        /// reply tuple was a live flow's of another frontend.
        PortRemap => "port_remap",
        /// A packet to a local backend was handed straight into its pod's
        /// namespace (bpf_redirect_peer), not transmitted on the host side.
        PeerRedirect => "peer_redirect",
        /// An ICMP error about a translated flow was translated in turn and
        /// sent where the flow goes (path MTU, port unreachable, ...).
        IcmpError => "icmp_error",
        /// A later IP fragment was given its datagram's ports and followed
        /// its flow.
        FragmentFollowed => "fragment_followed",
        /// A later IP fragment of a datagram whose first fragment was not
        /// seen (left alone), or whose flow was never opened (dropped).
        FragmentUnknown => "fragment_unknown",
    }
}

label_enum! {
    /// Why (part of) a sync failed, as the `reason` label of `kpr_sync_errors_total`.
    pub enum SyncErrorReason {
        /// A Service did not fit in the maps (or ran out of ids) and was refused.
        Capacity => "capacity",
        /// A BPF map update or delete failed.
        MapUpdate => "map_update",
        /// The source delivered something unusable as a whole (e.g. conflicting frontends).
        Source => "source",
    }
}

label_enum! {
    /// The outcome of a sync, as the `result` label of `kpr_syncs_total`.
    pub enum SyncResult {
        /// Everything the source asked for is programmed.
        Success => "success",
        /// Something was refused or failed; the sync will be retried.
        Failure => "failure",
    }
}

label_enum! {
    /// A Local traffic policy, as kube-proxy's `traffic_policy` label.
    pub enum TrafficPolicy {
        /// internalTrafficPolicy: Local.
        Internal => "internal",
        /// externalTrafficPolicy: Local.
        External => "external",
    }
}

label_enum! {
    /// A watched kind, as the `kind` label of the watch metrics.
    pub enum WatchKind {
        /// v1 Services.
        Service => "service",
        /// discovery.k8s.io/v1 EndpointSlices.
        EndpointSlice => "endpointslice",
        /// The agent's own v1 Node.
        Node => "node",
    }
}

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

impl EncodeLabelValue for SkipReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_label(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: MapLabel,
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
/// Exposed (OpenMetrics text, see [`Metrics::encode`]):
///
/// | name | type | labels |
/// |------|------|--------|
/// | `kubeproxy_sync_proxy_rules_duration_seconds` | histogram | |
/// | `kubeproxy_sync_proxy_rules_last_timestamp_seconds` | gauge (unix s) | |
/// | `kpr_services`, `kpr_frontends`, `kpr_backends` | gauge | |
/// | `kpr_bpf_map_entries`, `kpr_bpf_map_capacity` | gauge | `map` ([`MapLabel`]) |
/// | `kpr_sync_errors_total` | counter | `reason` ([`SyncErrorReason`]) |
/// | `kpr_skipped_objects_total` | counter | `reason` ([`SkipReason`]) |
/// | `kpr_syncs_total` | counter | `result` ([`SyncResult`]) |
/// | `kpr_ct_gc_runs_total` | counter | `status` ([`GcStatus`]) |
/// | `kpr_ct_gc_deleted_entries_total` | counter | |
/// | `kpr_ct_entries` | gauge (after the last GC pass) | |
/// | `kpr_nodeport_events_total` | counter | `event` ([`NodePortEvent`]) |
/// | `kpr_nodeport_devices` | gauge | |
/// | `kpr_nodeport_device_syncs_total` | counter | `result` ([`SyncResult`]) |
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
    sync_errors: Family<SyncErrorLabels, Counter>,
    skipped: Family<SkipLabels, Counter>,
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
    nodeport_devices: Gauge,
    device_syncs: Family<SyncResultLabels, Counter>,
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
            sync_errors: Family::default(),
            skipped: Family::default(),
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
            nodeport_devices: Gauge::default(),
            device_syncs: Family::default(),
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
        for &map in MapLabel::ALL {
            let _ = metrics.map_entries.get_or_create(&MapLabels { map });
            let _ = metrics.map_capacity.get_or_create(&MapLabels { map });
        }
        for &reason in SyncErrorReason::ALL {
            let _ = metrics
                .sync_errors
                .get_or_create(&SyncErrorLabels { reason });
        }
        for reason in SkipReason::ALL {
            let _ = metrics.skipped.get_or_create(&SkipLabels { reason });
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
            "kpr_sync_errors",
            "Errors during syncs, by reason",
            self.sync_errors.clone(),
        );
        r.register(
            "kpr_skipped_objects",
            "Manifest documents, objects, ports or endpoints skipped, by reason",
            self.skipped.clone(),
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
            "kpr_nodeport_devices",
            "Interfaces the north-south programs are attached to",
            self.nodeport_devices.clone(),
        );
        r.register(
            "kpr_nodeport_device_syncs",
            "Re-attachments of the north-south programs after link changes, by result",
            self.device_syncs.clone(),
        );
        self
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

    /// Counts one skipped document or object in `kpr_skipped_objects_total{reason}`.
    pub fn inc_skipped(&self, reason: SkipReason) {
        self.skipped.get_or_create(&SkipLabels { reason }).inc();
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
    pub fn set_map(&self, map: MapLabel, entries: usize, capacity: usize) {
        let labels = MapLabels { map };
        self.map_entries
            .get_or_create(&labels)
            .set(gauge_value(entries));
        self.map_capacity
            .get_or_create(&labels)
            .set(gauge_value(capacity));
    }

    /// The registry in the OpenMetrics text format, ending in `# EOF`.
    ///
    /// Encoding into a `String` cannot fail with these label types; should it
    /// anyway, the error is logged and an empty exposition returned rather
    /// than a truncated one.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics");
            out.clear();
            out.push_str("# EOF\n");
        }
        out
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
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The value of the sample whose name and labels are exactly `series`.
    #[track_caller]
    fn sample(text: &str, series: &str) -> f64 {
        let found: Vec<f64> = text
            .lines()
            .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|value| {
                let value = value.split(' ').next().unwrap_or(value);
                value
                    .parse()
                    .unwrap_or_else(|e| panic!("{series}: {value}: {e}"))
            })
            .collect();
        match found[..] {
            [value] => value,
            _ => panic!("{series}: {} samples in\n{text}", found.len()),
        }
    }

    #[test]
    fn every_family_is_exposed_under_its_exact_name_and_type() {
        let text = Metrics::new().encode();

        let types: BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        let expected: BTreeSet<&str> = [
            "kubeproxy_sync_proxy_rules_duration_seconds histogram",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge",
            "kpr_services gauge",
            "kpr_frontends gauge",
            "kpr_backends gauge",
            "kpr_bpf_map_entries gauge",
            "kpr_bpf_map_capacity gauge",
            "kpr_sync_errors counter",
            "kpr_skipped_objects counter",
            "kpr_syncs counter",
            "kubeproxy_network_programming_duration_seconds histogram",
            "kubeproxy_sync_proxy_rules_endpoint_changes counter",
            "kubeproxy_sync_proxy_rules_service_changes counter",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total gauge",
            "kpr_watch_errors counter",
            "kpr_relists counter",
            "kpr_ct_gc_runs counter",
            "kpr_ct_gc_deleted_entries counter",
            "kpr_ct_entries gauge",
            "kpr_nodeport_events counter",
            "kpr_nodeport_devices gauge",
            "kpr_nodeport_device_syncs counter",
        ]
        .into_iter()
        .collect();
        assert_eq!(types, expected, "\n{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn every_label_value_is_exported_at_zero_before_any_event() {
        let text = Metrics::new().encode();

        for map in MapLabel::ALL {
            assert_eq!(
                sample(&text, &format!("kpr_bpf_map_entries{{map=\"{map}\"}}")),
                0.0
            );
            assert_eq!(
                sample(&text, &format!("kpr_bpf_map_capacity{{map=\"{map}\"}}")),
                0.0
            );
        }
        for reason in SyncErrorReason::ALL {
            let series = format!("kpr_sync_errors_total{{reason=\"{reason}\"}}");
            assert_eq!(sample(&text, &series), 0.0);
        }
        for reason in SkipReason::ALL {
            let series = format!("kpr_skipped_objects_total{{reason=\"{reason}\"}}");
            assert_eq!(sample(&text, &series), 0.0);
        }
        for result in ["success", "failure"] {
            let series = format!("kpr_syncs_total{{result=\"{result}\"}}");
            assert_eq!(sample(&text, &series), 0.0);
        }
    }

    #[test]
    fn updates_show_up_under_the_exact_names() {
        let metrics = Metrics::new();
        metrics.observe_sync(Duration::from_millis(3));
        metrics.record_sync_result(true, UNIX_EPOCH + Duration::from_millis(1_700_000_000_500));
        metrics.record_sync_result(false, UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        metrics.set_services(3);
        metrics.set_frontends(7);
        metrics.set_backends(12);
        metrics.set_map(MapLabel::SockRevNat, 40, 65_536);
        metrics.inc_sync_error(SyncErrorReason::Capacity);
        metrics.inc_sync_error(SyncErrorReason::Capacity);
        metrics.inc_skipped(SkipReason::UnsupportedKind);

        let text = metrics.encode();

        let s = |series: &str| sample(&text, series);
        assert_eq!(s("kubeproxy_sync_proxy_rules_duration_seconds_count"), 1.0);
        assert_eq!(s("kubeproxy_sync_proxy_rules_duration_seconds_sum"), 0.003);
        assert_eq!(
            s("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"}"),
            0.0
        );
        assert_eq!(
            s("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"}"),
            1.0
        );
        // The last *successful* sync, not the failed one after it.
        assert_eq!(
            s("kubeproxy_sync_proxy_rules_last_timestamp_seconds"),
            1_700_000_000.5
        );
        assert_eq!(s("kpr_services"), 3.0);
        assert_eq!(s("kpr_frontends"), 7.0);
        assert_eq!(s("kpr_backends"), 12.0);
        assert_eq!(s("kpr_bpf_map_entries{map=\"sock_revnat\"}"), 40.0);
        assert_eq!(s("kpr_bpf_map_capacity{map=\"sock_revnat\"}"), 65_536.0);
        assert_eq!(s("kpr_bpf_map_entries{map=\"services\"}"), 0.0);
        assert_eq!(s("kpr_sync_errors_total{reason=\"capacity\"}"), 2.0);
        assert_eq!(s("kpr_sync_errors_total{reason=\"map_update\"}"), 0.0);
        assert_eq!(
            s("kpr_skipped_objects_total{reason=\"unsupported_kind\"}"),
            1.0
        );
        assert_eq!(s("kpr_syncs_total{result=\"success\"}"), 1.0);
        assert_eq!(s("kpr_syncs_total{result=\"failure\"}"), 1.0);
    }

    #[test]
    fn the_duration_histogram_has_kube_proxys_buckets() {
        let text = Metrics::new().encode();

        let bounds: Vec<&str> = text
            .lines()
            .filter_map(|l| {
                l.strip_prefix("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"")
            })
            .filter_map(|l| l.split('"').next())
            .collect();
        assert_eq!(bounds.len(), 16, "{bounds:?}");
        assert_eq!(bounds[0], "0.001");
        assert_eq!(bounds[14], "16.384");
        assert_eq!(bounds[15], "+Inf");
    }

    #[test]
    fn a_sync_timer_observes_once_when_stopped_or_dropped() {
        let metrics = Metrics::new();

        let elapsed = metrics.sync_timer().stop();
        {
            let _timer = metrics.sync_timer();
        }

        let text = metrics.encode();
        assert_eq!(
            sample(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count"),
            2.0
        );
        assert!(elapsed < Duration::from_secs(5));
    }

    #[test]
    fn label_values_are_distinct_snake_case() {
        let labels: Vec<&str> = MapLabel::ALL
            .iter()
            .map(|m| m.as_label())
            .chain(SyncErrorReason::ALL.iter().map(|r| r.as_label()))
            .chain(SyncResult::ALL.iter().map(|r| r.as_label()))
            .collect();
        for label in &labels {
            assert!(
                label.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{label}"
            );
        }
        let distinct: BTreeSet<&str> = MapLabel::ALL.iter().map(|m| m.as_label()).collect();
        assert_eq!(distinct.len(), MapLabel::ALL.len());
    }
}
