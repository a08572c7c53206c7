//! Conntrack garbage collection for the north-south datapath: the BPF
//! programs only create and refresh entries, so the agent removes expired
//! ones periodically, and publishes the conntrack fill and the datapath's
//! counters on the same pass.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::datapath::ct::{monotonic_ns, CtMap, NodePortStats};
use crate::metrics::{MapLabel, Metrics};

/// Removes expired conntrack entries every `interval` and publishes the
/// conntrack fill and the datapath's counters, until `stop` resolves.
///
/// Only expired entries go: a flow's entries share one expiry, so pairs
/// leave together, and a restarted agent never drops live flows (the
/// lesson of cilium#29667).
pub(super) async fn run(
    bpf_root: PathBuf,
    interval: Duration,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => return,
        }
        let root = bpf_root.clone();
        let pass = tokio::task::spawn_blocking(move || {
            let ct = CtMap::open(&root)?;
            let report = ct.gc(monotonic_ns())?;
            let stats = NodePortStats::read(&root)?;
            anyhow::Ok((report, ct.max_entries(), stats))
        })
        .await;
        match pass {
            Ok(Ok((report, capacity, stats))) => {
                metrics.record_ct_gc(report.deleted, report.alive);
                metrics.set_map(MapLabel::Conntrack, report.alive, capacity);
                for (event, n) in stats.events() {
                    metrics.set_nodeport_event(event, n);
                }
                if report.deleted > 0 {
                    tracing::debug!(
                        deleted = report.deleted,
                        alive = report.alive,
                        "conntrack GC"
                    );
                }
            }
            Ok(Err(e)) => {
                metrics.record_ct_gc_failure();
                tracing::warn!(error = %format!("{e:#}"), "conntrack GC failed");
            }
            Err(e) => {
                metrics.record_ct_gc_failure();
                tracing::warn!(error = %e, "conntrack GC task failed");
            }
        }
    }
}
