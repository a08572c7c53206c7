//! The device watcher: the north-south programs belong on exactly the
//! interfaces `--devices` means (without it, the node's devices as
//! detection finds them), and interfaces come, go and are re-created,
//! and gain or lose addresses and default routes, while the agent runs;
//! the pods' devices, listed in the peer device map for redirects straight
//! into a pod, come and go with their pods. Woken by netlink link
//! notifications (and, when detecting, address and route ones), with a
//! periodic rescan as a safety net.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;

use crate::datapath::devices;
use crate::datapath::loader::MapSizes;
use crate::datapath::netlink_events::NetlinkEvents;
use crate::datapath::nodeport::{self, DeviceSelection, NodePortConfig};
use crate::datapath::peer_devices::{self, PeerDeviceTable};
use crate::metrics::{MapLabel, Metrics};
use crate::status::StatusHandle;

/// Safety net of the device watcher: links are listed again this often
/// even without a netlink notification.
const DEVICE_RESCAN_PERIOD: Duration = Duration::from_secs(10);

/// Subscribes to what `selection` depends on: link changes, and address
/// and route changes too when detecting; None (logged) when netlink
/// refuses, and the watcher rescans periodically only. Taken before the
/// links are first listed, so no change is missed.
pub(super) fn subscribe(selection: &DeviceSelection) -> Option<NetlinkEvents> {
    match selection {
        DeviceSelection::Named(_) => NetlinkEvents::links(),
        DeviceSelection::Detected => NetlinkEvents::devices(),
    }
        .map_err(|e| tracing::warn!(error = %e, "no netlink link subscription; devices are rescanned every {}s only", DEVICE_RESCAN_PERIOD.as_secs()))
        .ok()
}

/// What the device watcher starts from: its subscription, the devices
/// attached at startup and what it needs to attach them again.
pub(super) struct DeviceWatch {
    pub bpf_root: PathBuf,
    pub sizes: MapSizes,
    pub config: NodePortConfig,
    pub status: StatusHandle,
    pub peer_devices: PeerDeviceTable,
    pub events: Option<NetlinkEvents>,
    /// The north-south devices attached (name → ifindex).
    pub attached: BTreeMap<String, u32>,
    /// The DSR MSS clamp the attached programs were loaded with.
    pub attached_mss: u16,
    /// False while new maps wait for their first sync: the programs
    /// attached keep the old ones, and nothing is attached meanwhile.
    pub ready: Arc<AtomicBool>,
}

/// Publishes the number of devices attached, then runs the watcher until
/// `stop` resolves.
pub(super) fn spawn(
    watch: DeviceWatch,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    metrics.set_nodeport_devices(watch.attached.len());
    tokio::spawn(run(watch, metrics, stop))
}

/// Writes the pods' devices (veth/netkit with a peer in another namespace,
/// other than the north-south devices, which lead to other hosts) to the
/// peer device map; logs what changed, or the failure (retried on the next
/// link change or rescan). Without a pod device listed, packets to its
/// pods take the plain redirect: slower, never lost.
/// With `enabled` false (--nodeport-redirect-peer=false) the map is kept
/// empty, also of what an earlier agent listed.
pub(super) fn sync_peer_devices(
    table: &mut PeerDeviceTable,
    north_south: &BTreeMap<String, u32>,
    enabled: bool,
) {
    let listed = if enabled {
        peer_devices::peer_devices().context("listing the pods' devices (netlink)")
    } else {
        Ok(Default::default())
    };
    let synced = listed.and_then(|mut desired| {
        for index in north_south.values() {
            desired.remove(index);
        }
        table.sync(&desired)
    });
    match synced {
        Ok(r) if r.is_empty() => {}
        Ok(r) => {
            tracing::info!(added = ?r.added, removed = ?r.removed, "pod devices changed: packets to their local backends are redirected into the pod namespace")
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "updating the peer device map; retried on the next link change")
        }
    }
}

/// Keeps the north-south programs on exactly the interfaces `--devices`
/// means, as links appear, go or are re-created (new ifindex): woken by
/// link changes (netlink) and every [`DEVICE_RESCAN_PERIOD`], it lists the
/// links and, when the matching set differs from what is attached or the
/// DSR MSS clamp their MTUs call for changed (an MTU changed, or a device
/// came or went), runs the attachment again (existing links get the
/// program swapped in, with the same --nodeport-mode and the MSS read
/// then; new devices are attached, gone ones detached and unpinned; the
/// pinned maps, the DSR map among them, stay as they are). A failure is
/// logged, counted and shown by `kpr status`, and retried on the next
/// change; it never stops the agent. Each wake-up also brings the peer
/// device map up to date (pods' devices come and go with their pods).
async fn run(
    mut w: DeviceWatch,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut rescan = tokio::time::interval(DEVICE_RESCAN_PERIOD);
    rescan.tick().await;
    tokio::pin!(stop);
    loop {
        metrics.set_map(
            MapLabel::PeerDevices,
            w.peer_devices.keys().len(),
            w.peer_devices.capacity(),
        );
        let mut lost = false;
        tokio::select! {
            r = async {
                match w.events.as_mut() {
                    Some(e) => e.changed().await,
                    None => std::future::pending().await,
                }
            } => if let Err(e) = r {
                tracing::warn!(error = %e, "netlink link subscription failed; rescanning every {}s only", DEVICE_RESCAN_PERIOD.as_secs());
                lost = true;
            },
            _ = rescan.tick() => {}
            _ = &mut stop => return,
        }
        if lost {
            w.events = None;
        }
        w.rescan(&metrics).await;
    }
}

impl DeviceWatch {
    /// Lists the links, brings the peer device map up to date and attaches
    /// again when the north-south devices or their DSR MSS changed.
    async fn rescan(&mut self, metrics: &Metrics) {
        if !self.ready.load(Ordering::Acquire) {
            return;
        }
        let present = match devices::resolve(&self.config.devices) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "listing the network interfaces");
                return;
            }
        };
        // The devices --devices means (or detection finds) now are
        // north-south ones, attached below if they are not yet: never pod
        // devices.
        sync_peer_devices(&mut self.peer_devices, &present, self.config.redirect_peer);
        let mss = match nodeport::devices_dsr_mss(&present) {
            Ok(m) => m,
            // A device gone since the listing: the next event says so.
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "reading the devices' MTUs");
                return;
            }
        };
        if present == self.attached && mss == self.attached_mss {
            return;
        }
        self.reattach(metrics, present, mss).await;
    }

    /// Runs the north-south attachment again for the `present` devices;
    /// reports the outcome in metrics, logs and `kpr status`.
    async fn reattach(&mut self, metrics: &Metrics, present: BTreeMap<String, u32>, mss: u16) {
        let (root, sizes, config) = (self.bpf_root.clone(), self.sizes, self.config.clone());
        let outcome =
            tokio::task::spawn_blocking(move || nodeport::load_and_attach(&root, &sizes, &config))
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r);
        match outcome {
            Ok(report) => {
                tracing::info!(
                    attached = ?report.devices.keys().collect::<Vec<_>>(),
                    dsr_mss = report.dsr_mss,
                    created_links = ?report.created_links,
                    detached_links = ?report.detached_links,
                    xdp_links = ?report.xdp_links,
                    missing = ?report.missing_devices,
                    "devices changed: north-south datapath re-attached"
                );
                metrics.record_device_sync(true, report.devices.len());
                self.status.update(|s| {
                    if let Some(d) = s.devices.as_mut() {
                        d.attached = report.devices.keys().cloned().collect();
                        d.missing = report.missing_devices.clone();
                        d.last_error = None;
                        d.changes += 1;
                    }
                });
                self.attached = report.devices;
                self.attached_mss = report.dsr_mss;
            }
            Err(e) => {
                let error = format!("{e:#}");
                tracing::error!(%error, devices = ?present.keys().collect::<Vec<_>>(), "devices changed but attaching failed; retried on the next link change");
                let still = nodeport::attached_devices(&self.bpf_root)
                    .iter()
                    .filter(|d| d.direction == nodeport::Direction::Ingress && d.ifindex.is_some())
                    .count();
                metrics.record_device_sync(false, still);
                self.status.update(|s| {
                    if let Some(d) = s.devices.as_mut() {
                        d.last_error = Some(error);
                        d.changes += 1;
                    }
                });
                // Not retried until the links change again: a device that
                // cannot take the programs would fail every time.
                self.attached = present;
                self.attached_mss = mss;
            }
        }
    }
}
