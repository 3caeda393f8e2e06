//! Shadow traffic: a copy of a direct_llm chat request sent to the runtime in the background, its
//! stream consumed and judged, and discarded.
//!
//! The client's request never waits for it: the copy runs on its own task, concurrency is
//! bounded (extra copies are skipped, not queued), and shadow outcomes feed only their own
//! metrics, never the breaker, so the runtime can be judged on real traffic before anyone moves.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use pingora::http::RequestHeader;

use crate::agent2ui::{Mapped, StreamMapper};
use crate::sse::SseParser;
use crate::state::{Active, Shared};
use crate::stats::Outcome;

/// What one shadow execution did.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowReport {
    pub outcome: Outcome,
    pub events: u64,
}

/// Start a shadow copy unless the concurrency bound is reached. Returns whether it started.
pub fn spawn(
    shared: &Arc<Shared>,
    active: Arc<Active>,
    downstream: RequestHeader,
    session_id: String,
    body: Bytes,
) -> bool {
    let metrics = shared.metrics;
    let max = active.config.rollout.shadow_max_inflight;
    let admitted = shared
        .shadow_in_flight
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok();
    if !admitted {
        metrics.shadow_total.with_label_values(&["skipped"]).inc();
        return false;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let report = run(&shared, &active, &downstream, &session_id, body, started).await;
        shared.shadow_in_flight.fetch_sub(1, Ordering::AcqRel);
        let label = match report.outcome {
            Outcome::Success => "success",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
        };
        let m = shared.metrics;
        m.shadow_total.with_label_values(&[label]).inc();
        m.shadow_latency_ms
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64() * 1000.0);
        m.shadow_events_total.inc_by(report.events);
        tracing::debug!(
            outcome = label,
            events = report.events,
            "shadow execution finished"
        );
    });
    true
}

async fn run(
    shared: &Shared,
    active: &Active,
    downstream: &RequestHeader,
    session_id: &str,
    body: Bytes,
    started: Instant,
) -> ShadowReport {
    let deadline = started + active.config.runtime.execution_timeout();
    let mut stream = match crate::relay::open(shared, active, downstream, body, deadline).await {
        Ok(s) => s,
        Err(f) => {
            return ShadowReport {
                outcome: f.outcome,
                events: 0,
            }
        }
    };
    let mut parser = SseParser::new(active.config.runtime.max_frame_bytes);
    let mut mapper = StreamMapper::new(session_id);
    let mut events = Vec::new();
    let mut sink = Vec::new();
    let mut count = 0u64;
    let mut completed = false;
    loop {
        let read = tokio::time::timeout_at(deadline.into(), stream.read_chunk()).await;
        let chunk = match read {
            Err(_) => {
                return ShadowReport {
                    outcome: Outcome::Timeout,
                    events: count,
                }
            }
            Ok(Err(_)) | Ok(Ok(None)) => {
                let outcome = if completed {
                    Outcome::Success
                } else {
                    Outcome::Error
                };
                return ShadowReport {
                    outcome,
                    events: count,
                };
            }
            Ok(Ok(Some(c))) => c,
        };
        events.clear();
        let parsed = parser.feed(&chunk, &mut events);
        for ev in &events {
            sink.clear();
            match mapper.map(ev, &mut sink) {
                Mapped::Message(_) | Mapped::Heartbeat => count += 1,
                Mapped::Done => {
                    count += 1;
                    completed = true;
                }
                Mapped::Failed { .. } => {
                    return ShadowReport {
                        outcome: Outcome::Error,
                        events: count + 1,
                    }
                }
                Mapped::End => {
                    let outcome = if completed {
                        Outcome::Success
                    } else {
                        Outcome::Error
                    };
                    return ShadowReport {
                        outcome,
                        events: count,
                    };
                }
                Mapped::Skipped | Mapped::Malformed | Mapped::Unknown => {}
            }
        }
        if parsed.is_err() {
            return ShadowReport {
                outcome: Outcome::Error,
                events: count,
            };
        }
    }
}
