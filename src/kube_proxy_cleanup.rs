//! `kpr cleanup --kube-proxy`: removes what kube-proxy leaves on a node once
//! it is gone, as `kube-proxy --cleanup` does, so that its stale DNAT rules
//! cannot answer for Services that kpr now serves.
//!
//! What kube-proxy creates, by mode (kubernetes/kubernetes pkg/proxy):
//! - iptables and IPVS modes: chains in the `nat`, `filter` and `mangle`
//!   tables of iptables and ip6tables, and the rules in the built-in chains
//!   that jump to them. A node may hold them in the legacy (x_tables) and in
//!   the nf_tables backend of iptables, so both are cleaned.
//! - nftables mode: the tables `ip kube-proxy` and `ip6 kube-proxy`.
//! - IPVS mode: the dummy device `kube-ipvs0` holding every ClusterIP.
//!
//! Chains of other owners stay, also those named `KUBE-*` that are kubelet's
//! (`KUBE-FIREWALL` in `filter`, `KUBE-KUBELET-CANARY`, `KUBE-MARK-DROP`);
//! rules of other owners stay, except those jumping to a removed chain. The
//! work goes through the distribution's `iptables-save`/`iptables-restore`
//! and `nft`, in the network namespace kpr runs in; a missing tool means
//! that backend is skipped and said so. Not removed: IPVS virtual servers
//! (`ipvsadm --clear`) and IPVS mode's `KUBE-*` ipsets (`ipset destroy`).

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// kube-proxy's nftables table, in both families it uses.
const NFT_TABLE: &str = "kube-proxy";
const NFT_FAMILIES: [&str; 2] = ["ip", "ip6"];

/// IPVS mode's dummy device, which holds every ClusterIP as a local address.
pub const IPVS_DEVICE: &str = "kube-ipvs0";

/// kube-proxy's fixed chain names, by table: the iptables mode's
/// (CleanupLeftovers), the IPVS mode's (iptablesCleanupChains), and the
/// older releases' (`KUBE-FIREWALL` of IPVS mode's `nat` table).
const CHAINS: &[(&str, &[&str])] = &[
    (
        "nat",
        &[
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
            "KUBE-PROXY-CANARY",
            "KUBE-NODE-PORT",
            "KUBE-LOAD-BALANCER",
            "KUBE-FIREWALL",
        ],
    ),
    (
        "filter",
        &[
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-FORWARD",
            "KUBE-NODEPORTS",
            "KUBE-NODE-PORT",
            "KUBE-PROXY-FIREWALL",
            "KUBE-SOURCE-RANGES-FIREWALL",
            "KUBE-IPVS-FILTER",
            "KUBE-IPVS-OUT-FILTER",
            "KUBE-PROXY-CANARY",
        ],
    ),
    ("mangle", &["KUBE-PROXY-CANARY"]),
];

/// Prefixes of the per-Service and per-endpoint chains (`nat` table):
/// cluster, local, endpoint, firewall and external chains, and `KUBE-XLB-`
/// of releases before 1.24.
const SERVICE_CHAIN_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-EXT-",
    "KUBE-XLB-",
];

/// One iptables backend and family: the save and restore commands.
struct Backend {
    name: &'static str,
    save: &'static str,
    restore: &'static str,
}

const BACKENDS: &[Backend] = &[
    Backend {
        name: "iptables-legacy",
        save: "iptables-legacy-save",
        restore: "iptables-legacy-restore",
    },
    Backend {
        name: "ip6tables-legacy",
        save: "ip6tables-legacy-save",
        restore: "ip6tables-legacy-restore",
    },
    Backend {
        name: "iptables-nft",
        save: "iptables-nft-save",
        restore: "iptables-nft-restore",
    },
    Backend {
        name: "ip6tables-nft",
        save: "ip6tables-nft-save",
        restore: "ip6tables-nft-restore",
    },
];

/// What `kpr cleanup --kube-proxy` removed, and what it could not look at.
#[derive(Debug, Default, Serialize)]
pub struct KubeProxyCleanup {
    /// `BACKEND TABLE CHAIN` of every chain removed.
    pub chains: Vec<String>,
    /// Rules of other chains removed because they jumped to one of them.
    pub jump_rules: usize,
    /// `FAMILY kube-proxy` of every nftables table removed.
    pub nft_tables: Vec<String>,
    /// Devices removed (`kube-ipvs0`).
    pub devices: Vec<String>,
    /// Tools not installed, so not looked at.
    pub missing_tools: Vec<String>,
}

impl KubeProxyCleanup {
    /// One line for the command's output.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "removed {} kube-proxy iptables chains and {} jump rules, {} nftables tables, {} devices",
            self.chains.len(),
            self.jump_rules,
            self.nft_tables.len(),
            self.devices.len()
        );
        if !self.missing_tools.is_empty() {
            s.push_str(&format!(
                " (not installed, skipped: {})",
                self.missing_tools.join(", ")
            ));
        }
        s
    }
}

/// Removes kube-proxy's iptables chains (both backends, both families), its
/// nftables tables and its IPVS device from the current network namespace.
/// Idempotent: a second run removes nothing.
pub fn cleanup() -> Result<KubeProxyCleanup> {
    let mut report = KubeProxyCleanup::default();
    for backend in BACKENDS {
        let Some(saved) = run(backend.save, &[], None)? else {
            report.missing_tools.push(backend.save.to_string());
            continue;
        };
        let plan = plan(&saved);
        if plan.chains.is_empty() {
            continue;
        }
        if run(backend.restore, &["--noflush"], Some(&plan.restore))?.is_none() {
            report.missing_tools.push(backend.restore.to_string());
            continue;
        }
        report.jump_rules += plan.jump_rules;
        report.chains.extend(
            plan.chains
                .iter()
                .map(|(table, chain)| format!("{} {table} {chain}", backend.name)),
        );
    }
    match run("nft", &["list", "tables"], None)? {
        None => report.missing_tools.push("nft".to_string()),
        Some(tables) => {
            for family in NFT_FAMILIES {
                if tables
                    .lines()
                    .any(|l| l.trim() == format!("table {family} {NFT_TABLE}"))
                {
                    run("nft", &["delete", "table", family, NFT_TABLE], None)?;
                    report.nft_tables.push(format!("{family} {NFT_TABLE}"));
                }
            }
        }
    }
    // if_nametoindex asks the current network namespace (/sys/class/net
    // shows the one sysfs was mounted in).
    if nix::net::if_::if_nametoindex(IPVS_DEVICE).is_ok() {
        match run("ip", &["link", "delete", IPVS_DEVICE], None)? {
            Some(_) => report.devices.push(IPVS_DEVICE.to_string()),
            None => report.missing_tools.push("ip".to_string()),
        }
    }
    Ok(report)
}

/// The `iptables-restore --noflush` input removing kube-proxy's chains from
/// one backend's `iptables-save` output.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    restore: String,
    /// (table, chain) removed.
    chains: Vec<(String, String)>,
    jump_rules: usize,
}

/// Whether `chain` of `table` is kube-proxy's.
fn is_kube_proxy_chain(table: &str, chain: &str) -> bool {
    CHAINS
        .iter()
        .any(|(t, names)| *t == table && names.contains(&chain))
        || (table == "nat" && SERVICE_CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p)))
}

/// For every table holding kube-proxy chains: flush them (a chain line in
/// `--noflush` mode empties the chain), delete the rules of other chains
/// that jump to them, then delete them, in one commit per table, as
/// kube-proxy's own cleanup does.
fn plan(saved: &str) -> Plan {
    let mut plan = Plan::default();
    let mut table: Option<&str> = None;
    let mut chains: BTreeSet<&str> = BTreeSet::new();
    let mut rules: Vec<(&str, &str)> = Vec::new();
    for line in saved.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = Some(name.trim());
            chains.clear();
            rules.clear();
        } else if let Some(decl) = line.strip_prefix(':') {
            if let Some(chain) = decl.split_whitespace().next() {
                chains.insert(chain);
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            if let Some((chain, spec)) = rule.split_once(' ') {
                rules.push((chain, spec));
            }
        } else if line.trim() == "COMMIT" {
            if let Some(t) = table.take() {
                plan_table(t, &chains, &rules, &mut plan);
            }
        }
    }
    plan
}

fn plan_table(table: &str, chains: &BTreeSet<&str>, rules: &[(&str, &str)], plan: &mut Plan) {
    let doomed: Vec<&str> = chains
        .iter()
        .copied()
        .filter(|c| is_kube_proxy_chain(table, c))
        .collect();
    if doomed.is_empty() {
        return;
    }
    let mut text = format!("*{table}\n");
    for chain in &doomed {
        text.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for (chain, spec) in rules {
        if doomed.contains(chain) {
            continue; // flushed with its chain
        }
        if jump_target(spec).is_some_and(|target| doomed.contains(&target)) {
            text.push_str(&format!("-D {chain} {spec}\n"));
            plan.jump_rules += 1;
        }
    }
    for chain in &doomed {
        text.push_str(&format!("-X {chain}\n"));
        plan.chains.push((table.to_string(), chain.to_string()));
    }
    text.push_str("COMMIT\n");
    plan.restore.push_str(&text);
}

/// The chain a rule jumps or goes to (`-j`/`-g`), skipping quoted strings
/// (a comment may contain "-j").
fn jump_target(spec: &str) -> Option<&str> {
    let mut words = Vec::new();
    let mut rest = spec.trim_start();
    while !rest.is_empty() {
        let end = if let Some(quoted) = rest.strip_prefix('"') {
            // iptables-save escapes a quote inside as \".
            let mut i = 0;
            let bytes = quoted.as_bytes();
            while i < bytes.len() && !(bytes[i] == b'"' && (i == 0 || bytes[i - 1] != b'\\')) {
                i += 1;
            }
            (i + 2).min(rest.len())
        } else {
            rest.find(' ').unwrap_or(rest.len())
        };
        words.push(&rest[..end]);
        rest = rest[end..].trim_start();
    }
    words
        .windows(2)
        .find(|w| matches!(w[0], "-j" | "--jump" | "-g" | "--goto"))
        .map(|w| w[1])
}

/// Runs a tool; `None` when it is not installed. Fails with its stderr when
/// it fails.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<Option<String>> {
    let child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        other => other.with_context(|| format!("running {program}"))?,
    };
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .with_context(|| format!("writing to {program}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = r#"# Generated by iptables-save v1.8.9 (legacy)
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -m comment --comment "kubernetes service portals -j KUBE-FORWARD" -m conntrack --ctstate NEW -j KUBE-SERVICES
-A INPUT -j KUBE-FIREWALL
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SEP-AAAA - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-BBBB - [0:0]
:MY-NAT - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -j MY-NAT
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -j KUBE-SVC-BBBB
-A KUBE-SVC-BBBB -j KUBE-SEP-AAAA
-A MY-NAT -o eth9 -g KUBE-SVC-BBBB
COMMIT
"#;

    #[test]
    fn the_plan_removes_kube_proxy_chains_and_jumps_to_them_and_nothing_else() {
        let plan = plan(SAVED);
        let chains: Vec<String> = plan
            .chains
            .iter()
            .map(|(t, c)| format!("{t} {c}"))
            .collect();
        assert_eq!(
            chains,
            [
                "mangle KUBE-PROXY-CANARY",
                "filter KUBE-FORWARD",
                "filter KUBE-SERVICES",
                "nat KUBE-SEP-AAAA",
                "nat KUBE-SERVICES",
                "nat KUBE-SVC-BBBB"
            ]
        );
        assert_eq!(plan.jump_rules, 4);
        assert_eq!(
            plan.restore,
            "*mangle\n:KUBE-PROXY-CANARY - [0:0]\n-X KUBE-PROXY-CANARY\nCOMMIT\n\
             *filter\n:KUBE-FORWARD - [0:0]\n:KUBE-SERVICES - [0:0]\n\
             -D INPUT -m comment --comment \"kubernetes service portals -j KUBE-FORWARD\" -m conntrack --ctstate NEW -j KUBE-SERVICES\n\
             -D FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
             -X KUBE-FORWARD\n-X KUBE-SERVICES\nCOMMIT\n\
             *nat\n:KUBE-SEP-AAAA - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-BBBB - [0:0]\n\
             -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -D MY-NAT -o eth9 -g KUBE-SVC-BBBB\n\
             -X KUBE-SEP-AAAA\n-X KUBE-SERVICES\n-X KUBE-SVC-BBBB\nCOMMIT\n"
        );
    }

    #[test]
    fn kubelets_chains_are_not_kube_proxys() {
        for (table, chain) in [
            ("filter", "KUBE-FIREWALL"),
            ("filter", "KUBE-KUBELET-CANARY"),
            ("nat", "KUBE-MARK-DROP"),
            ("filter", "KUBE-SVC-X"),
            ("nat", "DOCKER"),
        ] {
            assert!(!is_kube_proxy_chain(table, chain), "{table} {chain}");
        }
        assert!(is_kube_proxy_chain("nat", "KUBE-FIREWALL"), "IPVS mode's");
        assert!(is_kube_proxy_chain("nat", "KUBE-XLB-ABC"));
    }

    #[test]
    fn a_save_without_kube_proxy_chains_plans_nothing() {
        let saved = "*filter\n:INPUT ACCEPT [0:0]\n:KUBE-FIREWALL - [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n";
        assert_eq!(plan(saved), Plan::default());
        assert_eq!(plan(""), Plan::default());
    }

    #[test]
    fn jump_targets_skip_quoted_comments() {
        assert_eq!(
            jump_target(r#"-m comment --comment "a \"-j X\" b" -j Y"#),
            Some("Y")
        );
        assert_eq!(jump_target("-p tcp --goto Z"), Some("Z"));
        assert_eq!(jump_target("-p tcp -m tcp --dport 22"), None);
    }
}
