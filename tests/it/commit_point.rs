//! The commit point: while nothing has reached the user, a runtime that fails first thing is
//! failed over to legacy with the original body, nothing saved and an error on the breaker;
//! after the commit (first content, the commit timeout, a heartbeat, a cancel) failures are
//! `error` events on the runtime's stream. With `runtime.pre_content = "hold"`; what holds with
//! `"stream"` as well runs under both.

use crate::support;

use std::time::Duration;

use cutover_proxy::core::config::{CommitOn, PreContent};
use serde_json::{json, Value};
use support::legacy::{self, FakeLegacy};
use support::*;

/// What holds under both `runtime.pre_content` settings runs under both; what is about the held
/// head runs under `hold` (its `stream` counterparts are in `rescue.rs`).
const MODES: [PreContent; 2] = [PreContent::Hold, PreContent::Stream];

/// A body legacy must get byte for byte: spacing, key order and non-ASCII as the client sent them.
const BODY: &str = "{ \"message\" : \"h\u{e9}llo \u{4e16}\u{754c}\",\"parentMessageId\":\"p-1\" }";

fn thinking(content: &str) -> Vec<u8> {
    frame("thinking", json!({"content": content, "stage": "planning"}))
}

fn complete() -> Vec<u8> {
    frame("execution_complete", json!({"final_response": "ok"}))
}

fn names(r: &Response) -> Vec<String> {
    event_names(r)
}

/// Served by legacy as a failover: its ordinary stream, no error event.
fn assert_failed_over(r: &Response, what: &str) {
    assert_served(r, DIRECT, "failover");
    assert!(r.complete, "{what}");
    assert_eq!(names(r), ["message", "done"], "{what}: {:?}", r.events());
    assert!(r.text().contains("\"legacy\""), "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtimes_that_fail_first_thing_are_failed_over_with_the_original_body() {
    let big = "x".repeat(4096);
    let cases: Vec<(&str, Reply, &str)> = vec![
        (
            "execution_error first",
            Reply::sse(vec![
                Step::Send(execution_error("LLM_ERROR")),
                Step::Send(done_frame()),
            ]),
            "before_commit",
        ),
        (
            "two thinking, then execution_error",
            Reply::sse(vec![
                Step::Send(thinking("planning")),
                Step::Send(thinking("still planning")),
                Step::Send(execution_error("LLM_RATE_LIMITED")),
                Step::Send(done_frame()),
            ]),
            "before_commit",
        ),
        (
            "a crash after one thinking",
            Reply::sse(vec![Step::Send(thinking("planning")), Step::Close]),
            "before_commit",
        ),
        (
            "a frame over max_frame_bytes before content",
            Reply::sse(vec![
                Step::Send(thinking("planning")),
                Step::Send(text(&big)),
                Step::Hang,
            ]),
            "before_commit",
        ),
        (
            "a stream that ends without content",
            Reply::sse(vec![
                Step::Send(thinking("planning")),
                Step::Send(done_frame()),
            ]),
            "before_commit",
        ),
        (
            "a 503 head",
            Reply::json(503, json!({"detail": "overloaded"})),
            "before_head",
        ),
    ];
    for (what, reply, stage) in cases {
        let h = Harness::new()
            .config(|c| c.runtime.pre_content = PreContent::Hold)
            .runtime(runtime_answering(move |_: &Received| reply.clone()))
            .config(|c| c.runtime.max_frame_bytes = 1024)
            .start()
            .await;
        let r = h.chat("org-a").body(BODY).send().await;
        assert_failed_over(&r, what);
        h.assert_legacy_got_the_chat(BODY, what);

        recorded(&h, 1, 1).await;
        let rt = [("mode", RT)];
        assert_eq!(metric(&h, "chat_execution_error_total", &rt), 1.0, "{what}");
        assert_eq!(
            metric(&h, "chat_runtime_failover_total", &[]),
            1.0,
            "{what}"
        );
        let by_stage = |s| metric(&h, "cutover_runtime_failovers_total", &[("stage", s)]);
        assert_eq!(by_stage(stage), 1.0, "{what}");
        assert_eq!(by_stage("before_head") + by_stage("before_commit"), 1.0);
        // Nothing was committed to, so no event was written on the runtime path.
        assert_eq!(metric(&h, "cutover_commit_total", &[]), 0.0, "{what}");
        assert_eq!(metric(&h, "chat_sse_events_total", &[]), 0.0, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_thinking_comes_out_in_order_with_the_first_content() {
    for mode in MODES {
        let h = Harness::new()
            .config(move |c| c.runtime.pre_content = mode)
            .runtime(runtime_sse(vec![
                Step::Send(thinking("one")),
                // Dropped and counted; it writes nothing, and releases nothing held.
                Step::Send(b"data: {not json\r\n\r\n".to_vec()),
                Step::Send(frame("ping", json!({}))),
                Step::Send(thinking("two")),
                Step::Send(text("answer")),
                Step::Send(complete()),
                Step::Send(done_frame()),
            ]))
            .start()
            .await;
        let r = h.chat("org-a").send().await;
        assert_served(&r, RT, "allowlist");
        let events = r.events();
        assert_eq!(
            names(&r),
            ["message", "heartbeat", "message", "message", "done"]
        );
        let contents: Vec<Value> = [0, 2, 3]
            .iter()
            .map(|&i| event_data(&events[i])["data"]["content"].clone())
            .collect();
        assert_eq!(contents, [json!("one"), json!("two"), json!("answer")]);
        let first = String::from_utf8(r.chunks[0].1.clone()).unwrap();
        if mode == PreContent::Hold {
            // The held events leave with the first content, in the same write.
            assert!(
                first.contains("\"one\"") && first.contains("\"answer\""),
                "{first:?}"
            );
        } else {
            // Streamed: the first status is in the client's first read, whatever else is.
            assert!(first.contains("\"one\""), "{first:?}");
        }
        assert_eq!(
            metric(&h, "cutover_commit_total", &[("trigger", "content")]),
            1.0
        );
        assert_eq!(metric(&h, "cutover_commit_wait_seconds", &[]), 1.0);
        assert_eq!(
            metric(&h, "chat_sse_events_total", &[("type", "thinking")]),
            2.0
        );
        assert!(h.legacy.work().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_after_content_stays_an_error_event() {
    for mode in MODES {
        let h = Harness::new()
            .config(move |c| c.runtime.pre_content = mode)
            .runtime(runtime_sse(vec![
                Step::Send(thinking("planning")),
                Step::Send(text("partial")),
                Step::Send(execution_error("LLM_ERROR")),
            ]))
            .start()
            .await;
        let r = h.chat("org-a").send().await;
        assert_served(&r, RT, "allowlist");
        assert_eq!(names(&r), ["message", "message", "error"]);
        assert_eq!(event_data(&r.events()[2])["code"], "LLM_ERROR");
        assert!(h.legacy.work().is_empty());
        recorded(&h, 1, 0).await;
        assert_eq!(
            metric(&h, "chat_execution_error_total", &[("mode", RT)]),
            1.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_after_the_commit_timeout_stays_an_error_event() {
    for mode in MODES {
        let h = Harness::new()
            .config(move |c| c.runtime.pre_content = mode)
            .runtime(runtime_sse(vec![
                Step::Send(thinking("planning")),
                // Past the commit timeout: the runtime's pacing is what this test is about.
                Step::Sleep(Duration::from_millis(400)),
                Step::Send(execution_error("LLM_ERROR")),
            ]))
            .config(|c| c.runtime.commit_timeout_ms = Some(100))
            .start()
            .await;
        let r = h.chat("org-a").send().await;
        assert_served(&r, RT, "allowlist");
        assert_eq!(names(&r), ["message", "error"]);
        // The held thinking went out at the commit, before the error was known.
        assert!(r.chunks[1].0 >= r.chunks[0].0);
        assert!(h.legacy.work().is_empty());
        assert_eq!(
            metric(&h, "cutover_commit_total", &[("trigger", "timeout")]),
            1.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_falling_due_while_held_commits() {
    for mode in MODES {
        let h = Harness::new()
            .config(move |c| c.runtime.pre_content = mode)
            .runtime(runtime_sse(vec![
                Step::Send(thinking("planning")),
                Step::Sleep(Duration::from_millis(1500)),
                Step::Send(text("answer")),
                Step::Send(complete()),
                Step::Send(done_frame()),
            ]))
            .config(|c| {
                c.runtime.heartbeat_secs = 1;
                c.runtime.commit_timeout_ms = Some(4000);
            })
            .start()
            .await;
        let r = h.chat("org-a").send().await;
        assert_served(&r, RT, "allowlist");
        assert_eq!(names(&r), ["message", "heartbeat", "message", "done"]);
        // Held, the heartbeat needs the head out: it commits. Streamed, it passes, and the
        // content commits.
        let trigger = match mode {
            PreContent::Hold => "heartbeat",
            PreContent::Stream => "content",
        };
        assert_eq!(
            metric(&h, "cutover_commit_total", &[("trigger", trigger)]),
            1.0,
            "{mode:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_event_commits_on_a_thinking_event() {
    for mode in MODES {
        let h = Harness::new()
            .config(move |c| c.runtime.pre_content = mode)
            .runtime(runtime_sse(vec![
                Step::Send(thinking("planning")),
                Step::Send(execution_error("LLM_ERROR")),
            ]))
            .config(|c| c.runtime.commit_on = CommitOn::FirstEvent)
            .start()
            .await;
        let r = h.chat("org-a").send().await;
        assert_served(&r, RT, "allowlist");
        assert_eq!(names(&r), ["message", "error"]);
        assert!(h.legacy.work().is_empty());
        assert_eq!(
            metric(&h, "cutover_commit_total", &[("trigger", "first_event")]),
            1.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_before_content_is_an_error_event_not_a_failover() {
    for mode in MODES {
        let h = Harness::new()
            .config(move |c| c.runtime.pre_content = mode)
            .runtime(runtime_sse(vec![
                Step::Send(thinking("planning")),
                Step::Send(execution_error("EXECUTION_CANCELLED")),
                Step::Send(done_frame()),
            ]))
            .start()
            .await;
        let r = h.chat("org-a").send().await;
        assert_served(&r, RT, "allowlist");
        assert_eq!(names(&r), ["message", "error"]);
        assert_eq!(event_data(&r.events()[1])["code"], "EXECUTION_CANCELLED");
        assert!(h.legacy.work().is_empty(), "{mode:?}: legacy was asked");
        assert_eq!(
            metric(&h, "cutover_commit_total", &[("trigger", "cancel")]),
            1.0
        );
        let cancelled = || metric(&h, "chat_execution_cancelled_total", &[("mode", RT)]);
        assert!(eventually(Duration::from_secs(3), || cancelled() == 1.0).await);
        assert_eq!(
            metric(&h, "chat_execution_error_total", &[("mode", RT)]),
            0.0
        );
        // Neither failed over before the commit nor rescued in the open stream.
        assert_eq!(metric(&h, "cutover_runtime_failovers_total", &[]), 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_held_is_not_counted_against_the_runtime() {
    for mode in MODES {
        let h = Harness::new()
            .config(move |c| c.runtime.pre_content = mode)
            .runtime(runtime_sse(vec![
                Step::Send(thinking("planning")),
                Step::Hang,
            ]))
            .config(|c| c.runtime.commit_timeout_ms = Some(4000))
            .start()
            .await;
        let mut client = Client::connect(h.proxy_addr).await;
        let auth = format!("Bearer {}", token("org-a"));
        client
            .send(
                "POST",
                "/api/v1/chat/sessions/s-1",
                &[("authorization", auth.as_str())],
                HI.as_bytes(),
            )
            .await;
        h.runtime.wait_for_work(1).await;
        drop(client);

        assert_departure_recorded(&h, RT, 0.0).await;
        assert_eq!(metric(&h, "cutover_runtime_failovers_total", &[]), 0.0);
        assert_eq!(metric(&h, "cutover_commit_total", &[]), 0.0);
        assert!(
            h.legacy.work().is_empty(),
            "a departed client is not failed over"
        );
        let (_, window) = h.admin("GET", "/runtime/metrics").await;
        assert_eq!(window["data"]["runtime"]["total"], 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_counts_a_failover_before_the_commit_as_an_error() {
    let harness = Harness::new()
        .config(|c| c.runtime.pre_content = PreContent::Hold)
        .runtime(runtime_sse(vec![
            Step::Send(thinking("planning")),
            Step::Send(execution_error("LLM_ERROR")),
        ]));
    assert_two_failures_open_the_breaker(harness, assert_failed_over).await;
}

/// Two thinking events, then an `execution_error`: the real runtime's usual failure.
fn failing_runtime() -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    runtime_sse(vec![
        Step::Send(thinking("planning")),
        Step::Send(thinking("still planning")),
        Step::Send(execution_error("LLM_ERROR")),
        Step::Send(done_frame()),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_bridge_a_failover_saves_nothing_and_leaves_no_session() {
    let legacy = FakeLegacy::seeded().await;
    let h = Harness::new()
        .bridged(legacy)
        .runtime(failing_runtime())
        .config(|c| c.runtime.pre_content = PreContent::Hold)
        .start()
        .await;
    legacy::assert_bridge_chats_leave_nothing(&h, BODY, assert_failed_over).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_bridge_the_user_message_is_saved_at_the_commit() {
    for mode in MODES {
        let legacy = FakeLegacy::seeded().await;
        let h = Harness::new()
            .legacy_server(legacy)
            .runtime(runtime_sse(vec![
                Step::Send(thinking("planning")),
                Step::WaitRelease,
                Step::Send(text("Hello")),
                Step::Send(complete()),
                Step::Send(done_frame()),
            ]))
            .config(move |c| {
                c.bridge.enabled = true;
                c.runtime.pre_content = mode;
            })
            .start()
            .await;
        let auth = format!("Bearer {}", token("org-a"));
        let mut client = Client::connect(h.proxy_addr).await;
        client
            .send(
                "POST",
                "/api/v1/chat/sessions/s-1",
                &[("authorization", auth.as_str())],
                br#"{"message":"new"}"#,
            )
            .await;
        h.runtime.wait_for_work(1).await;
        // The runtime accepted and is thinking: nothing is saved while the proxy may still fail over.
        assert_eq!(h.legacy.messages("s-1").len(), 3);
        h.runtime.release();
        let r = client.read_response().await;
        assert_served(&r, RT, "allowlist");
        assert_eq!(names(&r), ["message", "message", "done"]);
        let messages = h.legacy.messages("s-1");
        assert_eq!(messages.len(), 5);
        assert_eq!(messages[3]["content"], "new");
        assert_eq!(messages[4]["content"], "ok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_while_held_commits_and_answers_timeout() {
    for mode in MODES {
        let h = Harness::new()
            .config(move |c| c.runtime.pre_content = mode)
            .runtime(runtime_sse(vec![
                Step::Send(thinking("planning")),
                Step::Hang,
            ]))
            .config(|c| {
                c.runtime.execution_timeout_ms = 400;
                c.runtime.commit_timeout_ms = Some(300);
            })
            .start()
            .await;
        let r = h.chat("org-a").send().await;
        assert_served(&r, RT, "allowlist");
        assert_eq!(names(&r), ["message", "error"]);
        assert_eq!(event_data(&r.events()[1])["code"], "TIMEOUT");
        // The commit timeout came first here; with the deadline first the answer is the same.
        let h2 = Harness::new()
            .config(move |c| c.runtime.pre_content = mode)
            .runtime(runtime_sse(vec![
                Step::Send(thinking("planning")),
                Step::Hang,
            ]))
            .config(|c| c.runtime.execution_timeout_ms = 400)
            .start()
            .await;
        let r = h2.chat("org-a").send().await;
        assert_served(&r, RT, "allowlist");
        assert_eq!(names(&r), ["message", "error"]);
        assert_eq!(event_data(&r.events()[1])["code"], "TIMEOUT");
        assert_eq!(
            metric(&h2, "cutover_commit_total", &[("trigger", "deadline")]),
            1.0
        );
        recorded(&h2, 1, 0).await;
        assert_eq!(
            metric(&h2, "chat_execution_timeout_total", &[("mode", RT)]),
            1.0
        );
        assert!(h.legacy.work().is_empty() && h2.legacy.work().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_that_only_thinks_is_committed_to_when_too_much_is_held() {
    let n = cutover_proxy::core::commit::MAX_HELD_EVENTS;
    let mut steps: Vec<Step> = (0..n + 2)
        .map(|i| Step::Send(thinking(&format!("step {i}"))))
        .collect();
    steps.push(Step::Send(execution_error("LLM_ERROR")));
    let h = Harness::new()
        .config(|c| c.runtime.pre_content = PreContent::Hold)
        .runtime(runtime_sse(steps))
        .start()
        .await;
    let r = h.chat("org-a").send().await;
    assert_served(&r, RT, "allowlist");
    let names = names(&r);
    assert_eq!(names.len(), n + 3, "{names:?}");
    assert_eq!(names.last().map(String::as_str), Some("error"));
    let events = r.events();
    for (i, ev) in events.iter().take(n + 2).enumerate() {
        assert_eq!(
            event_data(ev)["data"]["content"],
            format!("step {i}"),
            "in order"
        );
    }
    assert_eq!(
        metric(&h, "cutover_commit_total", &[("trigger", "overflow")]),
        1.0
    );
    assert!(h.legacy.work().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_down_while_held_commits_and_answers_shutting_down() {
    for mode in MODES {
        let h = Harness::new()
            .config(move |c| c.runtime.pre_content = mode)
            .runtime(runtime_sse(vec![
                Step::Send(thinking("planning")),
                Step::Hang,
            ]))
            .config(|c| c.runtime.commit_timeout_ms = Some(4000))
            .start()
            .await;
        let chat = tokio::spawn(h.chat("org-a").send());
        // The relay counts its stream from the runtime's head on, held or not.
        let in_flight = || metric(&h, "chat_streams_in_flight", &[("mode", RT)]);
        assert!(
            eventually(Duration::from_secs(3), || in_flight() == 1.0).await,
            "the runtime's stream never started"
        );
        h.cut_off(chat, "the held stream").await;
        assert_eq!(
            metric(&h, "cutover_commit_total", &[("trigger", "shutdown")]),
            1.0
        );
        // Not the runtime's fault, and nothing is failed over while the proxy stops.
        assert_eq!(metric(&h, "cutover_runtime_failovers_total", &[]), 0.0);
        assert!(h.legacy.work().is_empty());
        assert_eq!(
            metric(&h, "chat_execution_error_total", &[("mode", RT)]),
            0.0
        );
    }
}
