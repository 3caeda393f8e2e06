//! The `[shadow]` verdict on one org's comparisons: `insufficient`, `not_ready` with its reasons,
//! or `ready`, and the medians it reads.

use serde::ser::SerializeStruct;
use serde::Serialize;

/// `[shadow]`: when an org is `ready`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub min_samples: u64,
    pub max_error_rate_delta: f64,
    pub max_ttfe_ratio: f64,
}

/// `ready`, `not_ready` or `insufficient`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Ready,
    NotReady,
    Insufficient,
}

/// The lower median (nearest rank) of `values`, sorted here; `None` when empty.
pub fn p50(values: &mut [u32]) -> Option<u32> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    Some(values[(values.len() - 1) / 2])
}

/// One path's totals and medians over the window.
#[derive(Debug, Clone, PartialEq, Default)]
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

/// The verdict and its reasons: `insufficient` under `min_samples`; otherwise `not_ready` when
/// the runtime's failure rate exceeds legacy's by more than the delta, or its median time to
/// first event is more than the ratio times legacy's (at least 1 ms); else `ready`.
pub fn verdict(
    samples: u64,
    legacy: &PathSummary,
    runtime: &PathSummary,
    t: &Thresholds,
) -> (Verdict, Vec<String>) {
    if samples < t.min_samples {
        return (
            Verdict::Insufficient,
            vec![format!(
                "{samples} samples < ready_min_samples {}",
                t.min_samples
            )],
        );
    }
    let mut reasons = Vec::new();
    let (r, l) = (runtime.failure_rate(), legacy.failure_rate());
    // Compared in whole basis points, so rates printed equal never trip on float noise.
    let bp = |x: f64| (x * 10_000.0).round() as i64;
    if bp(r) > bp(l) + bp(t.max_error_rate_delta) {
        reasons.push(format!(
            "runtime error rate {r:.2} > legacy {l:.2} + {:.2}",
            t.max_error_rate_delta
        ));
    }
    let legacy_ttfe = legacy.ttfe_ms_p50.unwrap_or(0.0).max(1.0);
    if let Some(rt) = runtime.ttfe_ms_p50 {
        if rt > t.max_ttfe_ratio * legacy_ttfe {
            reasons.push(format!(
                "runtime ttfe p50 {rt:.0} ms > {} x legacy {legacy_ttfe:.0} ms",
                t.max_ttfe_ratio
            ));
        }
    }
    if reasons.is_empty() {
        (Verdict::Ready, reasons)
    } else {
        (Verdict::NotReady, reasons)
    }
}

/// Legacy's half of `S`: no `timeout` (a legacy answer either ends with `done` or it fails).
pub(super) struct Legacy<'a>(pub(super) &'a PathSummary);

impl Serialize for Legacy<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let p = self.0;
        let mut s = serializer.serialize_struct("Legacy", 5)?;
        s.serialize_field("success", &p.success)?;
        s.serialize_field("error", &(p.error + p.timeout))?;
        s.serialize_field("ttfeMsP50", &p.ttfe_ms_p50)?;
        s.serialize_field("durationMsP50", &p.duration_ms_p50)?;
        s.serialize_field("textCharsP50", &p.text_chars_p50)?;
        s.end()
    }
}

impl Serialize for PathSummary {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Runtime", 6)?;
        s.serialize_field("success", &self.success)?;
        s.serialize_field("error", &self.error)?;
        s.serialize_field("timeout", &self.timeout)?;
        s.serialize_field("ttfeMsP50", &self.ttfe_ms_p50)?;
        s.serialize_field("durationMsP50", &self.duration_ms_p50)?;
        s.serialize_field("textCharsP50", &self.text_chars_p50)?;
        s.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::core::scorecard::samples::T;

    fn path(success: u64, error: u64, ttfe_ms: f64) -> PathSummary {
        PathSummary {
            success,
            error,
            ttfe_ms_p50: Some(ttfe_ms),
            ..PathSummary::default()
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
    fn each_threshold_gives_its_own_reason() {
        let legacy = path(10, 0, 100.0);
        assert_eq!(
            verdict(10, &legacy, &path(10, 0, 200.0), &T),
            (Verdict::Ready, vec![])
        );
        let (v, reasons) = verdict(10, &legacy, &path(6, 4, 250.0), &T);
        assert_eq!(v, Verdict::NotReady);
        assert_eq!(
            reasons,
            [
                "runtime error rate 0.40 > legacy 0.00 + 0.02",
                "runtime ttfe p50 250 ms > 2 x legacy 100 ms"
            ]
        );
        assert_eq!(
            verdict(9, &legacy, &path(6, 4, 250.0), &T).0,
            Verdict::Insufficient
        );
    }

    #[test]
    fn a_runtime_that_never_sent_an_event_is_judged_on_its_failures_alone() {
        let runtime = PathSummary {
            error: 10,
            ..PathSummary::default()
        };
        let (v, reasons) = verdict(10, &path(10, 0, 100.0), &runtime, &T);
        assert_eq!(v, Verdict::NotReady);
        assert_eq!(reasons, ["runtime error rate 1.00 > legacy 0.00 + 0.02"]);
    }
}
