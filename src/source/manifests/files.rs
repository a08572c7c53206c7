//! The file system side of the source: which files the configured paths
//! name, a cheap identity of each (to skip files that did not change),
//! and reading one safely — non-regular files refused before opening, a
//! size limit, no blocking on a FIFO swapped in at the last moment, and a
//! file still being written recognised as not ready.
//!
//! Every failure is a [`ReadError`] with a reason from a fixed set, the
//! label of `kpr_source_read_errors_total{reason}`.

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, Metadata};
use std::io::{self, Read as _};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Why a path could not be read. A fixed set: the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReadErrorReason {
    /// The path vanished, or never existed (ENOENT, ENOTDIR).
    NotFound,
    /// No permission (EACCES, EPERM).
    Permission,
    /// Out of file descriptors (EMFILE, ENFILE): the agent's or the system's.
    Descriptors,
    /// A file read so far is now a FIFO, socket, device or directory.
    NotRegularFile,
    /// A file read so far is now over `--manifest-max-file-bytes`.
    TooLarge,
    /// Any other I/O error (EIO...).
    Io,
}

impl ReadErrorReason {
    /// Every reason, in label order.
    pub const ALL: [ReadErrorReason; 6] = [
        ReadErrorReason::NotFound,
        ReadErrorReason::Permission,
        ReadErrorReason::Descriptors,
        ReadErrorReason::NotRegularFile,
        ReadErrorReason::TooLarge,
        ReadErrorReason::Io,
    ];

    /// The metric label value.
    pub fn as_label(self) -> &'static str {
        match self {
            ReadErrorReason::NotFound => "not_found",
            ReadErrorReason::Permission => "permission",
            ReadErrorReason::Descriptors => "descriptors",
            ReadErrorReason::NotRegularFile => "not_regular_file",
            ReadErrorReason::TooLarge => "too_large",
            ReadErrorReason::Io => "io",
        }
    }

    /// The reason of an I/O error.
    pub fn of(error: &io::Error) -> ReadErrorReason {
        match error.raw_os_error() {
            Some(libc::ENOENT | libc::ENOTDIR) => ReadErrorReason::NotFound,
            Some(libc::EACCES | libc::EPERM) => ReadErrorReason::Permission,
            Some(libc::EMFILE | libc::ENFILE) => ReadErrorReason::Descriptors,
            _ if error.kind() == io::ErrorKind::NotFound => ReadErrorReason::NotFound,
            _ => ReadErrorReason::Io,
        }
    }
}

impl fmt::Display for ReadErrorReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_label())
    }
}

impl prometheus_client::encoding::EncodeLabelValue for ReadErrorReason {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), fmt::Error> {
        prometheus_client::encoding::EncodeLabelValue::encode(&self.as_label(), encoder)
    }
}

/// A failure to read a configured path, a directory or a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadError {
    pub path: PathBuf,
    pub reason: ReadErrorReason,
    /// The error's text, for logs and `kpr status` (never a metric label).
    pub detail: String,
}

impl ReadError {
    pub fn io(path: &Path, what: &str, error: &io::Error) -> ReadError {
        ReadError {
            path: path.to_path_buf(),
            reason: ReadErrorReason::of(error),
            detail: format!("{what}: {error}"),
        }
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {} ({})", self.path, self.reason, self.detail)
    }
}

/// Makes `--manifests` paths absolute (against the working directory, without
/// resolving symlinks: a ConfigMap volume's `..data` link must stay a link)
/// and checks that each exists.
///
/// # Errors
/// A message naming the first path that does not exist or cannot be checked.
pub fn resolve_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    paths
        .iter()
        .map(|path| {
            let absolute = std::path::absolute(path)
                .map_err(|e| format!("--manifests {path:?}: {e}"))?;
            match fs::metadata(&absolute) {
                Ok(_) => Ok(absolute),
                Err(e) if ReadErrorReason::of(&e) == ReadErrorReason::NotFound => Err(format!(
                    "--manifests {path:?}: no such file or directory (a mistyped path would serve no Services)"
                )),
                Err(e) => Err(format!("--manifests {path:?}: {e}")),
            }
        })
        .collect()
}

/// Whether a directory entry is a manifest: not hidden, ends in .yaml/.yml/.json.
pub fn is_manifest_name(name: &OsStr) -> bool {
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

/// Whether a file is parsed as JSON (else YAML).
pub fn is_json(path: &Path) -> bool {
    path.extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("json"))
}

/// The manifest files of a directory, sorted by name: regular files and
/// symlinks to them, but also entries of other types with a manifest name
/// (refused later, with a reason). Not recursive.
///
/// # Errors
/// Listing failed: the list would be incomplete, so nothing may be pruned.
pub fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, ReadError> {
    let entries = fs::read_dir(dir).map_err(|e| ReadError::io(dir, "listing the directory", &e))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ReadError::io(dir, "listing the directory", &e))?;
        let name = entry.file_name();
        if !is_manifest_name(&name) {
            continue;
        }
        files.push(entry.path());
    }
    files.sort();
    Ok(files)
}

/// What identifies a file's content without reading it: when none of
/// these changed (and no event named the file) it is not read again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Identity {
    pub fn of(meta: &Metadata) -> Identity {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }

    /// How long ago the file was last modified (zero if in the future).
    pub fn age(&self, now: SystemTime) -> Duration {
        let now_ns = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let age = (now_ns - self.mtime_ns).max(0);
        Duration::from_nanos(u64::try_from(age).unwrap_or(u64::MAX))
    }
}

/// The file type as a word, for skip details.
pub fn type_name(meta: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// What reading a file gave.
#[derive(Debug)]
pub enum Read {
    /// The whole file, which did not change while it was read.
    Text(Vec<u8>, Identity),
    /// The file changed while it was opened or read: try again later.
    Changing,
    /// Over the size limit.
    TooLarge(u64),
    /// Not a regular file (any more).
    NotRegular(&'static str),
}

/// Reads the regular file `path` of identity `expected` (from a `stat`
/// just before). Opened non-blocking, so a FIFO swapped in after the
/// `stat` cannot block; checked again after opening and after reading.
///
/// # Errors
/// The open or read failed.
pub fn read_file(path: &Path, expected: Identity, max_bytes: u64) -> Result<Read, ReadError> {
    if expected.size > max_bytes {
        return Ok(Read::TooLarge(expected.size));
    }
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| ReadError::io(path, "opening", &e))?;
    let meta = file
        .metadata()
        .map_err(|e| ReadError::io(path, "fstat", &e))?;
    if !meta.is_file() {
        return Ok(Read::NotRegular(type_name(&meta)));
    }
    if Identity::of(&meta) != expected {
        return Ok(Read::Changing);
    }
    let mut bytes = Vec::with_capacity(usize::try_from(expected.size).unwrap_or(0));
    read_bounded(&mut file, max_bytes, &mut bytes)
        .map_err(|e| ReadError::io(path, "reading", &e))?;
    if bytes.len() as u64 > max_bytes {
        return Ok(Read::TooLarge(bytes.len() as u64));
    }
    let after = file
        .metadata()
        .map_err(|e| ReadError::io(path, "fstat", &e))?;
    if Identity::of(&after) != expected || bytes.len() as u64 != expected.size {
        return Ok(Read::Changing);
    }
    Ok(Read::Text(bytes, expected))
}

/// Reads at most `max + 1` bytes (one more tells the file is over `max`).
fn read_bounded(file: &mut File, max: u64, into: &mut Vec<u8>) -> io::Result<()> {
    file.take(max.saturating_add(1))
        .read_to_end(into)
        .map(|_| ())
}
