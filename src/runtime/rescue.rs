//! Legacy's answer read into a client stream the runtime opened (`runtime.pre_content =
//! "stream"`): the original request sent to legacy through legacy's client (`upstream`), under
//! legacy's own deadlines, and its body read event by event through the runtime's own reader
//! ([`Frames`]: the same cancel-safe read, the same SSE parser, the same rule for what ends a
//! stream), each event written again whole (`core::rescue`).

use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::core::rescue;
use crate::core::stream::End;
use crate::runtime::events::Frames;
use crate::upstream::{Body, Call, Connect, Failure, Timeouts, Upstream};

/// What a relay needs to rescue its stream through legacy.
pub struct Rescue {
    /// The client's request as legacy gets it, head and body (`core::rescue::legacy_request`).
    pub request: Bytes,
    /// `legacy.address`.
    pub address: String,
    /// Legacy's deadlines from the request's config snapshot.
    pub timeouts: Timeouts,
    /// The session was made by the proxy for this `/chat/start`: deleted before legacy is asked,
    /// which makes its own.
    pub discard_session: bool,
}

/// The runtime failed before content after the client's head went out, and legacy took over.
#[derive(Debug, Clone)]
pub struct Rescued {
    /// The runtime's outcome, for the breaker: an error, or a timeout when it was too slow.
    pub outcome: crate::core::stats::Outcome,
    /// Why the runtime failed.
    pub detail: String,
    /// When it failed.
    pub at: Instant,
}

/// Ask legacy for the rescued request: its answer's body, ready to be relayed, or why it cannot
/// continue the client's stream (for the client's `error` event).
pub async fn ask<K: Connect>(
    legacy: &Upstream<K>,
    rescue: &Rescue,
) -> Result<LegacyEvents<K::Conn>, String> {
    let call = Call::new(&rescue.address, rescue.timeouts);
    let response = legacy.send(&call, &rescue.request).await.map_err(|e| {
        let why = match &e {
            Failure::Silent(s) => format!("legacy: {s}"),
            other => format!("legacy: {other}"),
        };
        tracing::warn!(error = %e, "legacy did not answer the rescued request");
        why
    })?;
    rescue::relayable(
        response.status(),
        response.header("content-type"),
        response.header("content-encoding"),
    )?;
    Ok(LegacyEvents::new(response.into_body(), MAX_FRAME))
}

/// Largest legacy frame relayed: a text piece or `done` is far smaller.
const MAX_FRAME: usize = 256 * 1024;

/// What the next step of legacy's stream is.
#[derive(Debug)]
pub enum Step {
    /// One event, written for the client onto the end of `out`.
    Event { done: bool },
    /// The stream is over before its `done`: why.
    Failed(String),
}

/// Legacy's answer, read event by event through the same reader as a runtime stream.
pub struct LegacyEvents<C> {
    frames: Frames<C>,
}

impl<C> LegacyEvents<C> {
    fn new(body: Body<C>, max_frame: usize) -> Self {
        LegacyEvents {
            frames: Frames::new(body, max_frame),
        }
    }

    /// The next step from what has been read; `None` when more must be read first.
    pub fn next(&mut self, out: &mut Vec<u8>) -> Option<Step> {
        let Some(ev) = self.frames.next_frame() else {
            return self.frames.end().map(|end| Step::Failed(ended(&end)));
        };
        rescue::write_event(ev, out);
        let done = rescue::is_done(ev);
        if done {
            // What follows legacy's `done` is not the client's.
            self.frames.stop(None);
        }
        Some(Step::Event { done })
    }
}

/// Why legacy's answer ended before its `done`, for the client's `error` event.
fn ended(end: &End) -> String {
    match end {
        End::Stalled { idle } => format!("legacy sent nothing for {} ms", idle.as_millis()),
        End::FrameTooLarge { limit } => format!("legacy sent an event larger than {limit} bytes"),
        End::Broken(e) => format!("legacy's answer broke off: {e}"),
        _ => "legacy's answer ended before its done".into(),
    }
}

impl<C: AsyncRead + AsyncWrite + Unpin + Send + 'static> LegacyEvents<C> {
    /// Back to the pool when the answer was read to its end, closed otherwise (which drops the
    /// request at legacy).
    pub fn release(self) {
        self.frames.release_when_done();
    }

    /// Read more, once every event read before has been handed out. Cancel-safe, as the
    /// runtime's reader: see [`Frames::read`].
    pub async fn read(&mut self) {
        self.frames.read().await;
    }
}
