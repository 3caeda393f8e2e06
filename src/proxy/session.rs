//! Pingora's `Session` as the runtime path's client side (`runtime::downstream::Downstream`).

use std::time::Instant;

use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use pingora::{ErrorType, Result};

use crate::runtime::downstream::{BodyRead, Downstream};

impl Downstream for Session {
    fn req_header(&self) -> &RequestHeader {
        self.downstream_session.req_header()
    }

    fn version(&self) -> http::Version {
        self.downstream_session.req_header().version
    }

    /// Pingora's retry buffer keeps what was read, so that legacy can be sent the original body.
    async fn read_chat_body(&mut self, limit: usize, by: Instant) -> Result<BodyRead> {
        let expects_continue = self
            .downstream_session
            .req_header()
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if expects_continue {
            // curl sends this for bodies over 1 KiB and would otherwise wait a second before
            // sending. The header is consumed here, so a failover to legacy does not answer it a
            // second time.
            self.downstream_session.write_continue_response().await?;
            self.req_header_mut().remove_header(&http::header::EXPECT);
        }
        self.enable_retry_buffering();
        let mut body = Vec::new();
        loop {
            // A read cut off here loses nothing: Pingora's body reader keeps what reached it,
            // and the retry buffer what was read, for legacy to be sent in order.
            let chunk = match tokio::time::timeout_at(by.into(), self.read_request_body()).await {
                Ok(chunk) => chunk?,
                Err(_) => return Ok(BodyRead::TimedOut),
            };
            let Some(chunk) = chunk else { break };
            if body.len() + chunk.len() > limit {
                return Ok(BodyRead::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(BodyRead::Complete(Bytes::from(body)))
    }

    async fn write_response_header(&mut self, resp: Box<ResponseHeader>) -> Result<()> {
        Session::write_response_header(self, resp, false).await
    }

    async fn write_response_body(&mut self, body: Option<Bytes>, end: bool) -> Result<()> {
        Session::write_response_body(self, body, end).await
    }

    fn close_after(&mut self) {
        self.set_keepalive(None);
    }

    fn abort(&mut self) {
        // Pingora still finishes the response after us, with no timeout on that last write.
        self.set_keepalive(None);
        if let Some(fd) = self.downstream_session.stream().map(|s| s.id()) {
            shutdown_socket(fd);
        }
    }

    /// With pipelining enabled (see `proxy::request_filter`) Pingora keeps a next request's
    /// bytes; otherwise the probe consumed one, and the connection is simply not kept alive
    /// after this response.
    async fn client_gone(&mut self) {
        let downstream = &mut self.downstream_session;
        match downstream.read_body_or_idle(true).await {
            Err(e)
                if matches!(
                    e.etype(),
                    ErrorType::ConnectionClosed | ErrorType::ReadError
                ) => {}
            _ => {
                downstream.set_keepalive(None);
                std::future::pending::<()>().await
            }
        }
    }

    fn status_written(&self) -> u16 {
        self.response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0)
    }

    fn client_ip(&self) -> Option<std::net::IpAddr> {
        Some(self.downstream_session.client_addr()?.as_inet()?.ip())
    }

    fn forwarded_in_head(&self) -> bool {
        crate::proxy::front_door::handed_by_front_door(self)
    }
}

/// Shut a socket down in both directions so pending and later writes fail at once.
pub(crate) fn shutdown_socket(fd: std::os::fd::RawFd) {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is the client socket the connection still owns and keeps open; ManuallyDrop
    // keeps this temporary handle from closing it, and only shutdown(2) is called through it.
    let socket = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    let _ = socket.shutdown(std::net::Shutdown::Both);
}
