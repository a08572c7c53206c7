//! The DSR map (`kpr_dsr_v1`, bpf/include/lb_dsr.h): on a backend's node,
//! which local backend a flow that another node encapsulated for direct
//! server return is for. The other node sends the client's packet as it
//! is (client -> frontend) inside an IPIP header whose destination is the
//! backend it chose; this node looks up (frontend, port, protocol, outer
//! destination) here to learn the backend id, hence the backend port.
//!
//! The map is derived from what the services and backends maps hold (the
//! reconciler's [`Snapshot`]) after every sync: one entry per north-south
//! frontend (NodePort, LoadBalancer, externalIP; external scope) and local
//! backend of it. A NodePort is keyed with its family's unspecified address
//! instead of a node address, as the client addressed another node's IP:
//! a nodePort is the same Service on every node. Writes come before
//! deletes; a flow whose entry is not (yet) there is left alone by the
//! datapath and counted (`dsr_miss`), and the sending node's client
//! retransmits.
//!
//! The map is kept whatever `--nodeport-mode` this node runs, so a node in
//! snat mode still serves flows other nodes send it by DSR (a cluster can
//! change modes node by node).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::datapath::kernel::to_io;
use crate::datapath::layout::{self, as_bytes, from_bytes};
use crate::datapath::maps::{BackendId, Snapshot};
use crate::datapath::nodeport::DSR_PIN;
use crate::model::{Protocol, Scope, ServiceType};

/// A key of the DSR map, in domain terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DsrKey {
    /// The frontend address (LoadBalancer, externalIP), or the family's
    /// unspecified address for a NodePort (any node's address).
    pub frontend: IpAddr,
    /// The local backend's address: the outer destination of the packet.
    pub backend: IpAddr,
    /// The frontend port.
    pub port: u16,
    pub proto: Protocol,
}

/// The DSR entries the maps of `snapshot` call for. When two backends of
/// one frontend share an address (different ports), the first slot's wins:
/// the outer header names an address only.
///
/// Cost: one pass over the backends, then, when some are local, over the
/// slots of the north-south frontends: about 4 ms for 10k NodePort
/// Services of 10 endpoints (release build); the agent runs it only after
/// syncs that wrote something.
pub fn desired(snapshot: &Snapshot) -> BTreeMap<DsrKey, BackendId> {
    let mut out = BTreeMap::new();
    // Ids are small (allocated lowest first): a bitmap of the local ones
    // makes the slot walk a memory read per slot.
    let local: Vec<BackendId> = snapshot
        .backends
        .iter()
        .filter(|(_, b)| b.local)
        .map(|(id, _)| *id)
        .collect();
    let Some(&max) = local.iter().max() else {
        return out;
    };
    let mut is_local = vec![false; max as usize + 1];
    for id in &local {
        is_local[*id as usize] = true;
    }
    for (fe, entries) in &snapshot.frontends {
        if fe.scope != Scope::External {
            continue;
        }
        let frontend = match entries.master.svc_type {
            ServiceType::NodePort => match fe.addr.ip {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            },
            ServiceType::LoadBalancer | ServiceType::ExternalIP => fe.addr.ip,
            ServiceType::ClusterIP => continue,
        };
        for id in &entries.slots {
            if !is_local.get(*id as usize).copied().unwrap_or(false) {
                continue;
            }
            let Some(backend) = snapshot.backends.get(id) else {
                continue;
            };
            if backend.addr.proto != fe.addr.proto {
                continue;
            }
            let key = DsrKey {
                frontend,
                backend: backend.addr.ip,
                port: fe.addr.port,
                proto: fe.addr.proto,
            };
            out.entry(key).or_insert(*id);
        }
    }
    out
}

/// What one [`DsrTable::sync`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DsrSync {
    /// Entries written (new or changed).
    pub written: usize,
    /// Entries removed.
    pub deleted: usize,
}

/// The pinned DSR map and what it holds.
pub struct DsrTable {
    map: MapHandle,
    current: BTreeMap<DsrKey, BackendId>,
}

impl DsrTable {
    /// Opens the DSR map pinned under `bpf_root` (by the north-south
    /// datapath's load) and reads what it holds.
    pub fn open(bpf_root: &Path) -> Result<DsrTable> {
        let pin = bpf_root.join(DSR_PIN);
        let map = MapHandle::from_pinned_path(&pin)
            .with_context(|| format!("opening the DSR map {}", pin.display()))?;
        let mut table = DsrTable {
            map,
            current: BTreeMap::new(),
        };
        table.reload()?;
        Ok(table)
    }

    fn reload(&mut self) -> Result<()> {
        let mut current = BTreeMap::new();
        for key in self.map.keys() {
            let value = self
                .map
                .lookup(&key, MapFlags::ANY)
                .map_err(to_io)
                .context("reading the DSR map")?;
            let entry = from_bytes(&key)
                .and_then(|k| layout::decode_dsr_key(&k))
                .zip(value.as_deref().and_then(from_bytes::<u32>));
            match entry {
                Some((k, id)) => {
                    current.insert(k, id);
                }
                // Not one kpr writes: removed by the next sync.
                None => self
                    .map
                    .delete(&key)
                    .map_err(to_io)
                    .context("removing a malformed DSR entry")?,
            }
        }
        self.current = current;
        Ok(())
    }

    /// Entries the map holds.
    pub fn len(&self) -> usize {
        self.current.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    /// The map's capacity.
    pub fn capacity(&self) -> usize {
        self.map.max_entries() as usize
    }

    /// Makes the map hold exactly `desired`: new and changed entries first,
    /// then removals. On an error the table re-reads the map, so the next
    /// sync retries what is missing.
    pub fn sync(&mut self, desired: &BTreeMap<DsrKey, BackendId>) -> Result<DsrSync> {
        let result = self.apply(desired);
        if result.is_err() {
            self.reload()?;
        }
        result
    }

    fn apply(&mut self, desired: &BTreeMap<DsrKey, BackendId>) -> Result<DsrSync> {
        let mut report = DsrSync::default();
        for (key, id) in desired {
            if self.current.get(key) == Some(id) {
                continue;
            }
            self.map
                .update(
                    as_bytes(&layout::dsr_key(key)),
                    &id.to_ne_bytes(),
                    MapFlags::ANY,
                )
                .map_err(to_io)
                .with_context(|| {
                    format!(
                        "writing DSR entry {key:?} ({} of {} entries used)",
                        self.current.len(),
                        self.capacity()
                    )
                })?;
            self.current.insert(*key, *id);
            report.written += 1;
        }
        let stale: Vec<DsrKey> = self
            .current
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .copied()
            .collect();
        for key in stale {
            match self.map.delete(as_bytes(&layout::dsr_key(&key))) {
                Ok(()) => {}
                Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => {}
                Err(e) => return Err(to_io(e)).context("removing a DSR entry"),
            }
            self.current.remove(&key);
            report.deleted += 1;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::maps::{BackendEntry, FrontendEntries, MasterEntry};
    use crate::model::{BackendState, Frontend, FrontendOptions, L4Addr};

    fn backend(ip: &str, port: u16, local: bool) -> BackendEntry {
        BackendEntry {
            addr: L4Addr {
                ip: ip.parse().unwrap(),
                port,
                proto: Protocol::Tcp,
            },
            state: BackendState::Active,
            local,
        }
    }

    fn frontend(
        ip: &str,
        port: u16,
        svc_type: ServiceType,
        slots: Vec<BackendId>,
    ) -> (Frontend, FrontendEntries) {
        (
            Frontend::new(ip.parse().unwrap(), port, Protocol::Tcp),
            FrontendEntries {
                master: MasterEntry {
                    svc_id: 1,
                    count: slots.len() as u32,
                    svc_type,
                    options: FrontendOptions::default(),
                    source_ranges: false,
                },
                slots,
            },
        )
    }

    fn key(frontend: &str, backend: &str, port: u16) -> DsrKey {
        DsrKey {
            frontend: frontend.parse().unwrap(),
            backend: backend.parse().unwrap(),
            port,
            proto: Protocol::Tcp,
        }
    }

    #[test]
    fn local_backends_of_north_south_frontends_are_keyed_nodeports_by_any_address() {
        let mut s = Snapshot::default();
        s.backends.insert(1, backend("10.244.2.11", 8080, true));
        s.backends.insert(2, backend("10.244.1.11", 8080, false));
        s.backends.insert(3, backend("10.244.2.12", 9090, true));
        for (fe, e) in [
            frontend("192.0.2.21", 30080, ServiceType::NodePort, vec![1, 2]),
            frontend("127.0.0.1", 30080, ServiceType::NodePort, vec![1, 2]),
            frontend("203.0.113.7", 80, ServiceType::LoadBalancer, vec![1, 3]),
            frontend("198.51.100.9", 443, ServiceType::ExternalIP, vec![3]),
            frontend("10.96.0.10", 80, ServiceType::ClusterIP, vec![1, 2]),
        ] {
            s.frontends.insert(fe, e);
        }
        // An internal-scope frontend is for node-local traffic only.
        let (mut fe, e) = frontend("203.0.113.8", 80, ServiceType::LoadBalancer, vec![1]);
        fe.scope = Scope::Internal;
        s.frontends.insert(fe, e);

        let want: BTreeMap<DsrKey, BackendId> = [
            (key("0.0.0.0", "10.244.2.11", 30080), 1),
            (key("203.0.113.7", "10.244.2.11", 80), 1),
            (key("203.0.113.7", "10.244.2.12", 80), 3),
            (key("198.51.100.9", "10.244.2.12", 443), 3),
        ]
        .into_iter()
        .collect();
        assert_eq!(desired(&s), want);
    }

    #[test]
    fn an_address_twice_behind_one_frontend_keeps_the_first_slot() {
        let mut s = Snapshot::default();
        s.backends.insert(4, backend("10.244.2.11", 8080, true));
        s.backends.insert(5, backend("10.244.2.11", 8081, true));
        let (fe, e) = frontend("192.0.2.21", 30080, ServiceType::NodePort, vec![5, 4]);
        s.frontends.insert(fe, e);
        let d = desired(&s);
        assert_eq!(d.len(), 1);
        assert_eq!(d.get(&key("0.0.0.0", "10.244.2.11", 30080)), Some(&5));
    }
}
