//! The `[shadow]` verdict on one org's comparisons, with confidence: `ready` only when the
//! runtime is shown no worse than legacy at 95 %, `not_ready` only when it is shown worse, and
//! `insufficient` otherwise, with an estimate of the comparisons still needed.
//!
//! Two criteria, both judged on a [`Tally`] (so one replica's window and the fleet's sums read
//! alike):
//! - failures: the upper 95 % bound of (runtime (error + timeout) rate − legacy's), by
//!   Newcombe's interval for paired proportions, at most `ready_max_error_rate_delta`; shown
//!   worse when the lower bound is above it.
//! - time to first event: the runtime no slower than `ready_max_ttfe_ratio` × legacy's (legacy
//!   taken as at least 1 ms), by a one-sided Mann-Whitney test on the histograms; shown worse
//!   when the test says slower.
//!
//! A legacy side that failed on most comparisons is a broken measurement, not a baseline: such
//! a window is `insufficient` whatever the runtime did.

use serde::Serialize;

use crate::core::significance::{
    paired_difference, rank_test, scale_for_score, scale_for_upper_bound, Paired, Z95,
};

use super::tally::{ttfe_quantile_ms, Tally, TTFE_BOUNDS_SECONDS};

/// `[shadow]`: when an org is `ready`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub min_samples: u64,
    pub max_error_rate_delta: f64,
    pub max_ttfe_ratio: f64,
}

impl Thresholds {
    /// `[shadow]`'s `ready_*` keys, as the breaker takes its settings from `[breaker]`.
    pub fn from_config(c: &crate::core::config::Config) -> Self {
        let s = &c.shadow;
        Thresholds {
            min_samples: s.ready_min_samples,
            max_error_rate_delta: s.ready_max_error_rate_delta,
            max_ttfe_ratio: s.ready_max_ttfe_ratio,
        }
    }
}

/// `ready`, `not_ready` or `insufficient`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Ready,
    NotReady,
    Insufficient,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ready => "ready",
            Verdict::NotReady => "not_ready",
            Verdict::Insufficient => "insufficient",
        }
    }
}

/// Legacy's time to first event is taken as at least this (seconds).
const LEGACY_TTFE_FLOOR: f64 = 0.001;

/// The lower median (nearest rank) of `values`, sorted here; `None` when empty.
pub fn p50(values: &mut [u32]) -> Option<u32> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    Some(values[(values.len() - 1) / 2])
}

/// One path's totals and medians over the window; serialized, the runtime's half of `S`.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PathSummary {
    pub success: u64,
    pub error: u64,
    pub timeout: u64,
    /// Milliseconds; `None` when no sample had a first event.
    pub ttfe_ms_p50: Option<f64>,
    pub duration_ms_p50: Option<f64>,
    pub text_chars_p50: Option<u64>,
}

impl PathSummary {
    /// Each side's outcomes and median time to first event, from a tally; the medians of
    /// duration and text are the caller's (a tally has none).
    pub fn sides(t: &Tally) -> (PathSummary, PathSummary) {
        let legacy = PathSummary {
            success: t.both_ok + t.runtime_failed,
            error: t.legacy_failures(),
            ttfe_ms_p50: ttfe_quantile_ms(&t.legacy_ttfe, 0.5),
            ..PathSummary::default()
        };
        let runtime = PathSummary {
            success: t.both_ok + t.legacy_failed,
            error: t.runtime_failures().saturating_sub(t.runtime_timeouts),
            timeout: t.runtime_timeouts.min(t.runtime_failures()),
            ttfe_ms_p50: ttfe_quantile_ms(&t.runtime_ttfe, 0.5),
            ..PathSummary::default()
        };
        (legacy, runtime)
    }

    /// `(error + timeout) / samples`, 0 with no samples.
    pub fn failure_rate(&self) -> f64 {
        let total = self.success + self.error + self.timeout;
        if total == 0 {
            0.0
        } else {
            (self.error + self.timeout) as f64 / total as f64
        }
    }
}

/// The verdict, its reasons (empty when `ready`), and for `insufficient` the comparisons still
/// needed, about, at the rates seen so far (`None` when more of the same would not decide it).
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub verdict: Verdict,
    pub reasons: Vec<String>,
    pub samples_needed: Option<u64>,
}

/// How one criterion reads.
enum Reading {
    Pass,
    Fail(String),
    /// Not decided; the samples (in all) that would decide it at the same rates, if any.
    Open(String, Option<f64>),
}

fn failures(t: &Tally, th: &Thresholds) -> Reading {
    let table = Paired {
        both_failed: t.both_failed as f64,
        first_failed: t.runtime_failed as f64,
        second_failed: t.legacy_failed as f64,
        both_ok: t.both_ok as f64,
    };
    let (lo, hi) = paired_difference(&table, Z95);
    let (r, l, delta) = (
        table.first_rate(),
        table.second_rate(),
        th.max_error_rate_delta,
    );
    if lo > delta {
        Reading::Fail(format!(
            "runtime error rate {r:.2} > legacy {l:.2} + {delta:.2} (95 % bound: at least {lo:+.3})"
        ))
    } else if hi <= delta {
        Reading::Pass
    } else {
        let needed = scale_for_upper_bound(&table, delta, Z95).map(|k| k * table.n());
        Reading::Open(
            format!(
                "runtime error rate {r:.2} vs legacy {l:.2} + {delta:.2}: not shown within at 95 % (the difference may be up to {hi:+.3})"
            ),
            needed,
        )
    }
}

fn first_event(t: &Tally, th: &Thresholds) -> Reading {
    let ratio = th.max_ttfe_ratio;
    let test = rank_test(
        &t.runtime_ttfe,
        &t.legacy_ttfe,
        &TTFE_BOUNDS_SECONDS,
        ratio,
        LEGACY_TTFE_FLOOR,
    );
    let (Some(rt), Some(lt)) = (
        ttfe_quantile_ms(&t.runtime_ttfe, 0.5),
        ttfe_quantile_ms(&t.legacy_ttfe, 0.5),
    ) else {
        let side = if test.first == 0.0 {
            "runtime"
        } else {
            "legacy"
        };
        return Reading::Open(
            format!("no time to first event on the {side} side yet"),
            None,
        );
    };
    let lt = lt.max(LEGACY_TTFE_FLOOR * 1000.0);
    if test.z_slower >= Z95 {
        Reading::Fail(format!(
            "runtime ttfe p50 {rt:.0} ms > {ratio} x legacy {lt:.0} ms (Mann-Whitney, z = {:.2})",
            test.z_slower
        ))
    } else if test.z_faster >= Z95 {
        Reading::Pass
    } else {
        let n = t.samples() as f64;
        Reading::Open(
            format!(
                "runtime ttfe p50 {rt:.0} ms vs {ratio} x legacy {lt:.0} ms: not shown within at 95 % (Mann-Whitney, z = {:.2} < {Z95:.2})",
                test.z_faster
            ),
            scale_for_score(test.z_faster, Z95).map(|k| k * n),
        )
    }
}

/// Judge one org's tally against `[shadow]`.
pub fn judge(t: &Tally, th: &Thresholds) -> Judgement {
    let n = t.samples();
    let readings = if n == 0 {
        Vec::new()
    } else {
        vec![failures(t, th), first_event(t, th)]
    };
    // Samples in all that would decide every open criterion; None if one never gets there.
    let mut needed = Some(th.min_samples as f64);
    for r in &readings {
        if let Reading::Open(_, k) = r {
            needed = match (needed, k) {
                (Some(a), Some(b)) => Some(a.max(*b)),
                _ => None,
            };
        }
    }
    let still_needed =
        |needed: Option<f64>| needed.map(|total| (total.ceil() as u64).saturating_sub(n).max(1));
    if n < th.min_samples {
        return Judgement {
            verdict: Verdict::Insufficient,
            reasons: vec![format!(
                "{n} samples < ready_min_samples {}",
                th.min_samples
            )],
            samples_needed: still_needed(if n == 0 {
                Some(th.min_samples as f64)
            } else {
                needed
            }),
        };
    }
    let legacy_failures = t.legacy_failures();
    if 2 * legacy_failures > n {
        return Judgement {
            verdict: Verdict::Insufficient,
            reasons: vec![format!(
                "legacy failed on {legacy_failures} of {n} samples: no baseline to judge the runtime against"
            )],
            samples_needed: None,
        };
    }
    let fails: Vec<String> = readings
        .iter()
        .filter_map(|r| match r {
            Reading::Fail(why) => Some(why.clone()),
            _ => None,
        })
        .collect();
    if !fails.is_empty() {
        return Judgement {
            verdict: Verdict::NotReady,
            reasons: fails,
            samples_needed: None,
        };
    }
    let open: Vec<String> = readings
        .iter()
        .filter_map(|r| match r {
            Reading::Open(why, _) => Some(why.clone()),
            _ => None,
        })
        .collect();
    if open.is_empty() {
        Judgement {
            verdict: Verdict::Ready,
            reasons: open,
            samples_needed: None,
        }
    } else {
        Judgement {
            verdict: Verdict::Insufficient,
            reasons: open,
            samples_needed: still_needed(needed),
        }
    }
}

/// Legacy's half of `S`: no `timeout` (a legacy answer either ends with `done` or it fails).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Legacy {
    success: u64,
    error: u64,
    ttfe_ms_p50: Option<f64>,
    duration_ms_p50: Option<f64>,
    text_chars_p50: Option<u64>,
}

/// Serialize legacy's [`PathSummary`] as its half of `S`.
pub(super) fn serialize_legacy<S: serde::Serializer>(
    p: &PathSummary,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    Legacy {
        success: p.success,
        error: p.error + p.timeout,
        ttfe_ms_p50: p.ttfe_ms_p50,
        duration_ms_p50: p.duration_ms_p50,
        text_chars_p50: p.text_chars_p50,
    }
    .serialize(serializer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::core::scorecard::samples::{cmp, runtime_fails_first, T};
    use crate::core::scorecard::Comparison;
    use crate::core::stats::Outcome;

    fn tally(cs: impl IntoIterator<Item = Comparison>) -> Tally {
        let mut t = Tally::default();
        for c in cs {
            t.record(&c);
        }
        t
    }

    fn ok(runtime_ttfe_ms: u64) -> Comparison {
        cmp(Outcome::Success, Outcome::Success, runtime_ttfe_ms)
    }

    /// Thresholds a handful of loopback samples can meet: the tests of the criteria themselves.
    const LOOSE: Thresholds = Thresholds {
        min_samples: 10,
        max_error_rate_delta: 0.3,
        max_ttfe_ratio: 2.0,
    };

    /// A judgement of `verdict` for exactly these reasons, with no count of samples to wait for.
    fn judgement(verdict: Verdict, reasons: &[&str]) -> Judgement {
        Judgement {
            verdict,
            reasons: reasons.iter().map(|r| r.to_string()).collect(),
            samples_needed: None,
        }
    }

    /// `j` is `verdict` for as many reasons as `starts`, each starting with its own.
    #[track_caller]
    fn assert_reasons_start(j: &Judgement, verdict: Verdict, starts: &[&str]) {
        assert_eq!(j.verdict, verdict, "{j:?}");
        assert_eq!(j.reasons.len(), starts.len(), "{j:?}");
        for (reason, start) in j.reasons.iter().zip(starts) {
            assert!(reason.starts_with(start), "{j:?}");
        }
    }

    #[test]
    fn p50_is_the_lower_median() {
        assert_eq!(p50(&mut []), None);
        assert_eq!(p50(&mut [5]), Some(5));
        assert_eq!(p50(&mut [9, 1]), Some(1));
        assert_eq!(p50(&mut [3, 9, 1]), Some(3));
    }

    #[test]
    fn too_few_samples_are_insufficient_with_what_is_missing() {
        let j = judge(&tally((0..4).map(|_| ok(100))), &LOOSE);
        assert_eq!(j.verdict, Verdict::Insufficient);
        assert_eq!(j.reasons, ["4 samples < ready_min_samples 10"]);
        assert_eq!(j.samples_needed, Some(6));
        let j = judge(&Tally::default(), &LOOSE);
        assert_eq!(
            (j.verdict, j.samples_needed),
            (Verdict::Insufficient, Some(10))
        );
    }

    #[test]
    fn a_clean_runtime_as_fast_as_legacy_is_ready() {
        let j = judge(&tally((0..12).map(|_| ok(100))), &LOOSE);
        assert_eq!(j, judgement(Verdict::Ready, &[]));
    }

    #[test]
    fn ready_needs_the_bound_not_the_point_estimate() {
        // 0 failures on either side in 50: the point difference is 0, but the upper 95 % bound
        // is z²/(50+z²) = 0.051 > 0.02; 133 clean comparisons get there.
        let j = judge(&tally((0..50).map(|_| ok(100))), &T);
        assert_reasons_start(
            &j,
            Verdict::Insufficient,
            &["runtime error rate 0.00 vs legacy 0.00 + 0.02: not shown within at 95 %"],
        );
        assert_eq!(j.samples_needed, Some(83));
        assert_eq!(
            judge(&tally((0..133).map(|_| ok(100))), &T).verdict,
            Verdict::Ready
        );
        assert_eq!(
            judge(&tally((0..132).map(|_| ok(100))), &T).verdict,
            Verdict::Insufficient
        );
    }

    #[test]
    fn a_failing_runtime_is_not_ready_with_its_bound() {
        let j = judge(
            &tally((0..10).map(|i| runtime_fails_first(i, 6, Outcome::Error, 100))),
            &T,
        );
        assert_eq!(
            j,
            judgement(
                Verdict::NotReady,
                &["runtime error rate 0.60 > legacy 0.00 + 0.02 (95 % bound: at least +0.273)"]
            )
        );
    }

    #[test]
    fn a_slow_runtime_is_not_ready_for_its_first_event() {
        let j = judge(&tally((0..10).map(|_| ok(900))), &LOOSE);
        assert_reasons_start(
            &j,
            Verdict::NotReady,
            &["runtime ttfe p50 896 ms > 2 x legacy 112 ms (Mann-Whitney, z = "],
        );
    }

    #[test]
    fn each_criterion_gives_its_own_reason() {
        let j = judge(
            &tally((0..20).map(|i| runtime_fails_first(i, 12, Outcome::Error, 900))),
            &LOOSE,
        );
        assert_reasons_start(
            &j,
            Verdict::NotReady,
            &[
                "runtime error rate 0.60 > legacy 0.00 + 0.30",
                "runtime ttfe p50 ",
            ],
        );
    }

    #[test]
    fn a_broken_legacy_side_is_no_baseline() {
        // The window the old verdict called ready: legacy 0 of 11 successes, the runtime fine.
        let t = tally((0..11).map(|_| cmp(Outcome::Error, Outcome::Success, 100)));
        let j = judge(&t, &LOOSE);
        assert_eq!(
            j,
            judgement(
                Verdict::Insufficient,
                &["legacy failed on 11 of 11 samples: no baseline to judge the runtime against"]
            )
        );
    }

    /// `c` with a runtime half that never sent an event.
    fn no_runtime_event(c: Comparison) -> Comparison {
        Comparison {
            runtime: crate::core::scorecard::PathSample {
                ttfe: None,
                ..c.runtime
            },
            ..c
        }
    }

    #[test]
    fn a_runtime_without_any_event_is_judged_on_its_failures() {
        let t = tally((0..10).map(|_| no_runtime_event(cmp(Outcome::Success, Outcome::Error, 1))));
        let j = judge(&t, &T);
        assert_reasons_start(
            &j,
            Verdict::NotReady,
            &["runtime error rate 1.00 > legacy 0.00 + 0.02"],
        );
        // With clean outcomes and no runtime event at all, nothing can be said of its speed.
        let t = tally((0..200).map(|_| no_runtime_event(ok(1))));
        let j = judge(&t, &T);
        assert_eq!(
            j,
            judgement(
                Verdict::Insufficient,
                &["no time to first event on the runtime side yet"]
            )
        );
    }

    #[test]
    fn sides_are_summarised_from_the_tally() {
        let t = tally([
            cmp(Outcome::Success, Outcome::Timeout, 3),
            cmp(Outcome::Error, Outcome::Success, 3),
            cmp(Outcome::Error, Outcome::Error, 3),
        ]);
        let (l, r) = PathSummary::sides(&t);
        assert_eq!((l.success, l.error, l.timeout), (1, 2, 0));
        assert_eq!((r.success, r.error, r.timeout), (1, 1, 1));
        assert!((r.failure_rate() - 2.0 / 3.0).abs() < 1e-12);
        assert!(r.ttfe_ms_p50.unwrap() <= 3.0 && l.ttfe_ms_p50.unwrap() > 96.0);
    }

    // ---- known distributions, by simulation ----------------------------------------------

    /// One simulated window: `n` requests answered by both sides; each side fails with its
    /// probability, independently, and sends its first event after a log-normal time (median
    /// 200 ms for legacy, `slower` times that for the runtime, σ = 0.5).
    fn window(
        rng: &mut fastrand::Rng,
        n: usize,
        legacy_p: f64,
        runtime_p: f64,
        slower: f64,
    ) -> Tally {
        let normal = |rng: &mut fastrand::Rng| {
            let (u1, u2) = (1.0 - rng.f64(), rng.f64());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        };
        let mut t = Tally::default();
        for _ in 0..n {
            let outcome = |p: f64, rng: &mut fastrand::Rng| {
                if rng.f64() < p {
                    Outcome::Error
                } else {
                    Outcome::Success
                }
            };
            let l = outcome(legacy_p, rng);
            let r = outcome(runtime_p, rng);
            let lt = 0.2 * (0.5 * normal(rng)).exp();
            let rt = slower * 0.2 * (0.5 * normal(rng)).exp();
            let mut c = cmp(l, r, 0);
            c.legacy.ttfe = Some(std::time::Duration::from_secs_f64(lt));
            c.runtime.ttfe = Some(std::time::Duration::from_secs_f64(rt));
            t.record(&c);
        }
        t
    }

    /// Shares of ready, not_ready and insufficient over `windows` simulated windows.
    fn rates(
        seed: u64,
        windows: usize,
        n: usize,
        legacy_p: f64,
        runtime_p: f64,
        slower: f64,
    ) -> [f64; 3] {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut counts = [0usize; 3];
        let th = Thresholds {
            min_samples: 50,
            ..T
        };
        for _ in 0..windows {
            let v = judge(&window(&mut rng, n, legacy_p, runtime_p, slower), &th).verdict;
            counts[match v {
                Verdict::Ready => 0,
                Verdict::NotReady => 1,
                Verdict::Insufficient => 2,
            }] += 1;
        }
        counts.map(|c| c as f64 / windows as f64)
    }

    #[test]
    fn identical_sides_are_ready_at_enough_samples() {
        let [ready, not_ready, _] = rates(1, 400, 600, 0.01, 0.01, 1.0);
        assert!(ready >= 0.9, "ready in {ready}");
        assert!(not_ready <= 0.01, "not_ready in {not_ready}");
    }

    #[test]
    fn a_twice_slower_runtime_is_rarely_ready_and_four_times_slower_is_not_ready() {
        // Exactly at the ratio: ready at most at the test's 5 % (plus simulation noise).
        let [ready, _, _] = rates(2, 400, 600, 0.0, 0.0, 2.0);
        assert!(ready <= 0.08, "2x slower called ready in {ready}");
        let [ready, not_ready, _] = rates(3, 400, 200, 0.0, 0.0, 4.0);
        assert_eq!(ready, 0.0);
        assert!(
            not_ready >= 0.95,
            "4x slower called not_ready in {not_ready}"
        );
    }

    #[test]
    fn two_points_more_errors_is_rarely_ready() {
        // At 50 samples it takes legacy failing more than the runtime by chance.
        let [ready, _, _] = rates(4, 400, 50, 0.01, 0.03, 1.0);
        assert!(
            ready <= 0.08,
            "+2 points called ready in {ready} at 50 samples"
        );
        // At the threshold with plenty of samples: at most the 5 % of a one-sided bound.
        let [ready, _, _] = rates(5, 400, 2000, 0.01, 0.03, 1.0);
        assert!(ready <= 0.08, "+2 points called ready in {ready}");
        // Well past it, shown worse.
        let [_, not_ready, _] = rates(6, 200, 1000, 0.01, 0.08, 1.0);
        assert!(
            not_ready >= 0.95,
            "+7 points called not_ready in {not_ready}"
        );
    }

    /// The figures quoted in docs/rollout.md: `cargo test --lib verdict_error_rates -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn verdict_error_rates() {
        println!("legacy 1 % errors, [shadow] defaults, 2000 windows each");
        println!(
            "{:>6} {:>22} {:>22} {:>22}",
            "n", "same runtime: ready", "+2 points: ready", "2x slower: ready"
        );
        for n in [50, 100, 200, 500, 1000, 2000] {
            let same = rates(10, 2000, n, 0.01, 0.01, 1.0)[0];
            let worse = rates(11, 2000, n, 0.01, 0.03, 1.0)[0];
            let slow = rates(12, 2000, n, 0.01, 0.01, 2.0)[0];
            println!(
                "{n:>6} {:>21.1}% {:>21.1}% {:>21.1}%",
                same * 100.0,
                worse * 100.0,
                slow * 100.0
            );
        }
    }

    proptest! {
        #[test]
        fn a_mostly_failing_legacy_is_never_ready(
            legacy_fail in 6u64..40, legacy_ok in 0u64..5, runtime_fail_of_legacy_ok in 0u64..5,
        ) {
            let runtime_failed = runtime_fail_of_legacy_ok.min(legacy_ok);
            let mut t = Tally {
                legacy_failed: legacy_fail,
                both_ok: legacy_ok - runtime_failed,
                runtime_failed,
                ..Tally::default()
            };
            t.legacy_ttfe[10] = t.samples();
            t.runtime_ttfe[0] = t.samples();
            prop_assume!(2 * t.legacy_failures() > t.samples());
            let th = Thresholds { min_samples: 1, max_error_rate_delta: 1.0, max_ttfe_ratio: 1000.0 };
            prop_assert_ne!(judge(&t, &th).verdict, Verdict::Ready);
        }

        #[test]
        fn more_runtime_failures_never_make_it_more_ready(ok in 0u64..300, fails in 0u64..30, extra in 1u64..30) {
            let rank = |v: Verdict| match v { Verdict::Ready => 2, Verdict::Insufficient => 1, Verdict::NotReady => 0 };
            let th = Thresholds { min_samples: 1, ..T };
            let make = |f: u64| {
                let mut t = Tally { both_ok: ok, runtime_failed: f, ..Tally::default() };
                t.legacy_ttfe[14] = ok + f;
                t.runtime_ttfe[14] = ok + f;
                t
            };
            prop_assume!(ok + fails > 0);
            let before = judge(&make(fails), &th).verdict;
            let after = judge(&make(fails + extra), &th).verdict;
            prop_assert!(rank(after) <= rank(before), "{:?} -> {:?}", before, after);
        }

        #[test]
        fn ready_has_no_reason_and_the_others_have_some(
            both_ok in 0u64..400, runtime_failed in 0u64..20, legacy_failed in 0u64..20,
            both_failed in 0u64..5, rt_bin in 0usize..20, lt_bin in 0usize..20, min in 1u64..100,
        ) {
            let mut t = Tally { both_ok, runtime_failed, legacy_failed, both_failed, ..Tally::default() };
            t.runtime_ttfe[rt_bin] = t.samples();
            t.legacy_ttfe[lt_bin] = t.samples();
            let j = judge(&t, &Thresholds { min_samples: min, ..T });
            prop_assert_eq!(j.verdict == Verdict::Ready, j.reasons.is_empty());
            if j.verdict != Verdict::Insufficient {
                prop_assert_eq!(j.samples_needed, None);
            }
            if let Some(k) = j.samples_needed {
                prop_assert!(k >= 1);
            }
        }
    }
}
