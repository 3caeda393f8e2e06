//! One runtime execution's connection: the request through the runtime's client
//! (`upstream::Upstream`), the response head, and the body read by whoever relays it.
//!
//! Opening is separate from relaying so that a runtime that fails before its first byte (refuses,
//! answers non-2xx, or sends no head within `runtime.response_timeout_ms`) can be failed over to
//! legacy. The body is read by the caller through `runtime::events`, under the
//! runtime's idle deadline.

use std::time::Instant;

use bytes::Bytes;
use pingora::http::RequestHeader;
use tokio::net::TcpStream;

use crate::core::h1;
use crate::core::stats::Outcome;
use crate::state::{Active, Shared};
use crate::upstream::{Body, Call, Failure, Stage};

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

/// The runtime answered 2xx: its body, read through
/// [`RuntimeEvents`](crate::runtime::events::RuntimeEvents) under the runtime's idle deadline.
pub type RuntimeStream = Body<TcpStream>;

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

/// Send the runtime request and wait for a 2xx response head, within the runtime's response
/// timeout and until `deadline`.
pub async fn open(
    shared: &Shared,
    active: &Active,
    downstream: &RequestHeader,
    body: Bytes,
    deadline: Instant,
    shadow: bool,
) -> Result<RuntimeStream, OpenFailure> {
    let request = runtime_request(active, downstream, &body, shadow);
    let call = Call::new(&active.config.runtime.address, active.runtime);
    let sent = tokio::time::timeout_at(deadline.into(), shared.runtime.send(&call, &request)).await;
    let response = match sent {
        Err(_) => {
            return Err(OpenFailure {
                outcome: Outcome::Timeout,
                detail: "runtime sent no response header before the execution timeout".into(),
                failover: false,
            })
        }
        // Nothing reached the client: legacy can answer in the time the user still has.
        Ok(Err(Failure::Silent(silence))) if silence.stage == Stage::Response => {
            return Err(OpenFailure {
                outcome: Outcome::Timeout,
                detail: silence.to_string(),
                failover: true,
            })
        }
        // Refused, unreachable or not connected in time: the contract counts a connect failure
        // as an error, not an execution timeout.
        Ok(Err(e)) => return Err(OpenFailure::error(format!("runtime request failed: {e}"))),
        Ok(Ok(response)) => response,
    };
    if !(200..300).contains(&response.status()) {
        return Err(OpenFailure::error(format!(
            "runtime answered {}",
            response.status()
        )));
    }
    Ok(response.into_body())
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
