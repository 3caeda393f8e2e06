//! The one-pass Agent2UI writer against the mapper it replaced (`tests/oracle/agent2ui.rs`):
//! the same runtime events must give the same client bytes, byte for byte, and the same
//! verdicts, over recorded runtime streams, the benchmark's stream and generated ones. Only
//! what is made fresh per stream differs and is set aside: the stream's message id, and the
//! time written for an event the runtime sent without one.

// Not the Harness: the pure Agent2UI writer against its oracle, with no proxy or sockets.
#[path = "../oracle/agent2ui.rs"]
mod oracle;

#[path = "../oracle/normalise.rs"]
mod normalise;
use normalise::normalised;

#[allow(dead_code)]
#[path = "../../benches/support/streams.rs"]
mod streams;

use cutover_proxy::core::agent2ui::{self, DoneEvent, MapSettings, Mapped, StreamMapper};
use cutover_proxy::core::sse::{SseEvent, SseParser};
use proptest::prelude::*;

const SESSION: &str = "sess-\"ü\u{2028}\\";

/// Map `events` with both mappers as the relay does (one buffer, `done` after a completion,
/// text kept) and compare everything they say.
fn same_rewrite(events: &[SseEvent], cap: usize) -> Result<(), TestCaseError> {
    let mut new = StreamMapper::with_settings(
        SESSION,
        MapSettings {
            max_client_event_bytes: cap,
            files: None,
        },
    )
    .keeping_text();
    let mut old = oracle::StreamMapper::with_settings(
        SESSION,
        oracle::MapSettings {
            max_client_event_bytes: cap,
            files: None,
        },
    )
    .keeping_text();
    let (mut new_out, mut old_out) = (Vec::new(), Vec::new());
    for (i, ev) in events.iter().enumerate() {
        let (new_start, old_start) = (new_out.len(), old_out.len());
        let new_mapped = new.map(ev, &mut new_out);
        let old_mapped = old.map(ev, &mut old_out);
        prop_assert_eq!(
            format!("{new_mapped:?}"),
            format!("{old_mapped:?}"),
            "event {} ({:?})",
            i,
            ev.data
        );
        if let Mapped::Complete(c) = &new_mapped {
            let done = DoneEvent {
                session_id: new.session_id(),
                message_id: "saved",
                tokens: c.tokens.unwrap_or(0),
                latency_ms: 12,
            };
            agent2ui::done_event(&mut new_out, &done);
            let done = oracle::DoneEvent {
                session_id: old.session_id(),
                message_id: "saved",
                tokens: c.tokens.unwrap_or(0),
                latency_ms: 12,
            };
            oracle::done_event(&mut old_out, &done);
        }
        prop_assert_eq!(
            normalised(&new_out[new_start..], new.message_id()),
            normalised(&old_out[old_start..], old.message_id()),
            "event {} ({:?})",
            i,
            ev.data
        );
    }
    prop_assert_eq!(new.take_text(), old.take_text());
    let (mut new_tail, mut old_tail) = (Vec::new(), Vec::new());
    agent2ui::error_event(&mut new_tail, "CODE\"\n", "message\u{1} ü");
    oracle::error_event(&mut old_tail, "CODE\"\n", "message\u{1} ü");
    agent2ui::heartbeat_event(&mut new_tail);
    oracle::heartbeat_event(&mut old_tail);
    prop_assert_eq!(new_tail, old_tail);
    Ok(())
}

fn parse(body: &[u8], read: usize) -> Vec<SseEvent> {
    let mut parser = SseParser::new(1 << 21);
    let mut events = Vec::new();
    for piece in body.chunks(read.max(1)) {
        parser
            .feed(piece, &mut events)
            .expect("within the frame limit");
    }
    events
}

fn check(body: &[u8]) {
    for cap in [16 * 1024, 300, 0] {
        for read in [body.len(), 7] {
            same_rewrite(&parse(body, read), cap).unwrap();
        }
    }
}

#[test]
fn recorded_runtime_streams_rewrite_the_same() {
    for name in ["table", "error", "junk"] {
        let path = format!(
            "{}/tests/fixtures/runtime/{name}.sse",
            env!("CARGO_MANIFEST_DIR")
        );
        let body = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(body.len() > 300, "{path} is a whole stream");
        check(&body);
    }
}

#[test]
fn the_benchmark_stream_rewrites_the_same() {
    check(&streams::text_chunks(2000));
}

/// The real runtime's own shapes (`json.dumps` defaults: ASCII-escaped text, `+00:00`
/// timestamps), a code executor's large result with control characters, multi-line data,
/// frames without envelope or timestamp, and each kind of broken frame.
#[test]
fn real_runtime_shapes_and_broken_frames_rewrite_the_same() {
    let stdout: String = "\\u001b[0m\\tline \\\"quoted\\\" \\u4f60\\ud83e\\udd80\\n".repeat(3000);
    let frames = [
        r#"{"event": "thinking", "data": {"content": "Planning", "stage": "planning"}, "timestamp": "2026-12-01T18:30:00.123456+00:00"}"#.to_owned(),
        r#"{"event": "ping", "data": {}, "timestamp": "2026-12-01T18:30:00.123456+00:00"}"#.to_owned(),
        r#"{"event": "tool_call_start", "data": {"tool_name": "code_executor", "arguments": {"language": "python", "code": "print(1.50)"}}, "timestamp": "2026-12-01T18:30:00.123456+00:00"}"#.to_owned(),
        format!(r#"{{"event": "tool_call_complete", "data": {{"tool_name": "code_executor", "result": {{"stdout": "{stdout}", "stderr": "", "exit_code": 0}}, "success": true, "error": null, "duration": 1.25}}, "timestamp": "2026-12-01T18:30:00.123456+00:00"}}"#),
        format!(r#"{{"event": "mcp_call_complete", "data": {{"server_id": "fs", "result": "{stdout}"}}}}"#),
        r#"{"event": "plan_step_start", "data": {"step_id": "s2", "title": "Report", "tool": null, "params": {"z": 1, "a": 2.50}}, "timestamp": "2026-12-01T18:30:00.123456+00:00"}"#.to_owned(),
        r#"{"event": "text_chunk", "data": {"content": "Done \u2705"}, "timestamp": "2026-12-01T18:30:00.123456+00:00"}"#.to_owned(),
        r#"{"event": "text_chunk", "data": {"content": "no timestamp \ud83e\udd80"}}"#.to_owned(),
        r#"{"event": "text_chunk", "data": {"content": "lone \ud83e"}}"#.to_owned(),
        r#"{"event": "text_chunk", "data": {"content": "x"}, "timestamp": "\u0032\u0030\u0032\u0036-01-01"}"#.to_owned(),
        r#"{"event": "text\u005fchunk", "data": {"cont\u0065nt": "escaped names"}}"#.to_owned(),
        r#"{"event": "plan_created", "data": {"steps": [{"id": "s1", "title": "A\nB"}, 3, {"id": 2, "id": 3}, {"title": "\u00e9"}]}}"#.to_owned(),
        r#"{"event": "plan_created", "data": {"steps": [{"id": "s1"}, "\udd80"]}}"#.to_owned(),
        r#"{"event": "file_created", "data": {"file_id": "f 1/\u00e9", "filename": "r\u00e9port.pdf", "mime_type": null, "size": 1024, "url": "http://runtime/x"}}"#.to_owned(),
        r#"{"event": "execution_error", "data": {"error": "LLM \"quota\"", "code": "LLM_QUOTA", "httpStatus": 429, "details": {"retry": [1, 2]}, "trace_id": "t-1"}}"#.to_owned(),
        r#"{"event": "execution_error", "data": {"error": {"nested": true}, "code": 5}}"#.to_owned(),
        r#"{"event": "execution_complete", "data": {"final_response": {"content": "Done \u2705", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}}}"#.to_owned(),
        r#"{"event": "execution_complete", "data": {"final_response": "x", "usage": [1, 2, 3]}}"#.to_owned(),
        "{\"event\": \"text_chunk\",\n \"data\": {\"content\": \"multi\\nline\"},\r\n \"timestamp\": \"t\"}".to_owned(),
        "{\"event\": \"tool_call_start\", \"data\": {\"arguments\": {\n  \"a\": [1,\r\n 2]\n}}}".to_owned(),
        r#"{"event": "text_chunk", "data": {"content": "dup"}, "data": null}"#.to_owned(),
        r#"{"data": {"content": "no name"}}"#.to_owned(),
        r#"{"event": "text_chunk", "data": {"content": "bad escape \x"}}"#.to_owned(),
        r#"{"event": "text_chunk", "data": {"content": "tab	raw"}}"#.to_owned(),
        r#"{"event": "text_chunk", "data": {"content": "x"}} trailing"#.to_owned(),
        r#"{"event": "text_chunk", "data": {"content": "x"},}"#.to_owned(),
        r#"{"event": "text_chunk", "data": [1]}"#.to_owned(),
        r#"{"event": "text_chunk", "data": {"content": 01}}"#.to_owned(),
        r#"{"event": "text_chunk", "ignored": "\ud800", "data": {"content": "fine"}}"#.to_owned(),
        r#"{"event": "text_chunk", "d\ud800": 1, "data": {"content": "bad key"}}"#.to_owned(),
        format!(r#"{{"event": "tool_call_start", "data": {{"arguments": {}{}}}}}"#, "[".repeat(129), "]".repeat(129)),
        format!(r#"{{"event": "tool_call_start", "extra": {}{}, "data": {{}}}}"#, "[".repeat(500), "]".repeat(500)),
        "[DONE]".to_owned(),
    ];
    let mut body = Vec::new();
    for frame in &frames {
        for line in frame.split('\n') {
            body.extend_from_slice(b"data: ");
            body.extend_from_slice(line.as_bytes());
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"\r\n");
    }
    // A frame named by the SSE `event:` field, its JSON the payload itself.
    body.extend_from_slice(b"event: thinking\ndata: {\"content\": \"bare\", \"stage\": \"s\"}\n\n");
    body.extend_from_slice(
        b"event: text_chunk\ndata: {\"data\": null, \"content\": \"\\u00e9\"}\n\n",
    );
    check(&body);
}

// ---- generated streams ----------------------------------------------------------------------

fn text_value() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        6 => "[a-zA-Z0-9 ,.!?-]{0,6}",
        3 => "[你好世界，。🦀é\u{7f}\u{2028}]{0,4}",
        2 => prop::sample::select(vec![
            "\\\"", "\\\\", "\\/", "\\b", "\\f", "\\n", "\\r", "\\t", "\\u0000", "\\u001f",
            "\\u0022", "\\u005C", "\\u007f", "\\u00e9", "\\u4f60", "\\u2028", "\\ud83e\\udd80",
        ])
        .prop_map(str::to_owned),
        1 => prop::sample::select(vec![
            "\\u07ff", "\\u0800", "\\ud7ff", "\\ue000", "\\uffff", "\\udbff\\udfff",
            "\\ud800\\udc00",
        ])
        .prop_map(str::to_owned),
        1 => prop::sample::select(vec![
            "\\ud83e", "\\udd80", "\\ud800", "\\udbff", "\\udc00", "\\udfff", "\\x",
            "\\u12", "\t",
        ])
        .prop_map(str::to_owned),
    ];
    prop::collection::vec(piece, 0..8).prop_map(|p| format!("\"{}\"", p.concat()))
}

fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        3 => text_value(),
        1 => Just("null".to_owned()),
        1 => Just("true".to_owned()),
        1 => "-?(0|[1-9][0-9]{0,20})(\\.[0-9]{1,3})?([eE][+-]?[0-9]{1,2})?",
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec((key(), inner), 0..4).prop_map(|kv| {
                let body: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":\n {v}")).collect();
                format!("{{{}}}", body.join(", "))
            }),
        ]
    })
}

/// Keys of the table (most of the time), with a few others.
fn key() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "content",
        "stage",
        "steps",
        "step_id",
        "title",
        "tool",
        "params",
        "result",
        "duration_ms",
        "error",
        "tool_name",
        "arguments",
        "success",
        "duration",
        "skill_id",
        "skill_name",
        "server_id",
        "final_response",
        "usage",
        "code",
        "httpStatus",
        "http_status",
        "details",
        "traceId",
        "file_id",
        "filename",
        "mime_type",
        "size",
        "url",
        "id",
        "total_tokens",
        "prompt_tokens",
        "completion_tokens",
        "extra",
        "cont\\u0065nt",
    ])
    .prop_map(str::to_owned)
}

fn event_name() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "plan_created",
        "plan_step_start",
        "plan_step_complete",
        "plan_step_failed",
        "tool_call_start",
        "tool_call_complete",
        "skill_call_start",
        "skill_call_complete",
        "mcp_call_start",
        "mcp_call_complete",
        "thinking",
        "text_chunk",
        "text_chunk",
        "text_chunk",
        "ping",
        "file_created",
        "execution_complete",
        "execution_error",
        "brand_new",
    ])
    .prop_map(str::to_owned)
}

/// One runtime frame's data: an envelope (its parts in any order, some missing or odd), a bare
/// payload named by the SSE field, `[DONE]`, or any of those broken by a byte.
fn payload() -> impl Strategy<Value = String> {
    prop::collection::vec((key(), json_value()), 0..5).prop_map(|kv| {
        let body: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
        format!("{{{}}}", body.join(", "))
    })
}

fn frame() -> impl Strategy<Value = (Option<String>, String)> {
    let envelope = (
        prop_oneof![
            4 => event_name().prop_map(|n| Some(format!("\"{n}\""))),
            1 => Just(None),
            1 => Just(Some("null".to_owned())),
            1 => Just(Some("7".to_owned())),
        ],
        prop_oneof![
            6 => payload().prop_map(Some),
            1 => Just(Some("null".to_owned())),
            1 => Just(None),
        ],
        prop_oneof![
            3 => Just(Some("\"2026-02-09T10:11:12.345678\"".to_owned())),
            1 => text_value().prop_map(Some),
            1 => Just(None),
            1 => Just(Some("1770000000".to_owned())),
        ],
        any::<bool>(),
    )
        .prop_map(|(event, data, ts, reversed)| {
            let mut parts = Vec::new();
            if let Some(e) = event {
                parts.push(format!("\"event\": {e}"));
            }
            if let Some(d) = data {
                parts.push(format!("\"data\": {d}"));
            }
            if let Some(t) = ts {
                parts.push(format!("\"timestamp\": {t}"));
            }
            if reversed {
                parts.reverse();
            }
            format!("{{{}}}", parts.join(", "))
        });
    let shaped = prop_oneof![
        8 => envelope.prop_map(|data| (None, data)),
        2 => (event_name(), payload()).prop_map(|(name, data)| (Some(name), data)),
        1 => Just((None, "[DONE]".to_owned())),
    ];
    let breaks = prop::sample::select(vec!["", "", "", "", "}", "\"", ",", "\\", " ", "x", "\n"]);
    (shaped, 0usize..400, breaks).prop_map(|((name, data), at, extra)| {
        let at = (0..=at.min(data.len()))
            .rev()
            .find(|&i| data.is_char_boundary(i))
            .unwrap_or(0);
        (name, format!("{}{extra}{}", &data[..at], &data[at..]))
    })
}

fn sse_body(frames: &[(Option<String>, String)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, data) in frames {
        if let Some(name) = name {
            body.extend_from_slice(format!("event: {name}\r\n").as_bytes());
        }
        for line in data.split('\n') {
            body.extend_from_slice(b"data: ");
            body.extend_from_slice(line.as_bytes());
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"\r\n");
    }
    body
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    #[test]
    fn generated_streams_rewrite_the_same(
        frames in prop::collection::vec(frame(), 1..12),
        cap in prop::sample::select(vec![16 * 1024, 200, 0]),
        read in 1usize..64,
    ) {
        let body = sse_body(&frames);
        same_rewrite(&parse(&body, read), cap)?;
    }
}
