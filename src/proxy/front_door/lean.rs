//! The lean passthrough (`server.lean_passthrough`): a non-chat request forwarded to legacy by the
//! front door itself, on the raw connection, over a per-worker keep-alive pool.
//!
//! Pingora's `HttpProxy` costs about 2.2 times nginx's CPU per passthrough request; the floor of
//! its lower layer (`examples/lean_forwarder.rs`) about 0.65 times. The heads follow
//! `core::passthrough`; whatever it does not take (chat and file routes, upgrades, `Expect`,
//! CONNECT, absolute-form targets) still goes through Pingora.

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::{chunk, FrontStream};
use crate::app::state::{Active, Shared};
use crate::core::chunked::ChunkedValidator;
use crate::core::h1::{self, BodyDecoder};
use crate::core::passthrough::{
    client_head, parse_response, Request, RespBody, RespHead, MAX_RESPONSE_HEAD,
};
use crate::core::request_head::{Framing, Head};

const READ_CHUNK: usize = 16 * 1024;
/// Idle upstream connections kept per worker.
const MAX_IDLE: usize = 256;
/// Pingora's downstream read timeout, for each read of a request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// What Pingora's `generate_error` puts on the wire once it has closed keep-alive (its `Date` is
/// the current one, as here), for the 502 of a legacy that failed and the 400 of a body that
/// stalled.
const BAD_GATEWAY_HEAD: &str = "HTTP/1.1 502 Bad Gateway\r\nServer: Pingora\r\n";
const BAD_REQUEST_HEAD: &str = "HTTP/1.1 400 Bad Request\r\nServer: Pingora\r\n";
const ERROR_FIELDS: &str = "Content-Length: 0\r\nCache-Control: private, no-store\r\n";
const ERROR_END: &str = "Connection: close\r\n\r\n";

struct Idle {
    addr: SocketAddr,
    stream: TcpStream,
    since: Instant,
}

/// Idle connections to legacy of one front door, i.e. one worker: a worker is a single-threaded
/// runtime, so the lock is never contended there (tests run one front door on many threads).
/// Plain TCP streams: Pingora's pooled streams pay `getpeername` per reuse.
#[derive(Default)]
pub(super) struct Pool(Mutex<Vec<Idle>>);

impl Pool {
    /// An idle connection to `addr`, newest first. A request with a body cannot be repeated
    /// once it is sent, so for one the connection is first checked for a close legacy already
    /// sent.
    fn take(&self, addr: SocketAddr, idle_timeout: Duration, check: bool) -> Option<TcpStream> {
        let mut pool = self.0.lock().unwrap();
        let now = Instant::now();
        pool.retain(|i| now.duration_since(i.since) < idle_timeout);
        while let Some(at) = pool.iter().rposition(|i| i.addr == addr) {
            let idle = pool.remove(at);
            if !check {
                return Some(idle.stream);
            }
            let mut probe = [0u8; 1];
            if matches!(idle.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            {
                return Some(idle.stream);
            }
        }
        None
    }

    fn put(&self, addr: SocketAddr, stream: TcpStream) {
        let mut pool = self.0.lock().unwrap();
        if pool.len() >= MAX_IDLE {
            pool.remove(0);
        }
        pool.push(Idle {
            addr,
            stream,
            since: Instant::now(),
        });
    }
}

async fn connect(addr: SocketAddr, within: Duration) -> io::Result<TcpStream> {
    let s = timeout(within, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// How an exchange with legacy failed.
enum Fail {
    /// Before any byte of an answer: the request may go again on a fresh connection.
    Unanswered,
    /// Nothing reached the client yet: it gets a 502.
    BadGateway,
    /// The client's body stalled: it gets a 400, as from Pingora.
    BodyTimeout,
    /// The client connection ends now (the client is gone, its body broke, or the answer was
    /// cut after it began).
    Close,
}

/// Serve one request on the lean path; `true` keeps the client connection for the next one.
pub(super) async fn serve(
    shared: &Shared,
    pool: &Pool,
    active: &Active,
    io: &mut FrontStream,
    head: &Head,
    req: Request,
    shutdown: &ShutdownWatch,
) -> bool {
    let _in_flight = shared.requests.enter();
    io.buf.advance(head.skip + head.len);
    // The proxy's own error answers carry CORS, so a browser can read their status.
    let cors = cors_lines(active, &req.upstream_head);
    let Ok(addr) = shared.resolver.resolve(&active.config.legacy.address).await else {
        bad_gateway(io, &cors).await;
        return false;
    };
    let legacy = &active.legacy;
    let has_body = !matches!(req.framing, Framing::None | Framing::Length(0));
    let write_timeout = Duration::from_millis(active.config.server.write_timeout_ms);
    let mut fresh = false;
    loop {
        let (mut up, reused) = match pool.take(addr, legacy.pool_idle_timeout, has_body) {
            Some(up) if !fresh => (up, true),
            _ => match connect(addr, legacy.connect_timeout).await {
                Ok(up) => (up, false),
                Err(e) => {
                    tracing::debug!(error = %e, "lean passthrough: connecting to legacy");
                    bad_gateway(io, &cors).await;
                    return false;
                }
            },
        };
        match exchange(io, &mut up, &req, write_timeout, shutdown).await {
            Ok((keep, reusable)) => {
                if reusable {
                    pool.put(addr, up);
                }
                return keep && !*shutdown.borrow();
            }
            Err(Fail::Unanswered) if reused && !has_body => fresh = true,
            Err(Fail::Unanswered | Fail::BadGateway) => {
                bad_gateway(io, &cors).await;
                return false;
            }
            Err(Fail::BodyTimeout) => {
                error(io, BAD_REQUEST_HEAD, &cors).await;
                return false;
            }
            Err(Fail::Close) => return false,
        }
    }
}

/// The CORS header lines of an error answer to the request whose head is `upstream_head`.
fn cors_lines(active: &Active, upstream_head: &[u8]) -> Vec<u8> {
    let (_, mut lines) = crate::core::passthrough::header_lines(upstream_head);
    let origin = lines
        .find(|(name, _)| name.trim_ascii().eq_ignore_ascii_case(b"origin"))
        .and_then(|(name, line)| line.get(name.len() + 1..))
        .map(<[u8]>::trim_ascii);
    active.cors.headers(origin).lines()
}

async fn bad_gateway(io: &mut FrontStream, cors: &[u8]) {
    error(io, BAD_GATEWAY_HEAD, cors).await
}

async fn error(io: &mut FrontStream, head: &str, cors: &[u8]) {
    let date = pingora::protocols::http::date::get_cached_date();
    let mut answer = Vec::with_capacity(160 + cors.len());
    answer.extend_from_slice(head.as_bytes());
    answer.extend_from_slice(b"Date: ");
    answer.extend_from_slice(date.as_bytes());
    answer.extend_from_slice(b"\r\n");
    answer.extend_from_slice(ERROR_FIELDS.as_bytes());
    // Where Pingora's own error answer has the headers added to it: before its Connection.
    answer.extend_from_slice(cors);
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

/// The request on `up`, then its answer to the client: whether the client and `up` may be kept.
async fn exchange(
    io: &mut FrontStream,
    up: &mut TcpStream,
    req: &Request,
    write_timeout: Duration,
    shutdown: &ShutdownWatch,
) -> Result<(bool, bool), Fail> {
    // Legacy may answer before the whole body (a 401 or 413 up front): the answer goes to the
    // client, and neither connection can carry another request after it.
    let whole = send_request(io, up, req).await?;
    let mut resp = BytesMut::with_capacity(READ_CHUNK);
    let mut out = Vec::new();
    loop {
        if resp.capacity() - resp.len() < 1024 {
            resp.reserve(READ_CHUNK);
        }
        match up.read_buf(&mut resp).await {
            Ok(0) | Err(_) if resp.is_empty() => return Err(Fail::Unanswered),
            Ok(0) | Err(_) => return Err(Fail::BadGateway),
            Ok(_) => {}
        }
        while let Some(head) = parse_response(&resp, req.head_only).map_err(|_| Fail::BadGateway)? {
            if !(100..200).contains(&head.code) {
                out.clear();
                let rechunk = head.body == RespBody::Close && req.http11;
                let keep = req.keep_alive
                    && whole
                    && (head.body != RespBody::Close || rechunk)
                    && !*shutdown.borrow();
                client_head(&resp[..head.len], keep, rechunk, &mut out);
                resp.advance(head.len);
                let (keep, reusable) =
                    send_response(io, up, head, (keep, rechunk), resp, out, write_timeout).await?;
                return Ok((keep, reusable && whole));
            }
            if head.code == 101 {
                // Nothing asked for an upgrade.
                return Err(Fail::BadGateway);
            }
            // Informational answers go on as they come; the final one follows.
            write_client(io, &resp[..head.len], write_timeout).await?;
            resp.advance(head.len);
        }
        if resp.len() > MAX_RESPONSE_HEAD {
            return Err(Fail::BadGateway);
        }
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
        Framing::None | Framing::Length(0) => up
            .write_all(&req.upstream_head)
            .await
            .map(|()| true)
            .map_err(|_| Fail::Unanswered),
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

/// `data` as one chunk.
/// The final head (in `out`) and the body after it; `resp` holds what has been read of it.
/// `keep`: the client connection stays; `rechunk`: a close-delimited body goes on chunked.
async fn send_response(
    io: &mut FrontStream,
    up: &mut TcpStream,
    head: RespHead,
    (keep, rechunk): (bool, bool),
    mut resp: BytesMut,
    mut out: Vec<u8>,
    write_timeout: Duration,
) -> Result<(bool, bool), Fail> {
    let mut reusable = head.reusable;
    match head.body {
        RespBody::None => {
            reusable &= resp.is_empty();
            write_client(io, &out, write_timeout).await?;
        }
        RespBody::Length(len) => {
            let mut left = len;
            loop {
                let n = (resp.len() as u64).min(left) as usize;
                forward(io, &mut out, &resp[..n], write_timeout).await?;
                resp.advance(n);
                left -= n as u64;
                if left == 0 {
                    break;
                }
                if read_up(up, &mut resp).await? == 0 {
                    return Err(Fail::Close);
                }
            }
            // Bytes past the body: legacy and the proxy disagree on the framing.
            reusable &= resp.is_empty();
        }
        RespBody::Chunked => {
            // Re-framed as Pingora does: what one read brought, as one chunk.
            let mut decoder = BodyDecoder::new(h1::Framing::Chunked);
            let mut data = Vec::new();
            loop {
                data.clear();
                let used = decoder
                    .decode(&resp, |d| data.extend_from_slice(d))
                    .map_err(|_| Fail::Close)?;
                resp.advance(used);
                chunk(&mut out, &data);
                if decoder.is_done() {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                if !out.is_empty() {
                    write_client(io, &out, write_timeout).await?;
                    out.clear();
                }
                if decoder.is_done() {
                    break;
                }
                if read_up(up, &mut resp).await? == 0 {
                    return Err(Fail::Close);
                }
            }
            reusable &= resp.is_empty();
        }
        RespBody::Close if rechunk => loop {
            chunk(&mut out, &resp);
            resp.clear();
            if !out.is_empty() {
                write_client(io, &out, write_timeout).await?;
                out.clear();
            }
            if read_up(up, &mut resp).await? == 0 {
                write_client(io, b"0\r\n\r\n", write_timeout).await?;
                return Ok((keep, false));
            }
        },
        RespBody::Close => {
            loop {
                forward(io, &mut out, &resp, write_timeout).await?;
                resp.clear();
                if read_up(up, &mut resp).await? == 0 {
                    break;
                }
            }
            return Ok((false, false));
        }
    }
    Ok((keep, reusable))
}

/// Body bytes to the client, after the head still in `out` if it is: one write either way.
async fn forward(
    io: &mut FrontStream,
    out: &mut Vec<u8>,
    body: &[u8],
    within: Duration,
) -> Result<(), Fail> {
    if out.is_empty() {
        return write_client(io, body, within).await;
    }
    out.extend_from_slice(body);
    write_client(io, out, within).await?;
    out.clear();
    Ok(())
}

async fn read_up(up: &mut TcpStream, resp: &mut BytesMut) -> Result<usize, Fail> {
    if resp.capacity() - resp.len() < 1024 {
        resp.reserve(READ_CHUNK);
    }
    up.read_buf(resp).await.map_err(|_| Fail::Close)
}
