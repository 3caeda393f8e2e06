//! The one reader of a runtime stream: its body read as it comes, parsed as SSE and mapped to
//! Agent2UI events one at a time, with one rule for what ends the stream. The relay (a client
//! reading), the shadow (nobody reading) and a detached execution (a client that left) read
//! through it, so a stream ends the same way whoever reads it.
//!
//! What ends a stream: the runtime's `execution_error` or `[DONE]` (the events after either in
//! the same read are not handed out), a frame over `runtime.max_frame_bytes`, the end of the
//! body, a broken connection, or a silence past the runtime's idle timeout. After
//! `execution_complete` the answer is whole: a frame other than `[DONE]` is dropped
//! ([`Read::AfterDone`]), never handed out as a second terminal event or a stray message.
//! [`RuntimeEvents::facts`] then says what [`stream::verdict`](crate::core::stream::verdict)
//! judges.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::core::agent2ui::{Mapped, StreamMapper};
use crate::core::sse::{SseError, SseEvent, SseParser};
use crate::core::stream::{End, Facts};
use crate::upstream::{Body, Silence, Stage};

/// Parsed frames' room kept between reads: a few, so that a steady stream of small reads does
/// not allocate it again each time.
const KEEP_FRAMES: usize = 8;
/// The parser's line and frame buffers kept between reads, for the same reason.
const KEEP_BYTES: usize = 1024;

/// What the next step of a stream is.
#[derive(Debug)]
pub enum Read {
    /// One runtime event, mapped: what it wrote for the client is at the end of `out`.
    Event(Mapped),
    /// A frame after `execution_complete` other than `[DONE]`: dropped.
    AfterDone,
    /// The stream is over; nothing follows.
    End(End),
}

/// An upstream's event stream, read as it comes and parsed into whole frames, with one rule
/// for what ends it: the end of the body, a broken connection, a frame over the limit, or a
/// silence past the upstream's idle timeout. The runtime's stream is read through it
/// ([`RuntimeEvents`], which maps each frame), and so is legacy's answer continuing a rescued
/// stream (`runtime::rescue`, which writes each frame again).
pub struct Frames<C = TcpStream> {
    body: Body<C>,
    parser: SseParser,
    /// Parsed from the last read; handed out from `next`.
    parsed: Vec<SseEvent>,
    next: usize,
    /// Why the stream is over, once known: handed out after the frames parsed before it.
    end: Option<End>,
    /// Bytes the last read brought.
    last_read: usize,
}

impl<C> Frames<C> {
    pub fn new(body: Body<C>, max_frame_bytes: usize) -> Self {
        Frames {
            body,
            parser: SseParser::new(max_frame_bytes),
            parsed: Vec::new(),
            next: 0,
            end: None,
            last_read: 0,
        }
    }

    /// The next frame from what has been read; `None` when none is left, and then [`Self::end`]
    /// says whether the stream is over.
    pub fn next_frame(&mut self) -> Option<&SseEvent> {
        let ev = self.parsed.get(self.next)?;
        self.next += 1;
        Some(ev)
    }

    /// Why the stream is over, once every frame before it was handed out; `None` while more may
    /// be read.
    pub fn end(&mut self) -> Option<End> {
        self.end.take()
    }

    /// The stream ends at the frame handed out last (`why`, or no further step at all): what
    /// followed it in the same read is not handed out.
    pub fn stop(&mut self, why: Option<End>) {
        self.next = self.parsed.len();
        self.end = why;
    }

    /// Bytes the last read brought.
    pub fn last_read(&self) -> usize {
        self.last_read
    }

    /// Back to the pool if the body was read to its end and the connection can carry another
    /// request; closed otherwise, which tells the upstream to stop.
    pub fn release(self) {
        self.body.release();
    }
}

impl<C: AsyncRead + AsyncWrite + Unpin + Send + 'static> Frames<C> {
    /// Read more of the stream, once every frame read before has been handed out. Cancel-safe:
    /// its one await is the body's read, and what it read is parsed only once it completes, so it
    /// can race timers in a `select!`.
    pub async fn read(&mut self) {
        debug_assert!(self.next >= self.parsed.len() && self.end.is_none());
        // Every frame of the last read was handed out: a stream that now waits, maybe for
        // minutes, keeps neither them nor the room a large read needed.
        self.parsed.clear();
        self.parsed.shrink_to(KEEP_FRAMES);
        self.next = 0;
        self.parser.shrink(KEEP_BYTES);
        let read = self.body.fill().await;
        self.last_read = 0;
        match read {
            Ok(0) => self.end = Some(self.body_over()),
            Ok(n) => {
                self.last_read = n;
                let (body, parsed) = self.parse();
                self.end = match (parsed, body) {
                    (Err(SseError::FrameTooLarge { limit }), _) => {
                        Some(End::FrameTooLarge { limit })
                    }
                    (_, Ok(false)) => None,
                    (_, Ok(true)) => Some(End::BodyEnd),
                    (_, Err(e)) => Some(End::Broken(e.to_string())),
                };
            }
            // Silent past its idle timeout (pings count), or the connection broke.
            Err(e) => {
                self.end = Some(match Silence::of(&e) {
                    Some(s) if s.stage == Stage::Idle => End::Stalled { idle: s.after },
                    _ => End::Broken(e.to_string()),
                })
            }
        }
    }

    /// The upstream closed the connection: the end of a close-delimited body, a break otherwise.
    fn body_over(&mut self) -> End {
        match self.body.eof() {
            Ok(()) => {
                self.parser.finish();
                End::BodyEnd
            }
            Err(e) => End::Broken(e.to_string()),
        }
    }

    /// Decode what was read and parse it: whether the body is complete, then the parser's
    /// verdict (a frame over its limit).
    fn parse(
        &mut self,
    ) -> (
        Result<bool, crate::core::h1::BodyError>,
        Result<(), SseError>,
    ) {
        let (parser, parsed) = (&mut self.parser, &mut self.parsed);
        let mut verdict = Ok(());
        let body = self.body.decode(|piece| {
            if verdict.is_ok() {
                verdict = parser.feed(piece, parsed);
            }
        });
        if let Ok(true) = body {
            parser.finish();
        }
        (body, verdict)
    }

    /// After a clean end the body's last bytes may still be on their way: read them on a task
    /// of its own so the connection can be reused.
    pub fn release_when_done(self) {
        self.body.release_when_done();
    }
}

/// One runtime stream, read event by event.
pub struct RuntimeEvents<C = TcpStream> {
    frames: Frames<C>,
    mapper: StreamMapper,
    completed: bool,
    runtime_error: Option<String>,
}

impl<C> RuntimeEvents<C> {
    pub fn new(body: Body<C>, max_frame_bytes: usize, mapper: StreamMapper) -> Self {
        RuntimeEvents {
            frames: Frames::new(body, max_frame_bytes),
            mapper,
            completed: false,
            runtime_error: None,
        }
    }

    /// The next step of the stream from what has been read, mapping an event's client bytes onto
    /// `out`; `None` when more must be read first.
    pub fn next(&mut self, out: &mut Vec<u8>) -> Option<Read> {
        let Some(ev) = self.frames.next_frame() else {
            return self.frames.end().map(Read::End);
        };
        if self.completed && ev.data.trim() != "[DONE]" {
            return Some(Read::AfterDone);
        }
        let mapped = self.mapper.map(ev, out);
        match &mapped {
            Mapped::Complete(_) => self.completed = true,
            Mapped::Failed { code, .. } => {
                self.runtime_error = Some(code.clone());
                self.frames.stop(Some(End::ExecutionError));
            }
            Mapped::End => self.frames.stop(Some(End::Done)),
            _ => {}
        }
        Some(Read::Event(mapped))
    }

    /// Bytes the last read brought: about what its events take once rewritten.
    pub fn last_read(&self) -> usize {
        self.frames.last_read()
    }

    /// `execution_complete` was mapped: the client has its answer.
    pub fn completed(&self) -> bool {
        self.completed
    }

    /// What the verdict on the stream's `end` looks at; `client`: someone reads it.
    pub fn facts(&mut self, client: bool, end: End) -> Facts {
        Facts {
            client,
            completed: self.completed,
            runtime_error: self.runtime_error.take(),
            end,
        }
    }

    pub fn mapper(&mut self) -> &mut StreamMapper {
        &mut self.mapper
    }

    /// Back to the pool if the body was read to its end and the connection can carry another
    /// request; closed otherwise, which tells the runtime to stop.
    pub fn release(self) {
        self.frames.release();
    }
}

impl<C: AsyncRead + AsyncWrite + Unpin + Send + 'static> RuntimeEvents<C> {
    /// Read more of the stream, once every event read before has been handed out. Cancel-safe:
    /// see [`Frames::read`].
    pub async fn read(&mut self) {
        self.frames.read().await;
    }

    /// After a clean end the body's last bytes may still be on their way: read them on a task
    /// of its own so the connection can be reused.
    pub fn release_when_done(self) {
        self.frames.release_when_done();
    }
}
