//! Runtime streams for the rewrite's benchmarks, and the rewrite loop the relay runs over them,
//! shared by `benches/sse_throughput.rs` (time) and `examples/rewrite_ir.rs` (instructions).

use cutover_proxy::core::agent2ui::{self, DoneEvent, Mapped, StreamMapper};
use cutover_proxy::core::sse::SseParser;

/// The relay's reads: `runtime::connection` reads up to 16 KiB at a time.
pub const READ: usize = 16 * 1024;
pub const MAX_FRAME: usize = 1 << 20;
const TS: &str = "2026-02-09T10:11:12.345678";

const SENTENCES: [&str; 6] = [
    "你好！我是你的智能助手，",
    "很高兴为你解答关于 Rust 的问题。",
    "首先，我们来看一下所有权（ownership）的概念：",
    "每个值都有一个所有者，",
    "当所有者离开作用域时，值会被丢弃。🦀",
    "下面是一个例子：\n```rust\nlet s = String::from(\"hello\");\n```\n",
];

/// Python's `json.dumps` default (`ensure_ascii=True`): non-ASCII as `\uXXXX` (surrogate pairs).
fn json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn frame(stream: &mut Vec<u8>, json: &str) {
    stream.extend_from_slice(b"data: ");
    stream.extend_from_slice(json.as_bytes());
    stream.extend_from_slice(b"\r\n\r\n");
}

/// A realistic sse-starlette answer of `chunks` CJK `text_chunk` frames: `plan_created`, the
/// chunks (CRLF framing, a `: ping` comment every 1000; half ASCII-escaped as Python's
/// `json.dumps` writes them, half raw UTF-8), `execution_complete` and `[DONE]`.
pub fn text_chunks(chunks: usize) -> Vec<u8> {
    let mut stream = Vec::with_capacity(chunks * 160);
    frame(
        &mut stream,
        &format!(
            r#"{{"event": "plan_created", "data": {{"steps": [{{"id": "step-1", "title": "\u7406\u89e3\u95ee\u9898"}}, {{"id": "step-2", "title": "\u64b0\u5199\u56de\u7b54"}}]}}, "timestamp": "{TS}"}}"#
        ),
    );
    let mut json = String::new();
    for i in 0..chunks {
        if i > 0 && i % 1000 == 0 {
            stream.extend_from_slice(b": ping - 2026-02-09 10:11:12.345678+00:00\r\n\r\n");
        }
        json.clear();
        json.push_str(r#"{"event": "text_chunk", "data": {"content": "#);
        json_str(&mut json, SENTENCES[i % SENTENCES.len()], i % 2 == 0);
        json.push_str(&format!(r#"}}, "timestamp": "{TS}"}}"#));
        frame(&mut stream, &json);
    }
    frame(
        &mut stream,
        &format!(
            r#"{{"event": "execution_complete", "data": {{"final_response": {{"content": "...", "usage": {{"prompt_tokens": 812, "completion_tokens": 20480, "total_tokens": 21292}}}}}}, "timestamp": "{TS}"}}"#
        ),
    );
    frame(&mut stream, "[DONE]");
    stream
}

/// What one pass of [`rewrite`] saw and wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// Runtime events parsed (frames with data, `[DONE]` included).
    pub runtime_events: usize,
    /// Client events written, `done` included.
    pub client_events: usize,
    pub client_bytes: usize,
}

const DONE: DoneEvent = DoneEvent {
    session_id: "bench-session",
    message_id: "bench-message",
    tokens: 0,
    latency_ms: 0,
};

/// Parse and map one stream as the relay does: read by read, each read's client events into
/// one buffer that is handed on (here: counted) and reused.
pub fn rewrite(stream: &[u8], out: &mut Vec<u8>) -> Rewritten {
    let mut parser = SseParser::new(MAX_FRAME);
    let mut mapper = StreamMapper::new("bench-session");
    let mut events = Vec::with_capacity(256);
    let mut seen = Rewritten::default();
    for read in stream.chunks(READ) {
        parser
            .feed(read, &mut events)
            .expect("frames within the limit");
        seen.runtime_events += events.len();
        for ev in events.drain(..) {
            match mapper.map(&ev, out) {
                Mapped::Complete(_) => {
                    // The relay writes `done` itself, once the answer is saved.
                    agent2ui::done_event(out, &DONE);
                    seen.client_events += 1;
                }
                Mapped::Message(_) | Mapped::Heartbeat | Mapped::Failed { .. } => {
                    seen.client_events += 1
                }
                Mapped::Skipped | Mapped::End | Mapped::Malformed | Mapped::Unknown => {}
            }
        }
        seen.client_bytes += out.len();
        out.clear();
    }
    assert!(!parser.finish(), "the stream ends on a frame boundary");
    seen
}
