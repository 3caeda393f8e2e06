//! One runtime execution relayed to the client: the runtime's frames become Agent2UI events,
//! inline, each event whole and flushed as soon as its frame is complete. Until the commit point
//! (`core::commit`) the client's response head is held, and a runtime that fails is handed back
//! to be failed over; once a byte reached the client every failure ends the stream with exactly
//! one `error` event.

use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::http::ResponseHeader;

use crate::core::agent2ui::{self, Completion, DoneEvent, MapSettings, Mapped, StreamMapper};
use crate::core::bridge::AssistantMessage;
use crate::core::commit::{Precommit, Seen, Step, Trigger};
use crate::core::config::{CommitOn, CommitTimeoutAction, Mode};
use crate::core::cors::CorsHeaders;
use crate::core::h1::BodyError;
use crate::core::routing::RolloutDecision;
use crate::core::sse::{SseError, SseParser};
use crate::core::stats::Outcome;
use crate::core::stream::{self, End, Facts, Verdict};
use crate::runtime::connection::{RuntimeStream, SseBody};
use crate::runtime::detached;
use crate::runtime::downstream::Downstream;
use crate::runtime::respond::sse_response_header;
use crate::state::in_flight::InFlight;
use crate::state::Shared;
use crate::upstream::bridge::{Bridge, Credentials, Persisted, Target};
use crate::upstream::{Silence, Stage};

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

/// A read of the runtime failed: it fell silent past its idle timeout (pings count), or the
/// connection broke.
fn read_failed(e: &std::io::Error) -> End {
    match Silence::of(e) {
        Some(s) if s.stage == Stage::Idle => End::Stalled { idle: s.after },
        _ => End::Broken(e.to_string()),
    }
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
    /// `runtime.commit_timeout_ms` passed while the head was held.
    CommitDue,
    ClientGone,
    Cutoff,
}

/// How a relay ended.
pub enum Relayed {
    /// The client got the runtime's stream (or nothing, having left).
    Served(StreamReport),
    /// The runtime failed before the commit: nothing reached the client, so legacy can serve
    /// the request instead. `outcome`: the runtime's, for the breaker (a timeout when it was
    /// too slow, an error otherwise).
    FailOver { detail: String, outcome: Outcome },
}

/// A stream before its commit: the client's response head, not written yet.
struct Held {
    header: Box<ResponseHeader>,
    precommit: Precommit,
    head_at: Instant,
    commit_at: Instant,
}

/// Everything the relay loop needs besides the client session.
pub struct RelayArgs {
    pub shared: std::sync::Arc<Shared>,
    pub decision: RolloutDecision,
    /// The CORS headers of the client's response head.
    pub cors: CorsHeaders,
    pub session_id: String,
    pub started: Instant,
    pub deadline: Instant,
    pub heartbeat: Duration,
    pub max_frame_bytes: usize,
    pub commit_on: CommitOn,
    /// From the runtime's response head; zero: committed at the head.
    pub commit_timeout: Duration,
    /// What the commit timeout does when no content came by then.
    pub commit_timeout_action: CommitTimeoutAction,
    /// The client event cap and the stream org's file link signer.
    pub map: MapSettings,
    /// Where the user's message and the answer are saved, with the bridge on.
    pub saving: Option<Saving>,
}

/// The conversation bridge's part of a relay: legacy saves the user's message from the commit
/// on (it completes before the first client event is written) and the runtime's answer before
/// `done`.
pub struct Saving {
    pub bridge: std::sync::Arc<Bridge>,
    pub target: std::sync::Arc<Target>,
    pub who: Credentials,
    pub message: String,
    pub parent_id: Option<String>,
    /// The session's last message when the chat began: what this chat saves comes after it.
    pub after: Option<String>,
    /// `bridge.max_detached` with `bridge.finish_detached` on: a client that leaves after the
    /// commit still gets its answer saved (`detached`).
    pub detach: Option<usize>,
}

/// Relay a runtime stream to the client until it completes, fails, times out or the client goes;
/// or, when the runtime fails before the commit, hand the request back for legacy.
pub async fn relay<D: Downstream>(
    session: &mut D,
    stream: RuntimeStream,
    mut args: RelayArgs,
) -> Relayed {
    let metrics = args.shared.metrics;
    let mut report = StreamReport::default();
    let version = session.version();
    let header = match sse_response_header(args.decision, version, &args.cors) {
        Ok(h) => Box::new(h),
        Err(e) => {
            report.outcome = Some(Outcome::Error);
            report.detail = Some(e.to_string());
            return Relayed::Served(report);
        }
    };
    let head_at = Instant::now();
    let mut tally = EventTally::new(metrics);
    let mut user_saved = None;
    let mut held = Some(Held {
        header,
        precommit: Precommit::new(args.commit_on, args.commit_timeout_action),
        head_at,
        commit_at: head_at
            .checked_add(args.commit_timeout)
            .unwrap_or(args.deadline),
    });
    // The commit and the answer's save happen once a stream and are boxed: a future keeps
    // room for its largest await for as long as it lives, and this one lives as long as the
    // stream (boxing them halved it, to 3.3 KB).
    if args.commit_timeout.is_zero() {
        let h = held.take().expect("held until here");
        match Box::pin(commit(
            session,
            &args,
            h,
            Trigger::Head,
            &mut report,
            &mut tally,
        ))
        .await
        {
            Ok(saving) => user_saved = saving,
            Err(()) => return Relayed::Served(report),
        }
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

    let mode = Mode::RuntimeOrchestrator.as_str();
    let _in_flight = InFlight::new(metrics.streams_in_flight.with_label_values(&[mode]));

    loop {
        // A heartbeat interval too long to add to an Instant just never fires before the deadline.
        let heartbeat_at = last_write
            .checked_add(args.heartbeat)
            .unwrap_or(args.deadline);
        let commit_at = held.as_ref().map_or(args.deadline, |h| h.commit_at);
        // The deadline and the shutdown cutoff are asked first: a runtime that floods the stream
        // keeps `fill` ready on every turn and would otherwise outrun both.
        let wake = tokio::select! {
            biased;
            _ = tokio::time::sleep_until(args.deadline.into()) => Wake::Deadline,
            _ = cutoff.wait_for(|c| *c) => Wake::Cutoff,
            r = stream.fill() => Wake::Upstream(r),
            _ = tokio::time::sleep_until(heartbeat_at.into()) => Wake::Heartbeat,
            _ = tokio::time::sleep_until(commit_at.into()), if held.is_some() => Wake::CommitDue,
            _ = session.client_gone() => Wake::ClientGone,
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
                for (i, ev) in events.iter().enumerate() {
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
                    let before = out.len();
                    let mapped = mapper.map(ev, &mut out);
                    if let Some(h) = held.as_mut() {
                        let seen = match &mapped {
                            Mapped::Message("thinking") => Some(Seen::Thinking {
                                bytes: out.len() - before,
                            }),
                            Mapped::Message(_) | Mapped::Complete(_) => Some(Seen::Content),
                            Mapped::Heartbeat => Some(Seen::Ping {
                                bytes: out.len() - before,
                            }),
                            Mapped::Failed { code, .. } => Some(Seen::Error { code }),
                            Mapped::End => Some(Seen::End(&End::Done)),
                            // Nothing for the client: counted below, commits nothing.
                            Mapped::Skipped | Mapped::Malformed | Mapped::Unknown => None,
                        };
                        match seen.map(|seen| h.precommit.see(seen)) {
                            None => {}
                            // Counted as written at the commit.
                            Some(Step::Hold) => continue,
                            Some(Step::FailOver(outcome)) => {
                                return Relayed::FailOver {
                                    detail: before_commit(&mapped),
                                    outcome,
                                }
                            }
                            Some(Step::Abandon) => return Relayed::Served(report),
                            Some(Step::Commit(trigger)) => {
                                let h = held.take().expect("held");
                                match Box::pin(commit(
                                    session,
                                    &args,
                                    h,
                                    trigger,
                                    &mut report,
                                    &mut tally,
                                ))
                                .await
                                {
                                    Ok(saving) => user_saved = saving,
                                    Err(()) => return Relayed::Served(report),
                                }
                            }
                        }
                    }
                    match mapped {
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
                                user_message_saved(&mut user_saved).await;
                                gone =
                                    !write_client(session, Some(bytes), false, args.deadline).await;
                                last_write = Instant::now();
                                report
                                    .first_write
                                    .get_or_insert_with(|| args.started.elapsed());
                            }
                            // The execution is over: its answer is saved even for a client
                            // that has just left, after its question.
                            user_message_saved(&mut user_saved).await;
                            let message_id =
                                Box::pin(save_answer(&args, &mut mapper, &completion, latency_ms))
                                    .await;
                            if gone {
                                report.detail =
                                    Some("client disconnected or stopped reading".into());
                                return Relayed::Served(report);
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
                    // Held events wait for the commit.
                    if report.first_write.is_none() && !out.is_empty() && held.is_none() {
                        // The first event leaves at once instead of after the whole first read
                        // (up to 32 KiB of frames) is rewritten: time to first event is what
                        // the user sees.
                        let bytes =
                            Bytes::from(std::mem::replace(&mut out, Vec::with_capacity(room)));
                        report.bytes += bytes.len() as u64;
                        user_message_saved(&mut user_saved).await;
                        if !write_client(session, Some(bytes), false, args.deadline).await {
                            report.detail = Some("client disconnected or stopped reading".into());
                            // The events of this read not mapped yet are the detached
                            // reader's first.
                            let rest = events[i + 1..].to_vec();
                            return client_left(
                                report, args, stream, parser, mapper, rest, user_saved,
                            );
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
            Wake::Upstream(Err(e)) => end = Some(read_failed(&e)),
            Wake::Deadline => {
                end = Some(End::Deadline {
                    budget: args.deadline - args.started,
                });
            }
            Wake::Cutoff => end = Some(End::Shutdown),
            Wake::Heartbeat | Wake::CommitDue => {
                let heartbeat = matches!(wake, Wake::Heartbeat);
                if let Some(mut h) = held.take() {
                    let seen = if heartbeat {
                        Seen::Heartbeat
                    } else {
                        Seen::Timeout
                    };
                    let trigger = match h.precommit.see(seen) {
                        Step::Commit(trigger) => trigger,
                        // `commit_timeout_action = "failover"`: no content in time.
                        Step::FailOver(outcome) => {
                            return Relayed::FailOver {
                                detail: format!(
                                    "no content within runtime.commit_timeout_ms ({} ms)",
                                    args.commit_timeout.as_millis()
                                ),
                                outcome,
                            }
                        }
                        Step::Hold | Step::Abandon => unreachable!("a timer commits or fails over"),
                    };
                    match Box::pin(commit(session, &args, h, trigger, &mut report, &mut tally))
                        .await
                    {
                        Ok(saving) => user_saved = saving,
                        Err(()) => return Relayed::Served(report),
                    }
                }
                if heartbeat {
                    agent2ui::heartbeat_event(&mut out);
                    metrics
                        .sse_events_total
                        .with_label_values(&["heartbeat"])
                        .inc();
                }
            }
            Wake::ClientGone => {
                report.detail = Some("client disconnected".into());
                if held.is_none() && !completed {
                    return client_left(
                        report,
                        args,
                        stream,
                        parser,
                        mapper,
                        Vec::new(),
                        user_saved,
                    );
                }
                return Relayed::Served(report);
            }
        }

        if let (Some(end), Some(h)) = (&end, held.as_mut()) {
            match h.precommit.see(Seen::End(end)) {
                Step::Commit(trigger) => {
                    let h = held.take().expect("held");
                    match Box::pin(commit(session, &args, h, trigger, &mut report, &mut tally))
                        .await
                    {
                        Ok(saving) => user_saved = saving,
                        Err(()) => return Relayed::Served(report),
                    }
                }
                Step::Abandon => return Relayed::Served(report),
                Step::Hold => unreachable!("the end of a stream is never held"),
                Step::FailOver(outcome) => {
                    let facts = Facts {
                        client: true,
                        completed,
                        runtime_error: None,
                        end: end.clone(),
                    };
                    let detail = stream::verdict(&facts)
                        .closing
                        .map_or_else(|| format!("{end:?}"), |c| c.message);
                    return Relayed::FailOver { detail, outcome };
                }
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
        if held.is_some() {
            // Nothing leaves before the commit.
        } else if !out.is_empty() {
            let bytes = Bytes::from(std::mem::take(&mut out));
            report.bytes += bytes.len() as u64;
            user_message_saved(&mut user_saved).await;
            if !write_client(session, Some(bytes), verdict.is_some(), args.deadline).await {
                report.outcome = None;
                report.detail = Some("client disconnected or stopped reading".into());
                if verdict.is_none() && !completed {
                    return client_left(
                        report,
                        args,
                        stream,
                        parser,
                        mapper,
                        Vec::new(),
                        user_saved,
                    );
                }
                return Relayed::Served(report);
            }
            last_write = Instant::now();
            report
                .first_write
                .get_or_insert_with(|| args.started.elapsed());
            out = Vec::new();
            if let Some(verdict) = verdict {
                report.outcome = verdict.outcome;
                finish_runtime(stream, report.outcome);
                return Relayed::Served(report);
            }
        } else if let Some(verdict) = verdict {
            write_client(session, None, true, args.deadline).await;
            report.outcome = verdict.outcome;
            finish_runtime(stream, report.outcome);
            return Relayed::Served(report);
        }
    }
}

/// Commit to the runtime's stream: count why and how long the head was held, send the response
/// head, and start saving the user's message, which the first event waits for. The held
/// events are in `out` already and go out with the next write. `Err` when the client is gone.
async fn commit<D: Downstream>(
    session: &mut D,
    args: &RelayArgs,
    held: Held,
    trigger: Trigger,
    report: &mut StreamReport,
    tally: &mut EventTally,
) -> Result<Option<tokio::task::JoinHandle<()>>, ()> {
    let metrics = &args.shared.metrics.commit;
    metrics
        .commits_total
        .with_label_values(&[trigger.as_str()])
        .inc();
    metrics
        .wait_seconds
        .observe(held.head_at.elapsed().as_secs_f64());
    let kept = held.precommit.held();
    tally.add_n("thinking", kept.thinking as u64);
    args.shared
        .metrics
        .sse_events_total
        .with_label_values(&["heartbeat"])
        .inc_by(kept.pings as u64);
    report.events += kept.events() as u64;
    let written = tokio::time::timeout_at(
        write_by(args.deadline).into(),
        session.write_response_header(held.header),
    )
    .await;
    if !matches!(written, Ok(Ok(()))) {
        report.detail = Some("client disconnected before the commit".into());
        return Err(());
    }
    Ok(args.saving.as_ref().map(|s| {
        let (bridge, target, who) = (s.bridge.clone(), s.target.clone(), s.who.clone());
        let (session_id, message) = (args.session_id.clone(), s.message.clone());
        let (parent_id, after) = (s.parent_id.clone(), s.after.clone());
        tokio::spawn(async move {
            // A deferred save is retried, and logged if it never succeeds, on its own task.
            let _ = bridge
                .persist_user(
                    &target,
                    &who,
                    &session_id,
                    &message,
                    parent_id.as_deref(),
                    after,
                )
                .await;
        })
    }))
}

/// Why a stream failed over at this event (an `execution_error`, or `[DONE]` with no answer).
fn before_commit(mapped: &Mapped) -> String {
    match mapped {
        Mapped::Failed { code, message } => format!("{code}: {message}"),
        _ => "runtime stream ended without execution_complete".into(),
    }
}

/// The client left after the commit: with `bridge.finish_detached` the rest of the runtime's
/// stream is read on a task of its own and the answer saved (`detached`); otherwise the stream
/// is dropped here, which closes the runtime connection and tells the runtime to stop.
fn client_left(
    report: StreamReport,
    args: RelayArgs,
    stream: RuntimeStream,
    parser: SseParser,
    mapper: StreamMapper,
    events: Vec<crate::core::sse::SseEvent>,
    user_saved: Option<tokio::task::JoinHandle<()>>,
) -> Relayed {
    if let Some(max) = args.saving.as_ref().and_then(|s| s.detach) {
        let left = detached::Leftover {
            stream,
            parser,
            mapper,
            events,
            user_saved,
        };
        detached::finish(args, left, max);
    }
    Relayed::Served(report)
}

/// `done.messageId`: the id legacy saved the answer under (the proxy's own while the save is
/// retried in the background), or with the bridge off the stream's own id.
pub(crate) async fn save_answer(
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
        .persist_assistant(
            &saving.target,
            &saving.who,
            &args.session_id,
            answer,
            saving.after.clone(),
        )
        .await;
    match persisted {
        Persisted::Saved(id) => id,
        Persisted::Deferred { message_id, .. } => message_id,
    }
}

/// After a clean end the connection goes back to the pool, once its body is read to the end;
/// otherwise it is closed, which tells the runtime to stop.
fn finish_runtime(stream: RuntimeStream, outcome: Option<Outcome>) {
    if outcome == Some(Outcome::Success) {
        stream.release_when_done();
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
async fn write_client<D: Downstream>(
    session: &mut D,
    body: Option<Bytes>,
    end: bool,
    deadline: Instant,
) -> bool {
    let write = session.write_response_body(body, end);
    match tokio::time::timeout_at(write_by(deadline).into(), write).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            // A client that is not reading would otherwise hold the connection forever.
            session.abort();
            false
        }
    }
}

/// Message events counted per kind and added to `sse_events_total` once per read rather than
/// once per event: a label lookup per event was a measurable part of the relay's CPU.
struct EventTally {
    metrics: &'static crate::state::metrics::Metrics,
    counts: Vec<(&'static str, u64)>,
}

impl EventTally {
    fn new(metrics: &'static crate::state::metrics::Metrics) -> Self {
        EventTally {
            metrics,
            counts: Vec::new(),
        }
    }

    fn add(&mut self, kind: &'static str) {
        self.add_n(kind, 1);
    }

    fn add_n(&mut self, kind: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        match self.counts.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, count)) => *count += n,
            None => self.counts.push((kind, n)),
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
