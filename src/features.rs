//! Kernel features kpr uses, probed at start. With
//! `--kube-proxy-replacement strict` a missing one stops the agent with its
//! name and the kernel option that provides it; with `partial` the agent
//! runs with what there is (hooks the kernel lacks are left out) and
//! reports the rest.
//!
//! Test-only: `KPR_TEST_MISSING_FEATURES=name,name` makes the probe report
//! those features missing, to exercise the strict path on a complete kernel.

#![deny(unsafe_code)]

use std::path::Path;

use serde::{Deserialize, Serialize};

use libbpf_sys as sys;

use crate::datapath::hooks::{HookKind, SockHook};
use crate::datapath::sys as ffi;

/// `--kube-proxy-replacement`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KprMode {
    /// Every feature is required; a missing one is a start-up error.
    // The flag's default too.
    #[default]
    Strict,
    /// Run with the features the kernel has; report the missing ones.
    Partial,
}

/// One probed feature.
#[derive(Clone, Debug, Serialize)]
pub struct Feature {
    pub name: &'static str,
    /// The kernel option (or mount) that provides it.
    pub kernel_config: &'static str,
    /// What kpr uses it for.
    pub used_for: &'static str,
    pub available: bool,
    /// Whether the datapath kpr loads today uses it (strict mode requires
    /// exactly these); the others are reported for what comes next.
    pub required: bool,
}

/// tcx: where it is missing, north-south attaches through classic tc
/// (`--tc-attach auto`), so it is reported, never required.
pub const TCX: &str = "tcx";

/// Whether `features` say tcx is there.
pub fn has_tcx(features: &[Feature]) -> bool {
    features.iter().any(|f| f.name == TCX && f.available)
}

/// The feature bind protection needs besides its hooks: telling the node's
/// own sockets from pods' by network namespace cookie.
pub const NETNS_COOKIE_SOCKOPT: &str = "sockopt_netns_cookie";

fn prog_type_supported(t: sys::bpf_prog_type) -> bool {
    ffi::probe_prog_type(t)
}

fn helper_supported(t: sys::bpf_prog_type, helper: sys::bpf_func_id) -> bool {
    ffi::probe_helper(t, helper)
}

/// One BPF instruction without registers or offset: `code` with `imm`.
fn insn(code: u8, imm: i32) -> sys::bpf_insn {
    sys::bpf_insn {
        code,
        _bitfield_align_1: [],
        _bitfield_1: sys::bpf_insn::new_bitfield_1(0, 0),
        off: 0,
        imm,
    }
}

/// Whether the kernel loads a `return 1` cgroup sock_addr program for
/// `attach` (the kernel rejects attach types it does not know).
fn sock_addr_hook_supported(attach: sys::bpf_attach_type) -> bool {
    // r0 = 1; exit
    let insns = [insn(0xb7, 1), insn(0x95, 0)];
    ffi::prog_loads(sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, attach, &insns)
}

/// Whether the kernel loads a cgroup sock program for `attach` that calls
/// bpf_get_netns_cookie, as the post_bind hooks do.
fn sock_hook_supported(attach: sys::bpf_attach_type) -> bool {
    // call bpf_get_netns_cookie (r1 = ctx already); r0 = 1; exit
    let insns = [
        insn(0x85, sys::BPF_FUNC_get_netns_cookie as i32),
        insn(0xb7, 1),
        insn(0x95, 0),
    ];
    ffi::prog_loads(sys::BPF_PROG_TYPE_CGROUP_SOCK, attach, &insns)
}

/// The cookie of this process's network namespace (SO_NETNS_COOKIE, kernel
/// 5.14+), the value `bpf_get_netns_cookie` gives for its sockets.
pub fn own_netns_cookie() -> Option<u64> {
    ffi::own_netns_cookie()
}

/// Probes every feature kpr uses.
pub fn probe() -> Vec<Feature> {
    let missing_override: Vec<String> = std::env::var("KPR_TEST_MISSING_FEATURES")
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
        .unwrap_or_default();
    let bpf = prog_type_supported(sys::BPF_PROG_TYPE_SOCKET_FILTER);
    let sock_addr = bpf && prog_type_supported(sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR);
    let mut features = vec![
        Feature {
            name: "bpf_syscall",
            kernel_config: "CONFIG_BPF_SYSCALL",
            used_for: "everything",
            available: bpf,
            required: true,
        },
        Feature {
            name: "btf",
            kernel_config: "CONFIG_DEBUG_INFO_BTF",
            used_for: "kernel type information for the BPF programs",
            available: Path::new("/sys/kernel/btf/vmlinux").exists(),
            required: true,
        },
        Feature {
            name: "cgroup_v2",
            kernel_config: "CONFIG_CGROUPS (and a mounted cgroup2 file system)",
            used_for: "socket-LB attach point",
            available: crate::host::cgroup2_mount().is_ok(),
            required: true,
        },
        Feature {
            name: "cgroup_sock_addr",
            kernel_config: "CONFIG_CGROUP_BPF",
            used_for: "socket-LB programs",
            available: sock_addr,
            required: true,
        },
    ];
    for hook in SockHook::of_kind(HookKind::Translation) {
        features.push(Feature {
            name: hook.feature(),
            kernel_config:
                "CONFIG_CGROUP_BPF (connect: 4.17, sendmsg: 4.18, recvmsg: 5.2, getpeername: 5.8)",
            used_for: "socket-LB hook",
            available: sock_addr && sock_addr_hook_supported(hook.attach_type()),
            required: true,
        });
    }
    for hook in SockHook::of_kind(HookKind::BindProtection) {
        features.push(Feature {
            name: hook.feature(),
            kernel_config: "CONFIG_CGROUP_BPF (post_bind: 4.17; netns cookie in it: 5.8)",
            used_for: "NodePort bind protection",
            available: bpf && sock_hook_supported(hook.attach_type()),
            required: true,
        });
    }
    for hook in SockHook::of_kind(HookKind::PodSourceRanges) {
        features.push(Feature {
            name: hook.feature(),
            kernel_config: "CONFIG_CGROUP_BPF (cgroup skb egress; socket local storage in it and in connect/sendmsg)",
            used_for: "loadBalancerSourceRanges of pods' sockets by their real source address",
            available: sock_addr
                && prog_type_supported(sys::BPF_PROG_TYPE_CGROUP_SKB)
                && helper_supported(sys::BPF_PROG_TYPE_CGROUP_SKB, sys::BPF_FUNC_sk_storage_get)
                && helper_supported(
                    sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                    sys::BPF_FUNC_sk_storage_get,
                ),
            required: true,
        });
    }
    features.push(Feature {
        name: NETNS_COOKIE_SOCKOPT,
        kernel_config: "kernel >= 5.14 (SO_NETNS_COOKIE)",
        used_for: "NodePort bind protection: the node's own sockets only, not pods'",
        available: own_netns_cookie().is_some(),
        required: true,
    });
    features.extend([
        Feature {
            name: "helper_set_retval",
            kernel_config: "kernel >= 5.18",
            used_for:
                "ECONNREFUSED for frontends without backends, EADDRINUSE for protected NodePorts",
            available: sock_addr
                && helper_supported(
                    sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                    sys::BPF_FUNC_set_retval,
                ),
            required: true,
        },
        Feature {
            name: "helper_netns_cookie",
            kernel_config: "kernel >= 5.7",
            used_for: "session affinity per client network namespace",
            available: sock_addr
                && helper_supported(
                    sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                    sys::BPF_FUNC_get_netns_cookie,
                ),
            required: true,
        },
        Feature {
            name: "xdp",
            kernel_config: "CONFIG_BPF_SYSCALL, CONFIG_NET (driver support for native mode)",
            used_for: "NodePort acceleration",
            available: bpf && prog_type_supported(sys::BPF_PROG_TYPE_XDP),
            required: true,
        },
        Feature {
            name: "tc_bpf",
            kernel_config: "CONFIG_NET_CLS_BPF, CONFIG_NET_SCH_INGRESS",
            used_for: "NodePort replies and SNAT",
            available: bpf && prog_type_supported(sys::BPF_PROG_TYPE_SCHED_CLS),
            required: true,
        },
        Feature {
            name: TCX,
            kernel_config: "CONFIG_NET_XGRESS (kernel >= 6.6)",
            used_for: "north-south tc programs as pinned links (else classic tc filters)",
            available: bpf && ffi::tcx_supported(),
            required: true,
        },
    ]);
    for f in &mut features {
        if missing_override.iter().any(|m| m == f.name) {
            f.available = false;
        }
        // BTF and the north-south hooks are not used by the socket path:
        // report them, don't require them (a 6.1 kernel without tcx runs
        // socket LB fine, and north-south through classic tc).
        f.required = !matches!(f.name, "btf" | "xdp" | "tc_bpf" | "tcx");
    }
    features
}

/// The missing required features, as one error line per feature.
pub fn missing(features: &[Feature]) -> Vec<String> {
    features
        .iter()
        .filter(|f| f.required && !f.available)
        .map(|f| {
            format!(
                "{} (needs {}; used for {})",
                f.name, f.kernel_config, f.used_for
            )
        })
        .collect()
}

/// Whether kube-proxy's rules are on this node (they would fight kpr for
/// the same traffic): the iptables KUBE-SERVICES chain or the nftables
/// `kube-proxy` table. Returns what was found.
pub fn kube_proxy_rules() -> Vec<String> {
    let mut found = Vec::new();
    if let Some(out) = run_bounded("iptables-save", &["-t", "nat"]) {
        if out.contains(":KUBE-SERVICES") {
            found.push("iptables chain KUBE-SERVICES (nat)".to_string());
        }
    }
    if let Some(out) = run_bounded("nft", &["list", "tables"]) {
        if out
            .lines()
            .any(|l| l.trim() == "table ip kube-proxy" || l.trim() == "table ip6 kube-proxy")
        {
            found.push("nftables table kube-proxy".to_string());
        }
    }
    found
}

/// stdout of a command that exits 0 within 5 s; None otherwise or if absent.
/// The output is read while the command runs: a ruleset larger than a pipe
/// buffer would otherwise block it until the timeout.
fn run_bounded(cmd: &str, args: &[&str]) -> Option<String> {
    let child = std::process::Command::new(cmd)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(5)) {
        Ok(Ok(out)) if out.status.success() => {
            Some(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Ok(_) => None,
        Err(_) => {
            // Ours, by PID; the waiting thread reaps it.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            None
        }
    }
}
