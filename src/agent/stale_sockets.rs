//! Connected UDP sockets to backends a sync removed are destroyed right
//! after that sync (see [`crate::datapath::sock_destroy`]), so their
//! applications see an error at once and reconnect to a live backend.
//! Failing to is logged, never fatal: the sockets then stay as they were.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use crate::datapath::sock_destroy::SockDestroyer;
use crate::model::{L4Addr, Protocol};

/// The destroyer and whether it failed before (warned once, then quiet).
pub(super) struct StaleUdpSockets {
    destroyer: SockDestroyer,
    failed_before: bool,
}

impl StaleUdpSockets {
    /// For the socket hooks pinned under `bpf_root` on `cgroup`.
    pub(super) fn new(bpf_root: &Path, cgroup: &Path) -> StaleUdpSockets {
        StaleUdpSockets {
            destroyer: SockDestroyer::new(bpf_root, cgroup),
            failed_before: false,
        }
    }

    /// Destroys the connected UDP sockets to the UDP ones of `removed`.
    pub(super) fn backends_removed(&mut self, removed: &[L4Addr]) {
        let udp: Vec<SocketAddr> = removed
            .iter()
            .filter(|b| b.proto == Protocol::Udp)
            .map(|b| SocketAddr::new(b.ip, b.port))
            .collect();
        if udp.is_empty() {
            return;
        }
        let started = Instant::now();
        match self.destroyer.destroy(&udp) {
            Ok(r) => tracing::info!(
                backends = udp.len(),
                namespaces = r.namespaces,
                destroyed = r.destroyed,
                elapsed_us = started.elapsed().as_micros() as u64,
                "connected UDP sockets to removed backends destroyed"
            ),
            Err(e) if !self.failed_before => {
                self.failed_before = true;
                tracing::warn!(error = %format!("{e:#}"), "connected UDP sockets to removed backends are left open (they reach no backend until the application reconnects)");
            }
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "destroying UDP sockets"),
        }
    }
}
