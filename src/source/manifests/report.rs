//! What a reload reports: the skips and read errors to count, the work
//! done, and the log lines for them (bounded, one summary for ignored kinds).

use super::files::ReadError;
use super::SkippedDocument;
use crate::skip::SkipReason;

/// Skipped documents logged one by one per reload, before a summary line.
const MAX_LOGGED_SKIPS: usize = 20;

/// What one reload did; skips and errors are new ones, to count.
#[derive(Debug, Default)]
pub struct ReloadReport {
    /// Documents (or files) skipped in this reload, in the order met.
    pub skipped: Vec<SkippedDocument>,
    /// Read failures in this reload (a failing path counts on every try).
    pub read_errors: Vec<ReadError>,
    /// Files read, and documents parsed or reused from their last read.
    pub files_read: usize,
    pub documents_parsed: usize,
    pub documents_reused: usize,
}

/// Logs a reload's skips: each one up to a bound, then a count; documents
/// of kinds kpr does not read only as one summary line.
pub fn log_report(report: &ReloadReport) {
    let (ignored, skipped): (Vec<&SkippedDocument>, Vec<&SkippedDocument>) = report
        .skipped
        .iter()
        .filter(|s| s.reason != SkipReason::Unreadable)
        .partition(|s| s.reason == SkipReason::UnsupportedKind);
    for s in skipped.iter().take(MAX_LOGGED_SKIPS) {
        tracing::warn!(file = ?s.file, document = s.index, reason = %s.reason, detail = %s.detail, "manifest skipped");
    }
    if skipped.len() > MAX_LOGGED_SKIPS {
        tracing::warn!(
            more = skipped.len() - MAX_LOGGED_SKIPS,
            "more manifest documents skipped (counted in kpr_skipped_objects_total)"
        );
    }
    if let Some(first) = ignored.first() {
        tracing::info!(documents = ignored.len(), first_file = ?first.file, first_document = first.index, first = %first.detail, "manifest documents of kinds kpr does not read were ignored");
    }
}
