//! Connected UDP sockets to a removed backend are destroyed (kernel ≥ 6.5,
//! `bpf_sock_destroy`): a real agent on the socket-LB bed, long-lived
//! connected sockets in a probe process inside the agent's cgroup, and a
//! manifest edit that removes one backend per family. The stale sockets
//! fail on their next send or receive within a second; sockets to the
//! other backends, and sockets connected to the removed backend directly
//! (not through a Service), keep working; a new socket reaches a live
//! backend.
//!
//! Root only: `cargo test --test udp_sock_destroy -- --include-ignored`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use kpr_testbed::probe::held::HeldSocket;
use kpr_testbed::require_root;
use kpr_testbed::{BedPlan, ProbeResult, ProbeSpec, SocketLbBed};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");
/// The bound the issue sets on noticing a stale socket.
const WITHIN: Duration = Duration::from_secs(1);
/// How long the held sockets are watched after the edit.
const WATCH_MS: u64 = 2500;
/// Sockets per family: with two backends, the chance that all land on one
/// is 2^-15.
const SOCKETS: u32 = 16;

const DNS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: t}
spec:
  clusterIP: 10.96.0.53
  clusterIPs: [10.96.0.53, "fd00:10:96::53"]
  ports: [{name: dns, port: 53, targetPort: 5353, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-4, namespace: t, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints:
- addresses: [10.244.0.11]
- addresses: [10.244.0.12]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-6, namespace: t, labels: {kubernetes.io/service-name: dns}}
addressType: IPv6
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints:
- addresses: ["fd00:10:244::11"]
- addresses: ["fd00:10:244::12"]
"#;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn held(target: &str, sockets: u32, trigger: &Path) -> ProbeSpec {
    ProbeSpec::UdpHeld {
        target: addr(target),
        sockets,
        trigger: trigger.to_path_buf(),
        watch_ms: WATCH_MS,
        timeout_ms: 2000,
    }
}

fn micros_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Checks one family's sockets; returns the slowest time to the error.
#[track_caller]
fn check_family(sockets: &[HeldSocket], removed: &str, kept: &str, edited_us: u64) -> Duration {
    let on = |id: &str| -> Vec<&HeldSocket> {
        sockets
            .iter()
            .filter(|s| s.identity.as_deref() == Some(id))
            .collect()
    };
    let (stale, live) = (on(removed), on(kept));
    assert_eq!(stale.len() + live.len(), sockets.len(), "{sockets:#?}");
    assert!(!stale.is_empty() && !live.is_empty(), "{sockets:#?}");
    let mut slowest = Duration::ZERO;
    for s in stale {
        let (Some(error), Some(at)) = (&s.error, s.error_at_unix_us) else {
            panic!("a socket to the removed {removed} kept working: {s:?}");
        };
        assert!(
            [
                "recv:ECONNABORTED",
                "send:EDESTADDRREQ",
                "send:ECONNABORTED"
            ]
            .contains(&error.as_str()),
            "{s:?}"
        );
        slowest = slowest.max(Duration::from_micros(at.saturating_sub(edited_us)));
    }
    for s in live {
        assert_eq!(s.error, None, "a socket to {kept} was touched: {s:?}");
        assert!(s.replies_watched > 0, "{s:?}");
    }
    slowest
}

#[test]
#[ignore = "needs root"]
fn connected_udp_sockets_to_a_removed_backend_fail_at_once_and_others_are_untouched() {
    require_root();
    let bed = SocketLbBed::start(
        "usd",
        Path::new(KPR),
        DNS,
        &BedPlan {
            v4_backends: 2,
            v6_backends: 2,
            ..BedPlan::default()
        },
    )
    .unwrap();
    let trigger_dir = tempfile::tempdir().unwrap();
    let trigger = trigger_dir.path().join("go");

    let (v4, v6, direct, edited_us) = std::thread::scope(|s| {
        let v4 = s.spawn(|| bed.probe(&held("10.96.0.53:53", SOCKETS, &trigger), true));
        let v6 = s.spawn(|| bed.probe(&held("[fd00:10:96::53]:53", SOCKETS, &trigger), true));
        let direct = s.spawn(|| bed.probe(&held("10.244.0.11:5353", 2, &trigger), true));
        // The probes' sockets are connected and have had their first reply.
        std::thread::sleep(Duration::from_millis(1500));
        let edited = SystemTime::now();
        bed.write_manifest(
            "services.yaml",
            &DNS.replace("- addresses: [10.244.0.11]\n", "")
                .replace("- addresses: [\"fd00:10:244::11\"]\n", ""),
        )
        .unwrap();
        std::fs::write(&trigger, b"").unwrap();
        let join = |h: std::thread::ScopedJoinHandle<'_, kpr_testbed::Result<ProbeResult>>| {
            let r = h.join().unwrap().unwrap();
            r.as_held().unwrap().to_vec()
        };
        (join(v4), join(v6), join(direct), micros_since_epoch(edited))
    });

    let slowest4 = check_family(&v4, "10.244.0.11:5353", "10.244.0.12:5353", edited_us);
    let slowest6 = check_family(
        &v6,
        "[fd00:10:244::11]:5353",
        "[fd00:10:244::12]:5353",
        edited_us,
    );
    eprintln!(
        "stale UDP sockets failed after the edit within: IPv4 {slowest4:?}, IPv6 {slowest6:?}"
    );
    assert!(
        slowest4 < WITHIN && slowest6 < WITHIN,
        "{slowest4:?} {slowest6:?}\n{}",
        bed.agent.log()
    );
    for s in &direct {
        assert_eq!(s.identity.as_deref(), Some("10.244.0.11:5353"), "{s:?}");
        assert_eq!(
            s.error, None,
            "a socket connected to the backend directly was touched: {s:?}"
        );
    }

    // A new socket reaches the live backend.
    for (target, live) in [
        ("10.96.0.53:53", "10.244.0.12:5353"),
        ("[fd00:10:96::53]:53", "[fd00:10:244::12]:5353"),
    ] {
        let r = bed
            .probe(
                &ProbeSpec::UdpConnected {
                    target: addr(target),
                    count: 10,
                    timeout_ms: 2000,
                },
                true,
            )
            .unwrap();
        let r = r.as_udp().unwrap();
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert_eq!(r.identities.keys().collect::<Vec<_>>(), [live]);
    }
}
