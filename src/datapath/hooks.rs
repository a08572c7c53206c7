//! The socket-LB hooks (bpf/sock_lb.bpf.c): one enum, and for each hook
//! its attach point name, kernel attach type, feature name and program,
//! all by exhaustive match — a new hook does not compile until every one
//! is given. All attach to the agent's cgroup.

#![deny(unsafe_code)]

use libbpf_rs::ProgramMut;
use serde::Serialize;

use crate::datapath::skel::sock_lb::SockLbSkel;

/// A socket-LB hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SockHook {
    Connect4,
    Connect6,
    Sendmsg4,
    Sendmsg6,
    Recvmsg4,
    Recvmsg6,
    Getpeername4,
    Getpeername6,
    /// NodePort bind protection.
    PostBind4,
    /// NodePort bind protection.
    PostBind6,
    /// loadBalancerSourceRanges of pods' unbound sockets, by the source
    /// address of their first packet (cgroup_skb/egress).
    SkbEgress,
}

/// What a hook is for: translation (cgroup sock_addr programs), NodePort
/// bind protection (cgroup sock programs) or pods' source ranges (a
/// cgroup skb program).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookKind {
    Translation,
    BindProtection,
    /// Without it, a pod's unbound socket is judged by the node's
    /// addresses (partial mode on a kernel that lacks it).
    PodSourceRanges,
}

impl SockHook {
    /// Every hook: the translating ones, the bind protection ones, then
    /// the pods' source ranges.
    pub const ALL: [SockHook; 11] = [
        SockHook::Connect4,
        SockHook::Connect6,
        SockHook::Sendmsg4,
        SockHook::Sendmsg6,
        SockHook::Recvmsg4,
        SockHook::Recvmsg6,
        SockHook::Getpeername4,
        SockHook::Getpeername6,
        SockHook::PostBind4,
        SockHook::PostBind6,
        SockHook::SkbEgress,
    ];

    /// The attach point, as links are pinned (`links/sock_<attach point>`)
    /// and `kpr status` lists them.
    pub fn attach_point(self) -> &'static str {
        match self {
            SockHook::Connect4 => "connect4",
            SockHook::Connect6 => "connect6",
            SockHook::Sendmsg4 => "sendmsg4",
            SockHook::Sendmsg6 => "sendmsg6",
            SockHook::Recvmsg4 => "recvmsg4",
            SockHook::Recvmsg6 => "recvmsg6",
            SockHook::Getpeername4 => "getpeername4",
            SockHook::Getpeername6 => "getpeername6",
            SockHook::PostBind4 => "post_bind4",
            SockHook::PostBind6 => "post_bind6",
            SockHook::SkbEgress => "skb_egress",
        }
    }

    /// The kernel attach type.
    pub fn attach_type(self) -> libbpf_sys::bpf_attach_type {
        match self {
            SockHook::Connect4 => libbpf_sys::BPF_CGROUP_INET4_CONNECT,
            SockHook::Connect6 => libbpf_sys::BPF_CGROUP_INET6_CONNECT,
            SockHook::Sendmsg4 => libbpf_sys::BPF_CGROUP_UDP4_SENDMSG,
            SockHook::Sendmsg6 => libbpf_sys::BPF_CGROUP_UDP6_SENDMSG,
            SockHook::Recvmsg4 => libbpf_sys::BPF_CGROUP_UDP4_RECVMSG,
            SockHook::Recvmsg6 => libbpf_sys::BPF_CGROUP_UDP6_RECVMSG,
            SockHook::Getpeername4 => libbpf_sys::BPF_CGROUP_INET4_GETPEERNAME,
            SockHook::Getpeername6 => libbpf_sys::BPF_CGROUP_INET6_GETPEERNAME,
            SockHook::PostBind4 => libbpf_sys::BPF_CGROUP_INET4_POST_BIND,
            SockHook::PostBind6 => libbpf_sys::BPF_CGROUP_INET6_POST_BIND,
            SockHook::SkbEgress => libbpf_sys::BPF_CGROUP_INET_EGRESS,
        }
    }

    /// The kernel feature (`kpr features`) the hook needs.
    pub fn feature(self) -> &'static str {
        match self {
            SockHook::Connect4 => "cgroup_connect4",
            SockHook::Connect6 => "cgroup_connect6",
            SockHook::Sendmsg4 => "cgroup_sendmsg4",
            SockHook::Sendmsg6 => "cgroup_sendmsg6",
            SockHook::Recvmsg4 => "cgroup_recvmsg4",
            SockHook::Recvmsg6 => "cgroup_recvmsg6",
            SockHook::Getpeername4 => "cgroup_getpeername4",
            SockHook::Getpeername6 => "cgroup_getpeername6",
            SockHook::PostBind4 => "cgroup_post_bind4",
            SockHook::PostBind6 => "cgroup_post_bind6",
            SockHook::SkbEgress => "cgroup_skb_egress",
        }
    }

    pub fn kind(self) -> HookKind {
        match self {
            SockHook::PostBind4 | SockHook::PostBind6 => HookKind::BindProtection,
            SockHook::SkbEgress => HookKind::PodSourceRanges,
            SockHook::Connect4
            | SockHook::Connect6
            | SockHook::Sendmsg4
            | SockHook::Sendmsg6
            | SockHook::Recvmsg4
            | SockHook::Recvmsg6
            | SockHook::Getpeername4
            | SockHook::Getpeername6 => HookKind::Translation,
        }
    }

    /// The hooks of `kind`.
    pub fn of_kind(kind: HookKind) -> impl Iterator<Item = SockHook> {
        SockHook::ALL.into_iter().filter(move |h| h.kind() == kind)
    }

    /// The hook's program in the loaded socket-LB object.
    pub fn program<'a>(self, skel: &'a SockLbSkel<'_>) -> &'a ProgramMut<'a> {
        let p = &skel.progs;
        match self {
            SockHook::Connect4 => &p.kpr_connect4,
            SockHook::Connect6 => &p.kpr_connect6,
            SockHook::Sendmsg4 => &p.kpr_sendmsg4,
            SockHook::Sendmsg6 => &p.kpr_sendmsg6,
            SockHook::Recvmsg4 => &p.kpr_recvmsg4,
            SockHook::Recvmsg6 => &p.kpr_recvmsg6,
            SockHook::Getpeername4 => &p.kpr_getpeername4,
            SockHook::Getpeername6 => &p.kpr_getpeername6,
            SockHook::PostBind4 => &p.kpr_post_bind4,
            SockHook::PostBind6 => &p.kpr_post_bind6,
            SockHook::SkbEgress => &p.kpr_skb_egress,
        }
    }

    /// The program's name in bpf/sock_lb.bpf.c.
    pub fn program_name(self) -> String {
        format!("kpr_{}", self.attach_point())
    }
}

impl std::fmt::Display for SockHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.attach_point())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_points_programs_and_features_are_distinct_and_aligned() {
        let points: std::collections::BTreeSet<_> =
            SockHook::ALL.iter().map(|h| h.attach_point()).collect();
        assert_eq!(points.len(), SockHook::ALL.len());
        for h in SockHook::ALL {
            assert_eq!(h.feature(), format!("cgroup_{}", h.attach_point()));
            assert_eq!(h.program_name(), format!("kpr_{}", h.attach_point()));
        }
        assert_eq!(SockHook::of_kind(HookKind::BindProtection).count(), 2);
        assert_eq!(SockHook::of_kind(HookKind::PodSourceRanges).count(), 1);
    }
}
