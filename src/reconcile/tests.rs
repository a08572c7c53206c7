use std::net::IpAddr;

use super::*;
use crate::datapath::fake::FakeMaps;
use crate::model::{Backend, FrontendOptions, Protocol, ServiceRef, ServiceType};

pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn be(addr: &str, port: u16) -> Backend {
    Backend::remote(L4Addr {
        ip: ip(addr),
        port,
        proto: Protocol::Tcp,
    })
}

fn fe(addr: &str, port: u16) -> Frontend {
    Frontend::new(ip(addr), port, Protocol::Tcp)
}

fn service(name: &str, frontends: &[(Frontend, Vec<Backend>)]) -> (String, ServiceFrontends) {
    let key = format!("default/{name}");
    let fes = frontends
        .iter()
        .map(|(f, backends)| {
            (
                *f,
                FrontendSpec {
                    service: ServiceRef {
                        namespace: "default".into(),
                        name: name.into(),
                        port_name: String::new(),
                    },
                    svc_type: ServiceType::ClusterIP,
                    options: FrontendOptions::default(),
                    backends: backends.clone(),
                    source_ranges: Vec::new(),
                },
            )
        })
        .collect();
    (key, fes)
}

pub(super) fn desired(services: Vec<(String, ServiceFrontends)>) -> DesiredByService {
    services.into_iter().collect()
}

/// `sync_full(d, true)` on maps that fail after `fail_after` writes: no
/// write on the way may break an invariant the fake maps check, and a sync
/// that failed is retried, without the fault, to completion.
#[track_caller]
pub(super) fn sync_failing_after(
    r: &mut Reconciler<FakeMaps>,
    d: &DesiredByService,
    fail_after: usize,
) {
    r.maps_mut().fail_after_writes = Some(fail_after);
    let result = r.sync_full(d, true);
    assert!(
        r.maps().violations.is_empty(),
        "fail_after={fail_after}: {:?}",
        r.maps().violations
    );
    r.maps_mut().fail_after_writes = None;
    if result.is_err() {
        r.sync_full(d, true).unwrap();
    }
}

/// The maps hold exactly `d`: every frontend with its backends in order.
#[track_caller]
fn assert_maps_hold(r: &Reconciler<FakeMaps>, d: &DesiredByService) {
    let snap = r.maps().snapshot().unwrap();
    assert_eq!(
        &snap,
        r.snapshot(),
        "the reconciler's view differs from the maps"
    );
    let mut expected: Vec<(Frontend, Vec<L4Addr>)> = d
        .values()
        .flat_map(|fes| {
            fes.iter()
                .map(|(f, s)| (*f, s.backends.iter().map(|b| b.addr).collect()))
        })
        .collect();
    expected.sort();
    let actual: Vec<(Frontend, Vec<L4Addr>)> = snap
        .frontends
        .iter()
        .map(|(f, e)| {
            (
                *f,
                e.slots.iter().map(|id| snap.backends[id].addr).collect(),
            )
        })
        .collect();
    assert_eq!(actual, expected);
    assert!(
        snap.stray_entries.is_empty(),
        "stray entries: {:?}",
        snap.stray_entries
    );
    let referenced: HashSet<BackendId> = snap
        .frontends
        .values()
        .flat_map(|e| e.slots.iter().copied())
        .collect();
    let stored: HashSet<BackendId> = snap.backends.keys().copied().collect();
    assert_eq!(referenced, stored, "unreferenced or missing backends");
    let cluster_ips: std::collections::BTreeSet<IpAddr> = d
        .values()
        .flatten()
        .filter(|(_, s)| s.svc_type == ServiceType::ClusterIP)
        .map(|(f, _)| f.addr.ip)
        .collect();
    assert_eq!(snap.port_rejects, cluster_ips, "port-reject entries");
    assert!(
        r.maps().violations.is_empty(),
        "datapath invariant broken: {:?}",
        r.maps().violations
    );
}

fn web3() -> (String, ServiceFrontends) {
    service(
        "web",
        &[(
            fe("10.96.0.10", 80),
            vec![
                be("10.244.0.11", 8080),
                be("10.244.0.12", 8080),
                be("10.244.0.13", 8080),
            ],
        )],
    )
}

#[test]
fn a_new_service_is_written_backends_first_then_slots_then_master() {
    let mut r = Reconciler::new(FakeMaps::new()).unwrap();
    let d = desired(vec![web3()]);
    let out = r.sync_full(&d, true).unwrap();
    // Backends, slots, master, and the ClusterIP's port-reject entry.
    assert_eq!(out.writes, 3 + 3 + 1 + 1);
    assert_maps_hold(&r, &d);
    let e = &r.snapshot().frontends[&fe("10.96.0.10", 80)];
    assert_eq!(e.master.svc_id, 1);
    assert_eq!(e.slots, vec![1, 2, 3]);
}

#[test]
fn an_unchanged_state_writes_nothing() {
    let mut r = Reconciler::new(FakeMaps::new()).unwrap();
    let d = desired(vec![web3()]);
    r.sync_full(&d, true).unwrap();
    let writes = r.maps().writes;
    assert_eq!(r.sync_full(&d, true).unwrap().writes, 0);
    assert_eq!(r.maps().writes, writes);
}

#[test]
fn an_endpoint_change_rewrites_one_slot_and_frees_the_removed_backend_id() {
    let mut r = Reconciler::new(FakeMaps::new()).unwrap();
    r.sync_full(&desired(vec![web3()]), true).unwrap();
    let d = desired(vec![service(
        "web",
        &[(
            fe("10.96.0.10", 80),
            vec![
                be("10.244.0.11", 8080),
                be("10.244.0.14", 8080),
                be("10.244.0.13", 8080),
            ],
        )],
    )]);
    let out = r.sync_full(&d, true).unwrap();
    // new backend, slot 2, old backend deleted
    assert_eq!(out.writes, 3);
    assert_eq!(
        out.removed_backends,
        [be("10.244.0.12", 8080).addr],
        "the removed backend is reported (its connected UDP sockets are destroyed)"
    );
    assert_maps_hold(&r, &d);
    assert!(
        !r.snapshot().backends.contains_key(&2),
        "id 2 still allocated"
    );
    // The freed id is reused by the next new backend.
    let d = desired(vec![service(
        "web",
        &[(
            fe("10.96.0.10", 80),
            vec![
                be("10.244.0.11", 8080),
                be("10.244.0.14", 8080),
                be("10.244.0.15", 8080),
            ],
        )],
    )]);
    r.sync_full(&d, true).unwrap();
    assert_maps_hold(&r, &d);
    assert_eq!(
        r.snapshot().frontends[&fe("10.96.0.10", 80)].slots,
        vec![1, 4, 2]
    );
}

#[test]
fn shrinking_and_growing_keep_every_slot_valid_at_every_write() {
    let mut r = Reconciler::new(FakeMaps::new()).unwrap();
    let sizes = [5usize, 1, 8, 0, 3, 9, 2];
    for n in sizes {
        let backends: Vec<_> = (0..n)
            .map(|i| be(&format!("10.244.1.{}", i + 1 + n), 80))
            .collect();
        let d = desired(vec![service("grow", &[(fe("10.96.0.20", 80), backends)])]);
        r.sync_full(&d, true).unwrap();
        assert_maps_hold(&r, &d);
    }
}

#[test]
fn removing_a_service_removes_master_slots_and_backends() {
    let mut r = Reconciler::new(FakeMaps::new()).unwrap();
    let other = service(
        "other",
        &[(fe("10.96.0.30", 53), vec![be("10.244.0.11", 8080)])],
    );
    r.sync_full(&desired(vec![web3(), other.clone()]), true)
        .unwrap();
    let d = desired(vec![other]);
    r.sync_full(&d, true).unwrap();
    assert_maps_hold(&r, &d);
    // 10.244.0.11:8080 is shared and stays; the other two are gone.
    assert_eq!(r.snapshot().backends.len(), 1);
}

#[test]
fn a_service_that_does_not_fit_is_refused_and_the_others_are_untouched() {
    let cap = Capacity {
        services: 10,
        backends: 10,
        source_ranges: 10,
        maglev: 10,
    };
    let mut r = Reconciler::new(FakeMaps::with_capacity(cap)).unwrap();
    let small = desired(vec![web3()]);
    r.sync_full(&small, true).unwrap();
    let big_backends: Vec<_> = (0..8)
        .map(|i| be(&format!("10.244.2.{}", i + 1), 80))
        .collect();
    let big = service("big", &[(fe("10.96.0.40", 80), big_backends)]);
    let mut d = small.clone();
    d.insert(big.0.clone(), big.1.clone());
    let out = r.sync_full(&d, true).unwrap();
    assert_eq!(out.refused.len(), 1);
    let msg = out.refused[0].to_string();
    assert!(
        msg.contains("default/big")
            && msg.contains("services")
            && msg.contains("previous state is kept"),
        "{msg}"
    );
    assert_maps_hold(&r, &small);
    // Removing web makes room, but only once its removal is applied (the
    // maps must hold old and new entries at the peak of a sync): big is
    // refused once more, then goes in on the following sync (the agent
    // retries refused syncs).
    let d = desired(vec![big]);
    assert_eq!(r.sync_full(&d, true).unwrap().refused.len(), 1);
    assert!(r.snapshot().frontends.is_empty());
    let out = r.sync_full(&d, true).unwrap();
    assert!(out.refused.is_empty(), "{:?}", out.refused);
    assert_maps_hold(&r, &d);
}

#[test]
fn a_restarted_reconciler_adopts_pinned_state_without_writes() {
    let mut r = Reconciler::new(FakeMaps::new()).unwrap();
    let d = desired(vec![
        web3(),
        service(
            "dns",
            &[(fe("10.96.0.53", 53), vec![be("10.244.0.20", 53)])],
        ),
    ]);
    r.sync_full(&d, true).unwrap();
    let before = r.snapshot().clone();
    let maps = r.into_maps();
    let writes = maps.writes;

    let mut r = Reconciler::new(maps).unwrap();
    assert_eq!(r.snapshot(), &before);
    let out = r.sync_full(&d, true).unwrap();
    assert_eq!(out.writes, 0);
    assert_eq!(out.pruned_frontends, 0);
    assert_eq!(r.maps().writes, writes);
    assert_eq!(r.snapshot(), &before);
}

#[test]
fn stale_frontends_are_pruned_only_once_the_source_is_complete() {
    let mut r = Reconciler::new(FakeMaps::new()).unwrap();
    r.sync_full(
        &desired(vec![
            web3(),
            service(
                "gone",
                &[(fe("10.96.0.99", 80), vec![be("10.244.0.99", 80)])],
            ),
        ]),
        true,
    )
    .unwrap();
    let mut r = Reconciler::new(r.into_maps()).unwrap();
    let d = desired(vec![web3()]);
    // Partial initial state: the stale frontend keeps serving.
    r.sync_full(&d, false).unwrap();
    assert!(r.snapshot().frontends.contains_key(&fe("10.96.0.99", 80)));
    let out = r.sync_full(&d, true).unwrap();
    assert_eq!(out.pruned_frontends, 1);
    assert_maps_hold(&r, &d);
}

#[test]
fn a_failed_write_leaves_consistent_maps_and_the_next_sync_converges() {
    for fail_after in 0..12 {
        let mut r = Reconciler::new(FakeMaps::new()).unwrap();
        r.sync_full(&desired(vec![web3()]), true).unwrap();
        let d = desired(vec![
            service(
                "web",
                &[(
                    fe("10.96.0.10", 80),
                    vec![be("10.244.0.12", 8080), be("10.244.0.16", 8080)],
                )],
            ),
            service(
                "new",
                &[(
                    fe("10.96.0.50", 80),
                    vec![be("10.244.0.17", 80), be("10.244.0.18", 80)],
                )],
            ),
        ]);
        sync_failing_after(&mut r, &d, fail_after);
        assert_maps_hold(&r, &d);
    }
}

#[test]
fn affinity_entries_to_backends_a_frontend_lost_are_removed() {
    let mut r = Reconciler::new(FakeMaps::new()).unwrap();
    let mut svc = web3();
    for spec in svc.1.values_mut() {
        spec.options.affinity_timeout = Some(10800);
    }
    r.sync_full(&desired(vec![svc.clone()]), true).unwrap();
    r.maps_mut().affinity.insert((1, 111), 1);
    r.maps_mut().affinity.insert((1, 222), 2);
    for spec in svc.1.values_mut() {
        spec.backends.remove(1); // 10.244.0.12 (id 2)
    }
    r.sync_full(&desired(vec![svc]), true).unwrap();
    assert_eq!(
        r.maps().affinity.keys().collect::<Vec<_>>(),
        vec![&(1, 111)]
    );
}

#[test]
fn a_frontend_claimed_by_two_services_stays_with_the_first() {
    let mut r = Reconciler::new(FakeMaps::new()).unwrap();
    let a = service("a", &[(fe("10.96.0.60", 80), vec![be("10.244.0.11", 80)])]);
    let b = service("b", &[(fe("10.96.0.60", 80), vec![be("10.244.0.12", 80)])]);
    let out = r.sync_full(&desired(vec![a.clone(), b]), true).unwrap();
    assert_eq!(out.refused.len(), 1);
    assert!(
        matches!(&out.refused[0].reason, RefusalReason::FrontendConflict { owner, .. } if owner == "default/a")
    );
    assert_maps_hold(&r, &desired(vec![a]));
}

#[test]
fn an_internal_scope_master_is_written_before_the_external_master_that_uses_it() {
    let mut r = Reconciler::new(FakeMaps::new()).unwrap();
    let (key, mut fes) = service(
        "etp",
        &[(fe("192.0.2.10", 30080), vec![be("10.244.0.11", 80)])],
    );
    let internal = Frontend {
        scope: crate::model::Scope::Internal,
        ..fe("192.0.2.10", 30080)
    };
    let mut spec = fes.values().next().unwrap().clone();
    spec.options.has_internal_scope = true;
    spec.options.external_traffic_local = true;
    fes.insert(fe("192.0.2.10", 30080), spec.clone());
    spec.options = FrontendOptions::default();
    spec.backends.push(be("10.244.0.12", 80));
    fes.insert(internal, spec);
    let d = desired(vec![(key, fes)]);
    r.sync_full(&d, true).unwrap();
    assert_maps_hold(&r, &d);
}

#[test]
fn affinity_entries_go_when_affinity_is_turned_off_and_a_backend_leaves() {
    let mut r = Reconciler::new(FakeMaps::new()).unwrap();
    let mut svc = web3();
    for spec in svc.1.values_mut() {
        spec.options.affinity_timeout = Some(10800);
    }
    r.sync_full(&desired(vec![svc.clone()]), true).unwrap();
    r.maps_mut().affinity.insert((1, 111), 2);
    for spec in svc.1.values_mut() {
        spec.options.affinity_timeout = None;
        spec.backends.remove(1);
    }
    r.sync_full(&desired(vec![svc]), true).unwrap();
    assert!(r.maps().affinity.is_empty(), "{:?}", r.maps().affinity);
}

#[test]
fn affinity_entries_left_by_a_previous_agent_for_unknown_frontends_are_removed() {
    let mut maps = FakeMaps::new();
    maps.affinity.insert((42, 7), 3);
    let mut r = Reconciler::new(maps).unwrap();
    r.sync_full(&desired(vec![web3()]), true).unwrap();
    assert!(r.maps().affinity.is_empty());
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// `web3` as a LoadBalancer frontend with `ranges` as its source ranges.
fn guarded(ranges: &[&str]) -> (String, ServiceFrontends) {
    let (key, mut fes) = web3();
    for spec in fes.values_mut() {
        spec.svc_type = ServiceType::LoadBalancer;
        spec.source_ranges = ranges.iter().map(|r| net(r)).collect();
    }
    (key, fes)
}

/// The source ranges the maps hold for the frontend 10.96.0.10:80.
fn ranges_of(r: &Reconciler<FakeMaps>) -> (bool, Vec<IpNet>) {
    let e = &r.snapshot().frontends[&fe("10.96.0.10", 80)];
    let held = r
        .maps()
        .source_ranges
        .iter()
        .filter(|(id, _)| *id == e.master.svc_id)
        .map(|(_, n)| *n)
        .collect();
    (e.master.source_ranges, held)
}

#[test]
fn source_ranges_are_written_before_the_master_enforcing_them_and_removed_after_it() {
    let mut r = Reconciler::new(FakeMaps::new()).unwrap();
    let d = desired(vec![guarded(&["192.0.2.0/24", "2001:db8::/32"])]);
    let out = r.sync_full(&d, true).unwrap();
    assert_eq!(out.writes, 3 + 3 + 2 + 1);
    assert_maps_hold(&r, &d);
    assert_eq!(
        ranges_of(&r),
        (true, vec![net("192.0.2.0/24"), net("2001:db8::/32")])
    );

    // One prefix swapped: one put and one delete, the master untouched.
    let d = desired(vec![guarded(&["198.51.100.0/24", "2001:db8::/32"])]);
    let out = r.sync_full(&d, true).unwrap();
    assert_eq!(out.writes, 2);
    assert_maps_hold(&r, &d);
    assert_eq!(
        ranges_of(&r),
        (true, vec![net("198.51.100.0/24"), net("2001:db8::/32")])
    );

    // Ranges dropped: the master stops enforcing first (the fake records a
    // master enforcing an empty set as a violation), then they go.
    let d = desired(vec![guarded(&[])]);
    let out = r.sync_full(&d, true).unwrap();
    assert_eq!(out.writes, 1 + 2);
    assert_maps_hold(&r, &d);
    assert_eq!(ranges_of(&r), (false, vec![]));

    // Back on, then the Service removed: nothing stays behind.
    let d = desired(vec![guarded(&["192.0.2.9/32"])]);
    r.sync_full(&d, true).unwrap();
    assert_eq!(ranges_of(&r), (true, vec![net("192.0.2.9/32")]));
    let d = desired(vec![]);
    r.sync_full(&d, true).unwrap();
    assert_maps_hold(&r, &d);
    assert!(r.maps().source_ranges.is_empty());
}

#[test]
fn an_unchanged_frontend_with_source_ranges_costs_no_write() {
    let mut r = Reconciler::new(FakeMaps::new()).unwrap();
    let d = desired(vec![guarded(&["192.0.2.0/24"])]);
    r.sync_full(&d, true).unwrap();
    assert_eq!(r.sync_full(&d, true).unwrap().writes, 0);
    // A restarted agent reads them back and rewrites nothing.
    let mut r = Reconciler::new(r.into_maps()).unwrap();
    assert_eq!(r.sync_full(&d, true).unwrap().writes, 0);
    assert_maps_hold(&r, &d);
}

#[test]
fn stray_source_ranges_are_pruned_and_a_reused_id_holds_exactly_its_own() {
    let mut maps = FakeMaps::new();
    // Left by an interrupted sync: ranges of id 1 (which the next frontend
    // will get) and of id 9 (which no frontend has).
    maps.source_ranges.insert((1, net("203.0.113.0/24")));
    maps.source_ranges.insert((9, net("10.0.0.0/8")));
    let mut r = Reconciler::new(maps).unwrap();
    let d = desired(vec![guarded(&["192.0.2.0/24"])]);
    r.sync_full(&d, true).unwrap();
    assert_maps_hold(&r, &d);
    assert_eq!(
        r.maps().source_ranges.iter().copied().collect::<Vec<_>>(),
        [(1, net("192.0.2.0/24"))]
    );
}

#[test]
fn a_service_whose_source_ranges_do_not_fit_is_refused_whole() {
    let cap = Capacity {
        services: 100,
        backends: 100,
        source_ranges: 2,
        maglev: 100,
    };
    let mut r = Reconciler::new(FakeMaps::with_capacity(cap)).unwrap();
    let d = desired(vec![guarded(&[
        "192.0.2.0/24",
        "198.51.100.0/24",
        "203.0.113.0/24",
    ])]);
    let out = r.sync_full(&d, true).unwrap();
    assert_eq!(out.writes, 0);
    assert!(matches!(
        out.refused[0].reason,
        RefusalReason::Capacity {
            map: MapName::SourceRanges,
            needed: 3,
            free: 2,
            ..
        }
    ));
    assert!(r.snapshot().frontends.is_empty());
}
