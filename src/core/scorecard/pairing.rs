//! One shadowed request's two halves, the legacy answer and the runtime copy, and how they are
//! joined into one comparison whichever finishes first.

use std::time::Duration;

use crate::core::stats::Outcome;

/// What one path did with one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathSample {
    /// Legacy: `Success` or `Error`; the runtime: `Success`, `Error` or `Timeout`.
    pub outcome: Outcome,
    /// Time to its first event of any kind; `None` when it sent none.
    pub ttfe: Option<Duration>,
    pub duration: Duration,
    pub text_chars: u64,
}

/// One request as both paths answered it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    pub legacy: PathSample,
    pub runtime: PathSample,
}

/// `cutover_shadow_comparisons_total`'s `result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComparisonResult {
    BothOk,
    RuntimeFailed,
    LegacyFailed,
    BothFailed,
}

impl ComparisonResult {
    pub const ALL: [ComparisonResult; 4] = [
        ComparisonResult::BothOk,
        ComparisonResult::RuntimeFailed,
        ComparisonResult::LegacyFailed,
        ComparisonResult::BothFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ComparisonResult::BothOk => "both_ok",
            ComparisonResult::RuntimeFailed => "runtime_failed",
            ComparisonResult::LegacyFailed => "legacy_failed",
            ComparisonResult::BothFailed => "both_failed",
        }
    }
}

impl Comparison {
    pub fn result(&self) -> ComparisonResult {
        match (
            self.legacy.outcome.is_failure(),
            self.runtime.outcome.is_failure(),
        ) {
            (false, false) => ComparisonResult::BothOk,
            (false, true) => ComparisonResult::RuntimeFailed,
            (true, false) => ComparisonResult::LegacyFailed,
            (true, true) => ComparisonResult::BothFailed,
        }
    }
}

/// The two halves of one shadowed request, which finish in either order: whichever comes second
/// gets the comparison. A half that has nothing to compare (`None`: the client abandoned the
/// legacy stream, the copy was skipped) settles the pair with no comparison.
#[derive(Debug, Default)]
pub struct Pairing {
    legacy: Option<Option<PathSample>>,
    runtime: Option<Option<PathSample>>,
}

impl Pairing {
    /// The legacy half is over; a second report of the same half is ignored.
    pub fn legacy(&mut self, sample: Option<PathSample>) -> Option<Comparison> {
        if self.legacy.is_none() {
            self.legacy = Some(sample);
            return self.joined();
        }
        None
    }

    /// The runtime half is over; a second report of the same half is ignored.
    pub fn runtime(&mut self, sample: Option<PathSample>) -> Option<Comparison> {
        if self.runtime.is_none() {
            self.runtime = Some(sample);
            return self.joined();
        }
        None
    }

    fn joined(&self) -> Option<Comparison> {
        match (self.legacy, self.runtime) {
            (Some(Some(legacy)), Some(Some(runtime))) => Some(Comparison { legacy, runtime }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::core::scorecard::samples::*;

    #[test]
    fn pairs_join_in_either_order_once() {
        let c = cmp(Outcome::Success, Outcome::Error, 5);
        let mut p = Pairing::default();
        assert_eq!(p.legacy(Some(c.legacy)), None);
        assert_eq!(p.runtime(Some(c.runtime)), Some(c));
        assert_eq!(p.runtime(Some(c.runtime)), None, "settled once");
        let mut p = Pairing::default();
        assert_eq!(p.runtime(Some(c.runtime)), None);
        assert_eq!(p.legacy(Some(c.legacy)), Some(c));
    }

    #[test]
    fn a_missing_half_settles_the_pair_with_nothing() {
        let c = cmp(Outcome::Success, Outcome::Success, 5);
        let mut p = Pairing::default();
        assert_eq!(p.legacy(None), None);
        assert_eq!(p.runtime(Some(c.runtime)), None);
        let mut p = Pairing::default();
        assert_eq!(p.runtime(None), None);
        assert_eq!(p.legacy(Some(c.legacy)), None);
    }

    #[test]
    fn results_name_who_failed() {
        use Outcome::*;
        let r = |l, rt| cmp(l, rt, 1).result().as_str();
        assert_eq!(r(Success, Success), "both_ok");
        assert_eq!(r(Success, Timeout), "runtime_failed");
        assert_eq!(r(Error, Success), "legacy_failed");
        assert_eq!(r(Error, Error), "both_failed");
    }
}
