//! An in-memory `LbMaps` for tests and benches without a kernel. It checks
//! the datapath's invariants after every single entry write — a connect()
//! racing with the reconciler at any point must find every slot of a
//! master present and pointing at an existing backend, and a master that
//! enforces source ranges must have at least one (else it would refuse
//! every client) — and can be told to fail after a number of entry writes
//! to test error paths.

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use ipnet::IpNet;

use crate::datapath::maps::{
    BackendEntry, BackendId, Capacity, LbMaps, MapError, MapName, ServiceId, Snapshot, SvcValue,
};
use crate::model::Frontend;

#[derive(Debug, Default)]
pub struct FakeMaps {
    pub services: BTreeMap<(Frontend, u16), SvcValue>,
    pub backends: BTreeMap<BackendId, BackendEntry>,
    /// (svc_id, client) -> backend id.
    pub affinity: BTreeMap<(ServiceId, u64), BackendId>,
    /// (svc_id, allowed prefix).
    pub source_ranges: BTreeSet<(ServiceId, IpNet)>,
    capacity: Option<Capacity>,
    /// Entry writes left before every write fails with EIO; None = never.
    pub fail_after_writes: Option<usize>,
    /// Invariant violations seen, in order.
    pub violations: Vec<String>,
    /// Entry writes performed (puts and deletes).
    pub writes: usize,
}

impl FakeMaps {
    pub fn new() -> FakeMaps {
        FakeMaps::default()
    }

    pub fn with_capacity(capacity: Capacity) -> FakeMaps {
        FakeMaps {
            capacity: Some(capacity),
            ..Default::default()
        }
    }

    /// The maps' content (the `LbMaps::snapshot` of a fake never fails).
    pub fn snapshot_for_tests(&self) -> Snapshot {
        let mut s = Snapshot::from_entries(
            self.services.iter().map(|((fe, slot), v)| (*fe, *slot, *v)),
            self.backends.clone(),
        );
        for (id, net) in &self.source_ranges {
            s.source_ranges.entry(*id).or_default().insert(*net);
        }
        s
    }

    /// Records a master that enforces source ranges while it has none.
    fn check_source_ranges(&mut self, svc_id: ServiceId, when: &str) {
        let enforcing = self
            .services
            .values()
            .any(|v| matches!(v, SvcValue::Master(m) if m.svc_id == svc_id && m.source_ranges));
        let has_any = self.source_ranges.iter().any(|(id, _)| *id == svc_id);
        if enforcing && !has_any {
            self.violations.push(format!(
                "{when}: frontend id {svc_id} enforces source ranges but has none"
            ));
        }
    }

    fn write(&mut self, map: MapName, op: &'static str) -> Result<(), MapError> {
        if let Some(left) = self.fail_after_writes.as_mut() {
            if *left == 0 {
                return Err(MapError::new(
                    op,
                    map,
                    io::Error::from_raw_os_error(libc::EIO),
                ));
            }
            *left -= 1;
        }
        self.writes += 1;
        Ok(())
    }

    fn master(&self, fe: &Frontend) -> Option<u32> {
        match self.services.get(&(*fe, 0)) {
            Some(SvcValue::Master(m)) => Some(m.count),
            _ => None,
        }
    }

    fn check_frontend(&mut self, fe: &Frontend, when: &str) {
        if let Some(SvcValue::Master(m)) = self.services.get(&(*fe, 0)) {
            let internal = Frontend {
                scope: crate::model::Scope::Internal,
                ..*fe
            };
            if m.options.has_internal_scope
                && !matches!(self.services.get(&(internal, 0)), Some(SvcValue::Master(_)))
            {
                self.violations.push(format!(
                    "{when}: {fe:?} points at a missing internal-scope master"
                ));
            }
        }
        let Some(count) = self.master(fe) else { return };
        for slot in 1..=count as u16 {
            match self.services.get(&(*fe, slot)) {
                Some(SvcValue::Slot { backend_id, .. })
                    if self.backends.contains_key(backend_id) => {}
                Some(SvcValue::Slot { backend_id, .. }) => self.violations.push(format!(
                    "{when}: {fe:?} slot {slot} -> missing backend {backend_id}"
                )),
                _ => self
                    .violations
                    .push(format!("{when}: {fe:?} slot {slot} missing")),
            }
        }
    }
}

impl LbMaps for FakeMaps {
    fn capacity(&self) -> Capacity {
        self.capacity.unwrap_or(Capacity {
            services: 1 << 20,
            backends: 1 << 20,
            source_ranges: 1 << 20,
        })
    }

    fn snapshot(&self) -> Result<Snapshot, MapError> {
        Ok(self.snapshot_for_tests())
    }

    fn put_backends(&mut self, entries: &[(BackendId, BackendEntry)]) -> Result<(), MapError> {
        for (id, entry) in entries {
            self.write(MapName::Backends, "update")?;
            if !self.backends.contains_key(id) && self.backends.len() >= self.capacity().backends {
                return Err(MapError::new(
                    "update",
                    MapName::Backends,
                    io::Error::from_raw_os_error(libc::E2BIG),
                ));
            }
            self.backends.insert(*id, *entry);
        }
        Ok(())
    }

    fn delete_backends(&mut self, ids: &[BackendId]) -> Result<(), MapError> {
        for id in ids {
            self.write(MapName::Backends, "delete")?;
            self.backends.remove(id);
            let referencing: Vec<Frontend> = self
                .services
                .iter()
                .filter(|(_, v)| matches!(v, SvcValue::Slot { backend_id, .. } if backend_id == id))
                .map(|((fe, _), _)| *fe)
                .collect();
            for fe in referencing {
                self.check_frontend(&fe, "delete backend");
            }
        }
        Ok(())
    }

    fn put_service_entries(
        &mut self,
        entries: &[(Frontend, u16, SvcValue)],
    ) -> Result<(), MapError> {
        for (fe, slot, value) in entries {
            self.write(MapName::Services, "update")?;
            let key = (*fe, *slot);
            if !self.services.contains_key(&key) && self.services.len() >= self.capacity().services
            {
                return Err(MapError::new(
                    "update",
                    MapName::Services,
                    io::Error::from_raw_os_error(libc::E2BIG),
                ));
            }
            self.services.insert(key, *value);
            self.check_frontend(fe, "put service entry");
            if let SvcValue::Master(m) = value {
                self.check_source_ranges(m.svc_id, "put master");
            }
        }
        Ok(())
    }

    fn put_source_ranges(&mut self, entries: &[(ServiceId, IpNet)]) -> Result<(), MapError> {
        for entry in entries {
            self.write(MapName::SourceRanges, "update")?;
            if !self.source_ranges.contains(entry)
                && self.source_ranges.len() >= self.capacity().source_ranges
            {
                return Err(MapError::new(
                    "update",
                    MapName::SourceRanges,
                    io::Error::from_raw_os_error(libc::E2BIG),
                ));
            }
            self.source_ranges.insert(*entry);
        }
        Ok(())
    }

    fn delete_source_ranges(&mut self, entries: &[(ServiceId, IpNet)]) -> Result<(), MapError> {
        for entry in entries {
            self.write(MapName::SourceRanges, "delete")?;
            self.source_ranges.remove(entry);
            self.check_source_ranges(entry.0, "delete source range");
        }
        Ok(())
    }

    fn delete_service_entries(&mut self, keys: &[(Frontend, u16)]) -> Result<(), MapError> {
        for key in keys {
            self.write(MapName::Services, "delete")?;
            self.services.remove(key);
            self.check_frontend(&key.0, "delete service entry");
        }
        Ok(())
    }

    fn prune_affinity(
        &mut self,
        keep: &mut dyn FnMut(ServiceId, BackendId) -> bool,
    ) -> Result<usize, MapError> {
        let before = self.affinity.len();
        self.affinity
            .retain(|(svc_id, _), backend| keep(*svc_id, *backend));
        Ok(before - self.affinity.len())
    }
}
