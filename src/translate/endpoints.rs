//! A Service's EndpointSlices, read once, and the backend sets kube-proxy
//! derives from them for one service port in one IP family.
//!
//! The rules follow kube-proxy's `pkg/proxy`:
//! - `endpointslicecache.go`: an endpoint is its first address; `ready` and
//!   `serving` default to true, `terminating` to false; an endpoint is local
//!   when its `nodeName` is this node's (never when the node has no name);
//!   endpoints repeated across slices count once, the local copy winning.
//! - `topology.go` (`CategorizeEndpoints`, `topologyModeFromHints`): the
//!   cluster set is the ready endpoints, narrowed by hints when every ready
//!   endpoint has a hint and at least one is for this node (PreferSameNode,
//!   `hints.forNodes`) or else this node's zone (PreferSameZone,
//!   `hints.forZones`); with no ready endpoint, the serving terminating ones,
//!   whatever their hints. The local set is the local ready endpoints, or else
//!   the local serving terminating ones; hints never narrow it.
//!
//! kube-proxy resolves duplicates in Go map order; here the choice is
//! deterministic: local beats remote, then ready beats serving-terminating
//! beats neither, then the first seen (slices in the order given).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use super::{object_key, IpFamily, NodeContext, Skipped};
use crate::model::{Backend, BackendState, L4Addr, Protocol};
use crate::skip::SkipReason;

/// Backends in slot order with their state and locality.
pub(super) type Backends = Vec<Backend>;

/// The backend sets of one service port in one family.
#[derive(Debug, Default)]
pub(super) struct Categorized {
    /// For Cluster traffic policies: topology-aware, terminating fallback.
    pub cluster: Backends,
    /// For Local traffic policies: this node's endpoints, terminating fallback.
    pub local: Backends,
    /// Whether any endpoint anywhere is usable (ready, or serving and
    /// terminating): a Local policy without local endpoints is then a
    /// "no local endpoints" case rather than a "no endpoints" one.
    pub has_any: bool,
}

/// One endpoint as kube-proxy sees it.
#[derive(Clone, Debug)]
struct EndpointView {
    ip: IpAddr,
    local: bool,
    ready: bool,
    serving: bool,
    terminating: bool,
    zone_hints: BTreeSet<String>,
    node_hints: BTreeSet<String>,
}

impl EndpointView {
    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }

    /// Preference among copies of one address: local, then ready, then
    /// serving-terminating.
    fn rank(&self) -> (bool, u8) {
        let state = if self.ready {
            2
        } else if self.serving_terminating() {
            1
        } else {
            0
        };
        (self.local, state)
    }
}

#[derive(Debug)]
struct SlicePort {
    name: String,
    proto: Protocol,
    port: u16,
}

#[derive(Debug)]
struct SliceView {
    family: IpFamily,
    ports: Vec<SlicePort>,
    endpoints: Vec<EndpointView>,
}

/// Where kube-proxy would narrow the cluster set (`topology.go`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    /// Every ready endpoint.
    All,
    /// Ready endpoints hinted for this node.
    SameNode,
    /// Ready endpoints hinted for this node's zone.
    SameZone,
}

/// The usable content of a Service's EndpointSlices.
#[derive(Debug, Default)]
pub(super) struct ServiceEndpoints {
    slices: Vec<SliceView>,
}

impl ServiceEndpoints {
    /// Reads `slices`; what cannot be used (an address that does not parse
    /// or is of the wrong family, an endpoint without address, a port that
    /// is missing or out of range) is recorded in `skipped`, once. Slices of
    /// an address type other than IPv4/IPv6 (FQDN) are ignored, as are ports
    /// of protocols kpr does not balance (the Service port is the counted skip).
    pub fn new(
        slices: &[&EndpointSlice],
        node: &NodeContext,
        skipped: &mut Vec<Skipped>,
    ) -> ServiceEndpoints {
        let mut out = ServiceEndpoints::default();
        for slice in slices {
            let family = match slice.address_type.as_str() {
                "IPv4" => IpFamily::V4,
                "IPv6" => IpFamily::V6,
                _ => continue,
            };
            let object = format!("EndpointSlice {}", object_key(&slice.metadata));
            let mut skip = |reason, detail: String| {
                skipped.push(Skipped {
                    object: object.clone(),
                    reason,
                    detail,
                })
            };
            let mut ports = Vec::new();
            for p in slice.ports.iter().flatten() {
                // API defaults: name "" and protocol TCP.
                let name = p.name.clone().unwrap_or_default();
                let proto = match p.protocol.as_deref().unwrap_or("TCP") {
                    "TCP" => Protocol::Tcp,
                    "UDP" => Protocol::Udp,
                    _ => continue,
                };
                match p
                    .port
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| *n != 0)
                {
                    Some(port) => ports.push(SlicePort { name, proto, port }),
                    None => skip(
                        SkipReason::InvalidPort,
                        format!(
                            "port {name:?} has number {} (not 1-65535)",
                            p.port.map_or("none".to_string(), |n| n.to_string())
                        ),
                    ),
                }
            }
            let mut endpoints = Vec::new();
            for ep in &slice.endpoints {
                // kube-proxy uses an endpoint's first address only.
                let Some(address) = ep.addresses.first() else {
                    skip(
                        SkipReason::InvalidAddress,
                        "an endpoint has no address".into(),
                    );
                    continue;
                };
                match address.parse::<IpAddr>() {
                    Ok(ip) if IpFamily::of(ip) == family => {
                        endpoints.push(endpoint_view(ep, ip, node));
                    }
                    Ok(_) => skip(
                        SkipReason::InvalidAddress,
                        format!("endpoint {address} is not of the slice's type {family}"),
                    ),
                    Err(_) => skip(
                        SkipReason::InvalidAddress,
                        format!("endpoint {address:?} is not an IP address"),
                    ),
                }
            }
            out.slices.push(SliceView {
                family,
                ports,
                endpoints,
            });
        }
        out
    }

    /// The endpoints of the service port named `port_name` (protocol
    /// `proto`) in `family`, one per address, in address order.
    fn for_port(
        &self,
        family: IpFamily,
        port_name: &str,
        proto: Protocol,
    ) -> BTreeMap<L4Addr, &EndpointView> {
        let mut by_addr: BTreeMap<L4Addr, &EndpointView> = BTreeMap::new();
        for slice in self.slices.iter().filter(|s| s.family == family) {
            // A slice lists a port name once; the first match is the one.
            let Some(port) = slice
                .ports
                .iter()
                .find(|p| p.name == port_name && p.proto == proto)
            else {
                continue;
            };
            for ep in &slice.endpoints {
                let addr = L4Addr {
                    ip: ep.ip,
                    port: port.port,
                    proto,
                };
                by_addr
                    .entry(addr)
                    .and_modify(|seen| {
                        if ep.rank() > seen.rank() {
                            *seen = ep;
                        }
                    })
                    .or_insert(ep);
            }
        }
        by_addr
    }

    /// The cluster and local backend sets of one service port in one family.
    pub fn categorize(
        &self,
        family: IpFamily,
        port_name: &str,
        proto: Protocol,
        node: &NodeContext,
    ) -> Categorized {
        let eps = self.for_port(family, port_name, proto);
        let mode = topology_mode(eps.values().copied(), node);
        let pick = |keep: &dyn Fn(&EndpointView) -> bool, state: BackendState| -> Backends {
            eps.iter()
                .filter(|(_, ep)| keep(ep))
                .map(|(addr, ep)| Backend {
                    addr: *addr,
                    state,
                    local: ep.local,
                })
                .collect()
        };

        let mut cluster = pick(
            &|ep| ep.ready && available_for_topology(ep, mode, node),
            BackendState::Active,
        );
        if cluster.is_empty() {
            // Topology never empties the ready set (a mode is only chosen
            // when an endpoint matches), so no endpoint is ready anywhere.
            cluster = pick(&|ep| ep.serving_terminating(), BackendState::Terminating);
        }
        let mut local = pick(&|ep| ep.local && ep.ready, BackendState::Active);
        if local.is_empty() {
            local = pick(
                &|ep| ep.local && ep.serving_terminating(),
                BackendState::Terminating,
            );
        }
        Categorized {
            has_any: !cluster.is_empty(),
            cluster,
            local,
        }
    }

    /// The number of distinct local ready endpoint addresses of `family`,
    /// over every port of every slice (kube-proxy's `LocalReadyEndpoints`,
    /// which feeds the health check node port). Terminating endpoints do not
    /// count, so load balancers drain a node whose endpoints all terminate.
    pub fn local_ready_count(&self, family: IpFamily) -> usize {
        self.slices
            .iter()
            .filter(|s| s.family == family && !s.ports.is_empty())
            .flat_map(|s| &s.endpoints)
            .filter(|ep| ep.local && ep.ready)
            .map(|ep| ep.ip)
            .collect::<BTreeSet<_>>()
            .len()
    }
}

fn endpoint_view(ep: &Endpoint, ip: IpAddr, node: &NodeContext) -> EndpointView {
    let c = ep.conditions.as_ref();
    let hints = ep.hints.as_ref();
    EndpointView {
        ip,
        local: !node.node_name.is_empty() && ep.node_name.as_deref() == Some(&node.node_name),
        ready: c.and_then(|c| c.ready).unwrap_or(true),
        serving: c.and_then(|c| c.serving).unwrap_or(true),
        terminating: c.and_then(|c| c.terminating).unwrap_or(false),
        zone_hints: hints
            .and_then(|h| h.for_zones.as_ref())
            .into_iter()
            .flatten()
            .map(|z| z.name.clone())
            .collect(),
        node_hints: hints
            .and_then(|h| h.for_nodes.as_ref())
            .into_iter()
            .flatten()
            .map(|n| n.name.clone())
            .collect(),
    }
}

/// kube-proxy's `topologyModeFromHints`, over the ready endpoints only:
/// same-node when every one has a node hint and one names this node, else
/// same-zone when every one has a zone hint and one names this node's zone,
/// else all. Partial hints are ignored on purpose (KEP-2433: hints being
/// added or removed must not overload the few endpoints that already have
/// them).
fn topology_mode<'a>(
    endpoints: impl Iterator<Item = &'a EndpointView>,
    node: &NodeContext,
) -> TopologyMode {
    let mut any_ready = false;
    let (mut all_node_hints, mut for_node) = (true, false);
    let (mut all_zone_hints, mut for_zone) = (true, false);
    for ep in endpoints.filter(|ep| ep.ready) {
        any_ready = true;
        if ep.node_hints.is_empty() {
            all_node_hints = false;
        } else if !node.node_name.is_empty() && ep.node_hints.contains(&node.node_name) {
            for_node = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if node
            .zone
            .as_ref()
            .is_some_and(|z| ep.zone_hints.contains(z))
        {
            for_zone = true;
        }
    }
    if !any_ready {
        TopologyMode::All
    } else if all_node_hints && for_node {
        TopologyMode::SameNode
    } else if all_zone_hints && for_zone {
        TopologyMode::SameZone
    } else {
        TopologyMode::All
    }
}

fn available_for_topology(ep: &EndpointView, mode: TopologyMode, node: &NodeContext) -> bool {
    match mode {
        TopologyMode::All => true,
        TopologyMode::SameNode => ep.node_hints.contains(&node.node_name),
        TopologyMode::SameZone => node
            .zone
            .as_ref()
            .is_some_and(|z| ep.zone_hints.contains(z)),
    }
}
