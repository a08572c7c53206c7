//! The chart's Grafana dashboard and alert rules (charts/kpr/files): the
//! rules pass `promtool check rules` and their unit tests
//! (tests/monitoring/kpr-alerts.test.yaml: each alert firing and quiet), and
//! every metric the dashboard's queries and the rules' expressions name is
//! one kpr exports, as its registry renders them (`kpr::metrics`, what
//! `/metrics` serves). `/metrics` in the Prometheus text format passes
//! `promtool check metrics` but for the lints of names kube-proxy chose
//! (listed). promtool comes from Debian's `prometheus` package
//! (tools/setup-deps installs it).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

const RULES: &str = "charts/kpr/files/kpr-alerts.yaml";
const RULES_TEST: &str = "tests/monitoring/kpr-alerts.test.yaml";
const DASHBOARD: &str = "charts/kpr/files/kpr-dashboard.json";

#[track_caller]
fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool: {e} (tools/setup-deps installs Debian's prometheus package)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn promtool_checks_the_rules_and_passes_their_unit_tests() {
    let check = promtool(&["check", "rules", RULES]);
    let alerts = alert_names();
    assert!(
        check.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{check}"
    );
    let test = promtool(&["test", "rules", RULES_TEST]);
    assert!(test.contains("SUCCESS"), "{test}");
}

fn rules() -> Value {
    serde_yaml_ng::from_str(&read(RULES)).expect("the rules file is YAML")
}

fn alert_names() -> Vec<String> {
    rules()["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .map(|r| r["alert"].as_str().expect("only alerts").to_string())
        .collect()
}

#[test]
fn every_alert_is_tested_firing_and_quiet() {
    let test: Value = serde_yaml_ng::from_str(&read(RULES_TEST)).expect("YAML");
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for case in test["tests"].as_array().expect("tests") {
        for check in case["alert_rule_test"].as_array().expect("alert_rule_test") {
            let name = check["alertname"].as_str().expect("alertname").to_string();
            match check["exp_alerts"].as_array() {
                Some(exp) if !exp.is_empty() => firing.insert(name),
                _ => quiet.insert(name),
            };
        }
    }
    for alert in alert_names() {
        assert!(firing.contains(&alert), "{alert} is never tested firing");
        assert!(quiet.contains(&alert), "{alert} is never tested quiet");
    }
}

/// The agent's registry: its families and the datapath's counters (read
/// from a bpf root without maps: every summed series at zero).
fn registry() -> kpr::metrics::Metrics {
    let counters = kpr::metrics::DatapathCounters::new(
        std::env::temp_dir().join("kpr-monitoring-test-no-maps"),
        0,
        true,
    );
    kpr::metrics::Metrics::new()
        .with_datapath_counters(counters)
        .0
}

/// The sample names kpr's registry renders: what `/metrics` serves
/// (`_total`, `_bucket`, `_sum`, `_count` included).
fn exported() -> BTreeSet<String> {
    let text = registry().encode();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect()
}

/// Removes the spans between `open` and its `close` (no nesting in what
/// they hold here: label matchers, range durations, label lists).
fn strip(expr: &str, open: char, close: char) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in expr.chars() {
        if c == open {
            depth += 1;
        } else if c == close && depth > 0 {
            depth -= 1;
        } else if depth == 0 {
            out.push(c);
        }
    }
    out
}

/// The metric names in a PromQL expression: identifiers that are not
/// functions (followed by `(`), keywords, label names (in `{...}` and in
/// `by`/`without`/`on`/`ignoring` lists) or durations.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
    ];
    // Quoted strings first (a matcher value may hold any character).
    let mut unquoted = String::new();
    let mut in_quote = false;
    for c in expr.chars() {
        if c == '"' {
            in_quote = !in_quote;
        } else if !in_quote {
            unquoted.push(c);
        }
    }
    let mut text = strip(&strip(&unquoted, '{', '}'), '[', ']');
    // Label lists: `by (a, b)`, `ignoring (result)`...
    for kw in [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        while let Some(at) = find_word(&text, kw) {
            let after = &text[at + kw.len()..];
            let Some(open) = after.find('(').filter(|&i| after[..i].trim().is_empty()) else {
                break;
            };
            let close = after[open..]
                .find(')')
                .map(|i| open + i + 1)
                .unwrap_or(after.len());
            text = format!("{} {}", &text[..at], &after[close..]);
        }
    }
    let mut names = BTreeSet::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() || c == '_' || c == '$' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:$".contains(chars[i]))
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            let is_call = next == Some(&'(');
            let preceded_by_digit = start > 0 && chars[start - 1].is_ascii_digit();
            if !is_call
                && !preceded_by_digit
                && !word.starts_with('$')
                && !KEYWORDS.contains(&word.to_lowercase().as_str())
            {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

fn find_word(text: &str, word: &str) -> Option<usize> {
    text.match_indices(word).map(|(i, _)| i).find(|&i| {
        let before = text[..i].chars().last();
        let after = text[i + word.len()..].chars().next();
        let ident = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        !ident(before) && !ident(after)
    })
}

#[test]
fn the_metric_name_parser_finds_metrics_and_nothing_else() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{x=~"y|z", q="b c"}[5m])))
           > 10 and ignoring (result) increase(b_total[$__rate_interval]) == 0 or time() - c offset 5m"#,
    );
    assert_eq!(names, ["a_bucket", "b_total", "c"].map(String::from).into());
}

/// Every query of the dashboard: panel targets and template variables.
fn dashboard_queries() -> Vec<String> {
    let dash: Value = serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().expect("a PromQL expr").to_string());
        }
    }
    for var in dash["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = var["query"]
            .as_str()
            .and_then(|q| q.strip_prefix("label_values("))
        {
            // label_values(METRIC, LABEL): only the metric is one.
            let metric = q.split(',').next().expect("a metric");
            queries.push(metric.to_string());
        }
    }
    queries
}

#[test]
fn every_metric_in_the_dashboard_and_the_rules_is_one_kpr_exports() {
    let exported = exported();
    assert!(exported.contains("kpr_syncs_total"), "{exported:?}");
    let mut used = BTreeSet::new();
    let mut exprs = dashboard_queries();
    assert!(exprs.len() > 20, "{exprs:?}");
    for group in rules()["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            exprs.push(rule["expr"].as_str().expect("expr").to_string());
        }
    }
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no metric in {expr}");
        for name in names {
            assert!(
                exported.contains(&name),
                "{name} (in {expr}) is not a metric kpr exports"
            );
            used.insert(name);
        }
    }
    // The dashboard shows every family kpr exports.
    let families: BTreeSet<String> = registry()
        .encode()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(String::from)
        .collect();
    for family in &families {
        assert!(
            used.iter().any(|u| u.starts_with(family.as_str())),
            "no panel or rule uses {family}"
        );
    }
}

/// What `promtool check metrics` says about names kpr keeps as kube-proxy
/// chose them (so its dashboards and alerts work unchanged): (metric, lint).
const INHERITED_LINTS: &[(&str, &str)] = &[(
    // A gauge with a counter's suffix, as kube-proxy's.
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
    "non-counter metrics should not have \"_total\" suffix",
)];

/// `promtool check metrics` over `text` (read from stdin): the exit status
/// and the lint lines.
fn promtool_check_metrics(text: &str) -> (Option<i32>, Vec<String>) {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool: {e} (tools/setup-deps installs Debian's prometheus package)")
        });
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .expect("writing to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    (out.status.code(), lines)
}

/// `GET /metrics` with `Accept: text/plain` from kpr's metrics endpoint
/// (as `curl -H 'Accept: text/plain' | promtool check metrics` does):
/// the content type and the body.
fn scrape_text_plain(metrics: kpr::metrics::Metrics) -> (String, String) {
    use std::io::{Read, Write};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let listener = runtime
        .block_on(kpr::http::bind(
            "127.0.0.1:0".parse().expect("an address"),
            "metrics",
        ))
        .expect("a loopback port");
    let addr = listener.local_addr().expect("bound");
    let router = kpr::http::metrics_router(std::sync::Arc::new(metrics));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(kpr::http::serve(listener, "metrics", router, async move {
        let _ = stopped.await;
    }));
    let mut stream = std::net::TcpStream::connect(addr).expect("connecting");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("a timeout");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )
    .expect("sending");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("receiving");
    let _ = stop.send(());
    let _ = runtime.block_on(server);
    let (head, body) = reply.split_once("\r\n\r\n").expect("a head and a body");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .expect("a content type");
    (content_type, body.to_string())
}

#[test]
fn promtool_check_metrics_passes_on_the_text_format_but_for_kube_proxys_names() {
    let metrics = registry();
    // Samples in the histograms and counters too, not only zeros.
    metrics.observe_sync(std::time::Duration::from_millis(3));
    metrics.record_sync_result(true, std::time::SystemTime::now());
    metrics
        .kube_proxy()
        .probes()
        .count_healthz(kpr::metrics::ProbeCode::Ok);
    let (content_type, text) = scrape_text_plain(metrics);
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");

    let (code, lines) = promtool_check_metrics(&text);

    let expected: Vec<String> = INHERITED_LINTS
        .iter()
        .map(|(metric, lint)| format!("{metric} {lint}"))
        .collect();
    assert_eq!(lines, expected, "promtool's findings on\n{text}");
    // promtool exits 3 for lint findings only, 1 for a format error.
    assert_eq!(code, Some(3), "{lines:?}");
}

#[test]
fn promtool_check_metrics_rejects_the_openmetrics_text_it_cannot_read() {
    // The check above can fail: the OpenMetrics rendering, read as 0.0.4,
    // is what the endpoint served to everyone before content negotiation.
    let text = kpr::metrics::Metrics::new().encode();
    let (code, lines) = promtool_check_metrics(&text);
    assert_ne!(code, Some(0), "{lines:?}");
    // Its counter families are named without `_total`: their samples lose
    // their help and type.
    assert!(
        lines.contains(&"kpr_syncs_total no help text".to_string()),
        "{lines:?}"
    );
}
