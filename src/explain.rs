//! `kpr explain`: what the datapath would do with a client's new flow to a
//! frontend, and why, read from the pinned maps alone (no agent needed):
//! the frontend and its Service, the scope and traffic policy each path
//! uses, the source-range verdict, and the backend with the reason it is
//! chosen: a conntrack entry of the flow, a session-affinity entry, the
//! Maglev slot the flow hashes to (the datapath's own hash, `maglev`), or a
//! random pick (then every candidate is listed).
//!
//! Two paths are explained, as the datapath has two: a packet from outside
//! the node (tc/XDP, north-south: Maglev, affinity keyed by the client's
//! address, conntrack) and a socket on the node (connect/sendmsg hooks:
//! always random, affinity keyed by the client's network namespace).

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::applied_state::{flag_names, frontend_label, AppliedState};
use crate::datapath::layout::{CtDir, CtRecord};
use crate::datapath::maps::{BackendId, FrontendEntries, ServiceId, Snapshot};
use crate::maglev::{flow_hash4, MaglevParams};
use crate::model::{Frontend, L4Addr, Scope};

/// Top bit of an affinity client that is an address (north-south), not a
/// network namespace cookie (socket LB); lb_nodeport.h np_new_flow.
const ADDRESS_CLIENT: u64 = 1 << 63;

/// What the maps hold besides the snapshot, read on demand.
pub struct MapReader<'a> {
    /// Maglev table of a frontend id.
    pub maglev_table: &'a dyn Fn(ServiceId) -> Option<Vec<BackendId>>,
    /// (client, frontend id, backend id, last use in CLOCK_MONOTONIC ns).
    pub affinity: Vec<(u64, ServiceId, BackendId, u64)>,
    /// The conntrack map's entries (empty without the north-south datapath).
    pub conntrack: Vec<CtRecord>,
    /// CLOCK_MONOTONIC now, in ns.
    pub now_ns: u64,
}

/// How the backend is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selection {
    /// The flow exists: its conntrack entry names the backend.
    Conntrack,
    /// A live session-affinity entry of the client names the backend.
    Affinity,
    /// The flow's hash picks a slot of the Maglev table.
    Maglev,
    /// Uniformly at random among the candidates.
    Random,
    /// No backend: the flow is refused or dropped (see the verdict).
    None,
}

/// One path's decision.
#[derive(Clone, Debug, Serialize)]
pub struct Decision {
    /// `north-south (tc/XDP)` or `socket (connect/sendmsg)`.
    pub path: &'static str,
    /// The services-map entry used.
    pub scope: Scope,
    /// translated, refused (no backend), refused (source range), dropped ...
    pub verdict: String,
    pub selection: Selection,
    /// The backend chosen, when one is determined.
    pub backend: Option<String>,
    pub backend_id: Option<BackendId>,
    /// With Maglev: the flow hash and the slot it takes.
    pub maglev_hash: Option<u32>,
    pub maglev_slot: Option<u32>,
    /// Seconds since the affinity entry was used (affinity only).
    pub affinity_age_seconds: Option<u64>,
    /// The backends a random pick chooses among.
    pub candidates: Vec<String>,
    /// Why, in words.
    pub notes: Vec<String>,
}

/// The whole answer.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    pub frontend: String,
    pub client: String,
    /// The frontend's Service, from the agent's record.
    pub service: Option<String>,
    /// Whether the maps hold the frontend at all.
    pub is_frontend: bool,
    pub svc_id: Option<ServiceId>,
    #[serde(rename = "type")]
    pub svc_type: Option<String>,
    pub flags: Vec<String>,
    pub affinity_timeout_seconds: Option<u32>,
    /// Source-range verdict for the client: None when the frontend has none.
    pub source_range_allowed: Option<bool>,
    pub decisions: Vec<Decision>,
}

/// Explains a new flow from `client` to `frontend`.
pub fn explain(
    frontend: L4Addr,
    client: SocketAddr,
    snapshot: &Snapshot,
    record: Option<&AppliedState>,
    maps: &MapReader,
) -> Explanation {
    let ext = Frontend {
        addr: frontend,
        scope: Scope::External,
    };
    let mut out = Explanation {
        frontend: frontend.to_string(),
        client: client.to_string(),
        service: record.and_then(|r| r.names().get(&frontend_label(&ext)).cloned()),
        is_frontend: false,
        svc_id: None,
        svc_type: None,
        flags: Vec::new(),
        affinity_timeout_seconds: None,
        source_range_allowed: None,
        decisions: Vec::new(),
    };
    let Some(entries) = snapshot.frontends.get(&ext) else {
        let note = match snapshot.port_rejects.contains(&frontend.ip) {
            true => {
                "a ClusterIP without this port or protocol: refused (ECONNREFUSED \
                     for sockets) by its port-reject entry"
            }
            false => "not a frontend: the datapath leaves the flow alone",
        };
        for path in [NORTH_SOUTH, SOCKET] {
            out.decisions
                .push(decision(path, Scope::External, note.into()));
        }
        return out;
    };
    let m = &entries.master;
    out.is_frontend = true;
    out.svc_id = Some(m.svc_id);
    out.svc_type = Some(m.svc_type.to_string());
    out.flags = flag_names(&m.options);
    out.affinity_timeout_seconds = m.options.affinity_timeout;
    if m.source_ranges {
        let ranges = snapshot.source_ranges.get(&m.svc_id);
        let ip = match client.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        out.source_range_allowed = Some(ranges.is_some_and(|r| r.iter().any(|n| n.contains(&ip))));
    }
    let params = record.map(AppliedState::maglev).unwrap_or_default();
    out.decisions.push(north_south(
        frontend, client, entries, snapshot, maps, params, &out,
    ));
    let internal = Frontend {
        addr: frontend,
        scope: Scope::Internal,
    };
    let (scope, local_entries) = match m.options.has_internal_scope {
        true => (
            Scope::Internal,
            snapshot.frontends.get(&internal).unwrap_or(entries),
        ),
        false => (Scope::External, entries),
    };
    out.decisions
        .push(socket(scope, local_entries, snapshot, maps, &out));
    out
}

const NORTH_SOUTH: &str = "north-south (tc/XDP)";
const SOCKET: &str = "socket (connect/sendmsg)";

fn decision(path: &'static str, scope: Scope, verdict: String) -> Decision {
    Decision {
        path,
        scope,
        verdict,
        selection: Selection::None,
        backend: None,
        backend_id: None,
        maglev_hash: None,
        maglev_slot: None,
        affinity_age_seconds: None,
        candidates: Vec::new(),
        notes: Vec::new(),
    }
}

fn backend_name(snapshot: &Snapshot, id: BackendId) -> String {
    snapshot
        .backends
        .get(&id)
        .map_or_else(|| format!("backend {id} (missing)"), |b| b.addr.to_string())
}

fn candidates(entries: &FrontendEntries, snapshot: &Snapshot) -> Vec<String> {
    entries
        .slots
        .iter()
        .map(|id| backend_name(snapshot, *id))
        .collect()
}

/// The live affinity entry of `client` for frontend `svc_id`, if any.
fn affinity_hit(
    maps: &MapReader,
    client: u64,
    svc_id: ServiceId,
    timeout: u32,
) -> Option<(BackendId, u64)> {
    maps.affinity
        .iter()
        .find(|(c, s, _, _)| *c == client && *s == svc_id)
        .map(|(_, _, b, used)| (*b, maps.now_ns.saturating_sub(*used)))
        .filter(|(_, age)| *age <= u64::from(timeout) * 1_000_000_000)
}

fn north_south(
    frontend: L4Addr,
    client: SocketAddr,
    entries: &FrontendEntries,
    snapshot: &Snapshot,
    maps: &MapReader,
    params: MaglevParams,
    ex: &Explanation,
) -> Decision {
    let m = &entries.master;
    let mut d = decision(NORTH_SOUTH, Scope::External, String::new());
    let IpAddr::V4(client_v4) = client.ip() else {
        d.verdict = "not handled: the north-south datapath serves IPv4 clients".into();
        return d;
    };
    // An existing flow keeps its backend, whatever changed since.
    if let Some(ct) = maps.conntrack.iter().find(|c| {
        c.dir == CtDir::Orig
            && c.src == client
            && c.dst.ip() == frontend.ip
            && c.dst.port() == frontend.port
            && c.proto == frontend.proto
    }) {
        d.selection = Selection::Conntrack;
        d.verdict = "translated (existing flow)".into();
        d.backend = Some(backend_name(snapshot, ct.backend_id));
        d.backend_id = Some(ct.backend_id);
        d.notes.push(format!(
            "conntrack entry: to {}{}, expires in {}s",
            ct.nat_dst,
            if ct.snat { " with SNAT" } else { "" },
            ct.expires_ns.saturating_sub(maps.now_ns) / 1_000_000_000
        ));
        return d;
    }
    if ex.source_range_allowed == Some(false) {
        d.verdict = "dropped: the client is outside the loadBalancerSourceRanges".into();
        return d;
    }
    if m.count == 0 {
        d.verdict = match m.options.external_traffic_local {
            true => "refused or dropped: no local backend (externalTrafficPolicy Local)".into(),
            false => "refused: no backend (ICMP port unreachable, or dropped with \
                      --service-no-backend-response=drop)"
                .into(),
        };
        return d;
    }
    d.verdict = "translated".into();
    if m.options.external_traffic_local {
        d.notes
            .push("externalTrafficPolicy Local: only this node's backends".into());
    }
    if let Some(timeout) = m.options.affinity_timeout {
        let key = ADDRESS_CLIENT | u64::from(u32::from(client_v4));
        if let Some((id, age)) = affinity_hit(maps, key, m.svc_id, timeout) {
            d.selection = Selection::Affinity;
            d.backend = Some(backend_name(snapshot, id));
            d.backend_id = Some(id);
            d.affinity_age_seconds = Some(age / 1_000_000_000);
            d.notes.push(format!(
                "sessionAffinity ClientIP: {client_v4} used it {}s ago (timeout {timeout}s)",
                age / 1_000_000_000
            ));
            return d;
        }
        d.notes.push(format!(
            "sessionAffinity ClientIP: no live entry for {client_v4}; the pick below is remembered"
        ));
    }
    if m.options.maglev {
        let hash = flow_hash4(
            client_v4,
            client.port(),
            frontend.port,
            frontend.proto.number(),
            params.flow_hash_seed(),
        );
        if let Some(table) = (maps.maglev_table)(m.svc_id).filter(|t| !t.is_empty()) {
            // The datapath takes hash % its configured size; the agent
            // writes tables of that size.
            let slot = hash % table.len() as u32;
            let id = table[slot as usize];
            d.selection = Selection::Maglev;
            d.maglev_hash = Some(hash);
            d.maglev_slot = Some(slot);
            d.backend = Some(backend_name(snapshot, id));
            d.backend_id = Some(id);
            d.notes.push(format!(
                "Maglev: hash {hash:#010x} of {client} to port {}/{} takes slot {slot} of {}",
                frontend.port,
                frontend.proto,
                table.len()
            ));
            return d;
        }
        d.notes
            .push("Maglev flagged but no table in the maps: a random pick".into());
    }
    d.selection = Selection::Random;
    d.candidates = candidates(entries, snapshot);
    d
}

fn socket(
    scope: Scope,
    entries: &FrontendEntries,
    snapshot: &Snapshot,
    maps: &MapReader,
    ex: &Explanation,
) -> Decision {
    let m = &entries.master;
    let mut d = decision(SOCKET, scope, String::new());
    if ex.source_range_allowed == Some(false) {
        d.verdict = "refused (EPERM): the client's address is outside the \
                     loadBalancerSourceRanges"
            .into();
        return d;
    }
    if m.count == 0 {
        d.verdict = "refused (ECONNREFUSED): no backend".into();
        if m.options.internal_traffic_local || m.options.external_traffic_local {
            d.notes
                .push("a Local traffic policy without a local backend".into());
        }
        return d;
    }
    d.verdict = "translated".into();
    if scope == Scope::Internal {
        d.notes
            .push("node-local clients use the frontend's internal-scope set".into());
    }
    if m.options.affinity_timeout.is_some() {
        // Keyed by the network namespace cookie of the client, which an
        // address does not tell: every live entry of the frontend is shown.
        let live: Vec<_> = maps
            .affinity
            .iter()
            .filter(|(c, s, _, _)| *s == m.svc_id && c & ADDRESS_CLIENT == 0)
            .collect();
        for (cookie, _, id, used) in &live {
            d.notes.push(format!(
                "sessionAffinity ClientIP: network namespace {cookie} uses {} (last {}s ago)",
                backend_name(snapshot, *id),
                maps.now_ns.saturating_sub(*used) / 1_000_000_000
            ));
        }
        if let [(_, _, id, used)] = live[..] {
            d.selection = Selection::Affinity;
            d.backend = Some(backend_name(snapshot, *id));
            d.backend_id = Some(*id);
            d.affinity_age_seconds = Some(maps.now_ns.saturating_sub(*used) / 1_000_000_000);
            return d;
        }
    }
    d.selection = Selection::Random;
    d.candidates = candidates(entries, snapshot);
    d
}

/// The explanation as text.
pub fn format_text(e: &Explanation) -> String {
    let mut out = format!(
        "Frontend:  {}{}\nClient:    {}\n",
        e.frontend,
        e.service
            .as_ref()
            .map(|s| format!(" ({s})"))
            .unwrap_or_default(),
        e.client
    );
    if let (Some(id), Some(t)) = (e.svc_id, &e.svc_type) {
        out.push_str(&format!("Entry:     id {id}, {t}"));
        if !e.flags.is_empty() {
            out.push_str(&format!(", flags {}", e.flags.join(",")));
        }
        if let Some(t) = e.affinity_timeout_seconds {
            out.push_str(&format!(", affinity {t}s"));
        }
        out.push('\n');
    }
    match e.source_range_allowed {
        Some(true) => out.push_str("Source:    allowed by the loadBalancerSourceRanges\n"),
        Some(false) => out.push_str("Source:    outside the loadBalancerSourceRanges\n"),
        None => {}
    }
    for d in &e.decisions {
        out.push_str(&format!(
            "\n{} [{:?} scope]: {}\n",
            d.path, d.scope, d.verdict
        ));
        if let Some(b) = &d.backend {
            out.push_str(&format!("  backend:  {b} ({:?})\n", d.selection));
        }
        if d.selection == Selection::Random {
            out.push_str(&format!(
                "  random among {}: {}\n",
                d.candidates.len(),
                d.candidates.join(", ")
            ));
        }
        for n in &d.notes {
            out.push_str(&format!("  {n}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::fake::FakeMaps;
    use crate::model::{Backend, FrontendOptions, FrontendSpec, Protocol, ServiceRef, ServiceType};
    use crate::reconcile::Reconciler;

    fn addr(s: &str) -> L4Addr {
        let sa: SocketAddr = s.parse().unwrap();
        L4Addr {
            ip: sa.ip(),
            port: sa.port(),
            proto: Protocol::Tcp,
        }
    }

    /// 10.96.0.10:80 with two backends, open to 192.0.2.0/24 only.
    fn snapshot() -> Snapshot {
        let fe = Frontend::new("10.96.0.10".parse().unwrap(), 80, Protocol::Tcp);
        let spec = FrontendSpec {
            service: ServiceRef {
                namespace: "t".into(),
                name: "web".into(),
                port_name: "http".into(),
            },
            svc_type: ServiceType::LoadBalancer,
            options: FrontendOptions::default(),
            backends: vec![
                Backend::remote(addr("10.244.0.11:8080")),
                Backend::remote(addr("10.244.0.12:8080")),
            ],
            source_ranges: vec!["192.0.2.0/24".parse().unwrap()],
        };
        let mut r = Reconciler::new(FakeMaps::new()).unwrap();
        r.sync_full(&[("t/web".to_string(), [(fe, spec)].into())].into(), true)
            .unwrap();
        r.maps().snapshot_for_tests()
    }

    fn reader() -> MapReader<'static> {
        MapReader {
            maglev_table: &|_| None,
            affinity: Vec::new(),
            conntrack: Vec::new(),
            now_ns: 0,
        }
    }

    #[test]
    fn a_random_frontend_lists_its_candidates_for_an_allowed_client() {
        let e = explain(
            addr("10.96.0.10:80"),
            "192.0.2.7:40000".parse().unwrap(),
            &snapshot(),
            None,
            &reader(),
        );
        assert_eq!(e.source_range_allowed, Some(true));
        for d in &e.decisions {
            assert_eq!(d.selection, Selection::Random, "{d:?}");
            assert_eq!(
                d.candidates,
                ["10.244.0.11:8080/TCP", "10.244.0.12:8080/TCP"]
            );
        }
    }

    #[test]
    fn a_client_outside_the_source_ranges_is_refused_on_both_paths() {
        let e = explain(
            addr("10.96.0.10:80"),
            "198.51.100.7:40000".parse().unwrap(),
            &snapshot(),
            None,
            &reader(),
        );
        assert_eq!(e.source_range_allowed, Some(false));
        assert!(e.decisions.iter().all(|d| d.selection == Selection::None));
        assert!(format_text(&e).contains("(EPERM)"), "{}", format_text(&e));
    }

    #[test]
    fn an_address_that_is_no_frontend_is_left_alone() {
        let e = explain(
            addr("10.96.0.99:80"),
            "192.0.2.7:40000".parse().unwrap(),
            &snapshot(),
            None,
            &reader(),
        );
        assert!(!e.is_frontend);
        assert!(e.decisions[0].verdict.contains("not a frontend"));
    }
}
