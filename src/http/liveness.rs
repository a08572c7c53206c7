//! `/livez`'s rule, kube-proxy's: the agent is live unless a change it
//! queued has stayed unapplied for longer than the health timeout (kube-proxy
//! uses twice its sync period). A sync loop stuck on a change (a wedged
//! syscall, a deadlock, a sync failing on every retry) thus makes kubelet
//! restart the agent, while a quiet agent with nothing queued stays live.
//! Pure: every call takes the time, so tests need no clock.

use std::time::Duration;

use tokio::time::Instant;

/// The default health timeout: twice kube-proxy's default `--sync-period`
/// (30 s), as kube-proxy's `healthz-bind-address` check uses.
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_secs(60);

/// When the oldest change not yet applied was queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    /// How long a queued change may stay unapplied.
    pub timeout: Duration,
    /// When the oldest unapplied change was queued; None: nothing pending.
    pub oldest_pending: Option<Instant>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            timeout: DEFAULT_LIVENESS_TIMEOUT,
            oldest_pending: None,
        }
    }
}

impl Liveness {
    /// A change was queued at `now` (the oldest pending one keeps its time).
    pub fn queued(&mut self, now: Instant) {
        self.oldest_pending.get_or_insert(now);
    }

    /// A sync applied what was queued before it.
    pub fn applied(&mut self) {
        self.oldest_pending = None;
    }

    /// How long the oldest pending change has waited past the timeout, at
    /// `now`; None while live.
    pub fn overdue(&self, now: Instant) -> Option<Duration> {
        let waited = now.saturating_duration_since(self.oldest_pending?);
        (waited > self.timeout).then_some(waited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(60);

    fn live() -> Liveness {
        Liveness {
            timeout: TIMEOUT,
            oldest_pending: None,
        }
    }

    #[test]
    fn an_agent_with_nothing_queued_is_live_however_long_it_is_quiet() {
        let t0 = Instant::now();
        assert_eq!(live().overdue(t0 + Duration::from_secs(86_400)), None);
    }

    #[test]
    fn a_change_unapplied_past_the_timeout_fails_liveness() {
        let t0 = Instant::now();
        let mut l = live();
        l.queued(t0);

        assert_eq!(l.overdue(t0 + TIMEOUT), None, "at the timeout: still live");
        let late = t0 + TIMEOUT + Duration::from_secs(1);
        assert_eq!(l.overdue(late), Some(TIMEOUT + Duration::from_secs(1)));
    }

    #[test]
    fn later_changes_do_not_reset_the_oldest_ones_wait() {
        let t0 = Instant::now();
        let mut l = live();
        l.queued(t0);
        // A change every 10 s, none applied: the first one's wait counts.
        for i in 1..=7 {
            l.queued(t0 + Duration::from_secs(10 * i));
        }
        assert!(l.overdue(t0 + Duration::from_secs(70)).is_some());
    }

    #[test]
    fn a_sync_that_applies_the_queue_makes_the_agent_live_again() {
        let t0 = Instant::now();
        let mut l = live();
        l.queued(t0);
        let late = t0 + TIMEOUT * 2;
        assert!(l.overdue(late).is_some());

        l.applied();

        assert_eq!(l.overdue(late), None);
        l.queued(late);
        assert_eq!(l.overdue(late + TIMEOUT), None, "a new change waits anew");
    }
}
