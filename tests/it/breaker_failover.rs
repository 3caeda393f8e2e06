//! The safety net: the breaker opens on a failing runtime (from traffic or from health checks),
//! sends everyone to legacy, and closes again by itself once the runtime recovers; a runtime that
//! fails before its first byte is failed over to legacy within the same request.

use crate::support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_proxy::app::LocalServer;
use cutover_proxy::core::breaker::State;
use serde_json::{json, Value};
use support::*;

fn names(r: &Response) -> Vec<String> {
    r.events().into_iter().map(|(e, _)| e).collect()
}

fn assert_runtime(r: &Response, what: &str) {
    assert_runtime_for(r, "allowlist", what);
}

/// A half-open breaker's probe says so: it is the breaker's test, not the rollout's choice.
fn assert_probe(r: &Response, what: &str) {
    assert_runtime_for(r, "probe", what);
}

fn assert_runtime_for(r: &Response, reason: &str, what: &str) {
    assert_eq!(r.status, 200, "{what}");
    assert_eq!(r.header("x-execution-mode"), Some(RT), "{what}");
    assert_eq!(r.header("x-execution-reason"), Some(reason), "{what}");
    assert!(r.complete, "{what}");
}

/// Served by legacy with `reason`, the ordinary legacy stream, no error event.
fn assert_legacy(r: &Response, reason: &str, what: &str) {
    assert_eq!(r.status, 200, "{what}");
    assert_eq!(r.header("x-execution-mode"), Some(DIRECT), "{what}");
    assert_eq!(r.header("x-execution-reason"), Some(reason), "{what}");
    assert_eq!(
        r.header("content-type"),
        Some("text/event-stream"),
        "{what}"
    );
    assert!(r.complete, "{what}");
    let events = r.events();
    assert_eq!(names(r), ["message", "done"], "{what}: {events:?}");
    assert!(events[0].1.contains("\"legacy\""), "{what}: {events:?}");
    assert!(events[1].1.contains("direct_llm"), "{what}: {events:?}");
}

async fn fallback_status(server: &LocalServer) -> Value {
    let (status, body) = admin(server, "GET", "/runtime/fallback/status", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["success"], true);
    body["data"].clone()
}

async fn window(server: &LocalServer) -> Value {
    let (status, body) = admin(server, "GET", "/runtime/metrics", None).await;
    assert_eq!(status, 200);
    body["data"].clone()
}

/// `[total, success, error, timeout]` of one side (`runtime` or `direct`) of the admin API's window.
fn outcomes(window: &Value, side: &str) -> [u64; 4] {
    ["total", "success", "error", "timeout"].map(|k| window[side][k].as_u64().expect(k))
}

fn fallback_gauge(server: &LocalServer) -> i64 {
    server.shared.metrics.fallback_enabled.get()
}

/// Wait until no probe is in flight any more (its outcome reached the breaker).
async fn probes_settled(server: &LocalServer) {
    let shared = server.shared.clone();
    assert!(
        eventually(Duration::from_secs(3), move || shared
            .breaker
            .with_breaker(|b| b.probes_in_flight() == 0))
        .await,
        "a probe's outcome never reached the breaker"
    );
}

/// The instant an open breaker will admit probes.
fn retry_at(server: &LocalServer) -> Option<Instant> {
    server.shared.breaker.with_breaker(|b| b.retry_at())
}

/// Wait until the open breaker's `open_secs` are over (and its health is good).
async fn wait_until_probes_admitted(server: &LocalServer) {
    let shared = server.shared.clone();
    assert!(
        eventually(Duration::from_secs(4), move || {
            shared.breaker.with_breaker(|b| {
                b.health_failures() == 0 && b.retry_at().is_some_and(|t| t <= Instant::now())
            })
        })
        .await,
        "open_secs never ran out"
    );
}

/// Send the `half_open_probes` (3) probes that close the breaker, all served by the runtime.
async fn probe_until_closed(server: &LocalServer, runtime: &Upstream) {
    let before = runtime.work().len();
    for i in 1..=3 {
        let r = chat(
            server.proxy_addr,
            Some("org-a"),
            &format!("probe-{i}"),
            r#"{"message":"p"}"#,
        )
        .await;
        assert_probe(&r, &format!("probe {i}"));
        assert_eq!(names(&r), ["message", "done"], "probe {i}");
        probes_settled(server).await;
        let expected = if i < 3 {
            State::HalfOpen
        } else {
            State::Closed
        };
        assert_eq!(server.shared.breaker.state(), expected, "after probe {i}");
        if i < 3 {
            assert_eq!(fallback_status(server).await["state"], "half_open");
        }
    }
    assert_eq!(runtime.work().len(), before + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_errors_open_the_breaker_and_it_recovers_by_itself() {
    let healthy = Arc::new(AtomicBool::new(false));
    let failure = Reply::sse(vec![
        Step::Send(execution_error("LLM_ERROR")),
        Step::Send(done_frame()),
    ]);
    let h = Harness::new()
        .runtime(runtime_failing_until(healthy.clone(), failure))
        .config(move |cfg| {
            cfg.breaker.min_requests = 10;
            cfg.breaker.error_rate = 0.5;
            cfg.breaker.open_secs = 1;
            cfg.breaker.half_open_probes = 3;
            cfg.runtime.health_interval_ms = 100;
            // Errors the user saw as error events: committed at the head.
            cfg.runtime.commit_timeout_ms = Some(0);
        })
        .start()
        .await;
    assert_eq!(fallback_gauge(&h), 0);

    for i in 1..=12 {
        let r = chat(h.proxy_addr, Some("org-a"), &format!("s-{i}"), HI).await;
        if i <= 10 {
            // min_requests: no decision on fewer samples, so the first ten all reach the runtime.
            assert_runtime(&r, &format!("request {i}"));
            assert_eq!(names(&r), ["error"], "request {i}");
            recorded(&h, i, 0).await;
            let expected = if i < 10 { State::Closed } else { State::Open };
            assert_eq!(h.shared.breaker.state(), expected, "after request {i}");
        } else {
            assert_legacy(&r, "breaker_open", &format!("request {i}"));
        }
    }
    assert_eq!(h.runtime.work().len(), 10);
    assert_eq!(h.legacy.work().len(), 2);
    assert_eq!(h.legacy.work()[0].body, HI.as_bytes());
    // Open sends every org to legacy, not only the allowlisted ones.
    let r = h.chat("org-b").session("s-b").send().await;
    assert_legacy(&r, "breaker_open", "org-b while open");
    recorded(&h, 10, 3).await;

    let status = fallback_status(&h).await;
    assert_eq!(status["fallbackEnabled"], true, "{status}");
    assert_eq!(status["state"], "open", "{status}");
    let reason = status["fallbackReason"].as_str().unwrap();
    assert!(
        reason.contains("error rate") && reason.contains("0.5"),
        "reason should name the threshold: {reason}"
    );
    assert_eq!(fallback_gauge(&h), 1);
    let data = window(&h).await;
    assert_eq!(data["fallbackEnabled"], true);
    assert_eq!(data["fallbackReason"], reason);
    assert_eq!(outcomes(&data, "runtime"), [10, 0, 10, 0]);
    assert_eq!(data["runtime"]["errorRate"].as_f64(), Some(1.0));
    assert_eq!(outcomes(&data, "direct"), [3, 3, 0, 0]);

    // The runtime recovers; nobody calls the admin API.
    healthy.store(true, Ordering::SeqCst);
    if retry_at(&h).is_some_and(|t| Instant::now() + Duration::from_millis(200) < t) {
        let r = h.chat("org-a").session("s-early").send().await;
        assert_legacy(&r, "breaker_open", "before open_secs ran out");
    }
    wait_until_probes_admitted(&h).await;
    probe_until_closed(&h, &h.runtime).await;

    let status = fallback_status(&h).await;
    assert_eq!(status["fallbackEnabled"], false, "{status}");
    assert_eq!(status["state"], "closed", "{status}");
    assert_eq!(fallback_gauge(&h), 0);
    let r = h.chat("org-a").session("s-back").send().await;
    assert_runtime(&r, "after closing");
    assert_eq!(names(&r), ["message", "done"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_probe_reopens_the_breaker() {
    let h = Harness::new()
        .runtime(runtime_answering(|_: &Received| {
            Reply::sse(vec![Step::Send(frame(
                "execution_error",
                json!({"error": "still broken"}),
            ))])
        }))
        .config(move |cfg| {
            cfg.breaker.min_requests = 2;
            cfg.breaker.open_secs = 1;
            // A probe that fails after the commit, in front of the user.
            cfg.runtime.commit_timeout_ms = Some(0);
        })
        .start()
        .await;

    for i in 0..2 {
        let r = chat(h.proxy_addr, Some("org-a"), &format!("s-{i}"), HI).await;
        assert_runtime(&r, "before opening");
        recorded(&h, i + 1, 0).await;
    }
    assert_eq!(h.shared.breaker.state(), State::Open);
    wait_until_probes_admitted(&h).await;
    let r = h.chat("org-a").session("probe").send().await;
    assert_probe(&r, "probe");
    assert_eq!(names(&r), ["error"]);
    probes_settled(&h).await;
    assert_eq!(
        h.shared.breaker.state(),
        State::Open,
        "a failed probe reopens"
    );
    let reason = fallback_status(&h).await["fallbackReason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("probe"), "{reason}");
    let r = h.chat("org-a").session("after").send().await;
    assert_legacy(&r, "breaker_open", "after the failed probe");
    assert_eq!(h.runtime.work().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_failing_before_its_first_byte_is_failed_over_to_legacy() {
    let refused = Unreachable::new().address();
    let answering = |status: u16| {
        move |req: &Received| {
            if req.path == "/health" {
                Reply::json(200, json!({"status": "ok"}))
            } else {
                Reply::json(status, json!({"detail": "unavailable"}))
            }
        }
    };
    // Accepts, then closes without a status line.
    let hangup = |req: &Received| {
        if req.path == "/health" {
            Reply::json(200, json!({"status": "ok"}))
        } else {
            Reply::silent(vec![Step::Close])
        }
    };

    let body = r#"{"message":"héllo 世界","parentMessageId":"m-41"}"#;
    // A runtime script, or none: the runtime's address is the closed port.
    type Script = Box<dyn Fn(&Received) -> Reply + Send + Sync>;
    let cases: [(&str, Option<Script>); 4] = [
        ("connection refused", None),
        ("500", Some(Box::new(answering(500)))),
        ("503", Some(Box::new(answering(503)))),
        ("closed before answering", Some(Box::new(hangup))),
    ];
    for (i, (what, script)) in cases.into_iter().enumerate() {
        let scripted = script.is_some();
        // Health checks must not open the breaker for the closed port during the test.
        let harness = Harness::new().config(|c| c.runtime.health_interval_ms = 60_000);
        let h = match script {
            Some(script) => harness.runtime(script),
            None => {
                let refused = refused.clone();
                harness.config(move |c| c.runtime.address = refused)
            }
        }
        .start()
        .await;
        let failovers = h.shared.metrics.failover_total.get();
        let rt_errors = counter(&h.shared.metrics.execution_error_total, RT);

        let session = format!("fo-{i}");
        let r = chat(h.proxy_addr, Some("org-a"), &session, body).await;
        assert_legacy(&r, "failover", what);
        assert!(!r.text().contains("event: error"), "{what}");

        let got = h.legacy.work();
        let got = got.last().unwrap();
        assert_eq!(got.method, "POST", "{what}");
        assert_eq!(
            got.path,
            format!("/api/v1/chat/sessions/{session}"),
            "{what}"
        );
        assert_eq!(
            got.body,
            body.as_bytes(),
            "{what}: legacy must get the original body"
        );
        assert!(
            got.header("authorization")
                .is_some_and(|a| a.starts_with("Bearer ")),
            "{what}"
        );
        if scripted {
            let rt = &h.runtime;
            // One attempt; a second only when the first went over a pooled connection (the
            // health check's) that closed without an answer, which is how a stale one looks.
            let tries = rt.work().len();
            assert!(
                tries == 1 || (tries == 2 && rt.work()[0].connection == 0),
                "{what}: tried {tries} times"
            );
        }

        // The runtime's failure counts against it; legacy's answer is a direct success.
        recorded(&h, 1, 1).await;
        let data = window(&h).await;
        assert_eq!(outcomes(&data, "runtime"), [1, 0, 1, 0], "{what}: {data}");
        assert_eq!(outcomes(&data, "direct"), [1, 1, 0, 0], "{what}: {data}");
        assert_eq!(h.shared.breaker.window_stats().error, 1, "{what}");
        assert_eq!(
            h.shared.metrics.failover_total.get(),
            failovers + 1,
            "{what}"
        );
        assert_eq!(
            counter(&h.shared.metrics.execution_error_total, RT),
            rt_errors + 1,
            "{what}"
        );
        assert_eq!(h.legacy.work().len(), 1, "{what}: legacy served it once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_checks_open_the_breaker_without_traffic_and_recovery_follows() {
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let h = Harness::new()
        .runtime(move |req: &Received| {
            if req.path == "/health" {
                if h.load(Ordering::SeqCst) {
                    Reply::json(200, json!({"status": "ok"}))
                } else {
                    Reply::json(503, json!({"status": "degraded"}))
                }
            } else {
                Reply::sse(runtime_ok_steps())
            }
        })
        .config(move |cfg| {
            cfg.runtime.health_interval_ms = 50;
            cfg.runtime.health_failures = 3;
            cfg.breaker.open_secs = 1;
        })
        .start()
        .await;

    assert!(
        h.breaker_becomes(State::Open, Duration::from_secs(3)).await,
        "failing health checks did not open the breaker"
    );
    let health_checks = h.runtime.count() - h.runtime.work().len();
    assert!(
        health_checks >= 3,
        "opened after {health_checks} health checks"
    );
    assert!(h.runtime.work().is_empty(), "no traffic was needed");
    let status = fallback_status(&h).await;
    assert_eq!(status["state"], "open");
    assert_eq!(status["fallbackEnabled"], true);
    assert!(
        status["fallbackReason"]
            .as_str()
            .unwrap()
            .contains("health check failed"),
        "{status}"
    );
    assert_eq!(fallback_gauge(&h), 1);

    let r = h.chat("org-a").send().await;
    assert_legacy(&r, "breaker_open", "while health fails");
    // Still failing after open_secs: no probes go to a runtime that says it is unhealthy.
    let shared = h.shared.clone();
    assert!(
        eventually(Duration::from_secs(3), move || retry_at_passed(&shared)).await,
        "open_secs never ran out"
    );
    let r = h.chat("org-a").session("s-2").send().await;
    assert_legacy(
        &r,
        "breaker_open",
        "open_secs over but health still failing",
    );
    assert!(h.runtime.work().is_empty());

    healthy.store(true, Ordering::SeqCst);
    wait_until_probes_admitted(&h).await;
    probe_until_closed(&h, &h.runtime).await;
    assert_eq!(fallback_status(&h).await["state"], "closed");
    assert_eq!(fallback_gauge(&h), 0);
}

fn retry_at_passed(shared: &cutover_proxy::state::Shared) -> bool {
    shared
        .breaker
        .with_breaker(|b| b.retry_at())
        .is_some_and(|t| t <= Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_never_run_on_the_request_path() {
    // /health hangs: a health check on the request path would hold every chat request for the
    // health timeout, and would show up as one /health request per chat request.
    let h = Harness::new()
        .runtime(|req: &Received| {
            if req.path == "/health" {
                Reply::silent(vec![Step::Hang])
            } else {
                Reply::sse(runtime_ok_steps())
            }
        })
        .config(move |cfg| {
            cfg.runtime.health_interval_ms = 60_000;
            cfg.runtime.health_timeout_ms = 3_000;
        })
        .start()
        .await;
    let health = || h.runtime.count() - h.runtime.work().len();
    assert!(
        eventually(Duration::from_secs(2), || health() == 1).await,
        "the first health check did not run"
    );

    for i in 0..20 {
        let started = Instant::now();
        let org = if i % 2 == 0 { "org-a" } else { "org-b" };
        let r = chat(h.proxy_addr, Some(org), &format!("s-{i}"), HI).await;
        assert_eq!(r.status, 200);
        assert!(r.complete);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "request {i} waited {:?}",
            started.elapsed()
        );
    }
    assert_eq!(h.runtime.work().len(), 10);
    assert_eq!(h.legacy.work().len(), 10);
    assert_eq!(
        health(),
        1,
        "health checks follow their own schedule, not the requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_or_timing_out_runtimes_open_the_breaker() {
    let mut slow = vec![Step::Sleep(Duration::from_millis(300))];
    slow.extend(runtime_ok_steps());
    let hanging = vec![Step::Hang];

    // (runtime, execution_timeout_ms, latency_ratio, what every execution looks like, reason)
    let cases = [
        (slow, 400, 0.5, "done", "mean latency"),
        (hanging, 300, 0.8, "error", "timeout rate"),
    ];
    for (steps, timeout_ms, ratio, last_event, reason) in cases {
        let h = Harness::new()
            .runtime(runtime_sse(steps))
            .config(move |c| {
                c.runtime.execution_timeout_ms = timeout_ms;
                c.breaker.latency_ratio = ratio;
                c.breaker.min_requests = 3;
            })
            .start()
            .await;
        for i in 1..=3 {
            let r = chat(h.proxy_addr, Some("org-a"), &format!("s-{i}"), HI).await;
            assert_runtime(&r, &format!("{reason}: request {i}"));
            assert_eq!(
                names(&r).last().map(String::as_str),
                Some(last_event),
                "{reason}"
            );
            recorded(&h, i, 0).await;
        }
        assert_eq!(h.shared.breaker.state(), State::Open, "{reason}");
        let status = fallback_status(&h).await;
        let why = status["fallbackReason"].as_str().unwrap();
        assert!(why.contains(reason), "expected {reason:?}, got {why:?}");
        let r = chat(h.proxy_addr, Some("org-a"), "s-4", HI).await;
        assert_legacy(&r, "breaker_open", reason);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_timing_out_on_connect_is_failed_over_and_counts_as_error() {
    // A listener that never accepts, its accept queue filled: further SYNs are dropped, so
    // connecting hangs until the connect timeout.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_millis(200), s.connect(addr)).await {
            fillers.push(c);
        }
    }
    let probe = tokio::net::TcpSocket::new_v4().unwrap();
    if tokio::time::timeout(Duration::from_millis(300), probe.connect(addr))
        .await
        .is_ok()
    {
        eprintln!(
            "this kernel accepts connections past the backlog; connect timeouts untestable here"
        );
        return;
    }

    let h = Harness::new()
        .config(move |c| {
            c.runtime.address = addr.to_string();
            c.runtime.connect_timeout_ms = 300;
            c.runtime.health_interval_ms = 60_000;
        })
        .start()
        .await;

    let started = Instant::now();
    let body = r#"{"message":"hello"}"#;
    let r = chat(h.proxy_addr, Some("org-a"), "s-ct", body).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_legacy(&r, "failover", "connect timeout");
    assert_eq!(h.legacy.work()[0].body, body.as_bytes());
    recorded(&h, 1, 1).await;
    let data = window(&h).await;
    assert_eq!(
        outcomes(&data, "runtime"),
        [1, 0, 1, 0],
        "a runtime that cannot be reached is an error, as every failover: {data}"
    );
    drop(listener);
}
