//! `kpr svc list --verify`: the pinned maps compared with the agent's record
//! of what it programmed (`applied_state`), every difference named. A map
//! entry changed, added or lost behind the agent's back (a stale backend
//! after an outage, a hand edit, a bug) shows here, and the exit status
//! says whether there is any.
//!
//! Compared per frontend (by address, port, protocol and scope): present
//! in both, type, flags, affinity timeout, source ranges, the backend set
//! (by address; state and locality of each), and for a Maglev frontend its
//! table slot by slot against the table the agent's parameters give.
//! Slot order is not compared: the datapath picks among slots uniformly.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::applied_state::{frontend_label, AppliedState, BackendState, FrontendState};
use crate::datapath::maps::{BackendId, ServiceId, Snapshot};
use crate::model::L4Addr;

/// What kind of difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiffKind {
    /// The agent programmed the frontend; the maps lack it.
    MissingFrontend,
    /// The maps hold a frontend the agent did not program.
    ExtraFrontend,
    /// A master entry's type, flags, affinity or source ranges differ.
    StaleFrontend,
    /// A backend of the frontend is not in the maps.
    MissingBackend,
    /// The maps give the frontend a backend the agent did not.
    ExtraBackend,
    /// A backend's state or locality differs.
    StaleBackend,
    /// The Maglev table is not the one the backends and parameters give.
    MaglevTable,
    /// A services-map entry of no consistent frontend.
    StrayEntry,
}

impl DiffKind {
    fn as_str(self) -> &'static str {
        match self {
            DiffKind::MissingFrontend => "missing frontend",
            DiffKind::ExtraFrontend => "extra frontend",
            DiffKind::StaleFrontend => "stale frontend",
            DiffKind::MissingBackend => "missing backend",
            DiffKind::ExtraBackend => "extra backend",
            DiffKind::StaleBackend => "stale backend",
            DiffKind::MaglevTable => "wrong Maglev table",
            DiffKind::StrayEntry => "stray entry",
        }
    }
}

/// One difference between the maps and the record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub kind: DiffKind,
    /// The frontend (`svc list`'s label).
    pub frontend: String,
    /// Its Service, when the record names it.
    pub service: Option<String>,
    /// What differs: `want ..., maps have ...`, or the backend.
    pub detail: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.as_str(), self.frontend)?;
        if let Some(s) = &self.service {
            write!(f, " ({s})")?;
        }
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

/// Every difference between `snapshot` (the maps) and `record`; `table`
/// reads a frontend's Maglev table from the maps.
pub fn compare(
    record: &AppliedState,
    snapshot: &Snapshot,
    table: &dyn Fn(ServiceId) -> Option<Vec<BackendId>>,
) -> Vec<Difference> {
    let mut out = Vec::new();
    let maps: BTreeMap<String, _> = snapshot
        .frontends
        .iter()
        .map(|(fe, entries)| (frontend_label(fe), entries))
        .collect();
    let want: BTreeMap<&str, _> = record
        .frontends
        .iter()
        .map(|f| (f.frontend.as_str(), f))
        .collect();
    for (label, applied) in &want {
        let diff = |kind, detail: String| Difference {
            kind,
            frontend: label.to_string(),
            service: Some(applied.service.clone()),
            detail,
        };
        let Some(entries) = maps.get(*label) else {
            out.push(diff(DiffKind::MissingFrontend, String::new()));
            continue;
        };
        let have = FrontendState::of_maps(entries, snapshot);
        compare_master(&applied.state, &have, &mut |d| {
            out.push(diff(DiffKind::StaleFrontend, d))
        });
        compare_backends(&applied.state.backends, &have.backends, &mut |k, d| {
            out.push(diff(k, d))
        });
        let maglev = applied.state.flags.iter().any(|f| f == "maglev");
        if maglev && !applied.state.backends.is_empty() {
            if let Some(d) = compare_maglev(record, entries.master.svc_id, snapshot, entries, table)
            {
                out.push(diff(DiffKind::MaglevTable, d));
            }
        }
    }
    for label in maps.keys().filter(|l| !want.contains_key(l.as_str())) {
        out.push(Difference {
            kind: DiffKind::ExtraFrontend,
            frontend: label.clone(),
            service: None,
            detail: String::new(),
        });
    }
    for (fe, slot) in &snapshot.stray_entries {
        out.push(Difference {
            kind: DiffKind::StrayEntry,
            frontend: frontend_label(fe),
            service: None,
            detail: format!("slot {slot}"),
        });
    }
    out
}

fn compare_master(want: &FrontendState, have: &FrontendState, out: &mut dyn FnMut(String)) {
    let mut field = |name: &str, w: String, h: String| {
        if w != h {
            out(format!("{name}: want {w}, maps have {h}"));
        }
    };
    field("type", want.svc_type.clone(), have.svc_type.clone());
    field(
        "flags",
        format!("{:?}", want.flags),
        format!("{:?}", have.flags),
    );
    field(
        "affinity timeout",
        format!("{:?}", want.affinity_timeout_seconds),
        format!("{:?}", have.affinity_timeout_seconds),
    );
    field(
        "source ranges",
        format!("{:?}", want.source_ranges),
        format!("{:?}", have.source_ranges),
    );
}

fn compare_backends(
    want: &[BackendState],
    have: &[BackendState],
    out: &mut dyn FnMut(DiffKind, String),
) {
    let by_addr = |list: &[BackendState]| -> BTreeMap<String, BackendState> {
        list.iter()
            .map(|b| (b.address.clone(), b.clone()))
            .collect()
    };
    let (want, have) = (by_addr(want), by_addr(have));
    let show = |b: &BackendState| match b.local {
        true => format!("{} local", b.state),
        false => b.state.clone(),
    };
    for (addr, w) in &want {
        match have.get(addr) {
            None => out(DiffKind::MissingBackend, addr.clone()),
            Some(h) if h != w => out(
                DiffKind::StaleBackend,
                format!("{addr}: want {}, maps have {}", show(w), show(h)),
            ),
            Some(_) => {}
        }
    }
    for addr in have.keys().filter(|a| !want.contains_key(*a)) {
        out(DiffKind::ExtraBackend, addr.clone());
    }
}

/// The differing slots of a frontend's Maglev table, if any.
fn compare_maglev(
    record: &AppliedState,
    svc_id: ServiceId,
    snapshot: &Snapshot,
    entries: &crate::datapath::maps::FrontendEntries,
    table: &dyn Fn(ServiceId) -> Option<Vec<BackendId>>,
) -> Option<String> {
    let Some(actual) = table(svc_id) else {
        return Some("the maps hold no table".into());
    };
    // The backends as the maps number them (what the table holds).
    let ids: Vec<(L4Addr, BackendId)> = entries
        .slots
        .iter()
        .filter_map(|id| snapshot.backends.get(id).map(|b| (b.addr, *id)))
        .collect();
    let addrs: Vec<L4Addr> = ids.iter().map(|(a, _)| *a).collect();
    let expected = match record.maglev().build(&addrs) {
        Ok(t) => t,
        Err(e) => return Some(e.to_string()),
    };
    if expected.len() != actual.len() {
        return Some(format!(
            "want {} slots, maps have {}",
            expected.len(),
            actual.len()
        ));
    }
    let differing = expected
        .iter()
        .zip(&actual)
        .filter(|(i, got)| ids.get(**i as usize).map(|(_, id)| id) != Some(got))
        .count();
    (differing > 0).then(|| format!("{differing} of {} slots differ", actual.len()))
}

/// The report: one line per difference, then a summary line.
pub fn format_text(record: &AppliedState, diffs: &[Difference]) -> String {
    let mut out = String::new();
    for d in diffs {
        out.push_str(&format!("{d}\n"));
    }
    for s in &record.refused {
        out.push_str(&format!(
            "# {s}: refused by the agent (kpr status says why); not counted\n"
        ));
    }
    match diffs.len() {
        0 => out.push_str(&format!(
            "in sync: {} frontends as the agent's record (written at {}) says\n",
            record.frontends.len(),
            record.written_at
        )),
        n => out.push_str(&format!(
            "{n} difference(s) between the maps and the agent's record (written at {})\n",
            record.written_at
        )),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::fake::FakeMaps;
    use crate::datapath::maps::{BackendEntry, LbMaps};
    use crate::maglev::MaglevParams;
    use crate::model::{Backend, BackendState as State, Frontend, FrontendSpec, Protocol};
    use crate::model::{FrontendOptions, ServiceRef, ServiceType};
    use crate::reconcile::{DesiredByService, Reconciler};

    fn desired() -> DesiredByService {
        let fe = Frontend::new("10.96.0.10".parse().unwrap(), 80, Protocol::Tcp);
        let backend = |ip: &str| {
            Backend::remote(L4Addr {
                ip: ip.parse().unwrap(),
                port: 8080,
                proto: Protocol::Tcp,
            })
        };
        let spec = FrontendSpec {
            service: ServiceRef {
                namespace: "t".into(),
                name: "web".into(),
                port_name: "http".into(),
            },
            svc_type: ServiceType::ClusterIP,
            options: FrontendOptions::default(),
            backends: vec![backend("10.244.0.11"), backend("10.244.0.12")],
            source_ranges: vec![],
        };
        [("t/web".to_string(), [(fe, spec)].into())].into()
    }

    fn synced() -> (Reconciler<FakeMaps>, AppliedState) {
        let mut r = Reconciler::new(FakeMaps::new()).unwrap();
        r.sync_full(&desired(), true).unwrap();
        let record = AppliedState::new(r.applied_frontends(), vec![], MaglevParams::default());
        (r, record)
    }

    #[test]
    fn maps_equal_to_the_record_have_no_difference() {
        let (r, record) = synced();
        let diffs = compare(&record, &r.maps().snapshot_for_tests(), &|_| None);
        assert_eq!(diffs, vec![]);
        assert!(format_text(&record, &diffs).starts_with("in sync: 1 frontends"));
    }

    #[test]
    fn a_backend_changed_behind_the_agent_is_named() {
        let (mut r, record) = synced();
        let snapshot = r.maps().snapshot_for_tests();
        let (id, entry) = snapshot.backends.iter().next().unwrap();
        let moved = BackendEntry {
            addr: L4Addr {
                port: 9999,
                ..entry.addr
            },
            state: State::Terminating,
            local: false,
        };
        r.maps_mut().put_backends(&[(*id, moved)]).unwrap();
        let diffs = compare(&record, &r.maps().snapshot_for_tests(), &|_| None);
        let text: Vec<String> = diffs.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "missing backend 10.96.0.10:80/TCP (t/web:http): 10.244.0.11:8080/TCP",
                "extra backend 10.96.0.10:80/TCP (t/web:http): 10.244.0.11:9999/TCP",
            ]
        );
    }

    #[test]
    fn a_frontend_lost_or_added_behind_the_agent_is_named() {
        let (mut r, record) = synced();
        let fe = *r
            .maps()
            .snapshot_for_tests()
            .frontends
            .keys()
            .next()
            .unwrap();
        let extra = Frontend::new("10.96.0.99".parse().unwrap(), 80, Protocol::Tcp);
        let master = r.maps().snapshot_for_tests().frontends[&fe].master;
        r.maps_mut()
            .put_service_entries(&[(extra, 0, crate::datapath::maps::SvcValue::Master(master))])
            .unwrap();
        r.maps_mut().delete_service_entries(&[(fe, 0)]).unwrap();
        let diffs = compare(&record, &r.maps().snapshot_for_tests(), &|_| None);
        let kinds: Vec<DiffKind> = diffs.iter().map(|d| d.kind).collect();
        assert!(kinds.contains(&DiffKind::MissingFrontend), "{diffs:?}");
        assert!(kinds.contains(&DiffKind::ExtraFrontend), "{diffs:?}");
    }
}
