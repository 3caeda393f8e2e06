//! Sliding-window counters of chat execution outcomes (success, error, timeout, latency), kept in
//! a fixed ring of time buckets so recording is O(1) and memory stays bounded.
//! The breaker judges the runtime over one such [`Window`], and the admin API reports per-mode and
//! per-org windows from [`ExecutionStats`]; time is passed in as an `Instant`, never read here.

use std::fmt;
use std::time::{Duration, Instant};

use serde::ser::SerializeStruct;

use crate::core::config::Mode;
use crate::core::recent::RecentOrgs;

/// Number of buckets a [`Window`] splits its span into: the window slides in steps of
/// `span / DEFAULT_BUCKETS` (5 s for the default 300 s window).
pub const DEFAULT_BUCKETS: usize = 60;

/// How one execution ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Success,
    Error,
    Timeout,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
        }
    }

    /// `Error` or `Timeout`.
    pub fn is_failure(self) -> bool {
        self != Outcome::Success
    }
}

/// The label of an execution that may have no outcome: `None` (the client went away, the proxy
/// shut down) is counted and logged as `cancelled`.
pub fn outcome_label(outcome: Option<Outcome>) -> &'static str {
    outcome.map_or("cancelled", Outcome::as_str)
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Totals over a window.
///
/// Serialises exactly as the admin API's `M` object:
/// `{"total","success","error","timeout","avgLatencyMs","errorRate","timeoutRate"}` (rates in
/// 0..=1, `avgLatencyMs` a number; all 0 when `total` is 0).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WindowStats {
    pub total: u64,
    pub success: u64,
    pub error: u64,
    pub timeout: u64,
    /// Sum of the latencies of all `total` executions (whatever their outcome).
    pub total_latency: Duration,
}

impl WindowStats {
    /// Mean latency in milliseconds over all executions; 0 when there are none.
    pub fn avg_latency_ms(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.total_latency.as_secs_f64() * 1000.0 / self.total as f64
        }
    }

    /// Mean latency over all executions; zero when there are none.
    pub fn avg_latency(&self) -> Duration {
        if self.total == 0 {
            Duration::ZERO
        } else {
            duration_from_nanos(self.total_latency.as_nanos() / u128::from(self.total))
        }
    }

    /// `error / total`, 0 when `total` is 0.
    pub fn error_rate(&self) -> f64 {
        ratio(self.error, self.total)
    }

    /// `timeout / total`, 0 when `total` is 0.
    pub fn timeout_rate(&self) -> f64 {
        ratio(self.timeout, self.total)
    }

    /// Add another window's totals to these (e.g. to sum several orgs).
    pub fn merge(&mut self, other: &WindowStats) {
        self.total += other.total;
        self.success += other.success;
        self.error += other.error;
        self.timeout += other.timeout;
        self.total_latency = self.total_latency.saturating_add(other.total_latency);
    }
}

impl serde::Serialize for WindowStats {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("WindowStats", 7)?;
        s.serialize_field("total", &self.total)?;
        s.serialize_field("success", &self.success)?;
        s.serialize_field("error", &self.error)?;
        s.serialize_field("timeout", &self.timeout)?;
        s.serialize_field("avgLatencyMs", &self.avg_latency_ms())?;
        s.serialize_field("errorRate", &self.error_rate())?;
        s.serialize_field("timeoutRate", &self.timeout_rate())?;
        s.end()
    }
}

fn ratio(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        part as f64 / total as f64
    }
}

/// A `Duration` from a nanosecond count that may exceed `u64`.
fn duration_from_nanos(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let secs = nanos / NANOS_PER_SEC;
    match u64::try_from(secs) {
        Ok(secs) => Duration::new(secs, (nanos % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Index (since the window's origin, in bucket widths) of the interval this bucket holds.
    epoch: u64,
    success: u64,
    error: u64,
    timeout: u64,
    latency_nanos: u64,
}

/// A sliding window of outcomes over `span`, as a ring of time buckets.
///
/// The ring holds [`DEFAULT_BUCKETS`] buckets of `span / buckets` each; a bucket is reused (and
/// its old counts dropped) the first time a record lands in it after it expired, and expired
/// buckets are skipped by [`Window::snapshot`]. So `record` is O(1), `snapshot` is O(buckets),
/// and memory does not grow with traffic. A snapshot covers the current (partial) bucket and the
/// `buckets - 1` before it: samples younger than `buckets - 1` bucket widths (about
/// `span - span / buckets`) always count, samples `span` old or older never do.
#[derive(Debug, Clone)]
pub struct Window {
    span: Duration,
    width_nanos: u128,
    origin: Instant,
    buckets: Vec<Bucket>,
}

impl Window {
    /// An empty window of [`DEFAULT_BUCKETS`] buckets over `span`.
    pub fn new(span: Duration, now: Instant) -> Self {
        Self::with_buckets(span, DEFAULT_BUCKETS, now)
    }

    /// An empty window over `span` split into `buckets` buckets (at least 1).
    pub fn with_buckets(span: Duration, buckets: usize, now: Instant) -> Self {
        let n = buckets.max(1);
        Window {
            span,
            width_nanos: (span.as_nanos() / n as u128).max(1),
            origin: now,
            buckets: vec![Bucket::default(); n],
        }
    }

    fn index(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(since / self.width_nanos).unwrap_or(u64::MAX)
    }

    /// Count one execution. A sample whose time is already outside the window (time going
    /// backwards past the newest bucket) is dropped.
    pub fn record(&mut self, outcome: Outcome, latency: Duration, now: Instant) {
        let idx = self.index(now);
        let n = self.buckets.len();
        let bucket = &mut self.buckets[(idx % n as u64) as usize];
        if bucket.epoch != idx {
            if bucket.epoch > idx {
                return;
            }
            *bucket = Bucket {
                epoch: idx,
                ..Bucket::default()
            };
        }
        match outcome {
            Outcome::Success => bucket.success += 1,
            Outcome::Error => bucket.error += 1,
            Outcome::Timeout => bucket.timeout += 1,
        }
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        bucket.latency_nanos = bucket.latency_nanos.saturating_add(nanos);
    }

    /// Totals over the buckets that have not expired at `now`.
    pub fn snapshot(&self, now: Instant) -> WindowStats {
        let cur = self.index(now);
        let n = self.buckets.len() as u64;
        let mut stats = WindowStats::default();
        let mut latency: u128 = 0;
        for b in &self.buckets {
            // Buckets from the future (a caller's clock read before another's) count too.
            if cur.saturating_sub(b.epoch) < n {
                stats.success += b.success;
                stats.error += b.error;
                stats.timeout += b.timeout;
                latency += u128::from(b.latency_nanos);
            }
        }
        stats.total = stats.success + stats.error + stats.timeout;
        stats.total_latency = duration_from_nanos(latency);
        stats
    }

    /// Forget every sample.
    pub fn clear(&mut self, now: Instant) {
        self.origin = now;
        self.buckets.fill(Bucket::default());
    }

    /// Change the span (config reload). An unchanged span keeps the samples; a changed one
    /// starts the window afresh at `now`.
    pub fn set_span(&mut self, span: Duration, now: Instant) {
        if span != self.span {
            *self = Self::with_buckets(span, self.buckets.len(), now);
        }
    }

    pub fn span(&self) -> Duration {
        self.span
    }

    /// Number of buckets in the ring; fixed for the life of the window.
    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// Time covered by one bucket: the step in which the window slides.
    pub fn bucket_width(&self) -> Duration {
        duration_from_nanos(self.width_nanos)
    }
}

#[derive(Debug, Clone)]
struct OrgEntry {
    direct: Window,
    runtime: Window,
}

impl OrgEntry {
    fn window_mut(&mut self, mode: Mode) -> &mut Window {
        match mode {
            Mode::DirectLlm => &mut self.direct,
            Mode::RuntimeOrchestrator => &mut self.runtime,
        }
    }
}

/// Per-mode and per-org windows for the admin API.
///
/// At most `max_orgs` orgs are tracked ([`RecentOrgs`]).
#[derive(Debug, Clone)]
pub struct ExecutionStats {
    span: Duration,
    direct: Window,
    runtime: Window,
    orgs: RecentOrgs<OrgEntry>,
}

impl ExecutionStats {
    pub fn new(span: Duration, max_orgs: usize, now: Instant) -> Self {
        ExecutionStats {
            span,
            direct: Window::new(span, now),
            runtime: Window::new(span, now),
            orgs: RecentOrgs::new(max_orgs),
        }
    }

    fn window_mut(&mut self, mode: Mode) -> &mut Window {
        match mode {
            Mode::DirectLlm => &mut self.direct,
            Mode::RuntimeOrchestrator => &mut self.runtime,
        }
    }

    /// Count one execution in `mode`, and for `org` when given.
    pub fn record(
        &mut self,
        mode: Mode,
        org: Option<&str>,
        outcome: Outcome,
        latency: Duration,
        now: Instant,
    ) {
        self.window_mut(mode).record(outcome, latency, now);
        let Some(org) = org else { return };
        let span = self.span;
        let entry = self.orgs.record(org, || OrgEntry {
            direct: Window::new(span, now),
            runtime: Window::new(span, now),
        });
        if let Some(entry) = entry {
            entry.window_mut(mode).record(outcome, latency, now);
        }
    }

    /// Totals of one mode over the window.
    pub fn snapshot(&self, mode: Mode, now: Instant) -> WindowStats {
        match mode {
            Mode::DirectLlm => self.direct.snapshot(now),
            Mode::RuntimeOrchestrator => self.runtime.snapshot(now),
        }
    }

    /// `(direct, runtime)` totals of one org, or `None` when it is not tracked (never seen, or
    /// evicted).
    pub fn org_snapshot(&self, org: &str, now: Instant) -> Option<(WindowStats, WindowStats)> {
        self.orgs
            .get(org)
            .map(|e| (e.direct.snapshot(now), e.runtime.snapshot(now)))
    }

    /// Apply a reloaded config: a changed span restarts every window (see
    /// [`Window::set_span`]); a lower `max_orgs` evicts the least recently recorded orgs.
    pub fn reconfigure(&mut self, span: Duration, max_orgs: usize, now: Instant) {
        if span != self.span {
            self.span = span;
            self.direct.set_span(span, now);
            self.runtime.set_span(span, now);
            for entry in self.orgs.values_mut() {
                entry.direct.set_span(span, now);
                entry.runtime.set_span(span, now);
            }
        }
        self.orgs.set_max(max_orgs);
    }

    /// Number of orgs currently tracked.
    pub fn org_count(&self) -> usize {
        self.orgs.len()
    }

    pub fn span(&self) -> Duration {
        self.span
    }

    pub fn max_orgs(&self) -> usize {
        self.orgs.max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn empty_window_is_all_zero() {
        let t0 = Instant::now();
        let w = Window::new(secs(60), t0);
        let s = w.snapshot(t0);
        assert_eq!(s, WindowStats::default());
        assert_eq!(s.avg_latency_ms(), 0.0);
        assert_eq!(s.error_rate(), 0.0);
        assert_eq!(s.timeout_rate(), 0.0);
        assert_eq!(s.avg_latency(), Duration::ZERO);
    }

    #[test]
    fn counts_rates_and_mean_latency() {
        let t0 = Instant::now();
        let mut w = Window::new(secs(60), t0);
        w.record(Outcome::Success, 100 * MS, t0);
        w.record(Outcome::Success, 200 * MS, t0 + secs(1));
        w.record(Outcome::Error, 300 * MS, t0 + secs(2));
        w.record(Outcome::Timeout, 400 * MS, t0 + secs(3));
        let s = w.snapshot(t0 + secs(3));
        assert_eq!((s.total, s.success, s.error, s.timeout), (4, 2, 1, 1));
        assert_eq!(s.error_rate(), 0.25);
        assert_eq!(s.timeout_rate(), 0.25);
        assert_eq!(s.avg_latency_ms(), 250.0);
        assert_eq!(s.avg_latency(), 250 * MS);
        assert_eq!(s.total_latency, 1000 * MS);
    }

    #[test]
    fn old_buckets_expire() {
        let t0 = Instant::now();
        // 60 buckets of 1 s.
        let mut w = Window::new(secs(60), t0);
        assert_eq!(w.bucket_width(), secs(1));
        w.record(Outcome::Error, MS, t0);
        w.record(Outcome::Success, MS, t0 + secs(30));
        assert_eq!(w.snapshot(t0 + secs(59)).total, 2);
        // At 60 s the bucket of t0 has slid out; the one of 30 s is still in.
        let s = w.snapshot(t0 + secs(60));
        assert_eq!((s.total, s.error, s.success), (1, 0, 1));
        assert_eq!(w.snapshot(t0 + secs(89) + 999 * MS).total, 1);
        assert_eq!(w.snapshot(t0 + secs(90)).total, 0);
        // Much later, everything is gone, and reusing the ring starts from clean buckets.
        let later = t0 + secs(3600);
        assert_eq!(w.snapshot(later).total, 0);
        w.record(Outcome::Timeout, MS, later);
        let s = w.snapshot(later);
        assert_eq!((s.total, s.timeout), (1, 1));
    }

    #[test]
    fn reused_slot_drops_its_old_counts() {
        let t0 = Instant::now();
        let mut w = Window::with_buckets(secs(10), 10, t0);
        w.record(Outcome::Error, MS, t0);
        // 10 s later the same slot (index 10 % 10 == 0) is reused.
        w.record(Outcome::Success, MS, t0 + secs(10));
        let s = w.snapshot(t0 + secs(10));
        assert_eq!((s.total, s.success, s.error), (1, 1, 0));
    }

    #[test]
    fn sample_older_than_newest_bucket_in_its_slot_is_dropped() {
        let t0 = Instant::now();
        let mut w = Window::with_buckets(secs(10), 10, t0);
        w.record(Outcome::Success, MS, t0 + secs(10));
        // t0 maps to the same slot but an older interval: already outside the window.
        w.record(Outcome::Error, MS, t0);
        let s = w.snapshot(t0 + secs(10));
        assert_eq!((s.total, s.error), (1, 0));
        // A slightly late sample in a still-live bucket is kept.
        w.record(Outcome::Error, MS, t0 + secs(5));
        assert_eq!(w.snapshot(t0 + secs(10)).error, 1);
    }

    #[test]
    fn times_before_origin_land_in_first_bucket() {
        let t0 = Instant::now() + secs(10);
        let mut w = Window::new(secs(60), t0);
        w.record(Outcome::Success, MS, t0 - secs(5));
        assert_eq!(w.snapshot(t0).total, 1);
        assert_eq!(w.snapshot(t0 - secs(5)).total, 1);
    }

    #[test]
    fn million_records_keep_memory_bounded() {
        let t0 = Instant::now();
        let mut w = Window::new(secs(300), t0);
        let mut now = t0;
        for i in 0..1_000_000u64 {
            now += Duration::from_micros(900);
            let outcome = match i % 3 {
                0 => Outcome::Success,
                1 => Outcome::Error,
                _ => Outcome::Timeout,
            };
            w.record(outcome, MS, now);
        }
        assert_eq!(w.bucket_count(), DEFAULT_BUCKETS);
        assert_eq!(w.buckets.len(), DEFAULT_BUCKETS);
        assert_eq!(w.buckets.capacity(), DEFAULT_BUCKETS);
        // 900 s of traffic at one record per 0.9 ms: the 300 s window holds between 295 s and
        // 300 s worth of samples (295 / 0.0009 ≈ 327_778, 300 / 0.0009 ≈ 333_333).
        let total = w.snapshot(now).total;
        assert!((327_700..=333_400).contains(&total), "{total}");
    }

    #[test]
    fn clear_forgets_everything() {
        let t0 = Instant::now();
        let mut w = Window::new(secs(60), t0);
        w.record(Outcome::Error, MS, t0);
        w.clear(t0 + secs(1));
        assert_eq!(w.snapshot(t0 + secs(1)).total, 0);
        w.record(Outcome::Success, MS, t0 + secs(2));
        assert_eq!(w.snapshot(t0 + secs(2)).total, 1);
    }

    #[test]
    fn set_span_keeps_samples_when_unchanged_and_restarts_when_changed() {
        let t0 = Instant::now();
        let mut w = Window::new(secs(60), t0);
        w.record(Outcome::Error, MS, t0);
        w.set_span(secs(60), t0 + secs(1));
        assert_eq!(w.snapshot(t0 + secs(1)).total, 1);
        w.set_span(secs(10), t0 + secs(2));
        assert_eq!(w.span(), secs(10));
        assert_eq!(w.bucket_width(), Duration::from_nanos(10_000_000_000 / 60));
        assert_eq!(w.snapshot(t0 + secs(2)).total, 0);
        w.record(Outcome::Success, MS, t0 + secs(3));
        assert_eq!(w.snapshot(t0 + secs(11)).total, 1);
        assert_eq!(w.snapshot(t0 + secs(13)).total, 0);
    }

    #[test]
    fn tiny_and_zero_spans_do_not_panic() {
        let t0 = Instant::now();
        for span in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_nanos(59),
        ] {
            let mut w = Window::new(span, t0);
            assert_eq!(w.bucket_width(), Duration::from_nanos(1));
            w.record(Outcome::Success, MS, t0);
            assert_eq!(w.snapshot(t0).total, 1);
            assert_eq!(w.snapshot(t0 + MS).total, 0);
        }
    }

    #[test]
    fn huge_latencies_saturate() {
        let t0 = Instant::now();
        let mut w = Window::new(secs(60), t0);
        w.record(Outcome::Success, Duration::MAX, t0);
        w.record(Outcome::Success, Duration::MAX, t0);
        let s = w.snapshot(t0);
        assert_eq!(s.total, 2);
        assert!(s.avg_latency_ms() > 0.0);
    }

    #[test]
    fn window_stats_json_keys_are_the_admin_m_object() {
        let s = WindowStats {
            total: 4,
            success: 2,
            error: 1,
            timeout: 1,
            total_latency: 1000 * MS,
        };
        let v = serde_json::to_value(s).unwrap();
        let obj = v.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "avgLatencyMs",
                "error",
                "errorRate",
                "success",
                "timeout",
                "timeoutRate",
                "total"
            ]
        );
        assert_eq!(
            v,
            serde_json::json!({
                "total": 4, "success": 2, "error": 1, "timeout": 1,
                "avgLatencyMs": 250.0, "errorRate": 0.25, "timeoutRate": 0.25
            })
        );
        // Field order follows the contract.
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"total":4,"success":2,"error":1,"timeout":1,"avgLatencyMs":250.0,"errorRate":0.25,"timeoutRate":0.25}"#
        );
        let empty = serde_json::to_value(WindowStats::default()).unwrap();
        assert_eq!(
            empty,
            serde_json::json!({
                "total": 0, "success": 0, "error": 0, "timeout": 0,
                "avgLatencyMs": 0.0, "errorRate": 0.0, "timeoutRate": 0.0
            })
        );
    }

    #[test]
    fn merge_adds_totals() {
        let mut a = WindowStats {
            total: 2,
            success: 1,
            error: 1,
            timeout: 0,
            total_latency: 10 * MS,
        };
        a.merge(&WindowStats {
            total: 1,
            success: 0,
            error: 0,
            timeout: 1,
            total_latency: 20 * MS,
        });
        assert_eq!((a.total, a.success, a.error, a.timeout), (3, 1, 1, 1));
        assert_eq!(a.total_latency, 30 * MS);
    }

    #[test]
    fn names() {
        assert_eq!(Outcome::Timeout.to_string(), "timeout");
        assert_eq!(outcome_label(Some(Outcome::Success)), "success");
        assert_eq!(outcome_label(Some(Outcome::Error)), "error");
        assert_eq!(outcome_label(None), "cancelled");
        assert!(Outcome::Error.is_failure() && !Outcome::Success.is_failure());
    }

    #[test]
    fn execution_stats_per_mode_and_org() {
        let t0 = Instant::now();
        let mut st = ExecutionStats::new(secs(60), 10, t0);
        st.record(Mode::DirectLlm, Some("a"), Outcome::Success, 10 * MS, t0);
        st.record(
            Mode::RuntimeOrchestrator,
            Some("a"),
            Outcome::Error,
            20 * MS,
            t0,
        );
        st.record(
            Mode::RuntimeOrchestrator,
            Some("b"),
            Outcome::Timeout,
            30 * MS,
            t0,
        );
        st.record(
            Mode::RuntimeOrchestrator,
            None,
            Outcome::Success,
            40 * MS,
            t0,
        );
        let d = st.snapshot(Mode::DirectLlm, t0);
        let r = st.snapshot(Mode::RuntimeOrchestrator, t0);
        assert_eq!((d.total, d.success), (1, 1));
        assert_eq!((r.total, r.success, r.error, r.timeout), (3, 1, 1, 1));
        let (ad, ar) = st.org_snapshot("a", t0).unwrap();
        assert_eq!((ad.total, ar.total, ar.error), (1, 1, 1));
        let (bd, br) = st.org_snapshot("b", t0).unwrap();
        assert_eq!((bd.total, br.timeout), (0, 1));
        assert_eq!(st.org_snapshot("c", t0), None);
        assert_eq!(st.org_count(), 2);
        // Windows slide for orgs too.
        let (_, ar) = st.org_snapshot("a", t0 + secs(61)).unwrap();
        assert_eq!(ar.total, 0);
        assert_eq!(
            st.snapshot(Mode::RuntimeOrchestrator, t0 + secs(61)).total,
            0
        );
    }

    #[test]
    fn org_cap_evicts_least_recently_recorded() {
        let t0 = Instant::now();
        let mut st = ExecutionStats::new(secs(60), 3, t0);
        for org in ["a", "b", "c"] {
            st.record(Mode::DirectLlm, Some(org), Outcome::Success, MS, t0);
        }
        // "a" recorded again: "b" is now the least recently recorded.
        st.record(
            Mode::RuntimeOrchestrator,
            Some("a"),
            Outcome::Success,
            MS,
            t0,
        );
        // Reads do not count as use.
        assert!(st.org_snapshot("b", t0).is_some());
        st.record(Mode::DirectLlm, Some("d"), Outcome::Success, MS, t0);
        assert_eq!(st.org_count(), 3);
        assert!(st.org_snapshot("b", t0).is_none());
        for org in ["a", "c", "d"] {
            assert!(st.org_snapshot(org, t0).is_some(), "{org}");
        }
        st.record(Mode::DirectLlm, Some("e"), Outcome::Success, MS, t0);
        assert!(st.org_snapshot("c", t0).is_none());
        assert!(st.orgs.is_consistent());
        // Global totals are not affected by eviction.
        assert_eq!(st.snapshot(Mode::DirectLlm, t0).total, 5);
    }

    #[test]
    fn reconfigure_shrinks_cap_and_changes_span() {
        let t0 = Instant::now();
        let mut st = ExecutionStats::new(secs(60), 5, t0);
        for org in ["a", "b", "c", "d"] {
            st.record(Mode::DirectLlm, Some(org), Outcome::Success, MS, t0);
        }
        st.reconfigure(secs(60), 2, t0);
        assert_eq!(st.org_count(), 2);
        assert!(st.org_snapshot("c", t0).is_some() && st.org_snapshot("d", t0).is_some());
        assert_eq!(
            st.snapshot(Mode::DirectLlm, t0).total,
            4,
            "same span keeps data"
        );
        st.reconfigure(secs(10), 2, t0 + secs(1));
        assert_eq!(st.span(), secs(10));
        assert_eq!(st.max_orgs(), 2);
        assert_eq!(st.snapshot(Mode::DirectLlm, t0 + secs(1)).total, 0);
        st.record(
            Mode::RuntimeOrchestrator,
            Some("c"),
            Outcome::Error,
            MS,
            t0 + secs(2),
        );
        assert_eq!(st.org_snapshot("c", t0 + secs(2)).unwrap().1.error, 1);
        assert_eq!(st.org_snapshot("c", t0 + secs(13)).unwrap().1.error, 0);
    }

    #[test]
    fn zero_org_cap_tracks_no_orgs() {
        let t0 = Instant::now();
        let mut st = ExecutionStats::new(secs(60), 0, t0);
        st.record(Mode::DirectLlm, Some("a"), Outcome::Success, MS, t0);
        assert_eq!(st.org_count(), 0);
        assert_eq!(st.snapshot(Mode::DirectLlm, t0).total, 1);
    }

    proptest! {
        /// Against a naive list of samples: the window counts exactly the samples whose bucket is
        /// one of the last `n`, so every sample younger than `span - width` counts and none
        /// older than `span` does.
        #[test]
        fn window_matches_naive_model(
            buckets in 1usize..12,
            span_ms in 1u64..5_000,
            steps in proptest::collection::vec((0u64..700, 0u8..3, 0u64..100), 1..200),
        ) {
            let t0 = Instant::now();
            let span = Duration::from_millis(span_ms);
            let mut w = Window::with_buckets(span, buckets, t0);
            let width = (span.as_nanos() / buckets as u128).max(1);
            let mut samples: Vec<(Duration, Outcome, u64)> = Vec::new();
            let mut now = Duration::ZERO;
            for (dt, o, lat) in steps {
                now += Duration::from_millis(dt);
                let outcome = [Outcome::Success, Outcome::Error, Outcome::Timeout][o as usize];
                w.record(outcome, Duration::from_millis(lat), t0 + now);
                samples.push((now, outcome, lat));
                let cur = now.as_nanos() / width;
                let mut expect = WindowStats::default();
                let mut lat_sum = 0u64;
                for &(t, o, l) in &samples {
                    let idx = t.as_nanos() / width;
                    let age = now - t;
                    if age.as_nanos() < (buckets as u128 - 1) * width {
                        prop_assert!(cur - idx < buckets as u128);
                    }
                    if age >= span {
                        prop_assert!(cur - idx >= buckets as u128);
                    }
                    if cur - idx < buckets as u128 {
                        expect.total += 1;
                        match o {
                            Outcome::Success => expect.success += 1,
                            Outcome::Error => expect.error += 1,
                            Outcome::Timeout => expect.timeout += 1,
                        }
                        lat_sum += l;
                    }
                }
                expect.total_latency = Duration::from_millis(lat_sum);
                prop_assert_eq!(w.snapshot(t0 + now), expect);
                prop_assert_eq!(w.bucket_count(), buckets);
            }
        }

        #[test]
        fn org_map_never_exceeds_cap(
            cap in 1usize..6,
            ops in proptest::collection::vec((0u8..10, any::<bool>()), 1..200),
        ) {
            let t0 = Instant::now();
            let mut st = ExecutionStats::new(secs(60), cap, t0);
            let mut recent: Vec<String> = Vec::new();
            for (org, runtime) in ops {
                let org = format!("org-{org}");
                let mode = if runtime { Mode::RuntimeOrchestrator } else { Mode::DirectLlm };
                st.record(mode, Some(&org), Outcome::Success, MS, t0);
                recent.retain(|o| *o != org);
                recent.push(org);
                prop_assert!(st.org_count() <= cap);
                prop_assert!(st.orgs.is_consistent());
                // The `cap` most recently recorded orgs are exactly the tracked ones.
                for (i, o) in recent.iter().rev().enumerate() {
                    prop_assert_eq!(st.org_snapshot(o, t0).is_some(), i < cap, "{}", o);
                }
            }
        }
    }
}
