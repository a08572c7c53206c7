//! The Helm chart in `charts/kpr`, linted and rendered by real Helm and its
//! objects validated against the Kubernetes API's schemas.
//!
//! Helm v4 comes from the Helm SDK for Python (PyPI `helm-python-sdk`, Helm's
//! own Go library) driven by `tests/helm_chart/helm.py` with helm's command
//! line (`lint --strict`, `template`, `-f`, `--set`, `--set-string`,
//! `--kube-version`); the schemas from PyPI `kubernetes-validate` (strict:
//! an unknown field fails), for every Kubernetes version it has. Both live
//! in the virtualenv that `tools/setup-deps` makes (`/opt/kpr-test-venv`, or
//! `$KPR_TEST_VENV`); without it every test fails, naming that script.
//! The rendered objects are then read back and the fields that make kpr
//! work are checked as a user would: the agent's flags, capabilities,
//! mounts, RBAC, the ServiceMonitor.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

/// Release name and namespace of every render, as in the README's install.
const RELEASE: &str = "kpr";
const NAMESPACE: &str = "kube-system";

/// A value set: helm's value arguments, YAML first (as `-f FILE`), then
/// `--set`/`--set-string` expressions.
struct ValueSet {
    name: &'static str,
    yaml: &'static str,
    set: &'static [&'static str],
}

const fn values(name: &'static str, yaml: &'static str) -> ValueSet {
    ValueSet {
        name,
        yaml,
        set: &[],
    }
}

const DEFAULTS: ValueSet = values("defaults", "");
/// What a Cilium user writes: Cilium's names for the same settings.
const CILIUM: ValueSet = values(
    "cilium-spellings",
    r#"
kubeProxyReplacement: true
k8sServiceHost: 192.0.2.10
k8sServicePort: 6443
devices: eth+
loadBalancer: {mode: dsr, acceleration: native, algorithm: maglev}
bpf: {lbMapMax: 131072}
"#,
);
/// The chart's earlier spellings still work.
const LEGACY: ValueSet = values(
    "legacy-spellings",
    r#"
kubeProxyReplacement: partial
k8sServiceHost: '2001:db8::10'
k8sServicePort: 443
nodePort: {mode: hybrid, acceleration: generic}
"#,
);
const HARDENED: ValueSet = values(
    "hardening",
    r#"
metrics: {bind: hostIP}
securityContext:
  seccompProfile: {type: Localhost, localhostProfile: profiles/kpr.json}
  appArmorProfile: {type: Localhost, localhostProfile: kpr-agent}
  seLinuxOptions: {type: spc_t, level: s0}
  readOnlyRootFilesystem: true
  capabilities: [BPF, NET_ADMIN, PERFMON]
"#,
);
const SERVICE_MONITOR: ValueSet = values(
    "service-monitor",
    r#"
metrics: {bind: hostIP, port: 9963}
serviceMonitor:
  enabled: true
  interval: 15s
  labels: {release: prometheus}
  jobLabel: app.kubernetes.io/name
  relabelings:
    - {sourceLabels: [__meta_kubernetes_pod_host_ip], targetLabel: host_ip, action: replace}
  metricRelabelings:
    - {sourceLabels: [__name__], regex: 'go_.*', action: drop}
"#,
);
/// Every knob away from its default.
const EVERYTHING: ValueSet = values(
    "everything",
    r#"
k8sServiceHost: api.cluster.internal
k8sServicePort: 8443
kubeProxyReplacement: false
devices: [eth0, bond0]
loadBalancer: {mode: dsr, acceleration: native, algorithm: maglev}
nodePort: {redirectPeer: false}
serviceNoBackendResponse: drop
maglev: {tableSize: 4093, hashSeed: "12345678901234567890"}
bpf: {lbMapMax: 131072, ctMapMax: 262144}
metrics: {port: 9963, bind: hostIP}
healthz: {port: 9876}
extraArgs: ["--debounce-ms=50"]
serviceMonitor: {enabled: true, interval: 15s, labels: {release: prometheus}}
securityContext: {privileged: true}
events: {enabled: true}
image: {repository: registry.example/kpr, tag: v9.9.9, pullPolicy: Always}
imagePullSecrets: [{name: regcred}]
nodeSelector: {kubernetes.io/os: linux, kpr: "yes"}
tolerations: [{key: node-role.kubernetes.io/control-plane, operator: Exists, effect: NoSchedule}]
affinity:
  nodeAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      nodeSelectorTerms:
        - matchExpressions: [{key: kpr.io/skip, operator: DoesNotExist}]
priorityClassName: ""
updateStrategy: {type: OnDelete}
podAnnotations: {example.com/team: net}
podLabels: {team: net}
extraEnv: [{name: RUST_LOG, value: debug}]
extraVolumes: [{name: manifests, configMap: {name: kpr-manifests}}]
extraVolumeMounts: [{name: manifests, mountPath: /etc/kpr/manifests, readOnly: true}]
resources: {requests: {cpu: 200m, memory: 256Mi}, limits: {memory: 1Gi}}
"#,
);
/// What `--set` and `--set-string` give: strings where a file gives numbers.
const SET_FLAGS: ValueSet = ValueSet {
    name: "set-flags",
    yaml: "",
    set: &[
        "--set",
        "devices=eth0",
        "--set",
        "kubeProxyReplacement=false",
        "--set-string",
        "kubeProxyReplacement=true",
        "--set-string",
        "metrics.port=9963",
        "--set-string",
        "healthz.port=9876",
        "--set-string",
        "maglev.tableSize=4093",
        "--set-string",
        "bpf.lbMapMax=131072",
        "--set",
        "maglev.hashSeed=42",
        "--set",
        "k8sServiceHost=192.0.2.10",
        "--set-string",
        "k8sServicePort=443",
    ],
};
const HOST_MOUNTS: ValueSet = values(
    "host-mounts",
    r#"
bpf: {autoMount: {enabled: false}}
cgroup: {autoMount: {enabled: false}, hostRoot: /sys/fs/cgroup}
"#,
);
/// The monitoring objects on: the dashboard ConfigMap and the PrometheusRule.
const MONITORING: ValueSet = values(
    "monitoring",
    r#"
metrics: {bind: hostIP}
serviceMonitor: {enabled: true}
dashboards:
  enabled: true
  namespace: monitoring
  labelValue: kpr
  annotations: {grafana_folder: Networking}
prometheusRule: {enabled: true, labels: {release: kube-prometheus-stack}}
"#,
);
const ALL_VALUE_SETS: &[&ValueSet] = &[
    &MONITORING,
    &DEFAULTS,
    &CILIUM,
    &LEGACY,
    &HARDENED,
    &SERVICE_MONITOR,
    &EVERYTHING,
    &SET_FLAGS,
    &HOST_MOUNTS,
];

/// The Kubernetes versions whose schemas kubernetes-validate ships
/// (`kubernetes-json-schema/v1.NN.0-local-strict`); the chart renders for
/// each (`--kube-version`) and must pass each.
const OLDEST_MINOR: u32 = 25;
const NEWEST_MINOR: u32 = 37;

// ------------------------------------------------------------ the tools --

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/kpr")
}

/// The virtualenv with the Helm SDK and kubernetes-validate.
#[track_caller]
fn venv() -> PathBuf {
    let dir = std::env::var_os("KPR_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/kpr-test-venv"));
    for tool in ["bin/python", "bin/kubernetes-validate"] {
        assert!(
            dir.join(tool).exists(),
            "{} is missing: run tools/setup-deps (it installs helm-python-sdk and \
             kubernetes-validate into {}, or $KPR_TEST_VENV)",
            dir.join(tool).display(),
            dir.display()
        );
    }
    dir
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

#[track_caller]
fn run(program: &Path, args: &[&str]) -> Run {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {}: {e} (tools/setup-deps installs it)",
                program.display()
            )
        });
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `helm ARGS` through tests/helm_chart/helm.py.
#[track_caller]
fn helm(args: &[&str]) -> Run {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helm_chart/helm.py");
    let script = script.to_str().expect("UTF-8 path");
    let mut all = vec![script];
    all.extend_from_slice(args);
    run(&venv().join("bin/python"), &all)
}

/// helm's value arguments for a YAML overlay and --set expressions; the
/// YAML goes through a file, as `-f` takes it.
fn value_args(name: &str, yaml: &str, set: &[&str]) -> Vec<String> {
    let mut args = Vec::new();
    if !yaml.is_empty() {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let file = dir.join(format!("helm-values-{name}-{:x}.yaml", fnv1a(yaml)));
        // Tests run in parallel: a reader never sees a half-written file.
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let partial = dir.join(format!("helm-values-{}-{n}.partial", std::process::id()));
        std::fs::write(&partial, yaml).expect("writing a values file");
        std::fs::rename(&partial, &file).expect("renaming a values file");
        args.extend(["-f".to_string(), file.display().to_string()]);
    }
    args.extend(set.iter().map(|s| s.to_string()));
    args
}

/// FNV-1a: a stable file name for a YAML overlay.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// `helm template kpr charts/kpr -n kube-system [--kube-version V] VALUES`.
fn template(name: &str, yaml: &str, set: &[&str], kube_version: Option<&str>) -> Run {
    let chart = chart_dir().display().to_string();
    let mut args: Vec<String> = ["template", RELEASE, &chart, "-n", NAMESPACE]
        .map(String::from)
        .into();
    if let Some(v) = kube_version {
        args.extend(["--kube-version".to_string(), v.to_string()]);
    }
    args.extend(value_args(name, yaml, set));
    helm(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

struct Rendered {
    /// helm template's output.
    text: String,
    /// Every non-empty YAML document, in helm's order.
    docs: Vec<Value>,
}

/// Renders a value set for the newest Kubernetes version helm knows.
#[track_caller]
fn render(set: &ValueSet) -> Rendered {
    render_yaml(set.name, set.yaml, set.set)
}

#[track_caller]
fn render_yaml(name: &str, yaml: &str, set: &[&str]) -> Rendered {
    let out = template(name, yaml, set, None);
    assert!(out.ok, "{name}: helm template failed: {}", out.stderr);
    parse(&out.stdout)
}

#[track_caller]
fn parse(text: &str) -> Rendered {
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("helm's YAML: {e}\n{text}"));
        if !v.is_null() {
            docs.push(v);
        }
    }
    Rendered {
        text: text.to_string(),
        docs,
    }
}

impl Rendered {
    fn kinds(&self) -> Vec<&str> {
        self.docs
            .iter()
            .map(|d| d["kind"].as_str().unwrap_or("?"))
            .collect()
    }

    #[track_caller]
    fn one(&self, kind: &str) -> &Value {
        let all: Vec<_> = self.docs.iter().filter(|d| d["kind"] == kind).collect();
        assert_eq!(all.len(), 1, "want one {kind}, have {:?}", self.kinds());
        all[0]
    }

    #[track_caller]
    fn typed<T: DeserializeOwned>(&self, kind: &str) -> T {
        serde_json::from_value(self.one(kind).clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
    }

    fn daemonset(&self) -> DaemonSet {
        self.typed("DaemonSet")
    }
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("a pod spec")
}

fn pod_metadata(ds: &DaemonSet) -> &ObjectMeta {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .expect("pod metadata")
}

fn init_container<'a>(ds: &'a DaemonSet, name: &str) -> Option<&'a Container> {
    pod_spec(ds)
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == name)
}

#[track_caller]
fn agent(ds: &DaemonSet) -> &Container {
    pod_spec(ds)
        .containers
        .iter()
        .find(|c| c.name == "agent")
        .expect("the agent container")
}

fn args(ds: &DaemonSet) -> Vec<&str> {
    agent(ds)
        .args
        .iter()
        .flatten()
        .map(String::as_str)
        .collect()
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("serializable")
}

/// mountPath -> (volume, mountPropagation, readOnly) of a container.
fn mounts(c: &Container) -> BTreeMap<&str, (&str, &str, bool)> {
    c.volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            (
                m.mount_path.as_str(),
                (
                    m.name.as_str(),
                    m.mount_propagation.as_deref().unwrap_or("None"),
                    m.read_only.unwrap_or(false),
                ),
            )
        })
        .collect()
}

/// Volume name -> its source, as JSON without the name.
fn volumes(ds: &DaemonSet) -> BTreeMap<String, Value> {
    pod_spec(ds)
        .volumes
        .iter()
        .flatten()
        .map(|v| {
            let mut j = to_json(v);
            j.as_object_mut().expect("a map").remove("name");
            (v.name.clone(), j)
        })
        .collect()
}

// ------------------------------------------------- helm and the schemas --

#[test]
fn helm_lint_strict_passes_for_every_value_set_and_kubernetes_version() {
    let chart = chart_dir().display().to_string();
    for set in ALL_VALUE_SETS {
        for minor in [OLDEST_MINOR, NEWEST_MINOR] {
            let version = format!("1.{minor}.0");
            let mut args: Vec<String> = ["lint", &chart, "--strict", "-n", NAMESPACE]
                .map(String::from)
                .into();
            args.extend(["--kube-version".to_string(), version.clone()]);
            args.extend(value_args(set.name, set.yaml, set.set));
            let out = helm(&args.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(
                out.ok,
                "{} on {version}: helm lint --strict:\n{}{}",
                set.name, out.stdout, out.stderr
            );
            assert!(out.stdout.contains("0 chart(s) failed"), "{}", out.stdout);
        }
    }
}

/// kubernetes-validate --strict over files, for one version: its verdict
/// lines (one per object), and the run.
fn validate(files: &[PathBuf], version: &str) -> (Vec<String>, Run) {
    let mut args = vec!["--strict", "-k", version];
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    args.extend(names.iter().map(String::as_str));
    let out = run(&venv().join("bin/kubernetes-validate"), &args);
    let verdicts = out.stdout.lines().map(String::from).collect();
    (verdicts, out)
}

#[test]
fn every_rendered_object_passes_the_strict_schemas_of_kubernetes_1_25_to_1_37() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helm-chart-validate");
    let versions: Vec<String> = (OLDEST_MINOR..=NEWEST_MINOR)
        .map(|minor| format!("1.{minor}.0"))
        .collect();
    // Each value set rendered for every version (`--kube-version`) in one
    // helm.py run, into DIR/SET/VERSION.yaml.
    let chart = chart_dir().display().to_string();
    for set in ALL_VALUE_SETS {
        let out_dir = dir.join(set.name).display().to_string();
        let mut args: Vec<String> = ["template", RELEASE, &chart, "-n", NAMESPACE]
            .map(String::from)
            .into();
        for v in &versions {
            args.extend(["--kube-version".to_string(), v.clone()]);
        }
        args.extend(["--output-dir".to_string(), out_dir]);
        args.extend(value_args(set.name, set.yaml, set.set));
        let out = helm(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.ok, "{}: helm template: {}", set.name, out.stderr);
    }
    // Then every version's renders in one kubernetes-validate run.
    let mut failures = Vec::new();
    for version in &versions {
        let files: Vec<PathBuf> = ALL_VALUE_SETS
            .iter()
            .map(|set| dir.join(set.name).join(format!("{version}.yaml")))
            .collect();
        let (mut objects, mut custom) = (0, 0);
        for file in &files {
            let docs = parse(&std::fs::read_to_string(file).expect("a render")).docs;
            objects += docs.len();
            custom += docs.iter().filter(|d| is_custom(d)).count();
        }
        let (lines, out) = validate(&files, version);
        let passed = lines.iter().filter(|l| l.contains(" passed ")).count();
        // The ServiceMonitor and PrometheusRule are custom resources: no
        // schema in kubernetes-validate (their fields are checked below).
        let no_schema = lines
            .iter()
            .filter(|l| {
                l.starts_with("WARN")
                    && (l.contains("kind ServiceMonitor") || l.contains("kind PrometheusRule"))
            })
            .count();
        if !out.ok || passed != objects - custom || no_schema != custom {
            failures.push(format!(
                "{version}: {passed} of {} objects passed:\n{}{}",
                objects - custom,
                out.stdout,
                out.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The Prometheus Operator's kinds, which kubernetes-validate has no schema of.
fn is_custom(doc: &Value) -> bool {
    doc["kind"] == "ServiceMonitor" || doc["kind"] == "PrometheusRule"
}

#[test]
fn the_strict_schema_catches_a_misspelt_key_and_a_yaml_1_1_bool() {
    let out = template("defaults", "", &[], None);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    for (name, from, to) in [
        ("misspelt", "hostNetwork: true", "hostNetwrok: true"),
        // The API server reads YAML 1.1: an unquoted yes is a bool, not a
        // label value.
        ("yaml11", "kubernetes.io/os: linux", "kubernetes.io/os: yes"),
    ] {
        assert!(out.stdout.contains(from), "{from}");
        let file = dir.join(format!("helm-chart-{name}.yaml"));
        std::fs::write(&file, out.stdout.replace(from, to)).expect("write");
        let (_, verdict) = validate(&[file], &format!("1.{NEWEST_MINOR}.0"));
        assert!(!verdict.ok, "{name} passed:\n{}", verdict.stdout);
        assert!(verdict
            .stdout
            .contains("did not validate for resource daemonset/kpr"));
    }
}

#[test]
fn the_app_armor_profile_is_the_field_from_1_30_and_the_annotation_before() {
    for (version, field) in [("1.29.0", false), ("1.30.0", true)] {
        let out = template("defaults", "", &[], Some(version));
        assert!(out.ok, "{}", out.stderr);
        let ds = parse(&out.stdout).daemonset();
        let sc = to_json(&agent(&ds).security_context);
        let annotations = to_json(&pod_metadata(&ds).annotations);
        let key = "container.apparmor.security.beta.kubernetes.io/agent";
        if field {
            assert_eq!(sc["appArmorProfile"], json!({"type": "Unconfined"}));
            assert_eq!(annotations, Value::Null, "{version}");
        } else {
            assert_eq!(sc.get("appArmorProfile"), None, "{version}");
            assert_eq!(annotations[key], "unconfined");
        }
    }
    let ds = render(&HARDENED).daemonset();
    assert_eq!(
        to_json(&agent(&ds).security_context)["appArmorProfile"],
        json!({"type": "Localhost", "localhostProfile": "kpr-agent"})
    );
    let out = template("hardening", HARDENED.yaml, &[], Some("1.25.0"));
    let ds = parse(&out.stdout).daemonset();
    assert_eq!(
        to_json(&pod_metadata(&ds).annotations)
            ["container.apparmor.security.beta.kubernetes.io/agent"],
        "localhost/kpr-agent"
    );
}

// ------------------------------------------------------------ the values --

#[test]
fn the_schema_rejects_wrong_values_and_unknown_keys() {
    let bad = [
        "kubeProxyReplacement: probe",
        "kubeProxyReplacement: 1",
        "loadBalancer: {mode: dnat}",
        "loadBalancer: {acceleration: best-effort}",
        "nodePort: {mode: dnat}",
        "serviceNoBackendResponse: icmp",
        "loadBalancer: {algorithm: round-robin}",
        "maglev: {tableSize: 16384}",
        "maglev: {tableSize: '16384'}",
        "maglev: {hashSeed: -1}",
        "maglev: {hashSeed: '-1'}",
        "maglev: {hashSeed: '123456789012345678901'}",
        "metrics: {port: 0}",
        "metrics: {port: '70000'}",
        "metrics: {bind: 0.0.0.0}",
        "healthz: {port: 70000}",
        "k8sServicePort: 'https'",
        "k8sServiceHost: https://192.0.2.10:6443",
        "k8sServiceHost: auto",
        "devices: ['eth0,eth1']",
        "devices: 'eth0, eth1'",
        "bpf: {lbMapMax: 8}",
        "bpf: {ctMapMax: 'lots'}",
        "securityContext: {privileged: 'yes'}",
        "securityContext: {capabilities: [CAP_BPF, bpf]}",
        "securityContext: {seccompProfile: {type: Default}}",
        "securityContext: {seccompProfile: {type: Localhost}}",
        "securityContext: {appArmorProfile: {type: Localhost}}",
        "securityContext: {seLinuxOptions: {kind: spc_t}}",
        "securityContext: {readOnlyRootFilesystem: 'true'}",
        "cgroup: {hostRoot: run/kpr}",
        "image: {pullPolicy: Sometimes}",
        "serviceMonitor: {interval: 30}",
        "serviceMonitor: {enable: true}",
        "serviceMonitor: {relabelings: {action: drop}}",
        "k8sServicehost: 192.0.2.10",
        "events: {enabled: true, verbs: [delete]}",
        "resources: {requests: {gpu: 1}}",
        "tolerations: {operator: Exists}",
        "podLabels: {team: 7}",
        "updateStrategy: {type: Recreate}",
    ];
    for (i, yaml) in bad.iter().enumerate() {
        let out = template(&format!("bad{i}"), yaml, &[], None);
        assert!(!out.ok, "the schema accepts {yaml:?}");
        assert!(
            out.stderr.contains("values don't meet the specifications"),
            "{yaml}: {}",
            out.stderr
        );
    }
}

#[test]
fn the_service_monitor_needs_the_metrics_port_on_the_host_ip() {
    let out = template("sm-loopback", "serviceMonitor: {enabled: true}", &[], None);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("serviceMonitor.enabled needs metrics.bind=hostIP"),
        "{}",
        out.stderr
    );
}

/// Leaf paths of a values tree ("image.tag", "resources.requests.cpu").
fn leaf_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                leaf_paths(v, &format!("{prefix}{k}."), out);
            }
        }
        _ => out.push(prefix.trim_end_matches('.').to_string()),
    }
}

fn read(file: &str) -> String {
    std::fs::read_to_string(chart_dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn defaults() -> Value {
    serde_yaml_ng::from_str(&read("values.yaml")).expect("values.yaml is YAML")
}

#[test]
fn every_value_is_commented_in_values_yaml_and_listed_in_the_readme() {
    let values_yaml = read("values.yaml");
    let readme = read("README.md");
    // The README's values table: rows "| `path` | default | meaning |" in
    // its "## Values" section.
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Values\n"))
        .expect("a \"## Values\" section in the chart README");
    let documented: Vec<&str> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split_once("` |").map(|(k, _)| k))
        .collect();
    let mut leaves = Vec::new();
    leaf_paths(&defaults(), "", &mut leaves);
    for leaf in &leaves {
        assert!(
            documented
                .iter()
                .any(|d| leaf == d || leaf.starts_with(&format!("{d}."))),
            "{leaf} is missing from the README's values table"
        );
    }
    for d in &documented {
        assert!(
            leaves
                .iter()
                .any(|l| l == d || l.starts_with(&format!("{d}."))),
            "the README documents {d}, which values.yaml does not have"
        );
    }
    // Every key in values.yaml has a comment right above it, or sits in a
    // map whose key has one (the entries of `resources`, `nodeSelector`).
    let lines: Vec<&str> = values_yaml.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let commented = |i: usize| i > 0 && lines[i - 1].trim_start().starts_with('#');
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') || t.starts_with('-') || t.ends_with(':') {
            continue;
        }
        let mut documented = commented(i);
        let mut child = i;
        while !documented {
            let Some(parent) = (0..child)
                .rev()
                .find(|&j| !lines[j].trim().is_empty() && indent(lines[j]) < indent(lines[child]))
            else {
                break;
            };
            documented = commented(parent);
            child = parent;
        }
        assert!(
            documented,
            "values.yaml line {}: {t:?} has no comment",
            i + 1
        );
    }
}

/// Properties named in the schema exist in values.yaml (no stale schema).
fn schema_properties_exist(schema: &Value, values: &Value, at: &str) {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (k, sub) in props {
        if k == "global" || (at.ends_with("Profile.") || at.ends_with("Options.")) {
            continue; // Helm's; optional fields of a Kubernetes type.
        }
        let v = values
            .get(k)
            .unwrap_or_else(|| panic!("the schema has {at}{k}, values.yaml does not"));
        schema_properties_exist(sub, v, &format!("{at}{k}."));
    }
}

#[test]
fn the_schema_describes_values_yaml_and_nothing_else() {
    let schema: Value = serde_json::from_str(&read("values.schema.json")).expect("JSON");
    // additionalProperties: false at the top, so values.yaml passing the
    // schema (every render does) means every top key is in the schema.
    schema_properties_exist(&schema, &defaults(), "");
    assert_eq!(schema["additionalProperties"], false);
}

// ----------------------------------------------------- what gets created --

#[test]
fn defaults_create_the_agent_and_its_read_only_rbac_and_no_monitoring() {
    let r = render(&DEFAULTS);
    let mut kinds = r.kinds();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "ServiceAccount"
        ]
    );
    for doc in &r.docs {
        assert_eq!(doc["metadata"]["name"], "kpr", "{}", doc["kind"]);
        let labels = &doc["metadata"]["labels"];
        assert_eq!(labels["app.kubernetes.io/name"], "kpr");
        assert_eq!(labels["app.kubernetes.io/instance"], RELEASE);
        assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm");
        assert_eq!(labels["helm.sh/chart"], "kpr-0.2.0");
    }
    for kind in ["DaemonSet", "ServiceAccount"] {
        assert_eq!(r.one(kind)["metadata"]["namespace"], NAMESPACE);
    }
    assert!(r.text.contains("# Source: kpr/templates/daemonset.yaml"));
}

#[test]
fn the_daemonset_runs_on_every_node_in_the_host_network() {
    for set in ALL_VALUE_SETS {
        let ds = render(set).daemonset();
        let spec = ds.spec.as_ref().expect("spec");
        let pod = pod_spec(&ds);
        let name = set.name;
        assert_eq!(pod.host_network, Some(true), "{name}");
        assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
        // The selector picks the pod template's labels.
        let selector = spec.selector.match_labels.as_ref().expect("matchLabels");
        let labels = pod_metadata(&ds).labels.as_ref().expect("pod labels");
        for (k, v) in selector {
            assert_eq!(labels.get(k), Some(v), "{name}: pod label {k}");
        }
        assert_eq!(pod.service_account_name.as_deref(), Some("kpr"));
        if set.name != EVERYTHING.name {
            assert_eq!(
                pod.priority_class_name.as_deref(),
                Some("system-node-critical")
            );
            assert_eq!(to_json(&pod.tolerations), json!([{"operator": "Exists"}]));
            assert_eq!(
                to_json(&spec.update_strategy),
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}),
                "{name}"
            );
        }
    }
}

#[test]
fn node_name_comes_from_the_downward_api() {
    let ds = render(&DEFAULTS).daemonset();
    assert_eq!(
        to_json(&agent(&ds).env),
        json!([{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}])
    );
    assert!(args(&ds).contains(&"--node-name=$(NODE_NAME)"));
}

#[test]
fn default_args_pass_no_nodeport_flag_no_api_server_and_metrics_on_loopback() {
    let ds = render(&DEFAULTS).daemonset();
    assert_eq!(
        agent(&ds).command.as_deref(),
        Some(&["kpr".to_string()][..])
    );
    assert_eq!(
        args(&ds),
        [
            "agent",
            "--kube-proxy-replacement=strict",
            "--node-name=$(NODE_NAME)",
            "--metrics-addr=127.0.0.1:10249",
            "--healthz-addr=0.0.0.0:10256",
            "--bpf-root=/sys/fs/bpf/kpr",
            "--cgroup=/run/kpr/cgroupv2",
        ]
    );
}

#[test]
fn no_value_set_serves_metrics_and_status_on_every_address() {
    for set in ALL_VALUE_SETS {
        let ds = render(set).daemonset();
        let metrics: Vec<&str> = args(&ds)
            .into_iter()
            .filter(|a| a.starts_with("--metrics-addr="))
            .collect();
        assert_eq!(metrics.len(), 1, "{}", set.name);
        let addr = &metrics[0]["--metrics-addr=".len()..];
        assert!(
            addr.starts_with("127.0.0.1:") || addr.starts_with("$(HOST_IP):"),
            "{}: {addr}",
            set.name
        );
    }
}

#[test]
fn metrics_bind_host_ip_takes_the_node_address_from_the_downward_api() {
    let ds = render(&HARDENED).daemonset();
    assert!(args(&ds).contains(&"--metrics-addr=$(HOST_IP):10249"));
    let env = to_json(&agent(&ds).env);
    assert_eq!(
        env[1],
        json!({"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}})
    );
}

#[test]
fn api_server_values_become_the_flag_and_the_client_environment() {
    let ds = render(&CILIUM).daemonset();
    assert!(args(&ds).contains(&"--k8s-api-server=https://192.0.2.10:6443"));
    let env = to_json(&agent(&ds).env);
    assert_eq!(
        env[1],
        json!({"name": "KUBERNETES_SERVICE_HOST", "value": "192.0.2.10"})
    );
    assert_eq!(
        env[2],
        json!({"name": "KUBERNETES_SERVICE_PORT", "value": "6443"})
    );

    let ds = render(&LEGACY).daemonset();
    assert!(
        args(&ds).contains(&"--k8s-api-server=https://[2001:db8::10]:443"),
        "{:?}",
        args(&ds)
    );
}

#[test]
fn cilium_spellings_reach_the_same_flags() {
    let ds = render(&CILIUM).daemonset();
    let a = args(&ds);
    for flag in [
        "--kube-proxy-replacement=strict",
        "--devices=eth+",
        "--nodeport-mode=dsr",
        "--nodeport-acceleration=native",
        "--lb-algorithm=maglev",
        "--lb-map-max=131072",
    ] {
        assert!(a.contains(&flag), "{flag} missing from {a:?}");
    }
    for (kpr, flag) in [
        ("true", "strict"),
        ("false", "partial"),
        ("strict", "strict"),
        ("partial", "partial"),
    ] {
        let ds = render_yaml("kpr-mode", &format!("kubeProxyReplacement: {kpr}"), &[]).daemonset();
        assert_eq!(
            args(&ds)[1],
            format!("--kube-proxy-replacement={flag}"),
            "{kpr}"
        );
    }
}

#[test]
fn the_earlier_node_port_spellings_still_work() {
    let ds = render(&LEGACY).daemonset();
    let a = args(&ds);
    assert!(a.contains(&"--kube-proxy-replacement=partial"));
    assert!(a.contains(&"--nodeport-mode=hybrid"));
    assert!(a.contains(&"--nodeport-acceleration=generic"));
}

#[test]
fn set_and_set_string_values_render_as_their_numbers_and_lists() {
    let ds = render(&SET_FLAGS).daemonset();
    assert_eq!(
        args(&ds),
        [
            "agent",
            "--kube-proxy-replacement=strict",
            "--k8s-api-server=https://192.0.2.10:443",
            "--node-name=$(NODE_NAME)",
            "--devices=eth0",
            "--maglev-table-size=4093",
            "--maglev-hash-seed=42",
            "--lb-map-max=131072",
            "--metrics-addr=127.0.0.1:9963",
            "--healthz-addr=0.0.0.0:9876",
            "--bpf-root=/sys/fs/bpf/kpr",
            "--cgroup=/run/kpr/cgroupv2",
        ]
    );
    // A port given as a string still becomes a number in the pod spec.
    let ports = to_json(&agent(&ds).ports);
    assert_eq!(ports[0]["containerPort"], 9963);
    let ds = render_yaml("devices-list", "", &["--set", "devices={eth0,eth1}"]).daemonset();
    assert!(args(&ds).contains(&"--devices=eth0,eth1"));
}

#[test]
fn every_value_reaches_its_flag_in_order_with_extra_args_last() {
    let ds = render(&EVERYTHING).daemonset();
    assert_eq!(
        args(&ds),
        [
            "agent",
            "--kube-proxy-replacement=partial",
            "--k8s-api-server=https://api.cluster.internal:8443",
            "--node-name=$(NODE_NAME)",
            "--devices=eth0,bond0",
            "--nodeport-mode=dsr",
            "--nodeport-acceleration=native",
            "--nodeport-redirect-peer=false",
            "--service-no-backend-response=drop",
            "--lb-algorithm=maglev",
            "--maglev-table-size=4093",
            "--maglev-hash-seed=12345678901234567890",
            "--lb-map-max=131072",
            "--ct-map-max=262144",
            "--metrics-addr=$(HOST_IP):9963",
            "--healthz-addr=0.0.0.0:9876",
            "--bpf-root=/sys/fs/bpf/kpr",
            "--cgroup=/run/kpr/cgroupv2",
            "--debounce-ms=50",
        ]
    );
    let a = agent(&ds);
    assert_eq!(a.image.as_deref(), Some("registry.example/kpr:v9.9.9"));
    assert_eq!(a.image_pull_policy.as_deref(), Some("Always"));
    let pod = to_json(pod_spec(&ds));
    assert_eq!(pod["imagePullSecrets"], json!([{"name": "regcred"}]));
    assert_eq!(
        pod["nodeSelector"],
        json!({"kubernetes.io/os": "linux", "kpr": "yes"})
    );
}

#[test]
fn the_standard_daemonset_knobs_reach_the_pod() {
    let ds = render(&EVERYTHING).daemonset();
    let pod = to_json(pod_spec(&ds));
    let spec = ds.spec.as_ref().expect("spec");
    assert_eq!(
        pod["tolerations"],
        json!([{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}])
    );
    assert_eq!(
        pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"][0]["key"],
        "kpr.io/skip"
    );
    assert_eq!(pod.get("priorityClassName"), None, "\"\" sets none");
    assert_eq!(to_json(&spec.update_strategy), json!({"type": "OnDelete"}));
    let meta = pod_metadata(&ds);
    assert_eq!(
        to_json(&meta.annotations),
        json!({"example.com/team": "net"})
    );
    assert_eq!(
        meta.labels
            .as_ref()
            .and_then(|l| l.get("team"))
            .map(String::as_str),
        Some("net")
    );
    let a = agent(&ds);
    let env = to_json(&a.env);
    assert_eq!(
        env.as_array().and_then(|e| e.last()),
        Some(&json!({"name": "RUST_LOG", "value": "debug"}))
    );
    assert_eq!(
        volumes(&ds)["manifests"],
        json!({"configMap": {"name": "kpr-manifests"}})
    );
    assert_eq!(mounts(a)["/etc/kpr/manifests"], ("manifests", "None", true));
    assert_eq!(
        to_json(&a.resources),
        json!({"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}})
    );
}

#[test]
fn one_nodeport_value_alone_passes_only_its_own_flag() {
    let ds = render_yaml("accel", "loadBalancer: {acceleration: generic}", &[]).daemonset();
    let a = args(&ds);
    assert!(a.contains(&"--nodeport-acceleration=generic"));
    assert!(!a.iter().any(|x| x.starts_with("--nodeport-mode")));
    assert!(!a.iter().any(|x| x.starts_with("--devices")));
    assert!(!a
        .iter()
        .any(|x| x.starts_with("--service-no-backend-response")));
}

#[test]
fn one_maglev_value_alone_passes_only_its_own_flag() {
    for (yaml, flag) in [
        ("maglev: {tableSize: 65521}", "--maglev-table-size=65521"),
        ("maglev: {hashSeed: '7'}", "--maglev-hash-seed=7"),
        ("loadBalancer: {algorithm: maglev}", "--lb-algorithm=maglev"),
    ] {
        let ds = render_yaml("maglev", yaml, &[]).daemonset();
        let a = args(&ds);
        let ours: Vec<&&str> = a
            .iter()
            .filter(|x| x.starts_with("--maglev") || x.starts_with("--lb-algorithm"))
            .collect();
        assert_eq!(ours, [&flag], "{yaml}: {a:?}");
    }
}

#[test]
fn every_flag_the_chart_passes_is_one_kpr_agent_has() {
    let help = run(Path::new(env!("CARGO_BIN_EXE_kpr")), &["agent", "--help"]);
    assert!(help.ok, "kpr agent --help: {}", help.stderr);
    for set in [&EVERYTHING, &CILIUM, &SET_FLAGS, &LEGACY] {
        let ds = render(set).daemonset();
        for arg in args(&ds).iter().skip(1) {
            let flag = arg.split('=').next().unwrap_or(arg);
            assert!(
                help.stdout.contains(&format!("{flag} "))
                    || help.stdout.contains(&format!("{flag}\n")),
                "{}: kpr agent --help has no {flag}",
                set.name
            );
        }
    }
}

#[test]
fn the_image_defaults_to_the_published_name_and_the_app_version() {
    let ds = render(&DEFAULTS).daemonset();
    let chart: Value = serde_yaml_ng::from_str(&read("Chart.yaml")).expect("Chart.yaml");
    let app_version = chart["appVersion"].as_str().expect("appVersion");
    assert_eq!(
        agent(&ds).image.as_deref(),
        Some(format!("ghcr.io/kpr-project/kpr:{app_version}").as_str())
    );
    for name in ["mount-cgroup", "mount-bpf-fs"] {
        let c = init_container(&ds, name).expect(name);
        assert_eq!(c.image, agent(&ds).image, "{name}");
    }
    // tools/build-image tags the image it builds with the same name.
    let build =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/build-image"))
            .expect("tools/build-image");
    assert!(build.contains("ghcr.io/kpr-project/kpr"));
}

// ------------------------------------------------------------ hardening --

#[test]
fn the_agent_is_unprivileged_read_only_with_four_capabilities_by_default() {
    let ds = render(&DEFAULTS).daemonset();
    assert_eq!(
        to_json(&agent(&ds).security_context),
        json!({
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "capabilities": {
                "add": ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"],
                "drop": ["ALL"],
            },
            "readOnlyRootFilesystem": true,
            "appArmorProfile": {"type": "Unconfined"},
        })
    );
    assert_eq!(
        to_json(&pod_spec(&ds).security_context),
        json!({"seccompProfile": {"type": "RuntimeDefault"}})
    );
    // SYS_ADMIN only where a mount is made: the privileged init containers.
    for set in ALL_VALUE_SETS {
        let ds = render(set).daemonset();
        let sc = to_json(&agent(&ds).security_context);
        if sc["privileged"] != true {
            let caps = &sc["capabilities"]["add"];
            assert!(
                !caps
                    .as_array()
                    .expect("a list")
                    .contains(&json!("SYS_ADMIN")),
                "{}: {caps}",
                set.name
            );
        }
        for c in pod_spec(&ds).init_containers.iter().flatten() {
            let sc = to_json(&c.security_context);
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{}", c.name);
        }
    }
}

#[test]
fn hardening_values_reach_the_security_contexts() {
    let ds = render(&HARDENED).daemonset();
    assert_eq!(
        to_json(&agent(&ds).security_context),
        json!({
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "capabilities": {"add": ["BPF", "NET_ADMIN", "PERFMON"], "drop": ["ALL"]},
            "readOnlyRootFilesystem": true,
            "appArmorProfile": {"type": "Localhost", "localhostProfile": "kpr-agent"},
            "seLinuxOptions": {"type": "spc_t", "level": "s0"},
        })
    );
    assert_eq!(
        to_json(&pod_spec(&ds).security_context),
        json!({"seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/kpr.json"}})
    );
    // SYS_ADMIN added by hand drops allowPrivilegeEscalation: false, which
    // Kubernetes refuses together with it.
    let ds = render_yaml(
        "sys-admin",
        "securityContext: {capabilities: [BPF, NET_ADMIN, SYS_ADMIN]}",
        &[],
    )
    .daemonset();
    let sc = to_json(&agent(&ds).security_context);
    assert_eq!(sc.get("allowPrivilegeEscalation"), None);
}

#[test]
fn privileged_true_makes_the_agent_privileged_without_a_capability_list() {
    let ds = render_yaml("privileged", "securityContext: {privileged: true}", &[]).daemonset();
    assert_eq!(
        to_json(&agent(&ds).security_context),
        json!({"privileged": true, "readOnlyRootFilesystem": true})
    );
    assert_eq!(mounts(agent(&ds))["/sys/fs/bpf"].1, "Bidirectional");
}

#[test]
fn volumes_are_the_host_bpffs_cgroup2_root_modules_the_applied_record_and_a_scratch_tmp() {
    let ds = render(&DEFAULTS).daemonset();
    assert_eq!(
        volumes(&ds),
        BTreeMap::from([
            (
                "bpf-maps".to_string(),
                json!({"hostPath": {"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"}})
            ),
            (
                "cgroup-root".to_string(),
                json!({"hostPath": {"path": "/run/kpr/cgroupv2", "type": "DirectoryOrCreate"}})
            ),
            (
                "lib-modules".to_string(),
                json!({"hostPath": {"path": "/lib/modules"}})
            ),
            (
                "hostproc".to_string(),
                json!({"hostPath": {"path": "/proc", "type": "Directory"}})
            ),
            (
                "tmp".to_string(),
                json!({"emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}})
            ),
            // svc list's names and --verify under a read-only root.
            (
                "applied-record".to_string(),
                json!({"hostPath": {"path": "/run/kpr/applied", "type": "DirectoryOrCreate"}})
            ),
        ])
    );
    // Unprivileged, the agent may not propagate mounts to the host
    // (Kubernetes rejects Bidirectional there); it sees the host's.
    assert_eq!(
        mounts(agent(&ds)),
        BTreeMap::from([
            ("/sys/fs/bpf", ("bpf-maps", "HostToContainer", false)),
            (
                "/run/kpr/cgroupv2",
                ("cgroup-root", "HostToContainer", false)
            ),
            ("/lib/modules", ("lib-modules", "None", true)),
            ("/tmp", ("tmp", "None", false)),
            ("/run/kpr/applied", ("applied-record", "None", false)),
        ])
    );
}

#[test]
fn init_containers_mount_cgroup2_and_bpffs_on_the_host() {
    let ds = render(&DEFAULTS).daemonset();
    let names: Vec<_> = pod_spec(&ds)
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["mount-cgroup", "mount-bpf-fs"]);

    let cg = init_container(&ds, "mount-cgroup").expect("mount-cgroup");
    let script = cg.command.as_ref().expect("command").join(" ");
    assert!(script.contains("nsenter --cgroup=/hostproc/1/ns/cgroup -- mount -t cgroup2"));
    assert!(
        script.contains("cgroup2 already mounted"),
        "idempotent: {script}"
    );
    assert_eq!(
        to_json(&cg.env),
        json!([{"name": "CGROUP_ROOT", "value": "/run/kpr/cgroupv2"}])
    );
    assert_eq!(
        mounts(cg),
        BTreeMap::from([
            ("/hostproc", ("hostproc", "None", true)),
            ("/run/kpr/cgroupv2", ("cgroup-root", "Bidirectional", false)),
        ])
    );

    let bpf = init_container(&ds, "mount-bpf-fs").expect("mount-bpf-fs");
    let script = bpf.command.as_ref().expect("command").join(" ");
    assert!(script.contains("mount -t bpf bpf /sys/fs/bpf"));
    assert!(
        script.contains("bpffs already mounted"),
        "idempotent: {script}"
    );
    assert_eq!(
        mounts(bpf),
        BTreeMap::from([("/sys/fs/bpf", ("bpf-maps", "Bidirectional", false))])
    );
    // Bidirectional propagation needs a privileged container.
    for c in [cg, bpf] {
        let sc = c.security_context.as_ref().expect("securityContext");
        assert_eq!(sc.privileged, Some(true), "{}", c.name);
    }
}

#[test]
fn with_host_mounts_nothing_in_the_pod_is_privileged() {
    let ds = render(&HOST_MOUNTS).daemonset();
    assert!(pod_spec(&ds).init_containers.is_none());
    assert!(!volumes(&ds).contains_key("hostproc"));
    assert_eq!(
        volumes(&ds)["cgroup-root"]["hostPath"]["path"],
        "/sys/fs/cgroup"
    );
    assert!(args(&ds).contains(&"--cgroup=/sys/fs/cgroup"));
    for c in &pod_spec(&ds).containers {
        let privileged = c.security_context.as_ref().and_then(|s| s.privileged);
        assert_eq!(privileged, Some(false), "{}", c.name);
        for m in c.volume_mounts.iter().flatten() {
            assert_ne!(m.mount_propagation.as_deref(), Some("Bidirectional"));
        }
    }
}

#[test]
fn probes_and_ports_use_the_healthz_and_metrics_ports() {
    for (set, metrics, healthz) in [(&DEFAULTS, 10249, 10256), (&EVERYTHING, 9963, 9876)] {
        let ds = render(set).daemonset();
        let a = agent(&ds);
        assert_eq!(
            to_json(&a.ports),
            json!([
                {"name": "metrics", "containerPort": metrics, "protocol": "TCP"},
                {"name": "healthz", "containerPort": healthz, "protocol": "TCP"},
            ])
        );
        let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
            let get = p
                .as_ref()
                .and_then(|p| p.http_get.clone())
                .expect("httpGet");
            (get.path.unwrap_or_default(), to_json(&get.port))
        };
        assert_eq!(
            probe(&a.liveness_probe),
            ("/livez".into(), json!("healthz"))
        );
        assert_eq!(
            probe(&a.readiness_probe),
            ("/healthz".into(), json!("healthz"))
        );
        assert!(args(&ds).contains(&format!("--healthz-addr=0.0.0.0:{healthz}").as_str()));
    }
}

#[test]
fn resources_default_to_the_documented_requests_and_memory_limit() {
    let ds = render(&DEFAULTS).daemonset();
    assert_eq!(
        to_json(&agent(&ds).resources),
        json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}})
    );
}

#[test]
fn notes_say_how_to_watch_the_rollout_and_where_metrics_are() {
    let chart = chart_dir().display().to_string();
    let out = helm(&["notes", RELEASE, &chart, "-n", NAMESPACE]);
    assert!(out.ok, "{}", out.stderr);
    assert!(out
        .stdout
        .contains("kubectl -n kube-system rollout status ds/kpr"));
    assert!(out.stdout.contains("http://127.0.0.1:10249/metrics"));
    assert!(out.stdout.contains("k8sServiceHost is empty"));
}

// ------------------------------------------------------------------ RBAC --

/// (apiGroup, resource) -> verbs, one entry per pair.
fn grants(role: &ClusterRole) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<_, BTreeSet<String>> = BTreeMap::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                out.entry((group.clone(), resource.clone()))
                    .or_default()
                    .extend(rule.verbs.iter().cloned());
            }
        }
    }
    out
}

fn read_only() -> BTreeMap<(String, String), BTreeSet<String>> {
    let verbs: BTreeSet<String> = ["get", "list", "watch"].map(String::from).into();
    [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ]
    .into_iter()
    .map(|(g, r)| ((g.to_string(), r.to_string()), verbs.clone()))
    .collect()
}

#[test]
fn the_cluster_role_reads_services_nodes_and_endpointslices_and_creates_events() {
    let role: ClusterRole = render(&DEFAULTS).typed("ClusterRole");
    let mut want = read_only();
    // What the agent creates: events.k8s.io/v1 Events, never patched.
    want.insert(
        ("events.k8s.io".to_string(), "events".to_string()),
        ["create".to_string()].into(),
    );
    assert_eq!(grants(&role), want);
    let text = serde_json::to_string(&role).expect("JSON");
    assert!(!text.contains('*'), "no wildcard: {text}");
}

#[test]
fn events_disabled_leaves_the_cluster_role_read_only() {
    let role: ClusterRole =
        render_yaml("events", "events: {enabled: false}", &[]).typed("ClusterRole");
    assert_eq!(grants(&role), read_only());
}

#[test]
fn the_binding_gives_the_role_to_the_agents_service_account() {
    let r = render(&DEFAULTS);
    let binding: ClusterRoleBinding = r.typed("ClusterRoleBinding");
    let sa: ServiceAccount = r.typed("ServiceAccount");
    let role: ClusterRole = r.typed("ClusterRole");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.expect("subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(subjects[0].name.as_str()), sa.metadata.name.as_deref());
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(
        pod_spec(&r.daemonset()).service_account_name,
        sa.metadata.name
    );
}

// ------------------------------------------------------------ monitoring --

/// The part of monitoring.coreos.com/v1 ServiceMonitor the chart writes,
/// with unknown keys refused (kubernetes-validate has no schema for it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitor {
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: ObjectMeta,
    spec: ServiceMonitorSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitorSpec {
    job_label: Option<String>,
    selector: LabelSelector,
    namespace_selector: NamespaceSelector,
    endpoints: Vec<Endpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamespaceSelector {
    match_names: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Endpoint {
    port: String,
    path: String,
    interval: String,
    relabelings: Vec<Relabeling>,
    metric_relabelings: Option<Vec<Relabeling>>,
}

/// monitoring.coreos.com/v1 RelabelConfig.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Relabeling {
    source_labels: Option<Vec<String>>,
    target_label: Option<String>,
    action: Option<String>,
    regex: Option<String>,
    replacement: Option<String>,
    separator: Option<String>,
    modulus: Option<u64>,
}

#[test]
fn service_monitor_only_when_enabled() {
    for set in [&DEFAULTS, &CILIUM, &HOST_MOUNTS, &HARDENED] {
        let kinds = render(set).kinds().join(",");
        assert!(!kinds.contains("ServiceMonitor") && !kinds.contains("Service,"));
    }
}

#[test]
fn the_service_monitor_scrapes_the_agents_through_a_headless_service() {
    let r = render(&SERVICE_MONITOR);
    let sm: ServiceMonitor = r.typed("ServiceMonitor");
    let svc: Service = r.typed("Service");
    let ds = r.daemonset();
    assert_eq!(sm.api_version, "monitoring.coreos.com/v1");
    let labels = sm.metadata.labels.as_ref().expect("labels");
    assert_eq!(
        labels.get("release").map(String::as_str),
        Some("prometheus")
    );

    // The ServiceMonitor selects the Service...
    let svc_labels = svc.metadata.labels.as_ref().expect("service labels");
    for (k, v) in sm.spec.selector.match_labels.as_ref().expect("matchLabels") {
        assert_eq!(svc_labels.get(k), Some(v), "service label {k}");
    }
    assert_eq!(sm.spec.namespace_selector.match_names, [NAMESPACE]);
    assert_eq!(svc.metadata.namespace.as_deref(), Some(NAMESPACE));
    // ...the headless Service selects exactly the agent's pods...
    let spec = svc.spec.as_ref().expect("service spec");
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    let ds_spec = ds.spec.as_ref().expect("spec");
    assert_eq!(spec.selector, ds_spec.selector.match_labels);
    // ...on the metrics port, by the name the endpoint scrapes, which the
    // agent serves on the node's address.
    let port = &spec.ports.as_ref().expect("ports")[0];
    assert_eq!(port.name.as_deref(), Some("metrics"));
    assert_eq!(port.port, 9963);
    assert_eq!(to_json(&port.target_port), json!("metrics"));
    assert!(args(&ds).contains(&"--metrics-addr=$(HOST_IP):9963"));
    let endpoint = &sm.spec.endpoints[0];
    assert_eq!(
        (endpoint.port.as_str(), endpoint.path.as_str()),
        ("metrics", "/metrics")
    );
    assert_eq!(endpoint.interval, "15s");
    // The chart's relabeling first, then the user's.
    let targets: Vec<_> = endpoint
        .relabelings
        .iter()
        .map(|r| r.target_label.as_deref())
        .collect();
    assert_eq!(targets, [Some("node"), Some("host_ip")]);
    let metric = endpoint
        .metric_relabelings
        .as_ref()
        .expect("metricRelabelings");
    assert_eq!(metric[0].action.as_deref(), Some("drop"));
    assert_eq!(metric[0].regex.as_deref(), Some("go_.*"));
    assert_eq!(sm.spec.job_label.as_deref(), Some("app.kubernetes.io/name"));
    // Fields only a relabeling of another shape would have stay unset.
    let r = &endpoint.relabelings[0];
    assert!(r.replacement.is_none() && r.separator.is_none() && r.modulus.is_none());
    assert_eq!(
        r.source_labels.as_deref(),
        Some(&["__meta_kubernetes_pod_node_name".to_string()][..])
    );
}

#[test]
fn a_misspelt_service_monitor_key_is_refused_by_its_type() {
    let mut sm = render(&SERVICE_MONITOR).one("ServiceMonitor").clone();
    sm["spec"]["endpoints"][0]["metricRelabelling"] = json!([]);
    let err = serde_json::from_value::<ServiceMonitor>(sm).expect_err("a misspelt key");
    assert!(err.to_string().contains("metricRelabelling"), "{err}");
}

// ------------------------------------------- dashboard and alert rules --

#[test]
fn dashboard_and_rules_only_when_enabled() {
    for set in ALL_VALUE_SETS.iter().filter(|s| s.name != MONITORING.name) {
        let kinds = render(set).kinds().join(",");
        assert!(
            !kinds.contains("ConfigMap") && !kinds.contains("PrometheusRule"),
            "{}: {kinds}",
            set.name
        );
    }
}

#[test]
fn the_dashboard_config_map_carries_the_dashboard_and_the_sidecar_label() {
    let r = render(&MONITORING);
    let cm: k8s_openapi::api::core::v1::ConfigMap = r.typed("ConfigMap");
    assert_eq!(cm.metadata.name.as_deref(), Some("kpr-dashboard"));
    assert_eq!(cm.metadata.namespace.as_deref(), Some("monitoring"));
    let labels = cm.metadata.labels.as_ref().expect("labels");
    assert_eq!(
        labels.get("grafana_dashboard").map(String::as_str),
        Some("kpr")
    );
    let annotations = cm.metadata.annotations.as_ref().expect("annotations");
    assert_eq!(
        annotations.get("grafana_folder").map(String::as_str),
        Some("Networking")
    );
    let data = cm.data.as_ref().expect("data");
    let rendered: Value = serde_json::from_str(&data["kpr-dashboard.json"]).expect("JSON");
    let file: Value = serde_json::from_str(&read("files/kpr-dashboard.json")).expect("JSON");
    assert_eq!(rendered, file);
    assert_eq!(rendered["uid"], "kpr-overview");
    // The default label is the Grafana chart's.
    let r = render_yaml("dashboards-default", "dashboards: {enabled: true}", &[]);
    let cm = r.one("ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["namespace"], NAMESPACE);
}

#[test]
fn the_prometheus_rule_holds_the_alert_rules_file() {
    let r = render(&MONITORING);
    let rule = r.one("PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["metadata"]["name"], "kpr");
    assert_eq!(rule["metadata"]["namespace"], NAMESPACE);
    assert_eq!(
        rule["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    let file: Value =
        serde_yaml_ng::from_str(&read("files/kpr-alerts.yaml")).expect("the rules file is YAML");
    assert_eq!(rule["spec"], file);
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert!(alerts.contains(&"KprSyncFailing"), "{alerts:?}");
    // Only the fields a PrometheusRule has.
    for group in rule["spec"]["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            for key in rule.as_object().expect("a rule").keys() {
                assert!(
                    ["alert", "expr", "for", "labels", "annotations"].contains(&key.as_str()),
                    "{key}"
                );
            }
        }
    }
}

// ------------------------------------------------------------ uninstall --

#[test]
fn the_cleanup_daemonset_matches_the_chart_and_passes_the_schemas() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/kpr-cleanup.yaml");
    for minor in [OLDEST_MINOR, NEWEST_MINOR] {
        let (lines, out) = validate(std::slice::from_ref(&path), &format!("1.{minor}.0"));
        assert!(
            out.ok && lines.iter().any(|l| l.contains(" passed ")),
            "{}{}",
            out.stdout,
            out.stderr
        );
    }
    let text = std::fs::read_to_string(&path).expect("docs/kpr-cleanup.yaml");
    let cleanup: DaemonSet =
        serde_json::from_value(parse(&text).docs[0].clone()).expect("a DaemonSet");
    let chart = render(&DEFAULTS).daemonset();
    // The same image, bpf root and cgroup root as the chart's agent.
    let step = init_container(&cleanup, "cleanup").expect("the cleanup init container");
    assert_eq!(step.image, agent(&chart).image);
    let script = step.command.as_ref().expect("command").join(" ");
    let agent_args = args(&chart);
    let chart_value = |flag: &str| {
        agent_args
            .iter()
            .find_map(|a| a.strip_prefix(&format!("{flag}=")))
            .expect("the chart passes it")
            .to_string()
    };
    let bpf_root = chart_value("--bpf-root");
    assert!(
        script.contains(&format!("--bpf-root {bpf_root}")),
        "{script}"
    );
    let env = step.env.as_ref().expect("env");
    assert_eq!(env[0].name, "CGROUP_ROOT");
    assert_eq!(
        env[0].value.as_deref(),
        Some(chart_value("--cgroup").as_str())
    );
    assert!(script.contains("--cgroup \"$CGROUP_ROOT\""), "{script}");
    // Tolerates what the agent tolerates: it must reach every node.
    assert_eq!(
        to_json(&pod_spec(&cleanup).tolerations),
        to_json(&pod_spec(&chart).tolerations)
    );
}
