//! The socket hooks' counters (kpr_sockstats_v1) published as metrics every
//! [`PERIOD`], as the conntrack GC publishes the north-south ones.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::datapath::counters::SocketStats;
use crate::metrics::Metrics;

/// How often the counters are read.
const PERIOD: Duration = Duration::from_secs(2);

/// Reads the socket hooks' counters into `metrics` until `stop` resolves.
pub(super) async fn run(
    bpf_root: PathBuf,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(PERIOD);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => return,
        }
        let root = bpf_root.clone();
        match tokio::task::spawn_blocking(move || SocketStats::read(&root)).await {
            Ok(Ok(stats)) => metrics.set_socket_source_range_drops(stats.drop_source_range),
            // The pins restored under the agent, or a kpr cleanup: the next
            // pass reads them again; the pin watch reports what lasts.
            Ok(Err(e)) => tracing::debug!(error = %format!("{e:#}"), "reading the socket counters"),
            Err(e) => tracing::debug!(error = %e, "reading the socket counters"),
        }
    }
}
