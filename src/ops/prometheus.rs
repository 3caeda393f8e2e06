//! A Prometheus client for the fleet signal and `cutover-proxy rollout`: instant queries over
//! HTTP/1.1, each bounded by a deadline.
//!
//! The transport is one small trait, [`HttpGet`] (GET a path from a host within a deadline: the
//! status and the whole body), so the query code does not care how connections are made.
//! [`PlainGet`] is the plain implementation: one connection per request over tokio, the response
//! read with the runtime client's own HTTP/1 parser (`core::h1`), the body capped.

use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::core::h1::{self, BodyDecoder};
use crate::core::prometheus::{parse_vector, HttpUrl, Sample};

/// Largest answer read: a fleet's per-org series are a few hundred kilobytes at most.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// GET `path_and_query` from `url`'s host within `deadline`: the status and the whole body.
#[async_trait]
pub trait HttpGet: Send + Sync {
    async fn get(
        &self,
        url: &HttpUrl,
        path_and_query: &str,
        deadline: Duration,
    ) -> Result<(u16, Vec<u8>), String>;
}

/// One connection per request, `Connection: close`.
#[derive(Debug, Default, Clone, Copy)]
pub struct PlainGet;

#[async_trait]
impl HttpGet for PlainGet {
    async fn get(
        &self,
        url: &HttpUrl,
        path_and_query: &str,
        deadline: Duration,
    ) -> Result<(u16, Vec<u8>), String> {
        let exchange = async {
            let authority = url.authority();
            let mut tcp = TcpStream::connect(authority.as_str())
                .await
                .map_err(|e| format!("connect to {authority}: {e}"))?;
            let request = h1::encode_request(
                "GET",
                path_and_query,
                &[
                    ("host", authority.as_bytes()),
                    ("accept", b"application/json"),
                    ("user-agent", b"cutover-proxy"),
                    ("connection", b"close"),
                ],
                b"",
            );
            tcp.write_all(&request)
                .await
                .map_err(|e| format!("send: {e}"))?;
            read_response(&mut tcp).await
        };
        tokio::time::timeout(deadline, exchange)
            .await
            .map_err(|_| format!("no answer within {} ms", deadline.as_millis()))?
    }
}

async fn read_response(tcp: &mut TcpStream) -> Result<(u16, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(8 * 1024);
    let head = loop {
        if let Some(head) = h1::parse_head(&buf, false).map_err(|e| e.to_string())? {
            break head;
        }
        if tcp
            .read_buf(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?
            == 0
        {
            return Err("connection closed before the response head".into());
        }
    };
    let mut decoder = BodyDecoder::new(head.framing);
    let mut body = Vec::new();
    let mut pending = buf.split_off(head.len);
    loop {
        let mut too_big = false;
        let used = decoder
            .decode(&pending, |piece| {
                if body.len() + piece.len() > MAX_BODY_BYTES {
                    too_big = true;
                } else {
                    body.extend_from_slice(piece);
                }
            })
            .map_err(|e| e.to_string())?;
        if too_big {
            return Err(format!("answer larger than {MAX_BODY_BYTES} bytes"));
        }
        pending.drain(..used);
        if decoder.is_done() {
            return Ok((head.status, body));
        }
        if tcp
            .read_buf(&mut pending)
            .await
            .map_err(|e| format!("read: {e}"))?
            == 0
        {
            decoder.eof().map_err(|e| e.to_string())?;
            return Ok((head.status, body));
        }
    }
}

/// Why a query gave nothing usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryError {
    /// Prometheus could not be reached, was too slow, or answered 5xx.
    Unavailable(String),
    /// It answered, but not with what was asked for (a refused query, a non-JSON page, series
    /// that do not add up).
    Invalid(String),
}

impl QueryError {
    /// `unavailable` | `invalid`: the `result` of `cutover_fleet_polls_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            QueryError::Unavailable(_) => "unavailable",
            QueryError::Invalid(_) => "invalid",
        }
    }

    pub fn detail(&self) -> &str {
        match self {
            QueryError::Unavailable(d) | QueryError::Invalid(d) => d,
        }
    }
}

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind(), self.detail())
    }
}

/// The samples of the instant query `promql`.
pub async fn query(
    http: &dyn HttpGet,
    url: &HttpUrl,
    promql: &str,
    deadline: Duration,
) -> Result<Vec<Sample>, QueryError> {
    let (status, body) = http
        .get(url, &url.query_path(promql), deadline)
        .await
        .map_err(QueryError::Unavailable)?;
    if status >= 500 {
        return Err(QueryError::Unavailable(format!("{url} answered {status}")));
    }
    parse_vector(&body).map_err(|e| QueryError::Invalid(format!("{url} answered {status}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A one-shot server that answers every connection with `answer`, after `delay`.
    async fn serve(answer: &'static [u8], delay: Duration) -> HttpUrl {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = tcp.read(&mut buf).await;
                    tokio::time::sleep(delay).await;
                    let _ = tcp.write_all(answer).await;
                });
            }
        });
        HttpUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap()
    }

    /// A response with `body` and its Content-Length.
    fn answer(status: &str, body: &str) -> &'static [u8] {
        let text = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        Box::leak(text.into_bytes().into_boxed_slice())
    }

    const VECTOR: &str = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"42"]}]}}"#;

    #[tokio::test]
    async fn a_query_reads_the_vector() {
        let url = serve(answer("200 OK", VECTOR), Duration::ZERO).await;
        let s = query(&PlainGet, &url, "up", Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(s[0].value, 42.0);
    }

    #[tokio::test]
    async fn chunked_and_close_delimited_answers_are_read_whole() {
        let (first, rest) =
            r#"{"status":"success","data":{"resultType":"scalar","result":[1,"7"]}}"#.split_at(16);
        let chunked = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{first}\r\n{:x}\r\n{rest}\r\n0\r\n\r\n",
            first.len(),
            rest.len()
        );
        let url = serve(
            Box::leak(chunked.into_bytes().into_boxed_slice()),
            Duration::ZERO,
        )
        .await;
        let s = query(&PlainGet, &url, "1", Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(s[0].value, 7.0);
        let close: &[u8] = b"HTTP/1.0 200 OK\r\n\r\n{\"status\":\"success\",\"data\":{\"resultType\":\"scalar\",\"result\":[1,\"8\"]}}";
        let url = serve(close, Duration::ZERO).await;
        let s = query(&PlainGet, &url, "1", Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(s[0].value, 8.0);
    }

    #[tokio::test]
    async fn down_slow_failing_and_garbage_are_told_apart() {
        // Nobody listening.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let url = HttpUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let e = query(&PlainGet, &url, "up", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), "unavailable", "{e}");
        // Slower than the deadline.
        let url = serve(answer("200 OK", VECTOR), Duration::from_millis(500)).await;
        let e = query(&PlainGet, &url, "up", Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(e, QueryError::Unavailable("no answer within 50 ms".into()));
        // 503.
        let url = serve(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
            Duration::ZERO,
        )
        .await;
        let e = query(&PlainGet, &url, "up", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), "unavailable");
        // A page that is not Prometheus', and a refused query.
        let url = serve(answer("200 OK", "<html>"), Duration::ZERO).await;
        let e = query(&PlainGet, &url, "up", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), "invalid");
        let refused = r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        let url = serve(answer("400 Bad Request", refused), Duration::ZERO).await;
        let e = query(&PlainGet, &url, "up(", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(e.detail().ends_with("(bad_data): parse error"), "{e}");
        // Cut in the middle of the body.
        let url = serve(
            b"HTTP/1.1 200 OK\r\nContent-Length: 90\r\n\r\n{\"status\"",
            Duration::ZERO,
        )
        .await;
        let e = query(&PlainGet, &url, "up", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(e.detail().contains("connection closed"), "{e}");
    }
}
