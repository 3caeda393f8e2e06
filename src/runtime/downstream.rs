//! The client side of a chat request, as the runtime path uses it: read the body, write the
//! response, notice a client that leaves. Two connections implement it, both in `proxy`:
//! Pingora's `Session` (legacy chats, failover, odd request shapes) and the front door's own
//! (`proxy::front_door`), which serves a runtime stream without Pingora's per-request state.
//! The runtime layer is written against this trait alone, so it builds and is tested without the
//! Pingora glue (a fake on `tokio::io::duplex` in the relay's tests).

use std::future::Future;
use std::time::Instant;

use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::Result;

/// How reading a bounded chat body ended.
pub enum BodyRead {
    Complete(Bytes),
    TooLarge,
    /// The body had not all arrived by `limits.body_timeout_ms`.
    TimedOut,
}

pub trait Downstream: Send {
    /// The request head; not to be asked for after `release_request`.
    fn req_header(&self) -> &RequestHeader;

    /// The runtime answered: the request head is not needed any more, and a stream that lasts
    /// minutes need not keep it.
    fn release_request(&mut self) {}

    fn version(&self) -> http::Version;

    /// Read the whole chat body, at most `limit` bytes, by `by`; what was read stays available
    /// for legacy, should the runtime fail before its first byte.
    fn read_chat_body(
        &mut self,
        limit: usize,
        by: Instant,
    ) -> impl Future<Output = Result<BodyRead>> + Send;

    fn write_response_header(
        &mut self,
        resp: Box<ResponseHeader>,
    ) -> impl Future<Output = Result<()>> + Send;

    fn write_response_body(
        &mut self,
        body: Option<Bytes>,
        end: bool,
    ) -> impl Future<Output = Result<()>> + Send;

    /// The connection closes after this response.
    fn close_after(&mut self);

    /// The client stopped reading: shut its socket so that every pending and later write fails
    /// at once.
    fn abort(&mut self);

    /// Resolves when the client has gone away (closed or reset). Bytes of a pipelined next
    /// request are not a disconnect: they are kept for the next request.
    fn client_gone(&mut self) -> impl Future<Output = ()> + Send;

    /// The status of the response head written, 0 before one.
    fn status_written(&self) -> u16;

    /// The client's address (the peer of its connection), for `X-Forwarded-For`.
    fn client_ip(&self) -> Option<std::net::IpAddr>;

    /// The request head already carries the proxy's `X-Forwarded-*` (the front door wrote them
    /// into the head it handed Pingora): they are the ones legacy gets, as they are.
    fn forwarded_in_head(&self) -> bool {
        false
    }
}
