//! What is in flight, counted while it lives: every request (the shutdown drain waits for them),
//! streams by mode (a gauge), and executions read to their end for clients that left.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Counts requests in flight; each request's context holds one `RequestGuard`.
#[derive(Default)]
pub struct InFlightRequests(AtomicUsize);

impl InFlightRequests {
    pub fn enter(self: &Arc<Self>) -> RequestGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        RequestGuard(self.clone())
    }
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

pub struct RequestGuard(Arc<InFlightRequests>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Keeps a gauge raised for as long as it lives.
pub struct InFlight(prometheus::IntGauge);

impl InFlight {
    pub fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The detached executions running now, oldest first, each with its cancel.
#[derive(Default)]
pub struct Detached {
    running: Mutex<VecDeque<(u64, Arc<Notify>)>>,
    next: AtomicU64,
}

impl Detached {
    /// Running now.
    pub fn len(&self) -> usize {
        self.running.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Take one more, at most `max` at once: the oldest beyond it is told to stop.
    pub fn admit(&self, max: usize) -> (u64, Arc<Notify>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = Arc::new(Notify::new());
        let mut running = self.running.lock().unwrap();
        running.push_back((id, cancel.clone()));
        while running.len() > max.max(1) {
            if let Some((_, oldest)) = running.pop_front() {
                // A permit: it stops at its next wait even if it is not waiting now.
                oldest.notify_one();
            }
        }
        (id, cancel)
    }

    pub fn leave(&self, id: u64) {
        self.running.lock().unwrap().retain(|(i, _)| *i != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beyond_the_bound_the_oldest_is_told_to_stop() {
        let d = Detached::default();
        let (a, cancel_a) = d.admit(2);
        let (_, cancel_b) = d.admit(2);
        assert_eq!(d.len(), 2);
        let (_, _cancel_c) = d.admit(2);
        assert_eq!(d.len(), 2);
        // `a` holds a permit: its next wait ends at once; `b` holds none.
        assert!(futures::FutureExt::now_or_never(cancel_a.notified()).is_some());
        assert!(futures::FutureExt::now_or_never(cancel_b.notified()).is_none());
        d.leave(a);
        assert_eq!(d.len(), 2, "a dropped execution is already out");
    }
}
