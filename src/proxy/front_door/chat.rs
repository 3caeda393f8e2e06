//! A chat request the front door serves on its own connection (`server.lean_runtime`).
//!
//! A runtime stream holds its client connection for minutes. Through Pingora's `HttpProxy` each
//! one keeps Pingora's per-request state for all that time: its session, its head buffer and the
//! futures of its request loop, about 25 KiB. Here the stream keeps this module's connection
//! state and the relay's. Identity, routing, refusals, the bridge, the relay and the access log
//! are the same code as on Pingora's path (`proxy::serve_chat`, through `Downstream`). A chat
//! legacy serves after all (routed there, failed over, or a body too large to send twice) is
//! handed to Pingora with its head and body as they were read, and its routing as decided here.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::server::ShutdownWatch;
use pingora::{Error, ErrorType, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{chunk, FrontStream, Phase};
use crate::app::state::Active;
use crate::core::passthrough::ChatHead;
use crate::core::request_head::{Framing, Head};
use crate::proxy::ctx::Handover;
use crate::proxy::downstream::{shutdown_socket, BodyRead, Downstream};
use crate::proxy::{Chat, CutoverProxy};

/// How a chat on the front door's connection ended.
pub(super) enum Served {
    /// Answered here; `keep_alive`: the connection may take the next request.
    Done { keep_alive: bool },
    /// Legacy serves it: the connection is ready for Pingora to read the request again.
    Legacy(Box<Handover>),
}

/// Serve the chat whose head `head` is at the front of `io`'s buffer.
pub(super) async fn serve(
    proxy: &CutoverProxy,
    active: Arc<Active>,
    io: &mut FrontStream,
    head: Head,
    chat: ChatHead,
    shutdown: &ShutdownWatch,
) -> Served {
    let mut ctx = proxy.request_ctx(active);
    let ChatHead {
        route,
        path,
        version,
        headers,
        keep_alive,
        ..
    } = chat;
    let Ok(req) = request_header(&path, version, headers) else {
        // Not reached: `chat_head` took only names and values `http` accepts.
        io.begin(head);
        return Served::Legacy(Box::new(Handover {
            ctx,
            route,
            shadow: true,
        }));
    };
    let mut session = ChatSession {
        io,
        head,
        version,
        req: Some(Box::new(req)),
        keep_alive: keep_alive && !*shutdown.borrow(),
        replay: None,
        status: 0,
        chunked: false,
        ended: false,
    };
    let served = proxy.serve_chat(&mut session, &mut ctx, &route).await;
    // The access log names the path without its query, as Pingora's `uri.path()` does.
    let logged = path.split('?').next().unwrap_or_default();
    match served {
        Ok(Chat::Legacy { shadow }) => {
            session.replay_for_legacy();
            Served::Legacy(Box::new(Handover { ctx, route, shadow }))
        }
        Ok(Chat::Answered) => {
            proxy.record(session.status, logged, None, &mut ctx);
            Served::Done {
                keep_alive: session.keep_alive && session.ended && !*shutdown.borrow(),
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "chat request failed on the front door");
            proxy.record(session.status, logged, Some(&e), &mut ctx);
            Served::Done { keep_alive: false }
        }
    }
}

fn request_header(
    path: &str,
    version: http::Version,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
) -> Result<RequestHeader> {
    let mut req =
        RequestHeader::build_no_case(http::Method::POST, path.as_bytes(), Some(headers.len()))?;
    req.set_version(version);
    for (name, value) in headers {
        req.append_header(name, value)?;
    }
    Ok(req)
}

/// One chat request on the front door's connection.
struct ChatSession<'a> {
    io: &'a mut FrontStream,
    /// The head as the front door parsed it, at the front of the buffer until the body is read.
    head: Head,
    /// Until the runtime answers.
    req: Option<Box<RequestHeader>>,
    version: http::Version,
    keep_alive: bool,
    /// The request's head and body as read, for legacy should the runtime fail before its
    /// first byte.
    replay: Option<Bytes>,
    status: u16,
    chunked: bool,
    ended: bool,
}

impl ChatSession<'_> {
    /// Put the request back in front of the connection's buffer, for Pingora to read.
    fn replay_for_legacy(&mut self) {
        let Some(replay) = self.replay.take() else {
            // The body was not read: the head is still where it was.
            self.io.begin(self.head.clone());
            return;
        };
        let rest = std::mem::take(&mut self.io.buf);
        let mut buf = BytesMut::with_capacity(replay.len() + rest.len());
        buf.extend_from_slice(&replay);
        buf.extend_from_slice(&rest);
        self.io.buf = buf;
        self.io.begin(Head {
            skip: 0,
            len: self.head.len,
            framing: self.head.framing,
            rewritten: None,
        });
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let inner = &mut self.io.inner;
        let written = async {
            inner.write_all(bytes).await?;
            inner.flush().await
        };
        written.await.map_err(|e| {
            Error::because(ErrorType::WriteError, "writing to the client", e).into_down()
        })
    }
}

impl Downstream for ChatSession<'_> {
    fn req_header(&self) -> &RequestHeader {
        self.req
            .as_deref()
            .expect("the request head is asked for only before the runtime answers")
    }

    fn release_request(&mut self) {
        self.req = None;
    }

    fn version(&self) -> http::Version {
        self.version
    }

    /// The body is read through the connection's own framing (`FrontStream`), head included, so
    /// that the same bytes can be handed to Pingora for legacy.
    async fn read_chat_body(&mut self, limit: usize, by: Instant) -> Result<BodyRead> {
        let Framing::Length(len) = self.head.framing else {
            unreachable!("`chat_head` takes only bodies with a Content-Length");
        };
        if len > limit as u64 {
            return Ok(BodyRead::TooLarge);
        }
        let head_len = self.head.len;
        let mut replay = Vec::with_capacity(head_len + len as usize);
        self.io.begin(self.head.clone());
        while !matches!(self.io.phase, Phase::Between) {
            match tokio::time::timeout_at(by.into(), self.io.read_buf(&mut replay)).await {
                Err(_) => return Ok(BodyRead::TimedOut),
                Ok(Ok(0)) => {
                    let closed = "the client closed before its whole body";
                    return Err(Error::explain(ErrorType::ConnectionClosed, closed).into_down());
                }
                Ok(Err(e)) => {
                    let e = Error::because(ErrorType::ReadError, "reading the body", e);
                    return Err(e.into_down());
                }
                Ok(Ok(_)) => {}
            }
        }
        let replay = Bytes::from(replay);
        let body = replay.slice(head_len..);
        self.replay = Some(replay);
        Ok(BodyRead::Complete(body))
    }

    async fn write_response_header(&mut self, mut resp: Box<ResponseHeader>) -> Result<()> {
        self.chunked = resp
            .headers
            .get(http::header::TRANSFER_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        if !self.chunked && resp.headers.get(http::header::CONTENT_LENGTH).is_none() {
            // Ended by closing the connection (an HTTP/1.0 client's stream).
            self.keep_alive = false;
        }
        // As Pingora's own session writes a response head.
        resp.insert_header(
            http::header::DATE,
            pingora::protocols::http::date::get_cached_date(),
        )?;
        let connection = if self.keep_alive {
            "keep-alive"
        } else {
            "close"
        };
        resp.insert_header(http::header::CONNECTION, connection)?;
        let mut buf = BytesMut::with_capacity(256);
        buf.extend_from_slice(b"HTTP/1.1 ");
        buf.extend_from_slice(resp.status.as_str().as_bytes());
        buf.extend_from_slice(b" ");
        if let Some(reason) = resp.get_reason_phrase() {
            buf.extend_from_slice(reason.as_bytes());
        }
        buf.extend_from_slice(b"\r\n");
        resp.header_to_h1_wire(&mut buf);
        buf.extend_from_slice(b"\r\n");
        // Once a response head is out, legacy can no longer serve the request.
        self.replay = None;
        self.write(&buf).await?;
        self.status = resp.status.as_u16();
        Ok(())
    }

    /// Each piece in one write, chunk framing included, as Pingora writes it.
    async fn write_response_body(&mut self, body: Option<Bytes>, end: bool) -> Result<()> {
        if let Some(body) = body.filter(|b| !b.is_empty()) {
            if self.chunked {
                let mut piece = Vec::with_capacity(body.len() + 12);
                chunk(&mut piece, &body);
                self.write(&piece).await?;
            } else {
                self.write(&body).await?;
            }
        }
        if end && !self.ended {
            if self.chunked {
                self.write(b"0\r\n\r\n").await?;
            }
            self.ended = true;
        }
        Ok(())
    }

    fn close_after(&mut self) {
        self.keep_alive = false;
    }

    fn abort(&mut self) {
        self.keep_alive = false;
        shutdown_socket(pingora::protocols::UniqueID::id(&*self.io));
    }

    /// Between requests the connection's reads keep a next request's bytes and resolve only
    /// when the client closes or the connection breaks.
    async fn client_gone(&mut self) {
        debug_assert!(matches!(self.io.phase, Phase::Between));
        let mut probe = [0u8; 1];
        let _ = self.io.read(&mut probe).await;
    }

    fn status_written(&self) -> u16 {
        self.status
    }
}
