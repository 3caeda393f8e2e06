//! The rollout tools beyond the allowlist, end to end: `runtime_percent` (sticky per org),
//! `direct_orgs` (the denylist, which wins over everything), and `shadow_percent` (a background
//! copy of direct_llm chats to the runtime that never touches the client's answer or the breaker).

use crate::support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_proxy::app::LocalServer;
use cutover_proxy::core::breaker::State;
use cutover_proxy::core::config::{Config, Mode};
use cutover_proxy::core::routing::org_bucket;
use serde_json::{json, Value};
use support::*;

fn shadow_count(server: &LocalServer, outcome: &str) -> u64 {
    counter(&server.shared.metrics.shadow_total, outcome)
}

fn shadow_in_flight(server: &LocalServer) -> usize {
    server.shared.shadow_in_flight.load(Ordering::SeqCst)
}

/// A chat with a short body as `org` in `session`, which legacy answers for `reason`.
async fn answered_by_legacy(server: &LocalServer, org: Option<&str>, session: &str, reason: &str) {
    let r = chat(server.proxy_addr, org, session, r#"{"message":"x"}"#).await;
    assert_legacy_answer(&r, reason);
}

/// `support::config` with its allowlist emptied, then `f` applied.
fn rollout(f: impl FnOnce(&mut Config)) -> impl FnOnce(&mut Config) {
    move |c| {
        c.rollout.runtime_orgs.clear();
        f(c);
        c.validate().unwrap();
    }
}

fn mode_reason(r: &Response) -> (String, String) {
    (
        r.header("x-execution-mode").unwrap_or("").to_string(),
        r.header("x-execution-reason").unwrap_or("").to_string(),
    )
}

async fn ask(server: &LocalServer, org: Option<&str>) -> (String, String) {
    let r = chat(server.proxy_addr, org, "s-rollout", HI).await;
    assert_eq!(r.status, 200);
    assert!(r.complete);
    let names: Vec<String> = r.events().into_iter().map(|(e, _)| e).collect();
    assert_eq!(names, ["message", "done"]);
    mode_reason(&r)
}

fn pair(mode: &str, reason: &str) -> (String, String) {
    (mode.to_string(), reason.to_string())
}

/// The legacy answer of `echo_legacy`, whole.
fn assert_legacy_answer(r: &Response, reason: &str) {
    assert_eq!(r.status, 200);
    assert_eq!(mode_reason(r), pair(DIRECT, reason));
    assert!(r.complete, "legacy answer cut short");
    let events = r.events();
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names, ["message", "done"], "{events:?}");
    assert!(events[0].1.contains("\"legacy\""), "{events:?}");
    assert!(events[1].1.contains("direct_llm"), "{events:?}");
}

async fn window(server: &LocalServer) -> Value {
    let (status, body) = admin(server, "GET", "/runtime/metrics", None).await;
    assert_eq!(status, 200);
    body["data"].clone()
}

// ---- runtime_percent and direct_orgs ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_percent_moves_about_half_of_the_orgs_each_one_sticky() {
    let h = Harness::new()
        .config(rollout(|c| c.rollout.runtime_percent = 50.0))
        .start()
        .await;

    let orgs: Vec<String> = (0..200).map(|i| format!("tenant-{i:04}")).collect();
    let mut first = HashMap::new();
    for org in &orgs {
        let got = ask(&h, Some(org)).await;
        // The assignment is the documented stable bucket, the same on every replica.
        let expected = if org_bucket(org) < 5_000 {
            pair(RT, "percent")
        } else {
            pair(DIRECT, "default")
        };
        assert_eq!(got, expected, "{org}");
        first.insert(org.clone(), got);
    }
    let moved = first.values().filter(|(m, _)| m == RT).count();
    assert!(
        (70..=130).contains(&moved),
        "{moved} of 200 orgs moved at 50 %"
    );

    // The same org gets the same mode on every request.
    for org in orgs.iter().take(40) {
        for _ in 0..3 {
            assert_eq!(ask(&h, Some(org)).await, first[org], "{org} flapped");
        }
    }

    // The runtime saw exactly the moved orgs, legacy the others.
    let runtime_orgs: std::collections::HashSet<String> = h
        .runtime
        .work()
        .iter()
        .map(|r| r.json()["org_id"].as_str().unwrap().to_string())
        .collect();
    let moved_orgs: std::collections::HashSet<String> = first
        .iter()
        .filter(|(_, (m, _))| m == RT)
        .map(|(o, _)| o.clone())
        .collect();
    assert_eq!(runtime_orgs, moved_orgs);
    assert_eq!(h.shared.breaker.state(), State::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_orgs_win_over_the_allowlist_the_percentage_and_default_mode() {
    let org_ids = |h: &Running| -> Vec<String> {
        h.runtime
            .work()
            .iter()
            .map(|r| r.json()["org_id"].as_str().unwrap().to_string())
            .collect()
    };
    // Everyone is moved by default; org-x is on both lists, org-y only on the denylist.
    let h = Harness::new()
        .config(rollout(|c| {
            c.rollout.default_mode = Mode::RuntimeOrchestrator;
            c.rollout.runtime_orgs = vec!["org-x".into(), "org-a".into()];
            c.rollout.direct_orgs = vec!["org-x".into(), "org-y".into()];
        }))
        .start()
        .await;
    assert_eq!(ask(&h, Some("org-x")).await, pair(DIRECT, "denylist"));
    assert_eq!(ask(&h, Some("org-y")).await, pair(DIRECT, "denylist"));
    assert_eq!(ask(&h, Some("org-a")).await, pair(RT, "allowlist"));
    assert_eq!(ask(&h, Some("org-z")).await, pair(RT, "default"));
    assert_eq!(ask(&h, None).await, pair(DIRECT, "no_identity"));
    let mut reached = org_ids(&h);
    drop(h);

    // And over runtime_percent = 100.
    let h = Harness::new()
        .config(rollout(|c| {
            c.rollout.runtime_percent = 100.0;
            c.rollout.direct_orgs = vec!["org-y".into()];
        }))
        .start()
        .await;
    assert_eq!(ask(&h, Some("org-y")).await, pair(DIRECT, "denylist"));
    assert_eq!(ask(&h, Some("org-z")).await, pair(RT, "percent"));

    reached.extend(org_ids(&h));
    assert!(
        !reached.iter().any(|o| o == "org-x" || o == "org-y"),
        "a denylisted org reached the runtime: {reached:?}"
    );
}

// ---- shadow_percent ----

/// A runtime whose executions stream one event, then wait for `release()`, then complete.
fn held_runtime(req: &Received) -> Reply {
    if req.path == "/health" {
        return healthy_runtime(req);
    }
    Reply::sse(vec![
        Step::Send(frame("text_chunk", json!({"content": "shadow"}))),
        Step::WaitRelease,
        Step::Send(frame(
            "execution_complete",
            json!({"final_response": "shadow"}),
        )),
        Step::Send(done_frame()),
    ])
}

/// Release held executions until `cond` holds (a release can come before a stream waits).
async fn release_until(
    runtime: &Upstream,
    within: Duration,
    mut cond: impl FnMut() -> bool,
) -> bool {
    let held = until(within, || {
        let done = cond();
        if !done {
            runtime.release();
        }
        std::future::ready(done.then_some(()).ok_or(()))
    })
    .await;
    held.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_copy_never_delays_the_legacy_answer_and_its_outcome_is_recorded() {
    let h = Harness::new()
        .runtime(held_runtime)
        .config(rollout(|c| c.rollout.shadow_percent = 100.0))
        .start()
        .await;
    let success0 = shadow_count(&h, "success");
    let events0 = h.shared.metrics.shadow_events_total.get();
    let executions0 = h
        .shared
        .metrics
        .execution_total
        .with_label_values(&[RT])
        .get();

    let body = r#"{"message":"shadow me","parentMessageId":"m-9"}"#;
    let t = Instant::now();
    let r = chat(h.proxy_addr, Some("org-b"), "s-shadow", body).await;
    let took = t.elapsed();

    // The client got the legacy answer, whole, while the shadow runtime is still held.
    assert_legacy_answer(&r, "default");
    assert!(took < Duration::from_secs(2), "legacy answer took {took:?}");
    let sent = h.legacy.work();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].body, body.as_bytes(), "legacy got a different body");

    // The runtime got a proper runtime request for the same chat.
    h.runtime.wait_for_work(1).await;
    let copy = &h.runtime.work()[0];
    assert_eq!(copy.method, "POST");
    assert_eq!(copy.path, "/api/v1/execute/stream");
    assert_eq!(
        copy.json(),
        json!({
            "session_id": "s-shadow", "agent_id": TEST_AGENT, "org_id": "org-b",
            "user_message": "shadow me", "history_messages": [],
            "agent_config": {"system_prompt": "", "temperature": 0.7, "max_tokens": 4096},
            "metadata": {"user_id": "user-1", "parent_message_id": "m-9"}
        })
    );
    assert_eq!(
        copy.header("x-cutover-shadow"),
        Some("1"),
        "the runtime cannot tell a copy from a real execution"
    );
    assert_eq!(
        shadow_count(&h, "success"),
        success0,
        "shadow finished while held"
    );
    assert_eq!(shadow_in_flight(&h), 1);

    // Released, the shadow completes and is recorded as such, apart from real executions.
    assert!(
        release_until(&h.runtime, Duration::from_secs(5), || shadow_count(
            &h, "success"
        ) == success0 + 1)
        .await,
        "shadow outcome not recorded"
    );
    assert!(eventually(Duration::from_secs(1), || shadow_in_flight(&h) == 0).await);
    assert_eq!(h.shared.metrics.shadow_events_total.get(), events0 + 2);
    assert_eq!(
        h.shared
            .metrics
            .execution_total
            .with_label_values(&[RT])
            .get(),
        executions0,
        "a shadow copy was counted as a runtime execution"
    );
    let w = window(&h).await;
    assert_eq!(w["runtime"]["total"], 0, "{w}");
    assert_eq!(w["direct"]["total"], 1, "{w}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_failures_never_open_the_breaker() {
    let n = Arc::new(AtomicUsize::new(0));
    let calls = n.clone();
    // Every execution fails: a 500, or an execution_error event, in turn.
    let h = Harness::new()
        .runtime(runtime_answering(move |_: &Received| {
            if calls.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
                Reply::json(500, json!({"detail": "boom"}))
            } else {
                Reply::sse(vec![
                    Step::Send(frame(
                        "execution_error",
                        json!({"error": "kaput", "code": "E_TOOL"}),
                    )),
                    Step::Send(done_frame()),
                ])
            }
        }))
        .config(rollout(|c| c.rollout.shadow_percent = 100.0))
        .start()
        .await;
    let min_requests = h.shared.snapshot().config.breaker.min_requests as usize;
    let copies = min_requests + 6;
    let errors0 = shadow_count(&h, "error");

    for i in 0..copies {
        answered_by_legacy(&h, Some("org-b"), &format!("s-fail-{i}"), "default").await;
    }
    assert!(
        eventually(Duration::from_secs(5), || shadow_count(&h, "error")
            == errors0 + copies as u64)
        .await,
        "shadow errors not recorded: {} of {copies}",
        shadow_count(&h, "error") - errors0
    );
    assert_eq!(n.load(Ordering::SeqCst), copies);

    // 100 % of the shadow copies failed, well past min_requests: the breaker did not move.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.shared.breaker.state(), State::Closed);
    let (status, body) = admin(&h, "GET", "/runtime/fallback/status", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["state"], "closed", "{body}");
    assert_eq!(body["data"]["fallbackEnabled"], false, "{body}");
    let w = window(&h).await;
    assert_eq!(w["runtime"]["total"], 0, "{w}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_copies_beyond_max_inflight_are_skipped() {
    let h = Harness::new()
        .runtime(held_runtime)
        .config(rollout(|c| {
            c.rollout.shadow_percent = 100.0;
            c.rollout.shadow_max_inflight = 2;
        }))
        .start()
        .await;
    let skipped0 = shadow_count(&h, "skipped");
    let success0 = shadow_count(&h, "success");

    for i in 0..5 {
        answered_by_legacy(&h, Some("org-b"), &format!("s-bound-{i}"), "default").await;
    }
    h.runtime.wait_for_work(2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        h.runtime.work().len(),
        2,
        "more copies in flight than the bound"
    );
    assert_eq!(shadow_count(&h, "skipped"), skipped0 + 3);
    assert_eq!(shadow_in_flight(&h), 2);
    assert_eq!(h.legacy.work().len(), 5);

    assert!(
        release_until(&h.runtime, Duration::from_secs(5), || shadow_count(
            &h, "success"
        ) == success0 + 2)
        .await
    );
    assert!(eventually(Duration::from_secs(1), || shadow_in_flight(&h) == 0).await);

    // Room again: the next copy goes out.
    answered_by_legacy(&h, Some("org-b"), "s-bound-after", "default").await;
    h.runtime.wait_for_work(3).await;
    assert_eq!(shadow_count(&h, "skipped"), skipped0 + 3);
    release_until(&h.runtime, Duration::from_secs(5), || {
        shadow_count(&h, "success") == success0 + 3
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_direct_llm_chats_of_verified_orgs_off_the_denylist_are_shadowed() {
    let h = Harness::new()
        .config(rollout(|c| {
            c.rollout.shadow_percent = 100.0;
            c.rollout.runtime_orgs = vec!["org-a".into()];
            c.rollout.direct_orgs = vec!["org-d".into()];
        }))
        .start()
        .await;
    let org_ids = |runtime: &Upstream| -> Vec<String> {
        runtime
            .work()
            .iter()
            .map(|r| r.json()["org_id"].as_str().unwrap_or("").to_string())
            .collect()
    };

    // A denylisted org must stay off the runtime entirely, copies included.
    answered_by_legacy(&h, Some("org-d"), "s-deny", "denylist").await;
    // Unverified callers have no org to send.
    answered_by_legacy(&h, None, "s-anon", "no_identity").await;
    // An org already on the runtime is executed once, not copied as well.
    assert_eq!(ask(&h, Some("org-a")).await, pair(RT, "allowlist"));
    // The control: an ordinary direct_llm org is copied.
    answered_by_legacy(&h, Some("org-b"), "s-ok", "default").await;
    h.runtime.wait_for_work(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(org_ids(&h.runtime), ["org-a", "org-b"]);

    // While the breaker keeps the runtime out, nothing is copied to it.
    let (status, _) = admin(&h, "POST", "/runtime/fallback/trip", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
    answered_by_legacy(&h, Some("org-b"), "s-tripped", "breaker_open").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(org_ids(&h.runtime), ["org-a", "org-b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_timeouts_are_judged_like_relayed_streams() {
    // s-complete: execution_complete, then silence without [DONE]; s-silent: silence only.
    let h = Harness::new()
        .runtime(runtime_answering(|req: &Received| {
            let mut steps = vec![Step::Send(frame("text_chunk", json!({"content": "x"})))];
            if req.json()["session_id"] == "s-complete" {
                steps.push(Step::Send(frame(
                    "execution_complete",
                    json!({"final_response": "x"}),
                )));
            }
            steps.push(Step::Hang);
            Reply::sse(steps)
        }))
        .config(rollout(|c| {
            c.rollout.shadow_percent = 100.0;
            c.runtime.execution_timeout_ms = 400;
            c.runtime.commit_timeout_ms = Some(0);
        }))
        .start()
        .await;
    let (success0, timeout0) = (shadow_count(&h, "success"), shadow_count(&h, "timeout"));

    for (session, outcome, was, why) in [
        (
            "s-complete",
            "success",
            success0,
            "a completed execution whose [DONE] never came is a success",
        ),
        (
            "s-silent",
            "timeout",
            timeout0,
            "an execution past execution_timeout_ms is a timeout",
        ),
    ] {
        answered_by_legacy(&h, Some("org-b"), session, "default").await;
        assert!(
            eventually(Duration::from_secs(3), || shadow_count(&h, outcome)
                == was + 1)
            .await,
            "{why}"
        );
    }
    assert!(eventually(Duration::from_secs(1), || shadow_in_flight(&h) == 0).await);
    assert_eq!(h.shared.breaker.state(), State::Closed);
}
