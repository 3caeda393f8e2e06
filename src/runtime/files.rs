//! A runtime file fetched for the proxy's files route: a GET to the configured runtime address
//! through the runtime's client, its response head, then its body piece by piece as the runtime
//! sends it (each wait bounded by `runtime.idle_timeout_ms`), so a large file is never held
//! whole.

use std::time::Instant;

use bytes::Bytes;
use pingora::http::RequestHeader;
use tokio::net::TcpStream;

use crate::core::h1::{self, Framing};
use crate::state::{Active, Shared};
use crate::upstream::{Body, Call};

/// Request headers of the download passed on to the runtime: tracing only, never the caller's
/// credentials.
const FORWARDED_HEADERS: &[&str] = &["x-request-id", "traceparent", "tracestate"];

/// The runtime's answer to a file request; its body is read with [`RuntimeFile::next`].
pub struct RuntimeFile {
    pub status: u16,
    pub content_type: Option<Vec<u8>>,
    pub content_disposition: Option<Vec<u8>>,
    /// Known up front when the runtime sent a Content-Length.
    pub content_length: Option<u64>,
    body: Body<TcpStream>,
}

/// GET `target` (a path and query) from the runtime, waiting for its response head within the
/// runtime's response timeout and until `deadline`. The error is for the log only.
pub async fn fetch(
    shared: &Shared,
    active: &Active,
    target: &str,
    downstream: &RequestHeader,
    deadline: Instant,
) -> Result<RuntimeFile, String> {
    let rt = &active.config.runtime;
    let mut headers: Vec<(&str, &[u8])> = vec![("host", rt.address.as_bytes())];
    for name in FORWARDED_HEADERS {
        if let Some(v) = downstream.headers.get(*name) {
            headers.push((name, v.as_bytes()));
        }
    }
    let request = h1::encode_request("GET", target, &headers, b"");
    let call = Call::new(&rt.address, active.runtime);
    let response = tokio::time::timeout_at(deadline.into(), shared.runtime.send(&call, &request))
        .await
        .map_err(|_| "runtime sent no response header in time".to_string())?
        .map_err(|e| format!("runtime request failed: {e}"))?;
    let header = |name| response.header(name).map(<[u8]>::to_vec);
    Ok(RuntimeFile {
        status: response.status(),
        content_type: header("content-type"),
        content_disposition: header("content-disposition"),
        content_length: match response.head.framing {
            Framing::Length(n) => Some(n),
            Framing::Chunked | Framing::Close => None,
        },
        body: response.into_body(),
    })
}

impl RuntimeFile {
    /// The next piece of the body, `None` at its end; a runtime silent for its idle timeout
    /// fails the read, as does a body that ends before its framing says.
    pub async fn next(&mut self) -> Result<Option<Bytes>, String> {
        self.body.next().await.map_err(|e| e.to_string())
    }

    /// Return the connection to the pool if the body was read to its end and it can carry
    /// another request; close it otherwise.
    pub fn release(self) {
        self.body.release()
    }
}
