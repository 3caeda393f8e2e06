//! Scripted upstreams: real HTTP/1.1 servers on loopback that answer each request from a script
//! (status, headers, body pieces with pauses, abrupt close) and record what they received.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::client::read_request;

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
    /// Reset the connection (RST, not FIN): what a crashed upstream or a load balancer does.
    Reset,
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
                Step::Reset => {
                    // A zero linger turns the close into a reset.
                    let _ = stream.set_zero_linger();
                    return;
                }
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

/// The question a runtime request asks, read the way the real runtime reads it: a non-empty
/// `history_messages` is the whole conversation (its last user entry is the question) and
/// `user_message` is then ignored; otherwise `user_message`.
pub fn question_of(body: &serde_json::Value) -> String {
    let history = body["history_messages"]
        .as_array()
        .filter(|h| !h.is_empty());
    let asked = match history {
        Some(h) => h
            .iter()
            .rev()
            .find(|m| m["role"] == "user")
            .and_then(|m| m["content"].as_str()),
        None => body["user_message"].as_str(),
    };
    asked.unwrap_or_default().to_string()
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
