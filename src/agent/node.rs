//! The node as translation sees it: which endpoints are local, its zone,
//! and the addresses NodePorts listen on. Kubernetes mode reads them from
//! the node's Node object; standalone mode has none and goes by
//! --node-name and --node-ip alone.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

use crate::model::LbAlgorithm;
use crate::translate::NodeContext;

/// The node's identity for translation: its name, zone label and
/// addresses (from its Node object) plus any --node-ip, and the agent's
/// --lb-algorithm.
pub fn node_context(
    node_name: &str,
    node: Option<&Node>,
    extra_ips: &[IpAddr],
    lb_algorithm: LbAlgorithm,
) -> NodeContext {
    let zone = node
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get("topology.kubernetes.io/zone"))
        .cloned();
    let mut node_ips: Vec<IpAddr> = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    for ip in extra_ips {
        if !node_ips.contains(ip) {
            node_ips.push(*ip);
        }
    }
    NodeContext {
        node_name: node_name.to_string(),
        zone,
        node_ips,
        lb_algorithm,
    }
}
