//! The host address watcher: the socket hooks recognise NodePorts by the
//! node's own addresses, kept in the host address map. Addresses come and
//! go (DHCP, hot-plugged interfaces), so the map follows them: woken by
//! netlink address notifications, with a periodic rescan as a safety net.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::datapath::host_addrs::{self, HostAddrTable};
use crate::datapath::netlink_events::NetlinkEvents;
use crate::metrics::{MapLabel, Metrics};

/// Safety net of the host address watcher: addresses are listed again
/// this often even without a netlink notification.
const HOST_ADDR_RESCAN_PERIOD: Duration = Duration::from_secs(10);

/// The host address map and the subscription that wakes its watcher.
pub(super) struct AddressWatch {
    table: HostAddrTable,
    events: Option<NetlinkEvents>,
}

/// Subscribes to address changes, then opens the host address map and
/// writes the node's addresses to it: subscribed before the first listing,
/// so no change is missed; written before traffic is counted on (a failure
/// is logged and retried, never fatal).
pub(super) fn start(bpf_root: &Path) -> Result<AddressWatch> {
    let events = NetlinkEvents::addresses()
        .map_err(|e| tracing::warn!(error = %e, "no netlink address subscription; addresses are rescanned every {}s only", HOST_ADDR_RESCAN_PERIOD.as_secs()))
        .ok();
    let mut table = host_addrs::open(bpf_root).context("opening the host address map")?;
    sync_host_addresses(&mut table);
    Ok(AddressWatch { table, events })
}

/// Lists this namespace's addresses and writes them to the host address
/// map; logs what changed, or the failure (retried by the next call).
fn sync_host_addresses(table: &mut HostAddrTable) {
    let synced = host_addrs::local_addresses()
        .context("listing the node's addresses")
        .and_then(|desired| table.sync(&desired));
    match synced {
        Ok(r) if r.added.is_empty() && r.removed.is_empty() => {}
        Ok(r) => {
            tracing::info!(added = ?r.added, removed = ?r.removed, "node addresses changed: NodePorts follow them on the socket path")
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "updating the host address map; retried on the next address change")
        }
    }
}

/// Keeps the host address map equal to the node's addresses: woken by
/// address changes (netlink) and every [`HOST_ADDR_RESCAN_PERIOD`].
pub(super) async fn run(
    watch: AddressWatch,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()>,
) {
    let AddressWatch {
        mut table,
        mut events,
    } = watch;
    let mut rescan = tokio::time::interval(HOST_ADDR_RESCAN_PERIOD);
    tokio::pin!(stop);
    loop {
        metrics.set_map(
            MapLabel::HostAddresses,
            table.keys().len(),
            table.capacity(),
        );
        tokio::select! {
            r = async {
                match events.as_mut() {
                    Some(e) => e.changed().await,
                    None => std::future::pending().await,
                }
            } => if let Err(e) = r {
                tracing::warn!(error = %e, "netlink address subscription failed; rescanning every {}s only", HOST_ADDR_RESCAN_PERIOD.as_secs());
                events = None;
            },
            _ = rescan.tick() => {}
            _ = &mut stop => return,
        }
        sync_host_addresses(&mut table);
    }
}
