//! The metrics as a scraper sees them: names, types, labels, values.

use super::*;
use std::collections::BTreeSet;

/// The value of the sample whose name and labels are exactly `series`.
#[track_caller]
fn sample(text: &str, series: &str) -> f64 {
    let found: Vec<f64> = text
        .lines()
        .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| {
            let value = value.split(' ').next().unwrap_or(value);
            value
                .parse()
                .unwrap_or_else(|e| panic!("{series}: {value}: {e}"))
        })
        .collect();
    match found[..] {
        [value] => value,
        _ => panic!("{series}: {} samples in\n{text}", found.len()),
    }
}

#[test]
fn every_family_is_exposed_under_its_exact_name_and_type() {
    let text = Metrics::new().encode();

    let types: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .collect();
    let expected: BTreeSet<&str> = [
        "kubeproxy_sync_proxy_rules_duration_seconds histogram",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge",
        "kpr_services gauge",
        "kpr_frontends gauge",
        "kpr_backends gauge",
        "kpr_bpf_map_entries gauge",
        "kpr_bpf_map_capacity gauge",
        "kpr_sync_errors counter",
        "kpr_services_unprogrammed gauge",
        "kpr_skipped_objects counter",
        "kpr_source_read_errors counter",
        "kpr_syncs counter",
        "kubeproxy_network_programming_duration_seconds histogram",
        "kubeproxy_sync_proxy_rules_endpoint_changes counter",
        "kubeproxy_sync_proxy_rules_service_changes counter",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total gauge",
        "kpr_watch_errors counter",
        "kpr_relists counter",
        "kpr_ct_gc_runs counter",
        "kpr_ct_gc_deleted_entries counter",
        "kpr_ct_entries gauge",
        "kpr_nodeport_events counter",
        "kpr_socket_source_range_drops counter",
        "kpr_nodeport_devices gauge",
        "kpr_nodeport_device_syncs counter",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds gauge",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending gauge",
        "kubeproxy_sync_proxy_rules_service_changes_pending gauge",
        "kubeproxy_sync_full_proxy_rules_duration_seconds histogram",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds histogram",
        "kubeproxy_proxy_healthz counter",
        "kubeproxy_proxy_livez counter",
        "process_cpu_seconds counter",
        "process_resident_memory_bytes gauge",
        "process_virtual_memory_bytes gauge",
        "process_open_fds gauge",
        "process_max_fds gauge",
        "process_start_time_seconds gauge",
        "kpr_build_info gauge",
    ]
    .into_iter()
    .collect();
    assert_eq!(types, expected, "\n{text}");
    assert!(text.ends_with("# EOF\n"));
}

#[test]
fn every_label_value_is_exported_at_zero_before_any_event() {
    let text = Metrics::new().encode();

    for map in MapName::FILL_EXPORTED {
        assert_eq!(
            sample(&text, &format!("kpr_bpf_map_entries{{map=\"{map}\"}}")),
            0.0
        );
        assert_eq!(
            sample(&text, &format!("kpr_bpf_map_capacity{{map=\"{map}\"}}")),
            0.0
        );
    }
    for reason in SyncErrorReason::ALL {
        let series = format!("kpr_sync_errors_total{{reason=\"{reason}\"}}");
        assert_eq!(sample(&text, &series), 0.0);
    }
    for reason in UnprogrammedReason::ALL {
        let series = format!("kpr_services_unprogrammed{{reason=\"{reason}\"}}");
        assert_eq!(sample(&text, &series), 0.0);
    }
    for reason in SkipReason::ALL {
        let series = format!("kpr_skipped_objects_total{{reason=\"{reason}\"}}");
        assert_eq!(sample(&text, &series), 0.0);
    }
    for reason in ReadErrorReason::ALL {
        let series = format!(
            "kpr_source_read_errors_total{{reason=\"{}\"}}",
            reason.as_label()
        );
        assert_eq!(sample(&text, &series), 0.0);
    }
    for result in ["success", "failure"] {
        let series = format!("kpr_syncs_total{{result=\"{result}\"}}");
        assert_eq!(sample(&text, &series), 0.0);
    }
}

#[test]
fn updates_show_up_under_the_exact_names() {
    let metrics = Metrics::new();
    metrics.observe_sync(Duration::from_millis(3));
    metrics.record_sync_result(true, UNIX_EPOCH + Duration::from_millis(1_700_000_000_500));
    metrics.record_sync_result(false, UNIX_EPOCH + Duration::from_secs(1_800_000_000));
    metrics.set_services(3);
    metrics.set_frontends(7);
    metrics.set_backends(12);
    metrics.set_map(MapName::SockRevNat, 40, 65_536);
    metrics.inc_sync_error(SyncErrorReason::Capacity);
    metrics.inc_sync_error(SyncErrorReason::Capacity);
    metrics.inc_skipped(SkipReason::UnsupportedKind);

    let text = metrics.encode();

    let s = |series: &str| sample(&text, series);
    assert_eq!(s("kubeproxy_sync_proxy_rules_duration_seconds_count"), 1.0);
    assert_eq!(s("kubeproxy_sync_proxy_rules_duration_seconds_sum"), 0.003);
    assert_eq!(
        s("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"}"),
        0.0
    );
    assert_eq!(
        s("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"}"),
        1.0
    );
    // The last *successful* sync, not the failed one after it.
    assert_eq!(
        s("kubeproxy_sync_proxy_rules_last_timestamp_seconds"),
        1_700_000_000.5
    );
    assert_eq!(s("kpr_services"), 3.0);
    assert_eq!(s("kpr_frontends"), 7.0);
    assert_eq!(s("kpr_backends"), 12.0);
    assert_eq!(s("kpr_bpf_map_entries{map=\"sock_revnat\"}"), 40.0);
    assert_eq!(s("kpr_bpf_map_capacity{map=\"sock_revnat\"}"), 65_536.0);
    assert_eq!(s("kpr_bpf_map_entries{map=\"services\"}"), 0.0);
    assert_eq!(s("kpr_sync_errors_total{reason=\"capacity\"}"), 2.0);
    assert_eq!(s("kpr_sync_errors_total{reason=\"map_update\"}"), 0.0);
    assert_eq!(
        s("kpr_skipped_objects_total{reason=\"unsupported_kind\"}"),
        1.0
    );
    assert_eq!(s("kpr_syncs_total{result=\"success\"}"), 1.0);
    assert_eq!(s("kpr_syncs_total{result=\"failure\"}"), 1.0);
}

#[test]
fn the_duration_histogram_has_kube_proxys_buckets() {
    let text = Metrics::new().encode();

    let bounds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\""))
        .filter_map(|l| l.split('"').next())
        .collect();
    assert_eq!(bounds.len(), 16, "{bounds:?}");
    assert_eq!(bounds[0], "0.001");
    assert_eq!(bounds[14], "16.384");
    assert_eq!(bounds[15], "+Inf");
}

#[test]
fn a_sync_timer_observes_once_when_stopped_or_dropped() {
    let metrics = Metrics::new();

    let elapsed = metrics.sync_timer().stop();
    {
        let _timer = metrics.sync_timer();
    }

    let text = metrics.encode();
    assert_eq!(
        sample(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count"),
        2.0
    );
    assert!(elapsed < Duration::from_secs(5));
}

#[test]
fn label_values_are_distinct_snake_case() {
    let labels: Vec<&str> = MapName::ALL
        .iter()
        .map(|m| m.as_str())
        .chain(SyncErrorReason::ALL.iter().map(|r| r.as_label()))
        .chain(SyncResult::ALL.iter().map(|r| r.as_label()))
        .collect();
    for label in &labels {
        assert!(
            label.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
            "{label}"
        );
    }
    let distinct: BTreeSet<&str> = MapName::ALL.iter().map(|m| m.as_str()).collect();
    assert_eq!(distinct.len(), MapName::ALL.len());
}

#[test]
fn the_map_labels_are_the_previous_ones_and_maglev() {
    let labels: BTreeSet<&str> = MapName::FILL_EXPORTED.iter().map(|m| m.as_str()).collect();
    let expected: BTreeSet<&str> = [
        "services",
        "backends",
        "affinity",
        "sock_revnat",
        "conntrack",
        "dsr",
        "source_ranges",
        "host_addresses",
        "peer_devices",
        "maglev",
    ]
    .into_iter()
    .collect();
    assert_eq!(labels, expected);
}

#[test]
fn kube_proxys_queue_and_scope_metrics_show_up_under_its_names() {
    let m = Metrics::new();
    let kp = m.kube_proxy();
    kp.record_queued(UNIX_EPOCH + Duration::from_millis(1_700_000_000_500));
    kp.set_pending(3, 7);
    kp.observe_sync(SyncScope::Full, Duration::from_millis(3));
    kp.observe_sync(SyncScope::Partial, Duration::from_micros(500));
    kp.observe_sync(SyncScope::Partial, Duration::from_micros(700));
    let text = m.render(Format::PrometheusText);

    assert_eq!(
        sample(
            &text,
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"
        ),
        1_700_000_000.5
    );
    assert_eq!(
        sample(&text, "kubeproxy_sync_proxy_rules_service_changes_pending"),
        3.0
    );
    assert_eq!(
        sample(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_pending"),
        7.0
    );
    assert_eq!(
        sample(
            &text,
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count"
        ),
        2.0
    );
    assert_eq!(
        sample(
            &text,
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket{le=\"0.001\"}"
        ),
        2.0,
        "kube-proxy's buckets, from 1 ms"
    );
}

#[test]
fn process_metrics_and_build_info_are_exported_with_go_clients_names() {
    let text = Metrics::new().render(Format::PrometheusText);

    assert!(sample(&text, "process_resident_memory_bytes") > 0.0);
    assert!(sample(&text, "process_virtual_memory_bytes") > 0.0);
    assert!(sample(&text, "process_open_fds") >= 3.0);
    assert!(sample(&text, "process_max_fds") >= sample(&text, "process_open_fds"));
    assert!(sample(&text, "process_cpu_seconds_total") >= 0.0);
    assert!(sample(&text, "process_start_time_seconds") > 1.5e9);
    assert!(
        text.contains("# TYPE process_cpu_seconds_total counter\n"),
        "{text}"
    );
    let build = text
        .lines()
        .find(|l| l.starts_with("kpr_build_info{"))
        .unwrap_or_else(|| panic!("no kpr_build_info in\n{text}"));
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && build.contains("revision=\"")
            && build.contains("rustc=\"rustc ")
            && build.ends_with("} 1"),
        "{build}"
    );
}
