//! The north-south conntrack map as the control plane sees it: listing
//! (`kpr ct list`, tests), garbage collection of expired entries, and the
//! datapath's counters.
//!
//! Both entries of a flow share one expiry (lb_ct.h refreshes them
//! together), so a GC pass that removes expired entries removes flows as
//! pairs; a DSR flow on the node that encapsulates it has a single entry.
//! Times are CLOCK_MONOTONIC nanoseconds, bpf_ktime_get_ns()'s clock.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use serde::Serialize;

use crate::datapath::kernel::to_io;
use crate::datapath::layout::{self, as_bytes, from_bytes, CtDir, CtRecord};
use crate::datapath::nodeport::{CT_PIN, STATS_PIN};
use crate::datapath::skel::nodeport::types::{ct_entry, ct_key};
use crate::datapath::skel::sock_lb::types::np_stat;

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
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

impl CtMap {
    /// Opens the conntrack map pinned under `bpf_root`.
    pub fn open(bpf_root: &Path) -> Result<CtMap> {
        let pin = bpf_root.join(CT_PIN);
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

/// The north-south datapath's counters (enum np_stat), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodePortStats {
    pub flows_new: u64,
    pub flows_snat: u64,
    pub packets_fwd: u64,
    pub packets_reply: u64,
    pub drop_no_backend: u64,
    pub drop_snat_exhausted: u64,
    pub drop_fib: u64,
    pub drop_ct: u64,
    pub drop_ttl: u64,
    /// Packets XDP translated and redirected itself (the rest of
    /// `packets_fwd` and `packets_reply` went through tc).
    pub xdp_fwd: u64,
    /// New flows to a frontend without backend answered with ICMP port
    /// unreachable (--service-no-backend-response reject).
    pub reject_no_backend: u64,
    /// New flows dropped: source outside loadBalancerSourceRanges.
    pub drop_source_range: u64,
    /// Flows created with DSR (remote backend, IPIP to its node).
    pub flows_dsr: u64,
    /// Packets other nodes encapsulated for DSR, delivered to a local backend.
    pub dsr_decap: u64,
    /// IPIP packets for no local backend of a frontend (left alone).
    pub dsr_miss: u64,
    /// Dropped: too big to encapsulate (ICMP fragmentation-needed sent).
    pub drop_dsr_too_big: u64,
    /// DSR SYN-ACKs whose TCP MSS was lowered.
    pub mss_clamped: u64,
    /// Flows to a local backend given another client source port (the
    /// reply tuple was another frontend's live flow's).
    pub port_remapped: u64,
    /// Packets to a local backend handed straight into its pod's
    /// namespace (bpf_redirect_peer through a pod device).
    pub peer_redirects: u64,
    /// ICMP errors about translated flows, translated and sent on.
    pub icmp_errors: u64,
    /// Later IP fragments given their datagram's ports.
    pub fragments_followed: u64,
    /// Later IP fragments of a datagram not known (first fragment not
    /// seen, or its flow never opened).
    pub fragments_unknown: u64,
}

impl NodePortStats {
    /// Reads the counters pinned under `bpf_root`.
    pub fn read(bpf_root: &Path) -> Result<NodePortStats> {
        let pin = bpf_root.join(STATS_PIN);
        let map = MapHandle::from_pinned_path(&pin)
            .with_context(|| format!("opening {}", pin.display()))?;
        // Indexes from the BTF of enum np_stat, not copied by hand.
        let mut v = [0u64; np_stat::NP_STAT_MAX.0 as usize];
        for (i, slot) in v.iter_mut().enumerate() {
            let per_cpu = map
                .lookup_percpu(&(i as u32).to_ne_bytes(), MapFlags::ANY)
                .map_err(to_io)
                .context("reading the north-south counters")?
                .unwrap_or_default();
            *slot = per_cpu
                .iter()
                .filter_map(|b| b.get(..8)?.try_into().ok().map(u64::from_ne_bytes))
                .sum();
        }
        let at = |s: np_stat| v[s.0 as usize];
        Ok(NodePortStats {
            flows_new: at(np_stat::NP_STAT_FLOW_NEW),
            flows_snat: at(np_stat::NP_STAT_FLOW_SNAT),
            packets_fwd: at(np_stat::NP_STAT_FWD),
            packets_reply: at(np_stat::NP_STAT_REPLY),
            drop_no_backend: at(np_stat::NP_STAT_NO_BACKEND),
            drop_snat_exhausted: at(np_stat::NP_STAT_SNAT_EXHAUSTED),
            drop_fib: at(np_stat::NP_STAT_FIB_FAIL),
            drop_ct: at(np_stat::NP_STAT_CT_FAIL),
            drop_ttl: at(np_stat::NP_STAT_TTL),
            xdp_fwd: at(np_stat::NP_STAT_XDP_FWD),
            reject_no_backend: at(np_stat::NP_STAT_NO_BACKEND_REJECT),
            drop_source_range: at(np_stat::NP_STAT_SRC_RANGE),
            flows_dsr: at(np_stat::NP_STAT_FLOW_DSR),
            dsr_decap: at(np_stat::NP_STAT_DSR_DECAP),
            dsr_miss: at(np_stat::NP_STAT_DSR_MISS),
            drop_dsr_too_big: at(np_stat::NP_STAT_DSR_TOO_BIG),
            mss_clamped: at(np_stat::NP_STAT_MSS_CLAMP),
            port_remapped: at(np_stat::NP_STAT_PORT_REMAP),
            peer_redirects: at(np_stat::NP_STAT_PEER_REDIRECT),
            icmp_errors: at(np_stat::NP_STAT_ICMP_ERROR),
            fragments_followed: at(np_stat::NP_STAT_FRAG_FOLLOWED),
            fragments_unknown: at(np_stat::NP_STAT_FRAG_UNKNOWN),
        })
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
