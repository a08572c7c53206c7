//! Traffic policies (kube-proxy: `pkg/api/v1/service/util.go`,
//! `ExternallyAccessible`, `ExternalPolicyLocal`, `InternalPolicyLocal`,
//! `NeedsHealthCheck`) and what follows from them besides backends: the
//! no-local-endpoints cases kube-proxy counts and the health check node
//! port of a LoadBalancer Service with `externalTrafficPolicy: Local`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::ServiceSpec;

use super::endpoints::{Categorized, ServiceEndpoints};
use super::{IpFamily, Skips};
use crate::model::{ServiceRef, ServiceType};
use crate::skip::SkipReason;

/// Which traffic policy left a frontend without local endpoints: the
/// `traffic_policy` label of `kubeproxy_sync_proxy_rules_no_local_endpoints_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TrafficPolicy {
    /// `internalTrafficPolicy: Local` (ClusterIP frontends).
    Internal,
    /// `externalTrafficPolicy: Local` (NodePort, ExternalIP, LoadBalancer frontends).
    External,
}

impl TrafficPolicy {
    pub const ALL: [TrafficPolicy; 2] = [TrafficPolicy::Internal, TrafficPolicy::External];

    /// `internal` or `external`.
    pub fn as_label(self) -> &'static str {
        match self {
            TrafficPolicy::Internal => "internal",
            TrafficPolicy::External => "external",
        }
    }
}

impl fmt::Display for TrafficPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_label())
    }
}

/// A service port (in one family) whose Local traffic policy finds no
/// endpoint on this node although the Service has endpoints elsewhere.
/// kube-proxy counts these per service port and family on every sync.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NoLocalEndpoints {
    pub service: ServiceRef,
    pub family: IpFamily,
    pub policy: TrafficPolicy,
}

/// A health check node port to serve (kube-proxy's service health server):
/// load balancers probe it to learn whether this node has local endpoints.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HealthCheck {
    /// `spec.healthCheckNodePort`.
    pub port: u16,
    /// `namespace/name`.
    pub service: String,
    /// Distinct local ready endpoint addresses (in the family with the
    /// most; in a dual-stack Service that is the number of local pods).
    pub local_endpoints: usize,
}

/// Which of a Service's traffic policies are `Local`.
#[derive(Clone, Copy, Debug)]
pub(super) struct LocalPolicies {
    /// `internalTrafficPolicy: Local`: ClusterIP frontends get the local
    /// set only.
    pub internal: bool,
    /// `externalTrafficPolicy: Local` on an externally accessible Service
    /// (any type but ClusterIP, or any type with externalIPs): its
    /// north-south frontends get the local set, and an Internal-scope twin
    /// with the cluster set for node-local clients.
    pub external: bool,
}

impl LocalPolicies {
    pub fn of(spec: &ServiceSpec, svc_type: ServiceType) -> LocalPolicies {
        let externally_accessible = svc_type != ServiceType::ClusterIP
            || spec
                .external_ips
                .as_ref()
                .is_some_and(|ips| !ips.is_empty());
        LocalPolicies {
            internal: spec.internal_traffic_policy.as_deref() == Some("Local"),
            external: externally_accessible
                && spec.external_traffic_policy.as_deref() == Some("Local"),
        }
    }
}

/// The no-local-endpoints cases of one service port in one family.
/// kube-proxy counts a Local policy without local endpoints only when the
/// Service has endpoints elsewhere (else it rejects: "no endpoints").
pub(super) fn no_local_endpoints(
    policies: LocalPolicies,
    sets: &Categorized,
    service: &ServiceRef,
    family: IpFamily,
) -> Vec<NoLocalEndpoints> {
    [
        (policies.internal, TrafficPolicy::Internal),
        (policies.external, TrafficPolicy::External),
    ]
    .into_iter()
    .filter(|(local, _)| *local && sets.has_any && sets.local.is_empty())
    .map(|(_, policy)| NoLocalEndpoints {
        service: service.clone(),
        family,
        policy,
    })
    .collect()
}

/// The health check of a LoadBalancer Service with
/// `externalTrafficPolicy: Local` (kube-proxy's `NeedsHealthCheck` is
/// LoadBalancer-only) on `spec.healthCheckNodePort`; a missing or
/// out-of-range port is a skip.
pub(super) fn health_check(
    spec: &ServiceSpec,
    svc_type: ServiceType,
    policies: LocalPolicies,
    key: String,
    endpoints: &ServiceEndpoints,
    cluster_ips: &BTreeMap<IpFamily, IpAddr>,
    skips: &mut Skips<'_>,
) -> Option<HealthCheck> {
    if svc_type != ServiceType::LoadBalancer || !policies.external {
        return None;
    }
    let Some(raw) = spec.health_check_node_port else {
        skips.push(
            SkipReason::InvalidPort,
            "externalTrafficPolicy Local without a healthCheckNodePort".into(),
        );
        return None;
    };
    let Some(port) = super::service::port_number(raw) else {
        skips.push(
            SkipReason::InvalidPort,
            format!("healthCheckNodePort {raw} is out of range"),
        );
        return None;
    };
    Some(HealthCheck {
        port,
        service: key,
        local_endpoints: cluster_ips
            .keys()
            .map(|f| endpoints.local_ready_count(*f))
            .max()
            .unwrap_or(0),
    })
}
