//! kube-proxy's sync-queue and health-endpoint metrics, under kube-proxy's
//! names, help texts and buckets (pkg/proxy/metrics): when a sync was last
//! queued, the changes waiting for one, full and partial sync durations,
//! and the answers of `/healthz` and `/livez` by HTTP status code.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use super::labels::ProbeCode;
use super::SYNC_DURATION_BUCKETS;

/// Which Services a sync covered, for its duration histogram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncScope {
    /// Every Service (`kubeproxy_sync_full_proxy_rules_duration_seconds`).
    Full,
    /// Only the changed ones (`kubeproxy_sync_partial_proxy_rules_duration_seconds`).
    Partial,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: ProbeCode,
}

/// The `/healthz` and `/livez` answer counters; cheap to clone (the clones
/// count into the same series), for the health endpoint.
#[derive(Clone, Debug, Default)]
pub struct ProbeCounters {
    healthz: Family<CodeLabels, Counter>,
    livez: Family<CodeLabels, Counter>,
}

impl ProbeCounters {
    /// Counts one `/healthz` answer (`kubeproxy_proxy_healthz_total{code}`).
    pub fn count_healthz(&self, code: ProbeCode) {
        self.healthz.get_or_create(&CodeLabels { code }).inc();
    }

    /// Counts one `/livez` answer (`kubeproxy_proxy_livez_total{code}`).
    pub fn count_livez(&self, code: ProbeCode) {
        self.livez.get_or_create(&CodeLabels { code }).inc();
    }
}

/// The families; see the module doc.
#[derive(Debug)]
pub struct KubeProxyMetrics {
    last_queued: Gauge<f64, AtomicU64>,
    endpoint_changes_pending: Gauge,
    service_changes_pending: Gauge,
    full_sync: Histogram,
    partial_sync: Histogram,
    probes: ProbeCounters,
}

impl Default for KubeProxyMetrics {
    fn default() -> Self {
        let (start, factor, count) = SYNC_DURATION_BUCKETS;
        let probes = ProbeCounters::default();
        for &code in ProbeCode::ALL {
            let _ = probes.healthz.get_or_create(&CodeLabels { code });
            let _ = probes.livez.get_or_create(&CodeLabels { code });
        }
        KubeProxyMetrics {
            last_queued: Gauge::default(),
            endpoint_changes_pending: Gauge::default(),
            service_changes_pending: Gauge::default(),
            full_sync: Histogram::new(exponential_buckets(start, factor, count)),
            partial_sync: Histogram::new(exponential_buckets(start, factor, count)),
            probes,
        }
    }
}

impl KubeProxyMetrics {
    /// Registers every family in `r` (the unit suffix and, for counters,
    /// `_total` are appended by prometheus-client).
    pub(super) fn register(&self, r: &mut Registry) {
        r.register_with_unit(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp",
            "The last time a sync of proxy rules was queued",
            Unit::Seconds,
            self.last_queued.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            self.endpoint_changes_pending.clone(),
        );
        r.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            self.service_changes_pending.clone(),
        );
        r.register_with_unit(
            "kubeproxy_sync_full_proxy_rules_duration",
            "SyncProxyRules latency in seconds for full resyncs",
            Unit::Seconds,
            self.full_sync.clone(),
        );
        r.register_with_unit(
            "kubeproxy_sync_partial_proxy_rules_duration",
            "SyncProxyRules latency in seconds for partial resyncs",
            Unit::Seconds,
            self.partial_sync.clone(),
        );
        r.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            self.probes.healthz.clone(),
        );
        r.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            self.probes.livez.clone(),
        );
    }

    /// A change arrived that a sync will apply, at `at`
    /// (`kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds`).
    pub fn record_queued(&self, at: SystemTime) {
        let unix = at
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_queued.set(unix);
    }

    /// Service and EndpointSlice events received and not synced yet
    /// (`kubeproxy_sync_proxy_rules_{service,endpoint}_changes_pending`).
    pub fn set_pending(&self, service_changes: u64, endpoint_changes: u64) {
        let value = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.service_changes_pending.set(value(service_changes));
        self.endpoint_changes_pending.set(value(endpoint_changes));
    }

    /// Observes how long a sync of `scope` took.
    pub fn observe_sync(&self, scope: SyncScope, duration: Duration) {
        match scope {
            SyncScope::Full => &self.full_sync,
            SyncScope::Partial => &self.partial_sync,
        }
        .observe(duration.as_secs_f64());
    }

    /// The `/healthz` and `/livez` counters, for the health endpoint.
    pub fn probes(&self) -> ProbeCounters {
        self.probes.clone()
    }
}
