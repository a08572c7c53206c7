//! The north-south conntrack map as the control plane sees it: listing
//! (`kpr ct list`, tests) and garbage collection of expired entries (the
//! datapath's counters are read by `counters`).
//!
//! Both entries of a flow share one expiry (lb_ct.h refreshes them
//! together), so a GC pass that removes expired entries removes flows as
//! pairs; a DSR flow on the node that encapsulates it has a single entry.
//! Times are CLOCK_MONOTONIC nanoseconds, bpf_ktime_get_ns()'s clock.

#![deny(unsafe_code)]

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use serde::Serialize;

pub use crate::datapath::counters::NodePortStats;
use crate::datapath::layout::{self, CtDir, CtRecord};
use crate::datapath::pins::{pin_path, MapName};
use crate::datapath::skel::nodeport::types::{ct_entry, ct_key};
use crate::datapath::sys::{as_bytes, from_bytes, to_io};

/// The pinned conntrack map.
pub struct CtMap {
    map: MapHandle,
}

/// What one GC pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Entries looked at.
    pub scanned: usize,
    /// Expired entries removed.
    pub deleted: usize,
    /// Entries left.
    pub alive: usize,
}

/// CLOCK_MONOTONIC now, in ns: the clock of the entries' timestamps.
pub fn monotonic_ns() -> u64 {
    // CLOCK_MONOTONIC cannot fail on Linux; 0 would only make GC wait.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|ts| (ts.tv_sec() as u64) * 1_000_000_000 + ts.tv_nsec() as u64)
        .unwrap_or(0)
}

impl CtMap {
    /// Opens the conntrack map pinned under `bpf_root`.
    pub fn open(bpf_root: &Path) -> Result<CtMap> {
        let pin = pin_path(bpf_root, MapName::Conntrack);
        let map = MapHandle::from_pinned_path(&pin).with_context(|| {
            format!(
                "no conntrack map at {} (is an agent running with --devices?)",
                pin.display()
            )
        })?;
        Ok(CtMap { map })
    }

    pub fn max_entries(&self) -> usize {
        self.map.max_entries() as usize
    }

    fn raw_entries(&self) -> Result<Vec<(ct_key, ct_entry)>> {
        let mut out = Vec::new();
        for key in self.map.keys() {
            let value = self
                .map
                .lookup(&key, MapFlags::ANY)
                .map_err(to_io)
                .context("reading the conntrack map")?;
            // An entry evicted or deleted during the walk is skipped.
            if let (Some(k), Some(v)) = (
                from_bytes::<ct_key>(&key),
                value.as_deref().and_then(from_bytes::<ct_entry>),
            ) {
                out.push((k, v));
            }
        }
        Ok(out)
    }

    /// Every entry, sorted (flows' two entries are listed apart, by tuple).
    pub fn entries(&self) -> Result<Vec<CtRecord>> {
        let mut out: Vec<CtRecord> = self
            .raw_entries()?
            .iter()
            .filter_map(|(k, v)| layout::decode_ct(k, v))
            .collect();
        out.sort_by_key(|e| (e.dir, e.src, e.dst));
        Ok(out)
    }

    /// Removes the entries expired at `now_ns`.
    pub fn gc(&self, now_ns: u64) -> Result<GcReport> {
        let entries = self.raw_entries()?;
        let mut report = GcReport {
            scanned: entries.len(),
            ..GcReport::default()
        };
        for (key, val) in &entries {
            if val.expires_ns >= now_ns {
                report.alive += 1;
                continue;
            }
            match self.map.delete(as_bytes(key)) {
                Ok(()) => report.deleted += 1,
                // Gone meanwhile (LRU eviction, the datapath replaced it).
                Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => {}
                Err(e) => return Err(to_io(e)).context("deleting an expired conntrack entry"),
            }
        }
        Ok(report)
    }
}

/// `kpr ct list` as a table, in the spirit of `cilium bpf ct list global`.
/// A DSR flow's entry on the node that encapsulates it shows the outer
/// header (`ipip SOURCE -> BACKEND`) where others show their rewrite.
pub fn format_table(entries: &[CtRecord], now_ns: u64) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<5} {:<5} {:<47} {:<47} {:<22} {:>9}",
        "PROTO", "DIR", "TUPLE", "REWRITTEN TO", "FLAGS", "EXPIRES"
    );
    for e in entries {
        let mut flags = Vec::new();
        if e.snat {
            flags.push("snat");
        }
        if e.established {
            flags.push("established");
        }
        if e.closing {
            flags.push("closing");
        }
        if e.dsr_encap {
            flags.push("dsr-encap");
        }
        if e.dsr_decap {
            flags.push("dsr-decap");
        }
        let expires = if e.expires_ns >= now_ns {
            format!("{}s", (e.expires_ns - now_ns) / 1_000_000_000)
        } else {
            "expired".into()
        };
        let _ = writeln!(
            o,
            "{:<5} {:<5} {:<47} {:<47} {:<22} {:>9}",
            e.proto.as_str(),
            match e.dir {
                CtDir::Orig => "orig",
                CtDir::Reply => "reply",
            },
            format!("{} -> {}", e.src, e.dst),
            if e.dsr_encap {
                // Not rewritten: sent inside IPIP toward the backend.
                format!("ipip {} -> {}", e.nat_src.ip(), e.nat_dst)
            } else {
                format!("{} -> {}", e.nat_src, e.nat_dst)
            },
            if flags.is_empty() {
                "-".into()
            } else {
                flags.join(",")
            },
            expires
        );
    }
    o
}
