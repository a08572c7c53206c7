//! Starting a probe process inside the client namespace and test cgroup.
//!
//! The child joins the cgroup and the namespace between fork and exec, so
//! its very first socket call is already subject to kpr's hooks, and the
//! test process itself never changes cgroup or namespace.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cgroup::TestCgroup;
use super::error::{Result, TestbedError};
use super::netns::Netns;
use super::probe::{ProbeResult, ProbeSpec};

/// Poll interval while waiting for the probe to exit.
const WAIT_POLL: Duration = Duration::from_millis(2);
/// Most bytes kept from each of the probe's stdout and stderr.
const MAX_OUTPUT: u64 = 16 << 20;
/// Bound on collecting output after the probe has exited.
const READER_WAIT: Duration = Duration::from_secs(1);
/// Most stderr bytes quoted in an error.
const MAX_QUOTED: usize = 2000;

/// Runs `exe ARGS... <spec JSON>` in `netns` (and `cgroup`, if given) and
/// returns the [`ProbeResult`] it prints on stdout.
///
/// kpr passes its own executable and `["probe", "--spec"]`. The probe is
/// killed (by its pid) if it has not exited within `timeout`; its stderr is
/// quoted in every error.
pub fn run_probe(
    exe: &Path,
    args: &[&str],
    netns: &Netns,
    cgroup: Option<&TestCgroup>,
    spec: &ProbeSpec,
    timeout: Duration,
) -> Result<ProbeResult> {
    spec.validate()?;
    let spec_json = serde_json::to_string(spec)
        .map_err(|e| TestbedError::InvalidSpec(format!("serializing: {e}")))?;
    let probe_err = |why: String, stderr: &str| TestbedError::Probe {
        exe: exe.to_path_buf(),
        why,
        stderr: quote(stderr),
    };

    let mut cmd = Command::new(exe);
    cmd.args(args)
        .arg(&spec_json)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let placement = Placement::open(netns, cgroup)?;
    placement.install(&mut cmd);
    let child = cmd
        .spawn()
        .map_err(|e| TestbedError::io(format!("start probe {}", exe.display()), e))?;
    drop(placement);

    let mut child = KillOnDrop(Some(child));
    let (stdout, stderr) = child.take_outputs();
    let waited = child.wait_bounded(timeout);
    let stdout = collect(stdout);
    let stderr = collect(stderr);
    let status = match waited {
        Ok(Some(status)) => status,
        Ok(None) => {
            return Err(probe_err(
                format!("killed after {} ms timeout", timeout.as_millis()),
                &stderr,
            ))
        }
        Err(e) => return Err(probe_err(format!("waiting: {e}"), &stderr)),
    };
    if !status.success() {
        return Err(probe_err(format!("exited with {status}"), &stderr));
    }
    let result: ProbeResult = serde_json::from_str(stdout.trim()).map_err(|e| {
        probe_err(
            format!("stdout is not a probe result ({e}): {}", quote(&stdout)),
            &stderr,
        )
    })?;
    if result.op() != spec.op() {
        return Err(probe_err(
            format!("asked for {} but got {}", spec.op(), result.op()),
            &stderr,
        ));
    }
    Ok(result)
}

/// File descriptors the child needs between fork and exec, opened before
/// the fork so the child only makes async-signal-safe system calls.
struct Placement {
    netns: OwnedFd,
    cgroup_procs: Option<OwnedFd>,
}

impl Placement {
    fn open(netns: &Netns, cgroup: Option<&TestCgroup>) -> Result<Placement> {
        let cgroup_procs = cgroup
            .map(|cg| {
                let path = cg.procs_path();
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map(OwnedFd::from)
                    .map_err(|e| TestbedError::io(format!("open {}", path.display()), e))
            })
            .transpose()?;
        Ok(Placement {
            netns: netns.open()?,
            cgroup_procs,
        })
    }

    /// Registers the pre-exec step. The descriptors are close-on-exec, so
    /// the probe does not inherit them; they must outlive `spawn`.
    fn install(&self, cmd: &mut Command) {
        let netns_fd = self.netns.as_raw_fd();
        let procs_fd = self.cgroup_procs.as_ref().map(|fd| fd.as_raw_fd());
        crate::sys::enter_before_exec(cmd, procs_fd, netns_fd);
    }
}

/// The probe child; killed by its pid and reaped if still running when
/// dropped (timeout, or a panic in the caller).
struct KillOnDrop(Option<Child>);

type Reader = Option<JoinHandle<String>>;

impl KillOnDrop {
    /// Starts one reader thread per pipe so a chatty probe cannot block.
    fn take_outputs(&mut self) -> (Reader, Reader) {
        let Some(child) = self.0.as_mut() else {
            return (None, None);
        };
        (
            child.stdout.take().map(spawn_reader),
            child.stderr.take().map(spawn_reader),
        )
    }

    /// Waits at most `timeout`; `Ok(None)` means it was killed.
    fn wait_bounded(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        let Some(child) = self.0.as_mut() else {
            return Ok(None);
        };
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                self.0 = None;
                return Ok(Some(status));
            }
            if start.elapsed() >= timeout {
                self.kill();
                return Ok(None);
            }
            std::thread::sleep(WAIT_POLL);
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            // Child::kill signals exactly this pid (SIGKILL); then reap it.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_reader(pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.take(MAX_OUTPUT).read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Joins a reader, waiting at most [`READER_WAIT`]. The probe has exited
/// (or was killed and reaped) by now, so the reader normally finishes at
/// once; only a grandchild still holding the pipe could keep it open, and
/// then the reader is left behind rather than blocking the caller.
fn collect(reader: Reader) -> String {
    let Some(reader) = reader else {
        return String::new();
    };
    let start = Instant::now();
    while !reader.is_finished() {
        if start.elapsed() >= READER_WAIT {
            return String::from("<output not closed: a child of the probe still holds it>");
        }
        std::thread::sleep(WAIT_POLL);
    }
    reader.join().unwrap_or_default()
}

fn quote(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(MAX_QUOTED) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_stderr_is_cut_when_quoted() {
        assert_eq!(quote("  short \n"), "short");
        let long = "x".repeat(MAX_QUOTED + 10);
        assert_eq!(quote(&long).len(), MAX_QUOTED + 3);
    }
}
