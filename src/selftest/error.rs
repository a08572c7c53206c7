//! The test bed's error type: every failure names the step and keeps the
//! evidence (command line, stderr, errno) needed to debug a broken setup.

use std::io;
use std::path::PathBuf;

/// Result alias for the test bed.
pub type Result<T, E = TestbedError> = std::result::Result<T, E>;

/// Why a test bed step failed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// A helper command (`ip`, `nsenter`) exited non-zero.
    #[error("testbed: `{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line, joined by spaces.
        cmd: String,
        /// Exit status as printed by std.
        status: String,
        /// The command's stderr, trimmed.
        stderr: String,
    },
    /// The kpr agent under test failed to start, got unhealthy or answered oddly.
    #[error("testbed: {0}")]
    Agent(String),
    /// A system call or file operation failed.
    #[error("testbed: {what}: {source}")]
    Io {
        /// What was being done, e.g. "open /run/netns/stc12".
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A caller-given name or prefix is not acceptable.
    #[error("testbed: invalid name {name:?}: {why}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// The rule it breaks.
        why: &'static str,
    },
    /// No cgroup2 file system is mounted.
    #[error("testbed: no cgroup2 mount found in /proc/self/mountinfo")]
    NoCgroup2,
    /// A bounded wait ran out.
    #[error("testbed: {what} did not happen within {waited_ms} ms")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long was waited.
        waited_ms: u64,
    },
    /// A thread running in a namespace panicked.
    #[error("testbed: thread in netns {netns} panicked: {message}")]
    ThreadPanicked {
        /// The namespace name.
        netns: String,
        /// The panic message, when it was a string.
        message: String,
    },
    /// A probe spec is out of its bounds.
    #[error("testbed: invalid probe spec: {0}")]
    InvalidSpec(String),
    /// The probe process failed or printed something that is not a result.
    #[error("testbed: probe {exe}: {why}; stderr: {stderr}")]
    Probe {
        /// The executable that was run.
        exe: PathBuf,
        /// What went wrong.
        why: String,
        /// The probe's stderr, trimmed.
        stderr: String,
    },
    /// A topology address helper was asked for an index out of its range.
    #[error("testbed: backend index {0} is outside 1..=200")]
    BackendIndex(u16),
}

impl TestbedError {
    /// Wraps an `io::Error` with what was being done.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        TestbedError::Io {
            what: what.into(),
            source,
        }
    }
}
