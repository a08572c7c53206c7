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

#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use anyhow::Result;

use crate::datapath::layout;
pub use crate::datapath::maps::DsrKey;
use crate::datapath::maps::{BackendId, Snapshot};
use crate::datapath::pinned_table::{PinnedTable, TableKey};
use crate::datapath::pins::MapName;
use crate::datapath::sys::{as_bytes, from_bytes};
use crate::model::{Scope, ServiceType};

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
            ServiceType::LoadBalancer | ServiceType::ExternalIP | ServiceType::HostPort => {
                fe.addr.ip
            }
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

/// The map key: `struct dsr_key` (bpf/include/lb_dsr.h).
impl TableKey for DsrKey {
    fn encode(&self) -> Vec<u8> {
        as_bytes(&layout::dsr_key(self)).to_vec()
    }

    fn decode(bytes: &[u8]) -> Option<DsrKey> {
        layout::decode_dsr_key(&from_bytes(bytes)?)
    }
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
pub struct DsrTable(PinnedTable<DsrKey, BackendId>);

impl DsrTable {
    /// Opens the DSR map pinned under `bpf_root` (by the north-south
    /// datapath's load) and reads what it holds.
    pub fn open(bpf_root: &Path) -> Result<DsrTable> {
        Ok(DsrTable(PinnedTable::open(bpf_root, MapName::Dsr)?))
    }

    /// Entries the map holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The map's capacity.
    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }

    /// Makes the map hold exactly `desired` (see [`PinnedTable::sync`]).
    pub fn sync(&mut self, desired: &BTreeMap<DsrKey, BackendId>) -> Result<DsrSync> {
        let done = self.0.sync(desired)?;
        Ok(DsrSync {
            written: done.added.len(),
            deleted: done.removed.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::maps::{BackendEntry, FrontendEntries, MasterEntry};
    use crate::model::{BackendState, Frontend, FrontendOptions, L4Addr, Protocol};

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
