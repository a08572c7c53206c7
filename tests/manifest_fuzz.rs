//! A bounded fuzz run of the manifest parser and the translator, for CI
//! (no root, no kernel: the in-memory maps). Each case writes 20 canary
//! Services to one file and a mutated manifest to another (valid documents
//! with hostile values swapped in, then bytes cut, doubled and flipped),
//! loads both, translates and syncs the fake maps, and checks:
//! - no canary is lost or changed;
//! - the maps hold only what valid documents name: every frontend address
//!   is a canary's, a node address, or an address the mutated text names,
//!   and no frontend or backend is loopback (but NodePort's 127.0.0.1),
//!   unspecified, broadcast, link-local or multicast.
//!
//! Deterministic: case `i` uses seed `KPR_FUZZ_SEED + i` (default 1);
//! `KPR_FUZZ_CASES` (default 300) cases, stopped after 30 s whatever the
//! count. A failure prints the seed and the mutated text.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kpr::datapath::fake::FakeMaps;
use kpr::reconcile::Reconciler;
use kpr::source::manifests;
use kpr::translate::{self, NodeContext};

const CANARIES: usize = 20;
const NODE_IP: &str = "192.0.2.10";
const TIME_BOUND: Duration = Duration::from_secs(30);

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

fn service(ns: &str, name: &str, vip: &str, backend: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{clusterIP: {vip}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [{backend}]}}]\n---\n"
    )
}

fn canaries() -> String {
    (1..=CANARIES)
        .map(|i| {
            service(
                "canary",
                &format!("c{i}"),
                &format!("10.96.100.{i}"),
                &format!("10.244.100.{i}"),
            )
        })
        .collect()
}

/// Addresses the API server refuses where kpr must too.
const HOSTILE_ADDRESSES: &[&str] = &[
    "127.0.0.1",
    "0.0.0.0",
    "255.255.255.255",
    "169.254.169.254",
    "224.0.0.1",
    "\"::1\"",
    "\"fe80::1\"",
    "\"::\"",
];
const HOSTILE_NAMES: &[&str] = &["a/b", "\"x\\ny\"", "UPPER", "-lead", "", "\"a b\""];
const HOSTILE_PORTS: &[&str] = &["0", "65536", "-1", "2222", "99999999999", "\"80\""];
const NOISE: &[&str] = &[
    "[", "]", "{", "}", ":", "-", ",", "\"", "'", "\n", "\t", "#", "&a", "*a", "!!", "|", ">",
    "---\n", "\u{0}", "\u{7f}",
];

/// A manifest of a few fuzz Services (VIPs outside the canaries'), then
/// mutated.
fn mutated(rng: &mut Rng) -> String {
    let mut text = String::new();
    for n in 0..1 + rng.below(4) {
        let ns = if rng.chance(80) {
            "fz".to_string()
        } else {
            rng.pick(HOSTILE_NAMES).to_string()
        };
        let name = if rng.chance(80) {
            format!("s{n}")
        } else {
            rng.pick(HOSTILE_NAMES).to_string()
        };
        let vip = if rng.chance(60) {
            format!("10.96.{}.{}", rng.below(100), 1 + rng.below(250))
        } else {
            rng.pick(HOSTILE_ADDRESSES).to_string()
        };
        let backend = if rng.chance(60) {
            format!("10.244.{}.{}", rng.below(100), 1 + rng.below(250))
        } else {
            rng.pick(HOSTILE_ADDRESSES).to_string()
        };
        let mut doc = service(&ns, &name, &vip, &backend);
        if rng.chance(30) {
            let port = rng.pick(HOSTILE_PORTS);
            doc = doc.replacen("port: 80,", &format!("port: {port},"), 1);
        }
        if rng.chance(20) {
            let ip = rng.pick(HOSTILE_ADDRESSES);
            let node_port = rng.pick(HOSTILE_PORTS);
            doc = doc.replacen(
                "spec: {",
                &format!("spec: {{type: NodePort, externalIPs: [{ip}], "),
                1,
            );
            doc = doc.replacen(
                "targetPort: 8080",
                &format!("targetPort: 8080, nodePort: {node_port}"),
                1,
            );
        }
        text.push_str(&doc);
    }
    // Byte-level damage: cut, doubled lines, noise, deep nesting.
    for _ in 0..rng.below(6) {
        let chars: Vec<char> = text.chars().collect();
        let at = rng.below(chars.len() + 1);
        let (head, tail): (String, String) =
            (chars[..at].iter().collect(), chars[at..].iter().collect());
        text = match rng.below(5) {
            0 => head,
            1 => format!("{head}{}{tail}", rng.pick(NOISE)),
            2 => {
                let line = tail.lines().next().unwrap_or_default().to_string();
                format!("{head}{line}\n{tail}")
            }
            3 => format!("{head}{}{tail}", "[".repeat(1 + rng.below(5_000))),
            _ => format!(
                "{head}{}",
                tail.chars().skip(1 + rng.below(20)).collect::<String>()
            ),
        };
    }
    text
}

fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_link_local()
                || v4.is_multicast()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// Frontend label -> (address, port, backend addresses) of what the maps hold.
fn maps_after(
    paths: &[PathBuf],
    node: &NodeContext,
) -> BTreeMap<String, (IpAddr, u16, Vec<String>)> {
    let set = manifests::load(paths);
    let t = translate::translate(&set.services, &set.slices, node);
    let mut r = Reconciler::new(FakeMaps::new()).expect("fake maps");
    r.sync_full(&t.desired, true)
        .expect("a sync of the fake maps");
    kpr::svc_list::rows(r.snapshot(), &Default::default())
        .into_iter()
        .map(|row| {
            let ip: IpAddr = row.address.parse().expect("an address");
            let backends = row.backends.iter().map(|b| b.address.clone()).collect();
            (row.frontend, (ip, row.port, backends))
        })
        .collect()
}

#[test]
fn fuzzed_manifests_put_only_what_valid_documents_name_in_the_maps_and_lose_no_canary() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (seed, cases) = (env("KPR_FUZZ_SEED", 1), env("KPR_FUZZ_CASES", 300));
    let dir = tempfile::tempdir().unwrap();
    let canary_file = dir.path().join("canaries.yaml");
    let fuzz_file = dir.path().join("fuzz.yaml");
    std::fs::write(&canary_file, canaries()).unwrap();
    let node = NodeContext {
        node_ips: vec![NODE_IP.parse().unwrap()],
        ..NodeContext::default()
    };
    let started = Instant::now();
    let mut ran = 0;
    // Fuzz frontends that made it into the maps: the run is not vacuous.
    let mut accepted: u64 = 0;
    for case in 0..cases {
        if started.elapsed() > TIME_BOUND {
            break;
        }
        let case_seed = seed + case;
        let text = mutated(&mut Rng::new(case_seed));
        std::fs::write(&fuzz_file, &text).unwrap();
        let maps = maps_after(&[canary_file.clone(), fuzz_file.clone()], &node);
        let failed = |what: String| -> ! {
            panic!("seed {case_seed}: {what}\n--- fuzz.yaml ---\n{text}\n--- maps ---\n{maps:#?}")
        };
        for i in 1..=CANARIES {
            let fe = format!("10.96.100.{i}:80/TCP");
            match maps.get(&fe) {
                Some((_, _, b)) if *b == vec![format!("10.244.100.{i}")] => {}
                other => failed(format!("canary {fe} lost or changed: {other:?}")),
            }
        }
        accepted += maps
            .keys()
            .filter(|fe| !fe.starts_with("10.96.100."))
            .count() as u64;
        for (fe, (ip, port, backends)) in &maps {
            let node_port = (30000..=32767).contains(port);
            let named = ip.to_string() == NODE_IP
                || (node_port && ip.is_loopback())
                || (!forbidden(*ip) && text.contains(&ip.to_string()))
                || fe.starts_with("10.96.100.");
            if !named || (forbidden(*ip) && !(node_port && ip.is_loopback())) {
                failed(format!("frontend {fe} is not what a valid document names"));
            }
            for b in backends {
                let b_ip: IpAddr = b.parse().expect("a backend address");
                if forbidden(b_ip) || !(text.contains(b.as_str()) || fe.starts_with("10.96.100.")) {
                    failed(format!(
                        "backend {b} of {fe} is not what a valid document names"
                    ));
                }
            }
        }
        ran += 1;
    }
    assert!(
        ran >= 50.min(cases),
        "only {ran} cases within {TIME_BOUND:?}"
    );
    assert!(
        accepted >= ran / 10,
        "only {accepted} fuzz frontends in {ran} cases"
    );
    eprintln!(
        "{ran} fuzz cases from seed {seed} in {:?}: {accepted} fuzz frontends programmed",
        started.elapsed()
    );
}
