//! The SIGTERM drain: readiness fails, new connections are refused, requests in flight get the
//! grace period to finish, and streams still open near its end are told to close cleanly.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};

use crate::state::Shared;

/// SIGTERM starts the drain: readiness fails at once and Pingora's proxy listener stops
/// accepting (the admin and metrics listeners stay up, see `Endpoint`), while a separate thread
/// runs `drain` and ends the process. SIGINT before SIGTERM exits at once.
pub(super) struct DrainOnSigterm {
    pub(super) shared: Arc<Shared>,
}

#[async_trait]
impl ShutdownSignalWatch for DrainOnSigterm {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = int.recv() => {
                tracing::info!("SIGINT: exiting now");
                return ShutdownSignal::FastShutdown;
            }
            _ = term.recv() => {}
        }
        // The value in force now: grace_period_secs is reloadable.
        let grace = Duration::from_secs(self.shared.snapshot().config.server.grace_period_secs)
            .min(MAX_GRACE);
        tracing::info!(
            grace_secs = grace.as_secs(),
            in_flight = self.shared.requests.count(),
            "SIGTERM: draining"
        );
        self.shared.draining.store(true, Ordering::SeqCst);
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("drain".into())
            .spawn(move || drain_then_exit(shared, grace));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the drain thread; exiting now");
            return ShutdownSignal::FastShutdown;
        }
        ShutdownSignal::GracefulTerminate
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainEnd {
    /// Nothing was in flight any more.
    Idle,
    /// The grace period ran out with requests still in flight.
    GraceOver,
}

/// Streams still open this long before the grace period ends are told to finish (`cutoff`), so
/// that their `error` event reaches the client before the process exits.
pub const CUTOFF_MARGIN: Duration = Duration::from_secs(1);

/// Wait until no request is in flight and no message save is pending, at most `grace`.
/// `CUTOFF_MARGIN` before the end, raise `cutoff`: every runtime stream still open then ends with
/// a `SHUTTING_DOWN` error event and a properly terminated response, which lets those requests
/// finish before the grace period does (an execution finished for a client that left counts as
/// a request, and is cut there too). Legacy responses, which Pingora proxies byte for byte, are not
/// told; they are cut at the end. Saves still retrying then are logged whole at exit.
pub async fn drain(shared: &Shared, grace: Duration) -> DrainEnd {
    let grace = grace.min(MAX_GRACE);
    let start = tokio::time::Instant::now();
    let cutoff_at = start + grace.saturating_sub(CUTOFF_MARGIN);
    let end_at = cutoff_at + grace.min(CUTOFF_MARGIN).max(Duration::from_millis(200));
    let mut idle_polls = 0;
    loop {
        // Two idle polls in a row: a request whose header Pingora was reading at SIGTERM time has
        // had the chance to be counted.
        if shared.requests.count() == 0 && shared.bridge.pending_saves() == 0 {
            idle_polls += 1;
            if idle_polls >= 2 {
                return DrainEnd::Idle;
            }
        } else {
            idle_polls = 0;
        }
        let now = tokio::time::Instant::now();
        if now >= cutoff_at && !*shared.cutoff.borrow() {
            tracing::warn!(
                in_flight = shared.requests.count(),
                "grace period nearly over: ending the remaining streams with an error event"
            );
            shared.cutoff.send_replace(true);
        }
        if now >= end_at {
            return DrainEnd::GraceOver;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Run `drain` on its own small runtime, then end the process. A SIGINT during the drain ends it
/// at once. Never returns.
fn drain_then_exit(shared: Arc<Shared>, grace: Duration) {
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let end = match runtime {
        Ok(rt) => rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut int = signal(SignalKind::interrupt()).ok();
            tokio::select! {
                end = drain(&shared, grace) => Some(end),
                Some(()) = async {
                    match int.as_mut() {
                        Some(s) => s.recv().await,
                        None => std::future::pending().await,
                    }
                } => None,
            }
        }),
        Err(e) => {
            tracing::error!(error = %e, "cannot build the drain runtime; waiting out the grace period");
            std::thread::sleep(grace);
            Some(DrainEnd::GraceOver)
        }
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let in_flight = shared.requests.count();
    // Nothing of a user's is lost silently: what legacy still does not hold goes to the log.
    let unsaved = shared.bridge.log_pending_saves();
    if unsaved > 0 {
        tracing::error!(
            unsaved,
            "messages still being saved at exit are in the log lines above"
        );
    }
    match end {
        Some(DrainEnd::Idle) => tracing::info!(elapsed_ms, "drained; exiting"),
        Some(DrainEnd::GraceOver) if in_flight == 0 => {
            tracing::info!(
                elapsed_ms,
                "drained at the end of the grace period; exiting"
            )
        }
        Some(DrainEnd::GraceOver) => tracing::warn!(
            elapsed_ms,
            in_flight,
            "grace period over: exiting with requests still in flight"
        ),
        None => tracing::warn!(
            elapsed_ms,
            in_flight,
            "SIGINT during the drain: exiting now"
        ),
    }
    std::process::exit(0);
}

/// Pingora's own post-SIGTERM wait. `drain_then_exit` always ends the process within
/// `grace_period_secs` (which is reloadable, so its value at startup is no bound); this only has
/// to outlast it.
pub(super) const PINGORA_GRACE_SECS: u64 = 24 * 3600;

/// The longest drain: `grace_period_secs` beyond this is taken as this (and cannot overflow a
/// deadline).
pub const MAX_GRACE: Duration = Duration::from_secs(PINGORA_GRACE_SECS - 3600);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::Config;

    fn shared() -> Arc<Shared> {
        let config = Config::parse(
            "[server]\nlisten = \"127.0.0.1:1\"\n[legacy]\naddress = \"127.0.0.1:2\"\n[runtime]\naddress = \"127.0.0.1:3\"\n",
        )
        .unwrap();
        Shared::new(config)
    }

    #[tokio::test]
    async fn an_idle_drain_ends_at_once() {
        let shared = shared();
        let t = Instant::now();
        assert_eq!(
            drain(&shared, Duration::from_secs(30)).await,
            DrainEnd::Idle
        );
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        assert!(!*shared.cutoff.borrow());
    }

    #[tokio::test]
    async fn the_drain_waits_for_requests_in_flight() {
        let shared = shared();
        let guard = shared.requests.enter();
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(guard);
        });
        let t = Instant::now();
        assert_eq!(
            drain(&shared, Duration::from_secs(30)).await,
            DrainEnd::Idle
        );
        assert!(
            t.elapsed() >= Duration::from_millis(290),
            "{:?}",
            t.elapsed()
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(
            !*shared.cutoff.borrow(),
            "no cutoff while within the grace period"
        );
        release.await.unwrap();
    }

    #[tokio::test]
    async fn streams_are_told_to_finish_before_the_grace_period_ends() {
        let shared = shared();
        let guard = shared.requests.enter();
        // A stream that ends as soon as it is told to, like the relay does.
        let mut cutoff = shared.cutoff.subscribe();
        let stream = tokio::spawn(async move {
            cutoff.wait_for(|c| *c).await.unwrap();
            drop(guard);
            Instant::now()
        });
        let t = Instant::now();
        let end = drain(&shared, Duration::from_millis(1500)).await;
        assert_eq!(end, DrainEnd::Idle);
        let told_after = stream.await.unwrap() - t;
        assert!(told_after >= Duration::from_millis(450), "{told_after:?}");
        assert!(told_after < Duration::from_millis(1000), "{told_after:?}");
    }

    #[tokio::test]
    async fn the_cutoff_is_kept_for_streams_that_start_later() {
        let shared = shared();
        let guard = shared.requests.enter();
        // No stream is subscribed when the cutoff is raised.
        let end = drain(&shared, Duration::from_millis(300)).await;
        assert_eq!(end, DrainEnd::GraceOver);
        assert!(
            *shared.cutoff.subscribe().borrow(),
            "a late subscriber sees the cutoff"
        );
        drop(guard);
    }

    #[tokio::test]
    async fn an_absurd_grace_period_does_not_overflow() {
        let shared = shared();
        assert_eq!(drain(&shared, Duration::MAX).await, DrainEnd::Idle);
    }

    #[tokio::test]
    async fn a_stuck_request_ends_the_drain_at_the_grace_period() {
        let shared = shared();
        let _guard = shared.requests.enter();
        let t = Instant::now();
        assert_eq!(
            drain(&shared, Duration::from_secs(1)).await,
            DrainEnd::GraceOver
        );
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(950), "{took:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }
}
