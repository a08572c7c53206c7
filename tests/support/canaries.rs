//! The canaries of the hostile-input suites: 20 ClusterIP Services in a
//! file of their own, which no case may lose or change, and reading the
//! pinned maps to check them.

use std::collections::BTreeMap;
use std::path::Path;

use kpr::datapath::kernel::KernelMaps;
use kpr::datapath::LbMaps;

/// How many canaries there are.
pub const CANARIES: usize = 20;

/// A ClusterIP Service on port 80 (target 8080) with one IPv4 slice.
pub fn service(ns: &str, name: &str, vip: &str, backends: &[String]) -> String {
    let endpoints: Vec<String> = backends
        .iter()
        .map(|b| format!("{{addresses: [{b}]}}"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{clusterIP: {vip}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]\n---\n",
        endpoints.join(", ")
    )
}

/// The canaries' manifest: `canary/c1`..`c20`, 10.96.100.N -> 10.244.100.N.
pub fn canaries() -> String {
    (1..=CANARIES)
        .map(|i| {
            service(
                "canary",
                &format!("c{i}"),
                &format!("10.96.100.{i}"),
                &[format!("10.244.100.{i}")],
            )
        })
        .collect()
}

/// Frontend (`10.96.100.1:80/TCP`) -> backend addresses, read from the pinned maps.
pub fn frontends(bpf_root: &Path) -> BTreeMap<String, Vec<String>> {
    let snapshot = KernelMaps::open(bpf_root)
        .and_then(|m| m.snapshot())
        .expect("reading the pinned maps");
    kpr::svc_list::rows(&snapshot, &Default::default())
        .into_iter()
        .map(|row| {
            let backends = row.backends.iter().map(|b| b.address.clone()).collect();
            (row.frontend, backends)
        })
        .collect()
}

/// The canaries missing or changed in `maps`, described.
pub fn canary_damage(maps: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    (1..=CANARIES)
        .filter_map(|i| {
            let fe = format!("10.96.100.{i}:80/TCP");
            let want = vec![format!("10.244.100.{i}")];
            match maps.get(&fe) {
                Some(b) if *b == want => None,
                other => Some(format!("{fe}: {other:?}")),
            }
        })
        .collect()
}
