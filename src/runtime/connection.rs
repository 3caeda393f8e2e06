//! One runtime execution's connection: the request over a pooled connection, the response head,
//! and the body read by whoever relays it.
//!
//! Opening is separate from relaying so that a runtime that fails before its first byte can be
//! failed over to legacy. The body is read by the caller's own loop (`fill` then `parse_into`), not by
//! a reader task: an idle stream then holds no task, no channel and no read buffer, and the first
//! bytes reach the SSE parser without a hop between tasks.

use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use pingora::http::RequestHeader;
use pingora::protocols::Stream;
use tokio::io::AsyncReadExt;

use crate::app::state::{Active, Shared};
use crate::app::upstream;
use crate::core::h1::{self, BodyDecoder, BodyError};
use crate::core::sse::{SseError, SseEvent, SseParser};
use crate::core::stats::Outcome;
use crate::runtime::exchange::{self, ExchangeError};
use crate::runtime::pool;

/// Request headers passed on to the runtime besides the ones the proxy sets. Never the caller's
/// `Authorization`: the runtime is told who asked in its JSON body, and a token it held could
/// be replayed against legacy. `traceparent` is added when the caller sent none (a valid one).
const FORWARDED_HEADERS: &[&str] = &[
    "x-request-id",
    "traceparent",
    "tracestate",
    "accept-language",
    "user-agent",
];

/// Whether `v` is a W3C `traceparent` a tracer downstream will take: version `00`, a 32-hex trace
/// id and a 16-hex parent id, neither all zeros, and 2-hex flags, in lower case.
pub fn is_valid_traceparent(v: &[u8]) -> bool {
    let hex = |b: &[u8]| b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |b: &[u8]| b.iter().any(|c| *c != b'0');
    v.len() == 55
        && v.starts_with(b"00-")
        && v[35] == b'-'
        && v[52] == b'-'
        && hex(&v[3..35])
        && nonzero(&v[3..35])
        && hex(&v[36..52])
        && nonzero(&v[36..52])
        && hex(&v[53..55])
}

/// A fresh, sampled W3C `traceparent`, for a request that came without one.
pub fn new_traceparent() -> String {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let parent = fastrand::u64(1..);
    format!("00-{trace}-{parent:016x}-01")
}

/// Marks a shadow copy so the runtime can skip side effects (tool calls, stored history).
pub const SHADOW_HEADER: &str = "x-cutover-shadow";

/// Room asked of the read buffer before a read while the runtime streams fast (the last read
/// filled its buffer).
const READ_SIZE: usize = 32 * 1024;
/// Room asked otherwise: a frame or two, so a held stream waits with ~1 KiB, not 16.
const SMALL_READ: usize = 1024;

/// Why the runtime could not be opened.
#[derive(Debug)]
pub struct OpenFailure {
    pub outcome: Outcome,
    pub detail: String,
    /// Safe to serve the request from legacy instead: nothing reached the client yet and the
    /// runtime refused or failed fast. A runtime that stayed silent until the execution deadline
    /// is answered with an error event instead, not made to wait twice.
    pub failover: bool,
}

impl OpenFailure {
    fn error(detail: String) -> Self {
        OpenFailure {
            outcome: Outcome::Error,
            detail,
            failover: true,
        }
    }
}

/// The runtime answered 2xx; its body is read with [`RuntimeStream::fill`] and
/// [`RuntimeStream::parse_into`].
pub struct RuntimeStream {
    stream: Stream,
    /// Received bytes not decoded yet; empty (no allocation) between reads.
    buf: BytesMut,
    body: BodyDecoder,
    keep_alive: bool,
    key: pool::Key,
    /// The last read filled all the room it had: more is likely waiting.
    streaming: bool,
    /// Body bytes came with the response head and no caller has seen them yet.
    unseen_prefix: bool,
}

impl RuntimeStream {
    /// Read more of the body from the runtime; `Ok(0)` at end of file. Cancel-safe: a read
    /// dropped before it completes loses nothing, so it can race timers in a `select!`.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        if std::mem::take(&mut self.unseen_prefix) {
            return Ok(self.buf.len());
        }
        self.buf.reserve(if self.streaming {
            READ_SIZE
        } else {
            SMALL_READ
        });
        let room = self.buf.capacity() - self.buf.len();
        let n = self.stream.read_buf(&mut self.buf).await?;
        self.streaming = n == room;
        Ok(n)
    }

    /// Decode what `fill` read and parse it as SSE, pushing complete events onto `events`.
    /// Returns whether the body is complete, then the parser's verdict (a frame over its limit).
    pub fn parse_into(
        &mut self,
        parser: &mut SseParser,
        events: &mut Vec<SseEvent>,
    ) -> (Result<bool, BodyError>, Result<(), SseError>) {
        let mut parsed = Ok(());
        let body = self.decode(|piece| {
            if parsed.is_ok() {
                parsed = parser.feed(piece, events);
            }
        });
        (body, parsed)
    }

    /// Decode what `fill` read, handing the payload to `sink` in order; `Ok(true)` once the body
    /// is complete.
    fn decode(&mut self, sink: impl FnMut(&[u8])) -> Result<bool, BodyError> {
        let used = self.body.decode(&self.buf, sink)?;
        self.buf.advance(used);
        if self.buf.is_empty() {
            // A held stream keeps no read buffer while it waits.
            self.buf = BytesMut::new();
        }
        Ok(self.body.is_done())
    }

    /// The runtime closed the connection: the end of a close-delimited body, an error otherwise.
    pub fn eof(&mut self) -> Result<(), BodyError> {
        self.body.eof()
    }

    /// Bytes read and not decoded yet.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Return the connection to the pool if its response was read to its end and it can carry
    /// another; drop (close) it otherwise.
    pub fn release(self, shared: &Shared) {
        if self.body.is_done() && self.keep_alive && self.buf.is_empty() {
            shared.runtime_pool.put(self.key, self.stream);
        }
    }

    /// After a clean end the body's last bytes (the chunked terminator) may still be on their
    /// way; read them for a moment on a task of their own so the connection can be reused.
    pub fn release_when_done(mut self, shared: std::sync::Arc<Shared>) {
        if self.body.is_done() || !self.keep_alive {
            self.release(&shared);
            return;
        }
        tokio::spawn(async move {
            let drain = async {
                while !self.body.is_done() {
                    if self.fill().await.ok()? == 0 {
                        return None;
                    }
                    self.decode(|_| {}).ok()?;
                }
                Some(())
            };
            if let Ok(Some(())) = tokio::time::timeout(Duration::from_secs(2), drain).await {
                self.release(&shared);
            }
        });
    }
}

fn runtime_request(
    active: &Active,
    downstream: &RequestHeader,
    body: &[u8],
    shadow: bool,
) -> Vec<u8> {
    let rt = &active.config.runtime;
    let length = body.len().to_string();
    let mut headers: Vec<(&str, &[u8])> = vec![
        ("host", rt.address.as_bytes()),
        ("content-type", b"application/json"),
        ("content-length", length.as_bytes()),
        ("accept", b"text/event-stream"),
    ];
    let traced = downstream
        .headers
        .get("traceparent")
        .is_some_and(|v| is_valid_traceparent(v.as_bytes()));
    let fresh_trace = (!traced).then(new_traceparent);
    if let Some(t) = &fresh_trace {
        headers.push(("traceparent", t.as_bytes()));
    }
    for name in FORWARDED_HEADERS {
        // An invalid trace context is restarted, and its tracestate goes with it.
        if !traced && matches!(*name, "traceparent" | "tracestate") {
            continue;
        }
        if let Some(v) = downstream.headers.get(*name) {
            headers.push((name, v.as_bytes()));
        }
    }
    if shadow {
        headers.push((SHADOW_HEADER, b"1"));
    }
    h1::encode_request("POST", &rt.stream_path, &headers, body)
}

/// Send the runtime request and wait for a 2xx response head, until `deadline`.
pub async fn open(
    shared: &Shared,
    active: &Active,
    downstream: &RequestHeader,
    body: Bytes,
    deadline: Instant,
    shadow: bool,
) -> Result<RuntimeStream, OpenFailure> {
    let addr = shared
        .resolver
        .resolve(&active.config.runtime.address)
        .await
        .map_err(|e| OpenFailure::error(format!("resolving runtime address: {e}")))?;
    let peer = upstream::peer(addr, &active.runtime);
    let key = pool::key(addr);
    let request = runtime_request(active, downstream, &body, shadow);

    // A pooled connection the runtime closed meanwhile fails on first use; one fresh attempt
    // is safe because such a connection never delivered a response.
    for attempt in 0..2 {
        // Refused or timed out, a connection that could not be made is a connect failure: an
        // error (the contract counts connect failures as errors), not an execution timeout.
        let connection = shared
            .runtime_pool
            .for_attempt(attempt, key, &peer, active.runtime.pool_idle_timeout)
            .await;
        let (mut stream, reused) =
            connection.map_err(|e| OpenFailure::error(format!("connecting to runtime: {e}")))?;
        let mut buf = BytesMut::new();
        let head = match tokio::time::timeout_at(
            deadline.into(),
            exchange::request_head(&mut stream, &request, &mut buf),
        )
        .await
        {
            Err(_) => {
                return Err(OpenFailure {
                    outcome: Outcome::Timeout,
                    detail: "runtime sent no response header before the execution timeout".into(),
                    failover: false,
                })
            }
            Ok(Err(e @ ExchangeError::ClosedEarly(_))) if reused => {
                tracing::debug!(error = %e, "stale pooled runtime connection, retrying once");
                continue;
            }
            Ok(Err(e)) => {
                return Err(OpenFailure::error(format!("runtime request failed: {e}")));
            }
            Ok(Ok(head)) => {
                buf.advance(head.len);
                head
            }
        };
        if !(200..300).contains(&head.status) {
            return Err(OpenFailure::error(format!(
                "runtime answered {}",
                head.status
            )));
        }
        return Ok(RuntimeStream {
            stream,
            body: BodyDecoder::new(head.framing),
            keep_alive: head.keep_alive,
            key,
            streaming: false,
            unseen_prefix: !buf.is_empty(),
            buf,
        });
    }
    Err(OpenFailure::error(
        "runtime closed two connections in a row".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_trace_contexts_are_valid_and_distinct() {
        let a = new_traceparent();
        assert!(is_valid_traceparent(a.as_bytes()), "{a}");
        assert_ne!(a, new_traceparent());
    }

    #[test]
    fn only_well_formed_trace_contexts_pass() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(is_valid_traceparent(good.as_bytes()));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        ] {
            assert!(!is_valid_traceparent(bad.as_bytes()), "{bad}");
        }
    }
}
