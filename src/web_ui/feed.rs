//! The live tail behind `/ui/events`: a broadcast of JSON lines, one per
//! event, that any part of the agent may publish to ([`EventSink`]) and
//! every open page receives as server-sent events: the syncer publishes
//! each sync that changed something (`"kind":"sync"`), and while a page
//! listens the monitor's ring buffer reader (`crate::monitor::tail`)
//! publishes every load-balancing decision (`"kind":"flow"`).
//!
//! A slow page loses events rather than holding memory: the channel keeps
//! the last [`BACKLOG`] lines, a receiver behind that skips ahead and is
//! told how many it missed.

use std::sync::Arc;

use tokio::sync::broadcast;

/// Lines kept for receivers that lag.
pub const BACKLOG: usize = 1024;

/// Where events go: one JSON object per call, without a newline.
pub trait EventSink: Send + Sync {
    fn publish(&self, json_line: String);
}

/// The broadcast the pages subscribe to. Cloning shares it.
#[derive(Clone)]
pub struct EventFeed {
    tx: broadcast::Sender<Arc<str>>,
}

impl Default for EventFeed {
    fn default() -> Self {
        EventFeed {
            tx: broadcast::channel(BACKLOG).0,
        }
    }
}

impl EventFeed {
    pub fn new() -> EventFeed {
        EventFeed::default()
    }

    /// How many pages listen now.
    pub fn listeners(&self) -> usize {
        self.tx.receiver_count()
    }

    /// A receiver of every line published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.tx.subscribe()
    }
}

impl EventSink for EventFeed {
    fn publish(&self, json_line: String) {
        // No page open: nobody to tell, not an error.
        let _ = self.tx.send(json_line.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscriber_gets_what_is_published_after_it_subscribed() {
        let feed = EventFeed::new();
        feed.publish(r#"{"before":1}"#.into());
        let mut rx = feed.subscribe();
        feed.publish(r#"{"kind":"sync"}"#.into());
        assert_eq!(&*rx.try_recv().unwrap(), r#"{"kind":"sync"}"#);
        assert!(rx.try_recv().is_err());
    }
}
