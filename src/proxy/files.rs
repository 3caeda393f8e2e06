//! One concern of the `ChatService` (`proxy::service`), on Pingora's path only
//! (`ChatService::serve_file`, from `request_filter`): the proxy's own route for runtime files,
//! `GET /api/v1/runtime/files/{file_id}?exp&src&sig`. A signed link is checked against the
//! caller's verified org (its bearer token, or without one the `identity.token_cookie` a
//! browser's plain link carries), then the runtime's file is streamed through. Every refusal is
//! the same bare 404, so a link says nothing about why it failed.

use std::time::SystemTime;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};

use super::service::ChatService;
use crate::core::files;
use crate::runtime::files::{fetch, RuntimeFile};
use crate::runtime::respond::apply_cors;
use crate::state::Active;

/// Why a file request was not served; for the log, never for the client.
type Refused = &'static str;

impl ChatService {
    /// Answer a request on the files route; always answered here, never passed to legacy.
    pub(super) async fn serve_file(&self, session: &mut Session, active: &Active) -> Result<bool> {
        let file = match self.open_file(session, active).await {
            Ok(file) => file,
            Err(why) => {
                self.shared
                    .metrics
                    .file_requests_total
                    .with_label_values(&["refused"])
                    .inc();
                tracing::info!(
                    path = session.req_header().uri.path(),
                    why,
                    "runtime file refused"
                );
                not_found(session, active).await?;
                return Ok(true);
            }
        };
        match self.stream_file(session, active, file).await {
            Ok(()) => {
                self.shared
                    .metrics
                    .file_requests_total
                    .with_label_values(&["served"])
                    .inc();
                Ok(true)
            }
            Err(e) => {
                self.shared
                    .metrics
                    .file_requests_total
                    .with_label_values(&["failed"])
                    .inc();
                tracing::warn!(error = %e, "runtime file download broke off");
                // The head is out: only closing the connection short of the body's end tells
                // the client the file is incomplete.
                session.set_keepalive(None);
                Err(e)
            }
        }
    }

    /// Check the link and the caller, then ask the runtime; anything short of a 2xx is refused.
    async fn open_file(&self, session: &Session, active: &Active) -> Result<RuntimeFile, Refused> {
        let req = session.req_header();
        if req.method != http::Method::GET {
            return Err("not a GET");
        }
        let segment = req
            .uri
            .path()
            .strip_prefix(files::ROUTE_PREFIX)
            .filter(|s| !s.is_empty() && !s.contains('/'))
            .ok_or("no single file id segment")?;
        let file_id = files::percent_decode(segment).ok_or("undecodable file id")?;
        let key = active.file_key.as_ref().ok_or("no link key configured")?;
        // A plain `<a href>` brings no `Authorization`: the token cookie then speaks for it.
        let caller = active
            .verifier
            .verify_link(&req.headers)
            .map_err(|u| u.as_str())?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let query = req.uri.query().unwrap_or_default();
        let src =
            files::verify(key, &caller.org_id, &file_id, query, now).map_err(|r| match r {
                files::Refusal::Malformed => "malformed link",
                files::Refusal::BadSignature => "signature does not match",
                files::Refusal::Expired => "link expired",
            })?;
        let target = files::runtime_target(&src).ok_or("link has no runtime path")?;
        let deadline = std::time::Instant::now() + active.config.runtime.execution_timeout();
        let file = fetch(&self.shared, active, &target, req, deadline)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "runtime file request failed");
                "runtime unreachable"
            })?;
        if !(200..300).contains(&file.status) {
            tracing::info!(status = file.status, "runtime refused a file");
            return Err("runtime answered non-2xx");
        }
        Ok(file)
    }

    /// Pass the runtime's answer on: its type, length and disposition, then its body piece by
    /// piece as it arrives.
    async fn stream_file(
        &self,
        session: &mut Session,
        active: &Active,
        mut file: RuntimeFile,
    ) -> Result<()> {
        let mut resp = ResponseHeader::build(200, Some(6))?;
        let content_type = file.content_type.take();
        resp.insert_header(
            "content-type",
            content_type
                .as_deref()
                .unwrap_or(b"application/octet-stream"),
        )?;
        if let Some(disposition) = file.content_disposition.take() {
            resp.insert_header("content-disposition", disposition)?;
        }
        match file.content_length {
            Some(n) => resp.insert_header("content-length", n.to_string())?,
            None if session.req_header().version == http::Version::HTTP_11 => {
                resp.insert_header("transfer-encoding", "chunked")?
            }
            None => {}
        }
        // Signed for one org: no shared cache may keep it for another.
        resp.insert_header("cache-control", "private, no-store")?;
        resp.insert_header("x-content-type-options", "nosniff")?;
        apply_cors(&mut resp, &active.cors_for(&session.req_header().headers))?;
        session.write_response_header(Box::new(resp), false).await?;

        loop {
            let piece = file.next().await.map_err(|e| {
                Error::explain(ErrorType::ReadError, format!("runtime file body: {e}"))
            })?;
            match piece {
                Some(bytes) => session.write_response_body(Some(bytes), false).await?,
                None => break,
            }
        }
        session.write_response_body(None, true).await?;
        file.release();
        Ok(())
    }
}

/// The one answer every refused file request gets.
async fn not_found(session: &mut Session, active: &Active) -> Result<()> {
    let headers = &session.req_header().headers;
    if headers.contains_key(http::header::CONTENT_LENGTH)
        || headers.contains_key(http::header::TRANSFER_ENCODING)
    {
        // Its unread body would be taken for the next request on the connection.
        session.set_keepalive(None);
    }
    let body = Bytes::from_static(b"Not Found");
    let mut resp = ResponseHeader::build(404, Some(3))?;
    resp.insert_header("content-type", "text/plain")?;
    resp.insert_header("content-length", body.len().to_string())?;
    apply_cors(&mut resp, &active.cors_for(&session.req_header().headers))?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}
