//! `kpr monitor`: the load balancer's decisions as they happen, from the
//! pinned ring buffer of bpf/include/lb_monitor.h. Works without the
//! agent: it turns the datapath's reporting on itself ([`control`]) and
//! off when it exits (also on Ctrl-C or SIGTERM), resolves ids to
//! addresses from the pinned maps and the client's cgroup to its path and
//! pod ([`resolve`]), filters, and prints readable lines or JSON lines
//! ([`render`]). At exit it says how many events the datapath emitted,
//! sampled out, rate-limited or lost (its `kpr_monstats_v1` counters, which
//! every running monitor shares).

#![deny(unsafe_code)]

pub mod control;
pub mod event;
pub mod render;
pub mod resolve;
pub mod tail;

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use libbpf_rs::{MapHandle, RingBufferBuilder};

use crate::datapath::lb_stats::{MonitorStats, Verdict};
use crate::datapath::pins::{pin_path, MapName};
pub use control::Budget;
use event::RawEvent;
pub use render::{Event, Filters};
use resolve::Resolver;

/// How often the loop wakes to check the bounds, signals and its switch.
const POLL: Duration = Duration::from_millis(100);

/// What `kpr monitor` was asked for.
#[derive(Clone, Debug)]
pub struct Options {
    pub bpf_root: PathBuf,
    /// JSON lines instead of readable ones.
    pub json: bool,
    pub filters: Filters,
    /// Stop after this many events shown.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    pub budget: Budget,
}

/// What a run saw, printed at exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// Events printed (after the filters).
    pub shown: u64,
    /// Events read from the ring buffer.
    pub received: u64,
    /// The datapath's counts over the run (every monitor's).
    pub datapath: MonitorStats,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Runs the monitor until a bound or a signal; prints events to stdout.
pub fn run(opts: &Options) -> Result<Summary> {
    crate::sys::on_signals(
        &[
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::Signal::SIGTERM,
        ],
        on_signal,
    )
    .context("installing the interrupt handler")?;
    let pin = pin_path(&opts.bpf_root, MapName::Events);
    let ring = MapHandle::from_pinned_path(&pin).with_context(|| {
        format!(
            "opening {} (has an agent of this version run with this --bpf-root?)",
            pin.display()
        )
    })?;
    let before = MonitorStats::read(&opts.bpf_root)?;
    let resolver = RefCell::new(Resolver::new(&opts.bpf_root));
    let summary = RefCell::new(Summary::default());
    let out = RefCell::new(std::io::stdout().lock());
    let registration = control::Registration::join(&opts.bpf_root, opts.budget)?;
    eprintln!(
        "kpr monitor: listening on {} (Ctrl-C to stop)",
        pin.display()
    );
    let mut builder = RingBufferBuilder::new();
    builder
        .add(&ring, |data: &[u8]| {
            handle(data, opts, &resolver, &summary, &out);
            0
        })
        .context("reading the event ring buffer")?;
    let rb = builder.build().context("reading the event ring buffer")?;
    let deadline = opts.duration.map(|d| Instant::now() + d);
    loop {
        if STOP.load(Ordering::SeqCst)
            || deadline.is_some_and(|d| Instant::now() >= d)
            || opts.count.is_some_and(|n| summary.borrow().shown >= n)
        {
            break;
        }
        // EINTR (a signal) is the loop's business, not an error.
        let _ = rb.poll(POLL);
        registration.refresh()?;
    }
    drop(registration);
    let after = MonitorStats::read(&opts.bpf_root)?;
    let mut s = *summary.borrow();
    s.datapath = after.since(&before);
    Ok(s)
}

/// One record: decode, resolve, filter, print.
fn handle(
    data: &[u8],
    opts: &Options,
    resolver: &RefCell<Resolver>,
    summary: &RefCell<Summary>,
    out: &RefCell<std::io::StdoutLock<'static>>,
) {
    let mut s = summary.borrow_mut();
    if opts.count.is_some_and(|n| s.shown >= n) {
        return;
    }
    let Some(raw) = RawEvent::decode(data) else {
        return;
    };
    s.received += 1;
    let event = Event::resolve(&raw, &mut resolver.borrow_mut());
    if !opts.filters.matches(&event) {
        return;
    }
    s.shown += 1;
    let line = if opts.json {
        event.json_line()
    } else {
        event.text_line()
    };
    use std::io::Write;
    let _ = writeln!(out.borrow_mut(), "{line}");
}

/// The summary as printed at exit (stderr).
pub fn summary_line(s: &Summary, json: bool) -> String {
    if json {
        return serde_json::json!({ "summary": s }).to_string();
    }
    let d = &s.datapath;
    format!(
        "{} events shown ({} received); datapath: {} emitted, {} sampled out, {} rate-limited, {} lost (ring buffer full)",
        s.shown, s.received, d.emitted, d.sampled_out, d.rate_limited, d.ringbuf_full
    )
}

/// Parses `--verdict`.
pub fn parse_verdict(s: &str) -> Result<Verdict, String> {
    Verdict::ALL
        .into_iter()
        .find(|v| v.as_str() == s)
        .ok_or_else(|| {
            let all: Vec<&str> = Verdict::ALL.iter().map(|v| v.as_str()).collect();
            format!("unknown verdict {s:?}; one of {}", all.join(", "))
        })
}
