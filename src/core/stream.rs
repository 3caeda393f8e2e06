//! How a runtime stream ended, judged once for every reader of it.
//!
//! The relay (a client reading) and the shadow (nobody reading) feed [`verdict`] the same facts
//! about one execution's stream and get the same answer: the outcome the breaker and the stats
//! count, and the error event, if any, that closes the client's stream.

use std::time::Duration;

use crate::core::stats::Outcome;

/// The `execution_error` code the runtime sends after a user's cancel
/// (`/api/v1/execute/cancel`): the user stopped the execution, the runtime did not fail.
pub const CANCELLED_CODE: &str = "EXECUTION_CANCELLED";

/// The code of the error event that ends a stream whose runtime fell silent after the commit.
pub const STALLED_CODE: &str = "RUNTIME_STALLED";

/// How the runtime's body stopped being read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The `[DONE]` marker.
    Done,
    /// The body was read to its framed end (or a close-delimited body to a clean EOF).
    BodyEnd,
    /// The connection broke or the body's framing was invalid.
    Broken(String),
    /// A frame grew past `runtime.max_frame_bytes`.
    FrameTooLarge { limit: usize },
    /// The execution deadline passed; `budget` is how long the execution was given.
    Deadline { budget: Duration },
    /// The runtime sent nothing at all (not even a ping) for `idle` (`runtime.idle_timeout_ms`).
    Stalled { idle: Duration },
    /// The proxy is shutting down.
    Shutdown,
    /// The client went away or stopped reading.
    ClientGone,
    /// Reading stopped at the runtime's `execution_error`: the stream is over.
    ExecutionError,
}

/// Everything [`verdict`] looks at. A struct so that a new fact is one field, not a change to
/// every call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// A client reads this stream (false for a shadow copy): only then is there an event to
    /// close it with.
    pub client: bool,
    /// `execution_complete` was mapped: the client has its `done`.
    pub completed: bool,
    /// The `code` of the runtime's `execution_error`, when one was mapped.
    pub runtime_error: Option<String>,
    pub end: End,
}

/// The error event the proxy writes to close a client's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closing {
    pub code: &'static str,
    pub message: String,
}

/// What a stream's end means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `None` when the stream ended for a reason that is not the runtime's fault (client gone,
    /// proxy shutting down): counted as cancelled, kept out of the breaker.
    pub outcome: Option<Outcome>,
    /// The event the proxy sends to end the client's stream; `None` when the stream already
    /// ended properly or nobody reads it.
    pub closing: Option<Closing>,
}

/// The one rule for how a runtime stream ended.
///
/// Once `execution_complete` was mapped, only `[DONE]` or the end of the body was missing, so
/// whatever ends the read after it is a success. An `execution_error` is a failure the client
/// already saw as the runtime's own event. Shutting down and a departed client are nobody's
/// fault, and so is a user's cancel ([`CANCELLED_CODE`]); a frame too large is a failure even after completion, since the runtime broke the
/// framing.
pub fn verdict(facts: &Facts) -> Verdict {
    let (outcome, closing) = judge(facts);
    Verdict {
        outcome,
        closing: closing.filter(|_| facts.client),
    }
}

fn judge(facts: &Facts) -> (Option<Outcome>, Option<Closing>) {
    let close = |code, message: String| Some(Closing { code, message });
    match &facts.end {
        End::ClientGone => (None, None),
        End::Shutdown => (
            None,
            close(
                "SHUTTING_DOWN",
                "the proxy is shutting down; please retry".into(),
            ),
        ),
        // The client already has the runtime's own error event for the cancel.
        _ if facts.runtime_error.as_deref() == Some(CANCELLED_CODE) => (None, None),
        _ if facts.runtime_error.is_some() => (Some(Outcome::Error), None),
        End::ExecutionError => (Some(Outcome::Error), None),
        End::FrameTooLarge { limit } => (
            Some(Outcome::Error),
            close(
                "FRAME_TOO_LARGE",
                format!("runtime sent a frame larger than {limit} bytes"),
            ),
        ),
        _ if facts.completed => (Some(Outcome::Success), None),
        End::Done | End::BodyEnd => (
            Some(Outcome::Error),
            close(
                "STREAM_TRUNCATED",
                "runtime stream ended without execution_complete".into(),
            ),
        ),
        End::Broken(e) => (
            Some(Outcome::Error),
            close(
                "RUNTIME_DISCONNECTED",
                format!("runtime stream failed: {e}"),
            ),
        ),
        End::Deadline { budget } => (
            Some(Outcome::Timeout),
            close(
                "TIMEOUT",
                format!("runtime execution exceeded {} ms", budget.as_millis()),
            ),
        ),
        End::Stalled { idle } => (
            Some(Outcome::Timeout),
            close(
                STALLED_CODE,
                format!("runtime sent nothing for {} ms", idle.as_millis()),
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(end: End) -> Facts {
        Facts {
            client: true,
            completed: false,
            runtime_error: None,
            end,
        }
    }

    fn completed(end: End) -> Facts {
        Facts {
            completed: true,
            ..facts(end)
        }
    }

    fn failed(end: End) -> Facts {
        Facts {
            runtime_error: Some("TOOL_FAILED".into()),
            ..facts(end)
        }
    }

    fn all_ends() -> Vec<End> {
        vec![
            End::Done,
            End::BodyEnd,
            End::Broken("reset".into()),
            End::FrameTooLarge { limit: 8 },
            End::Deadline {
                budget: Duration::from_millis(250),
            },
            End::Stalled {
                idle: Duration::from_millis(250),
            },
            End::Shutdown,
            End::ClientGone,
            End::ExecutionError,
        ]
    }

    fn closed(outcome: Outcome, code: &'static str, message: &str) -> Verdict {
        Verdict {
            outcome: Some(outcome),
            closing: Some(Closing {
                code,
                message: message.into(),
            }),
        }
    }

    fn quiet(outcome: Option<Outcome>) -> Verdict {
        Verdict {
            outcome,
            closing: None,
        }
    }

    #[test]
    fn an_incomplete_stream_is_closed_with_the_reason_it_ended() {
        let truncated = "runtime stream ended without execution_complete";
        let ms = Duration::from_millis;
        use Outcome::{Error, Timeout};
        for (end, expected) in [
            (End::Done, closed(Error, "STREAM_TRUNCATED", truncated)),
            (End::BodyEnd, closed(Error, "STREAM_TRUNCATED", truncated)),
            (
                End::Broken("connection reset".into()),
                closed(
                    Error,
                    "RUNTIME_DISCONNECTED",
                    "runtime stream failed: connection reset",
                ),
            ),
            (
                End::FrameTooLarge { limit: 1024 },
                closed(
                    Error,
                    "FRAME_TOO_LARGE",
                    "runtime sent a frame larger than 1024 bytes",
                ),
            ),
            (
                End::Deadline { budget: ms(1500) },
                closed(Timeout, "TIMEOUT", "runtime execution exceeded 1500 ms"),
            ),
            (End::ExecutionError, quiet(Some(Error))),
            (
                End::Stalled { idle: ms(60_000) },
                closed(
                    Timeout,
                    "RUNTIME_STALLED",
                    "runtime sent nothing for 60000 ms",
                ),
            ),
        ] {
            assert_eq!(verdict(&facts(end.clone())), expected, "{end:?}");
        }
    }

    #[test]
    fn after_completion_only_the_end_was_missing() {
        for end in [
            End::Done,
            End::BodyEnd,
            End::Broken("reset".into()),
            End::Stalled {
                idle: Duration::from_secs(1),
            },
            End::Deadline {
                budget: Duration::from_secs(1),
            },
        ] {
            assert_eq!(
                verdict(&completed(end.clone())),
                quiet(Some(Outcome::Success)),
                "{end:?}"
            );
        }
    }

    #[test]
    fn a_frame_too_large_fails_even_a_completed_stream() {
        assert_eq!(
            verdict(&completed(End::FrameTooLarge { limit: 8 })),
            closed(
                Outcome::Error,
                "FRAME_TOO_LARGE",
                "runtime sent a frame larger than 8 bytes"
            )
        );
    }

    #[test]
    fn shutdown_and_a_departed_client_are_not_the_runtimes_fault() {
        for f in [facts, completed, failed] {
            assert_eq!(
                verdict(&f(End::ClientGone)),
                quiet(None),
                "nobody to write to"
            );
            let shutdown = verdict(&f(End::Shutdown));
            assert_eq!(shutdown.outcome, None);
            assert_eq!(shutdown.closing.map(|c| c.code), Some("SHUTTING_DOWN"));
        }
    }

    #[test]
    fn an_execution_error_fails_the_stream_with_the_runtimes_own_event() {
        for end in all_ends() {
            let v = verdict(&failed(end.clone()));
            if matches!(end, End::ClientGone | End::Shutdown) {
                continue;
            }
            assert_eq!(v, quiet(Some(Outcome::Error)), "{end:?}");
            // Seen after completion (only the shadow reads that far), it still fails.
            let after_done = Facts {
                completed: true,
                ..failed(end.clone())
            };
            assert_eq!(verdict(&after_done), quiet(Some(Outcome::Error)), "{end:?}");
        }
    }

    #[test]
    fn a_users_cancel_is_nobodys_failure() {
        for end in [End::ExecutionError, End::Done, End::BodyEnd] {
            let cancelled = Facts {
                runtime_error: Some(CANCELLED_CODE.into()),
                ..facts(end.clone())
            };
            // The client already has the runtime's error event; the breaker is not fed.
            assert_eq!(verdict(&cancelled), quiet(None), "{end:?}");
            let shadow = Facts {
                client: false,
                ..cancelled
            };
            assert_eq!(verdict(&shadow), quiet(None), "{end:?}");
        }
        // Only that exact code: a look-alike is still the runtime's error.
        let other = Facts {
            runtime_error: Some("EXECUTION_CANCELLED_BY_TIMEOUT".into()),
            ..facts(End::ExecutionError)
        };
        assert_eq!(verdict(&other), quiet(Some(Outcome::Error)));
    }

    #[test]
    fn without_a_client_the_outcome_is_the_same_and_nothing_is_written() {
        for base in [facts, completed, failed] {
            for end in all_ends() {
                let with_client = verdict(&base(end.clone()));
                let shadow = verdict(&Facts {
                    client: false,
                    ..base(end.clone())
                });
                assert_eq!(shadow.outcome, with_client.outcome, "{end:?}");
                assert_eq!(shadow.closing, None, "{end:?}");
            }
        }
    }
}
