//! Responses the proxy writes itself, with no upstream: JSON refusals of chat requests and the
//! one-event SSE stream that stands in for a runtime that never answered.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::Result;

use super::ctx::{ChatCtx, Served};
use super::CutoverProxy;
use super::Downstream;
use crate::core::cors::{CorsHeaders, VARY};
use crate::core::routing::RolloutDecision;
use crate::runtime::relay;

/// Why the proxy answers a chat request itself.
pub(super) enum Rejection {
    TooLarge,
    BadBody,
    /// The body did not arrive within `limits.body_timeout_ms`.
    BodyTimeout,
    /// An id that may not go into a URL (`core::ids::is_safe_id`).
    UnsafeId,
}

impl Rejection {
    /// HTTP status, `rejected_total` cause and error code.
    fn parts(&self) -> (u16, &'static str, &'static str) {
        match self {
            Rejection::TooLarge => (413, "too_large", "PAYLOAD_TOO_LARGE"),
            Rejection::BadBody => (400, "bad_body", "INVALID_REQUEST"),
            Rejection::BodyTimeout => (408, "body_timeout", "REQUEST_TIMEOUT"),
            Rejection::UnsafeId => (400, "unsafe_id", "INVALID_REQUEST"),
        }
    }
}

impl CutoverProxy {
    /// Answer a chat request the proxy refuses itself (no upstream contacted): the probe slot is
    /// freed, the refusal counted, and the JSON error carries the routing headers.
    pub(super) async fn refuse<D: Downstream>(
        &self,
        session: &mut D,
        chat: &mut ChatCtx,
        rejection: Rejection,
        message: &str,
    ) -> Result<bool> {
        let (status, cause, code) = rejection.parts();
        // The runtime will not be tried: another probe may go now, not once this answer is out.
        chat.probe = Default::default();
        self.shared
            .metrics
            .rejected_total
            .with_label_values(&[cause])
            .inc();
        chat.served = Served::Refused;
        respond_json(session, status, chat.decision, &chat.cors, code, message).await?;
        Ok(true)
    }
}

/// Put the CORS headers of a response the proxy makes itself on its head.
pub(crate) fn apply_cors(resp: &mut ResponseHeader, cors: &CorsHeaders) -> Result<()> {
    for (name, value) in cors.iter() {
        if name == VARY {
            resp.append_header(name, value)?;
        } else {
            resp.insert_header(name, value)?;
        }
    }
    Ok(())
}

pub(super) async fn respond_json<D: Downstream>(
    session: &mut D,
    status: u16,
    decision: RolloutDecision,
    cors: &CorsHeaders,
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
    apply_cors(&mut resp, cors)?;
    // The rest of an unread body would be taken for the next request.
    resp.insert_header("connection", "close")?;
    session.close_after();
    session.write_response_header(Box::new(resp)).await?;
    session.write_response_body(Some(body), true).await
}

/// Answer with an SSE stream holding one error event (the runtime never produced a response).
/// Returns the bytes written.
pub(super) async fn respond_sse_error<D: Downstream>(
    session: &mut D,
    decision: RolloutDecision,
    cors: &CorsHeaders,
    code: &str,
    message: &str,
) -> Result<u64> {
    let resp = relay::sse_response_header(decision, session.version(), cors)?;
    session.write_response_header(Box::new(resp)).await?;
    let mut out = Vec::new();
    crate::core::agent2ui::error_event(&mut out, code, message);
    let len = out.len() as u64;
    session
        .write_response_body(Some(Bytes::from(out)), true)
        .await?;
    Ok(len)
}
