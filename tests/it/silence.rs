//! Silence is a failure: each upstream deadline, with its timing, on every path it guards. The
//! runtime's on the front door's own connection (`server.lean_runtime`) and through Pingora's
//! request filter; legacy's on the lean passthrough and through Pingora's proxy. Deadlines are a
//! few hundred milliseconds: each answer must come after its deadline and well before a bound.
//! (The rules themselves are paused-clock unit tests in `upstream`; these are the wiring.)

use crate::support;

use std::time::{Duration, Instant};

use cutover_proxy::core::config::{CommitTimeoutAction, Config, PreContent};
use serde_json::json;
use support::*;

const DEADLINE: Duration = Duration::from_millis(300);
/// What a loaded machine may add before an answer counts as late.
const SLACK: Duration = Duration::from_millis(1200);
/// At most what one relayed event takes from the proxy's read to the client's.
const RELAY_HOP: Duration = Duration::from_millis(50);

/// A runtime that answers health checks and executions with `steps` (`None`: no head at all).
fn runtime(steps: Option<Vec<Step>>) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    runtime_script(move |_| match &steps {
        Some(steps) => Reply::sse(steps.clone()),
        None => Reply::silent(vec![Step::Hang]),
    })
}

fn timeouts(h: &Running, upstream: &str, stage: &str) -> f64 {
    metric(
        h,
        "cutover_upstream_timeouts_total",
        &[("upstream", upstream), ("stage", stage)],
    )
}

/// Once the one chat is recorded (`direct` of it by legacy): counted as the runtime's timeout.
async fn assert_one_runtime_timeout(h: &Running, direct: u64, path: &str) {
    recorded(h, 1, direct).await;
    assert_eq!(
        metric(h, "chat_execution_timeout_total", &[("mode", RT)]),
        1.0,
        "{path}"
    );
}

/// A chat as `org`, which must end within the deadline (see [`assert_within`]).
async fn chat_within(h: &Running, org: &str, what: &str) -> Response {
    let started = Instant::now();
    let r = h.chat(org).send().await;
    assert_within(started.elapsed(), what);
    r
}

#[track_caller]
fn assert_within(took: Duration, what: &str) {
    assert!(
        took >= DEADLINE,
        "{what}: answered after {took:?}, before the deadline"
    );
    assert!(
        took < DEADLINE + SLACK,
        "{what}: answered after {took:?}, long past the deadline"
    );
}

/// The runtime's paths: the front door's own connection, and Pingora's.
const RUNTIME_PATHS: [(bool, &str); 2] = [(true, "front door"), (false, "pingora")];

/// Each runtime path under each `runtime.pre_content`.
fn runtime_paths_and_modes() -> impl Iterator<Item = ((bool, &'static str), PreContent)> {
    RUNTIME_PATHS
        .into_iter()
        .flat_map(|p| [PreContent::Hold, PreContent::Stream].map(|m| (p, m)))
}

/// Legacy answered the chat: held, as a failover (its own stream and head); streamed, inside the
/// runtime's open stream, ending with legacy's `done`.
#[track_caller]
fn assert_legacy_answered(r: &Response, mode: PreContent, path: &str) {
    match mode {
        PreContent::Hold => assert_served(r, DIRECT, "failover"),
        PreContent::Stream => {
            assert_served(r, RT, "allowlist");
            let names: Vec<String> = r.events().into_iter().map(|e| e.0).collect();
            assert_eq!(names, ["message", "message", "done"], "{path}");
            assert!(r.text().contains("\"legacy\""), "{path}");
            assert!(
                r.text().contains("\"executionMode\":\"direct_llm\""),
                "{path}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_with_no_head_fails_over_at_its_response_timeout_on_both_paths() {
    for (lean, path) in RUNTIME_PATHS {
        let h = Harness::new()
            .runtime(runtime(None))
            .config(move |c| {
                c.server.lean_runtime = lean;
                c.runtime.response_timeout_ms = DEADLINE.as_millis() as u64;
            })
            .start()
            .await;
        let r = chat_within(&h, "org-a", path).await;
        assert_served(&r, DIRECT, "failover");
        assert_eq!(
            h.legacy.work()[0].body,
            HI.as_bytes(),
            "{path}: original body"
        );
        assert_one_runtime_timeout(&h, 1, path).await;
        assert_eq!(timeouts(&h, "runtime", "response"), 1.0, "{path}");
    }
}

/// On each runtime path under each `runtime.pre_content`, org-a's chat to a runtime that thinks
/// and then goes on with `after`, its deadline set by `deadline`: answered by legacy within the
/// deadline, counted as the runtime's timeout; `check` judges the rest.
async fn thinks_then_legacy_answers(
    after: Vec<Step>,
    deadline: fn(&mut Config),
    check: impl Fn(&Running, &str),
) {
    for ((lean, path), mode) in runtime_paths_and_modes() {
        let mut steps = vec![Step::Send(thinking("planning"))];
        steps.extend(after.clone());
        let h = Harness::new()
            .runtime(runtime(Some(steps)))
            .config(move |c| {
                c.server.lean_runtime = lean;
                c.runtime.pre_content = mode;
            })
            .config(deadline)
            .start()
            .await;
        let r = chat_within(&h, "org-a", path).await;
        assert_legacy_answered(&r, mode, path);
        assert_one_runtime_timeout(&h, 1, path).await;
        check(&h, path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_silent_before_its_first_content_fails_over_at_its_idle_timeout() {
    let deadline = |c: &mut Config| {
        c.runtime.idle_timeout_ms = DEADLINE.as_millis() as u64;
        c.runtime.commit_timeout_ms = Some(4000);
    };
    thinks_then_legacy_answers(vec![Step::Hang], deadline, |h, path| {
        assert_eq!(timeouts(h, "runtime", "idle"), 1.0, "{path}")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_silent_after_the_commit_ends_its_stream_with_runtime_stalled() {
    for (lean, path) in RUNTIME_PATHS {
        let h = Harness::new()
            .runtime(runtime(Some(vec![Step::Send(text("partial")), Step::Hang])))
            .config(move |c| {
                c.server.lean_runtime = lean;
                c.runtime.idle_timeout_ms = DEADLINE.as_millis() as u64;
            })
            .start()
            .await;
        let r = h.chat("org-a").send().await;
        assert_served(&r, RT, "allowlist");
        assert_eq!(event_names(&r), ["message", "error"], "{path}");
        let error: serde_json::Value = serde_json::from_str(&r.events()[1].1).unwrap();
        assert_eq!(error["code"], "RUNTIME_STALLED", "{path}");
        // From the content to the error: the idle timeout. Its clock started when the proxy read
        // the content, a relay hop before the client did, so the gap the client sees may be that
        // hop shorter than the deadline.
        let gap = r.chunks[1].0 - r.chunks[0].0;
        assert_within(gap + RELAY_HOP, path);
        assert_one_runtime_timeout(&h, 0, path).await;
        assert_eq!(
            metric(
                &h,
                "chat_runtime_stream_errors_total",
                &[("code", "RUNTIME_STALLED")]
            ),
            1.0
        );
        assert!(
            h.legacy.work().is_empty(),
            "{path}: no failover after the commit"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_keep_a_quiet_runtime_alive() {
    let ping = frame("ping", json!({}));
    let mut steps = Vec::new();
    for _ in 0..4 {
        steps.push(Step::Send(ping.clone()));
        steps.push(Step::Sleep(DEADLINE / 2));
    }
    steps.extend(runtime_ok_steps());
    let h = Harness::new()
        .runtime(runtime(Some(steps)))
        .config(|c| c.runtime.idle_timeout_ms = DEADLINE.as_millis() as u64)
        .start()
        .await;
    let r = h.chat("org-a").send().await;
    assert_served(&r, RT, "allowlist");
    assert_eq!(event_names(&r).last().map(String::as_str), Some("done"));
    assert_eq!(timeouts(&h, "runtime", "idle"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_content_by_the_commit_timeout_fails_over_when_told_to_on_both_paths() {
    let late = vec![
        Step::Sleep(Duration::from_secs(3)),
        Step::Send(text("late")),
    ];
    let deadline = |c: &mut Config| {
        c.runtime.commit_timeout_ms = Some(DEADLINE.as_millis() as u64);
        c.runtime.commit_timeout_action = CommitTimeoutAction::Failover;
    };
    thinks_then_legacy_answers(late, deadline, |h, path| {
        let committed = metric(h, "cutover_commit_total", &[]);
        assert_eq!(committed, 0.0, "{path}: nothing was committed");
    })
    .await;
}

/// Legacy's paths for a plain request: the lean passthrough, and Pingora's proxy.
const LEGACY_PATHS: [(bool, &str); 2] = [(true, "lean"), (false, "pingora")];

/// On both of legacy's paths, a GET of `route` from a legacy answering `steps` (`reply` makes
/// the answer), with legacy's `stage` deadline ("response" or "idle") at `DEADLINE`: answered
/// within the deadline, and counted; `check` judges each answer.
async fn legacy_silent_on_both_paths(
    reply: fn(Vec<Step>) -> Reply,
    steps: Vec<Step>,
    stage: &'static str,
    route: &str,
    check: impl Fn(&Response, &str),
) {
    for (lean, path) in LEGACY_PATHS {
        let (reply, steps) = (reply, steps.clone());
        let h = Harness::new()
            .legacy(move |_: &Received| reply(steps.clone()))
            .config(move |c| {
                c.server.lean_passthrough = lean;
                let deadline = DEADLINE.as_millis() as u64;
                match stage {
                    "response" => c.legacy.response_timeout_ms = deadline,
                    "idle" => c.legacy.idle_timeout_ms = deadline,
                    other => panic!("legacy has no {other} deadline"),
                }
            })
            .start()
            .await;
        let started = Instant::now();
        let r = request(h.proxy_addr, "GET", route, &[], b"").await;
        assert_within(started.elapsed(), path);
        check(&r, path);
        assert_eq!(timeouts(&h, "legacy", stage), 1.0, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_with_no_head_is_a_504_at_its_response_timeout_on_both_paths() {
    let no_head = vec![Step::Hang];
    legacy_silent_on_both_paths(
        Reply::silent,
        no_head,
        "response",
        "/api/v1/agents",
        |r, path| assert_eq!(r.status, 504, "{path}"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_legacy_never_answers_is_a_504_with_its_routing() {
    let h = Harness::new()
        .legacy(|_: &Received| Reply::silent(vec![Step::Hang]))
        .config(|c| c.legacy.response_timeout_ms = DEADLINE.as_millis() as u64)
        .start()
        .await;
    let r = chat_within(&h, "org-b", "chat").await;
    assert_eq!(r.status, 504);
    assert_eq!(mode_reason(&r), (Some(DIRECT), Some("default")));
    recorded(&h, 0, 1).await;
    assert_eq!(
        metric(&h, "chat_execution_timeout_total", &[("mode", DIRECT)]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_silent_inside_its_answer_has_the_connection_closed_at_its_idle_timeout() {
    let first_then_silence = vec![Step::Send(b"data: first\n\n".to_vec()), Step::Hang];
    legacy_silent_on_both_paths(
        Reply::sse,
        first_then_silence,
        "idle",
        "/api/v1/events",
        |r, path| {
            assert_eq!(r.status, 200, "{path}");
            assert!(!r.complete, "{path}: a cut answer must not look whole");
            assert_eq!(r.body(), b"data: first\n\n", "{path}");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_runtime_does_not_pin_a_shadow_slot() {
    let h = Harness::new()
        .runtime(runtime(None))
        .config(|c| {
            c.rollout.shadow_percent = 100.0;
            c.rollout.shadow_max_inflight = 1;
            c.runtime.response_timeout_ms = DEADLINE.as_millis() as u64;
        })
        .start()
        .await;
    let started = Instant::now();
    let r = h.chat("org-b").send().await;
    assert_served(&r, DIRECT, "default");
    h.runtime.wait_for_work(1).await;
    let shared = h.server.shared.clone();
    let freed = eventually(DEADLINE + SLACK, move || {
        shared
            .shadow_in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0
    })
    .await;
    assert!(freed, "the shadow slot stayed taken");
    assert!(started.elapsed() >= DEADLINE);
    let timed_out = || metric(&h, "chat_shadow_total", &[("outcome", "timeout")]);
    assert!(eventually(SLACK, || timed_out() == 1.0).await);
    // The slot is free for the next copy.
    h.chat("org-b").send().await;
    h.runtime.wait_for_work(2).await;
}
