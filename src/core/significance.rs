//! The statistics of the readiness verdict: confidence bounds for a difference of two failure
//! rates measured on the same requests, and a rank test of "no slower than k times", on the
//! counts a scorecard keeps (or Prometheus sums), never on raw samples.
//!
//! - [`paired_difference`]: Newcombe's interval for a difference of paired proportions (his
//!   method 10, Statistics in Medicine 1998; 17:2635): Wilson score intervals of the two rates,
//!   combined with the correlation of the pairs. Each shadow comparison is one request answered
//!   by both sides, so the pairing is real, and it narrows the interval when both sides fail on
//!   the same requests.
//! - [`rank_test`]: a one-sided Mann-Whitney U test of runtime times against legacy times scaled
//!   by the allowed ratio, on histogram bins (ties by midrank, with the tie-corrected variance),
//!   the test Kayenta's canary judge uses.
//!
//! Every bound here is one-sided at 95 % ([`Z95`]).

/// The one-sided 95 % quantile of the standard normal distribution.
pub const Z95: f64 = 1.644_853_626_951_472_2;

/// Standard normal cumulative distribution, to about 1e-7 (Numerical Recipes' `erfcc`).
pub fn normal_cdf(x: f64) -> f64 {
    let z = x.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - 0.5 * erfc
    } else {
        0.5 * erfc
    }
}

/// Wilson score interval of a proportion `k / n` (counts may be fractional: Prometheus
/// extrapolates), at `z`. `(0, 1)` with no trials.
pub fn wilson(k: f64, n: f64, z: f64) -> (f64, f64) {
    if n <= 0.0 {
        return (0.0, 1.0);
    }
    let p = (k / n).clamp(0.0, 1.0);
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Outcomes of requests answered by both sides: which side failed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Paired {
    /// Both failed.
    pub both_failed: f64,
    /// Only the first side (the runtime) failed.
    pub first_failed: f64,
    /// Only the second side (legacy) failed.
    pub second_failed: f64,
    /// Neither failed.
    pub both_ok: f64,
}

impl Paired {
    pub fn n(&self) -> f64 {
        self.both_failed + self.first_failed + self.second_failed + self.both_ok
    }

    /// The first side's failure rate; 0 with no pairs.
    pub fn first_rate(&self) -> f64 {
        ratio(self.both_failed + self.first_failed, self.n())
    }

    /// The second side's failure rate; 0 with no pairs.
    pub fn second_rate(&self) -> f64 {
        ratio(self.both_failed + self.second_failed, self.n())
    }

    /// Every count times `k`: the same rates on more requests.
    pub fn scaled(&self, k: f64) -> Paired {
        Paired {
            both_failed: self.both_failed * k,
            first_failed: self.first_failed * k,
            second_failed: self.second_failed * k,
            both_ok: self.both_ok * k,
        }
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Bounds, at `z` each side, of (first side's failure rate − second side's), by Newcombe's
/// method 10. The correlation is taken with his correction towards 0 when it is positive, so
/// the pairing narrows the interval only as far as the data shows. `(-1, 1)` with no pairs.
pub fn paired_difference(t: &Paired, z: f64) -> (f64, f64) {
    let n = t.n();
    if n <= 0.0 {
        return (-1.0, 1.0);
    }
    let (a, b, c, d) = (t.both_failed, t.first_failed, t.second_failed, t.both_ok);
    let (p1, p2) = (t.first_rate(), t.second_rate());
    let (l1, u1) = wilson(a + b, n, z);
    let (l2, u2) = wilson(a + c, n, z);
    let margins = (a + b) * (c + d) * (a + c) * (b + d);
    let phi = if margins > 0.0 {
        let cross = a * d - b * c;
        let cross = if cross > 0.0 {
            (cross - n / 2.0).max(0.0)
        } else {
            cross
        };
        cross / margins.sqrt()
    } else {
        0.0
    };
    let lower_part = (p1 - l1).powi(2) - 2.0 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2).powi(2);
    let upper_part = (u1 - p1).powi(2) - 2.0 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2).powi(2);
    let diff = p1 - p2;
    (
        (diff - lower_part.max(0.0).sqrt()).max(-1.0),
        (diff + upper_part.max(0.0).sqrt()).min(1.0),
    )
}

/// The smallest multiple `k >= 1` of the pairs at which, with the same rates, the upper bound
/// of the difference is at most `limit`; `None` when no number of samples gets there (the
/// observed difference is at or above `limit`).
pub fn scale_for_upper_bound(t: &Paired, limit: f64, z: f64) -> Option<f64> {
    if t.n() <= 0.0 || t.first_rate() - t.second_rate() >= limit {
        return None;
    }
    if paired_difference(t, z).1 <= limit {
        return Some(1.0);
    }
    let (mut lo, mut hi) = (1.0_f64, 2.0_f64);
    while paired_difference(&t.scaled(hi), z).1 > limit {
        lo = hi;
        hi *= 2.0;
        if hi > 1e9 {
            return None;
        }
    }
    for _ in 0..50 {
        let mid = (lo + hi) / 2.0;
        if paired_difference(&t.scaled(mid), z).1 > limit {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(hi)
}

/// The result of [`rank_test`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankTest {
    /// Samples on each side that had a value.
    pub first: f64,
    pub second: f64,
    /// Evidence that the first side is faster than `ratio` × the second: a standard normal
    /// score, at least [`Z95`] when shown at 95 %.
    pub z_faster: f64,
    /// Evidence that the first side is slower than `ratio` × the second, likewise.
    pub z_slower: f64,
}

/// One-sided Mann-Whitney U tests of the first side's times against `ratio` × the second's,
/// on histograms with the same bins: `bounds` are the bins' upper bounds (inclusive, as
/// Prometheus' `le`), the last bin is everything above the last bound. The second side's
/// times are taken as at least `floor` (a legacy answer faster than that is not held against
/// the runtime).
///
/// A pair counts as a tie (½) when the first side's bin and the second's scaled bin are the same
/// interval. When they overlap without being the same (a ratio that does not map bins onto
/// bins), the pair is counted against the side being shown: not faster in `z_faster`, not slower
/// in `z_slower`, so the resolution of the bins never makes a verdict easier. The variance is
/// the tie-corrected one; the scores carry a continuity correction.
pub fn rank_test(
    first: &[u64],
    second: &[u64],
    bounds: &[f64],
    ratio: f64,
    floor: f64,
) -> RankTest {
    let bins = bounds.len() + 1;
    debug_assert!(first.len() == bins && second.len() == bins);
    let n1: f64 = first.iter().map(|&c| c as f64).sum();
    let n2: f64 = second.iter().map(|&c| c as f64).sum();
    let none = RankTest {
        first: n1,
        second: n2,
        z_faster: 0.0,
        z_slower: 0.0,
    };
    if n1 == 0.0 || n2 == 0.0 {
        return none;
    }
    let first_bin = |i: usize| {
        let lo = if i == 0 { 0.0 } else { bounds[i - 1] };
        let hi = bounds.get(i).copied().unwrap_or(f64::INFINITY);
        (lo, hi)
    };
    let second_bin = |j: usize| {
        let lo = if j == 0 {
            floor
        } else {
            bounds[j - 1].max(floor)
        };
        let hi = bounds.get(j).copied().unwrap_or(f64::INFINITY).max(floor);
        (lo * ratio, hi * ratio)
    };
    let same = |x: f64, y: f64| x == y || (x - y).abs() <= 1e-9 * x.abs().max(y.abs());
    // U counts pairs where the first side is faster (ties ½), at the two readings of partial
    // overlaps; tie groups feed the variance.
    let (mut u_strict, mut u_lenient) = (0.0, 0.0);
    let mut ties = 0.0;
    let mut second_tied = vec![false; bins];
    for (i, &ci) in first.iter().enumerate() {
        if ci == 0 {
            continue;
        }
        let ci = ci as f64;
        let (a, b) = first_bin(i);
        let mut group = ci;
        for (j, &cj) in second.iter().enumerate() {
            if cj == 0 {
                continue;
            }
            let cj = cj as f64;
            let (c, d) = second_bin(j);
            let pairs = ci * cj;
            if same(a, c) && same(b, d) {
                u_strict += pairs / 2.0;
                u_lenient += pairs / 2.0;
                group += cj;
                second_tied[j] = true;
            } else if b <= c {
                u_strict += pairs;
                u_lenient += pairs;
            } else if a >= d {
                // Slower for sure.
            } else {
                u_lenient += pairs;
            }
        }
        ties += group.powi(3) - group;
    }
    for (j, &cj) in second.iter().enumerate() {
        if cj > 0 && !second_tied[j] {
            let cj = cj as f64;
            ties += cj.powi(3) - cj;
        }
    }
    let n = n1 + n2;
    let variance = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if variance <= 0.0 {
        return none;
    }
    let sd = variance.sqrt();
    let mean = n1 * n2 / 2.0;
    RankTest {
        z_faster: (u_strict - mean - 0.5) / sd,
        z_slower: (mean - u_lenient - 0.5) / sd,
        ..none
    }
}

/// About how many times the current samples a score of `z` needs to reach `target`, the score
/// growing with the square root of the samples for the same distributions; `None` when `z` is
/// not positive (more of the same never gets there).
pub fn scale_for_score(z: f64, target: f64) -> Option<f64> {
    (z > 0.0).then(|| (target / z).powi(2).max(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, eps: f64) -> bool {
        (a - b).abs() <= eps
    }

    #[test]
    fn normal_cdf_matches_tables() {
        assert!(close(normal_cdf(0.0), 0.5, 1e-7));
        assert!(close(normal_cdf(Z95), 0.95, 1e-6));
        assert!(close(normal_cdf(1.959_963_985), 0.975, 1e-6));
        assert!(close(normal_cdf(-1.0), 0.158_655_254, 1e-6));
        assert!(close(normal_cdf(3.0), 0.998_650_102, 1e-6));
        assert!(normal_cdf(-40.0) >= 0.0 && normal_cdf(40.0) <= 1.0);
    }

    #[test]
    fn wilson_matches_published_values() {
        // Newcombe (1998, independent proportions), 95 % two-sided: 81/263 -> 0.2553..0.3662.
        let (lo, hi) = wilson(81.0, 263.0, 1.959_964);
        assert!(
            close(lo, 0.2553, 5e-4) && close(hi, 0.3662, 5e-4),
            "{lo} {hi}"
        );
        // 0 of n: the upper bound is z²/(n+z²).
        let (lo, hi) = wilson(0.0, 50.0, Z95);
        assert_eq!(lo, 0.0);
        assert!(close(hi, Z95 * Z95 / (50.0 + Z95 * Z95), 1e-12));
        assert_eq!(wilson(0.0, 0.0, Z95), (0.0, 1.0));
    }

    #[test]
    fn paired_bounds_cover_the_true_difference_at_their_level() {
        // Simulated pairs with known failure rates (correlated: both sides share a "hard"
        // request now and then): each one-sided 95 % bound holds in about 95 % of samples.
        let mut rng = fastrand::Rng::with_seed(7);
        for (p1, p2, n) in [(0.03, 0.01, 300), (0.10, 0.10, 100), (0.2, 0.05, 60)] {
            let (mut upper_held, mut lower_held, runs) = (0, 0, 2000);
            for _ in 0..runs {
                let mut t = Paired::default();
                for _ in 0..n {
                    let hard = rng.f64() < 0.02;
                    let a = hard || rng.f64() < p1;
                    let b = hard || rng.f64() < p2;
                    *match (a, b) {
                        (true, true) => &mut t.both_failed,
                        (true, false) => &mut t.first_failed,
                        (false, true) => &mut t.second_failed,
                        (false, false) => &mut t.both_ok,
                    } += 1.0;
                }
                let truth = (p1 + 0.02 - 0.02 * p1) - (p2 + 0.02 - 0.02 * p2);
                let (lo, hi) = paired_difference(&t, Z95);
                upper_held += usize::from(truth <= hi);
                lower_held += usize::from(truth >= lo);
            }
            for held in [upper_held, lower_held] {
                let share = held as f64 / runs as f64;
                assert!(share >= 0.93, "({p1}, {p2}, {n}): held in {share}");
            }
        }
    }

    #[test]
    fn paired_difference_without_failures_is_the_wilson_bound() {
        let t = Paired {
            both_ok: 200.0,
            ..Paired::default()
        };
        let (lo, hi) = paired_difference(&t, Z95);
        assert!(close(hi, wilson(0.0, 200.0, Z95).1, 1e-12));
        assert!(close(lo, -hi, 1e-12));
        assert_eq!(paired_difference(&Paired::default(), Z95), (-1.0, 1.0));
    }

    #[test]
    fn samples_needed_for_a_bound() {
        let t = Paired {
            both_ok: 50.0,
            ..Paired::default()
        };
        // 0 failures in n: z²/(n+z²) <= 0.02 from n = 49 z² ≈ 132.6.
        let k = scale_for_upper_bound(&t, 0.02, Z95).unwrap();
        assert!(close(k * 50.0, 49.0 * Z95 * Z95, 0.01), "{}", k * 50.0);
        let worse = Paired {
            first_failed: 3.0,
            both_ok: 47.0,
            ..Paired::default()
        };
        assert_eq!(scale_for_upper_bound(&worse, 0.02, Z95), None);
        assert_eq!(scale_for_upper_bound(&t.scaled(10.0), 0.02, Z95), Some(1.0));
    }

    const BOUNDS: [f64; 3] = [1.0, 2.0, 4.0];

    #[test]
    fn rank_test_sees_a_faster_and_a_slower_side() {
        // Everyone of the first side in (0,1], of the second in (1,2]: twice the second is
        // (2,4], so the first is faster; the second side tied with itself.
        let r = rank_test(&[20, 0, 0, 0], &[0, 20, 0, 0], &BOUNDS, 2.0, 0.0);
        assert!(r.z_faster > Z95 && r.z_slower < 0.0, "{r:?}");
        // The first side in (4, inf), the second in (0,1]: slower than 2x.
        let r = rank_test(&[0, 0, 0, 20], &[20, 0, 0, 0], &BOUNDS, 2.0, 0.0);
        assert!(r.z_slower > Z95 && r.z_faster < 0.0, "{r:?}");
        // The first side exactly twice the second, bin for bin: no evidence either way.
        let r = rank_test(&[0, 10, 10, 0], &[10, 10, 0, 0], &BOUNDS, 2.0, 0.0);
        assert!(r.z_faster < 0.0 && r.z_slower < 0.0, "{r:?}");
    }

    #[test]
    fn rank_test_of_identical_bins_without_a_ratio_is_all_ties() {
        let r = rank_test(&[0, 5, 5, 0], &[0, 5, 5, 0], &BOUNDS, 1.0, 0.0);
        // U is exactly its mean: both scores are the continuity correction's -0.5/sd.
        assert!(
            r.z_faster < 0.0 && close(r.z_faster, r.z_slower, 1e-12),
            "{r:?}"
        );
        assert_eq!((r.first, r.second), (10.0, 10.0));
    }

    #[test]
    fn partial_overlaps_never_help_the_side_being_shown() {
        // Ratio 1.5: the second side's (1,2] scales to (1.5,3], which overlaps the first
        // side's (2,4] without being it.
        let r = rank_test(&[0, 0, 10, 0], &[0, 10, 0, 0], &BOUNDS, 1.5, 0.0);
        assert!(r.z_faster < 0.0, "not shown faster: {r:?}");
        assert!(r.z_slower < 0.0, "not shown slower either: {r:?}");
    }

    #[test]
    fn the_floor_lifts_the_second_side() {
        // The second side in (0,1] taken as 1: with ratio 2 it reads as 2, so a first side in
        // (1,2] is not slower than it.
        let r = rank_test(&[0, 20, 0, 0], &[20, 0, 0, 0], &BOUNDS, 2.0, 1.0);
        assert!(r.z_slower < Z95, "{r:?}");
        let r = rank_test(&[0, 20, 0, 0], &[20, 0, 0, 0], &BOUNDS, 2.0, 0.0);
        assert!(
            r.z_slower < Z95,
            "(0,2] against (1,2]: overlapping, never slower {r:?}"
        );
    }

    #[test]
    fn rank_test_with_an_empty_side_decides_nothing() {
        let r = rank_test(&[0; 4], &[3, 0, 0, 0], &BOUNDS, 2.0, 0.0);
        assert_eq!((r.z_faster, r.z_slower), (0.0, 0.0));
    }

    #[test]
    fn score_scaling() {
        assert_eq!(scale_for_score(0.0, Z95), None);
        assert_eq!(scale_for_score(-1.0, Z95), None);
        assert!(close(scale_for_score(Z95 / 2.0, Z95).unwrap(), 4.0, 1e-12));
        assert_eq!(scale_for_score(5.0, Z95), Some(1.0));
    }
}
