//! Test harness: real HTTP upstreams and a raw HTTP/1.1 client on loopback.
//!
//! The upstream is scripted per request (status, headers, body pieces with pauses, abrupt close)
//! and records what it received; the client keeps each body chunk with its arrival time, so tests
//! can assert on framing ("one event per write") and on streaming ("arrived before the upstream
//! sent the next one").

#![allow(dead_code)]

pub mod legacy;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cutover_proxy::app::LocalServer;
use cutover_proxy::core::config::Config;
use cutover_proxy::core::config::Mode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

pub const JWT_SECRET: &str = "integration-test-secret";
pub const JWT_ENV: &str = "CUTOVER_TEST_JWT_SECRET";
pub const ADMIN_TOKEN: &str = "integration-admin-token";
pub const ADMIN_ENV: &str = "CUTOVER_TEST_ADMIN_TOKEN";

/// A request as an upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Which connection (0-based, in accept order) carried it.
    pub connection: usize,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("upstream received JSON")
    }
}

/// One step of a scripted response body.
#[derive(Debug, Clone)]
pub enum Step {
    /// Send these bytes as one chunk (chunked framing is added unless the reply is raw).
    Send(Vec<u8>),
    /// Pause.
    Sleep(Duration),
    /// Wait until the test calls `Upstream::release()`.
    WaitRelease,
    /// Close the connection abruptly (no terminating chunk).
    Close,
    /// Never send anything more, keep the connection open.
    Hang,
}

/// A scripted response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub steps: Vec<Step>,
    /// `Some(body)`: a plain Content-Length response instead of a chunked one.
    pub fixed_body: Option<Vec<u8>>,
    /// Send nothing at all (not even a status line), then apply `steps`.
    pub no_head: bool,
}

impl Reply {
    pub fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            steps: vec![],
            fixed_body: Some(body.to_string().into_bytes()),
            no_head: false,
        }
    }
    pub fn sse(steps: Vec<Step>) -> Reply {
        Reply {
            status: 200,
            headers: vec![
                ("content-type".into(), "text/event-stream".into()),
                ("cache-control".into(), "no-cache".into()),
            ],
            steps,
            fixed_body: None,
            no_head: false,
        }
    }
    pub fn silent(steps: Vec<Step>) -> Reply {
        Reply {
            status: 0,
            headers: vec![],
            steps,
            fixed_body: None,
            no_head: true,
        }
    }
}

type Handler = dyn Fn(&Received) -> Reply + Send + Sync;

/// A scripted HTTP/1.1 upstream on an ephemeral loopback port.
pub struct Upstream {
    pub addr: std::net::SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    connections: Arc<AtomicUsize>,
    release: Arc<Notify>,
    arrived: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start(handler: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::on(listener, handler)
    }

    /// Serve on an existing listener (e.g. to bring a stopped upstream back on the same port).
    pub fn on(
        listener: TcpListener,
        handler: impl Fn(&Received) -> Reply + Send + Sync + 'static,
    ) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let handler: Arc<Handler> = Arc::new(handler);
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Notify::new());
        let arrived = Arc::new(Notify::new());
        let (r, c, rel, arr) = (
            received.clone(),
            connections.clone(),
            release.clone(),
            arrived.clone(),
        );
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let id = c.fetch_add(1, Ordering::SeqCst);
                let (h, r, rel, arr) = (handler.clone(), r.clone(), rel.clone(), arr.clone());
                conns.spawn(serve_conn(stream, id, h, r, rel, arr));
            }
        });
        Upstream {
            addr,
            received,
            connections,
            release,
            arrived,
            task,
        }
    }

    pub fn address(&self) -> String {
        self.addr.to_string()
    }
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
    /// Requests other than health checks.
    pub fn work(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path != "/health")
            .collect()
    }
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    /// Let every `Step::WaitRelease` in progress (and the next one) continue.
    pub fn release(&self) {
        self.release.notify_waiters();
        self.release.notify_one();
    }
    /// Wait until at least `n` non-health requests arrived.
    pub async fn wait_for_work(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let notified = self.arrived.notified();
                if self.work().len() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .expect("upstream request did not arrive");
    }
    /// Stop accepting and drop every connection.
    pub fn stop(&self) {
        self.task.abort();
    }
}

async fn serve_conn(
    mut stream: TcpStream,
    id: usize,
    handler: Arc<Handler>,
    received: Arc<Mutex<Vec<Received>>>,
    release: Arc<Notify>,
    arrived: Arc<Notify>,
) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let Some(req) = read_request(&mut stream, &mut buf, id).await else {
            return;
        };
        received.lock().unwrap().push(req.clone());
        arrived.notify_waiters();
        let reply = handler(&req);
        if !reply.no_head {
            let mut head = format!("HTTP/1.1 {} X\r\n", reply.status);
            for (k, v) in &reply.headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            match &reply.fixed_body {
                Some(b) => head.push_str(&format!("content-length: {}\r\n\r\n", b.len())),
                None => head.push_str("transfer-encoding: chunked\r\n\r\n"),
            }
            let mut out = head.into_bytes();
            if let Some(b) = &reply.fixed_body {
                out.extend_from_slice(b);
            }
            if stream.write_all(&out).await.is_err() {
                return;
            }
        }
        for step in &reply.steps {
            match step {
                Step::Send(data) => {
                    let framed = if reply.no_head || reply.fixed_body.is_some() {
                        data.clone()
                    } else {
                        let mut f = format!("{:x}\r\n", data.len()).into_bytes();
                        f.extend_from_slice(data);
                        f.extend_from_slice(b"\r\n");
                        f
                    };
                    if stream.write_all(&framed).await.is_err() {
                        return;
                    }
                }
                Step::Sleep(d) => tokio::time::sleep(*d).await,
                Step::WaitRelease => release.notified().await,
                Step::Close => return,
                Step::Hang => std::future::pending::<()>().await,
            }
        }
        if !reply.no_head
            && reply.fixed_body.is_none()
            && stream.write_all(b"0\r\n\r\n").await.is_err()
        {
            return;
        }
    }
}

async fn read_request(
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
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).to_string(),
            )
        })
        .collect();
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

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A runtime SSE frame the way the runtime writes it.
pub fn frame(event: &str, data: serde_json::Value) -> Vec<u8> {
    format!(
        "data: {}\r\n\r\n",
        serde_json::json!({"event": event, "data": data, "timestamp": "2026-02-09T10:00:00.000Z"})
    )
    .into_bytes()
}

pub fn done_frame() -> Vec<u8> {
    b"data: [DONE]\r\n\r\n".to_vec()
}

/// A short, complete runtime answer.
pub fn runtime_ok_steps() -> Vec<Step> {
    vec![
        Step::Send(frame("text_chunk", serde_json::json!({"content": "hi"}))),
        Step::Send(frame(
            "execution_complete",
            serde_json::json!({"final_response": "hi"}),
        )),
        Step::Send(done_frame()),
    ]
}

/// A runtime that answers health checks and streams `runtime_ok_steps` for executions.
pub fn healthy_runtime(req: &Received) -> Reply {
    if req.path == "/health" {
        Reply::json(200, serde_json::json!({"status": "ok"}))
    } else {
        Reply::sse(runtime_ok_steps())
    }
}

/// A legacy that streams a short Agent2UI answer on chat routes and echoes everything else.
pub fn echo_legacy(req: &Received) -> Reply {
    if req.method == "POST" && req.path.starts_with("/api/v1/chat/") {
        Reply::sse(vec![Step::Send(
            b"event: message\ndata: {\"id\":\"l1\",\"type\":\"text\",\"data\":{\"content\":\"legacy\"}}\n\n".to_vec(),
        ), Step::Send(b"event: done\ndata: {\"executionMode\":\"direct_llm\"}\n\n".to_vec())])
    } else {
        Reply::json(
            200,
            serde_json::json!({"echo": req.path, "method": req.method}),
        )
    }
}

/// Sign an HS256 token for `org` that expires in an hour.
pub fn token(org: &str) -> String {
    token_with(serde_json::json!({"orgId": org, "userId": "user-1", "exp": now() + 3600}))
}

pub fn token_with(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A config for tests: short timeouts, org-a on the allowlist, secrets from test env vars.
pub fn config(legacy: &str, runtime: &str) -> Config {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:1"
[legacy]
address = "{legacy}"
[runtime]
address = "{runtime}"
execution_timeout_ms = 5000
health_interval_ms = 200
connect_timeout_ms = 500
[rollout]
runtime_orgs = ["org-a"]
[identity]
jwt_secret_env = "{JWT_ENV}"
[breaker]
open_secs = 1
[admin]
token_env = "{ADMIN_ENV}"
"#
    );
    Config::parse(&text).unwrap()
}

/// Start the proxy in-process with `config`.
pub async fn proxy(config: Config) -> LocalServer {
    std::env::set_var(JWT_ENV, JWT_SECRET);
    std::env::set_var(ADMIN_ENV, ADMIN_TOKEN);
    LocalServer::start(config, None).await.unwrap()
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
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
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
        let headers: Vec<(String, String)> = parsed
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).to_string(),
                )
            })
            .collect();
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
    let auth = org.map(|o| format!("Bearer {}", token(o)));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    c.send(
        "POST",
        &format!("/api/v1/chat/sessions/{session}"),
        &headers,
        body.as_bytes(),
    )
    .await;
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

/// Poll `cond` every 20 ms until it holds or `within` passes.
pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

impl Client {
    /// Write bytes exactly as given: a hand-framed request (chunked body) or part of one.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }
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

/// Outcomes are recorded when the proxy finishes a request, which can be just after the client
/// read the whole response: wait until at least `runtime` runtime and `direct` direct executions
/// are in the admin window.
pub async fn recorded(server: &LocalServer, runtime: u64, direct: u64) {
    let shared = server.shared.clone();
    let ok = eventually(Duration::from_secs(3), move || {
        let s = shared.stats.lock().unwrap();
        let now = Instant::now();
        s.snapshot(Mode::RuntimeOrchestrator, now).total >= runtime
            && s.snapshot(Mode::DirectLlm, now).total >= direct
    })
    .await;
    assert!(
        ok,
        "expected {runtime} runtime and {direct} direct executions to be recorded"
    );
}
