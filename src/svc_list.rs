//! `kpr svc list`: the services map as `cilium service list` shows it, read
//! straight from the maps (so it shows what the datapath uses, whether or
//! not an agent runs), plus the same data as JSON for scripts. The Service
//! of each frontend comes from the agent's record (`applied_state`).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::applied_state::frontend_label;
use crate::datapath::maps::{BackendId, ServiceId, Snapshot};
use crate::model::{BackendState, L4Addr, LbAlgorithm, Scope, ServiceType};

/// One frontend with its backends, as printed.
#[derive(Debug, Serialize, PartialEq)]
pub struct ServiceRow {
    pub id: ServiceId,
    /// `ip:port/PROTO`, `[ip6]:port/PROTO`; `/i` marks the internal scope.
    pub frontend: String,
    /// `namespace/name:port-name` of the frontend's Service, from the
    /// agent's record; None when the record does not name it.
    pub service: Option<String>,
    pub address: String,
    pub port: u16,
    pub protocol: &'static str,
    pub scope: Scope,
    #[serde(rename = "type")]
    pub svc_type: ServiceType,
    /// sessionAffinity ClientIP timeout in seconds, when set.
    pub affinity_timeout_seconds: Option<u32>,
    /// North-south backend selection (the table shows `(maglev)` after the
    /// type of Maglev frontends).
    pub lb_algorithm: LbAlgorithm,
    /// loadBalancerSourceRanges the datapath enforces for this frontend
    /// (the source-range map's prefixes); empty: open to every client.
    pub source_ranges: Vec<String>,
    pub backends: Vec<BackendRow>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct BackendRow {
    pub id: BackendId,
    pub address: String,
    pub port: u16,
    pub protocol: &'static str,
    pub state: BackendState,
}

/// Rows in frontend order, each named by `names` (frontend label ->
/// Service, see [`crate::applied_state::AppliedState::names`]). A slot
/// whose backend is missing (which the reconciler's ordering rules out)
/// shows as id with address "?".
pub fn rows(snapshot: &Snapshot, names: &BTreeMap<String, String>) -> Vec<ServiceRow> {
    snapshot
        .frontends
        .iter()
        .map(|(fe, entries)| ServiceRow {
            id: entries.master.svc_id,
            frontend: frontend_label(fe),
            service: names.get(&frontend_label(fe)).cloned(),
            address: fe.addr.ip.to_string(),
            port: fe.addr.port,
            protocol: fe.addr.proto.as_str(),
            scope: fe.scope,
            svc_type: entries.master.svc_type,
            affinity_timeout_seconds: entries.master.options.affinity_timeout,
            lb_algorithm: match entries.master.options.maglev {
                true => LbAlgorithm::Maglev,
                false => LbAlgorithm::Random,
            },
            source_ranges: match entries.master.source_ranges {
                true => snapshot
                    .source_ranges
                    .get(&entries.master.svc_id)
                    .map(|set| set.iter().map(ToString::to_string).collect())
                    .unwrap_or_default(),
                false => Vec::new(),
            },
            backends: entries
                .slots
                .iter()
                .map(|id| match snapshot.backends.get(id) {
                    Some(b) => backend_row(*id, &b.addr, b.state),
                    None => BackendRow {
                        id: *id,
                        address: "?".into(),
                        port: 0,
                        protocol: "?",
                        state: BackendState::Active,
                    },
                })
                .collect(),
        })
        .collect()
}

fn backend_row(id: BackendId, addr: &L4Addr, state: BackendState) -> BackendRow {
    BackendRow {
        id,
        address: addr.ip.to_string(),
        port: addr.port,
        protocol: addr.proto.as_str(),
        state,
    }
}

fn backend_label(b: &BackendRow) -> String {
    if b.address == "?" {
        return format!("backend {} missing", b.id);
    }
    let addr = if b.address.contains(':') {
        format!("[{}]", b.address)
    } else {
        b.address.clone()
    };
    format!("{addr}:{}/{} ({})", b.port, b.protocol, b.state.as_str())
}

/// The Service Type column as `cilium service list` spells it (Cilium's
/// `SVCType`: `ExternalIPs` in the plural); the JSON keeps kpr's names.
fn cilium_type(t: ServiceType) -> &'static str {
    match t {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
        ServiceType::ExternalIP => "ExternalIPs",
        ServiceType::HostPort => "HostPort",
    }
}

/// The table: columns padded like Go's tabwriter (min width 5, padding 3).
/// A frontend's backends go on continuation lines, as in Cilium's; so do
/// its source ranges, under its type (`allow PREFIX`). The Service column
/// (kpr's, not Cilium's) shows `-` for a frontend the record does not name.
pub fn format_table(rows: &[ServiceRow]) -> String {
    let header = ["ID", "Frontend", "Service", "Service Type", "Backend"];
    let mut lines: Vec<[String; 5]> = vec![header.map(String::from)];
    for row in rows {
        let svc_type = match row.lb_algorithm {
            LbAlgorithm::Random => cilium_type(row.svc_type).to_string(),
            LbAlgorithm::Maglev => format!("{} (maglev)", cilium_type(row.svc_type)),
        };
        let types: Vec<String> = std::iter::once(svc_type)
            .chain(row.source_ranges.iter().map(|r| format!("allow {r}")))
            .collect();
        let backends: Vec<String> = row
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("{} => {}", i + 1, backend_label(b)))
            .collect();
        for i in 0..types.len().max(backends.len()).max(1) {
            let (id, frontend, service) = match i {
                0 => (
                    row.id.to_string(),
                    row.frontend.clone(),
                    row.service.clone().unwrap_or_else(|| "-".into()),
                ),
                _ => (String::new(), String::new(), String::new()),
            };
            let cell = |col: &[String]| col.get(i).cloned().unwrap_or_default();
            lines.push([id, frontend, service, cell(&types), cell(&backends)]);
        }
    }
    let width = |col: usize| (lines.iter().map(|l| l[col].len()).max().unwrap_or(0) + 3).max(5);
    let widths = [width(0), width(1), width(2), width(3)];
    let mut out = String::new();
    for l in &lines {
        let line = format!(
            "{:w0$}{:w1$}{:w2$}{:w3$}{}",
            l[0],
            l[1],
            l[2],
            l[3],
            l[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The rows as pretty JSON.
pub fn format_json(rows: &[ServiceRow]) -> String {
    serde_json::to_string_pretty(rows).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")) + "\n"
}
