//! The two text formats `/metrics` speaks and how a scraper's `Accept`
//! header picks one: OpenMetrics 1.0 for clients that ask for it (Prometheus
//! does, first), the Prometheus text format 0.0.4 otherwise (what Go's
//! client serves by default, and what `promtool check metrics`, curl and
//! older scrapers read).

use prometheus_client::encoding::{prometheus_text, text};

use super::Metrics;

/// An exposition format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text: counters' families without `_total`, `# UNIT`
    /// lines, ending in `# EOF`.
    OpenMetrics,
    /// The Prometheus text format 0.0.4: counters named with `_total` in
    /// `# HELP`/`# TYPE` too, no `# UNIT`, no `# EOF`.
    PrometheusText,
}

/// The content type of [`Format::OpenMetrics`].
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of [`Format::PrometheusText`].
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

impl Format {
    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Format::PrometheusText => PROMETHEUS_TEXT_CONTENT_TYPE,
        }
    }

    /// The format for a request with this `Accept` header: the one of the
    /// two with the higher quality (`q`, default 1), OpenMetrics on a tie;
    /// the Prometheus text format when the header names neither (or is
    /// absent, `*/*`, unparsable).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let mut openmetrics: Option<f32> = None;
        let mut text: Option<f32> = None;
        for range in accept.unwrap_or_default().split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, v)| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            let slot = match media.as_str() {
                "application/openmetrics-text" => &mut openmetrics,
                "text/plain" => &mut text,
                _ => continue,
            };
            *slot = Some(slot.map_or(q, |old| old.max(q)));
        }
        match (openmetrics, text) {
            (Some(om), text) if om > 0.0 && om >= text.unwrap_or(0.0) => Format::OpenMetrics,
            _ => Format::PrometheusText,
        }
    }
}

impl Metrics {
    /// The registry in the OpenMetrics text format, ending in `# EOF`.
    pub fn encode(&self) -> String {
        self.render(Format::OpenMetrics)
    }

    /// The registry in `format`.
    ///
    /// Encoding into a `String` cannot fail with these label types; should it
    /// anyway, the error is logged and an empty exposition returned rather
    /// than a truncated one.
    pub fn render(&self, format: Format) -> String {
        let mut out = String::new();
        let encoded = match format {
            Format::OpenMetrics => text::encode(&mut out, &self.registry),
            Format::PrometheusText => prometheus_text::encode(&mut out, &self.registry),
        };
        if let Err(e) = encoded {
            tracing::error!(error = %e, "encoding metrics");
            out.clear();
            if format == Format::OpenMetrics {
                out.push_str("# EOF\n");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_scrape_header_gets_openmetrics_and_text_plain_gets_text() {
        // What Prometheus 2.x/3.x sends by default.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(
            Format::negotiate(Some("text/plain")),
            Format::PrometheusText
        );
        assert_eq!(
            Format::negotiate(Some(
                "text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.5"
            )),
            Format::PrometheusText
        );
        assert_eq!(
            Format::negotiate(Some("Application/OpenMetrics-Text; version=1.0.0")),
            Format::OpenMetrics
        );
    }

    #[test]
    fn no_usable_accept_header_gets_the_prometheus_text_format() {
        for accept in [
            None,
            Some(""),
            Some("*/*"),
            Some("application/json"),
            Some(";;,"),
        ] {
            assert_eq!(
                Format::negotiate(accept),
                Format::PrometheusText,
                "{accept:?}"
            );
        }
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Format::PrometheusText,
            "q=0 refuses it"
        );
    }

    #[test]
    fn content_types_name_the_version() {
        assert_eq!(
            Format::PrometheusText.content_type(),
            "text/plain; version=0.0.4; charset=utf-8"
        );
        assert_eq!(
            Format::OpenMetrics.content_type(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
    }
}
