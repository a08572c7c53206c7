//! The node as translation sees it: which endpoints are local, its zone,
//! and the addresses NodePorts listen on. Both modes read them from the
//! node's Node object (Kubernetes mode from the API, standalone mode from
//! a Node document in the manifests, if there is one), with --node-ip
//! adding addresses and --node-zone overriding the zone label. Also whether the node is eligible for
//! load-balancer traffic (KEP-3836), which `/healthz` reports.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

use crate::model::LbAlgorithm;
use crate::translate::{NodeContext, ZONE_LABEL};

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

/// What the agent's flags say about its node: --node-ip, --node-zone,
/// --lb-algorithm.
#[derive(Clone, Copy, Debug)]
pub struct NodeFlags<'a> {
    /// Added to the Node's addresses.
    pub ips: &'a [IpAddr],
    /// Over the Node's zone label.
    pub zone: Option<&'a str>,
    pub lb_algorithm: LbAlgorithm,
}

/// The node's identity for translation: its name, zone (--node-zone, else
/// the Node's label) and addresses (the Node's, plus any --node-ip), and
/// the agent's --lb-algorithm.
pub fn node_context(node_name: &str, node: Option<&Node>, flags: NodeFlags<'_>) -> NodeContext {
    let NodeFlags {
        ips: extra_ips,
        zone,
        lb_algorithm,
    } = flags;
    let zone = zone.map(str::to_string).or_else(|| {
        node.and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get(ZONE_LABEL))
            .cloned()
    });
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

    fn flags<'a>(ips: &'a [IpAddr], zone: Option<&'a str>, lb: LbAlgorithm) -> NodeFlags<'a> {
        NodeFlags {
            ips,
            zone,
            lb_algorithm: lb,
        }
    }

    #[test]
    fn the_node_zone_flag_wins_over_the_label_and_gives_a_zone_without_a_node() {
        let n = node(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}},
        }));

        let over_label = node_context("n1", Some(&n), flags(&[], Some("z2"), LbAlgorithm::Random));
        let without_node = node_context("n1", None, flags(&[], Some("z3"), LbAlgorithm::Random));

        assert_eq!(over_label.zone.as_deref(), Some("z2"));
        assert_eq!(without_node.zone.as_deref(), Some("z3"));
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

        let ctx = node_context("n1", Some(&n), flags(&extra, None, LbAlgorithm::Maglev));

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

        let ctx = node_context("standalone", None, flags(&extra, None, LbAlgorithm::Random));

        assert_eq!(ctx.zone, None);
        assert_eq!(ctx.node_ips, extra);
    }
}
