//! Background health checks of the runtime, feeding the breaker, and the breaker's clock.
//!
//! Checks run on their own schedule, never on the request path (the source document checked health
//! on every request), and re-read the config each round so interval and path are reloadable. The
//! clock wakes at the instant an open breaker may half-open, so its state and gauges move on time
//! with no traffic, scrape or health check to prompt them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use crate::core::breaker::State;
use crate::core::h1;
use crate::state::Shared;
use crate::upstream::Call;

/// A health answer larger than this is not read (nor is the connection kept).
const MAX_HEALTH_ANSWER: usize = 64 * 1024;

/// One health check through the runtime's client: `Ok` on a 2xx answer within the timeout.
pub async fn check_once(shared: &Shared) -> Result<(), String> {
    let active = shared.snapshot();
    let rt = &active.config.runtime;
    let timeout = Duration::from_millis(rt.health_timeout_ms);
    let request = h1::encode_request(
        "GET",
        &rt.health_path,
        &[("host", rt.address.as_bytes())],
        b"",
    );
    let probe = async {
        let call = Call::new(&rt.address, active.runtime);
        let response = shared
            .runtime
            .send(&call, &request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        // Read the (small) body so the connection can be reused for the next check.
        response
            .into_body()
            .read_to_end(MAX_HEALTH_ANSWER)
            .await
            .map_err(|e| format!("response: {e}"))?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("{} answered {status}", rt.health_path))
        }
    };
    match tokio::time::timeout(timeout, probe).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

/// Check every `health_interval_ms`, and keep the breaker on time, until `shutdown` turns true.
pub async fn run(shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    tokio::join!(
        check_every_interval(shared.clone(), shutdown.clone()),
        follow_clock(shared, shutdown),
    );
}

async fn check_every_interval(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let result = check_once(&shared).await;
        let metrics = shared.metrics;
        match &result {
            Ok(()) => {
                metrics.health_up.set(1);
                metrics.health_checks_total.with_label_values(&["ok"]).inc();
            }
            Err(detail) => {
                metrics.health_up.set(0);
                metrics
                    .health_checks_total
                    .with_label_values(&["failed"])
                    .inc();
                tracing::warn!(%detail, "runtime health check failed");
            }
        }
        shared
            .breaker
            .record_health(result.is_ok(), result.as_ref().err().map_or("", |d| d));
        // A pass after the open period ended is what lets it half-open: the clock below already
        // woke, found the check failing, and waits for the next opening.
        shared.breaker.tick();
        let interval = Duration::from_millis(shared.snapshot().config.runtime.health_interval_ms);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Tick the breaker at [`retry_at`](crate::core::breaker::SharedBreaker::retry_at), the instant
/// its open period ends. An opening wakes it to learn the new instant; with no instant ahead
/// (closed, half-open, tripped by hand, or waiting on a failed health check) it sleeps until the
/// next opening. A reload that shortens `open_secs` during an open period is caught by the next
/// health check's tick, or by any status read or scrape before it.
async fn follow_clock(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let opened = Arc::new(Notify::new());
    let wake = opened.clone();
    // notify_one keeps a permit when nobody waits, so an opening between the tick and the wait
    // below is not missed.
    shared.breaker.on_transition(move |t| {
        if t.to == State::Open {
            wake.notify_one();
        }
    });
    loop {
        shared.breaker.tick();
        let ahead = shared.breaker.retry_at().filter(|at| *at > Instant::now());
        let until_retry = async {
            match ahead {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = until_retry => {}
            _ = opened.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}
