//! Scripted upstreams: real HTTP/1.1 servers on loopback that answer each request from a script
//! (status, headers, body pieces with pauses, floods, abrupt close or reset, raw bytes that are
//! not HTTP at all), record what they received, and count how their answers went (begun, bytes
//! sent, the proxy hanging up midway).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::client::read_request;
pub use cutover_proxy::app::demo::question_of;

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
        super::client::header_in(&self.headers, name)
    }
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        super::client::headers_in(&self.headers, name)
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("upstream received JSON")
    }
}

/// One step of a scripted response body. The waiting steps (`Sleep`, `WaitRelease`, `Hang`)
/// watch the connection meanwhile: if the proxy hangs up, the answer ends there and counts in
/// `Upstream::hang_ups`.
#[derive(Debug, Clone)]
pub enum Step {
    /// Send these bytes as one chunk (chunked framing is added unless the reply is raw).
    Send(Vec<u8>),
    /// Send `data` as one chunk `times` times, pausing `pause` after each (`usize::MAX`: until
    /// the proxy stops taking them).
    Repeat {
        data: Vec<u8>,
        times: usize,
        pause: Duration,
    },
    /// Pause.
    Sleep(Duration),
    /// Wait until the test calls `Upstream::release()`.
    WaitRelease,
    /// Close the connection abruptly (no terminating chunk).
    Close,
    /// Reset the connection (RST, not FIN): what a crashed upstream or a load balancer does.
    Reset,
    /// Never send anything more, keep the connection open until the proxy hangs up.
    Hang,
}

impl Step {
    /// `times` chunks of `len` copies of `byte`, pausing `pause` after each.
    pub fn fill(byte: u8, len: usize, times: usize, pause: Duration) -> Step {
        Step::Repeat {
            data: vec![byte; len],
            times,
            pause,
        }
    }
    /// `data` over and over, as fast as the proxy takes it, until it hangs up.
    pub fn flood(data: Vec<u8>) -> Step {
        Step::Repeat {
            data,
            times: usize::MAX,
            pause: Duration::ZERO,
        }
    }
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
    /// No head of its own: the connection carries exactly what `steps` send (nothing at all,
    /// bytes that are not HTTP, a head written by hand).
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

/// The head of a chunked SSE answer, for a `Reply::silent` script that writes its own.
pub const SSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

/// `data` framed as one HTTP/1.1 chunk.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut framed = format!("{:x}\r\n", data.len()).into_bytes();
    framed.extend_from_slice(data);
    framed.extend_from_slice(b"\r\n");
    framed
}

/// How the upstream's answers to work (requests other than health checks) went.
#[derive(Default)]
struct Tally {
    /// Answers that wrote their first byte.
    answered: AtomicUsize,
    /// Answers the proxy hung up on before they ended (seen by a waiting step or a failed write).
    hang_ups: tokio::sync::watch::Sender<usize>,
    /// Of those, the ones that had not written a byte yet.
    unanswered_hang_ups: AtomicUsize,
    /// Body bytes written by `Send` and `Repeat` steps.
    bytes_sent: AtomicU64,
    /// Connections the proxy closed while they waited for a request (idle keep-alives).
    idle_closes: tokio::sync::watch::Sender<usize>,
}

type Handler = dyn Fn(&Received) -> Reply + Send + Sync;

/// A scripted HTTP/1.1 upstream on an ephemeral loopback port.
pub struct Upstream {
    pub addr: std::net::SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    connections: Arc<AtomicUsize>,
    release: Arc<Notify>,
    arrived: Arc<Notify>,
    tally: Arc<Tally>,
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
        let tally = Arc::new(Tally::default());
        let shared = Conn {
            handler,
            received: received.clone(),
            release: release.clone(),
            arrived: arrived.clone(),
            tally: tally.clone(),
        };
        let c = connections.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let id = c.fetch_add(1, Ordering::SeqCst);
                conns.spawn(shared.clone().serve(stream, id));
            }
        });
        Upstream {
            addr,
            received,
            connections,
            release,
            arrived,
            tally,
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
    /// `field` of each JSON body in [`Upstream::work`], in order.
    pub fn work_field(&self, field: &str) -> Vec<serde_json::Value> {
        self.work()
            .iter()
            .map(|w| w.json()[field].clone())
            .collect()
    }
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    /// Answers to work that wrote their first byte.
    pub fn answered(&self) -> usize {
        self.tally.answered.load(Ordering::SeqCst)
    }
    /// Answers to work the proxy hung up on before they ended.
    pub fn hang_ups(&self) -> usize {
        *self.tally.hang_ups.borrow()
    }
    /// Requests for work the proxy hung up on before a byte of the answer was written.
    pub fn unanswered_hang_ups(&self) -> usize {
        self.tally.unanswered_hang_ups.load(Ordering::SeqCst)
    }
    /// Wait up to `within` until the proxy has closed at least `n` connections that were
    /// waiting for their next request; whether it did.
    pub async fn wait_for_idle_closes(&self, n: usize, within: Duration) -> bool {
        let mut closes = self.tally.idle_closes.subscribe();
        let reached = tokio::time::timeout(within, closes.wait_for(|c| *c >= n)).await;
        reached.is_ok()
    }
    /// Wait up to `within` until the proxy has hung up on at least `n` answers; whether it did.
    pub async fn wait_for_hang_ups(&self, n: usize, within: Duration) -> bool {
        let mut hang_ups = self.tally.hang_ups.subscribe();
        let reached = tokio::time::timeout(within, hang_ups.wait_for(|h| *h >= n)).await;
        reached.is_ok()
    }
    /// Body bytes the scripts wrote (`Send` and `Repeat` steps).
    pub fn bytes_sent(&self) -> u64 {
        self.tally.bytes_sent.load(Ordering::SeqCst)
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

/// What every connection of one upstream shares.
#[derive(Clone)]
struct Conn {
    handler: Arc<Handler>,
    received: Arc<Mutex<Vec<Received>>>,
    release: Arc<Notify>,
    arrived: Arc<Notify>,
    tally: Arc<Tally>,
}

/// How one answer ended.
enum Ended {
    /// The script ran to its end; the connection may carry another request.
    Whole,
    /// The script closed or reset the connection.
    Closed,
    /// The proxy hung up first.
    HungUp,
}

impl Conn {
    async fn serve(self, mut stream: TcpStream, id: usize) {
        let _ = stream.set_nodelay(true);
        let mut buf = Vec::new();
        while let Some(req) = read_request(&mut stream, &mut buf, id).await {
            self.received.lock().unwrap().push(req.clone());
            self.arrived.notify_waiters();
            let reply = (self.handler)(&req);
            let work = req.path != "/health";
            let mut written = 0u64;
            let ended = self
                .answer(&mut stream, &mut buf, &reply, work, &mut written)
                .await;
            match ended {
                Ended::Whole => {}
                Ended::Closed => return,
                Ended::HungUp => {
                    if work {
                        if written == 0 {
                            self.tally
                                .unanswered_hang_ups
                                .fetch_add(1, Ordering::SeqCst);
                        }
                        self.tally.hang_ups.send_modify(|h| *h += 1);
                    }
                    return;
                }
            }
        }
        self.tally.idle_closes.send_modify(|c| *c += 1);
    }

    async fn answer(
        &self,
        stream: &mut TcpStream,
        buf: &mut Vec<u8>,
        reply: &Reply,
        work: bool,
        written: &mut u64,
    ) -> Ended {
        let raw = reply.no_head || reply.fixed_body.is_some();
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
            if !self.write(stream, &out, work, written).await {
                return Ended::HungUp;
            }
        }
        for step in &reply.steps {
            match step {
                Step::Send(data) => {
                    if !self.send(stream, data, raw, work, written).await {
                        return Ended::HungUp;
                    }
                }
                Step::Repeat { data, times, pause } => {
                    for _ in 0..*times {
                        if !self.send(stream, data, raw, work, written).await {
                            return Ended::HungUp;
                        }
                        if !pause.is_zero()
                            && !unless_hung_up(stream, buf, tokio::time::sleep(*pause)).await
                        {
                            return Ended::HungUp;
                        }
                    }
                }
                Step::Sleep(d) => {
                    if !unless_hung_up(stream, buf, tokio::time::sleep(*d)).await {
                        return Ended::HungUp;
                    }
                }
                Step::WaitRelease => {
                    if !unless_hung_up(stream, buf, self.release.notified()).await {
                        return Ended::HungUp;
                    }
                }
                Step::Close => return Ended::Closed,
                Step::Reset => {
                    // A zero linger turns the close into a reset.
                    let _ = stream.set_zero_linger();
                    return Ended::Closed;
                }
                Step::Hang => {
                    unless_hung_up(stream, buf, std::future::pending::<()>()).await;
                    return Ended::HungUp;
                }
            }
        }
        if !reply.no_head
            && reply.fixed_body.is_none()
            && !self.write(stream, b"0\r\n\r\n", work, written).await
        {
            return Ended::HungUp;
        }
        Ended::Whole
    }

    /// Write one body piece, framed as a chunk unless the reply is raw.
    async fn send(
        &self,
        stream: &mut TcpStream,
        data: &[u8],
        raw: bool,
        work: bool,
        written: &mut u64,
    ) -> bool {
        let ok = if raw {
            self.write(stream, data, work, written).await
        } else {
            self.write(stream, &chunk(data), work, written).await
        };
        if ok {
            self.tally
                .bytes_sent
                .fetch_add(data.len() as u64, Ordering::SeqCst);
        }
        ok
    }

    async fn write(
        &self,
        stream: &mut TcpStream,
        bytes: &[u8],
        work: bool,
        written: &mut u64,
    ) -> bool {
        if stream.write_all(bytes).await.is_err() {
            return false;
        }
        if work && *written == 0 && !bytes.is_empty() {
            self.tally.answered.fetch_add(1, Ordering::SeqCst);
        }
        *written += bytes.len() as u64;
        true
    }
}

/// Run `wait` unless the peer hangs up first (false then). Whatever the peer sends meanwhile is
/// kept in `buf` for the next request.
async fn unless_hung_up(stream: &mut TcpStream, buf: &mut Vec<u8>, wait: impl Future) -> bool {
    let mut piece = [0u8; 4096];
    tokio::pin!(wait);
    loop {
        tokio::select! {
            _ = &mut wait => return true,
            read = stream.read(&mut piece) => match read {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&piece[..n]),
            },
        }
    }
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
    answer_steps("hi")
}

/// A short, complete runtime answer whose text is `text`.
pub fn answer_steps(text: &str) -> Vec<Step> {
    vec![
        Step::Send(frame("text_chunk", serde_json::json!({"content": text}))),
        Step::Send(frame(
            "execution_complete",
            serde_json::json!({"final_response": text}),
        )),
        Step::Send(done_frame()),
    ]
}

/// A runtime that answers health checks and, for an execution, streams back the question it
/// understood (`question_of`) as its whole answer: a test that sends "hi" reads "hi".
pub fn healthy_runtime(req: &Received) -> Reply {
    if req.path == "/health" {
        return Reply::json(200, serde_json::json!({"status": "ok"}));
    }
    let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
    Reply::sse(answer_steps(&question_of(&body)))
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

/// An upstream that streams `first`, waits until the test releases it, then streams `then`.
pub fn released_in_two(
    first: &'static [u8],
    then: &'static [u8],
) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    move |_: &Received| {
        Reply::sse(vec![
            Step::Send(first.to_vec()),
            Step::WaitRelease,
            Step::Send(then.to_vec()),
        ])
    }
}

/// A runtime that answers its health checks and scripts every execution with `script`, which
/// is told how many executions came before.
pub fn runtime_script(
    script: impl Fn(usize) -> Reply + Send + Sync + 'static,
) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    let executions = AtomicUsize::new(0);
    move |req: &Received| {
        if req.path == "/health" {
            return healthy_runtime(req);
        }
        script(executions.fetch_add(1, Ordering::SeqCst))
    }
}

/// A runtime that answers its health checks and streams `steps` for every execution.
pub fn runtime_sse(steps: Vec<Step>) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    runtime_script(move |_| Reply::sse(steps.clone()))
}

/// A runtime that answers its health checks and every other request with `script`.
pub fn runtime_answering(
    script: impl Fn(&Received) -> Reply + Send + Sync + 'static,
) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    move |req: &Received| {
        if req.path == "/health" {
            return healthy_runtime(req);
        }
        script(req)
    }
}

/// A runtime that answers every execution with `failure` until `recovered` is set, and with
/// [`runtime_ok_steps`] from then on.
pub fn runtime_failing_until(
    recovered: Arc<AtomicBool>,
    failure: Reply,
) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    runtime_answering(move |_: &Received| {
        if recovered.load(Ordering::SeqCst) {
            Reply::sse(runtime_ok_steps())
        } else {
            failure.clone()
        }
    })
}

/// A runtime that answers every session with [`runtime_ok_steps`] but `fails`, which gets only
/// `frame` and then the end of the stream.
pub fn runtime_failing_session_fails(
    frame: Vec<u8>,
) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    runtime_answering(move |req: &Received| {
        if req.json()["session_id"] == "fails" {
            Reply::sse(vec![Step::Send(frame.clone())])
        } else {
            Reply::sse(runtime_ok_steps())
        }
    })
}

/// A runtime `text_chunk` frame.
pub fn text(content: &str) -> Vec<u8> {
    frame("text_chunk", serde_json::json!({ "content": content }))
}

/// A runtime `thinking` frame.
pub fn thinking(content: &str) -> Vec<u8> {
    frame("thinking", serde_json::json!({ "content": content }))
}

/// A runtime `execution_error` frame with `code`, the way an overloaded model fails.
pub fn execution_error(code: &str) -> Vec<u8> {
    frame(
        "execution_error",
        serde_json::json!({"error": "model overloaded", "code": code}),
    )
}
