//! What the agent keeps of each object: only the fields translation and
//! the object store read. Both sources slim objects as they arrive, before
//! storing them, so memory follows what the datapath needs and not what
//! the API server or a manifest carries besides (managedFields, owner
//! references, last-applied annotations, endpoint target references,
//! status conditions, a Node's images).
//!
//! Kept: namespace, name and uid; the labels kpr selects on
//! ([`SERVICE_NAME_LABEL`], [`SERVICE_PROXY_NAME_LABEL`],
//! [`HEADLESS_LABEL`]); the annotations it reads
//! ([`LB_ALGORITHM_ANNOTATION`], [`TRIGGER_TIME_ANNOTATION`]); a Service's
//! spec and load-balancer status; a slice's address type, ports and, per
//! endpoint, its first address (kube-proxy reads no other), conditions,
//! node name, zone and hints; a Node's labels and addresses. A field
//! translation starts to read must be added here, or it reads as unset.
//!
//! Services stay API objects with the rest unset; EndpointSlices, most of
//! the memory at scale, are stored as [`SlimSlice`] and rebuilt as API
//! objects one Service at a time when translated.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    Container, Node, NodeSpec, NodeStatus, Pod, PodSpec, PodStatus, Service, ServiceSpec,
    ServiceStatus,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::source::store::TRIGGER_TIME_ANNOTATION;
use crate::translate::{
    HEADLESS_LABEL, LB_ALGORITHM_ANNOTATION, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL,
};

const KEPT_LABELS: [&str; 3] = [SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL];
const KEPT_ANNOTATIONS: [&str; 2] = [LB_ALGORITHM_ANNOTATION, TRIGGER_TIME_ANNOTATION];

/// A Service as translation reads it.
pub fn service(svc: Service) -> Service {
    Service {
        metadata: meta(svc.metadata),
        // Pods are selected by the EndpointSlice controller, not kpr.
        spec: svc.spec.map(|spec| ServiceSpec {
            selector: None,
            ..spec
        }),
        status: svc
            .status
            .and_then(|s| s.load_balancer)
            .map(|lb| ServiceStatus {
                load_balancer: Some(lb),
                conditions: None,
            }),
    }
}

/// An EndpointSlice as the agent stores it: what translation reads, in
/// about a sixth of the memory of the API type (an `Endpoint` alone is
/// ~350 bytes inline). [`SlimSlice::to_k8s`] rebuilds the API object,
/// per Service, when it is translated.
#[derive(Clone, Debug, PartialEq)]
pub struct SlimSlice {
    pub name: Option<Box<str>>,
    pub namespace: Option<Box<str>>,
    labels: Box<[(Box<str>, Box<str>)]>,
    annotations: Box<[(Box<str>, Box<str>)]>,
    address_type: Box<str>,
    ports: Option<Box<[EndpointPort]>>,
    endpoints: Box<[SlimEndpoint]>,
}

/// One endpoint: its first address (the only one kube-proxy uses),
/// conditions, node, zone and hints.
#[derive(Clone, Debug, PartialEq)]
struct SlimEndpoint {
    address: Option<Address>,
    conditions: Option<EndpointConditions>,
    node_name: Option<Box<str>>,
    zone: Option<Box<str>>,
    hints: Option<Box<EndpointHints>>,
}

/// An endpoint address: parsed when it prints back as written (no heap),
/// else the text as it came (translation reports what does not parse).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Address {
    Ip(IpAddr),
    Text(Box<str>),
}

impl Address {
    fn new(text: String) -> Address {
        match text.parse::<IpAddr>() {
            Ok(ip) if ip.to_string() == text => Address::Ip(ip),
            _ => Address::Text(text.into_boxed_str()),
        }
    }

    fn to_text(&self) -> String {
        match self {
            Address::Ip(ip) => ip.to_string(),
            Address::Text(t) => t.to_string(),
        }
    }
}

impl From<EndpointSlice> for SlimSlice {
    fn from(slice: EndpointSlice) -> SlimSlice {
        let meta = slice.metadata;
        SlimSlice {
            name: meta.name.map(String::into_boxed_str),
            namespace: meta.namespace.map(String::into_boxed_str),
            labels: pairs(meta.labels, &KEPT_LABELS),
            annotations: pairs(meta.annotations, &KEPT_ANNOTATIONS),
            address_type: slice.address_type.into_boxed_str(),
            ports: slice.ports.map(Vec::into_boxed_slice),
            endpoints: slice
                .endpoints
                .into_iter()
                .map(|ep| SlimEndpoint {
                    address: ep.addresses.into_iter().next().map(Address::new),
                    conditions: ep.conditions,
                    node_name: ep.node_name.map(String::into_boxed_str),
                    zone: ep.zone.map(String::into_boxed_str),
                    hints: ep.hints.map(Box::new),
                })
                .collect(),
        }
    }
}

impl SlimSlice {
    /// The API object translation reads (the kept fields, the rest unset).
    pub fn to_k8s(&self) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: self.name.as_deref().map(str::to_string),
                namespace: self.namespace.as_deref().map(str::to_string),
                labels: map(&self.labels),
                annotations: map(&self.annotations),
                ..ObjectMeta::default()
            },
            address_type: self.address_type.to_string(),
            ports: self.ports.as_deref().map(<[_]>::to_vec),
            endpoints: self
                .endpoints
                .iter()
                .map(|ep| Endpoint {
                    addresses: ep.address.iter().map(Address::to_text).collect(),
                    conditions: ep.conditions.clone(),
                    node_name: ep.node_name.as_deref().map(str::to_string),
                    zone: ep.zone.as_deref().map(str::to_string),
                    hints: ep.hints.as_deref().cloned(),
                    ..Endpoint::default()
                })
                .collect(),
        }
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        lookup(&self.labels, key)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        lookup(&self.annotations, key)
    }

    /// `namespace/name`, as `translate::object_key` spells it.
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.namespace.as_deref().unwrap_or("default"),
            self.name.as_deref().unwrap_or("")
        )
    }

    /// The Service (`namespace/name`) the slice belongs to, as
    /// `translate::slice_service_key` reads it.
    pub fn service_key(&self) -> Option<String> {
        let name = self.label(SERVICE_NAME_LABEL)?;
        Some(format!(
            "{}/{}",
            self.namespace.as_deref().unwrap_or("default"),
            name
        ))
    }

    /// Whether kube-proxy would see it (`translate::is_for_default_proxy`).
    pub fn is_for_default_proxy(&self) -> bool {
        self.label(SERVICE_PROXY_NAME_LABEL).is_none() && self.label(HEADLESS_LABEL).is_none()
    }
}

fn pairs(map: Option<BTreeMap<String, String>>, keys: &[&str]) -> Box<[(Box<str>, Box<str>)]> {
    map.into_iter()
        .flatten()
        .filter(|(k, _)| keys.contains(&k.as_str()))
        .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
        .collect()
}

fn map(pairs: &[(Box<str>, Box<str>)]) -> Option<BTreeMap<String, String>> {
    (!pairs.is_empty()).then(|| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

fn lookup<'a>(pairs: &'a [(Box<str>, Box<str>)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| &**k == key).map(|(_, v)| &**v)
}

/// A Pod as its hostPorts need it: name, namespace, node, hostNetwork,
/// the containers' ports, phase and addresses.
pub fn pod(pod: Pod) -> Pod {
    let spec = pod.spec.map(|s| PodSpec {
        node_name: s.node_name,
        host_network: s.host_network,
        containers: s
            .containers
            .into_iter()
            .filter(|c| {
                c.ports
                    .as_ref()
                    .is_some_and(|p| p.iter().any(|p| p.host_port.is_some()))
            })
            .map(|c| Container {
                name: c.name,
                ports: c.ports,
                ..Container::default()
            })
            .collect(),
        ..PodSpec::default()
    });
    let status = pod.status.map(|s| PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        pod_ips: s.pod_ips,
        ..PodStatus::default()
    });
    Pod {
        metadata: ObjectMeta {
            name: pod.metadata.name,
            namespace: pod.metadata.namespace,
            uid: pod.metadata.uid,
            ..ObjectMeta::default()
        },
        spec,
        status,
    }
}

/// The agent's own Node: its labels (zone) and addresses, and what
/// `/healthz` judges its eligibility by (KEP-3836): its deletion
/// timestamp and taints.
pub fn node(node: Node) -> Node {
    Node {
        metadata: ObjectMeta {
            name: node.metadata.name,
            labels: node.metadata.labels,
            deletion_timestamp: node.metadata.deletion_timestamp,
            ..ObjectMeta::default()
        },
        spec: node.spec.and_then(|s| s.taints).map(|taints| NodeSpec {
            taints: Some(taints),
            ..NodeSpec::default()
        }),
        status: node
            .status
            .and_then(|s| s.addresses)
            .map(|addresses| NodeStatus {
                addresses: Some(addresses),
                ..NodeStatus::default()
            }),
    }
}

fn meta(meta: ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        // Small, and what an Event about the object refers to.
        uid: meta.uid,
        labels: keep(meta.labels, &KEPT_LABELS),
        annotations: keep(meta.annotations, &KEPT_ANNOTATIONS),
        ..ObjectMeta::default()
    }
}

fn keep(map: Option<BTreeMap<String, String>>, keys: &[&str]) -> Option<BTreeMap<String, String>> {
    let kept: BTreeMap<String, String> = map?
        .into_iter()
        .filter(|(k, _)| keys.contains(&k.as_str()))
        .collect();
    (!kept.is_empty()).then_some(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_slimmed_slice_keeps_what_translation_reads_and_drops_the_rest() {
        let full: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "web-abc", "namespace": "ns", "uid": "u", "resourceVersion": "7",
                "labels": {"kubernetes.io/service-name": "web", "app": "web"},
                "annotations": {TRIGGER_TIME_ANNOTATION: "2026-01-01T00:00:00Z", "other": "x"},
                "managedFields": [{"manager": "m", "operation": "Update"}],
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "u"}]},
            "addressType": "IPv4", "ports": [{"port": 8080}],
            "endpoints": [{"addresses": ["10.244.0.1", "10.244.0.9"], "conditions": {"ready": true},
                "nodeName": "n1", "zone": "z1", "hints": {"forZones": [{"name": "z1"}]},
                "hostname": "h", "targetRef": {"kind": "Pod", "name": "p"}},
                {"addresses": ["fd00:0::1"]}, {"addresses": ["not-an-ip"]}, {"addresses": []}]
        }))
        .unwrap();
        let expected: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "web-abc", "namespace": "ns",
                "labels": {"kubernetes.io/service-name": "web"},
                "annotations": {TRIGGER_TIME_ANNOTATION: "2026-01-01T00:00:00Z"}},
            "addressType": "IPv4", "ports": [{"port": 8080}],
            "endpoints": [{"addresses": ["10.244.0.1"], "conditions": {"ready": true},
                "nodeName": "n1", "zone": "z1", "hints": {"forZones": [{"name": "z1"}]}},
                {"addresses": ["fd00:0::1"]}, {"addresses": ["not-an-ip"]}, {"addresses": []}]
        }))
        .unwrap();
        assert_eq!(SlimSlice::from(full).to_k8s(), expected);
    }

    #[test]
    fn a_slimmed_service_keeps_spec_lb_status_and_the_lb_algorithm_annotation() {
        let full: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "labels": {"app": "web"},
                "annotations": {LB_ALGORITHM_ANNOTATION: "maglev",
                    "kubectl.kubernetes.io/last-applied-configuration": "{...}"}},
            "spec": {"clusterIP": "10.96.0.1", "type": "LoadBalancer", "ports": [{"port": 80}],
                "selector": {"app": "web"}},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]},
                "conditions": [{"type": "x", "status": "True", "reason": "r", "message": "m",
                    "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .unwrap();
        let slim = service(full.clone());
        let mut spec = full.spec.clone().unwrap();
        spec.selector = None;
        assert_eq!(slim.spec, Some(spec));
        assert_eq!(
            slim.status.and_then(|s| s.load_balancer),
            full.status.and_then(|s| s.load_balancer)
        );
        assert_eq!(slim.metadata.labels, None);
        assert_eq!(
            slim.metadata.annotations,
            Some(BTreeMap::from([(
                LB_ALGORITHM_ANNOTATION.to_string(),
                "maglev".to_string()
            )]))
        );
    }

    #[test]
    fn a_slimmed_node_keeps_its_zone_addresses_and_what_eligibility_reads() {
        let full: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"},
                "deletionTimestamp": "2026-01-01T00:00:00Z",
                "annotations": {"node.alpha.kubernetes.io/ttl": "0"}},
            "spec": {"podCIDR": "10.244.1.0/24", "taints": [
                {"key": "ToBeDeletedByClusterAutoscaler", "value": "1", "effect": "NoSchedule"}]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}],
                "capacity": {"cpu": "2"}}
        }))
        .unwrap();
        let slim = node(full.clone());
        assert_eq!(slim.metadata.labels, full.metadata.labels);
        assert!(slim.metadata.deletion_timestamp.is_some());
        assert_eq!(slim.metadata.annotations, None);
        let spec = slim.spec.expect("taints kept");
        assert_eq!(spec.taints, full.spec.and_then(|s| s.taints));
        assert_eq!(spec.pod_cidr, None);
        let status = slim.status.expect("addresses kept");
        assert_eq!(status.addresses, full.status.and_then(|s| s.addresses));
        assert_eq!(status.capacity, None);
    }
}
