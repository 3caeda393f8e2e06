//! A fake legacy Chat API for the conversation bridge: sessions, agents and messages behind the
//! source product's REST routes, answering `{"success":true,"data":...}`, scoped by the JWT's org
//! (another org's session or agent is a 404) and 401 without a valid token.
//!
//! Agents' `config` is sent as a JSON string, as the source product's database stores it. Each
//! route can be made to fail (a status, a hang, or a status for the next n calls), a save can be
//! made slow (its row committed late, as a slow database does) or lost after it was written (the
//! row saved, the connection dropped before the answer), the whole API can go down (connections
//! refused) and come back on the same port, and every request is recorded with its headers.
//! Chats themselves get `echo_legacy`'s stream, as legacy answers the chats the proxy hands it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::{
    echo_legacy, request, token, Received, Reply, Response, Running, Step, Upstream, JWT_SECRET,
};

/// A route of the fake, for faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LegacyRoute {
    GetSession,
    GetAgent,
    GetMessages,
    PostMessage,
    CreateSession,
    DeleteSession,
}

/// How a route misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Always answer this status with the source product's error body.
    Status(u16),
    /// Answer this status to the next `n` calls, then work again.
    StatusTimes(u16, usize),
    /// Never answer.
    Hang,
    /// A save whose row is committed, and answered, only after this long (a slow database).
    Slow(Duration),
    /// A save whose row is committed, then the connection is dropped without an answer (legacy
    /// crashed after the write).
    SaveThenDrop,
}

#[derive(Debug, Clone)]
struct Session {
    org: String,
    agent_id: String,
    title: String,
    messages: Vec<Value>,
}

#[derive(Debug, Clone)]
struct Agent {
    org: String,
    name: String,
    system_prompt: String,
    config: Value,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Session>,
    agents: HashMap<String, Agent>,
    faults: HashMap<LegacyRoute, Fault>,
    /// Faults for the next calls of a route only, in order, before `faults`.
    next_faults: HashMap<LegacyRoute, VecDeque<Fault>>,
    /// Messages committed late: hidden from reads until then.
    hidden_until: HashMap<String, Instant>,
    next_id: u64,
}

pub struct FakeLegacy {
    pub upstream: Upstream,
    state: Arc<Mutex<State>>,
    /// The API after `restart`, on the same port.
    revived: Mutex<Vec<Upstream>>,
}

impl FakeLegacy {
    pub async fn start() -> FakeLegacy {
        let state = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        let upstream = Upstream::start(move |req| handle(&mut s.lock().unwrap(), req)).await;
        FakeLegacy {
            upstream,
            state,
            revived: Mutex::default(),
        }
    }

    /// Go down: the port refuses connections and open ones are dropped. The data stays.
    pub fn stop(&self) {
        self.upstream.stop();
        for u in self.revived.lock().unwrap().iter() {
            u.stop();
        }
    }

    /// Come back on the same port with the same data.
    pub async fn restart(&self) {
        let listener = TcpListener::bind(self.upstream.addr).await.unwrap();
        let s = self.state.clone();
        let up = Upstream::on(listener, move |req| handle(&mut s.lock().unwrap(), req));
        self.revived.lock().unwrap().push(up);
    }

    /// The next call of `route` misbehaves this way (then the route's standing fault, if any).
    pub fn fail_next(&self, route: LegacyRoute, fault: Fault) {
        self.state
            .lock()
            .unwrap()
            .next_faults
            .entry(route)
            .or_default()
            .push_back(fault);
    }

    pub fn address(&self) -> String {
        self.upstream.address()
    }

    pub fn add_agent(&self, org: &str, id: &str, name: &str, system_prompt: &str, config: Value) {
        self.state.lock().unwrap().agents.insert(
            id.into(),
            Agent {
                org: org.into(),
                name: name.into(),
                system_prompt: system_prompt.into(),
                config,
            },
        );
    }

    pub fn add_session(&self, org: &str, id: &str, agent_id: &str) {
        self.state.lock().unwrap().sessions.insert(
            id.into(),
            Session {
                org: org.into(),
                agent_id: agent_id.into(),
                title: String::new(),
                messages: Vec::new(),
            },
        );
    }

    pub fn add_message(&self, session: &str, role: &str, content: &str) {
        let mut st = self.state.lock().unwrap();
        st.next_id += 1;
        let id = format!("m-{}", st.next_id);
        st.sessions
            .get_mut(session)
            .expect("session exists")
            .messages
            .push(json!({"id": id, "role": role, "content": content}));
    }

    /// A legacy with org-a's agent `ag-1` (config as a JSON string) and its session `s-1` holding
    /// three messages, and org-b's agent `ag-b` with its session `s-b`.
    pub async fn seeded() -> FakeLegacy {
        let l = FakeLegacy::start().await;
        l.add_agent(
            "org-a",
            "ag-1",
            "Helper",
            "Be brief.",
            json!({"model": "gpt-4o", "temperature": 0.2, "maxTokens": 1000}),
        );
        l.add_session("org-a", "s-1", "ag-1");
        l.add_message("s-1", "user", "first");
        l.add_message("s-1", "assistant", "second");
        l.add_message("s-1", "user", "third");
        l.add_agent("org-b", "ag-b", "Other", "", json!({}));
        l.add_session("org-b", "s-b", "ag-b");
        l
    }

    /// The session's stored messages, oldest first, as legacy holds them (committed ones).
    pub fn messages(&self, session: &str) -> Vec<Value> {
        let st = self.state.lock().unwrap();
        st.sessions
            .get(session)
            .map(|s| visible(&st, &s.messages))
            .unwrap_or_default()
    }

    /// `(org, agentId, title)` of a stored session.
    pub fn session(&self, id: &str) -> Option<(String, String, String)> {
        self.state
            .lock()
            .unwrap()
            .sessions
            .get(id)
            .map(|s| (s.org.clone(), s.agent_id.clone(), s.title.clone()))
    }

    pub fn fail(&self, route: LegacyRoute, fault: Fault) {
        self.state.lock().unwrap().faults.insert(route, fault);
    }

    pub fn heal(&self, route: LegacyRoute) {
        self.state.lock().unwrap().faults.remove(&route);
    }

    /// Every request received, before and after a restart.
    pub fn received(&self) -> Vec<Received> {
        let mut all = self.upstream.received();
        for u in self.revived.lock().unwrap().iter() {
            all.extend(u.received());
        }
        all
    }

    pub fn count(&self) -> usize {
        self.received().len()
    }

    /// Requests of one route.
    pub fn calls(&self, route: LegacyRoute) -> usize {
        self.received()
            .iter()
            .filter(|r| route_of(r).is_some_and(|(r, _)| r == route))
            .count()
    }

    /// A `/chat/start` that did not stay on the runtime: the session the proxy made for it was
    /// deleted before legacy served the start itself, with `body` as the client sent it, and the
    /// proxy saved no message. Every call legacy received, `(method, path)` in order.
    #[track_caller]
    pub fn assert_start_undone_before_served(&self, body: &[u8]) -> Vec<(String, String)> {
        let received = self.received();
        let calls: Vec<(String, String)> = received
            .iter()
            .map(|q| (q.method.clone(), q.path.clone()))
            .collect();
        let at = |method: &str, path: &str| calls.iter().position(|c| c.0 == method && c.1 == path);
        assert!(
            !calls
                .iter()
                .any(|(m, p)| m == "POST" && p.ends_with("/messages")),
            "the proxy saved a message: {calls:?}"
        );
        let created = at("POST", "/api/v1/sessions").expect("a session was made for /chat/start");
        let deleted = calls
            .iter()
            .position(|(m, _)| m == "DELETE")
            .expect("and deleted");
        let served = at("POST", "/api/v1/chat/start").expect("legacy served /chat/start");
        assert!(created < deleted && deleted < served, "{calls:?}");
        let id = calls[deleted].1.rsplit('/').next().unwrap();
        assert!(self.session(id).is_none(), "session {id} left behind");
        assert_eq!(received[served].body, body, "legacy's /chat/start body");
        calls
    }
}

/// With the bridge on and a runtime that fails before content, a session chat with `body` and
/// then a `/chat/start`, each answered as `answered` checks: legacy gets the session chat's body
/// byte for byte, the proxy saves nothing of its own, and the start's session is undone before
/// legacy serves the start.
pub async fn assert_bridge_chats_leave_nothing(
    h: &Running<FakeLegacy>,
    body: &str,
    answered: impl Fn(&Response, &str),
) {
    let before = h.legacy.messages("s-1");
    let r = h.chat("org-a").body(body).send().await;
    answered(&r, "session chat");
    assert_eq!(
        h.legacy.messages("s-1"),
        before,
        "only legacy's own messages"
    );
    assert_eq!(h.runtime.work().len(), 1);

    let auth = format!("Bearer {}", token("org-a"));
    let headers = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    let start = json!({"agentId": "ag-1", "message": "hello"}).to_string();
    let r = request(
        h.proxy_addr,
        "POST",
        "/api/v1/chat/start",
        &headers,
        start.as_bytes(),
    )
    .await;
    answered(&r, "chat start");
    assert_eq!(h.runtime.work().len(), 2);

    let calls = h.legacy.assert_start_undone_before_served(start.as_bytes());
    let chat = calls
        .iter()
        .position(|(m, p)| m == "POST" && p == "/api/v1/chat/sessions/s-1")
        .expect("legacy served the session chat");
    assert_eq!(h.legacy.received()[chat].body, body.as_bytes());
}

/// Messages whose commit is done.
fn visible(st: &State, messages: &[Value]) -> Vec<Value> {
    let now = Instant::now();
    messages
        .iter()
        .filter(|m| {
            let id = m["id"].as_str().unwrap_or_default();
            st.hidden_until.get(id).is_none_or(|t| now >= *t)
        })
        .cloned()
        .collect()
}

/// A whole HTTP response written by hand, for a reply sent after a pause.
fn raw_json(status: u16, body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn ok(status: u16, data: Value) -> Reply {
    Reply::json(status, json!({"success": true, "data": data}))
}

fn error(status: u16, code: &str, message: &str) -> Reply {
    Reply::json(
        status,
        json!({"success": false, "error": {"code": code, "message": message}}),
    )
}

fn not_found() -> Reply {
    error(404, "NOT_FOUND", "not found")
}

/// `(org, user)` of a valid bearer token.
fn identity(req: &Received) -> Option<(String, Option<String>)> {
    let token = req.header("authorization")?.strip_prefix("Bearer ")?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(JWT_SECRET.as_bytes()),
        &validation,
    )
    .ok()?
    .claims;
    let org = claims.get("orgId")?.as_str()?.to_string();
    let user = claims
        .get("userId")
        .and_then(Value::as_str)
        .map(str::to_string);
    Some((org, user))
}

fn route_of(req: &Received) -> Option<(LegacyRoute, Option<String>)> {
    let path = req.path.split('?').next().unwrap_or_default();
    if let Some(id) = path.strip_prefix("/api/v1/agents/") {
        return (req.method == "GET" && !id.contains('/'))
            .then(|| (LegacyRoute::GetAgent, Some(id.to_string())));
    }
    if path == "/api/v1/sessions" {
        return (req.method == "POST").then_some((LegacyRoute::CreateSession, None));
    }
    let rest = path.strip_prefix("/api/v1/sessions/")?;
    let route = match (req.method.as_str(), rest.split_once('/')) {
        ("GET", None) => LegacyRoute::GetSession,
        ("DELETE", None) => LegacyRoute::DeleteSession,
        ("GET", Some((_, "messages"))) => LegacyRoute::GetMessages,
        ("POST", Some((_, "messages"))) => LegacyRoute::PostMessage,
        _ => return None,
    };
    let id = rest.split('/').next().unwrap_or_default().to_string();
    Some((route, Some(id)))
}

fn handle(st: &mut State, req: &Received) -> Reply {
    if req.path.starts_with("/api/v1/chat/") {
        return echo_legacy(req);
    }
    let Some((route, id)) = route_of(req) else {
        return not_found();
    };
    let next = st.next_faults.get_mut(&route).and_then(VecDeque::pop_front);
    // How a save that is written anyway is answered.
    let mut answer = None;
    match next.or_else(|| st.faults.get(&route).copied()) {
        Some(f @ (Fault::Slow(_) | Fault::SaveThenDrop)) => answer = Some(f),
        Some(Fault::Status(s)) => return error(s, "INJECTED", "injected fault"),
        Some(Fault::StatusTimes(s, n)) if n > 0 => {
            st.faults.insert(route, Fault::StatusTimes(s, n - 1));
            return error(s, "INJECTED", "injected fault");
        }
        Some(Fault::Hang) => return Reply::silent(vec![Step::Hang]),
        _ => {}
    }
    let reply = route_reply(st, req, route, id);
    match answer {
        Some(Fault::Slow(d)) => {
            if let Some(m) = reply_id(&reply).filter(|_| route == LegacyRoute::PostMessage) {
                st.hidden_until.insert(m, Instant::now() + d);
            }
            let body: Value =
                serde_json::from_slice(reply.fixed_body.as_deref().unwrap_or_default()).unwrap();
            Reply::silent(vec![
                Step::Sleep(d),
                Step::Send(raw_json(reply.status, &body)),
            ])
        }
        Some(_) => Reply::silent(vec![Step::Close]),
        None => reply,
    }
}

/// The id a save's answer names.
fn reply_id(reply: &Reply) -> Option<String> {
    let body: Value = serde_json::from_slice(reply.fixed_body.as_deref()?).ok()?;
    body["data"]["id"].as_str().map(str::to_string)
}

fn route_reply(st: &mut State, req: &Received, route: LegacyRoute, id: Option<String>) -> Reply {
    let Some((org, _user)) = identity(req) else {
        return error(401, "UNAUTHORIZED", "missing or invalid token");
    };
    let id = id.unwrap_or_default();
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    match route {
        LegacyRoute::GetAgent => match st.agents.get(&id).filter(|a| a.org == org) {
            Some(a) => ok(
                200,
                json!({"id": id, "name": a.name, "systemPrompt": a.system_prompt,
                       "config": a.config.to_string()}),
            ),
            None => not_found(),
        },
        LegacyRoute::GetSession => match st.sessions.get(&id).filter(|s| s.org == org) {
            Some(s) => ok(
                200,
                json!({"id": id, "agentId": s.agent_id, "title": s.title}),
            ),
            None => not_found(),
        },
        LegacyRoute::GetMessages => match st.sessions.get(&id).filter(|s| s.org == org) {
            Some(s) => ok(200, Value::Array(visible(st, &s.messages))),
            None => not_found(),
        },
        LegacyRoute::PostMessage => {
            st.next_id += 1;
            let message_id = format!("m-{}", st.next_id);
            match st.sessions.get_mut(&id).filter(|s| s.org == org) {
                Some(s) => {
                    let mut m = body;
                    m["id"] = json!(message_id);
                    s.messages.push(m);
                    ok(201, json!({"id": message_id}))
                }
                None => not_found(),
            }
        }
        LegacyRoute::CreateSession => {
            let agent_id = body["agentId"].as_str().unwrap_or_default().to_string();
            if st.agents.get(&agent_id).is_none_or(|a| a.org != org) {
                return not_found();
            }
            st.next_id += 1;
            let session_id = format!("s-{}", st.next_id);
            st.sessions.insert(
                session_id.clone(),
                Session {
                    org,
                    agent_id,
                    title: body["title"].as_str().unwrap_or_default().to_string(),
                    messages: Vec::new(),
                },
            );
            ok(201, json!({"id": session_id}))
        }
        LegacyRoute::DeleteSession => {
            if st.sessions.get(&id).is_some_and(|s| s.org == org) {
                st.sessions.remove(&id);
                ok(200, json!({"id": id}))
            } else {
                not_found()
            }
        }
    }
}
