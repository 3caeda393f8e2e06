//! The lean passthrough (`server.lean_passthrough`): a non-chat request forwarded to legacy by the
//! front door itself, on the raw connection, through legacy's client (`upstream::Upstream`: its
//! per-worker keep-alive pool, its retry rule and legacy's deadlines).
//!
//! Pingora's `HttpProxy` costs about 2.2 times nginx's CPU per passthrough request; the floor of
//! its lower layer (`examples/lean_forwarder.rs`) about 0.65 times. The heads follow
//! `core::passthrough`; whatever it does not take (chat and file routes, upgrades, `Expect`,
//! CONNECT, absolute-form targets) still goes through Pingora.

use std::future::Future;
use std::time::Duration;

use bytes::Buf;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::{chunk, FrontStream};
use crate::core::chunked::ChunkedValidator;
use crate::core::h1::{self, BodyDecoder};
use crate::core::passthrough::{client_head, Request};
use crate::core::request_head::{Framing, Head};
use crate::state::{Active, Shared};
use crate::upstream::{self, Body, Call, Failure, Stage, Watched};

const READ_CHUNK: usize = 16 * 1024;
/// Pingora's downstream read timeout, for each read of a request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// What Pingora's `generate_error` puts on the wire once it has closed keep-alive (its `Date` is
/// the current one, as here): the 502 of a legacy that failed, the 504 of one that sent no head
/// in time, the 400 of a body that stalled.
const BAD_GATEWAY_HEAD: &str = "HTTP/1.1 502 Bad Gateway\r\nServer: Pingora\r\n";
const GATEWAY_TIMEOUT_HEAD: &str = "HTTP/1.1 504 Gateway Timeout\r\nServer: Pingora\r\n";
const BAD_REQUEST_HEAD: &str = "HTTP/1.1 400 Bad Request\r\nServer: Pingora\r\n";
const ERROR_FIELDS: &str = "Content-Length: 0\r\nCache-Control: private, no-store\r\n";
const ERROR_END: &str = "Connection: close\r\n\r\n";

/// How the client's side of an exchange failed.
enum Fail {
    /// The client's body stalled: it gets a 400, as from Pingora.
    BodyTimeout,
    /// The client connection ends now (the client is gone, its body broke, or the answer was
    /// cut after it began).
    Close,
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Fail::BodyTimeout => "the client's body stalled",
            Fail::Close => "the client connection failed",
        })
    }
}

/// The client's request as legacy gets it: the head, then the body as it arrives.
struct Upload<'a> {
    io: &'a mut FrontStream,
    req: &'a Request,
}

impl upstream::Request<TcpStream> for Upload<'_> {
    /// The whole request went: legacy did not answer before all of its body was sent.
    type Sent = bool;
    type Error = Fail;
    fn write<'a>(
        &'a mut self,
        conn: &'a mut Watched<TcpStream>,
    ) -> impl Future<Output = Result<bool, Fail>> + Send + 'a {
        send_request(self.io, conn.get_mut(), self.req)
    }
}

/// Serve one request on the lean path; `true` keeps the client connection for the next one.
pub(super) async fn serve(
    shared: &Shared,
    active: &Active,
    io: &mut FrontStream,
    head: &Head,
    req: Request,
    shutdown: &ShutdownWatch,
) -> bool {
    let _in_flight = shared.requests.enter();
    io.buf.advance(head.skip + head.len);
    // The proxy's own error answers carry CORS, so a browser can read their status; their
    // lines are made only when one is sent.
    let cors = Cors {
        active,
        upstream_head: &req.upstream_head,
    };
    let has_body = !matches!(req.framing, Framing::None | Framing::Length(0));
    let write_timeout = Duration::from_millis(active.config.server.write_timeout_ms);
    let call = Call {
        // A request with a body cannot be sent again once its body was read from the client:
        // its connection is checked first instead.
        repeatable: !has_body,
        check_pooled: has_body,
        head_only: req.head_only,
        literal: active.legacy_literal,
        ..Call::new(&active.config.legacy.address, active.legacy)
    };
    // Legacy may answer before the whole body (a 401 or 413 up front): the answer goes to the
    // client, and neither connection can carry another request after it.
    let upload = Upload { io, req: &req };
    let (whole, mut response) = match shared.legacy.send_with(&call, upload).await {
        Ok(sent) => sent,
        Err(failure) => {
            failed(io, failure, cors).await;
            return false;
        }
    };
    // Informational answers go on as they come; the final one follows.
    while (100..200).contains(&response.status()) {
        if response.status() == 101 {
            // Nothing asked for an upgrade.
            bad_gateway(io, cors).await;
            return false;
        }
        if write_client(io, response.raw_head(), write_timeout)
            .await
            .is_err()
        {
            return false;
        }
        if let Err(failure) = response.next_head(req.head_only).await {
            failed(io, failure.widen(), cors).await;
            return false;
        }
    }
    let framing = response.head.framing;
    let rechunk = framing == h1::Framing::Close && req.http11;
    let keep = req.keep_alive
        && whole
        && (framing != h1::Framing::Close || rechunk)
        && !*shutdown.borrow();
    // Room for the head and what came with it, re-framed: a small answer leaves in one write
    // from one allocation.
    let mut out =
        Vec::with_capacity(response.raw_head().len() + 64 + response.body_mut().buffered() + 32);
    client_head(response.raw_head(), keep, rechunk, &mut out);
    let body = response.into_body();
    match send_response(io, body, framing, (keep, rechunk), out, write_timeout).await {
        Ok((keep, body)) => {
            if whole {
                body.release();
            }
            keep && !*shutdown.borrow()
        }
        Err(_) => false,
    }
}

/// The client's answer when legacy gave no usable head: 504 when it was silent, 502 when it
/// failed, 400 when the client's own body stalled, nothing when the client is gone.
async fn failed(io: &mut FrontStream, failure: Failure<Fail>, cors: Cors<'_>) {
    match failure {
        Failure::Caller(Fail::BodyTimeout) => error(io, BAD_REQUEST_HEAD, cors).await,
        Failure::Caller(Fail::Close) => {}
        Failure::Silent(s) if s.stage == Stage::Response => {
            tracing::warn!(detail = %s, "lean passthrough: legacy fell silent");
            error(io, GATEWAY_TIMEOUT_HEAD, cors).await
        }
        e => {
            tracing::debug!(error = %e, "lean passthrough: legacy failed");
            bad_gateway(io, cors).await
        }
    }
}

/// What the CORS header lines of an error answer are made from: the config and the request's
/// head as legacy gets it.
#[derive(Clone, Copy)]
struct Cors<'a> {
    active: &'a Active,
    upstream_head: &'a [u8],
}

impl Cors<'_> {
    fn lines(self) -> Vec<u8> {
        let (_, mut lines) = crate::core::passthrough::header_lines(self.upstream_head);
        let origin = lines
            .find(|(name, _)| name.trim_ascii().eq_ignore_ascii_case(b"origin"))
            .and_then(|(name, line)| line.get(name.len() + 1..))
            .map(<[u8]>::trim_ascii);
        self.active.cors.headers(origin).lines()
    }
}

async fn bad_gateway(io: &mut FrontStream, cors: Cors<'_>) {
    error(io, BAD_GATEWAY_HEAD, cors).await
}

async fn error(io: &mut FrontStream, head: &str, cors: Cors<'_>) {
    let cors = cors.lines();
    let date = pingora::protocols::http::date::get_cached_date();
    let mut answer = Vec::with_capacity(160 + cors.len());
    answer.extend_from_slice(head.as_bytes());
    answer.extend_from_slice(b"Date: ");
    answer.extend_from_slice(date.as_bytes());
    answer.extend_from_slice(b"\r\n");
    answer.extend_from_slice(ERROR_FIELDS.as_bytes());
    // Where Pingora's own error answer has the headers added to it: before its Connection.
    answer.extend_from_slice(&cors);
    answer.extend_from_slice(ERROR_END.as_bytes());
    let inner = &mut io.inner;
    let _ = timeout(Duration::from_secs(1), async {
        inner.write_all(&answer).await?;
        inner.flush().await
    })
    .await;
}

async fn write_client(io: &mut FrontStream, bytes: &[u8], within: Duration) -> Result<(), Fail> {
    // Pingora's stream buffers writes until flushed: every piece leaves as it comes.
    let inner = &mut io.inner;
    let written = async {
        inner.write_all(bytes).await?;
        inner.flush().await
    };
    match timeout(within, written).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(Fail::Close),
    }
}

/// More of the client's request body into `io.buf`; the client closing mid-body ends it.
async fn read_client(io: &mut FrontStream) -> Result<(), Fail> {
    if io.buf.capacity() - io.buf.len() < 1024 {
        io.buf.reserve(READ_CHUNK);
    }
    match timeout(BODY_READ_TIMEOUT, io.inner.read_buf(&mut io.buf)).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Err(_) => Err(Fail::BodyTimeout),
        Ok(_) => Err(Fail::Close),
    }
}

/// The request to legacy: `Ok(false)` when legacy began to answer (or closed) before all of the
/// body was sent, which then stops.
async fn send_request(
    io: &mut FrontStream,
    up: &mut TcpStream,
    req: &Request,
) -> Result<bool, Fail> {
    match req.framing {
        // A failed write shows as a connection that gave no answer.
        Framing::None | Framing::Length(0) => Ok(up.write_all(&req.upstream_head).await.is_ok()),
        Framing::Length(len) => {
            // The head and what has arrived of the body, in one write.
            let first = (io.buf.len() as u64).min(len) as usize;
            let mut bytes = Vec::with_capacity(req.upstream_head.len() + first);
            bytes.extend_from_slice(&req.upstream_head);
            bytes.extend_from_slice(&io.buf[..first]);
            io.buf.advance(first);
            if !write_upstream(up, &bytes).await {
                return Ok(false);
            }
            let mut left = len - first as u64;
            while left > 0 {
                if io.buf.is_empty() && !read_client_unless_answered(io, up).await? {
                    return Ok(false);
                }
                let n = (io.buf.len() as u64).min(left) as usize;
                if !write_upstream(up, &io.buf[..n]).await {
                    return Ok(false);
                }
                io.buf.advance(n);
                left -= n as u64;
            }
            Ok(true)
        }
        Framing::Chunked => {
            if !write_upstream(up, &req.upstream_head).await {
                return Ok(false);
            }
            // Checked strictly as it arrives, then re-framed chunk by chunk, as Pingora does
            // (extensions and trailers dropped).
            let mut validator = ChunkedValidator::new();
            let mut decoder = BodyDecoder::new(h1::Framing::Chunked);
            let (mut checked, mut out) = (Vec::new(), Vec::new());
            while !decoder.is_done() {
                if validator.is_done() {
                    return Err(Fail::Close);
                }
                if io.buf.is_empty() && !read_client_unless_answered(io, up).await? {
                    return Ok(false);
                }
                let used = match validator.feed(&io.buf) {
                    Ok(used) => used,
                    Err(e) => {
                        io.rejections.with_label_values(&[e.as_str()]).inc();
                        tracing::debug!(error = %e, "chunked request body refused");
                        return Err(Fail::Close);
                    }
                };
                checked.extend_from_slice(&io.buf[..used]);
                io.buf.advance(used);
                let decoded = decoder
                    .decode(&checked, |data| chunk(&mut out, data))
                    .map_err(|_| Fail::Close)?;
                checked.drain(..decoded);
                if decoder.is_done() {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                if !out.is_empty() {
                    if !write_upstream(up, &out).await {
                        return Ok(false);
                    }
                    out.clear();
                }
            }
            Ok(true)
        }
    }
}

/// Write `bytes` to legacy: `false` if it began to answer or closed first, or the write failed
/// (what it answered, if anything, is read next).
async fn write_upstream(up: &mut TcpStream, bytes: &[u8]) -> bool {
    let (mut from, mut to) = up.split();
    let mut byte = [0u8; 1];
    tokio::select! {
        biased;
        written = to.write_all(bytes) => written.is_ok(),
        _ = from.peek(&mut byte) => false,
    }
}

/// More of the client's body, unless legacy begins to answer (or closes) first: `Ok(false)`.
async fn read_client_unless_answered(io: &mut FrontStream, up: &TcpStream) -> Result<bool, Fail> {
    let mut byte = [0u8; 1];
    tokio::select! {
        biased;
        read = read_client(io) => read.map(|()| true),
        _ = up.peek(&mut byte) => Ok(false),
    }
}

/// The final head (in `out`) and the body after it, as legacy sends it: as received for a
/// length or close-delimited body, re-framed as Pingora does for a chunked one (what one read
/// brought, as one chunk) or for a close-delimited one sent on chunked (`rechunk`). `keep`: the
/// client connection stays. Each wait for legacy is bounded by its idle timeout; one that
/// passes, or a body cut short, ends the client connection.
async fn send_response(
    io: &mut FrontStream,
    mut body: Body<TcpStream>,
    framing: h1::Framing,
    (keep, rechunk): (bool, bool),
    mut out: Vec<u8>,
    write_timeout: Duration,
) -> Result<(bool, Body<TcpStream>), Fail> {
    let chunked = framing == h1::Framing::Chunked || rechunk;
    let mut data = Vec::new();
    loop {
        let done = if chunked {
            data.clear();
            let done = body
                .decode(|d| data.extend_from_slice(d))
                .map_err(|_| Fail::Close)?;
            chunk(&mut out, &data);
            if done {
                out.extend_from_slice(b"0\r\n\r\n");
            }
            done
        } else {
            body.decode(|d| out.extend_from_slice(d))
                .map_err(|_| Fail::Close)?
        };
        if !out.is_empty() {
            write_client(io, &out, write_timeout).await?;
            out.clear();
        }
        if done {
            return Ok((keep, body));
        }
        match body.fill().await {
            Ok(0) if framing == h1::Framing::Close => {
                // The end of a close-delimited body: the connection goes with it.
                let _ = body.eof();
                if rechunk {
                    write_client(io, b"0\r\n\r\n", write_timeout).await?;
                    return Ok((keep, body));
                }
                return Ok((false, body));
            }
            Ok(0) => return Err(Fail::Close),
            Ok(_) => {}
            Err(e) => {
                if let Some(s) = upstream::Silence::of(&e) {
                    tracing::warn!(detail = %s, "lean passthrough: legacy fell silent mid-answer");
                }
                return Err(Fail::Close);
            }
        }
    }
}
