//! Named network namespaces that delete themselves.
//!
//! Configuration goes through `nsenter --net=/run/netns/NAME ip ...`, never
//! `ip netns exec`, which remounts /sys and hides bpffs and cgroup2 from the
//! command. Code runs inside a namespace on a thread that called setns(2):
//! `CLONE_NEWNET` affects only the calling thread, so the rest of the process
//! (and the host's root namespace) is untouched.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;

use nix::sched::{setns, CloneFlags};

use super::error::{Result, TestbedError};

/// Where `ip netns add` pins named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Longest namespace name accepted; names are also used in thread names
/// and log lines, so they are kept short.
pub const MAX_NETNS_NAME_LEN: usize = 32;

/// A named network namespace (`ip netns add`), deleted on Drop.
///
/// Its `lo` is up from the start so local servers work at once.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates the namespace `name` and brings its `lo` up.
    ///
    /// Fails if a namespace of that name exists already: names carry the
    /// caller's prefix and pid, so a clash means a leak worth seeing.
    pub fn create(name: &str) -> Result<Netns> {
        validate_name(name)?;
        run(Command::new("ip").args(["netns", "add", name]))?;
        // From here on Drop deletes it, also if bringing lo up fails.
        let ns = Netns {
            name: name.to_string(),
            path: Path::new(NETNS_RUN_DIR).join(name),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pinned namespace file, `/run/netns/NAME`; for `nsenter --net=`
    /// and for setns(2).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `ip ARGS...` inside the namespace; the error carries stderr.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        self.ip_output(args).map(drop)
    }

    /// Runs `ip ARGS...` inside the namespace and returns its stdout.
    pub fn ip_output(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path.display()))
            .arg("ip")
            .args(args);
        run(&mut cmd)
    }

    /// Opens the namespace file (close-on-exec) for setns(2).
    pub fn open(&self) -> Result<OwnedFd> {
        File::open(&self.path)
            .map(OwnedFd::from)
            .map_err(|e| TestbedError::io(format!("open {}", self.path.display()), e))
    }

    /// Writes a sysctl inside the namespace, e.g.
    /// `sysctl("net/ipv4/conf/all/rp_filter", "0")`.
    ///
    /// `/proc/sys/net` resolves against the opening thread's namespace, so
    /// the write happens on a thread that entered it.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        let value = value.to_string();
        self.enter_thread(move || std::fs::write(&path, value.as_bytes()).map_err(|e| (path, e)))?
            .map_err(|(path, e)| {
                TestbedError::io(
                    format!("write {} in netns {}", path.display(), self.name),
                    e,
                )
            })
    }

    /// Runs `f` on a new thread inside the namespace and waits for it.
    ///
    /// `f` may borrow from the caller (scoped thread). A panic in `f`
    /// becomes `TestbedError::ThreadPanicked` with its message.
    pub fn enter_thread<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let fd = self.open()?;
        let joined = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name(thread_name(&self.name))
                .spawn_scoped(s, move || -> Result<R> {
                    enter(&fd, &self.name)?;
                    Ok(f())
                })
                .map(|handle| handle.join())
        });
        match joined {
            Err(e) => Err(TestbedError::io("spawn namespace thread", e)),
            Ok(Err(payload)) => Err(panicked(&self.name, payload)),
            Ok(Ok(result)) => result,
        }
    }

    /// Starts `f` on a new thread inside the namespace and returns at once;
    /// for servers and other long-lived work. Join with [`NsThread::join`].
    ///
    /// Returns an error, without running `f`, if the thread cannot enter
    /// the namespace.
    pub fn spawn_thread<F, R>(&self, f: F) -> Result<NsThread<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let fd = self.open()?;
        let netns = self.name.clone();
        let (entered_tx, entered_rx) = std::sync::mpsc::sync_channel::<Result<()>>(1);
        let thread_netns = netns.clone();
        let handle = std::thread::Builder::new()
            .name(thread_name(&netns))
            .spawn(move || {
                let entered = enter(&fd, &thread_netns);
                drop(fd);
                let ok = entered.is_ok();
                // The receiver waits for this message; it cannot be gone.
                let _ = entered_tx.send(entered);
                ok.then(f)
            })
            .map_err(|e| TestbedError::io("spawn namespace thread", e))?;
        let thread = NsThread { handle, netns };
        // setns on a fresh thread is immediate; the channel only orders it.
        match entered_rx.recv() {
            Ok(Ok(())) => Ok(thread),
            Ok(Err(e)) => {
                let _ = thread.handle.join();
                Err(e)
            }
            Err(_) => Err(thread
                .join()
                .err()
                .unwrap_or_else(|| TestbedError::ThreadPanicked {
                    netns: self.name.clone(),
                    message: "thread ended before entering the namespace".into(),
                })),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            tracing::warn!(netns = %self.name, error = %e, "deleting test namespace failed");
        }
    }
}

/// A thread started by [`Netns::spawn_thread`], running inside a namespace.
#[derive(Debug)]
pub struct NsThread<R> {
    handle: JoinHandle<Option<R>>,
    netns: String,
}

impl<R> NsThread<R> {
    /// Waits for the thread; a panic becomes `TestbedError::ThreadPanicked`.
    pub fn join(self) -> Result<R> {
        match self.handle.join() {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(TestbedError::ThreadPanicked {
                netns: self.netns,
                message: "thread could not enter the namespace".into(),
            }),
            Err(payload) => Err(panicked(&self.netns, payload)),
        }
    }

    /// Whether the thread has finished (so `join` will not block).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// Moves the calling thread into the namespace behind `fd`.
fn enter(fd: &OwnedFd, netns: &str) -> Result<()> {
    setns(fd, CloneFlags::CLONE_NEWNET)
        .map_err(|e| TestbedError::io(format!("setns into netns {netns}"), e.into()))
}

fn thread_name(netns: &str) -> String {
    format!("ns-{netns}")
}

fn panicked(netns: &str, payload: Box<dyn std::any::Any + Send>) -> TestbedError {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into());
    TestbedError::ThreadPanicked {
        netns: netns.to_string(),
        message,
    }
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NETNS_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(TestbedError::InvalidName {
            name: name.to_string(),
            why: "a namespace name is 1 to 32 characters of [A-Za-z0-9_-]",
        })
    }
}

/// Runs a helper command to completion; non-zero exit is an error carrying
/// the command line and its stderr. Returns stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| TestbedError::io(format!("run `{line}`"), e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(TestbedError::Command {
            cmd: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_are_short_and_shell_safe() {
        assert!(validate_name("stc1234").is_ok());
        assert!(validate_name("st_b-1").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name(&"x".repeat(33)).is_err());
    }

    #[test]
    fn failing_commands_report_their_stderr() {
        let err = run(Command::new("sh").args(["-c", "echo boom >&2; exit 3"])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("boom"), "{text}");
        assert!(text.contains("sh -c"), "{text}");
    }
}
