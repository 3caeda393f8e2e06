//! One HTTP/1.1 request on an upstream connection, up to the final response head: what the
//! runtime's streams, its files and the bridge's calls share. The head is parsed by `core::h1`;
//! what follows it is the caller's.

use bytes::{Buf, BytesMut};
use pingora::protocols::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::core::h1;

/// Room asked of the buffer before each read of the head: a bridge answer (a 20-message history)
/// is a few KiB, so it takes one read.
const HEAD_READ: usize = 16 * 1024;

/// What went wrong between writing the request and a complete response head.
#[derive(Debug)]
pub enum ExchangeError {
    /// Nothing of a response arrived: the write failed, or the connection closed or failed before
    /// its first byte. On a pooled connection that is a stale one, and the request may go once
    /// more on a new connection.
    ClosedEarly(String),
    /// The connection closed or failed after part of the head.
    Io(std::io::Error),
    Head(h1::HeadError),
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::ClosedEarly(why) => write!(f, "no response: {why}"),
            ExchangeError::Io(e) => write!(f, "{e}"),
            ExchangeError::Head(e) => write!(f, "{e}"),
        }
    }
}

/// Write `request`, then read into `buf` up to a final response head, which stays at the start
/// of `buf` (with whatever of the body came with it after it). Informational answers are skipped;
/// a `101` is final.
pub async fn request_head(
    stream: &mut Stream,
    request: &[u8],
    buf: &mut BytesMut,
) -> Result<h1::Head, ExchangeError> {
    let early = |e: std::io::Error| ExchangeError::ClosedEarly(e.to_string());
    stream.write_all(request).await.map_err(early)?;
    stream.flush().await.map_err(early)?;
    let mut received = 0usize;
    loop {
        match h1::parse_head(buf, false).map_err(ExchangeError::Head)? {
            Some(head) if head.status / 100 == 1 && head.status != 101 => {
                buf.advance(head.len);
                continue;
            }
            Some(head) => return Ok(head),
            None => {}
        }
        buf.reserve(HEAD_READ);
        let n = match stream.read_buf(buf).await {
            Ok(n) => n,
            Err(e) if received == 0 => return Err(early(e)),
            Err(e) => return Err(ExchangeError::Io(e)),
        };
        if n == 0 {
            return Err(if received == 0 {
                ExchangeError::ClosedEarly("closed before a response".into())
            } else {
                ExchangeError::Io(std::io::ErrorKind::UnexpectedEof.into())
            });
        }
        received += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    /// `request_head` against an upstream that reads the request and answers `answer` in the
    /// given pieces, then closes.
    async fn against(
        pieces: &'static [&'static [u8]],
    ) -> (Result<h1::Head, ExchangeError>, BytesMut) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req).await;
            for piece in pieces {
                s.write_all(piece).await.unwrap();
                s.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(tcp));
        let mut buf = BytesMut::new();
        let head = request_head(&mut stream, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", &mut buf).await;
        (head, buf)
    }

    #[tokio::test]
    async fn informational_answers_are_skipped_and_the_final_head_stays_in_the_buffer() {
        let (head, buf) = against(&[
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\nHTTP/1.1 200 OK\r\nContent-Le",
            b"ngth: 2\r\n\r\nok",
        ])
        .await;
        let head = head.unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(&buf[head.len..], b"ok");
        assert!(buf.starts_with(b"HTTP/1.1 200 OK\r\n"));
    }

    #[tokio::test]
    async fn a_switch_of_protocols_is_final() {
        let (head, _) = against(&[b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"]).await;
        assert_eq!(head.unwrap().status, 101);
    }

    #[tokio::test]
    async fn closing_before_any_byte_is_a_stale_connection_and_mid_head_is_not() {
        let (head, _) = against(&[]).await;
        assert!(
            matches!(head, Err(ExchangeError::ClosedEarly(_))),
            "{head:?}"
        );
        let (head, _) = against(&[b"HTTP/1.1 200 OK\r\nContent-"]).await;
        assert!(matches!(head, Err(ExchangeError::Io(_))), "{head:?}");
    }
}
