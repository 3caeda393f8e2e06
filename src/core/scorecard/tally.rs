//! What the verdict reads: counts, not samples. An org's comparisons over the window summed into
//! one [`Tally`]: the paired outcome table (which side failed on each request), the runtime's
//! timeouts, and each side's time to first event as a histogram on fixed bins.
//!
//! The same numbers are what every replica exports (`cutover_shadow_comparisons_total{result}`,
//! `cutover_shadow_runtime_timeouts_total`, `cutover_shadow_ttfe_seconds` on the bins of
//! [`TTFE_BOUNDS_SECONDS`]), so a tally read back from Prometheus for the whole fleet is judged by
//! exactly the code that judges one replica's. Memory stays bounded whatever the traffic: a tally
//! is a few hundred bytes, and [`TallyRing`] keeps [`RING_SLOTS`] of them per org.

use crate::core::stats::Outcome;

use super::pairing::{Comparison, ComparisonResult};

/// Upper bounds (seconds, inclusive) of the time-to-first-event bins: 1 ms to about 65 s in
/// steps of 1.5 and 4/3, so that doubling a bound is the bound two steps up: a runtime bin and
/// twice a legacy bin are the same interval, and the default `ready_max_ttfe_ratio` of 2 is
/// tested without any loss to the binning.
pub const TTFE_BOUNDS_SECONDS: [f64; 33] = [
    0.001, 0.0015, 0.002, 0.003, 0.004, 0.006, 0.008, 0.012, 0.016, 0.024, 0.032, 0.048, 0.064,
    0.096, 0.128, 0.192, 0.256, 0.384, 0.512, 0.768, 1.024, 1.536, 2.048, 3.072, 4.096, 6.144,
    8.192, 12.288, 16.384, 24.576, 32.768, 49.152, 65.536,
];

/// Bins of a time-to-first-event histogram: one per bound, and the last one above them all.
pub const TTFE_BINS: usize = TTFE_BOUNDS_SECONDS.len() + 1;

/// The bin of `seconds`: the first whose bound is at least it, as Prometheus' `le`.
pub fn ttfe_bin(seconds: f64) -> usize {
    TTFE_BOUNDS_SECONDS
        .iter()
        .position(|b| seconds <= *b)
        .unwrap_or(TTFE_BOUNDS_SECONDS.len())
}

/// One org's comparisons, summed.
#[derive(Debug, Clone, PartialEq)]
pub struct Tally {
    pub both_ok: u64,
    pub runtime_failed: u64,
    pub legacy_failed: u64,
    pub both_failed: u64,
    /// Runtime failures that were timeouts (part of `runtime_failed` + `both_failed`).
    pub runtime_timeouts: u64,
    /// Time to first event, by bin, of the comparisons whose side sent an event.
    pub legacy_ttfe: [u64; TTFE_BINS],
    pub runtime_ttfe: [u64; TTFE_BINS],
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            both_ok: 0,
            runtime_failed: 0,
            legacy_failed: 0,
            both_failed: 0,
            runtime_timeouts: 0,
            legacy_ttfe: [0; TTFE_BINS],
            runtime_ttfe: [0; TTFE_BINS],
        }
    }
}

impl Tally {
    /// Count one comparison.
    pub fn record(&mut self, c: &Comparison) {
        *self.result_mut(c.result()) += 1;
        if c.runtime.outcome == Outcome::Timeout {
            self.runtime_timeouts += 1;
        }
        if let Some(t) = c.legacy.ttfe {
            self.legacy_ttfe[ttfe_bin(t.as_secs_f64())] += 1;
        }
        if let Some(t) = c.runtime.ttfe {
            self.runtime_ttfe[ttfe_bin(t.as_secs_f64())] += 1;
        }
    }

    pub fn result_mut(&mut self, r: ComparisonResult) -> &mut u64 {
        match r {
            ComparisonResult::BothOk => &mut self.both_ok,
            ComparisonResult::RuntimeFailed => &mut self.runtime_failed,
            ComparisonResult::LegacyFailed => &mut self.legacy_failed,
            ComparisonResult::BothFailed => &mut self.both_failed,
        }
    }

    pub fn merge(&mut self, o: &Tally) {
        self.both_ok += o.both_ok;
        self.runtime_failed += o.runtime_failed;
        self.legacy_failed += o.legacy_failed;
        self.both_failed += o.both_failed;
        self.runtime_timeouts += o.runtime_timeouts;
        for (a, b) in self.legacy_ttfe.iter_mut().zip(o.legacy_ttfe) {
            *a += b;
        }
        for (a, b) in self.runtime_ttfe.iter_mut().zip(o.runtime_ttfe) {
            *a += b;
        }
    }

    /// Comparisons counted.
    pub fn samples(&self) -> u64 {
        self.both_ok + self.runtime_failed + self.legacy_failed + self.both_failed
    }

    pub fn runtime_failures(&self) -> u64 {
        self.runtime_failed + self.both_failed
    }

    pub fn legacy_failures(&self) -> u64 {
        self.legacy_failed + self.both_failed
    }

    /// Comparisons where both sides agreed (both succeeded or both failed), over all; 0 with none.
    pub fn agreement(&self) -> f64 {
        let n = self.samples();
        if n == 0 {
            0.0
        } else {
            (self.both_ok + self.both_failed) as f64 / n as f64
        }
    }
}

/// The `q` quantile of a time-to-first-event histogram in milliseconds, interpolated inside its
/// bin as Prometheus' `histogram_quantile` does (a value in the last, open bin reads as the
/// last bound); `None` when it is empty.
pub fn ttfe_quantile_ms(bins: &[u64; TTFE_BINS], q: f64) -> Option<f64> {
    let n: u64 = bins.iter().sum();
    if n == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * n as f64;
    let mut below = 0u64;
    for (i, &c) in bins.iter().enumerate() {
        if c == 0 {
            continue;
        }
        if (below + c) as f64 >= rank {
            let Some(&hi) = TTFE_BOUNDS_SECONDS.get(i) else {
                return Some(TTFE_BOUNDS_SECONDS[TTFE_BOUNDS_SECONDS.len() - 1] * 1000.0);
            };
            let lo = if i == 0 {
                0.0
            } else {
                TTFE_BOUNDS_SECONDS[i - 1]
            };
            let within = ((rank - below as f64) / c as f64).clamp(0.0, 1.0);
            return Some((lo + (hi - lo) * within) * 1000.0);
        }
        below += c;
    }
    None
}

/// Slots of a [`TallyRing`]: the window slides in steps of a tenth of its span.
pub const RING_SLOTS: usize = 10;

/// One slot's counts, in `u32` to keep a ring of them small (a slot is at most a tenth of a
/// window: four billion comparisons are not reached).
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Index of the interval this slot holds, in slot widths since the ring's origin.
    epoch: u64,
    results: [u32; 4],
    runtime_timeouts: u32,
    legacy_ttfe: [u32; TTFE_BINS],
    runtime_ttfe: [u32; TTFE_BINS],
}

impl Slot {
    fn empty(epoch: u64) -> Self {
        Slot {
            epoch,
            results: [0; 4],
            runtime_timeouts: 0,
            legacy_ttfe: [0; TTFE_BINS],
            runtime_ttfe: [0; TTFE_BINS],
        }
    }
}

fn result_index(r: ComparisonResult) -> usize {
    match r {
        ComparisonResult::BothOk => 0,
        ComparisonResult::RuntimeFailed => 1,
        ComparisonResult::LegacyFailed => 2,
        ComparisonResult::BothFailed => 3,
    }
}

/// An org's comparisons over a sliding window, as [`RING_SLOTS`] time slots of counts: about
/// 3 KB per org whatever its traffic. Times are milliseconds on the caller's clock; comparisons
/// younger than `span − span / RING_SLOTS` always count, those `span` old or older never do.
#[derive(Debug, Clone)]
pub struct TallyRing {
    slots: Vec<Slot>,
}

impl Default for TallyRing {
    fn default() -> Self {
        TallyRing {
            slots: vec![Slot::empty(u64::MAX); RING_SLOTS],
        }
    }
}

fn width_ms(span_ms: u64) -> u64 {
    (span_ms / RING_SLOTS as u64).max(1)
}

impl TallyRing {
    /// Count `c`, compared at `at_ms`, in a window of `span_ms`.
    pub fn record(&mut self, c: &Comparison, at_ms: u64, span_ms: u64) {
        let epoch = at_ms / width_ms(span_ms);
        let slot = &mut self.slots[(epoch % RING_SLOTS as u64) as usize];
        if slot.epoch != epoch {
            if slot.epoch != u64::MAX && slot.epoch > epoch {
                return; // older than what the slot holds now: out of the window already
            }
            *slot = Slot::empty(epoch);
        }
        let bump = |x: &mut u32| *x = x.saturating_add(1);
        bump(&mut slot.results[result_index(c.result())]);
        if c.runtime.outcome == Outcome::Timeout {
            bump(&mut slot.runtime_timeouts);
        }
        if let Some(t) = c.legacy.ttfe {
            bump(&mut slot.legacy_ttfe[ttfe_bin(t.as_secs_f64())]);
        }
        if let Some(t) = c.runtime.ttfe {
            bump(&mut slot.runtime_ttfe[ttfe_bin(t.as_secs_f64())]);
        }
    }

    /// The counts of the slots still in the window at `now_ms`.
    pub fn sum(&self, now_ms: u64, span_ms: u64) -> Tally {
        let current = now_ms / width_ms(span_ms);
        let mut t = Tally::default();
        for s in &self.slots {
            if s.epoch == u64::MAX || current.saturating_sub(s.epoch) >= RING_SLOTS as u64 {
                continue;
            }
            for (r, &n) in ComparisonResult::ALL.iter().zip(&s.results) {
                *t.result_mut(*r) += u64::from(n);
            }
            t.runtime_timeouts += u64::from(s.runtime_timeouts);
            for (a, &b) in t.legacy_ttfe.iter_mut().zip(&s.legacy_ttfe) {
                *a += u64::from(b);
            }
            for (a, &b) in t.runtime_ttfe.iter_mut().zip(&s.runtime_ttfe) {
                *a += u64::from(b);
            }
        }
        t
    }

    /// A new span: slots were cut for the old one, so the window starts afresh.
    pub fn clear(&mut self) {
        self.slots.fill(Slot::empty(u64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::scorecard::samples::cmp;

    #[test]
    fn doubling_a_bound_is_the_bound_two_steps_up() {
        for i in 0..TTFE_BOUNDS_SECONDS.len() - 2 {
            assert_eq!(
                TTFE_BOUNDS_SECONDS[i] * 2.0,
                TTFE_BOUNDS_SECONDS[i + 2],
                "{i}"
            );
        }
        assert!(TTFE_BOUNDS_SECONDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn bins_are_inclusive_upper_bounds() {
        assert_eq!(ttfe_bin(0.0), 0);
        assert_eq!(ttfe_bin(0.001), 0);
        assert_eq!(ttfe_bin(0.0011), 1);
        assert_eq!(ttfe_bin(0.1), 14);
        assert_eq!(ttfe_bin(65.536), 32);
        assert_eq!(ttfe_bin(1e9), 33);
    }

    #[test]
    fn tally_counts_results_timeouts_and_bins() {
        let mut t = Tally::default();
        t.record(&cmp(Outcome::Success, Outcome::Success, 100));
        t.record(&cmp(Outcome::Success, Outcome::Timeout, 100));
        t.record(&cmp(Outcome::Error, Outcome::Error, 3));
        assert_eq!(
            (
                t.both_ok,
                t.runtime_failed,
                t.both_failed,
                t.runtime_timeouts
            ),
            (1, 1, 1, 1)
        );
        assert_eq!(t.samples(), 3);
        assert_eq!((t.runtime_failures(), t.legacy_failures()), (2, 1));
        assert_eq!(t.legacy_ttfe[ttfe_bin(0.1)], 3);
        assert_eq!(t.runtime_ttfe[ttfe_bin(0.003)], 1);
        assert!((t.agreement() - 2.0 / 3.0).abs() < 1e-12);
        let mut twice = t.clone();
        twice.merge(&t);
        assert_eq!(twice.samples(), 6);
        assert_eq!(twice.legacy_ttfe[ttfe_bin(0.1)], 6);
    }

    #[test]
    fn quantiles_interpolate_inside_a_bin() {
        let mut bins = [0; TTFE_BINS];
        assert_eq!(ttfe_quantile_ms(&bins, 0.5), None);
        bins[ttfe_bin(0.1)] = 4; // (96, 128] ms
        let p50 = ttfe_quantile_ms(&bins, 0.5).unwrap();
        assert!((p50 - 112.0).abs() < 1e-9, "{p50}");
        bins[TTFE_BINS - 1] = 100;
        assert_eq!(ttfe_quantile_ms(&bins, 0.99), Some(65_536.0));
    }

    #[test]
    fn the_ring_forgets_what_left_the_window() {
        let mut r = TallyRing::default();
        let c = cmp(Outcome::Success, Outcome::Success, 10);
        let span = 60_000;
        r.record(&c, 0, span);
        r.record(&c, 30_000, span);
        assert_eq!(r.sum(59_000, span).samples(), 2);
        assert_eq!(r.sum(61_000, span).samples(), 1);
        assert_eq!(r.sum(200_000, span).samples(), 0);
        // A late record for a slot already reused is dropped, not mixed into a newer slot.
        r.record(&c, 200_000, span);
        r.record(&c, 200_000 - 60_000, span);
        assert_eq!(r.sum(200_000, span).samples(), 1);
        r.clear();
        assert_eq!(r.sum(200_000, span).samples(), 0);
    }
}
