//! Runtime chats through the conversation bridge, end to end: a fake legacy Chat API holding
//! sessions, agents and messages, and a runtime that, like the real one, answers 422 without an
//! `agent_id`. What the runtime receives, what legacy holds afterwards, what `done` says, and
//! where a chat goes when the bridge cannot help.

use crate::support;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cutover_proxy::core::config::{Config, Mode};
use serde_json::{json, Value};
use support::legacy::{FakeLegacy, Fault, LegacyRoute};
use support::*;

/// The runtime stand-in: 422 without an agent, as the real runtime answers; otherwise "Hel" +
/// "lo" streamed and `final_response` "Hello" (empty when the question is `stream only`), with a
/// token count of 42; the question `held` waits for a release before its first event. The
/// question is read as the real runtime reads it (`question_of`).
fn runtime(req: &Received) -> Reply {
    if req.path == "/health" {
        return Reply::json(200, json!({"status": "ok"}));
    }
    let body = req.json();
    if body["agent_id"].as_str().is_none_or(str::is_empty) {
        return Reply::json(
            422,
            json!({"detail": [{"loc": ["body", "agent_id"], "msg": "Field required"}]}),
        );
    }
    let question = question_of(&body);
    let answer = if question == "stream only" {
        ""
    } else {
        "Hello"
    };
    // `held`: the runtime accepts, then works on its first event until the test releases it.
    let held = question == "held";
    Reply::sse(vec![
        if held {
            Step::WaitRelease
        } else {
            Step::Sleep(Duration::ZERO)
        },
        Step::Send(frame("text_chunk", json!({"content": "Hel"}))),
        Step::Send(frame("text_chunk", json!({"content": "lo"}))),
        Step::Send(frame(
            "execution_complete",
            json!({"final_response": answer, "usage": {"total_tokens": 42}}),
        )),
        Step::Send(done_frame()),
    ])
}

/// org-a's agent `ag-1` (settings as a JSON string, as legacy stores them) and its session `s-1`
/// holding three messages; org-b's session `s-b`; org-a's session `s-odd` whose agent id could
/// not go into a URL.
async fn fake_legacy() -> FakeLegacy {
    let l = FakeLegacy::seeded().await;
    l.add_session("org-a", "s-odd", "../admin");
    l
}

/// The caller's `Authorization`, the same for the whole test run so that what legacy received
/// can be compared with what was sent.
fn bearer(org: &str) -> String {
    static EXP: OnceLock<u64> = OnceLock::new();
    let exp = *EXP.get_or_init(|| now() + 3600);
    format!(
        "Bearer {}",
        token_with(json!({"orgId": org, "userId": "user-1", "exp": exp}))
    )
}

type Setup = Running<FakeLegacy>;

/// The test config with the bridge on (300 ms per call, a conversation of 3 messages: the last 2
/// saved and the current one) and no default agent, then `tweak`.
async fn start(tweak: impl FnOnce(&mut Config) + 'static) -> Setup {
    start_with(runtime, tweak).await
}

/// `start`, with another runtime stand-in.
async fn start_with(
    runtime: impl Fn(&Received) -> Reply + Send + Sync + 'static,
    tweak: impl FnOnce(&mut Config) + 'static,
) -> Setup {
    Harness::new()
        .legacy_server(fake_legacy().await)
        .runtime(runtime)
        .config(|c| {
            c.bridge.enabled = true;
            c.bridge.timeout_ms = 300;
            c.bridge.history_limit = 3;
            c.runtime.default_agent_id = String::new();
        })
        .config(tweak)
        .start()
        .await
}

impl Running<FakeLegacy> {
    async fn post(&self, path: &str, org: &str, body: &Value, extra: &[(&str, &str)]) -> Response {
        let auth = bearer(org);
        let mut headers = vec![
            ("content-type", "application/json"),
            ("authorization", auth.as_str()),
        ];
        headers.extend_from_slice(extra);
        let body = body.to_string();
        request(
            self.server.proxy_addr,
            "POST",
            path,
            &headers,
            body.as_bytes(),
        )
        .await
    }

    async fn chat_in(&self, session: &str, org: &str, body: Value) -> Response {
        let path = format!("/api/v1/chat/sessions/{session}");
        self.post(&path, org, &body, &[]).await
    }

    /// The legacy requests that were bridge calls (not chats handed to legacy).
    fn bridge_calls(&self) -> Vec<Received> {
        self.legacy
            .received()
            .into_iter()
            .filter(|r| !r.path.starts_with("/api/v1/chat/"))
            .collect()
    }

    fn runtime_total(&self) -> u64 {
        let s = self.server.shared.stats.lock().unwrap();
        s.snapshot(Mode::RuntimeOrchestrator, Instant::now()).total
    }

    fn persist_failures(&self) -> u64 {
        self.server
            .shared
            .metrics
            .bridge
            .persist_failures_total
            .get()
    }
}

fn done_of(r: &Response) -> Value {
    let events = r.events();
    let (name, data) = events.last().expect("an event");
    assert_eq!(name, "done", "{}", r.text());
    serde_json::from_str(data).unwrap()
}

/// The chat went to legacy with its original body, for `reason`, and the runtime never saw it
/// nor was it counted against the runtime.
/// The reason a chat the bridge could not prepare goes to legacy with.
const UNAVAILABLE: &str = "bridge_unavailable";

fn chat_path(session: &str) -> String {
    format!("/api/v1/chat/sessions/{session}")
}

async fn assert_legacy_served(s: &Setup, r: &Response, reason: &str, path: &str, body: &Value) {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_served(r, DIRECT, reason);
    assert!(r.text().contains("legacy"), "{}", r.text());
    let chats: Vec<Received> = s
        .legacy
        .received()
        .into_iter()
        .filter(|q| q.path.starts_with("/api/v1/chat/"))
        .collect();
    let last = chats.last().expect("legacy served the chat");
    assert_eq!(last.path, path);
    assert_eq!(
        last.body,
        body.to_string().as_bytes(),
        "not the original body"
    );
    assert!(s.runtime.work().is_empty(), "the runtime was asked");
    recorded(&s.server, 0, chats.len() as u64).await;
    assert_eq!(s.runtime_total(), 0, "counted against the runtime");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_in_a_session_gets_its_agent_settings_and_history_and_both_messages_are_saved() {
    let s = start(|_| {}).await;
    let r = s
        .post(
            "/api/v1/chat/sessions/s-1",
            "org-a",
            &json!({"message": "fourth", "parentMessageId": "m-3"}),
            &[("x-request-id", "req-42")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_served(&r, RT, "allowlist");
    assert_eq!(event_names(&r), ["message", "message", "done"]);

    let work = s.runtime.work();
    assert_eq!(work.len(), 1);
    let sent = &work[0];
    assert_eq!(
        sent.json(),
        json!({
            "session_id": "s-1",
            "agent_id": "ag-1",
            "org_id": "org-a",
            "user_message": "fourth",
            "history_messages": [
                {"role": "assistant", "content": "second"},
                {"role": "user", "content": "third"},
                {"role": "user", "content": "fourth"}
            ],
            "agent_config": {"system_prompt": "Be brief.", "model": "gpt-4o", "temperature": 0.2, "max_tokens": 1000},
            "metadata": {"user_id": "user-1", "parent_message_id": "m-3"}
        })
    );
    assert_eq!(
        sent.header("authorization"),
        None,
        "the caller's token reached the runtime"
    );
    assert_eq!(sent.header("x-request-id"), Some("req-42"));
    let trace = sent.header("traceparent").expect("a traceparent");
    assert!(
        cutover_proxy::runtime::connection::is_valid_traceparent(trace.as_bytes()),
        "{trace}"
    );

    // Legacy holds the user's message and the answer after the history.
    let messages = s.legacy.messages("s-1");
    assert_eq!(messages.len(), 5, "{messages:?}");
    let user = &messages[3];
    assert_eq!(
        (&user["role"], &user["content"], &user["parentId"]),
        (&json!("user"), &json!("fourth"), &json!("m-3"))
    );
    let answer = &messages[4];
    assert_eq!(answer["role"], "assistant");
    assert_eq!(answer["content"], "Hello");
    let meta = &answer["metadata"];
    assert_eq!(meta["executionMode"], "runtime_orchestrator");
    assert_eq!(meta["tokensUsed"], 42);
    let latency = meta["latencyMs"].as_u64().expect("latencyMs");

    let done = done_of(&r);
    assert_eq!(done["sessionId"], "s-1");
    assert_eq!(done["messageId"], answer["id"]);
    assert_eq!(done["executionMode"], "runtime_orchestrator");
    assert_eq!(done["usage"], json!({"tokens": 42, "latencyMs": latency}));

    // Every bridge call carried the caller's own token, request id and the bridge mark.
    let calls = s.bridge_calls();
    assert_eq!(calls.len(), 5, "session, agent, history, two saves");
    let auth = bearer("org-a");
    for c in &calls {
        assert_eq!(c.header("authorization"), Some(auth.as_str()), "{}", c.path);
        assert_eq!(c.header("x-request-id"), Some("req-42"), "{}", c.path);
        assert_eq!(c.header("x-cutover-bridge"), Some("1"), "{}", c.path);
    }

    // An empty final_response saves the streamed text; a caller's traceparent passes as is.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = s
        .post(
            "/api/v1/chat/sessions/s-1",
            "org-a",
            &json!({"message": "stream only"}),
            &[("traceparent", tp)],
        )
        .await;
    assert_eq!(event_names(&r), ["message", "message", "done"]);
    let messages = s.legacy.messages("s-1");
    assert_eq!(messages.len(), 7);
    assert!(messages[5].get("parentId").is_none(), "{}", messages[5]);
    assert_eq!(messages[6]["content"], "Hello");
    assert_eq!(done_of(&r)["messageId"], messages[6]["id"]);
    let sent = &s.runtime.work()[1];
    assert_eq!(sent.header("traceparent"), Some(tp));
    // The conversation the runtime gets is the last two saved, then this message.
    assert_eq!(
        sent.json()["history_messages"],
        json!([{"role": "user", "content": "fourth"}, {"role": "assistant", "content": "Hello"},
               {"role": "user", "content": "stream only"}])
    );
    // A request id is made when the caller sent none, the same for legacy and the runtime.
    let made = sent.header("x-request-id").expect("a request id");
    assert!(s
        .bridge_calls()
        .iter()
        .skip(5)
        .all(|c| c.header("x-request-id") == Some(made)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_turn_s_own_question_reaches_the_runtime() {
    // This runtime answers with the question it understood, reading the conversation as the real
    // one does: a turn whose history ended with the previous answer would be answered with the
    // previous question.
    let s = start_with(healthy_runtime_with_agent, |_| {}).await;
    for turn in [
        "turn one: what is Q3 revenue?",
        "turn two: and Q4?",
        "turn three: and 2025?",
    ] {
        let r = s.chat_in("s-1", "org-a", json!({"message": turn})).await;
        assert_served(&r, RT, "allowlist");
        let text: String = r
            .events()
            .iter()
            .filter(|(name, _)| name == "message")
            .map(|(_, d)| serde_json::from_str::<Value>(d).unwrap()["data"]["content"].clone())
            .filter_map(|c| c.as_str().map(str::to_string))
            .collect();
        assert_eq!(text, turn, "{}", r.text());
        let saved = s.legacy.messages("s-1");
        assert_eq!(saved[saved.len() - 2]["content"], turn);
        assert_eq!(saved[saved.len() - 1]["content"], turn, "the answer saved");
    }
    let last = s.runtime.work().last().unwrap().json();
    assert_eq!(
        last["history_messages"],
        json!([{"role": "user", "content": "turn two: and Q4?"},
               {"role": "assistant", "content": "turn two: and Q4?"},
               {"role": "user", "content": "turn three: and 2025?"}])
    );
}

/// `healthy_runtime`, with the real runtime's 422 for a request without an agent.
fn healthy_runtime_with_agent(req: &Received) -> Reply {
    if req.path != "/health" && req.json()["agent_id"].as_str().is_none_or(str::is_empty) {
        return Reply::json(422, json!({"detail": "agent_id"}));
    }
    healthy_runtime(req)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_start_creates_the_session_that_done_names() {
    let s = start(|_| {}).await;
    let message = "一".repeat(60);
    let r = s
        .post(
            "/api/v1/chat/start",
            "org-a",
            &json!({"agentId": "ag-1", "message": message}),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_served(&r, RT, "allowlist");
    let done = done_of(&r);
    let session = done["sessionId"].as_str().unwrap().to_string();
    let (org, agent, title) = s.legacy.session(&session).expect("the session exists");
    assert_eq!((org.as_str(), agent.as_str()), ("org-a", "ag-1"));
    assert_eq!(title, "一".repeat(50), "title: the first 50 characters");

    let sent = s.runtime.work()[0].json();
    assert_eq!(sent["session_id"], session.as_str());
    assert_eq!(sent["agent_id"], "ag-1");
    assert_eq!(
        sent["history_messages"],
        json!([{"role": "user", "content": message}]),
        "a new session's conversation is the message alone"
    );
    assert_eq!(sent["agent_config"]["system_prompt"], "Be brief.");

    let messages = s.legacy.messages(&session);
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[0]["content"], message.as_str());
    assert_eq!(messages[1]["content"], "Hello");
    assert_eq!(done["messageId"], messages[1]["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_start_that_fails_over_deletes_its_session_before_legacy_serves_it() {
    let h = Harness::new()
        .bridged(fake_legacy().await)
        .runtime(runtime_answering(|_: &Received| {
            Reply::json(500, json!({"detail": "boom"}))
        }))
        .start()
        .await;
    let body = json!({"agentId": "ag-1", "message": "hello"});
    let auth = format!("Bearer {}", token("org-a"));
    let r = request(
        h.proxy_addr,
        "POST",
        "/api/v1/chat/start",
        &[("authorization", auth.as_str())],
        body.to_string().as_bytes(),
    )
    .await;
    assert_served(&r, DIRECT, "failover");
    assert!(r.text().contains("legacy"));

    let calls = h
        .legacy
        .assert_start_undone_before_served(body.to_string().as_bytes());
    assert!(
        !calls.iter().any(|c| c.1.ends_with("/messages")),
        "{calls:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_lookups_send_the_chat_to_legacy_unchanged_and_uncharged() {
    let s = start(|_| {}).await;
    let body = json!({"message": "hi"});
    // Another org's session is a 404.
    let r = s.chat_in("s-b", "org-a", body.clone()).await;
    assert_legacy_served(&s, &r, "bridge_refused", "/api/v1/chat/sessions/s-b", &body).await;
    for status in [401, 403, 409] {
        s.legacy
            .fail(LegacyRoute::GetSession, Fault::Status(status));
        let r = s.chat_in("s-1", "org-a", body.clone()).await;
        assert_legacy_served(&s, &r, "bridge_refused", "/api/v1/chat/sessions/s-1", &body).await;
    }
    s.legacy.heal(LegacyRoute::GetSession);
    // The agent of a /chat/start belongs to another org.
    let start = json!({"agentId": "ag-b", "message": "hi"});
    let r = s.post("/api/v1/chat/start", "org-a", &start, &[]).await;
    assert_legacy_served(&s, &r, "bridge_refused", "/api/v1/chat/start", &start).await;
    assert!(
        !s.bridge_calls().iter().any(|c| c.method != "GET"),
        "a refused chat wrote to legacy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_lookups_send_the_chat_to_legacy_unchanged_and_uncharged() {
    let s = start(|_| {}).await;
    let body = json!({"message": "hi"});
    s.legacy.fail(LegacyRoute::GetSession, Fault::Status(503));
    let r = s.chat_in("s-1", "org-a", body.clone()).await;
    assert_legacy_served(&s, &r, UNAVAILABLE, &chat_path("s-1"), &body).await;

    // A legacy that does not answer holds the chat no longer than the bridge's timeout.
    s.legacy.heal(LegacyRoute::GetSession);
    s.legacy.fail(LegacyRoute::GetMessages, Fault::Hang);
    let t = Instant::now();
    let r = s.chat_in("s-1", "org-a", body.clone()).await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_legacy_served(&s, &r, UNAVAILABLE, &chat_path("s-1"), &body).await;

    // A session whose agent id could not go into a URL: legacy's data, not the caller's input.
    s.legacy.heal(LegacyRoute::GetMessages);
    let r = s.chat_in("s-odd", "org-a", body.clone()).await;
    assert_legacy_served(&s, &r, UNAVAILABLE, &chat_path("s-odd"), &body).await;
    assert!(!s.bridge_calls().iter().any(|c| c.path.contains("..")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_nobody_listens_on_is_bridge_unavailable() {
    let h = Harness::new()
        .bridged(Unreachable::new())
        .runtime(runtime)
        .start()
        .await;
    let r = chat(h.proxy_addr, Some("org-a"), "s-1", HI).await;
    // Legacy cannot serve it either: the client gets the proxy's 502, still saying why.
    assert_eq!(r.status, 502);
    assert_eq!(mode_reason(&r), (Some(DIRECT), Some("bridge_unavailable")));
    assert!(h.runtime.work().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_saves_are_retried_in_order_counted_and_never_hold_done() {
    // A retry window of one second, and waits between attempts scaled down to match.
    let s = start(|c| c.bridge.persist_retry_secs = 1).await;
    s.server
        .shared
        .bridge
        .set_retry_backoff(Duration::from_millis(20));
    // The user message's first two attempts fail; its retries save it, and the answer follows it.
    s.legacy
        .fail(LegacyRoute::PostMessage, Fault::StatusTimes(503, 2));
    let r = s
        .chat_in("s-1", "org-a", json!({"message": "retry me"}))
        .await;
    let done = done_of(&r);
    let messages = s.legacy.messages("s-1");
    let contents: Vec<&Value> = messages[3..].iter().map(|m| &m["content"]).collect();
    assert_eq!(
        contents,
        [&json!("retry me"), &json!("Hello")],
        "{messages:?}"
    );
    // The answer's save waited for its question, within done's bound, and done names it.
    assert_eq!(done["messageId"], messages[4]["id"]);
    assert_eq!(s.persist_failures(), 0);

    // A legacy that never answers a save: the first event waits one timeout for the user's
    // message, done twice that for the answer, not more.
    s.legacy.fail(LegacyRoute::PostMessage, Fault::Hang);
    let t = Instant::now();
    let r = s.chat_in("s-1", "org-a", json!({"message": "lost?"})).await;
    let took = t.elapsed();
    assert!(took < Duration::from_millis(1500), "{took:?}");
    let done = done_of(&r);
    assert_eq!(done["sessionId"], "s-1");
    uuid::Uuid::parse_str(done["messageId"].as_str().unwrap()).expect("a proxy-made messageId");
    assert!(
        eventually(Duration::from_secs(8), || s.persist_failures() == 2).await,
        "persist failures: {}",
        s.persist_failures()
    );
    let saves = s
        .bridge_calls()
        .iter()
        .filter(|c| c.method == "POST" && c.path.ends_with("/messages"))
        .count();
    // 3 + 1 for the first chat; one each for the lost pair: an attempt that never answered is
    // never simply sent again (a read-back would come first).
    assert_eq!(saves, 4 + 2);
}

/// A runtime that answers "Hello" in two pieces, pausing between them until the test releases
/// it: a client can leave mid-answer.
fn pausing_runtime(req: &Received) -> Reply {
    if req.path == "/health" {
        return Reply::json(200, json!({"status": "ok"}));
    }
    Reply::sse(vec![
        Step::Send(frame("text_chunk", json!({"content": "Hel"}))),
        Step::WaitRelease,
        Step::Send(frame("text_chunk", json!({"content": "lo"}))),
        Step::Send(frame(
            "execution_complete",
            json!({"final_response": "Hello", "usage": {"total_tokens": 5}}),
        )),
        Step::Send(done_frame()),
    ])
}

/// Send a chat, read its first event, then leave (the socket dropped, as a closed tab does).
async fn leave_after_the_first_event(s: &Setup, message: &str) {
    let body = json!({"message": message}).to_string();
    let (first, client) =
        first_chunk_of_chat(s.server.proxy_addr, bearer("org-a"), "s-1", body).await;
    assert!(String::from_utf8_lossy(&first).contains("Hel"));
    client.abort();
    let _ = client.await;
}

fn detached(s: &Setup, result: &str) -> u64 {
    s.server
        .shared
        .metrics
        .bridge
        .detached_total
        .with_label_values(&[result])
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_answer_still_gets_both_messages_saved() {
    let s = start_with(pausing_runtime, |c| c.runtime.commit_timeout_ms = Some(0)).await;
    leave_after_the_first_event(&s, "are you still there?").await;
    // The relay notices the client gone and hands the stream on; then the runtime finishes.
    assert!(
        eventually(Duration::from_secs(3), || s.server.shared.detached.len()
            == 1)
        .await,
        "the execution was not detached"
    );
    // The client's request is over; the execution still counts for the shutdown drain.
    let requests = s.server.shared.requests.clone();
    assert!(eventually(Duration::from_secs(3), || requests.count() == 1).await);
    assert_eq!(s.server.shared.detached.len(), 1);
    s.runtime.release();
    assert!(
        eventually(Duration::from_secs(5), || detached(&s, "saved") == 1).await,
        "saved: {}",
        detached(&s, "saved")
    );
    let messages = s.legacy.messages("s-1");
    let tail: Vec<(&Value, &Value)> = messages[3..]
        .iter()
        .map(|m| (&m["role"], &m["content"]))
        .collect();
    assert_eq!(
        tail,
        [
            (&json!("user"), &json!("are you still there?")),
            (&json!("assistant"), &json!("Hello"))
        ]
    );
    assert_eq!(messages[4]["metadata"]["tokensUsed"], 5);
    assert!(s.server.shared.detached.is_empty());
    // Not the runtime's fault, and not its success either: nothing reached the breaker.
    recorded(&s.server, 0, 0).await;
    assert_eq!(s.runtime_total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_finish_detached_a_client_that_leaves_stops_the_execution() {
    let s = start_with(pausing_runtime, |c| {
        c.runtime.commit_timeout_ms = Some(0);
        c.bridge.finish_detached = false;
    })
    .await;
    leave_after_the_first_event(&s, "gone").await;
    // The relay ends the request when it notices, dropping the runtime connection.
    let requests = s.server.shared.requests.clone();
    assert!(eventually(Duration::from_secs(3), || requests.count() == 0).await);
    s.runtime.release();
    // Nothing can be awaited for what must not happen: give a save the time it would take.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let roles: Vec<Value> = s.legacy.messages("s-1")[3..]
        .iter()
        .map(|m| m["role"].clone())
        .collect();
    assert_eq!(roles, [json!("user")], "only the user's message");
    assert_eq!(detached(&s, "saved"), 0);
    assert!(s.server.shared.detached.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_detached_the_oldest_is_dropped() {
    let s = start_with(pausing_runtime, |c| {
        c.runtime.commit_timeout_ms = Some(0);
        c.bridge.max_detached = 1;
    })
    .await;
    leave_after_the_first_event(&s, "first to leave").await;
    assert!(
        eventually(Duration::from_secs(3), || s.server.shared.detached.len()
            == 1)
        .await
    );
    leave_after_the_first_event(&s, "second to leave").await;
    assert!(
        eventually(Duration::from_secs(3), || detached(&s, "dropped") == 1).await,
        "the oldest was not dropped"
    );
    s.runtime.release();
    assert!(eventually(Duration::from_secs(5), || detached(&s, "saved") == 1).await);
    let contents: Vec<Value> = s.legacy.messages("s-1")[3..]
        .iter()
        .map(|m| m["content"].clone())
        .collect();
    assert_eq!(
        contents,
        [
            json!("first to leave"),
            json!("second to leave"),
            json!("Hello")
        ],
        "the answer of the one kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_ids_are_refused_before_any_upstream() {
    let s = start(|_| {}).await;
    let auth = format!("Bearer {}", token("org-a"));
    // Raw path bytes, exactly as a client can put them on the wire.
    for id in ["..", ".", "a%2Fb", "%2F..%2F..%2Fadmin"] {
        let mut c = Client::connect(s.server.proxy_addr).await;
        let raw = format!(
            "POST /api/v1/chat/sessions/{id} HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{HI}",
            HI.len()
        );
        c.send_raw(raw.as_bytes()).await;
        let r = c.read_response().await;
        assert_eq!(r.status, 400, "{id}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "INVALID_REQUEST", "{id}");
        assert_eq!(mode_reason(&r), (Some(RT), Some("allowlist")), "{id}");
    }
    for agent in ["../agents", "a/b", "x%2Fy", ""] {
        let body = json!({"agentId": agent, "message": "hi"});
        let r = s.post("/api/v1/chat/start", "org-a", &body, &[]).await;
        if agent.is_empty() {
            // No agent at all: legacy answers it as it always has.
            assert_served(&r, DIRECT, "no_agent");
        } else {
            assert_eq!(r.status, 400, "{agent}: {}", r.text());
        }
    }
    let received = s.legacy.received();
    assert!(
        received.iter().all(|q| q.path == "/api/v1/chat/start"),
        "{:?}",
        received.iter().map(|q| &q.path).collect::<Vec<_>>()
    );
    assert_eq!(received.len(), 1);
    assert!(s.runtime.work().is_empty());
    let m = s.server.shared.metrics;
    assert_eq!(m.rejected_total.with_label_values(&["unsafe_id"]).get(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_bridge_off_the_agent_comes_from_the_body_or_the_config() {
    // No default agent: a chat without one goes to legacy, uncharged.
    let s = start(|c| c.bridge.enabled = false).await;
    let body = json!({"message": "hi"});
    let r = s.chat_in("s-1", "org-a", body.clone()).await;
    assert_legacy_served(&s, &r, "no_agent", "/api/v1/chat/sessions/s-1", &body).await;
    // The body's agent is the runtime's.
    let r = s
        .chat_in("s-1", "org-a", json!({"message": "hi", "agentId": "ag-9"}))
        .await;
    assert_served(&r, RT, "allowlist");
    assert_eq!(done_of(&r)["usage"]["tokens"], 42);
    assert_eq!(s.runtime.work()[0].json()["agent_id"], "ag-9");
    assert_eq!(s.runtime.work()[0].header("authorization"), None);
    // Nothing was read from or saved to legacy.
    assert!(s.bridge_calls().is_empty());
    assert_eq!(s.legacy.messages("s-1").len(), 3);

    let s = start(|c| {
        c.bridge.enabled = false;
        c.runtime.default_agent_id = "agent-default".into();
    })
    .await;
    let r = s.chat_in("s-1", "org-a", json!({"message": "hi"})).await;
    assert_served(&r, RT, "allowlist");
    let sent = s.runtime.work()[0].json();
    assert_eq!(sent["agent_id"], "agent-default");
    assert_eq!(sent["history_messages"], json!([]));
    assert!(s.bridge_calls().is_empty());
}

#[tokio::test]
async fn the_user_message_is_saved_while_the_runtime_works_on_its_first_event() {
    let s = start(|_| {}).await;
    let addr = s.server.proxy_addr;
    let auth = bearer("org-a");
    let chat = tokio::spawn(async move {
        let headers = [
            ("content-type", "application/json"),
            ("authorization", auth.as_str()),
        ];
        request(
            addr,
            "POST",
            "/api/v1/chat/sessions/s-1",
            &headers,
            br#"{"message":"held"}"#,
        )
        .await
    });
    // The runtime accepted the chat and holds its first event: the user's message is already in
    // legacy, saved in the time the runtime takes, not after it.
    s.runtime.wait_for_work(1).await;
    let saved = eventually(Duration::from_secs(3), || {
        s.legacy
            .messages("s-1")
            .iter()
            .any(|m| m["role"] == "user" && m["content"] == "held")
    })
    .await;
    assert!(saved, "user message not saved while the runtime works");
    assert!(!chat.is_finished(), "the chat waits for the runtime");
    s.runtime.release();
    let r = chat.await.unwrap();
    assert_served(&r, RT, "allowlist");
    assert_eq!(event_names(&r), ["message", "message", "done"]);
    let roles: Vec<Value> = s.legacy.messages("s-1")[3..]
        .iter()
        .map(|m| m["role"].clone())
        .collect();
    assert_eq!(roles, [json!("user"), json!("assistant")]);
}

/// A legacy restart as long as a real one (ten seconds), with the retries' default backoff and
/// window: the chat finishing while legacy is down still answers the user at once, and once
/// legacy is back both messages are saved, once each, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_finished_during_a_ten_second_legacy_restart_are_saved_once_it_is_back() {
    const RESTART: Duration = Duration::from_secs(10);
    let s = start(|_| {}).await;
    assert_eq!(
        s.server.shared.snapshot().config.bridge.persist_retry_secs,
        300,
        "the default retry window"
    );
    // The chat's lookups are done and the runtime is working on it when legacy goes down.
    let chat = {
        let addr = s.server.proxy_addr;
        let body = json!({"message": "held"}).to_string();
        let auth = bearer("org-a");
        tokio::spawn(async move {
            request(
                addr,
                "POST",
                &chat_path("s-1"),
                &[
                    ("content-type", "application/json"),
                    ("authorization", auth.as_str()),
                ],
                body.as_bytes(),
            )
            .await
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || s.runtime.work().len() == 1).await,
        "the runtime never got the chat"
    );
    let before = s.legacy.messages("s-1").len();
    s.legacy.stop();
    s.runtime.release();
    let r = chat.await.unwrap();
    assert_served(&r, RT, "allowlist");
    let done = done_of(&r);
    assert_eq!(done["sessionId"], "s-1");
    assert_eq!(s.server.shared.metrics.bridge.persist_pending.get(), 2);

    // The restart itself: this wait is the outage under test.
    tokio::time::sleep(RESTART).await;
    s.legacy.restart().await;
    let saved = |s: &Setup| -> Vec<Value> {
        s.legacy.messages("s-1")[before..]
            .iter()
            .map(|m| m["content"].clone())
            .collect()
    };
    // Retries at 0.5, 1, 2, 4, 8 s (with jitter) after the first failure: the one after ten
    // seconds finds legacy back.
    assert!(
        eventually(Duration::from_secs(30), || s
            .server
            .shared
            .metrics
            .bridge
            .persist_pending
            .get()
            == 0)
        .await,
        "still pending: {:?}",
        saved(&s)
    );
    assert_eq!(saved(&s), [json!("held"), json!("Hello")]);
    assert_eq!(s.persist_failures(), 0, "nothing given up");
}
