//! One concern of the `ChatService` (`proxy::service`): counting a finished request once
//! (`ChatService::record`), from Pingora's `logging` or from the front door when it served the
//! chat itself: the breaker (through the chat's `BreakerTicket`), the admin window stats,
//! Prometheus and the access log. How the connection ended comes as a [`Finish`] of its own,
//! not as Pingora's error.

use std::time::{Duration, Instant};

use pingora::{Error, ErrorSource, ErrorType};

use super::ctx::{ChatCtx, RequestCtx, Served};
use super::service::ChatService;
use crate::core::config::Mode;
use crate::core::scorecard::PathSample;
use crate::core::stats::{outcome_label, Outcome};
use crate::upstream::Silence;

/// How the connection's part of a request ended, as the count reads it. The connection's own
/// errors are translated into it where they arise (Pingora's by `CutoverProxy`), so a chat that
/// never met Pingora is counted without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// No error: the response status says how it went.
    Clean,
    /// The client went away (or failed) first: nobody's outcome.
    ClientGone,
    /// Legacy passed one of its deadlines.
    TimedOut,
    /// Anything else failed.
    Failed,
}

impl Finish {
    /// How a request carried by Pingora (or failed with one of its errors) ended.
    pub(super) fn of(e: Option<&Error>) -> Finish {
        match e {
            None => Finish::Clean,
            // Legacy past its head's deadline, which the client's connection reports.
            Some(e) if Silence::in_pingora(e).is_some() => Finish::TimedOut,
            Some(e) if e.esource() == &ErrorSource::Downstream => Finish::ClientGone,
            Some(e)
                if matches!(
                    e.etype(),
                    ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                ) =>
            {
                Finish::TimedOut
            }
            Some(_) => Finish::Failed,
        }
    }
}

impl ChatService {
    /// Count a finished chat request: breaker, window stats, Prometheus, access log. `status`:
    /// of the response head written, 0 for none.
    pub(super) fn record(&self, status: u16, path: &str, finish: Finish, ctx: &mut RequestCtx) {
        let Some(chat) = ctx.chat.as_mut() else {
            return;
        };
        let now = Instant::now();
        let total = ctx.started.elapsed();
        let runtime_outcome = self.record_runtime(chat, total, now);
        let direct_outcome = self.record_legacy(chat, status, finish, total, now);
        let org = chat.org();
        let decision = chat.decision;
        self.shared
            .metrics
            .requests_total
            .with_label_values(&[
                decision.mode.as_str(),
                decision.reason.as_str(),
                ctx.active.org_label(org),
            ])
            .inc();

        let delivered = chat.delivered();
        let outcome = direct_outcome.or(runtime_outcome);
        tracing::info!(
            target: "access",
            path,
            request_id = chat.request_id.as_deref().unwrap_or(""),
            org = org.unwrap_or(""),
            user = chat.caller.as_ref().and_then(|c| c.user_id.as_deref()).unwrap_or(""),
            mode = decision.mode.as_str(),
            reason = decision.reason.as_str(),
            status,
            outcome = outcome_label(outcome),
            runtime_outcome = outcome_label(runtime_outcome),
            latency_ms = total.as_millis() as u64,
            first_event_ms = delivered.first_write.map(|d| d.as_millis() as u64),
            events = delivered.events,
            bytes = delivered.bytes,
            error_code = delivered.error_code,
            detail = delivered.detail,
            "chat request"
        );
    }

    /// The runtime's part, if it was tried: the breaker judges it, the stats count it.
    fn record_runtime(&self, chat: &mut ChatCtx, total: Duration, now: Instant) -> Option<Outcome> {
        let (outcome, latency, first) = match &chat.served {
            Served::Runtime(report) => (
                report.outcome,
                chat.asked.map_or(total, |t| now.duration_since(t)),
                report.first_write,
            ),
            Served::Legacy {
                failover: Some(failover),
            } => (Some(failover.failure.outcome), failover.after, None),
            // The runtime's status events reached the client before it failed.
            Served::Rescued { failover, report } => (
                Some(failover.failure.outcome),
                failover.after,
                report.first_write,
            ),
            Served::Legacy { failover: None } | Served::Refused | Served::Unanswered => {
                return None
            }
        };
        // A probe with no verdict (client gone, shutdown) frees its slot when the context drops.
        if let Some(outcome) = outcome {
            chat.breaker.record(&self.shared, outcome, latency);
        }
        let org = chat.org();
        self.count(Mode::RuntimeOrchestrator, org, outcome, latency, first, now);
        outcome
    }

    /// Legacy's part, if legacy served the request.
    fn record_legacy(
        &self,
        chat: &ChatCtx,
        status: u16,
        finish: Finish,
        total: Duration,
        now: Instant,
    ) -> Option<Outcome> {
        let outcome = match &chat.served {
            Served::Legacy { .. } => legacy_outcome(status, finish),
            // Legacy's answer relayed by the proxy: the stream's own verdict.
            Served::Rescued { report, .. } => {
                self.count(
                    Mode::DirectLlm,
                    chat.org(),
                    report.outcome,
                    total,
                    None,
                    now,
                );
                return report.outcome;
            }
            _ => return None,
        };
        if let Some(half) = chat.shadow.as_ref().filter(|h| h.unreadable) {
            half.pair.legacy_unreadable(&self.shared);
        } else if let Some(half) = &chat.shadow {
            let seen = half.observer.observer();
            let sample = outcome.map(|outcome| {
                // Legacy succeeded only with a 2xx that ended with `done` and had no `error`,
                // read as the browser reads it (decoded).
                let ok = outcome == Outcome::Success
                    && (200..300).contains(&status)
                    && half.observer.succeeded();
                PathSample {
                    outcome: if ok { Outcome::Success } else { Outcome::Error },
                    ttfe: seen.first_content,
                    duration: half.pair.origin().elapsed(),
                    text_chars: seen.text_chars,
                }
            });
            half.pair.legacy(&self.shared, sample);
        }
        self.count(
            Mode::DirectLlm,
            chat.org(),
            outcome,
            total,
            chat.first_byte,
            now,
        );
        outcome
    }

    /// Count one execution on one path: the admin window and Prometheus. `None` is a client
    /// that went away: counted as cancelled, kept out of the window.
    fn count(
        &self,
        mode: Mode,
        org: Option<&str>,
        outcome: Option<Outcome>,
        latency: Duration,
        first_byte: Option<Duration>,
        now: Instant,
    ) {
        let metrics = self.shared.metrics;
        let label = mode.as_str();
        metrics.execution_total.with_label_values(&[label]).inc();
        let counter = match outcome {
            Some(Outcome::Success) => &metrics.execution_success_total,
            Some(Outcome::Error) => &metrics.execution_error_total,
            Some(Outcome::Timeout) => &metrics.execution_timeout_total,
            None => &metrics.execution_cancelled_total,
        };
        counter.with_label_values(&[label]).inc();
        if let Some(outcome) = outcome {
            self.shared
                .stats
                .lock()
                .unwrap()
                .record(mode, org, outcome, latency, now);
            metrics
                .execution_latency_ms
                .with_label_values(&[label])
                .observe(latency.as_secs_f64() * 1000.0);
        }
        if let Some(t) = first_byte {
            metrics
                .time_to_first_event_seconds
                .with_label_values(&[label])
                .observe(t.as_secs_f64());
        }
    }
}

/// Classify what legacy did with a chat request; `None` when the client went away.
fn legacy_outcome(status: u16, finish: Finish) -> Option<Outcome> {
    match finish {
        Finish::ClientGone => None,
        Finish::TimedOut => Some(Outcome::Timeout),
        Finish::Failed => Some(Outcome::Error),
        Finish::Clean if status >= 500 || status == 0 => Some(Outcome::Error),
        Finish::Clean => Some(Outcome::Success),
    }
}
