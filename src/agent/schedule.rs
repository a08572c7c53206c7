//! When the Kubernetes source syncs, and how much: the watch loop's
//! scheduling decisions as a pure state machine, so that they can be tested
//! without a cluster, a kernel or a clock.
//!
//! The rules, kube-proxy's:
//! - Nothing is written before every watcher's initial list is complete: a
//!   restart while the API server is unreachable keeps the pinned state
//!   serving.
//! - A change is synced at once, unless the last sync ended less than
//!   `min_sync_period` ago: a burst of changes is coalesced into one sync.
//! - A sync whose map writes failed is retried after [`RETRY_PERIOD`], one
//!   that refused Services after [`REFUSED_RETRY_PERIOD`]; changes that come
//!   meanwhile wait for the retry.
//! - Every `sync_period` everything is synced again.
//! - The first sync, a resync, a retry and a sync after a relist or a change
//!   of the own Node (the store marks everything changed) translate every
//!   Service; any other sync only the Services that changed.

use std::time::Duration;

use tokio::time::Instant;

use super::syncer::Synced;
use crate::source::store::Changes;

/// Wait before retrying a sync that refused Services (the room a removal
/// frees is only usable on the sync after it).
pub const REFUSED_RETRY_PERIOD: Duration = Duration::from_secs(5);
/// Wait before retrying a sync whose map writes failed.
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// How long after a sync that ended as `synced` it is tried again: soon
/// after a write error; refusals only clear when something changes, so they
/// are retried slowly; a clean sync is not retried.
pub fn retry_delay(synced: Synced) -> Option<Duration> {
    match synced {
        Synced::Clean => None,
        Synced::Refused => Some(REFUSED_RETRY_PERIOD),
        Synced::Failed => Some(RETRY_PERIOD),
    }
}

/// Which Services a sync translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every Service, and entries no Service claims are pruned.
    Everything,
    /// Only the Services the store lists as changed.
    Changed,
}

/// The Kubernetes source's sync schedule. Fed what happened (lists
/// complete, something changed, a sync ended) with the time it happened,
/// it says when the loop must wake next and, once awake, whether a sync is
/// due and what it covers.
#[derive(Debug)]
pub struct SyncScheduler {
    min_sync_period: Duration,
    sync_period: Duration,
    /// Every watcher has delivered its initial list (never goes back).
    lists_complete: bool,
    /// The store holds changes not synced yet.
    pending: bool,
    /// A sync has run: the maps were written from the API's state once.
    synced_once: bool,
    /// When the last sync ended.
    last_sync: Option<Instant>,
    /// When the last sync, refused or failed, is tried again.
    retry_at: Option<Instant>,
    /// A resync period ended since the last sync.
    resync_due: bool,
    /// When the current resync period ends.
    next_resync: Instant,
}

impl SyncScheduler {
    /// A schedule starting at `now`, before any watcher has listed. A zero
    /// `sync_period` counts as one millisecond.
    pub fn new(min_sync_period: Duration, sync_period: Duration, now: Instant) -> SyncScheduler {
        let sync_period = sync_period.max(Duration::from_millis(1));
        SyncScheduler {
            min_sync_period,
            sync_period,
            lists_complete: false,
            pending: false,
            synced_once: false,
            last_sync: None,
            retry_at: None,
            resync_due: false,
            next_resync: now + sync_period,
        }
    }

    /// Every watcher has delivered its initial list.
    pub fn lists_complete(&mut self) {
        self.lists_complete = true;
    }

    /// The store holds changes to sync.
    pub fn changed(&mut self) {
        self.pending = true;
    }

    /// Everything is to be synced again (the datapath's pins were
    /// restored), as when a resync period ends.
    pub fn resync_now(&mut self) {
        self.resync_due = self.synced_once;
    }

    /// When the loop must wake next (asked at `now`): for a sync, or to
    /// start the next resync period.
    pub fn next_wake(&self, now: Instant) -> Instant {
        match self.sync_at(now) {
            Some(at) => at.min(self.next_resync),
            None => self.next_resync,
        }
    }

    /// Brings the schedule to `now` (a resync period that ended asks for a
    /// full sync) and says whether a sync is due.
    pub fn due(&mut self, now: Instant) -> bool {
        if self.next_resync <= now {
            // Periods missed while the loop was busy count once.
            let behind = now.duration_since(self.next_resync).as_nanos();
            let periods = behind / self.sync_period.as_nanos() + 1;
            self.next_resync += self.sync_period * u32::try_from(periods).unwrap_or(u32::MAX);
            self.resync_due = self.synced_once;
        }
        self.sync_at(now).is_some_and(|at| at <= now)
    }

    /// A sync starts with the `changes` just taken from the store: what it
    /// must translate.
    pub fn start(&mut self, changes: &Changes) -> Scope {
        let everything =
            !self.synced_once || changes.all || self.resync_due || self.retry_at.is_some();
        self.pending = false;
        self.resync_due = false;
        if everything {
            Scope::Everything
        } else {
            Scope::Changed
        }
    }

    /// The sync ended at `now` as `synced`: the next change waits for
    /// `min_sync_period`, and a sync that did not end clean is retried.
    pub fn finished(&mut self, synced: Synced, now: Instant) {
        self.synced_once = true;
        self.last_sync = Some(now);
        self.retry_at = retry_delay(synced).map(|delay| now + delay);
    }

    /// When the next sync is due, asked at `now`; None: nothing to sync.
    fn sync_at(&self, now: Instant) -> Option<Instant> {
        if self.lists_complete && (self.pending || self.resync_due) {
            let earliest = self
                .last_sync
                .map_or(now, |last| last + self.min_sync_period);
            Some(self.retry_at.map_or(earliest, |retry| retry.max(earliest)))
        } else {
            self.retry_at.filter(|_| self.synced_once)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(100);
    const PERIOD: Duration = Duration::from_secs(30);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn changed_services() -> Changes {
        Changes {
            services: ["default/web".to_string()].into(),
            ..Changes::default()
        }
    }

    fn relisted() -> Changes {
        Changes {
            all: true,
            ..Changes::default()
        }
    }

    /// A schedule whose lists completed at `t0` and whose first sync ran
    /// then, clean.
    fn after_first_sync(t0: Instant) -> SyncScheduler {
        let mut s = SyncScheduler::new(MIN, PERIOD, t0);
        s.lists_complete();
        s.changed();
        assert!(s.due(t0));
        assert_eq!(s.start(&changed_services()), Scope::Everything);
        s.finished(Synced::Clean, t0);
        s
    }

    /// Runs the syncs the schedule asks for up to `until`, waking only when
    /// it says, each sync ending clean when it starts; the times of the
    /// syncs and their scopes.
    fn run_until(
        s: &mut SyncScheduler,
        from: Instant,
        until: Instant,
        changes: impl Fn() -> Changes,
    ) -> Vec<(Instant, Scope)> {
        let mut syncs = Vec::new();
        let mut now = from;
        for _ in 0..10_000 {
            now = s.next_wake(now).max(now);
            if now > until {
                break;
            }
            if s.due(now) {
                syncs.push((now, s.start(&changes())));
                s.finished(Synced::Clean, now);
            }
        }
        syncs
    }

    #[test]
    fn nothing_is_written_before_every_initial_list_is_complete() {
        let t0 = Instant::now();
        let mut s = SyncScheduler::new(MIN, PERIOD, t0);
        s.changed();

        assert!(!s.due(t0));
        assert!(!s.due(t0 + ms(500)));
        assert_eq!(s.next_wake(t0), t0 + PERIOD, "only the resync period wakes");
        assert!(
            !s.due(t0 + PERIOD),
            "a resync before the first sync is none"
        );

        s.lists_complete();
        assert_eq!(s.next_wake(t0 + PERIOD), t0 + PERIOD);
        assert!(s.due(t0 + PERIOD));
    }

    #[test]
    fn the_first_sync_translates_every_service_even_for_one_change() {
        let t0 = Instant::now();
        let mut s = SyncScheduler::new(MIN, PERIOD, t0);
        s.lists_complete();
        s.changed();

        assert!(s.due(t0));
        assert_eq!(s.start(&changed_services()), Scope::Everything);
    }

    #[test]
    fn a_burst_of_changes_within_min_sync_period_is_one_sync() {
        let t0 = Instant::now();
        let mut s = after_first_sync(t0);

        for i in 1..=5 {
            s.changed();
            assert!(!s.due(t0 + ms(10 * i)), "change {i} waits");
        }
        assert_eq!(s.next_wake(t0 + ms(50)), t0 + MIN);
        assert!(s.due(t0 + MIN));
        assert_eq!(s.start(&changed_services()), Scope::Changed);
        s.finished(Synced::Clean, t0 + MIN);

        assert!(!s.due(t0 + MIN + ms(1)), "the burst left nothing to sync");
        assert_eq!(s.next_wake(t0 + MIN), t0 + PERIOD);
    }

    #[test]
    fn a_change_long_after_the_last_sync_is_synced_at_once() {
        let t0 = Instant::now();
        let mut s = after_first_sync(t0);
        let later = t0 + ms(5_000);

        s.changed();

        assert!(s.next_wake(later) <= later, "the loop wakes at once");
        assert!(s.due(later));
        assert_eq!(s.start(&changed_services()), Scope::Changed);
    }

    #[test]
    fn syncs_are_at_least_min_sync_period_apart_under_steady_changes() {
        let t0 = Instant::now();
        let mut s = after_first_sync(t0);
        let mut syncs = Vec::new();
        // A change every 7 ms for a second, each sync ending as it starts.
        for step in 1..=140u64 {
            let now = t0 + ms(7 * step);
            s.changed();
            if s.due(now) {
                assert_eq!(s.start(&changed_services()), Scope::Changed);
                s.finished(Synced::Clean, now);
                syncs.push(now);
            }
        }
        for pair in syncs.windows(2) {
            assert!(pair[1] - pair[0] >= MIN, "{:?}", pair[1] - pair[0]);
        }
        assert!(
            syncs.len() >= 8,
            "changes kept being synced: {}",
            syncs.len()
        );
    }

    #[test]
    fn a_failed_sync_is_retried_in_full_after_the_retry_period() {
        let t0 = Instant::now();
        let mut s = after_first_sync(t0);
        s.changed();
        let at = t0 + MIN;
        assert!(s.due(at));
        assert_eq!(s.start(&changed_services()), Scope::Changed);

        s.finished(Synced::Failed, at);

        assert_eq!(s.next_wake(at), at + RETRY_PERIOD);
        assert!(!s.due(at + RETRY_PERIOD - ms(1)));
        assert!(s.due(at + RETRY_PERIOD));
        assert_eq!(s.start(&Changes::default()), Scope::Everything);
        s.finished(Synced::Clean, at + RETRY_PERIOD);
        assert_eq!(
            s.next_wake(at + RETRY_PERIOD),
            t0 + PERIOD,
            "no more retries"
        );
    }

    #[test]
    fn a_sync_that_refused_services_is_retried_after_five_seconds() {
        let t0 = Instant::now();
        let mut s = after_first_sync(t0);

        s.finished(Synced::Refused, t0);

        assert_eq!(REFUSED_RETRY_PERIOD, Duration::from_secs(5));
        assert_eq!(s.next_wake(t0), t0 + REFUSED_RETRY_PERIOD);
        assert!(s.due(t0 + REFUSED_RETRY_PERIOD));
        assert_eq!(s.start(&Changes::default()), Scope::Everything);
    }

    #[test]
    fn changes_during_a_retry_wait_are_synced_with_the_retry() {
        let t0 = Instant::now();
        let mut s = after_first_sync(t0);
        s.finished(Synced::Failed, t0);

        s.changed();

        assert!(
            !s.due(t0 + MIN),
            "min_sync_period is over, the retry is not"
        );
        assert_eq!(s.next_wake(t0 + MIN), t0 + RETRY_PERIOD);
        assert!(s.due(t0 + RETRY_PERIOD));
        assert_eq!(s.start(&changed_services()), Scope::Everything);
    }

    #[test]
    fn everything_is_synced_again_every_sync_period() {
        let t0 = Instant::now();
        let mut s = after_first_sync(t0);

        let syncs = run_until(&mut s, t0, t0 + PERIOD * 3 + ms(1), Changes::default);

        assert_eq!(
            syncs,
            vec![
                (t0 + PERIOD, Scope::Everything),
                (t0 + PERIOD * 2, Scope::Everything),
                (t0 + PERIOD * 3, Scope::Everything),
            ]
        );
    }

    #[test]
    fn resync_periods_missed_while_busy_make_one_sync() {
        let t0 = Instant::now();
        let mut s = after_first_sync(t0);
        let late = t0 + PERIOD * 3 + ms(10);

        assert!(s.due(late));
        assert_eq!(s.start(&Changes::default()), Scope::Everything);
        s.finished(Synced::Clean, late);

        assert!(!s.due(late + MIN));
        assert_eq!(
            s.next_wake(late),
            t0 + PERIOD * 4,
            "periods keep their phase"
        );
    }

    #[test]
    fn a_relist_makes_the_next_sync_translate_every_service() {
        let t0 = Instant::now();
        let mut s = after_first_sync(t0);
        let later = t0 + ms(1_000);

        s.changed();

        assert!(s.due(later));
        assert_eq!(s.start(&relisted()), Scope::Everything);
    }

    #[test]
    fn a_change_after_a_resync_translates_only_the_changed_services() {
        let t0 = Instant::now();
        let mut s = after_first_sync(t0);
        assert!(s.due(t0 + PERIOD));
        assert_eq!(s.start(&Changes::default()), Scope::Everything);
        s.finished(Synced::Clean, t0 + PERIOD);

        s.changed();

        assert!(s.due(t0 + PERIOD + MIN));
        assert_eq!(s.start(&changed_services()), Scope::Changed);
    }

    /// The loop as the agent runs it, on tokio's paused clock: changes
    /// arrive on a channel, the loop sleeps until the schedule's next wake.
    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_on_the_paused_clock_is_synced_once_after_min_sync_period() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
        let t0 = Instant::now();
        tokio::spawn(async move {
            // The initial list, then a burst of five changes 10 ms apart.
            for _ in 0..6 {
                if tx.send(()).await.is_err() {
                    return;
                }
                tokio::time::sleep(ms(10)).await;
            }
        });
        let mut s = SyncScheduler::new(MIN, PERIOD, t0);
        let mut syncs = Vec::new();
        let end = t0 + ms(1_000);
        while Instant::now() < end {
            tokio::select! {
                Some(()) = rx.recv() => {
                    s.lists_complete();
                    s.changed();
                }
                _ = tokio::time::sleep_until(s.next_wake(Instant::now()).min(end)) => {
                    let now = Instant::now();
                    if s.due(now) {
                        syncs.push((now - t0, s.start(&changed_services())));
                        s.finished(Synced::Clean, now);
                    }
                }
            }
        }

        assert_eq!(
            syncs,
            vec![(ms(0), Scope::Everything), (MIN, Scope::Changed)],
            "the initial list at once, the burst after {MIN:?} in one sync"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_sync_is_retried_every_two_seconds_on_the_paused_clock() {
        let t0 = Instant::now();
        let mut s = SyncScheduler::new(MIN, PERIOD, t0);
        s.lists_complete();
        s.changed();
        let mut attempts = Vec::new();
        for _ in 0..4 {
            tokio::time::sleep_until(s.next_wake(Instant::now())).await;
            let now = Instant::now();
            assert!(s.due(now));
            attempts.push((now - t0, s.start(&Changes::default())));
            s.finished(Synced::Failed, now);
        }

        assert_eq!(
            attempts,
            vec![
                (ms(0), Scope::Everything),
                (RETRY_PERIOD, Scope::Everything),
                (RETRY_PERIOD * 2, Scope::Everything),
                (RETRY_PERIOD * 3, Scope::Everything),
            ]
        );
    }
}
