//! One Service to its frontends. The Service-wide facts (type, addresses,
//! traffic policies, session affinity, backend selection) are read once
//! into [`ServiceRules`]; then each service port, in each IP family the
//! Service has a clusterIP of, gets its ClusterIP frontend and its
//! north-south frontends (NodePort, ExternalIP, LoadBalancer), each rule in
//! its own function. Skips are recorded in the order the rules read the
//! Service, which the translation tests pin.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::addresses::{
    cluster_ips_by_family, external_ips, load_balancer_vips, node_port_addresses, of_family,
};
use super::endpoints::{Backends, Categorized, ServiceEndpoints};
use super::policy::{health_check, no_local_endpoints, LocalPolicies};
use super::source_ranges::{family_ranges, ranges_admit_node, source_ranges_of};
use super::{
    is_for_default_proxy, object_key, IpFamily, NodeContext, ServiceTranslation, Skipped, Skips,
    DEFAULT_AFFINITY_TIMEOUT, LB_ALGORITHM_ANNOTATION,
};
use crate::model::{
    Frontend, FrontendOptions, FrontendSpec, LbAlgorithm, Protocol, Scope, ServiceRef, ServiceType,
};
use crate::reconcile::ServiceFrontends;
use crate::skip::SkipReason;

/// The frontends (and health check, and no-local-endpoints cases) of one
/// Service, given the EndpointSlices that belong to it. See the module
/// documentation of [`crate::translate`] for the rules.
pub fn translate_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeContext,
    skipped: &mut Vec<Skipped>,
) -> ServiceTranslation {
    let mut out = ServiceTranslation::default();
    if !is_for_default_proxy(&svc.metadata) {
        return out;
    }
    let Some(spec) = &svc.spec else { return out };
    let key = object_key(&svc.metadata);
    let mut skips = Skips {
        object: format!("Service {key}"),
        out: skipped,
    };
    let Some(rules) = ServiceRules::read(svc, spec, node, &mut skips) else {
        return out;
    };
    let eps = ServiceEndpoints::new(slices, node, skips.out);

    for port in spec.ports.iter().flatten() {
        let Some(port) = PortRules::read(port, &rules, &mut skips) else {
            continue;
        };
        for (&family, &cluster_ip) in &rules.cluster_ips {
            let sets = eps.categorize(family, &port.service.port_name, port.proto, node);
            let mut frontends = PortFrontends {
                service: &port.service,
                frontends: &mut out.frontends,
                skips: &mut skips,
            };
            add_cluster_ip_frontend(&mut frontends, &rules, &port, cluster_ip, &sets);
            add_north_south_frontends(&mut frontends, &rules, &port, family, &sets);
            out.no_local_endpoints.extend(no_local_endpoints(
                rules.policies,
                &sets,
                &port.service,
                family,
            ));
        }
    }

    out.health_check = health_check(
        spec,
        rules.svc_type,
        rules.policies,
        key,
        &eps,
        &rules.cluster_ips,
        &mut skips,
    );
    out
}

/// What every frontend of a Service shares.
struct ServiceRules {
    svc_type: ServiceType,
    /// The first clusterIP of each family; the families the Service is
    /// programmed in.
    cluster_ips: BTreeMap<IpFamily, IpAddr>,
    external_ips: Vec<IpAddr>,
    /// Load-balancer ingress IPs in VIP mode (LoadBalancer Services only).
    lb_vips: Vec<IpAddr>,
    /// `loadBalancerSourceRanges` (LoadBalancer Services only).
    source_ranges: Vec<IpNet>,
    node_ips: BTreeSet<IpAddr>,
    policies: LocalPolicies,
    /// Options of ClusterIP frontends and Internal-scope entries, which
    /// serve node-local clients: session affinity only.
    plain: FrontendOptions,
    /// Options of External-scope north-south frontends: `plain` plus the
    /// backend selection.
    north_south: FrontendOptions,
    namespace: String,
    name: String,
}

impl ServiceRules {
    /// None when the Service is not programmed: ExternalName, an unsupported
    /// type (a skip), headless or without clusterIP (DNS only).
    fn read(
        svc: &Service,
        spec: &ServiceSpec,
        node: &NodeContext,
        skips: &mut Skips<'_>,
    ) -> Option<ServiceRules> {
        let svc_type = service_type(spec, skips)?;
        let cluster_ips = cluster_ips_by_family(spec, skips)?;
        let external_ips = external_ips(spec, &cluster_ips, skips);
        let load_balancer = svc_type == ServiceType::LoadBalancer;
        let lb_vips = match load_balancer {
            true => load_balancer_vips(svc, &cluster_ips, skips),
            false => Vec::new(),
        };
        let source_ranges = match load_balancer {
            true => source_ranges_of(spec, skips),
            false => Vec::new(),
        };
        let plain = FrontendOptions {
            affinity_timeout: affinity_timeout(spec),
            ..Default::default()
        };
        let maglev = lb_algorithm(&svc.metadata, node, skips) == LbAlgorithm::Maglev;
        Some(ServiceRules {
            svc_type,
            cluster_ips,
            external_ips,
            lb_vips,
            source_ranges,
            node_ips: node.node_ips.iter().copied().collect(),
            policies: LocalPolicies::of(spec, svc_type),
            plain,
            north_south: FrontendOptions { maglev, ..plain },
            namespace: svc
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: svc.metadata.name.clone().unwrap_or_default(),
        })
    }
}

/// `spec.type` (default ClusterIP). ExternalName Services are DNS only
/// (None, not a skip); an unknown type is a skip.
fn service_type(spec: &ServiceSpec, skips: &mut Skips<'_>) -> Option<ServiceType> {
    match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ExternalName" => None,
        "ClusterIP" => Some(ServiceType::ClusterIP),
        "NodePort" => Some(ServiceType::NodePort),
        "LoadBalancer" => Some(ServiceType::LoadBalancer),
        other => {
            skips.push(SkipReason::UnsupportedType, format!("type {other:?}"));
            None
        }
    }
}

/// `sessionAffinity: ClientIP`: the affinity timeout of every frontend,
/// `sessionAffinityConfig.clientIP.timeoutSeconds` or 10800 s.
fn affinity_timeout(spec: &ServiceSpec) -> Option<u32> {
    (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    })
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

/// One service port, checked.
struct PortRules {
    proto: Protocol,
    /// `port`: the port of ClusterIP, ExternalIP and LoadBalancer frontends.
    number: u16,
    /// `nodePort`, when allocated and valid.
    node_port: Option<u16>,
    service: ServiceRef,
}

impl PortRules {
    /// None (after a skip) when the port's protocol is not TCP or UDP or
    /// its number is out of range.
    fn read(port: &ServicePort, rules: &ServiceRules, skips: &mut Skips<'_>) -> Option<PortRules> {
        let proto = service_port_protocol(port, skips)?;
        let Some(number) = port_number(port.port) else {
            skips.push(
                SkipReason::InvalidPort,
                format!("port {} is out of range", port.port),
            );
            return None;
        };
        Some(PortRules {
            proto,
            number,
            node_port: node_port(port, rules.svc_type, skips),
            service: ServiceRef {
                namespace: rules.namespace.clone(),
                name: rules.name.clone(),
                port_name: port.name.clone().unwrap_or_default(),
            },
        })
    }
}

/// `protocol` (default TCP): TCP and UDP are balanced, SCTP and others are
/// skips.
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

/// `nodePort`: None when not allocated (unset or 0); on a ClusterIP Service
/// or out of range, a skip (the port's other frontends stay).
fn node_port(port: &ServicePort, svc_type: ServiceType, skips: &mut Skips<'_>) -> Option<u16> {
    match port.node_port {
        None | Some(0) => None,
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
    }
}

/// A port number in 1..=65535.
pub(super) fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// The frontends of one service port being built; a frontend that repeats
/// one already built (the same address, port and protocol) is a skip.
struct PortFrontends<'a, 's> {
    service: &'a ServiceRef,
    frontends: &'a mut ServiceFrontends,
    skips: &'a mut Skips<'s>,
}

impl PortFrontends<'_, '_> {
    /// Adds `fe`; false when it repeats another frontend.
    fn add(
        &mut self,
        fe: Frontend,
        svc_type: ServiceType,
        options: FrontendOptions,
        backends: &Backends,
        source_ranges: &[IpNet],
    ) -> bool {
        if self.frontends.contains_key(&fe) {
            self.skips.push(
                SkipReason::Duplicate,
                format!("{svc_type} frontend {} repeats another one", fe.addr),
            );
            return false;
        }
        self.frontends.insert(
            fe,
            FrontendSpec {
                service: self.service.clone(),
                svc_type,
                options,
                backends: backends.clone(),
                source_ranges: source_ranges.to_vec(),
            },
        );
        true
    }
}

/// The ClusterIP frontend of a port in one family: the cluster set, or the
/// local set under `internalTrafficPolicy: Local` (KEP-2086). Never Maglev:
/// clusterIPs serve node-local clients, which the socket hooks balance at
/// random.
fn add_cluster_ip_frontend(
    frontends: &mut PortFrontends<'_, '_>,
    rules: &ServiceRules,
    port: &PortRules,
    cluster_ip: IpAddr,
    sets: &Categorized,
) {
    let options = FrontendOptions {
        internal_traffic_local: rules.policies.internal,
        ..rules.plain
    };
    let backends = match rules.policies.internal {
        true => &sets.local,
        false => &sets.cluster,
    };
    frontends.add(
        Frontend::new(cluster_ip, port.number, port.proto),
        ServiceType::ClusterIP,
        options,
        backends,
        &[],
    );
}

/// The north-south addresses of a port in one family, in the order they are
/// added: NodePorts on the node's addresses (and 127.0.0.1), then
/// `externalIPs`, then load-balancer ingress IPs (both on `port`).
fn north_south_addresses(
    rules: &ServiceRules,
    port: &PortRules,
    family: IpFamily,
) -> Vec<(IpAddr, u16, ServiceType)> {
    let mut out = Vec::new();
    if let Some(np) = port.node_port {
        let ips = node_port_addresses(&rules.node_ips, family);
        out.extend(ips.into_iter().map(|ip| (ip, np, ServiceType::NodePort)));
    }
    for (ips, t) in [
        (&rules.external_ips, ServiceType::ExternalIP),
        (&rules.lb_vips, ServiceType::LoadBalancer),
    ] {
        out.extend(of_family(ips, family).map(|ip| (ip, port.number, t)));
    }
    out
}

/// The NodePort, ExternalIP and LoadBalancer frontends of a port in one
/// family (see [`add_north_south_frontend`]).
fn add_north_south_frontends(
    frontends: &mut PortFrontends<'_, '_>,
    rules: &ServiceRules,
    port: &PortRules,
    family: IpFamily,
    sets: &Categorized,
) {
    let ranges = family_ranges(&rules.source_ranges, family);
    let ranged = FrontendOptions {
        source_ranges_admit_node: ranges_admit_node(&ranges, &rules.node_ips),
        ..rules.north_south
    };
    for (ip, p, t) in north_south_addresses(rules, port, family) {
        let fe = Frontend::new(ip, p, port.proto);
        // Source ranges restrict the LoadBalancer frontends only.
        let (options, ranges): (_, &[IpNet]) =
            if t == ServiceType::LoadBalancer && !ranges.is_empty() {
                (ranged, &ranges)
            } else {
                (rules.north_south, &[])
            };
        add_north_south_frontend(frontends, rules, fe, t, options, sets, ranges);
    }
}

/// One north-south frontend. Under `externalTrafficPolicy: Cluster`: the
/// cluster set. Under `Local`: an External-scope entry with the local set,
/// flagged `has_internal_scope`, holding the source ranges, plus an
/// Internal-scope entry at the same address with the cluster set and no
/// ranges (reached only through the External one) for node-local clients,
/// as kube-proxy short-circuits locally originated traffic to the cluster
/// chain. With no local endpoint the External entry has no backends: the
/// socket hook refuses at once instead of a timeout.
fn add_north_south_frontend(
    frontends: &mut PortFrontends<'_, '_>,
    rules: &ServiceRules,
    fe: Frontend,
    svc_type: ServiceType,
    options: FrontendOptions,
    sets: &Categorized,
    ranges: &[IpNet],
) {
    if !rules.policies.external {
        frontends.add(fe, svc_type, options, &sets.cluster, ranges);
        return;
    }
    let external = FrontendOptions {
        has_internal_scope: true,
        external_traffic_local: true,
        ..options
    };
    if frontends.add(fe, svc_type, external, &sets.local, ranges) {
        let internal = Frontend {
            scope: Scope::Internal,
            ..fe
        };
        frontends.add(internal, svc_type, rules.plain, &sets.cluster, &[]);
    }
}
