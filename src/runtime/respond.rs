//! Responses the proxy writes itself, through any `Downstream`: the head of a rewritten runtime
//! stream, JSON refusals, the one-event SSE stream that stands in for a runtime that never
//! answered, and the CORS headers every one of them carries.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::Result;

use crate::core::cors::{CorsHeaders, VARY};
use crate::core::routing::RolloutDecision;
use crate::runtime::downstream::Downstream;

/// The response header of a rewritten runtime stream. HTTP/1.1 clients get chunked framing
/// (flushed per chunk, keep-alive intact); HTTP/1.0 clients a close-delimited body.
pub fn sse_response_header(
    decision: RolloutDecision,
    version: http::Version,
    cors: &CorsHeaders,
) -> pingora::Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(200, Some(7))?;
    if version == http::Version::HTTP_11 {
        resp.insert_header("transfer-encoding", "chunked")?;
    }
    resp.insert_header("content-type", "text/event-stream")?;
    resp.insert_header("cache-control", "no-cache")?;
    resp.insert_header("x-accel-buffering", "no")?;
    resp.insert_header("x-execution-mode", decision.mode.as_str())?;
    resp.insert_header("x-execution-reason", decision.reason.as_str())?;
    apply_cors(&mut resp, cors)?;
    Ok(resp)
}

/// Put the CORS headers of a response the proxy makes itself on its head.
pub fn apply_cors(resp: &mut ResponseHeader, cors: &CorsHeaders) -> Result<()> {
    for (name, value) in cors.iter() {
        if name == VARY {
            resp.append_header(name, value)?;
        } else {
            resp.insert_header(name, value)?;
        }
    }
    Ok(())
}

pub async fn respond_json<D: Downstream>(
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
pub async fn respond_sse_error<D: Downstream>(
    session: &mut D,
    decision: RolloutDecision,
    cors: &CorsHeaders,
    code: &str,
    message: &str,
) -> Result<u64> {
    let resp = sse_response_header(decision, session.version(), cors)?;
    session.write_response_header(Box::new(resp)).await?;
    let mut out = Vec::new();
    crate::core::agent2ui::error_event(&mut out, code, message);
    let len = out.len() as u64;
    session
        .write_response_body(Some(Bytes::from(out)), true)
        .await?;
    Ok(len)
}
