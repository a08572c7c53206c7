//! The agent's reader of the event ring buffer for the web view's live
//! tail (`crate::web_ui::feed`). It joins as a monitor ([`control`]) only
//! while a page listens, so reporting stays off in the datapath when no
//! one looks, and with a smaller budget than `kpr monitor`'s default: a
//! browser tab is not worth more than [`WEB_BUDGET`]. Each event is
//! published as the JSON line `kpr monitor -o json` prints, with
//! `"kind":"flow"`.

#![deny(unsafe_code)]

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use libbpf_rs::{MapHandle, RingBufferBuilder};

use super::control::{self, Budget};
use super::event::RawEvent;
use super::render::Event;
use super::resolve::Resolver;
use crate::datapath::pins::{pin_path, MapName};
use crate::web_ui::{EventFeed, EventSink};

/// Every decision, at most 200 a second per CPU (50 at once).
const WEB_BUDGET: Budget = Budget {
    sample_every: 1,
    rate: 200,
    burst: 50,
};
/// How often an idle reader looks for a page, and a reading one for its end.
const POLL: Duration = Duration::from_millis(200);
/// After a failure (no pinned ring buffer, a `kpr monitor` reading).
const RETRY: Duration = Duration::from_secs(2);

/// Feeds `feed` from the ring buffer under `bpf_root` while pages listen,
/// until `stop` resolves.
pub async fn run(bpf_root: PathBuf, feed: EventFeed, stop: impl std::future::Future<Output = ()>) {
    let stopping = Arc::new(AtomicBool::new(false));
    let reader = {
        let stopping = stopping.clone();
        tokio::task::spawn_blocking(move || tail(&bpf_root, &feed, &stopping))
    };
    stop.await;
    stopping.store(true, Ordering::SeqCst);
    let _ = reader.await;
}

fn tail(bpf_root: &Path, feed: &EventFeed, stopping: &AtomicBool) {
    while !stopping.load(Ordering::SeqCst) {
        if feed.listeners() == 0 {
            std::thread::sleep(POLL);
            continue;
        }
        if let Err(e) = read_while_listened(bpf_root, feed, stopping) {
            tracing::debug!(error = %format!("{e:#}"), "the web view's event tail");
            std::thread::sleep(RETRY);
        }
    }
}

/// One registration: from the first page to the last leaving.
fn read_while_listened(bpf_root: &Path, feed: &EventFeed, stopping: &AtomicBool) -> Result<()> {
    let pin = pin_path(bpf_root, MapName::Events);
    let ring =
        MapHandle::from_pinned_path(&pin).with_context(|| format!("opening {}", pin.display()))?;
    let registration = control::Registration::join(bpf_root, WEB_BUDGET)?;
    let resolver = RefCell::new(Resolver::new(bpf_root));
    let mut builder = RingBufferBuilder::new();
    builder
        .add(&ring, |data: &[u8]| {
            if let Some(raw) = RawEvent::decode(data) {
                let event = Event::resolve(&raw, &mut resolver.borrow_mut());
                feed.publish(flow_line(&event));
            }
            0
        })
        .context("reading the event ring buffer")?;
    let rb = builder.build().context("reading the event ring buffer")?;
    while feed.listeners() > 0 && !stopping.load(Ordering::SeqCst) {
        // EINTR is no reason to stop reading.
        let _ = rb.poll(POLL);
        registration.refresh()?;
    }
    Ok(())
}

/// `event` as `kpr monitor -o json` prints it, with `"kind":"flow"`.
fn flow_line(event: &Event) -> String {
    let mut v = serde_json::to_value(event).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("kind".into(), "flow".into());
    }
    v.to_string()
}
