//! Fixtures: the test config, tokens, a proxy started in-process, and `Harness`, which starts a
//! proxy between two scripted upstreams with defaults for everything a test does not name.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cutover_proxy::app::LocalServer;
use cutover_proxy::core::config::Config;
use cutover_proxy::core::config::Mode;

use super::client::{Client, Response};
use super::upstream::{echo_legacy, healthy_runtime, Received, Reply, Upstream};

pub const JWT_SECRET: &str = "integration-test-secret";
pub const JWT_ENV: &str = "CUTOVER_TEST_JWT_SECRET";
pub const ADMIN_TOKEN: &str = "integration-admin-token";
pub const ADMIN_ENV: &str = "CUTOVER_TEST_ADMIN_TOKEN";
pub const RT: &str = "runtime_orchestrator";
pub const DIRECT: &str = "direct_llm";
/// The chat body a test sends when the body is not what it is about.
pub const HI: &str = r#"{"message":"hi"}"#;

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

/// The test config's bridge and agent: tests that are not about the conversation bridge run
/// against echo legacies without its routes, so it is off, and the runtime gets this agent.
pub const TEST_AGENT: &str = "agent-test";
pub const BRIDGE_OFF_TOML: &str = "[bridge]\nenabled = false\n";

/// A config for tests: short timeouts, org-a on the allowlist, secrets from test env vars, the
/// bridge off (`BRIDGE_OFF_TOML`) and `runtime.default_agent_id = TEST_AGENT`.
pub fn config(legacy: &str, runtime: &str) -> Config {
    Config::parse(&test_toml(legacy, runtime)).unwrap()
}

/// `config`'s text, for a test that writes its config file or changes a line of it (`retoml`).
pub fn test_toml(legacy: &str, runtime: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:1"
[legacy]
address = "{legacy}"
[runtime]
address = "{runtime}"
execution_timeout_ms = 5000
commit_timeout_ms = 1000
health_interval_ms = 200
connect_timeout_ms = 500
default_agent_id = "{TEST_AGENT}"
[rollout]
runtime_orgs = ["org-a"]
[identity]
jwt_secret_env = "{JWT_ENV}"
[breaker]
open_secs = 1
[admin]
token_env = "{ADMIN_ENV}"
{BRIDGE_OFF_TOML}"#
    )
}

/// `text` with its first `line` replaced by `with` (which may be several lines); the line must
/// be there.
pub fn retoml(text: &str, line: &str, with: &str) -> String {
    assert!(text.contains(line), "no {line:?} in the config");
    text.replacen(line, with, 1)
}

/// Start the proxy in-process with `config`.
pub async fn proxy(config: Config) -> LocalServer {
    std::env::set_var(JWT_ENV, JWT_SECRET);
    std::env::set_var(ADMIN_ENV, ADMIN_TOKEN);
    LocalServer::start(config, None).await.unwrap()
}

/// Poll `cond` every 20 ms until it holds or `within` passes.
pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    until(within, || {
        std::future::ready(if cond() { Ok(()) } else { Err(()) })
    })
    .await
    .is_ok()
}

/// Ask `probe` every 20 ms until it answers `Ok`, or `within` passes: then its last `Err`, for
/// the failure's message.
pub async fn until<T, E, F, Fut>(within: Duration, mut probe: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + within;
    loop {
        match probe().await {
            Ok(done) => return Ok(done),
            Err(last) if Instant::now() >= deadline => return Err(last),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Read `read` every 20 ms until a reading satisfies `holds`, or `within` passes: then the last
/// reading, for the failure's message.
pub async fn poll_until<T, F, Fut>(
    within: Duration,
    mut read: F,
    holds: impl Fn(&T) -> bool,
) -> Result<T, T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let holds = &holds;
    until(within, || {
        let reading = read();
        async move {
            let value = reading.await;
            if holds(&value) {
                Ok(value)
            } else {
                Err(value)
            }
        }
    })
    .await
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

/// Once one runtime execution (and `direct` direct ones) is recorded: the runtime's counted as
/// `outcome` (`success`, `error`, `timeout`).
pub async fn assert_one_runtime(server: &LocalServer, direct: u64, outcome: &str) {
    recorded(server, 1, direct).await;
    let name = format!("chat_execution_{outcome}_total");
    assert_eq!(
        super::assert::metric(server, &name, &[("mode", RT)]),
        1.0,
        "{name}"
    );
}

/// A port nothing listens on now (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "cutover-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `alone_in_process` for the test named `$test`, returning from it in the parent.
#[macro_export]
macro_rules! run_alone {
    ($test:literal) => {
        if !$crate::support::alone_in_process(module_path!(), $test) {
            return;
        }
    };
}

/// Run the calling test by itself in a child process of this test binary, for figures that are
/// per process (open file descriptors, RSS, bytes read): returns true in the child, which runs
/// the body, and false in the parent, which has already asserted that the child passed. `module`
/// is the caller's `module_path!()`, `test` its function's name.
pub fn alone_in_process(module: &str, test: &str) -> bool {
    const CHILD: &str = "CUTOVER_TEST_ALONE";
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    // The test's name in this binary: its module path without the crate's name.
    let suite = module.split_once("::").map_or("", |(_, suite)| suite);
    let test = &format!("{suite}::{test}");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, test)
        .status()
        .unwrap();
    assert!(status.success(), "{test} failed in its own process");
    false
}

type Handler = Box<dyn Fn(&Received) -> Reply + Send + Sync>;
type Tweak = Box<dyn FnOnce(&mut Config)>;
type StartLegacy<L> = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = L> + Send>> + Send>;
type Render = Box<dyn FnOnce(&str, &str) -> String>;

/// A server a proxy can be pointed at as its legacy Chat API.
pub trait LegacyServer {
    fn address(&self) -> String;
}

impl LegacyServer for Upstream {
    fn address(&self) -> String {
        Upstream::address(self)
    }
}

impl LegacyServer for super::legacy::FakeLegacy {
    fn address(&self) -> String {
        super::legacy::FakeLegacy::address(self)
    }
}

/// A legacy written by hand on this address (one that speaks raw bytes).
impl LegacyServer for std::net::SocketAddr {
    fn address(&self) -> String {
        self.to_string()
    }
}

/// An address nothing listens on, for a legacy that is down.
pub struct Unreachable(String);

impl Unreachable {
    pub fn new() -> Unreachable {
        Unreachable(format!("127.0.0.1:{}", free_port()))
    }
}

impl Default for Unreachable {
    fn default() -> Self {
        Unreachable::new()
    }
}

impl LegacyServer for Unreachable {
    fn address(&self) -> String {
        self.0.clone()
    }
}

/// Where the proxy's config comes from.
enum Source {
    /// `config` (org-a on the allowlist) and the tweaks.
    Default,
    /// A whole config file's text, made from the upstreams' addresses (legacy, runtime).
    Text(Render),
    /// That text written to this file, which the proxy watches for reloads as production does.
    Watched(PathBuf, Render),
}

/// A proxy to start between a legacy and a scripted runtime. Defaults: `echo_legacy`,
/// `healthy_runtime`, and `config` (org-a on the allowlist).
pub struct Harness<L = Upstream> {
    legacy: StartLegacy<L>,
    runtime: Handler,
    tweaks: Vec<Tweak>,
    source: Source,
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

impl Harness {
    pub fn new() -> Harness {
        Harness {
            legacy: scripted_legacy(echo_legacy),
            runtime: Box::new(healthy_runtime),
            tweaks: Vec::new(),
            source: Source::Default,
        }
    }
    pub fn legacy(mut self, script: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Self {
        self.legacy = scripted_legacy(script);
        self
    }
    /// Put a started server (the fake legacy Chat API) in the legacy's place.
    pub fn legacy_server<M: LegacyServer + Send + 'static>(self, legacy: M) -> Harness<M> {
        Harness {
            legacy: Box::new(move || Box::pin(async move { legacy })),
            runtime: self.runtime,
            tweaks: self.tweaks,
            source: self.source,
        }
    }
}

impl Harness {
    /// The conversation bridge on, with `legacy` (the fake legacy Chat API, or one nobody
    /// listens on) in the legacy's place.
    pub fn bridged<M: LegacyServer + Send + 'static>(self, legacy: M) -> Harness<M> {
        self.legacy_server(legacy)
            .config(|c| c.bridge.enabled = true)
    }
}

fn scripted_legacy(
    script: impl Fn(&Received) -> Reply + Send + Sync + 'static,
) -> StartLegacy<Upstream> {
    Box::new(move || Box::pin(Upstream::start(script)))
}

impl<L: LegacyServer> Harness<L> {
    pub fn runtime(mut self, script: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Self {
        self.runtime = Box::new(script);
        self
    }
    /// Change the config before the proxy starts; tweaks apply in order.
    pub fn config(mut self, tweak: impl FnOnce(&mut Config) + 'static) -> Self {
        self.tweaks.push(Box::new(tweak));
        self
    }
    /// The whole config file, from the legacy's and the runtime's addresses, instead of
    /// `config`'s (tweaks still apply after).
    pub fn config_text(mut self, text: impl FnOnce(&str, &str) -> String + 'static) -> Self {
        self.source = Source::Text(Box::new(text));
        self
    }
    /// Write the config file `text` makes from the legacy's and the runtime's addresses to
    /// `path`, start on it and watch it for reloads, as production does (no tweaks: a reload
    /// reads only the file).
    pub fn watched(
        mut self,
        path: PathBuf,
        text: impl FnOnce(&str, &str) -> String + 'static,
    ) -> Self {
        self.source = Source::Watched(path, Box::new(text));
        self
    }
    pub async fn start(self) -> Running<L> {
        let legacy = (self.legacy)().await;
        let runtime = Upstream::start(self.runtime).await;
        let (legacy_at, runtime_at) = (legacy.address(), runtime.address());
        let (mut cfg, watch) = match self.source {
            Source::Default => (config(&legacy_at, &runtime_at), None),
            Source::Text(render) => (
                Config::parse(&render(&legacy_at, &runtime_at)).unwrap(),
                None,
            ),
            Source::Watched(path, render) => {
                assert!(self.tweaks.is_empty(), "a watched config is the file alone");
                std::fs::write(&path, render(&legacy_at, &runtime_at)).unwrap();
                (Config::load(&path).unwrap(), Some(path))
            }
        };
        for tweak in self.tweaks {
            tweak(&mut cfg);
        }
        std::env::set_var(JWT_ENV, JWT_SECRET);
        std::env::set_var(ADMIN_ENV, ADMIN_TOKEN);
        let server = LocalServer::start(cfg, watch).await.unwrap();
        Running {
            legacy,
            runtime,
            server,
        }
    }
}

/// A started `Harness`: the proxy (its fields through `Deref`) and both upstreams.
pub struct Running<L = Upstream> {
    pub legacy: L,
    pub runtime: Upstream,
    pub server: LocalServer,
}

impl<L> Running<L> {
    /// Whether the breaker is in `state` (as its lock-free mirror says) within `within`.
    pub async fn breaker_becomes(
        &self,
        state: cutover_proxy::core::breaker::State,
        within: Duration,
    ) -> bool {
        let shared = self.shared.clone();
        eventually(within, move || shared.breaker.state() == state).await
    }

    /// The runtime's execution counts over the current stats window.
    pub fn runtime_window(&self) -> cutover_proxy::core::stats::WindowStats {
        let stats = self.shared.stats.lock().unwrap();
        stats.snapshot(Mode::RuntimeOrchestrator, Instant::now())
    }
}

impl<L> std::ops::Deref for Running<L> {
    type Target = LocalServer;
    fn deref(&self) -> &LocalServer {
        &self.server
    }
}

impl<L> Running<L> {
    /// A chat request as `org` with a valid token, body `HI`.
    pub fn chat(&self, org: &str) -> Chat {
        Chat {
            addr: self.server.proxy_addr,
            auth: Some(format!("Bearer {}", token(org))),
            session: "s-1".into(),
            body: HI.into(),
        }
    }
    /// A chat request with no Authorization header.
    pub fn anonymous_chat(&self) -> Chat {
        Chat {
            addr: self.server.proxy_addr,
            auth: None,
            session: "s-1".into(),
            body: HI.into(),
        }
    }
    /// An admin API call with the admin token.
    pub async fn admin(&self, method: &str, path: &str) -> (u16, serde_json::Value) {
        super::client::admin(&self.server, method, path, Some(ADMIN_TOKEN)).await
    }
    /// The instance's metric handles.
    pub fn metrics(&self) -> &'static cutover_proxy::state::metrics::Metrics {
        self.server.shared.metrics
    }
}

/// One chat request being built; `send` posts it on a fresh connection and reads the response.
pub struct Chat {
    addr: std::net::SocketAddr,
    auth: Option<String>,
    session: String,
    body: String,
}

impl Chat {
    pub fn session(mut self, session: &str) -> Self {
        self.session = session.into();
        self
    }
    pub fn body(mut self, body: &str) -> Self {
        self.body = body.into();
        self
    }
    /// Send this bearer token instead of a valid one for the org.
    pub fn bearer(mut self, token: &str) -> Self {
        self.auth = Some(format!("Bearer {token}"));
        self
    }
    pub async fn send(self) -> Response {
        let mut c = Client::connect(self.addr).await;
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = &self.auth {
            headers.push(("authorization", a.as_str()));
        }
        c.send(
            "POST",
            &format!("/api/v1/chat/sessions/{}", self.session),
            &headers,
            self.body.as_bytes(),
        )
        .await;
        c.read_response().await
    }
}
