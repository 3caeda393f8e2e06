//! The breaker follows the clock: once `open_secs` have passed, `/runtime/fallback/status` and the
//! scrape say `half_open` with no chat traffic at all, whether the breaker was opened by failed
//! executions or by failed health checks.
//!
//! The breaker gauges are process-wide and every proxy started mirrors its breaker into them, so
//! the tests of this file take `SERIAL` and run one at a time.

use crate::support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_proxy::app::LocalServer;
use cutover_proxy::core::breaker::State;
use serde_json::{json, Value};
use support::*;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The shortest open period the config takes (whole seconds, above 0).
const OPEN_SECS: u64 = 1;
const DEADLINE: Duration = Duration::from_secs(5);

/// The value of one series of a scrape (`name` with its labels, as exposed), if present.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

async fn scrape(server: &LocalServer) -> String {
    let r = request(server.metrics_addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(r.status, 200, "GET /metrics");
    r.text()
}

async fn fallback_status(server: &LocalServer) -> Value {
    let (status, body) = admin(server, "GET", "/runtime/fallback/status", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true, "{body}");
    body["data"].clone()
}

/// One-hot breaker gauges and the fallback gauge for `state`, per docs/metrics.md:
/// `chat_runtime_fallback_enabled` is 1 unless closed (half-open still keeps all but the probes
/// on legacy).
fn assert_gauges(text: &str, state: &str) {
    for s in ["closed", "open", "half_open"] {
        let want = if s == state { 1.0 } else { 0.0 };
        let got = series(
            text,
            &format!("chat_runtime_breaker_state{{state=\"{s}\"}}"),
        );
        assert_eq!(got, Some(want), "breaker_state {s} while {state}:\n{text}");
    }
    let fallback = if state == "closed" { 0.0 } else { 1.0 };
    assert_eq!(
        series(text, "chat_runtime_fallback_enabled"),
        Some(fallback),
        "fallback gauge while {state}:\n{text}"
    );
}

fn transitions(text: &str, from: &str, to: &str) -> f64 {
    series(
        text,
        &format!("chat_runtime_breaker_transitions_total{{from=\"{from}\",to=\"{to}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Opened by a failed execution; the health check runs once at start and then not for a minute,
/// so only the breaker's own timer can move it, and nothing reads it while it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_breaker_half_opens_on_time_with_no_traffic() {
    let _serial = SERIAL.lock().await;
    let recovered = Arc::new(AtomicBool::new(false));
    let failure = Reply::json(500, json!({"error": "overloaded"}));
    let h = Harness::new()
        .runtime(runtime_failing_until(recovered.clone(), failure))
        .config(move |c| {
            c.breaker.min_requests = 1;
            c.breaker.open_secs = OPEN_SECS;
            c.breaker.half_open_probes = 1;
            c.runtime.health_interval_ms = 60_000;
        })
        .start()
        .await;
    let before = scrape(&h).await;

    let before_opening = Instant::now();
    let r = chat(h.proxy_addr, Some("org-a"), "s-1", r#"{"message":"hi"}"#).await;
    assert_eq!(r.header("x-execution-reason"), Some("failover"), "{r:?}");
    assert!(
        h.breaker_becomes(State::Open, DEADLINE).await,
        "one failed execution with min_requests = 1 did not open the breaker"
    );
    let retry_at = h.shared.breaker.retry_at().expect("open, not by hand");
    assert!(retry_at >= before_opening + Duration::from_secs(OPEN_SECS));
    let status = fallback_status(&h).await;
    assert_eq!(status["state"], "open", "{status}");
    assert_eq!(status["fallbackEnabled"], true, "{status}");
    recovered.store(true, Ordering::SeqCst);
    let (runtime_work, legacy_work) = (h.runtime.work().len(), h.legacy.work().len());

    // Only the lock-free mirror is polled here: it ticks nothing, so the move is the timer's.
    assert!(
        h.breaker_becomes(State::HalfOpen, DEADLINE).await,
        "still {} {:?} after open_secs with no traffic",
        h.shared.breaker.state(),
        before_opening.elapsed()
    );
    let moved_after = before_opening.elapsed();
    assert!(
        moved_after >= Duration::from_secs(OPEN_SECS),
        "half-open after {moved_after:?}, before open_secs"
    );

    let status = fallback_status(&h).await;
    assert_eq!(status["state"], "half_open", "{status}");
    assert_eq!(status["fallbackEnabled"], true, "{status}");
    assert_eq!(
        status["fallbackReason"], "half-open after 1s open: letting up to 1 probes through",
        "{status}"
    );
    let text = scrape(&h).await;
    assert_gauges(&text, "half_open");
    assert_eq!(
        transitions(&text, "open", "half_open") - transitions(&before, "open", "half_open"),
        1.0,
        "the timer's transition is counted like any other:\n{text}"
    );
    assert_eq!(
        h.runtime.work().len(),
        runtime_work,
        "no chat reached the runtime"
    );
    assert_eq!(h.legacy.work().len(), legacy_work, "no chat reached legacy");

    // The next chat is the probe that closes it.
    let r = chat(h.proxy_addr, Some("org-a"), "s-2", r#"{"message":"hi"}"#).await;
    assert_eq!(
        r.header("x-execution-mode"),
        Some("runtime_orchestrator"),
        "{r:?}"
    );
    assert!(
        h.breaker_becomes(State::Closed, DEADLINE).await,
        "the probe's success did not close the breaker"
    );
    assert_gauges(&scrape(&h).await, "closed");
    assert_eq!(fallback_status(&h).await["fallbackEnabled"], false);
}

/// The issue's case: health checks opened it, the runtime is healthy again, and nobody chats.
/// The status and the scrape must say `half_open` once `open_secs` have passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_opened_breaker_reads_half_open_once_the_runtime_is_back() {
    let _serial = SERIAL.lock().await;
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    let before_opening = Instant::now();
    let h = Harness::new()
        .runtime(move |req| {
            if req.path == "/health" && d.load(Ordering::SeqCst) {
                Reply::json(503, json!({"status": "down"}))
            } else {
                healthy_runtime(req)
            }
        })
        .config(move |c| {
            c.breaker.open_secs = OPEN_SECS;
            c.runtime.health_failures = 1;
            c.runtime.health_interval_ms = 100;
        })
        .start()
        .await;

    assert!(
        h.breaker_becomes(State::Open, DEADLINE).await,
        "a failed health check did not open the breaker"
    );
    let status = fallback_status(&h).await;
    assert_eq!(status["state"], "open", "{status}");
    assert!(
        status["fallbackReason"]
            .as_str()
            .unwrap()
            .starts_with("health check failed 1 times"),
        "{status}"
    );
    assert_gauges(&scrape(&h).await, "open");
    down.store(false, Ordering::SeqCst);

    // Polled through the admin API, as an operator would; each read may tick, none is a chat.
    let half_open = poll_until(
        DEADLINE,
        || fallback_status(&h),
        |s| s["state"] == "half_open",
    )
    .await;
    let status = half_open.unwrap_or_else(|status| {
        panic!(
            "still {status} {:?} after opening with the runtime healthy",
            before_opening.elapsed()
        )
    });
    assert!(before_opening.elapsed() >= Duration::from_secs(OPEN_SECS));
    assert_eq!(status["fallbackEnabled"], true, "{status}");
    assert_gauges(&scrape(&h).await, "half_open");
    assert!(h.runtime.work().is_empty(), "no chat reached the runtime");
    assert!(h.legacy.work().is_empty(), "no chat reached legacy");
}
