//! A Prometheus client for the fleet signal and `cutover-proxy rollout`: instant queries over
//! HTTP/1.1, each bounded by a deadline.
//!
//! The transport is one small trait, [`HttpGet`] (GET a path from a host within a deadline: the
//! status and the whole body), so the query code does not care how connections are made.
//! [`UpstreamGet`] is the implementation: the house's one upstream client (`upstream::Upstream`,
//! as for legacy and the runtime) under the fleet's own deadline, the body capped.

use std::time::Duration;

use async_trait::async_trait;

use crate::core::h1;
use crate::core::prometheus::{parse_vector, HttpUrl, Sample};
use crate::upstream::{
    BodyFailure, Call, Failure, Tcp, TimeoutCounters, Timeouts, Upstream, UpstreamName,
};

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

/// GETs through the house's one upstream client (`upstream::Upstream`), one connection per
/// request (`Connection: close`: a poll every few seconds needs no pool), everything within the
/// caller's deadline: the connection, the head, each read of the body, and the whole exchange.
pub struct UpstreamGet {
    upstream: Upstream,
}

impl UpstreamGet {
    pub fn new() -> UpstreamGet {
        let counters = TimeoutCounters::unregistered(UpstreamName::Prometheus);
        UpstreamGet {
            upstream: Upstream::new(Tcp, counters),
        }
    }
}

impl Default for UpstreamGet {
    fn default() -> Self {
        UpstreamGet::new()
    }
}

#[async_trait]
impl HttpGet for UpstreamGet {
    async fn get(
        &self,
        url: &HttpUrl,
        path_and_query: &str,
        deadline: Duration,
    ) -> Result<(u16, Vec<u8>), String> {
        let late = || format!("no answer within {} ms", deadline.as_millis());
        let authority = url.authority();
        let timeouts = Timeouts {
            connect: deadline,
            response: deadline,
            idle: deadline,
            pool_idle: deadline,
        };
        let call = Call::new(&authority, timeouts);
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
        let exchange = async {
            let response = match self.upstream.send(&call, &request).await {
                Ok(response) => response,
                Err(Failure::Silent(_)) => return Err(late()),
                Err(Failure::Unreachable(why)) => {
                    return Err(format!("connect to {authority}: {why}"))
                }
                Err(e) => return Err(format!("{authority}: {e}")),
            };
            let status = response.status();
            match response.into_body().read_to_end(MAX_BODY_BYTES).await {
                Ok(body) => Ok((status, body)),
                Err(BodyFailure::Silent(_)) => Err(late()),
                Err(e) => Err(e.to_string()),
            }
        };
        tokio::time::timeout(deadline, exchange)
            .await
            .map_err(|_| late())?
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

    /// A query through the upstream client, within 2 s.
    async fn ask(url: &HttpUrl, promql: &str) -> Result<Vec<Sample>, QueryError> {
        query(&UpstreamGet::new(), url, promql, Duration::from_secs(2)).await
    }

    const VECTOR: &str = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"42"]}]}}"#;

    #[tokio::test]
    async fn a_query_reads_the_vector() {
        let url = serve(answer("200 OK", VECTOR), Duration::ZERO).await;
        let s = ask(&url, "up").await.unwrap();
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
        let s = ask(&url, "1").await.unwrap();
        assert_eq!(s[0].value, 7.0);
        let close: &[u8] = b"HTTP/1.0 200 OK\r\n\r\n{\"status\":\"success\",\"data\":{\"resultType\":\"scalar\",\"result\":[1,\"8\"]}}";
        let url = serve(close, Duration::ZERO).await;
        let s = ask(&url, "1").await.unwrap();
        assert_eq!(s[0].value, 8.0);
    }

    #[tokio::test]
    async fn down_slow_failing_and_garbage_are_told_apart() {
        // Nobody listening.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let url = HttpUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let e = ask(&url, "up").await.unwrap_err();
        assert_eq!(e.kind(), "unavailable", "{e}");
        // Slower than the deadline.
        let url = serve(answer("200 OK", VECTOR), Duration::from_millis(500)).await;
        let e = query(&UpstreamGet::new(), &url, "up", Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(e, QueryError::Unavailable("no answer within 50 ms".into()));
        // 503.
        let url = serve(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
            Duration::ZERO,
        )
        .await;
        let e = ask(&url, "up").await.unwrap_err();
        assert_eq!(e.kind(), "unavailable");
        // A page that is not Prometheus', and a refused query.
        let url = serve(answer("200 OK", "<html>"), Duration::ZERO).await;
        let e = ask(&url, "up").await.unwrap_err();
        assert_eq!(e.kind(), "invalid");
        let refused = r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        let url = serve(answer("400 Bad Request", refused), Duration::ZERO).await;
        let e = ask(&url, "up(").await.unwrap_err();
        assert!(e.detail().ends_with("(bad_data): parse error"), "{e}");
        // Cut in the middle of the body.
        let url = serve(
            b"HTTP/1.1 200 OK\r\nContent-Length: 90\r\n\r\n{\"status\"",
            Duration::ZERO,
        )
        .await;
        let e = ask(&url, "up").await.unwrap_err();
        assert!(e.detail().contains("connection closed"), "{e}");
    }
}
