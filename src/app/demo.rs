//! `cutover-proxy demo`: local stand-ins for both upstreams, and the proxy in front of them, so a
//! newcomer can see both modes with curl.
//!
//! The legacy stand-in streams an Agent2UI answer the way the Chat API does and keeps sessions,
//! agents and messages in memory behind the routes the conversation bridge uses; the runtime
//! stand-in requires `agent_id`, as the real one does, and streams runtime events the way
//! sse-starlette does (CRLF separators, `: ping` comments).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::{decode, encode, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::core::config::Config;

const DEMO_JWT_SECRET: &str = "demo-jwt-secret";
const DEMO_ADMIN_TOKEN: &str = "demo-admin-token";

/// A parsed request: method, path, the `Authorization` header and body.
struct Request {
    method: String,
    path: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

/// Read one HTTP/1.1 request (Content-Length bodies only, which is what curl and the proxy send).
async fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers: Vec<(&str, &str)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_string())
    };
    let length = header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let authorization = header("authorization");
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Request {
        method,
        path,
        authorization,
        body,
    })
}

async fn write_chunk(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    let mut framed = format!("{:x}\r\n", data.len()).into_bytes();
    framed.extend_from_slice(data);
    framed.extend_from_slice(b"\r\n");
    stream.write_all(&framed).await
}

async fn respond_json(stream: &mut TcpStream, status: &str, body: serde_json::Value) {
    let body = body.to_string();
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
}

const SSE_HEAD: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";

/// The legacy API's conversations, in memory: what the bridge reads and writes.
#[derive(Default)]
struct Conversations {
    /// id -> (org, agentId, title, messages oldest first)
    sessions: HashMap<String, (String, String, String, Vec<Value>)>,
    /// id -> (org, name, systemPrompt, config as the JSON string the database stores)
    agents: HashMap<String, (String, String, String, String)>,
    next_id: u64,
}

type Shared = Arc<Mutex<Conversations>>;

impl Conversations {
    /// The sessions the demo's curl commands name, each with an agent of its org, so moving an
    /// org onto the allowlist by hot reload finds its conversation.
    fn seeded() -> Conversations {
        let mut c = Conversations::default();
        for (org, session, agent, name) in [
            ("org-a", "demo-1", "agent-a", "Demo Analyst"),
            ("org-b", "demo-2", "agent-b", "Demo Helper"),
        ] {
            let config = json!({"model": "demo-model", "temperature": 0.3, "maxTokens": 1024});
            c.agents.insert(
                agent.into(),
                (org.into(), name.into(), String::new(), config.to_string()),
            );
            c.sessions.insert(
                session.into(),
                (org.into(), agent.into(), "Demo".into(), Vec::new()),
            );
        }
        c
    }

    fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}-{}", self.next_id)
    }
}

fn caller_org(req: &Request) -> Option<String> {
    let token = req.authorization.as_deref()?.strip_prefix("Bearer ")?;
    let claims = decode::<Value>(
        token,
        &DecodingKey::from_secret(DEMO_JWT_SECRET.as_bytes()),
        &Validation::default(),
    )
    .ok()?
    .claims;
    claims["orgId"].as_str().map(str::to_string)
}

/// The bridge's routes as the source product's API answers them; `None`: not one of them.
fn conversation_route(state: &Shared, req: &Request) -> Option<(&'static str, Value)> {
    let path = req.path.split('?').next().unwrap_or_default();
    let sessions = path.strip_prefix("/api/v1/sessions");
    let agent = path.strip_prefix("/api/v1/agents/");
    if sessions.is_none() && agent.is_none() {
        return None;
    }
    let fail = |status, code: &str, message: &str| {
        Some((
            status,
            json!({"success": false, "error": {"code": code, "message": message}}),
        ))
    };
    let ok = |status, data: Value| Some((status, json!({"success": true, "data": data})));
    let Some(org) = caller_org(req) else {
        return fail(
            "401 Unauthorized",
            "UNAUTHORIZED",
            "missing or invalid token",
        );
    };
    let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let not_found = || fail("404 Not Found", "NOT_FOUND", "not found");
    if let Some(id) = agent {
        return match st.agents.get(id).filter(|a| a.0 == org) {
            Some((_, name, prompt, config)) if req.method == "GET" => ok(
                "200 OK",
                json!({"id": id, "name": name, "systemPrompt": prompt, "config": config}),
            ),
            _ => not_found(),
        };
    }
    let rest = sessions.unwrap_or_default();
    if rest.is_empty() && req.method == "POST" {
        let agent_id = body["agentId"].as_str().unwrap_or_default().to_string();
        if st.agents.get(&agent_id).is_none_or(|a| a.0 != org) {
            return not_found();
        }
        let id = st.new_id("session");
        let title = body["title"].as_str().unwrap_or_default().to_string();
        st.sessions
            .insert(id.clone(), (org, agent_id, title, Vec::new()));
        return ok("201 Created", json!({"id": id}));
    }
    let rest = rest.strip_prefix('/')?;
    let (id, messages) = match rest.split_once('/') {
        Some((id, "messages")) => (id, true),
        Some(_) => return None,
        None => (rest, false),
    };
    if st.sessions.get(id).is_none_or(|s| s.0 != org) {
        return not_found();
    }
    match (req.method.as_str(), messages) {
        ("GET", false) => {
            let (_, agent_id, title, _) = &st.sessions[id];
            ok(
                "200 OK",
                json!({"id": id, "agentId": agent_id, "title": title}),
            )
        }
        ("DELETE", false) => {
            st.sessions.remove(id);
            ok("200 OK", json!({"id": id}))
        }
        ("GET", true) => ok("200 OK", Value::Array(st.sessions[id].3.clone())),
        ("POST", true) => {
            let message_id = st.new_id("msg");
            let mut message = body;
            message["id"] = json!(message_id);
            if let Some(s) = st.sessions.get_mut(id) {
                s.3.push(message);
            }
            ok("201 Created", json!({"id": message_id}))
        }
        _ => None,
    }
}

async fn legacy_conn(mut stream: TcpStream, state: Shared) {
    while let Some(req) = read_request(&mut stream).await {
        if let Some((status, body)) = conversation_route(&state, &req) {
            respond_json(&mut stream, status, body).await;
            continue;
        }
        let is_chat = req.method == "POST" && req.path.starts_with("/api/v1/chat/");
        if !is_chat {
            respond_json(
                &mut stream,
                "200 OK",
                json!({"service": "legacy", "method": req.method, "path": req.path}),
            )
            .await;
            continue;
        }
        if stream.write_all(SSE_HEAD.as_bytes()).await.is_err() {
            return;
        }
        let words = ["Hello ", "from ", "the ", "legacy ", "Chat API."];
        for (i, w) in words.iter().enumerate() {
            let msg = json!({"id": format!("legacy-{i}"), "type": "text", "data": {"content": w},
                "timestamp": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()});
            let frame = format!("event: message\ndata: {msg}\n\n");
            if write_chunk(&mut stream, frame.as_bytes()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        let done = json!({"sessionId": "legacy-session", "messageId": "legacy-message", "executionMode": "direct_llm"});
        let _ = write_chunk(
            &mut stream,
            format!("event: done\ndata: {done}\n\n").as_bytes(),
        )
        .await;
        let _ = stream.write_all(b"0\r\n\r\n").await;
    }
}

/// The question a runtime request asks, read the way the real runtime reads it: a non-empty
/// `history_messages` is the whole conversation (its last user entry is the question) and
/// `user_message` is then ignored; otherwise `user_message`.
pub fn question_of(input: &Value) -> String {
    let history = input["history_messages"]
        .as_array()
        .filter(|h| !h.is_empty());
    let asked = match history {
        Some(h) => h
            .iter()
            .rev()
            .find(|m| m["role"] == "user")
            .and_then(|m| m["content"].as_str()),
        None => input["user_message"].as_str(),
    };
    asked.unwrap_or_default().to_string()
}

fn runtime_frame(event: &str, data: serde_json::Value) -> String {
    let ts = humantime::format_rfc3339_millis(std::time::SystemTime::now());
    format!(
        "data: {}\r\n\r\n",
        json!({"event": event, "data": data, "timestamp": ts.to_string()})
    )
}

async fn runtime_conn(mut stream: TcpStream) {
    while let Some(req) = read_request(&mut stream).await {
        if req.method == "GET" && req.path == "/health" {
            respond_json(&mut stream, "200 OK", json!({"status": "ok"})).await;
            continue;
        }
        if req.method != "POST" {
            respond_json(&mut stream, "404 Not Found", json!({"detail": "Not Found"})).await;
            continue;
        }
        let input: Value = serde_json::from_slice(&req.body).unwrap_or_default();
        if input["agent_id"].as_str().is_none_or(str::is_empty) {
            // FastAPI's validation answer, as the real runtime gives it.
            let detail = json!({"detail": [{"type": "missing", "loc": ["body", "agent_id"],
                "msg": "Field required", "input": input}]});
            respond_json(&mut stream, "422 Unprocessable Entity", detail).await;
            continue;
        }
        let message = question_of(&input);
        let earlier = input["history_messages"]
            .as_array()
            .map_or(0, |h| h.len().saturating_sub(1));
        // Says what it understood, so the demo shows the history growing chat by chat.
        let answer = format!(
            "Hello from the runtime orchestrator: you asked {message:?} ({earlier} earlier messages).",
        );
        if stream.write_all(SSE_HEAD.as_bytes()).await.is_err() {
            return;
        }
        let frames = [
            runtime_frame(
                "plan_created",
                json!({"steps": [{"id": "s1", "title": "Look it up"}, {"id": "s2", "title": "Answer"}]}),
            ),
            runtime_frame(
                "plan_step_start",
                json!({"step_id": "s1", "title": "Look it up", "tool": "search", "params": {"q": message}}),
            ),
            runtime_frame(
                "tool_call_start",
                json!({"tool_name": "search", "arguments": {"q": message}}),
            ),
            ": ping\r\n\r\n".to_string(),
            runtime_frame(
                "tool_call_complete",
                json!({"tool_name": "search", "result": {"hits": 3}, "success": true, "error": null, "duration": 42}),
            ),
            runtime_frame(
                "plan_step_complete",
                json!({"step_id": "s1", "title": "Look it up", "result": "3 hits", "duration_ms": 120}),
            ),
            runtime_frame(
                "thinking",
                json!({"content": "Summarising", "stage": "answer"}),
            ),
            runtime_frame("text_chunk", json!({"content": "Hello from "})),
            runtime_frame(
                "text_chunk",
                json!({"content": &answer["Hello from ".len()..]}),
            ),
            runtime_frame("execution_complete", json!({"final_response": answer})),
            "data: [DONE]\r\n\r\n".to_string(),
        ];
        for frame in frames {
            if write_chunk(&mut stream, frame.as_bytes()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
    }
}

/// Serve the legacy stand-in on `listener` until the runtime stops.
pub async fn serve_legacy(listener: TcpListener) {
    let state: Shared = Arc::new(Mutex::new(Conversations::seeded()));
    while let Ok((s, _)) = listener.accept().await {
        tokio::spawn(legacy_conn(s, state.clone()));
    }
}

/// Serve the runtime stand-in on `listener` until the runtime stops.
pub async fn serve_runtime(listener: TcpListener) {
    while let Ok((s, _)) = listener.accept().await {
        tokio::spawn(runtime_conn(s));
    }
}

fn token(org: &str, user: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 24 * 3600;
    encode(
        &Header::default(),
        &json!({"orgId": org, "userId": user, "exp": exp}),
        &EncodingKey::from_secret(DEMO_JWT_SECRET.as_bytes()),
    )
    .expect("HS256 signing")
}

/// Start both stand-ins on the addresses the config names, then the proxy. Never returns on
/// success.
pub fn run(config_path: &Path) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", config_path.display());
            return ExitCode::FAILURE;
        }
    };
    // The demo owns its secrets; real deployments inject them from a Secret.
    std::env::set_var(&config.identity.jwt_secret_env, DEMO_JWT_SECRET);
    std::env::set_var(&config.admin.token_env, DEMO_ADMIN_TOKEN);

    let legacy: SocketAddr = match config.legacy.address.parse() {
        Ok(a) => a,
        Err(_) => {
            eprintln!("demo: legacy.address must be an IP:port");
            return ExitCode::FAILURE;
        }
    };
    let runtime: SocketAddr = match config.runtime.address.parse() {
        Ok(a) => a,
        Err(_) => {
            eprintln!("demo: runtime.address must be an IP:port");
            return ExitCode::FAILURE;
        }
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async move {
            let l = TcpListener::bind(legacy).await;
            let r = TcpListener::bind(runtime).await;
            match (l, r) {
                (Ok(l), Ok(r)) => {
                    let _ = ready_tx.send(Ok(()));
                    tokio::join!(serve_legacy(l), serve_runtime(r));
                }
                (Err(e), _) | (_, Err(e)) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
    });
    if let Ok(Err(e)) | Err(e) = ready_rx
        .recv()
        .map_err(|e| std::io::Error::other(e.to_string()))
    {
        eprintln!("demo: cannot start the stand-in upstreams: {e}");
        return ExitCode::FAILURE;
    }

    let listen = config.server.listen.replace("0.0.0.0", "127.0.0.1");
    let admin = config.server.admin_listen.clone();
    let metrics = config.server.metrics_listen.replace("0.0.0.0", "127.0.0.1");
    let runtime_org = config
        .rollout
        .runtime_orgs
        .first()
        .cloned()
        .unwrap_or_else(|| "org-a".into());
    println!(
        r#"
cutover-proxy demo
  legacy stand-in   http://{legacy}
  runtime stand-in  http://{runtime}
  proxy             http://{listen}   (config: {cfg}, hot-reloaded: edit rollout.runtime_orgs)

runtime_orchestrator ({runtime_org} is on the allowlist):
  curl -N -X POST http://{listen}/api/v1/chat/sessions/demo-1 \
    -H 'authorization: Bearer {t_runtime}' \
    -H 'content-type: application/json' -d '{{"message":"hello"}}' -i

the conversation, saved to legacy by the bridge (user message and runtime answer):
  curl -s http://{listen}/api/v1/sessions/demo-1/messages \
    -H 'authorization: Bearer {t_runtime}'

direct_llm (org-b is not):
  curl -N -X POST http://{listen}/api/v1/chat/sessions/demo-2 \
    -H 'authorization: Bearer {t_legacy}' \
    -H 'content-type: application/json' -d '{{"message":"hello"}}' -i

breaker and stats:   curl -s http://{admin}/runtime/metrics
kill switch:         curl -s -X POST http://{admin}/runtime/fallback/trip -H 'authorization: Bearer {DEMO_ADMIN_TOKEN}'
Prometheus:          curl -s http://{metrics}/metrics | grep chat_execution
"#,
        cfg = config_path.display(),
        t_runtime = token(&runtime_org, "demo-user"),
        t_legacy = token("org-b", "demo-user"),
    );
    crate::app::run(config_path.to_path_buf(), config)
}
