//! Fault injection under load: the contract's promises hold when the runtime dies mid-stream with
//! hundreds of streams in flight, when the config is swapped a hundred times under traffic, and
//! when clients walk away in a storm; and nothing (file descriptors, memory, in-flight gauges,
//! upstream connections) is left behind.
//!
//! The proxy runs in-process, so `/proc/self/fd` and `VmRSS` measure it (plus the test's own
//! upstreams and clients, which are closed before measuring). The fd/RSS figures are per process,
//! so the tests that measure them run alone in a child process (`alone_in_process`); every proxy
//! counts into its own registry. `FAULTS_STREAMS` overrides the number of streams killed at once
//! (default 200).
//!
//! Run with `--nocapture` to see the figures each test prints.

use crate::support;

use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cutover_proxy::app::LocalServer;
use cutover_proxy::core::breaker::State;
use cutover_proxy::core::config::Config;
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `FAULTS_LOG=warn` (an env filter) shows the proxy's own logs, for a failure's story.
fn logs() {
    if let Ok(filter) = std::env::var("FAULTS_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

// ---- measurements ----------------------------------------------------------------------------

fn in_flight(server: &LocalServer, mode: &str) -> i64 {
    gauge(&server.shared.metrics.streams_in_flight, mode)
}

fn transitions(server: &LocalServer, from: &str, to: &str) -> u64 {
    server
        .shared
        .metrics
        .breaker_transitions_total
        .with_label_values(&[from, to])
        .get()
}

/// Within `within`, the proxy has nothing in flight: no request, no stream of either mode (else
/// fail saying `what`, and what is left).
async fn assert_settled(server: &LocalServer, within: Duration, what: &str) {
    let shared = server.shared.clone();
    let settled = eventually(within, move || {
        shared.requests.count() == 0 && in_flight(server, RT) == 0 && in_flight(server, DIRECT) == 0
    })
    .await;
    assert!(
        settled,
        "{what}: requests {}, runtime streams {}, direct streams {}",
        server.shared.requests.count(),
        in_flight(server, RT),
        in_flight(server, DIRECT)
    );
}

// ---- responses -------------------------------------------------------------------------------

fn names(r: &Response) -> Vec<String> {
    r.events().into_iter().map(|(e, _)| e).collect()
}

fn mode(r: &Response) -> &str {
    r.header("x-execution-mode").unwrap_or("")
}

fn reason(r: &Response) -> &str {
    r.header("x-execution-reason").unwrap_or("")
}

/// A legacy answer (the stand-in's two events), whole and terminated.
fn is_legacy_stream(r: &Response) -> bool {
    r.status == 200 && mode(r) == DIRECT && r.complete && names(r) == ["message", "done"]
}

/// A complete runtime answer.
fn is_runtime_stream(r: &Response) -> bool {
    r.status == 200
        && mode(r) == RT
        && r.complete
        && whole_events(r).last().map(|e| e.0.as_str()) == Some("done")
}

/// A runtime stream that ended with exactly one `error` event, last, and a terminated body.
fn error_code_of_runtime_stream(r: &Response) -> Option<String> {
    if r.status != 200 || mode(r) != RT || !r.complete {
        return None;
    }
    let events = whole_events(r);
    let errors = events.iter().filter(|(e, _)| e == "error").count();
    let last = events.last()?;
    if errors != 1 || last.0 != "error" || events.iter().any(|(e, _)| e == "done") {
        return None;
    }
    let data: Value = serde_json::from_str(&last.1).ok()?;
    data["code"].as_str().map(str::to_string)
}

/// A chat whose response is read to the end, within `limit`; `None` when it hung.
async fn chat_within(
    addr: SocketAddr,
    org: &str,
    session: &str,
    limit: Duration,
) -> Option<Response> {
    let mut c = Client::connect(addr).await;
    c.post_chat(Some(org), session, HI).await;
    tokio::time::timeout(limit, c.read_response_with(|_| {}))
        .await
        .ok()
}

/// An upstream that holds every answer open after `first` (sent with the head, or after
/// `head_after` when given): its `hang_ups` are the proof that the proxy let go of them.
fn holding(
    first: Vec<u8>,
    head_after: Option<Duration>,
) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    runtime_script(move |_| match head_after {
        None => Reply::sse(vec![Step::Send(first.clone()), Step::Hang]),
        Some(delay) => {
            let mut answer = SSE_HEAD.to_vec();
            answer.extend_from_slice(&chunk(&first));
            Reply::silent(vec![Step::Sleep(delay), Step::Send(answer), Step::Hang])
        }
    })
}

// ---- 1. the runtime dies with hundreds of streams in flight -----------------------------------

fn streams_under_test() -> usize {
    std::env::var("FAULTS_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// The runtime of the kill test: `hold-kill-*` sessions send one event and hang, other `hold-*`
/// sessions send one event and wait for `release()`;
/// `pending-*` sessions are accepted and never answered; anything else is a short answer.
fn kill_test_runtime(req: &Received) -> Reply {
    if req.path == "/health" {
        return Reply::json(200, json!({"status": "ok"}));
    }
    let session = req.json()["session_id"].as_str().unwrap_or("").to_string();
    if session.starts_with("hold-kill-") {
        // Held until the runtime dies.
        Reply::sse(vec![
            Step::Send(frame("text_chunk", json!({"content": "first"}))),
            Step::Hang,
        ])
    } else if session.starts_with("hold-") {
        Reply::sse(vec![
            Step::Send(frame("text_chunk", json!({"content": "first"}))),
            Step::WaitRelease,
            Step::Send(frame("execution_complete", json!({"final_response": "x"}))),
            Step::Send(done_frame()),
        ])
    } else if session.starts_with("pending-") {
        Reply::silent(vec![Step::Hang])
    } else {
        Reply::sse(runtime_ok_steps())
    }
}

/// How many of `n` signals came on `rx` within `within` (fewer when the senders are gone).
async fn count_signals(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<()>,
    n: usize,
    within: Duration,
) -> usize {
    tokio::time::timeout(within, async {
        let mut got = 0;
        while got < n && rx.recv().await.is_some() {
            got += 1;
        }
        got
    })
    .await
    .unwrap_or(0)
}

/// Open `n` `hold-{tag}-i` streams and wait until each client holds its first event. Each task
/// returns the response (or `None` if it did not end within `limit`) and when it ended.
async fn open_held_streams(
    addr: SocketAddr,
    n: usize,
    tag: &str,
    limit: Duration,
) -> Vec<tokio::task::JoinHandle<(Option<Response>, Instant)>> {
    let (first_tx, mut first_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let tx = first_tx.clone();
        let session = format!("hold-{tag}-{i}");
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            c.post_chat(Some("org-a"), &session, r#"{"message":"hold"}"#)
                .await;
            let mut first = Some(tx);
            let r = tokio::time::timeout(
                limit,
                c.read_response_with(|_| {
                    if let Some(tx) = first.take() {
                        let _ = tx.send(());
                    }
                }),
            )
            .await
            .ok();
            (r, Instant::now())
        }));
    }
    drop(first_tx);
    let got = count_signals(&mut first_rx, n, Duration::from_secs(30)).await;
    assert_eq!(got, n, "only {got} of {n} streams got their first event");
    tasks
}

/// What one request of the steady load saw.
#[derive(Debug, Clone)]
struct Seen {
    started: Instant,
    response: Option<Response>,
}

/// `workers` loops sending org-a chats until `stop`; every response, with its start and end.
fn steady_load(
    addr: SocketAddr,
    workers: usize,
    stop: Arc<AtomicBool>,
    limit: Duration,
) -> Vec<tokio::task::JoinHandle<Vec<Seen>>> {
    (0..workers)
        .map(|w| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let response =
                        chat_within(addr, "org-a", &format!("load-{w}-{i}"), limit).await;
                    seen.push(Seen { started, response });
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                seen
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_killed_with_streams_in_flight_fails_cleanly_and_recovers_without_leaks() {
    crate::run_alone!(
        "runtime_killed_with_streams_in_flight_fails_cleanly_and_recovers_without_leaks"
    );
    logs();
    let n = streams_under_test();
    let pending_n = 20;
    let timeout = Duration::from_secs(10);

    let h = Harness::new()
        .runtime(kill_test_runtime)
        .config(move |c| {
            c.runtime.execution_timeout_ms = timeout.as_millis() as u64;
            c.runtime.pool_idle_timeout_ms = 300;
            c.legacy.pool_idle_timeout_ms = 300;
            // Hundreds of connects at once on a busy 2-core machine (debug build, the test's own clients
            // and upstreams on the same runtime) can take longer to be polled than the default test
            // config's 500 ms; the killed runtime refuses at once, so a long timeout costs nothing.
            c.runtime.connect_timeout_ms = 5000;
            c.legacy.connect_timeout_ms = 5000;
            c.breaker.min_requests = 5;
            c.breaker.open_secs = 1;
        })
        .start()
        .await;
    let runtime_addr = h.runtime.addr;
    let addr = h.proxy_addr;

    // Warm-up: the same number of streams, run to completion, so that the allocator and the
    // connection pools have seen this load before the baseline is taken.
    let warm = open_held_streams(addr, n, "warm", Duration::from_secs(30)).await;
    let release_until_done = async {
        loop {
            h.runtime.release();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let warm_results = tokio::select! {
        r = futures_all(warm) => r,
        _ = release_until_done => unreachable!(),
    };
    for (r, _) in &warm_results {
        let r = r.as_ref().expect("a warm-up stream hung");
        assert!(is_runtime_stream(r), "warm-up stream: {r:?}");
    }
    assert_settled(&h, Duration::from_secs(5), "in flight after the warm-up").await;
    tokio::time::sleep(Duration::from_millis(1000)).await; // pooled connections idle out
    h.shared.breaker.reset(); // a window without the warm-up's successes
    let (fds_before, rss_before) = (fd_count(), rss_kb());
    let opened_before = transitions(&h, "closed", "open");
    let closed_before = transitions(&h, "half_open", "closed");

    // n streams in flight, and pending_n requests the runtime accepted but has not answered.
    let held = open_held_streams(addr, n, "kill", timeout + Duration::from_secs(5)).await;
    let pending: Vec<_> = (0..pending_n)
        .map(|i| {
            tokio::spawn(async move {
                chat_within(
                    addr,
                    "org-a",
                    &format!("pending-{i}"),
                    Duration::from_secs(20),
                )
                .await
            })
        })
        .collect();
    h.runtime.wait_for_work(2 * n + pending_n).await;

    // New requests keep arriving throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(addr, 4, stop.clone(), Duration::from_secs(20));
    h.runtime.wait_for_work(2 * n + pending_n + 4).await;

    // Kill the runtime: every connection dropped, the port closed.
    let killed_at = Instant::now();
    h.runtime.stop();
    let down = eventually(Duration::from_secs(5), || {
        std::net::TcpStream::connect_timeout(&runtime_addr, Duration::from_millis(100)).is_err()
    })
    .await;
    assert!(down, "the runtime's port still accepts connections");

    // Every in-flight stream ends with one error event, well before the execution timeout.
    let held_results = futures_all(held).await;
    let mut hung = 0;
    let mut latest_end = Duration::ZERO;
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for (r, ended) in &held_results {
        let Some(r) = r else {
            hung += 1;
            continue;
        };
        latest_end = latest_end.max(ended.saturating_duration_since(killed_at));
        let code = error_code_of_runtime_stream(r).unwrap_or_else(|| {
            panic!("an in-flight stream did not end with one error event: {r:?}")
        });
        *codes.entry(code).or_default() += 1;
    }
    eprintln!(
        "killed {n} streams in flight: {hung} hung, last ended {latest_end:?} after the kill, codes {codes:?}"
    );
    assert_eq!(
        hung, 0,
        "{hung} of {n} streams hung past the execution timeout"
    );
    assert!(
        latest_end < timeout,
        "a stream took {latest_end:?} to end (execution_timeout {timeout:?})"
    );

    // Accepted but unanswered: served by legacy, with the original request.
    let mut failed_over = 0;
    for p in pending {
        let r = p.await.unwrap().expect("a pending request hung");
        assert!(is_legacy_stream(&r), "pending request: {r:?}");
        assert_eq!(reason(&r), "failover", "pending request: {r:?}");
        failed_over += 1;
    }

    // The breaker opens.
    let shared = h.shared.clone();
    assert!(
        eventually(Duration::from_secs(5), || shared.breaker.state()
            != State::Closed)
        .await,
        "the breaker did not open"
    );
    let open_status = h.shared.breaker.status();
    eprintln!("breaker: {} ({})", open_status.state, open_status.reason);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The runtime comes back on the same port; the breaker closes by itself.
    let back_at = Instant::now();
    let listener = TcpListener::bind(runtime_addr).await.unwrap();
    let revived = Upstream::on(listener, kill_test_runtime);
    let closed = h
        .breaker_becomes(State::Closed, Duration::from_secs(15))
        .await;
    assert!(
        closed,
        "the breaker did not close after the runtime came back"
    );
    let recovered_in = back_at.elapsed();
    // Traffic flows to the runtime again.
    let closed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut seen = Vec::new();
    for l in load {
        seen.extend(l.await.unwrap());
    }

    // Every request of the load got a whole answer: runtime before the kill and after the
    // recovery, legacy (failover or breaker_open) in between, or (started before the kill)
    // a runtime stream cut with one error event.
    let mut tally = std::collections::BTreeMap::<String, usize>::new();
    for s in &seen {
        let r = s.response.as_ref().unwrap_or_else(|| {
            panic!(
                "a request of the load hung: started {:?} after the kill",
                s.started.checked_duration_since(killed_at)
            )
        });
        let kind = if is_runtime_stream(r) {
            "runtime".to_string()
        } else if is_legacy_stream(r) {
            assert!(
                ["failover", "breaker_open"].contains(&reason(r)),
                "legacy answer for an allowlisted org: {r:?}"
            );
            format!("legacy/{}", reason(r))
        } else if let Some(code) = error_code_of_runtime_stream(r) {
            assert!(
                s.started < killed_at,
                "a request started after the kill ended in an error event: {r:?}"
            );
            format!("runtime-error/{code}")
        } else {
            panic!("a request of the load failed: {r:?}");
        };
        *tally.entry(kind).or_default() += 1;
    }
    let after_recovery = seen
        .iter()
        .filter(|s| s.started > closed_at)
        .filter(|s| s.response.as_ref().is_some_and(is_runtime_stream))
        .count();
    eprintln!(
        "load: {} requests {tally:?}; {failed_over} pending requests failed over; breaker closed {recovered_in:?} after the runtime came back",
        seen.len()
    );
    assert!(
        tally.keys().any(|k| k.starts_with("legacy/")),
        "no request was served by legacy during the outage: {tally:?}"
    );
    assert!(
        after_recovery > 0,
        "no request reached the runtime after recovery"
    );
    assert!(transitions(&h, "closed", "open") > opened_before);
    assert!(transitions(&h, "half_open", "closed") > closed_before);

    // Nothing left behind.
    assert_settled(&h, Duration::from_secs(5), "still in flight").await;
    drop(seen);
    drop(held_results);
    tokio::time::sleep(Duration::from_millis(1500)).await; // pooled connections idle out
    let (fds_after, rss_after) = (fd_count(), rss_kb());
    eprintln!(
        "fds {fds_before} -> {fds_after}; RSS {} MB -> {} MB",
        rss_before / 1024,
        rss_after / 1024
    );
    assert!(
        fds_after <= fds_before + 16,
        "file descriptors leaked: {fds_before} before, {fds_after} after"
    );
    assert!(
        rss_after <= rss_before + 48 * 1024,
        "memory grew by {} MB",
        (rss_after.saturating_sub(rss_before)) / 1024
    );
    drop(revived);
}

/// Await every task (they run concurrently; this just collects them in order).
async fn futures_all<T: Send + 'static>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

// ---- 2. a hundred reloads under steady load ---------------------------------------------------

/// Generation `g` of the config: org-a on the allowlist when `g` is even, org-b when odd. The
/// generation is tagged in `rollout.shadow_max_inflight` (unused: shadowing is off), so the test
/// can tell which config is in force.
fn generation_toml(legacy: &str, runtime: &str, g: usize) -> String {
    let org = if g % 2 == 0 { "org-a" } else { "org-b" };
    let text = test_toml(legacy, runtime);
    let text = retoml(&text, "[runtime]", "connect_timeout_ms = 5000\n[runtime]");
    let text = retoml(
        &text,
        "connect_timeout_ms = 500\n",
        "connect_timeout_ms = 5000\n",
    );
    retoml(
        &text,
        "runtime_orgs = [\"org-a\"]",
        &format!(
            "runtime_orgs = [\"{org}\"]\nshadow_max_inflight = {}",
            1000 + g
        ),
    )
}

fn generation_of(server: &LocalServer) -> usize {
    server.shared.snapshot().config.rollout.shadow_max_inflight - 1000
}

/// The mode generation `g` gives `org`.
fn mode_in_generation(org: &str, g: usize) -> &'static str {
    let allowed = if g % 2 == 0 { "org-a" } else { "org-b" };
    if org == allowed {
        RT
    } else {
        DIRECT
    }
}

fn write_atomically(dir: &TempDir, path: &FsPath, text: &str) {
    let tmp = dir.join("proxy.toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn reloads(server: &LocalServer, result: &str) -> u64 {
    counter(&server.shared.metrics.config_reloads_total, result)
}

/// One chat of the reload test, with the generations in force when it was sent and answered.
#[derive(Debug)]
struct Routed {
    org: &'static str,
    gen_before: usize,
    gen_after: usize,
    response: Option<Response>,
}

/// Chat load alternating org-a and org-b until `stop`, recording the generation in force
/// around each request.
fn reload_load(
    server: &LocalServer,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Routed>>> {
    (0..workers)
        .map(|w| {
            let stop = stop.clone();
            let shared = server.shared.clone();
            let addr = server.proxy_addr;
            tokio::spawn(async move {
                let generation = || shared.snapshot().config.rollout.shadow_max_inflight - 1000;
                let mut out = Vec::new();
                let mut i = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    let org = if (i + w) % 2 == 0 { "org-a" } else { "org-b" };
                    let gen_before = generation();
                    let response =
                        chat_within(addr, org, &format!("r-{w}-{i}"), Duration::from_secs(10))
                            .await;
                    let gen_after = generation();
                    out.push(Routed {
                        org,
                        gen_before,
                        gen_after,
                        response,
                    });
                    i += 1;
                }
                out
            })
        })
        .collect()
}

/// A proxy watching `proxy.toml` in a new directory (tagged `tag`), at generation 0.
async fn watching_generation_0(tag: &str) -> (TempDir, std::path::PathBuf, Running) {
    let dir = TempDir::new(tag);
    let path = dir.join("proxy.toml");
    let h = Harness::new()
        .watched(path.clone(), |l, r| generation_toml(l, r, 0))
        .start()
        .await;
    (dir, path, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_under_load_fail_no_request_and_route_each_by_a_config_in_force() {
    logs();
    let (dir, path, h) = watching_generation_0("reloads").await;
    let (la, ra) = (h.legacy.address(), h.runtime.address());
    assert_eq!(generation_of(&h), 0);
    let (success0, invalid0) = (reloads(&h, "success"), reloads(&h, "invalid"));

    let stop = Arc::new(AtomicBool::new(false));
    let load = reload_load(&h, 4, stop.clone());
    let applied = Arc::new(Mutex::new(vec![0usize]));
    let watcher = {
        let (shared, applied, stop) = (h.shared.clone(), applied.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let g = shared.snapshot().config.rollout.shadow_max_inflight - 1000;
                {
                    let mut a = applied.lock().unwrap();
                    if a.last() != Some(&g) {
                        a.push(g);
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // The load is flowing before the first write.
    h.runtime.wait_for_work(4).await;

    // 100 writes, 20-50 ms apart; every 10th is followed by a pause long enough for the reload's
    // debounce, so that a good share of them are really applied under load. Write 50 is broken.
    const BROKEN: usize = 50;
    let started = Instant::now();
    for g in 1..=100 {
        if g == BROKEN {
            let broken = generation_toml(&la, &ra, g).replace("[breaker]", "[breaker");
            // The last good write may still be in its debounce: once it is in force, nothing
            // but the broken file could change the config.
            assert!(
                eventually(Duration::from_secs(5), || generation_of(&h) == g - 1).await,
                "generation {} was never applied",
                g - 1
            );
            let before = generation_of(&h);
            write_atomically(&dir, &path, &broken);
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert_eq!(
                generation_of(&h),
                before,
                "the broken file changed the config in force"
            );
            continue;
        }
        write_atomically(&dir, &path, &generation_toml(&la, &ra, g));
        let pause = if g % 10 == 0 {
            250
        } else {
            fastrand::u64(20..=50)
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let last = 100;
    let shared = h.shared.clone();
    assert!(
        eventually(Duration::from_secs(2), move || shared
            .snapshot()
            .config
            .rollout
            .shadow_max_inflight
            == 1000 + last)
        .await,
        "the last config was not applied"
    );
    let churn = started.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    watcher.await.unwrap();
    let mut routed = Vec::new();
    for l in load {
        routed.extend(l.await.unwrap());
    }
    let applied = applied.lock().unwrap().clone();
    assert!(
        !applied.contains(&BROKEN),
        "the broken generation was applied"
    );

    let mut failed = 0;
    let mut misrouted = Vec::new();
    let mut spanning = 0;
    for r in &routed {
        let Some(resp) = &r.response else {
            failed += 1;
            continue;
        };
        let ok = resp.status == 200
            && resp.complete
            && names(resp) == ["message", "done"]
            && (mode(resp) == RT) == (reason(resp) == "allowlist");
        if !ok {
            failed += 1;
            eprintln!("failed request: {resp:?}");
            continue;
        }
        // The configs that may have routed it: generations only grow, so the one in force when
        // the proxy read the request lies between what the sender saw before and after. (The
        // watcher's samples would miss a generation in force for less than its wake-up under
        // load, and call a request it routed misrouted.)
        let in_force: Vec<usize> = (r.gen_before..=r.gen_after)
            .filter(|&g| g != BROKEN)
            .collect();
        if r.gen_before != r.gen_after {
            spanning += 1;
        }
        if !in_force
            .iter()
            .any(|&g| mode_in_generation(r.org, g) == mode(resp))
        {
            misrouted.push(format!(
                "{} served {} with generations {:?} in force",
                r.org,
                mode(resp),
                in_force
            ));
        }
    }
    let (success, invalid) = (
        reloads(&h, "success") - success0,
        reloads(&h, "invalid") - invalid0,
    );
    eprintln!(
        "100 writes in {churn:?}: {} generations applied ({success} reloads counted, {invalid} refused); {} requests, {failed} failed, {} misrouted, {spanning} spanned a reload",
        applied.len() - 1,
        routed.len(),
        misrouted.len()
    );
    assert_eq!(failed, 0, "requests failed during the reloads");
    assert!(misrouted.is_empty(), "misrouted: {misrouted:?}");
    assert!(invalid >= 1, "the broken file was not refused");
    assert!(success >= 10, "only {success} reloads applied");
    assert!(routed.len() >= 100, "too little load: {}", routed.len());
    assert_eq!(
        h.runtime.work().len() + h.legacy.work().len(),
        routed.len(),
        "every request reached exactly one upstream"
    );
}

/// The contract: an edit is in force within a second, even while edits keep arriving faster than
/// the reload's debounce (a debounce without an upper bound would postpone every one of them
/// until the churn stops).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_config_churn_still_applies_an_edit_within_a_second() {
    logs();
    let (dir, path, h) = watching_generation_0("churn").await;
    let (la, ra) = (h.legacy.address(), h.runtime.address());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let mut first_applied = None;
    let mut g = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        g += 1;
        write_atomically(&dir, &path, &generation_toml(&la, &ra, g));
        tokio::time::sleep(Duration::from_millis(fastrand::u64(20..=50))).await;
        if first_applied.is_none() && generation_of(&h) > 0 {
            first_applied = Some(started.elapsed());
        }
    }
    eprintln!("{g} edits in 2.5 s; first applied after {first_applied:?}");
    let took = first_applied.expect("no edit was applied during 2.5 s of churn");
    assert!(
        took < Duration::from_millis(1000),
        "first edit applied after {took:?}"
    );
}

// ---- 3. client disconnect storms --------------------------------------------------------------

fn runtime_first_event() -> Vec<u8> {
    frame("text_chunk", json!({"content": "first"}))
}

fn legacy_first_event() -> Vec<u8> {
    b"event: message\ndata: {\"id\":\"l1\",\"type\":\"text\",\"data\":{\"content\":\"legacy\"}}\n\n"
        .to_vec()
}

/// `n` clients chatting as `org`; returns once each holds its first body chunk, with the
/// tasks that keep them (abort one to drop its connection).
async fn clients_holding_their_first_event(
    addr: SocketAddr,
    org: &'static str,
    n: usize,
    tag: &str,
) -> Vec<tokio::task::JoinHandle<()>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut tasks = Vec::new();
    for i in 0..n {
        let tx = tx.clone();
        let session = format!("{tag}-{i}");
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            c.post_chat(Some(org), &session, HI).await;
            let mut first = Some(tx);
            c.read_response_with(|_| {
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
            })
            .await;
            std::future::pending::<()>().await;
        }));
    }
    drop(tx);
    let got = count_signals(&mut rx, n, Duration::from_secs(20)).await;
    assert_eq!(got, n, "{tag}: only {got} of {n} clients got a first event");
    tasks
}

/// The disconnect storms' config: executions that outlast the test, and connects polled late on
/// a busy machine that must not turn into failovers (see the kill test).
fn storm_config(c: &mut Config) {
    c.runtime.execution_timeout_ms = 30_000;
    c.runtime.connect_timeout_ms = 5000;
    c.legacy.connect_timeout_ms = 5000;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_storm_mid_stream_releases_upstreams_and_counts_no_runtime_failure() {
    crate::run_alone!(
        "disconnect_storm_mid_stream_releases_upstreams_and_counts_no_runtime_failure"
    );
    logs();
    const RUNTIME_CLIENTS: usize = 100;
    const LEGACY_CLIENTS: usize = 50;
    let h = Harness::new()
        .legacy(holding(legacy_first_event(), None))
        .runtime(holding(runtime_first_event(), None))
        .config(storm_config)
        .start()
        .await;
    let m = h.shared.metrics;
    let cancelled0 = counter(&m.execution_cancelled_total, RT);
    let errors0 = counter(&m.execution_error_total, RT);
    let timeouts0 = counter(&m.execution_timeout_total, RT);
    let direct_errors0 = counter(&m.execution_error_total, DIRECT);
    let fds_before = fd_count();

    let mut clients =
        clients_holding_their_first_event(h.proxy_addr, "org-a", RUNTIME_CLIENTS, "rt").await;
    clients.extend(
        clients_holding_their_first_event(h.proxy_addr, "org-z", LEGACY_CLIENTS, "lg").await,
    );
    assert_eq!(h.runtime.answered(), RUNTIME_CLIENTS);
    assert_eq!(h.legacy.answered(), LEGACY_CLIENTS);
    assert_eq!(in_flight(&h, RT), RUNTIME_CLIENTS as i64);
    assert_eq!(in_flight(&h, DIRECT), LEGACY_CLIENTS as i64);

    // The storm: every client drops its connection at once.
    let storm = Instant::now();
    for c in &clients {
        c.abort();
    }
    for c in clients {
        let _ = c.await;
    }
    let released = eventually(Duration::from_secs(5), || {
        h.runtime.hang_ups() == RUNTIME_CLIENTS && h.legacy.hang_ups() == LEGACY_CLIENTS
    })
    .await;
    let took = storm.elapsed();
    eprintln!(
        "disconnect storm: runtime connections closed {}/{RUNTIME_CLIENTS}, legacy {}/{LEGACY_CLIENTS}, in {took:?}",
        h.runtime.hang_ups(),
        h.legacy.hang_ups()
    );
    assert!(released, "upstream connections were not released");
    assert_settled(&h, Duration::from_secs(5), "in flight after the storm").await;
    assert!(
        eventually(Duration::from_secs(2), || counter(
            &m.execution_cancelled_total,
            RT
        ) == cancelled0
            + RUNTIME_CLIENTS as u64)
        .await,
        "cancelled: {} (expected +{RUNTIME_CLIENTS})",
        counter(&m.execution_cancelled_total, RT) - cancelled0
    );
    assert_eq!(counter(&m.execution_error_total, RT), errors0);
    assert_eq!(counter(&m.execution_timeout_total, RT), timeouts0);
    assert_eq!(counter(&m.execution_error_total, DIRECT), direct_errors0);
    let window = h.runtime_window();
    assert_eq!(
        (window.total, window.error, window.timeout),
        (0, 0, 0),
        "a client disconnect counted against the runtime"
    );
    assert_eq!(h.shared.breaker.window_stats().total, 0);
    assert_eq!(h.shared.breaker.state(), State::Closed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fds_after = fd_count();
    eprintln!("fds {fds_before} -> {fds_after}");
    assert!(
        fds_after <= fds_before + 8,
        "fds {fds_before} -> {fds_after}"
    );
}

/// Clients that leave while the runtime has not answered yet (a slow start under load): the
/// proxy must not keep waiting for the runtime's response head, holding the runtime connection
/// (and the execution it started) until the runtime answers or the execution timeout passes;
/// and the abandoned executions are not the runtime's fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_storm_before_the_first_byte_releases_runtime_connections() {
    logs();
    const CLIENTS: usize = 50;
    let h = Harness::new()
        .runtime(holding(
            runtime_first_event(),
            Some(Duration::from_secs(20)),
        ))
        .config(storm_config)
        .start()
        .await;

    let addr = h.proxy_addr;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await;
                c.post_chat(Some("org-a"), &format!("early-{i}"), HI).await;
                c.read_response_with(|_| {}).await;
            })
        })
        .collect();
    h.runtime.wait_for_work(CLIENTS).await;
    for c in &clients {
        c.abort();
    }
    let storm = Instant::now();
    let released = eventually(Duration::from_secs(3), || {
        h.runtime.unanswered_hang_ups() == CLIENTS
    })
    .await;
    eprintln!(
        "{} of {CLIENTS} unanswered runtime connections closed {:?} after the clients left; requests in flight {}",
        h.runtime.unanswered_hang_ups(),
        storm.elapsed(),
        h.shared.requests.count()
    );
    assert!(released, "runtime connections held after the clients left");
    assert_settled(
        &h,
        Duration::from_secs(2),
        "in flight after the clients left",
    )
    .await;
    let window = h.runtime_window();
    assert_eq!(
        (window.error, window.timeout),
        (0, 0),
        "clients leaving counted against the runtime"
    );
    assert_eq!(h.shared.breaker.window_stats().total, 0);
}

// ---- 4. a client that stops reading -----------------------------------------------------------

/// A client that stops reading mid-stream (a frozen tab, a stalled mobile link) while keeping
/// its connection open: the relay blocks in its write to the client, where neither the execution
/// deadline nor anything else is watched, so the stream, the runtime connection and the
/// execution stay up for as long as the client keeps the socket, past `execution_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_does_not_hold_a_runtime_stream_past_the_timeout() {
    logs();
    // Text chunks as fast as the proxy takes them, forever.
    let text = "x".repeat(16 * 1024);
    let h = Harness::new()
        .runtime(runtime_script(move |_| {
            Reply::sse(vec![Step::flood(frame(
                "text_chunk",
                json!({ "content": text }),
            ))])
        }))
        .config(move |c| {
            c.runtime.execution_timeout_ms = 1000;
        })
        .start()
        .await;

    // Send the chat, read a little, then stop reading but keep the connection.
    let mut conn = TcpStream::connect(h.proxy_addr).await.unwrap();
    let auth = format!("Bearer {}", token("org-a"));
    let body = HI;
    let req = format!(
        "POST /api/v1/chat/sessions/frozen HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 4096];
    let n = conn.read(&mut head).await.unwrap();
    assert!(n > 0);
    let started = Instant::now();

    let released = h.runtime.wait_for_hang_ups(1, Duration::from_secs(5)).await;
    eprintln!(
        "frozen client: runtime connection released {released} after {:?}; runtime sent {} KB; streams in flight {}",
        started.elapsed(),
        h.runtime.bytes_sent() / 1024,
        in_flight(&h, RT)
    );
    assert!(
        released,
        "the runtime stream outlived execution_timeout_ms (1 s) by more than 4 s"
    );
    assert_settled(&h, Duration::from_secs(2), "in flight").await;
    drop(conn);
}

/// After a burst, the runtime connections the proxy kept for reuse are closed once they idle
/// past `runtime.pool_idle_timeout_ms`, with no request coming to notice: each one holds a
/// descriptor here and a worker at the runtime. On both paths to the runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bursts_pooled_runtime_connections_close_once_idle_without_another_request() {
    for lean in [true, false] {
        let h = Harness::new()
            .config(move |c| {
                c.server.lean_runtime = lean;
                c.runtime.pool_idle_timeout_ms = 200;
                // No health check comes to reuse (or close) a pooled connection meanwhile.
                c.runtime.health_interval_ms = 3_600_000;
            })
            .start()
            .await;
        let chats: Vec<_> = (0..4)
            .map(|i| {
                let addr = h.proxy_addr;
                tokio::spawn(async move {
                    chat_within(addr, "org-a", &format!("burst-{i}"), Duration::from_secs(5)).await
                })
            })
            .collect();
        for r in futures_all(chats).await {
            assert!(
                r.as_ref().is_some_and(is_runtime_stream),
                "lean {lean}: {r:?}"
            );
        }
        let made = h.runtime.connections();
        assert!(made >= 1);
        assert!(
            h.runtime
                .wait_for_idle_closes(made, Duration::from_secs(3))
                .await,
            "lean {lean}: {made} runtime connections made, still open after 3 s idle"
        );
    }
}
