//! Pods' `hostPort` mappings to frontends (Cilium's HostPort, its
//! `pkg/k8s/watchers/pod.go`): a container port with a `hostPort` becomes
//! a `HostPort` frontend on the port's `hostIP`, or, without one (or with
//! `0.0.0.0` / `::`), on every address a NodePort of the family is served
//! on; its one backend is the pod's address of that family and the
//! container port. Frontends are NodePort frontends to the datapath (the
//! socket hooks serve node-local clients, tc the others); the type only
//! tells `kpr svc list`.
//!
//! Only pods of this node ([`NodeContext::node_name`]) that have an
//! address and are not finished (phase Succeeded or Failed) count;
//! `hostNetwork` pods listen on the node themselves and are left alone.
//! SCTP ports and unparsable host IPs are skips.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

use super::addresses::{node_port_addresses, IpFamily};
use super::{NodeContext, Skipped, Skips};
use crate::model::{
    Backend, BackendState, Frontend, FrontendOptions, FrontendSpec, L4Addr, Protocol, ServiceRef,
    ServiceType,
};
use crate::reconcile::ServiceFrontends;
use crate::skip::SkipReason;

/// The desired-state key of a pod's hostPort frontends: `namespace/pod/name`
/// (no Service key has two slashes, so none collides with it).
pub fn host_port_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/pod/{name}")
}

/// The HostPort frontends of `pod` on `node`; empty when it has none here.
pub fn translate_host_ports(
    pod: &Pod,
    node: &NodeContext,
    skipped: &mut Vec<Skipped>,
) -> ServiceFrontends {
    let mut out = ServiceFrontends::new();
    let Some(spec) = &pod.spec else {
        return out;
    };
    if spec.node_name.as_deref() != Some(node.node_name.as_str()) || spec.host_network == Some(true)
    {
        return out;
    }
    let status = pod.status.as_ref();
    if status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed")
    {
        return out;
    }
    let pod_ips: BTreeSet<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .chain(status.and_then(|s| s.pod_ip.as_deref()))
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or("");
    let mut skips = Skips {
        object: format!("Pod {namespace}/{name}"),
        out: skipped,
    };
    let node_ips: BTreeSet<IpAddr> = node.node_ips.iter().copied().collect();
    let ports = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten());
    for port in ports {
        let Some(host_port) = port
            .host_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        let Ok(container_port) = u16::try_from(port.container_port) else {
            continue;
        };
        let proto = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                skips.push(
                    SkipReason::UnsupportedProtocol,
                    format!("hostPort {host_port} uses protocol {other}"),
                );
                continue;
            }
        };
        let host_ip = match port.host_ip.as_deref().filter(|ip| !ip.is_empty()) {
            None => None,
            Some(text) => match text.parse::<IpAddr>() {
                Ok(ip) if ip.is_unspecified() => None,
                Ok(ip) => Some(ip),
                Err(_) => {
                    skips.push(
                        SkipReason::InvalidAddress,
                        format!("hostIP {text:?} is not an IP address"),
                    );
                    continue;
                }
            },
        };
        for pod_ip in &pod_ips {
            let family = IpFamily::of(*pod_ip);
            let addresses: BTreeSet<IpAddr> = match host_ip {
                Some(ip) if IpFamily::of(ip) == family => BTreeSet::from([ip]),
                Some(_) => continue,
                None => node_port_addresses(&node_ips, family),
            };
            let backend = Backend {
                addr: L4Addr {
                    ip: *pod_ip,
                    port: container_port,
                    proto,
                },
                state: BackendState::Active,
                local: true,
            };
            for ip in addresses {
                out.insert(
                    Frontend::new(ip, host_port, proto),
                    FrontendSpec {
                        service: ServiceRef {
                            namespace: namespace.to_string(),
                            name: format!("pod/{name}"),
                            port_name: port.name.clone().unwrap_or_default(),
                        },
                        svc_type: ServiceType::HostPort,
                        options: FrontendOptions::default(),
                        backends: vec![backend],
                        source_ranges: Vec::new(),
                    },
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("a Pod")
    }

    fn node() -> NodeContext {
        NodeContext {
            node_name: "n1".into(),
            node_ips: vec!["192.0.2.10".parse().expect("an address")],
            ..NodeContext::default()
        }
    }

    fn rows(frontends: &ServiceFrontends) -> Vec<String> {
        frontends
            .iter()
            .map(|(fe, spec)| {
                let backends: Vec<String> =
                    spec.backends.iter().map(|b| b.addr.to_string()).collect();
                format!("{} {} => {}", fe.addr, spec.svc_type, backends.join(","))
            })
            .collect()
    }

    #[test]
    fn a_host_port_is_served_on_every_node_port_address_of_each_pod_family() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "web", "namespace": "t"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
                {"containerPort": 8080, "hostPort": 8081},
                {"containerPort": 53, "hostPort": 5353, "protocol": "UDP", "hostIP": "192.0.2.10"},
                {"containerPort": 9000},
                {"containerPort": 9001, "hostPort": 9001, "protocol": "SCTP"},
            ]}]},
            "status": {"phase": "Running", "podIP": "10.244.0.5",
                       "podIPs": [{"ip": "10.244.0.5"}, {"ip": "fd00:10:244::5"}]},
        }));
        let mut skipped = Vec::new();

        let got = translate_host_ports(&p, &node(), &mut skipped);

        assert_eq!(
            rows(&got),
            [
                "127.0.0.1:8081/TCP HostPort => 10.244.0.5:8080/TCP",
                "192.0.2.10:5353/UDP HostPort => 10.244.0.5:53/UDP",
                "192.0.2.10:8081/TCP HostPort => 10.244.0.5:8080/TCP",
                "[::]:8081/TCP HostPort => [fd00:10:244::5]:8080/TCP",
            ]
        );
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].reason, SkipReason::UnsupportedProtocol);
        assert_eq!(host_port_key("t", "web"), "t/pod/web");
    }

    #[test]
    fn pods_of_other_nodes_host_network_finished_or_without_address_have_none() {
        let base = serde_json::json!({
            "metadata": {"name": "web", "namespace": "t"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
                {"containerPort": 8080, "hostPort": 8081}]}]},
            "status": {"phase": "Running", "podIP": "10.244.0.5"},
        });
        let with = |pointer: &str, value: serde_json::Value| {
            let mut v = base.clone();
            *v.pointer_mut(pointer).expect("a field") = value;
            pod(v)
        };
        let mut skipped = Vec::new();
        assert_eq!(
            translate_host_ports(&pod(base.clone()), &node(), &mut skipped).len(),
            2
        );
        for p in [
            with("/spec/nodeName", "n2".into()),
            with("/status/phase", "Succeeded".into()),
            with("/status/podIP", serde_json::Value::Null),
            {
                let mut v = base.clone();
                v["spec"]["hostNetwork"] = true.into();
                pod(v)
            },
        ] {
            assert!(translate_host_ports(&p, &node(), &mut skipped).is_empty());
        }
        assert!(skipped.is_empty());
    }
}
