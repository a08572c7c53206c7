//! Maglev tables in the reconciler, on fake maps whose invariant checks
//! run after every single write: a Maglev master with backends always
//! finds its table, and every slot of it an existing backend.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::tests::{desired, ip, sync_failing_after};
use super::*;
use crate::datapath::fake::FakeMaps;
use crate::model::{Backend, FrontendOptions, Protocol, ServiceRef, ServiceType};

const SIZE: u32 = 251;

fn params(size: u32) -> MaglevParams {
    MaglevParams::new(size, 7).unwrap()
}

fn reconciler(size: u32) -> Reconciler<FakeMaps> {
    Reconciler::with_maglev(FakeMaps::new(), params(size)).unwrap()
}

fn be(i: usize) -> Backend {
    Backend::remote(L4Addr {
        ip: ip(&format!("10.244.{}.{}", i / 200, i % 200 + 1)),
        port: 8080,
        proto: Protocol::Tcp,
    })
}

fn backends(range: impl IntoIterator<Item = usize>) -> Vec<Backend> {
    range.into_iter().map(be).collect()
}

/// NodePort frontends on two node addresses and 127.0.0.1, plus the
/// ClusterIP, as translation gives them; `maglev` on the NodePorts.
fn nodeport(name: &str, port: u16, maglev: bool, bes: Vec<Backend>) -> (String, ServiceFrontends) {
    let spec = |svc_type, maglev| FrontendSpec {
        service: ServiceRef {
            namespace: "default".into(),
            name: name.into(),
            port_name: String::new(),
        },
        svc_type,
        options: FrontendOptions {
            maglev,
            ..Default::default()
        },
        backends: bes.clone(),
        source_ranges: Vec::new(),
    };
    let mut fes = ServiceFrontends::new();
    fes.insert(
        Frontend::new(ip(&format!("10.96.0.{}", port % 200)), 80, Protocol::Tcp),
        spec(ServiceType::ClusterIP, false),
    );
    for node_ip in ["192.0.2.11", "198.51.100.1", "127.0.0.1"] {
        fes.insert(
            Frontend::new(ip(node_ip), port, Protocol::Tcp),
            spec(ServiceType::NodePort, maglev),
        );
    }
    (format!("default/{name}"), fes)
}

fn np(node_ip: &str, port: u16) -> Frontend {
    Frontend::new(ip(node_ip), port, Protocol::Tcp)
}

/// The table of `fe` as backend addresses, from the fake maps.
fn table_of(r: &Reconciler<FakeMaps>, fe: &Frontend) -> Option<Vec<L4Addr>> {
    let svc_id = r.snapshot().frontends.get(fe)?.master.svc_id;
    let table = r.maps().maglev.get(&svc_id)?;
    Some(table.iter().map(|id| r.maps().backends[id].addr).collect())
}

#[track_caller]
fn assert_consistent(r: &Reconciler<FakeMaps>) {
    assert!(
        r.maps().violations.is_empty(),
        "datapath invariant broken: {:?}",
        r.maps().violations
    );
    assert_eq!(
        &r.maps().snapshot().unwrap(),
        r.snapshot(),
        "the reconciler's view differs from the maps"
    );
    // Exactly the Maglev frontends with backends have a table.
    for (fe, e) in &r.snapshot().frontends {
        let has = r.maps().maglev.contains_key(&e.master.svc_id);
        let wants = e.master.options.maglev && !e.slots.is_empty();
        assert_eq!(has, wants, "{fe:?}: table present {has}, wanted {wants}");
    }
    assert_eq!(
        r.maps().maglev.len(),
        r.snapshot()
            .frontends
            .values()
            .filter(|e| e.master.options.maglev && !e.slots.is_empty())
            .count(),
        "tables no frontend uses"
    );
}

#[test]
fn maglev_nodeports_get_one_shared_table_with_near_equal_shares_and_the_cluster_ip_none() {
    let mut r = reconciler(SIZE);
    let d = desired(vec![nodeport("web", 30080, true, backends(0..5))]);
    let out = r.sync_full(&d, true).unwrap();
    assert!(out.refused.is_empty());
    assert_consistent(&r);
    // Three NodePort frontends, one table content, one Arc (so one inner
    // map in the datapath); no table for the ClusterIP.
    let ids: Vec<ServiceId> = ["192.0.2.11", "198.51.100.1", "127.0.0.1"]
        .iter()
        .map(|a| r.snapshot().frontends[&np(a, 30080)].master.svc_id)
        .collect();
    let tables: Vec<&MaglevTable> = ids.iter().map(|id| &r.maps().maglev[id]).collect();
    assert!(tables.iter().all(|t| Arc::ptr_eq(t, tables[0])));
    assert_eq!(r.maps().maglev.len(), 3);
    assert!(table_of(&r, &Frontend::new(ip("10.96.0.80"), 80, Protocol::Tcp)).is_none());

    let table = table_of(&r, &np("192.0.2.11", 30080)).unwrap();
    assert_eq!(table.len(), SIZE as usize);
    let mut shares: BTreeMap<L4Addr, usize> = BTreeMap::new();
    for a in &table {
        *shares.entry(*a).or_default() += 1;
    }
    assert_eq!(shares.len(), 5, "every backend has slots: {shares:?}");
    for n in shares.values() {
        // 251 / 5 = 50.2; Maglev keeps shares within a few slots.
        assert!((45..=56).contains(n), "{shares:?}");
    }
    // The table is the one `maglev::build_table` gives for these backends.
    let mut sources: Vec<L4Addr> = backends(0..5).iter().map(|b| b.addr).collect();
    sources.sort();
    let expected: Vec<L4Addr> = params(SIZE)
        .build(&sources)
        .unwrap()
        .iter()
        .map(|i| sources[*i as usize])
        .collect();
    assert_eq!(table, expected);
}

#[test]
fn an_unchanged_backend_set_rewrites_no_table() {
    let mut r = reconciler(SIZE);
    let d = desired(vec![nodeport("web", 30080, true, backends(0..4))]);
    r.sync_full(&d, true).unwrap();
    assert_eq!(r.sync_full(&d, true).unwrap().writes, 0);
    // Same addresses in another order, one of them now terminating: slots
    // and a backend entry change, the table does not.
    let mut bes = backends(0..4);
    bes.reverse();
    bes[0].state = crate::model::BackendState::Terminating;
    let before = r.maps().maglev.clone();
    let d = desired(vec![nodeport("web", 30080, true, bes)]);
    let out = r.sync_full(&d, true).unwrap();
    assert!(out.writes > 0);
    assert_consistent(&r);
    assert_eq!(r.maps().maglev.len(), before.len());
    for (id, t) in &before {
        assert!(Arc::ptr_eq(t, &r.maps().maglev[id]), "table {id} rewritten");
    }
}

#[test]
fn removing_a_backend_rewrites_the_table_and_keeps_most_flows_of_the_others() {
    let mut r = reconciler(4093);
    r.sync_full(
        &desired(vec![nodeport("web", 30080, true, backends(0..10))]),
        true,
    )
    .unwrap();
    let before = table_of(&r, &np("192.0.2.11", 30080)).unwrap();
    let removed = be(3).addr;
    let mut fewer = backends(0..10);
    fewer.remove(3);
    let d = desired(vec![nodeport("web", 30080, true, fewer)]);
    r.sync_full(&d, true).unwrap();
    assert_consistent(&r);
    let after = table_of(&r, &np("192.0.2.11", 30080)).unwrap();
    assert!(!after.contains(&removed));
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| **b != removed && b != a)
        .count();
    let kept = before.iter().filter(|b| **b != removed).count();
    assert!(
        moved * 10 < kept,
        "{moved} of {kept} slots of remaining backends moved"
    );
}

#[test]
fn switching_maglev_on_and_off_and_emptying_keeps_every_master_with_its_table() {
    let mut r = reconciler(SIZE);
    let steps = [
        (false, 0..3),
        (true, 0..3),
        (true, 0..0),
        (true, 2..6),
        (false, 2..6),
        (true, 5..7),
    ];
    for (maglev, range) in steps {
        let d = desired(vec![nodeport(
            "web",
            30080,
            maglev,
            backends(range.clone()),
        )]);
        r.sync_full(&d, true).unwrap();
        assert_consistent(&r);
        let has = table_of(&r, &np("192.0.2.11", 30080)).is_some();
        assert_eq!(has, maglev && !range.is_empty(), "{maglev} {range:?}");
    }
    // Removing the Service removes its tables after its masters.
    r.sync_full(&DesiredByService::new(), true).unwrap();
    assert_consistent(&r);
    assert!(r.maps().maglev.is_empty());
}

#[test]
fn a_frontend_with_more_backends_than_table_slots_is_refused_and_other_services_are_served() {
    let mut r = reconciler(SIZE);
    let d = desired(vec![
        nodeport("big", 30081, true, backends(0..300)),
        nodeport("web", 30080, true, backends(300..303)),
    ]);
    let out = r.sync_full(&d, true).unwrap();
    assert_consistent(&r);
    // The three NodePort frontends of big are refused, its ClusterIP and
    // all of web are programmed.
    assert_eq!(out.refused.len(), 3, "{:?}", out.refused);
    let msg = out.refused[0].to_string();
    assert!(
        msg.contains("default/big") && msg.contains("300 backends") && msg.contains("251"),
        "{msg}"
    );
    assert!(matches!(
        out.refused[0].reason,
        RefusalReason::Maglev { .. }
    ));
    assert!(!r
        .snapshot()
        .frontends
        .contains_key(&np("192.0.2.11", 30081)));
    assert!(table_of(&r, &np("192.0.2.11", 30080)).is_some());
    assert_eq!(r.snapshot().frontends.len(), 4 + 1);
}

#[test]
fn a_restarted_reconciler_keeps_right_tables_and_rewrites_tables_of_another_size() {
    let mut r = reconciler(SIZE);
    let d = desired(vec![
        nodeport("web", 30080, true, backends(0..4)),
        nodeport("api", 30081, true, backends(2..9)),
    ]);
    r.sync_full(&d, true).unwrap();
    let maps = r.into_maps();
    let writes = maps.writes;

    // Same size and seed: nothing to write.
    let mut r = Reconciler::with_maglev(maps, params(SIZE)).unwrap();
    assert_eq!(r.sync_full(&d, true).unwrap().writes, 0);
    assert_eq!(r.maps().writes, writes);

    // Another size: every table rewritten (and nothing else).
    let mut r = Reconciler::with_maglev(r.into_maps(), params(509)).unwrap();
    let out = r.sync_full(&d, true).unwrap();
    assert_eq!(out.writes, 6, "six NodePort frontends, one table each");
    assert_consistent(&r);
    assert!(r.maps().maglev.values().all(|t| t.len() == 509));

    // Another seed, same size: the content differs, so rewritten too.
    let mut r = Reconciler::with_maglev(r.into_maps(), MaglevParams::new(509, 8).unwrap()).unwrap();
    assert_eq!(r.sync_full(&d, true).unwrap().writes, 6);
    assert_consistent(&r);
}

#[test]
fn tables_no_frontend_uses_are_pruned_once_the_source_is_complete() {
    let mut r = reconciler(SIZE);
    let d = desired(vec![nodeport("web", 30080, true, backends(0..3))]);
    r.sync_full(&d, true).unwrap();
    let mut maps = r.into_maps();
    // Left by an interrupted sync: a table for an id no master has.
    let stray: MaglevTable = vec![1; SIZE as usize].into();
    maps.maglev.insert(99, stray);
    let mut r = Reconciler::with_maglev(maps, params(SIZE)).unwrap();
    r.sync_full(&d, false).unwrap();
    assert!(r.maps().maglev.contains_key(&99), "kept until complete");
    r.sync_full(&d, true).unwrap();
    assert!(!r.maps().maglev.contains_key(&99));
    assert_consistent(&r);
}

#[test]
fn a_failed_write_at_any_point_leaves_every_maglev_master_with_its_table() {
    let first = desired(vec![
        nodeport("web", 30080, true, backends(0..4)),
        nodeport("api", 30081, false, backends(4..6)),
    ]);
    let second = desired(vec![
        nodeport("web", 30080, true, backends(1..6)),
        nodeport("api", 30081, true, backends(4..7)),
        nodeport("new", 30082, true, backends(8..10)),
    ]);
    for fail_after in 0..40 {
        let mut r = reconciler(SIZE);
        r.sync_full(&first, true).unwrap();
        sync_failing_after(&mut r, &second, fail_after);
        assert_consistent(&r);
        assert_eq!(r.sync_full(&second, true).unwrap().writes, 0);
    }
}

#[test]
fn the_fake_maps_flag_a_maglev_master_written_before_its_table() {
    // The check the tests above rely on: it does catch the wrong order.
    let mut maps = FakeMaps::new();
    let fe = np("192.0.2.11", 30080);
    maps.put_backends(&[(
        1,
        BackendEntry {
            addr: be(0).addr,
            state: crate::model::BackendState::Active,
            local: false,
        },
    )])
    .unwrap();
    maps.put_service_entries(&[(
        fe,
        1,
        SvcValue::Slot {
            backend_id: 1,
            svc_id: 1,
        },
    )])
    .unwrap();
    let master = MasterEntry {
        svc_id: 1,
        count: 1,
        svc_type: ServiceType::NodePort,
        options: FrontendOptions {
            maglev: true,
            ..Default::default()
        },
        source_ranges: false,
    };
    maps.put_service_entries(&[(fe, 0, SvcValue::Master(master))])
        .unwrap();
    assert_eq!(maps.violations.len(), 1, "{:?}", maps.violations);
    assert!(maps.violations[0].contains("table 1 is missing"));
    // With the table, then its backend deleted under it: flagged as well.
    maps.violations.clear();
    maps.put_maglev_tables(&[(1, vec![1; 5].into())]).unwrap();
    assert!(maps.violations.is_empty());
    maps.delete_maglev_tables(&[1]).unwrap();
    assert_eq!(maps.violations.len(), 1, "{:?}", maps.violations);
}

#[test]
fn tables_count_against_the_maglev_map_capacity() {
    let cap = Capacity {
        services: 1000,
        backends: 1000,
        source_ranges: 1000,
        maglev: 4,
    };
    let mut r = Reconciler::with_maglev(FakeMaps::with_capacity(cap), params(SIZE)).unwrap();
    let d = desired(vec![
        nodeport("web", 30080, true, backends(0..3)),
        nodeport("api", 30081, true, backends(3..6)),
    ]);
    let out = r.sync_full(&d, true).unwrap();
    assert_eq!(out.refused.len(), 1, "{:?}", out.refused);
    assert!(matches!(
        out.refused[0].reason,
        RefusalReason::Capacity {
            map: MapName::Maglev,
            ..
        }
    ));
    assert_consistent(&r);
    assert_eq!(r.maps().maglev.len(), 3);
}

/// `nodeport` as a LoadBalancer Service with ingress IP 198.51.100.80 on
/// port 80, `maglev` and `ranges` (loadBalancerSourceRanges) on that
/// frontend only, as translation gives them.
fn guarded_lb(
    name: &str,
    maglev: bool,
    ranges: &[&str],
    bes: Vec<Backend>,
) -> (String, ServiceFrontends) {
    let (key, mut fes) = nodeport(name, 30090, maglev, bes.clone());
    let mut spec = fes.values().next().unwrap().clone();
    spec.svc_type = ServiceType::LoadBalancer;
    spec.options.maglev = maglev;
    spec.source_ranges = ranges.iter().map(|n| n.parse().unwrap()).collect();
    spec.backends = bes;
    fes.insert(Frontend::new(ip("198.51.100.80"), 80, Protocol::Tcp), spec);
    (key, fes)
}

#[test]
fn a_maglev_frontend_with_source_ranges_gets_both_before_its_master_whatever_write_fails() {
    let lb = Frontend::new(ip("198.51.100.80"), 80, Protocol::Tcp);
    let first = desired(vec![guarded_lb("lb", false, &[], backends(0..3))]);
    let second = desired(vec![guarded_lb(
        "lb",
        true,
        &["192.0.2.0/24", "203.0.113.7/32"],
        backends(0..4),
    )]);
    // And back: ranges and table go after the master stops using them.
    let third = desired(vec![guarded_lb("lb", false, &[], backends(1..4))]);
    for fail_after in 0..30 {
        let mut r = reconciler(SIZE);
        r.sync_full(&first, true).unwrap();
        for next in [&second, &third] {
            sync_failing_after(&mut r, next, fail_after);
            assert_consistent(&r);
            assert_eq!(r.sync_full(next, true).unwrap().writes, 0);
        }
    }
    let mut r = reconciler(SIZE);
    r.sync_full(&second, true).unwrap();
    let master = r.snapshot().frontends[&lb].master;
    assert!(master.options.maglev && master.source_ranges, "{master:?}");
    assert_eq!(r.maps().source_ranges.len(), 2);
    assert_eq!(table_of(&r, &lb).map(|t| t.len()), Some(SIZE as usize));
    r.sync_full(&third, true).unwrap();
    assert!(r.maps().source_ranges.is_empty());
    assert!(r.maps().maglev.is_empty());
    assert_consistent(&r);
}
