//! The label values of the metrics: each a fixed enum (never object
//! names or error text). The maps' identity and the north-south events are
//! the datapath's ([`MapName`], [`NodePortEvent`], generated from the BPF
//! counter list); their label encoding is here.

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

pub use crate::datapath::counters::NodePortEvent;
pub use crate::datapath::pins::MapName;
use crate::skip::SkipReason;

/// The `map` label: the map's [`MapName`]. (Was a separate enum; the
/// alias keeps its name.)
pub type MapLabel = MapName;

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
    /// Why a Service is not programmed, as the `reason` label of
    /// `kpr_services_unprogrammed`.
    pub enum UnprogrammedReason {
        /// Programming it would overflow a BPF map.
        Capacity => "capacity",
        /// Another Service already owns one of its frontends.
        FrontendConflict => "frontend_conflict",
        /// No free backend or frontend id.
        IdsExhausted => "ids_exhausted",
        /// A frontend has more backends than slots can number.
        TooManyBackends => "too_many_backends",
        /// A frontend's Maglev table cannot be built.
        Maglev => "maglev",
        /// Translation refused the Service (what the API server would
        /// refuse, or nothing kpr can program): none of its frontends is
        /// programmed.
        Invalid => "invalid",
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

label_enum! {
    /// The HTTP status of a `/healthz` or `/livez` answer, as kube-proxy's
    /// `code` label of `kubeproxy_proxy_{healthz,livez}_total`.
    pub enum ProbeCode {
        /// Healthy.
        Ok => "200",
        /// Unhealthy (or, for `/healthz`, the node is being removed).
        Unavailable => "503",
    }
}

impl EncodeLabelValue for MapName {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

impl EncodeLabelValue for NodePortEvent {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_label(), encoder)
    }
}

impl EncodeLabelValue for SkipReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_label(), encoder)
    }
}
