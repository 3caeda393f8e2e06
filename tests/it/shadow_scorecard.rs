//! The shadow scorecard end to end: each shadow copy compared with the legacy answer the client
//! got, per org, on `GET /runtime/shadow[/{orgId}]` and `cutover_shadow_*`, without the client's
//! legacy stream changing by a byte.

use crate::support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

/// Shadow every chat of `org-s`, and call an org ready after `min` comparisons.
fn shadowing(min: u64) -> impl FnOnce(&mut cutover_proxy::core::config::Config) {
    move |c| {
        c.rollout.shadow_orgs = vec!["org-s".into()];
        c.shadow.ready_min_samples = min;
    }
}

/// Poll `GET /runtime/shadow/{org}` until it holds `n` samples; its `data`.
async fn scorecard(h: &Running, org: &str, n: u64) -> Value {
    let got = until(Duration::from_secs(10), || async {
        let (status, body) = h.admin("GET", &format!("/runtime/shadow/{org}")).await;
        if status == 200 && body["data"]["samples"].as_u64() >= Some(n) {
            Ok(body["data"].clone())
        } else {
            Err((status, body))
        }
    })
    .await;
    got.unwrap_or_else(|(status, body)| panic!("{org}: {n} samples not reached: {status} {body}"))
}

async fn chats(h: &Running, org: &str, n: usize) {
    for i in 0..n {
        let r = h.chat(org).session(&format!("s-{org}-{i}")).send().await;
        assert_served(&r, DIRECT, "default");
    }
}

fn comparisons(h: &Running, result: &str, org: &str) -> f64 {
    metric(
        h,
        "cutover_shadow_comparisons_total",
        &[("result", result), ("org", org)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_org_whose_copies_succeed_becomes_ready() {
    let h = Harness::new()
        .config(shadowing(5))
        // Both first events are a loopback millisecond or two apart: the ratio is the slow
        // runtime test's subject, not this one's. Five clean comparisons bound the runtime's
        // error rate at 0.35 (one-sided 95 %): the delta lets that read as ready.
        .config(|c| {
            c.shadow.ready_max_ttfe_ratio = 1000.0;
            c.shadow.ready_max_error_rate_delta = 0.5;
        })
        .start()
        .await;
    let (status, body) = h.admin("GET", "/runtime/shadow/org-s").await;
    assert_eq!(status, 404, "an org never compared is unknown: {body}");
    assert_eq!(body["success"], false);

    chats(&h, "org-s", 4).await;
    let s = scorecard(&h, "org-s", 4).await;
    assert_eq!(s["verdict"], "insufficient", "{s}");
    assert_eq!(s["reasons"], json!(["4 samples < ready_min_samples 5"]));

    chats(&h, "org-s", 1).await;
    let s = scorecard(&h, "org-s", 5).await;
    assert_eq!(s["orgId"], "org-s");
    assert_eq!(s["verdict"], "ready", "{s}");
    assert_eq!(s["reasons"], json!([]));
    assert_eq!(s["agreement"], 1.0);
    assert_eq!(s["legacy"]["success"], 5);
    assert_eq!(s["legacy"]["error"], 0);
    assert_eq!(
        (
            &s["runtime"]["success"],
            &s["runtime"]["error"],
            &s["runtime"]["timeout"]
        ),
        (&json!(5), &json!(0), &json!(0))
    );
    // echo_legacy says "legacy", the healthy runtime "hi".
    assert_eq!(s["legacy"]["textCharsP50"], 6);
    assert_eq!(s["runtime"]["textCharsP50"], 2);
    for side in ["legacy", "runtime"] {
        for key in ["ttfeMsP50", "durationMsP50"] {
            assert!(
                s[side][key].as_f64().is_some_and(|v| v > 0.0),
                "{side}.{key}: {s}"
            );
        }
    }
    // The list holds the same object.
    let (status, all) = h.admin("GET", "/runtime/shadow").await;
    assert_eq!(status, 200);
    assert_eq!(all["success"], true);
    assert_eq!(all["data"]["orgs"], json!([s]));
    assert_eq!(comparisons(&h, "both_ok", "org-s"), 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_org_whose_copies_fail_is_not_ready_for_its_error_rate() {
    let h = Harness::new()
        .config(shadowing(4))
        .runtime(runtime_answering(|_: &Received| {
            Reply::sse(vec![
                Step::Send(frame("text_chunk", json!({"content": "par"}))),
                Step::Send(frame(
                    "execution_error",
                    json!({"error": "kaput", "code": "E_TOOL"}),
                )),
                Step::Send(done_frame()),
            ])
        }))
        .start()
        .await;
    chats(&h, "org-s", 4).await;
    let s = scorecard(&h, "org-s", 4).await;
    assert_eq!(s["verdict"], "not_ready", "{s}");
    let reasons: Vec<&str> = s["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r
            .starts_with("runtime error rate 1.00 > legacy 0.00 + 0.02 (95 % bound: at least +")),
        "{s}"
    );
    assert_eq!(s["agreement"], 0.0);
    assert_eq!(s["runtime"]["error"], 4);
    assert_eq!(s["legacy"]["success"], 4);
    assert_eq!(comparisons(&h, "runtime_failed", "org-s"), 4.0);
    assert_eq!(
        h.server.shared.breaker.state(),
        cutover_proxy::core::breaker::State::Closed,
        "shadow failures never reach the breaker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_slow_to_its_first_event_trips_the_ttfe_ratio() {
    let h = Harness::new()
        .config(shadowing(3))
        .runtime(runtime_answering(|_: &Received| {
            let mut steps = vec![Step::Sleep(Duration::from_millis(400))];
            steps.extend(runtime_ok_steps());
            Reply::sse(steps)
        }))
        .start()
        .await;
    chats(&h, "org-s", 3).await;
    let s = scorecard(&h, "org-s", 3).await;
    assert_eq!(s["verdict"], "not_ready", "{s}");
    let reasons = s["reasons"].as_array().unwrap();
    assert_eq!(reasons.len(), 1, "only the ttfe is off: {s}");
    let reason = reasons[0].as_str().unwrap();
    assert!(
        reason.starts_with("runtime ttfe p50 ") && reason.contains("ms > 2 x legacy"),
        "{reason}"
    );
    assert!(s["runtime"]["ttfeMsP50"].as_f64().unwrap() >= 400.0, "{s}");
    assert_eq!(s["runtime"]["success"], 3);
}

/// A legacy answer in several writes, with a frame far beyond what the observer keeps, an
/// `error`, then `done` (the source product's legacy still sends `done` after an error).
fn rich_legacy(req: &Received) -> Reply {
    if !(req.method == "POST" && req.path.starts_with("/api/v1/chat/")) {
        return echo_legacy(req);
    }
    let text = |id: usize, content: &str| {
        format!(
            "event: message\ndata: {}\n\n",
            json!({"id": format!("l{id}"), "type": "text", "data": {"content": content}})
        )
        .into_bytes()
    };
    let big = "x".repeat(200 * 1024);
    let mut huge = text(1, &big);
    let tail = huge.split_off(70_000);
    Reply::sse(vec![
        Step::Send(text(0, "Legacy 你好")),
        Step::Sleep(Duration::from_millis(5)),
        Step::Send(huge),
        Step::Send(tail),
        Step::Send(b"event: error\ndata: {\"code\":\"LLM_ERROR\",\"message\":\"no\"}\n\n".to_vec()),
        Step::Send(b"event: done\ndata: {\"executionMode\":\"direct_llm\"}\n\n".to_vec()),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_legacy_stream_is_byte_identical_with_and_without_a_shadow() {
    let h = Harness::new()
        .legacy(rich_legacy)
        .config(shadowing(1))
        .start()
        .await;
    let body = r#"{"message":"same question"}"#;
    let shadowed = h.chat("org-s").session("s-same").body(body).send().await;
    let plain = h.chat("org-p").session("s-same").body(body).send().await;
    assert_served(&shadowed, DIRECT, "default");
    assert_served(&plain, DIRECT, "default");
    assert!(plain.body().len() > 200 * 1024);
    assert!(
        shadowed.body() == plain.body(),
        "the shadowed client got other bytes ({} vs {})",
        shadowed.body().len(),
        plain.body().len()
    );
    assert_eq!(h.runtime.work().len(), 1, "only org-s was copied");

    let s = scorecard(&h, "org-s", 1).await;
    // The error on the way fails legacy even though `done` followed; the oversized frame was
    // counted as an event but not read.
    assert_eq!(s["legacy"]["error"], 1, "{s}");
    assert_eq!(s["legacy"]["success"], 0, "{s}");
    assert_eq!(s["legacy"]["textCharsP50"], 9, "{s}");
    assert_eq!(s["runtime"]["success"], 1, "{s}");
    assert_eq!(comparisons(&h, "legacy_failed", "org-s"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scorecard_keeps_at_most_max_tracked_orgs() {
    let h = Harness::new()
        .config(|c| {
            c.rollout.shadow_percent = 100.0;
            c.limits.max_tracked_orgs = 3;
        })
        .start()
        .await;
    let orgs: Vec<String> = (0..8).map(|i| format!("tenant-{i}")).collect();
    for org in &orgs {
        chats(&h, org, 1).await;
    }
    let compared = eventually(Duration::from_secs(10), || {
        comparisons(&h, "both_ok", "") == orgs.len() as f64
    })
    .await;
    assert!(compared, "{} comparisons", comparisons(&h, "both_ok", ""));
    let (status, all) = h.admin("GET", "/runtime/shadow").await;
    assert_eq!(status, 200);
    let listed = all["data"]["orgs"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "{all}");
    assert_eq!(h.server.shared.scorecard.lock().unwrap().org_count(), 3);
    let mut unknown = 0;
    for org in &orgs {
        let (status, _) = h.admin("GET", &format!("/runtime/shadow/{org}")).await;
        assert!(status == 200 || status == 404);
        unknown += usize::from(status == 404);
    }
    assert_eq!(unknown, 5, "evicted orgs read as unknown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_shadow_orgs_series_carry_their_org() {
    let h = Harness::new()
        .config(shadowing(1))
        .config(|c| c.rollout.shadow_percent = 100.0)
        .start()
        .await;
    // A shadow org's series exist at 0 before its first comparison, so `rate()` sees the first.
    let text = String::from_utf8(h.metrics().render()).unwrap();
    for result in ["both_ok", "runtime_failed", "legacy_failed", "both_failed"] {
        let line =
            format!("cutover_shadow_comparisons_total{{org=\"org-s\",result=\"{result}\"}} 0");
        assert!(text.lines().any(|l| l == line), "{line} not exported");
    }
    chats(&h, "org-s", 2).await;
    chats(&h, "org-other", 1).await;
    scorecard(&h, "org-s", 2).await;
    scorecard(&h, "org-other", 1).await;
    assert_eq!(comparisons(&h, "both_ok", "org-s"), 2.0);
    assert_eq!(comparisons(&h, "both_ok", ""), 1.0);
    let ttfe = |path, org| {
        metric(
            &h,
            "cutover_shadow_ttfe_seconds",
            &[("path", path), ("org", org)],
        )
    };
    assert_eq!(
        (ttfe("legacy", "org-s"), ttfe("runtime", "org-s")),
        (2.0, 2.0)
    );
    assert_eq!((ttfe("legacy", ""), ttfe("runtime", "")), (1.0, 1.0));
    let text = String::from_utf8(h.metrics().render()).unwrap();
    let shadow_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("cutover_shadow_"))
        .collect();
    assert!(shadow_lines.iter().any(|l| l.contains("org=\"org-s\"")));
    assert!(
        shadow_lines.iter().all(|l| !l.contains("org-other")),
        "an org not on shadow_orgs got a label"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_abandons_legacy_records_no_comparison() {
    let h = Harness::new()
        .legacy(|req| {
            if !(req.method == "POST" && req.path.starts_with("/api/v1/chat/")) {
                return echo_legacy(req);
            }
            Reply::sse(vec![
                Step::Send(
                    b"event: message\ndata: {\"type\":\"text\",\"data\":{\"content\":\"a\"}}\n\n"
                        .to_vec(),
                ),
                Step::Hang,
            ])
        })
        .config(shadowing(1))
        .start()
        .await;
    let mut c = Client::connect(h.proxy_addr).await;
    c.post_chat(Some("org-s"), "s-gone", HI.as_bytes()).await;
    h.runtime.wait_for_work(1).await;
    drop(c);
    let gone = eventually(Duration::from_secs(10), || {
        metric(
            &h,
            "cutover_shadow_unpaired_total",
            &[("cause", "client_gone")],
        ) == 1.0
    })
    .await;
    assert!(gone, "the abandoned legacy half was not settled");
    // The copy finishes too, and still nothing is compared.
    assert!(
        eventually(Duration::from_secs(5), || {
            h.server
                .shared
                .shadow_in_flight
                .load(std::sync::atomic::Ordering::SeqCst)
                == 0
        })
        .await
    );
    let (status, _) = h.admin("GET", "/runtime/shadow/org-s").await;
    assert_eq!(status, 404);
    for result in ["both_ok", "runtime_failed", "legacy_failed", "both_failed"] {
        assert_eq!(comparisons(&h, result, "org-s"), 0.0, "{result}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_conversation_cannot_be_read_records_no_comparison() {
    // With the bridge on, a copy reads its conversation from legacy first; org-b has session
    // s-b, not s-missing.
    let legacy = legacy::FakeLegacy::seeded().await;
    let h = Harness::new()
        .bridged(legacy)
        .config(move |c| {
            c.runtime.default_agent_id = String::new();
            c.rollout.shadow_orgs = vec!["org-b".into()];
            c.shadow.ready_min_samples = 1;
        })
        .start()
        .await;
    let skipped = || {
        metric(
            &h,
            "cutover_shadow_unpaired_total",
            &[("cause", "copy_skipped")],
        )
    };

    let r = chat(h.proxy_addr, Some("org-b"), "s-b", HI).await;
    assert_served(&r, DIRECT, "default");
    let r = chat(h.proxy_addr, Some("org-b"), "s-missing", HI).await;
    assert_served(&r, DIRECT, "default");
    assert!(
        eventually(Duration::from_secs(10), || skipped() == 1.0).await,
        "the skipped copy was not counted"
    );
    let compared = eventually(Duration::from_secs(10), || {
        h.shared.scorecard.lock().unwrap().held("org-b") == 1
    })
    .await;
    assert!(compared, "the copy of s-b was not compared");
    let (status, body) = admin(&h, "GET", "/runtime/shadow/org-b", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["samples"], 1, "{body}");
    assert_eq!(
        h.runtime.work().len(),
        1,
        "only the readable conversation reached the runtime"
    );
    assert_eq!(skipped(), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_org_added_to_shadow_orgs_by_a_reload_is_shadowed_from_its_next_chat() {
    let h = Harness::new().start().await;
    chats(&h, "org-s", 1).await;
    assert_eq!(h.runtime.work().len(), 0, "nothing is shadowed by default");

    let mut cfg = h.server.shared.snapshot().config.clone();
    cfg.rollout.shadow_orgs = vec!["org-s".into()];
    cfg.validate().unwrap();
    h.server.shared.apply(cfg);
    let text = String::from_utf8(h.metrics().render()).unwrap();
    assert!(
        text.contains(
            "cutover_shadow_comparisons_total{org=\"org-s\",result=\"runtime_failed\"} 0"
        ),
        "the reloaded shadow org's series are not exported at 0"
    );

    chats(&h, "org-s", 1).await;
    let s = scorecard(&h, "org-s", 1).await;
    assert_eq!(
        (&s["legacy"]["success"], &s["runtime"]["success"]),
        (&json!(1), &json!(1)),
        "{s}"
    );
    assert_eq!(comparisons(&h, "both_ok", "org-s"), 1.0);
}

/// Agent2UI events compressed in `coding`, flushed after each so each is its own piece, as a
/// compressor flushed per event sends them.
fn compressed(coding: &str, events: &[Vec<u8>]) -> Vec<Vec<u8>> {
    use std::io::Write;
    let mut pieces = Vec::new();
    match coding {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            for ev in events {
                e.write_all(ev).unwrap();
                e.flush().unwrap();
                pieces.push(std::mem::take(e.get_mut()));
            }
            pieces.last_mut().unwrap().extend(e.finish().unwrap());
        }
        "br" => {
            let mut e = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
            for ev in events {
                e.write_all(ev).unwrap();
                e.flush().unwrap();
                pieces.push(std::mem::take(e.get_mut()));
            }
            pieces.last_mut().unwrap().extend(e.into_inner());
        }
        other => panic!("no encoder for {other}"),
    }
    pieces
}

fn message(kind: &str, content: &str) -> Vec<u8> {
    format!(
        "event: message\ndata: {}\n\n",
        json!({"id": format!("l-{kind}"), "type": kind, "data": {"content": content}})
    )
    .into_bytes()
}

/// A legacy whose chats answer in `coding` (as Express `compression()` does for a browser): a
/// `thinking` event, a pause, then the text and `done`.
fn compressing_legacy(coding: &'static str) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    move |req: &Received| {
        if !req.path.starts_with("/api/v1/chat/") {
            return echo_legacy(req);
        }
        let events = [
            message("thinking", "正在分析您的问题..."),
            [
                message("text", "Legacy answer"),
                b"event: done\ndata: {\"executionMode\":\"direct_llm\"}\n\n".to_vec(),
            ]
            .concat(),
        ];
        let pieces = if coding == "zstd" {
            vec![b"(zstd bytes)".to_vec(), b"(more)".to_vec()]
        } else {
            compressed(coding, &events)
        };
        let mut reply = Reply::sse(vec![
            Step::Send(pieces[0].clone()),
            Step::Sleep(Duration::from_millis(150)),
            Step::Send(pieces[1].clone()),
        ]);
        reply
            .headers
            .push(("content-encoding".into(), coding.into()));
        reply
    }
}

/// A runtime that thinks for 150 ms before its first content.
fn planning_runtime(req: &Received) -> Reply {
    if req.path == "/health" {
        return Reply::json(200, json!({"status": "ok"}));
    }
    Reply::sse(vec![
        Step::Send(frame(
            "thinking",
            json!({"content": "planning", "stage": "planning"}),
        )),
        Step::Sleep(Duration::from_millis(150)),
        Step::Send(frame("text_chunk", json!({"content": "Runtime answer"}))),
        Step::Send(frame(
            "execution_complete",
            json!({"final_response": "Runtime answer"}),
        )),
        Step::Send(done_frame()),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_legacy_answer_is_read_decoded_and_timed_to_its_first_content() {
    for coding in ["gzip", "br"] {
        let h = Harness::new()
            .legacy(compressing_legacy(coding))
            .runtime(planning_runtime)
            .config(shadowing(2))
            .config(|c| c.legacy.chat_identity_encoding = false)
            .start()
            .await;
        for i in 0..2 {
            let auth = format!("Bearer {}", token("org-s"));
            let r = request(
                h.proxy_addr,
                "POST",
                &format!("/api/v1/chat/sessions/s-{coding}-{i}"),
                &[
                    ("content-type", "application/json"),
                    ("accept-encoding", "gzip, deflate, br"),
                    ("authorization", auth.as_str()),
                ],
                HI.as_bytes(),
            )
            .await;
            assert_served(&r, DIRECT, "default");
            assert_eq!(r.header("content-encoding"), Some(coding));
            // The client's stream is legacy's, byte for byte: compressed, as it came.
            let sent: Vec<u8> = compressing_legacy(coding)(&h.legacy.work()[0])
                .steps
                .into_iter()
                .filter_map(|s| match s {
                    Step::Send(b) => Some(b),
                    _ => None,
                })
                .flatten()
                .collect();
            assert_eq!(r.body(), sent, "{coding}");
        }
        let s = scorecard(&h, "org-s", 2).await;
        assert_eq!(s["legacy"]["success"], 2, "{coding}: {s}");
        assert_eq!(s["legacy"]["error"], 0, "{coding}: {s}");
        assert_eq!(
            s["legacy"]["textCharsP50"], 13.0,
            "{coding}: decoded text {s}"
        );
        assert_eq!(s["runtime"]["success"], 2, "{coding}: {s}");
        assert_eq!(s["agreement"], 1.0, "{coding}: {s}");
        // Time to first content, on both sides: the thinking events do not count.
        for side in ["legacy", "runtime"] {
            let ttfc = s[side]["ttfeMsP50"].as_f64().unwrap();
            assert!(ttfc >= 150.0, "{coding} {side}: {ttfc} ms: {s}");
        }
        assert_eq!(comparisons(&h, "both_ok", "org-s"), 2.0, "{coding}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_answer_in_a_coding_it_cannot_read_is_not_compared() {
    let h = Harness::new()
        .legacy(compressing_legacy("zstd"))
        .config(shadowing(1))
        .config(|c| c.legacy.chat_identity_encoding = false)
        .start()
        .await;
    let r = h.chat("org-s").session("s-zstd").send().await;
    assert_served(&r, DIRECT, "default");
    let unreadable = || {
        metric(
            &h,
            "cutover_shadow_unpaired_total",
            &[("cause", "legacy_undecodable")],
        )
    };
    assert!(eventually(Duration::from_secs(10), || unreadable() == 1.0).await);
    let (status, _) = h.admin("GET", "/runtime/shadow/org-s").await;
    assert_eq!(
        status, 404,
        "no sample for a legacy answer it could not read"
    );
    assert_eq!(comparisons(&h, "legacy_failed", "org-s"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_asks_the_question_once_when_legacy_saved_it_first() {
    // Legacy saves the user's message before it answers: the copy may find it in the history it
    // reads, and must not send the runtime the question twice.
    let legacy = legacy::FakeLegacy::seeded().await;
    legacy.add_message("s-b", "user", "earlier");
    legacy.add_message("s-b", "assistant", "reply");
    legacy.add_message("s-b", "user", "hi");
    let h = Harness::new()
        .bridged(legacy)
        .config(|c| c.rollout.shadow_orgs = vec!["org-b".into()])
        .start()
        .await;
    let r = chat(h.proxy_addr, Some("org-b"), "s-b", HI).await;
    assert_served(&r, DIRECT, "default");
    h.runtime.wait_for_work(1).await;
    assert_eq!(
        h.runtime.work()[0].json()["history_messages"],
        json!([{"role": "user", "content": "earlier"},
               {"role": "assistant", "content": "reply"},
               {"role": "user", "content": "hi"}])
    );
    assert!(
        h.legacy
            .received()
            .iter()
            .filter(|r| !r.path.starts_with("/api/v1/chat/"))
            .all(|r| r.method == "GET"),
        "a copy never writes"
    );
}
