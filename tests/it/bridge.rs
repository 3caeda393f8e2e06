//! The conversation bridge's client against a fake legacy API on loopback: lookups, the cache,
//! refusals and outages, unsafe ids, saves made exactly once (late answers, lost answers, an API
//! that goes down and comes back, the saves of one chat in order), session create and delete.

// Not the Harness: these drive the bridge client itself against the fake Chat API, with no proxy.
use crate::support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cutover_proxy::core::bridge::{AssistantMessage, BridgeError, Route, Verdict};
use cutover_proxy::core::config::Config;
use cutover_proxy::core::identity::Caller;
use cutover_proxy::state::metrics::Metrics;
use cutover_proxy::upstream::bridge::{Bridge, BridgeMetrics, Credentials, Persisted, Target};
use serde_json::json;
use support::legacy::{FakeLegacy, Fault, LegacyRoute};
use support::token;

/// The bridge series of one metrics instance shared by this file's tests, which read counters
/// before and after what they drive.
fn bridge_metrics() -> &'static BridgeMetrics {
    static METRICS: OnceLock<&'static Metrics> = OnceLock::new();
    &METRICS
        .get_or_init(|| Metrics::leak_on(prometheus::Registry::new()))
        .bridge
}

fn target_with(legacy: &FakeLegacy, extra: &str) -> Target {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:1\"\n[legacy]\naddress = \"{}\"\nconnect_timeout_ms = 300\n\
         [runtime]\naddress = \"127.0.0.1:2\"\n[bridge]\ntimeout_ms = 300\n{extra}",
        legacy.address()
    );
    Target::of(&Config::parse(&text).unwrap())
}

fn target(legacy: &FakeLegacy) -> Target {
    target_with(legacy, "")
}

fn bridge(target: &Target) -> Arc<Bridge> {
    Arc::new(
        Bridge::new(&target.config, bridge_metrics()).with_retry_backoff(Duration::from_millis(20)),
    )
}

/// Legacy's id for a save it settled within the chat's wait (else fail, expecting `what`).
#[track_caller]
fn saved_id(saved: Persisted, what: &str) -> String {
    match saved {
        Persisted::Saved(id) => id,
        other => panic!("expected {what}, got {other:?}"),
    }
}

/// A save not settled within the chat's wait (else fail, expecting `what`): the proxy's own id
/// for `done`, and the retry that settles it.
#[track_caller]
fn deferred(
    saved: Persisted,
    what: &str,
) -> (String, tokio::task::JoinHandle<Result<String, BridgeError>>) {
    match saved {
        Persisted::Deferred { message_id, retry } => (message_id, retry),
        other => panic!("expected {what}, got {other:?}"),
    }
}

/// The seeded fake legacy, a target on it, and a bridge counting in the shared series.
async fn seeded() -> (FakeLegacy, Target, Arc<Bridge>) {
    let legacy = FakeLegacy::seeded().await;
    let t = target(&legacy);
    let b = bridge(&t);
    (legacy, t, b)
}

/// A bridge with series of its own, for a test that counts exactly.
fn counted(target: &Target) -> (Arc<Bridge>, &'static BridgeMetrics) {
    let metrics = &Metrics::leak_on(prometheus::Registry::new()).bridge;
    let b = Bridge::new(&target.config, metrics).with_retry_backoff(Duration::from_millis(20));
    (Arc::new(b), metrics)
}

fn who(org: &str) -> Credentials {
    let caller = Caller {
        org_id: org.into(),
        user_id: Some("user-1".into()),
    };
    Credentials::new(&format!("Bearer {}", token(org)), Some("req-7"), &caller)
}

/// Save `message` as org-a's answer in `s-1`, to follow the message `m-3`.
async fn save_answer(b: &Arc<Bridge>, t: &Target, message: AssistantMessage) -> Persisted {
    b.persist_assistant(t, &who("org-a"), "s-1", message, Some("m-3".into()))
        .await
}

/// Save org-a's message `content` in `s-1`, to follow the message `after`.
async fn save_user(b: &Arc<Bridge>, t: &Target, content: &str, after: Option<String>) -> Persisted {
    b.persist_user(t, &who("org-a"), "s-1", content, None, after)
        .await
}

fn requests(route: &str, result: &str) -> u64 {
    bridge_metrics()
        .requests_total
        .with_label_values(&[route, result])
        .get()
}

fn assert_refused(r: Result<impl std::fmt::Debug, BridgeError>, route: Route, status: Option<u16>) {
    match r {
        Err(BridgeError::Refused {
            route: r,
            status: s,
            ..
        }) => assert_eq!((r, s), (route, status)),
        other => panic!("expected {route:?} refused with {status:?}, got {other:?}"),
    }
}

fn assert_unavailable(r: Result<impl std::fmt::Debug, BridgeError>, route: Route) {
    match r {
        Err(e @ BridgeError::Unavailable { .. }) => {
            assert_eq!(e.route(), route, "{e}");
            assert_eq!(e.reason(), "bridge_unavailable");
        }
        other => panic!("expected {route:?} unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn session_lookup_reads_agent_settings_and_history_with_the_caller_s_headers() {
    let (legacy, t, b) = seeded().await;
    let ok_before = requests("messages", "ok");

    let c = b.lookup_session(&t, &who("org-a"), "s-1").await.unwrap();
    assert_eq!(c.agent_id, "ag-1");
    assert_eq!(c.agent.name, "Helper");
    assert_eq!(c.agent.system_prompt, "Be brief.");
    assert_eq!(c.agent.model.as_deref(), Some("gpt-4o"));
    assert_eq!(c.agent.temperature, Some(0.2));
    assert_eq!(c.agent.max_tokens, Some(1000));
    let history: Vec<(&str, &str)> = c
        .history
        .iter()
        .map(|m| (m.role.as_str(), m.content.as_str()))
        .collect();
    assert_eq!(
        history,
        [
            ("user", "first"),
            ("assistant", "second"),
            ("user", "third")
        ]
    );
    assert!(requests("messages", "ok") > ok_before);

    let got = legacy.received();
    let mut paths: Vec<&str> = got.iter().map(|r| r.path.as_str()).collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/api/v1/agents/ag-1",
            "/api/v1/sessions/s-1",
            "/api/v1/sessions/s-1/messages"
        ]
    );
    let token = format!("Bearer {}", token("org-a"));
    for r in &got {
        assert_eq!(r.method, "GET");
        assert_eq!(
            r.header("authorization"),
            Some(token.as_str()),
            "{}",
            r.path
        );
        assert_eq!(r.header("x-request-id"), Some("req-7"), "{}", r.path);
        assert_eq!(r.header("x-cutover-bridge"), Some("1"), "{}", r.path);
    }
}

#[tokio::test]
async fn history_keeps_room_for_the_current_message() {
    let legacy = FakeLegacy::seeded().await;
    for i in 0..5 {
        legacy.add_message("s-1", "user", &format!("more {i}"));
    }
    // A conversation of 3: the last 2 saved, and the current message the request adds.
    let t = target_with(&legacy, "history_limit = 3\n");
    let c = bridge(&t)
        .lookup_session(&t, &who("org-a"), "s-1")
        .await
        .unwrap();
    let contents: Vec<&str> = c.history.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, ["more 3", "more 4"]);
    assert_eq!(
        c.last_message_id.as_deref(),
        legacy.messages("s-1").last().unwrap()["id"].as_str()
    );
    let t = target_with(&legacy, "history_limit = 1\n");
    let c = bridge(&t)
        .lookup_session(&t, &who("org-a"), "s-1")
        .await
        .unwrap();
    assert!(c.history.is_empty(), "{:?}", c.history);
}

#[tokio::test]
async fn the_history_is_read_while_the_session_is_looked_up() {
    let (legacy, t, b) = seeded().await;
    // Both take 200 ms: one after the other they would take 400.
    legacy.fail(
        LegacyRoute::GetSession,
        Fault::Slow(Duration::from_millis(200)),
    );
    legacy.fail(
        LegacyRoute::GetMessages,
        Fault::Slow(Duration::from_millis(200)),
    );
    let started = Instant::now();
    let c = b.lookup_session(&t, &who("org-a"), "s-1").await.unwrap();
    let took = started.elapsed();
    assert_eq!(c.history.len(), 3);
    assert!(
        took < Duration::from_millis(390),
        "one after the other: {took:?}"
    );
}

#[tokio::test]
async fn second_lookup_takes_agent_id_and_settings_from_the_cache() {
    let (legacy, t, b) = seeded().await;
    let first = b.lookup_session(&t, &who("org-a"), "s-1").await.unwrap();
    assert_eq!(legacy.count(), 3);
    let hits = bridge_metrics()
        .cache_hits_total
        .with_label_values(&["session"])
        .get();

    legacy.add_message("s-1", "assistant", "fourth");
    let second = b.lookup_session(&t, &who("org-a"), "s-1").await.unwrap();
    // Only the history is read again: it changes with every message.
    assert_eq!(legacy.count(), 4);
    assert_eq!(legacy.received()[3].path, "/api/v1/sessions/s-1/messages");
    assert_eq!(second.agent, first.agent);
    assert_eq!(second.history.last().unwrap().content, "fourth");
    assert!(
        bridge_metrics()
            .cache_hits_total
            .with_label_values(&["session"])
            .get()
            > hits
    );

    // A /chat/start lookup of a cached agent asks legacy nothing.
    let start = b.lookup_start(&t, &who("org-a"), "ag-1").await.unwrap();
    assert_eq!(start.agent, first.agent);
    assert!(start.history.is_empty());
    assert_eq!(legacy.count(), 4);
}

#[tokio::test]
async fn cache_does_not_answer_another_org_or_outlive_its_ttl() {
    let legacy = FakeLegacy::seeded().await;
    let t = target_with(&legacy, "cache_ttl_ms = 0\n");
    let b = bridge(&t);
    b.lookup_start(&t, &who("org-a"), "ag-1").await.unwrap();
    b.lookup_start(&t, &who("org-a"), "ag-1").await.unwrap();
    assert_eq!(legacy.count(), 2, "a zero TTL caches nothing");

    let t = target(&legacy);
    let b = bridge(&t);
    b.lookup_start(&t, &who("org-a"), "ag-1").await.unwrap();
    // org-b may not read org-a's agent, cached or not.
    let r = b.lookup_start(&t, &who("org-b"), "ag-1").await;
    assert_refused(r, Route::Agent, Some(404));
}

#[tokio::test]
async fn another_org_s_session_is_refused() {
    let legacy = FakeLegacy::seeded().await;
    let t = target(&legacy);
    let before = requests("session", "refused");
    let r = bridge(&t).lookup_session(&t, &who("org-b"), "s-1").await;
    let e = r.as_ref().unwrap_err();
    assert_eq!(e.reason(), "bridge_refused");
    assert_eq!(e.verdict(), Verdict::Refused);
    assert_refused(r, Route::Session, Some(404));
    assert!(requests("session", "refused") > before);
    // The history went out with the session's lookup; the agent is never asked.
    let paths: Vec<String> = legacy.received().into_iter().map(|r| r.path).collect();
    assert!(!paths.iter().any(|p| p.contains("/agents/")), "{paths:?}");
}

#[tokio::test]
async fn missing_token_and_forbidden_are_refused() {
    let (legacy, t, b) = seeded().await;
    let mut anonymous = who("org-a");
    anonymous.authorization = String::new();
    assert_refused(
        b.lookup_session(&t, &anonymous, "s-1").await,
        Route::Session,
        Some(401),
    );

    legacy.fail(LegacyRoute::GetAgent, Fault::Status(403));
    assert_refused(
        b.lookup_session(&t, &who("org-a"), "s-1").await,
        Route::Agent,
        Some(403),
    );
    legacy.fail(LegacyRoute::GetMessages, Fault::Status(422));
    legacy.heal(LegacyRoute::GetAgent);
    assert_refused(
        b.lookup_session(&t, &who("org-a"), "s-1").await,
        Route::Messages,
        Some(422),
    );
}

#[tokio::test]
async fn server_errors_and_unusable_answers_are_unavailable() {
    let (legacy, t, b) = seeded().await;
    let before = requests("session", "unavailable");
    legacy.fail(LegacyRoute::GetSession, Fault::Status(503));
    assert_unavailable(
        b.lookup_session(&t, &who("org-a"), "s-1").await,
        Route::Session,
    );
    assert!(requests("session", "unavailable") > before);

    // A 5xx on one of the concurrent reads fails the lookup too.
    legacy.heal(LegacyRoute::GetSession);
    legacy.fail(LegacyRoute::GetMessages, Fault::Status(500));
    assert_unavailable(
        b.lookup_session(&t, &who("org-a"), "s-1").await,
        Route::Messages,
    );

    // A 2xx that is not `{"success":true,"data":...}`.
    let html = support::Upstream::start(|_| support::Reply {
        fixed_body: Some(b"<html>maintenance</html>".to_vec()),
        ..support::Reply::json(200, json!(null))
    })
    .await;
    let mut t2 = t.clone();
    t2.address = html.address();
    assert_unavailable(
        bridge(&t2).lookup_session(&t2, &who("org-a"), "s-1").await,
        Route::Session,
    );
}

#[tokio::test]
async fn a_hanging_legacy_is_unavailable_within_the_timeout() {
    let legacy = FakeLegacy::seeded().await;
    let t = target(&legacy);
    legacy.fail(LegacyRoute::GetSession, Fault::Hang);
    let started = Instant::now();
    let r = bridge(&t).lookup_session(&t, &who("org-a"), "s-1").await;
    let took = started.elapsed();
    assert_unavailable(r, Route::Session);
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

#[tokio::test]
async fn a_closed_port_is_unavailable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let legacy = FakeLegacy::seeded().await;
    let mut t = target(&legacy);
    t.address = addr.to_string();
    assert_unavailable(
        bridge(&t).lookup_session(&t, &who("org-a"), "s-1").await,
        Route::Session,
    );
}

#[tokio::test]
async fn unsafe_ids_never_reach_legacy() {
    let (legacy, t, b) = seeded().await;
    let before = requests("session", "invalid_id");
    for bad in [
        "..",
        ".",
        "a%2Fb",
        "%2F..%2F..%2Fadmin",
        "",
        "s-1/../../admin",
        "s-1?x",
    ] {
        let r = b.lookup_session(&t, &who("org-a"), bad).await;
        assert_refused(r, Route::Session, None);
        assert_refused(
            b.lookup_start(&t, &who("org-a"), bad).await,
            Route::Agent,
            None,
        );
        assert_refused(
            b.save_message(&t, &who("org-a"), bad, b"{}").await,
            Route::SaveMessage,
            None,
        );
        assert_refused(
            b.delete_session(&t, &who("org-a"), bad).await,
            Route::DeleteSession,
            None,
        );
        assert_refused(
            b.create_session(&t, &who("org-a"), bad, "hi").await,
            Route::CreateSession,
            None,
        );
    }
    assert_eq!(legacy.count(), 0, "{:?}", legacy.received());
    assert!(requests("session", "invalid_id") >= before + 7);

    // An agent id legacy hands back is checked before it goes into the agent URL.
    legacy.add_session("org-a", "s-evil", "../../admin");
    let r = b.lookup_session(&t, &who("org-a"), "s-evil").await;
    assert_unavailable(r, Route::Session);
    assert!(
        legacy.received().iter().all(|r| !r.path.contains("..")),
        "{:?}",
        legacy.received()
    );
}

#[tokio::test]
async fn messages_are_saved_and_their_ids_returned() {
    let (legacy, t, b) = seeded().await;
    let user = cutover_proxy::core::bridge::user_message_body("hello", Some("m-3"));
    let id = b
        .save_message(&t, &who("org-a"), "s-1", &user)
        .await
        .unwrap();
    let saved = save_answer(
        &b,
        &t,
        AssistantMessage::new("", "streamed text", Some(9), 120),
    )
    .await;
    let assistant_id = saved_id(saved, "a saved message");
    let stored = legacy.messages("s-1");
    assert_eq!(stored.len(), 5);
    assert_eq!(
        stored[3],
        json!({"role": "user", "content": "hello", "parentId": "m-3", "id": id})
    );
    assert_eq!(
        stored[4],
        json!({"role": "assistant", "content": "streamed text", "id": assistant_id,
               "metadata": {"executionMode": "runtime_orchestrator", "tokensUsed": 9, "latencyMs": 120}})
    );
    let post = &legacy.received()[1];
    assert_eq!(post.method, "POST");
    assert_eq!(post.path, "/api/v1/sessions/s-1/messages");
    assert_eq!(post.header("content-type"), Some("application/json"));
    assert_eq!(post.header("x-cutover-bridge"), Some("1"));
}

/// The session's messages with this content.
fn rows(legacy: &FakeLegacy, content: &str) -> Vec<serde_json::Value> {
    legacy
        .messages("s-1")
        .into_iter()
        .filter(|m| m["content"] == content)
        .collect()
}

/// Legacy holds `content` once, under `id`.
#[track_caller]
fn assert_saved_once(legacy: &FakeLegacy, content: &str, id: &str) {
    let rows = rows(legacy, content);
    assert_eq!(rows.len(), 1, "{content}: {rows:?}");
    assert_eq!(rows[0]["id"], id, "{content}");
}

/// A bridge with one retry window (`persist_retry_secs`).
fn windowed(legacy: &FakeLegacy, secs: u64) -> (Target, Arc<Bridge>, &'static BridgeMetrics) {
    let t = target_with(legacy, &format!("persist_retry_secs = {secs}\n"));
    let (b, metrics) = counted(&t);
    (t, b, metrics)
}

#[tokio::test]
async fn a_failed_save_is_read_back_then_sent_again() {
    let legacy = FakeLegacy::seeded().await;
    let t = target(&legacy);
    let (b, metrics) = counted(&t);
    // A 5xx may come after the row was written: each is followed by a read-back.
    legacy.fail(LegacyRoute::PostMessage, Fault::StatusTimes(503, 2));
    let saved = save_answer(&b, &t, AssistantMessage::new("answer", "", None, 5)).await;
    let (message_id, retry) = deferred(saved, "a deferred save");
    assert_eq!(message_id.len(), 36, "{message_id} is not a UUID");
    let id = retry.await.unwrap().expect("third attempt saves it");
    assert_saved_once(&legacy, "answer", &id);
    assert_eq!(legacy.calls(LegacyRoute::PostMessage), 3);
    assert_eq!(
        legacy.calls(LegacyRoute::GetMessages),
        2,
        "a read-back after each 503"
    );
    assert_eq!(metrics.persist_failures_total.get(), 0);
    assert_eq!(metrics.persist_pending.get(), 0);
    assert_eq!(
        metrics
            .requests_total
            .with_label_values(&["read_back", "ok"])
            .get(),
        2
    );
    assert_eq!(b.pending_saves(), 0);
}

#[tokio::test]
async fn a_save_answered_late_is_saved_once_under_legacy_s_id() {
    let (legacy, t, b) = seeded().await;
    // Slower than timeout_ms (300), within the wait for the answer (twice that).
    legacy.fail_next(
        LegacyRoute::PostMessage,
        Fault::Slow(Duration::from_millis(450)),
    );
    let saved = save_answer(&b, &t, AssistantMessage::new("late", "", None, 5)).await;
    let id = saved_id(saved, "legacy's id");
    assert_saved_once(&legacy, "late", &id);

    // Slower than the wait: done would name a proxy-made id, and the answer that comes later
    // settles it: still one row, and no second attempt.
    legacy.fail_next(
        LegacyRoute::PostMessage,
        Fault::Slow(Duration::from_millis(900)),
    );
    let saved = save_answer(&b, &t, AssistantMessage::new("later", "", None, 5)).await;
    let (message_id, retry) = deferred(saved, "a deferred save");
    let id = retry.await.unwrap().expect("the late answer settles it");
    assert_ne!(id, message_id);
    assert_saved_once(&legacy, "later", &id);
    assert_eq!(
        legacy.calls(LegacyRoute::PostMessage),
        2,
        "one attempt each"
    );
}

#[tokio::test]
async fn a_save_whose_answer_was_lost_is_found_by_the_read_back() {
    let (legacy, t, b) = seeded().await;
    // The same words as an earlier message: only what came after the chat began counts.
    legacy.add_message("s-1", "user", "again");
    let before = legacy.messages("s-1").last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    legacy.fail_next(LegacyRoute::PostMessage, Fault::SaveThenDrop);
    let saved = save_user(&b, &t, "again", Some(before.clone())).await;
    let id = saved_id(saved, "the id the read-back found");
    let again = rows(&legacy, "again");
    assert_eq!(again.len(), 2, "the earlier one and this one: {again:?}");
    assert_eq!(again[1]["id"], id.as_str());
    assert_ne!(id, before);
    assert_eq!(legacy.calls(LegacyRoute::PostMessage), 1, "not sent twice");
}

#[tokio::test]
async fn a_save_lives_through_legacy_going_down_and_coming_back() {
    let (legacy, t, b) = seeded().await;
    // The user's message: legacy goes down as it is saved (connection refused), for a while
    // (the ten seconds of a restart, made short), then comes back with the same data.
    legacy.stop();
    let saved = save_user(&b, &t, "through the restart", Some("m-3".into())).await;
    let (_, retry) = deferred(saved, "a deferred save");
    assert_eq!(b.pending_saves(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!retry.is_finished(), "still retrying while legacy is down");
    legacy.restart().await;
    let id = tokio::time::timeout(Duration::from_secs(10), retry)
        .await
        .expect("saved once legacy is back")
        .unwrap()
        .unwrap();
    let saved = rows(&legacy, "through the restart");
    assert_eq!(saved.len(), 1);
    assert_eq!(saved[0]["id"], id.as_str());
    assert_eq!(b.pending_saves(), 0);
}

#[tokio::test]
async fn a_rate_limited_save_is_sent_again_without_a_read_back() {
    let (legacy, t, b) = seeded().await;
    legacy.fail(LegacyRoute::PostMessage, Fault::StatusTimes(429, 1));
    let saved = save_user(&b, &t, "slow down", Some("m-3".into())).await;
    let (_, retry) = deferred(saved, "a deferred save");
    retry.await.unwrap().unwrap();
    assert_eq!(rows(&legacy, "slow down").len(), 1);
    assert_eq!(legacy.calls(LegacyRoute::PostMessage), 2);
    assert_eq!(
        legacy.calls(LegacyRoute::GetMessages),
        0,
        "a 429 is a known outcome"
    );
}

#[tokio::test]
async fn the_saves_of_one_chat_reach_legacy_in_order() {
    let (legacy, t, b) = seeded().await;
    // The user's message is answered after 1 s: the first event stops waiting for it after
    // 300 ms, the answer's save after another 600.
    legacy.fail_next(
        LegacyRoute::PostMessage,
        Fault::Slow(Duration::from_millis(1000)),
    );
    let user = save_user(&b, &t, "question", Some("m-3".into())).await;
    assert!(matches!(user, Persisted::Deferred { .. }), "{user:?}");
    let answer = save_answer(&b, &t, AssistantMessage::new("its answer", "", None, 7)).await;
    let (_, retry) = deferred(answer, "the answer to wait for its question");
    retry.await.unwrap().unwrap();
    let contents: Vec<serde_json::Value> = legacy.messages("s-1")[3..]
        .iter()
        .map(|m| m["content"].clone())
        .collect();
    assert_eq!(contents, [json!("question"), json!("its answer")]);
    // Another chat's save does not wait for this one.
    let mut other = who("org-a");
    other.request_id = Some("req-8".into());
    legacy.fail_next(
        LegacyRoute::PostMessage,
        Fault::Slow(Duration::from_millis(1000)),
    );
    let _slow = save_user(&b, &t, "slow", None).await;
    let quick = b.persist_user(&t, &other, "s-1", "quick", None, None).await;
    assert!(matches!(quick, Persisted::Saved(_)), "{quick:?}");
}

/// Log lines written by this test binary.
fn captured_logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    let logs = LOGS.get_or_init(|| Mutex::new(Vec::new()));
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        struct W;
        impl Write for W {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                captured_logs().lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(|| W)
            .with_max_level(tracing::Level::WARN)
            .init();
    });
    logs
}

/// The error line holding `content`.
fn error_line(content: &str) -> serde_json::Value {
    let text = String::from_utf8(captured_logs().lock().unwrap().clone()).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["level"] == "ERROR" && l["content"] == content)
        .unwrap_or_else(|| panic!("no error line with the message in {text}"))
}

#[tokio::test]
async fn a_save_that_never_succeeds_is_logged_whole_and_counted() {
    let _logs = captured_logs();
    let legacy = FakeLegacy::seeded().await;
    let (t, b, metrics) = windowed(&legacy, 1);
    legacy.fail(LegacyRoute::PostMessage, Fault::Hang);
    let content = "the whole answer, 多字节 and \"quotes\"";
    let started = Instant::now();
    let saved = save_answer(&b, &t, AssistantMessage::new(content, "", Some(3), 42)).await;
    let first_took = started.elapsed();
    // The answer's wait: twice timeout_ms.
    assert!(first_took >= Duration::from_millis(590), "{first_took:?}");
    assert!(first_took < Duration::from_millis(1000), "{first_took:?}");
    let (_, retry) = deferred(saved, "a deferred save");
    assert_unavailable(retry.await.unwrap(), Route::SaveMessage);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the window is 1 s"
    );
    // An attempt that never answered is never simply sent again.
    assert_eq!(legacy.calls(LegacyRoute::PostMessage), 1);
    assert_eq!(metrics.persist_failures_total.get(), 1);

    let line = error_line(content);
    assert_eq!(line["session_id"], "s-1");
    assert_eq!(line["role"], "assistant");
    assert_eq!(line["tokens_used"], 3);
    assert_eq!(line["latency_ms"], 42);
    assert_eq!(line["request_id"], "req-7");
}

#[tokio::test]
async fn saves_pending_at_shutdown_are_logged_whole() {
    let _logs = captured_logs();
    let legacy = FakeLegacy::seeded().await;
    let t = target(&legacy);
    let (b, metrics) = counted(&t);
    legacy.stop();
    let saved = b
        .persist_user(
            &t,
            &who("org-a"),
            "s-1",
            "pending at exit",
            Some("m-3"),
            None,
        )
        .await;
    assert!(matches!(saved, Persisted::Deferred { .. }), "{saved:?}");
    assert_eq!(metrics.persist_pending.get(), 1);
    assert_eq!(b.log_pending_saves(), 1);
    assert_eq!(b.pending_saves(), 0);
    assert_eq!(metrics.persist_failures_total.get(), 1);
    assert_eq!(metrics.persist_pending.get(), 0);
    let line = error_line("pending at exit");
    assert_eq!(line["role"], "user");
    assert_eq!(line["parent_id"], "m-3");
    assert_eq!(line["session_id"], "s-1");
}

#[tokio::test]
async fn a_refused_save_is_not_retried() {
    let (legacy, t, b) = seeded().await;
    let saved = b
        .persist_assistant(
            &t,
            &who("org-b"),
            "s-1",
            AssistantMessage::new("x", "", None, 1),
            None,
        )
        .await;
    let (_, retry) = deferred(saved, "a deferred save");
    assert_refused(retry.await.unwrap(), Route::SaveMessage, Some(404));
    assert_eq!(
        legacy.count(),
        1,
        "one attempt: another would be refused too"
    );
}

#[tokio::test]
async fn sessions_are_created_with_a_title_and_deleted() {
    let (legacy, t, b) = seeded().await;
    let message = "x".repeat(60);
    let id = b
        .create_session(&t, &who("org-a"), "ag-1", &message)
        .await
        .unwrap();
    let (org, agent, title) = legacy.session(&id).expect("session stored");
    assert_eq!((org.as_str(), agent.as_str()), ("org-a", "ag-1"));
    assert_eq!(title, "x".repeat(50));
    let create = &legacy.received()[0];
    assert_eq!(
        (create.method.as_str(), create.path.as_str()),
        ("POST", "/api/v1/sessions")
    );
    assert_eq!(
        create.json(),
        json!({"agentId": "ag-1", "title": "x".repeat(50)})
    );

    // Another org cannot delete it; its owner can.
    assert_refused(
        b.delete_session(&t, &who("org-b"), &id).await,
        Route::DeleteSession,
        Some(404),
    );
    assert!(legacy.session(&id).is_some());
    b.delete_session(&t, &who("org-a"), &id).await.unwrap();
    assert!(legacy.session(&id).is_none());
    let delete = legacy.received().pop().unwrap();
    assert_eq!(delete.method, "DELETE");
    assert_eq!(delete.path, format!("/api/v1/sessions/{id}"));

    // Another org's agent makes no session.
    assert_refused(
        b.create_session(&t, &who("org-b"), "ag-1", "hi").await,
        Route::CreateSession,
        Some(404),
    );
}

#[tokio::test]
async fn calls_reuse_pooled_connections() {
    let (legacy, t, b) = seeded().await;
    for _ in 0..3 {
        b.lookup_start(&t, &who("org-b"), "ag-b").await.unwrap();
        b.delete_session(&t, &who("org-a"), "nope")
            .await
            .unwrap_err();
    }
    assert_eq!(legacy.count(), 4, "agent cached after the first read");
    assert_eq!(legacy.upstream.connections(), 1);
}
