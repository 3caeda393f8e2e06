//! The runtime path end to end: the runtime's SSE, cut and framed any way, reaches the client as
//! whole LF-only Agent2UI events, as soon as each frame is complete; every way a runtime stream
//! can fail ends in exactly one `error` event and a properly terminated response.
//!
//! Prometheus counters are process-wide and the tests of this file run in parallel, so each
//! counter asserted here by delta is moved by one test only (dropped frames) or by tests that
//! hold `COUNTERS` (timeouts, cancellations). Per-server numbers come from the admin API of each
//! test's own proxy.

use crate::support;

use std::time::{Duration, Instant};

use cutover_proxy::app::LocalServer;
use serde_json::{json, Value};
use support::*;
use tokio::io::AsyncReadExt;

/// Taken by the tests that move the timeout or cancellation counters, so the deltas they assert
/// are their own.
static COUNTERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A runtime frame as sse-starlette writes it, with `sep` as the line terminator.
fn frame_sep(event: &str, data: Value, sep: &str) -> Vec<u8> {
    let payload = json!({"event": event, "data": data, "timestamp": "2026-02-09T10:00:00.000Z"});
    format!("data: {payload}{sep}{sep}").into_bytes()
}

fn names(events: &[(String, String)]) -> Vec<&str> {
    events.iter().map(|(e, _)| e.as_str()).collect()
}

/// The events of a stream that ended with an error: exactly one `error`, last, and a properly
/// terminated chunked body. Returns the events and the error's data.
fn ends_with_one_error(r: &Response) -> (Vec<(String, String)>, Value) {
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-execution-mode"), Some(RT));
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert!(r.complete, "the chunked response was not terminated: {r:?}");
    let events = whole_events(r);
    let errors = events.iter().filter(|(e, _)| e == "error").count();
    assert_eq!(errors, 1, "expected exactly one error event: {events:?}");
    let last = events.last().expect("at least the error event");
    assert_eq!(
        last.0, "error",
        "the error event must be the last: {events:?}"
    );
    assert!(
        !events.iter().any(|(e, _)| e == "done"),
        "done and error both sent: {events:?}"
    );
    let err = event_data(last);
    assert!(
        err["code"].is_string() && err["message"].is_string(),
        "error data: {err}"
    );
    (events, err)
}

/// Org-a's chat on `session`, ended cleanly: its events, each chunk whole (see [`whole_events`]).
async fn whole_stream(h: &Running, session: &str) -> Vec<(String, String)> {
    let r = h.chat("org-a").session(session).send().await;
    assert!(r.complete, "{session}: response not terminated");
    whole_events(&r)
}

/// Org-a's chat on `session`: one event, then the one error that ends it (as
/// [`ends_with_one_error`] checks); the events and the error's data.
async fn message_then_error(h: &Running, session: &str) -> (Vec<(String, String)>, Value) {
    let r = h.chat("org-a").session(session).send().await;
    let (events, err) = ends_with_one_error(&r);
    assert_eq!(names(&events), ["message", "error"], "{session}");
    (events, err)
}

fn dropped(server: &LocalServer, cause: &str) -> u64 {
    counter(&server.shared.metrics.sse_dropped_frames_total, cause)
}

/// The admin API's runtime window, once `n` runtime executions are recorded.
async fn runtime_stats(server: &LocalServer, n: u64) -> Value {
    recorded(server, n, 0).await;
    let (status, body) = admin(server, "GET", "/runtime/metrics", None).await;
    assert_eq!(status, 200);
    body["data"]["runtime"].clone()
}

/// After a client left: the proxy hung up on the runtime (within 3 s), counted the execution
/// as cancelled (one more than `cancelled_before`), and charged the runtime nothing.
async fn assert_left_uncharged(h: &Running, cancelled_before: u64, what: &str) {
    assert!(
        h.runtime.wait_for_hang_ups(1, Duration::from_secs(3)).await,
        "{what}: the proxy kept the runtime connection open after the client left"
    );
    let cancelled = || counter(&h.shared.metrics.execution_cancelled_total, RT);
    assert!(
        eventually(Duration::from_secs(2), || cancelled()
            == cancelled_before + 1)
        .await,
        "{what}: the departure was not counted as cancelled"
    );
    let stats = runtime_stats(h, 0).await;
    let charged = ["total", "error", "timeout"].map(|k| stats[k].as_u64());
    assert_eq!(
        charged,
        [Some(0); 3],
        "{what} is not the runtime's fault: {stats}"
    );
    assert_eq!(h.shared.breaker.window_stats().total, 0, "{what}");
}

/// The runtime's admin stats once `n` executions are recorded, after checking that they are
/// all of them `outcome` (`success`, `error`, `timeout`).
async fn runtime_all(server: &LocalServer, n: u64, outcome: &str) -> Value {
    let stats = runtime_stats(server, n).await;
    assert_eq!(
        (stats["total"].as_u64(), stats[outcome].as_u64()),
        (Some(n), Some(n)),
        "{outcome}: {stats}"
    );
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_the_client_whole_whatever_the_runtime_framing() {
    // One session per line terminator; the runtime cuts frames at awkward bytes and packs
    // several frames into one send.
    fn script(sep: &str) -> Vec<Step> {
        let thinking = frame_sep(
            "thinking",
            json!({"content": "让我想想", "stage": "plan"}),
            sep,
        );
        let hello = frame_sep("text_chunk", json!({"content": "你好"}), sep);
        let world = frame_sep("text_chunk", json!({"content": "世界🌏"}), sep);
        let tool = frame_sep(
            "tool_call_start",
            json!({"tool_name": "search", "arguments": {"q": "天气"}}),
            sep,
        );
        let complete = frame_sep(
            "execution_complete",
            json!({"final_response": "你好世界🌏"}),
            sep,
        );
        let done = format!("data: [DONE]{sep}{sep}").into_bytes();

        // Inside a multi-byte character: the second byte of 你.
        let cut_char = hello.windows(3).position(|w| w == "你".as_bytes()).unwrap() + 1;
        // Inside the 4-byte emoji.
        let cut_emoji = world.windows(4).position(|w| w == "🌏".as_bytes()).unwrap() + 2;
        // Between the line's terminator and the blank line's (between \r and \n for CRLF).
        let cut_term = world.len() - sep.len() - 1;
        let cut_blank = world.len() - 1;
        let mut steps = vec![
            Step::Send(thinking[..5].to_vec()), // inside the field name "data"
            Step::Send(thinking[5..].to_vec()),
            Step::Send(hello[..cut_char].to_vec()),
            Step::Send(hello[cut_char..].to_vec()),
            Step::Send(world[..cut_emoji].to_vec()),
            Step::Send(world[cut_emoji..cut_term].to_vec()),
            Step::Send(world[cut_term..cut_blank].to_vec()),
            Step::Send(world[cut_blank..].to_vec()),
        ];
        // Several frames and a comment in one send.
        let mut packed = tool;
        packed.extend_from_slice(format!(": ping{sep}").as_bytes());
        packed.extend_from_slice(&complete);
        packed.extend_from_slice(&done);
        steps.push(Step::Send(packed));
        steps
    }
    let h = Harness::new()
        .runtime(runtime_answering(|req: &Received| {
            let sep = match req.json()["session_id"].as_str() {
                Some("crlf") => "\r\n",
                Some("lf") => "\n",
                Some("cr") => "\r",
                other => panic!("unexpected session {other:?}"),
            };
            Reply::sse(script(sep))
        }))
        .start()
        .await;

    for session in ["crlf", "lf", "cr"] {
        let r = chat(h.proxy_addr, Some("org-a"), session, HI).await;
        assert_eq!(r.status, 200, "{session}");
        assert_eq!(r.header("x-execution-mode"), Some(RT), "{session}");
        assert!(r.complete, "{session}: response not terminated");
        let events = whole_events(&r);
        assert_eq!(
            names(&events),
            ["message", "message", "message", "message", "done"],
            "{session}: {events:?}"
        );
        let types: Vec<Value> = events[..4]
            .iter()
            .map(|e| event_data(e)["type"].clone())
            .collect();
        assert_eq!(
            types,
            [
                json!("thinking"),
                json!("text"),
                json!("text"),
                json!("tool_call")
            ],
            "{session}"
        );
        for (i, pointer, expected) in [
            (0, "/data", json!({"content": "让我想想", "stage": "plan"})),
            (1, "/data/content", json!("你好")),
            (2, "/data/content", json!("世界🌏")),
            (3, "/data/toolName", json!("search")),
            (3, "/data/arguments", json!({"q": "天气"})),
        ] {
            let data = event_data(&events[i]);
            assert_eq!(
                data.pointer(pointer),
                Some(&expected),
                "{session}: event {i} {pointer}"
            );
        }
        let done = event_data(&events[4]);
        assert_eq!(done["sessionId"], session);
        assert_eq!(done["executionMode"], RT);
    }
    assert!(h.legacy.work().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_event_arrives_while_the_runtime_still_holds_the_second() {
    let h = Harness::new()
        .runtime(runtime_sse(vec![
            Step::Send(frame("text_chunk", json!({"content": "first"}))),
            Step::WaitRelease,
            Step::Send(frame("text_chunk", json!({"content": "second"}))),
            Step::Send(frame(
                "execution_complete",
                json!({"final_response": "first second"}),
            )),
            Step::Send(done_frame()),
        ]))
        .start()
        .await;

    let mut c = Client::connect(h.proxy_addr).await;
    c.post_chat(Some("org-a"), "s-stream", HI.as_bytes()).await;
    // The runtime sends the second event only once the client holds the first: a proxy that
    // buffered anything until the end would leave both waiting until the timeout below.
    let mut seen = Vec::new();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        c.read_response_with(|chunk| {
            if seen.is_empty() {
                h.runtime.release();
            }
            seen.push(String::from_utf8_lossy(chunk).to_string());
        }),
    )
    .await
    .expect("the first event did not arrive before the runtime sent the second");
    assert!(r.complete);
    let first = parse_events(&seen[0]);
    assert_eq!(first.len(), 1, "first chunk: {:?}", seen[0]);
    assert_eq!(event_data(&first[0])["data"]["content"], "first");
    let events = whole_events(&r);
    assert_eq!(names(&events), ["message", "message", "done"]);
    assert_eq!(event_data(&events[1])["data"]["content"], "second");
}

/// A runtime whose every answer is `steps`, which end before `execution_complete`: org-a's
/// chat on `session` ends with `STREAM_TRUNCATED`.
async fn truncated(steps: Vec<Step>, session: &str) -> Running {
    let h = Harness::new().runtime(runtime_sse(steps)).start().await;
    let (_, err) = message_then_error(&h, session).await;
    assert_eq!(err["code"], "STREAM_TRUNCATED", "{session}");
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_ending_without_execution_complete_is_truncated() {
    // Chunked body ends cleanly, but neither execution_complete nor [DONE] came.
    let h = truncated(vec![Step::Send(text("half an answer"))], "s-trunc").await;
    runtime_all(&h, 1, "error").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn done_marker_without_execution_complete_is_truncated() {
    truncated(
        vec![Step::Send(text("x")), Step::Send(done_frame())],
        "s-done",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_dying_mid_stream_ends_with_one_error_event() {
    // Two ways to die: after a whole frame, and in the middle of one (whose half must not
    // reach the client).
    let half = frame("text_chunk", json!({"content": "never finished"}));
    let h = Harness::new()
        .runtime(runtime_answering(move |req: &Received| {
            let mut steps = vec![Step::Send(frame(
                "text_chunk",
                json!({"content": "before"}),
            ))];
            if req.json()["session_id"] == "mid-frame" {
                steps.push(Step::Send(half[..half.len() / 2].to_vec()));
            }
            steps.push(Step::Close);
            Reply::sse(steps)
        }))
        .start()
        .await;

    for session in ["between-frames", "mid-frame"] {
        let (events, err) = message_then_error(&h, session).await;
        assert_eq!(event_data(&events[0])["data"]["content"], "before");
        assert_ne!(
            err["code"], "STREAM_TRUNCATED",
            "{session}: a reset is not a clean end"
        );
    }
    runtime_all(&h, 2, "error").await;
    assert!(
        h.legacy.work().is_empty(),
        "bytes reached the client: no failover"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_over_the_limit_ends_with_frame_too_large() {
    // A terminated frame over the limit, and an endless line that never terminates (the proxy
    // must not buffer it until the execution timeout).
    let big = frame("text_chunk", json!({"content": "x".repeat(3000)}));
    let endless: Vec<u8> = [
        b"data: {\"event\":\"text_chunk\",\"data\":{\"content\":\"".as_slice(),
        &[b'y'; 700],
    ]
    .concat();
    let h = Harness::new()
        .runtime(runtime_answering(move |req: &Received| {
            let mut steps = vec![Step::Send(frame("text_chunk", json!({"content": "small"})))];
            if req.json()["session_id"] == "terminated" {
                steps.push(Step::Send(big.clone()));
                steps.push(Step::Send(frame("execution_complete", json!({}))));
                steps.push(Step::Send(done_frame()));
            } else {
                steps.push(Step::Send(endless.clone()));
                steps.push(Step::Send(vec![b'z'; 700]));
                steps.push(Step::Hang);
            }
            Reply::sse(steps)
        }))
        .config(move |cfg| {
            cfg.runtime.max_frame_bytes = 1024;
            cfg.runtime.execution_timeout_ms = 10_000;
        })
        .start()
        .await;

    for session in ["terminated", "endless"] {
        let started = Instant::now();
        let r = chat(h.proxy_addr, Some("org-a"), session, HI).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{session}: waited for the timeout"
        );
        let (events, err) = ends_with_one_error(&r);
        assert_eq!(names(&events), ["message", "error"], "{session}");
        assert_eq!(err["code"], "FRAME_TOO_LARGE", "{session}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_error_becomes_one_error_event_with_the_runtime_code() {
    let h = Harness::new()
        .runtime(runtime_answering(|req: &Received| {
            let err = if req.json()["session_id"] == "with-code" {
                json!({"error": "tool crashed", "code": "TOOL_FAILED"})
            } else {
                json!({"error": "something broke"})
            };
            Reply::sse(vec![
                Step::Send(frame("text_chunk", json!({"content": "working"}))),
                Step::Send(frame("execution_error", err)),
                // Whatever follows an execution_error is not relayed.
                Step::Send(frame("text_chunk", json!({"content": "after"}))),
                Step::Send(done_frame()),
            ])
        }))
        .start()
        .await;

    let (_, err) = message_then_error(&h, "with-code").await;
    assert_eq!(
        err,
        json!({"code": "TOOL_FAILED", "message": "tool crashed"})
    );

    let (_, err) = message_then_error(&h, "without-code").await;
    assert_eq!(
        err,
        json!({"code": "SSE_STREAM_ERROR", "message": "something broke"})
    );

    runtime_all(&h, 2, "error").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_frames_that_are_not_events_are_dropped_and_counted() {
    let h = Harness::new()
        .runtime(runtime_sse(vec![
            Step::Send(b": ping\r\n\r\n".to_vec()),
            Step::Send(frame("text_chunk", json!({"content": "a"}))),
            Step::Send(b"data: this is not json\r\n\r\n".to_vec()),
            Step::Send(frame("mystery_event", json!({"x": 1}))),
            Step::Send(frame("text_chunk", json!({"content": ""}))),
            Step::Send(frame("ping", json!({}))),
            Step::Send(b": ping - 2026-02-09 10:00:00\r\n\r\n".to_vec()),
            Step::Send(frame("text_chunk", json!({"content": "b"}))),
            Step::Send(frame("execution_complete", json!({"final_response": "ab"}))),
            Step::Send(done_frame()),
        ]))
        .start()
        .await;
    let (malformed, unknown) = (dropped(&h, "malformed"), dropped(&h, "unknown_event"));

    let events = whole_stream(&h, "s-drop").await;
    assert_eq!(
        names(&events),
        ["message", "heartbeat", "message", "done"],
        "{events:?}"
    );
    assert_eq!(event_data(&events[0])["data"]["content"], "a");
    assert_eq!(events[1].1, "null");
    assert_eq!(event_data(&events[2])["data"]["content"], "b");
    // The Agent2UI envelope of a message.
    let msg = event_data(&events[0]);
    assert_eq!(msg["type"], "text");
    assert!(
        msg["id"].is_string() && msg["timestamp"].is_string(),
        "{msg}"
    );
    assert_ne!(
        msg["id"],
        event_data(&events[2])["id"],
        "message ids must be unique"
    );

    assert_eq!(dropped(&h, "malformed") - malformed, 1);
    assert_eq!(dropped(&h, "unknown_event") - unknown, 1);
    runtime_all(&h, 1, "success").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_runtime_gets_heartbeats_between_events() {
    let h = Harness::new()
        .runtime(runtime_sse(vec![
            Step::Send(frame("text_chunk", json!({"content": "before"}))),
            Step::Sleep(Duration::from_millis(2500)),
            Step::Send(frame("text_chunk", json!({"content": "after"}))),
            Step::Send(frame("execution_complete", json!({}))),
            Step::Send(done_frame()),
        ]))
        .config(move |cfg| {
            cfg.runtime.heartbeat_secs = 1;
            cfg.runtime.execution_timeout_ms = 10_000;
        })
        .start()
        .await;

    let r = h.chat("org-a").session("s-hb").send().await;
    assert!(r.complete);
    let events = whole_events(&r);
    let n = names(&events);
    assert_eq!(n.first(), Some(&"message"));
    assert_eq!(&n[n.len() - 2..], ["message", "done"], "{events:?}");
    let heartbeats = &events[1..events.len() - 2];
    assert!(
        (1..=3).contains(&heartbeats.len()),
        "expected one or two heartbeats in ~2.5 s of silence: {events:?}"
    );
    for hb in heartbeats {
        assert_eq!(hb, &("heartbeat".to_string(), "null".to_string()));
    }
    // Each heartbeat is its own write, about a second after the previous write.
    let times: Vec<Duration> = r.chunks.iter().map(|(t, _)| *t).collect();
    for w in times[..=heartbeats.len()].windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(900),
            "heartbeat too early: {times:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_timeout_ends_with_a_timeout_error_event() {
    let _counters = COUNTERS.lock().await;
    let h = Harness::new()
        .runtime(runtime_answering(|req: &Received| {
            match req.json()["session_id"].as_str() {
                // Accepts the request, never answers.
                Some("no-header") => Reply::silent(vec![Step::Hang]),
                Some("headers-only") => Reply::sse(vec![Step::Hang]),
                _ => Reply::sse(vec![
                    Step::Send(frame("text_chunk", json!({"content": "thinking..."}))),
                    Step::Hang,
                ]),
            }
        }))
        .config(move |cfg| {
            cfg.runtime.execution_timeout_ms = 600;
        })
        .start()
        .await;
    let timeouts = || {
        h.shared
            .metrics
            .execution_timeout_total
            .with_label_values(&[RT])
            .get()
    };
    let before = timeouts();

    // A first event then nothing; a response header then nothing; not even a header (an error
    // event too, not a hang, and not a failover: the runtime had the whole execution time).
    let cases: [(&str, &[&str]); 3] = [
        ("first-event", &["message", "error"]),
        ("headers-only", &["error"]),
        ("no-header", &["error"]),
    ];
    for (n, (session, expected)) in cases.into_iter().enumerate() {
        let started = Instant::now();
        let r = chat(h.proxy_addr, Some("org-a"), session, HI).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(550) && took < Duration::from_millis(2000),
            "{session}: timed out after {took:?}, expected ~600 ms"
        );
        let (events, err) = ends_with_one_error(&r);
        assert_eq!(names(&events), expected, "{session}");
        assert_eq!(err["code"], "TIMEOUT", "{session}");
        let n = n as u64 + 1;
        assert!(
            eventually(Duration::from_secs(2), || timeouts() == before + n).await,
            "{session}: chat_execution_timeout_total moved by {} instead of {n}",
            timeouts() - before
        );
        let stats = runtime_stats(&h, n).await;
        assert_eq!(
            (stats["total"].as_u64(), stats["timeout"].as_u64()),
            (Some(n), Some(n)),
            "{session}: {stats}"
        );
    }
    assert!(h.legacy.work().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_closes_the_runtime_connection_and_is_not_counted() {
    let _counters = COUNTERS.lock().await;
    // After the first event the runtime holds the stream until the proxy hangs up.
    let h = Harness::new()
        .runtime(runtime_script(|_| {
            Reply::sse(vec![
                Step::Send(frame("text_chunk", json!({"content": "first"}))),
                Step::Hang,
            ])
        }))
        .start()
        .await;
    let server = &h.server;
    let cancelled = || counter(&server.shared.metrics.execution_cancelled_total, RT);
    let before = cancelled();

    let started = Instant::now();
    let auth = format!("Bearer {}", token("org-a"));
    let (first, client) = first_chunk_of_chat(server.proxy_addr, auth, "s-gone", HI.into()).await;
    assert_eq!(parse_events(std::str::from_utf8(&first).unwrap()).len(), 1);
    // The client goes away mid-stream (dropping its socket).
    client.abort();
    let _ = client.await;

    assert_left_uncharged(&h, before, "a client disconnect mid-stream").await;
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_hanging_after_execution_complete_gets_no_error_after_done() {
    // execution_complete came, [DONE] never does: the client already has its `done`, so the
    // deadline ends the stream without an error event, and the execution counts as a success.
    let h = Harness::new()
        .runtime(runtime_sse(vec![
            Step::Send(frame("text_chunk", json!({"content": "answer"}))),
            Step::Send(frame(
                "execution_complete",
                json!({"final_response": "answer"}),
            )),
            Step::Hang,
        ]))
        .config(move |cfg| {
            cfg.runtime.execution_timeout_ms = 500;
        })
        .start()
        .await;

    let events = whole_stream(&h, "s-late").await;
    assert_eq!(names(&events), ["message", "done"], "{events:?}");
    let stats = runtime_stats(&h, 1).await;
    assert_eq!(
        (stats["success"].as_u64(), stats["timeout"].as_u64()),
        (Some(1), Some(0)),
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connection_is_reusable_after_runtime_streams() {
    let h = Harness::new()
        .runtime(runtime_failing_session_fails(frame(
            "text_chunk",
            json!({"content": "cut"}),
        )))
        .config(move |c| {
            // Far beyond any Instant: the heartbeat timer must not overflow.
            c.runtime.heartbeat_secs = u64::MAX;
        })
        .start()
        .await;

    let mut c = Client::connect(h.proxy_addr).await;
    let auth = format!("Bearer {}", token("org-a"));
    for session in ["ok-1", "fails", "ok-2"] {
        c.send(
            "POST",
            &format!("/api/v1/chat/sessions/{session}"),
            &[
                ("content-type", "application/json"),
                ("authorization", &auth),
            ],
            HI.as_bytes(),
        )
        .await;
        let r = c.read_response().await;
        assert_eq!(r.status, 200, "{session}");
        assert!(r.complete, "{session}");
        let events = whole_events(&r);
        let expected: &[&str] = if session == "fails" {
            &["message", "error"]
        } else {
            &["message", "done"]
        };
        assert_eq!(names(&events), expected, "{session}");
    }
    assert_eq!(h.runtime.work().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_before_the_runtime_answers_cancels_it() {
    let _counters = COUNTERS.lock().await;
    // The runtime takes the request and thinks; the client leaves before any header came back.
    // The runtime connection must be closed then, not kept until the execution deadline, and
    // the abandoned execution is not a timeout of the runtime.
    let h = Harness::new()
        .runtime(runtime_script(|_| Reply::silent(vec![Step::Hang])))
        .config(|c| c.runtime.execution_timeout_ms = 4_000)
        .start()
        .await;
    let server = &h.server;
    let cancelled = || counter(&server.shared.metrics.execution_cancelled_total, RT);
    let before = cancelled();

    let mut c = Client::connect(server.proxy_addr).await;
    c.post_chat(Some("org-a"), "s-early-gone", HI.as_bytes())
        .await;
    h.runtime.wait_for_work(1).await;
    drop(c);

    assert_left_uncharged(&h, before, "a client gone before the runtime's head").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_timeout_holds_while_the_runtime_floods_the_stream() {
    let _counters = COUNTERS.lock().await;
    // A runtime that never stops talking is still cut at the deadline: a steady supply of
    // chunks must not starve the timer.
    let mut batch = Vec::new();
    for _ in 0..64 {
        batch.extend_from_slice(&frame("text_chunk", json!({"content": "token "})));
    }
    let steps = vec![Step::Send(batch); 20_000];
    let h = Harness::new()
        .runtime(runtime_sse(steps))
        .config(move |cfg| {
            cfg.runtime.execution_timeout_ms = 300;
        })
        .start()
        .await;

    let started = Instant::now();
    let r = h.chat("org-a").session("flood").send().await;
    let took = started.elapsed();
    let (events, err) = ends_with_one_error(&r);
    assert_eq!(err["code"], "TIMEOUT", "after {} events", events.len());
    assert!(took < Duration::from_secs(3), "cut after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_get_a_close_delimited_stream() {
    // nginx's proxy_http_version defaults to 1.0: no chunked framing, the body ends at close.
    let h = Harness::new()
        .runtime(runtime_sse(vec![
            Step::Send(frame("text_chunk", json!({"content": "one"}))),
            Step::Send(frame("execution_complete", json!({}))),
            Step::Send(done_frame()),
        ]))
        .start()
        .await;

    let mut conn = raw_chat(h.proxy_addr, "HTTP/1.0", "s-10").await;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut raw))
        .await
        .expect("the proxy did not close the HTTP/1.0 stream")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    let head_lc = head.to_ascii_lowercase();
    assert!(!head_lc.contains("transfer-encoding"), "{head}");
    assert!(!head_lc.contains("content-length"), "{head}");
    let events = parse_events(body);
    assert_eq!(names(&events), ["message", "done"], "{body:?}");
}

/// The runtime's whole answer as raw bytes: `head` then `body`, both written by the test.
fn raw_runtime(head: &str, body: Vec<u8>) -> impl Fn(&Received) -> Reply + Send + Sync {
    let mut bytes = head.as_bytes().to_vec();
    bytes.extend_from_slice(&body);
    move |req: &Received| {
        if req.path == "/health" {
            return Reply::json(200, json!({"status": "ok"}));
        }
        let bytes = bytes.clone();
        Reply::silent(vec![Step::Send(bytes), Step::Close])
    }
}

fn ok_body() -> Vec<u8> {
    [
        frame("text_chunk", json!({"content": "hi"})),
        frame("execution_complete", json!({"final_response": "hi"})),
        done_frame(),
    ]
    .concat()
}

/// However HTTP/1.1 delimits the runtime's body, the client gets the same whole stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_framing_of_the_runtime_body_is_relayed() {
    let body = ok_body();
    let mut chunked = Vec::new();
    for piece in body.chunks(7) {
        chunked.extend_from_slice(format!("{:x};ext=1\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\nx-trailer: 1\r\n\r\n");
    let length_head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let cases = [
        ("content-length", length_head.as_str(), body.clone()),
        (
            "close-delimited HTTP/1.0",
            "HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\n",
            body.clone(),
        ),
        (
            "100 Continue first, chunks with extensions and trailers",
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            chunked,
        ),
    ];
    for (name, head, bytes) in cases {
        let h = Harness::new()
            .runtime(raw_runtime(head, bytes))
            .start()
            .await;
        let r = chat(h.proxy_addr, Some("org-a"), "s-framing", HI).await;
        assert_eq!(r.header("x-execution-mode"), Some(RT), "{name}");
        let events = whole_events(&r);
        assert_eq!(names(&events), ["message", "done"], "{name}: {events:?}");
        assert_eq!(event_data(&events[0])["data"]["content"], "hi", "{name}");
        assert!(h.legacy.work().is_empty(), "{name}: served by legacy");
    }
}

/// A chunked body whose framing breaks mid-stream ends with one error event, not a hang or a
/// clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_chunked_body_ends_with_one_error_event() {
    let first = frame("text_chunk", json!({"content": "before"}));
    let mut body = format!("{:x}\r\n", first.len()).into_bytes();
    body.extend_from_slice(&first);
    body.extend_from_slice(b"\r\nnot-a-size\r\n");
    let h = Harness::new()
        .runtime(raw_runtime(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            body,
        ))
        .start()
        .await;
    let (_, err) = message_then_error(&h, "s-badchunk").await;
    assert_eq!(err["code"], "RUNTIME_DISCONNECTED");
}
