//! A sync as an event of the web view's live tail (`crate::web_ui::feed`):
//! one JSON line, `"kind":"sync"`, with what it did.

use std::time::Duration;

use crate::reconcile::SyncOutcome;

/// The line of a sync that took `elapsed`; `outcome` None: it failed.
pub(super) fn line(elapsed: Duration, outcome: Option<&SyncOutcome>) -> String {
    let elapsed_us = elapsed.as_micros() as u64;
    match outcome {
        Some(o) => serde_json::json!({
            "kind": "sync",
            "result": "ok",
            "services": o.applied_services,
            "writes": o.writes,
            "pruned_frontends": o.pruned_frontends,
            "refused": o.refused.iter().map(|r| r.service.clone()).collect::<Vec<_>>(),
            "elapsed_us": elapsed_us,
        }),
        None => serde_json::json!({
            "kind": "sync",
            "result": "failed",
            "elapsed_us": elapsed_us,
        }),
    }
    .to_string()
}
