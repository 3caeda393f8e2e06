//! The admin API (`admin_listen`) and the Prometheus endpoint (`metrics_listen`).
//!
//! JSON shaped like the source document's monitoring API; mutations need the admin bearer token,
//! compared in constant time, and are refused outright when no token is configured.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::core::config::Mode;
use crate::core::scorecard::{Scorecard, Thresholds};
use crate::state::Shared;

pub struct AdminApp {
    shared: Arc<Shared>,
}

impl AdminApp {
    pub fn new(shared: Arc<Shared>) -> Self {
        AdminApp { shared }
    }

    /// Judge the shadow scorecard by the thresholds of the config in force.
    fn judge_shadow<T>(&self, judge: impl FnOnce(&Scorecard, &Thresholds) -> T) -> T {
        let thresholds = Thresholds::from_config(&self.shared.snapshot().config);
        judge(&self.shared.scorecard.lock().unwrap(), &thresholds)
    }

    fn authorized(&self, session: &ServerSession) -> Result<(), &'static str> {
        let active = self.shared.snapshot();
        let Some(expected) = active.admin_token.as_deref() else {
            return Err("admin mutations are disabled: no admin token is configured");
        };
        let given = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            // The auth scheme is case-insensitive (RFC 9110, 11.1).
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim_start());
        if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            Ok(())
        } else {
            Err("missing or invalid admin bearer token")
        }
    }

    /// `{"success":true,"data":{"fallbackEnabled","fallbackReason","state"}}`: exactly the
    /// contract's fields (a manual trip shows in the reason, "tripped manually"; an opening by
    /// the fleet's readings starts with "fleet:").
    fn fallback_status(&self) -> Value {
        let status = self.shared.breaker.report();
        json!({"success": true, "data": {
            "fallbackEnabled": status.fallback_enabled(),
            "fallbackReason": status.reason,
            "state": status.state.as_str(),
        }})
    }

    /// `GET /runtime/fleet`: `{"success":true,"data":{"openedBy","state","detail","lastReading"}}`:
    /// what holds the breaker from closed (`local`, `fleet`, `health`, `probe`, `manual`; null
    /// while closed) and where the fleet signal stands (`off`, `ok`, `unavailable`, `invalid`).
    fn fleet_status(&self) -> Value {
        let status = self.shared.breaker.report();
        let mut data = self.shared.fleet.to_json(Instant::now());
        data["openedBy"] = json!(status.signal);
        json!({"success": true, "data": data})
    }

    fn route(&self, method: &Method, path: &str, session: &ServerSession) -> (StatusCode, Value) {
        let now = Instant::now();
        let path = path
            .strip_suffix('/')
            .filter(|p| !p.is_empty())
            .unwrap_or(path);
        match (method.as_str(), path) {
            ("GET", "/healthz") => (StatusCode::OK, json!({"status": "ok"})),
            ("GET", "/readyz") => {
                if self.shared.is_draining() {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"status": "draining"}),
                    )
                } else {
                    (StatusCode::OK, json!({"status": "ready"}))
                }
            }
            ("GET", "/runtime/metrics") => {
                let status = self.shared.breaker.report();
                let stats = self.shared.stats.lock().unwrap();
                (
                    StatusCode::OK,
                    json!({"success": true, "data": {
                        "direct": stats.snapshot(Mode::DirectLlm, now),
                        "runtime": stats.snapshot(Mode::RuntimeOrchestrator, now),
                        "fallbackEnabled": status.fallback_enabled(),
                        "fallbackReason": status.reason,
                    }}),
                )
            }
            ("GET", "/runtime/fallback/status") => (StatusCode::OK, self.fallback_status()),
            ("GET", "/runtime/fleet") => (StatusCode::OK, self.fleet_status()),
            ("POST", "/runtime/fallback/reset") | ("POST", "/runtime/fallback/trip") => {
                if let Err(why) = self.authorized(session) {
                    return (
                        StatusCode::UNAUTHORIZED,
                        json!({"success": false, "error": why}),
                    );
                }
                if path.ends_with("/reset") {
                    tracing::warn!("breaker reset by hand through the admin API");
                    self.shared.breaker.reset();
                } else {
                    tracing::warn!("breaker tripped by hand through the admin API");
                    self.shared.breaker.trip();
                }
                (StatusCode::OK, self.fallback_status())
            }
            ("GET", p) if p.starts_with("/runtime/metrics/") => {
                let org = &p["/runtime/metrics/".len()..];
                if org.is_empty() || org.contains('/') {
                    return not_found();
                }
                let stats = self.shared.stats.lock().unwrap();
                let (direct, runtime) = stats.org_snapshot(org, now).unwrap_or_default();
                (
                    StatusCode::OK,
                    json!({"success": true, "data": {
                        "orgId": org,
                        "direct": direct,
                        "runtime": runtime,
                    }}),
                )
            }
            ("GET", "/runtime/shadow") => {
                let orgs = self.judge_shadow(|card, t| card.reports(t, now));
                (
                    StatusCode::OK,
                    json!({"success": true, "data": {"orgs": orgs}}),
                )
            }
            ("GET", p) if p.starts_with("/runtime/shadow/") => {
                let org = &p["/runtime/shadow/".len()..];
                if org.is_empty() || org.contains('/') {
                    return not_found();
                }
                let report = self.judge_shadow(|card, t| card.report(org, t, now));
                match report {
                    Some(s) => (StatusCode::OK, json!({"success": true, "data": s})),
                    // Never compared here (or evicted): nothing to judge, as for any unknown path.
                    None => (
                        StatusCode::NOT_FOUND,
                        json!({"success": false, "error": "no shadow comparisons for this org"}),
                    ),
                }
            }
            (_, "/healthz" | "/readyz" | "/runtime/metrics" | "/runtime/fallback/status")
            | (_, "/runtime/fleet")
            | (_, "/runtime/shadow")
            | (_, "/runtime/fallback/reset" | "/runtime/fallback/trip") => (
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"success": false, "error": "method not allowed"}),
            ),
            _ => not_found(),
        }
    }
}

fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"success": false, "error": "not found"}),
    )
}

fn json_response(status: StatusCode, body: &Value) -> Response<Vec<u8>> {
    let body = serde_json::to_vec(body).expect("json");
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .header("cache-control", "no-store")
        .body(body)
        .expect("valid response")
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // Admin requests carry no meaningful body; drain it so keep-alive stays sound.
        let _ = session.drain_request_body().await;
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let (status, body) = self.route(&method, &path, session);
        json_response(status, &body)
    }
}

/// `GET /metrics`: the Prometheus text exposition.
pub struct MetricsApp {
    shared: Arc<Shared>,
}

impl MetricsApp {
    pub fn new(shared: Arc<Shared>) -> Self {
        MetricsApp { shared }
    }
}

#[async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let _ = session.drain_request_body().await;
        let path = session.req_header().uri.path();
        if path != "/metrics" {
            return json_response(StatusCode::NOT_FOUND, &json!({"error": "see /metrics"}));
        }
        // The breaker gauges move on transitions: let an open period that is over make its
        // transition before they are read. What holds it open can change without one (a
        // manual trip or a failing health check while open): read it now.
        self.shared.breaker.tick();
        self.shared
            .metrics
            .set_open_signal(self.shared.breaker.status().signal);
        let body = self.shared.metrics.render();
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", prometheus::TEXT_FORMAT)
            .header("content-length", body.len())
            .body(body)
            .expect("valid response")
    }
}
