//! The conversation bridge without I/O: which legacy URLs a runtime chat reads and writes, what
//! legacy's answers mean, and the bodies saved back.
//!
//! The legacy API stays the system of record for sessions, agents and messages; the proxy talks
//! to it through its own REST routes (CONTRACT.md, "Runtime request and the conversation bridge").
//! Ids that go into a URL path are checked here first, so a crafted session id can never make the
//! proxy call another legacy route with the caller's token.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::core::config::BridgeConfig;
use crate::core::ids::is_safe_id;

/// An id refused by [`is_safe_id`]; it never reaches legacy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsafeId;

fn fill(template: &str, placeholder: &str, id: &str) -> Result<String, UnsafeId> {
    if is_safe_id(id) {
        Ok(template.replacen(placeholder, id, 1))
    } else {
        Err(UnsafeId)
    }
}

/// `GET`: the session, for its `agentId`.
pub fn session_url(cfg: &BridgeConfig, session_id: &str) -> Result<String, UnsafeId> {
    fill(&cfg.session_path, "{sessionId}", session_id)
}

/// `GET`: the agent, for its name, prompt and model settings.
pub fn agent_url(cfg: &BridgeConfig, agent_id: &str) -> Result<String, UnsafeId> {
    fill(&cfg.agent_path, "{agentId}", agent_id)
}

/// `GET` the history, `POST` a message.
pub fn messages_url(cfg: &BridgeConfig, session_id: &str) -> Result<String, UnsafeId> {
    fill(&cfg.messages_path, "{sessionId}", session_id)
}

/// `POST`: a new session, for `/chat/start`.
pub fn sessions_url(cfg: &BridgeConfig) -> String {
    cfg.sessions_path.clone()
}

/// `DELETE`: a session created for a `/chat/start` that then went to legacy.
pub fn session_delete_url(cfg: &BridgeConfig, session_id: &str) -> Result<String, UnsafeId> {
    if !is_safe_id(session_id) {
        return Err(UnsafeId);
    }
    Ok(format!(
        "{}/{session_id}",
        cfg.sessions_path.trim_end_matches('/')
    ))
}

/// One call the bridge makes; the `route` label of its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Session,
    Agent,
    Messages,
    SaveMessage,
    /// The session's messages read after a save whose outcome is unknown.
    ReadBack,
    CreateSession,
    DeleteSession,
}

impl Route {
    pub const ALL: [Route; 7] = [
        Route::Session,
        Route::Agent,
        Route::Messages,
        Route::SaveMessage,
        Route::ReadBack,
        Route::CreateSession,
        Route::DeleteSession,
    ];

    /// The HTTP method the route is called with.
    pub fn method(self) -> &'static str {
        match self {
            Route::Session | Route::Agent | Route::Messages | Route::ReadBack => "GET",
            Route::SaveMessage | Route::CreateSession => "POST",
            Route::DeleteSession => "DELETE",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Session => "session",
            Route::Agent => "agent",
            Route::Messages => "messages",
            Route::SaveMessage => "save_message",
            Route::ReadBack => "read_back",
            Route::CreateSession => "create_session",
            Route::DeleteSession => "delete_session",
        }
    }
}

/// What a legacy answer means for the chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Legacy said no (401, 403, 404, any other 4xx): the caller may not, or the thing is gone.
    Refused,
    /// Legacy could not answer (5xx, connect error, timeout, unusable body): not the caller's doing.
    Unavailable,
}

impl Verdict {
    /// By status alone; a 2xx whose body does not parse is still [`Verdict::Unavailable`].
    pub fn of_status(status: u16) -> Verdict {
        match status {
            200..=299 => Verdict::Ok,
            400..=499 => Verdict::Refused,
            _ => Verdict::Unavailable,
        }
    }
}

/// Why the bridge could not help; the chat then goes to legacy with its original body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BridgeError {
    /// `status` is `None` for an id the proxy refused itself (never sent to legacy).
    Refused {
        route: Route,
        status: Option<u16>,
        detail: String,
    },
    Unavailable {
        route: Route,
        detail: String,
    },
}

impl BridgeError {
    pub fn refused(route: Route, status: Option<u16>, detail: impl Into<String>) -> Self {
        BridgeError::Refused {
            route,
            status,
            detail: detail.into(),
        }
    }

    pub fn unavailable(route: Route, detail: impl Into<String>) -> Self {
        BridgeError::Unavailable {
            route,
            detail: detail.into(),
        }
    }

    /// The answer to a non-2xx status.
    pub fn from_status(route: Route, status: u16) -> Self {
        let detail = format!("legacy answered {status}");
        match Verdict::of_status(status) {
            Verdict::Refused => BridgeError::refused(route, Some(status), detail),
            _ => BridgeError::unavailable(route, detail),
        }
    }

    pub fn verdict(&self) -> Verdict {
        match self {
            BridgeError::Refused { .. } => Verdict::Refused,
            BridgeError::Unavailable { .. } => Verdict::Unavailable,
        }
    }

    pub fn route(&self) -> Route {
        match self {
            BridgeError::Refused { route, .. } | BridgeError::Unavailable { route, .. } => *route,
        }
    }

    /// The `x-execution-reason` of a chat the bridge sent to legacy.
    pub fn reason(&self) -> &'static str {
        match self {
            BridgeError::Refused { .. } => "bridge_refused",
            BridgeError::Unavailable { .. } => "bridge_unavailable",
        }
    }
}

impl fmt::Display for BridgeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BridgeError::Refused { route, detail, .. } => {
                write!(f, "{} refused: {detail}", route.as_str())
            }
            BridgeError::Unavailable { route, detail } => {
                write!(f, "{} unavailable: {detail}", route.as_str())
            }
        }
    }
}

impl std::error::Error for BridgeError {}

/// What an agent brings to a runtime execution.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentProfile {
    pub name: String,
    pub system_prompt: String,
    pub model: Option<String>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u64>,
}

/// One earlier message of the session, as the runtime takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryMessage {
    pub role: String,
    pub content: String,
}

/// Everything the runtime request needs from legacy.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    pub agent_id: String,
    pub agent: AgentProfile,
    /// The session's saved messages, oldest first: at most `history_limit − 1`, since the
    /// runtime request adds the current message as the last entry.
    pub history: Vec<HistoryMessage>,
    /// Id of the last message the session held when the chat began (any kind, history or not):
    /// what this chat saves comes after it, which is how a read-back tells this chat's message
    /// from an identical earlier one. `None` for an empty or new session.
    pub last_message_id: Option<String>,
}

/// The session's messages as read before a chat: the history and where the session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    pub messages: Vec<HistoryMessage>,
    pub last_message_id: Option<String>,
}

/// A 2xx answer that is not the shape the contract gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadAnswer(pub String);

impl fmt::Display for BadAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unexpected legacy answer: {}", self.0)
    }
}

/// `data` of a `{"success":true,"data":...}` answer.
fn data(body: &[u8]) -> Result<Value, BadAnswer> {
    let mut v: Value =
        serde_json::from_slice(body).map_err(|e| BadAnswer(format!("not JSON: {e}")))?;
    if v.get("success") != Some(&Value::Bool(true)) {
        return Err(BadAnswer("no \"success\": true".into()));
    }
    match v.get_mut("data") {
        Some(d) => Ok(d.take()),
        None => Err(BadAnswer("no \"data\"".into())),
    }
}

/// An id as legacy writes it: a string, or a number some databases hand out.
fn id_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The session's `agentId`. An id that could not go into the agent URL is a bad answer: the
/// proxy cannot look it up, and neither it nor the runtime can serve the chat.
pub fn parse_session(body: &[u8]) -> Result<String, BadAnswer> {
    let d = data(body)?;
    let agent = id_of(d.get("agentId")).ok_or_else(|| BadAnswer("no data.agentId".into()))?;
    if !is_safe_id(&agent) {
        return Err(BadAnswer(format!(
            "data.agentId {agent:?} is not a safe id"
        )));
    }
    Ok(agent)
}

/// The agent's name, prompt and `config.{model,temperature,maxTokens}`; `config` may be an object
/// or a JSON string holding one (the legacy database stores it as text). Settings of the wrong
/// type are left to their defaults rather than refusing the chat.
pub fn parse_agent(body: &[u8]) -> Result<AgentProfile, BadAnswer> {
    let d = data(body)?;
    if !d.is_object() {
        return Err(BadAnswer("data is not an object".into()));
    }
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    let config = match d.get("config") {
        Some(Value::String(s)) => serde_json::from_str::<Value>(s).unwrap_or(Value::Null),
        Some(v) => v.clone(),
        None => Value::Null,
    };
    Ok(AgentProfile {
        name: text(d.get("name")),
        system_prompt: text(d.get("systemPrompt")),
        model: config
            .get("model")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
            .map(str::to_string),
        temperature: config
            .get("temperature")
            .and_then(Value::as_f64)
            .filter(|t| t.is_finite()),
        max_tokens: config
            .get("maxTokens")
            .and_then(Value::as_u64)
            .filter(|n| *n > 0),
    })
}

/// The session's messages, oldest first as legacy lists them, keeping the last `keep` (the
/// runtime request's `history_limit − 1`: the current message is its last entry). Entries
/// without a string role and content (attachments, tool records) are not history the runtime
/// can take, and are skipped; the last entry's id is kept whatever it is.
pub fn parse_messages(body: &[u8], keep: usize) -> Result<History, BadAnswer> {
    let items = message_list(body)?;
    let last_message_id = items.last().and_then(|m| id_of(m.get("id")));
    let mut messages: Vec<HistoryMessage> = items
        .iter()
        .filter_map(|m| {
            Some(HistoryMessage {
                role: m.get("role")?.as_str()?.to_string(),
                content: m.get("content")?.as_str()?.to_string(),
            })
        })
        .collect();
    let skip = messages.len().saturating_sub(keep);
    messages.drain(..skip);
    Ok(History {
        messages,
        last_message_id,
    })
}

fn message_list(body: &[u8]) -> Result<Vec<Value>, BadAnswer> {
    match data(body)? {
        Value::Array(items) => Ok(items),
        _ => Err(BadAnswer("data is not an array".into())),
    }
}

/// A message being saved, as a read-back recognises it in the session's list.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedShape {
    pub role: &'static str,
    pub content: String,
    pub parent_id: Option<String>,
    /// The metadata sent with it; a listed message must carry each of these keys with the same
    /// value (legacy may add its own). An answer's `latencyMs` tells two identical answers apart.
    pub metadata: serde_json::Map<String, Value>,
}

impl SavedShape {
    /// The user's message: `{role:"user", content, parentId?}`.
    pub fn user(content: &str, parent_id: Option<&str>) -> SavedShape {
        SavedShape {
            role: "user",
            content: content.to_string(),
            parent_id: parent_id.map(str::to_string),
            metadata: serde_json::Map::new(),
        }
    }

    /// `POST messages_path`: role, content, then `parentId` and `metadata` when there are any.
    pub fn body(&self) -> Vec<u8> {
        let mut v = serde_json::json!({"role": self.role, "content": self.content});
        if let Some(p) = &self.parent_id {
            v["parentId"] = Value::String(p.clone());
        }
        if !self.metadata.is_empty() {
            v["metadata"] = Value::Object(self.metadata.clone());
        }
        serde_json::to_vec(&v).expect("strings and numbers serialise")
    }

    fn matches(&self, m: &Value) -> bool {
        let text = |k: &str| m.get(k).and_then(Value::as_str);
        let parent = m.get("parentId").and_then(|p| match p {
            Value::Null => None,
            p => Some(id_of(Some(p))),
        });
        text("role") == Some(self.role)
            && text("content") == Some(self.content.as_str())
            && parent.flatten() == self.parent_id
            && self
                .metadata
                .iter()
                .all(|(k, v)| m.get("metadata").and_then(|md| md.get(k)) == Some(v))
    }
}

/// Whether a save whose outcome is unknown (its answer never came) reached legacy: the id of a
/// message of `shape` listed after `after` (the session's last message when the chat began; all
/// of them when `None`, or when that message is no longer listed), or `None`.
///
/// The rule, for legacy's routes have no idempotency key: a message counts as this chat's when
/// it has the same role, content and parent (and metadata, for an answer) and came after the
/// chat began. An identical message sent twice in a row is therefore two messages: the earlier
/// one is before the anchor. Two chats running at once in the same session that save identical
/// messages could each take the other's for its own; a chat saves one message of each role.
pub fn find_saved(
    body: &[u8],
    shape: &SavedShape,
    after: Option<&str>,
) -> Result<ReadBack, BadAnswer> {
    let items = message_list(body)?;
    let start = after
        .and_then(|anchor| {
            items
                .iter()
                .rposition(|m| id_of(m.get("id")).as_deref() == Some(anchor))
        })
        .map_or(0, |i| i + 1);
    Ok(match items[start..].iter().find(|m| shape.matches(m)) {
        Some(m) => ReadBack::Saved(id_of(m.get("id"))),
        None => ReadBack::Absent,
    })
}

/// What a read-back found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadBack {
    /// Not there: the save must be made (again).
    Absent,
    /// There, under this id (`None`: legacy listed it without one).
    Saved(Option<String>),
}

/// `data.id` of a created session or message.
pub fn parse_created_id(body: &[u8]) -> Result<String, BadAnswer> {
    id_of(data(body)?.get("id")).ok_or_else(|| BadAnswer("no data.id".into()))
}

/// Characters of the message that title a session created for `/chat/start`.
pub const TITLE_CHARS: usize = 50;

/// `POST sessions_path`.
pub fn new_session_body(agent_id: &str, message: &str) -> Vec<u8> {
    let title: String = message.chars().take(TITLE_CHARS).collect();
    serde_json::to_vec(&serde_json::json!({"agentId": agent_id, "title": title}))
        .expect("strings serialise")
}

/// `POST messages_path` for the user's message, at the commit point.
pub fn user_message_body(content: &str, parent_id: Option<&str>) -> Vec<u8> {
    SavedShape::user(content, parent_id).body()
}

/// The runtime's answer, saved when `execution_complete` arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssistantMessage {
    pub content: String,
    pub tokens_used: Option<u64>,
    pub latency_ms: u64,
}

impl AssistantMessage {
    /// `final_response`, or the streamed text when the runtime left it empty.
    pub fn new(
        final_response: &str,
        streamed: &str,
        tokens_used: Option<u64>,
        latency_ms: u64,
    ) -> Self {
        let content = if final_response.is_empty() {
            streamed
        } else {
            final_response
        };
        AssistantMessage {
            content: content.to_string(),
            tokens_used,
            latency_ms,
        }
    }

    /// What is saved, and recognised by a read-back.
    pub fn shape(&self) -> SavedShape {
        let mut metadata = serde_json::Map::new();
        metadata.insert("executionMode".into(), "runtime_orchestrator".into());
        metadata.insert("latencyMs".into(), self.latency_ms.into());
        if let Some(t) = self.tokens_used {
            metadata.insert("tokensUsed".into(), t.into());
        }
        SavedShape {
            role: "assistant",
            content: self.content.clone(),
            parent_id: None,
            metadata,
        }
    }

    /// `POST messages_path`.
    pub fn body(&self) -> Vec<u8> {
        self.shape().body()
    }
}

/// A cache key that is only ever served back to the same caller: legacy scopes sessions and
/// agents by org (and may by user), so an entry one caller was allowed to read must not answer
/// another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScopedId {
    pub org: String,
    pub user: Option<String>,
    pub id: String,
}

struct Entry<V> {
    value: V,
    stored: Instant,
    seq: u64,
}

/// A bounded cache whose entries expire `ttl` after they were stored; when full, the oldest
/// stored goes first. The clock is the caller's (`now` on every call), so expiry is tested
/// without waiting.
pub struct TtlCache<K, V> {
    entries: HashMap<K, Entry<V>>,
    /// Store order; an element whose `seq` no longer matches its entry is stale and skipped.
    order: VecDeque<(K, u64)>,
    next_seq: u64,
    capacity: usize,
    ttl: Duration,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        TtlCache {
            entries: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            capacity,
            ttl,
        }
    }

    /// Take a reloaded config's limits; shrinking evicts at once.
    pub fn configure(&mut self, capacity: usize, ttl: Duration) {
        self.capacity = capacity;
        self.ttl = ttl;
        self.evict_over_capacity();
    }

    /// A fresh entry's value; an expired one is dropped.
    pub fn get(&mut self, key: &K, now: Instant) -> Option<V> {
        let entry = self.entries.get(key)?;
        if now.saturating_duration_since(entry.stored) < self.ttl {
            return Some(entry.value.clone());
        }
        self.entries.remove(key);
        None
    }

    pub fn insert(&mut self, key: K, value: V, now: Instant) {
        if self.ttl.is_zero() || self.capacity == 0 {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.push_back((key.clone(), seq));
        self.entries.insert(
            key,
            Entry {
                value,
                stored: now,
                seq,
            },
        );
        self.evict_over_capacity();
        // Re-stored keys leave stale elements behind; drop them before they outnumber the live.
        if self.order.len() > 2 * self.capacity.max(8) {
            let entries = &self.entries;
            self.order
                .retain(|(k, s)| entries.get(k).is_some_and(|e| e.seq == *s));
        }
    }

    pub fn remove(&mut self, key: &K) {
        self.entries.remove(key);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn evict_over_capacity(&mut self) {
        while self.entries.len() > self.capacity {
            let Some((key, seq)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&key).is_some_and(|e| e.seq == seq) {
                self.entries.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn cfg() -> BridgeConfig {
        BridgeConfig::default()
    }

    fn ok(data: Value) -> Vec<u8> {
        json!({"success": true, "data": data})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn urls_fill_the_templates() {
        let c = cfg();
        assert_eq!(session_url(&c, "s1").unwrap(), "/api/v1/sessions/s1");
        assert_eq!(agent_url(&c, "ag-1").unwrap(), "/api/v1/agents/ag-1");
        assert_eq!(
            messages_url(&c, "s1").unwrap(),
            "/api/v1/sessions/s1/messages"
        );
        assert_eq!(sessions_url(&c), "/api/v1/sessions");
        assert_eq!(session_delete_url(&c, "s1").unwrap(), "/api/v1/sessions/s1");
        let custom = BridgeConfig {
            sessions_path: "/v2/conversations/".into(),
            ..cfg()
        };
        assert_eq!(
            session_delete_url(&custom, "c9").unwrap(),
            "/v2/conversations/c9"
        );
    }

    #[test]
    fn unsafe_ids_make_no_url() {
        let c = cfg();
        for bad in ["..", "a%2Fb", "%2F..%2F..%2Fadmin", "", "x/../../admin"] {
            assert_eq!(session_url(&c, bad), Err(UnsafeId));
            assert_eq!(agent_url(&c, bad), Err(UnsafeId));
            assert_eq!(messages_url(&c, bad), Err(UnsafeId));
            assert_eq!(session_delete_url(&c, bad), Err(UnsafeId));
        }
    }

    #[test]
    fn statuses_are_classified() {
        assert_eq!(Verdict::of_status(200), Verdict::Ok);
        assert_eq!(Verdict::of_status(201), Verdict::Ok);
        for s in [400, 401, 403, 404, 409, 422, 429, 499] {
            assert_eq!(Verdict::of_status(s), Verdict::Refused, "{s}");
        }
        for s in [0, 101, 302, 500, 502, 503, 504, 599] {
            assert_eq!(Verdict::of_status(s), Verdict::Unavailable, "{s}");
        }
        let e = BridgeError::from_status(Route::Session, 404);
        assert_eq!(e.verdict(), Verdict::Refused);
        assert_eq!(e.reason(), "bridge_refused");
        assert_eq!(e.route(), Route::Session);
        let e = BridgeError::from_status(Route::Agent, 503);
        assert_eq!(e.reason(), "bridge_unavailable");
        assert!(e.to_string().contains("agent unavailable"), "{e}");
    }

    #[test]
    fn session_answer_gives_the_agent_id() {
        let body = ok(json!({"id": "s1", "agentId": "ag-1", "title": "t"}));
        assert_eq!(parse_session(&body).unwrap(), "ag-1");
        assert_eq!(parse_session(&ok(json!({"agentId": 42}))).unwrap(), "42");
        for bad in [
            ok(json!({"id": "s1"})),
            ok(json!({"agentId": ""})),
            ok(json!({"agentId": "../admin"})),
            ok(json!(null)),
            json!({"success": false, "error": {"code": "X", "message": "m"}})
                .to_string()
                .into_bytes(),
            json!({"data": {"agentId": "a"}}).to_string().into_bytes(),
            b"<html>".to_vec(),
            Vec::new(),
        ] {
            assert!(
                parse_session(&bad).is_err(),
                "{}",
                String::from_utf8_lossy(&bad)
            );
        }
    }

    #[test]
    fn agent_config_may_be_an_object_or_a_json_string() {
        let object = ok(json!({
            "name": "Helper", "systemPrompt": "Be brief.",
            "config": {"model": "gpt-4o", "temperature": 0.2, "maxTokens": 1000}
        }));
        let string = ok(json!({
            "name": "Helper", "systemPrompt": "Be brief.",
            "config": "{\"model\":\"gpt-4o\",\"temperature\":0.2,\"maxTokens\":1000}"
        }));
        let want = AgentProfile {
            name: "Helper".into(),
            system_prompt: "Be brief.".into(),
            model: Some("gpt-4o".into()),
            temperature: Some(0.2),
            max_tokens: Some(1000),
        };
        assert_eq!(parse_agent(&object).unwrap(), want);
        assert_eq!(parse_agent(&string).unwrap(), want);
    }

    #[test]
    fn agent_settings_of_the_wrong_shape_are_defaults() {
        for config in [
            json!(null),
            json!("not json"),
            json!("[1]"),
            json!({"model": 5, "temperature": "hot", "maxTokens": -1}),
            json!({"model": "", "maxTokens": 0}),
        ] {
            let a = parse_agent(&ok(json!({"name": "N", "config": config}))).unwrap();
            assert_eq!(a.name, "N");
            assert_eq!(a.system_prompt, "");
            assert_eq!((a.model, a.temperature, a.max_tokens), (None, None, None));
        }
        let a = parse_agent(&ok(json!({}))).unwrap();
        assert_eq!(a.name, "");
        assert!(parse_agent(&ok(json!([]))).is_err());
        assert!(parse_agent(b"{").is_err());
    }

    #[test]
    fn messages_keep_the_last_ones_oldest_first() {
        let items: Vec<Value> = (0..30)
            .map(|i| {
                json!({"id": i, "role": if i % 2 == 0 {"user"} else {"assistant"},
                       "content": format!("m{i}"), "createdAt": "x"})
            })
            .collect();
        let h = parse_messages(&ok(Value::Array(items)), 20).unwrap();
        assert_eq!(h.last_message_id.as_deref(), Some("29"));
        let h = h.messages;
        assert_eq!(h.len(), 20);
        assert_eq!(h[0].content, "m10");
        assert_eq!(h[0].role, "user");
        assert_eq!(h[19].content, "m29");
        assert_eq!(h[19].role, "assistant");
        let h = parse_messages(
            &ok(json!([{"role": "user", "content": "a"},
                       {"role": "user"},
                       {"role": "assistant", "content": {"parts": []}},
                       {"role": "assistant", "content": "b"}])),
            20,
        )
        .unwrap();
        assert_eq!(h.last_message_id, None, "the last entry has no id");
        assert_eq!(
            h.messages,
            [
                HistoryMessage {
                    role: "user".into(),
                    content: "a".into()
                },
                HistoryMessage {
                    role: "assistant".into(),
                    content: "b".into()
                }
            ]
        );
        assert!(parse_messages(&ok(json!({"messages": []})), 20).is_err());
        let empty = parse_messages(&ok(json!([])), 20).unwrap();
        assert!(empty.messages.is_empty() && empty.last_message_id.is_none());
        // An attachment the history skips still marks where the session ended.
        let h = parse_messages(
            &ok(
                json!([{"id": "m1", "role": "user", "content": "a"}, {"id": "m2", "role": "tool"}]),
            ),
            0,
        )
        .unwrap();
        assert!(h.messages.is_empty());
        assert_eq!(h.last_message_id.as_deref(), Some("m2"));
    }

    #[test]
    fn created_ids_are_read() {
        assert_eq!(parse_created_id(&ok(json!({"id": "m-1"}))).unwrap(), "m-1");
        assert_eq!(parse_created_id(&ok(json!({"id": 7}))).unwrap(), "7");
        assert!(parse_created_id(&ok(json!({}))).is_err());
        assert!(parse_created_id(&ok(json!({"id": null}))).is_err());
    }

    #[test]
    fn bodies_to_save_are_the_contract_s() {
        let v: Value = serde_json::from_slice(&user_message_body("hi", Some("m0"))).unwrap();
        assert_eq!(
            v,
            json!({"role": "user", "content": "hi", "parentId": "m0"})
        );
        let v: Value = serde_json::from_slice(&user_message_body("hi", None)).unwrap();
        assert_eq!(v, json!({"role": "user", "content": "hi"}));

        let m = AssistantMessage::new("final", "streamed", Some(12), 340);
        let v: Value = serde_json::from_slice(&m.body()).unwrap();
        assert_eq!(
            v,
            json!({"role": "assistant", "content": "final", "metadata":
                   {"executionMode": "runtime_orchestrator", "tokensUsed": 12, "latencyMs": 340}})
        );
        let m = AssistantMessage::new("", "streamed", None, 5);
        let v: Value = serde_json::from_slice(&m.body()).unwrap();
        assert_eq!(
            v,
            json!({"role": "assistant", "content": "streamed", "metadata":
                   {"executionMode": "runtime_orchestrator", "latencyMs": 5}})
        );
    }

    #[test]
    fn new_session_title_is_the_first_50_characters() {
        let message: String = "你好世界🌍".repeat(20);
        let v: Value = serde_json::from_slice(&new_session_body("ag", &message)).unwrap();
        assert_eq!(v["agentId"], "ag");
        let title = v["title"].as_str().unwrap();
        assert_eq!(title.chars().count(), 50);
        assert!(message.starts_with(title));
        let v: Value = serde_json::from_slice(&new_session_body("ag", "short")).unwrap();
        assert_eq!(v, json!({"agentId": "ag", "title": "short"}));
    }

    fn key(id: &str) -> ScopedId {
        ScopedId {
            org: "o".into(),
            user: None,
            id: id.into(),
        }
    }

    #[test]
    fn cache_entries_expire_after_ttl() {
        let t0 = Instant::now();
        let mut c = TtlCache::new(10, Duration::from_secs(30));
        c.insert(key("a"), 1, t0);
        assert_eq!(c.get(&key("a"), t0 + Duration::from_secs(29)), Some(1));
        assert_eq!(c.get(&key("a"), t0 + Duration::from_secs(30)), None);
        assert!(c.is_empty(), "an expired entry is dropped");
    }

    #[test]
    fn cache_is_scoped_by_caller() {
        let t0 = Instant::now();
        let mut c = TtlCache::new(10, Duration::from_secs(30));
        c.insert(key("s"), "ag".to_string(), t0);
        let other_org = ScopedId {
            org: "p".into(),
            ..key("s")
        };
        let other_user = ScopedId {
            user: Some("u2".into()),
            ..key("s")
        };
        assert_eq!(c.get(&other_org, t0), None);
        assert_eq!(c.get(&other_user, t0), None);
        assert_eq!(c.get(&key("s"), t0).as_deref(), Some("ag"));
    }

    #[test]
    fn full_cache_drops_the_oldest_stored() {
        let t0 = Instant::now();
        let mut c = TtlCache::new(2, Duration::from_secs(30));
        c.insert(key("a"), 1, t0);
        c.insert(key("b"), 2, t0);
        c.insert(key("a"), 3, t0); // re-stored: now newer than b
        c.insert(key("c"), 4, t0);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&key("b"), t0), None);
        assert_eq!(c.get(&key("a"), t0), Some(3));
        assert_eq!(c.get(&key("c"), t0), Some(4));
        c.configure(1, Duration::from_secs(30));
        assert_eq!(c.len(), 1);
        assert_eq!(c.get(&key("c"), t0), Some(4));
    }

    #[test]
    fn zero_ttl_caches_nothing() {
        let t0 = Instant::now();
        let mut c = TtlCache::new(10, Duration::ZERO);
        c.insert(key("a"), 1, t0);
        assert_eq!(c.get(&key("a"), t0), None);
        assert!(c.is_empty());
    }

    fn listed(items: Value) -> Vec<u8> {
        ok(items)
    }

    #[test]
    fn a_read_back_finds_the_message_after_the_chat_began() {
        let user = SavedShape::user("again", Some("p1"));
        // The same text sent twice in a row: the earlier one is before the anchor.
        let before = json!([
            {"id": "m1", "role": "user", "content": "again", "parentId": "p1"},
            {"id": "m2", "role": "assistant", "content": "ok"},
        ]);
        assert_eq!(
            find_saved(&listed(before.clone()), &user, Some("m2")).unwrap(),
            ReadBack::Absent
        );
        let mut after = before.as_array().unwrap().clone();
        after.push(
            json!({"id": "m3", "role": "user", "content": "again", "parentId": "p1",
                          "createdAt": "t"}),
        );
        let after = Value::Array(after);
        assert_eq!(
            find_saved(&listed(after.clone()), &user, Some("m2")).unwrap(),
            ReadBack::Saved(Some("m3".into()))
        );
        // No anchor (a new or empty session): every message counts.
        assert_eq!(
            find_saved(&listed(before.clone()), &user, None).unwrap(),
            ReadBack::Saved(Some("m1".into()))
        );
        // Another parent, or none, is another message.
        for other in [
            SavedShape::user("again", None),
            SavedShape::user("again", Some("p2")),
        ] {
            assert_eq!(
                find_saved(&listed(after.clone()), &other, Some("m2")).unwrap(),
                ReadBack::Absent
            );
        }
        assert!(find_saved(&listed(json!({})), &user, None).is_err());
    }

    #[test]
    fn a_read_back_tells_identical_answers_apart_by_their_metadata() {
        let answer = AssistantMessage::new("same", "", Some(3), 120).shape();
        let other = json!({"id": "a1", "role": "assistant", "content": "same", "metadata":
                           {"executionMode": "runtime_orchestrator", "latencyMs": 95, "tokensUsed": 3}});
        let ours = json!({"id": "a2", "role": "assistant", "content": "same", "parentId": null,
                          "metadata": {"executionMode": "runtime_orchestrator", "latencyMs": 120,
                                       "tokensUsed": 3, "addedByLegacy": true}});
        assert_eq!(
            find_saved(&listed(json!([other.clone()])), &answer, None).unwrap(),
            ReadBack::Absent
        );
        assert_eq!(
            find_saved(&listed(json!([other, ours])), &answer, None).unwrap(),
            ReadBack::Saved(Some("a2".into()))
        );
        let no_id = json!([{"role": "user", "content": "x"}]);
        assert_eq!(
            find_saved(&listed(no_id), &SavedShape::user("x", None), None).unwrap(),
            ReadBack::Saved(None)
        );
    }

    proptest! {
        #[test]
        fn any_string_that_passes_is_one_path_segment(id in "\\PC{0,140}") {
            if let Ok(url) = session_url(&cfg(), &id) {
                prop_assert_eq!(url.matches('/').count(), 4);
                prop_assert!(!id.contains(['.', '%', '/']));
                prop_assert!(url.parse::<http::uri::PathAndQuery>().is_ok());
            }
        }

        #[test]
        fn safe_charset_ids_always_pass(id in "[A-Za-z0-9_-]{1,128}") {
            prop_assert!(is_safe_id(&id));
            let url = agent_url(&cfg(), &id).unwrap();
            prop_assert_eq!(url, format!("/api/v1/agents/{id}"));
        }

        #[test]
        fn history_is_the_last_limit_in_order(n in 0usize..60, limit in 1usize..40) {
            let items: Vec<Value> =
                (0..n).map(|i| json!({"role": "user", "content": i.to_string()})).collect();
            let h = parse_messages(&ok(Value::Array(items)), limit).unwrap().messages;
            prop_assert_eq!(h.len(), n.min(limit));
            for (j, m) in h.iter().enumerate() {
                prop_assert_eq!(&m.content, &(n - h.len() + j).to_string());
            }
        }

        #[test]
        fn cache_never_exceeds_capacity_and_serves_only_fresh(
            ops in proptest::collection::vec((0u8..16, 0u64..100), 1..200),
            capacity in 1usize..8,
        ) {
            let t0 = Instant::now();
            let ttl = Duration::from_secs(10);
            let mut c = TtlCache::new(capacity, ttl);
            let mut stored: HashMap<u8, (u64, u64)> = HashMap::new();
            for (i, (k, at)) in ops.iter().enumerate() {
                let now = t0 + Duration::from_secs(*at);
                let id = ScopedId { org: "o".into(), user: None, id: k.to_string() };
                if i % 3 == 0 {
                    if let Some(v) = c.get(&id, now) {
                        let (value, when) = stored[k];
                        prop_assert_eq!(v, value);
                        prop_assert!(*at < when + 10 || *at < when);
                    }
                } else {
                    c.insert(id, i as u64, now);
                    stored.insert(*k, (i as u64, *at));
                }
                prop_assert!(c.len() <= capacity);
            }
        }
    }
}
