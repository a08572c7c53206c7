//! Knowing when to read: inotify events (through notify) for the configured
//! paths, classified into what they say about a file.
//!
//! - A completed write — a close after writing, or a rename into place —
//!   wakes the source at once: no debounce sits on the path of an edit made
//!   the safe way.
//! - A write still in progress (data modified, not yet closed) marks the
//!   file as being written; the source does not read it until the writer
//!   closes it (or goes quiet for long, see the source's state). Such
//!   events, creations, deletions and anything unclear wake the source after
//!   the debounce period of quiet, so a burst coalesces into one read (at
//!   the latest after ten periods, so a file rewritten in a loop cannot
//!   starve reads).
//! - Opens, reads and read-only closes are ignored: reading does not wake
//!   the reader.
//!
//! A directory is watched itself (not recursively); for a file, its parent,
//! so that write-to-temp-then-rename, deletion and re-creation are seen;
//! for a path that does not exist (any more), its nearest existing
//! ancestor. After each wake-up the watches are brought up to date, so a
//! directory created or re-created later is watched from then on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;

use super::files::is_manifest_name;

/// A burst of changes that never goes quiet is still reported after this many
/// debounce periods.
const MAX_BURST_DEBOUNCES: u32 = 10;

/// Why [`ManifestWatch::new`] could not start.
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
        dir: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// What the events since the last wake-up said. Shared with the watcher's
/// thread; plain data, valid even if a holder panicked.
#[derive(Debug, Default)]
pub struct Pending {
    /// Something relevant happened since the last wake-up.
    pub dirty: bool,
    /// A completed write or rename: wake at once.
    pub urgent: bool,
    /// Files named by any event since the last wake-up: read them even if
    /// their identity looks unchanged (a same-size rewrite within one
    /// timestamp tick).
    pub touched: BTreeSet<PathBuf>,
    /// Files written and then closed, or renamed into place, since the last
    /// wake-up: complete, readable at once.
    pub complete: BTreeSet<PathBuf>,
    /// Files being written (modified, not yet closed), with the time of
    /// their last modification. Kept across wake-ups until closed.
    pub writing: BTreeMap<PathBuf, Instant>,
}

/// What the source needs to know about files at a wake-up.
#[derive(Debug, Default, Clone)]
pub struct Hints {
    pub touched: BTreeSet<PathBuf>,
    pub complete: BTreeSet<PathBuf>,
    pub writing: BTreeMap<PathBuf, Instant>,
}

/// Watches the manifest paths. Dropping it stops watching.
pub struct ManifestWatch {
    watcher: RecommendedWatcher,
    paths: Vec<PathBuf>,
    dirs: BTreeSet<PathBuf>,
    pending: Arc<Mutex<Pending>>,
    wake: Arc<Notify>,
    debounce: Duration,
    /// When the burst being debounced must be reported at the latest; kept
    /// across a cancelled [`ManifestWatch::changed`].
    burst_deadline: Option<tokio::time::Instant>,
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

impl ManifestWatch {
    /// Starts watching absolute `paths`; `debounce` is the quiet period that
    /// ends a burst of incomplete changes.
    ///
    /// # Errors
    /// [`WatchError`] when the watcher cannot be created or a directory cannot
    /// be watched (a missing path is not an error).
    pub fn new(paths: &[PathBuf], debounce: Duration) -> Result<ManifestWatch, WatchError> {
        let pending = Arc::new(Mutex::new(Pending::default()));
        let wake = Arc::new(Notify::new());
        let configured = paths.to_vec();
        let (shared, notify) = (pending.clone(), wake.clone());
        let watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
            let mut p = shared.lock().unwrap_or_else(PoisonError::into_inner);
            let relevant = match event {
                Ok(event) => record(&mut p, &event, &configured),
                Err(e) => {
                    // Overflowed queues and the like: reading again is the safe answer.
                    tracing::warn!(error = %e, "manifest watcher error; reading again");
                    true
                }
            };
            if relevant {
                p.dirty = true;
                drop(p);
                notify.notify_one();
            }
        })
        .map_err(WatchError::Create)?;
        let mut watch = ManifestWatch {
            watcher,
            paths: paths.to_vec(),
            dirs: BTreeSet::new(),
            pending,
            wake,
            debounce,
            burst_deadline: None,
        };
        for dir in watch.wanted_dirs() {
            watch.add_watch(&dir)?;
        }
        Ok(watch)
    }

    /// Every directory watched so far, sorted.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(PathBuf::as_path)
    }

    /// Resolves at once after a completed write, else after a burst of other
    /// changes goes quiet for the debounce period (at the latest after ten).
    /// Changes made while nobody waits are kept for the next call.
    /// Cancel-safe. Then brings the watched directories up to date.
    pub async fn changed(&mut self) {
        loop {
            let (dirty, urgent) = {
                let p = self.lock();
                (p.dirty, p.urgent)
            };
            if urgent {
                break;
            }
            if !dirty {
                self.wake.notified().await;
                continue;
            }
            let now = tokio::time::Instant::now();
            let deadline = *self
                .burst_deadline
                .get_or_insert(now + self.debounce.saturating_mul(MAX_BURST_DEBOUNCES));
            let quiet = (now + self.debounce).min(deadline);
            tokio::select! {
                () = self.wake.notified() => {
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                }
                () = tokio::time::sleep_until(quiet) => break,
            }
        }
        self.burst_deadline = None;
        self.rewatch();
    }

    /// Takes what the events said since the last call (files being written
    /// stay marked until closed).
    pub fn take_hints(&self) -> Hints {
        let mut p = self.lock();
        p.dirty = false;
        p.urgent = false;
        Hints {
            touched: std::mem::take(&mut p.touched),
            complete: std::mem::take(&mut p.complete),
            writing: p.writing.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
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

    #[cfg(test)]
    pub(super) fn inject(&self, urgent: bool) {
        let mut p = self.lock();
        p.dirty = true;
        p.urgent |= urgent;
        drop(p);
        self.wake.notify_one();
    }
}

/// Records one event; false when it cannot change what the source reads.
fn record(p: &mut Pending, event: &Event, configured: &[PathBuf]) -> bool {
    let now = Instant::now();
    let relevant: Vec<&PathBuf> = event
        .paths
        .iter()
        .filter(|path| is_relevant(path, configured))
        .collect();
    if !event.paths.is_empty() && relevant.is_empty() {
        // Other files next to a watched manifest file (logs, editors' swap files).
        return false;
    }
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
            for path in relevant {
                p.writing.remove(path);
                p.complete.insert(path.clone());
                p.touched.insert(path.clone());
            }
            p.urgent = true;
        }
        // Opens, reads and read-only closes (the source's own reads).
        EventKind::Access(_) => return false,
        EventKind::Modify(ModifyKind::Name(mode)) => {
            // With Both, paths are [from, to]: the last one is the new name.
            let arrived = matches!(mode, RenameMode::To | RenameMode::Both);
            for (i, path) in event.paths.iter().enumerate() {
                p.writing.remove(path);
                p.touched.insert(path.clone());
                if arrived && i + 1 == event.paths.len() && is_relevant(path, configured) {
                    p.complete.insert(path.clone());
                    p.urgent = true;
                }
            }
        }
        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
            for path in relevant {
                p.writing.insert(path.clone(), now);
                p.touched.insert(path.clone());
            }
        }
        EventKind::Remove(_) => {
            for path in relevant {
                p.writing.remove(path);
                p.touched.insert(path.clone());
            }
        }
        _ => p.touched.extend(relevant.into_iter().cloned()),
    }
    true
}

/// The directory to watch for `path`: itself if it is a directory, else its
/// nearest existing ancestor (`.` for a relative path with none).
pub fn watched_dir(path: &Path) -> PathBuf {
    if path.is_dir() {
        return path.to_path_buf();
    }
    path.ancestors()
        .skip(1)
        .take_while(|dir| !dir.as_os_str().is_empty())
        .find(|dir| dir.is_dir())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Whether a change at `changed` can change what the source reads from
/// `configured`: a configured path itself or one of its ancestors (created or
/// replaced), a manifest file inside a configured directory, or a ConfigMap
/// volume's `..data` link swap there.
pub fn is_relevant(changed: &Path, configured: &[PathBuf]) -> bool {
    configured.iter().any(|c| {
        c.starts_with(changed)
            || changed.parent() == Some(c.as_path())
                && changed.file_name().is_some_and(|name| {
                    is_manifest_name(name) || name.to_str().is_some_and(|n| n.starts_with(".."))
                })
    })
}

#[cfg(test)]
#[path = "watch_tests.rs"]
mod tests;
