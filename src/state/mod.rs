//! State shared by the proxy, the admin API and the background services.
//!
//! The config lives in an `ArcSwap<Active>`: a request takes one snapshot at its start and keeps
//! it to the end, so a reload never changes the rules under a request in flight.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::core::agent2ui::MapSettings;
use crate::core::breaker::{Breaker, BreakerSettings, SharedBreaker};
use crate::core::config::Config;
use crate::core::cors::{CorsHeaders, CorsPolicy};
use crate::core::files::{FileKey, FileSigner};
use crate::core::fleet::FleetStatus;
use crate::core::forwarded::{Hop, TrustedProxies};
use crate::core::identity::Verifier;
use crate::core::routing::Rollout;
use crate::core::scorecard::Scorecard;
use crate::core::stats::ExecutionStats;
use crate::upstream::bridge::{Bridge, Target};
use crate::upstream::{Resolver, Tcp, Timeouts, Upstream, UpstreamName};

pub mod in_flight;
pub mod metrics;

use in_flight::{Detached, InFlightRequests};
use metrics::Metrics;

/// One validated config, compiled for the hot path.
pub struct Active {
    pub config: Config,
    pub rollout: Rollout,
    pub verifier: Verifier,
    /// Legacy's policy, for every call to it: the lean passthrough, the bridge, Pingora's proxy.
    pub legacy: Timeouts,
    /// `legacy.address` when it is an IP literal, parsed once here rather than per request.
    pub legacy_literal: Option<std::net::SocketAddr>,
    /// The runtime's policy: its streams, shadow copies, files and health checks.
    pub runtime: Timeouts,
    /// Where the conversation bridge finds legacy, and its routes; shared with each bridged
    /// stream, which keeps it until its answer is saved.
    pub bridge: Arc<Target>,
    /// `identity.trusted_proxies`: whose `X-Forwarded-*` headers are kept.
    pub trusted_proxies: TrustedProxies,
    /// The admin bearer token (from the env var the config names); `None` refuses mutations.
    pub admin_token: Option<String>,
    /// The key runtime file links are signed and checked with; `None` when there is neither a
    /// link secret nor a JWT secret to derive one from (links are then unsigned, and refused).
    pub file_key: Option<FileKey>,
    /// CORS on the proxy's own responses (`[cors]`, its origin perhaps from legacy's env var).
    pub cors: CorsPolicy,
    /// A drift between `cors` and legacy's own answers was logged (once per config).
    pub cors_drift_logged: AtomicBool,
}

impl Active {
    /// Compile a config; secrets are read from the environment variables it names.
    pub fn new(config: Config) -> Active {
        let verifier = Verifier::from_env(&config.identity);
        let admin_token = std::env::var(&config.admin.token_env)
            .ok()
            .filter(|t| !t.is_empty());
        let file_key = file_key(&config);
        let env_origin = Some(config.cors.origin_env.as_str())
            .filter(|name| !name.is_empty())
            .and_then(|name| std::env::var(name).ok());
        let cors = CorsPolicy::new(&config.cors, env_origin.as_deref());
        Active {
            cors,
            cors_drift_logged: AtomicBool::new(false),
            rollout: Rollout::new(&config.rollout),
            verifier,
            legacy: Timeouts::legacy(&config),
            legacy_literal: config.legacy.address.parse().ok(),
            runtime: Timeouts::runtime(&config),
            admin_token,
            file_key,
            bridge: Arc::new(Target::of(&config)),
            // Validated with the config.
            trusted_proxies: TrustedProxies::parse(&config.identity.trusted_proxies)
                .unwrap_or_default(),
            config,
        }
    }

    /// The CORS headers of the proxy's own answer to a request with these headers.
    pub fn cors_for(&self, request: &http::HeaderMap) -> CorsHeaders {
        let origin = request.get(http::header::ORIGIN).map(|v| v.as_bytes());
        self.cors.headers(origin)
    }

    /// How the stream of a runtime chat for `org` is written: the client event cap, and file
    /// links signed for that org.
    pub fn map_settings(&self, org: &str) -> MapSettings {
        MapSettings {
            max_client_event_bytes: self.config.limits.max_client_event_bytes,
            files: self.file_key.clone().map(|key| FileSigner {
                key,
                org: org.to_owned(),
                ttl_secs: self.config.runtime.file_url_ttl_secs,
            }),
        }
    }

    /// Where a request comes from, for its `X-Forwarded-*` headers.
    pub fn hop(&self, peer: Option<std::net::IpAddr>) -> Hop {
        Hop::of(peer, &self.trusted_proxies)
    }

    /// Label value for an org: only orgs the config names (allowlist, denylist, shadow list), so
    /// the series stay bounded and `rollout status` sees the mode of every org it judges.
    pub fn org_label<'a>(&self, org: Option<&'a str>) -> &'a str {
        match org {
            Some(o) if self.rollout.names(o) || !self.shadow_org_label(o).is_empty() => o,
            _ => "other",
        }
    }

    /// The `org` label of the shadow series: the org when `rollout.shadow_orgs` names it, else
    /// empty (which Prometheus reads as no label), so there is one label set, bounded by the
    /// config.
    pub fn shadow_org_label<'a>(&self, org: &'a str) -> &'a str {
        if self.config.rollout.shadow_orgs.iter().any(|o| o == org) {
            org
        } else {
            ""
        }
    }
}

/// The link key from `runtime.file_url_secret_env`, else derived from the JWT secret. Derived
/// from no secret at all it would be a key anyone can compute, so there is none then.
fn file_key(config: &Config) -> Option<FileKey> {
    let env = |name: &str| {
        (!name.is_empty())
            .then(|| std::env::var(name).ok())
            .flatten()
            .filter(|v| !v.is_empty())
    };
    let explicit = env(&config.runtime.file_url_secret_env);
    let jwt = env(&config.identity.jwt_secret_env);
    if explicit.is_none() && jwt.is_none() {
        return None;
    }
    Some(FileKey::resolve(
        explicit.as_deref(),
        jwt.as_deref().unwrap_or_default().as_bytes(),
    ))
}

pub struct Shared {
    pub active: ArcSwap<Active>,
    pub breaker: SharedBreaker,
    pub stats: Mutex<ExecutionStats>,
    /// Shadow copies compared with their legacy answers, per org: `GET /runtime/shadow`.
    pub scorecard: Mutex<Scorecard>,
    /// Where the fleet signal's poller stands.
    pub fleet: FleetStatus,
    pub metrics: &'static Metrics,
    /// The runtime's client: executions, shadow copies, files, health checks.
    pub runtime: Upstream,
    /// Legacy's client for what the proxy asks it itself: the lean passthrough, the bridge.
    pub legacy: Arc<Upstream>,
    /// Legacy's address for Pingora's proxy.
    pub resolver: Resolver,
    /// The conversation bridge's legacy connections and cache.
    pub bridge: Arc<Bridge>,
    /// Executions read to their end for clients that left (`bridge.finish_detached`).
    pub detached: Detached,
    /// Set on SIGTERM: readiness fails and streams are told to finish.
    pub draining: AtomicBool,
    /// Raised when the shutdown grace period is over: relays end their streams with an error
    /// event instead of having the connection cut.
    pub cutoff: tokio::sync::watch::Sender<bool>,
    /// Shadow requests in flight now.
    pub shadow_in_flight: std::sync::atomic::AtomicUsize,
    pub started: Instant,
    /// Every proxied request in flight, for the shutdown drain.
    pub requests: Arc<InFlightRequests>,
}

impl Shared {
    /// A proxy instance with its series on a registry of its own, so that instances in one
    /// process (tests, benchmarks) do not count into each other's.
    pub fn new(config: Config) -> Arc<Shared> {
        Shared::on_registry(config, prometheus::Registry::new())
    }

    /// A proxy instance with its series on `registry` (production: the default registry, where
    /// Pingora's series are too).
    pub fn on_registry(config: Config, registry: prometheus::Registry) -> Arc<Shared> {
        let now = Instant::now();
        let metrics = Metrics::leak_on(registry);
        let breaker = SharedBreaker::new(Breaker::new(BreakerSettings::from_config(&config), now));
        breaker.on_transition(move |t| {
            metrics
                .breaker_transitions_total
                .with_label_values(&[t.from.as_str(), t.to.as_str()])
                .inc();
            metrics.set_breaker_state(t.to.as_str());
            if let Some(signal) = t.signal {
                metrics
                    .breaker_opens_total
                    .with_label_values(&[signal.as_str()])
                    .inc();
                metrics.set_open_signal(Some(signal));
            } else if t.to == crate::core::breaker::State::Closed {
                metrics.set_open_signal(None);
            }
        });
        metrics.set_breaker_state(breaker.state().as_str());
        metrics.init_shadow_orgs(&config.rollout.shadow_orgs);
        let stats = ExecutionStats::new(
            Duration::from_secs(config.breaker.window_secs),
            config.limits.max_tracked_orgs,
            now,
        );
        let scorecard = Scorecard::new(
            Duration::from_secs(config.breaker.window_secs),
            config.limits.max_tracked_orgs,
            now,
        );
        let legacy = Arc::new(Upstream::new(
            Tcp,
            metrics.upstream_timeouts(UpstreamName::Legacy),
        ));
        let bridge = Arc::new(Bridge::new(&config.bridge, &metrics.bridge).calling(legacy.clone()));
        Arc::new(Shared {
            active: ArcSwap::from_pointee(Active::new(config)),
            breaker,
            stats: Mutex::new(stats),
            scorecard: Mutex::new(scorecard),
            fleet: FleetStatus::default(),
            metrics,
            runtime: Upstream::new(Tcp, metrics.upstream_timeouts(UpstreamName::Runtime)),
            legacy,
            resolver: Resolver::default(),
            bridge,
            detached: Detached::default(),
            draining: AtomicBool::new(false),
            cutoff: tokio::sync::watch::channel(false).0,
            shadow_in_flight: Default::default(),
            started: now,
            requests: Arc::default(),
        })
    }

    pub fn snapshot(&self) -> Arc<Active> {
        self.active.load_full()
    }

    /// Swap in a new config; requests in flight keep the one they started with.
    pub fn apply(&self, config: Config) {
        let now = Instant::now();
        self.breaker
            .set_settings(BreakerSettings::from_config(&config));
        self.stats.lock().unwrap().reconfigure(
            Duration::from_secs(config.breaker.window_secs),
            config.limits.max_tracked_orgs,
            now,
        );
        self.scorecard.lock().unwrap().reconfigure(
            Duration::from_secs(config.breaker.window_secs),
            config.limits.max_tracked_orgs,
        );
        self.metrics.init_shadow_orgs(&config.rollout.shadow_orgs);
        self.bridge.configure(&config.bridge);
        self.active.store(Arc::new(Active::new(config)));
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}
