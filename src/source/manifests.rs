//! Standalone mode's input: v1 Services and discovery.k8s.io/v1
//! EndpointSlices read from YAML or JSON files (`kpr agent --manifests PATH`),
//! so a node can be programmed without an API server (labs, tests, appliances).
//!
//! Loading never fails as a whole. Everything that cannot be used — a missing
//! path, an unreadable file, a syntax error, a document that does not match
//! its kind's schema, an unsupported kind, a second object with the same
//! namespace/name — becomes a [`SkippedDocument`] plus a warning, and every
//! other document is still returned: one bad file must not withdraw the
//! Services defined by the good ones.
//!
//! # Documents
//!
//! YAML files are split into documents here, on lines that start with the
//! `---` (or `...`) marker at column 0 followed by a space, a tab or the end
//! of the line, and each document is parsed on its own. serde_yaml_ng's
//! multi-document deserializer is not used because it stops at the first
//! syntax error and loses every later document of the file. The split is
//! exact, not a heuristic: YAML forbids such a line inside any scalar, so
//! it always ends a document. Error details carry the line numbers of the
//! file, not of the document. Documents made only of blank lines, comments
//! and `%` directives are ignored silently and not counted in
//! [`SkippedDocument::index`].
//!
//! A `.json` file is a stream of JSON values (usually exactly one); after a
//! JSON syntax error the rest of that file is reported as one skipped
//! document, since JSON has no marker to resynchronise on.
//!
//! A `v1` `List` is flattened: each item is dispatched on its own
//! apiVersion/kind, and a skipped item's detail starts with `items[N]: `.
//!
//! # Watching
//!
//! [`watch`] reports that something changed, not what: reloading the whole
//! set with [`load`] is cheap and leaves no partial state to reconcile.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, Resource};
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::skip::SkipReason;

/// The namespace of an object whose manifest does not set one, as with kubectl.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A burst of changes that never goes quiet is still reported after this many
/// debounce periods, so a file rewritten in a loop cannot starve reloads.
const MAX_BURST_DEBOUNCES: u32 = 10;

/// Everything [`load`] read: the objects to program, and what it could not use.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ManifestSet {
    /// v1 Services, in path order then document order; `metadata.name` is set
    /// and `metadata.namespace` is filled in ([`DEFAULT_NAMESPACE`] if absent).
    pub services: Vec<Service>,
    /// discovery.k8s.io/v1 EndpointSlices, with the same guarantees as `services`.
    pub slices: Vec<EndpointSlice>,
    /// Documents (or whole paths) that were not used, in the order met.
    pub skipped: Vec<SkippedDocument>,
}

/// A document, or a whole path, that [`load`] did not use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedDocument {
    /// The file the document is in; for a path that is missing or a directory
    /// that cannot be listed, that path.
    pub file: PathBuf,
    /// 0-based index of the document in `file`, counting non-empty documents
    /// only; 0 when the whole path or file is skipped.
    pub index: usize,
    /// Why it was skipped; the fixed set that labels
    /// `kpr_skipped_objects_total`.
    pub reason: SkipReason,
    /// Human-readable specifics (the serde error, the unsupported
    /// apiVersion/kind, the I/O error). For logs only, never a metric label.
    pub detail: String,
}

/// Reads every manifest under `paths`.
///
/// Each path is a file (read whatever its extension) or a directory (its
/// regular files — symlinks followed, as in a mounted ConfigMap — whose names
/// end in `.yaml`, `.yml` or `.json`, sorted by name, not recursive; hidden
/// files such as `.foo.swp` and editor leftovers such as `foo.yaml~` are
/// ignored). `.json` files are parsed as JSON, everything else as YAML.
///
/// Never fails and never panics: problems are returned in
/// [`ManifestSet::skipped`] and logged at warn level. Objects are kept in path
/// order, then document order; when two objects of the same kind share a
/// namespace/name, the first wins and the second is skipped as
/// [`SkipReason::Duplicate`].
///
/// Blocking file I/O: call it from `spawn_blocking` on an async runtime.
pub fn load(paths: &[PathBuf]) -> ManifestSet {
    let mut loader = Loader::default();
    for path in paths {
        loader.load_path(path);
    }
    loader.set
}

/// The supported kinds, plus the List wrapper.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Service,
    EndpointSlice,
    List,
}

impl Kind {
    fn of(api_version: &str, kind: &str) -> Option<Kind> {
        if (api_version, kind) == (Service::API_VERSION, Service::KIND) {
            Some(Kind::Service)
        } else if (api_version, kind) == (EndpointSlice::API_VERSION, EndpointSlice::KIND) {
            Some(Kind::EndpointSlice)
        } else if (api_version, kind) == ("v1", "List") {
            Some(Kind::List)
        } else {
            None
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => Service::KIND,
            Kind::EndpointSlice => EndpointSlice::KIND,
            Kind::List => "List",
        }
    }
}

/// The apiVersion/kind of a document, read before choosing the type to decode.
#[derive(Deserialize)]
struct TypeMeta {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
}

/// A `v1` `List`; items stay generic until their own apiVersion/kind is read.
#[derive(Deserialize)]
struct ListDoc {
    #[serde(default)]
    items: Option<Vec<serde_json::Value>>,
}

/// One document's text and where it starts in its file.
#[derive(Debug, PartialEq, Eq)]
struct Document {
    /// 0-based line of the file the text starts on.
    first_line: usize,
    /// The document's text; a leading `---` marker is replaced by spaces.
    text: String,
}

impl Document {
    /// Decodes the text with `parse`. On failure, parses again with the text
    /// moved down to its place in the file, so the error's line numbers are
    /// the file's. Only failures pay for that padding: doing it up front would
    /// cost O(documents x lines) on a large file.
    fn decode<T, E: ToString>(&self, parse: impl Fn(&str) -> Result<T, E>) -> Result<T, String> {
        parse(&self.text).map_err(|first| {
            if self.first_line == 0 {
                return first.to_string();
            }
            let padded = "\n".repeat(self.first_line) + &self.text;
            match parse(&padded) {
                Err(located) => located.to_string(),
                Ok(_) => first.to_string(),
            }
        })
    }
}

/// One document's source, decodable into any type.
enum Body<'a> {
    /// A YAML document.
    Yaml(&'a Document),
    /// A JSON value.
    Json(&'a Document),
    /// A `List` item.
    Item(&'a serde_json::Value),
}

impl Body<'_> {
    fn decode<T: DeserializeOwned>(&self) -> Result<T, String> {
        match self {
            Body::Yaml(doc) => doc.decode(|text| serde_yaml_ng::from_str::<T>(text)),
            Body::Json(doc) => doc.decode(|text| serde_json::from_str::<T>(text)),
            Body::Item(value) => T::deserialize(*value).map_err(|e| e.to_string()),
        }
    }
}

/// Where a document is: file, document index, and item index inside a List.
#[derive(Clone, Copy)]
struct At<'a> {
    file: &'a Path,
    index: usize,
    item: Option<usize>,
}

impl At<'_> {
    fn describe(&self) -> String {
        match self.item {
            None => format!("{} document {}", self.file.display(), self.index),
            Some(item) => format!(
                "{} document {} items[{item}]",
                self.file.display(),
                self.index
            ),
        }
    }
}

/// Accumulates a [`ManifestSet`] and remembers where each object came from.
#[derive(Default)]
struct Loader {
    set: ManifestSet,
    seen: HashMap<(Kind, String, String), String>,
}

impl Loader {
    fn skip(&mut self, at: At<'_>, reason: SkipReason, detail: impl Into<String>) {
        let detail = match at.item {
            None => detail.into(),
            Some(item) => format!("items[{item}]: {}", detail.into()),
        };
        tracing::warn!(
            file = %at.file.display(),
            index = at.index,
            reason = %reason,
            detail = %detail,
            "skipping manifest document"
        );
        self.set.skipped.push(SkippedDocument {
            file: at.file.to_path_buf(),
            index: at.index,
            reason,
            detail,
        });
    }

    fn skip_path(&mut self, path: &Path, reason: SkipReason, detail: String) {
        let at = At {
            file: path,
            index: 0,
            item: None,
        };
        self.skip(at, reason, detail);
    }

    fn load_path(&mut self, path: &Path) {
        match fs::metadata(path) {
            Err(e) => self.skip_path(
                path,
                SkipReason::Unreadable,
                format!("cannot access manifest path: {e}"),
            ),
            Ok(meta) if meta.is_dir() => self.load_dir(path),
            Ok(_) => self.load_file(path),
        }
    }

    fn load_dir(&mut self, dir: &Path) {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => {
                let detail = format!("cannot list directory: {e}");
                return self.skip_path(dir, SkipReason::Unreadable, detail);
            }
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    let detail = format!("cannot list directory: {e}");
                    self.skip_path(dir, SkipReason::Unreadable, detail);
                    continue;
                }
            };
            if !is_manifest_name(&entry.file_name()) {
                continue;
            }
            let path = entry.path();
            // fs::metadata follows symlinks: ConfigMap volumes are symlink farms.
            match fs::metadata(&path) {
                Ok(meta) if meta.is_file() => files.push(path),
                Ok(_) => {}
                Err(e) => {
                    let detail = format!("cannot access manifest file: {e}");
                    self.skip_path(&path, SkipReason::Unreadable, detail);
                }
            }
        }
        files.sort();
        for file in files {
            self.load_file(&file);
        }
    }

    fn load_file(&mut self, file: &Path) {
        let bytes = match fs::read(file) {
            Ok(bytes) => bytes,
            Err(e) => {
                let detail = format!("cannot read file: {e}");
                return self.skip_path(file, SkipReason::Unreadable, detail);
            }
        };
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let detail = format!("file is not UTF-8: {e}");
                return self.skip_path(file, SkipReason::Malformed, detail);
            }
        };
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let json = file
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("json"));
        let documents = if json {
            split_json(text)
        } else {
            split_yaml(text)
        };
        for (index, document) in documents.iter().enumerate() {
            let body = if json {
                Body::Json(document)
            } else {
                Body::Yaml(document)
            };
            let at = At {
                file,
                index,
                item: None,
            };
            self.load_document(at, &body);
        }
    }

    fn load_document(&mut self, at: At<'_>, body: &Body<'_>) {
        let meta = match body.decode::<Option<TypeMeta>>() {
            Ok(Some(meta)) => meta,
            Ok(None) => return, // an explicit `null` / `~` document
            Err(e) => return self.skip(at, SkipReason::Malformed, e),
        };
        let (Some(api_version), Some(kind)) = (meta.api_version, meta.kind) else {
            return self.skip(
                at,
                SkipReason::Malformed,
                "apiVersion and kind are required",
            );
        };
        match Kind::of(&api_version, &kind) {
            None => self.skip(
                at,
                SkipReason::UnsupportedKind,
                format!("{api_version}/{kind} (kpr reads v1/Service and discovery.k8s.io/v1/EndpointSlice)"),
            ),
            Some(Kind::List) if at.item.is_some() => {
                self.skip(at, SkipReason::UnsupportedKind, "a List nested in a List")
            }
            Some(Kind::List) => match body.decode::<ListDoc>() {
                Err(e) => self.skip(at, SkipReason::Malformed, e),
                Ok(list) => {
                    for (item, value) in list.items.unwrap_or_default().iter().enumerate() {
                        let at = At {
                            item: Some(item),
                            ..at
                        };
                        self.load_document(at, &Body::Item(value));
                    }
                }
            },
            Some(kind @ Kind::Service) => {
                if let Some(service) = self.decode_object(at, kind, body) {
                    self.set.services.push(service);
                }
            }
            Some(kind @ Kind::EndpointSlice) => {
                if let Some(slice) = self.decode_object(at, kind, body) {
                    self.set.slices.push(slice);
                }
            }
        }
    }

    /// Decodes, checks the name, defaults the namespace and rejects duplicates.
    fn decode_object<T>(&mut self, at: At<'_>, kind: Kind, body: &Body<'_>) -> Option<T>
    where
        T: DeserializeOwned + Metadata<Ty = ObjectMeta>,
    {
        let mut object: T = match body.decode() {
            Ok(object) => object,
            Err(e) => {
                self.skip(at, SkipReason::Malformed, e);
                return None;
            }
        };
        let meta = object.metadata_mut();
        let name = match meta.name.as_deref() {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => {
                let detail = format!("{} without metadata.name", kind.name());
                self.skip(at, SkipReason::Malformed, detail);
                return None;
            }
        };
        let namespace = match meta.namespace.as_deref() {
            Some(namespace) if !namespace.is_empty() => namespace.to_string(),
            _ => DEFAULT_NAMESPACE.to_string(),
        };
        meta.namespace = Some(namespace.clone());
        let key = (kind, namespace, name);
        if let Some(first) = self.seen.get(&key) {
            let detail = format!(
                "{} {}/{} is already defined in {first}",
                kind.name(),
                key.1,
                key.2
            );
            self.skip(at, SkipReason::Duplicate, detail);
            return None;
        }
        self.seen.insert(key, at.describe());
        Some(object)
    }
}

/// Whether a directory entry is a manifest: not hidden, ends in .yaml/.yml/.json.
fn is_manifest_name(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    if name.starts_with('.') {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    [".yaml", ".yml", ".json"]
        .iter()
        .any(|ext| lower.len() > ext.len() && lower.ends_with(ext))
}

/// Whether `line` (without its line break) is a `---` or `...` marker line.
fn is_document_marker(line: &str) -> bool {
    ["---", "..."].iter().any(|marker| {
        line.strip_prefix(marker)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
    })
}

/// Whether a YAML line carries no content: blank, a comment, or a directive.
fn is_blank_yaml_line(line: &str) -> bool {
    let trimmed = line.trim();
    trimmed.is_empty() || trimmed.starts_with('#') || line.starts_with('%')
}

/// Splits YAML text into its non-empty documents. A marker line's own
/// marker is replaced by spaces, keeping anything after it on its line
/// (`--- # comment`) at its original column.
fn split_yaml(text: &str) -> Vec<Document> {
    let mut documents = Vec::new();
    let mut current = Document {
        first_line: 0,
        text: String::new(),
    };
    let mut content = false;
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        if is_document_marker(bare) {
            let next = Document {
                first_line: line_no,
                text: format!("   {}", &line[3..]),
            };
            let done = std::mem::replace(&mut current, next);
            if content {
                documents.push(done);
            }
            content = !is_blank_yaml_line(&bare[3..]);
        } else {
            current.text.push_str(line);
            content |= !is_blank_yaml_line(bare);
        }
    }
    if content {
        documents.push(current);
    }
    documents
}

/// Splits JSON text into its top-level values. After a syntax error the rest
/// of the text is one last document, which fails to parse with that error.
fn split_json(text: &str) -> Vec<Document> {
    let document = |start: usize, end: usize| Document {
        first_line: text[..start].matches('\n').count(),
        text: text[start..end].to_string(),
    };
    let mut documents = Vec::new();
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<serde::de::IgnoredAny>();
    let mut start = 0;
    loop {
        match stream.next() {
            None => break,
            Some(Ok(_)) => {
                let end = stream.byte_offset();
                documents.push(document(start, end));
                start = end;
            }
            Some(Err(_)) => {
                documents.push(document(start, text.len()));
                break;
            }
        }
    }
    documents
}

/// Why [`watch`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The platform's file watcher could not be created (inotify on Linux:
    /// `fs.inotify.max_user_instances` reached).
    #[error("creating the manifest file watcher")]
    Create(#[source] notify::Error),
    /// A directory could not be watched: no permission, or the inotify watch
    /// limit (`fs.inotify.max_user_watches`) is reached.
    #[error("watching manifest directory {}", dir.display())]
    Watch {
        /// The directory that could not be watched.
        dir: PathBuf,
        /// The watcher's error.
        #[source]
        source: notify::Error,
    },
}

/// Reports changes to manifest paths; see [`watch`]. Dropping it stops watching.
pub struct ManifestWatch {
    watcher: RecommendedWatcher,
    paths: Vec<PathBuf>,
    /// Every directory watched so far; see [`ManifestWatch::dirs`].
    dirs: BTreeSet<PathBuf>,
    events: mpsc::Receiver<()>,
    debounce: Duration,
    /// When the burst being debounced must be reported at the latest; `Some`
    /// while a burst is pending, also across a cancelled [`ManifestWatch::changed`].
    burst_deadline: Option<Instant>,
}

impl std::fmt::Debug for ManifestWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManifestWatch")
            .field("paths", &self.paths)
            .field("dirs", &self.dirs)
            .field("debounce", &self.debounce)
            .finish_non_exhaustive()
    }
}

/// Starts watching `paths` (the same paths as given to [`load`]).
///
/// A directory is watched itself (not recursively). For a file, its parent
/// directory is watched, so that editors' write-to-temp-then-rename, deletion
/// and re-creation are all seen. For a path that does not exist (yet), its
/// nearest existing ancestor is watched; after each reported burst the
/// watches are brought up to date, so a directory created, or deleted and
/// re-created, later is watched from then on. Watches are only added, never
/// removed, while the `ManifestWatch` lives.
///
/// Any change in a watched directory counts, including files that [`load`]
/// ignores; that only costs a reload. Opening and reading files does not
/// count, so reloading does not trigger itself. Not seen: changes inside a
/// symlink's target directory, unless that directory is watched too (a
/// ConfigMap volume's atomic `..data` swap *is* seen, in the volume's
/// directory).
///
/// `debounce` is the quiet period that ends a burst of changes (for example
/// 200 ms). [`ManifestWatch::changed`] needs a Tokio runtime with the time
/// driver.
///
/// # Errors
/// [`WatchError`] when the watcher cannot be created or a directory cannot
/// be watched (a missing path is not an error).
pub fn watch(paths: &[PathBuf], debounce: Duration) -> Result<ManifestWatch, WatchError> {
    // Capacity 1: a pending notification already says "something changed".
    let (tx, events) = mpsc::channel(1);
    let configured: Vec<PathBuf> = paths.to_vec();
    let watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) if !is_change(&event.kind) => {}
            // Other files next to a watched manifest file (logs, editors'
            // swap files) do not change what `load` reads.
            Ok(event)
                if !event.paths.is_empty()
                    && !event.paths.iter().any(|p| is_relevant(p, &configured)) => {}
            Ok(_) => {
                let _ = tx.try_send(());
            }
            Err(e) => {
                // Overflowed queues and the like: reloading is the safe answer.
                tracing::warn!(error = %e, "manifest watcher error; reloading");
                let _ = tx.try_send(());
            }
        })
        .map_err(WatchError::Create)?;
    let mut watch = ManifestWatch {
        watcher,
        paths: paths.to_vec(),
        dirs: BTreeSet::new(),
        events,
        debounce,
        burst_deadline: None,
    };
    for dir in watch.wanted_dirs() {
        watch.add_watch(&dir)?;
    }
    Ok(watch)
}

/// The directory to watch for `path`: itself if it is a directory, else its
/// nearest existing ancestor (`.` for a relative path with none).
fn watched_dir(path: &Path) -> PathBuf {
    if path.is_dir() {
        return path.to_path_buf();
    }
    path.ancestors()
        .skip(1)
        .take_while(|dir| !dir.as_os_str().is_empty())
        .find(|dir| dir.is_dir())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Whether a change at `changed` can change what [`load`] reads from
/// `configured`: a configured path itself or one of its ancestors (created or
/// replaced), or a manifest file inside a configured directory.
fn is_relevant(changed: &Path, configured: &[PathBuf]) -> bool {
    configured.iter().any(|c| {
        c.starts_with(changed)
            || changed.parent() == Some(c.as_path())
                && changed.file_name().is_some_and(is_manifest_name)
    })
}

/// Whether an event can change what [`load`] returns. Opens, reads and
/// read-only closes cannot (and [`load`] itself causes them).
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

impl ManifestWatch {
    /// Every directory watched so far, sorted.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(PathBuf::as_path)
    }

    /// Resolves once per burst of changes: after a change, when no further
    /// change has been seen for the debounce period, or at the latest after
    /// ten debounce periods. Changes made while nobody is waiting are kept
    /// (coalesced into one) and reported by the next call.
    ///
    /// Before resolving, watches directories that have appeared since (see
    /// [`watch`]), so a [`load`] after this call sees everything that the
    /// next call will report changes to.
    ///
    /// Cancel-safe: dropping the future (e.g. in `tokio::select!`) loses no
    /// change; the next call resumes the pending burst.
    pub async fn changed(&mut self) {
        let deadline = match self.burst_deadline {
            Some(deadline) => deadline,
            None => {
                if self.events.recv().await.is_none() {
                    // The watcher owns the sender and lives as long as self.
                    std::future::pending::<()>().await;
                }
                let deadline = Instant::now() + self.debounce.saturating_mul(MAX_BURST_DEBOUNCES);
                self.burst_deadline = Some(deadline);
                deadline
            }
        };
        loop {
            let quiet = (Instant::now() + self.debounce).min(deadline);
            tokio::select! {
                event = self.events.recv() => {
                    if event.is_none() || Instant::now() >= deadline {
                        break;
                    }
                }
                () = tokio::time::sleep_until(quiet) => break,
            }
        }
        self.rewatch();
        self.burst_deadline = None;
    }

    fn wanted_dirs(&self) -> BTreeSet<PathBuf> {
        self.paths.iter().map(|path| watched_dir(path)).collect()
    }

    fn add_watch(&mut self, dir: &Path) -> Result<(), WatchError> {
        self.watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|source| WatchError::Watch {
                dir: dir.to_path_buf(),
                source,
            })?;
        self.dirs.insert(dir.to_path_buf());
        Ok(())
    }

    /// Watches the directories the paths need now. Watching a directory again
    /// is harmless, and needed when it was deleted and re-created.
    fn rewatch(&mut self) {
        for dir in self.wanted_dirs() {
            if let Err(e) = self.add_watch(&dir) {
                // A directory can vanish between the check and the watch;
                // the next burst (its parent is watched) tries again.
                tracing::warn!(error = %format!("{e:#}"), "manifest watch not updated");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        let text =
            format!("{WEB_SERVICE}---\nmetadata: {{name: [unclosed\n---\n{SERVICE_AND_SLICES}");
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
    fn a_directory_loads_its_manifest_files_in_name_order_and_ignores_the_rest() {
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
        assert_eq!(reasons(&set), [(0, SkipReason::UnsupportedKind)]);
        assert_eq!(set.skipped[0].file, dir.path().join("d.yaml"));
    }

    #[test]
    fn missing_paths_and_dangling_symlinks_are_reported_and_the_rest_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let good = write(dir.path(), "good.yaml", WEB_SERVICE);
        let manifests = dir.path().join("manifests");
        fs::create_dir(&manifests).unwrap();
        std::os::unix::fs::symlink(dir.path().join("gone"), manifests.join("dangling.yaml"))
            .unwrap();
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
            "%YAML 1.1\n---\n# nothing here\n---\n\n--- # web\n{WEB_SERVICE}...\n---\n~\n---\napiVersion: v1\nkind: Pod\n---\n"
        );
        let file = write(dir.path(), "sparse.yaml", &text);

        let set = load(&[file]);

        assert_eq!(names(&set.services), ["default/web"]);
        // web is document 0, `~` document 1, the Pod document 2.
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
        let doc = |first_line, text: &str| Document {
            first_line,
            text: text.to_string(),
        };
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

    // --- watching -----------------------------------------------------------

    /// Generous: this VM can pause for 500 ms.
    const EVENT_TIMEOUT: Duration = Duration::from_secs(5);
    const DEBOUNCE: Duration = Duration::from_millis(100);

    async fn expect_change(watch: &mut ManifestWatch, what: &str) {
        if tokio::time::timeout(EVENT_TIMEOUT, watch.changed())
            .await
            .is_err()
        {
            panic!("no change reported within {EVENT_TIMEOUT:?} after {what}");
        }
    }

    /// Waits until no change has been reported for `quiet`; bounded to 10 rounds.
    async fn settle(watch: &mut ManifestWatch, quiet: Duration) {
        for _ in 0..10 {
            if tokio::time::timeout(quiet, watch.changed()).await.is_err() {
                return;
            }
        }
        panic!("the watch kept reporting changes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watch_reports_write_rename_replace_delete_and_create() {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("files");
        let confd = dir.path().join("conf.d");
        fs::create_dir(&files).unwrap();
        fs::create_dir(&confd).unwrap();
        let svc = write(&files, "svc.yaml", WEB_SERVICE);
        let mut watch = watch(&[svc.clone(), confd.clone()], DEBOUNCE).unwrap();
        let dirs: Vec<&Path> = watch.dirs().collect();
        assert_eq!(dirs, [confd.as_path(), files.as_path()]);

        fs::write(&svc, SERVICE_AND_SLICES).unwrap();
        expect_change(&mut watch, "an in-place write").await;
        settle(&mut watch, Duration::from_millis(500)).await;

        let tmp = write(&files, ".svc.yaml.tmp", WEB_SERVICE);
        fs::rename(&tmp, &svc).unwrap();
        expect_change(&mut watch, "a rename-replace").await;
        settle(&mut watch, Duration::from_millis(500)).await;

        fs::remove_file(&svc).unwrap();
        expect_change(&mut watch, "a delete").await;
        settle(&mut watch, Duration::from_millis(500)).await;

        write(&confd, "new.yaml", WEB_SERVICE);
        expect_change(&mut watch, "a file created in a watched directory").await;
        settle(&mut watch, Duration::from_millis(500)).await;

        write(&files, "svc.yaml", WEB_SERVICE);
        expect_change(&mut watch, "re-creating a deleted watched file").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn other_files_next_to_a_watched_file_do_not_trigger_the_watch() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "svc.yaml", SERVICE_AND_SLICES);
        let paths = [dir.path().join("svc.yaml")];
        let mut watch = watch(&paths, DEBOUNCE).unwrap();
        settle(&mut watch, Duration::from_millis(300)).await;

        write(dir.path(), "agent.log", "a log line");
        write(dir.path(), "other.yaml", SERVICE_AND_SLICES);
        let quiet = tokio::time::timeout(Duration::from_secs(1), watch.changed()).await;
        assert!(
            quiet.is_err(),
            "a neighbour of the watched file reported a change"
        );

        write(dir.path(), "svc.yaml", SERVICE_AND_SLICES);
        expect_change(&mut watch, "rewriting the watched file").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reloading_does_not_trigger_the_watch() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "svc.yaml", SERVICE_AND_SLICES);
        let paths = [dir.path().to_path_buf()];
        let mut watch = watch(&paths, DEBOUNCE).unwrap();

        for _ in 0..3 {
            let set = load(&paths);
            assert_eq!(set.services.len(), 1);
        }

        let quiet = tokio::time::timeout(Duration::from_secs(1), watch.changed()).await;
        assert!(quiet.is_err(), "reading the manifests reported a change");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_writes_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let paths = [dir.path().to_path_buf()];
        // Longer than the VM's pauses, so the burst cannot split in two.
        let mut watch = watch(&paths, Duration::from_secs(1)).unwrap();

        for i in 0..5 {
            write(dir.path(), &format!("{i}.yaml"), WEB_SERVICE);
        }

        expect_change(&mut watch, "five writes").await;
        let again = tokio::time::timeout(Duration::from_secs(2), watch.changed()).await;
        assert!(again.is_err(), "one burst was reported twice");
    }

    #[tokio::test(start_paused = true)]
    async fn changes_made_while_nobody_waits_are_reported_by_the_next_call() {
        let dir = tempfile::tempdir().unwrap();
        let paths = [dir.path().to_path_buf()];
        let mut watch = watch(&paths, DEBOUNCE).unwrap();
        // Inject directly: the paused clock must not race a real inotify thread.
        watch.events = {
            let (tx, rx) = mpsc::channel(1);
            tx.try_send(()).unwrap();
            std::mem::forget(tx);
            rx
        };
        let start = Instant::now();

        // A cancelled call keeps the burst pending...
        let cancelled = tokio::time::timeout(DEBOUNCE / 2, watch.changed()).await;
        assert!(cancelled.is_err());
        // ...and the next call completes it, after the quiet period.
        watch.changed().await;
        assert!(start.elapsed() >= DEBOUNCE);
        assert!(start.elapsed() < DEBOUNCE * 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_directory_created_later_or_re_created_is_watched() {
        let dir = tempfile::tempdir().unwrap();
        let confd = dir.path().join("later").join("conf.d");
        let mut watch = watch(std::slice::from_ref(&confd), DEBOUNCE).unwrap();
        let dirs: Vec<&Path> = watch.dirs().collect();
        assert_eq!(dirs, [dir.path()]);

        fs::create_dir_all(&confd).unwrap();
        expect_change(&mut watch, "creating the directory's parent").await;
        settle(&mut watch, Duration::from_millis(500)).await;
        assert!(watch.dirs().any(|d| d == confd));

        write(&confd, "svc.yaml", WEB_SERVICE);
        expect_change(&mut watch, "a file created in the new directory").await;
        settle(&mut watch, Duration::from_millis(500)).await;

        fs::remove_dir_all(&confd).unwrap();
        expect_change(&mut watch, "deleting the directory").await;
        settle(&mut watch, Duration::from_millis(500)).await;
        fs::create_dir(&confd).unwrap();
        expect_change(&mut watch, "re-creating the directory").await;
        settle(&mut watch, Duration::from_millis(500)).await;

        write(&confd, "svc.yaml", WEB_SERVICE);
        expect_change(&mut watch, "a file created in the re-created directory").await;
    }

    #[test]
    fn a_missing_path_is_watched_through_its_nearest_existing_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "svc.yaml", WEB_SERVICE);

        assert_eq!(watched_dir(dir.path()), dir.path());
        assert_eq!(watched_dir(&file), dir.path());
        assert_eq!(watched_dir(&dir.path().join("a/b/c.yaml")), dir.path());
        assert_eq!(watched_dir(&file.join("under-a-file.yaml")), dir.path());
        assert_eq!(
            watched_dir(Path::new("no-such-relative/x.yaml")),
            Path::new(".")
        );
    }
}
