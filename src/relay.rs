//! One runtime execution: open the runtime's stream, then relay its frames to the client as
//! Agent2UI events, inline, each event whole and flushed as soon as its frame is complete.
//!
//! Opening is separate from relaying so that a runtime that fails before its first byte can be
//! failed over to legacy; once a byte reached the client every failure ends the stream with
//! exactly one `error` event instead.

use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;
use tokio::sync::mpsc;

use crate::agent2ui::{self, Mapped, StreamMapper};
use crate::config::Mode;
use crate::routing::RolloutDecision;
use crate::sse::{SseError, SseParser};
use crate::state::{Active, Shared};
use crate::stats::Outcome;
use crate::upstream;

/// Request headers passed on to the runtime besides the ones the proxy sets.
const FORWARDED_HEADERS: &[&str] = &[
    "authorization",
    "x-request-id",
    "traceparent",
    "tracestate",
    "accept-language",
    "user-agent",
];

/// Grace for the last write after the execution deadline.
const WRITE_GRACE: Duration = Duration::from_secs(1);

/// Upstream chunks buffered between the runtime reader and the client writer.
const RELAY_QUEUE: usize = 8;

/// The runtime answered 2xx and its body is ready to be relayed.
pub struct RuntimeStream {
    session: HttpSession,
    peer: HttpPeer,
}

impl RuntimeStream {
    /// The next piece of the runtime's body; `None` at its end.
    pub async fn read_chunk(&mut self) -> pingora::Result<Option<Bytes>> {
        self.session.read_response_body().await
    }

    /// Return the connection to the pool if the response was read to its end; drop it otherwise.
    pub async fn release(mut self, shared: &Shared, idle: Duration) {
        if self.session.response_done() {
            shared
                .connector
                .release_http_session(self.session, &self.peer, Some(idle))
                .await;
        }
    }
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

fn runtime_request(
    active: &Active,
    downstream: &RequestHeader,
    body_len: usize,
    shadow: bool,
) -> pingora::Result<RequestHeader> {
    let rt = &active.config.runtime;
    let mut req = RequestHeader::build("POST", rt.stream_path.as_bytes(), Some(12))?;
    req.insert_header("host", rt.address.as_str())?;
    req.insert_header("content-type", "application/json")?;
    req.insert_header("content-length", body_len.to_string())?;
    req.insert_header("accept", "text/event-stream")?;
    for name in FORWARDED_HEADERS {
        if let Some(v) = downstream.headers.get(*name) {
            req.insert_header(*name, v.clone())?;
        }
    }
    if shadow {
        req.insert_header(SHADOW_HEADER, "1")?;
    }
    Ok(req)
}

fn is_timeout(e: &pingora::Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectTimedout
            | ErrorType::ReadTimedout
            | ErrorType::WriteTimedout
            | ErrorType::TLSHandshakeTimedout
    )
}

/// Send the runtime request and wait for a 2xx response header, until `deadline`.
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
    let header = runtime_request(active, downstream, body.len(), shadow)
        .map_err(|e| OpenFailure::error(format!("building runtime request: {e}")))?;

    // A pooled connection the runtime closed meanwhile fails on first use; one fresh attempt
    // is safe because such a connection never delivered the request.
    for attempt in 0..2 {
        // Refused or timed out, a connection that could not be made is a connect failure: an
        // error (CONTRACT.md, "Breaker and failover"), not an execution timeout.
        let (mut session, reused) = shared
            .connector
            .get_http_session(&peer)
            .await
            .map_err(|e| OpenFailure::error(format!("connecting to runtime: {e}")))?;
        let exchange = async {
            session
                .write_request_header(Box::new(header.clone()))
                .await?;
            session.write_request_body(body.clone(), true).await?;
            session.finish_request_body().await?;
            session.read_response_header().await
        };
        match tokio::time::timeout_at(deadline.into(), exchange).await {
            Err(_) => {
                return Err(OpenFailure {
                    outcome: Outcome::Timeout,
                    detail: "runtime sent no response header before the execution timeout".into(),
                    failover: false,
                })
            }
            Ok(Err(e)) if reused && attempt == 0 => {
                tracing::debug!(error = %e, "stale pooled runtime connection, retrying once");
                continue;
            }
            Ok(Err(e)) => {
                return Err(OpenFailure::error(format!("runtime request failed: {e}")));
            }
            Ok(Ok(())) => {}
        }
        let status = session
            .response_header()
            .map(|h| h.status.as_u16())
            .unwrap_or(0);
        if !(200..300).contains(&status) {
            return Err(OpenFailure::error(format!("runtime answered {status}")));
        }
        return Ok(RuntimeStream { session, peer });
    }
    Err(OpenFailure::error(
        "runtime closed two connections in a row".into(),
    ))
}

/// What happened on a relayed stream; the proxy records it once the request ends.
#[derive(Debug, Default, Clone)]
pub struct StreamReport {
    /// `None` when the client went away or the proxy shut down: not the runtime's fault.
    pub outcome: Option<Outcome>,
    /// The `code` of the error event sent, if any.
    pub error_code: Option<&'static str>,
    pub detail: Option<String>,
    pub first_write: Option<Duration>,
    pub events: u64,
    pub bytes: u64,
}

/// The response header of a rewritten runtime stream. HTTP/1.1 clients get chunked framing
/// (flushed per chunk, keep-alive intact); HTTP/1.0 clients a close-delimited body.
pub fn sse_response_header(
    decision: RolloutDecision,
    version: http::Version,
) -> pingora::Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(200, Some(7))?;
    if version == http::Version::HTTP_11 {
        resp.insert_header("transfer-encoding", "chunked")?;
    }
    resp.insert_header("content-type", "text/event-stream")?;
    resp.insert_header("cache-control", "no-cache")?;
    resp.insert_header("x-accel-buffering", "no")?;
    resp.insert_header("x-execution-mode", decision.mode.as_str())?;
    resp.insert_header("x-execution-reason", decision.reason.as_str())?;
    Ok(resp)
}

enum Upstream {
    Chunk(Bytes),
    End,
    Failed(Box<pingora::Error>),
}

/// Read the runtime body on its own task so the client side can wait on timers without
/// cancelling a half-done read; the connection returns to the pool only after a clean end.
fn spawn_reader(
    shared: std::sync::Arc<Shared>,
    mut stream: RuntimeStream,
    idle: Duration,
) -> (mpsc::Receiver<Upstream>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(RELAY_QUEUE);
    let handle = tokio::spawn(async move {
        loop {
            match stream.session.read_response_body().await {
                Ok(Some(chunk)) => {
                    if tx.send(Upstream::Chunk(chunk)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    let _ = tx.send(Upstream::End).await;
                    if stream.session.response_done() {
                        shared
                            .connector
                            .release_http_session(stream.session, &stream.peer, Some(idle))
                            .await;
                    }
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Upstream::Failed(e)).await;
                    return;
                }
            }
        }
    });
    (rx, handle)
}

/// How a relayed stream ends: the error event to send (code, message), if any, and the outcome
/// (`None`: not the runtime's fault).
type StreamEnd = (Option<(&'static str, String)>, Option<Outcome>);

/// The runtime's stream is over (`[DONE]` or end of body): fine after `execution_complete`,
/// truncated otherwise.
fn stream_ended(completed: bool) -> StreamEnd {
    if completed {
        (None, Some(Outcome::Success))
    } else {
        (
            Some((
                "STREAM_TRUNCATED",
                "runtime stream ended without execution_complete".into(),
            )),
            Some(Outcome::Error),
        )
    }
}

enum Wake {
    Upstream(Option<Upstream>),
    Deadline,
    Heartbeat,
    ClientGone,
    Cutoff,
}

/// Everything the relay loop needs besides the client session.
pub struct RelayArgs {
    pub shared: std::sync::Arc<Shared>,
    pub decision: RolloutDecision,
    pub session_id: String,
    pub started: Instant,
    pub deadline: Instant,
    pub heartbeat: Duration,
    pub max_frame_bytes: usize,
    pub pool_idle: Duration,
}

/// Relay a runtime stream to the client until it completes, fails, times out or the client goes.
pub async fn relay(session: &mut Session, stream: RuntimeStream, args: RelayArgs) -> StreamReport {
    let metrics = args.shared.metrics;
    let mut report = StreamReport::default();
    let version = session.req_header().version;
    let header = match sse_response_header(args.decision, version) {
        Ok(h) => h,
        Err(e) => {
            report.outcome = Some(Outcome::Error);
            report.detail = Some(e.to_string());
            return report;
        }
    };
    let header_written = tokio::time::timeout_at(
        write_by(args.deadline).into(),
        session.write_response_header(Box::new(header), false),
    )
    .await;
    if !matches!(header_written, Ok(Ok(()))) {
        return report;
    }

    let (mut rx, reader) = spawn_reader(args.shared.clone(), stream, args.pool_idle);
    let mut cutoff = args.shared.cutoff.subscribe();
    let mut parser = SseParser::new(args.max_frame_bytes);
    let mut mapper = StreamMapper::new(&args.session_id);
    let mut events = Vec::new();
    let mut out = Vec::with_capacity(4096);
    let mut completed = false;
    let mut last_write = Instant::now();

    let mode = Mode::RuntimeOrchestrator.as_str();
    let _in_flight = InFlight::new(metrics.streams_in_flight.with_label_values(&[mode]));

    loop {
        // A heartbeat interval too long to add to an Instant just never fires before the deadline.
        let heartbeat_at = last_write
            .checked_add(args.heartbeat)
            .unwrap_or(args.deadline);
        let wake = tokio::select! {
            biased;
            m = rx.recv() => Wake::Upstream(m),
            _ = tokio::time::sleep_until(args.deadline.into()) => Wake::Deadline,
            _ = cutoff.wait_for(|c| *c) => Wake::Cutoff,
            _ = tokio::time::sleep_until(heartbeat_at.into()) => Wake::Heartbeat,
            _ = client_gone(session) => Wake::ClientGone,
        };
        // `Some(end)` once the stream is over: the error event to send, if any, and the outcome.
        let mut end: Option<StreamEnd> = None;
        match wake {
            Wake::Upstream(Some(Upstream::Chunk(chunk))) => {
                events.clear();
                let parsed = parser.feed(&chunk, &mut events);
                for ev in &events {
                    // After `execution_complete` the client has its `done`: anything but the
                    // `[DONE]` marker would follow it as a second terminal event or as stray
                    // messages.
                    if completed && ev.data.trim() != "[DONE]" {
                        metrics
                            .sse_dropped_frames_total
                            .with_label_values(&["after_done"])
                            .inc();
                        continue;
                    }
                    match mapper.map(ev, &mut out) {
                        Mapped::Message(kind) => {
                            metrics.sse_events_total.with_label_values(&[kind]).inc();
                            report.events += 1;
                        }
                        Mapped::Skipped => {}
                        Mapped::Heartbeat => {
                            metrics
                                .sse_events_total
                                .with_label_values(&["heartbeat"])
                                .inc();
                            report.events += 1;
                        }
                        Mapped::Done => {
                            metrics.sse_events_total.with_label_values(&["done"]).inc();
                            report.events += 1;
                            completed = true;
                        }
                        Mapped::Failed { code, message } => {
                            metrics.sse_events_total.with_label_values(&["error"]).inc();
                            // The runtime's own code is unbounded: label it as one kind.
                            metrics
                                .stream_errors_total
                                .with_label_values(&["EXECUTION_ERROR"])
                                .inc();
                            report.events += 1;
                            report.error_code = Some("EXECUTION_ERROR");
                            report.detail = Some(format!("{code}: {message}"));
                            end = Some((None, Some(Outcome::Error)));
                            break;
                        }
                        Mapped::End => {
                            end = Some(stream_ended(completed));
                            break;
                        }
                        Mapped::Malformed => metrics
                            .sse_dropped_frames_total
                            .with_label_values(&["malformed"])
                            .inc(),
                        Mapped::Unknown => metrics
                            .sse_dropped_frames_total
                            .with_label_values(&["unknown_event"])
                            .inc(),
                    }
                    if report.first_write.is_none() && !out.is_empty() {
                        // The first event leaves at once instead of after the whole first read
                        // (up to 64 KiB of frames) is rewritten: time to first event is what
                        // the user sees.
                        let bytes = Bytes::from(std::mem::take(&mut out));
                        report.bytes += bytes.len() as u64;
                        if !write_client(session, Some(bytes), false, args.deadline).await {
                            reader.abort();
                            report.detail = Some("client disconnected or stopped reading".into());
                            return report;
                        }
                        last_write = Instant::now();
                        report.first_write = Some(args.started.elapsed());
                    }
                }
                if end.is_none() {
                    if let Err(SseError::FrameTooLarge { limit }) = parsed {
                        end = Some((
                            Some((
                                "FRAME_TOO_LARGE",
                                format!("runtime sent a frame larger than {limit} bytes"),
                            )),
                            Some(Outcome::Error),
                        ));
                    }
                }
            }
            Wake::Upstream(Some(Upstream::End)) | Wake::Upstream(None) => {
                parser.finish();
                end = Some(stream_ended(completed));
            }
            Wake::Upstream(Some(Upstream::Failed(e))) => {
                end = Some(if completed {
                    (None, Some(Outcome::Success))
                } else if is_timeout(&e) {
                    (
                        Some(("TIMEOUT", format!("runtime stream timed out: {e}"))),
                        Some(Outcome::Timeout),
                    )
                } else {
                    (
                        Some((
                            "RUNTIME_DISCONNECTED",
                            format!("runtime stream failed: {e}"),
                        )),
                        Some(Outcome::Error),
                    )
                });
            }
            Wake::Deadline => {
                end = Some(if completed {
                    // The client already has its `done`; only [DONE] or the end was missing.
                    (None, Some(Outcome::Success))
                } else {
                    (
                        Some((
                            "TIMEOUT",
                            format!(
                                "runtime execution exceeded {} ms",
                                (args.deadline - args.started).as_millis()
                            ),
                        )),
                        Some(Outcome::Timeout),
                    )
                });
            }
            Wake::Cutoff => {
                end = Some((
                    Some((
                        "SHUTTING_DOWN",
                        "the proxy is shutting down; please retry".into(),
                    )),
                    None,
                ));
            }
            Wake::Heartbeat => {
                agent2ui::heartbeat_event(&mut out);
                metrics
                    .sse_events_total
                    .with_label_values(&["heartbeat"])
                    .inc();
            }
            Wake::ClientGone => {
                reader.abort();
                report.detail = Some("client disconnected".into());
                return report;
            }
        }

        if let Some((Some((code, message)), _)) = &end {
            agent2ui::error_event(&mut out, code, message);
            metrics.sse_events_total.with_label_values(&["error"]).inc();
            metrics.stream_errors_total.with_label_values(&[code]).inc();
            report.events += 1;
            report.error_code = Some(code);
            if report.detail.is_none() {
                report.detail = Some(message.clone());
            }
        }
        if !out.is_empty() {
            let done = end.is_some();
            let bytes = Bytes::from(std::mem::take(&mut out));
            report.bytes += bytes.len() as u64;
            if !write_client(session, Some(bytes), done, args.deadline).await {
                reader.abort();
                report.outcome = None;
                report.detail = Some("client disconnected or stopped reading".into());
                return report;
            }
            last_write = Instant::now();
            report
                .first_write
                .get_or_insert_with(|| args.started.elapsed());
            out = Vec::with_capacity(4096);
            if done {
                report.outcome = end.and_then(|(_, o)| o);
                finish_reader(reader, report.outcome);
                return report;
            }
        } else if let Some((_, outcome)) = end {
            write_client(session, None, true, args.deadline).await;
            report.outcome = outcome;
            finish_reader(reader, report.outcome);
            return report;
        }
    }
}

/// After a clean end the reader may still be reading the body's terminator before it returns
/// the connection to the pool; give it a moment rather than cutting it. Otherwise stop it now,
/// which closes the runtime connection.
fn finish_reader(reader: tokio::task::JoinHandle<()>, outcome: Option<Outcome>) {
    if outcome == Some(Outcome::Success) {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            reader.abort();
        });
    } else {
        reader.abort();
    }
}

/// How long a client write may wait: until the execution deadline, or a short grace past it so
/// the final event still reaches a client that is reading.
fn write_by(deadline: Instant) -> Instant {
    let now = Instant::now();
    if now < deadline {
        deadline
    } else {
        now + WRITE_GRACE
    }
}

/// Write to the client; false when it went away or stopped reading (its socket stayed full
/// until `write_by`), which must not hold the runtime stream open.
async fn write_client(
    session: &mut Session,
    body: Option<Bytes>,
    end: bool,
    deadline: Instant,
) -> bool {
    let write = session.write_response_body(body, end);
    match tokio::time::timeout_at(write_by(deadline).into(), write).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            // Pingora still finishes the response after us, with no timeout on that last
            // write: a client that is not reading would hold the connection forever.
            session.set_keepalive(None);
            if let Some(fd) = session.downstream_session.stream().map(|s| s.id()) {
                shutdown_socket(fd);
            }
            false
        }
    }
}

/// Shut a socket down in both directions so pending and later writes fail at once.
fn shutdown_socket(fd: std::os::fd::RawFd) {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is the client socket the session still owns and keeps open; ManuallyDrop
    // keeps this temporary handle from closing it, and only shutdown(2) is called through it.
    let socket = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    let _ = socket.shutdown(std::net::Shutdown::Both);
}

/// Resolves when the client has gone away (closed or reset). Bytes of a pipelined next request
/// are not a disconnect: with pipelining enabled (see `proxy::request_filter`) Pingora keeps them
/// for the next request; otherwise the probe consumed one, and the connection is simply not kept
/// alive after this response.
pub async fn client_gone(session: &mut Session) {
    let downstream = &mut session.downstream_session;
    match downstream.read_body_or_idle(true).await {
        Err(e)
            if matches!(
                e.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError
            ) => {}
        _ => {
            downstream.set_keepalive(None);
            std::future::pending::<()>().await
        }
    }
}

/// Keeps a gauge raised for as long as it lives.
pub struct InFlight(prometheus::IntGauge);

impl InFlight {
    pub fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
