//! The process-level system calls Rust cannot check for us: signal
//! dispositions and what a child does between fork and exec. With
//! `datapath::sys` (the BPF and netlink FFI) this is one of the two modules
//! where `unsafe` is allowed; the crate denies it everywhere else, so every
//! obligation a caller could break is stated here, next to the call.

#![allow(unsafe_code)]

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::signal::{signal, SigHandler, Signal};

/// Ignores `sig` for the rest of the process's life (SIG_IGN).
pub fn ignore_signal(sig: Signal) -> nix::Result<()> {
    // SAFETY: SIG_IGN runs no handler code, so no async-signal-safety
    // obligation arises.
    unsafe { signal(sig, SigHandler::SigIgn) }.map(drop)
}

/// Runs `handler` on each of `sigs`. The handler must be async-signal-safe:
/// taking a plain `extern "C" fn(c_int)` keeps it to the kind of function
/// that can (callers only store to atomics).
pub fn on_signals(sigs: &[Signal], handler: extern "C" fn(libc::c_int)) -> nix::Result<()> {
    for &sig in sigs {
        // SAFETY: the handler is a plain function; its body is the caller's
        // promise of async-signal-safety stated above.
        unsafe { signal(sig, SigHandler::Handler(handler)) }?;
    }
    Ok(())
}

/// Makes the child of `cmd` join a cgroup (by writing its pid to the
/// `cgroup.procs` descriptor `procs_fd`, if any) and then the network
/// namespace `netns_fd`, between fork and exec: nothing runs outside them
/// after exec. Both descriptors must stay open until `spawn` returns.
pub fn enter_before_exec(cmd: &mut Command, procs_fd: Option<RawFd>, netns_fd: RawFd) {
    // SAFETY: the closure runs in the forked child before exec and only
    // calls getpid(2), write(2) and setns(2) on descriptors opened by the
    // parent, formatting into a stack buffer: no allocation, no locks.
    unsafe {
        cmd.pre_exec(move || enter_in_child(procs_fd, netns_fd));
    }
}

/// The child's side of [`enter_before_exec`]: the cgroup first (so nothing
/// runs outside it after exec), then the network namespace.
fn enter_in_child(procs_fd: Option<RawFd>, netns_fd: RawFd) -> std::io::Result<()> {
    if let Some(fd) = procs_fd {
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        let mut buf = [0u8; 24];
        let len = format_pid(pid, &mut buf);
        // SAFETY: buf is valid for len bytes; fd was opened by the parent.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), len) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: netns_fd is an open namespace file from the parent.
    if unsafe { libc::setns(netns_fd, libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `pid` and a newline into `buf` without allocating; returns the
/// length. Non-positive pids are written as "0" (the caller itself).
fn format_pid(pid: libc::pid_t, buf: &mut [u8; 24]) -> usize {
    let mut digits = [0u8; 20];
    let mut n = 0;
    let mut v = if pid > 0 { pid as u32 } else { 0 };
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..n {
        buf[i] = digits[n - 1 - i];
    }
    buf[n] = b'\n';
    n + 1
}

/// Caps glibc malloc's arenas at `max` (`M_ARENA_MAX`). By default each
/// thread that allocates while another holds an arena may get its own
/// (up to 8 per CPU), and memory freed in one arena is never reused by
/// another: with the runtime's and the blocking pool's threads that kept
/// tens of MiB of freed memory resident. Returns whether glibc took it
/// (other allocators ignore it).
pub fn limit_malloc_arenas(max: i32) -> bool {
    // SAFETY: mallopt only sets an allocator parameter; it is called
    // before the runtime starts its threads.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, max) == 1 }
}

/// Serves every allocation of `bytes` or more from its own mapping
/// (`M_MMAP_THRESHOLD`), returned to the kernel when freed. glibc's
/// default starts at 128 KiB but rises to the size of each large block
/// freed (up to 32 MiB): after the first sync freed its batch buffers,
/// the next large transient buffers (plans, batch writes, file contents)
/// came from the heap, where the long-lived objects allocated around them
/// kept the pages resident. Setting it fixes it. Returns whether glibc
/// took it.
pub fn mmap_large_allocations(bytes: i32) -> bool {
    // SAFETY: mallopt only sets an allocator parameter; it is called
    // before the runtime starts its threads.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) == 1 }
}

/// Returns the allocator's free memory to the kernel (`malloc_trim(0)`),
/// after a full sync freed its translation and plan: resident memory then
/// follows what the agent keeps, not the sync's peak.
pub fn release_free_memory() {
    // SAFETY: malloc_trim has no preconditions and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn formatted(pid: libc::pid_t) -> String {
        let mut buf = [0u8; 24];
        let len = format_pid(pid, &mut buf);
        String::from_utf8(buf[..len].to_vec()).unwrap()
    }

    #[test]
    fn pids_format_without_allocation_as_decimal_lines() {
        assert_eq!(formatted(1), "1\n");
        assert_eq!(formatted(0), "0\n");
        assert_eq!(formatted(4194304), "4194304\n");
        assert_eq!(
            formatted(libc::pid_t::MAX),
            format!("{}\n", libc::pid_t::MAX)
        );
        assert_eq!(formatted(-5), "0\n");
    }
}
