//! The proxy's two doors onto one chat service.
//!
//! `front_door` reads each request head itself, bounded and strict: a chat routed to the runtime
//! it serves on its own connection (`ChatService::serve_chat`), a plain request it forwards on
//! its lean path, and anything else it hands to Pingora one request at a time. Pingora's
//! `ProxyHttp` (`CutoverProxy`) serves what it is handed: its `request_filter` calls the same
//! `ChatService` for chats that reach it (odd request shapes, a lean path turned off), proxies
//! legacy chats, failovers and every other route to legacy, and `logging` counts each chat once
//! (`ChatService::record`).

mod ctx;
mod files;
pub mod front_door;
mod peer;
mod record;
mod respond;
mod serve;
mod service;
mod session;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::core::config::Mode;
use crate::core::routing::chat_route;
use crate::core::scorecard::{Coding, DecodingObserver};
use crate::state::in_flight::InFlight;
use crate::state::Shared;
use crate::upstream::{Silence, Stage, UpstreamName};

use crate::runtime::downstream::Downstream;
use crate::runtime::respond::{apply_cors, respond_json};
pub use ctx::RequestCtx;
use ctx::{Handover, Served};
use record::Finish;
use service::Chat;
pub use service::ChatService;

pub use serve::REPLAY_LIMIT;

/// Pingora's half of the house: legacy chats, failovers and every other route, proxied; the
/// chats it routes to the runtime and the file links, answered by the [`ChatService`] it shares
/// with the front door.
pub struct CutoverProxy {
    chats: Arc<ChatService>,
}

impl CutoverProxy {
    pub fn new(chats: Arc<ChatService>) -> Self {
        CutoverProxy { chats }
    }

    fn shared(&self) -> &Shared {
        &self.chats.shared
    }

    /// Legacy's own CORS answer to a chat against what `[cors]` gives the proxy's answers to the
    /// same request: a difference means a browser sees another policy on the runtime path.
    fn check_cors_drift(
        &self,
        req: &pingora::http::RequestHeader,
        resp: &ResponseHeader,
        active: &crate::state::Active,
    ) {
        let origin = req.headers.get(http::header::ORIGIN).map(|v| v.as_bytes());
        if active
            .cors
            .agrees_with(origin, |name| resp.headers.get(name).map(|v| v.as_bytes()))
        {
            return;
        }
        self.shared().metrics.cors_mismatch_total.inc();
        if !active
            .cors_drift_logged
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            let allow = resp
                .headers
                .get(crate::core::cors::ALLOW_ORIGIN)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            tracing::warn!(
                ours = %active.cors.describe(),
                legacy_allow_origin = ?allow,
                "legacy's CORS headers differ from [cors]: browsers see another policy on the proxy's own responses (set cors.origin, or give the proxy legacy's CORS_ORIGIN)"
            );
        }
    }

    /// Whether Pingora's proxying failed because legacy fell silent, and at which deadline: its
    /// head's (kept by the front door's connection, or Pingora's read timeout before a response
    /// was written) or inside its body (Pingora's read timeout, legacy's idle one). Counted.
    fn legacy_silence(&self, session: &Session, e: &Error) -> Option<Stage> {
        let stage = match Silence::in_pingora(e) {
            Some(s) => s.stage,
            None if e.etype() == &ErrorType::ReadTimedout
                && e.esource() == &ErrorSource::Upstream =>
            {
                if session.response_written().is_none() {
                    Stage::Response
                } else {
                    Stage::Idle
                }
            }
            None => return None,
        };
        tracing::warn!(stage = stage.as_str(), error = %e, "legacy fell silent");
        self.shared()
            .metrics
            .upstream_timeouts_total
            .with_label_values(&[UpstreamName::Legacy.as_str(), stage.as_str()])
            .inc();
        Some(stage)
    }
}

#[async_trait]
impl ProxyHttp for CutoverProxy {
    type CTX = RequestCtx;

    /// None: Pingora's default is its response compression, added disabled, which would still
    /// be set up, consulted and dropped on every request. The proxy compresses nothing itself:
    /// legacy's answers pass as legacy encoded them.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        self.chats
            .request_ctx(self.shared().snapshot(), Instant::now())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // A client may send its next request while a stream is still running; Pingora then keeps
        // those bytes for the next request instead of taking them for a broken connection.
        session.downstream_session.set_pipelining_enabled(true);
        if let Some(handover) = front_door::handed_over(session) {
            let Handover {
                ctx: routed,
                route,
                shadow,
            } = *handover;
            *ctx = routed;
            if shadow {
                self.chats.shadow_legacy(session, ctx, &route).await?;
            }
            return Ok(false);
        }
        // Its clock starts at its first byte, not once Pingora has parsed its head.
        if let Some(arrived) = front_door::arrived(session) {
            ctx.started = arrived;
        }
        let req = session.req_header();
        if req.uri.path().starts_with(crate::core::files::ROUTE_PREFIX) {
            let active = ctx.active.clone();
            return self.chats.serve_file(session, &active).await;
        }
        let Some(route) = chat_route(&req.method, req.uri.path()) else {
            return Ok(false);
        };
        match self.chats.serve_chat(session, ctx, &route).await? {
            Chat::Answered => Ok(true),
            Chat::Legacy { shadow } => {
                if shadow {
                    self.chats.shadow_legacy(session, ctx, &route).await?;
                }
                Ok(false)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        // An IP literal was parsed once with its config; a name goes to the resolver's cache.
        let addr = match ctx.active.legacy_literal {
            Some(addr) => addr,
            None => self
                .shared()
                .resolver
                .resolve(&ctx.active.config.legacy.address)
                .await
                .map_err(|e| {
                    Error::explain(
                        ErrorType::ConnectNoRoute,
                        format!("resolving legacy address: {e}"),
                    )
                })?,
        };
        if let Some(chat) = ctx.chat.as_mut() {
            if chat.in_flight.is_none() {
                let gauge = self
                    .shared()
                    .metrics
                    .streams_in_flight
                    .with_label_values(&[Mode::DirectLlm.as_str()]);
                chat.in_flight = Some(InFlight::new(gauge));
            }
        }
        Ok(Box::new(peer::legacy_peer(addr, &ctx.active.legacy)))
    }

    /// What legacy is sent: the client's request as it came, with two exceptions. The
    /// `X-Forwarded-For`, `-Proto` and `-Host` headers are the proxy's (`core::forwarded`: the
    /// caller's address appended to a trusted hop's chain, or alone), already in the head the
    /// front door handed Pingora (`core::passthrough::with_forwarded`). And when
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
        session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(name) = ctx.active.verifier.trusted_org_header() {
            upstream_request.remove_header(name);
        }
        if ctx.chat.is_some() && ctx.active.config.legacy.chat_identity_encoding {
            // Express `compression()` keeps a compressed SSE answer in its compressor until the
            // end (the legacy API never flushes it): uncompressed, each event leaves as written.
            upstream_request.insert_header(http::header::ACCEPT_ENCODING, "identity")?;
        }
        // The peer's read timeout (legacy's idle one) also bounds the wait for the head.
        let t = &ctx.active.legacy;
        front_door::await_legacy_head(session, t.response.min(t.idle));
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        _upstream_response: &mut ResponseHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        front_door::legacy_head_arrived(session);
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
        let limit = ctx.active.config.limits.max_chat_body_bytes;
        chat.body_to_legacy += b.len();
        if chat.body_to_legacy > limit {
            chat.served = Served::Refused;
            self.shared()
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
    /// legacy that sent no head within `legacy.response_timeout_ms` is a 504, a chat request's
    /// answer still says how it was routed, as every chat response does, and a chat body cut
    /// off for its size gets the same JSON 413 as one refused up front. After legacy's head the
    /// client already has its status: the connection is closed (so a stream ends, and a body
    /// short of its length is seen as cut).
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> pingora::proxy::FailToProxy {
        let silent = self.legacy_silence(session, e);
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            _ if silent == Some(Stage::Response) => 504,
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
        // A browser reads the status of an error only when it carries the CORS headers.
        let cors = ctx.active.cors_for(&session.req_header().headers);
        let written = if code == 0 {
            Ok(())
        } else if let (Some(decision), 413, None) = (decision, code, session.response_written()) {
            let limit = ctx.active.config.limits.max_chat_body_bytes;
            let msg = format!("chat request body exceeds {limit} bytes");
            respond_json(session, 413, decision, &cors, "PAYLOAD_TOO_LARGE", &msg).await
        } else {
            let mut resp = pingora::protocols::http::ServerSession::generate_error(code);
            if let Some(d) = decision {
                let _ = resp.insert_header("x-execution-mode", d.mode.as_str());
                let _ = resp.insert_header("x-execution-reason", d.reason.as_str());
            }
            let _ = apply_cors(&mut resp, &cors);
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
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(chat) = ctx.chat.as_mut() {
            resp.insert_header("x-execution-mode", chat.decision.mode.as_str())?;
            resp.insert_header("x-execution-reason", chat.decision.reason.as_str())?;
            if let Some(half) = chat.shadow.as_mut() {
                // The comparison reads legacy's answer as the browser does: decoded.
                let coding = resp.headers.get(http::header::CONTENT_ENCODING);
                match Coding::of(coding.map(|v| v.as_bytes())) {
                    Some(coding) => half.observer = DecodingObserver::new(coding),
                    None => half.unreadable = true,
                }
            }
            self.check_cors_drift(session.req_header(), resp, &ctx.active);
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
                // Only looks: the bytes go on as they came, now.
                if let Some(half) = chat.shadow.as_mut() {
                    half.observer.feed(b, half.pair.origin().elapsed());
                }
            }
        }
        Ok(None)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = Downstream::status_written(session);
        let path = session.req_header().uri.path();
        self.chats.record(status, path, Finish::of(e), ctx);
        if let Some(chat) = ctx.chat.as_mut() {
            chat.in_flight = None;
        }
    }
}
