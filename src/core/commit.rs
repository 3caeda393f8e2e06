//! The commit point: until the proxy commits to a runtime stream, nothing has reached the user,
//! so a runtime that fails first thing can still be failed over to legacy.
//!
//! The relay shows [`Precommit::see`] what happened while the client's response head is held
//! (an event the runtime sent, a timer, the end of the stream) and is told to keep holding,
//! to commit (and why), or to fail over. After the commit the stream is the runtime's, and
//! [`crate::core::stream::verdict`] judges how it ended.
//!
//! With `runtime.pre_content = "stream"` ([`Precommit::streaming`]) the head is not held: the
//! status events and heartbeats pass to the client as they come ([`Step::Pass`]), and a failure
//! before content is still [`Step::FailOver`], which the relay turns into a rescue inside the
//! open stream.

use crate::core::config::{CommitOn, CommitTimeoutAction, PreContent};
use crate::core::stats::Outcome;
use crate::core::stream::{End, CANCELLED_CODE};

/// Most events (`thinking`, `ping`) held before the commit: a runtime that only thinks is
/// committed to rather than buffered without end.
pub const MAX_HELD_EVENTS: usize = 32;
/// Most bytes of client events held before the commit.
pub const MAX_HELD_BYTES: usize = 64 * 1024;

/// What the relay saw while it held the client's response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen<'a> {
    /// A `thinking` event, `bytes` long once rewritten for the client.
    Thinking { bytes: usize },
    /// The runtime's `ping`, `bytes` long as the client's heartbeat.
    Ping { bytes: usize },
    /// Any other event the client would get: a message, or `execution_complete`.
    Content,
    /// The runtime's `execution_error`, with its code.
    Error { code: &'a str },
    /// `runtime.commit_timeout_ms` passed since the runtime's response head.
    Timeout,
    /// A proxy heartbeat fell due.
    Heartbeat,
    /// Reading the stream stopped.
    End(&'a End),
}

/// Why the proxy committed; bounded, for `cutover_commit_total{trigger}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `commit_timeout_ms = 0`: at the runtime's response head.
    Head,
    Content,
    FirstEvent,
    Timeout,
    Heartbeat,
    Cancel,
    /// The held events reached [`MAX_HELD_EVENTS`] or [`MAX_HELD_BYTES`].
    Overflow,
    /// The execution deadline passed: the client gets its `TIMEOUT` event.
    Deadline,
    /// The proxy is shutting down: the client gets its `SHUTTING_DOWN` event.
    Shutdown,
}

impl Trigger {
    pub const ALL: [Trigger; 9] = [
        Trigger::Head,
        Trigger::Content,
        Trigger::FirstEvent,
        Trigger::Timeout,
        Trigger::Heartbeat,
        Trigger::Cancel,
        Trigger::Overflow,
        Trigger::Deadline,
        Trigger::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Head => "head",
            Trigger::Content => "content",
            Trigger::FirstEvent => "first_event",
            Trigger::Timeout => "timeout",
            Trigger::Heartbeat => "heartbeat",
            Trigger::Cancel => "cancel",
            Trigger::Overflow => "overflow",
            Trigger::Deadline => "deadline",
            Trigger::Shutdown => "shutdown",
        }
    }
}

/// What the relay does with what it saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Keep holding, and keep this event for the commit.
    Hold,
    /// Streaming: this status event (or heartbeat) goes to the client now; still no content.
    Pass,
    /// Write the response head, the held events, then this one.
    Commit(Trigger),
    /// Nothing reached the user: legacy serves the request instead. The runtime's outcome:
    /// a timeout when it was too slow (no content by the commit timeout with
    /// `commit_timeout_action = "failover"`, or stalled), an error otherwise.
    FailOver(Outcome),
    /// The client went away: nobody to serve, and not the runtime's failure.
    Abandon,
}

/// The held part of one stream, before its commit.
#[derive(Debug, Clone)]
pub struct Precommit {
    on: CommitOn,
    on_timeout: CommitTimeoutAction,
    pre_content: PreContent,
    held: Held,
    held_bytes: usize,
}

/// The events held so far, by kind: written, in order, at the commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub thinking: usize,
    pub pings: usize,
}

impl Held {
    pub fn events(self) -> usize {
        self.thinking + self.pings
    }
}

impl Precommit {
    pub fn new(on: CommitOn, on_timeout: CommitTimeoutAction) -> Self {
        Precommit {
            on,
            on_timeout,
            pre_content: PreContent::Hold,
            held: Held::default(),
            held_bytes: 0,
        }
    }

    /// The same point with the head already out (`pre_content = "stream"`): nothing is held.
    pub fn streaming(mut self) -> Self {
        self.pre_content = PreContent::Stream;
        self
    }

    pub fn held(&self) -> Held {
        self.held
    }

    pub fn see(&mut self, seen: Seen) -> Step {
        let first_event = self.on == CommitOn::FirstEvent;
        match seen {
            Seen::Thinking { .. } | Seen::Ping { .. } | Seen::Content if first_event => {
                Step::Commit(Trigger::FirstEvent)
            }
            // The head is out: status and liveness pass, and do not commit to the runtime.
            Seen::Thinking { .. } | Seen::Ping { .. } | Seen::Heartbeat
                if self.pre_content == PreContent::Stream =>
            {
                Step::Pass
            }
            Seen::Thinking { bytes } => {
                self.held.thinking += 1;
                self.hold(bytes)
            }
            // Not content: a runtime that only pings has shown the user nothing yet.
            Seen::Ping { bytes } => {
                self.held.pings += 1;
                self.hold(bytes)
            }
            Seen::Content => Step::Commit(Trigger::Content),
            // The user stopped it: legacy must not answer what the user cancelled.
            Seen::Error { code } if code == CANCELLED_CODE => Step::Commit(Trigger::Cancel),
            Seen::Error { .. } => Step::FailOver(Outcome::Error),
            // A time-to-first-content limit: legacy answers what the runtime could not start.
            Seen::Timeout if self.on_timeout == CommitTimeoutAction::Failover => {
                Step::FailOver(Outcome::Timeout)
            }
            Seen::Timeout => Step::Commit(Trigger::Timeout),
            Seen::Heartbeat => Step::Commit(Trigger::Heartbeat),
            // Legacy would start the wait over, past the time the user was promised.
            Seen::End(End::Deadline { .. }) => Step::Commit(Trigger::Deadline),
            Seen::End(End::Shutdown) => Step::Commit(Trigger::Shutdown),
            Seen::End(End::ClientGone) => Step::Abandon,
            Seen::End(End::Stalled { .. }) => Step::FailOver(Outcome::Timeout),
            Seen::End(
                End::Done
                | End::BodyEnd
                | End::Broken(_)
                | End::FrameTooLarge { .. }
                | End::ExecutionError,
            ) => Step::FailOver(Outcome::Error),
        }
    }

    fn hold(&mut self, bytes: usize) -> Step {
        self.held_bytes += bytes;
        if self.held.events() >= MAX_HELD_EVENTS || self.held_bytes >= MAX_HELD_BYTES {
            Step::Commit(Trigger::Overflow)
        } else {
            Step::Hold
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn content() -> Precommit {
        Precommit::new(CommitOn::Content, CommitTimeoutAction::Commit)
    }

    fn on(on: CommitOn) -> Precommit {
        Precommit::new(on, CommitTimeoutAction::Commit)
    }

    const THINKING: Seen<'static> = Seen::Thinking { bytes: 100 };
    const PING: Seen<'static> = Seen::Ping { bytes: 30 };

    #[test]
    fn streaming_passes_status_and_heartbeats_and_fails_over_the_same() {
        let mut p = content().streaming();
        for _ in 0..(MAX_HELD_EVENTS * 2) {
            assert_eq!(p.see(Seen::Thinking { bytes: 4096 }), Step::Pass);
            assert_eq!(p.see(PING), Step::Pass);
            assert_eq!(p.see(Seen::Heartbeat), Step::Pass);
        }
        assert_eq!(p.held(), Held::default());
        assert_eq!(p.see(Seen::Content), Step::Commit(Trigger::Content));
        let mut p = content().streaming();
        assert_eq!(
            p.see(Seen::Error { code: "LLM_DOWN" }),
            Step::FailOver(Outcome::Error)
        );
        assert_eq!(
            content().streaming().see(Seen::Error {
                code: CANCELLED_CODE
            }),
            Step::Commit(Trigger::Cancel)
        );
        let failover = Precommit::new(CommitOn::Content, CommitTimeoutAction::Failover).streaming();
        assert_eq!(
            failover.clone().see(Seen::Timeout),
            Step::FailOver(Outcome::Timeout)
        );
        assert_eq!(
            content().streaming().see(Seen::Timeout),
            Step::Commit(Trigger::Timeout)
        );
        // commit_on = "first_event" commits at the first event, streamed or not.
        assert_eq!(
            on(CommitOn::FirstEvent).streaming().see(THINKING),
            Step::Commit(Trigger::FirstEvent)
        );
    }

    #[test]
    fn thinking_and_pings_are_held_until_content() {
        let mut p = content();
        assert_eq!(p.see(THINKING), Step::Hold);
        assert_eq!(p.see(PING), Step::Hold);
        assert_eq!(p.see(THINKING), Step::Hold);
        assert_eq!(
            p.held(),
            Held {
                thinking: 2,
                pings: 1
            }
        );
        assert_eq!(p.see(Seen::Content), Step::Commit(Trigger::Content));
    }

    #[test]
    fn first_event_commits_on_anything_the_client_would_get() {
        for seen in [THINKING, PING, Seen::Content] {
            let mut p = on(CommitOn::FirstEvent);
            assert_eq!(p.see(seen), Step::Commit(Trigger::FirstEvent), "{seen:?}");
        }
    }

    #[test]
    fn failures_before_the_commit_fail_over() {
        let ends = [
            End::Done,
            End::BodyEnd,
            End::Broken("reset".into()),
            End::FrameTooLarge { limit: 1024 },
            End::ExecutionError,
        ];
        for commit_on in [CommitOn::Content, CommitOn::FirstEvent] {
            let mut p = on(commit_on);
            let error = Step::FailOver(Outcome::Error);
            assert_eq!(p.see(Seen::Error { code: "LLM_ERROR" }), error);
            for end in &ends {
                assert_eq!(on(commit_on).see(Seen::End(end)), error);
            }
            // Silence before the commit is the runtime being too slow.
            let stalled = End::Stalled {
                idle: Duration::from_secs(60),
            };
            assert_eq!(
                on(commit_on).see(Seen::End(&stalled)),
                Step::FailOver(Outcome::Timeout)
            );
        }
    }

    #[test]
    fn the_commit_timeout_fails_over_when_told_to() {
        let mut p = Precommit::new(CommitOn::Content, CommitTimeoutAction::Failover);
        assert_eq!(p.see(THINKING), Step::Hold);
        assert_eq!(p.see(Seen::Timeout), Step::FailOver(Outcome::Timeout));
        // Content before it still commits, and a heartbeat is not the commit timeout.
        let mut p = Precommit::new(CommitOn::Content, CommitTimeoutAction::Failover);
        assert_eq!(p.see(Seen::Heartbeat), Step::Commit(Trigger::Heartbeat));
        let mut p = Precommit::new(CommitOn::Content, CommitTimeoutAction::Failover);
        assert_eq!(p.see(Seen::Content), Step::Commit(Trigger::Content));
    }

    #[test]
    fn a_cancel_timers_and_the_deadline_commit() {
        let mut p = content();
        let cancel = Seen::Error {
            code: CANCELLED_CODE,
        };
        assert_eq!(p.see(cancel), Step::Commit(Trigger::Cancel));
        // Only that exact code is a cancel.
        let near = Seen::Error {
            code: "EXECUTION_CANCELLED_BY_TIMEOUT",
        };
        assert_eq!(content().see(near), Step::FailOver(Outcome::Error));
        assert_eq!(content().see(Seen::Timeout), Step::Commit(Trigger::Timeout));
        assert_eq!(
            content().see(Seen::Heartbeat),
            Step::Commit(Trigger::Heartbeat)
        );
        let deadline = End::Deadline {
            budget: Duration::from_secs(1),
        };
        assert_eq!(
            content().see(Seen::End(&deadline)),
            Step::Commit(Trigger::Deadline)
        );
        assert_eq!(
            content().see(Seen::End(&End::Shutdown)),
            Step::Commit(Trigger::Shutdown)
        );
        assert_eq!(content().see(Seen::End(&End::ClientGone)), Step::Abandon);
    }

    #[test]
    fn held_thinking_is_bounded_by_count_and_bytes() {
        let mut p = content();
        for i in 1..MAX_HELD_EVENTS {
            let seen = if i % 2 == 0 { PING } else { THINKING };
            assert_eq!(p.see(seen), Step::Hold);
        }
        assert_eq!(p.see(THINKING), Step::Commit(Trigger::Overflow));
        let mut p = content();
        assert_eq!(
            p.see(Seen::Thinking {
                bytes: MAX_HELD_BYTES - 1
            }),
            Step::Hold
        );
        assert_eq!(
            p.see(Seen::Thinking { bytes: 1 }),
            Step::Commit(Trigger::Overflow)
        );
    }

    #[test]
    fn trigger_labels_are_distinct() {
        let mut labels: Vec<_> = Trigger::ALL.iter().map(|t| t.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Trigger::ALL.len());
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Thinking(usize),
        Ping(usize),
        Content,
        Error(bool),
        Timeout,
        Heartbeat,
        End(u8),
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            4 => (0usize..20_000).prop_map(Ev::Thinking),
            2 => (0usize..100).prop_map(Ev::Ping),
            1 => Just(Ev::Content),
            1 => any::<bool>().prop_map(Ev::Error),
            1 => Just(Ev::Timeout),
            1 => Just(Ev::Heartbeat),
            1 => (0u8..9).prop_map(Ev::End),
        ]
    }

    fn end_of(n: u8) -> End {
        match n {
            0 => End::Done,
            1 => End::BodyEnd,
            2 => End::Broken("reset".into()),
            3 => End::FrameTooLarge { limit: 1024 },
            4 => End::ExecutionError,
            5 => End::Deadline {
                budget: Duration::from_secs(1),
            },
            6 => End::Shutdown,
            7 => End::ClientGone,
            _ => End::Stalled {
                idle: Duration::from_secs(1),
            },
        }
    }

    proptest! {
        /// Whatever the runtime sends, holding stops at the first step that is not a hold, the
        /// held bytes stay bounded, only a runtime failure fails over, and a cancel never does.
        #[test]
        fn holding_is_bounded_and_only_failures_fail_over(
            evs in proptest::collection::vec(ev(), 1..80),
            first_event in any::<bool>(),
            fail_on_timeout in any::<bool>(),
        ) {
            let on = if first_event { CommitOn::FirstEvent } else { CommitOn::Content };
            let action = if fail_on_timeout {
                CommitTimeoutAction::Failover
            } else {
                CommitTimeoutAction::Commit
            };
            let mut p = Precommit::new(on, action);
            let mut held_bytes = 0usize;
            for e in &evs {
                let end;
                let seen = match e {
                    Ev::Thinking(b) => Seen::Thinking { bytes: *b },
                    Ev::Ping(b) => Seen::Ping { bytes: *b },
                    Ev::Content => Seen::Content,
                    Ev::Error(true) => Seen::Error { code: CANCELLED_CODE },
                    Ev::Error(false) => Seen::Error { code: "TOOL_FAILED" },
                    Ev::Timeout => Seen::Timeout,
                    Ev::Heartbeat => Seen::Heartbeat,
                    Ev::End(n) => { end = end_of(*n); Seen::End(&end) }
                };
                let step = p.see(seen);
                match step {
                    Step::Hold => {
                        prop_assert!(!first_event, "first_event holds nothing");
                        held_bytes += match e {
                            Ev::Thinking(b) | Ev::Ping(b) => *b,
                            _ => return Err(TestCaseError::fail(format!("{e:?} held"))),
                        };
                        prop_assert!(held_bytes < MAX_HELD_BYTES);
                        prop_assert!(p.held().events() < MAX_HELD_EVENTS);
                        continue;
                    }
                    Step::Pass => prop_assert!(false, "a held stream passes nothing"),
                    Step::FailOver(Outcome::Error) => prop_assert!(
                        matches!(e, Ev::Error(false) | Ev::End(0..=4)),
                        "{e:?} failed over"
                    ),
                    Step::FailOver(outcome) => prop_assert!(
                        outcome == Outcome::Timeout
                            && (matches!(e, Ev::End(8)) || (fail_on_timeout && matches!(e, Ev::Timeout))),
                        "{e:?} failed over as {outcome:?}"
                    ),
                    Step::Commit(Trigger::Cancel) => prop_assert!(matches!(e, Ev::Error(true))),
                    Step::Commit(Trigger::Content) => prop_assert!(matches!(e, Ev::Content)),
                    Step::Commit(_) => {}
                    Step::Abandon => prop_assert!(matches!(e, Ev::End(7))),
                }
                break;
            }
        }
    }
}
