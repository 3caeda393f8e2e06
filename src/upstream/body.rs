//! An upstream's response body, read as it comes under the upstream's idle deadline.
//!
//! The body is read by its caller's own loop ([`Body::fill`] then [`Body::decode`]), not by a
//! reader task: an idle stream holds no task, no channel and no read buffer, and the first
//! bytes reach the caller without a hop between tasks. Reads are cancel-safe (`fill` can race
//! timers in a `select!`) and fail with a typed [`Silence`] once the upstream has sent nothing for
//! its `idle_timeout_ms`.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::pool::{Key, Pool};
use super::watched::{Silence, Watched};
use crate::core::h1::{BodyDecoder, BodyError, Framing};

/// Room asked of the read buffer before a read while the upstream streams fast (the last read
/// filled its buffer).
const READ_SIZE: usize = 32 * 1024;
/// Room asked otherwise: a frame or two, so a held stream waits with ~1 KiB, not 16.
const SMALL_READ: usize = 1024;
/// How long the end of a body that has all its payload may take to arrive (a chunked body's
/// terminator) before the connection is given up rather than pooled.
const DRAIN: Duration = Duration::from_secs(2);

/// Why a body could not be read to its end.
#[derive(Debug)]
pub enum BodyFailure {
    /// The upstream sent nothing for its idle timeout.
    Silent(Silence),
    Io(io::Error),
    Framing(BodyError),
    /// Longer than the caller would hold.
    TooLarge(usize),
}

impl fmt::Display for BodyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyFailure::Silent(s) => write!(f, "{s}"),
            BodyFailure::Io(e) => write!(f, "{e}"),
            BodyFailure::Framing(e) => write!(f, "{e}"),
            BodyFailure::TooLarge(max) => write!(f, "answer larger than {max} bytes"),
        }
    }
}

impl From<io::Error> for BodyFailure {
    fn from(e: io::Error) -> Self {
        match Silence::of(&e) {
            Some(s) => BodyFailure::Silent(s),
            None => BodyFailure::Io(e),
        }
    }
}

/// The body after a response head, on the connection it arrives on.
pub struct Body<C> {
    conn: Watched<C>,
    /// Received bytes not decoded yet; empty (no allocation) between reads.
    buf: BytesMut,
    decoder: BodyDecoder,
    keep_alive: bool,
    key: Key,
    pool: Arc<Pool<Watched<C>>>,
    /// The last read filled all the room it had: more is likely waiting.
    streaming: bool,
    /// Body bytes came with the response head and no caller has seen them yet.
    unseen: bool,
}

impl<C> Body<C> {
    pub(super) fn new(
        conn: Watched<C>,
        buf: BytesMut,
        framing: Framing,
        keep_alive: bool,
        key: Key,
        pool: Arc<Pool<Watched<C>>>,
    ) -> Body<C> {
        Body {
            conn,
            unseen: !buf.is_empty(),
            buf,
            decoder: BodyDecoder::new(framing),
            keep_alive,
            key,
            pool,
            streaming: false,
        }
    }

    /// Another head follows on the same connection (after an informational answer).
    pub(super) fn reframe(&mut self, framing: Framing, keep_alive: bool) {
        self.decoder = BodyDecoder::new(framing);
        self.keep_alive = keep_alive;
        self.unseen = !self.buf.is_empty();
    }

    pub(super) fn parts(&mut self) -> (&mut Watched<C>, &mut BytesMut) {
        (&mut self.conn, &mut self.buf)
    }

    /// Decode what `fill` read, handing the payload to `sink` in order; `Ok(true)` once the body
    /// is complete. Bytes after the body are left alone.
    pub fn decode(&mut self, sink: impl FnMut(&[u8])) -> Result<bool, BodyError> {
        // What came with the head is seen now, whether or not `fill` said so first.
        self.unseen = false;
        let used = self.decoder.decode(&self.buf, sink)?;
        self.buf.advance(used);
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            // A held stream keeps no read buffer while it waits.
            self.buf = BytesMut::new();
        }
        Ok(self.decoder.is_done())
    }

    /// The upstream closed the connection: the end of a close-delimited body, an error
    /// otherwise.
    pub fn eof(&mut self) -> Result<(), BodyError> {
        self.decoder.eof()
    }

    /// Bytes read and not decoded yet.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The body was read to its end.
    pub fn is_done(&self) -> bool {
        self.decoder.is_done()
    }

    /// Return the connection to the pool if its response was read to its end and it can carry
    /// another; drop (close) it otherwise, which tells the upstream to stop.
    pub fn release(self) {
        if self.decoder.is_done()
            && self.keep_alive
            && self.buf.is_empty()
            && !self.conn.is_silent()
        {
            self.pool.put(self.key, self.conn);
        }
    }
}

impl<C: AsyncRead + AsyncWrite + Unpin + Send + 'static> Body<C> {
    /// Read more of the body; `Ok(0)` at end of file. Cancel-safe: a read dropped before it
    /// completes loses nothing, so it can race timers in a `select!`. Fails with a [`Silence`]
    /// once the upstream has sent nothing for its idle timeout.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if std::mem::take(&mut self.unseen) {
            return Ok(self.buf.len());
        }
        self.buf.reserve(if self.streaming {
            READ_SIZE
        } else {
            SMALL_READ
        });
        let room = self.buf.capacity() - self.buf.len();
        let n = self.conn.read_buf(&mut self.buf).await?;
        self.streaming = n == room;
        Ok(n)
    }

    /// The next piece of the payload, `None` at its end.
    pub async fn next(&mut self) -> Result<Option<Bytes>, BodyFailure> {
        loop {
            if !self.buf.is_empty() {
                let mut out = Vec::new();
                self.decode(|piece| out.extend_from_slice(piece))
                    .map_err(BodyFailure::Framing)?;
                if !out.is_empty() {
                    return Ok(Some(Bytes::from(out)));
                }
            }
            if self.decoder.is_done() {
                return Ok(None);
            }
            if self.fill().await? == 0 {
                self.eof().map_err(BodyFailure::Framing)?;
                return Ok(None);
            }
        }
    }

    /// The whole payload, refused past `max` bytes; the connection goes back to the pool.
    pub async fn read_to_end(mut self, max: usize) -> Result<Vec<u8>, BodyFailure> {
        let mut body = Vec::new();
        let mut too_large = false;
        loop {
            let done = self
                .decode(|piece| {
                    too_large |= body.len() + piece.len() > max;
                    if !too_large {
                        body.extend_from_slice(piece);
                    }
                })
                .map_err(BodyFailure::Framing)?;
            if too_large {
                return Err(BodyFailure::TooLarge(max));
            }
            if done {
                break;
            }
            if self.fill().await? == 0 {
                self.eof().map_err(BodyFailure::Framing)?;
                break;
            }
        }
        self.release();
        Ok(body)
    }

    /// After a clean end the body's last bytes (a chunked terminator) may still be on their
    /// way; read them for a moment on a task of their own so the connection can be reused.
    pub fn release_when_done(mut self) {
        if self.decoder.is_done() || !self.keep_alive {
            self.release();
            return;
        }
        tokio::spawn(async move {
            let drain = async {
                while !self.decoder.is_done() {
                    if self.fill().await.ok()? == 0 {
                        return None;
                    }
                    self.decode(|_| {}).ok()?;
                }
                Some(())
            };
            if let Ok(Some(())) = tokio::time::timeout(DRAIN, drain).await {
                self.release();
            }
        });
    }
}
