//! Standalone mode's input: v1 Services and discovery.k8s.io/v1
//! EndpointSlices read from YAML or JSON files (`kpr agent --manifests PATH`),
//! so a node can be programmed without an API server (labs, tests, appliances).
//! A v1 Node document named as the agent's node (`--node-name`) gives what
//! the Node object gives in Kubernetes mode: its zone label (topology hints)
//! and its InternalIP/ExternalIP addresses (NodePorts); other nodes'
//! documents are read, validated and otherwise unused.
//!
//! Each path is a file (read whatever its extension) or a directory (its
//! files whose names end in `.yaml`, `.yml` or `.json`, symlinks followed as
//! in a mounted ConfigMap, sorted by name, not recursive; hidden files such
//! as `.foo.swp` and editor leftovers such as `foo.yaml~` are ignored).
//! `.json` files are parsed as JSON, everything else as YAML; a `v1` `List`
//! is flattened.
//!
//! Nothing that cannot be used withdraws what can: a malformed document, an
//! unsupported kind, an object the API server would refuse
//! ([`validate`]), a second object with the same kind and namespace/name (the
//! first in path order, then document order, wins), a document or file over
//! its limits ([`Limits`]) are each skipped with a counted reason, and every
//! other document still counts. A path that cannot be read keeps what it
//! produced last and makes the source unhealthy ([`ManifestSource::health`]).
//!
//! Where the code is:
//! - [`watch`]: when to read (completed writes at once, other changes debounced);
//! - [`files`]: which files, their identity, safe bounded reads, read errors;
//! - [`documents`]: splitting a file into documents, the nesting pre-check;
//! - [`parse`]: a document into objects;
//! - [`validate`]: the API server's rules;
//! - [`state`]: what each file produced, incremental reloads, the object store;
//! - [`report`]: what a reload reports and logs.

mod claims;
pub mod documents;
pub mod files;
pub mod parse;
pub mod report;
pub mod state;
pub mod validate;
pub mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

pub use files::{resolve_paths, ReadError, ReadErrorReason};
pub use report::ReloadReport;
pub use validate::{Rules, DEFAULT_NODE_PORT_RANGE};
pub use watch::WatchError;

use crate::skip::SkipReason;
use crate::source::store::{Changes, ObjectStore};
use parse::Object;
pub use parse::Rejected;
use state::SourceState;
use watch::{Hints, ManifestWatch};

/// The namespace of an object whose manifest does not set one, as with kubectl.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Bounds on what is parsed, so that no file can stall or exhaust the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest file read, in bytes (`--manifest-max-file-bytes`).
    pub max_file_bytes: u64,
    /// Largest document parsed, in bytes (`--manifest-max-document-bytes`).
    pub max_document_bytes: usize,
    /// Deepest nesting of collections in a document (`--manifest-max-depth`).
    pub max_depth: usize,
}

impl Default for Limits {
    /// 64 MiB per file, 3 MiB per document (the API server's request
    /// limit), 64 levels (a Service nests about 8 deep).
    fn default() -> Self {
        Limits {
            max_file_bytes: 64 << 20,
            max_document_bytes: 3 << 20,
            max_depth: 64,
        }
    }
}

/// How the standalone source is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestOptions {
    /// `--manifests` paths, absolute (see [`resolve_paths`]).
    pub paths: Vec<PathBuf>,
    /// Quiet period that ends a burst of incomplete changes (`--debounce-ms`);
    /// also how long a file must stay gone from its directory to be withdrawn.
    pub debounce: Duration,
    pub limits: Limits,
    pub rules: Rules,
    /// The agent's node (`--node-name`): its Node document, if any, is the
    /// store's Node.
    pub node_name: String,
}

/// A document, or a whole path, that was not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedDocument {
    /// The file the document is in; for a path that cannot be read, that path.
    pub file: PathBuf,
    /// 0-based index of the document in `file`, counting non-empty documents
    /// only; 0 when the whole path or file is skipped.
    pub index: usize,
    /// Why; the fixed set that labels `kpr_skipped_objects_total`.
    pub reason: SkipReason,
    /// Specifics, escaped to one line (the serde error, the unsupported
    /// apiVersion/kind, the I/O error). For logs only, never a metric label.
    pub detail: String,
}

/// Everything [`load`] read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ManifestSet {
    /// v1 Services, in path order then document order; `metadata.name` is set
    /// and `metadata.namespace` is filled in ([`DEFAULT_NAMESPACE`] if absent).
    pub services: Vec<Service>,
    /// discovery.k8s.io/v1 EndpointSlices, with the same guarantees.
    pub slices: Vec<EndpointSlice>,
    /// v1 Nodes (slimmed to name, labels, addresses, taints), in the same order.
    pub nodes: Vec<Node>,
    /// v1 Pods (slimmed to what hostPorts need), in the same order.
    pub pods: Vec<Pod>,
    /// Documents (or whole paths) that were not used, in the order met.
    pub skipped: Vec<SkippedDocument>,
}

/// Reads every manifest under `paths` once, with the default limits and
/// rules and no wait for writes in progress (tools, golden tests). Never
/// fails: problems are in [`ManifestSet::skipped`]. Blocking file I/O.
pub fn load(paths: &[PathBuf]) -> ManifestSet {
    let mut state = SourceState::new(
        paths.to_vec(),
        Limits::default(),
        Rules::default(),
        false,
        Duration::ZERO,
    );
    let report = state.reload(Hints::default());
    let mut set = ManifestSet {
        skipped: report.skipped,
        ..ManifestSet::default()
    };
    for object in state.objects() {
        match object {
            Object::Service(s) => set.services.push((**s).clone()),
            Object::EndpointSlice(s) => set.slices.push(s.to_k8s()),
            Object::Node(n) => set.nodes.push((**n).clone()),
            Object::Pod(p) => set.pods.push((**p).clone()),
        }
    }
    set
}

/// The standalone source: watches the paths, reloads what changed, and keeps
/// the objects in an [`ObjectStore`] that marks changed Services.
pub struct ManifestSource {
    state: SourceState,
    watch: ManifestWatch,
}

impl ManifestSource {
    /// Starts watching `options.paths` (nothing is read yet: call
    /// [`ManifestSource::reload`]).
    ///
    /// # Errors
    /// The watcher could not be set up.
    pub fn open(options: &ManifestOptions) -> Result<ManifestSource, WatchError> {
        let watch = ManifestWatch::new(&options.paths, options.debounce)?;
        let mut state = SourceState::new(
            options.paths.clone(),
            options.limits,
            options.rules,
            true,
            options.debounce,
        );
        state.set_node_name(&options.node_name);
        Ok(ManifestSource { state, watch })
    }

    /// Resolves when a reload is due: a file changed (at once for a completed
    /// write, else after the debounce), a failing path is to be retried, or a
    /// file being written is to be looked at again. Cancel-safe.
    pub async fn changed(&mut self) {
        let wake = self.state.next_wake().map(tokio::time::Instant::from_std);
        tokio::select! {
            () = self.watch.changed() => {}
            () = sleep_until(wake) => {}
        }
    }

    /// Reads what changed since the last reload into the store. Blocking
    /// file I/O: run it with `spawn_blocking`.
    pub fn reload(&mut self) -> ReloadReport {
        let hints = self.watch.take_hints();
        self.state.reload(hints)
    }

    /// The objects read so far.
    pub fn store(&self) -> &ObjectStore {
        self.state.store()
    }

    /// The Services whose objects changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        self.state.store_mut().take_changes()
    }

    /// Ok when every path read at its last try; else why not, escaped.
    pub fn health(&self) -> Result<(), String> {
        self.state.health()
    }

    /// Whether the store holds everything the paths define (no failing path,
    /// no file unread): only then may the maps be pruned.
    pub fn is_complete(&self) -> bool {
        self.state.is_complete()
    }

    /// The Services the validation refused, by `namespace/name`.
    pub fn rejected_services(&self) -> BTreeMap<String, Rejected> {
        self.state.rejected_services()
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
