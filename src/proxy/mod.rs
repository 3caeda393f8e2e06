//! The Pingora glue: one `ProxyHttp` whose callbacks call into the pure modules.
//!
//! `request_filter` decides the mode of a chat request and, on the runtime path, answers it itself
//! through `relay`; everything else (legacy chat, failover, every other route) is proxied to legacy
//! untouched by Pingora. `logging` is the one place where outcomes are counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::app::state::{Active, Shared};
use crate::app::upstream;
use crate::core::breaker::{Admission, State};
use crate::core::chat;
use crate::core::config::Mode;
use crate::core::identity::{Caller, Unverified};
use crate::core::routing::{chat_route, ChatRoute, Reason, RolloutDecision};
use crate::core::stats::{Outcome, Path};
use crate::runtime::connection::{self, OpenFailure};
use crate::runtime::relay::{self, InFlight, RelayArgs, StreamReport};

/// Largest body Pingora can replay to legacy when the runtime fails before its first byte.
pub const REPLAY_LIMIT: usize = 64 * 1024;

pub struct CutoverProxy {
    shared: Arc<Shared>,
}

impl CutoverProxy {
    pub fn new(shared: Arc<Shared>) -> Self {
        CutoverProxy { shared }
    }
}

/// Everything one request carries between callbacks.
pub struct RequestCtx {
    started: Instant,
    /// Counts the request as in flight until Pingora drops the context, for the shutdown drain.
    _guard: crate::app::state::RequestGuard,
    active: Option<Arc<Active>>,
    chat: Option<ChatCtx>,
}

struct ChatCtx {
    caller: Option<Caller>,
    decision: RolloutDecision,
    /// Admitted by a half-open breaker as a probe.
    probe: bool,
    /// The proxy answered the request itself (4xx) without any upstream.
    answered: Option<u16>,
    /// Set once the runtime was tried.
    runtime: Option<RuntimeAttempt>,
    /// Legacy response: time to first body byte and bytes sent.
    first_byte: Option<Duration>,
    bytes: u64,
    /// Request body bytes passed on to legacy, held to `limits.max_chat_body_bytes` for bodies
    /// without a Content-Length (which cannot be refused up front).
    body_to_legacy: usize,
    in_flight: Option<InFlight>,
}

enum RuntimeAttempt {
    Relayed(StreamReport),
    FailedOver {
        failure: OpenFailure,
        after: Duration,
    },
}

impl RuntimeAttempt {
    fn outcome(&self) -> Option<Outcome> {
        match self {
            RuntimeAttempt::Relayed(r) => r.outcome,
            RuntimeAttempt::FailedOver { failure, .. } => Some(failure.outcome),
        }
    }
}

fn content_length(session: &Session) -> Option<usize> {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Why the proxy answers a chat request itself.
enum Rejection {
    TooLarge,
    BadBody,
}

enum BodyRead {
    Complete(Bytes),
    TooLarge,
}

/// Read the whole (bounded) chat body, keeping Pingora's retry buffer so that legacy can be
/// sent the original body if the runtime fails before its first byte.
async fn read_chat_body(session: &mut Session, limit: usize) -> Result<BodyRead> {
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        // curl sends this for bodies over 1 KiB and would otherwise wait a second before sending.
        // The header is consumed here, so a failover to legacy does not answer it a second time.
        session.downstream_session.write_continue_response().await?;
        session
            .req_header_mut()
            .remove_header(&http::header::EXPECT);
    }
    session.enable_retry_buffering();
    let mut body = Vec::new();
    while let Some(chunk) = session.read_request_body().await? {
        if body.len() + chunk.len() > limit {
            return Ok(BodyRead::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(BodyRead::Complete(Bytes::from(body)))
}

async fn respond_json(
    session: &mut Session,
    status: u16,
    decision: RolloutDecision,
    code: &str,
    message: &str,
) -> Result<()> {
    let body = serde_json::json!({
        "success": false,
        "error": {"code": code, "message": message},
    });
    let body = Bytes::from(serde_json::to_vec(&body).expect("json"));
    let mut resp = ResponseHeader::build(status, Some(5))?;
    resp.insert_header("content-type", "application/json")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("x-execution-mode", decision.mode.as_str())?;
    resp.insert_header("x-execution-reason", decision.reason.as_str())?;
    // The rest of an unread body would be taken for the next request.
    resp.insert_header("connection", "close")?;
    session.set_keepalive(None);
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Answer with an SSE stream holding one error event (the runtime never produced a response).
async fn respond_sse_error(
    session: &mut Session,
    decision: RolloutDecision,
    code: &str,
    message: &str,
) -> Result<u64> {
    let resp = relay::sse_response_header(decision, session.req_header().version)?;
    session.write_response_header(Box::new(resp), false).await?;
    let mut out = Vec::new();
    crate::core::agent2ui::error_event(&mut out, code, message);
    let len = out.len() as u64;
    session
        .write_response_body(Some(Bytes::from(out)), true)
        .await?;
    Ok(len)
}

impl CutoverProxy {
    fn decide(&self, active: &Active, org: Option<&str>) -> (RolloutDecision, bool) {
        let decision = active.rollout.decide(org, false);
        if decision.mode == Mode::RuntimeOrchestrator {
            return match self.shared.breaker.admit() {
                Admission::Allowed => (decision, false),
                Admission::Probe => (decision, true),
                Admission::Rejected => (
                    RolloutDecision {
                        mode: Mode::DirectLlm,
                        reason: Reason::BreakerOpen,
                    },
                    false,
                ),
            };
        }
        if self.shared.breaker.state() != State::Closed {
            return (active.rollout.decide(org, true), false);
        }
        (decision, false)
    }

    /// The runtime path: returns true when the proxy answered, false to hand over to legacy.
    async fn serve_runtime(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        active: &Arc<Active>,
        route: &ChatRoute,
    ) -> Result<bool> {
        let metrics = self.shared.metrics;
        let chat_ctx = ctx.chat.as_mut().expect("chat ctx");
        let caller = chat_ctx
            .caller
            .clone()
            .expect("runtime path has a verified caller");

        if content_length(session).is_some_and(|n| n > REPLAY_LIMIT) {
            // Legacy could not be given this body again if the runtime failed, so it goes
            // there directly.
            self.release_probe(chat_ctx);
            chat_ctx.decision = RolloutDecision {
                mode: Mode::DirectLlm,
                reason: Reason::LargeBody,
            };
            return Ok(false);
        }
        let limit = active.config.limits.max_chat_body_bytes.min(REPLAY_LIMIT);
        // This and the other one-off awaits below are boxed: a future holds room for its
        // largest await for as long as it lives, and this one lives as long as the stream.
        let body = match Box::pin(read_chat_body(session, limit)).await? {
            BodyRead::Complete(b) => b,
            BodyRead::TooLarge => {
                let msg = format!("chat request body without Content-Length exceeds {limit} bytes");
                return Box::pin(self.reject(session, chat_ctx, Rejection::TooLarge, &msg)).await;
            }
        };
        let chat_body = match chat::parse_chat_body(&body) {
            Ok(b) => b,
            Err(e) => {
                return Box::pin(self.reject(session, chat_ctx, Rejection::BadBody, &e.message()))
                    .await;
            }
        };
        let session_id = chat::session_id_for(route);
        let runtime_body =
            Bytes::from(chat::runtime_request_body(&session_id, &caller, &chat_body));
        let deadline = ctx.started + active.config.runtime.execution_timeout();

        enum Interrupted {
            Shutdown,
            ClientGone,
        }
        let mut cutoff = self.shared.cutoff.subscribe();
        // Boxed so that its state (the request header copy, the exchange) is freed before the
        // relay, which may hold the stream for minutes, starts.
        let opened = Box::pin(async {
            let downstream = session.req_header().clone();
            tokio::select! {
                r = connection::open(&self.shared, active, &downstream, runtime_body, deadline, false) => Ok(r),
                _ = cutoff.wait_for(|c| *c) => Err(Interrupted::Shutdown),
                // Dropping the pending open closes the runtime connection: the runtime stops
                // working for a client that is gone, and it is not counted against the runtime.
                _ = relay::client_gone(session) => Err(Interrupted::ClientGone),
            }
        })
        .await;
        let chat_ctx = ctx.chat.as_mut().expect("chat ctx");
        let opened = match opened {
            Ok(r) => r,
            Err(Interrupted::ClientGone) => {
                chat_ctx.runtime = Some(RuntimeAttempt::Relayed(StreamReport {
                    outcome: None,
                    detail: Some("client disconnected before the runtime answered".into()),
                    ..StreamReport::default()
                }));
                return Ok(true);
            }
            Err(Interrupted::Shutdown) => {
                // Shutting down while the runtime had not answered yet: not the runtime's fault.
                let message = "the proxy is shutting down; please retry";
                let bytes = Box::pin(respond_sse_error(
                    session,
                    chat_ctx.decision,
                    "SHUTTING_DOWN",
                    message,
                ))
                .await
                .unwrap_or(0);
                chat_ctx.runtime = Some(RuntimeAttempt::Relayed(StreamReport {
                    outcome: None,
                    error_code: Some("SHUTTING_DOWN"),
                    detail: Some(message.into()),
                    first_write: Some(ctx.started.elapsed()),
                    events: 1,
                    bytes,
                }));
                return Ok(true);
            }
        };
        match opened {
            Ok(stream) => {
                let args = RelayArgs {
                    shared: self.shared.clone(),
                    decision: chat_ctx.decision,
                    session_id,
                    started: ctx.started,
                    deadline,
                    heartbeat: Duration::from_secs(active.config.runtime.heartbeat_secs),
                    max_frame_bytes: active.config.runtime.max_frame_bytes,
                    pool_idle: active.runtime.pool_idle_timeout,
                };
                let report = relay::relay(session, stream, args).await;
                chat_ctx.runtime = Some(RuntimeAttempt::Relayed(report));
                Ok(true)
            }
            Err(failure) if failure.failover => {
                tracing::warn!(detail = %failure.detail, "runtime failed before the first byte; serving from legacy");
                metrics.failover_total.inc();
                chat_ctx.runtime = Some(RuntimeAttempt::FailedOver {
                    failure,
                    after: ctx.started.elapsed(),
                });
                chat_ctx.decision = RolloutDecision {
                    mode: Mode::DirectLlm,
                    reason: Reason::Failover,
                };
                Ok(false)
            }
            Err(failure) => {
                let bytes = Box::pin(respond_sse_error(
                    session,
                    chat_ctx.decision,
                    "TIMEOUT",
                    &failure.detail,
                ))
                .await
                .unwrap_or(0);
                chat_ctx.runtime = Some(RuntimeAttempt::Relayed(StreamReport {
                    outcome: Some(failure.outcome),
                    error_code: Some("TIMEOUT"),
                    detail: Some(failure.detail),
                    first_write: Some(ctx.started.elapsed()),
                    events: 1,
                    bytes,
                }));
                Ok(true)
            }
        }
    }

    /// Mirror a share of direct_llm chats to the runtime (`rollout.shadow_percent`). The body is
    /// read here (kept in Pingora's retry buffer, so legacy still gets it) only for selected
    /// requests from verified orgs whose body fits the buffer, and only while the breaker is
    /// closed: a known-bad runtime is not loaded further.
    async fn maybe_shadow(
        &self,
        session: &mut Session,
        active: &Arc<Active>,
        route: &ChatRoute,
        caller: Option<Caller>,
    ) -> Result<()> {
        let percent = active.config.rollout.shadow_percent;
        let Some(caller) = caller else { return Ok(()) };
        if percent <= 0.0
            || !crate::core::routing::shadow_selected(percent, fastrand::u64(0..10_000))
            || self.shared.breaker.state() != State::Closed
            || content_length(session).is_none_or(|n| n > REPLAY_LIMIT)
        {
            return Ok(());
        }
        let BodyRead::Complete(body) = read_chat_body(session, REPLAY_LIMIT).await? else {
            return Ok(());
        };
        let Ok(chat_body) = chat::parse_chat_body(&body) else {
            return Ok(());
        };
        let session_id = chat::session_id_for(route);
        let runtime_body =
            Bytes::from(chat::runtime_request_body(&session_id, &caller, &chat_body));
        crate::runtime::shadow::spawn(
            &self.shared,
            active.clone(),
            session.req_header().clone(),
            session_id,
            runtime_body,
        );
        Ok(())
    }

    /// Answer a chat request the proxy refuses itself (no upstream contacted): the probe slot is
    /// freed, the refusal counted, and the JSON error carries the routing headers.
    async fn reject(
        &self,
        session: &mut Session,
        chat_ctx: &mut ChatCtx,
        rejection: Rejection,
        message: &str,
    ) -> Result<bool> {
        let (status, cause, code) = match rejection {
            Rejection::TooLarge => (413, "too_large", "PAYLOAD_TOO_LARGE"),
            Rejection::BadBody => (400, "bad_body", "INVALID_REQUEST"),
        };
        self.release_probe(chat_ctx);
        self.shared
            .metrics
            .rejected_total
            .with_label_values(&[cause])
            .inc();
        chat_ctx.answered = Some(status);
        respond_json(session, status, chat_ctx.decision, code, message).await?;
        Ok(true)
    }

    fn release_probe(&self, chat_ctx: &mut ChatCtx) {
        if std::mem::take(&mut chat_ctx.probe) {
            self.shared.breaker.release_probe();
        }
    }

    /// Count one execution on one path: the admin window and Prometheus. `None` is a client
    /// that went away: counted as cancelled, kept out of the window.
    fn count(
        &self,
        path: Path,
        org: Option<&str>,
        outcome: Option<Outcome>,
        latency: Duration,
        first_byte: Option<Duration>,
        now: Instant,
    ) {
        let metrics = self.shared.metrics;
        let mode = match path {
            Path::Direct => Mode::DirectLlm.as_str(),
            Path::Runtime => Mode::RuntimeOrchestrator.as_str(),
        };
        metrics.execution_total.with_label_values(&[mode]).inc();
        let counter = match outcome {
            Some(Outcome::Success) => &metrics.execution_success_total,
            Some(Outcome::Error) => &metrics.execution_error_total,
            Some(Outcome::Timeout) => &metrics.execution_timeout_total,
            None => &metrics.execution_cancelled_total,
        };
        counter.with_label_values(&[mode]).inc();
        if let Some(outcome) = outcome {
            self.shared
                .stats
                .lock()
                .unwrap()
                .record(path, org, outcome, latency, now);
            metrics
                .execution_latency_ms
                .with_label_values(&[mode])
                .observe(latency.as_secs_f64() * 1000.0);
        }
        if let Some(t) = first_byte {
            metrics
                .first_event_ms
                .with_label_values(&[mode])
                .observe(t.as_secs_f64() * 1000.0);
        }
    }

    /// Count a finished chat request: breaker, window stats, Prometheus, access log.
    fn record(&self, session: &Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let Some(chat_ctx) = ctx.chat.as_mut() else {
            return;
        };
        let active = ctx.active.as_ref().expect("snapshot taken");
        let metrics = self.shared.metrics;
        let now = Instant::now();
        let total = ctx.started.elapsed();
        let org_owned = chat_ctx.caller.as_ref().map(|c| c.org_id.clone());
        let org = org_owned.as_deref();
        let mut runtime_outcome = None;
        if let Some(attempt) = &chat_ctx.runtime {
            let (latency, first) = match attempt {
                RuntimeAttempt::Relayed(r) => (total, r.first_write),
                RuntimeAttempt::FailedOver { after, .. } => (*after, None),
            };
            runtime_outcome = attempt.outcome();
            if let Some(outcome) = runtime_outcome {
                self.shared.breaker.record(outcome, latency, chat_ctx.probe);
            }
            self.count(Path::Runtime, org, runtime_outcome, latency, first, now);
        }

        // A probe with no verdict (client gone, bad body, read error) must free its slot.
        if runtime_outcome.is_none() {
            self.release_probe(chat_ctx);
        }

        let served_by_legacy =
            chat_ctx.decision.mode == Mode::DirectLlm && chat_ctx.answered.is_none();
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let mut direct_outcome = None;
        if served_by_legacy {
            direct_outcome = legacy_outcome(status, e);
            self.count(
                Path::Direct,
                org,
                direct_outcome,
                total,
                chat_ctx.first_byte,
                now,
            );
        }

        let decision = chat_ctx.decision;
        metrics
            .requests_total
            .with_label_values(&[
                decision.mode.as_str(),
                decision.reason.as_str(),
                active.org_label(org),
            ])
            .inc();

        let (events, bytes, first, error_code, detail) = match &chat_ctx.runtime {
            Some(RuntimeAttempt::Relayed(r)) => (
                r.events,
                r.bytes,
                r.first_write,
                r.error_code,
                r.detail.as_deref(),
            ),
            Some(RuntimeAttempt::FailedOver { failure, .. }) => (
                0,
                chat_ctx.bytes,
                chat_ctx.first_byte,
                None,
                Some(failure.detail.as_str()),
            ),
            None => (0, chat_ctx.bytes, chat_ctx.first_byte, None, None),
        };
        let outcome = direct_outcome.or(runtime_outcome);
        tracing::info!(
            target: "access",
            path = session.req_header().uri.path(),
            org = org.unwrap_or(""),
            user = chat_ctx.caller.as_ref().and_then(|c| c.user_id.as_deref()).unwrap_or(""),
            mode = decision.mode.as_str(),
            reason = decision.reason.as_str(),
            status,
            outcome = outcome_str(outcome),
            runtime_outcome = outcome_str(runtime_outcome),
            latency_ms = total.as_millis() as u64,
            first_event_ms = first.map(|d| d.as_millis() as u64),
            events,
            bytes,
            error_code,
            detail,
            "chat request"
        );
    }
}

fn outcome_str(o: Option<Outcome>) -> &'static str {
    match o {
        Some(Outcome::Success) => "success",
        Some(Outcome::Error) => "error",
        Some(Outcome::Timeout) => "timeout",
        None => "cancelled",
    }
}

/// Classify what legacy did with a chat request; `None` when the client went away.
fn legacy_outcome(status: u16, e: Option<&Error>) -> Option<Outcome> {
    match e {
        Some(e) if e.esource() == &ErrorSource::Downstream => None,
        Some(e)
            if matches!(
                e.etype(),
                ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
            ) =>
        {
            Some(Outcome::Timeout)
        }
        Some(_) => Some(Outcome::Error),
        None if status >= 500 || status == 0 => Some(Outcome::Error),
        None => Some(Outcome::Success),
    }
}

#[async_trait]
impl ProxyHttp for CutoverProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            _guard: self.shared.requests.enter(),
            active: None,
            chat: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // A client may send its next request while a stream is still running; Pingora then keeps
        // those bytes for the next request instead of taking them for a broken connection.
        session.downstream_session.set_pipelining_enabled(true);
        let active = self.shared.snapshot();
        ctx.active = Some(active.clone());
        let req = session.req_header();
        let Some(route) = chat_route(&req.method, req.uri.path()) else {
            return Ok(false);
        };
        let metrics = self.shared.metrics;
        let (caller, unverified) = match active.verifier.identify(&req.headers) {
            Ok(c) => (Some(c), None),
            Err(u) => (None, Some(u)),
        };
        if let Some(u) = unverified {
            metrics
                .unverified_total
                .with_label_values(&[u.as_str()])
                .inc();
            if u == Unverified::NoSecret {
                tracing::warn!(
                    env = %active.config.identity.jwt_secret_env,
                    "no JWT secret configured: every chat request goes to legacy"
                );
            }
        }
        let org = caller.as_ref().map(|c| c.org_id.clone());
        let (decision, probe) = self.decide(&active, org.as_deref());
        ctx.chat = Some(ChatCtx {
            caller,
            decision,
            probe,
            answered: None,
            runtime: None,
            first_byte: None,
            bytes: 0,
            body_to_legacy: 0,
            in_flight: None,
        });

        let limit = active.config.limits.max_chat_body_bytes;
        if content_length(session).is_some_and(|n| n > limit) {
            let chat_ctx = ctx.chat.as_mut().expect("chat ctx");
            let msg = format!("chat request body exceeds {limit} bytes");
            return self
                .reject(session, chat_ctx, Rejection::TooLarge, &msg)
                .await;
        }

        if decision.mode == Mode::RuntimeOrchestrator {
            return self.serve_runtime(session, ctx, &active, &route).await;
        }
        let caller = ctx.chat.as_ref().and_then(|c| c.caller.clone());
        self.maybe_shadow(session, &active, &route, caller).await?;
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let active = ctx.active.get_or_insert_with(|| self.shared.snapshot());
        let addr = self
            .shared
            .resolver
            .resolve(&active.config.legacy.address)
            .await
            .map_err(|e| {
                Error::explain(
                    ErrorType::ConnectNoRoute,
                    format!("resolving legacy address: {e}"),
                )
            })?;
        if let Some(chat) = ctx.chat.as_mut() {
            if chat.in_flight.is_none() {
                let gauge = self
                    .shared
                    .metrics
                    .streams_in_flight
                    .with_label_values(&[Mode::DirectLlm.as_str()]);
                chat.in_flight = Some(InFlight::new(gauge));
            }
        }
        Ok(Box::new(upstream::peer(addr, &active.legacy)))
    }

    /// What legacy is sent: the client's request as it came, with one exception. When
    /// `identity.trusted_org_header` is configured, every copy of that header is removed, on
    /// every request to legacy (chat, failover and all other routes).
    ///
    /// The header is the ingress's assertion to this proxy and is consumed here to pick the mode.
    /// The proxy cannot tell a copy the ingress set from one a client got past it, so it forwards
    /// none: legacy keeps identifying callers by their token exactly as before the proxy existed,
    /// and the header can never be used to speak for another org to legacy through the proxy.
    /// Without the setting the header is an ordinary one and passes untouched. (The runtime gets
    /// only a fixed list of headers, with the org in its JSON body.)
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let active = ctx.active.get_or_insert_with(|| self.shared.snapshot());
        if let Some(name) = active.verifier.trusted_org_header() {
            upstream_request.remove_header(name);
        }
        Ok(())
    }

    /// A chat body on its way to legacy without a Content-Length is streamed, so its size is
    /// only known as it passes: once it exceeds `limits.max_chat_body_bytes` the request is
    /// cut off and answered 413, like one whose Content-Length says so up front. Legacy may have
    /// seen the start of it, never a complete request.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let (Some(chat), Some(b)) = (ctx.chat.as_mut(), body.as_ref()) else {
            return Ok(());
        };
        let limit = ctx
            .active
            .as_ref()
            .map_or(usize::MAX, |a| a.config.limits.max_chat_body_bytes);
        chat.body_to_legacy += b.len();
        if chat.body_to_legacy > limit {
            chat.answered = Some(413);
            self.shared
                .metrics
                .rejected_total
                .with_label_values(&["too_large"])
                .inc();
            return Error::e_explain(
                ErrorType::HTTPStatus(413),
                format!("chat request body exceeds {limit} bytes"),
            );
        }
        Ok(())
    }

    /// Pingora's own error answers (legacy unreachable, a failure mid-request), except that a
    /// chat request's still says how it was routed, as every chat response does, and a chat body
    /// cut off for its size gets the same JSON 413 as one refused up front.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> pingora::proxy::FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    // The client is gone: nobody to answer.
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        let decision = ctx.chat.as_ref().map(|c| c.decision);
        let written = if code == 0 {
            Ok(())
        } else if let (Some(decision), 413, None) = (decision, code, session.response_written()) {
            let limit = ctx
                .active
                .as_ref()
                .map_or(0, |a| a.config.limits.max_chat_body_bytes);
            let msg = format!("chat request body exceeds {limit} bytes");
            respond_json(session, 413, decision, "PAYLOAD_TOO_LARGE", &msg).await
        } else {
            let mut resp = pingora::protocols::http::ServerSession::generate_error(code);
            if let Some(d) = decision {
                let _ = resp.insert_header("x-execution-mode", d.mode.as_str());
                let _ = resp.insert_header("x-execution-reason", d.reason.as_str());
            }
            session
                .downstream_session
                .write_error_response(resp, Bytes::new())
                .await
        };
        if let Err(err) = written {
            tracing::debug!(error = %err, "could not send the error response");
        }
        pingora::proxy::FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(chat) = &ctx.chat {
            resp.insert_header("x-execution-mode", chat.decision.mode.as_str())?;
            resp.insert_header("x-execution-reason", chat.decision.reason.as_str())?;
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let (Some(chat), Some(b)) = (ctx.chat.as_mut(), body.as_ref()) {
            if !b.is_empty() {
                chat.first_byte.get_or_insert_with(|| ctx.started.elapsed());
                chat.bytes += b.len() as u64;
            }
        }
        Ok(None)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        self.record(session, e, ctx);
        if let Some(chat) = ctx.chat.as_mut() {
            chat.in_flight = None;
        }
    }
}
