//! The runtime → Agent2UI rewrite alone, for counting its instructions under callgrind
//! (`bench/run.sh` section 6):
//!
//! ```sh
//! valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*rewrite_ir::measured*' \
//!     target/release/examples/rewrite_ir text 20000 5
//! ```
//!
//! `rewrite_ir text CHUNKS [PASSES]` rewrites the `text_chunk` stream of `benches/sse_throughput.rs`;
//! `rewrite_ir file PATH [PASSES]` a recorded runtime body (e.g.
//! `tests/fixtures/runtime/table.sse`). One pass first, uncounted (warm-up: allocator, lazy
//! statics), then PASSES passes inside `measured`, which is what callgrind counts. Prints one
//! JSON line: the events of one pass and the number of passes.

use std::hint::black_box;

// The proxy's allocator: what an allocation costs is part of the count.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[path = "../benches/support/streams.rs"]
mod streams;
use streams::Rewritten;

#[inline(never)]
fn measured(stream: &[u8], out: &mut Vec<u8>, passes: usize) -> Rewritten {
    let mut last = Rewritten::default();
    for _ in 0..passes {
        last = streams::rewrite(black_box(stream), out);
    }
    last
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: rewrite_ir (text CHUNKS | file PATH) [PASSES]";
    let (kind, what) = match args.as_slice() {
        [kind, what, ..] => (kind.as_str(), what.as_str()),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let passes: usize = args.get(2).map_or(1, |p| p.parse().expect("PASSES"));
    let stream = match kind {
        "text" => streams::text_chunks(what.parse().expect("CHUNKS")),
        "file" => std::fs::read(what).unwrap_or_else(|e| panic!("{what}: {e}")),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let mut out = Vec::with_capacity(64 * 1024);
    let warm = streams::rewrite(&stream, &mut out);
    let seen = measured(&stream, &mut out, passes);
    assert_eq!(warm, seen, "every pass sees the same stream");
    println!(
        "{{\"runtime_events\": {}, \"client_events\": {}, \"client_bytes\": {}, \"stream_bytes\": {}, \"passes\": {}}}",
        seen.runtime_events,
        seen.client_events,
        seen.client_bytes,
        stream.len(),
        passes
    );
}
