//! Encoding of map keys and values: domain types to and from the structs
//! that libbpf-cargo generates from bpf/include/lb_types.h. This module
//! owns byte order (addresses and ports are network order in the maps) and
//! the IPv4-mapped address convention; nothing else touches raw entries.

#![deny(unsafe_code)]

use std::net::{IpAddr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::datapath::maps::{BackendEntry, BackendId, DsrKey, MasterEntry, ServiceId, SvcValue};
use crate::datapath::skel::nodeport::types::{ct_entry, ct_key, dsr_key};
use crate::datapath::skel::sock_lb::types::{
    ct_dir, ct_flags, lb_affinity_key, lb_affinity_val, lb_backend, lb_backend_flags,
    lb_backend_state, lb_scope, lb_srcrange_key, lb_svc_flags, lb_svc_key, lb_svc_val,
};
use crate::model::{BackendState, Frontend, FrontendOptions, L4Addr, Protocol, Scope, ServiceType};

// The enums of lb_types.h, from the generated skeleton (BTF), not copied.
const LB_SCOPE_EXT: u8 = lb_scope::LB_SCOPE_EXT.0 as u8;
const LB_SCOPE_INT: u8 = lb_scope::LB_SCOPE_INT.0 as u8;
const SVC_F_CLUSTER_IP: u16 = lb_svc_flags::SVC_F_CLUSTER_IP.0 as u16;
const SVC_F_NODE_PORT: u16 = lb_svc_flags::SVC_F_NODE_PORT.0 as u16;
const SVC_F_LOADBALANCER: u16 = lb_svc_flags::SVC_F_LOADBALANCER.0 as u16;
const SVC_F_EXTERNAL_IP: u16 = lb_svc_flags::SVC_F_EXTERNAL_IP.0 as u16;
const SVC_F_AFFINITY: u16 = lb_svc_flags::SVC_F_AFFINITY.0 as u16;
const SVC_F_HAS_INT_SCOPE: u16 = lb_svc_flags::SVC_F_HAS_INT_SCOPE.0 as u16;
const SVC_F_ETP_LOCAL: u16 = lb_svc_flags::SVC_F_ETP_LOCAL.0 as u16;
const SVC_F_ITP_LOCAL: u16 = lb_svc_flags::SVC_F_ITP_LOCAL.0 as u16;
const SVC_F_SRC_RANGE: u16 = lb_svc_flags::SVC_F_SRC_RANGE.0 as u16;
const SVC_F_SRC_RANGE_NODE: u16 = lb_svc_flags::SVC_F_SRC_RANGE_NODE.0 as u16;
const SVC_F_MAGLEV: u16 = lb_svc_flags::SVC_F_MAGLEV.0 as u16;
const SVC_F_HOST_PORT: u16 = lb_svc_flags::SVC_F_HOST_PORT.0 as u16;
const SVC_F_PORT_REJECT: u16 = lb_svc_flags::SVC_F_PORT_REJECT.0 as u16;
const BE_STATE_ACTIVE: u8 = lb_backend_state::BE_STATE_ACTIVE.0 as u8;
const BE_STATE_TERMINATING: u8 = lb_backend_state::BE_STATE_TERMINATING.0 as u8;
const BE_F_LOCAL: u8 = lb_backend_flags::BE_F_LOCAL.0 as u8;

pub use crate::datapath::sys::{as_bytes, from_bytes, Pod};

/// A 16-byte map address in network order (IPv4 as IPv4-mapped).
pub fn encode_ip(ip: IpAddr) -> [u32; 4] {
    let octets = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let mut out = [0u32; 4];
    for (i, word) in out.iter_mut().enumerate() {
        *word = u32::from_ne_bytes([
            octets[4 * i],
            octets[4 * i + 1],
            octets[4 * i + 2],
            octets[4 * i + 3],
        ]);
    }
    out
}

pub fn decode_ip(words: &[u32; 4]) -> IpAddr {
    let mut octets = [0u8; 16];
    for (i, word) in words.iter().enumerate() {
        octets[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

pub fn svc_key(fe: &Frontend, slot: u16) -> lb_svc_key {
    lb_svc_key {
        addr: encode_ip(fe.addr.ip),
        port: fe.addr.port.to_be(),
        slot,
        proto: fe.addr.proto.number(),
        scope: match fe.scope {
            Scope::External => LB_SCOPE_EXT,
            Scope::Internal => LB_SCOPE_INT,
        },
        pad: [0; 2],
    }
}

/// The key of the port-reject entry of ClusterIP `ip`: port 0, protocol
/// 0 (no frontend has either), slot 0, scope External.
pub fn port_reject_key(ip: IpAddr) -> lb_svc_key {
    lb_svc_key {
        addr: encode_ip(ip),
        scope: LB_SCOPE_EXT,
        ..Default::default()
    }
}

/// The value of every port-reject entry: the flag alone.
pub fn port_reject_value() -> lb_svc_val {
    lb_svc_val {
        flags: SVC_F_PORT_REJECT,
        ..Default::default()
    }
}

/// The ClusterIP of a port-reject entry; None for any other entry.
pub fn decode_port_reject(key: &lb_svc_key, val: &lb_svc_val) -> Option<IpAddr> {
    (key.proto == 0
        && key.port == 0
        && key.slot == 0
        && key.scope == LB_SCOPE_EXT
        && val.flags == SVC_F_PORT_REJECT)
        .then(|| decode_ip(&key.addr))
}

/// The frontend and slot of a key; None for a key kpr never writes.
pub fn decode_svc_key(key: &lb_svc_key) -> Option<(Frontend, u16)> {
    let scope = match key.scope {
        LB_SCOPE_EXT => Scope::External,
        LB_SCOPE_INT => Scope::Internal,
        _ => return None,
    };
    let addr = L4Addr {
        ip: decode_ip(&key.addr),
        port: u16::from_be(key.port),
        proto: Protocol::from_number(key.proto)?,
    };
    Some((Frontend { addr, scope }, key.slot))
}

pub fn svc_value(value: &SvcValue) -> lb_svc_val {
    match value {
        SvcValue::Master(m) => lb_svc_val {
            backend_id: 0,
            count: m.count,
            svc_id: m.svc_id,
            affinity_timeout: m.options.affinity_timeout.unwrap_or(0),
            flags: master_flags(m),
            pad: 0,
        },
        SvcValue::Slot { backend_id, svc_id } => lb_svc_val {
            backend_id: *backend_id,
            svc_id: *svc_id,
            ..Default::default()
        },
    }
}

fn master_flags(m: &MasterEntry) -> u16 {
    let mut flags = match m.svc_type {
        ServiceType::ClusterIP => SVC_F_CLUSTER_IP,
        ServiceType::NodePort => SVC_F_NODE_PORT,
        ServiceType::LoadBalancer => SVC_F_LOADBALANCER,
        ServiceType::ExternalIP => SVC_F_EXTERNAL_IP,
        // Served as a NodePort is, wherever NodePorts are served.
        ServiceType::HostPort => SVC_F_NODE_PORT | SVC_F_HOST_PORT,
    };
    let o = &m.options;
    if o.affinity_timeout.is_some() {
        flags |= SVC_F_AFFINITY;
    }
    if o.has_internal_scope {
        flags |= SVC_F_HAS_INT_SCOPE;
    }
    if o.external_traffic_local {
        flags |= SVC_F_ETP_LOCAL;
    }
    if o.internal_traffic_local {
        flags |= SVC_F_ITP_LOCAL;
    }
    if m.source_ranges {
        flags |= SVC_F_SRC_RANGE;
    }
    if o.source_ranges_admit_node {
        flags |= SVC_F_SRC_RANGE_NODE;
    }
    if o.maglev {
        flags |= SVC_F_MAGLEV;
    }
    flags
}

/// The value at `slot`; None when it is not a value kpr writes there.
pub fn decode_svc_value(slot: u16, val: &lb_svc_val) -> Option<SvcValue> {
    if slot > 0 {
        return Some(SvcValue::Slot {
            backend_id: val.backend_id,
            svc_id: val.svc_id,
        });
    }
    let f = val.flags;
    let svc_type = if f & SVC_F_CLUSTER_IP != 0 {
        ServiceType::ClusterIP
    } else if f & SVC_F_NODE_PORT != 0 && f & SVC_F_HOST_PORT != 0 {
        ServiceType::HostPort
    } else if f & SVC_F_NODE_PORT != 0 {
        ServiceType::NodePort
    } else if f & SVC_F_LOADBALANCER != 0 {
        ServiceType::LoadBalancer
    } else if f & SVC_F_EXTERNAL_IP != 0 {
        ServiceType::ExternalIP
    } else {
        return None;
    };
    let options = FrontendOptions {
        affinity_timeout: (f & SVC_F_AFFINITY != 0).then_some(val.affinity_timeout),
        has_internal_scope: f & SVC_F_HAS_INT_SCOPE != 0,
        external_traffic_local: f & SVC_F_ETP_LOCAL != 0,
        internal_traffic_local: f & SVC_F_ITP_LOCAL != 0,
        source_ranges_admit_node: f & SVC_F_SRC_RANGE_NODE != 0,
        maglev: f & SVC_F_MAGLEV != 0,
    };
    Some(SvcValue::Master(MasterEntry {
        svc_id: val.svc_id,
        count: val.count,
        svc_type,
        options,
        source_ranges: f & SVC_F_SRC_RANGE != 0,
    }))
}

/// Bits of a source-range key's prefix taken by the frontend id.
const SRCRANGE_ID_BITS: u32 = 32;

/// The source-range key of a frontend's allowed prefix. An IPv4 prefix /n
/// is the IPv4-mapped /96+n, as addresses are in every map (so an IPv6
/// prefix inside ::ffff:0:0/96 is the same key; translation makes those
/// IPv4, as kube-proxy does).
pub fn srcrange_key(svc_id: ServiceId, net: &IpNet) -> lb_srcrange_key {
    let (addr, bits) = match net.trunc() {
        IpNet::V4(n) => (IpAddr::V4(n.network()), 96 + u32::from(n.prefix_len())),
        IpNet::V6(n) => (IpAddr::V6(n.network()), u32::from(n.prefix_len())),
    };
    lb_srcrange_key {
        prefixlen: SRCRANGE_ID_BITS + bits,
        svc_id,
        addr: encode_ip(addr),
    }
}

/// The frontend id and prefix of a source-range key; None for a key kpr
/// never writes.
pub fn decode_srcrange_key(key: &lb_srcrange_key) -> Option<(ServiceId, IpNet)> {
    let bits = key.prefixlen.checked_sub(SRCRANGE_ID_BITS)?;
    let bits = u8::try_from(bits).ok().filter(|b| *b <= 128)?;
    let mut octets = [0u8; 16];
    for (i, word) in key.addr.iter().enumerate() {
        octets[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(octets);
    let net = match v6.to_ipv4_mapped() {
        Some(v4) if bits >= 96 => IpNet::V4(Ipv4Net::new(v4, bits - 96).ok()?),
        _ => IpNet::V6(Ipv6Net::new(v6, bits).ok()?),
    };
    Some((key.svc_id, net))
}

pub fn backend_value(b: &BackendEntry) -> lb_backend {
    lb_backend {
        addr: encode_ip(b.addr.ip),
        port: b.addr.port.to_be(),
        proto: b.addr.proto.number(),
        state: match b.state {
            BackendState::Active => BE_STATE_ACTIVE,
            BackendState::Terminating => BE_STATE_TERMINATING,
        },
        flags: if b.local { BE_F_LOCAL } else { 0 },
        pad: [0; 3],
    }
}

pub fn decode_backend(val: &lb_backend) -> Option<BackendEntry> {
    let state = match val.state {
        BE_STATE_ACTIVE => BackendState::Active,
        BE_STATE_TERMINATING => BackendState::Terminating,
        _ => return None,
    };
    Some(BackendEntry {
        addr: L4Addr {
            ip: decode_ip(&val.addr),
            port: u16::from_be(val.port),
            proto: Protocol::from_number(val.proto)?,
        },
        state,
        local: val.flags & BE_F_LOCAL != 0,
    })
}

/// Service and backend ids of an affinity entry.
pub fn decode_affinity(key: &lb_affinity_key, val: &lb_affinity_val) -> (ServiceId, BackendId) {
    (key.svc_id, val.backend_id)
}

// enum ct_dir and enum ct_flags, from BTF like the constants above
const CT_DIR_ORIG: u8 = ct_dir::CT_DIR_ORIG.0 as u8;
const CT_DIR_REPLY: u8 = ct_dir::CT_DIR_REPLY.0 as u8;
const CT_F_SNAT: u16 = ct_flags::CT_F_SNAT.0 as u16;
const CT_F_ESTABLISHED: u16 = ct_flags::CT_F_ESTABLISHED.0 as u16;
const CT_F_CLOSING: u16 = ct_flags::CT_F_CLOSING.0 as u16;
const CT_F_DSR_ENCAP: u16 = ct_flags::CT_F_DSR_ENCAP.0 as u16;
const CT_F_DSR_DECAP: u16 = ct_flags::CT_F_DSR_DECAP.0 as u16;

/// Which way a conntrack entry's packets go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CtDir {
    /// Client to frontend.
    Orig,
    /// Backend to the SNAT address (or the client).
    Reply,
}

/// One conntrack entry in domain terms.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CtRecord {
    pub proto: Protocol,
    pub dir: CtDir,
    /// The packet's source as it arrives.
    pub src: std::net::SocketAddr,
    /// The packet's destination as it arrives.
    pub dst: std::net::SocketAddr,
    /// The source it is rewritten to.
    pub nat_src: std::net::SocketAddr,
    /// The destination it is rewritten to.
    pub nat_dst: std::net::SocketAddr,
    pub backend_id: BackendId,
    pub svc_id: ServiceId,
    /// Source-NATed to a node address (remote backend).
    pub snat: bool,
    /// The backend has answered.
    pub established: bool,
    /// TCP FIN or RST seen.
    pub closing: bool,
    /// DSR, on the node the client reached: packets go IPIP-encapsulated to
    /// `nat_dst`'s node (`nat_src` is the outer source); no reply entry.
    pub dsr_encap: bool,
    /// DSR, on the backend's node: the flow came encapsulated from another
    /// node; replies leave from here with the frontend as source.
    pub dsr_decap: bool,
    /// CLOCK_MONOTONIC ns when the flow was created.
    pub created_ns: u64,
    /// CLOCK_MONOTONIC ns after which the entry is stale.
    pub expires_ns: u64,
}

fn sock(words: &[u32; 4], port_be: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(decode_ip(words), u16::from_be(port_be))
}

/// A conntrack entry; None for one kpr never writes.
pub fn decode_ct(key: &ct_key, val: &ct_entry) -> Option<CtRecord> {
    let dir = match key.dir {
        CT_DIR_ORIG => CtDir::Orig,
        CT_DIR_REPLY => CtDir::Reply,
        _ => return None,
    };
    Some(CtRecord {
        proto: Protocol::from_number(key.proto)?,
        dir,
        src: sock(&key.saddr, key.sport),
        dst: sock(&key.daddr, key.dport),
        nat_src: sock(&val.nat_saddr, val.nat_sport),
        nat_dst: sock(&val.nat_daddr, val.nat_dport),
        backend_id: val.backend_id,
        svc_id: val.svc_id,
        snat: val.flags & CT_F_SNAT != 0,
        established: val.flags & CT_F_ESTABLISHED != 0,
        closing: val.flags & CT_F_CLOSING != 0,
        dsr_encap: val.flags & CT_F_DSR_ENCAP != 0,
        dsr_decap: val.flags & CT_F_DSR_DECAP != 0,
        created_ns: val.created_ns,
        expires_ns: val.expires_ns,
    })
}

/// The conntrack key of a record (its packet tuple and direction).
pub fn ct_key_of(r: &CtRecord) -> ct_key {
    ct_key {
        saddr: encode_ip(r.src.ip()),
        daddr: encode_ip(r.dst.ip()),
        sport: r.src.port().to_be(),
        dport: r.dst.port().to_be(),
        proto: r.proto.number(),
        dir: match r.dir {
            CtDir::Orig => CT_DIR_ORIG,
            CtDir::Reply => CT_DIR_REPLY,
        },
        pad: [0; 2],
    }
}

/// The DSR map key of `k`.
pub fn dsr_key(k: &DsrKey) -> dsr_key {
    dsr_key {
        frontend: encode_ip(k.frontend),
        backend: encode_ip(k.backend),
        port: k.port.to_be(),
        proto: k.proto.number(),
        pad: 0,
    }
}

/// A DSR map key; None for one kpr never writes.
pub fn decode_dsr_key(k: &dsr_key) -> Option<DsrKey> {
    Some(DsrKey {
        frontend: decode_ip(&k.frontend),
        backend: decode_ip(&k.backend),
        port: u16::from_be(k.port),
        proto: Protocol::from_number(k.proto)?,
    })
}

#[cfg(test)]
#[path = "layout_tests.rs"]
mod tests;
