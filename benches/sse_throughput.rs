//! Throughput of the runtime → Agent2UI rewrite: a realistic sse-starlette stream of 200k CJK
//! `text_chunk` frames, read in 16 KiB pieces through `SseParser` (alone, then with `StreamMapper`).
//! `examples/rewrite_ir.rs` counts the same loop's instructions under callgrind.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cutover_proxy::core::sse::SseParser;

#[path = "support/streams.rs"]
mod streams;
use streams::{MAX_FRAME, READ};

const TEXT_CHUNKS: usize = 200_000;
/// plan_created + the text chunks + execution_complete + [DONE].
const RUNTIME_EVENTS: usize = TEXT_CHUNKS + 3;

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

fn bench(c: &mut Criterion) {
    let stream = streams::text_chunks(TEXT_CHUNKS);
    assert_eq!(parse(&stream), RUNTIME_EVENTS);
    let mut out = Vec::with_capacity(64 * 1024);

    // Once outside the timing: one client event per runtime event but [DONE].
    let once = streams::rewrite(&stream, &mut out);
    assert_eq!(once.runtime_events, RUNTIME_EVENTS);
    assert_eq!(
        once.client_events,
        RUNTIME_EVENTS - 1,
        "one client event per runtime event but [DONE]"
    );

    let mut group = c.benchmark_group("sse_throughput");
    group.sample_size(10);
    group.throughput(Throughput::Elements(RUNTIME_EVENTS as u64));
    group.bench_function("parse", |b| b.iter(|| parse(black_box(&stream))));
    group.bench_function("parse_and_map", |b| {
        b.iter(|| streams::rewrite(black_box(&stream), &mut out))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
