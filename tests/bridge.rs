//! The conversation bridge's client against a fake legacy API on loopback: lookups, the cache,
//! refusals and outages, unsafe ids, saves with background retries, session create and delete.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cutover_proxy::core::bridge::{AssistantMessage, BridgeError, Route, Verdict};
use cutover_proxy::core::config::Config;
use cutover_proxy::core::identity::Caller;
use cutover_proxy::ops::metrics::{BridgeMetrics, Metrics};
use cutover_proxy::runtime::bridge::{Bridge, Credentials, Persisted, Target};
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

fn who(org: &str) -> Credentials {
    let caller = Caller {
        org_id: org.into(),
        user_id: Some("user-1".into()),
    };
    Credentials::new(&format!("Bearer {}", token(org)), Some("req-7"), &caller)
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
    let legacy = FakeLegacy::seeded().await;
    let t = target(&legacy);
    let b = bridge(&t);
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
async fn history_is_cut_to_the_last_history_limit() {
    let legacy = FakeLegacy::seeded().await;
    for i in 0..5 {
        legacy.add_message("s-1", "user", &format!("more {i}"));
    }
    let t = target_with(&legacy, "history_limit = 2\n");
    let c = bridge(&t)
        .lookup_session(&t, &who("org-a"), "s-1")
        .await
        .unwrap();
    let contents: Vec<&str> = c.history.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, ["more 3", "more 4"]);
}

#[tokio::test]
async fn second_lookup_takes_agent_id_and_settings_from_the_cache() {
    let legacy = FakeLegacy::seeded().await;
    let t = target(&legacy);
    let b = bridge(&t);
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
    assert_eq!(
        legacy.count(),
        1,
        "nothing read after the session was refused"
    );
}

#[tokio::test]
async fn missing_token_and_forbidden_are_refused() {
    let legacy = FakeLegacy::seeded().await;
    let t = target(&legacy);
    let b = bridge(&t);
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
    let legacy = FakeLegacy::seeded().await;
    let t = target(&legacy);
    let b = bridge(&t);
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
    let legacy = FakeLegacy::seeded().await;
    let t = target(&legacy);
    let b = bridge(&t);
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
    assert_eq!(legacy.count(), 1);
}

#[tokio::test]
async fn messages_are_saved_and_their_ids_returned() {
    let legacy = FakeLegacy::seeded().await;
    let t = target(&legacy);
    let b = bridge(&t);
    let user = cutover_proxy::core::bridge::user_message_body("hello", Some("m-3"));
    let id = b
        .save_message(&t, &who("org-a"), "s-1", &user)
        .await
        .unwrap();
    let saved = b
        .persist_assistant(
            &t,
            &who("org-a"),
            "s-1",
            AssistantMessage::new("", "streamed text", Some(9), 120),
        )
        .await;
    let Persisted::Saved(assistant_id) = saved else {
        panic!("expected a saved message, got {saved:?}");
    };
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

#[tokio::test]
async fn a_failed_save_is_retried_in_the_background() {
    let legacy = FakeLegacy::seeded().await;
    let t = target(&legacy);
    let b = bridge(&t);
    legacy.fail(LegacyRoute::PostMessage, Fault::StatusTimes(503, 2));
    let failures = bridge_metrics().persist_failures_total.get();
    let saved = b
        .persist_assistant(
            &t,
            &who("org-a"),
            "s-1",
            AssistantMessage::new("answer", "", None, 5),
        )
        .await;
    let Persisted::Deferred { message_id, retry } = saved else {
        panic!("expected a deferred save, got {saved:?}");
    };
    assert_eq!(message_id.len(), 36, "{message_id} is not a UUID");
    let id = retry.await.unwrap().expect("third attempt saves it");
    assert_eq!(legacy.messages("s-1").last().unwrap()["id"], id.as_str());
    assert_eq!(legacy.messages("s-1").last().unwrap()["content"], "answer");
    let posts = legacy
        .received()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(posts, 3);
    assert_eq!(bridge_metrics().persist_failures_total.get(), failures);
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

#[tokio::test]
async fn a_save_that_fails_every_attempt_is_logged_whole_and_counted() {
    let logs = captured_logs();
    let legacy = FakeLegacy::seeded().await;
    let t = target(&legacy);
    let b = bridge(&t);
    legacy.fail(LegacyRoute::PostMessage, Fault::Hang);
    let failures = bridge_metrics().persist_failures_total.get();
    let content = "the whole answer, 多字节 and \"quotes\"";
    let started = Instant::now();
    let saved = b
        .persist_assistant(
            &t,
            &who("org-a"),
            "s-1",
            AssistantMessage::new(content, "", Some(3), 42),
        )
        .await;
    let first_took = started.elapsed();
    assert!(first_took < Duration::from_millis(1000), "{first_took:?}");
    let Persisted::Deferred { retry, .. } = saved else {
        panic!("expected a deferred save, got {saved:?}");
    };
    assert_unavailable(retry.await.unwrap(), Route::SaveMessage);
    let posts = legacy
        .received()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(posts, 3, "three attempts in all");
    assert_eq!(bridge_metrics().persist_failures_total.get(), failures + 1);

    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let line: serde_json::Value = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["level"] == "ERROR" && l["content"] == content)
        .unwrap_or_else(|| panic!("no error line with the message in {text}"));
    assert_eq!(line["session_id"], "s-1");
    assert_eq!(line["role"], "assistant");
}

#[tokio::test]
async fn a_refused_save_is_not_retried() {
    let legacy = FakeLegacy::seeded().await;
    let t = target(&legacy);
    let b = bridge(&t);
    let saved = b
        .persist_assistant(
            &t,
            &who("org-b"),
            "s-1",
            AssistantMessage::new("x", "", None, 1),
        )
        .await;
    let Persisted::Deferred { retry, .. } = saved else {
        panic!("expected a deferred save, got {saved:?}");
    };
    assert_refused(retry.await.unwrap(), Route::SaveMessage, Some(404));
    assert_eq!(legacy.count(), 2, "first attempt and one retry");
}

#[tokio::test]
async fn sessions_are_created_with_a_title_and_deleted() {
    let legacy = FakeLegacy::seeded().await;
    let t = target(&legacy);
    let b = bridge(&t);
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
    let legacy = FakeLegacy::seeded().await;
    let t = target(&legacy);
    let b = bridge(&t);
    for _ in 0..3 {
        b.lookup_start(&t, &who("org-b"), "ag-b").await.unwrap();
        b.delete_session(&t, &who("org-a"), "nope")
            .await
            .unwrap_err();
    }
    assert_eq!(legacy.count(), 4, "agent cached after the first read");
    assert_eq!(legacy.upstream.connections(), 1);
}
