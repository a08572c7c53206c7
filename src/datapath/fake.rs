//! An in-memory `LbMaps` for tests and benches without a kernel. It checks
//! the datapath's invariants after every single entry write — a connect()
//! racing with the reconciler at any point must find every slot of a
//! master present and pointing at an existing backend, a master that
//! enforces source ranges must have at least one (else it would refuse
//! every client), and a Maglev master with backends its table, every slot
//! of it an existing backend — and can be told to fail after a number of
//! entry writes to test error paths.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::datapath::maps::{
    BackendEntry, BackendId, Capacity, LbMaps, MaglevTable, MaglevTableInfo, MapError, MapName,
    ServiceId, Snapshot, SvcValue,
};
use crate::model::{Frontend, ServiceType};

#[derive(Debug, Default)]
pub struct FakeMaps {
    pub services: BTreeMap<(Frontend, u16), SvcValue>,
    pub backends: BTreeMap<BackendId, BackendEntry>,
    /// (svc_id, client) -> backend id.
    pub affinity: BTreeMap<(ServiceId, u64), BackendId>,
    /// (svc_id, allowed prefix).
    pub source_ranges: BTreeSet<(ServiceId, IpNet)>,
    /// svc_id -> Maglev table.
    pub maglev: BTreeMap<ServiceId, MaglevTable>,
    /// ClusterIPs with a port-reject entry (in the services map).
    pub port_rejects: BTreeSet<IpAddr>,
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
        s.maglev = self
            .maglev
            .iter()
            .map(|(id, t)| (*id, MaglevTableInfo::of(t)))
            .collect();
        s.port_rejects = self.port_rejects.clone();
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

    /// The frontend id and backend count of every Maglev master.
    fn maglev_masters(&self) -> Vec<(Frontend, ServiceId, u32)> {
        self.services
            .iter()
            .filter_map(|((fe, _), v)| match v {
                SvcValue::Master(m) if m.options.maglev => Some((*fe, m.svc_id, m.count)),
                _ => None,
            })
            .collect()
    }

    /// A Maglev master with backends needs its table, every slot of it an
    /// existing backend.
    fn check_maglev(&mut self, fe: &Frontend, svc_id: ServiceId, count: u32, when: &str) {
        if count == 0 {
            return;
        }
        let problem = match self.maglev.get(&svc_id) {
            None => Some(format!("{fe:?} is Maglev but table {svc_id} is missing")),
            Some(t) if t.is_empty() => Some(format!("{fe:?} has an empty Maglev table")),
            Some(t) => t
                .iter()
                .find(|id| !self.backends.contains_key(id))
                .map(|id| format!("{fe:?} Maglev table -> missing backend {id}")),
        };
        if let Some(p) = problem {
            self.violations.push(format!("{when}: {p}"));
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
        if let Some(SvcValue::Master(m)) = self.services.get(&(*fe, 0)).copied() {
            if m.options.maglev {
                self.check_maglev(fe, m.svc_id, m.count, when);
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
            maglev: 1 << 20,
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
            let in_tables: Vec<ServiceId> = self
                .maglev
                .iter()
                .filter(|(_, t)| t.contains(id))
                .map(|(svc_id, _)| *svc_id)
                .collect();
            for (fe, svc_id, count) in self.maglev_masters() {
                if in_tables.contains(&svc_id) {
                    self.check_maglev(&fe, svc_id, count, "delete backend");
                }
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
            if !self.services.contains_key(&key)
                && self.services.len() + self.port_rejects.len() >= self.capacity().services
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

    fn put_port_rejects(&mut self, ips: &[IpAddr]) -> Result<(), MapError> {
        for ip in ips {
            self.write(MapName::Services, "update")?;
            if !self.port_rejects.contains(ip)
                && self.services.len() + self.port_rejects.len() >= self.capacity().services
            {
                return Err(MapError::new(
                    "update",
                    MapName::Services,
                    io::Error::from_raw_os_error(libc::E2BIG),
                ));
            }
            // Written after the frontends it guards: a port about to be
            // served must never be refused.
            let served = self.services.iter().any(|((fe, slot), v)| {
                *slot == 0
                    && fe.addr.ip == *ip
                    && matches!(v, SvcValue::Master(m) if m.svc_type == ServiceType::ClusterIP)
            });
            if !served {
                self.violations
                    .push(format!("put port reject: {ip} has no ClusterIP frontend"));
            }
            self.port_rejects.insert(*ip);
        }
        Ok(())
    }

    fn delete_port_rejects(&mut self, ips: &[IpAddr]) -> Result<(), MapError> {
        for ip in ips {
            self.write(MapName::Services, "delete")?;
            self.port_rejects.remove(ip);
        }
        Ok(())
    }

    fn put_maglev_tables(&mut self, tables: &[(ServiceId, MaglevTable)]) -> Result<(), MapError> {
        for (svc_id, table) in tables {
            self.write(MapName::Maglev, "update")?;
            if !self.maglev.contains_key(svc_id) && self.maglev.len() >= self.capacity().maglev {
                return Err(MapError::new(
                    "update",
                    MapName::Maglev,
                    io::Error::from_raw_os_error(libc::E2BIG),
                ));
            }
            if let Some(id) = table.iter().find(|id| !self.backends.contains_key(id)) {
                self.violations.push(format!(
                    "put Maglev table: table {svc_id} -> missing backend {id}"
                ));
            }
            self.maglev.insert(*svc_id, table.clone());
        }
        Ok(())
    }

    fn delete_maglev_tables(&mut self, ids: &[ServiceId]) -> Result<(), MapError> {
        for svc_id in ids {
            self.write(MapName::Maglev, "delete")?;
            self.maglev.remove(svc_id);
            for (fe, id, count) in self.maglev_masters() {
                if id == *svc_id {
                    self.check_maglev(&fe, id, count, "delete Maglev table");
                }
            }
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
