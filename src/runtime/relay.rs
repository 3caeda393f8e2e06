//! One runtime execution relayed to the client: the runtime's frames become Agent2UI events,
//! inline, each event whole and flushed as soon as its frame is complete. Once a byte reached the
//! client every failure ends the stream with exactly one `error` event.

use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::ErrorType;

use crate::app::state::Shared;
use crate::core::agent2ui::{self, Completion, DoneEvent, MapSettings, Mapped, StreamMapper};
use crate::core::bridge::AssistantMessage;
use crate::core::config::Mode;
use crate::core::h1::BodyError;
use crate::core::routing::RolloutDecision;
use crate::core::sse::{SseError, SseParser};
use crate::core::stats::Outcome;
use crate::core::stream::{self, End, Facts, Verdict};
use crate::runtime::bridge::{Bridge, Credentials, Persisted, Target};
use crate::runtime::connection::RuntimeStream;

/// Grace for the last write after the execution deadline.
const WRITE_GRACE: Duration = Duration::from_secs(1);

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

/// The runtime's body is over: read to its end, or its framing or connection broke.
fn body_end(parser: &mut SseParser, body: Result<(), BodyError>) -> End {
    match body {
        Ok(()) => {
            parser.finish();
            End::BodyEnd
        }
        Err(e) => End::Broken(e.to_string()),
    }
}

enum Wake {
    /// Bytes read from the runtime (0: end of file), or the read failed.
    Upstream(std::io::Result<usize>),
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
    /// The client event cap and the stream org's file link signer.
    pub map: MapSettings,
    /// Where the answer is saved before `done`, with the bridge on.
    pub saving: Option<Saving>,
    /// The user message's save, started when the runtime accepted the chat: it completes before
    /// the first client event is written.
    pub user_saved: Option<tokio::task::JoinHandle<()>>,
}

/// The conversation bridge's part of a relay: legacy saves the runtime's answer.
pub struct Saving {
    pub bridge: std::sync::Arc<Bridge>,
    pub target: Target,
    pub who: Credentials,
}

/// Relay a runtime stream to the client until it completes, fails, times out or the client goes.
pub async fn relay(
    session: &mut Session,
    stream: RuntimeStream,
    mut args: RelayArgs,
) -> StreamReport {
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

    let mut stream = stream;
    let mut cutoff = args.shared.cutoff.subscribe();
    let mut parser = SseParser::new(args.max_frame_bytes);
    let mut mapper = StreamMapper::with_settings(&args.session_id, std::mem::take(&mut args.map));
    if args.saving.is_some() {
        mapper = mapper.keeping_text();
    }
    let mut events = Vec::new();
    let mut out = Vec::new();
    let mut completed = false;
    let mut runtime_error: Option<String> = None;
    let mut last_write = Instant::now();
    let mut tally = EventTally::new(metrics);

    let mode = Mode::RuntimeOrchestrator.as_str();
    let _in_flight = InFlight::new(metrics.streams_in_flight.with_label_values(&[mode]));

    loop {
        // A heartbeat interval too long to add to an Instant just never fires before the deadline.
        let heartbeat_at = last_write
            .checked_add(args.heartbeat)
            .unwrap_or(args.deadline);
        // The deadline and the shutdown cutoff are asked first: a runtime that floods the stream
        // keeps `fill` ready on every turn and would otherwise outrun both.
        let wake = tokio::select! {
            biased;
            _ = tokio::time::sleep_until(args.deadline.into()) => Wake::Deadline,
            _ = cutoff.wait_for(|c| *c) => Wake::Cutoff,
            r = stream.fill() => Wake::Upstream(r),
            _ = tokio::time::sleep_until(heartbeat_at.into()) => Wake::Heartbeat,
            _ = client_gone(session) => Wake::ClientGone,
        };
        // `Some(end)` once the stream is over.
        let mut end: Option<End> = None;
        match wake {
            Wake::Upstream(Ok(0)) => end = Some(body_end(&mut parser, stream.eof())),
            Wake::Upstream(Ok(_)) => {
                events.clear();
                // Rewritten events are a little larger than the frames they come from.
                let room = stream.buffered() + stream.buffered() / 2;
                out.reserve(room);
                let (body, parsed) = stream.parse_into(&mut parser, &mut events);
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
                            tally.add(kind);
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
                        Mapped::Complete(completion) => {
                            metrics.sse_events_total.with_label_values(&["done"]).inc();
                            report.events += 1;
                            completed = true;
                            let latency_ms = args.started.elapsed().as_millis() as u64;
                            // What the user already has leaves now, not after the save.
                            let mut gone = false;
                            if !out.is_empty() {
                                let bytes = Bytes::from(std::mem::take(&mut out));
                                report.bytes += bytes.len() as u64;
                                user_message_saved(&mut args.user_saved).await;
                                gone =
                                    !write_client(session, Some(bytes), false, args.deadline).await;
                                last_write = Instant::now();
                                report
                                    .first_write
                                    .get_or_insert_with(|| args.started.elapsed());
                            }
                            // The execution is over: its answer is saved even for a client
                            // that has just left.
                            let message_id =
                                save_answer(&args, &mut mapper, &completion, latency_ms).await;
                            if gone {
                                report.detail =
                                    Some("client disconnected or stopped reading".into());
                                return report;
                            }
                            agent2ui::done_event(
                                &mut out,
                                &DoneEvent {
                                    session_id: mapper.session_id(),
                                    message_id: &message_id,
                                    tokens: completion.tokens.unwrap_or(0),
                                    latency_ms,
                                },
                            );
                        }
                        Mapped::Failed { code, message } => {
                            metrics.sse_events_total.with_label_values(&["error"]).inc();
                            // The runtime's own code is unbounded: label it as one kind,
                            // a user's cancel apart, since it is nobody's failure.
                            let kind = if code == stream::CANCELLED_CODE {
                                stream::CANCELLED_CODE
                            } else {
                                "EXECUTION_ERROR"
                            };
                            metrics.stream_errors_total.with_label_values(&[kind]).inc();
                            report.events += 1;
                            report.error_code = Some(kind);
                            report.detail = Some(format!("{code}: {message}"));
                            runtime_error = Some(code);
                            end = Some(End::ExecutionError);
                            break;
                        }
                        Mapped::End => {
                            end = Some(End::Done);
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
                        // (up to 32 KiB of frames) is rewritten: time to first event is what
                        // the user sees.
                        let bytes =
                            Bytes::from(std::mem::replace(&mut out, Vec::with_capacity(room)));
                        report.bytes += bytes.len() as u64;
                        user_message_saved(&mut args.user_saved).await;
                        if !write_client(session, Some(bytes), false, args.deadline).await {
                            report.detail = Some("client disconnected or stopped reading".into());
                            return report;
                        }
                        last_write = Instant::now();
                        report.first_write = Some(args.started.elapsed());
                    }
                }
                tally.flush();
                if end.is_none() {
                    if let Err(SseError::FrameTooLarge { limit }) = parsed {
                        end = Some(End::FrameTooLarge { limit });
                    }
                }
                if end.is_none() {
                    end = match body {
                        Ok(false) => None,
                        Ok(true) => Some(body_end(&mut parser, Ok(()))),
                        Err(e) => Some(body_end(&mut parser, Err(e))),
                    };
                }
            }
            Wake::Upstream(Err(e)) => end = Some(End::Broken(e.to_string())),
            Wake::Deadline => {
                end = Some(End::Deadline {
                    budget: args.deadline - args.started,
                });
            }
            Wake::Cutoff => end = Some(End::Shutdown),
            Wake::Heartbeat => {
                agent2ui::heartbeat_event(&mut out);
                metrics
                    .sse_events_total
                    .with_label_values(&["heartbeat"])
                    .inc();
            }
            Wake::ClientGone => {
                report.detail = Some("client disconnected".into());
                return report;
            }
        }

        let verdict = end.map(|end| {
            stream::verdict(&Facts {
                client: true,
                completed,
                runtime_error: runtime_error.take(),
                end,
            })
        });
        if let Some(Verdict {
            closing: Some(closing),
            ..
        }) = &verdict
        {
            agent2ui::error_event(&mut out, closing.code, &closing.message);
            metrics.sse_events_total.with_label_values(&["error"]).inc();
            metrics
                .stream_errors_total
                .with_label_values(&[closing.code])
                .inc();
            report.events += 1;
            report.error_code = Some(closing.code);
            if report.detail.is_none() {
                report.detail = Some(closing.message.clone());
            }
        }
        if !out.is_empty() {
            let bytes = Bytes::from(std::mem::take(&mut out));
            report.bytes += bytes.len() as u64;
            user_message_saved(&mut args.user_saved).await;
            if !write_client(session, Some(bytes), verdict.is_some(), args.deadline).await {
                report.outcome = None;
                report.detail = Some("client disconnected or stopped reading".into());
                return report;
            }
            last_write = Instant::now();
            report
                .first_write
                .get_or_insert_with(|| args.started.elapsed());
            out = Vec::new();
            if let Some(verdict) = verdict {
                report.outcome = verdict.outcome;
                finish_runtime(stream, &args, report.outcome);
                return report;
            }
        } else if let Some(verdict) = verdict {
            write_client(session, None, true, args.deadline).await;
            report.outcome = verdict.outcome;
            finish_runtime(stream, &args, report.outcome);
            return report;
        }
    }
}

/// `done.messageId`: the id legacy saved the answer under (the proxy's own while the save is
/// retried in the background), or with the bridge off the stream's own id.
async fn save_answer(
    args: &RelayArgs,
    mapper: &mut StreamMapper,
    completion: &Completion,
    latency_ms: u64,
) -> String {
    let Some(saving) = &args.saving else {
        return mapper.message_id().to_string();
    };
    let answer = AssistantMessage::new(
        &completion.final_response,
        &mapper.take_text(),
        completion.tokens,
        latency_ms,
    );
    let persisted = saving
        .bridge
        .persist_assistant(&saving.target, &saving.who, &args.session_id, answer)
        .await;
    match persisted {
        Persisted::Saved(id) => id,
        Persisted::Deferred { message_id, .. } => message_id,
    }
}

/// After a clean end the connection goes back to the pool, once its body is read to the end;
/// otherwise it is closed, which tells the runtime to stop.
fn finish_runtime(stream: RuntimeStream, args: &RelayArgs, outcome: Option<Outcome>) {
    if outcome == Some(Outcome::Success) {
        stream.release_when_done(args.shared.clone(), args.pool_idle);
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

/// Wait for the user message's save before the first client event (at once after it).
async fn user_message_saved(pending: &mut Option<tokio::task::JoinHandle<()>>) {
    if let Some(save) = pending.take() {
        // The save is bounded by `bridge.timeout_ms`; a panic in it is no reason to drop the stream.
        let _ = save.await;
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

/// Message events counted per kind and added to `sse_events_total` once per read rather than
/// once per event: a label lookup per event was a measurable part of the relay's CPU.
struct EventTally {
    metrics: &'static crate::ops::metrics::Metrics,
    counts: Vec<(&'static str, u64)>,
}

impl EventTally {
    fn new(metrics: &'static crate::ops::metrics::Metrics) -> Self {
        EventTally {
            metrics,
            counts: Vec::new(),
        }
    }

    fn add(&mut self, kind: &'static str) {
        match self.counts.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => self.counts.push((kind, 1)),
        }
    }

    fn flush(&mut self) {
        for (kind, n) in self.counts.iter_mut().filter(|(_, n)| *n > 0) {
            self.metrics
                .sse_events_total
                .with_label_values(&[kind])
                .inc_by(*n);
            *n = 0;
        }
    }
}

impl Drop for EventTally {
    fn drop(&mut self) {
        self.flush();
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
