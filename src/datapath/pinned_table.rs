//! A pinned BPF hash map kept equal to a desired table by the agent —
//! "desired set vs pinned map" — for every map the agent derives from
//! something else: the host addresses, the pods' devices (sets: key -> 1)
//! and the DSR map (key -> backend id).
//!
//! Writes (new and changed entries) come before deletes, so an entry that
//! stays is never missing in between. An entry that cannot be written
//! (the map full) does not stop the others, nor the deletes, which make
//! room for the next sync; the error names what is missing. On an error
//! the table re-reads the map, so the next sync retries whatever is
//! missing. Entries kpr never writes (undecodable) are removed on reading.

#![deny(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::Path;

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::datapath::pins::{self, MapName};
use crate::datapath::sys::to_io;

/// A key of a pinned table: its encoding as the map's key bytes.
pub trait TableKey: Ord + Clone + Debug {
    fn encode(&self) -> Vec<u8>;
    /// `None` for bytes that are no key of this table.
    fn decode(bytes: &[u8]) -> Option<Self>;
}

/// A value of a pinned table: its encoding as the map's value bytes
/// (`size` of them).
pub trait TableValue: PartialEq + Clone + Debug {
    fn encode(&self, size: usize) -> Vec<u8>;
    /// `None` for bytes that are no value of this table.
    fn decode(bytes: &[u8]) -> Option<Self>;
}

/// The value of a set's entries: all zero but a first byte of 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Present;

impl TableValue for Present {
    fn encode(&self, size: usize) -> Vec<u8> {
        let mut v = vec![0u8; size];
        if let Some(first) = v.first_mut() {
            *first = 1;
        }
        v
    }

    fn decode(_: &[u8]) -> Option<Present> {
        Some(Present)
    }
}

/// A `__u32` value, native order.
impl TableValue for u32 {
    fn encode(&self, _: usize) -> Vec<u8> {
        self.to_ne_bytes().to_vec()
    }

    fn decode(bytes: &[u8]) -> Option<u32> {
        Some(u32::from_ne_bytes(bytes.try_into().ok()?))
    }
}

/// What one [`PinnedTable::sync`] changed.
#[derive(Debug, PartialEq, Eq)]
pub struct SetSync<K> {
    /// Keys written: new, or with a changed value.
    pub added: Vec<K>,
    pub removed: Vec<K>,
}

impl<K> SetSync<K> {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// What a table should hold: a map, or a set (every value [`Present`]).
pub trait Desired<K, V> {
    fn entries(&self) -> BTreeMap<K, V>;
}

impl<K: TableKey, V: TableValue> Desired<K, V> for BTreeMap<K, V> {
    fn entries(&self) -> BTreeMap<K, V> {
        self.clone()
    }
}

impl<K: TableKey> Desired<K, Present> for BTreeSet<K> {
    fn entries(&self) -> BTreeMap<K, Present> {
        self.iter().map(|k| (k.clone(), Present)).collect()
    }
}

/// The pinned map and the entries it holds.
pub struct PinnedTable<K: TableKey, V: TableValue> {
    map: MapHandle,
    name: MapName,
    current: BTreeMap<K, V>,
}

/// A pinned table used as a set.
pub type PinnedSet<K> = PinnedTable<K, Present>;

impl<K: TableKey, V: TableValue> PinnedTable<K, V> {
    /// Opens `name`'s map pinned under `bpf_root` and reads what it holds.
    pub fn open(bpf_root: &Path, name: MapName) -> Result<PinnedTable<K, V>> {
        let pin = pins::pin_path(bpf_root, name);
        let map = MapHandle::from_pinned_path(&pin)
            .with_context(|| format!("opening the {name} map {}", pin.display()))?;
        let mut table = PinnedTable {
            map,
            name,
            current: BTreeMap::new(),
        };
        table.reload()?;
        Ok(table)
    }

    fn reload(&mut self) -> Result<()> {
        let mut current = BTreeMap::new();
        for key in self.map.keys() {
            // An entry deleted between the key walk and the lookup is skipped.
            let value = self
                .map
                .lookup(&key, MapFlags::ANY)
                .map_err(to_io)
                .with_context(|| format!("reading the {} map", self.name))?;
            let Some(value) = value else { continue };
            match K::decode(&key).zip(V::decode(&value)) {
                Some((k, v)) => {
                    current.insert(k, v);
                }
                // Not one kpr writes: removed.
                None => self
                    .map
                    .delete(&key)
                    .map_err(to_io)
                    .with_context(|| format!("removing a malformed {} entry", self.name))?,
            }
        }
        self.current = current;
        Ok(())
    }

    /// The map's capacity.
    pub fn capacity(&self) -> usize {
        self.map.max_entries() as usize
    }

    /// The entries the map holds.
    pub fn entries(&self) -> &BTreeMap<K, V> {
        &self.current
    }

    /// Entries the map holds.
    pub fn len(&self) -> usize {
        self.current.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    /// Makes the map hold exactly `desired`: writes first, then deletes.
    pub fn sync(&mut self, desired: &impl Desired<K, V>) -> Result<SetSync<K>> {
        let desired = desired.entries();
        let result = self.apply(&desired);
        if result.is_err() {
            self.reload()?;
        }
        result
    }

    fn apply(&mut self, desired: &BTreeMap<K, V>) -> Result<SetSync<K>> {
        let mut report = SetSync {
            added: Vec::new(),
            removed: Vec::new(),
        };
        let value_size = self.map.value_size() as usize;
        let mut failed = None;
        for (k, v) in desired {
            if self.current.get(k) == Some(v) {
                continue;
            }
            match self
                .map
                .update(&k.encode(), &v.encode(value_size), MapFlags::ANY)
            {
                Ok(()) => report.added.push(k.clone()),
                Err(e) => {
                    failed.get_or_insert((k.clone(), to_io(e)));
                }
            }
        }
        let stale: Vec<K> = self
            .current
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        for k in stale {
            match self.map.delete(&k.encode()) {
                Ok(()) => {}
                Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(to_io(e))
                        .with_context(|| format!("removing {k:?} from the {} map", self.name))
                }
            }
            report.removed.push(k);
        }
        if let Some((k, e)) = failed {
            let missing = desired
                .iter()
                .filter(|(k, v)| self.current.get(*k) != Some(*v) && !report.added.contains(*k))
                .count();
            return Err(e).with_context(|| {
                format!(
                    "adding {k:?} to the {} map ({missing} of {} wanted entries missing, capacity {})",
                    self.name,
                    desired.len(),
                    self.capacity()
                )
            });
        }
        self.current = desired.clone();
        Ok(report)
    }
}

impl<K: TableKey> PinnedTable<K, Present> {
    /// The keys the set holds.
    pub fn keys(&self) -> BTreeSet<K> {
        self.current.keys().cloned().collect()
    }
}
