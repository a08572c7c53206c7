//! A pinned BPF hash map used as a set (key -> 1), kept equal to a desired
//! set by the agent: the host address map and the peer device map, both
//! mirrors of something the kernel knows that the BPF programs cannot ask.
//!
//! Writes come before deletes, so a key that stays is never missing in
//! between. On an error the table re-reads the map, so the next sync
//! retries whatever is missing.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::path::Path;

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::datapath::kernel::to_io;

/// A key of a pinned set: its encoding as the map's key bytes.
pub trait SetKey: Ord + Clone + Debug {
    fn encode(&self) -> Vec<u8>;
    /// `None` for bytes that are no key of this set.
    fn decode(bytes: &[u8]) -> Option<Self>;
}

/// What one [`PinnedSet::sync`] changed.
#[derive(Debug, PartialEq, Eq)]
pub struct SetSync<K> {
    pub added: Vec<K>,
    pub removed: Vec<K>,
}

impl<K> SetSync<K> {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// The pinned map and the keys it holds.
pub struct PinnedSet<K: SetKey> {
    map: MapHandle,
    /// The map's value, all zero but a first byte of 1.
    value: Vec<u8>,
    current: BTreeSet<K>,
}

impl<K: SetKey> PinnedSet<K> {
    /// Opens the map pinned at `pin` (`what` names it in errors) and reads
    /// what it holds.
    pub fn open(pin: &Path, what: &str) -> Result<PinnedSet<K>> {
        let map = MapHandle::from_pinned_path(pin)
            .with_context(|| format!("opening the {what} map {}", pin.display()))?;
        let mut value = vec![0u8; map.value_size() as usize];
        if let Some(first) = value.first_mut() {
            *first = 1;
        }
        let mut set = PinnedSet {
            map,
            value,
            current: BTreeSet::new(),
        };
        set.reload();
        Ok(set)
    }

    fn reload(&mut self) {
        self.current = self.map.keys().filter_map(|k| K::decode(&k)).collect();
    }

    /// The map's capacity.
    pub fn capacity(&self) -> usize {
        self.map.max_entries() as usize
    }

    /// The keys the map holds.
    pub fn keys(&self) -> &BTreeSet<K> {
        &self.current
    }

    /// Makes the map hold exactly `desired`: additions first, then
    /// removals.
    pub fn sync(&mut self, desired: &BTreeSet<K>) -> Result<SetSync<K>> {
        let result = self.apply(desired);
        if result.is_err() {
            self.reload();
        }
        result
    }

    /// A key that cannot be added (the map full) does not stop the others,
    /// nor the removals, which make room for the next sync; the error
    /// names what is missing.
    fn apply(&mut self, desired: &BTreeSet<K>) -> Result<SetSync<K>> {
        let mut report = SetSync {
            added: Vec::new(),
            removed: Vec::new(),
        };
        let mut failed = None;
        for k in desired.difference(&self.current) {
            match self.map.update(&k.encode(), &self.value, MapFlags::ANY) {
                Ok(()) => report.added.push(k.clone()),
                Err(e) => {
                    failed.get_or_insert((k.clone(), to_io(e)));
                }
            }
        }
        for k in self.current.difference(desired) {
            match self.map.delete(&k.encode()) {
                Ok(()) => {}
                Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => {}
                Err(e) => return Err(to_io(e)).with_context(|| format!("removing {k:?}")),
            }
            report.removed.push(k.clone());
        }
        if let Some((k, e)) = failed {
            return Err(e).with_context(|| {
                format!(
                    "adding {k:?} ({} of {} wanted keys missing)",
                    desired.len()
                        - report.added.len()
                        - desired.intersection(&self.current).count(),
                    desired.len()
                )
            });
        }
        self.current = desired.clone();
        Ok(report)
    }
}
