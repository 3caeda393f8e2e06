//! A raw HTTP/1.1 client on loopback that keeps each body chunk with its arrival time, so tests
//! can assert on framing ("one event per write") and on streaming ("arrived before the upstream
//! sent the next one"); and the one HTTP request reader the upstreams share.

use std::time::{Duration, Instant};

use cutover_proxy::app::LocalServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::harness::token;
use super::upstream::Received;

/// Read one request (head and body, Content-Length or chunked) from `stream`; `buf` keeps bytes
/// of the next pipelined request. `None` when the peer closes first or sends garbage.
pub async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    connection: usize,
) -> Option<Received> {
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    parsed.parse(&buf[..head_end]).ok()?;
    let method = parsed.method?.to_string();
    let path = parsed.path?.to_string();
    let headers = header_pairs(parsed.headers);
    buf.drain(..head_end);
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let body = if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            };
            let size_str = String::from_utf8_lossy(&buf[..line_end]).to_string();
            let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
            while buf.len() < line_end + 2 + size + 2 {
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
            buf.drain(..line_end + 2 + size + 2);
            if size == 0 {
                break body;
            }
        }
    } else {
        let len: usize = get("content-length")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < len {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..len).collect()
    };
    Some(Received {
        method,
        path,
        headers,
        body,
        connection,
    })
}

/// Parsed headers as (lower-case name, value) pairs.
fn header_pairs(headers: &[httparse::Header]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            let value = String::from_utf8_lossy(h.value).to_string();
            (h.name.to_ascii_lowercase(), value)
        })
        .collect()
}

/// The value of header `name` (any case) among `headers`.
pub fn header_in<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Every value of the header `name`, in the order they came.
pub fn headers_in<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Raw response bytes as text without their `Date` lines: the one header two servers answering
/// the same request at different times must differ in.
pub fn without_date(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .split_inclusive("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("date:"))
        .collect()
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A response read by the raw client.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Body pieces as they arrived: chunk payloads for chunked bodies, reads otherwise.
    pub chunks: Vec<(Duration, Vec<u8>)>,
    /// The body ended cleanly (terminating chunk, or Content-Length reached).
    pub complete: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.headers, name)
    }
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        headers_in(&self.headers, name)
    }
    pub fn body(&self) -> Vec<u8> {
        self.chunks.iter().flat_map(|(_, c)| c.clone()).collect()
    }
    pub fn text(&self) -> String {
        String::from_utf8(self.body()).expect("utf-8 body")
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body()).expect("JSON body")
    }
    /// Client SSE events as (event, data) pairs, parsed the strict way the web app does.
    pub fn events(&self) -> Vec<(String, String)> {
        parse_events(&self.text())
    }
}

/// An event's data, parsed.
pub fn event_data(event: &(String, String)) -> serde_json::Value {
    serde_json::from_str(&event.1)
        .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {event:?}"))
}

/// Every chunk the client received holds only whole events (the web app drops an event cut
/// between two reads), LF-only, one data line each; returns all the events in order.
pub fn whole_events(r: &Response) -> Vec<(String, String)> {
    let mut all = Vec::new();
    for (i, (_, chunk)) in r.chunks.iter().enumerate() {
        let text = std::str::from_utf8(chunk)
            .unwrap_or_else(|e| panic!("chunk {i} is not UTF-8 on its own ({e}): {chunk:?}"));
        assert!(
            text.ends_with("\n\n") && !text.starts_with('\n'),
            "chunk {i} does not hold whole events: {text:?}"
        );
        all.extend(parse_events(text));
    }
    assert_eq!(all, r.events(), "chunks and body disagree");
    all
}

/// Split `event: X\ndata: Y\n\n` blocks; anything else is a test failure.
pub fn parse_events(text: &str) -> Vec<(String, String)> {
    assert!(!text.contains('\r'), "client stream contains CR: {text:?}");
    text.split_terminator("\n\n")
        .map(|block| {
            let mut event = String::from("message");
            let mut data = None;
            for line in block.split('\n') {
                if let Some(v) = line.strip_prefix("event: ") {
                    event = v.to_string();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    assert!(data.is_none(), "multi-line data in {block:?}");
                    data = Some(v.to_string());
                } else {
                    panic!("unexpected line {line:?} in {block:?}");
                }
            }
            (event, data.expect("event without data"))
        })
        .collect()
}

/// A raw HTTP/1.1 connection to the proxy.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub async fn connect(addr: std::net::SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: proxy.test\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" || method == "PUT" {
            req.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.stream.write_all(&bytes).await.unwrap();
    }

    async fn fill(&mut self) -> bool {
        // Read straight into the heap buffer: a 64 KiB array held across the await made every
        // client future ~68 KB, and a test awaiting many of them overflowed the test thread's
        // stack in debug builds.
        self.buf.reserve(64 * 1024);
        !matches!(self.stream.read_buf(&mut self.buf).await, Ok(0) | Err(_))
    }

    /// Read the response head, then call `on_chunk` for each body piece as it arrives.
    pub async fn read_response_with(&mut self, mut on_chunk: impl FnMut(&[u8])) -> Response {
        let start = Instant::now();
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            assert!(
                self.fill().await,
                "connection closed before the response head"
            );
        };
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        parsed.parse(&self.buf[..head_end]).unwrap();
        let status = parsed.code.unwrap();
        let headers = header_pairs(parsed.headers);
        self.buf.drain(..head_end);
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let mut chunks = Vec::new();
        let mut complete = false;
        if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            'outer: loop {
                let line_end = loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        break i;
                    }
                    if !self.fill().await {
                        break 'outer;
                    }
                };
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&self.buf[..line_end]).trim(),
                    16,
                )
                .expect("chunk size");
                while self.buf.len() < line_end + 2 + size + 2 {
                    if !self.fill().await {
                        break 'outer;
                    }
                }
                let data = self.buf[line_end + 2..line_end + 2 + size].to_vec();
                self.buf.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    complete = true;
                    break;
                }
                on_chunk(&data);
                chunks.push((start.elapsed(), data));
            }
        } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            while self.buf.len() < len {
                if !self.fill().await {
                    break;
                }
            }
            let take = len.min(self.buf.len());
            let data: Vec<u8> = self.buf.drain(..take).collect();
            complete = data.len() == len;
            on_chunk(&data);
            chunks.push((start.elapsed(), data));
        } else {
            while self.fill().await {}
            let data = std::mem::take(&mut self.buf);
            on_chunk(&data);
            chunks.push((start.elapsed(), data));
            complete = true;
        }
        Response {
            status,
            headers,
            chunks,
            complete,
        }
    }

    pub async fn read_response(&mut self) -> Response {
        tokio::time::timeout(Duration::from_secs(20), self.read_response_with(|_| {}))
            .await
            .expect("response did not finish")
    }

    /// Whether the server closed the connection (reads EOF) within `wait`.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        matches!(tokio::time::timeout(wait, self.fill()).await, Ok(false))
    }
}

/// POST a chat message as `org` (None: no Authorization header) and read the whole response.
pub async fn chat(
    addr: std::net::SocketAddr,
    org: Option<&str>,
    session: &str,
    body: &str,
) -> Response {
    let mut c = Client::connect(addr).await;
    c.post_chat(org, session, body).await;
    c.read_response().await
}

/// GET/POST on the admin API, returning status and JSON.
pub async fn admin(
    server: &LocalServer,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut c = Client::connect(server.admin_addr).await;
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    c.send(method, path, &headers, b"").await;
    let r = c.read_response().await;
    (r.status, r.json())
}

impl Client {
    /// Read the whole response of an `upstream` that sends the rest of it only once released,
    /// releasing it when the first chunk reached this client; `None` when it took over 5 s (a
    /// proxy that held the first chunk back).
    pub async fn read_releasing(
        &mut self,
        upstream: &super::upstream::Upstream,
    ) -> Option<Response> {
        let mut released = false;
        let read = self.read_response_with(|_| {
            if !released {
                released = true;
                upstream.release();
            }
        });
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .ok()
    }

    /// Send a chat message to `session` as `org` (None: no Authorization header); the response
    /// is the caller's to read.
    pub async fn post_chat(&mut self, org: Option<&str>, session: &str, body: impl AsRef<[u8]>) {
        let auth = org.map(|o| format!("Bearer {}", token(o)));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        let path = format!("/api/v1/chat/sessions/{session}");
        self.send("POST", &path, &headers, body.as_ref()).await;
    }

    /// Write bytes exactly as given: a hand-framed request (chunked body) or part of one.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }
}

/// The head of org-a's chat request to `session` as raw bytes, in `version` ("HTTP/1.1",
/// "HTTP/1.0"), announcing a JSON body of `body_len` bytes; `extra` header lines (each ending in
/// CRLF) go before the blank line.
pub fn chat_head(version: &str, session: &str, body_len: usize, extra: &str) -> Vec<u8> {
    format!(
        "POST /api/v1/chat/sessions/{session} {version}\r\nHost: proxy.test\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
         {extra}Content-Length: {body_len}\r\n\r\n",
        token("org-a"),
    )
    .into_bytes()
}

/// A raw connection to `addr` on which org-a's whole chat to `session` (body `HI`) was sent in
/// `version`; the response is the caller's to read.
pub async fn raw_chat(addr: std::net::SocketAddr, version: &str, session: &str) -> TcpStream {
    let hi = super::harness::HI;
    let mut request = chat_head(version, session, hi.len(), "");
    request.extend_from_slice(hi.as_bytes());
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&request).await.unwrap();
    s
}

/// Send one request on a fresh connection and read the whole response.
pub async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut c = Client::connect(addr).await;
    c.send(method, path, headers, body).await;
    c.read_response().await
}

/// POST a chat to `session` with this `Authorization` on a task; once the client holds the
/// first body chunk, that chunk and the task still reading the rest (abort it to hang up).
pub async fn first_chunk_of_chat(
    addr: std::net::SocketAddr,
    authorization: String,
    session: &str,
    body: String,
) -> (Vec<u8>, tokio::task::JoinHandle<Response>) {
    let (first_tx, mut first_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let path = format!("/api/v1/chat/sessions/{session}");
    let client = tokio::spawn(async move {
        let mut c = Client::connect(addr).await;
        let headers = [
            ("content-type", "application/json"),
            ("authorization", authorization.as_str()),
        ];
        c.send("POST", &path, &headers, body.as_bytes()).await;
        c.read_response_with(|chunk| {
            let _ = first_tx.send(chunk.to_vec());
        })
        .await
    });
    let first = tokio::time::timeout(Duration::from_secs(5), first_rx.recv())
        .await
        .expect("first event")
        .unwrap();
    (first, client)
}
