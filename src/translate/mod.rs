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
//!   every [`NodeContext::node_ips`] address of the family plus `127.0.0.1`
//!   (IPv4 only: kube-proxy's iptables mode serves localhost NodePorts);
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

mod endpoints;

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::{
    Frontend, FrontendOptions, FrontendSpec, LbAlgorithm, Protocol, Scope, ServiceRef, ServiceType,
};
use crate::reconcile::{DesiredByService, ServiceFrontends};
use crate::skip::SkipReason;
use endpoints::{Backends, ServiceEndpoints};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label naming the proxy that serves a Service instead of the default one;
/// objects carrying it (any value) are left alone.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label the control plane puts on headless Services' EndpointSlices.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
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
    /// `127.0.0.1` NodePort frontends.
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

/// An IP family, as kube-proxy's `ip_family` metric label spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// `IPv4` or `IPv6` (also the EndpointSlice `addressType`).
    pub fn as_label(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_label())
    }
}

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
pub fn translate(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeContext,
) -> Translation {
    let mut by_service: BTreeMap<String, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices.iter().filter(|s| is_for_default_proxy(&s.metadata)) {
        if let Some(key) = slice_service_key(slice) {
            by_service.entry(key).or_default().push(slice);
        }
    }
    let mut out = Translation::default();
    for svc in services {
        let key = object_key(&svc.metadata);
        if out.desired.contains_key(&key) {
            out.skipped.push(Skipped {
                object: format!("Service {key}"),
                reason: SkipReason::Duplicate,
                detail: "a Service with this namespace/name was already read".into(),
            });
            continue;
        }
        let slices = by_service.get(&key).map(Vec::as_slice).unwrap_or(&[]);
        let t = translate_service(svc, slices, node, &mut out.skipped);
        out.desired.insert(key, t.frontends);
        out.no_local_endpoints.extend(t.no_local_endpoints);
        out.health_checks.extend(t.health_check);
    }
    out.no_local_endpoints.sort();
    out.health_checks.sort();
    out
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

/// The frontends (and health check, and no-local-endpoints cases) of one
/// Service, given the EndpointSlices that belong to it. See the module
/// documentation for the rules.
pub fn translate_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeContext,
    skipped: &mut Vec<Skipped>,
) -> ServiceTranslation {
    let key = object_key(&svc.metadata);
    let mut out = ServiceTranslation::default();
    if !is_for_default_proxy(&svc.metadata) {
        return out;
    }
    let Some(spec) = &svc.spec else { return out };
    let mut skips = Skips {
        object: format!("Service {key}"),
        out: skipped,
    };

    let svc_type = match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ExternalName" => return out,
        "ClusterIP" => ServiceType::ClusterIP,
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        other => {
            skips.push(SkipReason::UnsupportedType, format!("type {other:?}"));
            return out;
        }
    };
    let Some(cluster_ips) = cluster_ips_by_family(spec, &mut skips) else {
        return out; // headless or no clusterIP: DNS only
    };
    let external_ips = addresses_of(
        spec.external_ips.iter().flatten().map(String::as_str),
        "externalIP",
        &cluster_ips,
        &mut skips,
    );
    let lb_vips = if svc_type == ServiceType::LoadBalancer {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            // kube-proxy's IsVIPMode: unset means VIP; anything else
            // (Proxy) means the load balancer delivers to the node itself.
            .filter(|ing| matches!(ing.ip_mode.as_deref(), None | Some("VIP")))
            .filter_map(|ing| ing.ip.as_deref())
            .filter(|ip| !ip.is_empty());
        addresses_of(
            ingress,
            "load balancer ingress IP",
            &cluster_ips,
            &mut skips,
        )
    } else {
        Vec::new()
    };
    let node_ips: BTreeSet<IpAddr> = node.node_ips.iter().copied().collect();
    let source_ranges = if svc_type == ServiceType::LoadBalancer {
        source_ranges_of(spec, &mut skips)
    } else {
        Vec::new()
    };

    // pkg/api/v1/service/util.go: ExternallyAccessible, ExternalPolicyLocal,
    // InternalPolicyLocal, NeedsHealthCheck.
    let externally_accessible = svc_type != ServiceType::ClusterIP
        || spec
            .external_ips
            .as_ref()
            .is_some_and(|ips| !ips.is_empty());
    let etp_local =
        externally_accessible && spec.external_traffic_policy.as_deref() == Some("Local");
    let itp_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    let plain = FrontendOptions {
        affinity_timeout,
        ..Default::default()
    };
    // North-south frontends (External scope, not ClusterIP) only.
    let maglev = lb_algorithm(&svc.metadata, node, &mut skips) == LbAlgorithm::Maglev;
    let north_south = FrontendOptions { maglev, ..plain };

    let eps = ServiceEndpoints::new(slices, node, skips.out);
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = svc.metadata.name.clone().unwrap_or_default();

    for port in spec.ports.iter().flatten() {
        let Some(proto) = service_port_protocol(port, &mut skips) else {
            continue;
        };
        let Some(number) = port_number(port.port) else {
            skips.push(
                SkipReason::InvalidPort,
                format!("port {} is out of range", port.port),
            );
            continue;
        };
        let node_port = match port.node_port {
            None | Some(0) => None, // not allocated
            Some(n) if svc_type == ServiceType::ClusterIP => {
                skips.push(
                    SkipReason::InvalidPort,
                    format!("nodePort {n} on a ClusterIP Service"),
                );
                None
            }
            Some(n) => {
                let p = port_number(n);
                if p.is_none() {
                    skips.push(
                        SkipReason::InvalidPort,
                        format!("nodePort {n} is out of range"),
                    );
                }
                p
            }
        };
        let service = ServiceRef {
            namespace: namespace.clone(),
            name: name.clone(),
            port_name: port.name.clone().unwrap_or_default(),
        };
        let mut add =
            |fe: Frontend, svc_type, options, backends: &Backends, source_ranges: &[IpNet]| {
                if out.frontends.contains_key(&fe) {
                    skips.push(
                        SkipReason::Duplicate,
                        format!("{svc_type} frontend {} repeats another one", fe.addr),
                    );
                    return false;
                }
                out.frontends.insert(
                    fe,
                    FrontendSpec {
                        service: service.clone(),
                        svc_type,
                        options,
                        backends: backends.clone(),
                        source_ranges: source_ranges.to_vec(),
                    },
                );
                true
            };

        for (&family, &cluster_ip) in &cluster_ips {
            let sets = eps.categorize(family, &service.port_name, proto, node);

            let internal = FrontendOptions {
                internal_traffic_local: itp_local,
                ..plain
            };
            let backends = if itp_local {
                &sets.local
            } else {
                &sets.cluster
            };
            add(
                Frontend::new(cluster_ip, number, proto),
                ServiceType::ClusterIP,
                internal,
                backends,
                &[],
            );

            let mut external: Vec<(IpAddr, u16, ServiceType)> = Vec::new();
            if let Some(np) = node_port {
                let localhost = (family == IpFamily::V4).then_some(IpAddr::V4(Ipv4Addr::LOCALHOST));
                let ips: BTreeSet<IpAddr> = node_ips
                    .iter()
                    .copied()
                    .filter(|ip| IpFamily::of(*ip) == family)
                    .chain(localhost)
                    .collect();
                external.extend(ips.into_iter().map(|ip| (ip, np, ServiceType::NodePort)));
            }
            for (ips, t) in [
                (&external_ips, ServiceType::ExternalIP),
                (&lb_vips, ServiceType::LoadBalancer),
            ] {
                external.extend(
                    ips.iter()
                        .filter(|ip| IpFamily::of(**ip) == family)
                        .map(|ip| (*ip, number, t)),
                );
            }
            // The family's loadBalancerSourceRanges, for its LB frontends.
            let ranges: Vec<IpNet> = source_ranges
                .iter()
                .filter(|n| IpFamily::of(n.addr()) == family)
                .copied()
                .collect();
            let ranged = FrontendOptions {
                source_ranges_admit_node: node_ips
                    .iter()
                    .any(|ip| ranges.iter().any(|n| n.contains(ip))),
                ..north_south
            };
            for (ip, p, t) in external {
                let fe = Frontend::new(ip, p, proto);
                let (opts, ranges): (_, &[IpNet]) =
                    if t == ServiceType::LoadBalancer && !ranges.is_empty() {
                        (ranged, &ranges)
                    } else {
                        (north_south, &[])
                    };
                if !etp_local {
                    add(fe, t, opts, &sets.cluster, ranges);
                    continue;
                }
                let ext = FrontendOptions {
                    has_internal_scope: true,
                    external_traffic_local: true,
                    ..opts
                };
                // The Internal-scope entry is reached only through the
                // External one, which holds the ranges.
                if add(fe, t, ext, &sets.local, ranges) {
                    let int = Frontend {
                        scope: Scope::Internal,
                        ..fe
                    };
                    add(int, t, plain, &sets.cluster, &[]);
                }
            }

            // kube-proxy counts a Local policy without local endpoints only
            // when the service has endpoints elsewhere (else it rejects).
            for (local, policy) in [
                (itp_local, TrafficPolicy::Internal),
                (etp_local, TrafficPolicy::External),
            ] {
                if local && sets.has_any && sets.local.is_empty() {
                    out.no_local_endpoints.push(NoLocalEndpoints {
                        service: service.clone(),
                        family,
                        policy,
                    });
                }
            }
        }
    }

    if svc_type == ServiceType::LoadBalancer && etp_local {
        match spec.health_check_node_port.map(port_number) {
            Some(Some(port)) => {
                out.health_check = Some(HealthCheck {
                    port,
                    service: key,
                    local_endpoints: cluster_ips
                        .keys()
                        .map(|f| eps.local_ready_count(*f))
                        .max()
                        .unwrap_or(0),
                })
            }
            Some(None) => skips.push(
                SkipReason::InvalidPort,
                format!(
                    "healthCheckNodePort {} is out of range",
                    spec.health_check_node_port.unwrap_or_default()
                ),
            ),
            None => skips.push(
                SkipReason::InvalidPort,
                "externalTrafficPolicy Local without a healthCheckNodePort".into(),
            ),
        }
    }
    out
}

/// The Service's north-south backend selection: its
/// [`LB_ALGORITHM_ANNOTATION`] when valid, else the node's default (an
/// invalid value is a skip naming it).
fn lb_algorithm(meta: &ObjectMeta, node: &NodeContext, skips: &mut Skips<'_>) -> LbAlgorithm {
    let Some(value) = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(LB_ALGORITHM_ANNOTATION))
    else {
        return node.lb_algorithm;
    };
    LbAlgorithm::parse(value).unwrap_or_else(|| {
        skips.push(
            SkipReason::InvalidAnnotation,
            format!(
                "annotation {LB_ALGORITHM_ANNOTATION}: {value:?} is neither random nor maglev; \
                 using --lb-algorithm {}",
                node.lb_algorithm
            ),
        );
        node.lb_algorithm
    })
}

/// The clusterIP of each family: the first one of the family in
/// `clusterIPs` (or `clusterIP` when that is empty), as kube-proxy's
/// `GetClusterIPByFamily`. None when the Service is headless or has no
/// clusterIP. Unparsable addresses and extra ones of a family are skips.
fn cluster_ips_by_family(
    spec: &ServiceSpec,
    skips: &mut Skips<'_>,
) -> Option<BTreeMap<IpFamily, IpAddr>> {
    let mut ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.as_deref());
    }
    ips.retain(|ip| !ip.is_empty());
    if ips.is_empty() || ips.contains(&"None") {
        return None;
    }
    let mut out = BTreeMap::new();
    for ip in ips {
        match ip.parse::<IpAddr>() {
            Ok(addr) => match out.entry(IpFamily::of(addr)) {
                Entry::Vacant(e) => {
                    e.insert(addr);
                }
                Entry::Occupied(e) => skips.push(
                    SkipReason::InvalidAddress,
                    format!("clusterIP {ip} is a second {} clusterIP", e.key()),
                ),
            },
            Err(_) => skips.push(
                SkipReason::InvalidAddress,
                format!("clusterIP {ip:?} is not an IP address"),
            ),
        }
    }
    Some(out)
}

/// Parses `what` addresses, keeping those of a family the Service has a
/// clusterIP of (kube-proxy programs each family from its clusterIP);
/// the others are skips.
fn addresses_of<'a>(
    raw: impl Iterator<Item = &'a str>,
    what: &str,
    cluster_ips: &BTreeMap<IpFamily, IpAddr>,
    skips: &mut Skips<'_>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for ip in raw {
        match ip.parse::<IpAddr>() {
            Ok(addr) if cluster_ips.contains_key(&IpFamily::of(addr)) => out.push(addr),
            Ok(addr) => skips.push(
                SkipReason::InvalidAddress,
                format!(
                    "{what} {ip} is {} but the Service has no {} clusterIP",
                    IpFamily::of(addr),
                    IpFamily::of(addr)
                ),
            ),
            Err(_) => skips.push(
                SkipReason::InvalidAddress,
                format!("{what} {ip:?} is not an IP address"),
            ),
        }
    }
    out
}

/// `spec.loadBalancerSourceRanges` as kube-proxy reads them: trimmed,
/// empty entries ignored, the others parsed as CIDRs (IPv4 octets with
/// leading zeros taken as decimal, as Go's ParseCIDRSloppy does), invalid
/// ones skipped; host bits cleared, IPv4-mapped IPv6 prefixes made IPv4;
/// sorted and deduplicated.
fn source_ranges_of(spec: &ServiceSpec, skips: &mut Skips<'_>) -> Vec<IpNet> {
    let mut out = BTreeSet::new();
    for raw in spec.load_balancer_source_ranges.iter().flatten() {
        let text = raw.trim();
        if text.is_empty() {
            continue;
        }
        match parse_cidr_sloppy(text) {
            Some(net) => {
                out.insert(net);
            }
            None => skips.push(
                SkipReason::InvalidAddress,
                format!("loadBalancerSourceRanges entry {raw:?} is not a CIDR; ignored"),
            ),
        }
    }
    out.into_iter().collect()
}

/// A CIDR as Go's `netutils.ParseCIDRSloppy` takes it, normalised: host
/// bits cleared, an IPv6 prefix of IPv4-mapped addresses (/96 or longer)
/// made the IPv4 prefix it is.
fn parse_cidr_sloppy(text: &str) -> Option<IpNet> {
    let (addr, len) = text.split_once('/')?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    let ip = if addr.contains(':') {
        addr.parse::<IpAddr>().ok()?
    } else {
        // Leading zeros are decimal ("010" is 10), not octal.
        let mut octets = [0u8; 4];
        let mut parts = addr.split('.');
        for o in &mut octets {
            let part = parts.next()?;
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            *o = part.parse().ok()?;
        }
        if parts.next().is_some() {
            return None;
        }
        IpAddr::V4(Ipv4Addr::from(octets))
    };
    let net = IpNet::new(ip, len).ok()?.trunc();
    Some(match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new(v4, v6.prefix_len() - 96).ok()?),
            None => net,
        },
        net => net,
    })
}

/// A port number in 1..=65535.
fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

fn service_port_protocol(port: &ServicePort, skips: &mut Skips<'_>) -> Option<Protocol> {
    match port.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        other => {
            skips.push(
                SkipReason::UnsupportedProtocol,
                format!("port {} uses protocol {other}", port.port),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests;
