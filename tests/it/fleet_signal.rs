//! The fleet signal: a replica whose `[fleet] prometheus_url` names a Prometheus reads every
//! replica's runtime outcomes in the background and opens its breaker on them; when Prometheus
//! is down, slow or answers garbage it decides alone, and no request waits for it.
//!
//! Prometheus here is a scripted HTTP server answering its query API's JSON (the e2e suite runs
//! the real one).

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// What the stand-in Prometheus answers the fleet query with, changeable during a test.
#[derive(Clone)]
enum Answer {
    /// The fleet rule's three series.
    Counts(f64, f64, f64),
    /// This status and body.
    Raw(u16, Value),
    /// Nothing, ever.
    Hang,
}

struct Prometheus {
    upstream: Upstream,
    answer: Arc<Mutex<Answer>>,
}

impl Prometheus {
    async fn start(answer: Answer) -> Prometheus {
        let answer = Arc::new(Mutex::new(answer));
        let a = answer.clone();
        let upstream = Upstream::start(move |req| {
            assert!(
                req.path.starts_with("/api/v1/query?query="),
                "{}",
                req.path
            );
            match a.lock().unwrap().clone() {
                Answer::Counts(total, error, timeout) => {
                    let series = |outcome: &str, v: f64| {
                        json!({"metric": {"outcome": outcome, "job": "cutover-proxy"}, "value": [1.7e9, v.to_string()]})
                    };
                    Reply::json(
                        200,
                        json!({"status": "success", "data": {"resultType": "vector", "result": [
                            series("all", total), series("error", error), series("timeout", timeout)
                        ]}}),
                    )
                }
                Answer::Raw(status, body) => Reply::json(status, body),
                Answer::Hang => Reply::silent(vec![Step::Hang]),
            }
        })
        .await;
        Prometheus { upstream, answer }
    }

    fn set(&self, a: Answer) {
        *self.answer.lock().unwrap() = a;
    }

    fn url(&self) -> String {
        format!("http://{}", self.upstream.addr)
    }
}

fn fleet(url: String) -> impl FnOnce(&mut cutover_proxy::core::config::Config) {
    move |c| {
        c.fleet.prometheus_url = url;
        c.fleet.poll_ms = 100;
        c.fleet.timeout_ms = 100;
    }
}

/// `GET /runtime/fallback/status`'s data, with `GET /runtime/fleet`'s as `fleet` (its
/// `openedBy` lifted beside `state`).
async fn status(h: &Running) -> Value {
    let (code, body) = h.admin("GET", "/runtime/fallback/status").await;
    assert_eq!(code, 200);
    let mut data = body["data"].clone();
    let (code, fleet) = h.admin("GET", "/runtime/fleet").await;
    assert_eq!(code, 200);
    assert_eq!(fleet["success"], true);
    let mut fleet = fleet["data"].clone();
    data["openedBy"] = fleet["openedBy"].take();
    fleet.as_object_mut().unwrap().remove("openedBy");
    data["fleet"] = fleet;
    data
}

/// Poll the status until `pred` holds (or fail after 5 s).
async fn status_until(h: &Running, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    poll_until(Duration::from_secs(5), || status(h), pred)
        .await
        .unwrap_or_else(|s| panic!("{what}: {s}"))
}

fn polls(h: &Running, result: &str) -> u64 {
    h.metrics()
        .fleet_polls_total
        .with_label_values(&[result])
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_fleet_opens_a_replica_that_saw_nothing() {
    let prom = Prometheus::start(Answer::Counts(40.0, 1.0, 0.0)).await;
    let h = Harness::new().config(fleet(prom.url())).start().await;
    let s = status_until(&h, "a first reading", |s| s["fleet"]["state"] == "ok").await;
    assert_eq!(
        s["state"], "closed",
        "a healthy fleet leaves it closed: {s}"
    );
    assert_eq!(s["openedBy"], Value::Null);
    assert_eq!(s["fleet"]["lastReading"]["total"], 40.0);
    assert_served(&h.chat("org-a").send().await, RT, "allowlist");

    // Every other replica's runtime fails: 30 of 50 executions in the window.
    prom.set(Answer::Counts(50.0, 30.0, 0.0));
    let s = status_until(&h, "opened by the fleet", |s| s["state"] == "open").await;
    assert_eq!(
        s["fallbackReason"],
        "fleet: error rate 0.60 > 0.50 over 50 requests, all replicas"
    );
    assert_eq!(s["openedBy"], "fleet");
    assert_eq!(s["fallbackEnabled"], true);
    let m = h.metrics();
    assert_eq!(m.breaker_opens_total.with_label_values(&["fleet"]).get(), 1);
    assert_eq!(m.breaker_open_signal.with_label_values(&["fleet"]).get(), 1);
    assert_eq!(m.breaker_open_signal.with_label_values(&["local"]).get(), 0);
    assert_eq!(m.fleet_signal_up.get(), 1);
    // This replica ran nothing on the runtime, and now sends everyone to legacy.
    assert_served(&h.chat("org-a").send().await, DIRECT, "breaker_open");
    assert!(polls(&h, "ok") >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_stays_local_and_old_fleet_failures_do_not_reopen_it() {
    let prom = Prometheus::start(Answer::Counts(20.0, 20.0, 0.0)).await;
    let h = Harness::new().config(fleet(prom.url())).start().await;
    status_until(&h, "opened by the fleet", |s| s["openedBy"] == "fleet").await;
    // open_secs = 1: the replica's own probes close it; the fleet's window still holds the
    // same failures, which must not reopen it.
    let closed = until(Duration::from_secs(10), || async {
        if h.server.shared.breaker.state() == cutover_proxy::core::breaker::State::Closed {
            return Ok(());
        }
        let _ = h.chat("org-a").send().await;
        Err(())
    })
    .await;
    assert!(closed.is_ok(), "never closed by its probes");
    let before = polls(&h, "ok");
    assert!(
        eventually(Duration::from_secs(5), || polls(&h, "ok") >= before + 3).await,
        "no polls after the close"
    );
    let s = status(&h).await;
    assert_eq!(s["state"], "closed", "{s}");
    // New failures since the close, in every replica: it opens again.
    prom.set(Answer::Counts(40.0, 40.0, 0.0));
    let s = status_until(&h, "reopened by new failures", |s| s["state"] == "open").await;
    assert!(
        s["fallbackReason"]
            .as_str()
            .unwrap()
            .ends_with("over 20 requests, all replicas, since this one closed"),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_down_slow_or_garbage_leaves_the_replica_to_itself() {
    let prom = Prometheus::start(Answer::Hang).await;
    let h = Harness::new().config(fleet(prom.url())).start().await;

    // Slow: every poll times out; requests never wait for it.
    let s = status_until(&h, "unavailable", |s| s["fleet"]["state"] == "unavailable").await;
    assert_eq!(s["fleet"]["detail"], "no answer within 100 ms");
    for _ in 0..3 {
        let started = Instant::now();
        assert_served(&h.chat("org-a").send().await, RT, "allowlist");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    assert_eq!(h.metrics().fleet_signal_up.get(), 0);

    // Garbage: an answer that is not the fleet's counts.
    prom.set(Answer::Raw(
        200,
        json!({"status": "success", "data": {"resultType": "vector", "result": []}}),
    ));
    let s = status_until(&h, "invalid", |s| s["fleet"]["state"] == "invalid").await;
    assert!(
        s["fleet"]["detail"]
            .as_str()
            .unwrap()
            .starts_with("no series"),
        "{s}"
    );
    assert!(polls(&h, "invalid") >= 1);
    prom.set(Answer::Raw(
        400,
        json!({"status": "error", "errorType": "bad_data", "error": "unknown function"}),
    ));
    status_until(&h, "the refusal named", |s| {
        s["fleet"]["detail"]
            .as_str()
            .is_some_and(|d| d.ends_with("(bad_data): unknown function"))
    })
    .await;

    // Down: nobody listens any more.
    let port = prom.upstream.addr;
    drop(prom);
    let s = status_until(&h, "down", |s| {
        s["fleet"]["state"] == "unavailable"
            && s["fleet"]["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("connect to"))
    })
    .await;
    assert!(
        s["fleet"]["detail"]
            .as_str()
            .unwrap()
            .contains(&port.to_string()),
        "{s}"
    );
    assert!(polls(&h, "unavailable") >= 2);
    assert_eq!(s["state"], "closed");
    assert_served(&h.chat("org-a").send().await, RT, "allowlist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_prometheus_url_the_signal_is_off() {
    let h = Harness::new().start().await;
    let s = status(&h).await;
    assert_eq!(
        s["fleet"],
        json!({"state": "off", "detail": "", "lastReading": null})
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    for result in ["ok", "unavailable", "invalid"] {
        assert_eq!(polls(&h, result), 0);
    }
}
