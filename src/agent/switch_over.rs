//! Switching the programs over to new maps, for the two reasons maps are
//! replaced while traffic flows: the cluster outgrew them (growth), or an
//! upgrade brought a new layout version of one (its map is new and empty).
//! Either way the new maps are complete before a program uses them —
//! growth copies the old maps ([`resize::grow_pinned`]), an upgrade waits
//! for the first sync — and only then are the socket-LB and north-south
//! programs loaded again and swapped into their pinned links, each swap
//! atomic. Until then the programs attached keep the maps they hold.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::datapath::loader::{self, DatapathOptions, MapSizes};
use crate::datapath::nodeport::{self, NodePortConfig};
use crate::datapath::resize::{self, Demand, Grown};

/// How the load balancer's maps are sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Growth {
    /// `--lb-map-max`: the size asked for, never more.
    Fixed,
    /// Grown when the cluster needs it, up to `ceiling` entries in all
    /// (from the node's memory).
    Auto { ceiling: u64 },
}

/// What a switch-over attaches, and the state of the maps' sizes.
pub struct SwitchOver {
    bpf_root: PathBuf,
    cgroup: PathBuf,
    options: DatapathOptions,
    north_south: Option<NodePortConfig>,
    sizes: MapSizes,
    growth: Growth,
    /// New maps wait for their first sync before the programs use them.
    pending: bool,
    /// Cleared while a switch-over is pending: the device watcher must not
    /// attach programs to maps not filled yet.
    north_south_ready: Arc<AtomicBool>,
    /// Logged once: the ceiling was reached.
    ceiling_logged: bool,
}

impl SwitchOver {
    /// `pending`: startup created new maps and left the programs of the
    /// previous agent attached (an upgrade's new layout).
    pub fn new(
        bpf_root: PathBuf,
        cgroup: PathBuf,
        options: DatapathOptions,
        north_south: Option<NodePortConfig>,
        sizes: MapSizes,
        growth: Growth,
        pending: bool,
    ) -> SwitchOver {
        SwitchOver {
            bpf_root,
            cgroup,
            options,
            north_south,
            sizes,
            growth,
            pending,
            north_south_ready: Arc::new(AtomicBool::new(!pending)),
            ceiling_logged: false,
        }
    }

    /// Whether the device watcher may attach (no switch-over pending).
    pub fn north_south_ready(&self) -> Arc<AtomicBool> {
        self.north_south_ready.clone()
    }

    /// Whether the programs still wait for the new maps' first sync.
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// Loads the programs again and swaps them into their links: from now
    /// on they use the maps pinned under the bpf root.
    pub fn attach(&mut self) -> Result<()> {
        let report =
            loader::load_and_attach(&self.bpf_root, &self.cgroup, &self.sizes, &self.options)
                .context("switching the socket-LB programs over to the new maps")?;
        if let Some(np) = &self.north_south {
            nodeport::load_and_attach(&self.bpf_root, &self.sizes, np)
                .context("switching the north-south programs over to the new maps")?;
        }
        if self.pending {
            tracing::info!(removed_old_pins = ?report.removed_old_pins, "programs switched over to the new maps");
        }
        self.pending = false;
        self.north_south_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Grows the maps to hold `demand` and switches the programs over;
    /// Ok(None) when they hold it already, or growth is off or at its
    /// ceiling (the Services that do not fit stay refused, and shown).
    pub fn grow(&mut self, demand: &Demand) -> Result<Option<Vec<Grown>>> {
        let Growth::Auto { ceiling } = self.growth else {
            return Ok(None);
        };
        let current = resize::with_pinned_capacities(&self.bpf_root, &self.sizes);
        let Some(next) = resize::sizes_for(&current, demand) else {
            return Ok(None);
        };
        if resize::total_entries(&next) > ceiling {
            if !self.ceiling_logged {
                tracing::error!(
                    ceiling,
                    wanted = resize::total_entries(&next),
                    "the load balancer's maps would outgrow 1/32 of the node's memory: not grown; \
                     Services that do not fit are refused (set --lb-map-max to size them explicitly)"
                );
                self.ceiling_logged = true;
            }
            return Ok(None);
        }
        let grown = resize::grow_pinned(&self.bpf_root, &next).context("growing the maps")?;
        self.sizes = next;
        if grown.is_empty() {
            return Ok(None);
        }
        self.pending = true;
        // The programs attached use the old maps until swapped: same
        // content, but only the new ones get the next writes.
        self.attach()?;
        tracing::info!(?grown, "maps grown: programs switched over");
        Ok(Some(grown))
    }
}

/// The sizes to create the maps with when the desired state is known
/// before the datapath loads (the manifests' first read): `initial`
/// (`--lb-map-initial`) grown to hold `demand` as a later growth would,
/// so the first sync needs no switch-over. `initial` as is with a fixed
/// size (`--lb-map-max`), or when the growth would pass `ceiling`: the
/// first sync then refuses and shows what does not fit, as before. Pins
/// of an earlier agent keep their capacity whatever is asked.
pub fn sized_for(initial: MapSizes, growth: Growth, demand: &Demand) -> MapSizes {
    let Growth::Auto { ceiling } = growth else {
        return initial;
    };
    match resize::sizes_for(&initial, demand) {
        Some(next) if resize::total_entries(&next) <= ceiling => {
            tracing::info!(
                services = next.services,
                backends = next.backends,
                "maps sized for the first read"
            );
            next
        }
        _ => initial,
    }
}
