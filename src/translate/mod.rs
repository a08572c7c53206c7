//! Kubernetes objects to desired load-balancer state: a pure function of
//! v1 Services, discovery.k8s.io/v1 EndpointSlices and what the agent knows
//! about its node ([`NodeContext`]), with kube-proxy's semantics as the
//! spec. No I/O, no clock: the same inputs always give the same frontends,
//! backends and slot order.
//!
//! What a Service becomes (kube-proxy: `pkg/proxy/servicechangetracker.go`,
//! `serviceport.go`, `pkg/proxy/util/utils.go`, `pkg/api/v1/service/util.go`):
//!
//! - Not programmed at all: Services or EndpointSlices labelled
//!   `service.kubernetes.io/service-proxy-name` (another proxy owns them) or
//!   `service.kubernetes.io/headless` (kube-proxy's informer selector drops
//!   both labels on both kinds); ExternalName Services; Services without a
//!   clusterIP or with `None` (headless). None of these is an error.
//! - For each IP family the Service has a clusterIP of (the first of that
//!   family), for each TCP/UDP port: a `ClusterIP` frontend; for NodePort
//!   and LoadBalancer Services with a `nodePort`, `NodePort` frontends on
//!   every [`NodeContext::node_ips`] address of the family plus the
//!   family's stand-in for every other node address: `127.0.0.1` (IPv4;
//!   kube-proxy's iptables mode serves localhost NodePorts) and `[::]`
//!   (IPv6, Cilium's `[::]:nodePort`);
//!   `ExternalIP` frontends for `spec.externalIPs` of the family;
//!   `LoadBalancer` frontends for `status.loadBalancer.ingress[].ip` of the
//!   family whose `ipMode` is `VIP` or unset (`Proxy` load balancers deliver
//!   to the node themselves, so their IPs are not programmed).
//! - Backends: see [`endpoints`] (terminating fallback, topology hints,
//!   local sets). `internalTrafficPolicy: Local` gives ClusterIP frontends
//!   the local set only. `externalTrafficPolicy: Local` (NodePort,
//!   LoadBalancer, or any type with externalIPs) gives the other frontends'
//!   External-scope entry the local set, flagged `has_internal_scope`, plus
//!   an Internal-scope entry at the same address with the cluster set: the
//!   socket hook (node-local clients) uses the Internal entry, as kube-proxy
//!   short-circuits locally originated traffic to the cluster chain, while
//!   traffic from outside the node keeps its source and stays on the node.
//! - A Local policy with no local endpoint, while the Service has endpoints
//!   elsewhere: kube-proxy drops; kpr programs the frontend without backends,
//!   so the socket hook fails the connect at once (ECONNREFUSED) instead of
//!   letting it time out, and records a [`NoLocalEndpoints`] for
//!   `kubeproxy_sync_proxy_rules_no_local_endpoints_total`.
//! - `sessionAffinity: ClientIP` sets the timeout (default 10800 s) on every
//!   frontend of the Service.
//! - Backend selection of north-south traffic: the annotation
//!   `service.kpr.io/lb-algorithm: random|maglev` (Cilium's
//!   `service.cilium.io/lb-algorithm`), else [`NodeContext::lb_algorithm`]
//!   (`--lb-algorithm`). Maglev is set on the External-scope NodePort,
//!   LoadBalancer and ExternalIP frontends only: ClusterIPs and the
//!   Internal-scope entries serve node-local clients, which the socket hooks
//!   balance at random. Any other annotation value is a skip
//!   (`invalid_annotation`) and the flag's algorithm applies.
//! - LoadBalancer Services with `externalTrafficPolicy: Local` get a
//!   [`HealthCheck`] on `spec.healthCheckNodePort` (kube-proxy's
//!   `NeedsHealthCheck` is LoadBalancer-only).
//! - `spec.loadBalancerSourceRanges` (kube-proxy: `serviceport.go`,
//!   `MapCIDRsByIPFamily`, the firewall chains of the iptables and nftables
//!   proxiers) restrict who may open flows to the `LoadBalancer` frontends
//!   (the ingress IPs) only: NodePorts, externalIPs and clusterIPs of the
//!   same Service stay open. Entries are trimmed; empty ones are ignored,
//!   invalid ones are skips (kube-proxy logs and ignores them); host bits
//!   are cleared; each family's frontends get that family's prefixes (an
//!   IPv6 prefix inside `::ffff:0:0/96` counts as IPv4, as Go parses it),
//!   and a family left without any is open to all, as it is for
//!   kube-proxy. Whether a prefix holds one of [`NodeContext::node_ips`]
//!   decides, for node-local clients whose source address is not known at
//!   `connect()`, whether they are let in (see `bpf/sock_lb.bpf.c`).
//!   The `service.beta.kubernetes.io/load-balancer-source-ranges`
//!   annotation is for cloud providers; kube-proxy does not read it, nor
//!   does kpr.
//!
//! kube-proxy reads hints, never `spec.trafficDistribution` (KEP-4444: the
//! EndpointSlice controller turns `PreferClose` into zone hints), and so
//! does kpr.

//! Where each rule lives: [`service`] reads the Service-wide facts and
//! builds the frontends of each service port and family; `addresses`
//! the clusterIPs, externalIPs, load-balancer ingress and NodePort
//! addresses; `source_ranges` `loadBalancerSourceRanges`; [`policy`] the
//! traffic policies, their no-local-endpoints cases and health checks;
//! [`endpoints`] the backend sets.

mod addresses;
mod endpoints;
mod host_ports;
mod policy;
mod service;
mod source_ranges;

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::LbAlgorithm;
use crate::reconcile::{DesiredByService, ServiceFrontends};
use crate::skip::SkipReason;

pub use addresses::IpFamily;
pub use host_ports::{host_port_key, translate_host_ports};
pub use policy::{HealthCheck, NoLocalEndpoints, TrafficPolicy};
pub use service::translate_service;
// What the translation tests (`use super::*`) name.
#[cfg(test)]
use crate::model::{Frontend, Protocol, Scope, ServiceType};
#[cfg(test)]
use ipnet::IpNet;
#[cfg(test)]
use source_ranges::parse_cidr_sloppy;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label naming the proxy that serves a Service instead of the default one;
/// objects carrying it (any value) are left alone.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label the control plane puts on headless Services' EndpointSlices.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The Node label that names its zone, compared with `hints.forZones`.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Annotation choosing a Service's north-south backend selection,
/// `random` or `maglev`, over `--lb-algorithm`.
pub const LB_ALGORITHM_ANNOTATION: &str = "service.kpr.io/lb-algorithm";
/// Default sessionAffinityConfig.clientIP.timeoutSeconds (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

/// What translation needs to know about the node it programs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// The node's name, compared with endpoints' `nodeName` to find local
    /// endpoints and with `hints.forNodes`. Empty (the default): no endpoint
    /// is local, so Local traffic policies leave frontends without backends.
    pub node_name: String,
    /// The node's `topology.kubernetes.io/zone`, compared with
    /// `hints.forZones`. None (the default): zone hints are ignored.
    pub zone: Option<String>,
    /// The addresses NodePorts are served on. Empty (the default): only the
    /// `127.0.0.1` and `[::]` NodePort frontends.
    pub node_ips: Vec<IpAddr>,
    /// North-south backend selection of Services without the
    /// [`LB_ALGORITHM_ANNOTATION`] (`--lb-algorithm`; default random).
    pub lb_algorithm: LbAlgorithm,
}

/// Something in an object that was not programmed, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// `Service ns/name` or `EndpointSlice ns/name`.
    pub object: String,
    pub reason: SkipReason,
    pub detail: String,
}

/// The result of translating a set of objects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Translation {
    pub desired: DesiredByService,
    pub skipped: Vec<Skipped>,
    /// Sorted; see [`NoLocalEndpoints`].
    pub no_local_endpoints: Vec<NoLocalEndpoints>,
    /// Sorted by port.
    pub health_checks: Vec<HealthCheck>,
}

impl Translation {
    /// How many service ports lack local endpoints under `policy`: the value
    /// of `kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy}`.
    pub fn no_local_endpoints_count(&self, policy: TrafficPolicy) -> usize {
        self.no_local_endpoints
            .iter()
            .filter(|n| n.policy == policy)
            .count()
    }
}

/// What one Service becomes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceTranslation {
    pub frontends: ServiceFrontends,
    pub no_local_endpoints: Vec<NoLocalEndpoints>,
    pub health_check: Option<HealthCheck>,
}

/// `namespace/name` of an object (namespace "default" when unset).
pub fn object_key(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("")
    )
}

/// The Service key (`namespace/name`) an EndpointSlice belongs to.
pub fn slice_service_key(slice: &EndpointSlice) -> Option<String> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(format!(
        "{}/{}",
        slice.metadata.namespace.as_deref().unwrap_or("default"),
        name
    ))
}

/// Whether kube-proxy would see the object at all: its informers select
/// `!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`
/// for Services and EndpointSlices alike.
pub fn is_for_default_proxy(meta: &ObjectMeta) -> bool {
    meta.labels.as_ref().is_none_or(|l| {
        !l.contains_key(SERVICE_PROXY_NAME_LABEL) && !l.contains_key(HEADLESS_LABEL)
    })
}

/// Translates every Service with the EndpointSlices that belong to it.
/// Takes references: the agent's objects are translated where they are
/// stored, never copied.
pub fn translate<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &NodeContext,
) -> Translation {
    let mut by_service: BTreeMap<String, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices
        .into_iter()
        .filter(|s| is_for_default_proxy(&s.metadata))
    {
        if let Some(key) = slice_service_key(slice) {
            by_service.entry(key).or_default().push(slice);
        }
    }
    let mut out = Translation::default();
    for svc in services {
        let key = object_key(&svc.metadata);
        let slices = by_service.get(&key).map(Vec::as_slice).unwrap_or(&[]);
        out.add(key, svc, slices, node);
    }
    out.finish()
}

impl Translation {
    /// Translates one more Service (`key` is its `namespace/name`) with
    /// its EndpointSlices; a second Service of the same key is a skip.
    /// For callers that hold slices per Service; [`Translation::finish`]
    /// once every Service is added.
    pub fn add(
        &mut self,
        key: String,
        svc: &Service,
        slices: &[&EndpointSlice],
        node: &NodeContext,
    ) {
        if self.desired.contains_key(&key) {
            self.skipped.push(Skipped {
                object: format!("Service {key}"),
                reason: SkipReason::Duplicate,
                detail: "a Service with this namespace/name was already read".into(),
            });
            return;
        }
        let t = translate_service(svc, slices, node, &mut self.skipped);
        self.desired.insert(key, t.frontends);
        self.no_local_endpoints.extend(t.no_local_endpoints);
        self.health_checks.extend(t.health_check);
    }

    /// Puts what [`Translation::add`] gathered in its order.
    pub fn finish(mut self) -> Translation {
        self.no_local_endpoints.sort();
        self.health_checks.sort();
        self
    }
}

/// Records skips against one object.
struct Skips<'a> {
    object: String,
    out: &'a mut Vec<Skipped>,
}

impl Skips<'_> {
    fn push(&mut self, reason: SkipReason, detail: String) {
        self.out.push(Skipped {
            object: self.object.clone(),
            reason,
            detail,
        });
    }
}

#[cfg(test)]
mod tests;
