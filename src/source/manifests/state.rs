//! The source's memory: what each file last produced, which object each
//! document defines, and which definition of a namespace/name wins. A
//! reload costs in proportion to what changed:
//!
//! - a file whose identity (device, inode, size, mtime, ctime) did not
//!   change, and that no event named, is not read;
//! - a document whose text hash did not change is not parsed again: its
//!   objects (shared `Arc`s) are reused;
//! - only objects whose winning definition changed reach the
//!   [`ObjectStore`], which marks their Services changed, as for the
//!   Kubernetes source; the agent translates and syncs only those.
//!
//! A failure never becomes an empty desired state: a path that cannot be
//! listed, stat'ed or read keeps what it produced last, is counted and
//! retried with backoff, and makes the source unhealthy until it reads
//! again. A file that is being written (modified, not yet closed; or
//! modified moments ago with no event to say it is complete) is not read
//! until it is complete, and keeps its last state meanwhile. A file gone
//! from a directory listing is withdrawn only once it has stayed gone for
//! a grace period (an editor's rename-and-rewrite is not a deletion).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::claims::Claims;
use super::documents::{split_json, split_yaml, Document};
use super::files::{self, Identity, Read, ReadError, ReadErrorReason};
use super::parse::{escape, parse_documents, Object, ObjectKey, ObjectKind, Rejected};
use super::report::{log_report, ReloadReport};
use super::watch::Hints;
use super::{Limits, Rules, SkippedDocument};
use crate::skip::SkipReason;
use crate::source::store::ObjectStore;

/// A file modified without an event saying it is complete is read once it
/// has not changed for this long.
pub const QUIET_BEFORE_READ: Duration = Duration::from_millis(200);
/// A writer that keeps a file open without writing for this long is taken
/// as done: the file is read.
pub const WRITER_TIMEOUT: Duration = Duration::from_secs(2);
/// A file that changed while it was read is tried again after this.
const CHANGING_RETRY: Duration = Duration::from_millis(50);
/// First and longest wait before reading a failing path again.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A file: the index of the configured path it comes from, and its path.
/// Ordered as objects are: by configured path, then by name.
pub type FilePos = (usize, PathBuf);
/// A definition: file, document index, object index in the document.
pub type ClaimPos = (FilePos, usize, usize);

/// One document's result, shared between reloads while its text is unchanged.
#[derive(Debug)]
struct DocEntry {
    hash: u64,
    objects: Vec<(ObjectKey, Object)>,
    /// Services of the document the validation refused.
    rejected: Vec<Rejected>,
}

/// What a file produced last.
#[derive(Debug)]
struct FileState {
    identity: Identity,
    docs: Vec<Arc<DocEntry>>,
    /// Gone from its directory's listing since then (withdrawn after the grace).
    missing_since: Option<Instant>,
}

/// A path that failed, kept until it reads again.
#[derive(Debug)]
struct Failing {
    error: ReadError,
    attempts: u32,
    retry_at: Instant,
}

/// The source's state; see the module documentation.
pub struct SourceState {
    paths: Vec<PathBuf>,
    limits: Limits,
    rules: Rules,
    /// Whether files are checked for writes in progress (off for one-shot loads).
    readiness: bool,
    grace: Duration,
    hasher: RandomState,
    files: BTreeMap<FilePos, FileState>,
    claims: BTreeMap<ObjectKey, Claims>,
    store: ObjectStore,
    errors: BTreeMap<PathBuf, Failing>,
    /// Files skipped whole without a state to keep (FIFO, too large), with
    /// the identity they had, so each is reported once.
    refused: BTreeMap<PathBuf, Option<Identity>>,
    /// Files without a state that were not read yet (being written).
    unread: BTreeSet<PathBuf>,
    recheck_at: Option<Instant>,
    /// The agent's node (`--node-name`): the one Node document that reaches
    /// the store; other nodes' documents are read and kept out of it.
    node_name: Option<String>,
}

/// One reload's working set.
#[derive(Default)]
struct Pass {
    report: ReloadReport,
    affected: BTreeSet<ObjectKey>,
    added: BTreeSet<ClaimPos>,
    hints: Hints,
}

impl SourceState {
    pub fn new(
        paths: Vec<PathBuf>,
        limits: Limits,
        rules: Rules,
        readiness: bool,
        grace: Duration,
    ) -> Self {
        SourceState {
            paths,
            limits,
            rules,
            readiness,
            grace,
            hasher: RandomState::new(),
            files: BTreeMap::new(),
            claims: BTreeMap::new(),
            store: ObjectStore::new(),
            errors: BTreeMap::new(),
            refused: BTreeMap::new(),
            unread: BTreeSet::new(),
            recheck_at: None,
            node_name: None,
        }
    }

    /// Names the agent's node, whose Node document (if any) the store
    /// holds. Call before the first reload.
    pub fn set_node_name(&mut self, name: &str) {
        self.node_name = Some(name.to_string());
    }

    pub fn store(&self) -> &ObjectStore {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut ObjectStore {
        &mut self.store
    }

    /// Ok when every path read; else the failures, for `/healthz` and `kpr status`.
    pub fn health(&self) -> Result<(), String> {
        if self.errors.is_empty() {
            return Ok(());
        }
        let shown: Vec<String> = self
            .errors
            .values()
            .take(3)
            .map(|f| f.error.to_string())
            .collect();
        let more = self.errors.len().saturating_sub(shown.len());
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        Err(format!(
            "manifests not read, last state kept: {}{more}",
            escape(&shown.join("; "))
        ))
    }

    /// Whether the objects held are everything the paths define: no path
    /// failing, no file waiting to be read for the first time. Only then may
    /// the maps be pruned of what no manifest defines.
    pub fn is_complete(&self) -> bool {
        self.errors.is_empty() && self.unread.is_empty()
    }

    /// When a reload is due without any event: a retry or a file to look at again.
    pub fn next_wake(&self) -> Option<Instant> {
        self.errors
            .values()
            .map(|f| f.retry_at)
            .chain(self.recheck_at)
            .min()
    }

    /// Reads what changed; see the module documentation. Blocking I/O.
    pub fn reload(&mut self, hints: Hints) -> ReloadReport {
        let started = Instant::now();
        let mut pass = Pass {
            hints,
            ..Pass::default()
        };
        self.recheck_at = None;
        self.unread.clear();
        for index in 0..self.paths.len() {
            let path = self.paths[index].clone();
            self.reload_path(index, &path, &mut pass);
        }
        self.resolve(&mut pass);
        log_report(&pass.report);
        tracing::debug!(
            files_read = pass.report.files_read,
            documents_parsed = pass.report.documents_parsed,
            documents_reused = pass.report.documents_reused,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "manifests reloaded"
        );
        pass.report
    }

    /// Every object the paths define, winners only, in path then document order.
    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.files.iter().flat_map(move |(pos, file)| {
            file.docs.iter().enumerate().flat_map(move |(d, doc)| {
                doc.objects
                    .iter()
                    .enumerate()
                    .filter_map(move |(k, (key, object))| {
                        let first = self.claims.get(key)?.keys().next()?;
                        (first.0 == *pos && first.1 == d && first.2 == k).then_some(object)
                    })
            })
        })
    }

    /// The Services a manifest defines that the validation refused, by
    /// `namespace/name` (the first definition of each), unless a valid
    /// definition elsewhere is programmed instead.
    pub fn rejected_services(&self) -> BTreeMap<String, Rejected> {
        let mut rejected = BTreeMap::new();
        for doc in self.files.values().flat_map(|f| &f.docs) {
            for r in &doc.rejected {
                if self.store.service(&r.service).is_none() {
                    rejected
                        .entry(r.service.clone())
                        .or_insert_with(|| r.clone());
                }
            }
        }
        rejected
    }

    fn reload_path(&mut self, index: usize, path: &Path, pass: &mut Pass) {
        let listed = match fs::metadata(path) {
            Err(e) => return self.fail(&ReadError::io(path, "stat", &e), pass),
            Ok(meta) if meta.is_dir() => match files::list_dir(path) {
                Err(e) => return self.fail(&e, pass),
                Ok(listed) => {
                    self.recovered(path);
                    listed
                }
            },
            // A directory replaced by a file: what it held is not known to be gone.
            Ok(_) if self.files.keys().any(|pos| pos.0 == index && pos.1 != path) => {
                let error = ReadError {
                    path: path.to_path_buf(),
                    reason: ReadErrorReason::NotFound,
                    detail: "was a directory, is a file now".into(),
                };
                return self.fail(&error, pass);
            }
            Ok(_) => vec![path.to_path_buf()],
        };
        for file in &listed {
            self.refresh(&(index, file.clone()), file != path, pass);
        }
        let gone: Vec<FilePos> = self
            .files
            .keys()
            .filter(|pos| pos.0 == index && !listed.contains(&pos.1))
            .cloned()
            .collect();
        for pos in gone {
            self.absent(&pos, pass);
        }
    }

    /// A file that was read before is not listed any more.
    fn absent(&mut self, pos: &FilePos, pass: &mut Pass) {
        self.recovered(&pos.1);
        let now = Instant::now();
        let Some(file) = self.files.get_mut(pos) else {
            return;
        };
        let since = *file.missing_since.get_or_insert(now);
        if now.duration_since(since) < self.grace {
            self.recheck(since + self.grace);
            return;
        }
        tracing::info!(file = ?pos.1, "manifest file removed: its objects are withdrawn");
        self.replace(pos, Vec::new(), None, pass);
    }

    fn refresh(&mut self, pos: &FilePos, in_dir: bool, pass: &mut Pass) {
        let path = &pos.1;
        let meta = match fs::metadata(path) {
            Ok(meta) => meta,
            // Listed, then gone: deleted meanwhile (not a dangling symlink).
            Err(e)
                if in_dir
                    && fs::symlink_metadata(path).is_err()
                    && ReadErrorReason::of(&e) == ReadErrorReason::NotFound =>
            {
                return self.absent(pos, pass)
            }
            Err(e) => return self.fail(&ReadError::io(path, "stat", &e), pass),
        };
        if let Some(file) = self.files.get_mut(pos) {
            file.missing_since = None;
        }
        if !meta.is_file() {
            let what = files::type_name(&meta);
            return self.refuse(
                pos,
                None,
                SkipReason::NotRegularFile,
                ReadErrorReason::NotRegularFile,
                format!("{what}, not a regular file: not opened"),
                pass,
            );
        }
        let identity = Identity::of(&meta);
        let known = self.files.get(pos).map(|f| f.identity);
        if known == Some(identity) && !pass.hints.touched.contains(path) {
            self.recovered(path);
            return;
        }
        if !self.ready(pos, identity, pass) {
            return;
        }
        match files::read_file(path, identity, self.limits.max_file_bytes) {
            Err(e) => self.fail(&e, pass),
            Ok(Read::Changing) => {
                self.recheck(Instant::now() + CHANGING_RETRY);
                self.not_yet(pos);
            }
            Ok(Read::TooLarge(size)) => {
                let detail = format!(
                    "{size} bytes, over --manifest-max-file-bytes {}",
                    self.limits.max_file_bytes
                );
                self.refuse(
                    pos,
                    Some(identity),
                    SkipReason::TooLarge,
                    ReadErrorReason::TooLarge,
                    detail,
                    pass,
                )
            }
            Ok(Read::NotRegular(what)) => {
                let detail = format!("{what}, not a regular file");
                self.refuse(
                    pos,
                    Some(identity),
                    SkipReason::NotRegularFile,
                    ReadErrorReason::NotRegularFile,
                    detail,
                    pass,
                )
            }
            Ok(Read::Text(bytes, identity)) => {
                self.recovered(path);
                self.refused.remove(path);
                pass.report.files_read += 1;
                self.parse_file(pos, bytes, identity, pass);
            }
        }
    }

    /// Whether a changed file is complete enough to read: not being
    /// written, and either known complete or quiet for a moment.
    fn ready(&mut self, pos: &FilePos, identity: Identity, pass: &Pass) -> bool {
        if !self.readiness {
            return true;
        }
        let path = &pos.1;
        let now = Instant::now();
        if let Some(&last_write) = pass.hints.writing.get(path) {
            if now.duration_since(last_write) < WRITER_TIMEOUT {
                self.recheck(last_write + WRITER_TIMEOUT);
                self.not_yet(pos);
                return false;
            }
        } else if !pass.hints.complete.contains(path) {
            let age = identity.age(SystemTime::now());
            if age < QUIET_BEFORE_READ {
                self.recheck(now + (QUIET_BEFORE_READ - age));
                self.not_yet(pos);
                return false;
            }
        }
        true
    }

    /// A file left unread for now; without a state to keep, the source is
    /// not complete until it is read.
    fn not_yet(&mut self, pos: &FilePos) {
        if !self.files.contains_key(pos) {
            self.unread.insert(pos.1.clone());
        }
    }

    /// A file that cannot be used whole: a read failure if it has a state
    /// to keep, else skipped (reported once per identity).
    fn refuse(
        &mut self,
        pos: &FilePos,
        identity: Option<Identity>,
        skip: SkipReason,
        error: ReadErrorReason,
        detail: String,
        pass: &mut Pass,
    ) {
        let path = &pos.1;
        if self.files.contains_key(pos) {
            let error = ReadError {
                path: path.clone(),
                reason: error,
                detail,
            };
            return self.fail(&error, pass);
        }
        self.recovered(path);
        if self.refused.get(path) == Some(&identity) {
            return;
        }
        self.refused.insert(path.clone(), identity);
        pass.report.skipped.push(SkippedDocument {
            file: path.clone(),
            index: 0,
            reason: skip,
            detail,
        });
    }

    fn fail(&mut self, error: &ReadError, pass: &mut Pass) {
        let now = Instant::now();
        let failing = self
            .errors
            .entry(error.path.clone())
            .or_insert_with(|| Failing {
                error: error.clone(),
                attempts: 0,
                retry_at: now,
            });
        if failing.attempts == 0 || failing.error.reason != error.reason {
            tracing::warn!(path = ?error.path, reason = %error.reason, detail = %escape(&error.detail), "manifest path not read; keeping the last state it produced, retrying with backoff");
        }
        failing.error = error.clone();
        failing.attempts = failing.attempts.saturating_add(1);
        let backoff = BACKOFF_MIN.saturating_mul(1 << failing.attempts.min(16).saturating_sub(1));
        failing.retry_at = now + backoff.min(BACKOFF_MAX);
        pass.report.read_errors.push(error.clone());
        pass.report.skipped.push(SkippedDocument {
            file: error.path.clone(),
            index: 0,
            reason: SkipReason::Unreadable,
            detail: error.detail.clone(),
        });
    }

    fn recovered(&mut self, path: &Path) {
        if let Some(failing) = self.errors.remove(path) {
            tracing::info!(path = ?path, after = failing.attempts, "manifest path readable again");
        }
    }

    fn recheck(&mut self, at: Instant) {
        self.recheck_at = Some(self.recheck_at.map_or(at, |r| r.min(at)));
    }

    fn parse_file(&mut self, pos: &FilePos, bytes: Vec<u8>, identity: Identity, pass: &mut Pass) {
        let path = &pos.1;
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                pass.report.skipped.push(SkippedDocument {
                    file: path.clone(),
                    index: 0,
                    reason: SkipReason::Malformed,
                    detail: format!("file is not UTF-8: {e}"),
                });
                return self.replace(pos, Vec::new(), Some(identity), pass);
            }
        };
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let json = files::is_json(path);
        let documents = if json {
            split_json(text)
        } else {
            split_yaml(text)
        };
        let old: HashMap<u64, Arc<DocEntry>> = self
            .files
            .get(pos)
            .map(|f| f.docs.iter().map(|d| (d.hash, d.clone())).collect())
            .unwrap_or_default();
        let hashes: Vec<u64> = documents
            .iter()
            .map(|d| self.hasher.hash_one((d.marker, d.body)))
            .collect();
        let changed: Vec<&Document<'_>> = documents
            .iter()
            .zip(&hashes)
            .filter(|(_, hash)| !old.contains_key(hash))
            .map(|(d, _)| d)
            .collect();
        let mut parsed_docs =
            parse_documents(&changed, json, &self.limits, &self.rules).into_iter();
        let mut docs = Vec::with_capacity(documents.len());
        for (index, &hash) in hashes.iter().enumerate() {
            if let Some(entry) = old.get(&hash) {
                pass.report.documents_reused += 1;
                docs.push(entry.clone());
                continue;
            }
            let Some(parsed) = parsed_docs.next() else {
                break; // one result per changed document: never short
            };
            pass.report.documents_parsed += 1;
            pass.report
                .skipped
                .extend(parsed.skipped.into_iter().map(|s| SkippedDocument {
                    file: path.clone(),
                    index,
                    reason: s.reason,
                    detail: s.detail,
                }));
            docs.push(Arc::new(DocEntry {
                hash,
                objects: parsed.objects,
                rejected: parsed.rejected,
            }));
        }
        self.replace(pos, docs, Some(identity), pass);
    }

    /// Makes `docs` the file's documents (none and no identity: the file is
    /// gone), updating the definitions of the documents that changed.
    fn replace(
        &mut self,
        pos: &FilePos,
        docs: Vec<Arc<DocEntry>>,
        identity: Option<Identity>,
        pass: &mut Pass,
    ) {
        let old = match identity {
            Some(identity) => self.files.insert(
                pos.clone(),
                FileState {
                    identity,
                    docs,
                    missing_since: None,
                },
            ),
            None => self.files.remove(pos),
        };
        let old_docs = old.map(|f| f.docs).unwrap_or_default();
        let new_docs: &[Arc<DocEntry>] = self.files.get(pos).map_or(&[], |f| &f.docs);
        let mut removed = Vec::new();
        let mut added = Vec::new();
        for d in 0..old_docs.len().max(new_docs.len()) {
            let (before, after) = (old_docs.get(d), new_docs.get(d));
            if let (Some(b), Some(a)) = (before, after) {
                if Arc::ptr_eq(b, a) || b.hash == a.hash {
                    continue;
                }
            }
            for (k, (key, _)) in before.iter().flat_map(|b| b.objects.iter().enumerate()) {
                removed.push((key.clone(), (pos.clone(), d, k)));
            }
            for (k, (key, object)) in after.iter().flat_map(|a| a.objects.iter().enumerate()) {
                added.push((key.clone(), (pos.clone(), d, k), object.clone()));
            }
        }
        for (key, claim) in removed {
            if let Some(claims) = self.claims.get_mut(&key) {
                claims.remove(&claim);
                if claims.is_empty() {
                    self.claims.remove(&key);
                }
            }
            pass.affected.insert(key);
        }
        for (key, claim, object) in added {
            pass.added.insert(claim.clone());
            self.claims
                .entry(key.clone())
                .or_default()
                .insert(claim, object);
            pass.affected.insert(key);
        }
    }

    /// Brings the store to the winning definition of every affected object,
    /// and reports new definitions that lose to an earlier one.
    fn resolve(&mut self, pass: &mut Pass) {
        for key in std::mem::take(&mut pass.affected) {
            if key.kind == ObjectKind::Node {
                let winner = self.claims.get(&key).and_then(|c| c.iter().next());
                let winner = winner.map(|(_, o)| o.clone());
                self.resolve_node(&key, winner.as_ref());
            }
            let claims = self.claims.get(&key);
            let winner = claims.and_then(|c| c.iter().next());
            let store_key = format!("{}/{}", key.namespace, key.name);
            let current = match key.kind {
                ObjectKind::Node => None,
                ObjectKind::Pod => self
                    .store
                    .pod_shared(&pod_store_key(&key))
                    .cloned()
                    .map(Object::Pod),
                ObjectKind::Service => self
                    .store
                    .service_shared(&store_key)
                    .cloned()
                    .map(Object::Service),
                ObjectKind::EndpointSlice => self
                    .store
                    .slice_shared(&store_key)
                    .cloned()
                    .map(Object::EndpointSlice),
            };
            match (winner.map(|(_, o)| o), current) {
                (None, None) => {}
                (Some(w), Some(c)) if w.same(&c) => {}
                (Some(Object::Service(s)), _) => self.store.apply_service(s.clone()),
                (Some(Object::EndpointSlice(s)), _) => self.store.apply_slice(s.clone()),
                (Some(Object::Pod(p)), _) => self.store.apply_pod(p.clone()),
                (None, Some(Object::Pod(c))) => self.store.delete_pod(&c),
                // The agent's own Node reached the store above.
                (Some(Object::Node(_)), _) | (None, Some(Object::Node(_))) => {}
                (None, Some(Object::Service(c))) => self.store.delete_service(&c),
                (None, Some(Object::EndpointSlice(c))) => self.store.delete_slice(&c),
            }
            let (Some(claims), Some((first, _))) = (claims, winner) else {
                continue;
            };
            for (pos, _) in claims
                .iter()
                .skip(1)
                .filter(|(pos, _)| pass.added.contains(*pos))
            {
                pass.report.skipped.push(SkippedDocument {
                    file: pos.0 .1.clone(),
                    index: pos.1,
                    reason: SkipReason::Duplicate,
                    detail: format!(
                        "{} {}/{} is already defined in {} document {}",
                        key.kind.name(),
                        key.namespace,
                        key.name,
                        escape(&first.0 .1.display().to_string()),
                        first.1
                    ),
                });
            }
        }
    }

    /// The store's Node follows the winning document of the agent's own
    /// node; a change of its labels or addresses re-translates everything.
    fn resolve_node(&mut self, key: &ObjectKey, winner: Option<&Object>) {
        if self.node_name.as_deref() != Some(key.name.as_str()) {
            return;
        }
        let node = match winner {
            Some(Object::Node(n)) => Some((**n).clone()),
            _ => None,
        };
        self.store.set_node(node);
    }
}

/// The store's key of a Pod's hostPort frontends.
fn pod_store_key(key: &ObjectKey) -> String {
    crate::translate::host_port_key(&key.namespace, &key.name)
}
