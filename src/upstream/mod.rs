//! The one HTTP/1.1 client of the proxy's upstreams.
//!
//! Each upstream (legacy, the runtime) has one [`Upstream`]: its connections ([`pool`]), how a
//! new one is made ([`Connect`]), and the rules every call to it follows: the connection is made
//! within the policy's connect timeout, a pooled connection that closes before any answer byte
//! is replaced once by a fresh one (when the request may go again), the response head must come
//! within the response timeout, and the body it returns ([`Body`]) fails its reads after the idle
//! timeout. The policy ([`Timeouts`], from the config snapshot a request holds) and the head's
//! reading (`core::h1`) are data and pure code; [`watched::Watched`] is where silence is noticed.
//!
//! The runtime's streams, its files and health checks, the bridge's calls and the lean
//! passthrough all go through here; so can a rescue through legacy mid-stream: a
//! [`Upstream::send`] of the original request to legacy, whose [`Body`] is relayed under legacy's
//! own deadlines.

pub mod body;
pub mod bridge;
#[cfg(test)]
pub(crate) mod in_memory;
pub mod pool;
pub mod resolve;
pub mod watched;

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub use body::{Body, BodyFailure};
use pool::{Key, Pool};
pub use resolve::Resolver;
pub use watched::{Silence, TimeoutCounters, Watched};

use crate::core::h1::{self, Head};
pub use crate::core::timeouts::{Stage, Timeouts, UpstreamName};

/// Room asked of the buffer before each read of a head: a bridge answer (a 20-message history)
/// is a few KiB, so it takes one read.
const HEAD_READ: usize = 16 * 1024;

/// How a new connection to an upstream is made.
#[async_trait]
pub trait Connect: Send + Sync + 'static {
    type Conn: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static;
    async fn connect(&self, addr: SocketAddr) -> io::Result<Self::Conn>;
}

/// Plain TCP, no delay. (Pingora's pooled streams ask the kernel for their peer on every reuse.)
pub struct Tcp;

#[async_trait]
impl Connect for Tcp {
    type Conn = TcpStream;
    async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl<S: AsyncRead + Unpin> pool::Idle for Watched<S> {
    fn still_open(&mut self) -> bool {
        Watched::still_open(self)
    }
}

/// One request's terms.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// Where the upstream is (`host:port`, resolved and cached).
    pub address: &'a str,
    /// `address` already parsed, when it is an IP literal: not parsed again per call.
    pub literal: Option<SocketAddr>,
    pub timeouts: Timeouts,
    /// May go again, once, on a fresh connection when a pooled one closes before any answer
    /// byte (nothing was answered, so nothing was done twice).
    pub repeatable: bool,
    /// Check a pooled connection before the request goes on it: one that cannot be repeated
    /// must not be lost on a connection the upstream already closed.
    pub check_pooled: bool,
    /// A `HEAD`: its answer has no body, whatever its head says.
    pub head_only: bool,
}

impl<'a> Call<'a> {
    /// A request that may be repeated, on a checked connection, with a body in its answer.
    pub fn new(address: &'a str, timeouts: Timeouts) -> Call<'a> {
        Call {
            address,
            literal: None,
            timeouts,
            repeatable: true,
            check_pooled: true,
            head_only: false,
        }
    }
}

/// Why a call got no usable response head.
#[derive(Debug)]
pub enum Failure<E = Infallible> {
    /// No connection: the address did not resolve or the connection was refused.
    Unreachable(String),
    /// Nothing of an answer came back: the connection closed or failed before its first byte.
    NoAnswer(String),
    /// No connection within the connect timeout, or no head within the response timeout.
    Silent(Silence),
    /// The answer broke off inside its head, or the head is not one.
    BadAnswer(String),
    /// The caller's own part of the request failed (the client's body, for the passthrough).
    Caller(E),
}

impl<E: fmt::Display> fmt::Display for Failure<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Unreachable(why) => write!(f, "unreachable: {why}"),
            Failure::NoAnswer(why) => write!(f, "no response: {why}"),
            Failure::Silent(s) => write!(f, "{s}"),
            Failure::BadAnswer(why) => write!(f, "bad response: {why}"),
            Failure::Caller(e) => write!(f, "{e}"),
        }
    }
}

impl<E> Failure<E> {
    /// The stage whose deadline passed, if that is what happened.
    pub fn timed_out(&self) -> Option<Stage> {
        match self {
            Failure::Silent(s) => Some(s.stage),
            _ => None,
        }
    }
}

impl Failure<Infallible> {
    /// The same failure, where a caller's writer could have failed too.
    pub fn widen<E>(self) -> Failure<E> {
        match self {
            Failure::Unreachable(w) => Failure::Unreachable(w),
            Failure::NoAnswer(w) => Failure::NoAnswer(w),
            Failure::Silent(s) => Failure::Silent(s),
            Failure::BadAnswer(w) => Failure::BadAnswer(w),
            Failure::Caller(never) => match never {},
        }
    }
}

/// How a request's bytes go out on a connection: the caller's, so a body can be streamed from
/// the client as it arrives. A write the upstream refuses need not be an error here: what it
/// answered (or that it closed) is read next, and a closed pooled connection is retried.
pub trait Request<C>: Send {
    type Sent: Send;
    type Error: Send;
    fn write<'a>(
        &'a mut self,
        conn: &'a mut Watched<C>,
    ) -> impl Future<Output = Result<Self::Sent, Self::Error>> + Send + 'a;
}

/// A request whose head and body are in one buffer, so it leaves in one write.
pub struct Bytes<'b>(pub &'b [u8]);

impl<C: AsyncWrite + Unpin + Send + Sync> Request<C> for Bytes<'_> {
    type Sent = ();
    type Error = Infallible;
    async fn write(&mut self, conn: &mut Watched<C>) -> Result<(), Infallible> {
        // A failed write shows as a connection that gave no answer.
        if conn.write_all(self.0).await.is_ok() {
            let _ = conn.flush().await;
        }
        Ok(())
    }
}

/// A response head and what follows it.
pub struct Response<C> {
    pub head: Head,
    /// The head's bytes as received.
    raw_head: BytesMut,
    body: Body<C>,
}

impl<C> Response<C> {
    pub fn status(&self) -> u16 {
        self.head.status
    }

    pub fn raw_head(&self) -> &[u8] {
        &self.raw_head
    }

    /// The value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        h1::header_value(&self.raw_head, name)
    }

    pub fn into_body(self) -> Body<C> {
        self.body
    }

    pub fn body_mut(&mut self) -> &mut Body<C> {
        &mut self.body
    }
}

impl<C: AsyncRead + AsyncWrite + Unpin + Send + 'static> Response<C> {
    /// The head was informational (1xx): read the one after it, under the response deadline.
    pub async fn next_head(&mut self, head_only: bool) -> Result<(), Failure> {
        let (conn, buf) = self.body.parts();
        conn.sent();
        let head = read_head(conn, buf, head_only, true).await?;
        self.raw_head = buf.split_to(head.len);
        self.body.reframe(head.framing, head.keep_alive);
        self.head = head;
        Ok(())
    }
}

/// How often the idle connections are swept, at most and at least.
const SWEEP_MAX: Duration = Duration::from_secs(1);
const SWEEP_MIN: Duration = Duration::from_millis(50);

/// One upstream's client.
pub struct Upstream<K: Connect = Tcp> {
    name: UpstreamName,
    connector: K,
    pool: Arc<Pool<Watched<K::Conn>>>,
    /// Whether the pool's sweep runs (started with the first request, on its runtime).
    sweeping: AtomicBool,
    resolver: Resolver,
    counters: TimeoutCounters,
}

impl<K: Connect> Upstream<K> {
    pub fn new(connector: K, counters: TimeoutCounters) -> Upstream<K> {
        Upstream {
            name: counters.upstream,
            connector,
            pool: Arc::default(),
            sweeping: AtomicBool::new(false),
            resolver: Resolver::default(),
            counters,
        }
    }

    /// Close idle connections once they pass `pool_idle_timeout_ms`, in the background, for as
    /// long as this client lives; checked every half of that limit (at most a second, at least
    /// 50 ms apart).
    fn sweep_idle(&self) {
        if self.sweeping.load(Ordering::Relaxed) || self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(&self.pool);
        tokio::spawn(async move {
            loop {
                let every = match pool.upgrade() {
                    Some(pool) => pool.max_idle().map_or(SWEEP_MAX, |d| d / 2),
                    None => return,
                };
                tokio::time::sleep(every.clamp(SWEEP_MIN, SWEEP_MAX)).await;
                match pool.upgrade() {
                    Some(pool) => pool.sweep(),
                    None => return,
                };
            }
        });
    }

    pub fn name(&self) -> UpstreamName {
        self.name
    }

    /// Idle connections to `addr` kept for this thread (for tests).
    pub fn idle(&self, addr: SocketAddr) -> usize {
        self.pool.idle(pool::key(addr))
    }

    /// Send `request` and read up to its final response head (informational answers skipped;
    /// a `101` is final).
    pub async fn send(
        &self,
        call: &Call<'_>,
        request: &[u8],
    ) -> Result<Response<K::Conn>, Failure> {
        let ((), mut response) = self.send_with(call, Bytes(request)).await?;
        while response.head.status / 100 == 1 && response.head.status != 101 {
            response.next_head(call.head_only).await?;
        }
        Ok(response)
    }

    /// Write `request` with the caller's writer and read up to the first response head, of any
    /// status: the caller sees informational answers (and passes them on, or
    /// [`Response::next_head`]). What the writer returns comes back with the response.
    pub async fn send_with<R: Request<K::Conn>>(
        &self,
        call: &Call<'_>,
        mut request: R,
    ) -> Result<(R::Sent, Response<K::Conn>), Failure<R::Error>> {
        let addr =
            match call.literal {
                Some(addr) => addr,
                None => self.resolver.resolve(call.address).await.map_err(|e| {
                    Failure::Unreachable(format!("resolving {}: {e}", call.address))
                })?,
            };
        let key = pool::key(addr);
        self.sweep_idle();
        // A pooled connection the upstream closed meanwhile fails on first use; a fresh attempt
        // is safe for a request that may be repeated, since such a connection answered nothing.
        for attempt in 0..2 {
            let (mut conn, reused) = self
                .connection(call, addr, key, attempt)
                .await
                .map_err(Failure::widen)?;
            let sent = request.write(&mut conn).await.map_err(Failure::Caller)?;
            conn.sent();
            // The head's first read allocates once, at its size, not by growing an empty buffer.
            let mut buf = BytesMut::with_capacity(HEAD_READ);
            match read_head(&mut conn, &mut buf, call.head_only, false).await {
                Err(Failure::NoAnswer(why)) if reused && call.repeatable => {
                    tracing::debug!(
                        upstream = self.name.as_str(),
                        why,
                        "stale pooled connection, retrying once"
                    );
                }
                Err(e) => return Err(e.widen()),
                Ok(head) => {
                    let raw_head = buf.split_to(head.len);
                    let body = Body::new(
                        conn,
                        buf,
                        head.framing,
                        head.keep_alive,
                        key,
                        self.pool.clone(),
                    );
                    let response = Response {
                        head,
                        raw_head,
                        body,
                    };
                    return Ok((sent, response));
                }
            }
        }
        Err(Failure::NoAnswer(format!(
            "{} closed two connections in a row",
            self.name.as_str()
        )))
    }

    /// The connection for a request's `attempt`, and whether it was pooled. Only the first
    /// attempt may take a pooled one.
    async fn connection(
        &self,
        call: &Call<'_>,
        addr: SocketAddr,
        key: Key,
        attempt: u32,
    ) -> Result<(Watched<K::Conn>, bool), Failure> {
        let t = call.timeouts;
        if attempt == 0 {
            if let Some(mut conn) = self.pool.take(key, t.pool_idle, call.check_pooled) {
                conn.set_timeouts(t);
                return Ok((conn, true));
            }
        }
        let io = match tokio::time::timeout(t.connect, self.connector.connect(addr)).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => {
                return Err(Failure::Unreachable(format!(
                    "connecting to {} ({addr}): {e}",
                    self.name.as_str()
                )))
            }
            Err(_) => {
                self.counters.inc(Stage::Connect);
                return Err(Failure::Silent(Silence {
                    upstream: self.name,
                    stage: Stage::Connect,
                    after: t.connect,
                }));
            }
        };
        let conn = Watched::new(io, t, self.counters.clone());
        Ok((conn, false))
    }
}

/// Read into `buf` up to a complete response head, which stays at its start; the connection's
/// deadline is the response head's. `more`: an earlier head was read on this exchange, so a
/// close now is not a stale connection.
async fn read_head<C: AsyncRead + Unpin>(
    conn: &mut Watched<C>,
    buf: &mut BytesMut,
    head_only: bool,
    more: bool,
) -> Result<Head, Failure> {
    let mut received = more;
    loop {
        match h1::parse_head(buf, head_only) {
            Ok(Some(head)) => {
                conn.head_received();
                return Ok(head);
            }
            Ok(None) => {}
            Err(e) => return Err(Failure::BadAnswer(e.to_string())),
        }
        buf.reserve(HEAD_READ);
        match conn.read_buf(buf).await {
            Ok(0) if !received => return Err(Failure::NoAnswer("closed before a response".into())),
            Ok(0) => return Err(Failure::BadAnswer("closed inside the response head".into())),
            Ok(_) => received = true,
            Err(e) => {
                return Err(match Silence::of(&e) {
                    Some(s) => Failure::Silent(s),
                    None if !received => Failure::NoAnswer(e.to_string()),
                    None => Failure::BadAnswer(e.to_string()),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::in_memory::{self, answered, request_on, Duplex};
    use super::*;
    use std::time::Duration;
    use tokio::io::DuplexStream;
    use tokio::sync::mpsc;
    use tokio::time::Instant;

    const T: Timeouts = Timeouts {
        connect: Duration::from_millis(100),
        response: Duration::from_secs(10),
        idle: Duration::from_secs(60),
        pool_idle: Duration::from_secs(4),
    };

    fn upstream(hang: bool) -> (Upstream<Duplex>, mpsc::UnboundedReceiver<DuplexStream>) {
        in_memory::upstream(UpstreamName::Runtime, hang)
    }

    const ADDR: &str = "127.0.0.1:9";
    const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";

    #[tokio::test(start_paused = true)]
    async fn a_parsed_literal_is_used_without_resolving_the_address() {
        let (up, mut accepted) = upstream(false);
        // A name that could never resolve: only the literal can have been used.
        let call = Call {
            literal: Some(ADDR.parse().unwrap()),
            ..Call::new("legacy.invalid:9", T)
        };
        let (sent, _upstream_side) = tokio::join!(
            up.send(&call, GET),
            answered(&mut accepted, b"HTTP/1.1 204 No Content\r\n\r\n")
        );
        let mut body = sent.expect("sent to the literal").into_body();
        assert!(body.decode(|_| {}).unwrap());
        body.release();
        assert_eq!(
            up.idle(ADDR.parse().unwrap()),
            1,
            "pooled under the literal"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_never_comes_fails_at_the_response_timeout() {
        let (up, mut accepted) = upstream(false);
        let started = Instant::now();
        let call = Call::new(ADDR, T);
        let (sent, mut upstream_side) =
            tokio::join!(up.send(&call, GET), answered(&mut accepted, b""));
        let e = sent.err().expect("no head, no response");
        assert_eq!(e.timed_out(), Some(Stage::Response), "{e}");
        assert_eq!(started.elapsed(), T.response);
        assert_eq!(up.counters.response.get(), 1);
        // The connection was closed, not pooled.
        let mut rest = Vec::new();
        assert_eq!(upstream_side.read_to_end(&mut rest).await.unwrap(), 0);
        assert_eq!(up.idle(ADDR.parse().unwrap()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_fails_its_read_at_the_idle_timeout() {
        let (up, mut accepted) = upstream(false);
        let call = Call::new(ADDR, T);
        let (sent, _upstream_side) = tokio::join!(
            up.send(&call, GET),
            answered(
                &mut accepted,
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"
            )
        );
        let mut body = sent.unwrap().into_body();
        let mut payload = Vec::new();
        let started = Instant::now();
        let e = loop {
            match body.fill().await {
                Ok(0) => panic!("not closed"),
                Ok(_) => {
                    body.decode(|p| payload.extend_from_slice(p)).unwrap();
                }
                Err(e) => break e,
            }
        };
        assert_eq!(payload, b"hello");
        assert_eq!(Silence::of(&e).map(|s| s.stage), Some(Stage::Idle));
        assert_eq!(started.elapsed(), T.idle);
        assert_eq!(up.counters.idle.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_pooled_connection_is_replaced_once_and_only_for_a_repeatable_request() {
        for repeatable in [true, false] {
            let (up, mut accepted) = upstream(false);
            let call = Call {
                repeatable,
                // Not checked: the close is found by the request itself.
                check_pooled: false,
                ..Call::new(ADDR, T)
            };
            // A first request, whose connection goes back to the pool...
            let (first, mut c1) = tokio::join!(
                up.send(&call, GET),
                answered(
                    &mut accepted,
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                )
            );
            let body = first.unwrap().into_body();
            assert_eq!(body.read_to_end(16).await.unwrap(), b"ok");
            assert_eq!(up.idle(ADDR.parse().unwrap()), 1);
            // ...which the upstream then closes once it has the second request.
            let (second, _) = tokio::join!(up.send(&call, GET), async {
                request_on(&mut c1).await;
                drop(c1);
                if repeatable {
                    Some(answered(&mut accepted, b"HTTP/1.1 204 No Content\r\n\r\n").await)
                } else {
                    None
                }
            });
            match second {
                Ok(r) => {
                    assert!(repeatable);
                    assert_eq!(r.status(), 204);
                }
                Err(e) => {
                    assert!(!repeatable, "{e}");
                    assert!(matches!(e, Failure::NoAnswer(_)), "{e}");
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_is_not_made_in_time_is_a_connect_timeout() {
        let (up, _accepted) = upstream(true);
        let started = Instant::now();
        let e = up.send(&Call::new(ADDR, T), GET).await.err().unwrap();
        assert_eq!(e.timed_out(), Some(Stage::Connect));
        assert_eq!(started.elapsed(), T.connect);
        assert_eq!(up.counters.connect.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn informational_answers_are_skipped_and_the_body_follows_the_final_head() {
        let (up, mut accepted) = upstream(false);
        let call = Call::new(ADDR, T);
        let (sent, _c) = tokio::join!(up.send(&call, GET), async {
            let mut c = answered(
                &mut accepted,
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n",
            )
            .await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\nContent-Le")
                .await
                .unwrap();
            c.write_all(b"ngth: 2\r\n\r\nok").await.unwrap();
            c
        });
        let r = sent.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.header("content-type"), Some(&b"a/b"[..]));
        assert!(r.raw_head().starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert_eq!(r.into_body().read_to_end(16).await.unwrap(), b"ok");
    }
}
