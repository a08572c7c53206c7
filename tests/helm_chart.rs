//! The Helm chart in `charts/kpr`, rendered without helm and checked object
//! by object.
//!
//! No helm binary is available where kpr is built, so `gotmpl` (a small Go
//! text/template engine with the Sprig/Helm functions the chart uses)
//! renders the templates with the chart's values merged as Helm merges
//! them. Each rendered document is parsed as YAML, the Kubernetes objects
//! are deserialized into their k8s-openapi types and serialized back (a key
//! that the type does not know, i.e. a typo, would vanish and fail the
//! comparison), and the fields that make kpr work are checked. The values
//! are validated against `values.schema.json`, as `helm install` does.
//!
//! When the Helm SDK for Python (`helm-python-sdk`, Helm's own Go engine
//! as a library) is importable, `renders_exactly_as_helm_does` renders every
//! value set with real Helm too and requires the same text, and runs
//! `helm lint --strict`; set `KPR_HELM_PYTHON` to the python that has it, and
//! `KPR_HELM_CROSSCHECK=1` to fail instead of skipping when it is missing.

#[path = "helm_chart/gotmpl.rs"]
mod gotmpl;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Release name and namespace of every render, as in the README's install.
const RELEASE: &str = "kpr";
const NAMESPACE: &str = "kube-system";

/// Value sets the tests render with (YAML, as a `-f` file would give them).
const DEFAULTS: &str = "";
const API_SERVER: &str = "k8sServiceHost: 192.0.2.10\n";
const API_SERVER_V6: &str = "k8sServiceHost: '2001:db8::10'\nk8sServicePort: 443\n";
const EVERYTHING: &str = r#"
k8sServiceHost: api.cluster.internal
k8sServicePort: 8443
kubeProxyReplacement: partial
devices: [eth0, bond0]
nodePort: {mode: dsr, acceleration: native, redirectPeer: false}
serviceNoBackendResponse: drop
loadBalancer: {algorithm: maglev}
maglev: {tableSize: 4093, hashSeed: "12345678901234567890"}
metrics: {port: 9963}
healthz: {port: 9876}
extraArgs: ["--lb-map-max=131072", "--debounce-ms=50"]
serviceMonitor: {enabled: true, interval: 15s, labels: {release: prometheus}}
securityContext: {privileged: true}
events: {enabled: true}
image: {repository: registry.example/kpr, tag: v9.9.9, pullPolicy: Always}
imagePullSecrets: [{name: regcred}]
nodeSelector: {kubernetes.io/os: linux, kpr: "yes"}
"#;
const HOST_MOUNTS: &str = r#"
bpf: {autoMount: {enabled: false}}
cgroup: {autoMount: {enabled: false}, hostRoot: /sys/fs/cgroup}
"#;
const ALL_VALUE_SETS: &[(&str, &str)] = &[
    ("defaults", DEFAULTS),
    ("api-server", API_SERVER),
    ("api-server-v6", API_SERVER_V6),
    ("everything", EVERYTHING),
    ("host-mounts", HOST_MOUNTS),
];

// ------------------------------------------------------------ the chart --

struct Chart {
    dir: PathBuf,
    templates: gotmpl::Templates,
    /// Files under templates/ that render to manifests (not `_*.tpl`, not NOTES.txt).
    manifests: Vec<String>,
    defaults: Value,
    chart_yaml: Value,
    schema: Value,
}

fn chart() -> &'static Chart {
    static CHART: OnceLock<Chart> = OnceLock::new();
    CHART.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/kpr");
        let mut templates = gotmpl::Templates::default();
        let mut manifests = Vec::new();
        let mut entries: Vec<_> = std::fs::read_dir(dir.join("templates"))
            .expect("charts/kpr/templates")
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let src = std::fs::read_to_string(&path).expect("template");
            templates
                .add_file(&name, &src)
                .unwrap_or_else(|e| panic!("parsing {name}: {e}"));
            if !name.starts_with('_') && name != "NOTES.txt" {
                manifests.push(name);
            }
        }
        Chart {
            defaults: yaml(&read(&dir, "values.yaml")),
            chart_yaml: yaml(&read(&dir, "Chart.yaml")),
            schema: serde_json::from_str(&read(&dir, "values.schema.json"))
                .expect("values.schema.json is JSON"),
            templates,
            manifests,
            dir,
        }
    })
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[track_caller]
fn yaml(text: &str) -> Value {
    let v: Value = serde_yaml_ng::from_str(text).unwrap_or_else(|e| panic!("YAML: {e}\n{text}"));
    if v.is_null() {
        json!({})
    } else {
        v
    }
}

/// Helm's coalescing of user values over the chart's: maps merge key by
/// key, anything else replaces, and null deletes.
fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                if v.is_null() {
                    b.remove(k);
                } else if let Some(slot) = b.get_mut(k).filter(|s| s.is_object() && v.is_object()) {
                    merge(slot, v);
                } else {
                    b.insert(k.clone(), v.clone());
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// The chart's values with `overrides` (YAML) merged in.
fn values(overrides: &str) -> Value {
    let mut v = chart().defaults.clone();
    merge(&mut v, &yaml(overrides));
    v
}

#[track_caller]
fn schema_errors(values: &Value) -> Vec<String> {
    let validator = jsonschema::validator_for(&chart().schema).expect("the schema compiles");
    validator
        .iter_errors(values)
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect()
}

struct Rendered {
    /// Template file name -> rendered text.
    files: BTreeMap<String, String>,
    /// Every non-empty YAML document, in file order.
    docs: Vec<Value>,
}

/// Renders every manifest template as `helm template kpr charts/kpr -n
/// kube-system -f OVERRIDES` would, after checking the values against the
/// schema (as helm does).
#[track_caller]
fn render(overrides: &str) -> Rendered {
    let values = values(overrides);
    let errors = schema_errors(&values);
    assert!(errors.is_empty(), "values fail the schema: {errors:#?}");
    let chart = chart();
    // `.Chart` has Chart.yaml's fields with capitalised names.
    let chart_meta: serde_json::Map<String, Value> = chart
        .chart_yaml
        .as_object()
        .expect("Chart.yaml is a map")
        .iter()
        .map(|(k, v)| (k[..1].to_uppercase() + &k[1..], v.clone()))
        .collect();
    let mut files = BTreeMap::new();
    let mut docs = Vec::new();
    for name in &chart.manifests {
        let context = json!({
            "Values": gotmpl::numbers_to_float(values.clone()),
            "Release": {
                "Name": RELEASE, "Namespace": NAMESPACE, "Service": "Helm",
                "IsInstall": true, "IsUpgrade": false, "Revision": 1,
            },
            "Chart": chart_meta,
            "Template": {"Name": format!("kpr/templates/{name}"), "BasePath": "kpr/templates"},
        });
        let text = chart
            .templates
            .render_file(name, &context)
            .unwrap_or_else(|e| panic!("rendering {name}: {e}"));
        if let Some(line) = text.lines().find(|l| yaml11_reads_as_bool(l)) {
            panic!(
                "{name}: Kubernetes (YAML 1.1) reads a bool where a string may be meant: {line:?}"
            );
        }
        for doc in split_documents(&text) {
            let v: Value = serde_yaml_ng::from_str(&doc)
                .unwrap_or_else(|e| panic!("{name} renders invalid YAML: {e}\n{doc}"));
            if !v.is_null() {
                assert!(v.is_object(), "{name}: a document is not a map:\n{doc}");
                docs.push(v);
            }
        }
        files.insert(name.clone(), text);
    }
    Rendered { files, docs }
}

/// Whether a line ends in a plain scalar that YAML 1.1 (the API server's
/// YAML) reads as a bool and YAML 1.2 (this test's parser) as a string:
/// `nodeSelector: {kpr: yes}` must come out as `kpr: "yes"`.
fn yaml11_reads_as_bool(line: &str) -> bool {
    let line = line.trim();
    let value = match line.rsplit_once(": ") {
        Some((_, v)) => v,
        None => line.strip_prefix("- ").unwrap_or(""),
    };
    matches!(
        value.trim(),
        "y" | "Y"
            | "yes"
            | "Yes"
            | "YES"
            | "n"
            | "N"
            | "no"
            | "No"
            | "NO"
            | "on"
            | "On"
            | "ON"
            | "off"
            | "Off"
            | "OFF"
    )
}

/// Splits a manifest stream at `---` lines.
fn split_documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else {
            let doc = docs.last_mut().expect("one document");
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs
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
        assert_eq!(
            all.len(),
            1,
            "want one {kind}, have kinds {:?}",
            self.kinds()
        );
        all[0]
    }

    #[track_caller]
    fn typed<T: DeserializeOwned + Serialize>(&self, kind: &str) -> T {
        strict::<T>(self.one(kind)).unwrap_or_else(|e| panic!("{kind}: {e}"))
    }

    fn daemonset(&self) -> DaemonSet {
        self.typed("DaemonSet")
    }
}

/// Deserializes a rendered object into its type and requires that
/// serializing it back gives the same JSON: k8s-openapi types ignore
/// unknown fields, so a misspelt key would be dropped and show up here.
fn strict<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let typed: T = serde_path_to_error::deserialize(doc.clone())
        .map_err(|e| format!("at {}: {}", e.path(), e.inner()))?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    match first_difference(doc, &back, String::new()) {
        None => Ok(typed),
        Some(diff) => Err(format!("not what its type reads back: {diff}")),
    }
}

fn first_difference(rendered: &Value, typed: &Value, at: String) -> Option<String> {
    match (rendered, typed) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<_> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|k| {
                let path = format!("{at}.{k}");
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => first_difference(x, y, path),
                    (Some(_), None) => Some(format!("{path} is not a field of the type")),
                    (None, Some(y)) => Some(format!("{path} appears as {y}")),
                    (None, None) => None,
                }
            })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, format!("{at}[{i}]"))),
        (a, b) if a == b => None,
        (a, b) => Some(format!("{at}: rendered {a}, typed {b}")),
    }
}

fn container<'a>(ds: &'a DaemonSet, name: &str) -> Option<&'a Container> {
    pod_spec(ds).containers.iter().find(|c| c.name == name)
}

fn init_container<'a>(ds: &'a DaemonSet, name: &str) -> Option<&'a Container> {
    pod_spec(ds)
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == name)
}

fn pod_spec(ds: &DaemonSet) -> &k8s_openapi::api::core::v1::PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("a pod spec")
}

#[track_caller]
fn agent(ds: &DaemonSet) -> &Container {
    container(ds, "agent").expect("the agent container")
}

fn args(ds: &DaemonSet) -> Vec<&str> {
    agent(ds)
        .args
        .iter()
        .flatten()
        .map(String::as_str)
        .collect()
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

/// Volume name -> (host path, hostPath type) of the pod.
fn host_paths(ds: &DaemonSet) -> BTreeMap<&str, (&str, &str)> {
    pod_spec(ds)
        .volumes
        .iter()
        .flatten()
        .map(|v| {
            let hp = v.host_path.as_ref().expect("only hostPath volumes");
            (
                v.name.as_str(),
                (hp.path.as_str(), hp.type_.as_deref().unwrap_or("")),
            )
        })
        .collect()
}

// ------------------------------------------------------------ the values --

#[test]
fn values_yaml_and_every_test_value_set_pass_the_schema() {
    for (name, overrides) in ALL_VALUE_SETS {
        let errors = schema_errors(&values(overrides));
        assert!(errors.is_empty(), "{name}: {errors:#?}");
    }
}

#[test]
fn the_schema_rejects_wrong_values_and_unknown_keys() {
    let bad = [
        "kubeProxyReplacement: probe",
        "kubeProxyReplacement: true",
        "nodePort: {mode: dnat}",
        "nodePort: {acceleration: best-effort}",
        "serviceNoBackendResponse: icmp",
        "loadBalancer: {algorithm: round-robin}",
        "loadBalancer: {mode: dsr}",
        "maglev: {tableSize: 16384}",
        "maglev: {tableSize: '16381'}",
        "maglev: {hashSeed: 42}",
        "maglev: {hashSeed: '-1'}",
        "maglev: {hashSeed: '123456789012345678901'}",
        "metrics: {port: 0}",
        "healthz: {port: 70000}",
        "k8sServicePort: '6443'",
        "k8sServiceHost: https://192.0.2.10:6443",
        "devices: ['eth0,eth1']",
        "devices: eth0",
        "securityContext: {privileged: 'yes'}",
        "securityContext: {capabilities: [CAP_BPF, bpf]}",
        "cgroup: {hostRoot: run/kpr}",
        "image: {pullPolicy: Sometimes}",
        "serviceMonitor: {interval: 30}",
        "serviceMonitor: {enable: true}",
        "k8sServicehost: 192.0.2.10",
        "events: {enabled: true, verbs: [delete]}",
        "resources: {requests: {gpu: 1}}",
    ];
    for overrides in bad {
        assert!(
            !schema_errors(&values(overrides)).is_empty(),
            "the schema accepts {overrides:?}"
        );
    }
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

#[test]
fn every_value_is_commented_in_values_yaml_and_listed_in_the_readme() {
    let chart = chart();
    let values_yaml = read(&chart.dir, "values.yaml");
    let readme = read(&chart.dir, "README.md");
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
    leaf_paths(&chart.defaults, "", &mut leaves);
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
        if k == "global" {
            continue;
        }
        let v = values
            .get(k)
            .unwrap_or_else(|| panic!("the schema has {at}{k}, values.yaml does not"));
        schema_properties_exist(sub, v, &format!("{at}{k}."));
    }
}

#[test]
fn the_schema_describes_values_yaml_and_nothing_else() {
    let chart = chart();
    // additionalProperties: false everywhere, so values.yaml passing the
    // schema means every key of it is in the schema; and the converse:
    schema_properties_exist(&chart.schema, &chart.defaults, "");
    assert_eq!(chart.schema["additionalProperties"], false);
}

// ----------------------------------------------------- what gets created --

#[test]
fn defaults_create_the_agent_and_its_read_only_rbac_and_no_monitoring() {
    let r = render(DEFAULTS);
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
        assert_eq!(labels["helm.sh/chart"], "kpr-0.1.0");
    }
    for kind in ["DaemonSet", "ServiceAccount"] {
        assert_eq!(r.one(kind)["metadata"]["namespace"], NAMESPACE);
    }
}

#[test]
fn the_daemonset_runs_on_every_node_in_the_host_network() {
    for (name, overrides) in ALL_VALUE_SETS {
        let ds = render(overrides).daemonset();
        let spec = ds.spec.as_ref().expect("spec");
        let pod = pod_spec(&ds);
        assert_eq!(pod.host_network, Some(true), "{name}");
        assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        let tolerations = serde_json::to_value(&pod.tolerations).unwrap();
        assert_eq!(tolerations, json!([{"operator": "Exists"}]), "{name}");
        let strategy = spec.update_strategy.as_ref().expect("updateStrategy");
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
        let max = strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.as_ref());
        assert_eq!(
            serde_json::to_value(max).unwrap(),
            json!(1),
            "{name}: maxUnavailable"
        );
        // The selector picks the pod template's labels.
        let selector = spec.selector.match_labels.as_ref().expect("matchLabels");
        let labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.as_ref())
            .expect("pod labels");
        for (k, v) in selector {
            assert_eq!(labels.get(k), Some(v), "{name}: pod label {k}");
        }
        assert_eq!(pod.service_account_name.as_deref(), Some("kpr"));
    }
}

#[test]
fn node_name_comes_from_the_downward_api() {
    let ds = render(DEFAULTS).daemonset();
    let env = serde_json::to_value(&agent(&ds).env).unwrap();
    assert_eq!(
        env,
        json!([{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}])
    );
    assert!(args(&ds).contains(&"--node-name=$(NODE_NAME)"));
}

#[test]
fn default_args_pass_no_nodeport_flag_and_no_api_server() {
    let ds = render(DEFAULTS).daemonset();
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
            "--metrics-addr=0.0.0.0:10249",
            "--healthz-addr=0.0.0.0:10256",
            "--bpf-root=/sys/fs/bpf/kpr",
            "--cgroup=/run/kpr/cgroupv2",
        ]
    );
}

#[test]
fn api_server_values_become_the_flag_and_the_client_environment() {
    let ds = render(API_SERVER).daemonset();
    assert!(args(&ds).contains(&"--k8s-api-server=https://192.0.2.10:6443"));
    let env = serde_json::to_value(&agent(&ds).env).unwrap();
    assert_eq!(
        env[1],
        json!({"name": "KUBERNETES_SERVICE_HOST", "value": "192.0.2.10"})
    );
    assert_eq!(
        env[2],
        json!({"name": "KUBERNETES_SERVICE_PORT", "value": "6443"})
    );

    let ds = render(API_SERVER_V6).daemonset();
    assert!(
        args(&ds).contains(&"--k8s-api-server=https://[2001:db8::10]:443"),
        "{:?}",
        args(&ds)
    );
}

#[test]
fn every_value_reaches_its_flag_in_order_with_extra_args_last() {
    let ds = render(EVERYTHING).daemonset();
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
            "--metrics-addr=0.0.0.0:9963",
            "--healthz-addr=0.0.0.0:9876",
            "--bpf-root=/sys/fs/bpf/kpr",
            "--cgroup=/run/kpr/cgroupv2",
            "--lb-map-max=131072",
            "--debounce-ms=50",
        ]
    );
    let a = agent(&ds);
    assert_eq!(a.image.as_deref(), Some("registry.example/kpr:v9.9.9"));
    assert_eq!(a.image_pull_policy.as_deref(), Some("Always"));
    let pod = serde_json::to_value(pod_spec(&ds)).unwrap();
    assert_eq!(pod["imagePullSecrets"], json!([{"name": "regcred"}]));
    assert_eq!(
        pod["nodeSelector"],
        json!({"kubernetes.io/os": "linux", "kpr": "yes"})
    );
}

#[test]
fn one_nodeport_value_alone_passes_only_its_own_flag() {
    let ds = render("nodePort: {acceleration: generic}").daemonset();
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
    for (overrides, flag) in [
        ("maglev: {tableSize: 65521}", "--maglev-table-size=65521"),
        ("maglev: {hashSeed: '7'}", "--maglev-hash-seed=7"),
        ("loadBalancer: {algorithm: maglev}", "--lb-algorithm=maglev"),
    ] {
        let ds = render(overrides).daemonset();
        let a = args(&ds);
        let ours: Vec<&&str> = a
            .iter()
            .filter(|x| x.starts_with("--maglev") || x.starts_with("--lb-algorithm"))
            .collect();
        assert_eq!(ours, [&flag], "{overrides}: {a:?}");
    }
}

#[test]
fn the_image_tag_defaults_to_the_app_version() {
    let ds = render(DEFAULTS).daemonset();
    let app_version = chart().chart_yaml["appVersion"]
        .as_str()
        .expect("appVersion");
    assert_eq!(
        agent(&ds).image.as_deref(),
        Some(format!("kpr:{app_version}").as_str())
    );
    for name in ["mount-cgroup", "mount-bpf-fs"] {
        let c = init_container(&ds, name).expect(name);
        assert_eq!(c.image, agent(&ds).image, "{name}");
    }
}

#[test]
fn the_agent_is_unprivileged_with_six_capabilities_by_default() {
    let ds = render(DEFAULTS).daemonset();
    let sc = serde_json::to_value(&agent(&ds).security_context).unwrap();
    assert_eq!(
        sc,
        json!({
            "privileged": false,
            "capabilities": {
                "add": ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE", "PERFMON", "NET_RAW"],
                "drop": ["ALL"],
            },
        })
    );
}

#[test]
fn privileged_true_makes_the_agent_privileged_without_a_capability_list() {
    let ds = render("securityContext: {privileged: true}").daemonset();
    let sc = serde_json::to_value(&agent(&ds).security_context).unwrap();
    assert_eq!(sc, json!({"privileged": true}));
    let m = mounts(agent(&ds));
    assert_eq!(m["/sys/fs/bpf"].1, "Bidirectional");
}

#[test]
fn volumes_are_the_host_bpffs_cgroup2_root_and_modules() {
    let ds = render(DEFAULTS).daemonset();
    assert_eq!(
        host_paths(&ds),
        BTreeMap::from([
            ("bpf-maps", ("/sys/fs/bpf", "DirectoryOrCreate")),
            ("cgroup-root", ("/run/kpr/cgroupv2", "DirectoryOrCreate")),
            ("lib-modules", ("/lib/modules", "")),
            ("hostproc", ("/proc", "Directory")),
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
        ])
    );
}

#[test]
fn init_containers_mount_cgroup2_and_bpffs_on_the_host() {
    let ds = render(DEFAULTS).daemonset();
    let names: Vec<_> = pod_spec(&ds)
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["mount-cgroup", "mount-bpf-fs"]);

    let cg = init_container(&ds, "mount-cgroup").unwrap();
    let script = cg.command.as_ref().unwrap().join(" ");
    assert!(script.contains("nsenter --cgroup=/hostproc/1/ns/cgroup -- mount -t cgroup2"));
    assert!(
        script.contains("cgroup2 already mounted"),
        "idempotent: {script}"
    );
    let env = serde_json::to_value(&cg.env).unwrap();
    assert_eq!(
        env,
        json!([{"name": "CGROUP_ROOT", "value": "/run/kpr/cgroupv2"}])
    );
    assert_eq!(
        mounts(cg),
        BTreeMap::from([
            ("/hostproc", ("hostproc", "None", true)),
            ("/run/kpr/cgroupv2", ("cgroup-root", "Bidirectional", false)),
        ])
    );

    let bpf = init_container(&ds, "mount-bpf-fs").unwrap();
    let script = bpf.command.as_ref().unwrap().join(" ");
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
    let ds = render(HOST_MOUNTS).daemonset();
    assert!(pod_spec(&ds).init_containers.is_none());
    assert!(!host_paths(&ds).contains_key("hostproc"));
    assert_eq!(host_paths(&ds)["cgroup-root"].0, "/sys/fs/cgroup");
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
    for (overrides, metrics, healthz) in [(DEFAULTS, 10249, 10256), (EVERYTHING, 9963, 9876)] {
        let ds = render(overrides).daemonset();
        let a = agent(&ds);
        let ports = serde_json::to_value(&a.ports).unwrap();
        assert_eq!(
            ports,
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
            (
                get.path.unwrap_or_default(),
                serde_json::to_value(get.port).unwrap(),
            )
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
        assert!(args(&ds).contains(&format!("--metrics-addr=0.0.0.0:{metrics}").as_str()));
    }
}

#[test]
fn resources_default_to_the_documented_requests_and_memory_limit() {
    let ds = render(DEFAULTS).daemonset();
    let res = serde_json::to_value(&agent(&ds).resources).unwrap();
    assert_eq!(
        res,
        json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}})
    );
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
fn the_cluster_role_only_reads_services_nodes_and_endpointslices() {
    let role: ClusterRole = render(DEFAULTS).typed("ClusterRole");
    assert_eq!(grants(&role), read_only());
    let text = serde_json::to_string(&role).unwrap();
    assert!(!text.contains('*'), "no wildcard: {text}");
}

#[test]
fn events_enabled_adds_only_create_and_patch_on_events() {
    let role: ClusterRole = render("events: {enabled: true}").typed("ClusterRole");
    let mut want = read_only();
    let verbs: BTreeSet<String> = ["create", "patch"].map(String::from).into();
    for group in ["", "events.k8s.io"] {
        want.insert((group.to_string(), "events".to_string()), verbs.clone());
    }
    assert_eq!(grants(&role), want);
}

#[test]
fn the_binding_gives_the_role_to_the_agents_service_account() {
    let r = render(DEFAULTS);
    let binding: ClusterRoleBinding = r.typed("ClusterRoleBinding");
    let sa: ServiceAccount = r.typed("ServiceAccount");
    let role: ClusterRole = r.typed("ClusterRole");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.expect("subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(
        subjects[0].name.as_str(),
        sa.metadata.name.as_deref().unwrap()
    );
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(
        pod_spec(&r.daemonset()).service_account_name,
        sa.metadata.name
    );
}

// ------------------------------------------------------------ monitoring --

/// The part of monitoring.coreos.com/v1 ServiceMonitor the chart writes,
/// with unknown keys refused.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitor {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: ServiceMonitorSpec,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitorSpec {
    selector: LabelSelector,
    namespace_selector: NamespaceSelector,
    endpoints: Vec<Endpoint>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamespaceSelector {
    match_names: Vec<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Endpoint {
    port: String,
    path: String,
    interval: String,
    relabelings: Vec<Relabeling>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Relabeling {
    source_labels: Vec<String>,
    target_label: String,
    action: String,
}

#[test]
fn service_monitor_only_when_enabled() {
    for overrides in [DEFAULTS, API_SERVER, HOST_MOUNTS] {
        let rendered = render(overrides);
        let kinds = rendered.kinds();
        assert!(!kinds.contains(&"ServiceMonitor") && !kinds.contains(&"Service"));
    }
}

#[test]
fn the_service_monitor_scrapes_the_agents_through_a_headless_service() {
    let r = render(EVERYTHING);
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
    let ds_spec = ds.spec.as_ref().unwrap();
    assert_eq!(spec.selector, ds_spec.selector.match_labels);
    // ...on the metrics port, by the name the endpoint scrapes.
    let port = &spec.ports.as_ref().expect("ports")[0];
    assert_eq!(port.name.as_deref(), Some("metrics"));
    assert_eq!(port.port, 9963);
    assert_eq!(
        serde_json::to_value(&port.target_port).unwrap(),
        json!("metrics")
    );
    let endpoint = &sm.spec.endpoints[0];
    assert_eq!(
        (endpoint.port.as_str(), endpoint.path.as_str()),
        ("metrics", "/metrics")
    );
    assert_eq!(endpoint.interval, "15s");
    assert_eq!(endpoint.relabelings[0].target_label, "node");
}

// ------------------------------------------------------- typed strictness --

#[test]
fn every_rendered_object_reads_back_unchanged_through_its_type() {
    for (name, overrides) in ALL_VALUE_SETS {
        for doc in &render(overrides).docs {
            let kind = doc["kind"].as_str().unwrap_or("?");
            let result = match kind {
                "DaemonSet" => strict::<DaemonSet>(doc).map(drop),
                "ServiceAccount" => strict::<ServiceAccount>(doc).map(drop),
                "ClusterRole" => strict::<ClusterRole>(doc).map(drop),
                "ClusterRoleBinding" => strict::<ClusterRoleBinding>(doc).map(drop),
                "Service" => strict::<Service>(doc).map(drop),
                "ServiceMonitor" => strict::<ServiceMonitor>(doc).map(drop),
                other => Err(format!("no type for kind {other}")),
            };
            if let Err(e) = result {
                panic!("{name}: {kind}: {e}");
            }
        }
    }
}

#[test]
fn a_misspelt_key_is_caught_by_the_typed_read_back() {
    let mut ds = render(DEFAULTS).one("DaemonSet").clone();
    ds["spec"]["template"]["spec"]["hostNetwrok"] = json!(true);
    let err = strict::<DaemonSet>(&ds).map(drop).unwrap_err();
    assert!(err.contains("hostNetwrok"), "{err}");
}

// ----------------------------------------------------- real helm, if any --

#[test]
fn renders_exactly_as_helm_does() {
    let python = std::env::var("KPR_HELM_PYTHON").unwrap_or_else(|_| "python3".into());
    let required = std::env::var("KPR_HELM_CROSSCHECK").is_ok_and(|v| v == "1");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helm_chart/helm_render.py");
    let sets: serde_json::Map<String, Value> = ALL_VALUE_SETS
        .iter()
        .map(|(name, overrides)| (name.to_string(), yaml(overrides)))
        .collect();
    let request = json!({
        "chart": chart().dir, "release": RELEASE, "namespace": NAMESPACE, "value_sets": sets,
    });
    let skip = |why: String| {
        assert!(!required, "KPR_HELM_CROSSCHECK=1 but {why}");
        eprintln!("skipped: {why}; pip install helm-python-sdk and set KPR_HELM_PYTHON");
    };
    let output = match std::process::Command::new(&python)
        .arg(&script)
        .arg(request.to_string())
        .output()
    {
        Err(e) => return skip(format!("cannot run {python}: {e}")),
        // helm_render.py exits with 3 when the Helm SDK is not importable.
        Ok(o) if o.status.code() == Some(3) => {
            let stderr = String::from_utf8_lossy(&o.stderr);
            return skip(format!("{python} has no Helm SDK ({})", stderr.trim()));
        }
        Ok(o) => o,
    };
    assert!(
        output.status.success(),
        "helm_render.py failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: Value = serde_json::from_slice(&output.stdout).expect("JSON from helm_render.py");
    for (name, overrides) in ALL_VALUE_SETS {
        let lint = &answer["lint"][name];
        assert_eq!(
            lint["errors"],
            json!([]),
            "{name}: helm lint --strict: {lint}"
        );
        // Severity 1 is information ("icon is recommended"); 2 and up are
        // warnings and errors.
        let serious: Vec<&Value> = lint["messages"]
            .as_array()
            .expect("lint messages")
            .iter()
            .filter(|m| m["severity"].as_i64().unwrap_or(3) >= 2)
            .collect();
        assert!(
            serious.is_empty(),
            "{name}: helm lint --strict: {serious:?}"
        );
        let ours = render(overrides);
        let helm = answer["rendered"][name]
            .as_object()
            .expect("rendered files");
        let helm_files: BTreeSet<String> = helm
            .keys()
            .map(|k| k.trim_start_matches("kpr/templates/").to_string())
            .collect();
        let our_files: BTreeSet<String> = ours.files.keys().cloned().collect();
        assert_eq!(our_files, helm_files, "{name}: rendered files");
        for (file, text) in &ours.files {
            let theirs = helm[&format!("kpr/templates/{file}")]
                .as_str()
                .expect("text");
            assert_eq!(text, theirs, "{name}: {file} differs from Helm's rendering");
        }
    }
    eprintln!(
        "real Helm {} renders every value set identically",
        answer["helm_version"]
    );
}
