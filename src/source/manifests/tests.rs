//! The source as a whole: [`load`] and [`ManifestSource`] on real files.

use super::documents::{is_document_marker, split_yaml};
use super::files::is_manifest_name;
use super::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::Metadata;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

const SERVICE_AND_SLICES: &str = r#"# kube-dns as the API server would return it, trimmed.
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
spec:
  type: ClusterIP
  selector:
    k8s-app: kube-dns
  ipFamilyPolicy: PreferDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.10
  clusterIPs:
    - 10.96.0.10
    - fd00:10:96::a
  ports:
    - name: dns
      port: 53
      protocol: UDP
      targetPort: 53
    - name: metrics
      port: 9153
      protocol: TCP
      targetPort: metrics
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-v4abc
  namespace: kube-system
  labels:
    kubernetes.io/service-name: kube-dns
addressType: IPv4
endpoints:
  - addresses: ["10.244.0.2"]
    conditions: {ready: true, serving: true, terminating: false}
    nodeName: node-a
  - addresses: ["10.244.1.7"]
    conditions:
      ready: false
      serving: true
      terminating: true
    nodeName: node-b
ports:
  - name: dns
    port: 53
    protocol: UDP
  - name: metrics
    port: 9153
    protocol: TCP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-v6xyz
  namespace: kube-system
  labels:
    kubernetes.io/service-name: kube-dns
addressType: IPv6
endpoints:
  - addresses: ["fd00:10:244::2"]
ports:
  - name: dns
    port: 53
    protocol: UDP
"#;

const WEB_SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: 10.96.1.1
  ports:
    - port: 80
      targetPort: 8080
";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).expect("writing test manifest");
    path
}

fn names<T: Metadata<Ty = ObjectMeta>>(objects: &[T]) -> Vec<String> {
    objects
        .iter()
        .map(|o| {
            let meta = o.metadata();
            format!(
                "{}/{}",
                meta.namespace.as_deref().unwrap_or("?"),
                meta.name.as_deref().unwrap_or("?")
            )
        })
        .collect()
}

fn reasons(set: &ManifestSet) -> Vec<(usize, SkipReason)> {
    set.skipped.iter().map(|s| (s.index, s.reason)).collect()
}

#[test]
fn loads_a_dual_stack_service_with_two_ports_and_its_two_slices() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "kube-dns.yaml", SERVICE_AND_SLICES);

    let set = load(&[file]);

    assert_eq!(set.skipped, vec![]);
    assert_eq!(names(&set.services), ["kube-system/kube-dns"]);
    let spec = set.services[0].spec.as_ref().unwrap();
    assert_eq!(
        spec.cluster_ips.as_deref().unwrap(),
        ["10.96.0.10", "fd00:10:96::a"]
    );
    let ports = spec.ports.as_ref().unwrap();
    assert_eq!(ports.len(), 2);
    assert_eq!(
        (ports[0].port, ports[0].protocol.as_deref()),
        (53, Some("UDP"))
    );
    assert_eq!(
        (ports[1].port, ports[1].protocol.as_deref()),
        (9153, Some("TCP"))
    );

    assert_eq!(
        names(&set.slices),
        ["kube-system/kube-dns-v4abc", "kube-system/kube-dns-v6xyz"]
    );
    let terminating = &set.slices[0].endpoints[1];
    let conditions = terminating.conditions.as_ref().unwrap();
    assert_eq!(conditions.ready, Some(false));
    assert_eq!(conditions.terminating, Some(true));
    assert_eq!(set.slices[1].address_type, "IPv6");
    assert_eq!(set.slices[1].endpoints[0].conditions, None);
}

#[test]
fn a_syntax_error_skips_only_its_own_document_and_reports_the_file_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{WEB_SERVICE}---\nmetadata: {{name: [unclosed\n---\n{SERVICE_AND_SLICES}");
    let file = write(dir.path(), "mixed.yaml", &text);

    let set = load(std::slice::from_ref(&file));

    assert_eq!(
        names(&set.services),
        ["default/web", "kube-system/kube-dns"]
    );
    assert_eq!(set.slices.len(), 2);
    assert_eq!(reasons(&set), [(1, SkipReason::Malformed)]);
    assert_eq!(set.skipped[0].file, file);
    // The flow sequence opens on line 11 of the file (9 lines of
    // WEB_SERVICE, then `---`), not on line 1 of its document.
    let detail = &set.skipped[0].detail;
    assert!(
        detail.contains("flow sequence at line 11 column 18"),
        "{detail}"
    );
}

#[test]
fn a_port_given_as_a_string_is_malformed_with_the_serde_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = WEB_SERVICE.replace("port: 80", "port: \"80\"");
    let text = format!("{SERVICE_AND_SLICES}---\n{bad}");
    let file = write(dir.path(), "svc.yaml", &text);

    let set = load(&[file]);

    assert_eq!(names(&set.services), ["kube-system/kube-dns"]);
    assert_eq!(reasons(&set), [(3, SkipReason::Malformed)]);
    let detail = &set.skipped[0].detail;
    assert!(
        detail.starts_with("spec.ports[0].port: invalid type: string \"80\""),
        "{detail}"
    );
}

#[test]
fn unsupported_kinds_are_skipped_with_their_api_version_and_kind() {
    let dir = tempfile::tempdir().unwrap();
    let text = "apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {a: b}
---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata: {name: old}
addressType: IPv4
endpoints: []
---
kind: Service
metadata: {name: no-version}
";
    let file = write(dir.path(), "other.yaml", text);

    let set = load(&[file]);

    assert!(set.services.is_empty() && set.slices.is_empty());
    assert_eq!(
        reasons(&set),
        [
            (0, SkipReason::UnsupportedKind),
            (1, SkipReason::UnsupportedKind),
            (2, SkipReason::Malformed)
        ]
    );
    assert!(set.skipped[0].detail.starts_with("v1/ConfigMap"));
    assert!(set.skipped[1]
        .detail
        .starts_with("discovery.k8s.io/v1beta1/EndpointSlice"));
}

#[test]
fn a_v1_list_is_flattened_and_bad_items_are_reported_by_position() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Service
    metadata: {name: a, namespace: apps}
    spec: {clusterIP: 10.96.2.1, ports: [{port: 443, targetPort: 8443}]}
  - apiVersion: v1
    kind: ConfigMap
    metadata: {name: c}
  - apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {name: a-1, namespace: apps}
    addressType: IPv4
    endpoints: [{addresses: [10.244.0.9]}]
    ports: [{port: 8443}]
  - apiVersion: v1
    kind: Service
    metadata: {name: b}
    spec: {ports: [{port: "https"}]}
  - apiVersion: v1
    kind: List
    items: []
"#;
    let file = write(dir.path(), "list.yaml", text);

    let set = load(&[file]);

    assert_eq!(names(&set.services), ["apps/a"]);
    assert_eq!(names(&set.slices), ["apps/a-1"]);
    assert_eq!(
        reasons(&set),
        [
            (0, SkipReason::UnsupportedKind),
            (0, SkipReason::Malformed),
            (0, SkipReason::UnsupportedKind)
        ]
    );
    assert!(set.skipped[0].detail.starts_with("items[1]: v1/ConfigMap"));
    assert!(set.skipped[1].detail.starts_with("items[3]: "));
    assert!(set.skipped[2].detail.starts_with("items[4]: "));
}

#[test]
fn a_directory_loads_its_manifest_files_in_name_order_and_refuses_what_is_not_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let svc = |name: &str| WEB_SERVICE.replace("name: web", &format!("name: {name}"));
    write(dir.path(), "b.yaml", &svc("from-b"));
    write(dir.path(), "a.yml", &svc("from-a"));
    write(
        dir.path(),
        "c.json",
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "from-c"},
            "spec": {"ports": [{"port": 80}]}}"#,
    );
    write(
        dir.path(),
        "d.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    );
    for ignored in [
        ".hidden.yaml",
        ".b.yaml.swp",
        "b.yaml~",
        "notes.txt",
        "#b.yaml#",
    ] {
        write(dir.path(), ignored, &svc("ignored"));
    }
    fs::create_dir(dir.path().join("sub.yaml")).unwrap();
    write(&dir.path().join("sub.yaml"), "nested.yaml", &svc("nested"));

    let set = load(&[dir.path().to_path_buf()]);

    assert_eq!(
        names(&set.services),
        ["default/from-a", "default/from-b", "default/from-c"]
    );
    // A directory named like a manifest is not opened, and said so.
    assert_eq!(
        reasons(&set),
        [
            (0, SkipReason::UnsupportedKind),
            (0, SkipReason::NotRegularFile)
        ]
    );
    assert_eq!(set.skipped[0].file, dir.path().join("d.yaml"));
    assert_eq!(set.skipped[1].file, dir.path().join("sub.yaml"));
}

#[test]
fn missing_paths_and_dangling_symlinks_are_reported_and_the_rest_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.yaml", WEB_SERVICE);
    let manifests = dir.path().join("manifests");
    fs::create_dir(&manifests).unwrap();
    std::os::unix::fs::symlink(dir.path().join("gone"), manifests.join("dangling.yaml")).unwrap();
    let missing = dir.path().join("missing.yaml");

    let set = load(&[missing.clone(), manifests.clone(), good]);

    assert_eq!(names(&set.services), ["default/web"]);
    assert_eq!(
        reasons(&set),
        [(0, SkipReason::Unreadable), (0, SkipReason::Unreadable)]
    );
    assert_eq!(set.skipped[0].file, missing);
    assert_eq!(set.skipped[1].file, manifests.join("dangling.yaml"));
}

#[test]
fn a_file_that_is_not_utf8_is_malformed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("latin1.yaml");
    fs::write(&file, b"metadata: {name: caf\xe9}\n").unwrap();

    let set = load(&[file]);

    assert_eq!(reasons(&set), [(0, SkipReason::Malformed)]);
}

#[test]
fn a_missing_namespace_defaults_and_a_missing_name_is_malformed() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{WEB_SERVICE}---\napiVersion: v1\nkind: Service\nmetadata: {{namespace: x}}\nspec: {{}}\n"
    );
    let file = write(dir.path(), "svc.yaml", &text);

    let set = load(&[file]);

    assert_eq!(names(&set.services), ["default/web"]);
    assert_eq!(reasons(&set), [(1, SkipReason::Malformed)]);
    assert_eq!(set.skipped[0].detail, "Service without metadata.name");
}

#[test]
fn the_second_object_with_the_same_kind_and_name_is_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let explicit = WEB_SERVICE.replace("name: web", "name: web\n  namespace: default");
    let first = write(dir.path(), "1.yaml", WEB_SERVICE);
    let second = write(dir.path(), "2.yaml", &explicit);

    let set = load(&[first, second.clone()]);

    assert_eq!(names(&set.services), ["default/web"]);
    assert_eq!(reasons(&set), [(0, SkipReason::Duplicate)]);
    assert_eq!(set.skipped[0].file, second);
    assert!(set.skipped[0].detail.contains("1.yaml document 0"));
}

#[test]
fn empty_and_comment_only_documents_are_ignored_and_not_counted() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "%YAML 1.1\n---\n# nothing here\n---\n\n--- # web\n{WEB_SERVICE}...\n---\n~\n---\napiVersion: v1\nkind: ConfigMap\n---\n"
    );
    let file = write(dir.path(), "sparse.yaml", &text);

    let set = load(&[file]);

    assert_eq!(names(&set.services), ["default/web"]);
    // web is document 0, `~` document 1, the ConfigMap document 2.
    assert_eq!(reasons(&set), [(2, SkipReason::UnsupportedKind)]);
}

#[test]
fn a_json_file_may_hold_a_stream_and_a_syntax_error_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "one"}}
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "two", "namespace": "ns"}}
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "three"},
"#;
    let file = write(dir.path(), "stream.json", text);

    let set = load(&[file]);

    assert_eq!(names(&set.services), ["default/one", "ns/two"]);
    assert_eq!(reasons(&set), [(2, SkipReason::Malformed)]);
    let detail = &set.skipped[0].detail;
    assert!(detail.contains("line 4"), "{detail}");
}

#[test]
fn document_markers_are_recognised_only_at_column_zero_with_a_separator() {
    assert!(is_document_marker("---"));
    assert!(is_document_marker("--- # note"));
    assert!(is_document_marker("---\t"));
    assert!(is_document_marker("..."));
    assert!(!is_document_marker("----"));
    assert!(!is_document_marker(" ---"));
    assert!(!is_document_marker("---x"));

    let docs = split_yaml("a: 1\r\n---\r\nb: 2\r\n--- c: 3\n---\n# only a comment\n");
    let docs: Vec<(usize, String)> = docs
        .iter()
        .map(|d| (d.first_line, d.text().into_owned()))
        .collect();
    let doc = |first_line, text: &str| (first_line, text.to_string());
    assert_eq!(
        docs,
        [
            doc(0, "a: 1\r\n"),
            doc(1, "   \r\nb: 2\r\n"),
            doc(3, "    c: 3\n")
        ]
    );
}

#[test]
fn manifest_names_need_a_known_extension_and_no_leading_dot() {
    for yes in ["a.yaml", "a.YML", "b.json", "x.y.yaml"] {
        assert!(is_manifest_name(OsStr::new(yes)), "{yes}");
    }
    for no in [
        ".a.yaml",
        "a.yaml~",
        "a.yaml.swp",
        ".yaml",
        "a.txt",
        "#a.yaml#",
        "4913",
    ] {
        assert!(!is_manifest_name(OsStr::new(no)), "{no}");
    }
}

// --- bounded parsing --------------------------------------------------------

#[test]
fn a_hundred_thousand_nested_brackets_are_skipped_as_too_deep_in_milliseconds() {
    let dir = tempfile::tempdir().unwrap();
    let bomb = format!("{WEB_SERVICE}---\nkey: {}\n", "[".repeat(100_000));
    let file = write(dir.path(), "bomb.yaml", &bomb);

    let started = std::time::Instant::now();
    let set = load(&[file]);
    let took = started.elapsed();

    assert_eq!(names(&set.services), ["default/web"]);
    assert_eq!(reasons(&set), [(1, SkipReason::TooDeep)]);
    assert!(
        took < std::time::Duration::from_millis(100),
        "took {took:?}"
    );
}

#[test]
fn a_document_or_file_over_its_size_limit_is_skipped_with_the_limit_named() {
    let dir = tempfile::tempdir().unwrap();
    let padded = format!("{WEB_SERVICE}# {}\n", "x".repeat(4 << 20));
    let file = write(dir.path(), "big.yaml", &padded);
    let set = load(std::slice::from_ref(&file));
    assert_eq!(reasons(&set), [(0, SkipReason::TooLarge)]);
    assert!(set.skipped[0]
        .detail
        .contains("--manifest-max-document-bytes"));

    let mut state = state::SourceState::new(
        vec![file],
        Limits {
            max_file_bytes: 1024,
            ..Limits::default()
        },
        Rules::default(),
        false,
        Duration::ZERO,
    );
    let report = state.reload(watch::Hints::default());
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].reason, SkipReason::TooLarge);
    assert!(report.skipped[0]
        .detail
        .contains("--manifest-max-file-bytes"));
    assert_eq!(report.files_read, 0, "the file was read");
}

#[test]
fn a_fifo_is_refused_without_being_opened_and_the_source_stays_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.yaml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    write(dir.path(), "web.yaml", WEB_SERVICE);
    let mut state = new_state(dir.path());

    // Opening a FIFO for reading would block until a writer comes: this
    // test would hang.
    let report = state.reload(watch::Hints::default());

    assert_eq!(state.store().counts(), (1, 0));
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].reason, SkipReason::NotRegularFile);
    assert!(report.skipped[0].detail.contains("FIFO"));
    assert_eq!(state.health(), Ok(()));
    // Reported once, not on every reload.
    assert!(state.reload(watch::Hints::default()).skipped.is_empty());
}

// --- validation -------------------------------------------------------------

#[test]
fn objects_the_api_server_would_refuse_are_skipped_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let svc = |name: &str, spec: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {spec}\n---\n")
    };
    let text = [
        svc("good", "{clusterIP: 10.96.0.1, ports: [{port: 80}]}"),
        svc("loopback", "{clusterIP: 127.0.0.1, ports: [{port: 80}]}"),
        svc(
            "metadata",
            "{clusterIP: 10.96.0.2, externalIPs: [169.254.169.254], ports: [{port: 80}]}",
        ),
        svc(
            "ssh",
            "{type: NodePort, clusterIP: 10.96.0.3, ports: [{port: 22, nodePort: 2222}]}",
        ),
        svc("\"a/b\"", "{clusterIP: 10.96.0.4, ports: [{port: 80}]}"),
        svc(
            "\"evil\\nname\"",
            "{clusterIP: 10.96.0.5, ports: [{port: 80}]}",
        ),
    ]
    .concat();
    let file = write(dir.path(), "svc.yaml", &text);

    let set = load(&[file]);

    assert_eq!(names(&set.services), ["default/good"]);
    assert_eq!(
        reasons(&set),
        [
            (1, SkipReason::InvalidAddress),
            (2, SkipReason::InvalidAddress),
            (3, SkipReason::InvalidPort),
            (4, SkipReason::InvalidName),
            (5, SkipReason::InvalidName),
        ]
    );
    for skipped in &set.skipped {
        assert!(!skipped.detail.contains('\n'), "{:?}", skipped.detail);
    }
    assert!(
        set.skipped[4].detail.contains(r"evil\nname"),
        "{}",
        set.skipped[4].detail
    );
}

// --- incremental reloads and read failures ----------------------------------

fn new_state(dir: &Path) -> state::SourceState {
    state::SourceState::new(
        vec![dir.to_path_buf()],
        Limits::default(),
        Rules::default(),
        false,
        Duration::ZERO,
    )
}

fn numbered_services(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{clusterIP: 10.96.1.{}, ports: [{{port: 80}}]}}\n---\n",
                i % 250 + 1
            )
        })
        .collect()
}

#[test]
fn an_unchanged_file_is_not_read_and_an_unchanged_document_is_not_parsed() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &numbered_services(10));
    write(dir.path(), "b.yaml", WEB_SERVICE);
    let mut state = new_state(dir.path());
    let first = state.reload(watch::Hints::default());
    assert_eq!((first.files_read, first.documents_parsed), (2, 11));
    state.store_mut().take_changes();

    // An annotation kpr reads (one it does not read is slimmed away: no change).
    let edited = numbered_services(10).replace(
        "name: s3}",
        "name: s3, annotations: {service.kpr.io/lb-algorithm: maglev}}",
    );
    write(dir.path(), "a.yaml", &edited);
    let second = state.reload(watch::Hints::default());

    assert_eq!(second.files_read, 1, "b.yaml was read again");
    assert_eq!((second.documents_parsed, second.documents_reused), (1, 9));
    let changes = state.store_mut().take_changes();
    assert_eq!(changes.services, ["default/s3".to_string()].into());
}

#[test]
fn a_vanished_path_keeps_its_last_state_and_makes_the_source_unhealthy_until_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "web.yaml", WEB_SERVICE);
    let mut state = state::SourceState::new(
        vec![file.clone()],
        Limits::default(),
        Rules::default(),
        false,
        Duration::ZERO,
    );
    state.reload(watch::Hints::default());
    state.store_mut().take_changes();

    fs::remove_file(&file).unwrap();
    let report = state.reload(watch::Hints::default());

    assert_eq!(state.store().counts(), (1, 0), "the Service was withdrawn");
    assert!(state.store_mut().take_changes().is_empty());
    assert_eq!(report.read_errors.len(), 1);
    assert_eq!(report.read_errors[0].reason, ReadErrorReason::NotFound);
    let health = state.health().unwrap_err();
    assert!(
        health.contains("web.yaml") && health.contains("not_found"),
        "{health}"
    );
    assert!(!state.is_complete());
    assert!(state.next_wake().is_some(), "no retry scheduled");

    write(dir.path(), "web.yaml", WEB_SERVICE);
    state.reload(watch::Hints::default());
    assert_eq!(state.health(), Ok(()));
    assert!(state.is_complete());
}

#[test]
fn a_directory_that_cannot_be_listed_prunes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let confd = dir.path().join("conf.d");
    fs::create_dir(&confd).unwrap();
    write(&confd, "web.yaml", WEB_SERVICE);
    let mut state = new_state(&confd);
    state.reload(watch::Hints::default());

    // Replaced by a file: listing fails with ENOTDIR.
    fs::remove_dir_all(&confd).unwrap();
    fs::write(&confd, "not a directory").unwrap();
    let report = state.reload(watch::Hints::default());

    assert_eq!(state.store().counts(), (1, 0));
    assert_eq!(report.read_errors.len(), 1);
    assert!(state.health().is_err());
}

#[test]
fn a_file_replaced_by_a_directory_or_a_fifo_keeps_its_last_state() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "web.yaml", WEB_SERVICE);
    let mut state = new_state(dir.path());
    state.reload(watch::Hints::default());

    fs::remove_file(&file).unwrap();
    fs::create_dir(&file).unwrap();
    let report = state.reload(watch::Hints::default());
    assert_eq!(state.store().counts(), (1, 0));
    assert_eq!(
        report.read_errors[0].reason,
        ReadErrorReason::NotRegularFile
    );

    fs::remove_dir(&file).unwrap();
    nix::unistd::mkfifo(&file, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let report = state.reload(watch::Hints::default());
    assert_eq!(state.store().counts(), (1, 0));
    assert_eq!(
        report.read_errors[0].reason,
        ReadErrorReason::NotRegularFile
    );
    assert!(state.health().is_err());
}

#[test]
fn a_file_deleted_from_a_directory_is_withdrawn_only_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "web.yaml", WEB_SERVICE);
    let grace = Duration::from_millis(300);
    let mut state = state::SourceState::new(
        vec![dir.path().to_path_buf()],
        Limits::default(),
        Rules::default(),
        false,
        grace,
    );
    state.reload(watch::Hints::default());

    fs::remove_file(&file).unwrap();
    state.reload(watch::Hints::default());
    assert_eq!(state.store().counts(), (1, 0), "withdrawn at once");
    assert!(state.next_wake().is_some());

    std::thread::sleep(grace);
    state.reload(watch::Hints::default());
    assert_eq!(state.store().counts(), (0, 0));
    assert_eq!(state.health(), Ok(()), "a deletion is not a failure");
}

#[test]
fn a_file_being_written_is_not_read_until_it_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "svc.yaml", SERVICE_AND_SLICES);
    let mut state = state::SourceState::new(
        vec![dir.path().to_path_buf()],
        Limits::default(),
        Rules::default(),
        true,
        Duration::ZERO,
    );
    let complete = watch::Hints {
        complete: [file.clone()].into(),
        ..watch::Hints::default()
    };
    state.reload(complete.clone());
    assert_eq!(state.store().counts(), (1, 2));

    // Half written: the second slice is cut off.
    let half = &SERVICE_AND_SLICES[..SERVICE_AND_SLICES.find("kube-dns-v6xyz").unwrap()];
    fs::write(&file, half).unwrap();
    let writing = watch::Hints {
        writing: [(file.clone(), std::time::Instant::now())].into(),
        touched: [file.clone()].into(),
        ..watch::Hints::default()
    };
    state.reload(writing);
    assert_eq!(state.store().counts(), (1, 2), "read mid-write");

    // Modified a moment ago, no event to say it is complete: not yet either.
    state.reload(watch::Hints::default());
    assert_eq!(state.store().counts(), (1, 2), "read while still changing");

    fs::write(&file, WEB_SERVICE).unwrap();
    state.reload(complete);
    assert_eq!(names_in(state.store()), ["default/web"]);
}

fn names_in(store: &ObjectStore) -> Vec<String> {
    store
        .services()
        .map(|s| crate::translate::object_key(&s.metadata))
        .collect()
}

#[test]
fn a_duplicate_in_a_later_file_takes_over_when_the_first_definition_goes() {
    let dir = tempfile::tempdir().unwrap();
    let first = write(dir.path(), "1.yaml", WEB_SERVICE);
    let second = WEB_SERVICE.replace("10.96.1.1", "10.96.1.2");
    write(dir.path(), "2.yaml", &second);
    let mut state = new_state(dir.path());
    let report = state.reload(watch::Hints::default());
    assert_eq!(report.skipped[0].reason, SkipReason::Duplicate);

    fs::remove_file(first).unwrap();
    state.reload(watch::Hints::default());

    let svc = state.store().service("default/web").unwrap();
    assert_eq!(
        svc.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("10.96.1.2")
    );
}

#[test]
fn a_missing_manifest_path_at_start_is_an_error_naming_it() {
    let err = resolve_paths(&[PathBuf::from("/no/such/manifests.yaml")]).unwrap_err();
    assert!(
        err.contains("/no/such/manifests.yaml") && err.contains("no such file"),
        "{err}"
    );
}

#[test]
fn relative_paths_are_made_absolute_so_watch_events_match_them() {
    let resolved = resolve_paths(&[PathBuf::from(".")]).unwrap();
    assert!(resolved[0].is_absolute());
    assert_eq!(resolved[0], std::env::current_dir().unwrap());
}

#[test]
fn a_service_the_validation_refuses_is_listed_until_fixed_or_defined_validly() {
    let dir = tempfile::tempdir().unwrap();
    let service = |node_port: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: np, namespace: t}}\n\
             spec: {{type: NodePort, clusterIP: 10.96.0.40, ports: [{{port: 80, nodePort: {node_port}}}]}}\n"
        )
    };
    write(dir.path(), "a.yaml", &service(80));
    let mut state = new_state(dir.path());
    let report = state.reload(watch::Hints::default());
    assert_eq!(report.skipped.len(), 1);
    let rejected = state.rejected_services();
    assert_eq!(rejected.keys().collect::<Vec<_>>(), ["t/np"]);
    assert_eq!(rejected["t/np"].reason, SkipReason::InvalidPort);
    assert!(
        rejected["t/np"].detail.contains("nodePort 80 is outside"),
        "{:?}",
        rejected["t/np"]
    );
    // Still listed after a reload that does not parse the file again.
    state.reload(watch::Hints::default());
    assert_eq!(state.rejected_services().len(), 1);

    // A valid definition in a later file is programmed instead: not listed.
    write(dir.path(), "b.yaml", &service(30080));
    state.reload(watch::Hints::default());
    assert_eq!(state.store().counts(), (1, 0));
    assert!(state.rejected_services().is_empty());

    // Fixed in place (and the other file gone): nothing listed.
    fs::remove_file(dir.path().join("b.yaml")).unwrap();
    write(dir.path(), "a.yaml", &service(30081));
    state.reload(watch::Hints::default());
    assert!(state.rejected_services().is_empty());
    assert_eq!(state.store().counts(), (1, 0));
}

#[test]
fn fields_of_the_other_kind_that_do_not_fit_are_ignored_as_the_api_type_does() {
    // One decode reads both kinds' fields; `endpoints` and `addressType`
    // mean nothing on a Service, whose API type ignores them.
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{WEB_SERVICE}endpoints: 5\naddressType: [x]\nstatus: {{}}\n");
    let file = write(dir.path(), "web.yaml", &text);
    let set = load(std::slice::from_ref(&file));
    assert!(set.skipped.is_empty(), "{:?}", set.skipped);
    assert_eq!(set.services.len(), 1);
    assert_eq!(
        set.services[0]
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.as_deref()),
        Some("10.96.1.1")
    );
}

// --- the agent's Node -------------------------------------------------------

fn node_doc(name: &str, zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n\
         status: {{addresses: [{{type: InternalIP, address: 192.0.2.7}}, {{type: Hostname, address: {name}}}]}}\n---\n"
    )
}

#[test]
fn the_node_document_named_as_the_agent_reaches_the_store_and_a_zone_change_retranslates_all() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = format!(
        "{}{}",
        node_doc("node-b", "zone-b"),
        node_doc("node-a", "zone-a")
    );
    write(dir.path(), "nodes.yaml", &nodes);
    write(dir.path(), "web.yaml", WEB_SERVICE);
    let mut state = new_state(dir.path());
    state.set_node_name("node-a");
    let first = state.reload(watch::Hints::default());
    assert!(first.skipped.is_empty(), "{:?}", first.skipped);
    state.store_mut().take_changes();

    let zone = |state: &state::SourceState| {
        state
            .store()
            .node()
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get("topology.kubernetes.io/zone").cloned())
    };
    assert_eq!(zone(&state), Some("zone-a".to_string()));
    let addresses = state
        .store()
        .node()
        .and_then(|n| n.status.clone())
        .and_then(|s| s.addresses);
    assert_eq!(addresses.map(|a| a.len()), Some(2));

    write(
        dir.path(),
        "nodes.yaml",
        &nodes.replace("zone: zone-a", "zone: zone-c"),
    );
    state.reload(watch::Hints::default());
    assert_eq!(zone(&state), Some("zone-c".to_string()));
    assert!(state.store_mut().take_changes().all);

    // Another node's change leaves the store alone.
    write(
        dir.path(),
        "nodes.yaml",
        &node_doc("node-a", "zone-c").replace("zone-b", "zone-x"),
    );
    state.reload(watch::Hints::default());
    assert!(!state.store_mut().take_changes().all);

    fs::remove_file(dir.path().join("nodes.yaml")).unwrap();
    state.reload(watch::Hints::default());
    assert_eq!(state.store().node(), None);
    assert!(state.store_mut().take_changes().all);
}

#[test]
fn node_documents_are_loaded_cluster_scoped_and_an_invalid_zone_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let bad = node_doc("node-c", "\"not a label value!\"");
    write(
        dir.path(),
        "nodes.yaml",
        &format!("{}{bad}", node_doc("node-a", "zone-a")),
    );

    let set = load(&[dir.path().to_path_buf()]);

    assert_eq!(set.nodes.len(), 1);
    assert_eq!(set.nodes[0].metadata.name.as_deref(), Some("node-a"));
    assert_eq!(set.nodes[0].metadata.namespace, None);
    assert_eq!(reasons(&set), [(1, SkipReason::InvalidName)]);
}
