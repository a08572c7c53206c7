//! One load-balancing event of the ring buffer (struct lb_event of
//! bpf/include/lb_monitor.h), decoded, and its names.

#![deny(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

use crate::datapath::lb_stats::Verdict;

/// Bytes of struct lb_event.
pub const EVENT_SIZE: usize = 80;

/// Where the decision was taken (enum lb_hook).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    Connect,
    Sendmsg,
    Bind,
    Tc,
    Xdp,
    Unknown,
}

impl Hook {
    fn from_bpf(v: u8) -> Hook {
        match v {
            0 => Hook::Connect,
            1 => Hook::Sendmsg,
            2 => Hook::Bind,
            3 => Hook::Tc,
            4 => Hook::Xdp,
            _ => Hook::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Connect => "connect",
            Hook::Sendmsg => "sendmsg",
            Hook::Bind => "bind",
            Hook::Tc => "tc",
            Hook::Xdp => "xdp",
            Hook::Unknown => "unknown",
        }
    }
}

/// Why that backend (enum lb_reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    None,
    Random,
    Affinity,
    Maglev,
    Conntrack,
}

impl Reason {
    fn from_bpf(v: u8) -> Reason {
        match v {
            1 => Reason::Random,
            2 => Reason::Affinity,
            3 => Reason::Maglev,
            4 => Reason::Conntrack,
            _ => Reason::None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::None => "none",
            Reason::Random => "random",
            Reason::Affinity => "affinity",
            Reason::Maglev => "maglev",
            Reason::Conntrack => "conntrack",
        }
    }
}

/// An event as the datapath wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawEvent {
    pub ts_ns: u64,
    pub netns_cookie: u64,
    pub cgroup_id: u64,
    pub client: IpAddr,
    pub client_port: u16,
    pub frontend: IpAddr,
    pub frontend_port: u16,
    pub svc_id: u32,
    pub backend_id: u32,
    pub pid: u32,
    pub hook: Hook,
    pub verdict: Option<Verdict>,
    pub reason: Reason,
    /// IP protocol number.
    pub proto: u8,
}

/// A 16-byte address, IPv4-mapped for IPv4, as the plain address.
fn addr16(b: &[u8]) -> IpAddr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    let v6 = Ipv6Addr::from(a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None if v6.is_unspecified() => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        None => IpAddr::V6(v6),
    }
}

impl RawEvent {
    /// Decodes one ring buffer record; None when it is too short.
    pub fn decode(b: &[u8]) -> Option<RawEvent> {
        if b.len() < EVENT_SIZE {
            return None;
        }
        let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let be16_at = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
        Some(RawEvent {
            ts_ns: u64_at(0),
            netns_cookie: u64_at(8),
            cgroup_id: u64_at(16),
            client: addr16(&b[24..40]),
            frontend: addr16(&b[40..56]),
            client_port: be16_at(56),
            frontend_port: be16_at(58),
            svc_id: u32_at(60),
            backend_id: u32_at(64),
            pid: u32_at(68),
            hook: Hook::from_bpf(b[72]),
            verdict: Verdict::from_bpf(b[73]),
            reason: Reason::from_bpf(b[74]),
            proto: b[75],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::skel::sock_lb::types::lb_event;
    use std::mem::offset_of;

    #[test]
    fn offsets_are_the_bpf_structs() {
        assert_eq!(std::mem::size_of::<lb_event>(), EVENT_SIZE);
        assert_eq!(offset_of!(lb_event, client), 24);
        assert_eq!(offset_of!(lb_event, frontend), 40);
        assert_eq!(offset_of!(lb_event, client_port), 56);
        assert_eq!(offset_of!(lb_event, svc_id), 60);
        assert_eq!(offset_of!(lb_event, pid), 68);
        assert_eq!(offset_of!(lb_event, hook), 72);
        assert_eq!(offset_of!(lb_event, proto), 75);
    }

    #[test]
    fn an_ipv4_connect_decodes() {
        let mut b = [0u8; EVENT_SIZE];
        b[8..16].copy_from_slice(&7u64.to_ne_bytes());
        b[34..36].copy_from_slice(&[0xff, 0xff]);
        b[36..40].copy_from_slice(&[10, 0, 0, 1]);
        b[50..52].copy_from_slice(&[0xff, 0xff]);
        b[52..56].copy_from_slice(&[10, 96, 0, 10]);
        b[56..58].copy_from_slice(&40000u16.to_be_bytes());
        b[58..60].copy_from_slice(&80u16.to_be_bytes());
        b[60..64].copy_from_slice(&3u32.to_ne_bytes());
        b[64..68].copy_from_slice(&9u32.to_ne_bytes());
        b[73] = 0;
        b[74] = 2;
        b[75] = 6;
        let e = RawEvent::decode(&b).unwrap();
        assert_eq!(e.client, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(e.frontend_port, 80);
        assert_eq!(e.client_port, 40000);
        assert_eq!((e.svc_id, e.backend_id), (3, 9));
        assert_eq!(e.verdict, Some(Verdict::Translated));
        assert_eq!(e.reason, Reason::Affinity);
        assert_eq!(e.hook, Hook::Connect);
        assert_eq!(e.netns_cookie, 7);
    }
}
