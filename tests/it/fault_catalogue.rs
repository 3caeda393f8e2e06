//! The failoverbench fault catalogue (methodology v0.1, `scenarios/catalogue.yaml`) translated to
//! this product: the runtime is the primary, legacy the fallback, the caller the web app reading
//! a chat's event stream. One test per scenario that applies, against a scripted runtime on a
//! raw socket, each scored with failoverbench's four verdicts (`support::verdict`) and held to
//! the one docs/faults.md publishes.
//!
//! The catalogue's timings are scaled down (its 120 s silence, 30 s stall and 20 s first token
//! become a few hundred milliseconds against deadlines of 400 ms); what is checked is the
//! conduct: who answered, how long the caller waited against the configured deadlines, how often
//! the runtime was asked, and that the next chat is still served.

use crate::support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_proxy::core::config::CommitTimeoutAction;
use serde_json::{json, Value};
use support::*;

/// The runtime's response head and idle deadlines for the suite.
const DEADLINE: Duration = Duration::from_millis(400);
/// What the machine may add to a deadline before a check calls it missed.
const SLACK: Duration = Duration::from_millis(1000);

fn complete() -> Vec<u8> {
    frame(
        "execution_complete",
        json!({"final_response": "the answer", "usage": {"total_tokens": 12}}),
    )
}

/// The runtime's answer when it refuses with `status` and a JSON error.
fn refusal(status: u16, code: &str, retry_after: Option<&str>) -> Reply {
    let mut reply = Reply::json(status, json!({"detail": {"code": code}}));
    if let Some(secs) = retry_after {
        reply.headers.push(("retry-after".into(), secs.into()));
    }
    reply
}

/// The suite's proxy: the runtime's deadlines at 400 ms.
/// A runtime whose first execution sends the text chunks `t0 `, `t1 `, … (`texts` of them) and
/// then `then`; every later one answers whole.
fn first_execution_cut(
    texts: usize,
    then: Vec<Step>,
) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    runtime_script(move |n| {
        if n > 0 {
            return Reply::sse(runtime_ok_steps());
        }
        let mut steps: Vec<Step> = (0..texts)
            .map(|i| Step::Send(text(&format!("t{i} "))))
            .collect();
        steps.extend(then.iter().cloned());
        Reply::sse(steps)
    })
}

fn harness(runtime: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Harness {
    Harness::new().runtime(runtime).config(|c| {
        c.runtime.response_timeout_ms = DEADLINE.as_millis() as u64;
        c.runtime.idle_timeout_ms = DEADLINE.as_millis() as u64;
    })
}

/// A chat, timed from the request to the end of the response.
async fn timed_chat(h: &Running) -> (Response, Duration) {
    let started = Instant::now();
    let r = h.chat("org-a").send().await;
    (r, started.elapsed())
}

/// The catalogue's proxy started before `runtime`, and one chat through it, timed.
async fn started_and_timed(
    runtime: impl Fn(&Received) -> Reply + Send + Sync + 'static,
) -> (Running, Response, Duration) {
    let h = harness(runtime).start().await;
    let (r, took) = timed_chat(&h).await;
    (h, r, took)
}

/// Legacy answered: a failover (legacy's stream, its head saying so), or, with the runtime's
/// stream already open (`runtime.pre_content = "stream"`), a rescue inside it, ending with
/// legacy's own `done`.
fn served_by_legacy(r: &Response) -> bool {
    let failover = r.header("x-execution-mode") == Some(DIRECT)
        && r.header("x-execution-reason") == Some("failover");
    let rescued = r.header("x-execution-mode") == Some(RT)
        && r.events().last().is_some_and(|(name, data)| {
            name == "done" && data.contains("\"executionMode\":\"direct_llm\"")
        });
    failover || rescued
}

/// A healthy chat through the same proxy after the scenario, once the runtime behaves.
async fn alive_after(h: &Running) -> bool {
    let r = h.chat("org-a").send().await;
    Scored::of(&r).rescued
}

#[track_caller]
fn assert_verdict(scored: &Scored, expected: Verdict) {
    assert_eq!(scored.verdict(), expected, "{scored}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s01_429_with_retry_after_fails_over_at_once_and_does_not_hammer() {
    let (h, r, took) =
        started_and_timed(runtime_script(|_| refusal(429, "rate_limited", Some("2")))).await;
    let mut s = Scored::of(&r);
    // The catalogue's "honour the header or fail over": a chat is not repeated on the runtime
    // (its tools may have run), so it fails over at once.
    s.required("no_hammer", h.runtime.work().len() <= 2)
        .required("fallback_used", served_by_legacy(&r))
        .advisory("prompt", took < SLACK);
    assert_verdict(&s, Verdict::Pass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s02_429_persistent_fails_over_every_chat_with_one_attempt_each() {
    let h = harness(runtime_script(|_| refusal(429, "rate_limited", None)))
        .start()
        .await;
    let mut every_one_by_legacy = true;
    let mut last = None;
    for _ in 0..3 {
        let (r, _) = timed_chat(&h).await;
        every_one_by_legacy &= served_by_legacy(&r) && Scored::of(&r).rescued;
        last = Some(r);
    }
    let mut s = Scored::of(&last.unwrap());
    s.required("fallback_used", every_one_by_legacy)
        .required("bounded_attempts", h.runtime.work().len() == 3);
    assert_verdict(&s, Verdict::Pass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s03_500_once_is_answered_by_legacy_and_the_next_chat_by_the_runtime() {
    let (h, r, _) = started_and_timed(runtime_script(|n| {
        if n == 0 {
            refusal(500, "internal", None)
        } else {
            Reply::sse(runtime_ok_steps())
        }
    }))
    .await;
    let mut s = Scored::of(&r);
    // Failing over instead of repeating the execution: acceptable, as the catalogue notes.
    s.required("fallback_used", served_by_legacy(&r));
    let next = h.chat("org-a").send().await;
    s.required(
        "runtime_again",
        next.header("x-execution-mode") == Some(RT) && Scored::of(&next).rescued,
    );
    assert_verdict(&s, Verdict::Pass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s04_503_persistent_fails_over_within_one_attempt() {
    let (h, r, took) =
        started_and_timed(runtime_script(|_| refusal(503, "overloaded", None))).await;
    let mut s = Scored::of(&r);
    s.required("bounded_attempts", h.runtime.work().len() == 1)
        .required("fallback_used", served_by_legacy(&r))
        .required("no_hang", took < SLACK);
    assert_verdict(&s, Verdict::Pass);
}

/// The catalogue's "retry the request, or fail over; either way, answer": a reset on a kept
/// connection is a stale one and the request goes once more on a fresh one (where this runtime
/// answers); on a fresh connection it fails over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s05_a_reset_before_the_head_is_answered() {
    let (h, r, took) = started_and_timed(runtime_script(|n| {
        if n == 0 {
            Reply::silent(vec![Step::Reset])
        } else {
            Reply::sse(runtime_ok_steps())
        }
    }))
    .await;
    let mut s = Scored::of(&r);
    let retried = h.runtime.work().len() == 2 && r.header("x-execution-mode") == Some(RT);
    s.required("retried_or_failed_over", retried || served_by_legacy(&r))
        .required("no_hang", took < SLACK)
        .required("alive_after", alive_after(&h).await);
    assert_verdict(&s, Verdict::Pass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s06_no_response_at_all_is_answered_by_legacy_after_the_response_timeout() {
    let (h, r, took) = started_and_timed(runtime_script(|_| Reply::silent(vec![Step::Hang]))).await;
    let mut s = Scored::of(&r);
    s.required("fallback_used", served_by_legacy(&r))
        .required("not_before_the_deadline", took >= DEADLINE)
        .required("within_budget", took < DEADLINE + SLACK)
        .advisory("silent_route_not_retried", h.runtime.work().len() == 1);
    assert_verdict(&s, Verdict::Pass);
    assert_one_runtime(&h, 1, "timeout").await;
    assert_eq!(
        metric(
            &h,
            "cutover_upstream_timeouts_total",
            &[("upstream", "runtime"), ("stage", "response")]
        ),
        1.0
    );
}

/// Headers and `thinking` at once, the text `late` after them.
fn slow_first_content(late: Duration) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    runtime_script(move |_| {
        Reply::sse(vec![
            Step::Send(thinking("planning")),
            Step::Sleep(late),
            Step::Send(text("the answer")),
            Step::Send(complete()),
            Step::Send(done_frame()),
        ])
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s07_slow_first_content_is_answered_late_when_the_commit_timeout_commits() {
    let h = harness(slow_first_content(Duration::from_millis(300)))
        .config(|c| c.runtime.commit_timeout_ms = Some(100))
        .start()
        .await;
    let (r, took) = timed_chat(&h).await;
    let mut s = Scored::of(&r);
    s.required("runtime_answered", r.header("x-execution-mode") == Some(RT))
        .advisory(
            "ttft_limit",
            took < Duration::from_millis(100) + Duration::from_millis(150),
        );
    assert_verdict(&s, Verdict::Partial);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s07_slow_first_content_fails_over_at_the_commit_timeout_when_told_to() {
    let h = harness(slow_first_content(Duration::from_millis(300)))
        .config(|c| {
            c.runtime.commit_timeout_ms = Some(100);
            c.runtime.commit_timeout_action = CommitTimeoutAction::Failover;
        })
        .start()
        .await;
    let (r, took) = timed_chat(&h).await;
    let mut s = Scored::of(&r);
    s.required("fallback_used", served_by_legacy(&r))
        .advisory("ttft_limit", took < Duration::from_millis(100) + SLACK);
    assert_verdict(&s, Verdict::Pass);
    assert_one_runtime(&h, 1, "timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s08_a_stream_cut_mid_answer_ends_with_one_clean_error() {
    let (h, r, took) = started_and_timed(first_execution_cut(40, vec![Step::Close])).await;
    let mut s = Scored::of(&r);
    let last = r.events().last().cloned().unwrap_or_default();
    s.required("no_hang", took < SLACK)
        .required("says_why", last.1.contains("RUNTIME_DISCONNECTED"))
        .required("alive_after", alive_after(&h).await);
    // Content had reached the user: rescuing it means continuing in-stream, not done here.
    assert_verdict(&s, Verdict::Safe);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s08_a_stream_cut_before_any_content_fails_over() {
    let (_h, r, _) = started_and_timed(runtime_script(|_| {
        Reply::sse(vec![Step::Send(thinking("planning")), Step::Close])
    }))
    .await;
    let mut s = Scored::of(&r);
    s.required("fallback_used", served_by_legacy(&r));
    assert_verdict(&s, Verdict::Pass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s09_a_stall_mid_answer_ends_within_the_idle_timeout_and_the_next_chat_is_served() {
    let (h, r, took) = started_and_timed(first_execution_cut(20, vec![Step::Hang])).await;
    let mut s = Scored::of(&r);
    let last = r.events().last().cloned().unwrap_or_default();
    s.required("stalled_said", last.1.contains("RUNTIME_STALLED"))
        .required("not_before_the_deadline", took >= DEADLINE)
        .required("bounded", took < DEADLINE + SLACK)
        .required("alive_after", alive_after(&h).await);
    assert_verdict(&s, Verdict::Safe);
    recorded(&h, 2, 0).await;
    assert_eq!(
        metric(&h, "chat_execution_timeout_total", &[("mode", RT)]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s09_a_stall_before_any_content_fails_over_within_the_idle_timeout() {
    let h = harness(runtime_script(|_| {
        Reply::sse(vec![Step::Send(thinking("planning")), Step::Hang])
    }))
    .config(|c| c.runtime.commit_timeout_ms = Some(4000))
    .start()
    .await;
    let (r, took) = timed_chat(&h).await;
    let mut s = Scored::of(&r);
    s.required("fallback_used", served_by_legacy(&r))
        .required("not_before_the_deadline", took >= DEADLINE)
        .required("bounded", took < DEADLINE + SLACK);
    assert_verdict(&s, Verdict::Pass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s10_a_malformed_frame_is_skipped_and_the_answer_completes() {
    let (h, r, _) = started_and_timed(first_execution_cut(
        9,
        vec![
            Step::Send(b"data: {\"event\": \"text_chunk\", \"data\": {\r\n\r\n".to_vec()),
            Step::Send(text("rest")),
            Step::Send(complete()),
            Step::Send(done_frame()),
        ],
    ))
    .await;
    let mut s = Scored::of(&r);
    let texts = r.events().iter().filter(|(e, _)| e == "message").count();
    s.required("alive_after", alive_after(&h).await)
        .advisory("recovered_in_place", texts == 10);
    assert_verdict(&s, Verdict::Pass);
    assert_eq!(
        metric(
            &h,
            "chat_sse_dropped_frames_total",
            &[("cause", "malformed")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s11_a_stream_without_done_is_finalised_at_once_with_usage() {
    let (_h, r, took) = started_and_timed(runtime_script(|_| {
        Reply::sse(vec![Step::Send(text("the answer")), Step::Send(complete())])
    }))
    .await;
    let mut s = Scored::of(&r);
    let usage = r
        .events()
        .last()
        .and_then(|(_, data)| serde_json::from_str::<Value>(data).ok())
        .map(|done| done["usage"]["tokens"] == 12);
    s.required("prompt_finalise", took < SLACK)
        .advisory("usage_reported", usage == Some(true));
    assert_verdict(&s, Verdict::Pass);
}

/// A runtime that refuses the chat with a 400 of `code`, which asking again cannot change: the
/// response, scored so far on the runtime being asked once.
async fn refused_for_good(code: &'static str) -> (Scored, Response) {
    let (h, r, _) = started_and_timed(runtime_script(move |_| refusal(400, code, None))).await;
    let mut s = Scored::of(&r);
    s.required("no_same_model_retry", h.runtime.work().len() == 1);
    (s, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s12_a_context_length_refusal_is_not_repeated_and_legacy_answers() {
    let (mut s, r) = refused_for_good("context_length_exceeded").await;
    s.required("fallback_used", served_by_legacy(&r));
    assert_verdict(&s, Verdict::Pass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s13_a_content_filter_refusal_is_routed_around_through_legacy() {
    let (mut s, _) = refused_for_good("content_policy_violation").await;
    // The ideal is the runtime's own error; legacy (which applies its own policy) answers
    // instead, which failoverbench scores as routing around the rejection.
    s.advisory("ideal_error", !s.rescued);
    assert_verdict(&s, Verdict::Partial);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s15_a_flapping_runtime_is_served_around_then_returned_to() {
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = down.clone();
    let h = Harness::new()
        .runtime(move |req: &Received| {
            if flag.load(Ordering::SeqCst) {
                refusal(503, "overloaded", None)
            } else {
                healthy_runtime(req)
            }
        })
        .config(|c| {
            c.runtime.response_timeout_ms = DEADLINE.as_millis() as u64;
            c.breaker.min_requests = 3;
        })
        .start()
        .await;
    let mut s = Scored::default();
    let mut served_during_outage = true;
    for _ in 0..5 {
        let (r, took) = timed_chat(&h).await;
        served_during_outage &=
            Scored::of(&r).rescued && r.header("x-execution-mode") == Some(DIRECT);
        s.required("no_hang", took < SLACK);
    }
    let breaker_opened = metric(
        &h,
        "chat_runtime_breaker_transitions_total",
        &[("from", "closed"), ("to", "open")],
    ) >= 1.0;
    let runtime_attempts_while_open = h.runtime.work().len();
    down.store(false, Ordering::SeqCst);
    let recovered_at = Instant::now();
    let mut recovered = None;
    while recovered_at.elapsed() < Duration::from_secs(5) {
        let r = h.chat("org-a").send().await;
        if r.header("x-execution-mode") == Some(RT) && Scored::of(&r).rescued {
            recovered = Some(recovered_at.elapsed());
            s.rescued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.required("served_during_outage", served_during_outage)
        .required("breaker_opened", breaker_opened)
        .required(
            "recovered",
            recovered.is_some_and(|t| t < Duration::from_secs(4)),
        )
        .advisory("probe_discipline", runtime_attempts_while_open <= 4);
    assert_verdict(&s, Verdict::Pass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s16_a_failover_is_accounted_to_legacy_and_not_as_a_runtime_success() {
    let (h, r, _) = started_and_timed(runtime_script(|_| refusal(503, "overloaded", None))).await;
    let mut s = Scored::of(&r);
    let done = r
        .events()
        .last()
        .and_then(|(_, data)| serde_json::from_str::<Value>(data).ok())
        .unwrap_or_default();
    recorded(&h, 1, 1).await;
    s.required(
        "reports_fallback",
        done["executionMode"] == DIRECT && served_by_legacy(&r),
    )
    .required(
        "not_a_runtime_success",
        metric(&h, "chat_execution_success_total", &[("mode", RT)]) == 0.0
            && metric(&h, "chat_execution_error_total", &[("mode", RT)]) == 1.0,
    )
    .required(
        "legacy_counted",
        metric(&h, "chat_execution_success_total", &[("mode", DIRECT)]) == 1.0,
    )
    .required("bounded_attempts", h.runtime.work().len() == 1);
    assert_verdict(&s, Verdict::Pass);
}
