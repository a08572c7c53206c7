//! Tests of the probe: specs, outcomes and their encodings.

use super::*;

fn specs() -> Vec<ProbeSpec> {
    let v4: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let v6: SocketAddr = "[fd00:10:96::a]:53".parse().unwrap();
    vec![
        ProbeSpec::TcpRequests {
            target: v4,
            count: 10,
            timeout_ms: 500,
        },
        ProbeSpec::UdpUnconnected {
            target: v6,
            count: 3,
            timeout_ms: 200,
        },
        ProbeSpec::UdpConnected {
            target: v4,
            count: 3,
            timeout_ms: 200,
        },
        ProbeSpec::TcpPeerName {
            target: v6,
            timeout_ms: 200,
        },
        ProbeSpec::TcpConnectError {
            target: v4,
            timeout_ms: 200,
        },
        ProbeSpec::Placement {},
        ProbeSpec::Bind {
            addrs: vec![v4, v6],
            udp: true,
        },
    ]
}

#[test]
fn every_spec_survives_a_json_roundtrip() {
    for spec in specs() {
        let json = serde_json::to_string(&spec).unwrap();
        let back: ProbeSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec, "{json}");
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["op"], spec.op());
    }
}

#[test]
fn spec_json_is_the_documented_shape() {
    let spec: ProbeSpec = serde_json::from_str(
        r#"{"op":"tcp_requests","target":"[fd00:10:96::1]:80","count":2,"timeout_ms":100}"#,
    )
    .unwrap();
    assert_eq!(
        spec,
        ProbeSpec::TcpRequests {
            target: "[fd00:10:96::1]:80".parse().unwrap(),
            count: 2,
            timeout_ms: 100
        }
    );
    assert!(serde_json::from_str::<ProbeSpec>(
        r#"{"op":"tcp_requests","target":"10.0.0.1:1","count":1,"timeout_ms":1,"x":1}"#
    )
    .is_err());
}

#[test]
fn every_result_survives_a_json_roundtrip() {
    let mut requests = RequestsReport::default();
    requests.identities.insert("10.244.0.11:80".into(), 3);
    requests.failures.insert("connect:ECONNREFUSED".into(), 1);
    requests.durations_ns = vec![120, 95, 101];
    let mut udp = UdpReport::default();
    udp.reply_sources.insert("10.96.0.10:53".into());
    udp.peer_names.insert("10.96.0.10:53".into());
    let results = vec![
        ProbeResult::TcpRequests(requests),
        ProbeResult::UdpUnconnected(udp.clone()),
        ProbeResult::UdpConnected(udp),
        ProbeResult::TcpPeerName(PeerNameReport {
            peer: Some("[fd00:10:96::a]:80".into()),
            identity: Some("untranslated".into()),
            error: None,
        }),
        ProbeResult::TcpConnectError(ConnectReport {
            error: Some("ECONNREFUSED".into()),
            elapsed_us: 42,
        }),
        ProbeResult::Placement(PlacementReport {
            cgroup: "/kpr-test-st-1".into(),
            netns_inode: 4026531840,
        }),
        ProbeResult::Bind(BTreeMap::from([(
            "0.0.0.0:30080".to_string(),
            "EADDRINUSE".to_string(),
        )])),
    ];
    for (result, spec) in results.into_iter().zip(specs()) {
        let json = serde_json::to_string(&result).unwrap();
        let back: ProbeResult = serde_json::from_str(&json).unwrap();
        assert_eq!(back, result, "{json}");
        assert_eq!(result.op(), spec.op());
    }
}

#[test]
fn specs_out_of_bounds_are_rejected() {
    let target: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let too_many = ProbeSpec::TcpRequests {
        target,
        count: MAX_COUNT + 1,
        timeout_ms: 100,
    };
    let no_timeout = ProbeSpec::TcpConnectError {
        target,
        timeout_ms: 0,
    };
    let long_timeout = ProbeSpec::UdpConnected {
        target,
        count: 1,
        timeout_ms: MAX_TIMEOUT_MS + 1,
    };
    assert!(too_many.validate().is_err());
    assert!(no_timeout.validate().is_err());
    assert!(long_timeout.validate().is_err());
    assert!(too_many.run().is_err());
}

#[test]
fn connect_outcome_reads_ok_or_errno() {
    let ok = ConnectReport::default();
    assert_eq!(ok.outcome(), "OK");
    let refused = ConnectReport {
        error: Some("ECONNREFUSED".into()),
        elapsed_us: 1,
    };
    assert_eq!(refused.outcome(), "ECONNREFUSED");
}
