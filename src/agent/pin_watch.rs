//! The agent's watch on its own pins: every [`PIN_CHECK_PERIOD`] the ids
//! of the pinned maps and socket-LB links are compared with those the
//! agent holds ([`HeldPins`]). Pins removed under the agent (`kpr cleanup
//! --force`, an `rm`, a bpffs unmounted) are restored: the bpf root made
//! again by the safe mount rules and taken again, the held maps pinned
//! again with their content, the socket-LB programs attached again where
//! their links were lost, then a full sync. What cannot be restored (a pin
//! someone replaced, a restore that failed) keeps `/healthz` unhealthy with
//! the reason in the log and in `kpr status` (watcher `pins`) until it is
//! put right: the agent is never healthy while translating nothing. Pins
//! the agent replaces itself (maps grown, programs switched over to new
//! maps) are taken again after each switch-over.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::syncer::Syncer;
use super::AgentConfig;
use crate::bpf_root::{self, Owner};
use crate::datapath::held_pins::{Drift, HeldPins};
use crate::datapath::loader::{self, DatapathOptions, MapSizes};
use crate::status::{StatusHandle, WatcherState};

/// How often the pins are compared with what the agent holds.
pub(super) const PIN_CHECK_PERIOD: Duration = Duration::from_secs(2);

/// The name of the pin watch in `kpr status`'s watchers (shown once a
/// fault was found).
const STATUS_NAME: &str = "pins";

/// What the agent holds of its pins, and what it needs to restore them.
pub(super) struct PinWatch {
    held: HeldPins,
    owner: Owner,
    bpf_root: PathBuf,
    cgroup: PathBuf,
    sizes: MapSizes,
    options: DatapathOptions,
    /// The fault reported last; None while the pins are intact.
    fault: Option<String>,
    /// The syncer's switch-overs when the pins were taken: a switch-over
    /// replaces pins with the agent's own new ones, taken again then.
    switch_overs: u64,
}

impl PinWatch {
    /// Takes the pins under the agent's bpf root as they are after startup,
    /// with the hold on the root and the options the socket-LB programs
    /// were loaded with.
    pub(super) fn new(
        config: &AgentConfig,
        owner: Owner,
        options: DatapathOptions,
    ) -> Result<PinWatch> {
        Ok(PinWatch {
            held: HeldPins::take(&config.bpf_root).context("taking the pinned maps and links")?,
            owner,
            bpf_root: config.bpf_root.clone(),
            cgroup: config.cgroup.clone(),
            sizes: config.map_sizes,
            options,
            fault: None,
            switch_overs: 0,
        })
    }

    /// Compares the pins with what is held, restores what was removed and
    /// reports what cannot be; true when pins were restored and a full
    /// sync is due.
    pub(super) fn check(&mut self, syncer: &mut Syncer, status: &StatusHandle) -> bool {
        if syncer.switch_overs() != self.switch_overs {
            match HeldPins::take(&self.bpf_root) {
                Ok(held) => {
                    self.held = held;
                    self.switch_overs = syncer.switch_overs();
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "taking the pins after a switch-over; comparing with the earlier ones")
                }
            }
        }
        let drift = self.held.drift();
        if drift.is_empty() {
            // A fault put right from outside: the sync restores health.
            return self.clear(syncer, status);
        }
        match self.restore(&drift) {
            Ok(()) => {
                tracing::warn!(
                    found = %list(&drift),
                    "pins removed under the agent: restored (maps pinned again with their content, programs attached again); syncing everything"
                );
                self.clear(syncer, status);
                true
            }
            Err(e) => {
                let reason = format!("{e:#}");
                if self.fault.as_deref() != Some(reason.as_str()) {
                    tracing::error!(%reason, "the datapath's pins are not the agent's: unhealthy until they are");
                    status.watcher(STATUS_NAME, |w| {
                        w.state = WatcherState::Failing;
                        w.errors += 1;
                        w.last_error = Some(reason.clone());
                    });
                }
                syncer.set_datapath_fault(Some(reason.clone()));
                self.fault = Some(reason);
                false
            }
        }
    }

    /// Forgets a fault reported; whether there was one.
    fn clear(&mut self, syncer: &mut Syncer, status: &StatusHandle) -> bool {
        if self.fault.take().is_none() {
            return false;
        }
        tracing::info!("the datapath's pins are the agent's again");
        status.watcher(STATUS_NAME, |w| w.state = WatcherState::Watching);
        syncer.set_datapath_fault(None);
        true
    }

    /// Puts back what `drift` found removed; an error says what could not
    /// be (and what was found).
    fn restore(&mut self, drift: &[Drift]) -> Result<()> {
        let foreign: Vec<&Drift> = drift.iter().filter(|d| !d.restorable()).collect();
        if !foreign.is_empty() {
            bail!(
                "{} (not restored: kpr does not remove pins it did not make)",
                list(foreign)
            );
        }
        let found = list(drift);
        let root = bpf_root::ensure(&self.bpf_root)
            .with_context(|| format!("{found}; making the bpf root again"))?;
        if !self.owner.holds(&root) {
            // The root was removed and made again: the hold moves to it.
            self.owner = Owner::acquire(&root)
                .with_context(|| format!("{found}; taking the new bpf root"))?;
        }
        self.held
            .repin_maps()
            .with_context(|| format!("{found}; pinning the maps again"))?;
        if drift.iter().any(|d| matches!(d, Drift::LinkLost(_))) {
            loader::load_and_attach(&root, &self.cgroup, &self.sizes, &self.options)
                .with_context(|| format!("{found}; attaching the socket-LB programs again"))?;
            self.held.take_links()?;
        }
        let left = self.held.drift();
        if !left.is_empty() {
            bail!("{found}; still after restoring: {}", list(&left));
        }
        Ok(())
    }
}

fn list<'a>(drift: impl IntoIterator<Item = &'a Drift>) -> String {
    drift
        .into_iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}
