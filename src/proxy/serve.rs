//! The runtime path of a chat request, in the order it happens: read the body, build the
//! runtime's request, open the runtime under the shutdown cutoff and the client's departure, then
//! relay its stream or fail over to legacy. Also the shadow copy of a legacy chat.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::proxy::Session;
use pingora::Result;

use super::ctx::{ChatCtx, Failover, Served};
use super::respond::{respond_sse_error, Rejection};
use super::{CutoverProxy, REPLAY_LIMIT};
use crate::app::state::Active;
use crate::core::breaker::State;
use crate::core::chat;
use crate::core::config::Mode;
use crate::core::identity::Caller;
use crate::core::routing::{ChatRoute, Reason, RolloutDecision};
use crate::core::stream::{self, End, Facts};
use crate::runtime::connection::{self, OpenFailure, RuntimeStream};
use crate::runtime::relay::{self, RelayArgs, StreamReport};

pub(super) fn content_length(session: &Session) -> Option<usize> {
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

enum BodyRead {
    Complete(Bytes),
    TooLarge,
    /// The body had not all arrived by `limits.body_timeout_ms`.
    TimedOut,
}

/// Read the whole (bounded) chat body by `by`, keeping Pingora's retry buffer so that legacy can
/// be sent the original body if the runtime fails before its first byte.
async fn read_chat_body(session: &mut Session, limit: usize, by: Instant) -> Result<BodyRead> {
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
    loop {
        // A read cut off here loses nothing: Pingora's body reader keeps what reached it, and
        // the retry buffer what was read, for legacy to be sent in order.
        let chunk = match tokio::time::timeout_at(by.into(), session.read_request_body()).await {
            Ok(chunk) => chunk?,
            Err(_) => return Ok(BodyRead::TimedOut),
        };
        let Some(chunk) = chunk else { break };
        if body.len() + chunk.len() > limit {
            return Ok(BodyRead::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(BodyRead::Complete(Bytes::from(body)))
}

/// The runtime's request for one chat.
struct RuntimeRequest {
    session_id: String,
    body: Bytes,
    deadline: Instant,
}

/// How opening the runtime ended.
enum Opened {
    Stream(RuntimeStream),
    Failed(OpenFailure),
    /// The proxy started shutting down before the runtime answered.
    Shutdown,
    /// The client went away before the runtime answered.
    ClientGone,
}

/// The request the proxy serves from here on.
pub(super) struct RuntimePath<'a> {
    pub started: Instant,
    pub active: &'a Arc<Active>,
    pub chat: &'a mut ChatCtx,
    pub route: &'a ChatRoute,
}

impl CutoverProxy {
    /// The runtime path: returns true when the proxy answered, false to hand over to legacy.
    pub(super) async fn serve_runtime(
        &self,
        session: &mut Session,
        mut req: RuntimePath<'_>,
    ) -> Result<bool> {
        if content_length(session).is_some_and(|n| n > REPLAY_LIMIT) {
            // Legacy could not be given this body again if the runtime failed, so it goes
            // there directly, and the runtime's probe slot is freed for another request.
            req.chat.probe = Default::default();
            req.chat.decision = RolloutDecision {
                mode: Mode::DirectLlm,
                reason: Reason::LargeBody,
            };
            req.chat.served = Served::Legacy { failover: None };
            return Ok(false);
        }
        // This and the other one-off awaits below are boxed: a future holds room for its
        // largest await for as long as it lives, and this one lives as long as the stream.
        let Some(mut request) = Box::pin(self.runtime_request(session, &mut req)).await? else {
            return Ok(true);
        };
        // Boxed so that its state (the request header copy, the exchange) is freed before the
        // relay, which may hold the stream for minutes, starts.
        let opened = Box::pin(self.open_runtime(session, req.active, &mut request)).await;
        match opened {
            Opened::Stream(stream) => {
                self.relay(session, req, request, stream).await;
                Ok(true)
            }
            Opened::Failed(failure) if failure.failover => {
                self.fail_over(req, failure);
                Ok(false)
            }
            Opened::Failed(failure) => {
                Box::pin(self.answer_failed_open(session, req, failure)).await;
                Ok(true)
            }
            Opened::Shutdown => {
                Box::pin(self.answer_shutdown(session, req)).await;
                Ok(true)
            }
            Opened::ClientGone => {
                req.chat.served = Served::Runtime(StreamReport {
                    outcome: None,
                    detail: Some("client disconnected before the runtime answered".into()),
                    ..StreamReport::default()
                });
                Ok(true)
            }
        }
    }

    /// Read and check the chat body and build the runtime's request from it; `None` when the
    /// request was refused (too large, not a chat body).
    async fn runtime_request(
        &self,
        session: &mut Session,
        req: &mut RuntimePath<'_>,
    ) -> Result<Option<RuntimeRequest>> {
        let caller = req
            .chat
            .caller
            .clone()
            .expect("runtime path has a verified caller");
        let limit = req
            .active
            .config
            .limits
            .max_chat_body_bytes
            .min(REPLAY_LIMIT);
        let limits = &req.active.config.limits;
        let by = req.started + Duration::from_millis(limits.body_timeout_ms);
        let chat_body = match read_chat_body(session, limit, by).await? {
            BodyRead::Complete(body) => chat::parse_chat_body(&body),
            BodyRead::TooLarge => {
                let msg = format!("chat request body without Content-Length exceeds {limit} bytes");
                self.refuse(session, req.chat, Rejection::TooLarge, &msg)
                    .await?;
                return Ok(None);
            }
            BodyRead::TimedOut => {
                let msg = format!(
                    "chat request body did not arrive within {} ms",
                    limits.body_timeout_ms
                );
                self.refuse(session, req.chat, Rejection::BodyTimeout, &msg)
                    .await?;
                return Ok(None);
            }
        };
        let chat_body = match chat_body {
            Ok(b) => b,
            Err(e) => {
                self.refuse(session, req.chat, Rejection::BadBody, &e.message())
                    .await?;
                return Ok(None);
            }
        };
        let session_id = chat::session_id_for(req.route);
        let body = Bytes::from(chat::runtime_request_body(&session_id, &caller, &chat_body));
        // The execution is timed from here: how long the client took to send its body is not
        // the runtime's time.
        let asked = *req.chat.asked.insert(Instant::now());
        Ok(Some(RuntimeRequest {
            session_id,
            body,
            deadline: asked + req.active.config.runtime.execution_timeout(),
        }))
    }

    /// Open the runtime, unless the proxy starts shutting down or the client leaves first.
    async fn open_runtime(
        &self,
        session: &mut Session,
        active: &Arc<Active>,
        request: &mut RuntimeRequest,
    ) -> Opened {
        let mut cutoff = self.shared.cutoff.subscribe();
        let downstream = session.req_header().clone();
        // The body is not kept for the length of the stream.
        let body = std::mem::take(&mut request.body);
        tokio::select! {
            r = connection::open(&self.shared, active, &downstream, body, request.deadline, false) => match r {
                Ok(stream) => Opened::Stream(stream),
                Err(failure) => Opened::Failed(failure),
            },
            _ = cutoff.wait_for(|c| *c) => Opened::Shutdown,
            // Dropping the pending open closes the runtime connection: the runtime stops
            // working for a client that is gone, and it is not counted against the runtime.
            _ = relay::client_gone(session) => Opened::ClientGone,
        }
    }

    /// Relay the runtime's stream to the client.
    async fn relay(
        &self,
        session: &mut Session,
        req: RuntimePath<'_>,
        request: RuntimeRequest,
        stream: RuntimeStream,
    ) {
        let runtime = &req.active.config.runtime;
        let args = RelayArgs {
            shared: self.shared.clone(),
            decision: req.chat.decision,
            session_id: request.session_id,
            started: req.started,
            deadline: request.deadline,
            heartbeat: Duration::from_secs(runtime.heartbeat_secs),
            max_frame_bytes: runtime.max_frame_bytes,
            pool_idle: req.active.runtime.pool_idle_timeout,
            map: req.active.map_settings(req.chat.org().unwrap_or_default()),
        };
        let report = relay::relay(session, stream, args).await;
        req.chat.served = Served::Runtime(report);
    }

    /// The runtime failed before its first byte: legacy serves the request.
    fn fail_over(&self, req: RuntimePath<'_>, failure: OpenFailure) {
        tracing::warn!(detail = %failure.detail, "runtime failed before the first byte; serving from legacy");
        self.shared.metrics.failover_total.inc();
        req.chat.served = Served::Legacy {
            failover: Some(Failover {
                failure,
                after: req.chat.runtime_time(req.started),
            }),
        };
        req.chat.decision = RolloutDecision {
            mode: Mode::DirectLlm,
            reason: Reason::Failover,
        };
    }

    /// The runtime stayed silent until the deadline: the client gets an error event rather than
    /// a second wait on legacy.
    async fn answer_failed_open(
        &self,
        session: &mut Session,
        req: RuntimePath<'_>,
        failure: OpenFailure,
    ) {
        let bytes = respond_sse_error(session, req.chat.decision, "TIMEOUT", &failure.detail)
            .await
            .unwrap_or(0);
        req.chat.served = Served::Runtime(StreamReport {
            outcome: Some(failure.outcome),
            error_code: Some("TIMEOUT"),
            detail: Some(failure.detail),
            first_write: Some(req.started.elapsed()),
            events: 1,
            bytes,
        });
    }

    /// Shutting down while the runtime had not answered yet: not the runtime's fault.
    async fn answer_shutdown(&self, session: &mut Session, req: RuntimePath<'_>) {
        let verdict = stream::verdict(&Facts {
            client: true,
            completed: false,
            runtime_error: None,
            end: End::Shutdown,
        });
        let Some(closing) = verdict.closing else {
            return;
        };
        let bytes = respond_sse_error(session, req.chat.decision, closing.code, &closing.message)
            .await
            .unwrap_or(0);
        req.chat.served = Served::Runtime(StreamReport {
            outcome: verdict.outcome,
            error_code: Some(closing.code),
            detail: Some(closing.message),
            first_write: Some(req.started.elapsed()),
            events: 1,
            bytes,
        });
    }

    /// Mirror a share of direct_llm chats to the runtime (`rollout.shadow_percent`). The body is
    /// read here (kept in Pingora's retry buffer, so legacy still gets it) only for selected
    /// requests from verified orgs whose body fits the buffer, and only while the breaker is
    /// closed: a known-bad runtime is not loaded further.
    pub(super) async fn maybe_shadow(
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
        let by = Instant::now() + Duration::from_millis(active.config.limits.body_timeout_ms);
        // Too large or too slow: legacy still gets what was read, then the rest as it comes.
        let BodyRead::Complete(body) = read_chat_body(session, REPLAY_LIMIT, by).await? else {
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
}
