//! Golden tests of the control plane without a kernel: manifests on disk ->
//! translation -> reconciler on fake maps -> `kpr svc list` output, compared
//! with tests/golden/<case>.txt. `KPR_UPDATE_GOLDEN=1 cargo test --test golden`
//! rewrites the expected files (review the diff before committing).

use std::path::{Path, PathBuf};

use kpr::applied_state::AppliedState;
use kpr::datapath::fake::FakeMaps;
use kpr::reconcile::Reconciler;
use kpr::source::manifests;
use kpr::{svc_list, translate};

/// The node every golden case is translated for.
fn node() -> translate::NodeContext {
    translate::NodeContext {
        node_name: "node-a".into(),
        zone: Some("zone-a".into()),
        node_ips: vec![
            "192.168.1.10".parse().unwrap(),
            "fd00:192:168:1::10".parse().unwrap(),
        ],
        ..Default::default()
    }
}

fn render(manifest: &Path) -> String {
    let set = manifests::load(&[manifest.to_path_buf()]);
    assert!(
        set.skipped.is_empty(),
        "{}: {:?}",
        manifest.display(),
        set.skipped
    );
    let t = translate::translate(&set.services, &set.slices, &node());
    let mut r = Reconciler::new(FakeMaps::new()).unwrap();
    let out = r.sync_full(&t.desired, true).unwrap();
    assert!(out.refused.is_empty());
    assert!(r.maps().violations.is_empty(), "{:?}", r.maps().violations);
    // Named as the agent's record names them.
    let names = AppliedState::new(r.applied_frontends(), Vec::new(), r.maglev_params()).names();
    let mut text = svc_list::format_table(&svc_list::rows(&r.maps().snapshot_for_tests(), &names));
    for h in &t.health_checks {
        text.push_str(&format!(
            "# health check node port {} for {}: {} local endpoint(s)\n",
            h.port, h.service, h.local_endpoints
        ));
    }
    for n in &t.no_local_endpoints {
        text.push_str(&format!(
            "# no local endpoints ({}): {} {}\n",
            n.policy, n.service, n.family
        ));
    }
    for s in &t.skipped {
        text.push_str(&format!(
            "# skipped {}: {} ({})\n",
            s.object, s.reason, s.detail
        ));
    }
    text
}

#[test]
fn svc_list_matches_the_golden_files() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for case in cases {
        let got = render(&case);
        let golden = case.with_extension("txt");
        if std::env::var_os("KPR_UPDATE_GOLDEN").is_some() {
            std::fs::write(&golden, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden)
            .unwrap_or_else(|e| panic!("{}: {e}", golden.display()));
        if got != want {
            failures.push(format!(
                "{}:\n--- want\n{want}--- got\n{got}",
                case.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
