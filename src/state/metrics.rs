//! Prometheus series, registered once per proxy instance on the registry it is given: production
//! uses the default registry that Pingora's crates share, each in-process test server its own.
//!
//! The first six names are the source document's and must not change; the rest are ours. Handles
//! are created once and passed around, never looked up by name on the hot path. Label values are
//! bounded: modes, reasons and outcomes are enums, and orgs are labelled only when the config names
//! them (everything else is `other`).

use std::collections::HashSet;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::core::timeouts::{Stage, UpstreamName};
use crate::upstream::bridge::BridgeMetrics;
use crate::upstream::TimeoutCounters;

/// Latency buckets for chat streams: tens of milliseconds to ten minutes.
const LATENCY_BUCKETS_MS: &[f64] = &[
    10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0, 30_000.0, 60_000.0,
    120_000.0, 300_000.0, 600_000.0,
];

/// Time to first event in seconds: a sidecar adds microseconds, the runtime seconds.
const FIRST_EVENT_BUCKETS_SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Latency buckets in seconds for our own series: tens of milliseconds to ten minutes.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

pub struct Metrics {
    // The source document's series.
    pub execution_total: IntCounterVec,
    pub execution_success_total: IntCounterVec,
    pub execution_error_total: IntCounterVec,
    pub execution_timeout_total: IntCounterVec,
    pub execution_latency_ms: HistogramVec,
    pub fallback_enabled: IntGauge,
    // Ours.
    pub execution_cancelled_total: IntCounterVec,
    pub requests_total: IntCounterVec,
    pub unverified_total: IntCounterVec,
    pub rejected_total: IntCounterVec,
    pub failover_total: IntCounter,
    pub streams_in_flight: IntGaugeVec,
    pub time_to_first_event_seconds: HistogramVec,
    pub sse_events_total: IntCounterVec,
    pub sse_dropped_frames_total: IntCounterVec,
    pub stream_errors_total: IntCounterVec,
    pub breaker_state: IntGaugeVec,
    pub breaker_transitions_total: IntCounterVec,
    pub breaker_opens_total: IntCounterVec,
    pub breaker_open_signal: IntGaugeVec,
    pub fleet_polls_total: IntCounterVec,
    pub fleet_signal_up: IntGauge,
    pub health_up: IntGauge,
    pub health_checks_total: IntCounterVec,
    pub config_reloads_total: IntCounterVec,
    pub config_last_reload_success: Gauge,
    pub config_file_valid: IntGauge,
    pub shadow_total: IntCounterVec,
    pub shadow_latency_seconds: HistogramVec,
    pub shadow_events_total: IntCounter,
    pub shadow_comparisons_total: IntCounterVec,
    pub shadow_ttfe_seconds: HistogramVec,
    pub shadow_runtime_timeouts_total: IntCounterVec,
    pub shadow_unpaired_total: IntCounterVec,
    pub file_requests_total: IntCounterVec,
    pub cors_mismatch_total: IntCounter,
    pub upstream_timeouts_total: IntCounterVec,
    pub bridge: BridgeMetrics,
    pub front_door: FrontDoorMetrics,
    pub commit: CommitMetrics,
    /// Where the series above are registered; `render` exposes it.
    registry: Registry,
}

fn reg<C: Collector + Clone + 'static>(r: &Registry, c: C) -> prometheus::Result<C> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    reg(r, IntCounter::new(name, help)?)
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    reg(r, IntCounterVec::new(Opts::new(name, help), labels)?)
}

fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    reg(r, IntGauge::new(name, help)?)
}

fn gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    reg(r, IntGaugeVec::new(Opts::new(name, help), labels)?)
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> prometheus::Result<HistogramVec> {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    reg(r, HistogramVec::new(opts, labels)?)
}

impl Metrics {
    /// Handles registered on `registry`, for the life of the process: every `Shared` keeps a
    /// `&'static Metrics`, so one instance is leaked per registry.
    pub fn leak_on(registry: Registry) -> &'static Metrics {
        Box::leak(Box::new(
            Metrics::register(registry).expect("metric names are unique in a fresh registry"),
        ))
    }

    /// Register every series on `registry`; fails if one of the names is already there.
    pub fn register(registry: Registry) -> prometheus::Result<Metrics> {
        let r = &registry;
        let m = Metrics {
            execution_total: counter_vec(
                r,
                "chat_execution_total",
                "Chat executions, by mode.",
                &["mode"]
            )?,
            execution_success_total: counter_vec(
                r,
                "chat_execution_success_total",
                "Chat executions that completed, by mode.",
                &["mode"]
            )?,
            execution_error_total: counter_vec(
                r,
                "chat_execution_error_total",
                "Chat executions that failed (non-2xx, connect failure, execution_error, truncated stream), by mode.",
                &["mode"]
            )?,
            execution_timeout_total: counter_vec(
                r,
                "chat_execution_timeout_total",
                "Chat executions that exceeded their timeout, by mode.",
                &["mode"]
            )?,
            execution_latency_ms: histogram_vec(
                r,
                "chat_execution_latency_ms",
                "Chat execution latency in milliseconds, by mode.",
                &["mode"],
                LATENCY_BUCKETS_MS
            )?,
            fallback_enabled: gauge(r, "chat_runtime_fallback_enabled", "1 while the breaker keeps the runtime out (open, half-open or tripped by hand).")?,
            execution_cancelled_total: counter_vec(
                r,
                "chat_execution_cancelled_total",
                "Chat executions the client abandoned; not counted against the upstream.",
                &["mode"]
            )?,
            requests_total: counter_vec(
                r,
                "chat_requests_total",
                "Chat requests by final mode, reason and org (orgs named in the config, else other).",
                &["mode", "reason", "org"]
            )?,
            unverified_total: counter_vec(
                r,
                "chat_identity_unverified_total",
                "Chat requests whose org could not be verified, by cause.",
                &["cause"]
            )?,
            rejected_total: counter_vec(
                r,
                "chat_requests_rejected_total",
                "Chat requests answered by the proxy itself with a 4xx, by cause.",
                &["cause"]
            )?,
            failover_total: counter(r, "chat_runtime_failover_total", "Runtime requests served by legacy because the runtime failed before the first byte.")?,
            streams_in_flight: gauge_vec(
                r,
                "chat_streams_in_flight",
                "Chat responses being streamed now, by mode.",
                &["mode"]
            )?,
            time_to_first_event_seconds: histogram_vec(
                r,
                "chat_time_to_first_event_seconds",
                "Seconds from request to the first response byte sent to the client, by mode.",
                &["mode"],
                FIRST_EVENT_BUCKETS_SECONDS
            )?,
            sse_events_total: counter_vec(
                r,
                "chat_sse_events_total",
                "Events written to clients on the runtime path, by client event or Agent2UI type.",
                &["type"]
            )?,
            sse_dropped_frames_total: counter_vec(
                r,
                "chat_sse_dropped_frames_total",
                "Runtime frames dropped, by cause (malformed, unknown_event, after_done).",
                &["cause"]
            )?,
            stream_errors_total: counter_vec(
                r,
                "chat_runtime_stream_errors_total",
                "Runtime streams that ended with an error event, by code.",
                &["code"]
            )?,
            breaker_state: gauge_vec(
                r,
                "chat_runtime_breaker_state",
                "1 for the breaker's current state, 0 for the others.",
                &["state"]
            )?,
            breaker_transitions_total: counter_vec(
                r,
                "chat_runtime_breaker_transitions_total",
                "Breaker state changes.",
                &["from", "to"]
            )?,
            breaker_opens_total: counter_vec(
                r,
                "chat_runtime_breaker_opens_total",
                "Breaker openings, by the signal that opened it (local, fleet, health, probe, manual).",
                &["signal"]
            )?,
            breaker_open_signal: gauge_vec(
                r,
                "chat_runtime_breaker_open_signal",
                "1 for the signal that keeps the breaker from closed (local, fleet, health, probe, manual), 0 for the others; all 0 while closed.",
                &["signal"]
            )?,
            fleet_polls_total: counter_vec(
                r,
                "cutover_fleet_polls_total",
                "Polls of the fleet's runtime outcomes from [fleet] prometheus_url, by result (ok; unavailable: unreachable, slow or 5xx; invalid: an answer that is not the fleet's counts).",
                &["result"]
            )?,
            fleet_signal_up: gauge(r, "cutover_fleet_signal_up", "1 while the last poll of [fleet] prometheus_url gave the breaker a reading; 0 when it failed or [fleet] is off.")?,
            health_up: gauge(r, "chat_runtime_health_up", "1 when the last runtime health check passed.")?,
            health_checks_total: counter_vec(
                r,
                "chat_runtime_health_checks_total",
                "Runtime health checks, by result.",
                &["result"]
            )?,
            config_reloads_total: counter_vec(
                r,
                "cutover_config_reloads_total",
                "Config reload attempts, by result (success, invalid).",
                &["result"]
            )?,
            config_file_valid: gauge(r, "cutover_config_file_valid", "0 while the config file on disk is refused (the last good config stays in force), 1 otherwise.")?,
            config_last_reload_success: reg(r, Gauge::new("cutover_config_last_reload_success_timestamp_seconds", "Unix time of the last config load that took effect.")?)?,
            shadow_total: counter_vec(
                r,
                "chat_shadow_total",
                "Shadow requests mirrored to the runtime, by outcome (success, error, timeout, skipped).",
                &["outcome"]
            )?,
            shadow_latency_seconds: histogram_vec(
                r,
                "chat_shadow_latency_seconds",
                "Seconds shadow runtime executions took, by outcome.",
                &["outcome"],
                LATENCY_BUCKETS_SECONDS
            )?,
            shadow_events_total: counter(r, "chat_shadow_events_total", "Runtime events received on shadow streams.")?,
            shadow_comparisons_total: counter_vec(
                r,
                "cutover_shadow_comparisons_total",
                "Shadow copies compared with the legacy answer the client got, by result (both_ok, runtime_failed, legacy_failed, both_failed); org only for rollout.shadow_orgs, else empty.",
                &["result", "org"]
            )?,
            shadow_ttfe_seconds: histogram_vec(
                r,
                "cutover_shadow_ttfe_seconds",
                "Seconds to the first event of compared shadow requests, by path (legacy, runtime); org only for rollout.shadow_orgs, else empty. Its bins are the scorecard's, so the fleet's sums are judged like one replica's.",
                &["path", "org"],
                &crate::core::scorecard::TTFE_BOUNDS_SECONDS
            )?,
            shadow_runtime_timeouts_total: counter_vec(
                r,
                "cutover_shadow_runtime_timeouts_total",
                "Compared shadow copies whose runtime execution timed out (counted as runtime_failed or both_failed too); org only for rollout.shadow_orgs, else empty.",
                &["org"]
            )?,
            shadow_unpaired_total: counter_vec(
                r,
                "cutover_shadow_unpaired_total",
                "Shadowed requests that gave no comparison, by cause (client_gone: the client abandoned the legacy stream; copy_skipped: the copy could not run; legacy_undecodable: legacy's answer had a content coding that could not be decoded).",
                &["cause"]
            )?,
            file_requests_total: counter_vec(
                r,
                "cutover_runtime_file_requests_total",
                "Requests on the runtime files route, by result (served, refused, failed).",
                &["result"]
            )?,
            cors_mismatch_total: counter(r, "cutover_cors_mismatch_total", "Legacy chat answers whose CORS headers differ from those [cors] gives the proxy's own responses to the same request.")?,
            upstream_timeouts_total: counter_vec(
                r,
                "cutover_upstream_timeouts_total",
                "Upstream deadlines that passed, by upstream (legacy, runtime) and stage (connect: no connection; response: no response head; idle: silent inside a response).",
                &["upstream", "stage"]
            )?,
            bridge: register_bridge(r)?,
            front_door: FrontDoorMetrics::register(r)?,
            commit: CommitMetrics::register(r)?,
            registry: registry.clone(),
        };
        for state in ["closed", "open", "half_open"] {
            m.breaker_state
                .with_label_values(&[state])
                .set(i64::from(state == "closed"));
        }
        m.init_label_values();
        Ok(m)
    }

    /// Export every bounded label value at 0 from startup. A counter child that appears at 1
    /// is invisible to `rate()`/`increase()`, so without this the first error of a mode, the
    /// first refused config or the first breaker trip would never reach the alerts
    /// (deploy/prometheus/rules.yml). Labels with open-ended values (org, reason, type, code,
    /// cause of identity failures) are left to appear on first use.
    fn init_label_values(&self) {
        for mode in ["direct_llm", "runtime_orchestrator"] {
            for c in [
                &self.execution_total,
                &self.execution_success_total,
                &self.execution_error_total,
                &self.execution_timeout_total,
                &self.execution_cancelled_total,
            ] {
                c.with_label_values(&[mode]);
            }
            self.execution_latency_ms.with_label_values(&[mode]);
            self.time_to_first_event_seconds.with_label_values(&[mode]);
            self.streams_in_flight.with_label_values(&[mode]);
        }
        // Every transition the breaker can make (a reset closes from open or half-open).
        for (from, to) in [
            ("closed", "open"),
            ("open", "half_open"),
            ("half_open", "closed"),
            ("half_open", "open"),
            ("open", "closed"),
        ] {
            self.breaker_transitions_total
                .with_label_values(&[from, to]);
        }
        for result in ["ok", "failed"] {
            self.health_checks_total.with_label_values(&[result]);
        }
        for signal in crate::core::breaker::Signal::ALL {
            self.breaker_opens_total
                .with_label_values(&[signal.as_str()]);
            self.breaker_open_signal
                .with_label_values(&[signal.as_str()]);
        }
        for result in ["ok", "unavailable", "invalid"] {
            self.fleet_polls_total.with_label_values(&[result]);
        }
        for result in ["success", "invalid"] {
            self.config_reloads_total.with_label_values(&[result]);
        }
        for cause in ["malformed", "unknown_event", "after_done"] {
            self.sse_dropped_frames_total.with_label_values(&[cause]);
        }
        for outcome in ["success", "error", "timeout", "skipped"] {
            self.shadow_total.with_label_values(&[outcome]);
        }
        for result in crate::core::scorecard::ComparisonResult::ALL {
            self.shadow_comparisons_total
                .with_label_values(&[result.as_str(), ""]);
        }
        for path in ["legacy", "runtime"] {
            self.shadow_ttfe_seconds.with_label_values(&[path, ""]);
        }
        self.shadow_runtime_timeouts_total.with_label_values(&[""]);
        for cause in ["client_gone", "copy_skipped", "legacy_undecodable"] {
            self.shadow_unpaired_total.with_label_values(&[cause]);
        }
        for result in ["served", "refused", "failed"] {
            self.file_requests_total.with_label_values(&[result]);
        }
        for upstream in UpstreamName::ALL {
            for stage in Stage::ALL {
                self.upstream_timeouts_total
                    .with_label_values(&[upstream.as_str(), stage.as_str()]);
            }
        }
    }

    /// `cutover_upstream_timeouts_total` of one upstream, resolved once for its connections.
    pub fn upstream_timeouts(&self, upstream: UpstreamName) -> TimeoutCounters {
        let c = |stage: Stage| {
            self.upstream_timeouts_total
                .with_label_values(&[upstream.as_str(), stage.as_str()])
        };
        TimeoutCounters {
            upstream,
            connect: c(Stage::Connect),
            response: c(Stage::Response),
            idle: c(Stage::Idle),
        }
    }

    /// Export the shadow series of the orgs on `rollout.shadow_orgs` at 0, as the bounded
    /// labels are from startup, so the fleet's recording rules see an org's first comparison
    /// and a result it has not had yet reads 0, not absent. An org taken off the list keeps its
    /// series until restart: still bounded by what the config ever named.
    pub fn init_shadow_orgs(&self, orgs: &[String]) {
        for org in orgs {
            for result in crate::core::scorecard::ComparisonResult::ALL {
                self.shadow_comparisons_total
                    .with_label_values(&[result.as_str(), org]);
            }
            for path in ["legacy", "runtime"] {
                self.shadow_ttfe_seconds.with_label_values(&[path, org]);
            }
            self.shadow_runtime_timeouts_total.with_label_values(&[org]);
        }
    }

    /// One shadow comparison, under `org` (the label: an org of `rollout.shadow_orgs`, else
    /// empty): its result, each side's time to first event and a runtime timeout.
    pub fn observe_comparison(&self, org: &str, c: &crate::core::scorecard::Comparison) {
        self.shadow_comparisons_total
            .with_label_values(&[c.result().as_str(), org])
            .inc();
        for (path, side) in [("legacy", &c.legacy), ("runtime", &c.runtime)] {
            if let Some(t) = side.ttfe {
                self.shadow_ttfe_seconds
                    .with_label_values(&[path, org])
                    .observe(t.as_secs_f64());
            }
        }
        if c.runtime.outcome == crate::core::stats::Outcome::Timeout {
            self.shadow_runtime_timeouts_total
                .with_label_values(&[org])
                .inc();
        }
    }

    /// Mirror what holds the breaker from closed (none while closed) into its gauge.
    pub fn set_open_signal(&self, signal: Option<crate::core::breaker::Signal>) {
        for s in crate::core::breaker::Signal::ALL {
            self.breaker_open_signal
                .with_label_values(&[s.as_str()])
                .set(i64::from(Some(s) == signal));
        }
    }

    /// Mirror a breaker state ("closed" | "open" | "half_open") into the gauges.
    pub fn set_breaker_state(&self, state: &str) {
        for s in ["closed", "open", "half_open"] {
            self.breaker_state
                .with_label_values(&[s])
                .set(i64::from(s == state));
        }
        self.fallback_enabled.set(i64::from(state != "closed"));
    }
}

impl Metrics {
    /// The registry this instance's series are on.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition of this instance's series, then of the default registry's (Pingora's
    /// own, and ours in production, where the two are one registry): a family already written is
    /// not written again, since Prometheus refuses a scrape that repeats one.
    pub fn render(&self) -> Vec<u8> {
        let mut families = self.registry.gather();
        let seen: HashSet<String> = families.iter().map(|f| f.name().to_string()).collect();
        families.extend(
            prometheus::gather()
                .into_iter()
                .filter(|f| !seen.contains(f.name())),
        );
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding only fails on a malformed metric family, which registration already ruled out.
        let _ = TextEncoder::new().encode(&families, &mut out);
        out
    }
}

/// The conversation bridge's series: its calls to legacy, its cache and the assistant messages
/// it could not save. Labels are the bridge's routes and results, all exported at 0 from
/// startup so the alerts see the first failure.
/// The client-facing HTTP/1 front door (`proxy::front_door`).
pub struct FrontDoorMetrics {
    pub rejections_total: IntCounterVec,
    pub connections: IntGauge,
    /// `cutover_front_door_requests_total` by path, resolved once: counted on every request.
    pub served_lean_passthrough: IntCounter,
    pub served_lean_runtime: IntCounter,
    pub served_pingora: IntCounter,
}

impl FrontDoorMetrics {
    fn register(r: &Registry) -> prometheus::Result<FrontDoorMetrics> {
        let served = counter_vec(
            r,
            "cutover_front_door_requests_total",
            "Client requests by what served them: the front door's own lean paths (lean_passthrough, lean_runtime) or Pingora's proxy (pingora).",
            &["path"],
        )?;
        let m = FrontDoorMetrics {
            served_lean_passthrough: served.with_label_values(&["lean_passthrough"]),
            served_lean_runtime: served.with_label_values(&["lean_runtime"]),
            served_pingora: served.with_label_values(&["pingora"]),
            rejections_total: counter_vec(
                r,
                "cutover_front_door_rejections_total",
                "Client requests and connections the front door refused before the proxy saw them, by reason.",
                &["reason"]
            )?,
            connections: gauge(
                r,
                "cutover_front_door_connections",
                "Client connections open now, all workers."
            )?,
        };
        for reason in crate::core::request_head::REASONS {
            m.rejections_total.with_label_values(&[reason]);
        }
        Ok(m)
    }
}

/// Calls to legacy: a pooled loopback call is a tenth of a millisecond, the bridge's timeout a few
/// seconds.
const BRIDGE_BUCKETS_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

fn register_bridge(r: &Registry) -> prometheus::Result<BridgeMetrics> {
    let m = BridgeMetrics {
        requests_total: counter_vec(
            r,
            "cutover_bridge_requests_total",
            "Conversation bridge calls to legacy, by route and result (ok, refused, unavailable, invalid_id: an unsafe id never sent).",
            &["route", "result"]
        )?,
        request_duration_seconds: histogram_vec(
            r,
            "cutover_bridge_request_duration_seconds",
            "Duration of conversation bridge calls to legacy in seconds, by route.",
            &["route"],
            BRIDGE_BUCKETS_SECONDS
        )?,
        cache_hits_total: counter_vec(
            r,
            "cutover_bridge_cache_hits_total",
            "Session agent ids and agent configs served from the bridge cache, by cache.",
            &["cache"]
        )?,
        cache_misses_total: counter_vec(
            r,
            "cutover_bridge_cache_misses_total",
            "Bridge cache lookups that had to ask legacy, by cache.",
            &["cache"]
        )?,
        cache_entries: gauge_vec(
            r,
            "cutover_bridge_cache_entries",
            "Entries in the bridge cache now, by cache.",
            &["cache"]
        )?,
        persist_failures_total: counter(
            r,
            "cutover_bridge_persist_failures_total",
            "Chat messages (user or assistant) legacy did not save after every attempt, or still unsaved at shutdown; each is logged whole."
        )?,
        persist_pending: gauge(
            r,
            "cutover_bridge_persist_pending",
            "Chat messages whose save is not settled yet: retried in the background with backoff, or waiting for an earlier save of the same chat."
        )?,
        detached_total: counter_vec(
            r,
            "cutover_bridge_detached_total",
            "Runtime executions read to their end after the client left (bridge.finish_detached), by result: saved, failed, timeout, dropped (beyond bridge.max_detached), shutdown.",
            &["result"]
        )?,
        detached: gauge(
            r,
            "cutover_bridge_detached",
            "Runtime executions being read to their end now for clients that left."
        )?,
    };
    for result in BridgeMetrics::DETACHED_RESULTS {
        m.detached_total.with_label_values(&[result]);
    }
    for route in BridgeMetrics::ROUTES {
        for result in BridgeMetrics::RESULTS {
            m.requests_total.with_label_values(&[route, result]);
        }
        m.request_duration_seconds.with_label_values(&[route]);
    }
    for cache in BridgeMetrics::CACHES {
        m.cache_hits_total.with_label_values(&[cache]);
        m.cache_misses_total.with_label_values(&[cache]);
        m.cache_entries.with_label_values(&[cache]);
    }
    Ok(m)
}

/// The commit point's series: why streams were committed, how long the client's head was held,
/// and failovers by the stage the runtime failed at. Every label is exported at 0 from startup.
pub struct CommitMetrics {
    pub commits_total: IntCounterVec,
    pub wait_seconds: prometheus::Histogram,
    pub failovers_total: IntCounterVec,
}

/// Head to commit: nothing for `commit_timeout_ms = 0`, up to the commit timeout (5 s default).
const COMMIT_WAIT_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl CommitMetrics {
    /// Where the runtime failed when legacy served the request: before its response head
    /// (refused, non-2xx, connect failure), after it but before the commit with the client's
    /// head held, or before content with the client's stream open (`pre_content = "stream"`:
    /// legacy's answer continued the stream).
    pub const STAGES: [&'static str; 3] = ["before_head", "before_commit", "in_stream"];

    fn register(r: &Registry) -> prometheus::Result<CommitMetrics> {
        // One unlabelled child, looked up once here rather than per stream.
        let wait_seconds = histogram_vec(
            r,
            "cutover_commit_wait_seconds",
            "Seconds from the runtime's response head to the commit (with pre_content = hold the client's head is held meanwhile).",
            &[],
            COMMIT_WAIT_BUCKETS_SECONDS
        )?
        .with_label_values::<&str>(&[]);
        let m = CommitMetrics {
            commits_total: counter_vec(
                r,
                "cutover_commit_total",
                "Runtime streams committed to, by trigger (head, content, first_event, timeout, heartbeat, cancel, overflow, deadline, shutdown).",
                &["trigger"]
            )?,
            wait_seconds,
            failovers_total: counter_vec(
                r,
                "cutover_runtime_failovers_total",
                "Runtime requests served by legacy because the runtime failed before its first content, by stage (before_head, before_commit, in_stream).",
                &["stage"]
            )?,
        };
        for trigger in crate::core::commit::Trigger::ALL {
            m.commits_total.with_label_values(&[trigger.as_str()]);
        }
        for stage in Self::STAGES {
            m.failovers_total.with_label_values(&[stage]);
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_document_names_are_exported() {
        let m = Metrics::register(Registry::new()).unwrap();
        for mode in ["direct_llm", "runtime_orchestrator"] {
            m.execution_total.with_label_values(&[mode]).inc_by(0);
            m.execution_success_total
                .with_label_values(&[mode])
                .inc_by(0);
            m.execution_error_total.with_label_values(&[mode]).inc_by(0);
            m.execution_timeout_total
                .with_label_values(&[mode])
                .inc_by(0);
            m.execution_latency_ms
                .with_label_values(&[mode])
                .observe(1.0);
        }
        let text = String::from_utf8(m.render()).unwrap();
        for name in [
            "chat_execution_total{mode=\"direct_llm\"}",
            "chat_execution_success_total{mode=\"runtime_orchestrator\"}",
            "chat_execution_error_total{mode=\"direct_llm\"}",
            "chat_execution_timeout_total{mode=\"runtime_orchestrator\"}",
            "chat_execution_latency_ms_bucket{mode=\"direct_llm\",le=\"10\"}",
            "chat_runtime_fallback_enabled ",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }

    #[test]
    fn breaker_state_gauges_are_one_hot() {
        let m = Metrics::register(Registry::new()).unwrap();
        m.set_breaker_state("open");
        assert_eq!(m.breaker_state.with_label_values(&["open"]).get(), 1);
        assert_eq!(m.breaker_state.with_label_values(&["closed"]).get(), 0);
        assert_eq!(m.fallback_enabled.get(), 1);
        m.set_breaker_state("closed");
        assert_eq!(m.fallback_enabled.get(), 0);
    }
}
