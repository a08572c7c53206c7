//! The always-on load-balancing counters of bpf/include/lb_verdict.h
//! (`kpr_festats_v1` per frontend id, `kpr_bestats_v1` per backend id) and
//! the monitor's own counters (`kpr_monstats_v1`): their Rust names
//! ([`Verdict`], [`Direction`]) and reading them, summed over CPUs.

#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use serde::Serialize;

use crate::datapath::pins::{pin_path, MapName};
use crate::datapath::sys::to_io;

/// What a hook decided for a frontend (enum lb_verdict, in its order; a
/// test checks the values against the program's BTF).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Sent to a backend.
    Translated,
    /// Refused or dropped: no usable backend.
    NoBackend,
    /// Refused or dropped: outside loadBalancerSourceRanges.
    SourceRange,
    /// Refused or dropped: a Local traffic policy leaves no backend here.
    LocalPolicy,
    /// Refused or dropped: a ClusterIP port or protocol its Service lacks.
    InvalidPort,
    /// A node socket's bind to a NodePort/LB/externalIP was refused.
    BindRefused,
    /// A new north-south flow could not be opened.
    FlowFailed,
}

impl Verdict {
    /// Every verdict, in the order of enum lb_verdict.
    pub const ALL: [Verdict; 7] = [
        Verdict::Translated,
        Verdict::NoBackend,
        Verdict::SourceRange,
        Verdict::LocalPolicy,
        Verdict::InvalidPort,
        Verdict::BindRefused,
        Verdict::FlowFailed,
    ];

    /// The `verdict` label value (lb_verdict.h's label column).
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Translated => "translated",
            Verdict::NoBackend => "no_backend",
            Verdict::SourceRange => "source_range",
            Verdict::LocalPolicy => "local_policy",
            Verdict::InvalidPort => "invalid_port",
            Verdict::BindRefused => "bind_refused",
            Verdict::FlowFailed => "flow_failed",
        }
    }

    /// The verdict of enum lb_verdict value `v`.
    pub fn from_bpf(v: u8) -> Option<Verdict> {
        Verdict::ALL.get(usize::from(v)).copied()
    }
}

/// Direction of a north-south packet (enum lb_dir).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Client to backend.
    Original,
    /// Backend to client.
    Reply,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Original, Direction::Reply];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Original => "original",
            Direction::Reply => "reply",
        }
    }
}

/// Slots per hook family in struct lb_fe_stats (LB_VERDICT_SLOTS).
const VERDICT_SLOTS: usize = 8;
/// struct lb_fe_stats: sock[8], np[8], packets[2], bytes[2], all u64.
const FE_WORDS: usize = 2 * VERDICT_SLOTS + 4;
/// struct lb_be_stats: packets[2], bytes[2].
const BE_WORDS: usize = 4;

/// One frontend's counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FrontendStats {
    /// Socket-hook decisions by [`Verdict`] index.
    pub sock: [u64; VERDICT_SLOTS],
    /// North-south new-flow decisions by [`Verdict`] index.
    pub nodeport: [u64; VERDICT_SLOTS],
    /// North-south packets forwarded by [`Direction`] index.
    pub packets: [u64; 2],
    /// Their bytes.
    pub bytes: [u64; 2],
}

impl FrontendStats {
    fn from_words(w: &[u64; FE_WORDS]) -> FrontendStats {
        let mut s = FrontendStats::default();
        s.sock.copy_from_slice(&w[..VERDICT_SLOTS]);
        s.nodeport
            .copy_from_slice(&w[VERDICT_SLOTS..2 * VERDICT_SLOTS]);
        s.packets.copy_from_slice(&w[16..18]);
        s.bytes.copy_from_slice(&w[18..20]);
        s
    }

    /// Socket-hook decisions of `verdict`.
    pub fn sock(&self, verdict: Verdict) -> u64 {
        self.sock[verdict as usize]
    }

    /// North-south new-flow decisions of `verdict`.
    pub fn nodeport(&self, verdict: Verdict) -> u64 {
        self.nodeport[verdict as usize]
    }
}

/// One backend's north-south counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BackendStats {
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
}

/// Every entry of a pinned per-CPU hash of u32 ids to u64 words, summed
/// over CPUs; empty when the map is not pinned (no agent ever ran).
fn read_percpu<const N: usize>(bpf_root: &Path, map: MapName) -> Result<BTreeMap<u32, [u64; N]>> {
    let pin = pin_path(bpf_root, map);
    let mut out = BTreeMap::new();
    if !pin.exists() {
        return Ok(out);
    }
    let handle =
        MapHandle::from_pinned_path(&pin).with_context(|| format!("opening {}", pin.display()))?;
    for key in handle.keys() {
        let Some(id) = key
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
        else {
            continue;
        };
        let Some(per_cpu) = handle
            .lookup_percpu(&key, MapFlags::ANY)
            .map_err(to_io)
            .with_context(|| format!("reading {map}"))?
        else {
            continue; // deleted meanwhile
        };
        out.insert(id, sum_words::<N>(&per_cpu));
    }
    Ok(out)
}

/// The per-CPU values (`N` u64 words each) added up word by word.
fn sum_words<const N: usize>(per_cpu: &[Vec<u8>]) -> [u64; N] {
    let mut sum = [0u64; N];
    for value in per_cpu {
        for (i, chunk) in value.chunks_exact(8).take(N).enumerate() {
            let word = chunk.try_into().map(u64::from_ne_bytes).unwrap_or(0);
            sum[i] = sum[i].wrapping_add(word);
        }
    }
    sum
}

/// Every frontend's counters by frontend id (0: no frontend — invalid
/// ports, DSR flows of another node's frontend).
pub fn read_frontends(bpf_root: &Path) -> Result<BTreeMap<u32, FrontendStats>> {
    Ok(read_percpu::<FE_WORDS>(bpf_root, MapName::FrontendStats)?
        .into_iter()
        .map(|(id, w)| (id, FrontendStats::from_words(&w)))
        .collect())
}

/// Every backend's counters by backend id.
pub fn read_backends(bpf_root: &Path) -> Result<BTreeMap<u32, BackendStats>> {
    Ok(read_percpu::<BE_WORDS>(bpf_root, MapName::BackendStats)?
        .into_iter()
        .map(|(id, w)| {
            let s = BackendStats {
                packets: [w[0], w[1]],
                bytes: [w[2], w[3]],
            };
            (id, s)
        })
        .collect())
}

/// The monitor's counters (enum lb_monitor_stat), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MonitorStats {
    /// Written to the ring buffer.
    pub emitted: u64,
    /// Left out by sampling.
    pub sampled_out: u64,
    /// Left out by the rate limit.
    pub rate_limited: u64,
    /// Lost: the ring buffer was full.
    #[serde(rename = "lost")]
    pub ringbuf_full: u64,
}

impl MonitorStats {
    /// Reads `kpr_monstats_v1`; zeros when it is not pinned.
    pub fn read(bpf_root: &Path) -> Result<MonitorStats> {
        let pin = pin_path(bpf_root, MapName::MonitorStats);
        if !pin.exists() {
            return Ok(MonitorStats::default());
        }
        let map = MapHandle::from_pinned_path(&pin)
            .with_context(|| format!("opening {}", pin.display()))?;
        let mut v = [0u64; 4];
        for (i, slot) in v.iter_mut().enumerate() {
            let per_cpu = map
                .lookup_percpu(&(i as u32).to_ne_bytes(), MapFlags::ANY)
                .map_err(to_io)
                .context("reading the monitor's counters")?
                .unwrap_or_default();
            *slot = sum_words::<1>(&per_cpu)[0];
        }
        Ok(MonitorStats {
            emitted: v[0],
            sampled_out: v[1],
            rate_limited: v[2],
            ringbuf_full: v[3],
        })
    }

    /// What happened since `before` (counters only grow).
    pub fn since(&self, before: &MonitorStats) -> MonitorStats {
        MonitorStats {
            emitted: self.emitted.saturating_sub(before.emitted),
            sampled_out: self.sampled_out.saturating_sub(before.sampled_out),
            rate_limited: self.rate_limited.saturating_sub(before.rate_limited),
            ringbuf_full: self.ringbuf_full.saturating_sub(before.ringbuf_full),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::skel::sock_lb::types::{
        lb_be_stats, lb_fe_stats, lb_monitor_stat, lb_verdict,
    };

    #[test]
    fn verdicts_have_the_bpf_enums_values() {
        let bpf = [
            lb_verdict::LB_V_TRANSLATED,
            lb_verdict::LB_V_NO_BACKEND,
            lb_verdict::LB_V_SOURCE_RANGE,
            lb_verdict::LB_V_LOCAL_POLICY,
            lb_verdict::LB_V_INVALID_PORT,
            lb_verdict::LB_V_BIND_REFUSED,
            lb_verdict::LB_V_FLOW_FAILED,
        ];
        assert_eq!(Verdict::ALL.len(), lb_verdict::LB_VERDICT_MAX.0 as usize);
        for (v, b) in Verdict::ALL.iter().zip(bpf) {
            assert_eq!(*v as u32, b.0, "{v:?}");
            assert_eq!(Verdict::from_bpf(b.0 as u8), Some(*v));
        }
        assert_eq!(lb_monitor_stat::LB_MON_RINGBUF_FULL.0, 3);
    }

    #[test]
    fn the_stats_structs_are_the_words_read_here() {
        assert_eq!(std::mem::size_of::<lb_fe_stats>(), FE_WORDS * 8);
        assert_eq!(std::mem::size_of::<lb_be_stats>(), BE_WORDS * 8);
        let fe = lb_fe_stats::default();
        assert_eq!(fe.sock.len(), VERDICT_SLOTS);
        assert_eq!(fe.np.len(), VERDICT_SLOTS);
    }

    #[test]
    fn per_cpu_values_add_up_word_by_word() {
        let cpu = |base: u64| -> Vec<u8> {
            (0..FE_WORDS as u64)
                .flat_map(|i| (base + i).to_ne_bytes())
                .collect()
        };
        let w = sum_words::<FE_WORDS>(&[cpu(0), cpu(100)]);
        let s = FrontendStats::from_words(&w);
        assert_eq!(s.sock(Verdict::Translated), 100);
        assert_eq!(s.sock(Verdict::NoBackend), 102);
        assert_eq!(s.nodeport(Verdict::Translated), 116);
        assert_eq!(s.packets, [132, 134]);
        assert_eq!(s.bytes, [136, 138]);
    }
}
