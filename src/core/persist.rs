//! Saving a message exactly once, without I/O: what an attempt's result means for the next step,
//! and the waits between attempts.
//!
//! Legacy's message route has no idempotency key, so a save whose answer never came (a timeout
//! after the request was written, a connection lost before the answer) may or may not have
//! happened. Such a save is never simply sent again: the session's messages are read first
//! (`core::bridge::find_saved`), and the save is repeated only when its message is not there.

use std::time::Duration;

use crate::core::bridge::BridgeError;

/// What one attempt to save a message came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Legacy saved it under this id.
    Saved(String),
    /// Legacy answered, and did not save it: send it again after a wait (`408`, `429`).
    NotSaved,
    /// No usable answer (a timeout, a lost connection, a 5xx, a 2xx that does not parse): it may
    /// have been saved. Read the session's messages before sending it again.
    Unknown,
    /// Legacy refused it for good (any other 4xx: the session is gone, the caller may not), or
    /// the proxy refused the id itself. Another attempt would be refused too.
    Refused,
}

impl Attempt {
    pub fn of(result: &Result<String, BridgeError>) -> Attempt {
        match result {
            Ok(id) => Attempt::Saved(id.clone()),
            // A request timeout or a rate limit: legacy did not take it, and may later.
            Err(BridgeError::Refused {
                status: Some(408 | 429),
                ..
            }) => Attempt::NotSaved,
            Err(BridgeError::Refused { .. }) => Attempt::Refused,
            // A 5xx is taken as unknown too: legacy may have written the row and then failed.
            Err(BridgeError::Unavailable { .. }) => Attempt::Unknown,
        }
    }
}

/// Exponential backoff with equal jitter: the n-th wait is drawn from `[d/2, d]` where
/// `d = min(cap, base · 2ⁿ)`, so replicas that lost legacy at the same moment do not all come
/// back at the same one, and no wait is ever longer than `cap`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            next: base.min(cap),
            cap,
        }
    }

    /// The next wait; `draw` is uniform in `[0, 1)`.
    pub fn wait(&mut self, draw: f64) -> Duration {
        let d = self.next;
        self.next = self.next.saturating_mul(2).min(self.cap);
        d / 2 + d.mul_f64(draw.clamp(0.0, 1.0) / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::bridge::Route;
    use proptest::prelude::*;

    #[test]
    fn results_are_classified() {
        let refused = |s| Err(BridgeError::refused(Route::SaveMessage, s, "x"));
        assert_eq!(Attempt::of(&Ok("m-1".into())), Attempt::Saved("m-1".into()));
        assert_eq!(Attempt::of(&refused(Some(429))), Attempt::NotSaved);
        assert_eq!(Attempt::of(&refused(Some(408))), Attempt::NotSaved);
        for s in [Some(400), Some(401), Some(403), Some(404), Some(413), None] {
            assert_eq!(Attempt::of(&refused(s)), Attempt::Refused, "{s:?}");
        }
        let unavailable = Err(BridgeError::unavailable(Route::SaveMessage, "timeout"));
        assert_eq!(Attempt::of(&unavailable), Attempt::Unknown);
    }

    #[test]
    fn waits_double_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let top: Vec<Duration> = (0..9).map(|_| b.wait(1.0)).collect();
        let ms: Vec<u128> = top.iter().map(Duration::as_millis).collect();
        assert_eq!(
            ms,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        assert_eq!(b.wait(0.0), Duration::from_millis(250));
        // A legacy restart of ten seconds is covered within the first six waits, at most.
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let shortest: Duration = (0..6).map(|_| b.wait(0.0)).sum();
        assert!(shortest >= Duration::from_secs(15), "{shortest:?}");
    }

    proptest! {
        #[test]
        fn every_wait_is_within_its_band(
            base_ms in 1u64..5_000,
            cap_ms in 1u64..120_000,
            draws in proptest::collection::vec(0.0f64..1.0, 1..40),
        ) {
            let (base, cap) = (Duration::from_millis(base_ms), Duration::from_millis(cap_ms));
            let mut b = Backoff::new(base, cap);
            let mut d = base.min(cap);
            for draw in draws {
                let w = b.wait(draw);
                prop_assert!(w >= d / 2 && w <= d, "{w:?} outside [{:?}, {d:?}]", d / 2);
                prop_assert!(w <= cap);
                d = (d * 2).min(cap);
            }
        }
    }
}
