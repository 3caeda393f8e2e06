//! Streams shaped exactly like the real runtime's (FastAPI + sse-starlette): Python's
//! `json.dumps` spacing, `+00:00` timestamps, CRLF, both of its keepalive kinds, a code
//! executor's >1 MiB tool result, its error details and a user's cancel.

use crate::support;

use std::time::Duration;

use support::*;

const TS: &str = "2026-12-01T18:30:00.123456+00:00";

/// One frame as the runtime writes it: `data: ` + `json.dumps({"event", "data", "timestamp"})`
/// (", " and ": " separators), CRLF line ends. `data` is the payload's JSON text as written.
fn py_frame(event: &str, data: &str) -> Vec<u8> {
    format!("data: {{\"event\": \"{event}\", \"data\": {data}, \"timestamp\": \"{TS}\"}}\r\n\r\n")
        .into_bytes()
}

/// The runtime's keepalive comment (sse-starlette's `ping` with the runtime's own format).
fn ping_comment() -> Vec<u8> {
    b": ping - 2026-12-01 18:30:00.123456+00:00\r\n\r\n".to_vec()
}

/// 280k characters of code-executor output with control characters, escaped the way
/// `json.dumps` escapes them: about 1.1 MB of JSON text.
fn big_stdout() -> String {
    let mut s = String::with_capacity(1_200_000);
    for i in 0..140_000 {
        if i % 2 == 0 {
            s.push_str("\\u001b");
        } else {
            s.push_str("\\u0007");
        }
        s.push_str("\\t");
    }
    s
}

fn real_runtime_steps() -> Vec<Step> {
    let big = format!(
        "{{\"tool_name\": \"code_executor\", \"result\": {{\"stdout\": \"{}\", \"stderr\": \"\", \"exit_code\": 0}}, \"success\": true, \"error\": null, \"duration\": 1.25}}",
        big_stdout()
    );
    assert!(big.len() > 1024 * 1024, "the frame must be over 1 MiB");
    vec![
        Step::Send(ping_comment()),
        Step::Send(py_frame(
            "thinking",
            "{\"content\": \"Planning\", \"stage\": \"planning\"}",
        )),
        Step::Send(py_frame("ping", "{}")),
        Step::Send(py_frame(
            "tool_call_start",
            "{\"tool_name\": \"code_executor\", \"arguments\": {\"language\": \"python\", \"code\": \"print(1.50)\"}}",
        )),
        Step::Send(py_frame("tool_call_complete", &big)),
        Step::Send(py_frame(
            "plan_step_start",
            "{\"step_id\": \"s2\", \"title\": \"Report\", \"tool\": null, \"params\": {\"z\": 1, \"a\": 2.50}}",
        )),
        Step::Send(ping_comment()),
        Step::Send(py_frame("text_chunk", "{\"content\": \"Done \\u2705\"}")),
        Step::Send(py_frame(
            "execution_complete",
            "{\"final_response\": \"Done \\u2705\"}",
        )),
        Step::Send(DONE.to_vec()),
    ]
}

/// The runtime's stream marker after its last event.
const DONE: &[u8] = b"data: [DONE]\r\n\r\n";

/// `first`, then an `execution_error` whose payload is `error` (JSON text as written), then
/// the end marker.
fn failing_after(first: Vec<u8>, error: &str) -> Vec<Step> {
    vec![
        Step::Send(first),
        Step::Send(py_frame("execution_error", error)),
        Step::Send(DONE.to_vec()),
    ]
}

fn script(steps: fn() -> Vec<Step>) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    move |req: &Received| {
        if req.path == "/health" {
            Reply::json(200, serde_json::json!({"status": "ok"}))
        } else {
            Reply::sse(steps())
        }
    }
}

/// The Agent2UI message of a client event, parsed.
fn message(data: &str) -> serde_json::Value {
    serde_json::from_str(data).unwrap_or_else(|e| panic!("event data is not JSON ({e}): {data}"))
}

/// A chat served by the runtime whose last event is an error: that error's message, parsed,
/// and its data as sent.
async fn runtime_error_event(h: &Running) -> (serde_json::Value, String) {
    let r = h.chat("org-a").send().await;
    assert_served(&r, RT, "allowlist");
    let (name, data) = r.events().pop().unwrap();
    assert_eq!(name, "error");
    (message(&data), data)
}

#[tokio::test]
async fn a_real_runtime_stream_reaches_the_client_whole_and_verbatim() {
    let h = Harness::new()
        .runtime(script(real_runtime_steps))
        .start()
        .await;
    let r = h.chat("org-a").send().await;
    assert_served(&r, RT, "allowlist");

    let events = r.events();
    let kinds: Vec<String> = events
        .iter()
        .map(|(e, d)| match e.as_str() {
            "message" => message(d)["type"].as_str().unwrap().to_string(),
            other => other.to_string(),
        })
        .collect();
    // The comments are dropped; the runtime's own ping frame is a heartbeat.
    assert_eq!(
        kinds,
        [
            "thinking",
            "heartbeat",
            "tool_call",
            "tool_result",
            "plan_step",
            "text",
            "done"
        ],
        "{events:?}"
    );

    // Nested values as the runtime wrote them: key order, spacing inside the value, numbers.
    let text = r.text();
    assert!(
        text.contains(r#""arguments":{"language": "python", "code": "print(1.50)"}"#),
        "{}",
        &text[..text.len().min(2000)]
    );
    assert!(
        text.contains(r#""params":{"z": 1, "a": 2.50}"#),
        "params re-written"
    );

    // The 1.2 MB tool result fits the web app's reader: one event under the cap, marked, and the
    // event after it intact.
    let (_, tool_result) = &events[3];
    assert!(
        tool_result.len() <= 16 * 1024,
        "tool_result event is {} bytes",
        tool_result.len()
    );
    let tool_result = message(tool_result);
    assert_eq!(tool_result["data"]["truncated"], true);
    assert_eq!(tool_result["data"]["toolName"], "code_executor");
    assert_eq!(tool_result["data"]["success"], true);
    let shortened = tool_result["data"]["result"].as_str().unwrap();
    assert!(
        shortened.starts_with(r#"{"stdout": "\u001b\t"#),
        "{shortened:.80}"
    );
    assert!(shortened.ends_with('…'));
    let plan_step = message(&events[4].1);
    assert_eq!(plan_step["data"]["stepId"], "s2");
    assert_eq!(plan_step["data"]["status"], "running");

    let text_event = message(&events[5].1);
    assert_eq!(text_event["data"]["content"], "Done ✅");
    assert_one_runtime(&h, 0, "success").await;
}

fn failing_steps() -> Vec<Step> {
    failing_after(
        py_frame(
            "thinking",
            "{\"content\": \"Planning\", \"stage\": \"planning\"}",
        ),
        "{\"error\": \"LLM provider returned 429\", \"code\": \"LLM_RATE_LIMITED\", \"httpStatus\": 429, \"details\": {\"provider\": \"openai\", \"retry_after\": 2.5}, \"traceId\": \"4bf92f3577b34da6a3ce929d0e0e4736\"}",
    )
}

#[tokio::test]
async fn an_execution_error_keeps_its_status_details_and_trace_id() {
    // The error event itself is under test: committed at the head, it reaches the user.
    let h = Harness::new()
        .runtime(script(failing_steps))
        .config(|c| c.runtime.commit_timeout_ms = Some(0))
        .start()
        .await;
    let (error, data) = runtime_error_event(&h).await;
    assert_eq!(error["code"], "LLM_RATE_LIMITED");
    assert_eq!(error["message"], "LLM provider returned 429");
    assert_eq!(error["httpStatus"], 429);
    assert_eq!(error["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(
        data.contains(r#""details":{"provider": "openai", "retry_after": 2.5}"#),
        "{data}"
    );
    assert_one_runtime(&h, 0, "error").await;
}

fn cancelled_steps() -> Vec<Step> {
    failing_after(
        py_frame("text_chunk", "{\"content\": \"Half an answ\"}"),
        "{\"error\": \"Execution cancelled by user\", \"code\": \"EXECUTION_CANCELLED\", \"httpStatus\": 499, \"traceId\": \"0af7651916cd43dd8448eb211c80319c\"}",
    )
}

#[tokio::test]
async fn a_users_cancel_is_reported_to_the_client_and_charged_to_nobody() {
    let h = Harness::new()
        .runtime(script(cancelled_steps))
        .config(|c| c.breaker.min_requests = 1)
        .start()
        .await;
    for _ in 0..3 {
        let (error, _) = runtime_error_event(&h).await;
        assert_eq!(error["code"], "EXECUTION_CANCELLED");
        assert_eq!(error["httpStatus"], 499);
    }
    let counted = eventually(Duration::from_secs(3), || {
        metric(&h, "chat_execution_cancelled_total", &[("mode", RT)]) == 3.0
    })
    .await;
    assert!(counted, "three cancels counted as cancelled");
    assert_eq!(
        metric(
            &h,
            "chat_runtime_stream_errors_total",
            &[("code", "EXECUTION_CANCELLED")]
        ),
        3.0
    );
    assert_eq!(
        metric(&h, "chat_execution_error_total", &[("mode", RT)]),
        0.0
    );

    // The window has no runtime errors and the breaker, needing one sample, stays closed.
    let (status, body) = h.admin("GET", "/runtime/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["runtime"]["error"], 0, "{body}");
    assert_eq!(body["data"]["fallbackEnabled"], false, "{body}");
    let r = h.chat("org-a").send().await;
    assert_served(&r, RT, "allowlist");
}
