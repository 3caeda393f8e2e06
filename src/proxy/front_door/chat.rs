//! A chat request the front door serves on its own connection (`server.lean_runtime`).
//!
//! A runtime stream holds its client connection for minutes. Through Pingora's `HttpProxy` each
//! one keeps Pingora's per-request state for all that time: its session, its head buffer and the
//! futures of its request loop, about 25 KiB. Here the stream keeps this module's connection
//! state and the relay's. Identity, routing, refusals, the bridge, the relay and the access log
//! are the same code as on Pingora's path (`ChatService::serve_chat`, through `Downstream`). A chat
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
use crate::core::forwarded::Hop;
use crate::core::passthrough::ChatHead;
use crate::core::request_head::{Framing, Head};
use crate::proxy::ctx::Handover;
use crate::proxy::record::Finish;
use crate::proxy::service::{Chat, ChatService};
use crate::proxy::session::shutdown_socket;
use crate::runtime::downstream::{BodyRead, Downstream};
use crate::state::Active;

/// How a chat on the front door's connection ended.
pub(super) enum Served {
    /// Answered here; `keep_alive`: the connection may take the next request.
    Done { keep_alive: bool },
    /// Legacy serves it: the connection is ready for Pingora to read the request again.
    Legacy(Box<Handover>),
}

/// Serve the chat whose head `head` is at the front of `io`'s buffer.
pub(super) async fn serve(
    chats: &ChatService,
    active: Arc<Active>,
    io: &mut FrontStream,
    head: Head,
    chat: ChatHead,
    shutdown: &ShutdownWatch,
) -> Served {
    let hop = active.hop(io.peer_ip());
    let trusted = active.verifier.trusted_org_header().cloned();
    let mut ctx = chats.request_ctx(active, io.arrived);
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
        io.begin(head, hop, trusted.as_ref());
        return Served::Legacy(Box::new(Handover {
            ctx,
            route,
            shadow: true,
        }));
    };
    let mut session = ChatSession {
        io,
        head,
        hop,
        trusted,
        version,
        req: Some(Box::new(req)),
        keep_alive: keep_alive && !*shutdown.borrow(),
        replay: None,
        status: 0,
        unsent_head: None,
        chunked: false,
        ended: false,
    };
    let served = chats.serve_chat(&mut session, &mut ctx, &route).await;
    // The access log names the path without its query, as Pingora's `uri.path()` does.
    let logged = path.split('?').next().unwrap_or_default();
    match served {
        Ok(Chat::Legacy { shadow }) => {
            session.replay_for_legacy();
            Served::Legacy(Box::new(Handover { ctx, route, shadow }))
        }
        Ok(Chat::Answered) => {
            chats.record(session.status, logged, Finish::Clean, &mut ctx);
            Served::Done {
                keep_alive: session.keep_alive && session.ended && !*shutdown.borrow(),
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "chat request failed on the front door");
            chats.record(session.status, logged, Finish::of(Some(&e)), &mut ctx);
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
    /// Where the request came from, for legacy's `X-Forwarded-*` should Pingora take it over,
    /// and the trusted org header, which legacy is not sent.
    hop: Hop,
    trusted: Option<http::HeaderName>,
    /// Until the runtime answers.
    req: Option<Box<RequestHeader>>,
    version: http::Version,
    keep_alive: bool,
    /// The request's head and body as read, for legacy should the runtime fail before its
    /// first byte.
    replay: Option<Bytes>,
    status: u16,
    /// The response head, until the first piece of the body goes out with it.
    unsent_head: Option<BytesMut>,
    chunked: bool,
    ended: bool,
}

impl ChatSession<'_> {
    /// Put the request back in front of the connection's buffer, for Pingora to read.
    fn replay_for_legacy(&mut self) {
        let Some(replay) = self.replay.take() else {
            // The body was not read: the head is still where it was.
            self.io
                .begin(self.head.clone(), self.hop, self.trusted.as_ref());
            return;
        };
        let rest = std::mem::take(&mut self.io.buf);
        let mut buf = BytesMut::with_capacity(replay.len() + rest.len());
        buf.extend_from_slice(&replay);
        buf.extend_from_slice(&rest);
        self.io.buf = buf;
        self.io.begin(
            Head {
                skip: 0,
                len: self.head.len,
                framing: self.head.framing,
                rewritten: None,
            },
            self.hop,
            self.trusted.as_ref(),
        );
    }

    /// One write, the response head in front of the first: a head sent on its own is a second
    /// packet and a second wake-up for the client before it has its first event.
    async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let mut joined = self.unsent_head.take();
        let bytes = match joined.as_mut() {
            Some(head) => {
                head.extend_from_slice(bytes);
                &head[..]
            }
            None => bytes,
        };
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
        self.io.begin_as_sent(self.head.clone());
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
        // Once a response head is written, legacy can no longer serve the request. It leaves
        // with the first piece of the body, as Pingora's buffered writer sends it.
        self.replay = None;
        self.unsent_head = Some(buf);
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
            } else if self.unsent_head.is_some() {
                self.write(b"").await?;
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

    fn client_ip(&self) -> Option<std::net::IpAddr> {
        self.io.peer_ip()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{IntCounterVec, Opts};
    use std::pin::Pin;
    use std::task::Poll;
    use tokio::io::{AsyncRead, DuplexStream, ReadBuf};

    /// A client's end of a connection, and the front door's.
    fn connected() -> (DuplexStream, FrontStream) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let rejections = IntCounterVec::new(Opts::new("r", "r"), &["reason"]).unwrap();
        (
            client,
            FrontStream::new(Box::new(server), 32 * 1024, rejections),
        )
    }

    fn session(io: &mut FrontStream) -> ChatSession<'_> {
        let raw = b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: e\r\nContent-Length: 0\r\n\r\n";
        let head = crate::core::request_head::parse(raw, 32 * 1024)
            .unwrap()
            .unwrap();
        ChatSession {
            io,
            head,
            hop: Hop::default(),
            trusted: None,
            req: None,
            version: http::Version::HTTP_11,
            keep_alive: true,
            replay: None,
            status: 0,
            unsent_head: None,
            chunked: false,
            ended: false,
        }
    }

    /// What the client can read right now, without waiting.
    async fn readable(client: &mut DuplexStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Some(n) = std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf);
            Poll::Ready(match Pin::new(&mut *client).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => Some(rb.filled().len()),
                _ => None,
            })
        })
        .await
        {
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    fn response(framing: (&'static str, &'static str)) -> Box<ResponseHeader> {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header(http::header::CONTENT_TYPE, "text/event-stream")
            .unwrap();
        resp.insert_header(framing.0, framing.1).unwrap();
        Box::new(resp)
    }

    /// Write a 200 head framed by `framing`: it is written, and nothing has left yet.
    async fn head_held(
        s: &mut ChatSession<'_>,
        client: &mut DuplexStream,
        framing: (&'static str, &'static str),
    ) {
        s.write_response_header(response(framing)).await.unwrap();
        assert_eq!(s.status_written(), 200);
        assert!(readable(client).await.is_empty(), "the head left alone");
    }

    #[tokio::test]
    async fn the_response_head_leaves_with_the_first_event_in_one_write() {
        let (mut client, mut io) = connected();
        let mut s = session(&mut io);
        head_held(&mut s, &mut client, ("transfer-encoding", "chunked")).await;

        let event = Bytes::from_static(b"event: message\ndata: {}\n\n");
        s.write_response_body(Some(event.clone()), false)
            .await
            .unwrap();
        let got = String::from_utf8(readable(&mut client).await).unwrap();
        let (head, body) = got.split_once("\r\n\r\n").expect("a whole head");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("\r\nConnection: keep-alive"), "{head}");
        let framed = "19\r\nevent: message\ndata: {}\n\n\r\n";
        assert_eq!(body, framed);

        s.write_response_body(Some(event), true).await.unwrap();
        let rest = readable(&mut client).await;
        assert_eq!(
            String::from_utf8(rest).unwrap(),
            format!("{framed}0\r\n\r\n")
        );
    }

    #[tokio::test]
    async fn a_response_that_ends_with_no_body_still_sends_its_head() {
        let (mut client, mut io) = connected();
        let mut s = session(&mut io);
        head_held(&mut s, &mut client, ("content-length", "0")).await;
        s.write_response_body(None, true).await.unwrap();
        let got = String::from_utf8(readable(&mut client).await).unwrap();
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(got.ends_with("\r\n\r\n"), "{got}");
    }
}
