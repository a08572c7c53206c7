//! Closing connected UDP sockets whose backend was removed
//! (`bpf/sock_destroy.bpf.c`): after a sync deleted UDP backends, the agent
//! runs a UDP socket iterator in each network namespace that a process of
//! its cgroup lives in, and the iterator destroys the sockets connected to
//! one of those backends through a Service (`bpf_sock_destroy`, kernel ≥
//! 6.5). A connected UDP socket was translated once, at `connect()`: left
//! alone it would keep sending to a backend that is gone until the
//! application gives up; destroyed, its next `recv()` fails with
//! ECONNABORTED, its next `send()` with EDESTADDRREQ, and a new socket
//! reaches a live backend.
//!
//! On an older kernel the object does not load (no `bpf_sock_destroy`):
//! [`SockDestroyer::destroy`] says so once and the sockets stay as they
//! were, as with kube-proxy, whose conntrack cleanup only helps
//! unconnected flows: an application notices by its own timeouts.
//!
//! The object is loaded for each run, not kept: runs are rare (a backend
//! removal), a load is a millisecond, and a fresh load always shares the
//! socket reverse-translation map pinned now, whatever a map growth did.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Iter, Link, MapCore, MapFlags, MapHandle};

use crate::datapath::pins::{pin_path, MapName};
use crate::datapath::skel::sock_destroy::SockDestroySkelBuilder;

/// Removed backends one iterator run looks for (the filter map's size);
/// more are handled in several runs.
pub const FILTER_CAPACITY: usize = 1024;
/// Bounds of the walk of the cgroup tree for its processes' namespaces.
const MAX_CGROUPS: usize = 100_000;

/// Size of `struct lb_sock_destroy_key`: address, port, padding.
pub const FILTER_KEY_SIZE: usize = 20;

/// What one [`SockDestroyer::destroy`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestroyReport {
    /// Network namespaces whose UDP sockets were looked at.
    pub namespaces: usize,
    /// Sockets destroyed.
    pub destroyed: u64,
}

/// Destroys connected UDP sockets to removed backends; see the module
/// documentation.
#[derive(Debug)]
pub struct SockDestroyer {
    bpf_root: PathBuf,
    cgroup: PathBuf,
}

impl SockDestroyer {
    /// For the socket hooks whose maps are pinned under `bpf_root` and
    /// attached to `cgroup` (the agent's `--cgroup`).
    pub fn new(bpf_root: &Path, cgroup: &Path) -> SockDestroyer {
        SockDestroyer {
            bpf_root: bpf_root.to_path_buf(),
            cgroup: cgroup.to_path_buf(),
        }
    }

    /// Destroys the connected UDP sockets of the cgroup's network
    /// namespaces that reached one of `backends` through a Service.
    ///
    /// # Errors
    /// The iterator does not load (kernel < 6.5: no `bpf_sock_destroy`),
    /// the pinned reverse-translation map cannot be opened, or a run failed.
    pub fn destroy(&self, backends: &[SocketAddr]) -> Result<DestroyReport> {
        let mut report = DestroyReport::default();
        if backends.is_empty() {
            return Ok(report);
        }
        let mut storage = MaybeUninit::uninit();
        let mut open = SockDestroySkelBuilder::default()
            .open(&mut storage)
            .context("opening the socket destroyer BPF object")?;
        let rnat_pin = pin_path(&self.bpf_root, MapName::SockRevNat);
        let rnat = MapHandle::from_pinned_path(&rnat_pin)
            .with_context(|| format!("opening {}", rnat_pin.display()))?;
        open.maps
            .kpr_sockrnat_v1
            .reuse_fd(rnat.as_fd())
            .context("sharing the socket reverse-translation map")?;
        let skel = open.load().context(
            "loading the UDP socket destroyer (needs bpf_sock_destroy, kernel 6.5 or later)",
        )?;
        let namespaces = cgroup_namespaces(&self.cgroup)?;
        report.namespaces = namespaces.len();
        let filter = &skel.maps.kpr_sock_destroy_filter;
        for chunk in backends.chunks(FILTER_CAPACITY) {
            let keys: Vec<[u8; FILTER_KEY_SIZE]> = chunk.iter().map(filter_key).collect();
            for key in &keys {
                filter
                    .update(key, &[1], MapFlags::ANY)
                    .context("writing the socket destroyer's filter")?;
            }
            let link = skel
                .progs
                .kpr_sock_destroy_udp
                .attach()
                .context("creating the UDP socket iterator")?;
            for ns in &namespaces {
                run_in_namespace(&link, ns)?;
            }
            for key in &keys {
                // Best effort: a key left over names a backend that is gone.
                let _ = filter.delete(key);
            }
        }
        report.destroyed = skel.maps.bss_data.as_ref().map_or(0, |b| b.destroyed);
        Ok(report)
    }
}

/// A removed backend as the filter map keys it: the address IPv4-mapped
/// for IPv4 (as the backends map holds it), the port, zero padding; all
/// in network byte order.
pub fn filter_key(backend: &SocketAddr) -> [u8; FILTER_KEY_SIZE] {
    let mut key = [0u8; FILTER_KEY_SIZE];
    let v6 = match backend.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    key[..16].copy_from_slice(&v6.octets());
    key[16..18].copy_from_slice(&backend.port().to_be_bytes());
    key
}

/// Reads the iterator to its end from inside the network namespace `ns`:
/// a UDP iterator walks the sockets of the namespace it is created in.
fn run_in_namespace(link: &Link, ns: &File) -> Result<()> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .context("entering a network namespace of the cgroup")?;
            let mut iter = Iter::new(link).context("starting the UDP socket iterator")?;
            io::copy(&mut iter, &mut io::sink()).context("running the UDP socket iterator")?;
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the socket iterator thread panicked")))
    })
}

/// The network namespaces of the processes in `cgroup` and below, the
/// agent's own first, each once.
fn cgroup_namespaces(cgroup: &Path) -> Result<Vec<File>> {
    let own = File::open("/proc/self/ns/net").context("opening the agent's network namespace")?;
    let mut seen = HashSet::new();
    seen.insert(ns_identity(&own)?);
    let mut out = vec![own];
    let mut dirs = vec![cgroup.to_path_buf()];
    let mut visited = 0;
    while let Some(dir) = dirs.pop() {
        visited += 1;
        if visited > MAX_CGROUPS {
            tracing::warn!(cgroup = %cgroup.display(), "more than {MAX_CGROUPS} cgroups: the rest are not searched for UDP sockets");
            break;
        }
        // Processes and cgroups come and go: what cannot be read is skipped.
        let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
            continue;
        };
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            let Ok(ns) = File::open(format!("/proc/{pid}/ns/net")) else {
                continue;
            };
            if ns_identity(&ns).is_ok_and(|id| seen.insert(id)) {
                out.push(ns);
            }
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    Ok(out)
}

fn ns_identity(ns: &File) -> Result<(u64, u64)> {
    let meta = ns
        .metadata()
        .context("reading a network namespace's identity")?;
    Ok((meta.dev(), meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::skel::sock_destroy::types::lb_sock_destroy_key;

    #[test]
    fn the_filter_key_is_the_bpf_struct_with_ipv4_mapped_and_network_order() {
        assert_eq!(size_of::<lb_sock_destroy_key>(), FILTER_KEY_SIZE);
        let v4 = filter_key(&"10.244.1.2:53".parse().expect("an address"));
        assert_eq!(
            v4,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 244, 1, 2, 0, 53, 0, 0]
        );
        let v6 = filter_key(&"[fd00::1]:5353".parse().expect("an address"));
        assert_eq!(&v6[..2], &[0xfd, 0]);
        assert_eq!(&v6[15..], &[1, 0x14, 0xe9, 0, 0]);
    }
}
