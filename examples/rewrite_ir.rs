//! The runtime → Agent2UI rewrite alone: its instructions counted under callgrind, or its CPU
//! time taken (`bench/run.sh` section 6):
//!
//! ```sh
//! valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*rewrite_ir::measured*' \
//!     target/release/examples/rewrite_ir text 20000 5
//! target/release/examples/rewrite_ir text 200000 10 --cpu
//! ```
//!
//! `rewrite_ir text CHUNKS [PASSES]` rewrites the `text_chunk` stream of `benches/sse_throughput.rs`;
//! `rewrite_ir file PATH [PASSES]` a recorded runtime body (e.g.
//! `tests/fixtures/runtime/table.sse`). One pass first, uncounted (warm-up: allocator, lazy
//! statics), then PASSES passes inside `measured`, which is what callgrind counts. With `--cpu`
//! each pass is timed on the thread's own CPU clock (`/proc/thread-self/schedstat`): unlike
//! wall time it leaves out the time other processes had the core, so a busy machine shows less
//! (caches shared with them still do). Prints one JSON line: the events of one pass, the number
//! of passes and, with `--cpu`, the best and median pass in events per CPU-second.

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

/// CPU time this thread has run, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    stat.split_whitespace()
        .next()
        .and_then(|ns| ns.parse().ok())
        .expect("schedstat's first field")
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let cpu = args.iter().any(|a| a == "--cpu");
    args.retain(|a| a != "--cpu");
    let usage = "usage: rewrite_ir (text CHUNKS | file PATH) [PASSES] [--cpu]";
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
    let mut rates = Vec::new();
    let seen = if cpu {
        let mut seen = warm;
        for _ in 0..passes {
            let t0 = thread_cpu_ns();
            seen = measured(&stream, &mut out, 1);
            let ns = thread_cpu_ns().saturating_sub(t0).max(1);
            rates.push(seen.runtime_events as f64 * 1e9 / ns as f64);
        }
        seen
    } else {
        measured(&stream, &mut out, passes)
    };
    assert_eq!(warm, seen, "every pass sees the same stream");
    rates.sort_by(f64::total_cmp);
    let timing = match (rates.last(), rates.get(rates.len() / 2)) {
        (Some(best), Some(median)) => format!(
            ", \"events_per_cpu_second_best\": {best:.0}, \"events_per_cpu_second_median\": {median:.0}"
        ),
        _ => String::new(),
    };
    println!(
        "{{\"runtime_events\": {}, \"client_events\": {}, \"client_bytes\": {}, \"stream_bytes\": {}, \"passes\": {}{timing}}}",
        seen.runtime_events,
        seen.client_events,
        seen.client_bytes,
        stream.len(),
        passes
    );
}
