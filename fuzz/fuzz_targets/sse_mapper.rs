//! The runtime's bytes, cut anywhere, through the SSE parser and the Agent2UI mapper.
//!
//! Input: `[limit selector, cut count, cut positions (2 bytes each)..., body...]`.
//!
//! Checked, besides "no panic":
//! - the parser does not depend on where the network cut the bytes: fed in pieces, it yields
//!   the same events as fed at once (or, when a pending line outgrows the frame limit earlier,
//!   a prefix of them and the same error);
//! - every byte the mapper writes is well-formed client SSE, whole events only: blocks
//!   `event: NAME\ndata: <one line of JSON>\n\n`, NAME one of message, heartbeat, done, error,
//!   no CR anywhere, and each block agrees with what `map` returned;
//! - the relay's own `error` / `heartbeat` events are well-formed for any code and message;
//! - the mapper writes what the mapper it replaced (`tests/oracle/agent2ui.rs`) wrote for the same
//!   events, byte for byte but for the stream's message id and the times it makes itself.

#![no_main]

#[path = "../../tests/oracle/agent2ui.rs"]
mod oracle;
#[path = "../../tests/oracle/normalise.rs"]
mod normalise;

use cutover_proxy::core::agent2ui::{
    done_event, error_event, heartbeat_event, DoneEvent, Mapped, StreamMapper,
};
use cutover_proxy::core::sse::{SseEvent, SseParser};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const SESSION: &str = "sess-\"ü\u{2028}\\";

/// Split client SSE bytes into (event, data) blocks, asserting the strict format.
fn blocks(out: &[u8]) -> Vec<(String, Value)> {
    let text = std::str::from_utf8(out).expect("client SSE is UTF-8");
    assert!(!text.contains('\r'), "CR in client SSE: {text:?}");
    if text.is_empty() {
        return Vec::new();
    }
    assert!(
        text.ends_with("\n\n"),
        "output does not end on an event boundary: {text:?}"
    );
    let mut result = Vec::new();
    for block in text[..text.len() - 2].split("\n\n") {
        let mut lines = block.split('\n');
        let (Some(ev), Some(data), None) = (lines.next(), lines.next(), lines.next()) else {
            panic!("a block is not exactly `event:` + `data:`: {block:?}");
        };
        let name = ev
            .strip_prefix("event: ")
            .unwrap_or_else(|| panic!("no event line: {block:?}"));
        assert!(
            ["message", "heartbeat", "done", "error"].contains(&name),
            "unexpected event name {name:?}"
        );
        let data = data
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("no data line: {block:?}"));
        let value: Value = serde_json::from_str(data)
            .unwrap_or_else(|e| panic!("data is not JSON ({e}): {data:?}"));
        match name {
            "message" => {
                assert!(value["id"].is_string(), "{value}");
                assert!(value["type"].is_string(), "{value}");
                assert!(value["timestamp"].is_string(), "{value}");
                assert!(value.get("data").is_some(), "{value}");
            }
            "heartbeat" => assert!(value.is_null(), "{value}"),
            "done" => {
                assert_eq!(value["sessionId"], SESSION, "{value}");
                assert!(value["messageId"].is_string(), "{value}");
                assert_eq!(value["executionMode"], "runtime_orchestrator", "{value}");
            }
            _ => {
                assert!(value["code"].is_string(), "{value}");
                assert!(value["message"].is_string(), "{value}");
            }
        }
        result.push((name.to_string(), value));
    }
    result
}

fn parse_whole(body: &[u8], limit: usize) -> (Vec<SseEvent>, bool, bool) {
    let mut p = SseParser::new(limit);
    let mut events = Vec::new();
    let ok = p.feed(body, &mut events).is_ok();
    let pending = ok && p.finish();
    (events, ok, pending)
}

fn parse_cut(body: &[u8], cuts: &[usize], limit: usize) -> (Vec<SseEvent>, bool, bool) {
    let mut p = SseParser::new(limit);
    let mut events = Vec::new();
    let mut last = 0;
    for &c in cuts.iter().chain(std::iter::once(&body.len())) {
        let c = c.clamp(last, body.len());
        if p.feed(&body[last..c], &mut events).is_err() {
            // Poisoned: later feeds keep failing.
            assert!(p.feed(b"data: x\n\n", &mut events).is_err());
            return (events, false, false);
        }
        last = c;
    }
    let pending = p.finish();
    (events, true, pending)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    // Small limits reach the frame-size paths; the smallest is the config's minimum.
    let limit = 1024 + usize::from(data[0]) * 37;
    let ncuts = usize::from(data[1] % 16);
    let Some(cut_bytes) = data.get(2..2 + 2 * ncuts) else {
        return;
    };
    let body = &data[2 + 2 * ncuts..];
    let mut cuts: Vec<usize> = cut_bytes
        .chunks(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (body.len() + 1))
        .collect();
    cuts.sort_unstable();

    let (whole, whole_ok, whole_pending) = parse_whole(body, limit);
    let (cut, cut_ok, cut_pending) = parse_cut(body, &cuts, limit);
    if cut_ok {
        assert!(whole_ok, "fed in pieces it parsed, fed at once it failed");
        assert_eq!(whole, cut, "events depend on where the bytes were cut");
        assert_eq!(whole_pending, cut_pending, "finish() depends on the cuts");
    } else {
        assert!(
            cut.len() <= whole.len() && whole[..cut.len()] == cut[..],
            "events before the error are not those of the whole parse"
        );
    }
    if !whole_ok {
        assert!(!cut_ok, "fed at once it failed, fed in pieces it parsed");
    }

    // Map the events as the relay does, one call at a time.
    let mut mapper = StreamMapper::new(SESSION);
    let mut old = oracle::StreamMapper::new(SESSION);
    let (mut out, mut old_out) = (Vec::new(), Vec::new());
    for ev in &cut {
        let before = out.len();
        let mapped = mapper.map(ev, &mut out);
        let old_before = old_out.len();
        let old_mapped = old.map(ev, &mut old_out);
        assert_eq!(format!("{mapped:?}"), format!("{old_mapped:?}"), "{:?}", ev.data);
        assert_eq!(
            normalise::normalised(&out[before..], mapper.message_id()),
            normalise::normalised(&old_out[old_before..], old.message_id()),
            "{:?}",
            ev.data
        );
        let written = blocks(&out[before..]);
        match &mapped {
            Mapped::Message(kind) => {
                assert_eq!(written.len(), 1, "{mapped:?}");
                assert_eq!(written[0].0, "message");
                assert_eq!(written[0].1["type"], *kind);
            }
            Mapped::Heartbeat => {
                assert_eq!(written.len(), 1);
                assert_eq!(written[0].0, "heartbeat");
            }
            Mapped::Complete(completion) => {
                // Nothing yet: the relay saves the answer, then writes `done` with its id.
                assert!(written.is_empty(), "{mapped:?} wrote {written:?}");
                let before = out.len();
                done_event(
                    &mut out,
                    &DoneEvent {
                        session_id: mapper.session_id(),
                        message_id: "saved-1",
                        tokens: completion.tokens.unwrap_or(0),
                        latency_ms: 7,
                    },
                );
                let written = blocks(&out[before..]);
                assert_eq!(written.len(), 1);
                assert_eq!(written[0].0, "done");
                assert_eq!(written[0].1["messageId"], "saved-1");
                assert_eq!(written[0].1["sessionId"], mapper.session_id());
                assert_eq!(written[0].1["usage"]["latencyMs"], 7);
            }
            Mapped::Failed { code, message } => {
                assert_eq!(written.len(), 1);
                assert_eq!(written[0].0, "error");
                assert_eq!(written[0].1["code"], code.as_str());
                assert_eq!(written[0].1["message"], message.as_str());
                assert!(!code.is_empty());
            }
            Mapped::Skipped | Mapped::End | Mapped::Malformed | Mapped::Unknown => {
                assert!(written.is_empty(), "{mapped:?} wrote {written:?}");
            }
        }
    }
    // The relay's own events, with text taken from the input.
    let text = String::from_utf8_lossy(body);
    let (code, message) = text.split_at(text.char_indices().nth(8).map_or(text.len(), |(i, _)| i));
    let before = out.len();
    error_event(&mut out, code, message);
    heartbeat_event(&mut out);
    let written = blocks(&out[before..]);
    assert_eq!(written.len(), 2);
    assert_eq!(written[0].1["code"], code);
    assert_eq!(written[0].1["message"], message);
    // The whole stream as the client gets it is well-formed too.
    blocks(&out);
});
