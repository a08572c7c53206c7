//! The node as translation sees it: which endpoints are local, its zone,
//! and the addresses NodePorts listen on. Kubernetes mode reads them from
//! the node's Node object; standalone mode has none and goes by
//! --node-name and --node-ip alone. Also whether the node is eligible for
//! load-balancer traffic (KEP-3836), which `/healthz` reports.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

use crate::model::LbAlgorithm;
use crate::translate::NodeContext;

/// The taint the Cluster Autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// KEP-3836, as kube-proxy ≥ 1.30: a node that is being deleted (has a
/// deletionTimestamp) or is tainted [`TO_BE_DELETED_TAINT`] is not
/// eligible, so `/healthz` turns 503 and load balancers drain it before it
/// goes. Without a Node object (not created yet, deleted, standalone mode)
/// the node counts as eligible, as kube-proxy's does until a Node event
/// says otherwise.
pub fn node_eligible(node: Option<&Node>) -> bool {
    let Some(node) = node else {
        return true;
    };
    let deleting = node.metadata.deletion_timestamp.is_some();
    let to_be_deleted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .any(|t| t.key == TO_BE_DELETED_TAINT);
    !deleting && !to_be_deleted
}

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
    fn a_node_being_deleted_or_tainted_by_the_autoscaler_is_not_eligible() {
        let plain = node(serde_json::json!({"metadata": {"name": "n1"}}));
        let tainted = node(serde_json::json!({
            "metadata": {"name": "n1"},
            "spec": {"taints": [
                {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
                {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"},
            ]},
        }));
        let other_taint = node(serde_json::json!({
            "metadata": {"name": "n1"},
            "spec": {"taints": [{"key": "DeletionCandidateOfClusterAutoscaler", "effect": "PreferNoSchedule"}]},
        }));
        let deleting = node(serde_json::json!({
            "metadata": {"name": "n1", "deletionTimestamp": "2026-01-01T00:00:00Z"},
        }));

        assert!(node_eligible(None));
        assert!(node_eligible(Some(&plain)));
        assert!(node_eligible(Some(&other_taint)));
        assert!(!node_eligible(Some(&tainted)));
        assert!(!node_eligible(Some(&deleting)));
    }

    #[test]
    fn without_a_node_object_only_node_ips_count_and_there_is_no_zone() {
        let extra: Vec<IpAddr> = vec!["192.0.2.20".parse().expect("an address")];

        let ctx = node_context("standalone", None, &extra, LbAlgorithm::Random);

        assert_eq!(ctx.zone, None);
        assert_eq!(ctx.node_ips, extra);
    }
}
