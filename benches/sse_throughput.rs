//! Throughput of the runtime → Agent2UI rewrite: a realistic sse-starlette stream of 200k CJK
//! `text_chunk` frames, read in 16 KiB pieces through `SseParser` (alone, then with `StreamMapper`).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cutover_proxy::core::agent2ui::{self, DoneEvent, Mapped, StreamMapper};
use cutover_proxy::core::sse::SseParser;

const TEXT_CHUNKS: usize = 200_000;
/// plan_created + the text chunks + execution_complete + [DONE].
const RUNTIME_EVENTS: usize = TEXT_CHUNKS + 3;
const READ: usize = 16 * 1024;
const MAX_FRAME: usize = 1 << 20;
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

/// sse-starlette framing: CRLF, `: ping` comments; half the frames ASCII-escaped, half raw UTF-8.
fn build_stream() -> Vec<u8> {
    let mut stream = Vec::with_capacity(TEXT_CHUNKS * 160);
    frame(
        &mut stream,
        &format!(
            r#"{{"event": "plan_created", "data": {{"steps": [{{"id": "step-1", "title": "\u7406\u89e3\u95ee\u9898"}}, {{"id": "step-2", "title": "\u64b0\u5199\u56de\u7b54"}}]}}, "timestamp": "{TS}"}}"#
        ),
    );
    let mut json = String::new();
    for i in 0..TEXT_CHUNKS {
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

/// Parse only; returns the number of runtime events.
fn parse(stream: &[u8]) -> usize {
    let mut parser = SseParser::new(MAX_FRAME);
    let mut events = Vec::with_capacity(256);
    let mut n = 0;
    for read in stream.chunks(READ) {
        parser.feed(read, &mut events).unwrap();
        n += events.len();
        events.clear();
    }
    assert!(!parser.finish());
    n
}

const DONE: DoneEvent = DoneEvent {
    session_id: "bench-session",
    message_id: "bench-message",
    tokens: 0,
    latency_ms: 0,
};

/// Parse and map, as the proxy does per upstream read; returns (client events, client bytes).
fn rewrite(stream: &[u8], out: &mut Vec<u8>) -> (usize, usize) {
    let mut parser = SseParser::new(MAX_FRAME);
    let mut mapper = StreamMapper::new("bench-session");
    let mut events = Vec::with_capacity(256);
    let (mut messages, mut done, mut end, mut bytes) = (0, 0, 0, 0);
    for read in stream.chunks(READ) {
        parser.feed(read, &mut events).unwrap();
        for ev in events.drain(..) {
            match mapper.map(&ev, out) {
                Mapped::Message(_) => messages += 1,
                Mapped::Complete(_) => {
                    // The relay writes `done` itself, once the answer is saved.
                    agent2ui::done_event(out, &DONE);
                    done += 1;
                }
                Mapped::End => end += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        // The proxy hands this read's output to the client, then reuses the buffer.
        bytes += out.len();
        out.clear();
    }
    assert!(!parser.finish());
    assert_eq!(
        (messages, done, end),
        (TEXT_CHUNKS + 1, 1, 1),
        "events lost"
    );
    (messages + done, bytes)
}

fn bench(c: &mut Criterion) {
    let stream = build_stream();
    assert_eq!(parse(&stream), RUNTIME_EVENTS);
    let mut out = Vec::with_capacity(64 * 1024);

    // Once outside the timing: the client stream holds exactly one event per runtime event.
    let mut all = Vec::new();
    let mut parser = SseParser::new(MAX_FRAME);
    let mut mapper = StreamMapper::new("check");
    let mut events = Vec::new();
    parser.feed(&stream, &mut events).unwrap();
    for ev in &events {
        if let Mapped::Complete(_) = mapper.map(ev, &mut all) {
            agent2ui::done_event(&mut all, &DONE);
        }
    }
    let client_events = all.windows(2).filter(|w| w == b"\n\n").count();
    assert_eq!(
        client_events,
        RUNTIME_EVENTS - 1,
        "one client event per runtime event but [DONE]"
    );
    assert_eq!(parser.comments(), (TEXT_CHUNKS as u64 - 1) / 1000);

    let mut group = c.benchmark_group("sse_throughput");
    group.sample_size(10);
    group.throughput(Throughput::Elements(RUNTIME_EVENTS as u64));
    group.bench_function("parse", |b| b.iter(|| parse(black_box(&stream))));
    group.bench_function("parse_and_map", |b| {
        b.iter(|| rewrite(black_box(&stream), &mut out))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
