//! The datapath's load-balancing counters as Prometheus families, read
//! from the pinned maps at each scrape (a [`Collector`]): per-frontend
//! verdicts of the socket hooks and of north-south new flows, north-south
//! packets and bytes per frontend and per backend, the north-south
//! counters split by what they count (flows, packets, drops), and the
//! monitor's event counts.
//!
//! Cardinality: with at most [`DatapathCounters::per_frontend_max`]
//! Services (`--metrics-frontend-labels-max`, default
//! [`DEFAULT_PER_FRONTEND_MAX`]), the per-frontend families carry
//! `frontend` (address:port/protocol) and the Service's `namespace`,
//! `name` and `port_name`, and the backend families `backend`; above it
//! (or with 0), one series per verdict or direction, summed over
//! frontends, so a large cluster cannot blow up the scrape.

#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::registry::Unit;

use crate::datapath::counters::{NodePortEvent, NodePortStats};
use crate::datapath::lb_stats::{self, Direction, MonitorStats, Verdict};
use crate::model::ServiceRef;

/// Default of `--metrics-frontend-labels-max`: per-frontend series with
/// Service labels up to this many Services (about 10 series per frontend).
pub const DEFAULT_PER_FRONTEND_MAX: usize = 500;

/// What a frontend id is, for its labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendLabel {
    /// `10.96.0.10:53/UDP`.
    pub frontend: String,
    pub service: ServiceRef,
}

/// Frontend and backend ids as the agent last programmed them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathNames {
    pub frontends: BTreeMap<u32, FrontendLabel>,
    /// Backend id -> `10.244.1.5:8080/TCP`.
    pub backends: BTreeMap<u32, String>,
    /// Services programmed (the cardinality switch counts these).
    pub services: usize,
}

/// The collector; the agent keeps [`DatapathCounters::names`] current.
#[derive(Debug)]
pub struct DatapathCounters {
    bpf_root: PathBuf,
    /// Per-frontend labels while the Services are at most this many.
    pub per_frontend_max: usize,
    names: Arc<RwLock<DatapathNames>>,
    /// Whether the north-south maps are expected (their families exported).
    nodeport: bool,
}

impl DatapathCounters {
    pub fn new(bpf_root: PathBuf, per_frontend_max: usize, nodeport: bool) -> DatapathCounters {
        DatapathCounters {
            bpf_root,
            per_frontend_max,
            names: Arc::default(),
            nodeport,
        }
    }

    /// The names table the syncer updates after each sync.
    pub fn names(&self) -> Arc<RwLock<DatapathNames>> {
        self.names.clone()
    }
}

type Labels = Vec<(&'static str, String)>;

/// One counter family under construction: series by label set, summed.
struct FamilyRows(BTreeMap<Labels, u64>);

impl FamilyRows {
    fn new() -> FamilyRows {
        FamilyRows(BTreeMap::new())
    }

    fn add(&mut self, labels: Labels, n: u64) {
        *self.0.entry(labels).or_default() += n;
    }

    fn encode(
        self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
    ) -> std::fmt::Result {
        let metric_type = ConstCounter::new(0u64).metric_type();
        let mut family = encoder.encode_descriptor(name, help, unit, metric_type)?;
        for (labels, n) in &self.0 {
            ConstCounter::new(*n).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}

/// The labels of frontend `id` in `mode`: Service identity when on,
/// nothing else when off (the caller's own labels go first).
fn frontend_labels(names: &DatapathNames, id: u32, detailed: bool, mut base: Labels) -> Labels {
    if !detailed {
        return base;
    }
    let (frontend, ns, name, port) = match names.frontends.get(&id) {
        Some(l) => (
            l.frontend.clone(),
            l.service.namespace.clone(),
            l.service.name.clone(),
            l.service.port_name.clone(),
        ),
        // Invalid ports, another node's DSR flows, or a frontend removed
        // since: kept apart, never dropped from the totals.
        None if id == 0 => ("none".into(), String::new(), String::new(), String::new()),
        None => (
            "unknown".into(),
            String::new(),
            String::new(),
            String::new(),
        ),
    };
    base.extend([
        ("frontend", frontend),
        ("namespace", ns),
        ("name", name),
        ("port_name", port),
    ]);
    base
}

impl Collector for DatapathCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let names = self.names.read().map(|n| n.clone()).unwrap_or_default();
        let detailed = self.per_frontend_max > 0 && names.services <= self.per_frontend_max;
        let frontends = lb_stats::read_frontends(&self.bpf_root).unwrap_or_else(|e| {
            tracing::debug!(error = %format!("{e:#}"), "reading the frontend counters");
            BTreeMap::new()
        });
        let mut sock = FamilyRows::new();
        let mut flows = FamilyRows::new();
        let mut packets = FamilyRows::new();
        let mut bytes = FamilyRows::new();
        if !detailed {
            // Every series of the summed families present from the start.
            for v in Verdict::ALL {
                sock.add(vec![("verdict", v.as_str().into())], 0);
                flows.add(vec![("verdict", v.as_str().into())], 0);
            }
            for d in Direction::ALL {
                packets.add(vec![("direction", d.as_str().into())], 0);
                bytes.add(vec![("direction", d.as_str().into())], 0);
            }
        }
        for (id, s) in &frontends {
            for v in Verdict::ALL {
                let base = vec![("verdict", v.as_str().to_string())];
                if s.sock(v) != 0 {
                    sock.add(
                        frontend_labels(&names, *id, detailed, base.clone()),
                        s.sock(v),
                    );
                }
                if s.nodeport(v) != 0 {
                    flows.add(frontend_labels(&names, *id, detailed, base), s.nodeport(v));
                }
            }
            for d in Direction::ALL {
                let i = d as usize;
                if s.packets[i] == 0 {
                    continue;
                }
                let base = vec![("direction", d.as_str().to_string())];
                packets.add(
                    frontend_labels(&names, *id, detailed, base.clone()),
                    s.packets[i],
                );
                bytes.add(frontend_labels(&names, *id, detailed, base), s.bytes[i]);
            }
        }
        sock.encode(
            &mut encoder,
            "kpr_socket_lb_decisions",
            "Decisions of the socket hooks (connect, sendmsg, bind) for a frontend, by verdict: one per connect, datagram send or bind.",
            None,
        )?;
        if !self.nodeport {
            return encode_monitor(&mut encoder, &self.bpf_root);
        }
        flows.encode(
            &mut encoder,
            "kpr_nodeport_new_flows",
            "New north-south flows to a frontend, by verdict (tc/XDP).",
            None,
        )?;
        packets.encode(
            &mut encoder,
            "kpr_nodeport_frontend_packets",
            "North-south packets forwarded for a frontend, by direction.",
            None,
        )?;
        bytes.encode(
            &mut encoder,
            "kpr_nodeport_frontend",
            "North-south bytes forwarded for a frontend (frames as the hook saw them), by direction.",
            Some(&Unit::Bytes),
        )?;
        encode_backends(&mut encoder, &self.bpf_root, &names, detailed)?;
        encode_nodeport_split(&mut encoder, &self.bpf_root)?;
        encode_monitor(&mut encoder, &self.bpf_root)
    }
}

fn encode_backends(
    encoder: &mut DescriptorEncoder,
    bpf_root: &std::path::Path,
    names: &DatapathNames,
    detailed: bool,
) -> std::fmt::Result {
    let backends = lb_stats::read_backends(bpf_root).unwrap_or_default();
    let mut packets = FamilyRows::new();
    let mut bytes = FamilyRows::new();
    for d in Direction::ALL.iter().filter(|_| !detailed) {
        packets.add(vec![("direction", d.as_str().into())], 0);
        bytes.add(vec![("direction", d.as_str().into())], 0);
    }
    for (id, s) in &backends {
        for d in Direction::ALL {
            let i = d as usize;
            if s.packets[i] == 0 {
                continue;
            }
            let mut labels = vec![("direction", d.as_str().to_string())];
            if detailed {
                let name = names
                    .backends
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| "unknown".into());
                labels.push(("backend", name));
            }
            packets.add(labels.clone(), s.packets[i]);
            bytes.add(labels, s.bytes[i]);
        }
    }
    packets.encode(
        encoder,
        "kpr_nodeport_backend_packets",
        "North-south packets forwarded for a backend, by direction.",
        None,
    )?;
    bytes.encode(
        encoder,
        "kpr_nodeport_backend",
        "North-south bytes forwarded for a backend, by direction.",
        Some(&Unit::Bytes),
    )
}

/// What one north-south counter counts: the family it goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NpKind {
    Flow,
    Packet,
    Drop,
}

fn np_kind(event: NodePortEvent) -> NpKind {
    let label = event.as_label();
    if label.starts_with("drop_") {
        NpKind::Drop
    } else if label.starts_with("flow_") || event == NodePortEvent::PortRemap {
        NpKind::Flow
    } else {
        NpKind::Packet
    }
}

/// `kpr_nodeport_events_total` split by unit: flows, packets, drops.
fn encode_nodeport_split(
    encoder: &mut DescriptorEncoder,
    bpf_root: &std::path::Path,
) -> std::fmt::Result {
    let stats = NodePortStats::read(bpf_root).unwrap_or_default();
    let mut flows = FamilyRows::new();
    let mut packets = FamilyRows::new();
    let mut drops = FamilyRows::new();
    for (event, n) in stats.events() {
        let label = event.as_label();
        match np_kind(event) {
            NpKind::Flow => flows.add(vec![("event", label.into())], n),
            NpKind::Packet => packets.add(vec![("event", label.into())], n),
            NpKind::Drop => drops.add(
                vec![("reason", label.trim_start_matches("drop_").into())],
                n,
            ),
        }
    }
    flows.encode(
        encoder,
        "kpr_nodeport_flow_events",
        "North-south flows opened, by how (new, SNAT, DSR, client port remapped).",
        None,
    )?;
    packets.encode(
        encoder,
        "kpr_nodeport_packet_events",
        "North-south packets, by what was done with them (forwarded, reply, XDP, ICMP, fragments, ...).",
        None,
    )?;
    drops.encode(
        encoder,
        "kpr_nodeport_drops",
        "North-south packets dropped, by reason.",
        None,
    )
}

fn encode_monitor(encoder: &mut DescriptorEncoder, bpf_root: &std::path::Path) -> std::fmt::Result {
    let m = MonitorStats::read(bpf_root).unwrap_or_default();
    let mut rows = FamilyRows::new();
    for (outcome, n) in [
        ("emitted", m.emitted),
        ("sampled_out", m.sampled_out),
        ("rate_limited", m.rate_limited),
        ("lost", m.ringbuf_full),
    ] {
        rows.add(vec![("outcome", outcome.into())], n);
    }
    rows.encode(
        encoder,
        "kpr_monitor_events",
        "Load-balancing events while `kpr monitor` runs, by outcome (emitted to the ring buffer, sampled out, rate-limited, lost to a full ring buffer).",
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn north_south_counters_split_into_flows_packets_and_drops() {
        assert!(np_kind(NodePortEvent::FlowNew) == NpKind::Flow);
        assert!(np_kind(NodePortEvent::Forward) == NpKind::Packet);
        assert!(np_kind(NodePortEvent::DropNoBackend) == NpKind::Drop);
        assert!(np_kind(NodePortEvent::RejectNoBackend) == NpKind::Packet);
        let drops = NodePortEvent::ALL
            .iter()
            .filter(|e| np_kind(**e) == NpKind::Drop)
            .count();
        assert_eq!(drops, 7);
    }

    #[test]
    fn frontend_labels_name_the_service_only_when_detailed() {
        let mut names = DatapathNames::default();
        names.frontends.insert(
            7,
            FrontendLabel {
                frontend: "10.96.0.10:80/TCP".into(),
                service: ServiceRef {
                    namespace: "default".into(),
                    name: "web".into(),
                    port_name: "http".into(),
                },
            },
        );
        let base = vec![("verdict", "translated".to_string())];
        assert_eq!(frontend_labels(&names, 7, false, base.clone()), base);
        let on = frontend_labels(&names, 7, true, base.clone());
        assert!(on.contains(&("name", "web".to_string())));
        assert!(on.contains(&("frontend", "10.96.0.10:80/TCP".to_string())));
        let none = frontend_labels(&names, 0, true, base);
        assert!(none.contains(&("frontend", "none".to_string())));
    }
}
