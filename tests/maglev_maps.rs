//! Maglev tables in the real, pinned maps: the reconciler on `KernelMaps`
//! writes one inner array per backend set, reads them back after a
//! restart without rewriting them, and rewrites them when the table size
//! changes. Needs root (bpffs, BPF maps): every test is
//! `#[ignore = "needs root"]` (run them with `--include-ignored`) and
//! fails at once without root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use kpr::datapath::kernel::KernelMaps;
use kpr::datapath::loader::{self, MapSizes};
use kpr::datapath::LbMaps;
use kpr::maglev::MaglevParams;
use kpr::model::{
    Backend, Frontend, FrontendOptions, FrontendSpec, L4Addr, Protocol, ServiceRef, ServiceType,
};
use kpr::reconcile::{DesiredByService, Reconciler, ServiceFrontends};
use kpr_testbed::require_root;

/// Pinned maps in a temporary bpf root, removed on drop.
struct Maps {
    dir: tempfile::TempDir,
}

impl Maps {
    fn new() -> Maps {
        let dir = tempfile::tempdir().unwrap();
        loader::create_maps(&dir.path().join("bpf"), &MapSizes::default()).unwrap();
        Maps { dir }
    }

    fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("bpf")
    }

    fn reconciler(&self, size: u32) -> Reconciler<KernelMaps> {
        Reconciler::with_maglev(
            KernelMaps::open(&self.root()).unwrap(),
            MaglevParams::new(size, 0).unwrap(),
        )
        .unwrap()
    }

    /// Frontend id -> the id of its table (inner map) in the pinned
    /// outer map.
    fn inner_ids(&self) -> BTreeMap<u32, u32> {
        let outer = MapHandle::from_pinned_path(self.root().join("kpr_maglev_v1")).unwrap();
        outer
            .keys()
            .map(|k| {
                let v = outer.lookup(&k, MapFlags::ANY).unwrap().unwrap();
                (
                    u32::from_ne_bytes(k[..4].try_into().unwrap()),
                    u32::from_ne_bytes(v[..4].try_into().unwrap()),
                )
            })
            .collect()
    }
}

impl Drop for Maps {
    fn drop(&mut self) {
        let _ = loader::cleanup(&self.root());
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A NodePort Service on two node addresses, Maglev, `n` backends.
fn service(name: &str, port: u16, first_backend: u8, n: u8) -> (String, ServiceFrontends) {
    let backends: Vec<Backend> = (first_backend..first_backend + n)
        .map(|i| {
            Backend::remote(L4Addr {
                ip: ip(&format!("10.244.1.{i}")),
                port: 8080,
                proto: Protocol::Tcp,
            })
        })
        .collect();
    let fes = ["192.0.2.11", "198.51.100.1"]
        .iter()
        .map(|a| {
            (
                Frontend::new(ip(a), port, Protocol::Tcp),
                FrontendSpec {
                    service: ServiceRef {
                        namespace: "default".into(),
                        name: name.into(),
                        port_name: String::new(),
                    },
                    svc_type: ServiceType::NodePort,
                    options: FrontendOptions {
                        maglev: true,
                        ..Default::default()
                    },
                    backends: backends.clone(),
                    source_ranges: Vec::new(),
                },
            )
        })
        .collect();
    (format!("default/{name}"), fes)
}

#[test]
#[ignore = "needs root"]
fn tables_are_shared_per_backend_set_survive_a_restart_unwritten_and_follow_the_table_size() {
    require_root();
    let maps = Maps::new();
    let d: DesiredByService = [service("web", 30080, 11, 3), service("api", 30081, 20, 5)]
        .into_iter()
        .collect();
    let mut r = maps.reconciler(251);
    let out = r.sync_full(&d, true).unwrap();
    assert!(out.refused.is_empty(), "{:?}", out.refused);

    // Four frontends, two backend sets: two inner maps of 251 slots, each
    // holding only its frontends' backend ids.
    let inner = maps.inner_ids();
    assert_eq!(inner.len(), 4);
    let distinct: BTreeSet<u32> = inner.values().copied().collect();
    assert_eq!(distinct.len(), 2, "{inner:?}");
    for (fe, e) in &r.snapshot().frontends {
        let table = MapHandle::from_map_id(inner[&e.master.svc_id]).unwrap();
        assert_eq!(table.max_entries(), 251);
        let slots: BTreeSet<u32> = (0..251u32)
            .map(|i| {
                let v = table
                    .lookup(&i.to_ne_bytes(), MapFlags::ANY)
                    .unwrap()
                    .unwrap();
                u32::from_ne_bytes(v[..4].try_into().unwrap())
            })
            .collect();
        let own: BTreeSet<u32> = e.slots.iter().copied().collect();
        assert_eq!(slots, own, "{fe:?}: every backend in the table, no other");
    }
    let snapshot = r.snapshot().clone();
    drop(r);

    // A restarted reconciler reads the tables back and writes nothing.
    let mut r = maps.reconciler(251);
    assert_eq!(r.snapshot(), &snapshot);
    assert_eq!(r.sync_full(&d, true).unwrap().writes, 0);
    assert_eq!(maps.inner_ids(), inner);
    drop(r);

    // Another table size: every table replaced by one of the new size.
    let mut r = maps.reconciler(509);
    assert_eq!(r.sync_full(&d, true).unwrap().writes, 4);
    let resized = maps.inner_ids();
    assert_eq!(resized.len(), 4);
    for id in resized.values() {
        assert!(!distinct.contains(id));
        assert_eq!(MapHandle::from_map_id(*id).unwrap().max_entries(), 509);
    }

    // Removing a Service removes its tables.
    let only_web: DesiredByService = [service("web", 30080, 11, 3)].into_iter().collect();
    r.sync_full(&only_web, true).unwrap();
    assert_eq!(maps.inner_ids().len(), 2);
    assert_eq!(r.maps().snapshot().unwrap().maglev.len(), 2);
}

#[test]
#[ignore = "needs root"]
fn kpr_cleanup_removes_the_maglev_map() {
    require_root();
    let maps = Maps::new();
    let pin = maps.root().join("kpr_maglev_v1");
    assert!(pin.exists());
    loader::cleanup(&maps.root()).unwrap();
    assert!(!Path::new(&pin).exists());
}
