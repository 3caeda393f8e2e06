//! Where upstream silence is noticed: a connection whose reads fail once the deadline its
//! [`ReadClock`] names has passed (`core::timeouts`), with the cause typed ([`Silence`]).
//!
//! Every connection `Upstream` makes is one of these; its client says when a request went out
//! and when its response head was complete. The deadline lives in the connection, so a read is
//! cancel-safe wherever it happens: a read that loses a `select!` race loses no bytes and leaves
//! the timer as it was.
//!
//! The timer is kept, not re-armed per read: it is set to the deadline when a read first waits,
//! moved only when the deadline comes earlier (a request was sent), and, when it fires early
//! because bytes came meanwhile, set once more to the deadline they moved it to. A stream that
//! keeps talking costs a clock read per read, not a timer per read.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::core::timeouts::{ReadClock, Stage, Timeouts, UpstreamName};

/// An upstream that said nothing for longer than its policy allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Silence {
    pub upstream: UpstreamName,
    pub stage: Stage,
    pub after: Duration,
}

impl fmt::Display for Silence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.after.as_millis();
        let who = self.upstream.as_str();
        match self.stage {
            Stage::Connect => write!(f, "no connection to {who} within {ms} ms"),
            Stage::Response => write!(f, "{who} sent no response head within {ms} ms"),
            Stage::Idle => write!(f, "{who} sent nothing for {ms} ms"),
        }
    }
}

impl std::error::Error for Silence {}

impl Silence {
    pub fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, self)
    }

    /// The silence an I/O error reports, if it is one.
    pub fn of(e: &io::Error) -> Option<Silence> {
        e.get_ref()?.downcast_ref::<Silence>().copied()
    }

    /// The silence behind an error of Pingora's, if that is what it was.
    pub fn in_pingora(e: &pingora::Error) -> Option<Silence> {
        let cause = e.root_cause();
        if let Some(s) = cause.downcast_ref::<Silence>() {
            return Some(*s);
        }
        Silence::of(cause.downcast_ref::<io::Error>()?)
    }
}

/// `cutover_upstream_timeouts_total` for one upstream, by stage.
#[derive(Clone)]
pub struct TimeoutCounters {
    pub upstream: UpstreamName,
    pub connect: IntCounter,
    pub response: IntCounter,
    pub idle: IntCounter,
}

impl TimeoutCounters {
    pub fn inc(&self, stage: Stage) {
        match stage {
            Stage::Connect => &self.connect,
            Stage::Response => &self.response,
            Stage::Idle => &self.idle,
        }
        .inc()
    }

    /// Counters on a registry of their own: for tests that do not read them.
    pub fn unregistered(upstream: UpstreamName) -> TimeoutCounters {
        let c = || IntCounter::new("unregistered", "unregistered").expect("a valid name");
        TimeoutCounters {
            upstream,
            connect: c(),
            response: c(),
            idle: c(),
        }
    }
}

/// A connection to an upstream, read under its deadlines.
pub struct Watched<S> {
    io: S,
    timeouts: Timeouts,
    clock: ReadClock,
    /// Armed at or before the current deadline while a read waits; made on the first wait.
    timer: Option<Pin<Box<Sleep>>>,
    counters: TimeoutCounters,
    /// Once silent, always silent: the connection is finished.
    silent: Option<Silence>,
}

impl<S: fmt::Debug> fmt::Debug for Watched<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watched")
            .field("io", &self.io)
            .field("clock", &self.clock)
            .field("silent", &self.silent)
            .finish()
    }
}

fn now() -> std::time::Instant {
    // Tokio's clock, so a paused runtime's time is the one deadlines are counted in.
    Instant::now().into_std()
}

impl<S> Watched<S> {
    pub fn new(io: S, timeouts: Timeouts, counters: TimeoutCounters) -> Self {
        Watched {
            io,
            timeouts,
            clock: ReadClock::new(now()),
            timer: None,
            counters,
            silent: None,
        }
    }

    /// The request went out: its response head is awaited from now.
    pub fn sent(&mut self) {
        self.clock.sent(now());
    }

    /// A complete response head was read.
    pub fn head_received(&mut self) {
        self.clock.head_received(now());
    }

    /// Take a reloaded policy for the next request on this kept connection.
    pub fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.timeouts = timeouts;
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// The connection fell silent past a deadline.
    pub fn is_silent(&self) -> bool {
        self.silent.is_some()
    }
}

impl<S: AsyncRead + Unpin> Watched<S> {
    /// An idle kept-alive connection has nothing to read: a read that completes at once means
    /// the upstream closed it (0 bytes) or sent something unasked, and either way it cannot
    /// carry a request. Reads the connection itself, without arming the deadline.
    pub fn still_open(&mut self) -> bool {
        let mut byte = [0u8; 1];
        self.silent.is_none() && self.io.read(&mut byte).now_or_never().is_none()
    }

    /// Wait for the deadline while a read waits: `Ready` with the silence once it has passed.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<Silence> {
        loop {
            let (stage, at) = self.clock.deadline(&self.timeouts);
            let at = Instant::from_std(at);
            match &mut self.timer {
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
                // A request sent since moved the deadline earlier.
                Some(timer) if timer.deadline() > at => timer.as_mut().reset(at),
                Some(_) => {}
            }
            let timer = self.timer.as_mut().expect("armed above");
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if Instant::now() >= at {
                let silence = Silence {
                    upstream: self.counters.upstream,
                    stage,
                    after: self.timeouts.of(stage),
                };
                self.counters.inc(stage);
                self.silent = Some(silence);
                return Poll::Ready(silence);
            }
            // Bytes came since it was set: wait out the deadline they moved it to.
            timer.as_mut().reset(at);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(silence) = this.silent {
            return Poll::Ready(Err(silence.into_io()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.clock.received(now());
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.poll_deadline(cx) {
                Poll::Ready(silence) => Poll::Ready(Err(silence.into_io())),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const T: Timeouts = crate::core::timeouts::TEST_TIMEOUTS;

    /// A watched connection, its peer's end, and its timeout counters.
    type Ends = (
        Watched<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
        TimeoutCounters,
    );

    fn watched() -> Ends {
        let (a, b) = tokio::io::duplex(1024);
        let counters = TimeoutCounters::unregistered(UpstreamName::Runtime);
        (Watched::new(a, T, counters.clone()), b, counters)
    }

    /// `watched()` past its request and response head: reading the body.
    fn in_body() -> Ends {
        let (mut conn, peer, counters) = watched();
        conn.sent();
        conn.head_received();
        (conn, peer, counters)
    }

    #[tokio::test(start_paused = true)]
    async fn no_head_within_the_response_timeout_is_a_typed_silence() {
        let (mut conn, _peer, counters) = watched();
        conn.sent();
        let started = Instant::now();
        let mut buf = [0u8; 16];
        let e = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        let silence = Silence::of(&e).expect("a typed silence");
        assert_eq!(silence.stage, Stage::Response);
        assert_eq!(
            silence.to_string(),
            "runtime sent no response head within 10000 ms"
        );
        assert_eq!(counters.response.get(), 1);
        // The connection is finished: it stays silent, and is never handed out again.
        assert!(conn.read(&mut buf).await.is_err());
        assert!(!conn.still_open());
        assert_eq!(counters.response.get(), 1, "counted once");
    }

    #[tokio::test(start_paused = true)]
    async fn each_byte_restarts_the_idle_deadline() {
        let (mut conn, mut peer, counters) = in_body();
        let started = Instant::now();
        let mut buf = [0u8; 16];
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(59)).await;
            peer.write_all(b"x").await.unwrap();
            assert_eq!(conn.read(&mut buf).await.unwrap(), 1);
        }
        let e = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(3 * 59 + 60));
        assert_eq!(Silence::of(&e).unwrap().stage, Stage::Idle);
        assert_eq!((counters.idle.get(), counters.response.get()), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_that_loses_a_race_loses_no_bytes_and_keeps_the_deadline() {
        let (mut conn, mut peer, _) = in_body();
        let started = Instant::now();
        let mut buf = [0u8; 16];
        // A read cancelled by a shorter timer, many times over.
        for _ in 0..5 {
            let raced = tokio::time::timeout(Duration::from_secs(1), conn.read(&mut buf)).await;
            assert!(raced.is_err());
        }
        peer.write_all(b"late").await.unwrap();
        assert_eq!(conn.read(&mut buf).await.unwrap(), 4);
        assert_eq!(&buf[..4], b"late");
        let e = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(Silence::of(&e).unwrap().stage, Stage::Idle);
        assert_eq!(started.elapsed(), Duration::from_secs(5 + 60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_head_is_still_late() {
        let (mut conn, mut peer, _) = watched();
        conn.sent();
        let started = Instant::now();
        let mut buf = [0u8; 16];
        tokio::time::sleep(Duration::from_secs(9)).await;
        peer.write_all(b"HTTP/1.1 ").await.unwrap();
        assert!(conn.read(&mut buf).await.unwrap() > 0);
        let e = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(Silence::of(&e).unwrap().stage, Stage::Response);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_on_a_kept_connection_brings_its_deadline_forward() {
        let (mut conn, mut peer, _) = watched();
        let mut buf = [0u8; 16];
        conn.sent();
        peer.write_all(b"answer").await.unwrap();
        assert!(conn.read(&mut buf).await.unwrap() > 0);
        conn.head_received();
        // The timer is armed for the idle deadline by a read that waits...
        assert!(
            tokio::time::timeout(Duration::from_secs(1), conn.read(&mut buf))
                .await
                .is_err()
        );
        // ...and a new request must not wait past its own response deadline.
        let sent = Instant::now();
        conn.sent();
        let e = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(Silence::of(&e).unwrap().stage, Stage::Response);
        assert_eq!(sent.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_closed_idle_connection_is_not_still_open() {
        let (mut conn, peer, _) = watched();
        assert!(conn.still_open());
        drop(peer);
        assert!(!conn.still_open());
    }
}
