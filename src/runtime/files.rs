//! A runtime file fetched for the proxy's files route: a GET to the configured runtime address,
//! its response head, then its body piece by piece as the runtime sends it, so a large file is
//! never held whole.

use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use pingora::http::RequestHeader;
use pingora::protocols::Stream;
use tokio::io::AsyncReadExt;

use crate::app::state::{Active, Shared};
use crate::app::upstream;
use crate::core::h1::{self, BodyDecoder, Framing};
use crate::runtime::exchange::{self, ExchangeError};
use crate::runtime::pool;

/// Request headers of the download passed on to the runtime: tracing only, never the caller's
/// credentials.
const FORWARDED_HEADERS: &[&str] = &["x-request-id", "traceparent", "tracestate"];

const READ_SIZE: usize = 32 * 1024;

/// The runtime's answer to a file request; its body is read with [`RuntimeFile::next`].
pub struct RuntimeFile {
    pub status: u16,
    pub content_type: Option<Vec<u8>>,
    pub content_disposition: Option<Vec<u8>>,
    /// Known up front when the runtime sent a Content-Length.
    pub content_length: Option<u64>,
    stream: Stream,
    buf: BytesMut,
    body: BodyDecoder,
    keep_alive: bool,
    key: pool::Key,
}

/// GET `target` (a path and query) from the runtime, waiting for its response head until
/// `deadline`. The error is for the log only.
pub async fn fetch(
    shared: &Shared,
    active: &Active,
    target: &str,
    downstream: &RequestHeader,
    deadline: Instant,
) -> Result<RuntimeFile, String> {
    let rt = &active.config.runtime;
    let addr = shared
        .resolver
        .resolve(&rt.address)
        .await
        .map_err(|e| format!("resolving runtime address: {e}"))?;
    let peer = upstream::peer(addr, &active.runtime);
    let key = pool::key(addr);
    let mut headers: Vec<(&str, &[u8])> = vec![("host", rt.address.as_bytes())];
    for name in FORWARDED_HEADERS {
        if let Some(v) = downstream.headers.get(*name) {
            headers.push((name, v.as_bytes()));
        }
    }
    let request = h1::encode_request("GET", target, &headers, b"");

    // A pooled connection the runtime closed meanwhile fails on first use; a GET is safe to
    // send once more on a fresh one.
    for attempt in 0..2 {
        let connection = shared
            .runtime_pool
            .for_attempt(attempt, key, &peer, active.runtime.pool_idle_timeout)
            .await;
        let (mut stream, reused) = connection.map_err(|e| format!("connecting to runtime: {e}"))?;
        let mut buf = BytesMut::new();
        let exchanged = tokio::time::timeout_at(
            deadline.into(),
            exchange::request_head(&mut stream, &request, &mut buf),
        )
        .await
        .map_err(|_| "runtime sent no response header in time".to_string())?;
        let head = match exchanged {
            Ok(head) => head,
            Err(ExchangeError::ClosedEarly(_)) if reused => continue,
            Err(e) => return Err(format!("runtime request failed: {e}")),
        };
        let head_bytes = buf.split_to(head.len);
        let header = |name| h1::header_value(&head_bytes, name).map(<[u8]>::to_vec);
        return Ok(RuntimeFile {
            status: head.status,
            content_type: header("content-type"),
            content_disposition: header("content-disposition"),
            content_length: match head.framing {
                Framing::Length(n) => Some(n),
                Framing::Chunked | Framing::Close => None,
            },
            stream,
            buf,
            body: BodyDecoder::new(head.framing),
            keep_alive: head.keep_alive,
            key,
        });
    }
    Err("runtime closed two connections in a row".into())
}

impl RuntimeFile {
    /// The next piece of the body, `None` at its end; a read that waits longer than `idle` fails,
    /// as does a body that ends before its framing says.
    pub async fn next(&mut self, idle: Duration) -> Result<Option<Bytes>, String> {
        loop {
            if !self.buf.is_empty() {
                let mut out = Vec::new();
                let used = self
                    .body
                    .decode(&self.buf, |piece| out.extend_from_slice(piece))
                    .map_err(|e| e.to_string())?;
                self.buf.advance(used);
                if !out.is_empty() {
                    return Ok(Some(Bytes::from(out)));
                }
            }
            if self.body.is_done() {
                return Ok(None);
            }
            self.buf.reserve(READ_SIZE);
            let read = tokio::time::timeout(idle, self.stream.read_buf(&mut self.buf))
                .await
                .map_err(|_| "runtime stopped sending the file".to_string())?
                .map_err(|e| format!("reading the file from the runtime: {e}"))?;
            if read == 0 {
                self.body.eof().map_err(|e| e.to_string())?;
                return Ok(None);
            }
        }
    }

    /// Return the connection to the pool if the body was read to its end and it can carry
    /// another request; close it otherwise.
    pub fn release(self, shared: &Shared) {
        if self.body.is_done() && self.keep_alive && self.buf.is_empty() {
            shared.runtime_pool.put(self.key, self.stream);
        }
    }
}
