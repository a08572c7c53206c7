//! Growing the load balancer's pinned maps while programs serve from them.
//!
//! A BPF map's capacity is fixed when it is created, so growing one means
//! a new map: [`grow_pinned`] creates each larger map with the old one's
//! definition, copies every entry into it and renames its pin over the old
//! one (a rename on bpffs is atomic). Programs loaded before keep the old
//! map, whose content is the same, until the loaders run again and swap
//! the pinned links to programs that use the new pins
//! ([`super::link::attach_or_swap`]); the old map is freed with the last
//! program that holds it. Nothing writes the copied maps but the agent
//! that grows them, so the copy is exact and no lookup ever misses during
//! the switch. The same "fill the new maps, then swap the programs" is how
//! an upgrade to another map layout version switches over
//! ([`super::loader::create_maps`] before the first sync, the swap after).

#![deny(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle, MapType};
use serde::Serialize;

use crate::datapath::pins::{self, MapName, MapSizes};

/// The maps whose size follows the cluster (the agent writes every entry,
/// or the datapath one per frontend or backend id): the ones that grow.
/// The LRU maps keep their size; they evict.
pub const GROWABLE: [MapName; 7] = [
    MapName::Services,
    MapName::Backends,
    MapName::SourceRanges,
    MapName::Maglev,
    MapName::Dsr,
    MapName::FrontendStats,
    MapName::BackendStats,
];

/// One map replaced by a larger copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Grown {
    pub map: MapName,
    pub from: u32,
    pub to: u32,
    /// Entries copied.
    pub entries: usize,
}

/// Replaces every pinned map of [`GROWABLE`] whose capacity is below what
/// `sizes` asks with a larger copy (created, filled, renamed over the old
/// pin). Maps not pinned (the DSR map without north-south) are left alone.
/// On an error the maps already replaced stay replaced (each is a complete
/// copy) and the others keep their pins: the next call goes on from there.
pub fn grow_pinned(bpf_root: &Path, sizes: &MapSizes) -> Result<Vec<Grown>> {
    let mut grown = Vec::new();
    for name in GROWABLE {
        let pin = pins::pin_path(bpf_root, name);
        if !pin.exists() {
            continue;
        }
        let Some(wanted) = sizes.requested(name) else {
            continue;
        };
        let old = MapHandle::from_pinned_path(&pin)
            .with_context(|| format!("opening pinned map {}", pin.display()))?;
        if old.max_entries() >= wanted {
            continue;
        }
        let (mut new, entries) =
            copy_larger(&old, wanted).with_context(|| format!("growing map {name}"))?;
        let staged = staging_pin(&pin);
        // A staged pin left by an agent that died here is a partial copy.
        let _ = std::fs::remove_file(&staged);
        new.pin(&staged)
            .with_context(|| format!("pinning {}", staged.display()))?;
        std::fs::rename(&staged, &pin)
            .with_context(|| format!("renaming {} over {}", staged.display(), pin.display()))?;
        grown.push(Grown {
            map: name,
            from: old.max_entries(),
            to: wanted,
            entries,
        });
    }
    Ok(grown)
}

/// Where a larger copy is pinned before it replaces `pin`: bpffs refuses
/// a '.' in a name, and `kpr cleanup` removes what starts with `kpr_`.
fn staging_pin(pin: &Path) -> PathBuf {
    let name = pin.file_name().unwrap_or_default().to_string_lossy();
    pin.with_file_name(format!(
        "kpr_grow_{}",
        name.strip_prefix("kpr_").unwrap_or(&name)
    ))
}

/// A new map like `old` (type, key and value sizes, flags, name) with
/// `max_entries` entries and every entry of `old`; the number copied.
fn copy_larger(old: &MapHandle, max_entries: u32) -> Result<(MapHandle, usize)> {
    let info = old.info().context("reading the map's definition")?;
    let ty = old.map_type();
    let inner_template = match ty {
        MapType::HashOfMaps => Some(maglev_inner_template()?),
        _ => None,
    };
    let opts = libbpf_sys::bpf_map_create_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as libbpf_sys::size_t,
        map_flags: info.info.map_flags,
        inner_map_fd: inner_template
            .as_ref()
            .map_or(0, |t| t.as_fd().as_raw_fd() as u32),
        ..Default::default()
    };
    let new = MapHandle::create(
        ty,
        Some(old.name()),
        old.key_size(),
        old.value_size(),
        max_entries,
        &opts,
    )
    .with_context(|| format!("creating a map of {max_entries} entries"))?;
    let mut copied = 0;
    for key in old.keys() {
        // Per-CPU counters are copied CPU by CPU (the datapath may count
        // into the old map until the programs are swapped: a few lost).
        if ty == MapType::PercpuHash {
            let Some(values) = old.lookup_percpu(&key, MapFlags::ANY)? else {
                continue;
            };
            new.update_percpu(&key, &values, MapFlags::ANY)?;
            copied += 1;
            continue;
        }
        let Some(value) = old.lookup(&key, MapFlags::ANY)? else {
            continue; // deleted meanwhile
        };
        match ty {
            // A map of maps reads back inner map ids, and takes descriptors.
            MapType::HashOfMaps => {
                let id = u32::from_ne_bytes(value[..4].try_into().context("inner map id")?);
                let Ok(inner) = MapHandle::from_map_id(id) else {
                    continue; // its table was replaced meanwhile
                };
                let fd = inner.as_fd().as_raw_fd() as u32;
                new.update(&key, &fd.to_ne_bytes(), MapFlags::ANY)?;
            }
            _ => new.update(&key, &value, MapFlags::ANY)?,
        }
        copied += 1;
    }
    Ok((new, copied))
}

/// The inner map template of the Maglev map of maps (bpf/include/lb_maps.h:
/// an array of u32 with BPF_F_INNER_MAP, so tables of any size fit).
fn maglev_inner_template() -> Result<MapHandle> {
    let opts = libbpf_sys::bpf_map_create_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as libbpf_sys::size_t,
        map_flags: libbpf_sys::BPF_F_INNER_MAP,
        ..Default::default()
    };
    MapHandle::create(MapType::Array, Some("kpr_maglev_tpl"), 4, 4, 1, &opts)
        .context("creating the Maglev inner map template")
}

/// `sizes` with each growable map's capacity raised to its pin's, when
/// larger: an earlier agent may have grown them.
pub fn with_pinned_capacities(bpf_root: &Path, sizes: &MapSizes) -> MapSizes {
    let pinned = |name: MapName, asked: u32| {
        MapHandle::from_pinned_path(pins::pin_path(bpf_root, name))
            .map_or(asked, |m| m.max_entries().max(asked))
    };
    MapSizes {
        services: pinned(MapName::Services, sizes.services),
        backends: pinned(MapName::Backends, sizes.backends),
        source_ranges: pinned(MapName::SourceRanges, sizes.source_ranges),
        maglev: pinned(MapName::Maglev, sizes.maglev),
        ..*sizes
    }
}

/// Growth: sizes that hold `demand` entries of each growable map with
/// room to spare, never below `current`; None when `current` holds it all.
/// Room: half again what is needed, rounded up to 4096 entries, so a
/// cluster that keeps growing grows its maps a few times, not on every
/// sync.
pub fn sizes_for(current: &MapSizes, demand: &Demand) -> Option<MapSizes> {
    let grow = |current: u32, needed: usize| -> u32 {
        if needed <= current as usize {
            return current;
        }
        let with_room = needed.saturating_mul(3) / 2;
        let rounded = with_room.div_ceil(4096).saturating_mul(4096);
        u32::try_from(rounded).unwrap_or(u32::MAX).max(current)
    };
    let next = MapSizes {
        services: grow(current.services, demand.services),
        backends: grow(current.backends, demand.backends),
        source_ranges: grow(current.source_ranges, demand.source_ranges),
        maglev: grow(current.maglev, demand.maglev),
        ..*current
    };
    (next != *current).then_some(next)
}

/// Entries the desired state needs in each growable map (the DSR map
/// follows the services map).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    pub services: usize,
    pub backends: usize,
    pub source_ranges: usize,
    pub maglev: usize,
}

/// Bytes a preallocated hash map entry costs the kernel, about (key and
/// value rounded to 8, plus the element's header and per-CPU free list):
/// what the growth ceiling counts.
const BYTES_PER_ENTRY: u64 = 128;

/// The largest total of growable entries the agent grows its maps to on
/// its own: 1/32 of the node's memory (a node of 4 GiB: ~1M entries, of
/// 24 GiB: ~6M). Beyond it Services are refused and shown (metric,
/// `kpr status`, Event) rather than taking memory the node's pods need;
/// `--lb-map-max` sets a size explicitly.
pub fn growth_ceiling_entries(mem_total_bytes: u64) -> u64 {
    mem_total_bytes / 32 / BYTES_PER_ENTRY
}

/// The node's memory (MemTotal of /proc/meminfo), in bytes.
pub fn mem_total_bytes() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    parse_mem_total(&text).context("no MemTotal in /proc/meminfo")
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Total entries of the growable maps `sizes` asks for (the DSR map
/// counts as large as the services map).
pub fn total_entries(sizes: &MapSizes) -> u64 {
    2 * u64::from(sizes.services)
        + u64::from(sizes.backends)
        + u64::from(sizes.source_ranges)
        + u64::from(sizes.maglev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(services: usize, backends: usize) -> Demand {
        Demand {
            services,
            backends,
            ..Demand::default()
        }
    }

    #[test]
    fn sizes_hold_the_demand_with_room_and_never_shrink() {
        let current = MapSizes::default();
        assert_eq!(sizes_for(&current, &demand(1000, 1000)), None);
        assert_eq!(sizes_for(&current, &demand(65536, 10)), None);
        // 10,000 Services x 10 endpoints: 110,000 service entries.
        let next = sizes_for(&current, &demand(110_000, 100_000)).unwrap();
        assert_eq!(next.services, 167_936);
        assert!(next.services as usize >= 110_000 * 3 / 2);
        assert_eq!(next.backends, 151_552);
        assert_eq!(next.source_ranges, current.source_ranges);
        assert_eq!(next.affinity, current.affinity);
        assert_eq!(next.services % 4096, 0);
    }

    #[test]
    fn the_ceiling_scales_with_memory() {
        let gib = 1u64 << 30;
        assert_eq!(growth_ceiling_entries(4 * gib), 1 << 20);
        assert!(growth_ceiling_entries(24 * gib) > 6_000_000);
        // 100,000 Services x 10 endpoints fit a 24 GiB node.
        let next = sizes_for(
            &MapSizes::default(),
            &demand(1_100_000 + 10_000 * 11, 1_000_000),
        )
        .unwrap();
        assert!(total_entries(&next) < growth_ceiling_entries(24 * gib));
    }

    #[test]
    fn mem_total_is_read_in_bytes() {
        let text = "MemTotal:       24576000 kB\nMemFree:  1 kB\n";
        assert_eq!(parse_mem_total(text), Some(24_576_000 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn staging_pin_is_beside_the_pin() {
        assert_eq!(
            staging_pin(Path::new("/r/kpr_svc_v1")),
            PathBuf::from("/r/kpr_grow_svc_v1")
        );
    }
}
