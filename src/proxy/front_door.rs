//! The client-facing HTTP/1 front door: a `ServerApp` on the raw connection that reads every
//! request head itself, bounded and strict, before handing the connection to Pingora's
//! `HttpProxy` for that one request.
//!
//! Pingora 0.9 lets a head grow to 1 MiB under a read timeout restarted by every byte, keeps idle
//! connections as long as they like, and frames bodies leniently (see `core::request_head` and
//! `core::chunked`). Here each connection holds one head buffer of at most
//! `limits.max_header_bytes`, the whole head must arrive within `server.header_timeout_ms`,
//! idle connections go after `server.keepalive_timeout_ms`, and at most
//! `server.max_connections` are open at once.
//!
//! Pingora reads the connection through `FrontStream`, which hands it the validated head and then
//! exactly the body the head frames (a chunked body only as far as `core::chunked` has found it
//! well formed), never a byte of the next request: every head on the connection is read here.
//! The head it hands on already carries the proxy's `X-Forwarded-*` headers for legacy
//! (`core::passthrough::with_forwarded`), so Pingora sizes its header maps for them once.
//!
//! A plain non-chat request skips Pingora altogether (`lean`, `server.lean_passthrough`).
//!
//! While Pingora waits for legacy's response head, it keeps reading the client connection to
//! notice a client that leaves: that read is where legacy's `response_timeout_ms` is kept on
//! Pingora's path (armed by `upstream_request_filter`, [`await_legacy_head`]), since Pingora's
//! peer has one read timeout for head and body and it is legacy's idle one. A legacy silent past
//! the deadline fails the read with a typed `Silence`, which `fail_to_proxy` answers 504.

mod chat;
mod lean;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use http::HeaderName;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use prometheus::IntCounterVec;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{timeout, timeout_at, Instant};

use crate::core::chunked::ChunkedValidator;
use crate::core::config::Config;
use crate::core::forwarded::Hop;
use crate::core::passthrough::with_forwarded;
use crate::core::request_head::{self, refusal_response, Framing, Head, Refusal};
use crate::proxy::ctx::Handover;
use crate::proxy::service::ChatService;
use crate::state::Shared;
use crate::upstream::{Silence, Stage, UpstreamName};

/// How long a refusal may take to write, and how long the client's remaining bytes are read and
/// dropped after it: closing with unread input resets the connection, and the reset can destroy
/// the response before the client reads it.
const REFUSAL_WRITE: Duration = Duration::from_secs(1);
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 2 * 1024 * 1024;
/// The head buffer starts this small, then grows once to `limits.max_header_bytes`.
const INITIAL_BUFFER: usize = 4096;

/// Open client connections, shared by every worker's front door.
#[derive(Debug, Default)]
pub struct ConnectionCount(AtomicUsize);

/// One open connection, counted while it lives.
struct Slot<'a> {
    count: &'a ConnectionCount,
    gauge: &'a prometheus::IntGauge,
}

impl<'a> Slot<'a> {
    fn acquire(
        count: &'a ConnectionCount,
        max: usize,
        gauge: &'a prometheus::IntGauge,
    ) -> Option<Slot<'a>> {
        if count.0.fetch_add(1, Ordering::AcqRel) >= max {
            count.0.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        gauge.inc();
        Some(Slot { count, gauge })
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.count.0.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

/// The config values the front door reads, once per connection.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_header_bytes: usize,
    header_timeout: Duration,
    keepalive_timeout: Duration,
    max_connections: usize,
}

impl Limits {
    fn of(config: &Config) -> Limits {
        Limits {
            max_header_bytes: config.limits.max_header_bytes,
            header_timeout: Duration::from_millis(config.server.header_timeout_ms),
            keepalive_timeout: Duration::from_millis(config.server.keepalive_timeout_ms),
            max_connections: config.server.max_connections,
        }
    }

    /// Pingora only needs keep-alive on to hand the connection back; we time the idle wait.
    fn pingora_keepalive_secs(&self) -> u64 {
        self.keepalive_timeout.as_secs().max(1)
    }
}

/// The front door of one worker.
/// `P`: Pingora's proxy logic (`CutoverProxy`), for the requests handed over to it.
pub struct FrontDoor<P> {
    proxy: Arc<HttpProxy<P>>,
    /// The chat service Pingora's path holds too, for the chats the front door serves itself.
    chats: Arc<ChatService>,
    shared: Arc<Shared>,
    open: Arc<ConnectionCount>,
}

impl<P> FrontDoor<P> {
    pub fn new(
        proxy: HttpProxy<P>,
        chats: Arc<ChatService>,
        open: Arc<ConnectionCount>,
    ) -> FrontDoor<P> {
        FrontDoor {
            proxy: Arc::new(proxy),
            shared: chats.shared.clone(),
            chats,
            open,
        }
    }

    fn reject(&self, reason: &str) {
        self.shared
            .metrics
            .front_door
            .rejections_total
            .with_label_values(&[reason])
            .inc();
    }
}

/// Why no head was read.
enum NoHead {
    /// The client closed, or stayed idle between requests past the keep-alive timeout.
    Closed,
    Refused(Refusal),
    /// The head did not arrive in time; `partial`: some of it had.
    TimedOut {
        partial: bool,
    },
}

#[async_trait]
impl<P> ServerApp for FrontDoor<P>
where
    P: pingora::proxy::ProxyHttp + Send + Sync + 'static,
    P::CTX: Send + Sync,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let accepted = Instant::now();
        let limits = Limits::of(&self.shared.active.load().config);
        let gauge = &self.shared.metrics.front_door.connections;
        let Some(_slot) = Slot::acquire(&self.open, limits.max_connections, gauge) else {
            self.reject("max_connections");
            let mut stream = stream;
            let _ = timeout(REFUSAL_WRITE, stream.write_all(refusal_response(503))).await;
            return None;
        };
        let rejections = self.shared.metrics.front_door.rejections_total.clone();
        let mut io = FrontStream::new(stream, limits.max_header_bytes, rejections);
        let mut persistent: Option<HttpPersistentSettings> = None;
        let mut first = true;
        loop {
            let head = match read_head(&mut io, &limits, first, accepted, shutdown).await {
                Ok(head) => head,
                Err(NoHead::Closed) => return None,
                Err(NoHead::Refused(r)) => {
                    self.reject(r.reason);
                    tracing::debug!(status = r.status, reason = r.reason, "request head refused");
                    io.refuse(r.status).await;
                    return None;
                }
                Err(NoHead::TimedOut { partial }) => {
                    self.reject("header_timeout");
                    if partial {
                        io.refuse(408).await;
                    }
                    return None;
                }
            };
            let active = self.shared.snapshot();
            let lean = active.config.server.lean_passthrough.then(|| {
                crate::core::passthrough::prepare(
                    &io.buf,
                    &head,
                    active.verifier.trusted_org_header(),
                    active.hop(io.peer_ip()),
                )
            });
            let served = &self.shared.metrics.front_door;
            if let Some(Some(req)) = lean {
                served.served_lean_passthrough.inc();
                if !lean::serve(&self.shared, &active, &mut io, &head, req, shutdown).await {
                    return None;
                }
                io.idle();
                first = false;
                continue;
            }
            let chat = active.config.server.lean_runtime.then(|| {
                crate::core::passthrough::chat_head(
                    &io.buf,
                    &head,
                    crate::proxy::serve::REPLAY_LIMIT,
                )
            });
            if let Some(Some(chat)) = chat {
                match chat::serve(&self.chats, active, &mut io, head, chat, shutdown).await {
                    chat::Served::Done { keep_alive } => {
                        served.served_lean_runtime.inc();
                        if !(keep_alive && io.between_requests()) {
                            return None;
                        }
                        first = false;
                        continue;
                    }
                    chat::Served::Legacy(handover) => {
                        *io.handover.get_mut().unwrap() = Some(handover);
                    }
                }
            } else {
                let hop = active.hop(io.peer_ip());
                io.begin(head, hop, active.verifier.trusted_org_header());
                drop(active);
            }
            served.served_pingora.inc();
            let mut session = ServerSession::new_http1(Box::new(io));
            if let Some(p) = persistent.take() {
                p.apply_to_session(&mut session);
            }
            session.set_keepalive(if *shutdown.borrow() {
                None
            } else {
                Some(limits.pingora_keepalive_secs())
            });
            let (stream, settings) = self
                .proxy
                .process_new_http(session, shutdown)
                .await?
                .consume();
            io = *stream.into_any().downcast::<FrontStream>().ok()?;
            // A handover Pingora did not take must not be taken by the next request.
            if io.handover.get_mut().unwrap().take().is_some() {
                return None;
            }
            // Pingora hands a connection back only after the whole body; if our framing says
            // otherwise, the two disagree on where the next request starts: close.
            if !io.between_requests() {
                return None;
            }
            persistent = settings;
            first = false;
        }
    }

    /// Pingora calls this once the listener has stopped: the proxy then stops keeping
    /// connections alive.
    async fn cleanup(&self) {
        self.proxy.http_cleanup().await
    }
}

/// `data` as one chunk of a chunked body (nothing for no data: an empty chunk ends the body).
fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:X}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Pingora read this request from the front door, so its head has the proxy's `X-Forwarded-*`.
pub(super) fn handed_by_front_door(session: &pingora::proxy::Session) -> bool {
    front_stream(session).is_some()
}

/// The chat the front door routed before handing this request to Pingora, if it did.
pub(super) fn handed_over(session: &pingora::proxy::Session) -> Option<Box<Handover>> {
    front_stream(session)?.handover.lock().unwrap().take()
}

/// Pingora sent the request to legacy: its response head is awaited within `within` of now, or
/// of the end of the client's body if that comes later.
pub(super) fn await_legacy_head(session: &pingora::proxy::Session, within: Duration) {
    if let Some(stream) = front_stream(session) {
        *stream.legacy_head.lock().unwrap() = Some(HeadWait {
            since: Instant::now(),
            within,
        });
    }
}

/// Legacy's response head arrived.
pub(super) fn legacy_head_arrived(session: &pingora::proxy::Session) {
    if let Some(stream) = front_stream(session) {
        *stream.legacy_head.lock().unwrap() = None;
    }
}

/// When the request Pingora is serving reached the front door (its first byte).
pub(super) fn arrived(session: &pingora::proxy::Session) -> Option<std::time::Instant> {
    Some(front_stream(session)?.arrived)
}

/// The front door's connection under a request Pingora is serving.
fn front_stream(session: &pingora::proxy::Session) -> Option<&FrontStream> {
    let stream = session.downstream_session.stream()?;
    (**stream).as_any().downcast_ref::<FrontStream>()
}

/// Read the next head into `io`'s buffer: the first under one deadline from `accepted`, later
/// ones after an idle wait of at most the keep-alive timeout, under a deadline from their first
/// byte.
async fn read_head(
    io: &mut FrontStream,
    limits: &Limits,
    first: bool,
    accepted: Instant,
    shutdown: &ShutdownWatch,
) -> Result<Head, NoHead> {
    if !first && io.buf.is_empty() {
        // An idle connection has nothing in flight: on shutdown it goes at once.
        let mut shutdown = shutdown.clone();
        tokio::select! {
            r = timeout(limits.keepalive_timeout, io.fill()) => match r {
                Ok(Ok(n)) if n > 0 => {}
                _ => return Err(NoHead::Closed),
            },
            Ok(_) = shutdown.wait_for(|down| *down) => return Err(NoHead::Closed),
        }
    }
    if !io.buf.is_empty() {
        io.arrived = std::time::Instant::now();
    }
    let deadline = if first {
        accepted + limits.header_timeout
    } else {
        Instant::now() + limits.header_timeout
    };
    let mut scanned = 0;
    loop {
        let len = io.buf.len();
        if len >= limits.max_header_bytes || request_head::worth_parsing(&io.buf, scanned) {
            match request_head::parse(&io.buf, limits.max_header_bytes) {
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(r) => return Err(NoHead::Refused(r)),
            }
        }
        scanned = len;
        match timeout_at(deadline, io.fill()).await {
            Err(_) => return Err(NoHead::TimedOut { partial: len > 0 }),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(NoHead::Closed),
            Ok(Ok(_)) if len == 0 => io.arrived = std::time::Instant::now(),
            Ok(Ok(_)) => {}
        }
    }
}

/// Where the connection is in its current request, for Pingora's reads.
#[derive(Debug)]
enum Phase {
    /// The front door is reading a head; Pingora has no session on the connection.
    Front,
    /// Handing Pingora `head` (the client's, with the proxy's `X-Forwarded-*`), from `at` on.
    Head {
        head: Vec<u8>,
        at: usize,
        body: Body,
    },
    Body(Body),
    /// The request is whole: the next bytes are the next request's, kept for the front door.
    Between,
    /// The chunked body was refused: every read fails.
    Failed,
}

#[derive(Debug)]
enum Body {
    Length(u64),
    Chunked(ChunkedValidator),
}

impl Body {
    fn of(framing: Framing) -> Option<Body> {
        match framing {
            Framing::None | Framing::Length(0) => None,
            Framing::Length(n) => Some(Body::Length(n)),
            Framing::Chunked => Some(Body::Chunked(ChunkedValidator::new())),
        }
    }
}

/// Legacy's response head awaited on Pingora's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HeadWait {
    since: Instant,
    within: Duration,
}

/// The client connection as Pingora reads it: the current request and nothing past it.
pub struct FrontStream {
    inner: Stream,
    /// Bytes read from the client and not yet handed on; at most `cap` while reading a head.
    buf: BytesMut,
    cap: usize,
    phase: Phase,
    rejections: IntCounterVec,
    /// A chat the front door routed, for Pingora's `request_filter` to take (`handed_over`).
    handover: Mutex<Option<Box<Handover>>>,
    /// When the current request's first byte was read: its clock starts there, as nginx's
    /// `$request_time` does, and not once its whole head is in.
    arrived: std::time::Instant,
    /// Set while Pingora waits for legacy's response head ([`await_legacy_head`]); behind a
    /// lock because Pingora's callbacks see the stream only by reference.
    legacy_head: Mutex<Option<HeadWait>>,
    /// Its deadline, armed at the first read after the wait began and the body was whole.
    head_timer: Option<(HeadWait, Pin<Box<tokio::time::Sleep>>)>,
}

impl std::fmt::Debug for FrontStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontStream")
            .field("inner", &self.inner)
            .field("buffered", &self.buf.len())
            .field("phase", &self.phase)
            .finish()
    }
}

impl FrontStream {
    fn new(inner: Stream, cap: usize, rejections: IntCounterVec) -> FrontStream {
        FrontStream {
            inner,
            buf: BytesMut::new(),
            cap,
            phase: Phase::Front,
            rejections,
            handover: Mutex::new(None),
            arrived: std::time::Instant::now(),
            legacy_head: Mutex::new(None),
            head_timer: None,
        }
    }

    /// The client's address, as the listener recorded it at accept (no system call).
    pub(super) fn peer_ip(&self) -> Option<std::net::IpAddr> {
        let digest = self.inner.get_socket_digest()?;
        Some(digest.peer_addr()?.as_inet()?.ip())
    }

    /// Read more of a head: at most up to `cap` buffered.
    async fn fill(&mut self) -> io::Result<usize> {
        let room = self.cap.saturating_sub(self.buf.len());
        if room == 0 {
            return Ok(0);
        }
        if self.buf.capacity() == self.buf.len() {
            // Most heads fit the first few KiB; one that does not goes straight to the limit:
            // each doubling on the way would leave a freed block behind per connection.
            let grown = if self.buf.capacity() < INITIAL_BUFFER {
                INITIAL_BUFFER.min(self.cap)
            } else {
                self.cap
            };
            self.buf.reserve(grown - self.buf.len());
        }
        let spare = (self.buf.capacity() - self.buf.len()).min(room);
        (&mut self.inner)
            .take(spare as u64)
            .read_buf(&mut self.buf)
            .await
    }

    /// Hand `head` to Pingora next, with the proxy's `X-Forwarded-*` for a request from `hop`
    /// (`core::passthrough::with_forwarded`; `trusted`: the trusted org header), then its body.
    fn begin(&mut self, head: Head, hop: Hop, trusted: Option<&HeaderName>) {
        self.hand_on(head, |client| with_forwarded(client, hop, trusted));
    }

    /// Read `head` and its body back as the client sent them (the head as the front door
    /// rewrote it, if it did).
    fn begin_as_sent(&mut self, head: Head) {
        self.hand_on(head, <[u8]>::to_vec);
    }

    fn hand_on(&mut self, head: Head, handed: impl FnOnce(&[u8]) -> Vec<u8>) {
        // A wait for legacy's head is the request's it was armed for.
        *self.legacy_head.get_mut().unwrap() = None;
        self.head_timer = None;
        let client = match &head.rewritten {
            Some(bytes) => &bytes[..],
            None => &self.buf[head.skip..head.skip + head.len],
        };
        let handed = handed(client);
        self.buf.advance(head.skip + head.len);
        self.phase = Phase::Head {
            head: handed,
            at: 0,
            body: Body::of(head.framing).unwrap_or(Body::Length(0)),
        };
    }

    fn between_requests(&mut self) -> bool {
        if matches!(self.phase, Phase::Between) {
            self.phase = Phase::Front;
            self.idle();
            true
        } else {
            false
        }
    }

    /// Once Pingora has every byte read ahead of it, the buffer goes: a chat stream holds its
    /// connection for minutes, and its head and body arrive in the same read.
    fn release_if_drained(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    /// An idle keep-alive connection should not keep a large head's or body's buffer.
    fn idle(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > INITIAL_BUFFER {
            self.buf = BytesMut::new();
        }
    }

    /// Answer `status`, then drop what the client still sends for a moment before closing.
    async fn refuse(&mut self, status: u16) {
        let inner = &mut self.inner;
        let written = timeout(REFUSAL_WRITE, async {
            inner.write_all(refusal_response(status)).await?;
            inner.flush().await
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            return;
        }
        Shutdown::shutdown(&mut **inner).await;
        // The head buffer may be at the limit; what is dropped needs none of it.
        self.buf = BytesMut::with_capacity(INITIAL_BUFFER);
        let buf = &mut self.buf;
        let _ = timeout(LINGER, async {
            let mut dropped = 0;
            while dropped < LINGER_BYTES {
                buf.clear();
                if buf.capacity() < INITIAL_BUFFER {
                    buf.reserve(INITIAL_BUFFER);
                }
                match inner.read_buf(buf).await {
                    Ok(n) if n > 0 => dropped += n,
                    _ => return,
                }
            }
        })
        .await;
    }

    fn poll_inner(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
        limit: u64,
    ) -> Poll<io::Result<usize>> {
        let limit = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .min(out.remaining());
        let mut sub = out.take(limit);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut sub))?;
        let n = sub.filled().len();
        // SAFETY: `sub` is `out`'s unfilled part and the inner stream initialised its first `n`
        // bytes.
        unsafe { out.assume_init(n) };
        out.advance(n);
        Poll::Ready(Ok(n))
    }

    /// While legacy's head is awaited, its deadline: the silence once it has passed.
    fn poll_legacy_head(&mut self, cx: &mut Context<'_>) -> Option<Silence> {
        let Some(wait) = *self.legacy_head.get_mut().unwrap() else {
            self.head_timer = None;
            return None;
        };
        if !matches!(&self.head_timer, Some((armed, _)) if *armed == wait) {
            // The client's body is whole by the time Pingora reads here.
            let at = wait.since.max(Instant::now()) + wait.within;
            self.head_timer = Some((wait, Box::pin(tokio::time::sleep_until(at))));
        }
        let (_, timer) = self.head_timer.as_mut().expect("armed above");
        if timer.as_mut().poll(cx).is_pending() {
            return None;
        }
        *self.legacy_head.get_mut().unwrap() = None;
        self.head_timer = None;
        Some(Silence {
            upstream: UpstreamName::Legacy,
            stage: Stage::Response,
            after: wait.within,
        })
    }

    fn refuse_body(&mut self, e: crate::core::chunked::ChunkedError) -> io::Error {
        self.phase = Phase::Failed;
        self.rejections.with_label_values(&[e.as_str()]).inc();
        tracing::debug!(error = %e, "chunked request body refused");
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

impl AsyncRead for FrontStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        match &mut this.phase {
            Phase::Front | Phase::Failed => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no request being read",
            ))),
            Phase::Head { head, at, .. } => {
                let n = (head.len() - *at).min(out.remaining());
                out.put_slice(&head[*at..*at + n]);
                *at += n;
                if *at == head.len() {
                    let Phase::Head { body, .. } =
                        std::mem::replace(&mut this.phase, Phase::Between)
                    else {
                        unreachable!()
                    };
                    if !matches!(body, Body::Length(0)) {
                        this.phase = Phase::Body(body);
                    }
                    this.release_if_drained();
                }
                Poll::Ready(Ok(()))
            }
            Phase::Body(Body::Length(left)) => {
                if !this.buf.is_empty() {
                    let n = (this.buf.len() as u64)
                        .min(*left)
                        .min(out.remaining() as u64) as usize;
                    out.put_slice(&this.buf[..n]);
                    this.buf.advance(n);
                    *left -= n as u64;
                    this.release_if_drained();
                } else {
                    let limit = *left;
                    let n = ready!(this.poll_inner(cx, out, limit))?;
                    let Phase::Body(Body::Length(left)) = &mut this.phase else {
                        unreachable!()
                    };
                    // 0: the client closed mid-body; Pingora sees the end and fails the request.
                    *left -= n as u64;
                }
                if matches!(this.phase, Phase::Body(Body::Length(0))) {
                    this.phase = Phase::Between;
                }
                Poll::Ready(Ok(()))
            }
            Phase::Body(Body::Chunked(validator)) => {
                if !this.buf.is_empty() {
                    let n = this.buf.len().min(out.remaining());
                    let used = match validator.feed(&this.buf[..n]) {
                        Ok(used) => used,
                        Err(e) => return Poll::Ready(Err(this.refuse_body(e))),
                    };
                    out.put_slice(&this.buf[..used]);
                    this.buf.advance(used);
                    this.release_if_drained();
                } else {
                    let start = out.filled().len();
                    let n = ready!(this.poll_inner(cx, out, u64::MAX))?;
                    let Phase::Body(Body::Chunked(validator)) = &mut this.phase else {
                        unreachable!()
                    };
                    let used = match validator.feed(&out.filled()[start..start + n]) {
                        Ok(used) => used,
                        Err(e) => return Poll::Ready(Err(this.refuse_body(e))),
                    };
                    if used < n {
                        // The next request's first bytes: kept for the front door.
                        this.buf
                            .extend_from_slice(&out.filled()[start + used..start + n]);
                        out.set_filled(start + used);
                    }
                }
                if matches!(&this.phase, Phase::Body(Body::Chunked(v)) if v.is_done()) {
                    this.phase = Phase::Between;
                }
                Poll::Ready(Ok(()))
            }
            Phase::Between => {
                if let Some(silence) = this.poll_legacy_head(cx) {
                    return Poll::Ready(Err(silence.into_io()));
                }
                // Pingora reads here only to notice a client that goes away mid-response. Bytes of
                // a pipelined next request are no such thing: keep them and read no further.
                if !this.buf.is_empty() {
                    return Poll::Pending;
                }
                // The probe reads onto the stack: a buffer reserved for a read that stays
                // pending would be held by every stream for as long as it lasts.
                let mut space = [std::mem::MaybeUninit::<u8>::uninit(); INITIAL_BUFFER];
                let mut probe = ReadBuf::uninit(&mut space[..INITIAL_BUFFER.min(this.cap)]);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut probe))?;
                if probe.filled().is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.buf.extend_from_slice(probe.filled());
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for FrontStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for FrontStream {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for FrontStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for FrontStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for FrontStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for FrontStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for FrontStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

/// No peeking: bytes the front door has buffered would be skipped.
#[async_trait]
impl Peek for FrontStream {}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;
    use proptest::prelude::*;

    fn limits() -> Limits {
        Limits {
            max_header_bytes: 32 * 1024,
            header_timeout: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(5),
            max_connections: 1,
        }
    }

    /// What Pingora would read, request by request, from a client that sends `pieces` and
    /// closes; `Err` with what was read before a refusal.
    async fn requests_read(pieces: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, Vec<Vec<u8>>> {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            for p in pieces {
                if client.write_all(&p).await.is_err() {
                    return;
                }
            }
        });
        let rejections = IntCounterVec::new(Opts::new("r", "r"), &["reason"]).unwrap();
        let mut io = FrontStream::new(Box::new(server), limits().max_header_bytes, rejections);
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let mut requests = Vec::new();
        let mut first = true;
        loop {
            let head = match read_head(&mut io, &limits(), first, Instant::now(), &shutdown).await {
                Ok(head) => head,
                Err(NoHead::Closed) => break,
                Err(_) => return Err(requests),
            };
            io.begin(head, Hop::default(), None);
            let mut request = Vec::new();
            while !matches!(io.phase, Phase::Between) {
                let mut buf = [0u8; 700];
                match io.read(&mut buf).await {
                    Ok(n) if n > 0 => request.extend_from_slice(&buf[..n]),
                    _ => return Err(requests),
                }
            }
            requests.push(request);
            assert!(io.between_requests());
            first = false;
        }
        writer.await.unwrap();
        Ok(requests)
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn request() -> impl Strategy<Value = Vec<u8>> {
        let body = proptest::collection::vec(any::<u8>(), 0..300);
        prop_oneof![
            "/[a-z]{0,8}".prop_map(|p| format!("GET {p} HTTP/1.1\r\nHost: e\r\n\r\n").into_bytes()),
            body.clone().prop_map(|b| {
                let mut r = format!(
                    "POST /l HTTP/1.1\r\nHost: e\r\nContent-Length: {}\r\n\r\n",
                    b.len()
                )
                .into_bytes();
                r.extend_from_slice(&b);
                r
            }),
            (body, 1usize..100).prop_map(|(b, size)| {
                let mut r =
                    b"POST /c HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                for chunk in b.chunks(size) {
                    r.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    r.extend_from_slice(chunk);
                    r.extend_from_slice(b"\r\n");
                }
                r.extend_from_slice(b"0\r\n\r\n");
                r
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn pipelined_requests_in_any_split_reach_pingora_one_at_a_time_and_whole(
            requests in proptest::collection::vec(request(), 1..6),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let all: Vec<u8> = requests.concat();
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(all.len() + 1)).collect();
            cuts.sort();
            cuts.dedup();
            let mut pieces = Vec::new();
            let mut at = 0;
            for cut in cuts.into_iter().chain([all.len()]) {
                pieces.push(all[at..cut].to_vec());
                at = cut;
            }
            // Each head as the front door hands it on, with the proxy's forwarded lines.
            let handed: Vec<Vec<u8>> = requests
                .iter()
                .map(|r| {
                    let end = memchr::memmem::find(r, b"\r\n\r\n").unwrap() + 4;
                    let mut handed = with_forwarded(&r[..end], Hop::default(), None);
                    handed.extend_from_slice(&r[end..]);
                    handed
                })
                .collect();
            prop_assert_eq!(run(requests_read(pieces)), Ok(handed));
        }
    }

    #[test]
    fn a_broken_chunk_stops_the_connection_before_the_next_request() {
        let smuggling = b"POST /empty2 HTTP/1.1\r\nHost: example\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n\r\n31\r\nX: y\r\n\r\nGET /SMUGGLED HTTP/1.1\r\nHost: example\r\n\r\n\r\n0\r\n\r\n";
        for split in [smuggling.len(), 80, 83] {
            let pieces = vec![smuggling[..split].to_vec(), smuggling[split..].to_vec()];
            assert_eq!(run(requests_read(pieces)), Err(vec![]), "{split}");
        }
    }
}
