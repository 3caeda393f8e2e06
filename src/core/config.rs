//! `proxy.toml`: its schema, defaults and validation.
//!
//! Parsing is strict (unknown keys are errors) and every error names the offending key, so
//! `cutover-proxy check` can answer like `nginx -t`. Nothing here does I/O beyond reading the file;
//! the environment variables the file names (secrets) are read where they are used
//! (`identity::Verifier::from_env`, `state::Active::new`).

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// The execution mode of one chat request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    DirectLlm,
    RuntimeOrchestrator,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::DirectLlm => "direct_llm",
            Mode::RuntimeOrchestrator => "runtime_orchestrator",
        }
    }
}

/// When the proxy commits to a runtime stream (`runtime.commit_on`): before it, a failing runtime
/// is failed over to legacy; after it, failures end the client's stream with an `error` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitOn {
    /// At the first event other than `thinking` and `ping`.
    #[default]
    Content,
    /// At the first event of any kind.
    FirstEvent,
}

/// What the client gets before the runtime's first content (`runtime.pre_content`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreContent {
    /// The response head, `thinking` and heartbeats go out as they come; a runtime that fails
    /// before content is rescued inside the open stream with legacy's answer.
    #[default]
    Stream,
    /// The head and the status events wait for the commit; a failure before it is an ordinary
    /// failover (the client sees only legacy's stream).
    Hold,
}

/// What `runtime.commit_timeout_ms` passing with no content yet does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitTimeoutAction {
    /// Commit to the runtime and keep waiting for its content.
    #[default]
    Commit,
    /// Send the request to legacy (a time-to-first-content limit), counted as a runtime timeout.
    Failover,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A configuration problem, always tied to the key that caused it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// Dotted key path, e.g. `breaker.error_rate`; empty when the file itself is unreadable.
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub legacy: LegacyConfig,
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub rollout: RolloutConfig,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub breaker: BreakerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub bridge: BridgeConfig,
    #[serde(default)]
    pub shadow: ShadowConfig,
    #[serde(default)]
    pub cors: crate::core::cors::CorsConfig,
    #[serde(default)]
    pub fleet: FleetConfig,
}

/// `[fleet]`: the Prometheus that scrapes every replica, read for the breaker's fleet signal.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// `http://host[:port][/prefix]` of the Prometheus API; "" (the default): off, each replica
    /// decides alone.
    #[serde(default)]
    pub prometheus_url: String,
    /// How often the fleet's runtime outcomes are read, in the background.
    #[serde(default = "defaults::fleet_poll_ms")]
    pub poll_ms: u64,
    /// A poll unanswered after this is a failure (connect, answer and body together).
    #[serde(default = "defaults::fleet_timeout_ms")]
    pub timeout_ms: u64,
    /// PromQL giving the fleet's runtime executions over `breaker.window_secs`, one series per
    /// `outcome` (`all`, `error`, `timeout`); "" (the default): the shipped recording rule
    /// (its expression over `window_secs` when that is not 300).
    #[serde(default)]
    pub query: String,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            prometheus_url: String::new(),
            poll_ms: defaults::fleet_poll_ms(),
            timeout_ms: defaults::fleet_timeout_ms(),
            query: String::new(),
        }
    }
}

impl FleetConfig {
    pub fn enabled(&self) -> bool {
        !self.prometheus_url.is_empty()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled() {
            crate::core::prometheus::HttpUrl::parse(&self.prometheus_url)
                .map_err(|e| ConfigError::new("fleet.prometheus_url", e))?;
        }
        check_range("fleet.poll_ms", self.poll_ms as f64, 100.0, 3_600_000.0)?;
        check_range(
            "fleet.timeout_ms",
            self.timeout_ms as f64,
            10.0,
            self.poll_ms as f64,
        )?;
        if !self.query.is_empty() && self.query.trim().is_empty() {
            return Err(ConfigError::new(
                "fleet.query",
                "blank: leave it out (or \"\") for the shipped recording rule",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    #[serde(default = "defaults::admin_listen")]
    pub admin_listen: String,
    #[serde(default = "defaults::metrics_listen")]
    pub metrics_listen: String,
    /// Worker threads of the proxy service.
    #[serde(default = "defaults::threads")]
    pub threads: usize,
    /// On SIGTERM, how long in-flight streams may run before they are ended with an error event.
    #[serde(default = "defaults::grace_period_secs")]
    pub grace_period_secs: u64,
    /// A client's whole request head must arrive within this long of its first byte (of the
    /// connection, for the first request); else 408 and close. Not restarted by each byte.
    #[serde(default = "defaults::header_timeout_ms")]
    pub header_timeout_ms: u64,
    /// An idle client connection between requests is closed after this long.
    #[serde(default = "defaults::keepalive_timeout_ms")]
    pub keepalive_timeout_ms: u64,
    /// Client connections open at once (all workers); more are answered 503 and closed.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Non-chat requests the front door can forward itself go to legacy on its own lean path
    /// instead of through Pingora's `HttpProxy` (which costs over three times the CPU).
    #[serde(default = "defaults::lean_passthrough")]
    pub lean_passthrough: bool,
    /// Runtime chats are served on the front door's own connection instead of through
    /// Pingora's `HttpProxy`, whose per-request state a stream would hold for its whole length.
    #[serde(default = "defaults::lean_runtime")]
    pub lean_runtime: bool,
    /// On the lean path, a piece of a response the client does not take within this long ends
    /// the connection.
    #[serde(default = "defaults::write_timeout_ms")]
    pub write_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyConfig {
    pub address: String,
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Pooled keep-alive connections to legacy are dropped after this long idle.
    #[serde(default = "defaults::pool_idle_timeout_ms")]
    pub pool_idle_timeout_ms: u64,
    /// Chat requests reach legacy with `Accept-Encoding: identity`: a compressing legacy
    /// (Express `compression()`) would otherwise hold a whole SSE answer in its compressor.
    #[serde(default = "defaults::chat_identity_encoding")]
    pub chat_identity_encoding: bool,
    /// Legacy's response head must arrive within this of the request (nginx's
    /// `proxy_read_timeout`); else 504.
    #[serde(default = "defaults::legacy_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// No byte from legacy for this long inside a response closes the connection (Envoy's
    /// stream idle timeout).
    #[serde(default = "defaults::legacy_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    pub address: String,
    #[serde(default = "defaults::stream_path")]
    pub stream_path: String,
    #[serde(default = "defaults::health_path")]
    pub health_path: String,
    #[serde(default = "defaults::execution_timeout_ms")]
    pub execution_timeout_ms: u64,
    #[serde(default = "defaults::health_interval_ms")]
    pub health_interval_ms: u64,
    #[serde(default = "defaults::health_timeout_ms")]
    pub health_timeout_ms: u64,
    /// Consecutive failed health checks that open the breaker.
    #[serde(default = "defaults::health_failures")]
    pub health_failures: u32,
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Pooled keep-alive connections to the runtime are dropped after this long idle; keep it
    /// below the runtime's own keep-alive (uvicorn: 5 s) so a reused connection is never stale.
    #[serde(default = "defaults::runtime_pool_idle_timeout_ms")]
    pub pool_idle_timeout_ms: u64,
    /// The runtime's response head must arrive within this of the request; else the chat fails
    /// over to legacy, counted as a runtime timeout.
    #[serde(default = "defaults::runtime_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// No byte at all from the runtime (its pings count) for this long: stalled. Before the
    /// commit the chat fails over; after it the stream ends with `RUNTIME_STALLED`.
    #[serde(default = "defaults::runtime_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// A heartbeat event is sent when nothing was written to the client for this long.
    #[serde(default = "defaults::heartbeat_secs")]
    pub heartbeat_secs: u64,
    /// Largest runtime SSE frame accepted; a larger one ends the stream with an error event.
    #[serde(default = "defaults::max_frame_bytes")]
    pub max_frame_bytes: usize,
    /// Which runtime event commits the proxy to the runtime's stream.
    #[serde(default)]
    pub commit_on: CommitOn,
    /// The runtime's response head arrived this long ago and no content yet: do
    /// `commit_timeout_action`. 0: commit at the head (no failover once the runtime answered
    /// 2xx). Unset: 5 s, or half of `execution_timeout_ms` when that is shorter
    /// ([`RuntimeConfig::commit_timeout`]).
    #[serde(default)]
    pub commit_timeout_ms: Option<u64>,
    /// What the commit timeout does: commit and keep waiting on the runtime, or fail over.
    #[serde(default)]
    pub commit_timeout_action: CommitTimeoutAction,
    /// Before the runtime's first content: stream the head and status events at once (and
    /// rescue a failure in-stream through legacy), or hold them until the commit.
    #[serde(default)]
    pub pre_content: PreContent,
    /// The runtime's `agent_id` when the bridge is off and the body names none; empty: none.
    #[serde(default)]
    pub default_agent_id: String,
    /// How long a signed `/api/v1/runtime/files/...` link stays valid.
    #[serde(default = "defaults::file_url_ttl_secs")]
    pub file_url_ttl_secs: u64,
    /// Env var holding the file link key; empty or unset: derived from the JWT secret.
    #[serde(default)]
    pub file_url_secret_env: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    #[serde(default = "defaults::default_mode")]
    pub default_mode: Mode,
    /// Allowlist: these orgs get `runtime_orchestrator`.
    #[serde(default)]
    pub runtime_orgs: Vec<String>,
    /// Denylist: these orgs always get `direct_llm`; wins over everything else.
    #[serde(default)]
    pub direct_orgs: Vec<String>,
    /// Share of the remaining verified orgs (0-100) moved to the runtime, sticky per org.
    #[serde(default)]
    pub runtime_percent: f64,
    /// Share of direct_llm chat requests (0-100) mirrored to the runtime in the background.
    #[serde(default)]
    pub shadow_percent: f64,
    /// Most shadow requests in flight at once; further ones are skipped.
    #[serde(default = "defaults::shadow_max_inflight")]
    pub shadow_max_inflight: usize,
    /// Orgs whose every direct_llm chat is shadowed (within `shadow_max_inflight`), whatever
    /// `shadow_percent` says; their shadow series carry an `org` label.
    #[serde(default)]
    pub shadow_orgs: Vec<String>,
}

/// Largest `shadow.ready_min_samples`: a floor under the statistics, which count every
/// comparison in the window.
pub const MAX_READY_MIN_SAMPLES: u64 = 1_000_000;

/// Most `rollout.shadow_orgs`: each adds labelled series.
pub const MAX_SHADOW_ORGS: usize = 64;

/// `[shadow]`: when the shadow scorecard calls an org `ready`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// Fewer comparisons in the window: `insufficient`.
    #[serde(default = "defaults::ready_min_samples")]
    pub ready_min_samples: u64,
    /// The runtime's (error + timeout) / samples may exceed legacy's by at most this.
    #[serde(default = "defaults::ready_max_error_rate_delta")]
    pub ready_max_error_rate_delta: f64,
    /// The runtime's median time to first event may be at most this times legacy's (>= 1 ms).
    #[serde(default = "defaults::ready_max_ttfe_ratio")]
    pub ready_max_ttfe_ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    #[serde(default = "defaults::jwt_secret_env")]
    pub jwt_secret_env: String,
    #[serde(default = "defaults::org_claim")]
    pub org_claim: String,
    #[serde(default = "defaults::user_claim")]
    pub user_claim: String,
    /// Clock skew tolerated when checking `exp` / `nbf`.
    #[serde(default)]
    pub leeway_secs: u64,
    /// When set, tokens must carry this `iss`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud`.
    #[serde(default)]
    pub audience: Option<String>,
    /// Header an ingress in front of the proxy sets to the caller's verified org. Unset (the
    /// default): no header is trusted, only the JWT.
    #[serde(default)]
    pub trusted_org_header: Option<String>,
    /// The cookie a browser's plain link carries the same JWT in (the web app's `auth_token`);
    /// read on the runtime files route only, and only without an `Authorization` header. `""`:
    /// off.
    #[serde(default = "defaults::token_cookie")]
    pub token_cookie: String,
    /// Addresses (`10.0.0.7`) and networks (`10.0.0.0/8`) of the ingresses and load balancers in
    /// front of the proxy: a request from one of them keeps the `X-Forwarded-For`, `-Proto` and
    /// `-Host` it came with. Empty (the default): every client's own are replaced.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    #[serde(default = "defaults::window_secs")]
    pub window_secs: u64,
    #[serde(default = "defaults::min_requests")]
    pub min_requests: u64,
    #[serde(default = "defaults::error_rate")]
    pub error_rate: f64,
    #[serde(default = "defaults::timeout_rate")]
    pub timeout_rate: f64,
    #[serde(default = "defaults::latency_ratio")]
    pub latency_ratio: f64,
    #[serde(default = "defaults::open_secs")]
    pub open_secs: u64,
    #[serde(default = "defaults::half_open_probes")]
    pub half_open_probes: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "defaults::token_env")]
    pub token_env: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest chat request body; larger ones get 413.
    #[serde(default = "defaults::max_chat_body_bytes")]
    pub max_chat_body_bytes: usize,
    /// Most per-org entries kept for `GET /runtime/metrics/{orgId}`; the least recently seen go.
    #[serde(default = "defaults::max_tracked_orgs")]
    pub max_tracked_orgs: usize,
    /// A client event whose data is larger has its tool result (or arguments / params)
    /// shortened to fit; 0 = no limit.
    #[serde(default = "defaults::max_client_event_bytes")]
    pub max_client_event_bytes: usize,
    /// How long a runtime-bound chat body may take to arrive once its head is in; longer is 408.
    #[serde(default = "defaults::body_timeout_ms")]
    pub body_timeout_ms: u64,
    /// Largest client request head (request line and headers); larger ones get 431.
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: usize,
}

/// The conversation bridge: the legacy API's REST routes the proxy reads a session's agent and
/// history from, and saves a runtime chat's messages to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    #[serde(default = "defaults::bridge_enabled")]
    pub enabled: bool,
    #[serde(default = "defaults::session_path")]
    pub session_path: String,
    #[serde(default = "defaults::agent_path")]
    pub agent_path: String,
    #[serde(default = "defaults::messages_path")]
    pub messages_path: String,
    #[serde(default = "defaults::sessions_path")]
    pub sessions_path: String,
    /// Most earlier messages of the session sent to the runtime as history.
    #[serde(default = "defaults::history_limit")]
    pub history_limit: usize,
    /// Bound of each call to legacy.
    #[serde(default = "defaults::bridge_timeout_ms")]
    pub timeout_ms: u64,
    /// Most session agent ids and agent configs cached (each); the oldest go first.
    #[serde(default = "defaults::cache_entries")]
    pub cache_entries: usize,
    /// How long a cached agent id or agent config is served without asking legacy; 0: no cache.
    #[serde(default = "defaults::cache_ttl_ms")]
    pub cache_ttl_ms: u64,
    /// How long a save that failed is retried in the background (with backoff) before it is
    /// logged whole and counted as lost; 0: the first attempt (and its read-back) only.
    #[serde(default = "defaults::persist_retry_secs")]
    pub persist_retry_secs: u64,
    /// A client that leaves after the commit: read the runtime's stream to its end anyway and
    /// save the answer. `false`: stop reading, as for a cancel.
    #[serde(default = "defaults::finish_detached")]
    pub finish_detached: bool,
    /// Most executions finished for clients that left, at once; beyond it the oldest is dropped.
    #[serde(default = "defaults::max_detached")]
    pub max_detached: usize,
}

mod defaults {
    use super::Mode;
    pub fn admin_listen() -> String {
        "127.0.0.1:9901".into()
    }
    pub fn metrics_listen() -> String {
        "0.0.0.0:9090".into()
    }
    pub fn threads() -> usize {
        2
    }
    pub fn grace_period_secs() -> u64 {
        25
    }
    pub fn header_timeout_ms() -> u64 {
        10_000
    }
    pub fn keepalive_timeout_ms() -> u64 {
        75_000
    }
    pub fn max_connections() -> usize {
        10_000
    }
    pub fn lean_passthrough() -> bool {
        true
    }
    pub fn lean_runtime() -> bool {
        true
    }
    pub fn write_timeout_ms() -> u64 {
        60_000
    }
    pub fn max_header_bytes() -> usize {
        32 * 1024
    }
    pub fn connect_timeout_ms() -> u64 {
        1000
    }
    pub fn pool_idle_timeout_ms() -> u64 {
        30_000
    }
    pub fn runtime_pool_idle_timeout_ms() -> u64 {
        4_000
    }
    pub fn stream_path() -> String {
        "/api/v1/execute/stream".into()
    }
    pub fn health_path() -> String {
        "/health".into()
    }
    pub fn execution_timeout_ms() -> u64 {
        300_000
    }
    pub fn health_interval_ms() -> u64 {
        5_000
    }
    pub fn health_timeout_ms() -> u64 {
        2_000
    }
    pub fn health_failures() -> u32 {
        3
    }
    pub fn heartbeat_secs() -> u64 {
        30
    }
    pub fn max_frame_bytes() -> usize {
        8 * 1024 * 1024
    }
    /// The commit timeout when neither it nor a short execution timeout says otherwise.
    pub const COMMIT_TIMEOUT_MS: u64 = 5_000;
    pub fn legacy_response_timeout_ms() -> u64 {
        60_000
    }
    pub fn legacy_idle_timeout_ms() -> u64 {
        300_000
    }
    pub fn runtime_response_timeout_ms() -> u64 {
        10_000
    }
    pub fn runtime_idle_timeout_ms() -> u64 {
        60_000
    }
    pub fn file_url_ttl_secs() -> u64 {
        3600
    }
    pub fn default_mode() -> Mode {
        Mode::DirectLlm
    }
    pub fn shadow_max_inflight() -> usize {
        32
    }
    pub fn jwt_secret_env() -> String {
        "JWT_SECRET".into()
    }
    pub fn org_claim() -> String {
        "orgId".into()
    }
    pub fn token_cookie() -> String {
        "auth_token".to_string()
    }
    pub fn chat_identity_encoding() -> bool {
        true
    }
    pub fn user_claim() -> String {
        "userId".into()
    }
    pub fn window_secs() -> u64 {
        300
    }
    pub fn min_requests() -> u64 {
        10
    }
    pub fn error_rate() -> f64 {
        0.5
    }
    pub fn timeout_rate() -> f64 {
        0.3
    }
    pub fn latency_ratio() -> f64 {
        0.8
    }
    pub fn open_secs() -> u64 {
        30
    }
    pub fn half_open_probes() -> u32 {
        3
    }
    pub fn token_env() -> String {
        "CUTOVER_ADMIN_TOKEN".into()
    }
    pub fn max_chat_body_bytes() -> usize {
        1024 * 1024
    }
    pub fn max_tracked_orgs() -> usize {
        1000
    }
    pub fn bridge_enabled() -> bool {
        true
    }
    pub fn session_path() -> String {
        "/api/v1/sessions/{sessionId}".into()
    }
    pub fn agent_path() -> String {
        "/api/v1/agents/{agentId}".into()
    }
    pub fn messages_path() -> String {
        "/api/v1/sessions/{sessionId}/messages".into()
    }
    pub fn sessions_path() -> String {
        "/api/v1/sessions".into()
    }
    pub fn history_limit() -> usize {
        20
    }
    pub fn bridge_timeout_ms() -> u64 {
        2_000
    }
    pub fn cache_entries() -> usize {
        10_000
    }
    pub fn cache_ttl_ms() -> u64 {
        30_000
    }
    pub fn persist_retry_secs() -> u64 {
        300
    }
    pub fn finish_detached() -> bool {
        true
    }
    pub fn max_detached() -> usize {
        256
    }
    pub fn max_client_event_bytes() -> usize {
        16 * 1024
    }
    pub fn body_timeout_ms() -> u64 {
        10_000
    }
    pub fn fleet_poll_ms() -> u64 {
        5_000
    }
    pub fn fleet_timeout_ms() -> u64 {
        2_000
    }
    pub fn ready_min_samples() -> u64 {
        50
    }
    pub fn ready_max_error_rate_delta() -> f64 {
        0.02
    }
    pub fn ready_max_ttfe_ratio() -> f64 {
        2.0
    }
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            default_mode: defaults::default_mode(),
            runtime_orgs: Vec::new(),
            direct_orgs: Vec::new(),
            runtime_percent: 0.0,
            shadow_percent: 0.0,
            shadow_max_inflight: defaults::shadow_max_inflight(),
            shadow_orgs: Vec::new(),
        }
    }
}

impl Default for ShadowConfig {
    fn default() -> Self {
        ShadowConfig {
            ready_min_samples: defaults::ready_min_samples(),
            ready_max_error_rate_delta: defaults::ready_max_error_rate_delta(),
            ready_max_ttfe_ratio: defaults::ready_max_ttfe_ratio(),
        }
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            jwt_secret_env: defaults::jwt_secret_env(),
            org_claim: defaults::org_claim(),
            user_claim: defaults::user_claim(),
            leeway_secs: 0,
            issuer: None,
            audience: None,
            trusted_org_header: None,
            token_cookie: defaults::token_cookie(),
            trusted_proxies: Vec::new(),
        }
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window_secs: defaults::window_secs(),
            min_requests: defaults::min_requests(),
            error_rate: defaults::error_rate(),
            timeout_rate: defaults::timeout_rate(),
            latency_ratio: defaults::latency_ratio(),
            open_secs: defaults::open_secs(),
            half_open_probes: defaults::half_open_probes(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            token_env: defaults::token_env(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_chat_body_bytes: defaults::max_chat_body_bytes(),
            max_tracked_orgs: defaults::max_tracked_orgs(),
            max_client_event_bytes: defaults::max_client_event_bytes(),
            body_timeout_ms: defaults::body_timeout_ms(),
            max_header_bytes: defaults::max_header_bytes(),
        }
    }
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            enabled: defaults::bridge_enabled(),
            session_path: defaults::session_path(),
            agent_path: defaults::agent_path(),
            messages_path: defaults::messages_path(),
            sessions_path: defaults::sessions_path(),
            history_limit: defaults::history_limit(),
            timeout_ms: defaults::bridge_timeout_ms(),
            cache_entries: defaults::cache_entries(),
            cache_ttl_ms: defaults::cache_ttl_ms(),
            persist_retry_secs: defaults::persist_retry_secs(),
            finish_detached: defaults::finish_detached(),
            max_detached: defaults::max_detached(),
        }
    }
}

/// The longest `bridge.persist_retry_secs`: a day. A message still unsaved then needs a person.
pub const MAX_PERSIST_RETRY_SECS: u64 = 24 * 3600;

impl BridgeConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn persist_retry(&self) -> Duration {
        Duration::from_secs(self.persist_retry_secs)
    }
}

impl Config {
    /// Parse and validate a TOML document.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let message = inner.message().trim().to_string();
            let located = inner.span().map(|s| locate(text, s.start));
            // A syntax error leaves serde's path empty; the line it points at still names a key.
            let key = match (key.as_str(), &located) {
                (".", Some(loc)) => loc.key.clone().unwrap_or_default(),
                (".", None) => String::new(),
                _ => key,
            };
            if message.starts_with("unknown field") {
                return ConfigError::new(key, "unknown key");
            }
            match located {
                Some(loc) => ConfigError::new(
                    key,
                    format!(
                        "{message} (line {}, column {}: {})",
                        loc.line,
                        loc.column,
                        loc.text.trim()
                    ),
                ),
                None => ConfigError::new(key, message),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Read, parse and validate a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("", format!("cannot read {}: {e}", path.display())))?;
        Config::parse(&text)
    }

    /// Semantic checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_addr("server.listen", &self.server.listen)?;
        check_addr("server.admin_listen", &self.server.admin_listen)?;
        check_addr("server.metrics_listen", &self.server.metrics_listen)?;
        check_range("server.threads", self.server.threads as f64, 1.0, 256.0)?;
        check_range(
            "server.grace_period_secs",
            self.server.grace_period_secs as f64,
            0.0,
            3600.0,
        )?;
        check_range(
            "server.header_timeout_ms",
            self.server.header_timeout_ms as f64,
            1.0,
            600_000.0,
        )?;
        check_range(
            "server.keepalive_timeout_ms",
            self.server.keepalive_timeout_ms as f64,
            1.0,
            3_600_000.0,
        )?;
        check_range(
            "server.max_connections",
            self.server.max_connections as f64,
            1.0,
            1_000_000.0,
        )?;
        check_range(
            "server.write_timeout_ms",
            self.server.write_timeout_ms as f64,
            1.0,
            3_600_000.0,
        )?;
        check_addr("legacy.address", &self.legacy.address)?;
        check_addr("runtime.address", &self.runtime.address)?;
        check_path("runtime.stream_path", &self.runtime.stream_path)?;
        check_path("runtime.health_path", &self.runtime.health_path)?;
        check_positive("legacy.connect_timeout_ms", self.legacy.connect_timeout_ms)?;
        check_positive(
            "runtime.connect_timeout_ms",
            self.runtime.connect_timeout_ms,
        )?;
        check_positive(
            "runtime.execution_timeout_ms",
            self.runtime.execution_timeout_ms,
        )?;
        check_positive(
            "runtime.health_interval_ms",
            self.runtime.health_interval_ms,
        )?;
        check_positive("runtime.health_timeout_ms", self.runtime.health_timeout_ms)?;
        check_positive(
            "runtime.health_failures",
            self.runtime.health_failures.into(),
        )?;
        check_positive("runtime.heartbeat_secs", self.runtime.heartbeat_secs)?;
        check_bytes(
            "runtime.max_frame_bytes",
            self.runtime.max_frame_bytes,
            1024,
        )?;
        // A commit timer that outlasts the execution would hold a stream's first byte until
        // the deadline answers it. Only an explicit one: the default follows the execution's.
        if let Some(commit) = self.runtime.commit_timeout_ms {
            if commit >= self.runtime.execution_timeout_ms {
                return Err(ConfigError::new(
                    "runtime.commit_timeout_ms",
                    format!(
                        "must be below runtime.execution_timeout_ms ({}), got {commit}",
                        self.runtime.execution_timeout_ms
                    ),
                ));
            }
        }
        for (key, value) in [
            (
                "legacy.response_timeout_ms",
                self.legacy.response_timeout_ms,
            ),
            ("legacy.idle_timeout_ms", self.legacy.idle_timeout_ms),
            (
                "runtime.response_timeout_ms",
                self.runtime.response_timeout_ms,
            ),
            ("runtime.idle_timeout_ms", self.runtime.idle_timeout_ms),
        ] {
            check_range(key, value as f64, 1.0, 3_600_000.0)?;
        }
        check_positive("runtime.file_url_ttl_secs", self.runtime.file_url_ttl_secs)?;
        if !self.runtime.file_url_secret_env.is_empty() {
            check_env_name(
                "runtime.file_url_secret_env",
                &self.runtime.file_url_secret_env,
            )?;
        }
        check_orgs("rollout.runtime_orgs", &self.rollout.runtime_orgs)?;
        check_orgs("rollout.direct_orgs", &self.rollout.direct_orgs)?;
        check_range(
            "rollout.runtime_percent",
            self.rollout.runtime_percent,
            0.0,
            100.0,
        )?;
        check_range(
            "rollout.shadow_percent",
            self.rollout.shadow_percent,
            0.0,
            100.0,
        )?;
        check_positive(
            "rollout.shadow_max_inflight",
            self.rollout.shadow_max_inflight as u64,
        )?;
        check_orgs("rollout.shadow_orgs", &self.rollout.shadow_orgs)?;
        if self.rollout.shadow_orgs.len() > MAX_SHADOW_ORGS {
            return Err(ConfigError::new(
                "rollout.shadow_orgs",
                format!(
                    "names {} orgs; at most {MAX_SHADOW_ORGS} (each adds labelled series)",
                    self.rollout.shadow_orgs.len()
                ),
            ));
        }
        self.shadow.validate()?;
        self.fleet.validate()?;
        check_env_name("identity.jwt_secret_env", &self.identity.jwt_secret_env)?;
        check_nonempty("identity.org_claim", &self.identity.org_claim)?;
        check_nonempty("identity.user_claim", &self.identity.user_claim)?;
        if let Some(h) = &self.identity.trusted_org_header {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(ConfigError::new(
                    "identity.trusted_org_header",
                    format!("{h:?} is not a valid header name"),
                ));
            }
            if h.eq_ignore_ascii_case("authorization") {
                return Err(ConfigError::new(
                    "identity.trusted_org_header",
                    "must not be the Authorization header",
                ));
            }
        }
        if let Err(bad) =
            crate::core::forwarded::TrustedProxies::parse(&self.identity.trusted_proxies)
        {
            return Err(ConfigError::new(
                "identity.trusted_proxies",
                format!("{bad:?} is not an IP address or network (10.0.0.0/8, fd00::/8)"),
            ));
        }
        check_positive("breaker.window_secs", self.breaker.window_secs)?;
        check_positive("breaker.min_requests", self.breaker.min_requests)?;
        check_rate("breaker.error_rate", self.breaker.error_rate)?;
        check_rate("breaker.timeout_rate", self.breaker.timeout_rate)?;
        if !(self.breaker.latency_ratio > 0.0 && self.breaker.latency_ratio.is_finite()) {
            return Err(ConfigError::new(
                "breaker.latency_ratio",
                format!(
                    "must be a positive number, got {}",
                    self.breaker.latency_ratio
                ),
            ));
        }
        check_positive("breaker.open_secs", self.breaker.open_secs)?;
        check_positive(
            "breaker.half_open_probes",
            self.breaker.half_open_probes.into(),
        )?;
        check_env_name("admin.token_env", &self.admin.token_env)?;
        check_bytes(
            "limits.max_chat_body_bytes",
            self.limits.max_chat_body_bytes,
            1,
        )?;
        check_positive(
            "limits.max_tracked_orgs",
            self.limits.max_tracked_orgs as u64,
        )?;
        check_range(
            "limits.body_timeout_ms",
            self.limits.body_timeout_ms as f64,
            1.0,
            600_000.0,
        )?;
        // Pingora's own head limit is just under 1 MiB; the head is handed to it whole.
        check_range(
            "limits.max_header_bytes",
            self.limits.max_header_bytes as f64,
            1024.0,
            (1024 * 1024 - 1) as f64,
        )?;
        let agent = &self.runtime.default_agent_id;
        if !agent.is_empty() && !crate::core::ids::is_safe_id(agent) {
            return Err(ConfigError::new(
                "runtime.default_agent_id",
                format!("{agent:?} is not an agent id (1-128 of A-Z a-z 0-9 _ -)"),
            ));
        }
        self.bridge.validate()?;
        self.cors
            .validate()
            .map_err(|(key, message)| ConfigError::new(key, message))?;
        let cookie = &self.identity.token_cookie;
        if !cookie
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            return Err(ConfigError::new(
                "identity.token_cookie",
                format!("{cookie:?} is not a cookie name"),
            ));
        }
        // Below this not even a small tool call's names and ids fit beside a shortened result.
        if self.limits.max_client_event_bytes != 0 {
            check_bytes(
                "limits.max_client_event_bytes",
                self.limits.max_client_event_bytes,
                1024,
            )?;
        }
        Ok(())
    }

    /// Keys whose change only takes effect after a restart (listeners and worker threads).
    pub fn restart_only_changes(&self, newer: &Config) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.server.listen != newer.server.listen {
            keys.push("server.listen");
        }
        if self.server.admin_listen != newer.server.admin_listen {
            keys.push("server.admin_listen");
        }
        if self.server.metrics_listen != newer.server.metrics_listen {
            keys.push("server.metrics_listen");
        }
        if self.server.threads != newer.server.threads {
            keys.push("server.threads");
        }
        keys
    }
}

impl RuntimeConfig {
    pub fn execution_timeout(&self) -> Duration {
        Duration::from_millis(self.execution_timeout_ms)
    }

    /// `commit_timeout_ms`, or when unset 5 s, at most half of `execution_timeout_ms`: a
    /// default never makes an explicit execution timeout invalid.
    pub fn commit_timeout(&self) -> Duration {
        let ms = self
            .commit_timeout_ms
            .unwrap_or(defaults::COMMIT_TIMEOUT_MS.min(self.execution_timeout_ms / 2));
        Duration::from_millis(ms)
    }

    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.response_timeout_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
}

impl ShadowConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check_range(
            "shadow.ready_min_samples",
            self.ready_min_samples as f64,
            1.0,
            MAX_READY_MIN_SAMPLES as f64,
        )?;
        check_rate(
            "shadow.ready_max_error_rate_delta",
            self.ready_max_error_rate_delta,
        )?;
        check_range(
            "shadow.ready_max_ttfe_ratio",
            self.ready_max_ttfe_ratio,
            1.0,
            1000.0,
        )?;
        Ok(())
    }
}

impl BridgeConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check_template("bridge.session_path", &self.session_path, &["{sessionId}"])?;
        check_template("bridge.agent_path", &self.agent_path, &["{agentId}"])?;
        check_template(
            "bridge.messages_path",
            &self.messages_path,
            &["{sessionId}"],
        )?;
        check_template("bridge.sessions_path", &self.sessions_path, &[])?;
        check_range(
            "bridge.history_limit",
            self.history_limit as f64,
            1.0,
            1000.0,
        )?;
        check_range("bridge.timeout_ms", self.timeout_ms as f64, 1.0, 60_000.0)?;
        check_positive("bridge.cache_entries", self.cache_entries as u64)?;
        check_range(
            "bridge.persist_retry_secs",
            self.persist_retry_secs as f64,
            0.0,
            MAX_PERSIST_RETRY_SECS as f64,
        )?;
        check_range(
            "bridge.max_detached",
            self.max_detached as f64,
            1.0,
            100_000.0,
        )?;
        Ok(())
    }
}

/// An absolute path holding exactly the given placeholders, once each, and no other braces:
/// ids are only ever substituted where the operator put a placeholder.
fn check_template(key: &str, value: &str, placeholders: &[&str]) -> Result<(), ConfigError> {
    let mut rest = value.to_string();
    for p in placeholders {
        if rest.matches(p).count() != 1 {
            return Err(ConfigError::new(
                key,
                format!("{value:?} must contain {p} exactly once"),
            ));
        }
        rest = rest.replace(p, "x");
    }
    if rest.contains(['{', '}']) {
        return Err(ConfigError::new(
            key,
            format!(
                "{value:?} holds a placeholder other than {}",
                if placeholders.is_empty() {
                    "none".to_string()
                } else {
                    placeholders.join(", ")
                }
            ),
        ));
    }
    if rest.contains(['?', '#']) {
        return Err(ConfigError::new(
            key,
            format!("{value:?} must be a path without query or fragment"),
        ));
    }
    check_path(key, &rest)
}

/// Where a byte offset falls in the document, and the key that line sets, if any.
struct Location {
    line: usize,
    column: usize,
    text: String,
    key: Option<String>,
}

fn locate(text: &str, offset: usize) -> Location {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let line_text = text[line_start..].lines().next().unwrap_or("").to_string();
    // The table this line belongs to: the last `[header]` above it.
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let key = line_text
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('#') && !k.starts_with('['))
        .map(|k| match &table {
            Some(t) => format!("{t}.{k}"),
            None => k,
        });
    Location {
        line,
        column,
        text: line_text,
        key,
    }
}

/// `host:port` where host is an IP literal, `[v6]` or a DNS name; resolution happens later.
fn check_addr(key: &str, value: &str) -> Result<(), ConfigError> {
    let bad = || {
        ConfigError::new(
            key,
            format!("{value:?} is not a host:port address (e.g. \"127.0.0.1:8080\")"),
        )
    };
    if value.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if host_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// `Ok` when `ok`; otherwise `key`'s error, saying `why`.
fn ensure(ok: bool, key: &str, why: impl FnOnce() -> String) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(key, why()))
    }
}

fn check_path(key: &str, value: &str) -> Result<(), ConfigError> {
    let ok = value.starts_with('/') && value.parse::<http::uri::PathAndQuery>().is_ok();
    ensure(ok, key, || format!("{value:?} is not an absolute path"))
}

fn check_positive(key: &str, value: u64) -> Result<(), ConfigError> {
    ensure(value > 0, key, || "must be greater than 0".into())
}

fn check_range(key: &str, value: f64, min: f64, max: f64) -> Result<(), ConfigError> {
    let ok = value.is_finite() && value >= min && value <= max;
    ensure(ok, key, || {
        format!("must be between {min} and {max}, got {value}")
    })
}

/// A size in bytes, from `min` to 64 MiB.
fn check_bytes(key: &str, value: usize, min: usize) -> Result<(), ConfigError> {
    check_range(key, value as f64, min as f64, (64 * 1024 * 1024) as f64)
}

fn check_rate(key: &str, value: f64) -> Result<(), ConfigError> {
    let ok = value.is_finite() && (0.0..=1.0).contains(&value);
    ensure(ok, key, || {
        format!("must be a rate between 0 and 1, got {value}")
    })
}

fn check_nonempty(key: &str, value: &str) -> Result<(), ConfigError> {
    ensure(!value.trim().is_empty(), key, || "must not be empty".into())
}

fn check_env_name(key: &str, value: &str) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && !value.starts_with(|c: char| c.is_ascii_digit())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    ensure(ok, key, || {
        format!("{value:?} is not an environment variable name")
    })
}

fn check_orgs(key: &str, orgs: &[String]) -> Result<(), ConfigError> {
    for (i, org) in orgs.iter().enumerate() {
        if org.trim().is_empty() || org.trim() != org {
            return Err(ConfigError::new(
                format!("{key}[{i}]"),
                format!("{org:?} is not an org id (empty or surrounded by spaces)"),
            ));
        }
    }
    Ok(())
}

/// The smallest valid config, ending inside `[runtime]`: tests add to it.
#[cfg(test)]
pub const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:8080"
[legacy]
address = "127.0.0.1:3001"
[runtime]
address = "runtime:8000"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn err_key(text: &str) -> String {
        Config::parse(text).unwrap_err().key
    }

    /// `text` is refused, naming `key`, with a message that says `says`.
    #[track_caller]
    fn assert_refused(text: &str, key: &str, says: &str) {
        let e = Config::parse(text).unwrap_err();
        assert_eq!(e.key, key, "{e}");
        assert!(e.message.contains(says), "{e}");
    }

    /// Each `key = value` (`value` as TOML) in a `[table]` after `MINIMAL` is refused, naming
    /// `table.key`.
    #[track_caller]
    fn assert_refused_in(table: &str, cases: &[(&str, &str)]) {
        for (key, value) in cases {
            let text = format!("{MINIMAL}\n[{table}]\n{key} = {value}\n");
            assert_eq!(err_key(&text), format!("{table}.{key}"), "{key} = {value}");
        }
    }

    /// `MINIMAL` with more lines in its `[runtime]` table.
    fn with_runtime(lines: &str) -> String {
        format!("{MINIMAL}{lines}\n")
    }

    #[test]
    fn minimal_config_gets_contract_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.server.admin_listen, "127.0.0.1:9901");
        assert_eq!(c.server.metrics_listen, "0.0.0.0:9090");
        assert_eq!(c.runtime.stream_path, "/api/v1/execute/stream");
        assert_eq!(c.runtime.health_path, "/health");
        assert_eq!(c.runtime.execution_timeout_ms, 300_000);
        assert_eq!(c.runtime.health_interval_ms, 5_000);
        assert_eq!(c.rollout.default_mode, Mode::DirectLlm);
        assert_eq!(c.identity.jwt_secret_env, "JWT_SECRET");
        assert_eq!(c.identity.org_claim, "orgId");
        assert_eq!(c.breaker.window_secs, 300);
        assert_eq!(c.breaker.min_requests, 10);
        assert_eq!(c.breaker.error_rate, 0.5);
        assert_eq!(c.breaker.timeout_rate, 0.3);
        assert_eq!(c.breaker.latency_ratio, 0.8);
        assert_eq!(c.breaker.open_secs, 30);
        assert_eq!(c.breaker.half_open_probes, 3);
        assert_eq!(c.admin.token_env, "CUTOVER_ADMIN_TOKEN");
    }

    #[test]
    fn shipped_example_is_valid() {
        let text = include_str!("../../proxy.toml");
        Config::parse(text).unwrap();
    }

    #[test]
    fn unknown_key_is_named_with_its_table() {
        let text = MINIMAL.replace("[legacy]", "[legacy]\nadress = \"x\"");
        assert_refused(&text, "legacy.adress", "unknown key");
    }

    #[test]
    fn unknown_table_is_named() {
        assert_eq!(err_key(&format!("{MINIMAL}\n[bogus]\nx = 1\n")), "bogus");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let text = format!("{MINIMAL}\n[breaker]\nmin_requests = \"ten\"\n");
        assert_refused(&text, "breaker.min_requests", "invalid type");
    }

    #[test]
    fn bad_mode_names_the_key() {
        let text = format!("{MINIMAL}\n[rollout]\ndefault_mode = \"runtime\"\n");
        assert_refused(&text, "rollout.default_mode", "runtime_orchestrator");
    }

    #[test]
    fn bad_addresses_are_refused() {
        for bad in ["nonsense", "127.0.0.1", "host:99999", ":80", "a b:80"] {
            let text = MINIMAL.replace("127.0.0.1:3001", bad);
            assert_eq!(err_key(&text), "legacy.address", "{bad}");
        }
        for good in ["localhost:1", "[::1]:80", "legacy.svc.cluster.local:3001"] {
            let text = MINIMAL.replace("127.0.0.1:3001", good);
            Config::parse(&text).unwrap();
        }
    }

    #[test]
    fn rates_outside_unit_interval_are_refused() {
        assert_refused_in(
            "breaker",
            &[
                ("error_rate", "1.5"),
                ("timeout_rate", "-0.1"),
                ("error_rate", "nan"),
            ],
        );
    }

    #[test]
    fn percentages_are_bounded() {
        let text = format!("{MINIMAL}\n[rollout]\nruntime_percent = 101\n");
        assert_eq!(err_key(&text), "rollout.runtime_percent");
        let text = format!("{MINIMAL}\n[rollout]\nshadow_percent = -1\n");
        assert_eq!(err_key(&text), "rollout.shadow_percent");
    }

    #[test]
    fn syntax_errors_name_the_key_and_line() {
        let text = MINIMAL.replace("\"127.0.0.1:3001\"", "127.0.0.1:3001");
        assert_refused(&text, "legacy.address", "line 5");
        let text = format!("{MINIMAL}\n[rollout]\nruntime_orgs = [\"a\",\n");
        let e = Config::parse(&text).unwrap_err();
        assert!(e.message.contains("line"), "{e}");
    }

    #[test]
    fn missing_required_key_is_named() {
        let text = MINIMAL.replace("address = \"runtime:8000\"", "");
        assert_refused(&text, "runtime", "address");
    }

    #[test]
    fn zero_durations_are_refused() {
        let text = with_runtime("execution_timeout_ms = 0");
        assert_eq!(err_key(&text), "runtime.execution_timeout_ms");
    }

    #[test]
    fn the_commit_point_defaults_to_content_within_five_seconds() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.runtime.commit_on, CommitOn::Content);
        assert_eq!(c.runtime.commit_timeout_ms, None);
        assert_eq!(c.runtime.commit_timeout(), Duration::from_secs(5));
        assert_eq!(c.runtime.commit_timeout_action, CommitTimeoutAction::Commit);
        let text = with_runtime("commit_on = \"first_event\"\ncommit_timeout_ms = 0");
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.runtime.commit_on, CommitOn::FirstEvent);
        assert_eq!(c.runtime.commit_timeout(), Duration::ZERO);
    }

    #[test]
    fn a_commit_point_past_the_execution_timeout_is_refused() {
        // An explicit commit timeout must be below the execution's.
        let e = Config::parse(&with_runtime(
            "execution_timeout_ms = 5000\ncommit_timeout_ms = 5000",
        ))
        .unwrap_err();
        assert_eq!(e.key, "runtime.commit_timeout_ms", "{e}");
        assert!(e.message.contains("execution_timeout_ms (5000)"), "{e}");
        Config::parse(&with_runtime(
            "execution_timeout_ms = 5000\ncommit_timeout_ms = 4999",
        ))
        .unwrap();
        // A default never makes an explicit setting invalid: unset, it is at most half of a
        // shorter execution timeout.
        let c = Config::parse(&with_runtime("execution_timeout_ms = 5000")).unwrap();
        assert_eq!(c.runtime.commit_timeout(), Duration::from_millis(2500));
        let c = Config::parse(&with_runtime("execution_timeout_ms = 1")).unwrap();
        assert_eq!(c.runtime.commit_timeout(), Duration::ZERO);
        let e = Config::parse(&with_runtime("commit_on = \"thinking\"")).unwrap_err();
        assert_eq!(e.key, "runtime.commit_on", "{e}");
    }

    #[test]
    fn silence_deadlines_have_defaults_ranges_and_an_action() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(
            (
                c.legacy.response_timeout_ms,
                c.legacy.idle_timeout_ms,
                c.runtime.response_timeout_ms,
                c.runtime.idle_timeout_ms
            ),
            (60_000, 300_000, 10_000, 60_000)
        );
        for (table, key) in [
            ("legacy", "response_timeout_ms"),
            ("legacy", "idle_timeout_ms"),
            ("runtime", "response_timeout_ms"),
            ("runtime", "idle_timeout_ms"),
        ] {
            for bad in ["0", "3600001"] {
                let anchor = format!("[{table}]\n");
                let text = MINIMAL.replace(&anchor, &format!("{anchor}{key} = {bad}\n"));
                assert_eq!(err_key(&text), format!("{table}.{key}"), "{key} = {bad}");
            }
        }
        let c = Config::parse(&with_runtime("commit_timeout_action = \"failover\"")).unwrap();
        assert_eq!(
            c.runtime.commit_timeout_action,
            CommitTimeoutAction::Failover
        );
        assert_eq!(
            err_key(&with_runtime("commit_timeout_action = \"wait\"")),
            "runtime.commit_timeout_action"
        );
        assert_eq!(
            Config::parse(MINIMAL).unwrap().runtime.pre_content,
            PreContent::Stream
        );
        let c = Config::parse(&with_runtime("pre_content = \"hold\"")).unwrap();
        assert_eq!(c.runtime.pre_content, PreContent::Hold);
        assert_eq!(
            err_key(&with_runtime("pre_content = \"buffer\"")),
            "runtime.pre_content"
        );
    }

    #[test]
    fn blank_org_ids_are_refused() {
        let text = format!("{MINIMAL}\n[rollout]\nruntime_orgs = [\"a\", \" \"]\n");
        assert_eq!(err_key(&text), "rollout.runtime_orgs[1]");
    }

    #[test]
    fn relative_paths_are_refused() {
        let text = with_runtime("stream_path = \"execute\"");
        assert_eq!(err_key(&text), "runtime.stream_path");
    }

    #[test]
    fn restart_only_changes_are_listed() {
        let a = Config::parse(MINIMAL).unwrap();
        let mut b = a.clone();
        b.server.listen = "127.0.0.1:9".into();
        b.rollout.runtime_orgs.push("x".into());
        assert_eq!(a.restart_only_changes(&b), vec!["server.listen"]);
    }

    #[test]
    fn bridge_defaults_are_the_contract_s() {
        let c = Config::parse(MINIMAL).unwrap();
        let b = &c.bridge;
        assert!(b.enabled);
        assert_eq!(b.session_path, "/api/v1/sessions/{sessionId}");
        assert_eq!(b.agent_path, "/api/v1/agents/{agentId}");
        assert_eq!(b.messages_path, "/api/v1/sessions/{sessionId}/messages");
        assert_eq!(b.sessions_path, "/api/v1/sessions");
        assert_eq!(b.history_limit, 20);
        assert_eq!(b.timeout_ms, 2000);
        assert_eq!(b.timeout(), Duration::from_secs(2));
        assert!(b.cache_entries > 0);
        assert!(b.cache_ttl_ms > 0);
        assert_eq!(b.persist_retry_secs, 300);
        assert_eq!(b.persist_retry(), Duration::from_secs(300));
        assert!(b.finish_detached);
        assert_eq!(b.max_detached, 256);
        assert_eq!(c.runtime.default_agent_id, "");
        assert!(c.identity.trusted_proxies.is_empty());
    }

    #[test]
    fn bridge_section_is_read() {
        let text = format!(
            "{MINIMAL}default_agent_id = \"agent-0\"\n[bridge]\nenabled = false\n\
             session_path = \"/s/{{sessionId}}\"\nagent_path = \"/a/{{agentId}}/x\"\n\
             messages_path = \"/s/{{sessionId}}/m\"\nsessions_path = \"/s\"\n\
             history_limit = 5\ntimeout_ms = 300\ncache_entries = 7\ncache_ttl_ms = 0\n\
             persist_retry_secs = 0\nfinish_detached = false\nmax_detached = 3\n"
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.runtime.default_agent_id, "agent-0");
        assert_eq!(
            c.bridge,
            BridgeConfig {
                enabled: false,
                session_path: "/s/{sessionId}".into(),
                agent_path: "/a/{agentId}/x".into(),
                messages_path: "/s/{sessionId}/m".into(),
                sessions_path: "/s".into(),
                history_limit: 5,
                timeout_ms: 300,
                cache_entries: 7,
                cache_ttl_ms: 0,
                persist_retry_secs: 0,
                finish_detached: false,
                max_detached: 3,
            }
        );
    }

    #[test]
    fn bridge_unknown_key_is_named() {
        let text = format!("{MINIMAL}\n[bridge]\nhistory = 3\n");
        assert_refused(&text, "bridge.history", "unknown key");
    }

    #[test]
    fn bridge_paths_need_their_placeholder() {
        for (key, value) in [
            ("session_path", "/api/v1/sessions"),
            ("session_path", "api/v1/sessions/{sessionId}"),
            ("session_path", "/api/v1/sessions/{agentId}"),
            ("session_path", "/s/{sessionId}/{sessionId}"),
            ("session_path", "/s/{sessionId}?x=1"),
            ("agent_path", "/api/v1/agents/{sessionId}"),
            ("agent_path", "/api/v1/agents/{agentId}/{other}"),
            ("messages_path", "/api/v1/sessions/messages"),
            ("messages_path", "/api/v1/sessions/{sessionId}/messages {x"),
            ("sessions_path", "/api/v1/sessions/{sessionId}"),
            ("sessions_path", ""),
            ("sessions_path", "sessions"),
        ] {
            let text = format!("{MINIMAL}\n[bridge]\n{key} = {value:?}\n");
            assert_eq!(err_key(&text), format!("bridge.{key}"), "{key} = {value}");
        }
    }

    #[test]
    fn bridge_limits_must_be_positive() {
        assert_refused_in(
            "bridge",
            &[
                ("history_limit", "0"),
                ("timeout_ms", "0"),
                ("cache_entries", "0"),
                ("timeout_ms", "600000"),
                ("persist_retry_secs", "86401"),
                ("persist_retry_secs", "-1"),
                ("max_detached", "0"),
                ("max_detached", "100001"),
            ],
        );
    }

    #[test]
    fn trusted_proxies_are_addresses_or_networks() {
        let text = format!(
            "{MINIMAL}[identity]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.168.1.7\", \"fd00::/8\", \"::1\"]\n"
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.identity.trusted_proxies.len(), 4);
        for bad in ["10.0.0.0/33", "ingress", "10.0.0.1:80", "", "10.0.0.0/8 "] {
            let text = format!("{MINIMAL}[identity]\ntrusted_proxies = [{bad:?}]\n");
            assert_eq!(err_key(&text), "identity.trusted_proxies", "{bad}");
        }
    }

    #[test]
    fn default_agent_id_must_be_a_safe_id() {
        for bad in ["../admin", "a/b", " x", "a%2Fb"] {
            let text = format!("{MINIMAL}default_agent_id = {bad:?}\n");
            assert_eq!(err_key(&text), "runtime.default_agent_id", "{bad}");
        }
    }

    #[test]
    fn body_timeout_has_a_default_and_a_range() {
        assert_eq!(
            Config::parse(MINIMAL).unwrap().limits.body_timeout_ms,
            10_000
        );
        let limits = |line: &str| format!("{MINIMAL}[limits]\n{line}\n");
        let c = Config::parse(&limits("body_timeout_ms = 250")).unwrap();
        assert_eq!(c.limits.body_timeout_ms, 250);
        for bad in ["body_timeout_ms = 0", "body_timeout_ms = 600001"] {
            assert_eq!(err_key(&limits(bad)), "limits.body_timeout_ms", "{bad}");
        }
    }

    #[test]
    fn front_door_limits_have_defaults_and_ranges() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.server.header_timeout_ms, 10_000);
        assert_eq!(c.server.keepalive_timeout_ms, 75_000);
        assert_eq!(c.server.max_connections, 10_000);
        assert!(c.server.lean_passthrough);
        assert_eq!(c.server.write_timeout_ms, 60_000);
        assert_eq!(c.limits.max_header_bytes, 32 * 1024);
        let server = |line: &str| MINIMAL.replacen("[server]\n", &format!("[server]\n{line}\n"), 1);
        let c = Config::parse(&server("header_timeout_ms = 250\nmax_connections = 3")).unwrap();
        assert_eq!(
            (c.server.header_timeout_ms, c.server.max_connections),
            (250, 3)
        );
        for (line, key) in [
            ("header_timeout_ms = 0", "server.header_timeout_ms"),
            ("keepalive_timeout_ms = 0", "server.keepalive_timeout_ms"),
            ("max_connections = 0", "server.max_connections"),
            ("write_timeout_ms = 0", "server.write_timeout_ms"),
            ("lean_passthrough = 1", "server.lean_passthrough"),
        ] {
            assert_eq!(err_key(&server(line)), key, "{line}");
        }
        let limits = |line: &str| format!("{MINIMAL}[limits]\n{line}\n");
        assert_eq!(
            Config::parse(&limits("max_header_bytes = 4096"))
                .unwrap()
                .limits
                .max_header_bytes,
            4096
        );
        for bad in ["max_header_bytes = 100", "max_header_bytes = 1048576"] {
            assert_eq!(err_key(&limits(bad)), "limits.max_header_bytes", "{bad}");
        }
    }

    #[test]
    fn frame_file_link_and_client_event_limits() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.runtime.max_frame_bytes, 8 * 1024 * 1024);
        assert_eq!(c.runtime.file_url_ttl_secs, 3600);
        assert_eq!(c.runtime.file_url_secret_env, "");
        assert_eq!(c.limits.max_client_event_bytes, 16384);
        let limits = |line: &str| format!("{MINIMAL}[limits]\n{line}\n");
        let c = Config::parse(&limits("max_client_event_bytes = 0")).unwrap();
        assert_eq!(c.limits.max_client_event_bytes, 0);
        assert_eq!(
            err_key(&limits("max_client_event_bytes = 100")),
            "limits.max_client_event_bytes"
        );
        let c = Config::parse(&with_runtime("file_url_secret_env = \"FILE_KEY\"")).unwrap();
        assert_eq!(c.runtime.file_url_secret_env, "FILE_KEY");
        assert_eq!(
            err_key(&with_runtime("file_url_secret_env = \"not a name\"")),
            "runtime.file_url_secret_env"
        );
        assert_eq!(
            err_key(&with_runtime("file_url_ttl_secs = 0")),
            "runtime.file_url_ttl_secs"
        );
    }

    #[test]
    fn fleet_keys_have_defaults_and_bounds() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.fleet, FleetConfig::default());
        assert!(!c.fleet.enabled());
        assert_eq!((c.fleet.poll_ms, c.fleet.timeout_ms), (5000, 2000));
        let with = |extra: &str| format!("{MINIMAL}{extra}");
        let c = Config::parse(&with(
            "[fleet]\nprometheus_url = \"http://prometheus.monitoring:9090\"\npoll_ms = 1000\ntimeout_ms = 500\n",
        ))
        .unwrap();
        assert!(c.fleet.enabled());
        for (extra, key) in [
            (
                "[fleet]\nprometheus_url = \"https://p:9090\"\n",
                "fleet.prometheus_url",
            ),
            (
                "[fleet]\nprometheus_url = \"p:9090\"\n",
                "fleet.prometheus_url",
            ),
            ("[fleet]\npoll_ms = 10\n", "fleet.poll_ms"),
            (
                "[fleet]\npoll_ms = 1000\ntimeout_ms = 2000\n",
                "fleet.timeout_ms",
            ),
            ("[fleet]\nquery = \" \"\n", "fleet.query"),
            ("[fleet]\nurl = \"http://p\"\n", "fleet.url"),
        ] {
            assert_eq!(err_key(&with(extra)), key, "{extra}");
        }
    }

    #[test]
    fn shadow_scorecard_keys_have_defaults_and_bounds() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.shadow, ShadowConfig::default());
        assert_eq!(c.shadow.ready_min_samples, 50);
        assert_eq!(c.shadow.ready_max_error_rate_delta, 0.02);
        assert_eq!(c.shadow.ready_max_ttfe_ratio, 2.0);
        assert!(c.rollout.shadow_orgs.is_empty());
        let with = |extra: &str| format!("{MINIMAL}{extra}");
        let c = Config::parse(&with(
            "[rollout]\nshadow_orgs = [\"org-s\"]\n[shadow]\nready_min_samples = 5\n",
        ))
        .unwrap();
        assert_eq!(c.rollout.shadow_orgs, ["org-s"]);
        assert_eq!(c.shadow.ready_min_samples, 5);
        for (extra, key) in [
            (
                "[shadow]\nready_min_samples = 0\n",
                "shadow.ready_min_samples",
            ),
            (
                "[shadow]\nready_min_samples = 1000001\n",
                "shadow.ready_min_samples",
            ),
            (
                "[shadow]\nready_max_error_rate_delta = 1.5\n",
                "shadow.ready_max_error_rate_delta",
            ),
            (
                "[shadow]\nready_max_ttfe_ratio = 0.5\n",
                "shadow.ready_max_ttfe_ratio",
            ),
            ("[shadow]\nready = true\n", "shadow.ready"),
            (
                "[rollout]\nshadow_orgs = [\" \"]\n",
                "rollout.shadow_orgs[0]",
            ),
        ] {
            assert_eq!(err_key(&with(extra)), key, "{extra}");
        }
        let many: Vec<String> = (0..=MAX_SHADOW_ORGS).map(|i| format!("\"o{i}\"")).collect();
        let text = with(&format!("[rollout]\nshadow_orgs = [{}]\n", many.join(",")));
        assert_eq!(err_key(&text), "rollout.shadow_orgs");
    }

    #[test]
    fn browser_keys_have_defaults_and_are_checked() {
        let c = Config::parse(MINIMAL).unwrap();
        assert!(c.legacy.chat_identity_encoding);
        assert_eq!(c.identity.token_cookie, "auth_token");
        assert_eq!(c.cors, crate::core::cors::CorsConfig::default());
        assert_eq!(c.cors.origin_env, "CORS_ORIGIN");
        let with = |extra: &str| format!("{MINIMAL}{extra}");
        let c = Config::parse(&with(
            "[identity]\ntoken_cookie = \"\"\n[cors]\norigin = true\ncredentials = false\n",
        ))
        .unwrap();
        assert_eq!(c.identity.token_cookie, "");
        assert!(!c.cors.credentials);
        for (extra, key) in [
            (
                "[identity]\ntoken_cookie = \"a b\"\n",
                "identity.token_cookie",
            ),
            ("[cors]\norigin = \"https://app.example/\"\n", "cors.origin"),
            ("[cors]\norigin = 3\n", "cors.origin"),
            ("[cors]\nallowed_headers = []\n", "cors.allowed_headers"),
            (
                "[legacy]\nchat_identity_encoding = \"yes\"\n",
                "legacy.chat_identity_encoding",
            ),
        ] {
            let text = if extra.starts_with("[legacy]") {
                MINIMAL.replace(
                    "address = \"127.0.0.1:3001\"",
                    "address = \"127.0.0.1:3001\"\nchat_identity_encoding = \"yes\"",
                )
            } else {
                with(extra)
            };
            assert_eq!(err_key(&text), key, "{extra}");
        }
    }
}
