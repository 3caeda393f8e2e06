//! The rescue inside the open stream (`runtime.pre_content = "stream"`, the default): the head and
//! the runtime's status events reach the client as they come, and a runtime that fails before
//! content has the same request sent to legacy by the proxy, whose events continue the client's
//! stream to legacy's own `done`, on both doors. Counted as a failover (stage `in_stream`), with
//! the runtime charged.

use crate::support;

use std::time::{Duration, Instant};

use cutover_proxy::core::config::CommitTimeoutAction;
use serde_json::{json, Value};
use support::legacy::{self, FakeLegacy};
use support::*;
use tokio::io::AsyncReadExt;

/// A body legacy must get byte for byte.
const BODY: &str = "{ \"message\" : \"h\u{e9}llo \u{4e16}\u{754c}\",\"parentMessageId\":\"p-1\" }";
/// The runtime's response and idle deadlines where a test is about them.
const DEADLINE: Duration = Duration::from_millis(300);
/// What the machine may add to a deadline.
const SLACK: Duration = Duration::from_millis(1200);
const PATHS: [(bool, &str); 2] = [(true, "front door"), (false, "pingora")];

fn thinking(content: &str) -> Vec<u8> {
    frame("thinking", json!({"content": content, "stage": "planning"}))
}

/// The client got the runtime's status, then legacy's answer (`echo_legacy`: one message and
/// `done`) in the same stream, whole events, LF only, no error.
#[track_caller]
fn assert_rescued(r: &Response, what: &str) {
    assert_eq!(r.status, 200, "{what}");
    assert_served(r, RT, "allowlist");
    assert!(r.complete, "{what}: the stream did not end cleanly");
    let events = r.events();
    let kinds: Vec<String> = events
        .iter()
        .map(|e| match e.0.as_str() {
            "message" => event_data(e)["type"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            other => other.to_string(),
        })
        .collect();
    assert_eq!(kinds[0], "thinking", "{what}: {events:?}");
    assert_eq!(
        kinds[kinds.len() - 2..],
        ["text".to_string(), "done".to_string()],
        "{what}: {events:?}"
    );
    assert!(
        kinds[..kinds.len() - 2]
            .iter()
            .all(|k| k == "thinking" || k == "heartbeat"),
        "{what}: only status before legacy's answer: {kinds:?}"
    );
    let done = event_data(events.last().unwrap());
    assert_eq!(done["executionMode"], DIRECT, "{what}");
    let body = r.text();
    assert!(!body.contains('\r'), "{what}: {body:?}");
    assert!(!body.contains("event: error"), "{what}: {body}");
    for (_, piece) in &r.chunks {
        assert!(
            piece.ends_with(b"\n\n"),
            "{what}: a write ends inside an event"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_before_content_is_rescued_in_the_open_stream_on_both_doors() {
    let mut cases: Vec<(&str, Vec<Step>, &str)> = failures_after_thinking()
        .into_iter()
        .map(|(what, steps)| (what, steps, "error"))
        .collect();
    let silent = vec![Step::Send(planning()), Step::Hang];
    cases.push((
        "silent past runtime.idle_timeout_ms before content",
        silent,
        "timeout",
    ));
    for (lean, path) in PATHS {
        for (what, steps, outcome) in &cases {
            let what = format!("{what} ({path})");
            let h = Harness::new()
                .runtime(runtime_sse(steps.clone()))
                .config(move |c| {
                    c.server.lean_runtime = lean;
                    c.runtime.max_frame_bytes = 1024;
                    c.runtime.idle_timeout_ms = DEADLINE.as_millis() as u64;
                    c.runtime.commit_timeout_ms = Some(4000);
                })
                .start()
                .await;
            let r = h.chat("org-a").body(BODY).send().await;
            assert_rescued(&r, &what);
            assert!(!r.text().contains("xxxx"), "{what}");
            h.assert_legacy_got_the_chat(BODY, &what);

            recorded(&h, 1, 1).await;
            let rt = [("mode", RT)];
            let charged = format!("chat_execution_{outcome}_total");
            assert_eq!(metric(&h, &charged, &rt), 1.0, "{what}");
            let direct = [("mode", DIRECT)];
            assert_eq!(
                metric(&h, "chat_execution_success_total", &direct),
                1.0,
                "{what}: legacy's part"
            );
            let stage = |s| metric(&h, "cutover_runtime_failovers_total", &[("stage", s)]);
            assert_eq!(stage("in_stream"), 1.0, "{what}");
            assert_eq!(stage("before_commit") + stage("before_head"), 0.0);
            assert_eq!(metric(&h, "chat_runtime_failover_total", &[]), 1.0);
            assert_eq!(
                metric(
                    &h,
                    "chat_requests_total",
                    &[("mode", DIRECT), ("reason", "failover")]
                ),
                1.0,
                "{what}: the request is counted as failed over"
            );
            // Nothing was committed to: the status passed, no content came.
            assert_eq!(metric(&h, "cutover_commit_total", &[]), 0.0, "{what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_content_by_the_commit_timeout_is_rescued_when_told_to_fail_over() {
    for (lean, path) in PATHS {
        let h = Harness::new()
            .runtime(runtime_sse(vec![
                Step::Send(thinking("planning")),
                Step::Sleep(Duration::from_secs(3)),
                Step::Send(text("late")),
            ]))
            .config(move |c| {
                c.server.lean_runtime = lean;
                c.runtime.commit_timeout_ms = Some(DEADLINE.as_millis() as u64);
                c.runtime.commit_timeout_action = CommitTimeoutAction::Failover;
            })
            .start()
            .await;
        let r = chat_taking_the_deadline(&h, path).await;
        assert_rescued(&r, path);
        assert!(!r.text().contains("late"), "{path}");
        recorded(&h, 1, 1).await;
        assert_eq!(
            metric(&h, "chat_execution_timeout_total", &[("mode", RT)]),
            1.0,
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_2xx_head_is_still_an_ordinary_failover() {
    let h = Harness::new()
        .runtime(|req: &Received| {
            if req.path == "/health" {
                Reply::json(200, json!({"status": "ok"}))
            } else {
                Reply::json(503, json!({"detail": "overloaded"}))
            }
        })
        .start()
        .await;
    let r = h.chat("org-a").body(BODY).send().await;
    // Nothing was written before the runtime's head: legacy's own stream and head.
    assert_served(&r, DIRECT, "failover");
    assert_eq!(event_names(&r), ["message", "done"]);
    let stage = |s| metric(&h, "cutover_runtime_failovers_total", &[("stage", s)]);
    assert_eq!((stage("before_head"), stage("in_stream")), (1.0, 0.0));
}

fn failing_runtime() -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    runtime_sse(vec![
        Step::Send(thinking("planning")),
        Step::Send(execution_error("LLM_ERROR")),
        Step::Send(done_frame()),
    ])
}

/// A failing runtime rescued by a legacy that sends its first event (`"first"`) and then
/// nothing until the test releases it; then `rest`.
async fn rescued_by_a_legacy_that_waits(rest: Vec<Step>) -> Running {
    let mut steps = vec![
        Step::Send(
            b"event: message\ndata: {\"id\":\"l1\",\"type\":\"text\",\"data\":{\"content\":\"first\"}}\n\n"
                .to_vec(),
        ),
        Step::WaitRelease,
    ];
    steps.extend(rest);
    Harness::new()
        .runtime(failing_runtime())
        .legacy(move |_: &Received| Reply::sse(steps.clone()))
        .start()
        .await
}

/// Org-a's chat, which must take `DEADLINE`, and no more than the machine may add.
async fn chat_taking_the_deadline(h: &Running, what: &str) -> Response {
    let started = Instant::now();
    let r = h.chat("org-a").send().await;
    let took = started.elapsed();
    assert!(
        took >= DEADLINE && took < DEADLINE + SLACK,
        "{what}: {took:?}"
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_refusing_the_rescue_is_one_fallback_failed_event() {
    let refusals: Vec<(&str, Reply)> = vec![
        (
            "a 502",
            Reply::json(
                502,
                json!({"success": false, "error": {"code": "BAD_GATEWAY"}}),
            ),
        ),
        (
            "a 200 that is not an event stream",
            Reply::json(200, json!({"success": true, "data": {}})),
        ),
    ];
    for (lean, path) in PATHS {
        for (what, refusal) in &refusals {
            let what = format!("{what} ({path})");
            let refusal = refusal.clone();
            let h = Harness::new()
                .runtime(failing_runtime())
                .legacy(move |_: &Received| refusal.clone())
                .config(move |c| c.server.lean_runtime = lean)
                .start()
                .await;
            let r = h.chat("org-a").send().await;
            assert_served(&r, RT, "allowlist");
            assert!(r.complete, "{what}");
            let events = r.events();
            assert_eq!(event_names(&r), ["message", "error"], "{what}");
            let error = event_data(&events[1]);
            assert_eq!(error["code"], "FALLBACK_FAILED", "{what}");
            assert!(
                error["message"].as_str().unwrap().contains("legacy"),
                "{what}"
            );
            assert_eq!(h.legacy.work().len(), 1, "{what}");
            recorded(&h, 1, 1).await;
            assert_eq!(
                metric(&h, "chat_execution_error_total", &[("mode", RT)]),
                1.0
            );
            assert_eq!(
                metric(&h, "chat_execution_error_total", &[("mode", DIRECT)]),
                1.0,
                "{what}: legacy's part failed"
            );
        }
    }
}

/// An upstream's answers.
type Script = Box<dyn Fn(&Received) -> Reply + Send + Sync>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_legacy_is_held_to_its_own_deadlines_in_a_rescue() {
    let answer_then_hang = |_: &Received| {
        Reply::sse(vec![
            Step::Send(
                b"event: message\ndata: {\"id\":\"l1\",\"type\":\"text\",\"data\":{\"content\":\"legacy\"}}\n\n"
                    .to_vec(),
            ),
            Step::Hang,
        ])
    };
    let cases: Vec<(&str, Script, &str)> = vec![
        (
            "no head",
            Box::new(|_: &Received| Reply::silent(vec![Step::Hang])),
            "response",
        ),
        (
            "silent inside its answer",
            Box::new(answer_then_hang),
            "idle",
        ),
    ];
    for (what, legacy, stage) in cases {
        let h = Harness::new()
            .runtime(failing_runtime())
            .legacy(legacy)
            .config(|c| {
                c.legacy.response_timeout_ms = DEADLINE.as_millis() as u64;
                c.legacy.idle_timeout_ms = DEADLINE.as_millis() as u64;
            })
            .start()
            .await;
        let r = chat_taking_the_deadline(&h, what).await;
        assert!(r.complete, "{what}");
        let events = r.events();
        let last = events.last().unwrap();
        assert_eq!(last.0, "error", "{what}: {events:?}");
        assert_eq!(event_data(last)["code"], "FALLBACK_FAILED", "{what}");
        if stage == "idle" {
            assert!(
                r.text().contains("\"legacy\""),
                "{what}: what legacy sent is kept"
            );
        }
        assert_eq!(
            metric(
                &h,
                "cutover_upstream_timeouts_total",
                &[("upstream", "legacy"), ("stage", stage)]
            ),
            1.0,
            "{what}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_during_the_rescue_ends_it() {
    let h = rescued_by_a_legacy_that_waits(vec![Step::Send(
        b"event: done\ndata: {\"executionMode\":\"direct_llm\"}\n\n".to_vec(),
    )])
    .await;
    let mut s = raw_chat(h.proxy_addr, "HTTP/1.1", "s-1").await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while find(&got, b"\"first\"").is_none() {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("legacy's first event never came")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    drop(s);
    // Nobody's outcome on legacy's side; the runtime is still charged for failing.
    assert_departure_recorded(&h, DIRECT, 1.0).await;
    h.legacy.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_status_the_client_gets_legacy_s_own_answer_byte_for_byte() {
    // Legacy's answer to this request, its events cut across writes as a real one may be.
    let legacy_answer = |req: &Received| {
        let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
        let message = body["message"].as_str().unwrap_or_default().to_string();
        let mut answer = Vec::new();
        for (i, word) in ["Legacy", " answer", " to: ", &message, " 你好"]
            .iter()
            .enumerate()
        {
            let msg = json!({"id": format!("legacy-{i}"), "type": "text",
                             "data": {"content": word}, "timestamp": "2024-05-01T12:00:00.000Z"});
            answer.extend_from_slice(format!("event: message\ndata: {msg}\n\n").as_bytes());
        }
        answer.extend_from_slice(
            b"event: done\ndata: {\"sessionId\":\"s-1\",\"messageId\":\"legacy-x\",\"executionMode\":\"direct_llm\"}\n\n",
        );
        let steps = answer
            .chunks(37)
            .map(|piece| Step::Send(piece.to_vec()))
            .collect();
        Reply::sse(steps)
    };
    for (lean, path) in PATHS {
        let h = Harness::new()
            .runtime(runtime_sse(vec![
                Step::Send(thinking("one")),
                Step::Send(frame("ping", json!({}))),
                Step::Send(thinking("two")),
                Step::Send(execution_error("LLM_ERROR")),
            ]))
            .legacy(legacy_answer)
            .config(move |c| c.server.lean_runtime = lean)
            .start()
            .await;
        let rescued = h.chat("org-a").body(BODY).send().await;
        // The same request straight to legacy, as a direct legacy chat gets it.
        let direct = {
            let mut c = Client::connect(h.legacy.addr).await;
            let auth = format!("Bearer {}", token("org-a"));
            c.send(
                "POST",
                "/api/v1/chat/sessions/s-1",
                &[("authorization", auth.as_str())],
                BODY.as_bytes(),
            )
            .await;
            c.read_response().await
        };
        let body = rescued.body();
        let first_legacy =
            find(&body, b"\"legacy-0\"").unwrap_or_else(|| panic!("{path}: {}", rescued.text()));
        let status_end = String::from_utf8_lossy(&body[..first_legacy])
            .rfind("event: message\n")
            .unwrap();
        let status = parse_events(&String::from_utf8_lossy(&body[..status_end]));
        let kinds: Vec<&str> = status.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(kinds, ["message", "heartbeat", "message"], "{path}");
        assert_eq!(
            String::from_utf8_lossy(&body[status_end..]),
            direct.text(),
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_gets_the_caller_s_request_as_pingora_would_forward_it() {
    let h = Harness::new()
        .runtime(failing_runtime())
        .config(|c| c.identity.trusted_org_header = Some("x-org-id".into()))
        .start()
        .await;
    let mut c = Client::connect(h.proxy_addr).await;
    let auth = format!("Bearer {}", token("org-a"));
    c.send(
        "POST",
        "/api/v1/chat/sessions/s-1?trace=1",
        &[
            ("authorization", auth.as_str()),
            ("x-org-id", "org-a"),
            ("content-type", "application/json"),
            ("accept-encoding", "gzip, br"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "this hop only"),
            ("x-forwarded-for", "10.6.6.6"),
            ("x-request-id", "req-rescue"),
        ],
        BODY.as_bytes(),
    )
    .await;
    let r = c.read_response().await;
    assert_rescued(&r, "headers");
    let got = &h.legacy.work()[0];
    assert_eq!(got.method, "POST");
    assert_eq!(got.path, "/api/v1/chat/sessions/s-1?trace=1");
    assert_eq!(got.body, BODY.as_bytes());
    assert_eq!(got.header("authorization"), Some(auth.as_str()));
    assert_eq!(got.header("x-request-id"), Some("req-rescue"));
    assert_eq!(got.header("content-type"), Some("application/json"));
    // Not from a trusted hop: the caller's own X-Forwarded-For is replaced by its address.
    assert_eq!(got.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(got.header("x-forwarded-proto"), Some("http"));
    for gone in ["accept-encoding", "x-org-id", "x-hop", "connection"] {
        assert_eq!(got.header(gone), None, "{gone}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_counts_a_rescue_as_a_runtime_error() {
    let harness = Harness::new().runtime(failing_runtime());
    assert_two_failures_open_the_breaker(harness, assert_rescued).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_bridge_a_rescue_saves_nothing_and_deletes_the_start_session_first() {
    let h = Harness::new()
        .bridged(FakeLegacy::seeded().await)
        .runtime(failing_runtime())
        .start()
        .await;
    legacy::assert_bridge_chats_leave_nothing(&h, BODY, assert_rescued).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shutdown_cutoff_ends_a_rescue_as_any_stream() {
    let h = rescued_by_a_legacy_that_waits(Vec::new()).await;
    let chat = tokio::spawn(h.chat("org-a").send());
    h.legacy.wait_for_work(1).await;
    let r = h.cut_off(chat, "the rescue").await;
    assert!(r.complete, "a clean end, not a cut");
    // Counted when the request is recorded, which may be just after the client read its end.
    let failovers = || {
        metric(
            &h,
            "cutover_runtime_failovers_total",
            &[("stage", "in_stream")],
        )
    };
    assert!(
        eventually(Duration::from_secs(3), || failovers() == 1.0).await,
        "in-stream failovers: {}",
        failovers()
    );
    h.legacy.release();
}
