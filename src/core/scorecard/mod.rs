//! The shadow scorecard: each shadow copy compared with the legacy answer the client really got
//! for the same request, per org over a sliding window, and the verdict on whether an org is
//! ready to move (`[shadow]` thresholds).
//!
//! All pure (time is passed in), one piece a file: `observer` measures an Agent2UI stream from
//! bytes it is shown and never changes; `pairing` joins the two halves of one request, which
//! finish in either order; `tally` sums an org's comparisons into the counts the verdict reads
//! (the same counts every replica exports, so the fleet's sums are judged alike); `verdict`
//! judges them with confidence; this file keeps the comparisons of at most `max_orgs` orgs over
//! the window and reports each as the admin API's `S` object.

mod decode;
mod observer;
mod pairing;
mod tally;
mod verdict;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::core::recent::RecentOrgs;

pub use decode::{Coding, DecodingObserver};
pub use observer::{StreamObserver, OBSERVED_FRAME_BYTES};
pub use pairing::{Comparison, ComparisonResult, Pairing, PathSample};
pub use tally::{
    ttfe_bin, ttfe_quantile_ms, Tally, TallyRing, RING_SLOTS, TTFE_BINS, TTFE_BOUNDS_SECONDS,
};
pub use verdict::{judge, p50, Judgement, PathSummary, Thresholds, Verdict};

/// Most comparisons kept per org for the medians of duration and text length (the verdict reads
/// the org's [`TallyRing`], which counts every comparison in the window in fixed memory): about
/// 24 bytes each.
pub const MAX_SAMPLES_PER_ORG: usize = 256;

/// One comparison as kept for the medians.
#[derive(Debug, Clone, Copy)]
struct Kept {
    /// Milliseconds since the scorecard's origin.
    at_ms: u64,
    legacy: KeptPath,
    runtime: KeptPath,
}

/// Duration in microseconds (saturating at about 71 minutes).
#[derive(Debug, Clone, Copy)]
struct KeptPath {
    duration_us: u32,
    text_chars: u32,
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

impl KeptPath {
    fn of(s: &PathSample) -> Self {
        KeptPath {
            duration_us: micros(s.duration),
            text_chars: u32::try_from(s.text_chars).unwrap_or(u32::MAX),
        }
    }
}

/// One org's comparisons: every one of the window counted, the latest kept for the medians.
#[derive(Debug, Default)]
struct OrgBook {
    ring: TallyRing,
    recent: VecDeque<Kept>,
}

/// Per-org comparisons over a sliding window of `span`, for at most `max_orgs` orgs
/// ([`RecentOrgs`]: a new org when full takes the place of the org whose latest comparison is
/// oldest). Memory per org is fixed: a [`TallyRing`] and at most [`MAX_SAMPLES_PER_ORG`] kept
/// comparisons, about 9 KB.
#[derive(Debug)]
pub struct Scorecard {
    span: Duration,
    origin: Instant,
    orgs: RecentOrgs<OrgBook>,
}

impl Scorecard {
    pub fn new(span: Duration, max_orgs: usize, now: Instant) -> Self {
        Scorecard {
            span,
            origin: now,
            orgs: RecentOrgs::new(max_orgs),
        }
    }

    fn at_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }

    fn span_ms(&self) -> u64 {
        u64::try_from(self.span.as_millis()).unwrap_or(u64::MAX)
    }

    /// Comparisons at or before this are out of the window at `now`.
    fn expired_before(&self, now: Instant) -> Option<u64> {
        self.at_ms(now).checked_sub(self.span_ms())
    }

    /// Count one comparison for `org`.
    pub fn record(&mut self, org: &str, c: &Comparison, now: Instant) {
        let at_ms = self.at_ms(now);
        let span_ms = self.span_ms();
        let kept = Kept {
            at_ms,
            legacy: KeptPath::of(&c.legacy),
            runtime: KeptPath::of(&c.runtime),
        };
        let cutoff = self.expired_before(now);
        let Some(book) = self.orgs.record(org, OrgBook::default) else {
            return;
        };
        book.ring.record(c, at_ms, span_ms);
        prune(&mut book.recent, cutoff);
        if book.recent.len() == MAX_SAMPLES_PER_ORG {
            book.recent.pop_front();
        }
        book.recent.push_back(kept);
    }

    /// The counts of one org's comparisons in the window, or `None` when it is not tracked.
    pub fn tally(&self, org: &str, now: Instant) -> Option<Tally> {
        let book = self.orgs.get(org)?;
        Some(book.ring.sum(self.at_ms(now), self.span_ms()))
    }

    /// The scorecard of one org, or `None` when it is not tracked (no comparison yet, or
    /// evicted). An org whose comparisons all left the window reads as 0 samples, `insufficient`.
    pub fn report(&self, org: &str, t: &Thresholds, now: Instant) -> Option<OrgReport> {
        let book = self.orgs.get(org)?;
        let tally = book.ring.sum(self.at_ms(now), self.span_ms());
        let cutoff = self.expired_before(now);
        let live: Vec<&Kept> = book
            .recent
            .iter()
            .filter(|k| cutoff.is_none_or(|c| k.at_ms > c))
            .collect();
        let mut report = OrgReport::judge(org, &tally, t);
        medians(&mut report.legacy, live.iter().map(|k| &k.legacy));
        medians(&mut report.runtime, live.iter().map(|k| &k.runtime));
        Some(report)
    }

    /// Every tracked org's scorecard, by org id.
    pub fn reports(&self, t: &Thresholds, now: Instant) -> Vec<OrgReport> {
        let mut orgs: Vec<&String> = self.orgs.iter().map(|(org, _)| org).collect();
        orgs.sort();
        orgs.into_iter()
            .filter_map(|o| self.report(o, t, now))
            .collect()
    }

    /// Apply a reloaded config: a changed span starts every org's counts afresh (its slots were
    /// cut for the old span) and judges the kept comparisons by their own time; a lower
    /// `max_orgs` evicts the least recently recorded orgs.
    pub fn reconfigure(&mut self, span: Duration, max_orgs: usize) {
        if span != self.span {
            for book in self.orgs.values_mut() {
                book.ring.clear();
            }
        }
        self.span = span;
        self.orgs.set_max(max_orgs);
    }

    pub fn org_count(&self) -> usize {
        self.orgs.len()
    }

    /// Comparisons kept for `org`'s medians, in or out of the window.
    pub fn held(&self, org: &str) -> usize {
        self.orgs.get(org).map_or(0, |b| b.recent.len())
    }
}

fn prune(samples: &mut VecDeque<Kept>, cutoff: Option<u64>) {
    let Some(cutoff) = cutoff else { return };
    while samples.front().is_some_and(|k| k.at_ms <= cutoff) {
        samples.pop_front();
    }
}

/// The medians of duration and text length over the kept comparisons.
fn medians<'a>(s: &mut PathSummary, paths: impl Iterator<Item = &'a KeptPath>) {
    let (mut duration, mut chars) = (Vec::new(), Vec::new());
    for p in paths {
        duration.push(p.duration_us);
        chars.push(p.text_chars);
    }
    s.duration_ms_p50 = p50(&mut duration).map(|us| f64::from(us) / 1000.0);
    s.text_chars_p50 = p50(&mut chars).map(u64::from);
}

/// The admin API's `S` object for one org, plus `samplesNeeded`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrgReport {
    pub org_id: String,
    pub samples: u64,
    /// Share of samples where both succeeded or both failed; 0 with no samples.
    pub agreement: f64,
    pub verdict: Verdict,
    pub reasons: Vec<String>,
    /// For `insufficient`: about how many more comparisons would decide it; `None` otherwise,
    /// or when more of the same would not.
    pub samples_needed: Option<u64>,
    #[serde(serialize_with = "verdict::serialize_legacy")]
    pub legacy: PathSummary,
    pub runtime: PathSummary,
}

impl OrgReport {
    /// An org's report from its counts alone (the medians of duration and text are `None`):
    /// what the fleet's sums give.
    pub fn judge(org: &str, tally: &Tally, t: &Thresholds) -> Self {
        let (legacy, runtime) = PathSummary::sides(tally);
        let j = judge(tally, t);
        OrgReport {
            org_id: org.to_owned(),
            samples: tally.samples(),
            agreement: tally.agreement(),
            verdict: j.verdict,
            reasons: j.reasons,
            samples_needed: j.samples_needed,
            legacy,
            runtime,
        }
    }
}

/// Samples for the scorecard's tests: a path that took `ttfe_ms` to its first event, and a
/// comparison whose legacy half took 100 ms.
#[cfg(test)]
pub(crate) mod samples {
    use super::*;
    pub use crate::core::stats::Outcome;

    pub const MS: Duration = Duration::from_millis(1);

    /// The thresholds the tests judge by: ready from 10 samples.
    pub const T: Thresholds = Thresholds {
        min_samples: 10,
        max_error_rate_delta: 0.02,
        max_ttfe_ratio: 2.0,
    };

    pub fn sample(outcome: Outcome, ttfe_ms: u64) -> PathSample {
        PathSample {
            outcome,
            ttfe: Some(MS * ttfe_ms as u32),
            duration: MS * 100,
            text_chars: 10,
        }
    }

    pub fn cmp(legacy: Outcome, runtime: Outcome, runtime_ttfe_ms: u64) -> Comparison {
        Comparison {
            legacy: sample(legacy, 100),
            runtime: sample(runtime, runtime_ttfe_ms),
        }
    }

    /// The `i`th of a run of comparisons whose first `failing` runtime halves end in `outcome`
    /// and the rest succeed; legacy always succeeds.
    pub fn runtime_fails_first(
        i: usize,
        failing: usize,
        outcome: Outcome,
        runtime_ttfe_ms: u64,
    ) -> Comparison {
        let rt = if i < failing {
            outcome
        } else {
            Outcome::Success
        };
        cmp(Outcome::Success, rt, runtime_ttfe_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use super::samples::*;

    /// Thresholds ten loopback comparisons can meet.
    const LOOSE: Thresholds = Thresholds {
        max_error_rate_delta: 0.3,
        ..T
    };

    fn card_with(n: usize, mut f: impl FnMut(usize) -> Comparison) -> (Scorecard, Instant) {
        let t0 = Instant::now();
        let mut s = Scorecard::new(Duration::from_secs(300), 10, t0);
        for i in 0..n {
            s.record("org-a", &f(i), t0);
        }
        (s, t0)
    }

    #[test]
    fn too_few_samples_are_insufficient() {
        let (s, t0) = card_with(9, |_| cmp(Outcome::Success, Outcome::Success, 100));
        let r = s.report("org-a", &T, t0).unwrap();
        assert_eq!(r.verdict, Verdict::Insufficient);
        assert_eq!(r.reasons, ["9 samples < ready_min_samples 10"]);
        assert!(s.report("org-b", &T, t0).is_none());
    }

    #[test]
    fn a_runtime_as_good_as_legacy_is_ready() {
        let (s, t0) = card_with(10, |_| cmp(Outcome::Success, Outcome::Success, 150));
        let r = s.report("org-a", &LOOSE, t0).unwrap();
        assert_eq!(
            (r.verdict, r.samples, r.agreement),
            (Verdict::Ready, 10, 1.0)
        );
        assert!(r.reasons.is_empty());
        assert_eq!(r.samples_needed, None);
        // Medians of the first event come from the bins: (128, 192] and (96, 128] ms.
        assert_eq!(r.runtime.ttfe_ms_p50, Some(160.0));
        assert_eq!(r.legacy.ttfe_ms_p50, Some(112.0));
        assert_eq!(r.runtime.duration_ms_p50, Some(100.0));
        assert_eq!(r.legacy.text_chars_p50, Some(10));
    }

    #[test]
    fn a_failing_runtime_is_not_ready_with_the_error_rate_reason() {
        let (s, t0) = card_with(10, |i| runtime_fails_first(i, 6, Outcome::Error, 100));
        let r = s.report("org-a", &T, t0).unwrap();
        assert_eq!(r.verdict, Verdict::NotReady);
        assert_eq!(
            r.reasons,
            ["runtime error rate 0.60 > legacy 0.00 + 0.02 (95 % bound: at least +0.273)"]
        );
        assert_eq!(r.agreement, 0.4);
        assert_eq!((r.runtime.success, r.runtime.error), (4, 6));
    }

    #[test]
    fn timeouts_count_as_runtime_failures() {
        let (s, t0) = card_with(10, |i| runtime_fails_first(i, 7, Outcome::Timeout, 100));
        let r = s.report("org-a", &T, t0).unwrap();
        assert_eq!((r.runtime.timeout, r.runtime.error), (7, 0));
        assert_eq!(r.verdict, Verdict::NotReady);
        assert!(r.reasons[0].starts_with("runtime error rate 0.70 > legacy 0.00 + 0.02"));
    }

    #[test]
    fn a_slow_first_event_trips_the_ttfe_ratio() {
        let (s, t0) = card_with(10, |_| cmp(Outcome::Success, Outcome::Success, 500));
        let r = s.report("org-a", &LOOSE, t0).unwrap();
        assert_eq!(r.verdict, Verdict::NotReady);
        assert_eq!(r.reasons.len(), 1);
        assert!(
            r.reasons[0].starts_with("runtime ttfe p50 448 ms > 2 x legacy 112 ms"),
            "{:?}",
            r.reasons
        );
    }

    #[test]
    fn legacy_ttfe_is_taken_as_at_least_one_millisecond() {
        let (s, t0) = card_with(10, |_| Comparison {
            legacy: PathSample {
                ttfe: Some(Duration::from_micros(10)),
                ..sample(Outcome::Success, 0)
            },
            runtime: PathSample {
                ttfe: Some(Duration::from_micros(1900)),
                ..sample(Outcome::Success, 0)
            },
        });
        assert_eq!(
            s.report("org-a", &LOOSE, t0).unwrap().verdict,
            Verdict::Ready
        );
    }

    #[test]
    fn samples_leave_the_window() {
        let t0 = Instant::now();
        let mut s = Scorecard::new(Duration::from_secs(60), 10, t0);
        let c = cmp(Outcome::Success, Outcome::Success, 1);
        s.record("org-a", &c, t0);
        s.record("org-a", &c, t0 + Duration::from_secs(30));
        assert_eq!(
            s.report("org-a", &T, t0 + Duration::from_secs(53))
                .unwrap()
                .samples,
            2
        );
        assert_eq!(
            s.report("org-a", &T, t0 + Duration::from_secs(61))
                .unwrap()
                .samples,
            1
        );
        let gone = s
            .report("org-a", &T, t0 + Duration::from_secs(200))
            .unwrap();
        assert_eq!((gone.samples, gone.verdict), (0, Verdict::Insufficient));
        assert_eq!(gone.runtime.ttfe_ms_p50, None);
        assert_eq!(gone.runtime.duration_ms_p50, None);
        s.record("org-a", &c, t0 + Duration::from_secs(200));
        assert_eq!(s.held("org-a"), 1, "expired samples are dropped on record");
        // A new span starts the counts afresh.
        s.reconfigure(Duration::from_secs(120), 10);
        assert_eq!(
            s.tally("org-a", t0 + Duration::from_secs(200))
                .unwrap()
                .samples(),
            0
        );
    }

    #[test]
    fn the_verdict_counts_every_comparison_not_only_the_kept_ones() {
        let (s, t0) = card_with(MAX_SAMPLES_PER_ORG + 100, |_| {
            cmp(Outcome::Success, Outcome::Success, 100)
        });
        let r = s.report("org-a", &T, t0).unwrap();
        assert_eq!(r.samples, MAX_SAMPLES_PER_ORG as u64 + 100);
        assert_eq!(s.held("org-a"), MAX_SAMPLES_PER_ORG);
        assert_eq!(r.verdict, Verdict::Ready, "{r:?}");
    }

    #[test]
    fn the_json_is_the_contract_s() {
        let (s, t0) = card_with(1, |_| cmp(Outcome::Error, Outcome::Timeout, 3));
        let v = serde_json::to_value(s.report("org-a", &T, t0).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "orgId": "org-a", "samples": 1, "agreement": 1.0, "verdict": "insufficient",
                "reasons": ["1 samples < ready_min_samples 10"], "samplesNeeded": null,
                "legacy": {"success": 0, "error": 1, "ttfeMsP50": 112.0, "durationMsP50": 100.0, "textCharsP50": 10},
                "runtime": {"success": 0, "error": 0, "timeout": 1, "ttfeMsP50": 2.5, "durationMsP50": 100.0, "textCharsP50": 10},
            })
        );
    }

    proptest! {
        #[test]
        fn orgs_and_samples_stay_bounded(
            steps in proptest::collection::vec((0u16..40, 0u8..3, 0u8..2, 0u64..2000), 1..400),
            max_orgs in 1usize..8,
        ) {
            let t0 = Instant::now();
            let mut s = Scorecard::new(Duration::from_secs(300), max_orgs, t0);
            let mut last = None;
            for (org, rt, l, ttfe) in steps {
                let outcome = [Outcome::Success, Outcome::Error, Outcome::Timeout][rt as usize];
                let legacy = [Outcome::Success, Outcome::Error][l as usize];
                let org = format!("org-{org}");
                s.record(&org, &cmp(legacy, outcome, ttfe), t0);
                prop_assert!(s.org_count() <= max_orgs);
                prop_assert!(s.held(&org) <= MAX_SAMPLES_PER_ORG);
                last = Some(org);
            }
            // The org recorded last is never the one evicted.
            let last = last.unwrap();
            let r = s.report(&last, &T, t0).unwrap();
            prop_assert!(r.samples >= 1);
            prop_assert_eq!(r.samples, r.runtime.success + r.runtime.error + r.runtime.timeout);
            prop_assert_eq!(r.samples, r.legacy.success + r.legacy.error);
            prop_assert!((0.0..=1.0).contains(&r.agreement));
            prop_assert_eq!(r.verdict == Verdict::Ready, r.reasons.is_empty());
            prop_assert_eq!(s.reports(&T, t0).len(), s.org_count());
        }

        #[test]
        fn one_replica_and_the_sum_of_several_read_alike(
            cs in proptest::collection::vec((0u8..3, 0u8..2, 0u64..3000), 1..300),
            replicas in 1usize..5,
        ) {
            // A fleet's tally is the sum of its replicas' (what Prometheus adds up): judged the
            // same as one replica that saw every comparison.
            let t0 = Instant::now();
            let mut one = Scorecard::new(Duration::from_secs(300), 10, t0);
            let mut many: Vec<Scorecard> =
                (0..replicas).map(|_| Scorecard::new(Duration::from_secs(300), 10, t0)).collect();
            for (i, (rt, l, ttfe)) in cs.into_iter().enumerate() {
                let legacy = if l == 1 { Outcome::Error } else { Outcome::Success };
                let runtime = [Outcome::Success, Outcome::Error, Outcome::Timeout][rt as usize];
                let c = cmp(legacy, runtime, ttfe);
                one.record("org-a", &c, t0);
                many[i % replicas].record("org-a", &c, t0);
            }
            let mut sum = Tally::default();
            for s in &many {
                if let Some(t) = s.tally("org-a", t0) {
                    sum.merge(&t);
                }
            }
            let th = Thresholds { min_samples: 20, max_error_rate_delta: 0.1, max_ttfe_ratio: 2.0 };
            let fleet = OrgReport::judge("org-a", &sum, &th);
            let local = one.report("org-a", &th, t0).unwrap();
            prop_assert_eq!(fleet.samples, local.samples);
            prop_assert_eq!(fleet.verdict, local.verdict);
            prop_assert_eq!(&fleet.reasons, &local.reasons);
            prop_assert_eq!(fleet.samples_needed, local.samples_needed);
        }

        #[test]
        fn verdict_is_monotonic_in_runtime_failures(fails in 0u64..60) {
            // More runtime failures can only move a verdict from ready towards not_ready.
            let (s, t0) = card_with(300, |i| {
                let rt = if (i as u64) < fails { Outcome::Error } else { Outcome::Success };
                cmp(Outcome::Success, rt, 100)
            });
            let t = Thresholds { min_samples: 60, max_error_rate_delta: 0.05, ..T };
            let r = s.report("org-a", &t, t0).unwrap();
            let rank = |v: Verdict| match v { Verdict::Ready => 2, Verdict::Insufficient => 1, Verdict::NotReady => 0 };
            let (s2, _) = card_with(300, |i| {
                let rt = if (i as u64) <= fails { Outcome::Error } else { Outcome::Success };
                cmp(Outcome::Success, rt, 100)
            });
            let r2 = s2.report("org-a", &t, t0).unwrap();
            prop_assert!(rank(r2.verdict) <= rank(r.verdict));
        }
    }
}
