//! Control-plane cost on real BPF maps: translate + diff + apply for 1k and
//! 10k Services x 10 endpoints (full sync from empty maps), and one endpoint
//! change with 10k Services loaded. Targets on a 2-core machine: full sync
//! of 10k x 10 <= 0.3 s, one endpoint change <= 1 ms. Also Maglev: building
//! a table of the default 16381 slots, and one endpoint change of a Maglev
//! NodePort Service (new table built, written and swapped in).
//!
//! Needs root (it mounts a private bpffs and creates maps; it attaches
//! nothing). Without root it says so and measures only the table build.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use kpr::datapath::kernel::KernelMaps;
use kpr::datapath::loader::{self, MapSizes};
use kpr::maglev::MaglevParams;
use kpr::model::{L4Addr, LbAlgorithm, Protocol};
use kpr::reconcile::{DesiredByService, Reconciler};
use kpr::translate::{self, NodeContext};

const ENDPOINTS: usize = 10;

fn service(i: usize) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}")),
            namespace: Some("bench".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(format!(
                "10.{}.{}.{}",
                96 + i / 65536,
                (i / 256) % 256,
                i % 256
            )),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(i: usize, generation: usize) -> EndpointSlice {
    let endpoints = (0..ENDPOINTS)
        .map(|e| {
            let n = i * ENDPOINTS + e + generation * 7919;
            Endpoint {
                addresses: vec![format!(
                    "10.{}.{}.{}",
                    128 + (n / 65536) % 64,
                    (n / 256) % 256,
                    n % 256
                )],
                ..Default::default()
            }
        })
        .collect();
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}-abc")),
            namespace: Some("bench".into()),
            labels: Some(BTreeMap::from([(
                translate::SERVICE_NAME_LABEL.to_string(),
                format!("svc-{i}"),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints,
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            ..Default::default()
        }]),
    }
}

struct Bed {
    root: tempfile::TempDir,
}

impl Bed {
    fn new() -> Option<Bed> {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("!!! benches/reconcile needs root (bpffs, BPF maps): NOT MEASURED");
            return None;
        }
        let root = tempfile::tempdir().expect("tempdir");
        let sizes = MapSizes {
            services: 262_144,
            backends: 262_144,
            ..MapSizes::default()
        };
        loader::create_maps(&root.path().join("bpf"), &sizes).expect("creating maps");
        Some(Bed { root })
    }

    fn reconciler(&self) -> Reconciler<KernelMaps> {
        Reconciler::new(KernelMaps::open(&self.root.path().join("bpf")).expect("open maps"))
            .expect("reconciler")
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = loader::cleanup(&self.root.path().join("bpf"));
    }
}

fn full_sync(c: &mut Criterion, bed: &Bed, services: usize) {
    let svcs: Vec<Service> = (0..services).map(service).collect();
    let slices: Vec<EndpointSlice> = (0..services).map(|i| slice(i, 0)).collect();
    let mut r = bed.reconciler();
    let mut group = c.benchmark_group("full_sync");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(if services > 5000 { 20 } else { 5 }));
    group.bench_function(format!("{services}x{ENDPOINTS}"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let t = translate::translate(&svcs, &slices, &NodeContext::default());
                let out = r.sync_full(&t.desired, true).expect("sync");
                total += start.elapsed();
                assert!(out.refused.is_empty(), "{:?}", out.refused.first());
                // Back to empty maps, untimed.
                r.sync_full(&DesiredByService::new(), true).expect("clear");
            }
            total
        })
    });
    group.finish();
}

fn endpoint_change(c: &mut Criterion, bed: &Bed, services: usize) {
    let svcs: Vec<Service> = (0..services).map(service).collect();
    endpoint_flip(
        c,
        bed,
        ("endpoint_change", format!("one_of_{services}x{ENDPOINTS}")),
        &svcs,
        &NodeContext::default(),
        |writes| assert!((3..=ENDPOINTS + 2).contains(&writes), "writes: {writes}"),
    );
}

/// Benchmark `(group, name)`: one endpoint change of the middle one of
/// `svcs`, all of them loaded for `node` (their slices at generation 0):
/// its slice flips between two versions that differ in one endpoint, and
/// `check` sees the writes of every sync. The maps are cleared after.
fn endpoint_flip(
    c: &mut Criterion,
    bed: &Bed,
    (group, name): (&str, String),
    svcs: &[Service],
    node: &NodeContext,
    check: impl Fn(usize),
) {
    let slices: Vec<EndpointSlice> = (0..svcs.len()).map(|i| slice(i, 0)).collect();
    let mut r = bed.reconciler();
    r.sync_full(&translate::translate(svcs, &slices, node).desired, true)
        .expect("load");
    let target = svcs.len() / 2;
    let key = translate::object_key(&svcs[target].metadata);
    // Two versions of one slice that differ in one endpoint.
    let a = slice(target, 0);
    let mut b = a.clone();
    b.endpoints[3].addresses = vec!["10.250.0.3".into()];
    let mut flip = false;
    let mut group = c.benchmark_group(group);
    group.bench_function(name, |bench| {
        bench.iter(|| {
            flip = !flip;
            let slice = if flip { &b } else { &a };
            let fes = translate::translate_service(&svcs[target], &[slice], node, &mut Vec::new())
                .frontends;
            let out = r.sync_services(vec![(key.clone(), fes)]).expect("sync");
            check(out.writes);
        })
    });
    group.finish();
    r.sync_full(&DesiredByService::new(), true).expect("clear");
}

/// Building one Maglev table of the default size (pure computation).
fn maglev_build(c: &mut Criterion) {
    let params = MaglevParams::default();
    let mut group = c.benchmark_group("maglev_build");
    for n in [10usize, 100] {
        let backends: Vec<L4Addr> = (0..n)
            .map(|i| L4Addr {
                ip: format!("10.244.{}.{}", i / 250, i % 250 + 1)
                    .parse()
                    .unwrap(),
                port: 8080,
                proto: Protocol::Tcp,
            })
            .collect();
        group.bench_function(format!("{}x{n}", params.table_size()), |b| {
            b.iter(|| params.build(&backends).expect("table"))
        });
    }
    group.finish();
}

/// One endpoint change of a Maglev NodePort Service (two node addresses
/// and 127.0.0.1 share one table) with 1k such Services loaded.
fn maglev_endpoint_change(c: &mut Criterion, bed: &Bed) {
    let services = 1_000;
    let node = NodeContext {
        node_ips: vec![
            "192.0.2.11".parse().unwrap(),
            "198.51.100.1".parse().unwrap(),
        ],
        lb_algorithm: LbAlgorithm::Maglev,
        ..Default::default()
    };
    let svcs: Vec<Service> = (0..services)
        .map(|i| {
            let mut s = service(i);
            let spec = s.spec.as_mut().expect("spec");
            spec.type_ = Some("NodePort".into());
            for p in spec.ports.iter_mut().flatten() {
                p.node_port = Some(30000 + i as i32);
            }
            s
        })
        .collect();
    endpoint_flip(
        c,
        bed,
        (
            "maglev_endpoint_change",
            format!("one_of_{services}x{ENDPOINTS}_nodeport"),
        ),
        &svcs,
        &node,
        // Per frontend (ClusterIP, 3 NodePorts) a slot; a backend added
        // and one removed; 3 table entries (one shared table).
        |writes| assert!(writes >= 4 + 2 + 3, "writes: {writes}"),
    );
}

fn benches(c: &mut Criterion) {
    maglev_build(c);
    let Some(bed) = Bed::new() else { return };
    let _ = Path::new("");
    full_sync(c, &bed, 1_000);
    full_sync(c, &bed, 10_000);
    endpoint_change(c, &bed, 10_000);
    maglev_endpoint_change(c, &bed);
}

criterion_group!(reconcile, benches);
criterion_main!(reconcile);
