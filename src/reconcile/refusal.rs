//! Why a Service, or one of its frontends, was not programmed. A refused
//! Service keeps what the maps held for it before.

use std::fmt;

use super::MAX_SLOTS;
use crate::datapath::maps::MapName;
use crate::maglev::MaglevError;
use crate::model::Frontend;

/// Why a Service (or one of its frontends) was not programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// Programming it would overflow a map.
    Capacity {
        map: MapName,
        needed: usize,
        free: usize,
        capacity: usize,
    },
    /// Another Service already owns this frontend.
    FrontendConflict { frontend: Frontend, owner: String },
    /// No free backend or frontend id.
    IdsExhausted,
    /// More backends behind one frontend than slots can number.
    TooManyBackends { frontend: Frontend, backends: usize },
    /// The frontend's Maglev table cannot be built (more backends than
    /// the table has slots).
    Maglev {
        frontend: Frontend,
        error: MaglevError,
    },
}

/// A Service that was not (fully) programmed; its previous state stays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub service: String,
    pub reason: RefusalReason,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            RefusalReason::Capacity {
                map,
                needed,
                free,
                capacity,
            } => write!(
                f,
                "service {} not programmed: it needs {needed} more entries in BPF map {map} \
                 but only {free} of {capacity} are free; its previous state is kept \
                 (raise the map size or remove services)",
                self.service
            ),
            RefusalReason::FrontendConflict { frontend, owner } => write!(
                f,
                "service {}: frontend {} is already programmed for service {owner}; skipped",
                self.service, frontend.addr
            ),
            RefusalReason::TooManyBackends { frontend, backends } => write!(
                f,
                "service {}: frontend {} has {backends} backends, more than the {MAX_SLOTS} slots a frontend can hold; skipped",
                self.service, frontend.addr
            ),
            RefusalReason::Maglev { frontend, error } => write!(
                f,
                "service {}: frontend {} not programmed: {error}",
                self.service, frontend.addr
            ),
            RefusalReason::IdsExhausted => {
                write!(
                    f,
                    "service {} not programmed: no free backend or frontend id",
                    self.service
                )
            }
        }
    }
}
