//! `kpr cleanup --kube-proxy` on real rule sets: what kube-proxy's iptables
//! mode (legacy and nft backends, IPv4 and IPv6), its IPVS mode and its
//! nftables mode leave on a node is loaded into a network namespace the test
//! creates, next to rules of other owners; after the cleanup no trace of
//! kube-proxy remains and every other rule does. Needs root; the root
//! namespace's rules are never touched (every command runs under
//! `nsenter --net`).

use std::io::Write;
use std::process::{Command, Stdio};

use kpr_testbed::{require_root, Netns};

const KPR: &str = env!("CARGO_BIN_EXE_kpr");

/// What kube-proxy 1.3x in iptables mode writes for one Service with a
/// NodePort and one endpoint, one Service without endpoints, and kubelet's
/// own chains (`KUBE-FIREWALL`, `KUBE-KUBELET-CANARY`, `KUBE-IPTABLES-HINT`,
/// which must stay), plus an admin's rules (which must stay).
const IPTABLES_MODE_V4: &str = r#"*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ADMIN-IN - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A INPUT -j ADMIN-IN
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -j KUBE-FIREWALL
-A ADMIN-IN -p tcp -m tcp --dport 22 -m comment --comment "admin ssh" -j ACCEPT
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp -m comment --comment "t/empty has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ADMIN-SNAT - [0:0]
:KUBE-EXT-ULMVA6XW2NAEPWXN - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SEP-IT2ZTR26TO4XFPTO - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ULMVA6XW2NAEPWXN - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -j ADMIN-SNAT
-A ADMIN-SNAT -s 10.244.0.0/16 ! -d 10.244.0.0/16 -m comment --comment "pod masquerade" -j MASQUERADE
-A KUBE-EXT-ULMVA6XW2NAEPWXN -m comment --comment "masquerade traffic for t/web external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-ULMVA6XW2NAEPWXN -j KUBE-SVC-ULMVA6XW2NAEPWXN
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-NODEPORTS -p tcp -m comment --comment "t/web" -m tcp --dport 30080 -j KUBE-EXT-ULMVA6XW2NAEPWXN
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SEP-IT2ZTR26TO4XFPTO -s 10.244.0.11/32 -m comment --comment "t/web" -j KUBE-MARK-MASQ
-A KUBE-SEP-IT2ZTR26TO4XFPTO -p tcp -m comment --comment "t/web" -m tcp -j DNAT --to-destination 10.244.0.11:8080
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "t/web cluster IP" -m tcp --dport 80 -j KUBE-SVC-ULMVA6XW2NAEPWXN
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-ULMVA6XW2NAEPWXN ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment "t/web cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-ULMVA6XW2NAEPWXN -m comment --comment "t/web -> 10.244.0.11:8080" -j KUBE-SEP-IT2ZTR26TO4XFPTO
COMMIT
"#;

/// The same for IPv6 (ip6tables): addresses swapped, no localnet rule.
fn iptables_mode_v6() -> String {
    IPTABLES_MODE_V4
        .lines()
        .filter(|l| !l.contains("127.0.0.0/8"))
        .map(|l| {
            l.replace("10.96.0.20/32", "fd00:96::20/128")
                .replace("10.96.0.10/32", "fd00:96::10/128")
                .replace("10.244.0.11/32", "fd00:244::11/128")
                .replace("10.244.0.11:8080", "[fd00:244::11]:8080")
                .replace("10.244.0.0/16", "fd00:244::/64")
                .replace("icmp-port-unreachable", "icmp6-port-unreachable")
                + "\n"
        })
        .collect()
}

/// What kube-proxy in IPVS mode writes (its ipsets left out: the test bed
/// has no `ipset` tool), with kubelet's chains and an admin's rule.
const IPVS_MODE_V4: &str = r#"*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-IPVS-FILTER - [0:0]
:KUBE-IPVS-OUT-FILTER - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SOURCE-RANGES-FIREWALL - [0:0]
-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER
-A INPUT -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT
-A INPUT -j KUBE-FIREWALL
-A INPUT -p tcp -m tcp --dport 22 -m comment --comment "admin ssh" -j ACCEPT
-A FORWARD -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A OUTPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-OUT-FILTER
-A OUTPUT -j KUBE-FIREWALL
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-PROXY-FIREWALL -j KUBE-SOURCE-RANGES-FIREWALL
-A KUBE-SOURCE-RANGES-FIREWALL -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-LOAD-BALANCER - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -m comment --comment "pod masquerade" -j MASQUERADE
-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT
COMMIT
"#;

/// kube-proxy's nftables mode (both families), and a table of another
/// owner.
const NFTABLES: &str = r#"
table ip kube-proxy {
	comment "rules for kube-proxy"
	chain mark-for-masquerade {
		meta mark set meta mark | 0x4000
	}
	chain masquerading {
		meta mark & 0x4000 == 0 return
		meta mark set meta mark ^ 0x4000
		masquerade fully-random
	}
	chain endpoint-5OJB2KTY-t/web/tcp/__10.244.0.11/8080 {
		ip saddr 10.244.0.11 jump mark-for-masquerade
		meta l4proto tcp dnat to 10.244.0.11:8080
	}
	chain service-ULMVA6XW-t/web/tcp/ {
		ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade
		numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-t/web/tcp/__10.244.0.11/8080 }
	}
	map service-ips {
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
		elements = { 10.96.0.10 . tcp . 80 : goto service-ULMVA6XW-t/web/tcp/ }
	}
	chain services {
		ip daddr . meta l4proto . th dport vmap @service-ips
	}
	chain nat-prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		jump services
	}
	chain nat-output {
		type nat hook output priority -100; policy accept;
		jump services
	}
	chain nat-postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		jump masquerading
	}
}
table ip6 kube-proxy {
	comment "rules for kube-proxy"
	chain services {
	}
	chain nat-output {
		type nat hook output priority -100; policy accept;
		jump services
	}
}
table inet admin {
	chain input {
		type filter hook input priority filter; policy accept;
		tcp dport 22 accept comment "admin ssh"
	}
}
"#;

/// Runs PROGRAM ARGS in the namespace, STDIN on its standard input; its
/// stdout.
#[track_caller]
fn in_ns(ns: &Netns, program: &str, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("nsenter {program}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("writing stdin");
    let out = child.wait_with_output().expect("waiting");
    assert!(
        out.status.success(),
        "{program} {args:?} in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every backend's saved rules, without comments (the save tools' headers
/// and warnings), one string per tool.
fn saved(ns: &Netns) -> Vec<(&'static str, String)> {
    [
        "iptables-legacy-save",
        "ip6tables-legacy-save",
        "iptables-nft-save",
        "ip6tables-nft-save",
    ]
    .into_iter()
    .map(|tool| {
        let text = in_ns(ns, tool, &[], "");
        let rules = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        (tool, rules)
    })
    .collect()
}

/// Lines naming a KUBE-* chain that is not kubelet's.
fn kube_proxy_traces(rules: &str) -> Vec<&str> {
    const KUBELETS: [&str; 3] = ["KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"];
    rules
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .map(|w| w.trim_start_matches(':'))
                .any(|w| w.starts_with("KUBE-") && !KUBELETS.contains(&w))
        })
        .collect()
}

#[test]
#[ignore = "needs root"]
fn cleanup_kube_proxy_removes_its_chains_tables_and_device_and_keeps_the_rest() {
    require_root();
    let ns = Netns::create(&format!("kpr-kpc-{}", std::process::id())).expect("netns");
    in_ns(&ns, "iptables-legacy-restore", &[], IPTABLES_MODE_V4);
    in_ns(&ns, "ip6tables-legacy-restore", &[], &iptables_mode_v6());
    in_ns(&ns, "iptables-nft-restore", &[], IPVS_MODE_V4);
    in_ns(&ns, "ip6tables-nft-restore", &[], &iptables_mode_v6());
    in_ns(&ns, "nft", &["-f", "-"], NFTABLES);
    // kube-proxy's is a dummy device; kernels without the dummy driver get
    // a veth of the same name (the cleanup goes by name).
    ns.ip(&["link", "add", "kube-ipvs0", "type", "dummy"])
        .or_else(|_| {
            ns.ip(&[
                "link",
                "add",
                "kube-ipvs0",
                "type",
                "veth",
                "peer",
                "name",
                "kpr-ipvs-peer",
            ])
        })
        .expect("kube-ipvs0");
    ns.ip(&["addr", "add", "10.96.0.10/32", "dev", "kube-ipvs0"])
        .expect("a ClusterIP on kube-ipvs0");

    // What was loaded is what kube-proxy would have left.
    let before = saved(&ns);
    for (tool, rules) in &before {
        assert!(
            kube_proxy_traces(rules).len() > 10,
            "{tool} did not load:\n{rules}"
        );
    }

    let out = in_ns(&ns, KPR, &["cleanup", "--kube-proxy"], "");
    // iptables mode: mangle 1 + filter 6 + nat 8 chains, twice (legacy
    // v4 and v6) plus once on nft v6; IPVS mode: filter 6 + nat 5.
    assert!(
        out.contains("removed 56 kube-proxy iptables chains")
            && out.contains("2 nftables tables, 1 devices")
            && !out.contains("skipped"),
        "{out}"
    );

    for ((tool, before), (_, after)) in before.iter().zip(saved(&ns)) {
        assert_eq!(
            kube_proxy_traces(&after),
            Vec::<&str>::new(),
            "{tool} still has kube-proxy's rules"
        );
        // Everything else is as it was, rule for rule and in order.
        let others = |rules: &str| -> Vec<String> {
            rules
                .lines()
                .filter(|l| kube_proxy_traces(l).is_empty())
                .map(String::from)
                .collect()
        };
        assert_eq!(others(&after), others(before), "{tool}");
        if tool.ends_with("legacy-save") || tool.starts_with("iptables-nft") {
            assert!(
                after.contains("--comment \"admin ssh\" -j ACCEPT"),
                "{tool}: {after}"
            );
            assert!(
                after.contains("--comment \"pod masquerade\" -j MASQUERADE"),
                "{tool}"
            );
        }
        if tool.ends_with("legacy-save") {
            assert!(
                after.contains("-A INPUT -j KUBE-FIREWALL"),
                "kubelet's: {after}"
            );
        }
    }
    let tables = in_ns(&ns, "nft", &["list", "tables"], "");
    assert!(!tables.contains("kube-proxy"), "{tables}");
    assert!(tables.contains("table inet admin"), "{tables}");
    let links = ns.ip_output(&["-o", "link", "show"]).expect("ip link");
    assert!(!links.contains("kube-ipvs0"), "{links}");

    // Idempotent.
    let again = in_ns(&ns, KPR, &["cleanup", "--kube-proxy"], "");
    assert!(
        again.contains(
            "removed 0 kube-proxy iptables chains and 0 jump rules, 0 nftables tables, 0 devices"
        ),
        "{again}"
    );
}

#[test]
fn kube_proxy_and_cgroup_are_refused_together() {
    // --kube-proxy is exclusive: it never also removes kpr's pins, so it
    // can run while kpr serves; with --cgroup (kpr's cleanup) it is refused.
    let out = Command::new(KPR)
        .args(["cleanup", "--kube-proxy", "--cgroup", "/nonexistent"])
        .output()
        .expect("kpr");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--kube-proxy") && err.contains("--cgroup"),
        "{err}"
    );
}
