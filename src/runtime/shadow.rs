//! Shadow traffic: a copy of a direct_llm chat request sent to the runtime in the background, its
//! stream consumed and judged, and discarded.
//!
//! The client's request never waits for it: the copy runs on its own task, concurrency is
//! bounded (extra copies are skipped, not queued), and shadow outcomes feed only their own
//! metrics, never the breaker, so the runtime can be judged on real traffic before anyone moves.
//!
//! Each copy is compared with the legacy answer the client got for the same request: the two
//! halves meet in a [`Pair`], and whichever finishes second records the comparison in the
//! scorecard (`GET /runtime/shadow`) and `cutover_shadow_*`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::http::RequestHeader;

use crate::core::agent2ui::{Mapped, StreamMapper};
use crate::core::chat::{ChatBody, RuntimeRequest};
use crate::core::identity::Caller;
use crate::core::scorecard::{Comparison, Pairing, PathSample, StreamObserver};
use crate::core::stats::Outcome;
use crate::core::stream::{self, End};
use crate::runtime::events::{Read, RuntimeEvents};
use crate::state::{Active, Shared};
use crate::upstream::bridge::Credentials;

/// What one shadow execution did.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowReport {
    pub outcome: Outcome,
    pub events: u64,
    /// Since the copy started, when its first content (an event other than `thinking` and
    /// heartbeats, as the live path commits on) was mapped.
    pub first_content: Option<Duration>,
    /// Characters of Agent2UI text the copy would have sent.
    pub text_chars: u64,
}

/// The two halves of one shadowed request: the legacy answer the client got and the runtime
/// copy, which finish in either order. Both are timed from the same `origin`.
#[derive(Clone)]
pub struct Pair(Arc<PairInner>);

struct PairInner {
    org: String,
    /// `org` for `rollout.shadow_orgs`, else empty.
    label: String,
    origin: Instant,
    halves: Mutex<Pairing>,
}

impl Pair {
    fn new(active: &Active, org: &str, origin: Instant) -> Pair {
        Pair(Arc::new(PairInner {
            org: org.to_owned(),
            label: active.shadow_org_label(org).to_owned(),
            origin,
            halves: Mutex::new(Pairing::default()),
        }))
    }

    /// When both halves started: their times to first event and durations count from here.
    pub fn origin(&self) -> Instant {
        self.0.origin
    }

    /// Legacy answered in a content coding the comparison cannot read: nothing is compared.
    pub fn legacy_unreadable(&self, shared: &Shared) {
        unpaired(shared, "legacy_undecodable");
        let joined = self.0.halves.lock().unwrap().legacy(None);
        self.settle(shared, joined);
    }

    /// The legacy answer is over; `None`: the client abandoned it, so nothing is compared.
    pub fn legacy(&self, shared: &Shared, sample: Option<PathSample>) {
        if sample.is_none() {
            unpaired(shared, "client_gone");
        }
        let joined = self.0.halves.lock().unwrap().legacy(sample);
        self.settle(shared, joined);
    }

    /// The copy is over; `None`: it could not run, so nothing is compared.
    fn runtime(&self, shared: &Shared, sample: Option<PathSample>) {
        if sample.is_none() {
            unpaired(shared, "copy_skipped");
        }
        let joined = self.0.halves.lock().unwrap().runtime(sample);
        self.settle(shared, joined);
    }

    fn settle(&self, shared: &Shared, joined: Option<Comparison>) {
        let Some(c) = joined else { return };
        shared.metrics.observe_comparison(&self.0.label, &c);
        shared
            .scorecard
            .lock()
            .unwrap()
            .record(&self.0.org, &c, Instant::now());
    }
}

/// A pair that will not be compared, counted by why.
fn unpaired(shared: &Shared, why: &'static str) {
    shared
        .metrics
        .shadow_unpaired_total
        .with_label_values(&[why])
        .inc();
}

/// Frees a slot of `shadow_max_inflight` when the copy ends, however it ends (a panic, or its
/// task dropped at shutdown, included).
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.shadow_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a shadow copy sends the runtime.
pub enum Source {
    /// The bridge is off: the runtime request as built.
    Ready(Bytes),
    /// The bridge is on: the conversation is read from legacy on the copy's own task, so the
    /// client's legacy stream never waits for it. A copy only reads: it never saves a message
    /// nor creates a session (a `/chat/start` copy runs under a session id of its own making).
    Bridged(Box<Reading>),
}

/// What a bridged copy reads its conversation with.
pub struct Reading {
    pub who: Credentials,
    pub caller: Caller,
    pub chat: ChatBody,
    /// `Some(agentId)` for `/chat/start`; otherwise the session's agent is looked up.
    pub start_agent: Option<String>,
}

/// Start a shadow copy of `org`'s direct_llm chat, unless the concurrency bound is reached
/// (counted as `skipped`; so is a copy whose conversation the bridge could not read). Returns
/// the pair the legacy half is reported to, when it started.
///
/// Orgs on `rollout.direct_orgs` are never copied: the denylist wins over everything, and an org
/// kept off the runtime (by contract, data residency, a known incompatibility) must not have its
/// chats executed there in the background either. Nothing starts while the proxy drains.
pub fn spawn(
    shared: &Arc<Shared>,
    active: Arc<Active>,
    downstream: RequestHeader,
    org: &str,
    session_id: String,
    source: Source,
) -> Option<Pair> {
    let metrics = shared.metrics;
    let denylisted = active.config.rollout.direct_orgs.iter().any(|o| o == org);
    if denylisted || shared.is_draining() {
        return None;
    }
    let max = active.config.rollout.shadow_max_inflight;
    let admitted = shared
        .shadow_in_flight
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok();
    if !admitted {
        metrics.shadow_total.with_label_values(&["skipped"]).inc();
        return None;
    }
    let slot = Slot(shared.clone());
    let shared = shared.clone();
    let pair = Pair::new(&active, org, Instant::now());
    let half = pair.clone();
    tokio::spawn(async move {
        let started = half.origin();
        let Some(body) = runtime_body(&shared, &active, &session_id, source).await else {
            drop(slot);
            shared
                .metrics
                .shadow_total
                .with_label_values(&["skipped"])
                .inc();
            half.runtime(&shared, None);
            return;
        };
        let report = run(&shared, &active, &downstream, &session_id, body, started).await;
        drop(slot);
        half.runtime(
            &shared,
            Some(PathSample {
                outcome: report.outcome,
                ttfe: report.first_content,
                duration: started.elapsed(),
                text_chars: report.text_chars,
            }),
        );
        let label = report.outcome.as_str();
        let m = shared.metrics;
        m.shadow_total.with_label_values(&[label]).inc();
        m.shadow_latency_seconds
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        m.shadow_events_total.inc_by(report.events);
        tracing::debug!(
            outcome = label,
            events = report.events,
            "shadow execution finished"
        );
    });
    Some(pair)
}

/// The runtime request of a copy; `None` when the bridge could not read the conversation.
async fn runtime_body(
    shared: &Shared,
    active: &Active,
    session_id: &str,
    source: Source,
) -> Option<Bytes> {
    let Reading {
        who,
        caller,
        chat,
        start_agent,
    } = match source {
        Source::Ready(body) => return Some(body),
        Source::Bridged(reading) => *reading,
    };
    let target = &active.bridge;
    let looked = match &start_agent {
        Some(agent) => shared.bridge.lookup_start(target, &who, agent).await,
        None => shared.bridge.lookup_session(target, &who, session_id).await,
    };
    match looked {
        Ok(mut conversation) => {
            // Legacy saves the user's message before it answers, so the copy may read it back:
            // the request adds it as the last entry itself.
            let saved_already = conversation
                .history
                .last()
                .is_some_and(|m| m.role == "user" && m.content == chat.message);
            if saved_already {
                conversation.history.pop();
            }
            let request = RuntimeRequest::bridged(session_id, &caller, &chat, &conversation);
            Some(Bytes::from(request.to_bytes()))
        }
        Err(e) => {
            tracing::debug!(error = %e, "shadow copy skipped: the bridge could not read the conversation");
            None
        }
    }
}

async fn run(
    shared: &Shared,
    active: &Active,
    downstream: &RequestHeader,
    session_id: &str,
    body: Bytes,
    started: Instant,
) -> ShadowReport {
    let deadline = started + active.config.runtime.execution_timeout();
    let stream =
        match crate::runtime::connection::open(shared, active, downstream, body, deadline, true)
            .await
        {
            Ok(s) => s,
            Err(f) => {
                return ShadowReport {
                    outcome: f.outcome,
                    events: 0,
                    first_content: None,
                    text_chars: 0,
                }
            }
        };
    let mapper = StreamMapper::new(session_id);
    let mut events = RuntimeEvents::new(stream, active.config.runtime.max_frame_bytes, mapper);
    let mut sink = Vec::new();
    let mut count = 0u64;
    // The Agent2UI the copy would have sent, measured the way the legacy answer is.
    let mut observer = StreamObserver::new();
    let mut at = started.elapsed();
    let end = 'read: loop {
        sink.clear();
        while let Some(read) = events.next(&mut sink) {
            match read {
                Read::Event(mapped) => {
                    observer.feed(&sink, at);
                    if let Mapped::Message(_)
                    | Mapped::Heartbeat
                    | Mapped::Complete(_)
                    | Mapped::Failed { .. } = mapped
                    {
                        count += 1;
                    }
                }
                Read::AfterDone => {}
                Read::End(end) => break 'read end,
            }
            sink.clear();
        }
        // `timeout_at` polls the read before its timer: a flooding runtime, whose read is always
        // ready, would never time out without this check first.
        let read = if Instant::now() >= deadline {
            None
        } else {
            tokio::time::timeout_at(deadline.into(), events.read())
                .await
                .ok()
        };
        if read.is_none() {
            break End::Deadline {
                budget: deadline - started,
            };
        }
        at = started.elapsed();
    };
    let verdict = stream::verdict(&events.facts(false, end));
    // Read to its end, the connection goes back to the pool; closed otherwise.
    events.release();
    ShadowReport {
        // A shadow copy has no client to lose and is dropped, not cut off, at shutdown: every
        // end it sees is the runtime's doing.
        outcome: verdict.outcome.unwrap_or(Outcome::Error),
        events: count,
        first_content: observer.first_content,
        text_chars: observer.text_chars,
    }
}
