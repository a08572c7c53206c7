//! Golden encodings of every map struct, and their sizes: a change here is
//! a layout change (a new map version, see `pins`).

use super::*;
use crate::datapath::skel::sock_lb::types::{lb_sock_rnat_key, lb_sock_rnat_val};
use std::mem::size_of;

fn hex<T: Pod>(v: &T) -> String {
    as_bytes(v).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn struct_sizes_match_the_c_layout() {
    // Sizes of bpf/include/lb_types.h with its explicit padding; a change
    // here is a layout change and needs a new map version.
    assert_eq!(size_of::<lb_svc_key>(), 24);
    assert_eq!(size_of::<lb_svc_val>(), 20);
    assert_eq!(size_of::<lb_backend>(), 24);
    assert_eq!(size_of::<lb_affinity_key>(), 16);
    assert_eq!(size_of::<lb_affinity_val>(), 16);
    assert_eq!(size_of::<lb_sock_rnat_key>(), 32);
    assert_eq!(size_of::<lb_sock_rnat_val>(), 24);
    assert_eq!(size_of::<ct_key>(), 40);
    assert_eq!(size_of::<ct_entry>(), 64);
    assert_eq!(size_of::<dsr_key>(), 36);
    assert_eq!(size_of::<lb_srcrange_key>(), 24);
}

#[test]
fn dsr_key_golden_encoding_and_roundtrip() {
    let k = DsrKey {
        frontend: "0.0.0.0".parse().unwrap(),
        backend: "10.244.2.11".parse().unwrap(),
        port: 30080,
        proto: Protocol::Udp,
    };
    assert_eq!(
        hex(&dsr_key(&k)),
        //  ::ffff:0.0.0.0 (any node address)  ::ffff:10.244.2.11
        "00000000000000000000ffff00000000".to_string()
            + "00000000000000000000ffff0af4020b"
            // port  udp  pad
            + "7580" + "11" + "00"
    );
    assert_eq!(decode_dsr_key(&dsr_key(&k)), Some(k));
}

#[test]
fn ct_flags_golden_encoding() {
    let r = |flags: u16| {
        let k = ct_key {
            proto: 6,
            ..Default::default()
        };
        let v = ct_entry {
            flags,
            ..Default::default()
        };
        decode_ct(&k, &v).unwrap()
    };
    assert!(r(0b1).snat && !r(0b1).established);
    assert!(r(0b10).established);
    assert!(r(0b100).closing);
    assert!(r(0b1000).dsr_encap && !r(0b1000).dsr_decap);
    assert!(r(0b10000).dsr_decap && !r(0b10000).dsr_encap);
}

#[test]
fn srcrange_key_golden_encoding_and_roundtrip() {
    let net: IpNet = "192.0.2.8/29".parse().unwrap();
    let k = srcrange_key(5, &net);
    assert_eq!(
        hex(&k),
        //  prefixlen 32+96+29  svc_id 5    ::ffff:192.0.2.8
        "9d000000".to_string() + "05000000" + "00000000000000000000ffffc0000208"
    );
    assert_eq!(decode_srcrange_key(&k), Some((5, net)));
    // Host bits are cleared; IPv6 keeps its own prefix length.
    let sloppy: IpNet = "192.0.2.9/29".parse().unwrap();
    assert_eq!(hex(&srcrange_key(5, &sloppy)), hex(&k));
    for v6 in ["2001:db8::/32", "::/0", "::fffe:0:0/95"] {
        let net: IpNet = v6.parse().unwrap();
        assert_eq!(decode_srcrange_key(&srcrange_key(9, &net)), Some((9, net)));
    }
    let all_v4: IpNet = "0.0.0.0/0".parse().unwrap();
    assert_eq!(srcrange_key(1, &all_v4).prefixlen, 32 + 96);
    assert_eq!(
        decode_srcrange_key(&srcrange_key(1, &all_v4)),
        Some((1, all_v4))
    );
}

#[test]
fn ct_key_golden_encoding_and_roundtrip() {
    let r = CtRecord {
        proto: Protocol::Tcp,
        dir: CtDir::Reply,
        src: "10.244.2.11:8080".parse().unwrap(),
        dst: "198.51.100.1:61000".parse().unwrap(),
        nat_src: "192.0.2.11:30080".parse().unwrap(),
        nat_dst: "192.0.2.9:40000".parse().unwrap(),
        backend_id: 3,
        svc_id: 2,
        snat: true,
        established: true,
        closing: false,
        dsr_encap: false,
        dsr_decap: false,
        created_ns: 1,
        expires_ns: 2,
    };
    let k = ct_key_of(&r);
    assert_eq!(
        hex(&k),
        //  ::ffff:10.244.2.11                ::ffff:198.51.100.1
        "00000000000000000000ffff0af4020b".to_string()
            + "00000000000000000000ffffc6336401"
            // sport dport  tcp  reply pad
            + "1f90" + "ee48" + "06" + "01" + "0000"
    );
    let v = ct_entry {
        nat_saddr: encode_ip(r.nat_src.ip()),
        nat_daddr: encode_ip(r.nat_dst.ip()),
        nat_sport: 30080u16.to_be(),
        nat_dport: 40000u16.to_be(),
        backend_id: 3,
        svc_id: 2,
        flags: 0b011,
        pad: 0,
        created_ns: 1,
        expires_ns: 2,
    };
    assert_eq!(decode_ct(&k, &v), Some(r));
}

#[test]
fn svc_key_encodes_ipv4_mapped_address_and_network_order_port() {
    let fe = Frontend::new("10.96.0.10".parse().unwrap(), 80, Protocol::Tcp);
    assert_eq!(
        hex(&svc_key(&fe, 2)),
        // ::ffff:10.96.0.10       port 80  slot 2  tcp ext pad
        "00000000000000000000ffff0a60000a".to_string() + "0050" + "0200" + "06" + "00" + "0000"
    );
    assert_eq!(decode_svc_key(&svc_key(&fe, 2)), Some((fe, 2)));
}

#[test]
fn ipv6_frontend_roundtrips() {
    let mut fe = Frontend::new("fd00:10:96::a".parse().unwrap(), 53, Protocol::Udp);
    fe.scope = Scope::Internal;
    assert_eq!(decode_svc_key(&svc_key(&fe, 0)), Some((fe, 0)));
    assert_eq!(
        hex(&svc_key(&fe, 0)),
        // fd00:10:96::a                   port 53  slot 0  udp int pad
        "fd00001000960000000000000000000a".to_string() + "0035" + "0000" + "11" + "01" + "0000"
    );
}

/// The hex encoding of master `m`, checked to decode back to `m`.
#[track_caller]
fn master_hex(m: MasterEntry) -> String {
    let v = svc_value(&SvcValue::Master(m));
    assert_eq!(decode_svc_value(0, &v), Some(SvcValue::Master(m)));
    hex(&v)
}

#[test]
fn master_value_golden_encoding() {
    let m = MasterEntry {
        svc_id: 7,
        count: 3,
        svc_type: ServiceType::ClusterIP,
        options: FrontendOptions {
            affinity_timeout: Some(10800),
            ..Default::default()
        },
        source_ranges: false,
    };
    //            backend_id count    svc_id   timeout  flags pad
    assert_eq!(
        master_hex(m),
        "00000000".to_string() + "03000000" + "07000000" + "302a0000" + "1100" + "0000"
    );
    // A LoadBalancer frontend with source ranges that admit the node.
    let lb = MasterEntry {
        svc_type: ServiceType::LoadBalancer,
        options: FrontendOptions {
            source_ranges_admit_node: true,
            ..Default::default()
        },
        source_ranges: true,
        ..m
    };
    assert_eq!(
        master_hex(lb)[32..36],
        *"0403",
        "LOADBALANCER | SRC_RANGE | SRC_RANGE_NODE"
    );
}

#[test]
fn maglev_master_golden_encoding() {
    let m = MasterEntry {
        svc_id: 2,
        count: 4,
        svc_type: ServiceType::NodePort,
        options: FrontendOptions {
            maglev: true,
            ..Default::default()
        },
        source_ranges: false,
    };
    //            backend_id count    svc_id   timeout  flags (NODE_PORT | MAGLEV) pad
    assert_eq!(
        master_hex(m),
        "00000000".to_string() + "04000000" + "02000000" + "00000000" + "0204" + "0000"
    );
    // Maglev and source ranges together: distinct bits, all kept.
    let lb = MasterEntry {
        svc_type: ServiceType::LoadBalancer,
        options: FrontendOptions {
            maglev: true,
            source_ranges_admit_node: true,
            ..Default::default()
        },
        source_ranges: true,
        ..m
    };
    assert_eq!(
        master_hex(lb)[32..36],
        *"0407",
        "LOADBALANCER | SRC_RANGE | SRC_RANGE_NODE | MAGLEV"
    );
}

#[test]
fn backend_golden_encoding() {
    let b = BackendEntry {
        addr: L4Addr {
            ip: "10.244.0.11".parse().unwrap(),
            port: 8080,
            proto: Protocol::Tcp,
        },
        state: BackendState::Terminating,
        local: true,
    };
    let v = backend_value(&b);
    assert_eq!(
        hex(&v),
        //      ::ffff:10.244.0.11        port  tcp  term  local pad
        "00000000000000000000ffff0af4000b".to_string() + "1f90" + "06" + "01" + "01" + "000000"
    );
    assert_eq!(decode_backend(&v), Some(b));
    // An entry of an older agent (flags were padding, zero) is remote.
    let old = lb_backend { flags: 0, ..v };
    assert_eq!(decode_backend(&old).map(|b| b.local), Some(false));
}

#[test]
fn port_reject_golden_encoding_and_roundtrip() {
    let k = port_reject_key("10.96.0.10".parse().unwrap());
    assert_eq!(
        hex(&k),
        //  ::ffff:10.96.0.10                 port slot  proto scope pad
        "00000000000000000000ffff0a60000a".to_string() + "0000" + "0000" + "00" + "00" + "0000"
    );
    let v = port_reject_value();
    // backend_id count svc_id affinity flags (1 << 11) pad
    assert_eq!(
        hex(&v),
        "00000000".to_string() + "00000000" + "00000000" + "00000000" + "0008" + "0000"
    );
    assert_eq!(
        decode_port_reject(&k, &v),
        Some("10.96.0.10".parse().unwrap())
    );
    // Not a frontend key (no protocol), and a frontend's master is no
    // port-reject entry.
    assert_eq!(decode_svc_key(&k), None);
    let fe = Frontend::new("10.96.0.10".parse().unwrap(), 80, Protocol::Tcp);
    assert_eq!(decode_port_reject(&svc_key(&fe, 0), &v), None);
    let v6 = port_reject_key("fd00:10:96::a".parse().unwrap());
    assert_eq!(
        decode_port_reject(&v6, &v),
        Some("fd00:10:96::a".parse().unwrap())
    );
}
