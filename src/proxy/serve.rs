//! The runtime path of a chat request, in the order it happens: read the body, read the
//! conversation from legacy through the bridge and build the runtime's request, open the runtime
//! under the shutdown cutoff and the client's departure, then relay its stream (the user's message
//! is saved at the commit point) or, when the runtime fails before anything reached the client,
//! fail over to legacy. Also the shadow copy of a legacy chat.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use pingora::proxy::Session;
use pingora::Result;

use super::ctx::{BreakerTicket, LegacyHalf, RequestCtx};
use super::ctx::{ChatCtx, Failover, Served};
use super::respond::Rejection;
use super::service::{Chat, ChatService};
use crate::core::breaker::State;
use crate::core::bridge::{self, BridgeError};
use crate::core::chat::{self, ChatBody};
use crate::core::config::{Mode, PreContent};
use crate::core::forwarded::{Forwarded, Hop, Received};
use crate::core::identity::{Caller, Unverified};
use crate::core::ids;
use crate::core::routing::{gate, ChatRoute, Gated, Reason, RolloutDecision};
use crate::core::scorecard::{Coding, DecodingObserver};
use crate::core::stream::{self, End, Facts};
use crate::runtime::connection::{self, OpenFailure, RuntimeStream};
use crate::runtime::downstream::{BodyRead, Downstream};
use crate::runtime::relay::{self, RelayArgs, Relayed, Rescued, Saving, StreamReport};
use crate::runtime::rescue::Rescue;
use crate::runtime::respond::respond_sse_error;
use crate::runtime::shadow::{Pair, Reading, Source};
use crate::state::Active;
use crate::upstream::bridge::Credentials;

/// Largest body Pingora can replay to legacy when the runtime fails before its first byte.
pub const REPLAY_LIMIT: usize = 64 * 1024;

pub(super) fn content_length<D: Downstream>(session: &D) -> Option<usize> {
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

/// A chat the runtime serves: its request, and what the bridge does around it.
struct Execution {
    session_id: String,
    body: Bytes,
    deadline: Instant,
    /// The caller's `x-request-id`, or one made for this chat: the bridge's calls and the
    /// runtime's request carry the same.
    request_id: String,
    /// With the bridge on.
    bridged: Option<Bridged>,
    /// `runtime.pre_content = "stream"`: the request legacy gets should the runtime fail
    /// before content with the client's stream open.
    rescue: Option<Box<Rescue>>,
}

/// The bridge's part of a runtime chat.
struct Bridged {
    who: Credentials,
    message: String,
    parent_id: Option<String>,
    /// The session was made for this `/chat/start`: deleted if the runtime fails before the
    /// commit.
    created: bool,
    /// The session's last message when the chat began.
    after: Option<String>,
}

/// What reading and preparing a runtime chat came to.
enum Prepared {
    Run(Box<Execution>),
    /// The proxy answered it itself (a refusal).
    Answered,
    /// Legacy serves it, with its original body.
    Legacy,
}

/// The caller's request id: sent on, with the bridge's calls and to the runtime.
const REQUEST_ID: &str = "x-request-id";

/// The caller's `x-request-id`, as sent.
pub(super) fn caller_request_id<D: Downstream>(session: &D) -> Option<&str> {
    session
        .req_header()
        .headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
}

/// Who the bridge's calls are made for: the caller's own `Authorization`, `request_id`, and the
/// `X-Forwarded-*` headers legacy would get on the caller's own request.
fn credentials<D: Downstream>(
    session: &D,
    active: &Active,
    request_id: Option<&str>,
    caller: &Caller,
) -> Credentials {
    let headers = &session.req_header().headers;
    let authorization = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    Credentials::new(authorization, request_id, caller).forwarded(forwarded(session, active))
}

/// The `X-Forwarded-*` headers legacy gets for the caller's request: those already in its head
/// when the front door wrote them there, else the proxy's for its connection.
fn forwarded<D: Downstream>(session: &D, active: &Active) -> Forwarded {
    let mut got = Received::default();
    for (name, value) in &session.req_header().headers {
        got.see(name.as_str().as_bytes(), value.as_bytes());
    }
    let hop = if session.forwarded_in_head() {
        Hop::AS_WRITTEN
    } else {
        active.hop(session.client_ip())
    };
    Forwarded::of(hop, &got)
}

/// How opening the runtime ended.
enum Opened {
    /// Boxed: the stream's connection and buffers are most of its size.
    Stream(Box<RuntimeStream>),
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

impl ChatService {
    pub(super) fn request_ctx(&self, active: Arc<Active>, started: Instant) -> RequestCtx {
        RequestCtx {
            started,
            _guard: self.shared.requests.enter(),
            active,
            chat: None,
        }
    }

    /// A chat request, on either connection: who asks, how it is routed, and on the runtime path
    /// its whole service.
    pub(super) async fn serve_chat<D: Downstream>(
        &self,
        session: &mut D,
        ctx: &mut RequestCtx,
        route: &ChatRoute,
    ) -> Result<Chat> {
        let active = ctx.active.clone();
        let identity = active.verifier.identify(&session.req_header().headers);
        if let Err(u) = identity {
            self.shared
                .metrics
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
        let org = identity.as_ref().map(|c| c.org_id.as_str()).map_err(|u| *u);
        let breaker = &self.shared.breaker;
        let Gated { decision, probe } = gate(
            active.rollout.decide_identified(org),
            breaker.state(),
            || breaker.admit(),
        );
        let breaker = BreakerTicket::new(&self.shared, probe);
        let started = ctx.started;
        let chat = ctx
            .chat
            .insert(ChatCtx::new(identity.ok(), decision, breaker));
        chat.request_id = caller_request_id(session).map(str::to_string);
        chat.cors = active.cors_for(&session.req_header().headers);

        let limit = active.config.limits.max_chat_body_bytes;
        if content_length(session).is_some_and(|n| n > limit) {
            let msg = format!("chat request body exceeds {limit} bytes");
            self.refuse(session, chat, Rejection::TooLarge, &msg)
                .await?;
            return Ok(Chat::Answered);
        }
        if decision.mode != Mode::RuntimeOrchestrator {
            return Ok(Chat::Legacy { shadow: true });
        }
        let req = RuntimePath {
            started,
            active: &active,
            chat,
            route,
        };
        Ok(match self.serve_runtime(session, req).await? {
            true => Chat::Answered,
            false => Chat::Legacy { shadow: false },
        })
    }

    /// A legacy chat, perhaps mirrored to the runtime (`maybe_shadow`).
    pub(super) async fn shadow_legacy(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        route: &ChatRoute,
    ) -> Result<()> {
        let Some(chat) = ctx.chat.as_mut() else {
            return Ok(());
        };
        let caller = chat.caller.clone();
        let pair = self
            .maybe_shadow(session, &ctx.active, route, caller)
            .await?;
        chat.shadow = pair.map(|pair| {
            Box::new(LegacyHalf {
                pair,
                observer: DecodingObserver::new(Coding::Identity),
                unreadable: false,
            })
        });
        Ok(())
    }

    /// The runtime path: returns true when the proxy answered, false to hand over to legacy.
    pub(super) async fn serve_runtime<D: Downstream>(
        &self,
        session: &mut D,
        mut req: RuntimePath<'_>,
    ) -> Result<bool> {
        if content_length(session).is_some_and(|n| n > REPLAY_LIMIT) {
            // Legacy could not be given this body again if the runtime failed, so it goes
            // there directly.
            to_legacy(req.chat, Reason::LargeBody);
            return Ok(false);
        }
        // This and the other one-off awaits below are boxed: a future holds room for its
        // largest await for as long as it lives, and this one lives as long as the stream.
        let mut request = match Box::pin(self.runtime_request(session, &mut req)).await? {
            Prepared::Run(request) => *request,
            Prepared::Answered => return Ok(true),
            Prepared::Legacy => return Ok(false),
        };
        // Boxed so that its state (the request header copy, the exchange) is freed before the
        // relay, which may hold the stream for minutes, starts.
        let opened = Box::pin(self.open_runtime(session, req.active, &mut request)).await;
        if !matches!(opened, Opened::Stream(_)) {
            // Before legacy gets the original `/chat/start`, so the user's list holds no empty
            // session.
            Box::pin(self.discard_session(req.active, &request)).await;
        }
        match opened {
            Opened::Stream(stream) => {
                session.release_request();
                let discard = request
                    .bridged
                    .as_ref()
                    .filter(|b| b.created)
                    .map(|b| (b.who.clone(), request.session_id.clone()));
                let Some(failure) = self.relay(session, &mut req, request, *stream).await else {
                    return Ok(true);
                };
                if let Some((who, session_id)) = discard {
                    Box::pin(self.delete_session(req.active, &who, &session_id)).await;
                }
                self.fail_over(req, failure, "before_commit");
                Ok(false)
            }
            Opened::Failed(failure) if failure.failover => {
                self.fail_over(req, failure, "before_head");
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

    /// Read and check the chat body, read the conversation through the bridge and build the
    /// runtime's request.
    async fn runtime_request<D: Downstream>(
        &self,
        session: &mut D,
        req: &mut RuntimePath<'_>,
    ) -> Result<Prepared> {
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
        // From the head, not from the request's first byte: the head had its own deadline.
        let by = Instant::now() + Duration::from_millis(limits.body_timeout_ms);
        let mut rescue = None;
        let chat_body = match session.read_chat_body(limit, by).await? {
            BodyRead::Complete(body) => {
                if req.active.config.runtime.pre_content == PreContent::Stream {
                    rescue = Some(Box::new(rescue_request(session, req.active, &body)));
                }
                chat::parse_chat_body(&body)
            }
            BodyRead::TooLarge => {
                let msg = format!("chat request body without Content-Length exceeds {limit} bytes");
                self.refuse(session, req.chat, Rejection::TooLarge, &msg)
                    .await?;
                return Ok(Prepared::Answered);
            }
            BodyRead::TimedOut => {
                let msg = format!(
                    "chat request body did not arrive within {} ms",
                    limits.body_timeout_ms
                );
                self.refuse(session, req.chat, Rejection::BodyTimeout, &msg)
                    .await?;
                return Ok(Prepared::Answered);
            }
        };
        let chat_body = match chat_body {
            Ok(b) => b,
            Err(e) => {
                self.refuse(session, req.chat, Rejection::BadBody, &e.message())
                    .await?;
                return Ok(Prepared::Answered);
            }
        };
        let bridged = req.active.config.bridge.enabled;
        if let Some(what) = unsafe_id(req.route, &chat_body).filter(|_| bridged) {
            let msg = format!(
                "{what} may hold only A-Z a-z 0-9 _ - (at most {} characters)",
                ids::MAX_ID_LEN
            );
            self.refuse(session, req.chat, Rejection::UnsafeId, &msg)
                .await?;
            return Ok(Prepared::Answered);
        }
        let request_id = caller_request_id(session)
            .filter(|v| !v.is_empty())
            .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string);
        // The access log names the id the runtime and the bridge's calls carry.
        req.chat.request_id = Some(request_id.clone());
        // The execution is timed from here: how long the client took to send its body is not
        // the runtime's time.
        let asked = *req.chat.asked.insert(Instant::now());
        let deadline = asked + req.active.config.runtime.execution_timeout();
        let agent = chat_body.agent_id.as_deref().filter(|a| !a.is_empty());

        if !bridged {
            let session_id = chat::session_id_for(req.route);
            let default_agent = &req.active.config.runtime.default_agent_id;
            let body =
                chat::RuntimeRequest::standalone(&session_id, &caller, &chat_body, default_agent);
            if body.agent_id.is_none() {
                to_legacy(req.chat, Reason::NoAgent);
                return Ok(Prepared::Legacy);
            }
            return Ok(Prepared::Run(Box::new(Execution {
                session_id,
                body: Bytes::from(body.to_bytes()),
                deadline,
                request_id,
                bridged: None,
                rescue,
            })));
        }

        let who = credentials(session, req.active, Some(&request_id), &caller);
        let looked = match (req.route, agent) {
            (ChatRoute::Session(id), _) => self.read_session(req.active, &who, id).await,
            (ChatRoute::Start, Some(agent)) => {
                self.start_session(req.active, &who, agent, &chat_body)
                    .await
            }
            (ChatRoute::Start, None) => {
                to_legacy(req.chat, Reason::NoAgent);
                return Ok(Prepared::Legacy);
            }
        };
        let (session_id, conversation, created) = match looked {
            Ok(looked) => looked,
            Err(e) => {
                tracing::info!(error = %e, "the conversation bridge cannot serve this chat; serving from legacy");
                let reason = match e {
                    BridgeError::Refused { .. } => Reason::BridgeRefused,
                    BridgeError::Unavailable { .. } => Reason::BridgeUnavailable,
                };
                to_legacy(req.chat, reason);
                return Ok(Prepared::Legacy);
            }
        };
        let body = chat::RuntimeRequest::bridged(&session_id, &caller, &chat_body, &conversation);
        Ok(Prepared::Run(Box::new(Execution {
            session_id,
            body: Bytes::from(body.to_bytes()),
            deadline,
            request_id,
            bridged: Some(Bridged {
                who,
                message: chat_body.message,
                parent_id: chat_body.parent_message_id,
                created,
                after: conversation.last_message_id,
            }),
            rescue,
        })))
    }

    /// `POST /chat/sessions/{id}`: the session's agent, its settings and the history.
    async fn read_session(
        &self,
        active: &Active,
        who: &Credentials,
        session_id: &str,
    ) -> std::result::Result<(String, bridge::Conversation, bool), BridgeError> {
        let bridge = &self.shared.bridge;
        let conversation = bridge
            .lookup_session(&active.bridge, who, session_id)
            .await?;
        Ok((session_id.to_string(), conversation, false))
    }

    /// `POST /chat/start`: the body's agent, then a new session titled by the message.
    async fn start_session(
        &self,
        active: &Active,
        who: &Credentials,
        agent: &str,
        chat_body: &ChatBody,
    ) -> std::result::Result<(String, bridge::Conversation, bool), BridgeError> {
        let bridge = &self.shared.bridge;
        let conversation = bridge.lookup_start(&active.bridge, who, agent).await?;
        let session_id = bridge
            .create_session(&active.bridge, who, agent, &chat_body.message)
            .await?;
        Ok((session_id, conversation, true))
    }

    /// Delete the session made for a `/chat/start` the runtime did not serve.
    async fn discard_session(&self, active: &Active, request: &Execution) {
        if let Some(b) = request.bridged.as_ref().filter(|b| b.created) {
            self.delete_session(active, &b.who, &request.session_id)
                .await;
        }
    }

    async fn delete_session(&self, active: &Active, who: &Credentials, session_id: &str) {
        let deleted = self
            .shared
            .bridge
            .delete_session(&active.bridge, who, session_id)
            .await;
        if let Err(e) = deleted {
            tracing::warn!(session_id = %session_id, error = %e, "could not delete the session made for a chat the runtime did not serve");
        }
    }

    /// Open the runtime, unless the proxy starts shutting down or the client leaves first.
    async fn open_runtime<D: Downstream>(
        &self,
        session: &mut D,
        active: &Arc<Active>,
        request: &mut Execution,
    ) -> Opened {
        let mut cutoff = self.shared.cutoff.subscribe();
        let mut downstream = session.req_header().clone();
        // The id the bridge's calls carried (the caller's, or one made for an absent or empty
        // header): the runtime's request carries the same.
        let _ = downstream.insert_header(REQUEST_ID, request.request_id.as_str());
        // The body is not kept for the length of the stream.
        let body = std::mem::take(&mut request.body);
        tokio::select! {
            r = connection::open(&self.shared, active, &downstream, body, request.deadline, false) => match r {
                Ok(stream) => Opened::Stream(Box::new(stream)),
                Err(failure) => Opened::Failed(failure),
            },
            _ = cutoff.wait_for(|c| *c) => Opened::Shutdown,
            // Dropping the pending open closes the runtime connection: the runtime stops
            // working for a client that is gone, and it is not counted against the runtime.
            _ = session.client_gone() => Opened::ClientGone,
        }
    }

    /// Relay the runtime's stream to the client; the failure to fail over with when the runtime
    /// failed before the commit.
    ///
    /// Not an async fn: its arguments (the execution, the runtime's body) move into the relay's
    /// state before the future is made, instead of being held a second time as the future's
    /// inputs for as long as the stream lasts.
    fn relay<'a, 'p: 'a, D: Downstream>(
        &'a self,
        session: &'a mut D,
        req: &'a mut RuntimePath<'p>,
        request: Execution,
        stream: RuntimeStream,
    ) -> impl std::future::Future<Output = Option<OpenFailure>> + Send + use<'a, 'p, D> {
        let runtime = &req.active.config.runtime;
        let bridge_config = &req.active.config.bridge;
        let created = request.bridged.as_ref().is_some_and(|b| b.created);
        let args = RelayArgs {
            shared: self.shared.clone(),
            decision: req.chat.decision,
            cors: req.chat.cors.clone(),
            session_id: request.session_id,
            started: req.started,
            deadline: request.deadline,
            heartbeat: Duration::from_secs(runtime.heartbeat_secs),
            max_frame_bytes: runtime.max_frame_bytes,
            commit_on: runtime.commit_on,
            commit_timeout: runtime.commit_timeout(),
            commit_timeout_action: runtime.commit_timeout_action,
            map: req.active.map_settings(req.chat.org().unwrap_or_default()),
            saving: request.bridged.map(|b| {
                Box::new(Saving {
                    bridge: self.shared.bridge.clone(),
                    target: req.active.bridge.clone(),
                    who: b.who,
                    message: b.message,
                    parent_id: b.parent_id,
                    after: b.after,
                    detach: bridge_config
                        .finish_detached
                        .then_some(bridge_config.max_detached),
                })
            }),
            rescue: request.rescue.map(|mut r| {
                r.discard_session = created;
                r
            }),
        };
        // What follows the relay is plain code: mapped onto its future rather than awaited in an
        // async block, which would keep a second slot of the relay future's size.
        relay::relay(session, stream, args).map(move |relayed| {
            match relayed {
                Relayed::Served(mut report) => {
                    match report.rescued.take() {
                        Some(rescued) => self.rescued(req, rescued, report),
                        None => req.chat.served = Served::Runtime(report),
                    }
                    None
                }
                // An error (or, too slow, a timeout) for the breaker, like a runtime that failed
                // before its head.
                Relayed::FailOver { detail, outcome } => Some(OpenFailure {
                    outcome,
                    detail,
                    failover: true,
                }),
            }
        })
    }

    /// The runtime failed before content with the client's stream open, and legacy's answer
    /// continued it: a failover for the breaker, the stats, the metrics and the access log.
    fn rescued(&self, req: &mut RuntimePath<'_>, rescued: Rescued, report: StreamReport) {
        let metrics = self.shared.metrics;
        metrics.failover_total.inc();
        metrics
            .commit
            .failovers_total
            .with_label_values(&["in_stream"])
            .inc();
        let after = req
            .chat
            .asked
            .map_or(Duration::ZERO, |t| rescued.at.saturating_duration_since(t));
        req.chat.served = Served::Rescued {
            failover: Failover {
                failure: OpenFailure {
                    outcome: rescued.outcome,
                    detail: rescued.detail,
                    failover: true,
                },
                after,
            },
            report,
        };
        req.chat.decision = RolloutDecision {
            mode: Mode::DirectLlm,
            reason: Reason::Failover,
        };
    }

    /// The runtime failed before anything reached the client (`stage`: before its response
    /// head, or before the commit): legacy serves the request.
    fn fail_over(&self, req: RuntimePath<'_>, failure: OpenFailure, stage: &'static str) {
        tracing::warn!(detail = %failure.detail, stage, "runtime failed before anything reached the client; serving from legacy");
        let metrics = self.shared.metrics;
        metrics.failover_total.inc();
        metrics
            .commit
            .failovers_total
            .with_label_values(&[stage])
            .inc();
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
    async fn answer_failed_open<D: Downstream>(
        &self,
        session: &mut D,
        req: RuntimePath<'_>,
        failure: OpenFailure,
    ) {
        let bytes = respond_sse_error(
            session,
            req.chat.decision,
            &req.chat.cors,
            "TIMEOUT",
            &failure.detail,
        )
        .await
        .unwrap_or(0);
        req.chat.served = Served::Runtime(StreamReport {
            outcome: Some(failure.outcome),
            error_code: Some("TIMEOUT"),
            detail: Some(failure.detail),
            first_write: Some(req.started.elapsed()),
            events: 1,
            bytes,
            rescued: None,
        });
    }

    /// Shutting down while the runtime had not answered yet: not the runtime's fault.
    async fn answer_shutdown<D: Downstream>(&self, session: &mut D, req: RuntimePath<'_>) {
        let verdict = stream::verdict(&Facts {
            client: true,
            completed: false,
            runtime_error: None,
            end: End::Shutdown,
        });
        let Some(closing) = verdict.closing else {
            return;
        };
        let bytes = respond_sse_error(
            session,
            req.chat.decision,
            &req.chat.cors,
            closing.code,
            &closing.message,
        )
        .await
        .unwrap_or(0);
        req.chat.served = Served::Runtime(StreamReport {
            outcome: verdict.outcome,
            error_code: Some(closing.code),
            detail: Some(closing.message),
            first_write: Some(req.started.elapsed()),
            events: 1,
            bytes,
            rescued: None,
        });
    }

    /// Mirror a share of direct_llm chats to the runtime (`rollout.shadow_percent`), and every
    /// one of the orgs on `rollout.shadow_orgs`. The body is read here (kept in Pingora's retry
    /// buffer, so legacy still gets it) only for selected requests from verified orgs whose body
    /// fits the buffer, and only while the breaker is closed: a known-bad runtime is not loaded
    /// further. Returns the pair the legacy answer is compared in, when a copy started.
    pub(super) async fn maybe_shadow(
        &self,
        session: &mut Session,
        active: &Arc<Active>,
        route: &ChatRoute,
        caller: Option<Caller>,
    ) -> Result<Option<Pair>> {
        let percent = active.config.rollout.shadow_percent;
        let Some(caller) = caller else {
            return Ok(None);
        };
        let named = active.config.rollout.shadow_orgs.contains(&caller.org_id);
        let drawn = percent > 0.0
            && crate::core::routing::shadow_selected(percent, fastrand::u64(0..10_000));
        if !(named || drawn)
            || self.shared.breaker.state() != State::Closed
            || content_length(session).is_none_or(|n| n > REPLAY_LIMIT)
        {
            return Ok(None);
        }
        let by = Instant::now() + Duration::from_millis(active.config.limits.body_timeout_ms);
        // Too large or too slow: legacy still gets what was read, then the rest as it comes.
        let BodyRead::Complete(body) =
            Downstream::read_chat_body(session, REPLAY_LIMIT, by).await?
        else {
            return Ok(None);
        };
        let Ok(chat_body) = chat::parse_chat_body(&body) else {
            return Ok(None);
        };
        let session_id = chat::session_id_for(route);
        let source = if active.config.bridge.enabled {
            let who = credentials(session, active, caller_request_id(session), &caller);
            let start_agent = match route {
                ChatRoute::Start => match chat_body.agent_id.clone() {
                    Some(agent) => Some(agent),
                    None => return Ok(None),
                },
                ChatRoute::Session(_) => None,
            };
            Source::Bridged(Box::new(Reading {
                who,
                caller: caller.clone(),
                chat: chat_body,
                start_agent,
            }))
        } else {
            let default_agent = &active.config.runtime.default_agent_id;
            let body =
                chat::RuntimeRequest::standalone(&session_id, &caller, &chat_body, default_agent);
            if body.agent_id.is_none() {
                return Ok(None);
            }
            Source::Ready(Bytes::from(body.to_bytes()))
        };
        Ok(crate::runtime::shadow::spawn(
            &self.shared,
            active.clone(),
            session.req_header().clone(),
            &caller.org_id,
            session_id,
            source,
        ))
    }
}

/// The client's request as legacy gets it in a rescue: its method, target, headers (as
/// Pingora's proxy would forward them, with the proxy's `X-Forwarded-*`) and body as sent.
fn rescue_request<D: Downstream>(session: &D, active: &Active, body: &[u8]) -> Rescue {
    let head = session.req_header();
    let forwarded = forwarded(session, active);
    let target = head.uri.path_and_query().map_or("/", |p| p.as_str());
    let headers: Vec<_> = head
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
        .collect();
    let request = crate::core::rescue::legacy_request(
        head.method.as_str(),
        target,
        &headers,
        active.verifier.trusted_org_header().map(|h| h.as_str()),
        &forwarded,
        body,
    );
    Rescue {
        request: Bytes::from(request),
        address: active.config.legacy.address.clone(),
        timeouts: active.legacy,
        discard_session: false,
    }
}

/// Legacy serves the chat after all, with its original body: not the runtime's doing, so the
/// breaker's probe slot is freed for another request.
fn to_legacy(chat: &mut ChatCtx, reason: Reason) {
    chat.breaker.release();
    chat.decision = RolloutDecision {
        mode: Mode::DirectLlm,
        reason,
    };
    chat.served = Served::Legacy { failover: None };
}

/// An id the caller sent that the bridge would put into a legacy URL and that is not a
/// [`ids::is_safe_id`]: the path's session id, or `/chat/start`'s `agentId`. With the bridge
/// on it is refused with 400 before any upstream is asked, so that a crafted id (`..`,
/// `a%2Fb`) cannot make the proxy call another legacy route with the caller's token; legacy is
/// not asked to serve it either, as that would be the same request through another door. With
/// the bridge off ids only travel inside the runtime's JSON body, where any string is safe.
fn unsafe_id(route: &ChatRoute, chat_body: &ChatBody) -> Option<&'static str> {
    match route {
        ChatRoute::Session(id) => (!ids::is_safe_id(id)).then_some("the session id"),
        ChatRoute::Start => {
            let agent = chat_body.agent_id.as_deref().filter(|a| !a.is_empty());
            agent
                .is_some_and(|a| !ids::is_safe_id(a))
                .then_some("agentId")
        }
    }
}
