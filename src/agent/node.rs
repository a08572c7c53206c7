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

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: serde_json::Value) -> Node {
        serde_json::from_value(json).expect("a Node")
    }

    #[test]
    fn the_node_objects_internal_and_external_addresses_come_first_and_node_ips_add_new_ones() {
        let n = node(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "192.0.2.10"},
                {"type": "Hostname", "address": "n1"},
                {"type": "ExternalIP", "address": "198.51.100.10"},
                {"type": "InternalIP", "address": "not an address"},
            ]},
        }));
        let extra: Vec<IpAddr> = vec![
            "198.51.100.10".parse().expect("an address"),
            "fd00::10".parse().expect("an address"),
        ];

        let ctx = node_context("n1", Some(&n), &extra, LbAlgorithm::Maglev);

        assert_eq!(ctx.node_name, "n1");
        assert_eq!(ctx.zone.as_deref(), Some("z1"));
        assert_eq!(
            ctx.node_ips,
            ["192.0.2.10", "198.51.100.10", "fd00::10"]
                .map(|a| a.parse::<IpAddr>().expect("an address"))
        );
        assert_eq!(ctx.lb_algorithm, LbAlgorithm::Maglev);
    }

    #[test]
    fn without_a_node_object_only_node_ips_count_and_there_is_no_zone() {
        let extra: Vec<IpAddr> = vec!["192.0.2.20".parse().expect("an address")];

        let ctx = node_context("standalone", None, &extra, LbAlgorithm::Random);

        assert_eq!(ctx.zone, None);
        assert_eq!(ctx.node_ips, extra);
    }
}
