//! The commit point: while nothing has reached the user, a runtime that fails first thing is
//! failed over to legacy with the original body, nothing saved and an error on the breaker;
//! after the commit (first content, the commit timeout, a heartbeat, a cancel) failures are
//! `error` events on the runtime's stream. With `runtime.pre_content = "hold"`; what holds with
//! `"stream"` as well runs under both.

use crate::support;

use std::time::Duration;

use cutover_proxy::core::config::{CommitOn, Config, PreContent};
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

/// A proxy under `mode`, with `tweak`, in front of a runtime that thinks and then goes on with
/// `after`.
async fn thinks_then(
    mode: PreContent,
    after: Vec<Step>,
    tweak: impl FnOnce(&mut Config) + 'static,
) -> Running {
    let mut steps = vec![Step::Send(thinking("planning"))];
    steps.extend(after);
    Harness::new()
        .config(move |c| c.runtime.pre_content = mode)
        .runtime(runtime_sse(steps))
        .config(tweak)
        .start()
        .await
}

/// A proxy under `mode` in front of a runtime that thinks and then hangs, with a commit timeout
/// (4 s) nothing here waits for.
async fn held_open(mode: PreContent) -> Running {
    thinks_then(mode, vec![Step::Hang], |c| {
        c.runtime.commit_timeout_ms = Some(4000)
    })
    .await
}

/// Org-a's chat, served by the runtime whole with events named `names`; legacy never asked.
async fn on_the_runtime(h: &Running, names: &[&str]) -> Response {
    let r = h.chat("org-a").send().await;
    assert_served(&r, RT, "allowlist");
    assert_eq!(event_names(&r), names, "{:?}", r.events());
    assert!(h.legacy.work().is_empty(), "legacy was asked");
    r
}

/// The one commit was for `trigger`.
#[track_caller]
fn assert_committed_by(h: &Running, trigger: &str) {
    let commits = metric(h, "cutover_commit_total", &[("trigger", trigger)]);
    assert_eq!(commits, 1.0, "commits for {trigger}");
}

/// The `code` of the event at `at`.
fn code_at(r: &Response, at: usize) -> Value {
    event_data(&r.events()[at])["code"].clone()
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
    // Failing before any content: after the head, before the commit.
    let mut streams = failures_after_thinking();
    streams.push((
        "execution_error first",
        vec![
            Step::Send(execution_error("LLM_ERROR")),
            Step::Send(done_frame()),
        ],
    ));
    streams.push((
        "two thinking, then execution_error",
        vec![
            Step::Send(thinking("planning")),
            Step::Send(thinking("still planning")),
            Step::Send(execution_error("LLM_RATE_LIMITED")),
            Step::Send(done_frame()),
        ],
    ));
    let mut cases: Vec<(&str, Reply, &str)> = streams
        .into_iter()
        .map(|(what, steps)| (what, Reply::sse(steps), "before_commit"))
        .collect();
    let overloaded = Reply::json(503, json!({"detail": "overloaded"}));
    cases.push(("a 503 head", overloaded, "before_head"));
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
        let after = vec![
            Step::Send(text("partial")),
            Step::Send(execution_error("LLM_ERROR")),
        ];
        let h = thinks_then(mode, after, |_| {}).await;
        let r = on_the_runtime(&h, &["message", "message", "error"]).await;
        assert_eq!(code_at(&r, 2), "LLM_ERROR");
        assert_one_runtime(&h, 0, "error").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_after_the_commit_timeout_stays_an_error_event() {
    for mode in MODES {
        // Past the commit timeout: the runtime's pacing is what this test is about.
        let after = vec![
            Step::Sleep(Duration::from_millis(400)),
            Step::Send(execution_error("LLM_ERROR")),
        ];
        let h = thinks_then(mode, after, |c| c.runtime.commit_timeout_ms = Some(100)).await;
        let r = on_the_runtime(&h, &["message", "error"]).await;
        // The held thinking went out at the commit, before the error was known.
        assert!(r.chunks[1].0 >= r.chunks[0].0, "{mode:?}");
        assert_committed_by(&h, "timeout");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_falling_due_while_held_commits() {
    for mode in MODES {
        let mut after = vec![Step::Sleep(Duration::from_millis(1500))];
        after.extend(answer_steps("answer"));
        let h = thinks_then(mode, after, |c| {
            c.runtime.heartbeat_secs = 1;
            c.runtime.commit_timeout_ms = Some(4000);
        })
        .await;
        on_the_runtime(&h, &["message", "heartbeat", "message", "done"]).await;
        // Held, the heartbeat needs the head out: it commits. Streamed, it passes, and the
        // content commits.
        match mode {
            PreContent::Hold => assert_committed_by(&h, "heartbeat"),
            PreContent::Stream => assert_committed_by(&h, "content"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_event_commits_on_a_thinking_event() {
    for mode in MODES {
        let after = vec![Step::Send(execution_error("LLM_ERROR"))];
        let h = thinks_then(mode, after, |c| c.runtime.commit_on = CommitOn::FirstEvent).await;
        on_the_runtime(&h, &["message", "error"]).await;
        assert_committed_by(&h, "first_event");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_before_content_is_an_error_event_not_a_failover() {
    for mode in MODES {
        let after = vec![
            Step::Send(execution_error("EXECUTION_CANCELLED")),
            Step::Send(done_frame()),
        ];
        let h = thinks_then(mode, after, |_| {}).await;
        let r = on_the_runtime(&h, &["message", "error"]).await;
        assert_eq!(code_at(&r, 1), "EXECUTION_CANCELLED");
        assert_committed_by(&h, "cancel");
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
        let h = held_open(mode).await;
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
        // The commit timeout comes first, then the deadline; with the deadline first the answer
        // is the same.
        let h = thinks_then(mode, vec![Step::Hang], |c| {
            c.runtime.execution_timeout_ms = 400;
            c.runtime.commit_timeout_ms = Some(300);
        })
        .await;
        let r = on_the_runtime(&h, &["message", "error"]).await;
        assert_eq!(code_at(&r, 1), "TIMEOUT");
        let h = thinks_then(mode, vec![Step::Hang], |c| {
            c.runtime.execution_timeout_ms = 400
        })
        .await;
        let r = on_the_runtime(&h, &["message", "error"]).await;
        assert_eq!(code_at(&r, 1), "TIMEOUT");
        assert_committed_by(&h, "deadline");
        assert_one_runtime(&h, 0, "timeout").await;
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
    let mut names = vec!["message"; n + 2];
    names.push("error");
    let r = on_the_runtime(&h, &names).await;
    let events = r.events();
    for (i, ev) in events.iter().take(n + 2).enumerate() {
        assert_eq!(
            event_data(ev)["data"]["content"],
            format!("step {i}"),
            "in order"
        );
    }
    assert_committed_by(&h, "overflow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_down_while_held_commits_and_answers_shutting_down() {
    for mode in MODES {
        let h = held_open(mode).await;
        let chat = tokio::spawn(h.chat("org-a").send());
        // The relay counts its stream from the runtime's head on, held or not.
        let in_flight = || metric(&h, "chat_streams_in_flight", &[("mode", RT)]);
        assert!(
            eventually(Duration::from_secs(3), || in_flight() == 1.0).await,
            "the runtime's stream never started"
        );
        h.cut_off(chat, "the held stream").await;
        assert_committed_by(&h, "shutdown");
        // Not the runtime's fault, and nothing is failed over while the proxy stops.
        assert_eq!(metric(&h, "cutover_runtime_failovers_total", &[]), 0.0);
        assert!(h.legacy.work().is_empty());
        assert_eq!(
            metric(&h, "chat_execution_error_total", &[("mode", RT)]),
            0.0
        );
    }
}
