//! Executions finished for clients that left (`bridge.finish_detached`): a client that goes away
//! after the commit (a closed tab, a lost mobile network) does not lose its answer. The in-app
//! version ran every execution to its end whatever the browser did; here the relay hands what it
//! holds (the runtime's event reader mid-stream: connection, parser and mapper) to a task of its own,
//! which reads the stream to its end within the execution deadline and saves the answer.
//!
//! They are bounded: beyond `bridge.max_detached` running at once the oldest is dropped (its
//! runtime connection closed, which tells the runtime to stop), counted and logged. Each one
//! counts as a request in flight for the shutdown drain, and the drain's cutoff ends it. Its
//! outcome is never the breaker's business: the client leaving is not the runtime's fault, and
//! the relay already recorded the request as a client that went away.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::core::agent2ui::Mapped;
use crate::core::stream::End;
use crate::runtime::events::{Read, RuntimeEvents};
use crate::runtime::execution::{save_answer, RelayArgs};

/// What the relay holds when its client leaves.
pub struct Leftover<C = TcpStream> {
    /// The stream mid-read: the events parsed and not handed out yet come first.
    pub events: RuntimeEvents<C>,
    /// The user message's save, which the answer's waits for.
    pub user_saved: Option<JoinHandle<()>>,
}

/// How a detached execution ended: the `result` label of `cutover_bridge_detached_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Saved,
    Failed,
    Timeout,
    Dropped,
    Shutdown,
}

impl Ended {
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::Saved => "saved",
            Ended::Failed => "failed",
            Ended::Timeout => "timeout",
            Ended::Dropped => "dropped",
            Ended::Shutdown => "shutdown",
        }
    }
}

/// Read the rest of the stream on a task of its own and save the answer; `max`:
/// `bridge.max_detached`. Counted as a request in flight from here, so the drain never sees a
/// gap between the relay's end and the task's start.
pub fn finish<C>(args: RelayArgs, left: Leftover<C>, max: usize)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = args.shared.clone();
    let guard = shared.requests.enter();
    let (id, cancel) = shared.detached.admit(max);
    let metrics = &shared.metrics.bridge;
    metrics.detached.inc();
    tracing::info!(
        session_id = %args.session_id,
        "client left after the commit; reading the runtime's answer to its end"
    );
    tokio::spawn(async move {
        let ended = run(&args, left, &cancel).await;
        args.shared.detached.leave(id);
        let metrics = &args.shared.metrics.bridge;
        metrics.detached.dec();
        metrics
            .detached_total
            .with_label_values(&[ended.as_str()])
            .inc();
        drop(guard);
    });
}

async fn run<C>(args: &RelayArgs, left: Leftover<C>, cancel: &Notify) -> Ended
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Leftover {
        mut events,
        mut user_saved,
    } = left;
    let mut cutoff = args.shared.cutoff.subscribe();
    // The client's bytes are not written anywhere; the mapper keeps the answer's text.
    let mut sink = Vec::new();
    loop {
        sink.clear();
        while let Some(read) = events.next(&mut sink) {
            sink.clear();
            match read {
                Read::Event(Mapped::Complete(completion)) => {
                    let latency_ms = args.started.elapsed().as_millis() as u64;
                    if let Some(user) = user_saved.take() {
                        let _ = user.await;
                    }
                    save_answer(args, events.mapper(), &completion, latency_ms).await;
                    events.release_when_done();
                    return Ended::Saved;
                }
                Read::Event(Mapped::Failed { code, message }) => {
                    let why = format!("{code}: {message}");
                    return unsaved(args, &mut events, Ended::Failed, &why);
                }
                Read::Event(_) | Read::AfterDone => {}
                Read::End(end) => {
                    let why = match end {
                        End::Done | End::BodyEnd => "ended without an answer".to_string(),
                        End::Broken(e) => e,
                        other => format!("{other:?}"),
                    };
                    return unsaved(args, &mut events, Ended::Failed, &why);
                }
            }
        }
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(args.deadline.into()) => {
                return unsaved(args, &mut events, Ended::Timeout, "execution deadline")
            }
            _ = cutoff.wait_for(|c| *c) => {
                return unsaved(args, &mut events, Ended::Shutdown, "the proxy is shutting down")
            }
            _ = cancel.notified() => {
                return unsaved(args, &mut events, Ended::Dropped, "more than bridge.max_detached at once")
            }
            _ = events.read() => {}
        }
    }
}

/// A detached execution that ends without an answer to save: said so, with what the runtime had
/// written (the user saw it up to where they left).
fn unsaved<C>(args: &RelayArgs, events: &mut RuntimeEvents<C>, ended: Ended, why: &str) -> Ended {
    let partial = events.mapper().take_text();
    tracing::warn!(
        session_id = %args.session_id,
        result = ended.as_str(),
        why,
        partial = %partial,
        "execution finished for a client that left: no answer to save"
    );
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_result_labels_are_the_series_labels() {
        assert_eq!(
            Ended::Dropped.as_str(),
            crate::upstream::bridge::BridgeMetrics::DETACHED_RESULTS[3]
        );
    }
}
