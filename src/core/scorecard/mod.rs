//! The shadow scorecard: each shadow copy compared with the legacy answer the client really got
//! for the same request, per org over a sliding window, and the verdict on whether an org is
//! ready to move (`[shadow]` thresholds).
//!
//! All pure (time is passed in), one piece a file: `observer` measures an Agent2UI stream from
//! bytes it is shown and never changes; `pairing` joins the two halves of one request, which
//! finish in either order; `verdict` judges an org's comparisons; this file keeps the
//! comparisons of at most `max_orgs` orgs over the window and reports each as the admin API's `S`
//! object.

mod decode;
mod observer;
mod pairing;
mod verdict;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::ser::SerializeStruct;
use serde::Serialize;

use crate::core::recent::RecentOrgs;
use crate::core::stats::Outcome;

pub use decode::{Coding, DecodingObserver};
pub use observer::{StreamObserver, OBSERVED_FRAME_BYTES};
pub use pairing::{Comparison, ComparisonResult, Pairing, PathSample};
pub use verdict::{p50, verdict, PathSummary, Thresholds, Verdict};

/// Most comparisons kept per org: the verdict is judged on an org's latest ones in the window,
/// so a busy org costs a fixed amount of memory (about 40 bytes each).
pub const MAX_SAMPLES_PER_ORG: usize = 256;

/// One comparison as kept: compact, so that [`MAX_SAMPLES_PER_ORG`] of them stay small.
#[derive(Debug, Clone, Copy)]
struct Kept {
    /// Milliseconds since the scorecard's origin.
    at_ms: u64,
    legacy: KeptPath,
    runtime: KeptPath,
}

/// Times in microseconds (saturating at about 71 minutes); `u32::MAX` ttfe: no event.
#[derive(Debug, Clone, Copy)]
struct KeptPath {
    outcome: Outcome,
    ttfe_us: u32,
    duration_us: u32,
    text_chars: u32,
}

const NO_EVENT: u32 = u32::MAX;

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(NO_EVENT - 1)
}

impl KeptPath {
    fn of(s: &PathSample) -> Self {
        KeptPath {
            outcome: s.outcome,
            ttfe_us: s.ttfe.map_or(NO_EVENT, micros),
            duration_us: micros(s.duration),
            text_chars: u32::try_from(s.text_chars).unwrap_or(u32::MAX),
        }
    }
}

/// Per-org comparisons over a sliding window of `span`, for at most `max_orgs` orgs
/// ([`RecentOrgs`]: a new org when full takes the place of the org whose latest comparison is
/// oldest).
#[derive(Debug)]
pub struct Scorecard {
    span: Duration,
    origin: Instant,
    orgs: RecentOrgs<VecDeque<Kept>>,
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

    /// Comparisons at or before this are out of the window at `now`.
    fn expired_before(&self, now: Instant) -> Option<u64> {
        let span = u64::try_from(self.span.as_millis()).unwrap_or(u64::MAX);
        self.at_ms(now).checked_sub(span)
    }

    /// Count one comparison for `org`.
    pub fn record(&mut self, org: &str, c: &Comparison, now: Instant) {
        let kept = Kept {
            at_ms: self.at_ms(now),
            legacy: KeptPath::of(&c.legacy),
            runtime: KeptPath::of(&c.runtime),
        };
        let cutoff = self.expired_before(now);
        let Some(samples) = self.orgs.record(org, VecDeque::new) else {
            return;
        };
        prune(samples, cutoff);
        if samples.len() == MAX_SAMPLES_PER_ORG {
            samples.pop_front();
        }
        samples.push_back(kept);
    }

    /// The scorecard of one org, or `None` when it is not tracked (no comparison yet, or
    /// evicted). An org whose comparisons all left the window reads as 0 samples, `insufficient`.
    pub fn report(&self, org: &str, t: &Thresholds, now: Instant) -> Option<OrgReport> {
        let samples = self.orgs.get(org)?;
        let cutoff = self.expired_before(now);
        let live = samples
            .iter()
            .filter(|k| cutoff.is_none_or(|c| k.at_ms > c));
        Some(OrgReport::judge(org, live, t))
    }

    /// Every tracked org's scorecard, by org id.
    pub fn reports(&self, t: &Thresholds, now: Instant) -> Vec<OrgReport> {
        let mut orgs: Vec<&String> = self.orgs.iter().map(|(org, _)| org).collect();
        orgs.sort();
        orgs.into_iter()
            .filter_map(|o| self.report(o, t, now))
            .collect()
    }

    /// Apply a reloaded config: a changed span keeps the comparisons (each is judged by its own
    /// time); a lower `max_orgs` evicts the least recently recorded orgs.
    pub fn reconfigure(&mut self, span: Duration, max_orgs: usize) {
        self.span = span;
        self.orgs.set_max(max_orgs);
    }

    pub fn org_count(&self) -> usize {
        self.orgs.len()
    }

    /// Comparisons held for `org`, in or out of the window.
    pub fn held(&self, org: &str) -> usize {
        self.orgs.get(org).map_or(0, VecDeque::len)
    }
}

fn prune(samples: &mut VecDeque<Kept>, cutoff: Option<u64>) {
    let Some(cutoff) = cutoff else { return };
    while samples.front().is_some_and(|k| k.at_ms <= cutoff) {
        samples.pop_front();
    }
}

/// One path's totals and medians over the kept comparisons.
fn summarize<'a>(paths: impl Iterator<Item = &'a KeptPath>) -> PathSummary {
    let mut s = PathSummary::default();
    let (mut ttfe, mut duration, mut chars) = (Vec::new(), Vec::new(), Vec::new());
    for p in paths {
        match p.outcome {
            Outcome::Success => s.success += 1,
            Outcome::Error => s.error += 1,
            Outcome::Timeout => s.timeout += 1,
        }
        if p.ttfe_us != NO_EVENT {
            ttfe.push(p.ttfe_us);
        }
        duration.push(p.duration_us);
        chars.push(p.text_chars);
    }
    let ms = |us: u32| f64::from(us) / 1000.0;
    s.ttfe_ms_p50 = p50(&mut ttfe).map(ms);
    s.duration_ms_p50 = p50(&mut duration).map(ms);
    s.text_chars_p50 = p50(&mut chars).map(u64::from);
    s
}

/// The admin API's `S` object for one org.
#[derive(Debug, Clone, PartialEq)]
pub struct OrgReport {
    pub org_id: String,
    pub samples: u64,
    /// Share of samples where both succeeded or both failed; 0 with no samples.
    pub agreement: f64,
    pub verdict: Verdict,
    pub reasons: Vec<String>,
    pub legacy: PathSummary,
    pub runtime: PathSummary,
}

impl OrgReport {
    fn judge<'a>(org: &str, kept: impl Iterator<Item = &'a Kept> + Clone, t: &Thresholds) -> Self {
        let legacy = summarize(kept.clone().map(|k| &k.legacy));
        let runtime = summarize(kept.clone().map(|k| &k.runtime));
        let samples = kept.clone().count() as u64;
        let agreed = kept
            .filter(|k| k.legacy.outcome.is_failure() == k.runtime.outcome.is_failure())
            .count();
        let agreement = if samples == 0 {
            0.0
        } else {
            agreed as f64 / samples as f64
        };
        let (verdict, reasons) = verdict(samples, &legacy, &runtime, t);
        OrgReport {
            org_id: org.to_owned(),
            samples,
            agreement,
            verdict,
            reasons,
            legacy,
            runtime,
        }
    }
}

impl Serialize for OrgReport {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("OrgReport", 7)?;
        s.serialize_field("orgId", &self.org_id)?;
        s.serialize_field("samples", &self.samples)?;
        s.serialize_field("agreement", &self.agreement)?;
        s.serialize_field("verdict", &self.verdict)?;
        s.serialize_field("reasons", &self.reasons)?;
        s.serialize_field("legacy", &verdict::Legacy(&self.legacy))?;
        s.serialize_field("runtime", &self.runtime)?;
        s.end()
    }
}

/// Samples for the scorecard's tests: a path that took `ttfe_ms` to its first event, and a
/// comparison whose legacy half took 100 ms.
#[cfg(test)]
pub(crate) mod samples {
    use super::*;

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
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use super::samples::*;

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
        let (s, t0) = card_with(10, |_| cmp(Outcome::Success, Outcome::Success, 200));
        let r = s.report("org-a", &T, t0).unwrap();
        assert_eq!(
            (r.verdict, r.samples, r.agreement),
            (Verdict::Ready, 10, 1.0)
        );
        assert!(r.reasons.is_empty());
        assert_eq!(r.runtime.ttfe_ms_p50, Some(200.0));
        assert_eq!(r.legacy.ttfe_ms_p50, Some(100.0));
    }

    #[test]
    fn a_failing_runtime_is_not_ready_with_the_error_rate_reason() {
        let (s, t0) = card_with(10, |i| {
            let rt = if i < 4 {
                Outcome::Error
            } else {
                Outcome::Success
            };
            cmp(Outcome::Success, rt, 100)
        });
        let r = s.report("org-a", &T, t0).unwrap();
        assert_eq!(r.verdict, Verdict::NotReady);
        assert_eq!(r.reasons, ["runtime error rate 0.40 > legacy 0.00 + 0.02"]);
        assert_eq!(r.agreement, 0.6);
        assert_eq!((r.runtime.success, r.runtime.error), (6, 4));
    }

    #[test]
    fn timeouts_count_as_runtime_failures() {
        let (s, t0) = card_with(10, |i| {
            let rt = if i == 0 {
                Outcome::Timeout
            } else {
                Outcome::Success
            };
            cmp(Outcome::Success, rt, 100)
        });
        let r = s.report("org-a", &T, t0).unwrap();
        assert_eq!(r.runtime.timeout, 1);
        assert_eq!(r.reasons, ["runtime error rate 0.10 > legacy 0.00 + 0.02"]);
    }

    #[test]
    fn exactly_the_delta_is_still_ready() {
        // Legacy fails 1 in 50, the runtime 2 in 50: 0.04 = 0.02 + 0.02.
        let t = Thresholds {
            min_samples: 50,
            ..T
        };
        let (s, t0) = card_with(50, |i| {
            let l = if i == 0 {
                Outcome::Error
            } else {
                Outcome::Success
            };
            let rt = if i < 2 {
                Outcome::Error
            } else {
                Outcome::Success
            };
            cmp(l, rt, 100)
        });
        assert_eq!(s.report("org-a", &t, t0).unwrap().verdict, Verdict::Ready);
    }

    #[test]
    fn a_slow_first_event_trips_the_ttfe_ratio() {
        let (s, t0) = card_with(10, |_| cmp(Outcome::Success, Outcome::Success, 201));
        let r = s.report("org-a", &T, t0).unwrap();
        assert_eq!(r.verdict, Verdict::NotReady);
        assert_eq!(r.reasons, ["runtime ttfe p50 201 ms > 2 x legacy 100 ms"]);
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
        assert_eq!(s.report("org-a", &T, t0).unwrap().verdict, Verdict::Ready);
    }

    #[test]
    fn samples_leave_the_window() {
        let t0 = Instant::now();
        let mut s = Scorecard::new(Duration::from_secs(60), 10, t0);
        let c = cmp(Outcome::Success, Outcome::Success, 1);
        s.record("org-a", &c, t0);
        s.record("org-a", &c, t0 + Duration::from_secs(30));
        assert_eq!(
            s.report("org-a", &T, t0 + Duration::from_secs(59))
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
        s.record("org-a", &c, t0 + Duration::from_secs(200));
        assert_eq!(s.held("org-a"), 1, "expired samples are dropped on record");
    }

    #[test]
    fn the_json_is_the_contract_s() {
        let (s, t0) = card_with(1, |_| cmp(Outcome::Error, Outcome::Timeout, 3));
        let v = serde_json::to_value(s.report("org-a", &T, t0).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "orgId": "org-a", "samples": 1, "agreement": 1.0, "verdict": "insufficient",
                "reasons": ["1 samples < ready_min_samples 10"],
                "legacy": {"success": 0, "error": 1, "ttfeMsP50": 100.0, "durationMsP50": 100.0, "textCharsP50": 10},
                "runtime": {"success": 0, "error": 0, "timeout": 1, "ttfeMsP50": 3.0, "durationMsP50": 100.0, "textCharsP50": 10},
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
        fn verdict_is_monotonic_in_runtime_failures(fails in 0u64..60) {
            // More runtime failures can only move a verdict from ready towards not_ready.
            let (s, t0) = card_with(60, |i| {
                let rt = if (i as u64) < fails { Outcome::Error } else { Outcome::Success };
                cmp(Outcome::Success, rt, 100)
            });
            let t = Thresholds { min_samples: 60, ..T };
            let r = s.report("org-a", &t, t0).unwrap();
            prop_assert_eq!(r.verdict == Verdict::Ready, fails <= 1);
        }
    }
}
