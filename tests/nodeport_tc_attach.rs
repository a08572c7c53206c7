//! How the north-south programs attach (`--tc-attach`), end to end on the
//! multi-node bed: on a kernel without tcx (simulated with
//! `KPR_TEST_MISSING_FEATURES=tcx`, the probe's test override) the agent,
//! in strict mode, attaches through classic tc and says so; moving
//! between tcx and classic tc, and restarting on classic tc, lose no
//! connection; `kpr cleanup` removes kpr's filters and nobody else's; a
//! forced `--tc-attach tcx` without tcx is refused before anything
//! changes. The north-south suites themselves run in both modes (CI sets
//! `KPR_TEST_TC_ATTACH=legacy` for its second run).
//!
//! Needs root (namespaces, BPF, tc): every test is `#[ignore = "needs
//! root"]` (run them with `--include-ignored`) and fails at once without
//! root.

#[path = "support/nodeport.rs"]
mod support;

use std::time::Duration;

use kpr::datapath::nodeport::TcAttach;
use kpr_testbed::NodePortBed;
use support::*;

/// The probe override that makes the agent see a kernel without tcx.
const NO_TCX: (&str, &str) = ("KPR_TEST_MISSING_FEATURES", "tcx");

/// Node `n`'s attachments are all of `mode`, on both directions of
/// eth-c and eth-n, each on its device.
#[track_caller]
fn assert_attached_by(bed: &NodePortBed, n: u8, mode: TcAttach) {
    let found = attachments(bed, n);
    assert_eq!(found.len(), 4, "{found:?}");
    assert!(
        found
            .iter()
            .all(|d| d.attach == mode && d.ifindex.is_some()),
        "{found:?}"
    );
}

/// Restarts node 1's agent under TCP load through node 1; no request may
/// fail.
#[track_caller]
fn restart_under_load_without_failures(bed: &mut NodePortBed, what: &str) {
    let target = node_port(bed.node(1), NODE_PORT_TCP);
    let r = under_tcp_load(bed, target, |bed| restart_agent(bed, 1, false));
    let answered: u64 = r.identities.values().sum();
    let failed: u64 = r.failures.values().sum();
    println!("{what}: {answered} requests answered, {failed} failed");
    assert_eq!(failed, 0, "{what}: {:?}", r.failures);
    assert!(answered >= 100, "{what}: {answered}");
}

#[test]
#[ignore = "needs root"]
fn without_tcx_strict_mode_attaches_through_classic_tc_says_so_and_loses_no_connection() {
    require_root();
    let mut bed = Bed::start("nptca", &["--tc-attach", "auto"]);
    assert_attached_by(&bed, 1, TcAttach::Tcx);

    // The same node on a kernel without tcx (strict mode, the default):
    // the restarted agent moves its programs to classic tc filters.
    bed.agent(1).env.push((NO_TCX.0.into(), NO_TCX.1.into()));
    restart_under_load_without_failures(&mut bed, "tcx -> classic tc");
    assert_attached_by(&bed, 1, TcAttach::Legacy);
    let log = bed.agent(1).log();
    assert!(
        log.contains("the kernel has no tcx") && log.contains(r#"tc_attach="legacy""#),
        "{log}"
    );
    let status = status_text(&bed, 1);
    assert!(
        status.contains("Mode:                 strict")
            && status.contains(
                "tc attachment:        classic tc (clsact qdisc, cls_bpf filters; the kernel has no tcx)"
            ),
        "{status}"
    );
    for (dir, prog) in [("ingress", "kpr_np_ingress"), ("egress", "kpr_np_egress")] {
        let filters = tc_filters(&bed, 1, "eth-c", dir);
        assert!(
            filters.contains("pref 1 bpf")
                && filters.contains("handle 0x6b70")
                && filters.contains(prog)
                && filters.contains("direct-action"),
            "{dir}: {filters}"
        );
    }
    tcp_reaches_every_pod(&bed, 1, |reply| check_source(bed.node(1), reply));
    udp_reaches_every_pod_and_keeps_a_flow(&bed, 1, |reply| check_source(bed.node(1), reply));

    // Restarting on classic tc replaces the filters' program in place.
    restart_under_load_without_failures(&mut bed, "classic tc restart");
    assert_attached_by(&bed, 1, TcAttach::Legacy);
    let log = bed.agent(1).log();
    assert!(
        log.contains(
            r#"updated_links=["eth-c/ingress", "eth-c/egress", "eth-n/ingress", "eth-n/egress"]"#
        ),
        "{log}"
    );
    let ingress = tc_filters(&bed, 1, "eth-c", "ingress");
    assert_eq!(
        ingress
            .lines()
            .filter(|l| l.contains("kpr_np_ingress"))
            .count(),
        1,
        "one filter, replaced, not a second one: {ingress}"
    );

    // tcx back: the filters go, the qdisc stays (see classic_tc).
    bed.agent(1).env.clear();
    restart_under_load_without_failures(&mut bed, "classic tc -> tcx");
    assert_attached_by(&bed, 1, TcAttach::Tcx);
    for dir in ["ingress", "egress"] {
        let filters = tc_filters(&bed, 1, "eth-c", dir);
        assert!(!filters.contains("kpr_"), "{dir}: {filters}");
    }
}

#[test]
#[ignore = "needs root"]
fn cleanup_removes_kprs_classic_tc_filters_and_no_other() {
    require_root();
    let mut bed = Bed::start("nptcc", &["--tc-attach", "legacy"]);
    assert_attached_by(&bed, 2, TcAttach::Legacy);
    // Another tool's filter on the same clsact qdisc.
    tc(
        &bed,
        2,
        &[
            "filter", "add", "dev", "eth-c", "ingress", "pref", "100", "protocol", "all", "u32",
            "match", "u32", "0", "0", "classid", "1:1",
        ],
    );
    bed.agent(2).stop().unwrap();
    kpr_on(&bed, 2, &["cleanup"]);
    assert!(attachments(&bed, 2).is_empty());
    let ingress = tc_filters(&bed, 2, "eth-c", "ingress");
    assert!(
        !ingress.contains("kpr_") && ingress.contains("pref 100 u32"),
        "{ingress}"
    );
    for dev in ["eth-c", "eth-n"] {
        let egress = tc_filters(&bed, 2, dev, "egress");
        assert!(!egress.contains("kpr_"), "{dev}: {egress}");
    }
    let target = node_port(bed.node(2), NODE_PORT_TCP);
    assert_eq!(
        tcp_connect(bed.cluster.client(), target, 1000).outcome(),
        "ECONNREFUSED",
        "node2's own stack answers: nothing translates any more"
    );
}

#[test]
#[ignore = "needs root"]
fn forcing_tcx_on_a_kernel_without_it_is_refused_before_anything_changes() {
    require_root();
    let mut bed = Bed::start("nptcf", &["--tc-attach", "tcx"]);
    assert_attached_by(&bed, 1, TcAttach::Tcx);
    let agent = bed.agent(1);
    agent.env.push((NO_TCX.0.into(), NO_TCX.1.into()));
    agent.stop().unwrap();
    // restart() spawns; the agent then refuses and exits.
    agent.restart().unwrap();
    let exit = agent.wait_exit(Duration::from_secs(20));
    assert!(exit.is_some_and(|s| !s.success()), "{exit:?}");
    let log = agent.log();
    assert!(
        log.contains("--tc-attach tcx: the kernel has no tcx"),
        "{log}"
    );
    // The stopped agent's programs still translate.
    assert_attached_by(&bed, 1, TcAttach::Tcx);
    tcp_reaches_every_pod(&bed, 1, |reply| check_source(bed.node(1), reply));
}
