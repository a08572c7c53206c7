//! Kubernetes objects to desired load-balancer state: a pure function of
//! v1 Services and discovery.k8s.io/v1 EndpointSlices, with kube-proxy's
//! semantics as the spec. No I/O, no clock: the same objects always give
//! the same frontends, backends and slot order.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use crate::model::{
    BackendState, Frontend, FrontendOptions, FrontendSpec, L4Addr, Protocol, ServiceRef,
    ServiceType,
};
use crate::reconcile::{DesiredByService, ServiceFrontends};
use crate::skip::SkipReason;

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Default sessionAffinityConfig.clientIP.timeoutSeconds (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

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
}

/// `namespace/name` of an object (namespace "default" when unset).
pub fn object_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
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

/// Translates every Service with the EndpointSlices that belong to it.
pub fn translate(services: &[Service], slices: &[EndpointSlice]) -> Translation {
    let mut by_service: BTreeMap<String, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
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
        let frontends = translate_service(svc, slices, &mut out.skipped);
        out.desired.insert(key, frontends);
    }
    out
}

/// The frontends of one Service. Services kube-proxy does not program
/// (ExternalName, headless) give none.
pub fn translate_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    skipped: &mut Vec<Skipped>,
) -> ServiceFrontends {
    let key = object_key(&svc.metadata);
    let mut out = ServiceFrontends::new();
    let Some(spec) = &svc.spec else { return out };
    let mut skip = |reason, detail: String| {
        skipped.push(Skipped {
            object: format!("Service {key}"),
            reason,
            detail,
        })
    };

    if spec.type_.as_deref() == Some("ExternalName") {
        return out;
    }
    let mut ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.as_deref());
    }
    if ips.iter().any(|ip| *ip == "None") {
        return out; // headless: DNS only
    }
    let mut cluster_ips = Vec::new();
    for ip in ips.iter().filter(|ip| !ip.is_empty()) {
        match ip.parse::<IpAddr>() {
            Ok(ip) => cluster_ips.push(ip),
            Err(_) => skip(
                SkipReason::InvalidAddress,
                format!("clusterIP {ip:?} is not an IP address"),
            ),
        }
    }

    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    let options = FrontendOptions {
        affinity_timeout,
        ..Default::default()
    };

    for port in spec.ports.iter().flatten() {
        let Some(proto) = service_port_protocol(port, &mut skip) else {
            continue;
        };
        let Ok(number) =
            u16::try_from(port.port)
                .map_err(|_| ())
                .and_then(|p| if p == 0 { Err(()) } else { Ok(p) })
        else {
            skip(
                SkipReason::InvalidPort,
                format!("port {} is out of range", port.port),
            );
            continue;
        };
        let port_name = port.name.clone().unwrap_or_default();
        let service = ServiceRef {
            namespace: svc
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: svc.metadata.name.clone().unwrap_or_default(),
            port_name: port_name.clone(),
        };
        for ip in &cluster_ips {
            let backends = backends_for(slices, *ip, &port_name, proto);
            out.insert(
                Frontend::new(*ip, number, proto),
                FrontendSpec {
                    service: service.clone(),
                    svc_type: ServiceType::ClusterIP,
                    options,
                    backends,
                },
            );
        }
    }
    out
}

fn service_port_protocol(
    port: &ServicePort,
    skip: &mut impl FnMut(SkipReason, String),
) -> Option<Protocol> {
    match port.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        other => {
            skip(
                SkipReason::UnsupportedProtocol,
                format!("port {} uses protocol {other}", port.port),
            );
            None
        }
    }
}

/// Ready endpoints count as ready when the condition is unset.
fn is_ready(ep: &Endpoint) -> bool {
    ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true)
}

/// Serving-but-terminating endpoints (KEP-1669); serving defaults to ready.
fn is_serving_terminating(ep: &Endpoint) -> bool {
    let c = ep.conditions.as_ref();
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    let serving = c.and_then(|c| c.serving).unwrap_or_else(|| is_ready(ep));
    terminating && serving
}

/// The backends of the Service port named `port_name` for a frontend of
/// `family`: ready endpoints of every slice, deduplicated and in address
/// order; when none is ready, the serving terminating ones.
fn backends_for(
    slices: &[&EndpointSlice],
    family: IpAddr,
    port_name: &str,
    proto: Protocol,
) -> Vec<(L4Addr, BackendState)> {
    let address_type = if family.is_ipv4() { "IPv4" } else { "IPv6" };
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    for slice in slices.iter().filter(|s| s.address_type == address_type) {
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && p.protocol.as_deref().unwrap_or("TCP") == proto.as_str()
        }) else {
            continue;
        };
        let Some(number) = port
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            // kube-proxy uses an endpoint's first address only.
            let Some(ip) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            if ip.is_ipv4() != family.is_ipv4() {
                continue;
            }
            let addr = L4Addr {
                ip,
                port: number,
                proto,
            };
            if is_ready(ep) {
                ready.insert(addr);
            } else if is_serving_terminating(ep) {
                terminating.insert(addr);
            }
        }
    }
    if !ready.is_empty() {
        ready
            .into_iter()
            .map(|a| (a, BackendState::Active))
            .collect()
    } else {
        terminating
            .into_iter()
            .map(|a| (a, BackendState::Terminating))
            .collect()
    }
}

#[cfg(test)]
mod tests;
