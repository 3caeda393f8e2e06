//! One runtime execution relayed to the client: the runtime's frames become Agent2UI events,
//! inline, each event whole and flushed as soon as its frame is complete. Until the commit point
//! (`core::commit`) the client's response head is held, and a runtime that fails is handed back
//! to be failed over; once a byte reached the client every failure ends the stream with exactly
//! one `error` event. With `runtime.pre_content = "stream"` the head and the status events go out
//! as they come, and a failure before content is rescued in the open stream: legacy is asked
//! for the same request and its events continue the client's stream (`runtime::rescue`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::Either;
use pingora::http::ResponseHeader;
use tokio::io::{AsyncRead, AsyncWrite};
// The relay's own clock is tokio's, so that its timers can be tested on a paused clock.
use tokio::time::Instant as Tick;

use crate::core::agent2ui::{self, Completion, DoneEvent, Mapped, StreamMapper};
use crate::core::commit::{Precommit, Seen, Step, Trigger};
use crate::core::config::Mode;
use crate::core::rescue::FALLBACK_FAILED;
use crate::core::stats::Outcome;
use crate::core::stream::{self, End, Facts};
use crate::runtime::detached;
use crate::runtime::downstream::Downstream;
use crate::runtime::events::{Read, RuntimeEvents};
pub use crate::runtime::execution::{save_answer, RelayArgs, Saving};
use crate::runtime::rescue;
pub use crate::runtime::rescue::Rescued;
use crate::runtime::respond::sse_response_header;
use crate::state::in_flight::InFlight;
use crate::upstream::{Body, Connect, Upstream};

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
    /// The runtime failed before content with the stream open, and legacy's answer continued
    /// it: `outcome` above is then legacy's part, this the runtime's.
    pub rescued: Option<Rescued>,
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

/// Where a relayed stream stands. Each state says what a failure does: while `Held`, nothing
/// reached the client and legacy can answer instead; while `Open`, the client has the head and
/// status events but no content, and legacy's answer continues its stream (`Rescue`); once
/// `Committed`, the stream ends with one `error` event.
enum Phase {
    /// Before the commit: the response head and the events so far (in `out`) wait.
    Held(Held),
    /// Before the commit with `pre_content = "stream"`: the head went out, status events and
    /// heartbeats pass, a failure is rescued.
    Open(Pending),
    /// The head went out. `user_saved`: the user message's save, which the next client write
    /// waits for.
    Committed {
        user_saved: Option<tokio::task::JoinHandle<()>>,
    },
    /// The runtime failed while `Open`: legacy's events are relayed in its place.
    Rescue,
}

/// A stream before its commit: the client's response head, not written yet.
struct Held {
    header: Box<ResponseHeader>,
    pending: Pending,
}

/// What a stream before its commit waits for.
struct Pending {
    precommit: Precommit,
    head_at: Tick,
    commit_at: Tick,
}

/// What the relay does after a step.
enum Flow {
    Go,
    /// Over: the report says how.
    Stop,
    /// The client left after the commit, before the answer: the rest may be read without it.
    Left,
    /// The runtime failed before the commit.
    FailOver {
        detail: String,
        outcome: Outcome,
    },
}

/// A timer of the relay's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// Nothing was written for `runtime.heartbeat_secs`.
    Heartbeat,
    /// `runtime.commit_timeout_ms` passed while the head was held.
    CommitDue,
}

/// Relay a runtime stream to the client until it completes, fails, times out or the client goes;
/// or, when the runtime fails before the commit, hand the request back for legacy (the head
/// held), or rescue the open stream with legacy's answer (`args.rescue`).
///
/// The loop only waits: for the runtime's next read, a timer, the deadline, the shutdown cutoff
/// or the client leaving. What each means is the [`Relay`]'s: `on_event` and `on_end` for what
/// the reader hands out, `on_timer` for the heartbeat and the commit timeout, `flush` after each
/// read.
///
/// The set-up is done before the future is made, so that what it moves (the runtime's body, the
/// arguments) is held once, in the relay's state, not a second time as the future's inputs: a
/// held stream keeps this future for as long as it lasts.
pub fn relay<'s, D, C>(
    session: &'s mut D,
    stream: Body<C>,
    args: RelayArgs,
) -> impl std::future::Future<Output = Relayed> + Send + 's
where
    D: Downstream,
    C: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static,
{
    let legacy = args.shared.legacy.clone();
    relay_with(session, stream, args, legacy)
}

/// [`relay`], with the client a rescue asks legacy through.
pub fn relay_with<'s, D, C, K>(
    session: &'s mut D,
    stream: Body<C>,
    mut args: RelayArgs,
    legacy: Arc<Upstream<K>>,
) -> impl std::future::Future<Output = Relayed> + Send + 's
where
    D: Downstream,
    C: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static,
    K: Connect,
{
    match sse_response_header(args.decision, session.version(), &args.cors) {
        Ok(header) => {
            let mut mapper =
                StreamMapper::with_settings(&args.session_id, std::mem::take(&mut args.map));
            if args.saving.is_some() {
                mapper = mapper.keeping_text();
            }
            let mut events = RuntimeEvents::new(stream, args.max_frame_bytes, mapper);
            let mut relay = Relay::new(session, args, Box::new(header));
            // Captured by the block, not passed to an async fn, whose arguments would be held
            // twice (as its inputs and as its locals).
            Either::Left(async move {
                let mut cutoff = relay.args.shared.cutoff.subscribe();
                let mode = Mode::RuntimeOrchestrator.as_str();
                let _in_flight =
                    InFlight::new(relay.metrics().streams_in_flight.with_label_values(&[mode]));
                let mut flow = Flow::Go;
                if relay.args.commit_timeout.is_zero() {
                    if !Box::pin(relay.commit(Trigger::Head)).await {
                        flow = Flow::Stop;
                    }
                } else if relay.args.rescue.is_some() && !Box::pin(relay.open()).await {
                    flow = Flow::Stop;
                }
                while let Flow::Go = flow {
                    let before = relay.out.len();
                    flow = match events.next(&mut relay.out) {
                        Some(Read::Event(mapped)) => {
                            relay.on_event(mapped, before, &mut events).await
                        }
                        Some(Read::AfterDone) => {
                            relay
                                .metrics()
                                .sse_dropped_frames_total
                                .with_label_values(&["after_done"])
                                .inc();
                            Flow::Go
                        }
                        // Boxed, as is each step a stream takes once (its commit, its first
                        // write, its answer, its end): the future is as large as its largest
                        // step, and a held stream keeps it whole while it waits.
                        Some(Read::End(end)) => Box::pin(relay.on_end(end, &mut events)).await,
                        None => match relay.flush(&events).await {
                            Flow::Go => relay.wait(&mut events, &mut cutoff).await,
                            other => other,
                        },
                    };
                }
                match flow {
                    Flow::FailOver { detail, outcome } if matches!(relay.phase, Phase::Open(_)) => {
                        // Closed: the runtime stops working on an answer nobody will read.
                        drop(events);
                        Box::pin(relay.rescue(detail, outcome, &legacy, &mut cutoff)).await
                    }
                    flow => relay.finish(flow, events),
                }
            })
        }
        Err(e) => Either::Right(std::future::ready(Relayed::Served(StreamReport {
            outcome: Some(Outcome::Error),
            detail: Some(e.to_string()),
            ..StreamReport::default()
        }))),
    }
}

/// One relayed stream: where it stands, what it reported, and the client bytes not written yet.
struct Relay<'s, D> {
    session: &'s mut D,
    args: RelayArgs,
    phase: Phase,
    report: StreamReport,
    tally: EventTally,
    /// Client bytes mapped and not written yet.
    out: Vec<u8>,
    last_write: Tick,
}

impl<'s, D: Downstream> Relay<'s, D> {
    fn new(session: &'s mut D, args: RelayArgs, header: Box<ResponseHeader>) -> Self {
        let head_at = Tick::now();
        let held = Held {
            header,
            pending: Pending {
                precommit: Precommit::new(args.commit_on, args.commit_timeout_action),
                head_at,
                commit_at: head_at
                    .checked_add(args.commit_timeout)
                    .unwrap_or(Tick::from_std(args.deadline)),
            },
        };
        Relay {
            session,
            tally: EventTally::new(args.shared.metrics),
            args,
            phase: Phase::Held(held),
            report: StreamReport::default(),
            out: Vec::new(),
            last_write: head_at,
        }
    }

    fn metrics(&self) -> &'static crate::state::metrics::Metrics {
        self.args.shared.metrics
    }

    /// The client's head is still held.
    fn held(&self) -> bool {
        matches!(self.phase, Phase::Held(_))
    }

    /// Before the commit, held or open.
    fn pending(&mut self) -> Option<&mut Pending> {
        match &mut self.phase {
            Phase::Held(h) => Some(&mut h.pending),
            Phase::Open(p) => Some(p),
            Phase::Committed { .. } | Phase::Rescue => None,
        }
    }

    /// `pre_content = "stream"`: the head goes out with the runtime's, before any content.
    /// False when the client is gone.
    async fn open(&mut self) -> bool {
        let Phase::Held(held) = std::mem::replace(&mut self.phase, Phase::Rescue) else {
            return true;
        };
        let Held { header, pending } = held;
        self.phase = Phase::Open(Pending {
            precommit: pending.precommit.streaming(),
            ..pending
        });
        if !self
            .write_head(header, "client disconnected before the first event")
            .await
        {
            return false;
        }
        self.last_write = Tick::now();
        true
    }

    /// The response head, within the stream's deadline. False, with `gone` as the report's
    /// detail, when the client is gone.
    async fn write_head(&mut self, header: Box<ResponseHeader>, gone: &'static str) -> bool {
        let written = tokio::time::timeout_at(
            write_by(self.args.deadline).into(),
            self.session.write_response_header(header),
        )
        .await;
        if !matches!(written, Ok(Ok(()))) {
            self.report.detail = Some(gone.into());
            return false;
        }
        true
    }

    /// Wait for what comes next: the runtime's next read (`Go`), or a timer, the deadline, the
    /// cutoff or the client leaving, handled here. The deadline and the cutoff are asked first:
    /// a runtime that floods the stream keeps its read ready on every turn and would otherwise
    /// outrun both.
    async fn wait<C>(
        &mut self,
        events: &mut RuntimeEvents<C>,
        cutoff: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Flow
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let deadline = Tick::from_std(self.args.deadline);
        // A heartbeat interval too long to add to an Instant just never fires before the deadline.
        let heartbeat_at = self
            .last_write
            .checked_add(self.args.heartbeat)
            .unwrap_or(deadline);
        let commit_at = self.pending().map(|p| p.commit_at);
        let wake = tokio::select! {
            biased;
            _ = tokio::time::sleep_until(deadline) => Err(End::Deadline {
                budget: self.args.deadline - self.args.started,
            }),
            _ = cutoff.wait_for(|c| *c) => Err(End::Shutdown),
            _ = events.read() => {
                // Rewritten events are a little larger than the frames they come from.
                let room = events.last_read() + events.last_read() / 2;
                self.out.reserve(room);
                return Flow::Go;
            }
            _ = tokio::time::sleep_until(heartbeat_at) => Ok(Timer::Heartbeat),
            _ = tokio::time::sleep_until(commit_at.unwrap_or(deadline)), if commit_at.is_some() => {
                Ok(Timer::CommitDue)
            }
            _ = self.session.client_gone() => Err(End::ClientGone),
        };
        match wake {
            Ok(timer) => match self.on_timer(timer).await {
                // A heartbeat's write: once in an interval, boxed.
                Flow::Go => Box::pin(self.flush(events)).await,
                other => other,
            },
            Err(End::ClientGone) => {
                self.report.detail = Some("client disconnected".into());
                self.leave(events)
            }
            Err(end) => Box::pin(self.on_end(end, events)).await,
        }
    }

    /// One runtime event, mapped onto the end of `out` (from `before` on): held until the
    /// commit, counted, and the first one written at once.
    async fn on_event<C>(
        &mut self,
        mapped: Mapped,
        before: usize,
        events: &mut RuntimeEvents<C>,
    ) -> Flow {
        let bytes = self.out.len() - before;
        if let Some(h) = self.pending() {
            let seen = match &mapped {
                Mapped::Message("thinking") => Some(Seen::Thinking { bytes }),
                Mapped::Message(_) | Mapped::Complete(_) => Some(Seen::Content),
                Mapped::Heartbeat => Some(Seen::Ping { bytes }),
                Mapped::Failed { code, .. } => Some(Seen::Error { code }),
                Mapped::End => Some(Seen::End(&End::Done)),
                // Nothing for the client: counted below, commits nothing.
                Mapped::Skipped | Mapped::Malformed | Mapped::Unknown => None,
            };
            let committed = match seen.map(|seen| h.precommit.see(seen)) {
                None => true,
                // Counted as written at the commit.
                Some(Step::Hold) => return Flow::Go,
                // Streamed before the commit: counted and written below.
                Some(Step::Pass) => true,
                Some(Step::FailOver(outcome)) => {
                    // The failure's own event is not the client's; what passed before it is.
                    self.out.truncate(before);
                    return Flow::FailOver {
                        detail: before_commit(&mapped),
                        outcome,
                    };
                }
                Some(Step::Abandon) => return Flow::Stop,
                Some(Step::Commit(trigger)) => Box::pin(self.commit(trigger)).await,
            };
            if !committed {
                return Flow::Stop;
            }
        }
        let metrics = self.metrics();
        match mapped {
            Mapped::Message(kind) => {
                self.tally.add(kind);
                self.report.events += 1;
            }
            Mapped::Skipped | Mapped::End => {}
            Mapped::Heartbeat => {
                metrics
                    .sse_events_total
                    .with_label_values(&["heartbeat"])
                    .inc();
                self.report.events += 1;
            }
            Mapped::Complete(completion) => {
                return Box::pin(self.on_complete(completion, events)).await
            }
            Mapped::Failed { code, message } => {
                metrics.sse_events_total.with_label_values(&["error"]).inc();
                // The runtime's own code is unbounded: label it as one kind, a user's cancel
                // apart, since it is nobody's failure.
                let kind = if code == stream::CANCELLED_CODE {
                    stream::CANCELLED_CODE
                } else {
                    "EXECUTION_ERROR"
                };
                metrics.stream_errors_total.with_label_values(&[kind]).inc();
                self.report.events += 1;
                self.report.error_code = Some(kind);
                self.report.detail = Some(format!("{code}: {message}"));
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
        // The first event leaves at once instead of after the whole read (up to 32 KiB of
        // frames) is rewritten: time to first event is what the user sees.
        // Held events wait for the commit.
        if self.report.first_write.is_none() && !self.out.is_empty() && !self.held() {
            let room = self.out.capacity();
            let bytes = Bytes::from(std::mem::replace(&mut self.out, Vec::with_capacity(room)));
            if !Box::pin(self.write(Some(bytes), false)).await {
                self.report.detail = Some("client disconnected or stopped reading".into());
                // The events of this read not handed out yet are the detached reader's first.
                return self.leave(events);
            }
        }
        Flow::Go
    }

    /// `execution_complete`: what the user already has leaves at once, the answer is saved (even
    /// for a client that has just left, after its question) and `done` carries its id.
    async fn on_complete<C>(
        &mut self,
        completion: Completion,
        events: &mut RuntimeEvents<C>,
    ) -> Flow {
        self.metrics()
            .sse_events_total
            .with_label_values(&["done"])
            .inc();
        self.report.events += 1;
        let latency_ms = self.args.started.elapsed().as_millis() as u64;
        let mut gone = false;
        if !self.out.is_empty() {
            let bytes = Bytes::from(std::mem::take(&mut self.out));
            gone = !self.write(Some(bytes), false).await;
            self.report
                .first_write
                .get_or_insert_with(|| self.args.started.elapsed());
        }
        self.user_message_saved().await;
        let message_id = Box::pin(save_answer(
            &self.args,
            events.mapper(),
            &completion,
            latency_ms,
        ))
        .await;
        if gone {
            self.report.detail = Some("client disconnected or stopped reading".into());
            return Flow::Stop;
        }
        agent2ui::done_event(
            &mut self.out,
            &DoneEvent {
                session_id: events.mapper().session_id(),
                message_id: &message_id,
                tokens: completion.tokens.unwrap_or(0),
                latency_ms,
            },
        );
        Flow::Go
    }

    /// A timer fired: before the commit it commits (or fails over, with
    /// `commit_timeout_action = "failover"`); a heartbeat adds its event.
    async fn on_timer(&mut self, timer: Timer) -> Flow {
        if let Some(h) = self.pending() {
            let seen = match timer {
                Timer::Heartbeat => Seen::Heartbeat,
                Timer::CommitDue => Seen::Timeout,
            };
            match h.precommit.see(seen) {
                Step::Commit(trigger) => {
                    if !Box::pin(self.commit(trigger)).await {
                        return Flow::Stop;
                    }
                }
                // No content in time.
                Step::FailOver(outcome) => {
                    return Flow::FailOver {
                        detail: format!(
                            "no content within runtime.commit_timeout_ms ({} ms)",
                            self.args.commit_timeout.as_millis()
                        ),
                        outcome,
                    }
                }
                // A heartbeat on an open stream: written below.
                Step::Pass => {}
                Step::Hold | Step::Abandon => unreachable!("a timer commits or fails over"),
            }
        }
        if timer == Timer::Heartbeat {
            agent2ui::heartbeat_event(&mut self.out);
            self.metrics()
                .sse_events_total
                .with_label_values(&["heartbeat"])
                .inc();
        }
        Flow::Go
    }

    /// The stream is over. Before the commit the commit point says whether the client gets it
    /// or legacy answers; after, [`stream::verdict`] says how it counts and which `error` event,
    /// if any, closes it, written with the events before it.
    async fn on_end<C>(&mut self, end: End, events: &mut RuntimeEvents<C>) -> Flow
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if let Some(h) = self.pending() {
            match h.precommit.see(Seen::End(&end)) {
                Step::Commit(trigger) => {
                    if !Box::pin(self.commit(trigger)).await {
                        return Flow::Stop;
                    }
                }
                Step::Abandon => return Flow::Stop,
                Step::Hold | Step::Pass => unreachable!("the end of a stream is never held"),
                Step::FailOver(outcome) => {
                    let facts = Facts {
                        client: true,
                        completed: events.completed(),
                        runtime_error: None,
                        end: end.clone(),
                    };
                    let detail = stream::verdict(&facts)
                        .closing
                        .map_or_else(|| format!("{end:?}"), |c| c.message);
                    return Flow::FailOver { detail, outcome };
                }
            }
        }
        self.tally.flush();
        let verdict = stream::verdict(&events.facts(true, end));
        if let Some(closing) = &verdict.closing {
            agent2ui::error_event(&mut self.out, closing.code, &closing.message);
            let metrics = self.metrics();
            metrics.sse_events_total.with_label_values(&["error"]).inc();
            metrics
                .stream_errors_total
                .with_label_values(&[closing.code])
                .inc();
            self.report.events += 1;
            self.report.error_code = Some(closing.code);
            if self.report.detail.is_none() {
                self.report.detail = Some(closing.message.clone());
            }
        }
        let last = (!self.out.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.out)));
        let wrote = last.is_some();
        if self.write_end(last).await || !wrote {
            self.report.outcome = verdict.outcome;
        } else {
            self.report.outcome = None;
            self.report.detail = Some("client disconnected or stopped reading".into());
        }
        Flow::Stop
    }

    /// After a read, or a timer: what was mapped leaves in one write, unless the head is held.
    async fn flush<C>(&mut self, events: &RuntimeEvents<C>) -> Flow {
        self.tally.flush();
        if self.held() {
            return Flow::Go;
        }
        if self.out.is_empty() {
            // The room kept for the rest of a read the first event left early from, or
            // reserved for a read that wrote nothing: not kept while the stream waits.
            self.out = Vec::new();
            return Flow::Go;
        }
        let bytes = Bytes::from(std::mem::take(&mut self.out));
        if !self.write(Some(bytes), false).await {
            self.report.detail = Some("client disconnected or stopped reading".into());
            return self.leave(events);
        }
        Flow::Go
    }

    /// The client left: after the commit and before the answer, its execution may go on
    /// without it.
    fn leave<C>(&self, events: &RuntimeEvents<C>) -> Flow {
        match self.phase {
            Phase::Committed { .. } if !events.completed() => Flow::Left,
            _ => Flow::Stop,
        }
    }

    /// Commit to the runtime's stream: count why and how long the head was held, send the
    /// response head, and start saving the user's message, which the first event waits for.
    /// The held events are in `out` already and go out with the next write.
    /// False when the client is gone.
    async fn commit(&mut self, trigger: Trigger) -> bool {
        let (header, held) =
            match std::mem::replace(&mut self.phase, Phase::Committed { user_saved: None }) {
                Phase::Held(h) => (Some(h.header), h.pending),
                // The head is out already.
                Phase::Open(p) => (None, p),
                other => {
                    self.phase = other;
                    return true;
                }
            };
        // Committed: no rescue any more, and a long stream need not keep legacy's request.
        self.args.rescue = None;
        let shared = &self.args.shared;
        let metrics = &shared.metrics.commit;
        metrics
            .commits_total
            .with_label_values(&[trigger.as_str()])
            .inc();
        metrics
            .wait_seconds
            .observe(held.head_at.elapsed().as_secs_f64());
        let kept = held.precommit.held();
        self.tally.add_n("thinking", kept.thinking as u64);
        shared
            .metrics
            .sse_events_total
            .with_label_values(&["heartbeat"])
            .inc_by(kept.pings as u64);
        self.report.events += kept.events() as u64;
        if let Some(header) = header {
            if !self
                .write_head(header, "client disconnected before the commit")
                .await
            {
                return false;
            }
        }
        let user_saved = self.args.saving.as_mut().map(|s| {
            let (bridge, target, who) = (s.bridge.clone(), s.target.clone(), s.who.clone());
            let session_id = self.args.session_id.clone();
            let message = std::mem::take(&mut s.message);
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
        });
        self.phase = Phase::Committed { user_saved };
        true
    }

    /// Wait for the user message's save before the first client event (at once after it).
    async fn user_message_saved(&mut self) {
        if let Phase::Committed { user_saved } = &mut self.phase {
            if let Some(save) = user_saved.take() {
                // The save is bounded by `bridge.timeout_ms`; a panic in it is no reason to
                // drop the stream.
                let _ = save.await;
            }
        }
    }

    /// Write events to the client, after the user's message is saved; false when it went away
    /// or stopped reading.
    async fn write(&mut self, bytes: Option<Bytes>, end: bool) -> bool {
        if let Some(b) = &bytes {
            self.report.bytes += b.len() as u64;
        }
        self.user_message_saved().await;
        let written = write_client(&mut *self.session, bytes, end, self.args.deadline).await;
        if written {
            self.wrote();
        }
        written
    }

    /// A write of events reached the client: the last write (and maybe the first) is now.
    fn wrote(&mut self) {
        self.last_write = Tick::now();
        self.report
            .first_write
            .get_or_insert_with(|| self.args.started.elapsed());
    }

    /// The stream's last write: its last events, if any, and its end.
    async fn write_end(&mut self, bytes: Option<Bytes>) -> bool {
        match bytes {
            Some(b) => self.write(Some(b), true).await,
            None => write_client(&mut *self.session, None, true, self.args.deadline).await,
        }
    }

    /// The runtime failed before content with the client's stream open: legacy is asked for the
    /// same request (the session made for a `/chat/start` deleted first, as legacy makes its
    /// own), and its events continue the stream to its `done`. Legacy refusing, silent past its
    /// deadlines or breaking off ends the stream with one `FALLBACK_FAILED` event. The shutdown
    /// cutoff ends it as any stream; a client that leaves drops the legacy request.
    async fn rescue<K: Connect>(
        mut self,
        detail: String,
        outcome: Outcome,
        legacy: &Upstream<K>,
        cutoff: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Relayed {
        self.phase = Phase::Rescue;
        self.tally.flush();
        tracing::warn!(detail = %detail, "runtime failed before content with the stream open; legacy continues it");
        self.report.rescued = Some(Rescued {
            outcome,
            detail,
            at: Instant::now(),
        });
        let Some(rescue) = self.args.rescue.take() else {
            unreachable!("a stream is open only with a rescue");
        };
        if rescue.discard_session {
            self.discard_session().await;
        }
        // Legacy's deadlines, not the runtime's execution budget, bound what follows; a client
        // that does not read for legacy's idle time is given up.
        let idle = rescue.timeouts.idle;
        let asked = tokio::select! {
            biased;
            _ = cutoff.wait_for(|c| *c) => None,
            r = rescue::ask(legacy, &rescue) => Some(r),
            _ = self.session.client_gone() => return self.rescue_left(),
        };
        drop(rescue);
        let Some(asked) = asked else {
            return self.rescue_shutdown(idle).await;
        };
        let mut events = match asked {
            Ok(events) => events,
            Err(why) => return self.fallback_failed(why, idle).await,
        };
        let heartbeat = self.args.heartbeat;
        loop {
            match events.next(&mut self.out) {
                Some(rescue::Step::Event { done: false }) => self.report.events += 1,
                Some(rescue::Step::Event { done: true }) => {
                    self.report.events += 1;
                    let last = Bytes::from(std::mem::take(&mut self.out));
                    self.report.outcome = if self.rescue_write(last, true, idle).await {
                        Some(Outcome::Success)
                    } else {
                        self.report.detail = Some("client disconnected or stopped reading".into());
                        None
                    };
                    events.release();
                    return Relayed::Served(self.report);
                }
                Some(rescue::Step::Failed(why)) => return self.fallback_failed(why, idle).await,
                None => {
                    if !self.out.is_empty() {
                        let bytes = Bytes::from(std::mem::take(&mut self.out));
                        if !self.rescue_write(bytes, false, idle).await {
                            return self.rescue_left();
                        }
                    }
                    let heartbeat_at = self.last_write.checked_add(heartbeat);
                    let shutdown = tokio::select! {
                        biased;
                        _ = cutoff.wait_for(|c| *c) => true,
                        _ = events.read() => false,
                        _ = tokio::time::sleep_until(heartbeat_at.unwrap_or(self.last_write)), if heartbeat_at.is_some() => {
                            agent2ui::heartbeat_event(&mut self.out);
                            false
                        }
                        _ = self.session.client_gone() => return self.rescue_left(),
                    };
                    if shutdown {
                        return self.rescue_shutdown(idle).await;
                    }
                }
            }
        }
    }

    /// Delete the session the proxy made for this `/chat/start` before legacy makes its own.
    /// (`&mut`: a shared borrow held across the await would need the client side to be `Sync`.)
    async fn discard_session(&mut self) {
        let Some(saving) = &self.args.saving else {
            return;
        };
        let deleted = saving
            .bridge
            .delete_session(&saving.target, &saving.who, &self.args.session_id)
            .await;
        if let Err(e) = deleted {
            tracing::warn!(session_id = %self.args.session_id, error = %e, "could not delete the session made for a chat the runtime did not serve");
        }
    }

    /// A write of legacy's events, given up when the client does not take it within `idle`.
    async fn rescue_write(&mut self, bytes: Bytes, end: bool, idle: Duration) -> bool {
        self.report.bytes += bytes.len() as u64;
        let by = Instant::now() + idle;
        let written = write_client(&mut *self.session, Some(bytes), end, by).await;
        if written {
            self.wrote();
        }
        written
    }

    /// Legacy cannot continue the stream: one `error` event ends it (after what was read).
    async fn fallback_failed(mut self, why: String, idle: Duration) -> Relayed {
        tracing::warn!(why = %why, "legacy could not continue a rescued stream");
        agent2ui::error_event(&mut self.out, FALLBACK_FAILED, &why);
        let metrics = self.metrics();
        metrics.sse_events_total.with_label_values(&["error"]).inc();
        metrics
            .stream_errors_total
            .with_label_values(&[FALLBACK_FAILED])
            .inc();
        self.report.events += 1;
        self.report.error_code = Some(FALLBACK_FAILED);
        self.report.detail = Some(why);
        let last = Bytes::from(std::mem::take(&mut self.out));
        self.report.outcome = self
            .rescue_write(last, true, idle)
            .await
            .then_some(Outcome::Error);
        Relayed::Served(self.report)
    }

    /// The shutdown cutoff during a rescue: the stream ends as any stream does.
    async fn rescue_shutdown(mut self, idle: Duration) -> Relayed {
        let verdict = stream::verdict(&Facts {
            client: true,
            completed: false,
            runtime_error: None,
            end: End::Shutdown,
        });
        if let Some(closing) = &verdict.closing {
            agent2ui::error_event(&mut self.out, closing.code, &closing.message);
            self.report.events += 1;
            self.report.error_code = Some(closing.code);
            self.report.detail = Some(closing.message.clone());
        }
        let last = Bytes::from(std::mem::take(&mut self.out));
        self.rescue_write(last, true, idle).await;
        self.report.outcome = verdict.outcome;
        Relayed::Served(self.report)
    }

    /// The client left during a rescue: legacy's request is dropped with it.
    fn rescue_left(mut self) -> Relayed {
        self.report.outcome = None;
        self.report.detail = Some("client disconnected during the rescue".into());
        Relayed::Served(self.report)
    }

    /// How the relay ended, the runtime connection released or handed on.
    fn finish<C>(self, flow: Flow, events: RuntimeEvents<C>) -> Relayed
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Relay {
            args,
            phase,
            report,
            ..
        } = self;
        match flow {
            Flow::FailOver { detail, outcome } => Relayed::FailOver { detail, outcome },
            Flow::Left => {
                let user_saved = match phase {
                    Phase::Committed { user_saved } => user_saved,
                    Phase::Held(_) | Phase::Open(_) | Phase::Rescue => None,
                };
                if let Some(max) = args.saving.as_ref().and_then(|s| s.detach) {
                    detached::finish(args, detached::Leftover { events, user_saved }, max);
                }
                Relayed::Served(report)
            }
            Flow::Stop | Flow::Go => {
                // After a clean end the connection goes back to the pool, once its body is read
                // to the end; otherwise it is closed, which tells the runtime to stop.
                if report.outcome == Some(Outcome::Success) {
                    events.release_when_done();
                }
                Relayed::Served(report)
            }
        }
    }
}

/// Why a stream failed over at this event (an `execution_error`, or `[DONE]` with no answer).
fn before_commit(mapped: &Mapped) -> String {
    match mapped {
        Mapped::Failed { code, message } => format!("{code}: {message}"),
        _ => "runtime stream ended without execution_complete".into(),
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

#[cfg(test)]
mod tests {
    //! The relay's timers and the commit point on a paused clock: the runtime is an in-memory
    //! connection through the runtime's client, the client a fake [`Downstream`] on
    //! `tokio::io::duplex` that notes when each write reached it.

    use pingora::http::RequestHeader;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::core::agent2ui::MapSettings;
    use crate::core::config::{CommitOn, CommitTimeoutAction, Config};
    use crate::core::cors::CorsHeaders;
    use crate::core::routing::Reason;
    use crate::core::routing::RolloutDecision;
    use crate::runtime::downstream::BodyRead;
    use crate::state::Shared;
    use crate::upstream::in_memory::{self, answered};
    use crate::upstream::{Call, Timeouts, UpstreamName};

    /// The client's side of a chat: the head is written as a `HEAD <status>` line so the client
    /// sees when it left, then the body's bytes.
    struct Client {
        io: DuplexStream,
        req: RequestHeader,
        status: u16,
    }

    impl Downstream for Client {
        fn req_header(&self) -> &RequestHeader {
            &self.req
        }

        fn version(&self) -> http::Version {
            http::Version::HTTP_11
        }

        async fn read_chat_body(&mut self, _: usize, _: Instant) -> pingora::Result<BodyRead> {
            Ok(BodyRead::Complete(Bytes::new()))
        }

        async fn write_response_header(
            &mut self,
            resp: Box<ResponseHeader>,
        ) -> pingora::Result<()> {
            self.status = resp.status.as_u16();
            let line = format!("HEAD {}\n", self.status);
            self.io
                .write_all(line.as_bytes())
                .await
                .map_err(|e| pingora::Error::because(pingora::ErrorType::WriteError, "head", e))
        }

        async fn write_response_body(
            &mut self,
            body: Option<Bytes>,
            _end: bool,
        ) -> pingora::Result<()> {
            let Some(body) = body else { return Ok(()) };
            self.io
                .write_all(&body)
                .await
                .map_err(|e| pingora::Error::because(pingora::ErrorType::WriteError, "body", e))
        }

        fn close_after(&mut self) {}

        fn abort(&mut self) {}

        async fn client_gone(&mut self) {
            let mut buf = [0u8; 64];
            while self.io.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        }

        fn status_written(&self) -> u16 {
            self.status
        }

        fn client_ip(&self) -> Option<std::net::IpAddr> {
            None
        }
    }

    const RUNTIME: Timeouts = Timeouts {
        connect: Duration::from_secs(1),
        response: Duration::from_secs(10),
        idle: Duration::from_secs(600),
        pool_idle: Duration::from_secs(4),
    };

    fn frame(event: &str, data: &str) -> String {
        format!("data: {{\"event\":\"{event}\",\"data\":{data},\"timestamp\":1}}\r\n\r\n")
    }

    fn thinking() -> String {
        frame("thinking", r#"{"content":"planning"}"#)
    }

    fn text(t: &str) -> String {
        frame("text_chunk", &format!(r#"{{"content":"{t}"}}"#))
    }

    fn complete() -> String {
        frame("execution_complete", r#"{"final_response":"hi"}"#)
    }

    /// How the relay is set up: `commit_timeout` zero commits at the head.
    #[derive(Clone)]
    struct Setup {
        commit_timeout: Duration,
        action: CommitTimeoutAction,
        heartbeat: Duration,
        budget: Duration,
        /// `pre_content = "stream"`, legacy's deadlines.
        rescue: Option<Timeouts>,
        runtime_idle: Duration,
        /// The client leaves once what it got holds this.
        leave_at: Option<&'static str>,
    }

    impl Default for Setup {
        fn default() -> Self {
            Setup {
                commit_timeout: Duration::from_secs(30),
                action: CommitTimeoutAction::Commit,
                heartbeat: Duration::from_secs(15),
                budget: Duration::from_secs(300),
                rescue: None,
                runtime_idle: Duration::from_secs(600),
                leave_at: None,
            }
        }
    }

    /// What the client got: each write's bytes with when (since the start) they arrived.
    type Received = Vec<(Duration, String)>;

    /// Relay what `script` (the runtime's side) sends; the runtime answers 200 with a
    /// close-delimited body as soon as the request is in.
    async fn run<F, Fut>(setup: Setup, script: F) -> (Relayed, Received)
    where
        F: FnOnce(DuplexStream) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let (relayed, got, _) = run_rescue(setup, script, |_| async { false }).await;
        (relayed, got)
    }

    /// What legacy got and saw of a rescue: its request, and whether the proxy closed the
    /// connection before legacy's script ended.
    #[derive(Debug, Default)]
    struct LegacySide {
        request: String,
        dropped: bool,
    }

    /// [`run`], with `legacy` the legacy end of a rescue's connection, once its request is in.
    async fn run_rescue<F, Fut, G, Gut>(
        setup: Setup,
        script: F,
        legacy: G,
    ) -> (Relayed, Received, LegacySide)
    where
        F: FnOnce(DuplexStream) -> Fut,
        Fut: std::future::Future<Output = ()>,
        G: FnOnce(DuplexStream) -> Gut + Send + 'static,
        Gut: std::future::Future<Output = bool> + Send,
    {
        let (legacy_client, mut legacy_accepted) = in_memory::upstream(UpstreamName::Legacy, false);
        let legacy_client = Arc::new(legacy_client);
        let legacy_side = tokio::spawn(async move {
            let Some(mut conn) = legacy_accepted.recv().await else {
                return LegacySide::default();
            };
            let mut buf = [0u8; 1024];
            let mut request = Vec::new();
            while !String::from_utf8_lossy(&request).ends_with("hi") {
                let n = conn.read(&mut buf).await.unwrap();
                request.extend_from_slice(&buf[..n]);
            }
            let dropped = legacy(conn).await;
            LegacySide {
                request: String::from_utf8(request).unwrap(),
                dropped,
            }
        });
        let leave_at = setup.leave_at;
        let config = Config::parse(
            "[server]\nlisten = \"127.0.0.1:1\"\n[legacy]\naddress = \"127.0.0.1:2\"\n[runtime]\naddress = \"127.0.0.1:3\"\n",
        )
        .unwrap();
        let shared = Shared::new(config);
        let (upstream, mut accepted) = in_memory::upstream(UpstreamName::Runtime, false);
        let (client_io, theirs) = tokio::io::duplex(64 * 1024);
        let mut client = Client {
            io: theirs,
            req: RequestHeader::build("POST", b"/api/v1/chat", None).unwrap(),
            status: 0,
        };
        let start = Tick::now();
        let reader = tokio::spawn(async move {
            let mut client_io = client_io;
            let mut got = Received::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match client_io.read(&mut buf).await {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got.push((start.elapsed(), String::from_utf8_lossy(&buf[..n]).into())),
                }
                if leave_at.is_some_and(|l| all(&got).contains(l)) {
                    return got;
                }
            }
        });
        let args = relay_args(shared, &setup);
        let relayed = async {
            let call = Call::new(
                "127.0.0.1:3",
                Timeouts {
                    idle: setup.runtime_idle,
                    ..RUNTIME
                },
            );
            let response = upstream
                .send(
                    &call,
                    b"POST /x HTTP/1.1\r\nhost: r\r\ncontent-length: 0\r\n\r\n",
                )
                .await
                .unwrap();
            relay_with(
                &mut client,
                response.into_body(),
                args,
                legacy_client.clone(),
            )
            .await
        };
        let runtime = async {
            let conn = answered(
                &mut accepted,
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
            )
            .await;
            script(conn).await;
        };
        let (relayed, ()) = tokio::join!(relayed, runtime);
        drop(client);
        drop(legacy_client);
        (relayed, reader.await.unwrap(), legacy_side.await.unwrap())
    }

    /// The relay's arguments for `setup`, the bridge off.
    fn relay_args(shared: Arc<Shared>, setup: &Setup) -> RelayArgs {
        let started = Instant::now();
        RelayArgs {
            shared,
            decision: RolloutDecision {
                mode: Mode::RuntimeOrchestrator,
                reason: Reason::Default,
            },
            cors: CorsHeaders::default(),
            session_id: "s1".into(),
            started,
            deadline: started + setup.budget,
            heartbeat: setup.heartbeat,
            max_frame_bytes: 64 * 1024,
            commit_on: CommitOn::Content,
            commit_timeout: setup.commit_timeout,
            commit_timeout_action: setup.action,
            map: MapSettings::default(),
            saving: None,
            rescue: setup.rescue.map(|timeouts| Box::new(crate::runtime::rescue::Rescue {
                request: Bytes::from_static(
                    b"POST /api/v1/chat/sessions/s1 HTTP/1.1\r\nhost: l\r\ncontent-length: 2\r\n\r\nhi",
                ),
                address: "127.0.0.1:2".into(),
                timeouts,
                discard_session: false,
            })),
        }
    }

    async fn send(conn: &mut DuplexStream, what: &str) {
        conn.write_all(what.as_bytes()).await.unwrap();
    }

    fn served(relayed: &Relayed) -> &StreamReport {
        match relayed {
            Relayed::Served(report) => report,
            Relayed::FailOver { detail, .. } => panic!("failed over: {detail}"),
        }
    }

    /// The relay handed the request back with `outcome`, its detail naming `why`, and the client
    /// got nothing at all.
    fn failed_over(relayed: Relayed, got: Received, outcome: Outcome, why: &str) {
        match relayed {
            Relayed::FailOver { outcome: o, detail } => {
                assert_eq!(o, outcome);
                assert!(detail.contains(why), "{detail}");
            }
            Relayed::Served(r) => panic!("served: {r:?}"),
        }
        assert!(got.is_empty(), "the client got {got:?}");
    }

    fn all(got: &Received) -> String {
        got.iter().map(|(_, s)| s.as_str()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn thinking_is_held_until_the_first_content_and_leaves_with_it() {
        let (relayed, got) = run(Setup::default(), |mut rt| async move {
            send(&mut rt, &thinking()).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            send(&mut rt, &text("hi")).await;
            send(&mut rt, &complete()).await;
        })
        .await;
        let report = served(&relayed);
        assert_eq!(report.outcome, Some(Outcome::Success));
        // Nothing before the content, then the head, the held status and the text together.
        let (at, first) = &got[0];
        assert_eq!(*at, Duration::from_secs(2), "{got:?}");
        assert!(first.starts_with("HEAD 200\n"), "{first:?}");
        let body = all(&got);
        let (thinking, hi) = (body.find("thinking").unwrap(), body.find("hi").unwrap());
        assert!(thinking < hi, "{body}");
        assert_eq!(body.matches("event: done").count(), 1, "{body}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_commit_timeout_sends_the_held_head_and_status() {
        let setup = Setup {
            commit_timeout: Duration::from_millis(800),
            ..Setup::default()
        };
        let (relayed, got) = run(setup, |mut rt| async move {
            send(&mut rt, &thinking()).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            send(&mut rt, &text("late")).await;
            send(&mut rt, &complete()).await;
        })
        .await;
        assert_eq!(served(&relayed).outcome, Some(Outcome::Success));
        assert_eq!(got[0].0, Duration::from_millis(800), "{got:?}");
        assert!(got[0].1.starts_with("HEAD 200\n") && got[0].1.contains("thinking"));
        let late = got.iter().find(|(_, s)| s.contains("late")).unwrap();
        assert_eq!(late.0, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_commit_timeout_set_to_fail_over_hands_the_request_back_untouched() {
        let setup = Setup {
            commit_timeout: Duration::from_millis(800),
            action: CommitTimeoutAction::Failover,
            ..Setup::default()
        };
        let (relayed, got) = run(setup, |mut rt| async move {
            send(&mut rt, &thinking()).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        failed_over(relayed, got, Outcome::Timeout, "800 ms");
    }

    #[tokio::test(start_paused = true)]
    async fn an_execution_error_before_content_fails_over() {
        let (relayed, got) = run(Setup::default(), |mut rt| async move {
            send(&mut rt, &thinking()).await;
            send(
                &mut rt,
                &frame("execution_error", r#"{"error":"boom","code":"LLM_DOWN"}"#),
            )
            .await;
        })
        .await;
        failed_over(relayed, got, Outcome::Error, "LLM_DOWN");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_committed_stream_gets_a_heartbeat_each_interval() {
        let setup = Setup {
            commit_timeout: Duration::ZERO,
            heartbeat: Duration::from_secs(10),
            ..Setup::default()
        };
        let (relayed, got) = run(setup, |mut rt| async move {
            send(&mut rt, &text("a")).await;
            tokio::time::sleep(Duration::from_secs(25)).await;
            send(&mut rt, &complete()).await;
        })
        .await;
        assert_eq!(served(&relayed).outcome, Some(Outcome::Success));
        let beats: Vec<Duration> = got
            .iter()
            .filter(|(_, s)| s.contains("heartbeat"))
            .map(|(at, _)| *at)
            .collect();
        assert_eq!(
            beats,
            [Duration::from_secs(10), Duration::from_secs(20)],
            "{got:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_ends_a_committed_stream_with_one_timeout_event() {
        let setup = Setup {
            commit_timeout: Duration::ZERO,
            heartbeat: Duration::from_secs(3600),
            budget: Duration::from_secs(60),
            ..Setup::default()
        };
        let (relayed, got) = run(setup, |mut rt| async move {
            send(&mut rt, &text("a")).await;
            tokio::time::sleep(Duration::from_secs(120)).await;
        })
        .await;
        let report = served(&relayed);
        assert_eq!(report.outcome, Some(Outcome::Timeout));
        assert_eq!(report.error_code, Some("TIMEOUT"));
        let last = got.last().unwrap();
        assert!(last.1.contains("TIMEOUT"), "{got:?}");
        // The deadline is the caller's (a std Instant): a few real milliseconds apart from the
        // paused clock's start.
        assert!(
            last.0 >= Duration::from_secs(60) && last.0 < Duration::from_secs(61),
            "{got:?}"
        );
        assert_eq!(all(&got).matches("event: error").count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn frames_after_done_never_reach_the_client() {
        let setup = Setup {
            commit_timeout: Duration::ZERO,
            ..Setup::default()
        };
        let (relayed, got) = run(setup, |mut rt| async move {
            send(&mut rt, &text("a")).await;
            send(&mut rt, &complete()).await;
            send(&mut rt, &text("stray")).await;
            send(&mut rt, "data: [DONE]\r\n\r\n").await;
        })
        .await;
        assert_eq!(served(&relayed).outcome, Some(Outcome::Success));
        let body = all(&got);
        assert!(!body.contains("stray"), "{body}");
        assert_eq!(body.matches("event: done").count(), 1, "{body}");
    }

    const LEGACY: Timeouts = Timeouts {
        connect: Duration::from_secs(1),
        response: Duration::from_secs(60),
        idle: Duration::from_secs(300),
        pool_idle: Duration::from_secs(4),
    };

    fn streaming() -> Setup {
        Setup {
            rescue: Some(LEGACY),
            ..Setup::default()
        }
    }

    const LEGACY_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n";
    const LEGACY_ANSWER: &str = "event: message\r\ndata: {\"id\":\"l-0\",\"type\":\"text\",\"data\":{\"content\":\"Legacy\"}}\r\n\r\n\
        event: message\ndata: {\"id\":\"l-1\",\"type\":\"text\",\"data\":{\"content\":\" answer\"}}\n\n\
        event: done\ndata: {\"sessionId\":\"s1\",\"messageId\":\"l\",\"executionMode\":\"direct_llm\"}\n\n";

    /// Legacy answering at once with its whole answer.
    async fn legacy_answers(mut conn: DuplexStream) -> bool {
        send(&mut conn, LEGACY_HEAD).await;
        // Cut inside an event: the client still gets each one whole.
        let (a, b) = LEGACY_ANSWER.split_at(40);
        send(&mut conn, a).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        send(&mut conn, b).await;
        false
    }

    fn error(code: &str) -> String {
        frame(
            "execution_error",
            &format!(r#"{{"error":"boom","code":"{code}"}}"#),
        )
    }

    /// The runtime's side of a stream that shows its status, then fails with `code`.
    async fn thinks_then_fails(mut rt: DuplexStream, code: &'static str) {
        send(&mut rt, &thinking()).await;
        send(&mut rt, &error(code)).await;
    }

    fn rescued(relayed: &Relayed) -> (&StreamReport, &Rescued) {
        let report = served(relayed);
        let rescued = report.rescued.as_ref().expect("rescued");
        (report, rescued)
    }

    #[tokio::test(start_paused = true)]
    async fn streaming_sends_thinking_at_once_and_rescues_an_error_with_legacys_answer() {
        let (relayed, got, legacy) = run_rescue(
            streaming(),
            |mut rt| async move {
                send(&mut rt, &thinking()).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                send(&mut rt, &error("LLM_DOWN")).await;
            },
            legacy_answers,
        )
        .await;
        let (report, rescue) = rescued(&relayed);
        assert_eq!(rescue.outcome, Outcome::Error);
        assert!(rescue.detail.contains("LLM_DOWN"), "{}", rescue.detail);
        assert_eq!(report.outcome, Some(Outcome::Success));
        // The head and the status at once, not held for a second.
        let (at, first) = &got[0];
        assert_eq!(*at, Duration::ZERO, "{got:?}");
        assert!(first.starts_with("HEAD 200\n"), "{first:?}");
        let thinking_at = got.iter().find(|(_, s)| s.contains("thinking")).unwrap().0;
        assert_eq!(thinking_at, Duration::ZERO, "{got:?}");
        // Then legacy's events, whole, LF only, ending with its own done.
        let body = all(&got);
        let after = &body[body
            .find("event: message\ndata: {\"id\":\"l-0\"")
            .expect(&body)..];
        assert_eq!(after, LEGACY_ANSWER.replace("\r\n", "\n"));
        assert!(!body.contains('\r'), "{body:?}");
        assert!(!body.contains("LLM_DOWN"), "{body}");
        assert_eq!(body.matches("event: done").count(), 1);
        for (_, write) in &got[1..] {
            assert!(
                write.ends_with("\n\n"),
                "a write ends inside an event: {got:?}"
            );
        }
        assert!(legacy.request.starts_with("POST /api/v1/chat/sessions/s1 "));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_with_the_stream_open_is_not_rescued() {
        let (relayed, got, legacy) = run_rescue(
            streaming(),
            |rt| thinks_then_fails(rt, stream::CANCELLED_CODE),
            legacy_answers,
        )
        .await;
        let report = served(&relayed);
        assert!(report.rescued.is_none());
        assert!(all(&got).contains(stream::CANCELLED_CODE), "{got:?}");
        assert!(legacy.request.is_empty(), "legacy was asked");
    }

    #[tokio::test(start_paused = true)]
    async fn each_failure_before_content_is_rescued_with_its_outcome() {
        let cut = |mut rt: DuplexStream| async move {
            send(&mut rt, &thinking()).await;
            send(&mut rt, "data: {\"event\":\"text_ch").await;
        };
        let (relayed, got, _) = run_rescue(streaming(), cut, legacy_answers).await;
        assert_eq!(rescued(&relayed).1.outcome, Outcome::Error);
        assert!(all(&got).contains("event: done"), "{got:?}");

        // Silent past the runtime's idle timeout: a timeout.
        let setup = Setup {
            runtime_idle: Duration::from_secs(3),
            ..streaming()
        };
        let stall = |mut rt: DuplexStream| async move {
            send(&mut rt, &thinking()).await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        };
        let (relayed, got, _) = run_rescue(setup, stall, legacy_answers).await;
        assert_eq!(rescued(&relayed).1.outcome, Outcome::Timeout);
        let done_at = got
            .iter()
            .find(|(_, s)| s.contains("event: done"))
            .unwrap()
            .0;
        assert!(
            done_at >= Duration::from_secs(3) && done_at < Duration::from_secs(4),
            "{got:?}"
        );

        // No content by the commit timeout, set to fail over.
        let setup = Setup {
            commit_timeout: Duration::from_millis(800),
            action: CommitTimeoutAction::Failover,
            ..streaming()
        };
        let (relayed, got, _) = run_rescue(setup, stall, legacy_answers).await;
        let (_, rescue) = rescued(&relayed);
        assert_eq!(rescue.outcome, Outcome::Timeout);
        assert!(rescue.detail.contains("800 ms"), "{}", rescue.detail);
        let done_at = got
            .iter()
            .find(|(_, s)| s.contains("event: done"))
            .unwrap()
            .0;
        assert_eq!(done_at, Duration::from_millis(805), "{got:?}");

        // A frame over the limit.
        let big = |mut rt: DuplexStream| async move {
            send(&mut rt, &thinking()).await;
            send(&mut rt, &text(&"x".repeat(70 * 1024))).await;
        };
        let (relayed, got, _) = run_rescue(streaming(), big, legacy_answers).await;
        assert_eq!(rescued(&relayed).1.outcome, Outcome::Error);
        assert!(!all(&got).contains("xxxx"));
        assert!(all(&got).contains("event: done"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_stream_gets_heartbeats_without_committing() {
        let setup = Setup {
            heartbeat: Duration::from_secs(10),
            commit_timeout: Duration::from_secs(30),
            ..streaming()
        };
        let (relayed, got, _) = run_rescue(
            setup,
            |mut rt| async move {
                tokio::time::sleep(Duration::from_secs(25)).await;
                send(&mut rt, &error("LLM_DOWN")).await;
            },
            legacy_answers,
        )
        .await;
        // Still rescued after two heartbeats: they are not content.
        rescued(&relayed);
        let beats: Vec<Duration> = got
            .iter()
            .filter(|(_, s)| s.contains("heartbeat"))
            .map(|(at, _)| *at)
            .collect();
        assert_eq!(beats, [Duration::from_secs(10), Duration::from_secs(20)]);
    }

    #[tokio::test(start_paused = true)]
    async fn legacy_refusing_ends_the_stream_with_one_fallback_error() {
        for head in [
            "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/event-stream\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
        ] {
            let (relayed, got, _) = run_rescue(
                streaming(),
                |rt| thinks_then_fails(rt, "LLM_DOWN"),
                move |mut conn| async move {
                    send(&mut conn, head).await;
                    false
                },
            )
            .await;
            let (report, _) = rescued(&relayed);
            assert_eq!(report.outcome, Some(Outcome::Error));
            assert_eq!(report.error_code, Some(FALLBACK_FAILED));
            let body = all(&got);
            assert_eq!(body.matches("event: error").count(), 1, "{body}");
            assert!(body.ends_with("\n\n") && body.contains(FALLBACK_FAILED), "{body}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn legacys_own_deadlines_bound_the_rescue() {
        let setup = Setup {
            rescue: Some(Timeouts {
                response: Duration::from_secs(2),
                idle: Duration::from_secs(5),
                ..LEGACY
            }),
            ..Setup::default()
        };
        let fail = |rt| thinks_then_fails(rt, "LLM_DOWN");
        // No head within legacy's response timeout.
        let (relayed, got, _) = run_rescue(setup.clone(), fail, |conn| async move {
            let _open = conn;
            tokio::time::sleep(Duration::from_secs(60)).await;
            false
        })
        .await;
        assert_eq!(served(&relayed).error_code, Some(FALLBACK_FAILED));
        let last = got.last().unwrap();
        assert!(last.1.contains(FALLBACK_FAILED), "{got:?}");
        assert!(
            last.0 >= Duration::from_secs(2) && last.0 < Duration::from_secs(3),
            "{got:?}"
        );
        // Silent inside its answer past its idle timeout.
        let (relayed, got, _) = run_rescue(setup, fail, |mut conn| async move {
            send(&mut conn, LEGACY_HEAD).await;
            send(
                &mut conn,
                &LEGACY_ANSWER[..LEGACY_ANSWER.find("event: done").unwrap()],
            )
            .await;
            tokio::time::sleep(Duration::from_secs(60)).await;
            false
        })
        .await;
        assert_eq!(served(&relayed).error_code, Some(FALLBACK_FAILED));
        let body = all(&got);
        assert!(
            body.contains("answer") && !body.contains("event: done"),
            "{body}"
        );
        let last = got.last().unwrap();
        assert!(
            last.0 >= Duration::from_secs(5) && last.0 < Duration::from_secs(6),
            "{got:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_leaves_during_the_rescue_drops_legacys_request() {
        let setup = Setup {
            leave_at: Some("l-0"),
            ..streaming()
        };
        let (relayed, _, legacy) = run_rescue(
            setup,
            |rt| thinks_then_fails(rt, "LLM_DOWN"),
            |mut conn| async move {
                send(&mut conn, LEGACY_HEAD).await;
                send(
                    &mut conn,
                    &LEGACY_ANSWER[..LEGACY_ANSWER.find("event: message\n").unwrap()],
                )
                .await;
                // The proxy closes the connection once its client left.
                let mut buf = [0u8; 64];
                let closed = tokio::time::timeout(Duration::from_secs(30), async {
                    while conn.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                });
                closed.await.is_ok()
            },
        )
        .await;
        let (report, _) = rescued(&relayed);
        assert_eq!(report.outcome, None);
        assert!(legacy.dropped, "legacy's connection stayed open");
    }

    /// A held stream keeps the relay's future for as long as it lasts, for each of thousands of
    /// streams: a change that makes it larger should be one that means to. The future is as
    /// large as the largest step it awaits inline; steps a stream takes once are boxed.
    #[tokio::test]
    async fn a_held_streams_relay_future_stays_small() {
        let config = Config::parse(
            "[server]\nlisten = \"127.0.0.1:1\"\n[legacy]\naddress = \"127.0.0.1:2\"\n[runtime]\naddress = \"127.0.0.1:3\"\n",
        )
        .unwrap();
        let (upstream, mut accepted) = in_memory::upstream(UpstreamName::Runtime, false);
        let runtime = answered(
            &mut accepted,
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n",
        );
        let call = Call::new("127.0.0.1:3", RUNTIME);
        let request = b"POST /x HTTP/1.1\r\nhost: r\r\ncontent-length: 0\r\n\r\n";
        let (response, _conn) = tokio::join!(upstream.send(&call, request), runtime);
        // Pingora's session: of the client sides, the one whose writes' futures are largest.
        let (mut ours, theirs) = tokio::io::duplex(1024);
        let mut client = pingora::proxy::Session::new_h1(Box::new(theirs));
        ours.write_all(b"POST /api/v1/chat HTTP/1.1\r\nhost: p\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        assert!(client.read_request().await.unwrap());
        let setup = Setup {
            rescue: Some(RUNTIME),
            ..Setup::default()
        };
        let args = relay_args(Shared::new(config), &setup);
        let relaying = relay(&mut client, response.unwrap().into_body(), args);
        let size = std::mem::size_of_val(&relaying);
        println!("relay future: {size} bytes");
        assert!(size <= 4096, "the relay's future grew to {size} bytes");
    }
}
