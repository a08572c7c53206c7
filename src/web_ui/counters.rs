//! The live counters of the page: every `kpr_*` sample of the metrics
//! registry that carries a `service` or `frontend` label, whatever its
//! family (per-frontend verdicts, packets, bytes ... as the datapath's
//! counters define them), read from the registry's own exposition so the
//! page shows exactly what Prometheus scrapes.

use std::collections::BTreeMap;

use serde::Serialize;

/// One sample.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// The metric name as exposed (`kpr_..._total`).
    pub family: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The per-Service and per-frontend samples of a Prometheus text exposition.
pub fn per_frontend(exposition: &str) -> Vec<Sample> {
    exposition
        .lines()
        .filter(|l| l.starts_with("kpr_"))
        .filter_map(parse_line)
        .filter(|s| s.labels.contains_key("service") || s.labels.contains_key("frontend"))
        .collect()
}

/// `name{a="x",b="y"} value`; None for anything else.
fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = line.split_once('{')?;
    let (labels, value) = rest.rsplit_once('}')?;
    let value: f64 = value.split_whitespace().next()?.parse().ok()?;
    let mut map = BTreeMap::new();
    let mut rest = labels;
    while let Some((key, after)) = rest.split_once("=\"") {
        // Values escape `"` and `\` with a backslash.
        let mut val = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = Some(i);
                    break;
                }
                c => val.push(c),
            }
        }
        map.insert(key.trim_start_matches(',').trim().to_string(), val);
        rest = &after[end? + 1..];
    }
    Some(Sample {
        family: name.to_string(),
        labels: map,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_samples_labelled_by_service_or_frontend_are_kept() {
        let text = "# HELP kpr_x_total x\n\
                    kpr_x_total{service=\"t/web:http\",verdict=\"translated\"} 20\n\
                    kpr_y_total{frontend=\"10.96.0.10:80/TCP\"} 3\n\
                    kpr_sync_total{result=\"ok\"} 5\n\
                    kpr_frontends 2\n";
        let got = per_frontend(text);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].labels["service"], "t/web:http");
        assert_eq!(got[0].labels["verdict"], "translated");
        assert_eq!(got[0].value, 20.0);
        assert_eq!(got[1].labels["frontend"], "10.96.0.10:80/TCP");
    }

    #[test]
    fn escaped_quotes_in_a_label_value_do_not_end_it() {
        let s = parse_line(r#"kpr_z{service="a\"b",frontend="f"} 1"#).unwrap();
        assert_eq!(s.labels["service"], "a\"b");
        assert_eq!(s.labels["frontend"], "f");
    }
}
