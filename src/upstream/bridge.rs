//! The conversation bridge's calls to legacy: the lookups before a runtime execution and the
//! writes around it, each with the caller's own `Authorization` so legacy applies its permissions.
//!
//! Every call is one HTTP/1.1 request through legacy's client (`upstream::Upstream`, under
//! legacy's own deadlines), bounded as a whole by `bridge.timeout_ms`; what an answer means is
//! decided in `core::bridge`. A
//! session's agent id and an agent's settings are cached per caller; history never is.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::core::bridge::{
    self, AgentProfile, AssistantMessage, BadAnswer, BridgeError, Conversation, ReadBack, Route,
    SavedShape, ScopedId, TtlCache, Verdict,
};
use crate::core::config::{BridgeConfig, Config};
use crate::core::forwarded::Forwarded;
use crate::core::h1;
use crate::core::identity::Caller;
use crate::core::ids;
use crate::core::persist::{Attempt, Backoff};
use crate::upstream::{Call, Tcp, TimeoutCounters, Timeouts, Upstream, UpstreamName};

/// The bridge's series (registered with the others, `state::metrics`).
pub struct BridgeMetrics {
    pub requests_total: IntCounterVec,
    pub request_duration_seconds: HistogramVec,
    pub cache_hits_total: IntCounterVec,
    pub cache_misses_total: IntCounterVec,
    pub cache_entries: IntGaugeVec,
    pub persist_failures_total: IntCounter,
    /// Saves not settled yet: retried in the background, or waiting for an earlier save of the
    /// same chat.
    pub persist_pending: IntGauge,
    /// Executions finished for a client that left after the commit, by how they ended.
    pub detached_total: IntCounterVec,
    /// Such executions running now.
    pub detached: IntGauge,
}

impl BridgeMetrics {
    pub const ROUTES: [&'static str; 7] = [
        "session",
        "agent",
        "messages",
        "save_message",
        "read_back",
        "create_session",
        "delete_session",
    ];
    /// How a detached execution ended: its answer saved (or handed to the background retries),
    /// the runtime failing or ending without one, the execution deadline, dropped for a newer
    /// one beyond `bridge.max_detached`, or cut by the shutdown.
    pub const DETACHED_RESULTS: [&'static str; 5] =
        ["saved", "failed", "timeout", "dropped", "shutdown"];
    pub const RESULTS: [&'static str; 4] = ["ok", "refused", "unavailable", "invalid_id"];
    pub const CACHES: [&'static str; 2] = ["session", "agent"];
}

/// Marks the proxy's own calls, so legacy (and its logs) can tell them from the browser's.
pub const BRIDGE_HEADER: &str = "x-cutover-bridge";
/// Larger legacy answers are refused rather than buffered (a history of `history_limit`
/// messages is far below this).
const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;
/// The first wait between save attempts; doubled for each later one (with jitter), up to
/// `RETRY_CAP_FACTOR` times this.
const RETRY_BACKOFF: Duration = Duration::from_millis(500);
const RETRY_CAP_FACTOR: u32 = 60;
/// How long a save attempt waits for legacy's answer once it is in the background, at most
/// (never past its retry window): past it, the attempt's outcome is unknown.
const SAVE_ANSWER_WAIT: Duration = Duration::from_secs(10);

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
    /// The `X-Forwarded-*` headers of a call made for this caller, as on its own requests to
    /// legacy: legacy's per-client limits count the user, not the proxy.
    pub forwarded: Option<Forwarded>,
}

impl Credentials {
    pub fn new(authorization: &str, request_id: Option<&str>, caller: &Caller) -> Credentials {
        Credentials {
            authorization: authorization.to_string(),
            request_id: request_id.map(str::to_string),
            org: caller.org_id.clone(),
            user: caller.user_id.clone(),
            forwarded: None,
        }
    }

    /// With the caller's `X-Forwarded-*` headers.
    pub fn forwarded(mut self, forwarded: Forwarded) -> Credentials {
        self.forwarded = Some(forwarded);
        self
    }

    fn scoped(&self, id: &str) -> ScopedId {
        ScopedId {
            org: self.org.clone(),
            user: self.user.clone(),
            id: id.to_string(),
        }
    }
}

/// The outcome of saving a message, as far as the chat waits for it.
#[derive(Debug)]
pub enum Persisted {
    /// Legacy saved it under this id.
    Saved(String),
    /// Not settled within the chat's wait: `message_id` is the proxy's own, for
    /// `done.messageId`, and `retry` settles it in the background (awaiting it is optional; it
    /// runs detached): `Ok(id)` once legacy holds it (an empty id: legacy listed it without
    /// one), `Err` once given up, logged whole and counted.
    Deferred {
        message_id: String,
        retry: JoinHandle<Result<String, BridgeError>>,
    },
}

/// A message to save once: what is sent, how a read-back recognises it, where the session
/// ended when the chat began (`core::bridge::find_saved`).
#[derive(Debug, Clone)]
pub struct Save {
    pub shape: SavedShape,
    pub after: Option<String>,
}

/// A save not settled yet, whole, for the error line if it never is.
struct Pending {
    session_id: String,
    request_id: String,
    shape: SavedShape,
    /// Dropped when the save settles: later saves of the same chat wait for that.
    _settled: watch::Sender<()>,
    settled: watch::Receiver<()>,
}

/// What the background does next with a save.
enum Next {
    /// Wait for saves of the same chat that started earlier, then send it.
    After(Vec<watch::Receiver<()>>),
    /// Wait for the answer of an attempt already sent.
    Answer(JoinHandle<Result<String, BridgeError>>),
    /// Read the session's messages: the last attempt's outcome is unknown.
    ReadBack,
    Send,
}

/// The bridge's cache, and legacy's client it calls through; one per process.
pub struct Bridge {
    legacy: Arc<Upstream>,
    /// A session's agent id, per caller.
    sessions: CachedRead<String>,
    /// An agent's settings, per caller.
    agents: CachedRead<AgentProfile>,
    metrics: &'static BridgeMetrics,
    /// The first wait between save attempts, in microseconds.
    retry_backoff_us: AtomicU64,
    /// Saves not settled yet, oldest first (the order to replay them in, should it come to that).
    pending: Mutex<BTreeMap<u64, Pending>>,
    next_pending: AtomicU64,
}

/// One of the bridge's cached reads: its route, its URL, how its answer is parsed, and the
/// answers kept per caller (`name` labels the cache's series).
struct CachedRead<V> {
    route: Route,
    name: &'static str,
    url: fn(&BridgeConfig, &str) -> Result<String, bridge::UnsafeId>,
    parse: fn(&[u8]) -> Result<V, BadAnswer>,
    cache: Mutex<TtlCache<ScopedId, V>>,
}

impl<V: Clone> CachedRead<V> {
    fn new(
        route: Route,
        name: &'static str,
        url: fn(&BridgeConfig, &str) -> Result<String, bridge::UnsafeId>,
        parse: fn(&[u8]) -> Result<V, BadAnswer>,
        config: &BridgeConfig,
    ) -> Self {
        let ttl = Duration::from_millis(config.cache_ttl_ms);
        let cache = Mutex::new(TtlCache::new(config.cache_entries, ttl));
        CachedRead {
            route,
            name,
            url,
            parse,
            cache,
        }
    }

    fn configure(&self, config: &BridgeConfig) {
        let ttl = Duration::from_millis(config.cache_ttl_ms);
        let mut cache = self.cache.lock().unwrap();
        cache.configure(config.cache_entries, ttl);
    }

    fn len(&self) -> usize {
        self.cache.lock().unwrap().len()
    }
}

impl Bridge {
    /// A bridge with a legacy client of its own (its timeouts counted nowhere); the proxy's
    /// shares legacy's client ([`Bridge::calling`]).
    pub fn new(config: &BridgeConfig, metrics: &'static BridgeMetrics) -> Bridge {
        let counters = TimeoutCounters::unregistered(UpstreamName::Legacy);
        let (session_url, parse_session) = (bridge::session_url, bridge::parse_session);
        let (agent_url, parse_agent) = (bridge::agent_url, bridge::parse_agent);
        Bridge {
            legacy: Arc::new(Upstream::new(Tcp, counters)),
            sessions: CachedRead::new(
                Route::Session,
                "session",
                session_url,
                parse_session,
                config,
            ),
            agents: CachedRead::new(Route::Agent, "agent", agent_url, parse_agent, config),
            metrics,
            retry_backoff_us: AtomicU64::new(RETRY_BACKOFF.as_micros() as u64),
            pending: Mutex::default(),
            next_pending: AtomicU64::new(0),
        }
    }

    /// Call legacy through `legacy`: its pool, and its timeouts counted with the proxy's.
    pub fn calling(mut self, legacy: Arc<Upstream>) -> Bridge {
        self.legacy = legacy;
        self
    }

    /// The first wait between save attempts (doubled for each later one, with jitter, up to 60
    /// times this).
    pub fn with_retry_backoff(self, backoff: Duration) -> Bridge {
        self.set_retry_backoff(backoff);
        self
    }

    /// `with_retry_backoff` on a running bridge (tests scale the waits down).
    pub fn set_retry_backoff(&self, backoff: Duration) {
        self.retry_backoff_us
            .store(backoff.as_micros() as u64, Ordering::Relaxed);
    }

    /// Take a reloaded config's cache limits.
    pub fn configure(&self, config: &BridgeConfig) {
        self.sessions.configure(config);
        self.agents.configure(config);
        self.update_cache_gauges();
    }

    /// Before a runtime execution on `POST /chat/sessions/{id}`: the history, and at the same
    /// time the session's agent then the agent's settings (the only call that waits for another).
    /// A failing session or agent ends the lookup at once and is the error reported (it says the
    /// most: a 404 session fails its history too); a failing history is reported once the agent
    /// is known to be fine.
    pub async fn lookup_session(
        &self,
        target: &Target,
        who: &Credentials,
        session_id: &str,
    ) -> Result<Conversation, BridgeError> {
        let mut agent = std::pin::pin!(async {
            let agent_id = self.session_agent(target, who, session_id).await?;
            let agent = self.agent(target, who, &agent_id).await?;
            Ok::<_, BridgeError>((agent_id, agent))
        });
        let mut history = std::pin::pin!(self.history(target, who, session_id));
        let ((agent_id, agent), history) = tokio::select! {
            biased;
            a = &mut agent => {
                let a = a?;
                (a, history.await?)
            }
            h = &mut history => {
                let a = agent.await?;
                (a, h?)
            }
        };
        Ok(Conversation {
            agent_id,
            agent,
            history: history.messages,
            last_message_id: history.last_message_id,
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
            last_message_id: None,
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
        if !ids::is_safe_id(agent_id) {
            return Err(self.invalid_id(route));
        }
        let body = bridge::new_session_body(agent_id, message);
        let path = bridge::sessions_url(&target.config);
        let id = self
            .call(
                target,
                who,
                route,
                &path,
                Some(&body),
                bridge::parse_created_id,
            )
            .await?;
        if !ids::is_safe_id(&id) {
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
        self.call(target, who, route, &path, None, |_| Ok(())).await
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
            &path,
            Some(body),
            bridge::parse_created_id,
        )
        .await
    }

    /// Save the runtime's answer exactly once. `done` waits for it at most twice `timeout_ms`:
    /// for the first attempt's answer, however late within that bound, and when the attempt
    /// ended without one, for a read-back of the session's messages. If that does not settle it,
    /// `done` names a proxy-made id and the save goes on in the background (`settle`).
    pub async fn persist_assistant(
        self: &Arc<Self>,
        target: &Target,
        who: &Credentials,
        session_id: &str,
        message: AssistantMessage,
        after: Option<String>,
    ) -> Persisted {
        let save = Save {
            shape: message.shape(),
            after,
        };
        let inline = target.config.timeout() * 2;
        self.persist(target, who, session_id, save, inline).await
    }

    /// Save the user's message (`parentId` when the chat names one) the same way; the first
    /// event waits for it at most `timeout_ms` (nothing the client gets names its id).
    pub async fn persist_user(
        self: &Arc<Self>,
        target: &Target,
        who: &Credentials,
        session_id: &str,
        content: &str,
        parent_id: Option<&str>,
        after: Option<String>,
    ) -> Persisted {
        let save = Save {
            shape: SavedShape::user(content, parent_id),
            after,
        };
        let inline = target.config.timeout();
        self.persist(target, who, session_id, save, inline).await
    }

    /// One message saved exactly once: settled within `inline` if it can be, else in the
    /// background. The saves of one chat (same session and request id) are made in order: a save
    /// waits for the earlier ones still pending, so legacy never lists an answer before its
    /// question.
    async fn persist(
        self: &Arc<Self>,
        target: &Target,
        who: &Credentials,
        session_id: &str,
        save: Save,
        inline: Duration,
    ) -> Persisted {
        let started = Instant::now();
        let deadline = started + inline;
        let window_end = started + target.config.persist_retry();
        let mut earlier = self.earlier_saves(session_id, who);
        let settled = tokio::time::timeout_at(
            deadline.into(),
            futures::future::join_all(earlier.iter_mut().map(|rx| rx.changed())),
        )
        .await
        .is_ok();
        let (next, last) = if !settled {
            (Next::After(earlier), None)
        } else {
            let attempt = self.send_save(target, who, session_id, &save, window_end);
            match self
                .settle_inline(target, who, session_id, &save, attempt, deadline)
                .await
            {
                Ok(next) => next,
                Err(done) => return *done,
            }
        };
        let message_id = uuid::Uuid::new_v4().to_string();
        tracing::warn!(
            session_id,
            role = save.shape.role,
            proxy_message_id = %message_id,
            error = last.as_ref().map(ToString::to_string).unwrap_or_else(|| "no answer yet".into()),
            "saving a message is not settled in time; going on in the background"
        );
        let key = self.register(session_id, who, &save.shape);
        let (this, target, who) = (self.clone(), target.clone(), who.clone());
        let session_id = session_id.to_string();
        let retry = tokio::spawn(async move {
            let result = this
                .settle(&target, &who, &session_id, &save, next, last, window_end)
                .await;
            this.unregister(key);
            result
        });
        Persisted::Deferred { message_id, retry }
    }

    /// The first attempt's answer within `deadline`, and a read-back when it ended without one:
    /// `Err` carries what settled the save (boxed: it is the rare way out), `Ok` what the
    /// background does next.
    async fn settle_inline(
        self: &Arc<Self>,
        target: &Target,
        who: &Credentials,
        session_id: &str,
        save: &Save,
        mut attempt: JoinHandle<Result<String, BridgeError>>,
        deadline: Instant,
    ) -> Result<(Next, Option<BridgeError>), Box<Persisted>> {
        let Ok(joined) = tokio::time::timeout_at(deadline.into(), &mut attempt).await else {
            return Ok((Next::Answer(attempt), None));
        };
        let result = joined.unwrap_or_else(|e| Err(task_failed(e)));
        match Attempt::of(&result) {
            Attempt::Saved(id) => Err(Box::new(Persisted::Saved(id))),
            Attempt::Refused => {
                let e = result.expect_err("refused");
                self.give_up(session_id, who, &save.shape, &e, "refused");
                Err(Box::new(settled(Err(e))))
            }
            Attempt::NotSaved => Ok((Next::Send, result.err())),
            Attempt::Unknown => {
                let read = tokio::time::timeout_at(
                    deadline.into(),
                    self.read_back(target, who, session_id, save),
                )
                .await;
                match read {
                    Ok(Ok(ReadBack::Saved(Some(id)))) => Err(Box::new(Persisted::Saved(id))),
                    Ok(Ok(ReadBack::Saved(None))) => Err(Box::new(settled(Ok(String::new())))),
                    Ok(Ok(ReadBack::Absent)) => Ok((Next::Send, result.err())),
                    Ok(Err(_)) | Err(_) => Ok((Next::ReadBack, result.err())),
                }
            }
        }
    }

    /// The background part of a save: attempts with backoff (a read-back before any attempt
    /// after one whose outcome is unknown) until legacy holds the message, refuses it for good,
    /// or `window_end` passes; then the whole message is logged and counted.
    #[allow(clippy::too_many_arguments)]
    async fn settle(
        self: &Arc<Self>,
        target: &Target,
        who: &Credentials,
        session_id: &str,
        save: &Save,
        mut next: Next,
        mut last: Option<BridgeError>,
        window_end: Instant,
    ) -> Result<String, BridgeError> {
        let base = Duration::from_micros(self.retry_backoff_us.load(Ordering::Relaxed));
        let mut backoff = Backoff::new(base, base * RETRY_CAP_FACTOR);
        // A send or a read-back the first attempt left to do waits first, like any retry.
        let mut wait = matches!(next, Next::Send | Next::ReadBack);
        loop {
            if wait {
                let pause = backoff.wait(fastrand::f64());
                if Instant::now() + pause >= window_end {
                    let e = last.unwrap_or_else(|| {
                        BridgeError::unavailable(Route::SaveMessage, "no answer")
                    });
                    self.give_up(session_id, who, &save.shape, &e, "retry window over");
                    return Err(e);
                }
                tokio::time::sleep(pause).await;
            }
            // What to do after this step, and whether to wait before it.
            let (then, pause_before) = match next {
                Next::After(earlier) => {
                    for mut rx in earlier {
                        let _ = rx.changed().await;
                    }
                    (Next::Send, false)
                }
                Next::Send => {
                    let attempt = self.send_save(target, who, session_id, save, window_end);
                    (Next::Answer(attempt), false)
                }
                Next::Answer(attempt) => {
                    let result = attempt.await.unwrap_or_else(|e| Err(task_failed(e)));
                    match Attempt::of(&result) {
                        Attempt::Saved(id) => return Ok(id),
                        Attempt::Refused => {
                            let e = result.expect_err("refused");
                            self.give_up(session_id, who, &save.shape, &e, "refused");
                            return Err(e);
                        }
                        Attempt::NotSaved => {
                            last = result.err();
                            (Next::Send, true)
                        }
                        Attempt::Unknown => {
                            last = result.err();
                            (Next::ReadBack, true)
                        }
                    }
                }
                Next::ReadBack => match self.read_back(target, who, session_id, save).await {
                    Ok(ReadBack::Saved(id)) => return Ok(id.unwrap_or_default()),
                    // Not there: send it now, the wait was before the read.
                    Ok(ReadBack::Absent) => (Next::Send, false),
                    Err(e) => {
                        last = Some(e);
                        (Next::ReadBack, true)
                    }
                },
            };
            (next, wait) = (then, pause_before);
        }
    }

    /// Send one save attempt on a task of its own, so that a chat that stops waiting for it does
    /// not cut it: legacy's answer is still read, however late, up to `SAVE_ANSWER_WAIT` (at
    /// least twice `timeout_ms`, never past the retry window).
    fn send_save(
        self: &Arc<Self>,
        target: &Target,
        who: &Credentials,
        session_id: &str,
        save: &Save,
        window_end: Instant,
    ) -> JoinHandle<Result<String, BridgeError>> {
        let wait = SAVE_ANSWER_WAIT
            .min(window_end.saturating_duration_since(Instant::now()))
            .max(target.config.timeout() * 2);
        let (this, target, who) = (self.clone(), target.clone(), who.clone());
        let (session_id, body) = (session_id.to_string(), save.shape.body());
        tokio::spawn(async move {
            let route = Route::SaveMessage;
            let path = bridge::messages_url(&target.config, &session_id)
                .map_err(|_| this.invalid_id(route))?;
            this.call_within(
                wait,
                &target,
                &who,
                route,
                &path,
                Some(&body),
                bridge::parse_created_id,
            )
            .await
        })
    }

    /// Whether legacy holds the message: the session's messages, read once.
    async fn read_back(
        &self,
        target: &Target,
        who: &Credentials,
        session_id: &str,
        save: &Save,
    ) -> Result<ReadBack, BridgeError> {
        let route = Route::ReadBack;
        let path =
            bridge::messages_url(&target.config, session_id).map_err(|_| self.invalid_id(route))?;
        self.call(target, who, route, &path, None, |b| {
            bridge::find_saved(b, &save.shape, save.after.as_deref())
        })
        .await
    }

    /// Receivers of the saves of the same chat still pending, which a new one waits for.
    fn earlier_saves(&self, session_id: &str, who: &Credentials) -> Vec<watch::Receiver<()>> {
        let request_id = who.request_id.as_deref().unwrap_or_default();
        self.pending
            .lock()
            .unwrap()
            .values()
            .filter(|p| p.session_id == session_id && p.request_id == request_id)
            .map(|p| p.settled.clone())
            .collect()
    }

    fn register(&self, session_id: &str, who: &Credentials, shape: &SavedShape) -> u64 {
        let key = self.next_pending.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(());
        self.pending.lock().unwrap().insert(
            key,
            Pending {
                session_id: session_id.to_string(),
                request_id: who.request_id.clone().unwrap_or_default(),
                shape: shape.clone(),
                _settled: tx,
                settled: rx,
            },
        );
        self.metrics.persist_pending.inc();
        key
    }

    fn unregister(&self, key: u64) {
        if self.pending.lock().unwrap().remove(&key).is_some() {
            self.metrics.persist_pending.dec();
        }
    }

    /// Saves still pending now (at shutdown): each logged whole and counted as lost.
    pub fn log_pending_saves(&self) -> usize {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap());
        let pending: Vec<Pending> = pending.into_values().collect();
        for p in &pending {
            self.metrics.persist_failures_total.inc();
            self.metrics.persist_pending.dec();
            log_unsaved(
                &p.session_id,
                &p.request_id,
                &p.shape,
                "still being saved at shutdown",
                "message not saved: the proxy is shutting down",
            );
        }
        pending.len()
    }

    /// Saves not settled yet.
    pub fn pending_saves(&self) -> usize {
        self.pending.lock().unwrap().len()
    }

    fn give_up(
        &self,
        session_id: &str,
        who: &Credentials,
        shape: &SavedShape,
        error: &BridgeError,
        why: &str,
    ) {
        self.metrics.persist_failures_total.inc();
        let detail = format!("{why}: {error}");
        let request_id = who.request_id.as_deref().unwrap_or_default();
        log_unsaved(
            session_id,
            request_id,
            shape,
            &detail,
            "message not saved after every attempt",
        );
    }

    async fn session_agent(
        &self,
        target: &Target,
        who: &Credentials,
        session_id: &str,
    ) -> Result<String, BridgeError> {
        self.cached_get(target, who, session_id, &self.sessions)
            .await
    }

    async fn agent(
        &self,
        target: &Target,
        who: &Credentials,
        agent_id: &str,
    ) -> Result<AgentProfile, BridgeError> {
        self.cached_get(target, who, agent_id, &self.agents).await
    }

    /// A GET of what `id` names, answered from the caller's cache while it is fresh.
    async fn cached_get<V: Clone>(
        &self,
        target: &Target,
        who: &Credentials,
        id: &str,
        read: &CachedRead<V>,
    ) -> Result<V, BridgeError> {
        let path = (read.url)(&target.config, id).map_err(|_| self.invalid_id(read.route))?;
        let key = who.scoped(id);
        if let Some(value) = self.cached(read, &key) {
            return Ok(value);
        }
        let value = self
            .call(target, who, read.route, &path, None, read.parse)
            .await?;
        self.store(read, key, value.clone());
        Ok(value)
    }

    async fn history(
        &self,
        target: &Target,
        who: &Credentials,
        session_id: &str,
    ) -> Result<bridge::History, BridgeError> {
        let route = Route::Messages;
        let path =
            bridge::messages_url(&target.config, session_id).map_err(|_| self.invalid_id(route))?;
        // The current message is the conversation's last entry: `history_limit` in all.
        let keep = target.config.history_limit.saturating_sub(1);
        self.call(target, who, route, &path, None, |b| {
            bridge::parse_messages(b, keep)
        })
        .await
    }

    fn cached<V: Clone>(&self, read: &CachedRead<V>, key: &ScopedId) -> Option<V> {
        let hit = read.cache.lock().unwrap().get(key, Instant::now());
        let counter = if hit.is_some() {
            &self.metrics.cache_hits_total
        } else {
            &self.metrics.cache_misses_total
        };
        counter.with_label_values(&[read.name]).inc();
        hit
    }

    fn store<V: Clone>(&self, read: &CachedRead<V>, key: ScopedId, value: V) {
        read.cache
            .lock()
            .unwrap()
            .insert(key, value, Instant::now());
        self.update_cache_gauges();
    }

    fn update_cache_gauges(&self) {
        let g = &self.metrics.cache_entries;
        g.with_label_values(&[self.sessions.name])
            .set(self.sessions.len() as i64);
        g.with_label_values(&[self.agents.name])
            .set(self.agents.len() as i64);
    }

    fn invalid_id(&self, route: Route) -> BridgeError {
        self.metrics
            .requests_total
            .with_label_values(&[route.as_str(), "invalid_id"])
            .inc();
        BridgeError::refused(route, None, "id is not a safe id; not sent to legacy")
    }

    /// One call (with the route's method), bounded by `timeout_ms`, its answer parsed by
    /// `parse`, counted by route and result.
    async fn call<T>(
        &self,
        target: &Target,
        who: &Credentials,
        route: Route,
        path: &str,
        body: Option<&[u8]>,
        parse: impl FnOnce(&[u8]) -> Result<T, BadAnswer>,
    ) -> Result<T, BridgeError> {
        let timeout = target.config.timeout();
        self.call_within(timeout, target, who, route, path, body, parse)
            .await
    }

    /// `call`, bounded by `timeout`.
    #[allow(clippy::too_many_arguments)]
    async fn call_within<T>(
        &self,
        timeout: Duration,
        target: &Target,
        who: &Credentials,
        route: Route,
        path: &str,
        body: Option<&[u8]>,
        parse: impl FnOnce(&[u8]) -> Result<T, BadAnswer>,
    ) -> Result<T, BridgeError> {
        let started = Instant::now();
        let request = encode(target, who, route.method(), path, body);
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

/// A save task that panicked or was cancelled: its outcome is unknown.
fn task_failed(e: tokio::task::JoinError) -> BridgeError {
    BridgeError::unavailable(Route::SaveMessage, format!("save task: {e}"))
}

/// A save settled before the chat stopped waiting, without an id for `done`.
fn settled(result: Result<String, BridgeError>) -> Persisted {
    Persisted::Deferred {
        message_id: uuid::Uuid::new_v4().to_string(),
        retry: tokio::spawn(async move { result }),
    }
}

/// The error line of a message legacy does not hold: everything needed to save it by hand.
fn log_unsaved(session_id: &str, request_id: &str, shape: &SavedShape, error: &str, what: &str) {
    let metadata = serde_json::Value::Object(shape.metadata.clone());
    tracing::error!(
        session_id,
        role = shape.role,
        content = %shape.content,
        parent_id = shape.parent_id.as_deref().unwrap_or(""),
        metadata = %metadata,
        tokens_used = shape.metadata.get("tokensUsed").and_then(serde_json::Value::as_u64),
        latency_ms = shape.metadata.get("latencyMs").and_then(serde_json::Value::as_u64),
        request_id,
        error,
        "{what}"
    );
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
    if let Some(f) = &who.forwarded {
        headers.extend(f.headers().map(|(n, v)| (n, v.as_bytes())));
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
            forwarded: Some(Forwarded {
                for_: Some("198.51.100.4".into()),
                proto: "https".into(),
                host: Some("api.example.com".into()),
            }),
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
            "x-forwarded-for: 198.51.100.4\r\n",
            "x-forwarded-proto: https\r\n",
            "x-forwarded-host: api.example.com\r\n",
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
