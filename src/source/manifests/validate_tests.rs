//! The API server's rules, one by one.

use super::*;

#[test]
fn special_addresses_are_refused_and_ordinary_ones_accepted() {
    for bad in [
        "127.0.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "169.254.169.254",
        "224.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "10.96.0.1/32",
        "not-an-ip",
    ] {
        assert_eq!(
            routable("x", bad).unwrap_err().0,
            SkipReason::InvalidAddress,
            "{bad}"
        );
    }
    for good in ["10.96.0.1", "192.0.2.7", "fd00:10:96::a", "2001:db8::1"] {
        assert!(routable("x", good).is_ok(), "{good}");
    }
}

#[test]
fn names_must_be_dns_1123_so_a_slash_cannot_join_two_keys() {
    for bad in ["a/b", "Web", "-a", "a-", "", "a\nb", "a_b", &"a".repeat(64)] {
        assert!(dns1123_label("name", bad).is_err(), "{bad:?}");
    }
    for good in ["a", "web-1", "0abc", &"a".repeat(63)] {
        assert!(dns1123_label("name", good).is_ok(), "{good:?}");
    }
    assert!(dns1123_subdomain("name", "web-1.abc").is_ok());
    assert!(dns1123_subdomain("name", "web..abc").is_err());
    assert!(label_value("l", "Web_1.x").is_ok());
    assert!(label_value("l", "ns/web").is_err());
}

fn service(json: serde_json::Value) -> Service {
    serde_json::from_value(json).unwrap()
}

#[test]
fn node_ports_outside_the_configured_range_are_refused() {
    let rules = Rules::default();
    let with = |node_port: i32, hc: i32| {
        service(serde_json::json!({
            "metadata": {"name": "a", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.1", "healthCheckNodePort": hc,
                     "ports": [{"port": 80, "nodePort": node_port}]}
        }))
    };
    assert!(with(30080, 31000).validate(&rules).is_ok());
    assert!(with(0, 0).validate(&rules).is_ok());
    assert_eq!(
        with(2222, 0).validate(&rules).unwrap_err().0,
        SkipReason::InvalidPort
    );
    assert_eq!(
        with(30080, 7).validate(&rules).unwrap_err().0,
        SkipReason::InvalidPort
    );
    let wide = Rules {
        node_port_range: (2000, 3000),
    };
    assert!(with(2222, 0).validate(&wide).is_ok());
}

#[test]
fn an_endpoint_slice_with_a_loopback_endpoint_is_refused() {
    let slice = |address: &str| -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "a"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.0.1"]}, {"addresses": [address]}]
        }))
        .unwrap()
    };
    assert!(slice("10.244.0.2").validate(&Rules::default()).is_ok());
    assert_eq!(
        slice("127.0.0.1")
            .validate(&Rules::default())
            .unwrap_err()
            .0,
        SkipReason::InvalidAddress
    );
}
