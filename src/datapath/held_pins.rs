//! What the agent pinned, as it holds it: a descriptor and the kernel id of
//! every pinned map, and the id of every socket-LB link. Comparing these
//! ids with what the bpf root holds now is how the agent notices its pins
//! removed (`kpr cleanup --force`, an `rm`, an unmounted bpffs) or replaced
//! under it — cheaply: one open and one info call per pin.
//!
//! A map that lost its pin is pinned again from the descriptor held here,
//! with its content, so every other holder (the syncer, the address
//! watcher) keeps writing the map the programs read. A pin that now names
//! another object is not kpr's to remove: it is reported, never replaced.
//! The north-south links (tcx, XDP) are not held here: the device watcher
//! attaches and replaces them while the agent runs.

#![deny(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use libbpf_rs::{Link, MapCore, MapHandle};

use crate::datapath::link;
use crate::datapath::pins::{self, MapName, SOCK_LINK_PREFIX};

/// The maps and socket-LB links pinned under one bpf root, held open.
pub struct HeldPins {
    root: PathBuf,
    maps: Vec<HeldMap>,
    /// (pin, link id) of every socket-LB link.
    links: Vec<(PathBuf, u32)>,
}

struct HeldMap {
    name: MapName,
    handle: MapHandle,
    id: u32,
}

/// How a pin differs from what the agent holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Drift {
    /// The map's pin is gone.
    MapUnpinned(MapName),
    /// The map's pin names another map.
    MapReplaced {
        map: MapName,
        held: u32,
        pinned: u32,
    },
    /// The link's pin is gone, or its link was detached.
    LinkLost(String),
    /// The link's pin names another link.
    LinkReplaced {
        hook: String,
        held: u32,
        pinned: u32,
    },
}

impl Drift {
    /// Whether kpr may restore it: a pin someone replaced is not kpr's to
    /// remove.
    pub fn restorable(&self) -> bool {
        matches!(self, Drift::MapUnpinned(_) | Drift::LinkLost(_))
    }
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::MapUnpinned(map) => write!(f, "map {} ({}) unpinned", map, map.pin_name()),
            Drift::MapReplaced { map, held, pinned } => write!(
                f,
                "pin {} replaced: it names map id {pinned}, the agent's is id {held}",
                map.pin_name()
            ),
            Drift::LinkLost(hook) => write!(f, "socket hook {hook} detached or unpinned"),
            Drift::LinkReplaced { hook, held, pinned } => write!(
                f,
                "link pin of socket hook {hook} replaced: it names link id {pinned}, the agent's is id {held}"
            ),
        }
    }
}

impl HeldPins {
    /// Opens every kpr map and socket-LB link pinned under `root` now.
    pub fn take(root: &Path) -> Result<HeldPins> {
        let mut maps = Vec::new();
        for name in MapName::ALL {
            let pin = pins::pin_path(root, name);
            if !pin.exists() {
                continue;
            }
            let handle = MapHandle::from_pinned_path(&pin)
                .with_context(|| format!("opening pinned map {}", pin.display()))?;
            let id = handle
                .info()
                .with_context(|| format!("the id of map {}", pin.display()))?
                .info
                .id;
            maps.push(HeldMap { name, handle, id });
        }
        let mut held = HeldPins {
            root: root.to_path_buf(),
            maps,
            links: Vec::new(),
        };
        held.take_links()?;
        Ok(held)
    }

    /// Takes the socket-LB links' ids again (after they were re-attached).
    pub fn take_links(&mut self) -> Result<()> {
        let mut links = Vec::new();
        for (_, pin) in pins::pinned_links(&self.root, SOCK_LINK_PREFIX)? {
            let link = Link::open(&pin)
                .with_context(|| format!("opening pinned link {}", pin.display()))?;
            let id = link
                .info()
                .with_context(|| format!("the id of link {}", pin.display()))?
                .id;
            links.push((pin, id));
        }
        self.links = links;
        Ok(())
    }

    /// The maps held.
    pub fn maps(&self) -> impl Iterator<Item = MapName> + '_ {
        self.maps.iter().map(|m| m.name)
    }

    /// How the bpf root differs from what is held; empty when every pin
    /// names the object the agent holds and every link is attached.
    pub fn drift(&self) -> Vec<Drift> {
        let mut out = Vec::new();
        for m in &self.maps {
            let pin = pins::pin_path(&self.root, m.name);
            match pinned_map_id(&pin) {
                None => out.push(Drift::MapUnpinned(m.name)),
                Some(pinned) if pinned != m.id => out.push(Drift::MapReplaced {
                    map: m.name,
                    held: m.id,
                    pinned,
                }),
                Some(_) => {}
            }
        }
        for (pin, held) in &self.links {
            let hook = hook_name(pin);
            let Some(link) = Link::open(pin).ok() else {
                out.push(Drift::LinkLost(hook));
                continue;
            };
            match link.info().map(|i| i.id) {
                Ok(pinned) if pinned != *held => out.push(Drift::LinkReplaced {
                    hook,
                    held: *held,
                    pinned,
                }),
                Ok(_) if link::attachment(&link).is_some() => {}
                _ => out.push(Drift::LinkLost(hook)),
            }
        }
        out
    }

    /// Pins again every held map whose pin is gone (the bpf root must be
    /// on bpffs); the maps pinned.
    pub fn repin_maps(&mut self) -> Result<Vec<MapName>> {
        let mut repinned = Vec::new();
        for m in &mut self.maps {
            let pin = pins::pin_path(&self.root, m.name);
            if pin.exists() {
                continue;
            }
            m.handle
                .pin(&pin)
                .with_context(|| format!("pinning map {} again at {}", m.name, pin.display()))?;
            repinned.push(m.name);
        }
        Ok(repinned)
    }
}

/// The id of the map pinned at `pin`; None when nothing (or no map) is.
fn pinned_map_id(pin: &Path) -> Option<u32> {
    let handle = MapHandle::from_pinned_path(pin).ok()?;
    Some(handle.info().ok()?.info.id)
}

/// `connect4` of `links/sock_connect4`.
fn hook_name(pin: &Path) -> String {
    pin.file_name()
        .map(|n| n.to_string_lossy())
        .and_then(|n| n.strip_prefix(SOCK_LINK_PREFIX).map(str::to_string))
        .unwrap_or_else(|| pin.display().to_string())
}
