//! Upstream connections made in memory, for unit tests: the test plays the upstream on the
//! other end of each connection the client opens.

use std::net::SocketAddr;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use super::{Connect, TimeoutCounters, Upstream, UpstreamName};

/// Hands the upstream's end of each connection to the test.
pub(crate) struct Duplex {
    accepted: mpsc::UnboundedSender<DuplexStream>,
    /// Never connect (a black hole) when set.
    hang: bool,
}

#[async_trait]
impl Connect for Duplex {
    type Conn = DuplexStream;
    async fn connect(&self, _addr: SocketAddr) -> std::io::Result<DuplexStream> {
        if self.hang {
            std::future::pending::<()>().await;
        }
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        self.accepted.send(theirs).unwrap();
        Ok(ours)
    }
}

/// A client for the upstream `name` whose connections arrive on the receiver (none with
/// `hang`: connecting never ends).
pub(crate) fn upstream(
    name: UpstreamName,
    hang: bool,
) -> (Upstream<Duplex>, mpsc::UnboundedReceiver<DuplexStream>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let counters = TimeoutCounters::unregistered(name);
    (Upstream::new(Duplex { accepted: tx, hang }, counters), rx)
}

/// Read one request's head off the upstream's side.
pub(crate) async fn request_on(conn: &mut DuplexStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"\r\n\r\n") {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before a request");
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// The upstream's side of the next connection: one request's head read, `answer` written.
pub(crate) async fn answered(
    accepted: &mut mpsc::UnboundedReceiver<DuplexStream>,
    answer: &[u8],
) -> DuplexStream {
    let mut c = accepted.recv().await.unwrap();
    request_on(&mut c).await;
    c.write_all(answer).await.unwrap();
    c
}
