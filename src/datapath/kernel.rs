//! `LbMaps` on the pinned BPF maps. Writes go through batch syscalls, one
//! per ordered step of a plan, so a full sync of 100k entries costs a few
//! syscalls per thousand entries instead of one per entry.

#![deny(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use ipnet::IpNet;
use libbpf_rs::{ErrorKind, MapCore, MapFlags, MapHandle, MapType};

use crate::datapath::layout;
use crate::datapath::maps::{
    BackendEntry, BackendId, Capacity, LbMaps, MaglevTable, MaglevTableInfo, MapError, MapName,
    ServiceId, Snapshot, SvcValue,
};
use crate::datapath::pins;
use crate::datapath::skel::sock_lb::types::{
    lb_affinity_key, lb_affinity_val, lb_backend, lb_srcrange_key, lb_svc_key, lb_svc_val,
};
use crate::datapath::sys::{as_bytes, from_bytes, to_io, Pod};
use crate::model::Frontend;

/// Handles on the pinned load-balancer maps.
pub struct KernelMaps {
    services: MapHandle,
    backends: MapHandle,
    affinity: MapHandle,
    sock_revnat: MapHandle,
    source_ranges: MapHandle,
    /// Hash of maps: frontend id -> Maglev table (an array map).
    maglev: MapHandle,
}

/// Name of the Maglev tables (inner maps), as `bpftool map` shows them.
const MAGLEV_TABLE_NAME: &str = "kpr_maglev_tbl";

impl KernelMaps {
    /// Opens the maps pinned under `bpf_root` (see `pins::pin_path`).
    pub fn open(bpf_root: &Path) -> Result<KernelMaps, MapError> {
        let open = |name: MapName| {
            let path = pins::pin_path(bpf_root, name);
            MapHandle::from_pinned_path(&path).map_err(|e| {
                MapError::new(
                    "open",
                    name,
                    io::Error::new(
                        to_io(e).kind(),
                        format!("{}: not pinned or unreadable", path.display()),
                    ),
                )
            })
        };
        Ok(KernelMaps {
            services: open(MapName::Services)?,
            backends: open(MapName::Backends)?,
            affinity: open(MapName::Affinity)?,
            sock_revnat: open(MapName::SockRevNat)?,
            source_ranges: open(MapName::SourceRanges)?,
            maglev: open(MapName::Maglev)?,
        })
    }

    /// The handle of one of [`MapName::LOAD_BALANCER`]; None for the others.
    fn handle(&self, name: MapName) -> Option<&MapHandle> {
        match name {
            MapName::Services => Some(&self.services),
            MapName::Backends => Some(&self.backends),
            MapName::Affinity => Some(&self.affinity),
            MapName::SockRevNat => Some(&self.sock_revnat),
            MapName::SourceRanges => Some(&self.source_ranges),
            MapName::Maglev => Some(&self.maglev),
            MapName::HostAddresses
            | MapName::Conntrack
            | MapName::Dsr
            | MapName::PeerDevices
            | MapName::NodePortStats
            | MapName::Fragments
            | MapName::SocketStats
            | MapName::FrontendStats
            | MapName::BackendStats
            | MapName::Events
            | MapName::MonitorControl
            | MapName::MonitorStats => None,
        }
    }

    /// The handle of a load-balancer map, for the operations below.
    fn lb(&self, name: MapName) -> Result<&MapHandle, MapError> {
        self.handle(name).ok_or_else(|| {
            MapError::new(
                "open",
                name,
                io::Error::other("not one of the load balancer's maps"),
            )
        })
    }

    /// Capacity of one of [`MapName::LOAD_BALANCER`] (0 for the others).
    pub fn max_entries(&self, name: MapName) -> usize {
        self.handle(name).map_or(0, |m| m.max_entries() as usize)
    }

    /// Number of entries of one of [`MapName::LOAD_BALANCER`] (walks its
    /// keys; 0 for the others).
    pub fn entry_count(&self, name: MapName) -> usize {
        self.handle(name).map_or(0, |m| m.keys().count())
    }

    /// One entry of the services map (`slot` 0: the master), looked up by
    /// key: what a bench polls to see a change land without walking the map.
    pub fn service_entry(&self, fe: &Frontend, slot: u16) -> Result<Option<SvcValue>, MapError> {
        let value = self
            .services
            .lookup(as_bytes(&layout::svc_key(fe, slot)), MapFlags::ANY)
            .map_err(|e| MapError::new("lookup", MapName::Services, to_io(e)))?;
        Ok(value
            .as_deref()
            .and_then(from_bytes::<lb_svc_val>)
            .and_then(|v| layout::decode_svc_value(slot, &v)))
    }

    fn entries<K: Pod, V: Pod>(&self, name: MapName) -> Result<Vec<(K, V)>, MapError> {
        let map = self.lb(name)?;
        let mut out = Vec::new();
        for key in map.keys() {
            // An entry deleted between the key walk and the lookup is skipped.
            let value = map
                .lookup(&key, MapFlags::ANY)
                .map_err(|e| MapError::new("lookup", name, to_io(e)))?;
            if let (Some(k), Some(v)) = (
                from_bytes::<K>(&key),
                value.as_deref().and_then(from_bytes::<V>),
            ) {
                out.push((k, v));
            }
        }
        Ok(out)
    }

    fn update_batch<K: Pod, V: Pod>(
        &self,
        name: MapName,
        entries: &[(K, V)],
    ) -> Result<(), MapError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut keys = Vec::with_capacity(entries.len() * std::mem::size_of::<K>());
        let mut values = Vec::with_capacity(entries.len() * std::mem::size_of::<V>());
        for (k, v) in entries {
            keys.extend_from_slice(as_bytes(k));
            values.extend_from_slice(as_bytes(v));
        }
        self.lb(name)?
            .update_batch(
                &keys,
                &values,
                entries.len() as u32,
                MapFlags::ANY,
                MapFlags::ANY,
            )
            .map_err(|e| MapError::new("update", name, to_io(e)))
    }

    /// A new Maglev table holding `table`. BPF_F_INNER_MAP, as the outer
    /// map's template (bpf/include/lb_maps.h), so any size fits.
    fn create_maglev_table(&self, table: &[BackendId]) -> Result<MapHandle, MapError> {
        let err = |op, e| MapError::new(op, MapName::Maglev, to_io(e));
        let opts = libbpf_sys::bpf_map_create_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as libbpf_sys::size_t,
            map_flags: libbpf_sys::BPF_F_INNER_MAP,
            ..Default::default()
        };
        let map = MapHandle::create(
            MapType::Array,
            Some(MAGLEV_TABLE_NAME),
            4,
            4,
            table.len() as u32,
            &opts,
        )
        .map_err(|e| err("create table", e))?;
        let keys: Vec<u8> = (0..table.len() as u32).flat_map(u32::to_ne_bytes).collect();
        let values: Vec<u8> = table.iter().flat_map(|id| id.to_ne_bytes()).collect();
        map.update_batch(
            &keys,
            &values,
            table.len() as u32,
            MapFlags::ANY,
            MapFlags::ANY,
        )
        .map_err(|e| err("fill table", e))?;
        Ok(map)
    }

    /// Writes `count` (frontend id, inner map fd) pairs to the Maglev map:
    /// one batch where the kernel has batches for maps of maps, else one
    /// update each.
    fn fd_map_update(&self, keys: &[u8], values: &[u8], count: usize) -> Result<(), MapError> {
        if count == 0 {
            return Ok(());
        }
        let batch =
            self.maglev
                .update_batch(keys, values, count as u32, MapFlags::ANY, MapFlags::ANY);
        if batch.is_ok() {
            return Ok(());
        }
        for (key, value) in keys.chunks_exact(4).zip(values.chunks_exact(4)) {
            self.maglev
                .update(key, value, MapFlags::ANY)
                .map_err(|e| MapError::new("update", MapName::Maglev, to_io(e)))?;
        }
        Ok(())
    }

    /// Every session-affinity entry: (client, frontend id, backend id,
    /// CLOCK_MONOTONIC ns of its last use). The client is a network
    /// namespace cookie (socket LB) or, with the top bit set, an IPv4
    /// client address (north-south).
    pub fn affinity_entries(&self) -> Result<Vec<(u64, ServiceId, BackendId, u64)>, MapError> {
        Ok(self
            .entries::<lb_affinity_key, lb_affinity_val>(MapName::Affinity)?
            .into_iter()
            .map(|(k, v)| (k.client, k.svc_id, v.backend_id, v.last_used_ns))
            .collect())
    }

    /// The Maglev table of frontend `svc_id`: the backend id of every slot;
    /// None when it has none.
    pub fn maglev_table(&self, svc_id: ServiceId) -> Result<Option<Vec<BackendId>>, MapError> {
        let inner = self
            .maglev
            .lookup(&svc_id.to_ne_bytes(), MapFlags::ANY)
            .map_err(|e| MapError::new("lookup", MapName::Maglev, to_io(e)))?;
        let Some(inner_id) = inner.as_deref().and_then(from_bytes::<u32>) else {
            return Ok(None);
        };
        let Ok(table) = MapHandle::from_map_id(inner_id) else {
            return Ok(None);
        };
        read_table(&table).map(Some)
    }

    /// The Maglev tables, read back (a table shared by several frontends
    /// is read once).
    fn maglev_tables(&self) -> Result<BTreeMap<ServiceId, MaglevTableInfo>, MapError> {
        let mut out = BTreeMap::new();
        let mut by_inner: HashMap<u32, MaglevTableInfo> = HashMap::new();
        for (svc_id, inner_id) in self.entries::<u32, u32>(MapName::Maglev)? {
            if let Some(info) = by_inner.get(&inner_id) {
                out.insert(svc_id, *info);
                continue;
            }
            // A table replaced or removed since the key walk is skipped.
            let Ok(table) = MapHandle::from_map_id(inner_id) else {
                continue;
            };
            let info = MaglevTableInfo::of(&read_table(&table)?);
            by_inner.insert(inner_id, info);
            out.insert(svc_id, info);
        }
        Ok(out)
    }

    fn delete_batch<K: Pod>(&self, name: MapName, keys: &[K]) -> Result<(), MapError> {
        if keys.is_empty() {
            return Ok(());
        }
        let map = self.lb(name)?;
        let bytes: Vec<u8> = keys.iter().flat_map(|k| as_bytes(k).to_vec()).collect();
        match map.delete_batch(&bytes, keys.len() as u32, MapFlags::ANY, MapFlags::ANY) {
            Ok(()) => Ok(()),
            // The batch stops at a missing key; deletes are idempotent, so
            // finish one by one and ignore the missing ones.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                for k in keys {
                    match map.delete(as_bytes(k)) {
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::NotFound => {}
                        Err(e) => return Err(MapError::new("delete", name, to_io(e))),
                    }
                }
                Ok(())
            }
            Err(e) => Err(MapError::new("delete", name, to_io(e))),
        }
    }
}

impl LbMaps for KernelMaps {
    fn capacity(&self) -> Capacity {
        Capacity {
            services: self.max_entries(MapName::Services),
            backends: self.max_entries(MapName::Backends),
            source_ranges: self.max_entries(MapName::SourceRanges),
            maglev: self.max_entries(MapName::Maglev),
        }
    }

    fn snapshot(&self) -> Result<Snapshot, MapError> {
        let raw_svc = self.entries::<lb_svc_key, lb_svc_val>(MapName::Services)?;
        let svc = raw_svc.iter().filter_map(|(k, v)| {
            let (fe, slot) = layout::decode_svc_key(k)?;
            Some((fe, slot, layout::decode_svc_value(slot, v)?))
        });
        let backends: BTreeMap<BackendId, BackendEntry> = self
            .entries::<u32, lb_backend>(MapName::Backends)?
            .iter()
            .filter_map(|(id, v)| Some((*id, layout::decode_backend(v)?)))
            .collect();
        let mut snapshot = Snapshot::from_entries(svc, backends);
        snapshot.port_rejects = raw_svc
            .iter()
            .filter_map(|(k, v)| layout::decode_port_reject(k, v))
            .collect();
        // An LPM trie's lookup matches prefixes, not keys: walk the keys.
        for key in self.source_ranges.keys() {
            if let Some((svc_id, net)) =
                from_bytes::<lb_srcrange_key>(&key).and_then(|k| layout::decode_srcrange_key(&k))
            {
                snapshot
                    .source_ranges
                    .entry(svc_id)
                    .or_default()
                    .insert(net);
            }
        }
        snapshot.maglev = self.maglev_tables()?;
        Ok(snapshot)
    }

    fn put_backends(&mut self, entries: &[(BackendId, BackendEntry)]) -> Result<(), MapError> {
        let raw: Vec<(u32, lb_backend)> = entries
            .iter()
            .map(|(id, b)| (*id, layout::backend_value(b)))
            .collect();
        self.update_batch(MapName::Backends, &raw)
    }

    fn delete_backends(&mut self, ids: &[BackendId]) -> Result<(), MapError> {
        self.delete_batch(MapName::Backends, ids)
    }

    fn put_service_entries(
        &mut self,
        entries: &[(Frontend, u16, SvcValue)],
    ) -> Result<(), MapError> {
        let raw: Vec<(lb_svc_key, lb_svc_val)> = entries
            .iter()
            .map(|(fe, slot, v)| (layout::svc_key(fe, *slot), layout::svc_value(v)))
            .collect();
        self.update_batch(MapName::Services, &raw)
    }

    fn delete_service_entries(&mut self, keys: &[(Frontend, u16)]) -> Result<(), MapError> {
        let raw: Vec<lb_svc_key> = keys
            .iter()
            .map(|(fe, slot)| layout::svc_key(fe, *slot))
            .collect();
        self.delete_batch(MapName::Services, &raw)
    }

    fn put_port_rejects(&mut self, ips: &[IpAddr]) -> Result<(), MapError> {
        let value = layout::port_reject_value();
        let raw: Vec<(lb_svc_key, lb_svc_val)> = ips
            .iter()
            .map(|ip| (layout::port_reject_key(*ip), value))
            .collect();
        self.update_batch(MapName::Services, &raw)
    }

    fn delete_port_rejects(&mut self, ips: &[IpAddr]) -> Result<(), MapError> {
        let raw: Vec<lb_svc_key> = ips.iter().map(|ip| layout::port_reject_key(*ip)).collect();
        self.delete_batch(MapName::Services, &raw)
    }

    // One syscall per entry: an LPM trie has no batch operations on every
    // kernel kpr supports, and a Service has a handful of ranges.
    fn put_source_ranges(&mut self, entries: &[(ServiceId, IpNet)]) -> Result<(), MapError> {
        for (svc_id, net) in entries {
            let key = layout::srcrange_key(*svc_id, net);
            self.source_ranges
                .update(as_bytes(&key), &[1u8], MapFlags::ANY)
                .map_err(|e| MapError::new("update", MapName::SourceRanges, to_io(e)))?;
        }
        Ok(())
    }

    fn delete_source_ranges(&mut self, entries: &[(ServiceId, IpNet)]) -> Result<(), MapError> {
        for (svc_id, net) in entries {
            let key = layout::srcrange_key(*svc_id, net);
            match self.source_ranges.delete(as_bytes(&key)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(MapError::new("delete", MapName::SourceRanges, to_io(e))),
            }
        }
        Ok(())
    }

    fn put_maglev_tables(&mut self, tables: &[(ServiceId, MaglevTable)]) -> Result<(), MapError> {
        // Frontends handed the same table (one Arc) share one inner map.
        let mut created: HashMap<*const BackendId, MapHandle> = HashMap::new();
        let mut keys = Vec::with_capacity(tables.len() * 4);
        let mut values = Vec::with_capacity(tables.len() * 4);
        for (svc_id, table) in tables {
            let inner = match created.entry(table.as_ptr()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(self.create_maglev_table(table)?)
                }
            };
            let fd = inner.as_fd().as_raw_fd() as u32;
            keys.extend_from_slice(&svc_id.to_ne_bytes());
            values.extend_from_slice(&fd.to_ne_bytes());
        }
        // Every write to a map of maps waits for an RCU grace period (the
        // kernel's maybe_wait_bpf_programs: ~10 ms on a small VM), so one
        // batch for the whole sync rather than one update per frontend.
        // Replacing a value swaps the table atomically for readers.
        self.fd_map_update(&keys, &values, tables.len())?;
        // The outer map holds its own references; the fds close here.
        Ok(())
    }

    fn delete_maglev_tables(&mut self, ids: &[ServiceId]) -> Result<(), MapError> {
        if ids.is_empty() {
            return Ok(());
        }
        // One grace period for all (see put_maglev_tables); a batch stops
        // at a key that is gone, so that case goes one by one.
        let keys: Vec<u8> = ids.iter().flat_map(|id| id.to_ne_bytes()).collect();
        if self
            .maglev
            .delete_batch(&keys, ids.len() as u32, MapFlags::ANY, MapFlags::ANY)
            .is_ok()
        {
            return Ok(());
        }
        for svc_id in ids {
            match self.maglev.delete(&svc_id.to_ne_bytes()) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(MapError::new("delete", MapName::Maglev, to_io(e))),
            }
        }
        Ok(())
    }

    fn prune_affinity(
        &mut self,
        keep: &mut dyn FnMut(ServiceId, BackendId) -> bool,
    ) -> Result<usize, MapError> {
        let stale: Vec<lb_affinity_key> = self
            .entries::<lb_affinity_key, lb_affinity_val>(MapName::Affinity)?
            .into_iter()
            .filter(|(k, v)| {
                let (svc_id, backend_id) = layout::decode_affinity(k, v);
                !keep(svc_id, backend_id)
            })
            .map(|(k, _)| k)
            .collect();
        self.delete_batch(MapName::Affinity, &stale)?;
        Ok(stale.len())
    }
}

/// Every slot of a Maglev table (an inner array map).
fn read_table(table: &MapHandle) -> Result<Vec<BackendId>, MapError> {
    let mut slots = vec![0 as BackendId; table.max_entries() as usize];
    let batch = table
        .lookup_batch(table.max_entries().max(1), MapFlags::ANY, MapFlags::ANY)
        .map_err(|e| MapError::new("lookup", MapName::Maglev, to_io(e)))?;
    for (k, v) in batch {
        if let (Some(k), Some(v)) = (from_bytes::<u32>(&k), from_bytes::<u32>(&v)) {
            if let Some(slot) = slots.get_mut(k as usize) {
                *slot = v;
            }
        }
    }
    Ok(slots)
}
