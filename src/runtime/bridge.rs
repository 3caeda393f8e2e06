//! The conversation bridge's calls to legacy: the lookups before a runtime execution and the
//! writes around it, each with the caller's own `Authorization` so legacy applies its permissions.
//!
//! Every call is one HTTP/1.1 request through legacy's client (`upstream::Upstream`, under
//! legacy's own deadlines), bounded as a whole by `bridge.timeout_ms`; what an answer means is
//! decided in `core::bridge`. A
//! session's agent id and an agent's settings are cached per caller; history never is.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::core::bridge::{
    self, AgentProfile, AssistantMessage, BadAnswer, BridgeError, Conversation, Route, ScopedId,
    TtlCache, Verdict,
};
use crate::core::config::{BridgeConfig, Config};
use crate::core::h1;
use crate::core::identity::Caller;
use crate::ops::metrics::BridgeMetrics;
use crate::upstream::{Call, Tcp, TimeoutCounters, Timeouts, Upstream, UpstreamName};

/// Marks the proxy's own calls, so legacy (and its logs) can tell them from the browser's.
pub const BRIDGE_HEADER: &str = "x-cutover-bridge";
/// Larger legacy answers are refused rather than buffered (a history of `history_limit`
/// messages is far below this).
const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;
/// Attempts to save an assistant message, the first included.
pub const PERSIST_ATTEMPTS: u32 = 3;
/// Wait before the second attempt; doubled before each later one.
const RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// Where legacy is and how the bridge talks to it: one request's config snapshot.
#[derive(Debug, Clone)]
pub struct Target {
    pub address: String,
    pub timeouts: Timeouts,
    pub config: BridgeConfig,
}

impl Target {
    pub fn of(config: &Config) -> Target {
        Target {
            address: config.legacy.address.clone(),
            timeouts: Timeouts::legacy(config),
            config: config.bridge.clone(),
        }
    }
}

/// Who a call is made for: the caller's own headers, and the scope cache entries belong to.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The caller's `Authorization` header value, passed as is.
    pub authorization: String,
    pub request_id: Option<String>,
    pub org: String,
    pub user: Option<String>,
}

impl Credentials {
    pub fn new(authorization: &str, request_id: Option<&str>, caller: &Caller) -> Credentials {
        Credentials {
            authorization: authorization.to_string(),
            request_id: request_id.map(str::to_string),
            org: caller.org_id.clone(),
            user: caller.user_id.clone(),
        }
    }

    fn scoped(&self, id: &str) -> ScopedId {
        ScopedId {
            org: self.org.clone(),
            user: self.user.clone(),
            id: id.to_string(),
        }
    }
}

/// The outcome of saving an assistant message.
#[derive(Debug)]
pub enum Persisted {
    /// Legacy saved it under this id.
    Saved(String),
    /// The first attempt failed: `message_id` is the proxy's own, for `done.messageId`, and
    /// `retry` makes the remaining attempts (awaiting it is optional; it runs detached).
    Deferred {
        message_id: String,
        retry: JoinHandle<Result<String, BridgeError>>,
    },
}

/// A message being saved, as the last error line gives it.
struct Unsaved {
    role: &'static str,
    content: String,
    tokens_used: Option<u64>,
    latency_ms: Option<u64>,
}

/// The bridge's cache, and legacy's client it calls through; one per process.
pub struct Bridge {
    legacy: Arc<Upstream>,
    sessions: Mutex<TtlCache<ScopedId, String>>,
    agents: Mutex<TtlCache<ScopedId, AgentProfile>>,
    metrics: &'static BridgeMetrics,
    retry_backoff: Duration,
}

impl Bridge {
    /// A bridge with a legacy client of its own (its timeouts counted nowhere); the proxy's
    /// shares legacy's client ([`Bridge::calling`]).
    pub fn new(config: &BridgeConfig, metrics: &'static BridgeMetrics) -> Bridge {
        let ttl = Duration::from_millis(config.cache_ttl_ms);
        let counters = TimeoutCounters::unregistered(UpstreamName::Legacy);
        Bridge {
            legacy: Arc::new(Upstream::new(Tcp, counters)),
            sessions: Mutex::new(TtlCache::new(config.cache_entries, ttl)),
            agents: Mutex::new(TtlCache::new(config.cache_entries, ttl)),
            metrics,
            retry_backoff: RETRY_BACKOFF,
        }
    }

    /// Call legacy through `legacy`: its pool, and its timeouts counted with the proxy's.
    pub fn calling(mut self, legacy: Arc<Upstream>) -> Bridge {
        self.legacy = legacy;
        self
    }

    /// The wait before the second save attempt (doubled before each later one).
    pub fn with_retry_backoff(mut self, backoff: Duration) -> Bridge {
        self.retry_backoff = backoff;
        self
    }

    /// Take a reloaded config's cache limits.
    pub fn configure(&self, config: &BridgeConfig) {
        let ttl = Duration::from_millis(config.cache_ttl_ms);
        self.sessions
            .lock()
            .unwrap()
            .configure(config.cache_entries, ttl);
        self.agents
            .lock()
            .unwrap()
            .configure(config.cache_entries, ttl);
        self.update_cache_gauges();
    }

    /// Before a runtime execution on `POST /chat/sessions/{id}`: the session's agent, then the
    /// agent's settings and the history at once.
    pub async fn lookup_session(
        &self,
        target: &Target,
        who: &Credentials,
        session_id: &str,
    ) -> Result<Conversation, BridgeError> {
        let agent_id = self.session_agent(target, who, session_id).await?;
        let (agent, history) = tokio::join!(
            self.agent(target, who, &agent_id),
            self.history(target, who, session_id)
        );
        Ok(Conversation {
            agent_id,
            agent: agent?,
            history: history?,
        })
    }

    /// Before a runtime execution on `POST /chat/start`: the body's agent; a new session has
    /// no history.
    pub async fn lookup_start(
        &self,
        target: &Target,
        who: &Credentials,
        agent_id: &str,
    ) -> Result<Conversation, BridgeError> {
        let agent = self.agent(target, who, agent_id).await?;
        Ok(Conversation {
            agent_id: agent_id.to_string(),
            agent,
            history: Vec::new(),
        })
    }

    /// `POST sessions_path {agentId, title}`; the new session's id.
    pub async fn create_session(
        &self,
        target: &Target,
        who: &Credentials,
        agent_id: &str,
        message: &str,
    ) -> Result<String, BridgeError> {
        let route = Route::CreateSession;
        if !bridge::is_safe_id(agent_id) {
            return Err(self.invalid_id(route));
        }
        let body = bridge::new_session_body(agent_id, message);
        let path = bridge::sessions_url(&target.config);
        let id = self
            .call(
                target,
                who,
                route,
                "POST",
                &path,
                Some(&body),
                bridge::parse_created_id,
            )
            .await?;
        if !bridge::is_safe_id(&id) {
            // It would be put into later URLs (messages, delete) and into the client's sessionId.
            return Err(BridgeError::unavailable(
                route,
                format!("new session id {id:?} is not a safe id"),
            ));
        }
        Ok(id)
    }

    /// `DELETE sessions_path/{id}`: the session made for a `/chat/start` that went to legacy.
    pub async fn delete_session(
        &self,
        target: &Target,
        who: &Credentials,
        session_id: &str,
    ) -> Result<(), BridgeError> {
        let route = Route::DeleteSession;
        let path = bridge::session_delete_url(&target.config, session_id)
            .map_err(|_| self.invalid_id(route))?;
        self.call(target, who, route, "DELETE", &path, None, |_| Ok(()))
            .await
    }

    /// `POST messages_path` with a body from `core::bridge` (user or assistant message); the
    /// saved message's id.
    pub async fn save_message(
        &self,
        target: &Target,
        who: &Credentials,
        session_id: &str,
        body: &[u8],
    ) -> Result<String, BridgeError> {
        let route = Route::SaveMessage;
        let path =
            bridge::messages_url(&target.config, session_id).map_err(|_| self.invalid_id(route))?;
        self.call(
            target,
            who,
            route,
            "POST",
            &path,
            Some(body),
            bridge::parse_created_id,
        )
        .await
    }

    /// Save the runtime's answer: one attempt now, within `timeout_ms`; if it fails, the rest in
    /// the background with backoff, and after the last an error line holding the whole message
    /// and `cutover_bridge_persist_failures_total`. Nothing is lost silently.
    pub async fn persist_assistant(
        self: &Arc<Self>,
        target: &Target,
        who: &Credentials,
        session_id: &str,
        message: AssistantMessage,
    ) -> Persisted {
        let body = message.body();
        let unsaved = Unsaved {
            role: "assistant",
            content: message.content,
            tokens_used: message.tokens_used,
            latency_ms: Some(message.latency_ms),
        };
        self.persist(target, who, session_id, body, unsaved).await
    }

    /// Save the user's message (`parentId` when the chat names one) the same way: one attempt
    /// now, the rest in the background.
    pub async fn persist_user(
        self: &Arc<Self>,
        target: &Target,
        who: &Credentials,
        session_id: &str,
        content: &str,
        parent_id: Option<&str>,
    ) -> Persisted {
        let body = bridge::user_message_body(content, parent_id);
        let unsaved = Unsaved {
            role: "user",
            content: content.to_string(),
            tokens_used: None,
            latency_ms: None,
        };
        self.persist(target, who, session_id, body, unsaved).await
    }

    async fn persist(
        self: &Arc<Self>,
        target: &Target,
        who: &Credentials,
        session_id: &str,
        body: Vec<u8>,
        message: Unsaved,
    ) -> Persisted {
        let first = match self.save_message(target, who, session_id, &body).await {
            Ok(id) => return Persisted::Saved(id),
            Err(e) => e,
        };
        let message_id = uuid::Uuid::new_v4().to_string();
        tracing::warn!(
            session_id,
            role = message.role,
            proxy_message_id = %message_id,
            error = %first,
            "saving a message failed; retrying in the background"
        );
        let (this, target, who) = (self.clone(), target.clone(), who.clone());
        let session_id = session_id.to_string();
        let retry = tokio::spawn(async move {
            let mut last = first;
            let mut backoff = this.retry_backoff;
            for _ in 1..PERSIST_ATTEMPTS {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                match this.save_message(&target, &who, &session_id, &body).await {
                    Ok(id) => return Ok(id),
                    // A session another request deleted, or a caller whose rights changed, will not
                    // accept it on a later attempt either.
                    Err(e @ BridgeError::Refused { .. }) => {
                        last = e;
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            this.metrics.persist_failures_total.inc();
            tracing::error!(
                session_id = %session_id,
                role = message.role,
                content = %message.content,
                tokens_used = message.tokens_used,
                latency_ms = message.latency_ms,
                request_id = who.request_id.as_deref().unwrap_or(""),
                error = %last,
                "message not saved after every attempt"
            );
            Err(last)
        });
        Persisted::Deferred { message_id, retry }
    }

    async fn session_agent(
        &self,
        target: &Target,
        who: &Credentials,
        session_id: &str,
    ) -> Result<String, BridgeError> {
        let route = Route::Session;
        let path =
            bridge::session_url(&target.config, session_id).map_err(|_| self.invalid_id(route))?;
        let key = who.scoped(session_id);
        if let Some(agent) = self.cached(&self.sessions, &key, "session") {
            return Ok(agent);
        }
        let agent = self
            .call(
                target,
                who,
                route,
                "GET",
                &path,
                None,
                bridge::parse_session,
            )
            .await?;
        self.store(&self.sessions, key, agent.clone());
        Ok(agent)
    }

    async fn agent(
        &self,
        target: &Target,
        who: &Credentials,
        agent_id: &str,
    ) -> Result<AgentProfile, BridgeError> {
        let route = Route::Agent;
        let path =
            bridge::agent_url(&target.config, agent_id).map_err(|_| self.invalid_id(route))?;
        let key = who.scoped(agent_id);
        if let Some(agent) = self.cached(&self.agents, &key, "agent") {
            return Ok(agent);
        }
        let agent = self
            .call(target, who, route, "GET", &path, None, bridge::parse_agent)
            .await?;
        self.store(&self.agents, key, agent.clone());
        Ok(agent)
    }

    async fn history(
        &self,
        target: &Target,
        who: &Credentials,
        session_id: &str,
    ) -> Result<Vec<bridge::HistoryMessage>, BridgeError> {
        let route = Route::Messages;
        let path =
            bridge::messages_url(&target.config, session_id).map_err(|_| self.invalid_id(route))?;
        let limit = target.config.history_limit;
        self.call(target, who, route, "GET", &path, None, |b| {
            bridge::parse_messages(b, limit)
        })
        .await
    }

    fn cached<V: Clone>(
        &self,
        cache: &Mutex<TtlCache<ScopedId, V>>,
        key: &ScopedId,
        name: &str,
    ) -> Option<V> {
        let hit = cache.lock().unwrap().get(key, Instant::now());
        let counter = if hit.is_some() {
            &self.metrics.cache_hits_total
        } else {
            &self.metrics.cache_misses_total
        };
        counter.with_label_values(&[name]).inc();
        hit
    }

    fn store<V: Clone>(&self, cache: &Mutex<TtlCache<ScopedId, V>>, key: ScopedId, value: V) {
        cache.lock().unwrap().insert(key, value, Instant::now());
        self.update_cache_gauges();
    }

    fn update_cache_gauges(&self) {
        let sessions = self.sessions.lock().unwrap().len();
        let agents = self.agents.lock().unwrap().len();
        let g = &self.metrics.cache_entries;
        g.with_label_values(&["session"]).set(sessions as i64);
        g.with_label_values(&["agent"]).set(agents as i64);
    }

    fn invalid_id(&self, route: Route) -> BridgeError {
        self.metrics
            .requests_total
            .with_label_values(&[route.as_str(), "invalid_id"])
            .inc();
        BridgeError::refused(route, None, "id is not a safe id; not sent to legacy")
    }

    /// One call, bounded by `timeout_ms`, its answer parsed by `parse`, counted by route and
    /// result.
    #[allow(clippy::too_many_arguments)]
    async fn call<T>(
        &self,
        target: &Target,
        who: &Credentials,
        route: Route,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        parse: impl FnOnce(&[u8]) -> Result<T, BadAnswer>,
    ) -> Result<T, BridgeError> {
        let started = Instant::now();
        let request = encode(target, who, method, path, body);
        let timeout = target.config.timeout();
        let result = match tokio::time::timeout(timeout, self.exchange(target, &request)).await {
            Err(_) => Err(BridgeError::unavailable(
                route,
                format!("no answer within {} ms", timeout.as_millis()),
            )),
            Ok(Err(detail)) => Err(BridgeError::unavailable(route, detail)),
            Ok(Ok((status, answer))) => match Verdict::of_status(status) {
                Verdict::Ok => parse(&answer).map_err(|e| BridgeError::unavailable(route, e.0)),
                _ => Err(BridgeError::from_status(route, status)),
            },
        };
        let label = match &result {
            Ok(_) => "ok",
            Err(BridgeError::Refused { .. }) => "refused",
            Err(BridgeError::Unavailable { .. }) => "unavailable",
        };
        self.metrics
            .requests_total
            .with_label_values(&[route.as_str(), label])
            .inc();
        self.metrics
            .request_duration_seconds
            .with_label_values(&[route.as_str()])
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            tracing::debug!(error = %e, path, "bridge call failed");
        }
        result
    }

    /// Send `request` and read the whole answer: status and body.
    async fn exchange(&self, target: &Target, request: &[u8]) -> Result<(u16, Vec<u8>), String> {
        let call = Call::new(&target.address, target.timeouts);
        let response = self
            .legacy
            .send(&call, request)
            .await
            .map_err(|e| format!("legacy: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .read_to_end(MAX_ANSWER_BYTES)
            .await
            .map_err(|e| format!("legacy connection: {e}"))?;
        Ok((status, body))
    }
}

fn encode(
    target: &Target,
    who: &Credentials,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Vec<u8> {
    let length = body.map(|b| b.len().to_string());
    let mut headers: Vec<(&str, &[u8])> = vec![
        ("host", target.address.as_bytes()),
        ("accept", b"application/json"),
        ("authorization", who.authorization.as_bytes()),
        (BRIDGE_HEADER, b"1"),
    ];
    if let Some(id) = &who.request_id {
        headers.push(("x-request-id", id.as_bytes()));
    }
    if let Some(l) = &length {
        headers.push(("content-type", b"application/json"));
        headers.push(("content-length", l.as_bytes()));
    }
    h1::encode_request(method, path, &headers, body.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_labels_are_the_core_s_routes() {
        let routes: Vec<&str> = Route::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(routes, BridgeMetrics::ROUTES);
    }

    #[test]
    fn request_carries_the_caller_s_headers_and_the_bridge_mark() {
        let target = Target::of(
            &Config::parse(
                "[server]\nlisten = \"127.0.0.1:1\"\n[legacy]\naddress = \"legacy:3001\"\n\
                 [runtime]\naddress = \"runtime:8000\"\n",
            )
            .unwrap(),
        );
        let who = Credentials {
            authorization: "Bearer t".into(),
            request_id: Some("r-1".into()),
            org: "o".into(),
            user: None,
        };
        let req = encode(&target, &who, "POST", "/api/v1/sessions", Some(b"{}"));
        let text = String::from_utf8(req).unwrap();
        assert!(
            text.starts_with("POST /api/v1/sessions HTTP/1.1\r\n"),
            "{text}"
        );
        for line in [
            "host: legacy:3001\r\n",
            "authorization: Bearer t\r\n",
            "x-cutover-bridge: 1\r\n",
            "x-request-id: r-1\r\n",
            "content-type: application/json\r\n",
            "content-length: 2\r\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from {text}");
        }
        assert!(text.ends_with("\r\n\r\n{}"), "{text}");
        let get = String::from_utf8(encode(&target, &who, "GET", "/x", None)).unwrap();
        assert!(!get.contains("content-length"), "{get}");
    }
}
