//! The monitor's runtime switch (`kpr_monitor_v1[0]`, struct
//! lb_monitor_ctl): a reader registers its pid there and the datapath
//! reports while one is registered, no program reload.
//!
//! One reader at a time: a BPF ring buffer has one consumer position, so
//! two readers would each get an arbitrary share of the events. A second
//! monitor is refused with the holder's pid (a `kpr monitor`, or the
//! agent while a web view page listens). A pid whose process is gone is
//! dropped, so a monitor killed with SIGKILL does not keep the switch on
//! for ever. The reader re-asserts its slot at every poll, and turns the
//! switch off when it leaves. The struct keeps eight slots (its layout is
//! the datapath's); only one is used.

#![deny(unsafe_code)]

use std::path::Path;

use anyhow::{bail, Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::datapath::pins::{pin_path, MapName};
use crate::datapath::sys::to_io;

/// Reader slots in struct lb_monitor_ctl.
const SLOTS: usize = 8;
/// Bytes of struct lb_monitor_ctl: four u32 and eight pids.
const CTL_SIZE: usize = 4 * (4 + SLOTS);

/// How the datapath samples and limits events while a reader is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Keep one decision in this many (1: every one).
    pub sample_every: u32,
    /// Events a second per CPU (0: unlimited).
    pub rate: u32,
    /// Events at once per CPU above the rate.
    pub burst: u32,
}

/// struct lb_monitor_ctl, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Ctl {
    readers: u32,
    sample_every: u32,
    rate: u32,
    burst: u32,
    pids: [u32; SLOTS],
}

impl Ctl {
    fn decode(b: &[u8]) -> Ctl {
        let word = |i: usize| {
            b.get(i * 4..i * 4 + 4)
                .and_then(|w| w.try_into().ok())
                .map_or(0, u32::from_ne_bytes)
        };
        let mut pids = [0; SLOTS];
        for (i, p) in pids.iter_mut().enumerate() {
            *p = word(4 + i);
        }
        Ctl {
            readers: word(0),
            sample_every: word(1),
            rate: word(2),
            burst: word(3),
            pids,
        }
    }

    fn encode(&self) -> [u8; CTL_SIZE] {
        let mut b = [0u8; CTL_SIZE];
        let words = [self.readers, self.sample_every, self.rate, self.burst]
            .into_iter()
            .chain(self.pids);
        for (i, w) in words.enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        b
    }

    /// Keeps the pids `alive` says are, with `me` in a slot (when `Some`)
    /// and `readers` their count. Err(holder) when another live reader
    /// holds the switch.
    fn settle(&mut self, me: Option<u32>, alive: impl Fn(u32) -> bool) -> Result<(), u32> {
        for p in self.pids.iter_mut() {
            if *p != 0 && Some(*p) != me && !alive(*p) {
                *p = 0;
            }
        }
        let mut outcome = Ok(());
        if let Some(me) = me {
            if let Some(&holder) = self.pids.iter().find(|p| **p != 0 && **p != me) {
                outcome = Err(holder);
            } else if !self.pids.contains(&me) {
                self.pids[0] = me;
            }
        }
        self.readers = self.pids.iter().filter(|p| **p != 0).count() as u32;
        outcome
    }
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// This process's registration as a reader; leaving (drop) turns the
/// switch off when it was the last.
pub struct Registration {
    map: MapHandle,
    pid: u32,
    budget: Budget,
}

impl Registration {
    /// Registers this process as a reader under `bpf_root` with `budget`.
    pub fn join(bpf_root: &Path, budget: Budget) -> Result<Registration> {
        let pin = pin_path(bpf_root, MapName::MonitorControl);
        let map = MapHandle::from_pinned_path(&pin).with_context(|| {
            format!(
                "opening {} (has an agent of this version run with this --bpf-root?)",
                pin.display()
            )
        })?;
        let r = Registration {
            map,
            pid: std::process::id(),
            budget,
        };
        r.write(Some(r.pid), Some(budget))?;
        Ok(r)
    }

    /// Re-asserts this reader's slot and the live count (see the module doc).
    pub fn refresh(&self) -> Result<()> {
        self.write(Some(self.pid), None)
    }

    fn read(&self) -> Result<Ctl> {
        let v = self
            .map
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
            .map_err(to_io)
            .context("reading the monitor switch")?
            .unwrap_or_default();
        Ok(Ctl::decode(&v))
    }

    fn write(&self, me: Option<u32>, budget: Option<Budget>) -> Result<()> {
        let mut ctl = self.read()?;
        if let Err(holder) = ctl.settle(me, process_alive) {
            bail!(
                "process {holder} reads the events already (a kpr monitor, or the agent while a \
                 web view page is open); a BPF ring buffer has one reader"
            );
        }
        let b = budget.unwrap_or(self.budget);
        if budget.is_some() || ctl.sample_every == 0 {
            ctl.sample_every = b.sample_every;
            ctl.rate = b.rate;
            ctl.burst = b.burst;
        }
        self.map
            .update(&0u32.to_ne_bytes(), &ctl.encode(), MapFlags::ANY)
            .map_err(to_io)
            .context("writing the monitor switch")
    }
}

impl Registration {
    /// Takes this reader out; the switch goes off with the last one.
    fn leave(&self) -> Result<()> {
        let mut ctl = self.read()?;
        for p in ctl.pids.iter_mut().filter(|p| **p == self.pid) {
            *p = 0;
        }
        let _ = ctl.settle(None, process_alive);
        self.map
            .update(&0u32.to_ne_bytes(), &ctl.encode(), MapFlags::ANY)
            .map_err(to_io)
            .context("writing the monitor switch")
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Err(e) = self.leave() {
            eprintln!("kpr monitor: could not turn the monitor switch off: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_reader_is_dropped_and_the_new_one_takes_the_switch() {
        let mut ctl = Ctl {
            pids: [0, 0, 20, 0, 0, 0, 0, 0],
            ..Ctl::default()
        };
        assert_eq!(ctl.settle(Some(30), |p| p != 20), Ok(()));
        assert_eq!(ctl.readers, 1);
        assert!(ctl.pids.contains(&30) && !ctl.pids.contains(&20));
        // Re-asserting keeps one slot.
        assert_eq!(ctl.settle(Some(30), |_| true), Ok(()));
        assert_eq!(ctl.readers, 1);
        // Leaving turns the switch off.
        ctl.pids = [0; SLOTS];
        let _ = ctl.settle(None, |_| true);
        assert_eq!(ctl.readers, 0);
    }

    #[test]
    fn a_second_live_reader_is_refused_with_the_holders_pid() {
        let mut ctl = Ctl {
            pids: [10, 0, 0, 0, 0, 0, 0, 0],
            ..Ctl::default()
        };
        assert_eq!(ctl.settle(Some(9), |_| true), Err(10));
        assert_eq!(ctl.readers, 1);
        assert!(!ctl.pids.contains(&9));
    }

    #[test]
    fn the_entry_encodes_as_the_bpf_struct() {
        use crate::datapath::skel::sock_lb::types::lb_monitor_ctl;
        assert_eq!(std::mem::size_of::<lb_monitor_ctl>(), CTL_SIZE);
        let ctl = Ctl {
            readers: 1,
            sample_every: 2,
            rate: 3,
            burst: 4,
            pids: [5, 0, 0, 0, 0, 0, 0, 6],
        };
        assert_eq!(Ctl::decode(&ctl.encode()), ctl);
    }
}
