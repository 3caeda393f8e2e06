//! The fleet's breaker signal: the runtime outcomes of every replica, read from Prometheus, as
//! one replica's breaker may use them.
//!
//! A reading is the fleet's runtime executions, errors and timeouts over `breaker.window_secs`
//! (the shipped recording rule `job_outcome:chat_runtime_executions:increase5m`), taken at an
//! instant of this replica's clock (when the query was sent: the data can only be older). The
//! breaker opens on a reading that crosses its thresholds with at least `min_requests` samples
//! fleet-wide; probes and closing stay local. Two rules keep a replica that has just closed from
//! being reopened by failures it has already recovered from:
//!
//! - a reading taken at or before the last close never counts;
//! - a reading taken after it, while its window still reaches back before the close, counts
//!   only what it holds beyond the last reading taken before the close ([`FleetSignal`]'s
//!   baseline), read conservatively: the failures that can only be new, over every request the
//!   window can hold. After `window` has passed since the close the reading counts whole.
//!
//! All pure: time is passed in.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The fleet's runtime outcomes over the window, summed over every replica. Prometheus'
/// `increase()` extrapolates, so counts may be fractional.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FleetCounts {
    pub total: f64,
    pub error: f64,
    pub timeout: f64,
}

impl FleetCounts {
    /// Counts that are numbers, not negative, and add up (errors and timeouts within the total,
    /// to a request of rounding): what a sane recording rule returns.
    pub fn is_plausible(&self) -> bool {
        let finite = [self.total, self.error, self.timeout]
            .iter()
            .all(|v| v.is_finite() && *v >= 0.0);
        finite && self.error + self.timeout <= self.total + 1.0
    }
}

/// One reading of the fleet, taken at `taken_at` (when the query left: the data is no newer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FleetReading {
    pub taken_at: Instant,
    pub counts: FleetCounts,
}

/// What a reading says against the thresholds: its samples and rates, each a lower bound when
/// the reading is judged against the baseline of a close.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FleetEvidence {
    pub samples: f64,
    pub error_rate: f64,
    pub timeout_rate: f64,
    /// Only what arrived since this replica last closed.
    pub since_close: bool,
}

impl fmt::Display for FleetEvidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.0} requests, error rate {:.2}, timeout rate {:.2}",
            self.samples, self.error_rate, self.timeout_rate
        )
    }
}

fn rate(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        (part / whole).clamp(0.0, 1.0)
    } else {
        0.0
    }
}

impl FleetEvidence {
    /// A reading taken whole.
    pub fn whole(c: &FleetCounts) -> Self {
        FleetEvidence {
            samples: c.total,
            error_rate: rate(c.error, c.total),
            timeout_rate: rate(c.timeout, c.total),
            since_close: false,
        }
    }

    /// What `now` holds beyond `before` (a reading of the same window taken before the close),
    /// as lower bounds: the requests that left the window in between are unknown, so the
    /// failures counted are only those that can only be new (the growth of each count), and
    /// the requests they are a share of include every success and timeout (for the error rate;
    /// successes and errors for the timeout rate) `before` held, which may still be in the
    /// window. The samples are at least the growth of the total.
    pub fn since(before: &FleetCounts, now: &FleetCounts) -> Self {
        let grown = |a: f64, b: f64| (b - a).max(0.0);
        let (total, error, timeout) = (
            grown(before.total, now.total),
            grown(before.error, now.error),
            grown(before.timeout, now.timeout),
        );
        let others = |failures: f64| (before.total - failures).max(0.0);
        FleetEvidence {
            samples: total.max(error).max(timeout),
            error_rate: rate(error, (total + others(before.error)).max(error)),
            timeout_rate: rate(timeout, (total + others(before.timeout)).max(timeout)),
            since_close: true,
        }
    }
}

/// A replica's view of the fleet's readings: the last close, the baseline of that close, the
/// newest reading.
#[derive(Debug, Clone, Default)]
pub struct FleetSignal {
    last_close: Option<Instant>,
    /// The newest reading taken at or before the last close (or, with none, the first one after
    /// it, all of which is taken as old).
    baseline: Option<FleetReading>,
    latest: Option<FleetReading>,
}

impl FleetSignal {
    /// The breaker closed at `now`: readings from then on are judged against the newest one
    /// taken before.
    pub fn closed(&mut self, now: Instant) {
        self.last_close = Some(now);
        self.baseline = self.latest.filter(|r| r.taken_at <= now);
    }

    /// Take a reading in; what it says against the thresholds (`window`: `breaker.window_secs`),
    /// or `None` when it must not count: taken at or before the last close, or the first after
    /// a close that had no reading before it (it becomes the baseline).
    pub fn observe(&mut self, r: FleetReading, window: Duration) -> Option<FleetEvidence> {
        if self.latest.is_none_or(|l| r.taken_at >= l.taken_at) {
            self.latest = Some(r);
        }
        let Some(close) = self.last_close else {
            return Some(FleetEvidence::whole(&r.counts));
        };
        if r.taken_at <= close {
            if self.baseline.is_none_or(|b| r.taken_at > b.taken_at) {
                self.baseline = Some(r);
            }
            return None;
        }
        if r.taken_at.saturating_duration_since(close) >= window {
            return Some(FleetEvidence::whole(&r.counts));
        }
        match self.baseline {
            Some(b) => Some(FleetEvidence::since(&b.counts, &r.counts)),
            None => {
                self.baseline = Some(r);
                None
            }
        }
    }

    pub fn last_close(&self) -> Option<Instant> {
        self.last_close
    }

    pub fn latest(&self) -> Option<&FleetReading> {
        self.latest.as_ref()
    }
}

/// Where the fleet signal stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetState {
    /// `[fleet] prometheus_url` is empty.
    Off,
    /// The last poll gave a reading.
    Ok,
    /// Prometheus could not be reached, was too slow or answered 5xx.
    Unavailable,
    /// It answered something else than the fleet's counts.
    Invalid,
}

impl FleetState {
    pub fn as_str(self) -> &'static str {
        match self {
            FleetState::Off => "off",
            FleetState::Ok => "ok",
            FleetState::Unavailable => "unavailable",
            FleetState::Invalid => "invalid",
        }
    }
}

/// The poller's last word, for `GET /runtime/fallback/status`.
#[derive(Debug)]
pub struct FleetStatus {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: FleetState,
    detail: String,
    last: Option<(Instant, FleetCounts)>,
}

impl Default for FleetStatus {
    fn default() -> Self {
        FleetStatus {
            inner: Mutex::new(Inner {
                state: FleetState::Off,
                detail: String::new(),
                last: None,
            }),
        }
    }
}

impl FleetStatus {
    pub fn state(&self) -> FleetState {
        self.inner.lock().unwrap().state
    }

    /// Record where it stands; the previous state, so the caller logs changes only.
    pub fn set(&self, state: FleetState, detail: String) -> FleetState {
        let mut i = self.inner.lock().unwrap();
        let before = i.state;
        i.state = state;
        i.detail = detail;
        before
    }

    pub fn reading(&self, taken_at: Instant, counts: FleetCounts) {
        self.inner.lock().unwrap().last = Some((taken_at, counts));
    }

    /// `{"state","detail","lastReading":{"total","error","timeout","ageMs"}|null}`.
    pub fn to_json(&self, now: Instant) -> Value {
        let i = self.inner.lock().unwrap();
        let last = i.last.map(|(at, c)| {
            json!({
                "total": c.total,
                "error": c.error,
                "timeout": c.timeout,
                "ageMs": now.saturating_duration_since(at).as_millis() as u64,
            })
        });
        json!({"state": i.state.as_str(), "detail": i.detail, "lastReading": last})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn counts(total: f64, error: f64, timeout: f64) -> FleetCounts {
        FleetCounts {
            total,
            error,
            timeout,
        }
    }

    fn at(t0: Instant, secs: u64, c: FleetCounts) -> FleetReading {
        FleetReading {
            taken_at: t0 + Duration::from_secs(secs),
            counts: c,
        }
    }

    const W: Duration = Duration::from_secs(300);

    #[test]
    fn before_any_close_a_reading_counts_whole() {
        let t0 = Instant::now();
        let mut s = FleetSignal::default();
        let e = s.observe(at(t0, 1, counts(20.0, 12.0, 2.0)), W).unwrap();
        assert_eq!(
            e,
            FleetEvidence {
                samples: 20.0,
                error_rate: 0.6,
                timeout_rate: 0.1,
                since_close: false
            }
        );
        assert_eq!(s.latest().unwrap().counts.total, 20.0);
    }

    #[test]
    fn a_reading_taken_before_the_close_never_counts() {
        let t0 = Instant::now();
        let mut s = FleetSignal::default();
        s.closed(t0 + Duration::from_secs(10));
        assert_eq!(s.observe(at(t0, 9, counts(20.0, 20.0, 0.0)), W), None);
        assert_eq!(s.observe(at(t0, 10, counts(20.0, 20.0, 0.0)), W), None);
        // It is the baseline now: the same failures read after the close are nothing new.
        let e = s.observe(at(t0, 12, counts(20.0, 20.0, 0.0)), W).unwrap();
        assert_eq!((e.samples, e.error_rate), (0.0, 0.0));
        assert!(e.since_close);
    }

    #[test]
    fn old_failures_do_not_reopen_a_replica_that_closed() {
        let t0 = Instant::now();
        let mut s = FleetSignal::default();
        // The fleet failed; this replica opened, probed and closed at 40 s.
        s.observe(at(t0, 35, counts(12.0, 10.0, 0.0)), W);
        s.closed(t0 + Duration::from_secs(40));
        // After the close the window still holds those failures, plus new successes.
        let e = s.observe(at(t0, 45, counts(18.0, 10.0, 0.0)), W).unwrap();
        assert_eq!((e.samples, e.error_rate), (6.0, 0.0));
        // New failures count, as a share of every request the window may hold.
        let e = s.observe(at(t0, 50, counts(30.0, 20.0, 0.0)), W).unwrap();
        assert_eq!(e.samples, 18.0);
        assert!((e.error_rate - 10.0 / 20.0).abs() < 1e-12, "{e:?}");
        // Once the window is all after the close, a reading counts whole again.
        let e = s.observe(at(t0, 340, counts(30.0, 20.0, 0.0)), W).unwrap();
        assert!(!e.since_close);
        assert_eq!((e.samples, e.error_rate), (30.0, 20.0 / 30.0));
    }

    #[test]
    fn with_no_reading_before_the_close_the_first_after_it_is_the_baseline() {
        let t0 = Instant::now();
        let mut s = FleetSignal::default();
        s.closed(t0);
        assert_eq!(s.observe(at(t0, 5, counts(10.0, 10.0, 0.0)), W), None);
        let e = s.observe(at(t0, 10, counts(25.0, 25.0, 0.0)), W).unwrap();
        assert_eq!((e.samples, e.error_rate), (15.0, 1.0));
    }

    #[test]
    fn a_reading_older_than_the_newest_does_not_replace_it() {
        let t0 = Instant::now();
        let mut s = FleetSignal::default();
        s.observe(at(t0, 5, counts(10.0, 1.0, 0.0)), W);
        s.observe(at(t0, 3, counts(99.0, 99.0, 0.0)), W);
        assert_eq!(s.latest().unwrap().counts.total, 10.0);
        s.closed(t0 + Duration::from_secs(6));
        assert_eq!(s.last_close(), Some(t0 + Duration::from_secs(6)));
        let e = s.observe(at(t0, 7, counts(10.0, 1.0, 0.0)), W).unwrap();
        assert_eq!(e.samples, 0.0);
    }

    #[test]
    fn plausible_counts() {
        assert!(counts(10.0, 4.0, 6.0).is_plausible());
        assert!(
            counts(10.2, 10.9, 0.0).is_plausible(),
            "rounding of increase()"
        );
        assert!(!counts(10.0, 8.0, 8.0).is_plausible());
        assert!(!counts(f64::NAN, 0.0, 0.0).is_plausible());
        assert!(!counts(-1.0, 0.0, 0.0).is_plausible());
        assert!(!counts(f64::INFINITY, 0.0, 0.0).is_plausible());
    }

    proptest! {
        /// Whatever aged out of the window between the baseline and the reading, the evidence
        /// since the close never reads more samples or higher rates than what really arrived
        /// since the close.
        #[test]
        fn since_close_never_overstates(
            old_ok in 0u32..50, old_err in 0u32..50, old_to in 0u32..20,
            gone_ok in 0u32..50, gone_err in 0u32..50, gone_to in 0u32..20,
            new_ok in 0u32..50, new_err in 0u32..50, new_to in 0u32..20,
        ) {
            // The baseline held old_*; by the reading gone_* of those have left the window
            // and new_* arrived.
            let (gone_ok, gone_err, gone_to) = (gone_ok.min(old_ok), gone_err.min(old_err), gone_to.min(old_to));
            let f = |x: u32| f64::from(x);
            let before = counts(f(old_ok + old_err + old_to), f(old_err), f(old_to));
            let now = counts(
                f(old_ok - gone_ok + old_err - gone_err + old_to - gone_to + new_ok + new_err + new_to),
                f(old_err - gone_err + new_err),
                f(old_to - gone_to + new_to),
            );
            let e = FleetEvidence::since(&before, &now);
            let new_total = f(new_ok + new_err + new_to);
            prop_assert!(e.samples <= new_total + 1e-9);
            if new_total > 0.0 {
                prop_assert!(e.error_rate <= f(new_err) / new_total + 1e-9, "{:?}", e);
                prop_assert!(e.timeout_rate <= f(new_to) / new_total + 1e-9, "{:?}", e);
            } else {
                prop_assert_eq!((e.error_rate, e.timeout_rate), (0.0, 0.0));
            }
        }
    }
}
