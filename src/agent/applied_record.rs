//! Keeps the agent's record of what it applied (`crate::applied_state`)
//! in step with the maps: written after a sync that changed them, once the
//! source has been read completely; a record that takes 5 ms or more to
//! write (tens of thousands of Services) at most once per 20 times its
//! write time, a change that comes sooner being written by the next sync
//! after it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::applied_state::{self, AppliedState};
use crate::datapath::kernel::KernelMaps;
use crate::reconcile::Reconciler;

/// Least time between two writes, as a multiple of the last write's time,
/// once a write takes [`SPACED_FROM`] or more.
const SPACING: u32 = 20;
const SPACED_FROM: Duration = Duration::from_millis(5);

pub(super) struct AppliedRecord {
    path: PathBuf,
    /// The maps or the refusals changed since the last write (true at
    /// start: the record may be a previous agent's).
    dirty: bool,
    /// No write before this.
    not_before: Instant,
    /// The refused Services of the last write.
    refused: Vec<String>,
}

impl AppliedRecord {
    pub(super) fn new(bpf_root: &Path) -> AppliedRecord {
        AppliedRecord {
            path: applied_state::path_for(bpf_root),
            dirty: true,
            not_before: Instant::now(),
            refused: Vec::new(),
        }
    }

    /// After a sync: `changed` says it wrote the maps, `filled` that the
    /// maps hold a complete read of the source; `refused` are the Services
    /// not programmed now. Writes the record when it is due.
    pub(super) fn after_sync(
        &mut self,
        reconciler: &Reconciler<KernelMaps>,
        changed: bool,
        filled: bool,
        refused: Vec<String>,
    ) {
        self.dirty |= changed || refused != self.refused;
        if !self.dirty || !filled || Instant::now() < self.not_before {
            return;
        }
        let started = Instant::now();
        let state = AppliedState::new(
            reconciler.applied_frontends(),
            refused.clone(),
            reconciler.maglev_params(),
        );
        match applied_state::write(&self.path, &state) {
            Ok(()) => {
                self.dirty = false;
                self.refused = refused;
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "record of the applied state not written; svc list may lack names")
            }
        }
        // A small record costs nothing worth spacing: written every time.
        let took = started.elapsed();
        if took >= SPACED_FROM {
            self.not_before =
                Instant::now() + took.saturating_mul(SPACING).min(Duration::from_secs(10));
        }
    }
}
