//! Chat requests are routed per org; everything else reaches legacy untouched.

use crate::support;

use std::time::Duration;

use cutover_proxy::core::config::Mode;
use serde_json::json;
use support::*;

fn bearer(org: &str) -> String {
    format!("Bearer {}", token(org))
}

const HELLO: &str = r#"{"message":"hello"}"#;

/// POST `body` to a chat `path` as `org` (None: no token), with a correct Content-Length.
async fn post_chat(
    addr: std::net::SocketAddr,
    org: Option<&str>,
    path: &str,
    body: &[u8],
) -> Response {
    let auth = org.map(bearer);
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    request(addr, "POST", path, &headers, body).await
}

/// POST a chunked body to a chat `path` as `org`.
async fn post_chat_chunked(
    addr: std::net::SocketAddr,
    org: &str,
    path: &str,
    body: &[u8],
) -> Response {
    let mut c = Client::connect(addr).await;
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nhost: proxy.test\r\ncontent-type: application/json\r\n\
         authorization: {}\r\ntransfer-encoding: chunked\r\n\r\n",
        bearer(org)
    )
    .into_bytes();
    for piece in body.chunks(700) {
        raw.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        raw.extend_from_slice(piece);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    c.send_raw(&raw).await;
    c.read_response().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlisted_org_is_served_by_the_runtime_with_the_mapped_body() {
    let h = Harness::new().start().await;

    let r = h
        .chat("org-a")
        .body(r#"{"message":"hello","parentMessageId":"m-0","extra":[1]}"#)
        .send()
        .await;
    assert_eq!(r.status, 200);
    assert_routed(&r, RT, "allowlist");
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert!(r.complete);
    assert_eq!(event_names(&r), ["message", "done"]);
    let done: serde_json::Value = serde_json::from_str(&r.events()[1].1).unwrap();
    assert_eq!(done["sessionId"], "s-1");

    let work = h.runtime.work();
    assert_eq!(work.len(), 1);
    let sent = &work[0];
    assert_eq!(sent.method, "POST");
    assert_eq!(sent.path, "/api/v1/execute/stream");
    assert_eq!(sent.header("content-type"), Some("application/json"));
    assert_eq!(
        sent.header("content-length"),
        Some(sent.body.len().to_string().as_str())
    );
    assert_eq!(sent.header("transfer-encoding"), None);
    assert_eq!(
        sent.header("x-cutover-shadow"),
        None,
        "a real execution marked as a copy"
    );
    // Exactly the contract's keys (the bridge is off: the configured agent, no history, the
    // default settings), nothing copied from `extra`.
    assert_eq!(
        sent.json(),
        json!({
            "session_id": "s-1", "agent_id": TEST_AGENT, "org_id": "org-a", "user_message": "hello",
            "history_messages": [],
            "agent_config": {"system_prompt": "", "temperature": 0.7, "max_tokens": 4096},
            "metadata": {"user_id": "user-1", "parent_message_id": "m-0"}
        })
    );
    assert!(h.legacy.work().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_start_maps_the_agent_and_generates_a_session() {
    let h = Harness::new().start().await;

    // Multi-byte text: Content-Length must count bytes, not characters.
    let body = r#"{"agentId":"agent-7","message":"你好, 世界 🌍"}"#;
    let mut session_ids = Vec::new();
    for i in 0..2 {
        let r = post_chat(
            h.proxy_addr,
            Some("org-a"),
            "/api/v1/chat/start",
            body.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_routed(&r, RT, "allowlist");
        assert_eq!(event_names(&r), ["message", "done"]);

        let sent = &h.runtime.work()[i];
        assert_eq!(
            sent.header("content-length"),
            Some(sent.body.len().to_string().as_str())
        );
        let json = sent.json();
        let session_id = json["session_id"].as_str().expect("session_id").to_string();
        assert_eq!(session_id.len(), 36, "{session_id} is not a UUID");
        assert_eq!(
            json,
            json!({
                "session_id": session_id, "org_id": "org-a", "user_message": "你好, 世界 🌍",
                "agent_id": "agent-7", "history_messages": [],
                "agent_config": {"system_prompt": "", "temperature": 0.7, "max_tokens": 4096},
                "metadata": {"user_id": "user-1", "parent_message_id": null}
            })
        );
        // The client learns the generated session from the done event.
        let done: serde_json::Value = serde_json::from_str(&r.events()[1].1).unwrap();
        assert_eq!(done["sessionId"], session_id.as_str());
        assert_eq!(done["executionMode"], "runtime_orchestrator");
        session_ids.push(session_id);
    }
    assert_ne!(
        session_ids[0], session_ids[1],
        "each chat/start gets its own session"
    );
    assert!(h.legacy.work().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_routes_match_with_query_or_trailing_slash() {
    let h = Harness::new().start().await;
    let body = HI.as_bytes();

    let mut last = None;
    for path in [
        "/api/v1/chat/sessions/s-q?trace=1",
        "/api/v1/chat/sessions/s-slash/",
        "/api/v1/chat/start?x=1",
        // An escaped id reaches the runtime decoded, as legacy's router would see it.
        "/api/v1/chat/sessions/s%20%E4%BD%A0",
    ] {
        let r = post_chat(h.proxy_addr, Some("org-a"), path, body).await;
        assert_eq!(mode_reason(&r), (Some(RT), Some("allowlist")), "{path}");
        last = Some(r);
    }
    let r = last.unwrap();
    let done: serde_json::Value = serde_json::from_str(&r.events()[1].1).unwrap();
    assert_eq!(done["sessionId"], "s 你");
    let ids = h.runtime.work_field("session_id");
    assert_eq!(ids[..2], [json!("s-q"), json!("s-slash")]);
    assert_eq!(ids[3], json!("s 你"));

    // Legacy-bound chats keep their path and query byte for byte.
    let r = post_chat(
        h.proxy_addr,
        Some("org-b"),
        "/api/v1/chat/sessions/s-q?trace=1&a=%2F",
        body,
    )
    .await;
    assert_routed(&r, DIRECT, "default");
    assert_eq!(
        h.legacy.work()[0].path,
        "/api/v1/chat/sessions/s-q?trace=1&a=%2F"
    );
    assert_eq!(h.legacy.work()[0].body, body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_orgs_and_unverified_callers_go_to_legacy() {
    let h = Harness::new().start().await;

    let r = chat(h.proxy_addr, Some("org-b"), "s-2", HELLO).await;
    assert_routed(&r, DIRECT, "default");
    assert!(r.text().contains("legacy"));
    let r = chat(h.proxy_addr, None, "s-3", HELLO).await;
    assert_routed(&r, DIRECT, "no_identity");
    let r = post_chat(
        h.proxy_addr,
        Some("org-b"),
        "/api/v1/chat/start",
        br#"{"agentId":"g","message":"x"}"#,
    )
    .await;
    assert_routed(&r, DIRECT, "default");
    let work = h.legacy.work();
    assert_eq!(work.len(), 3);
    assert_eq!(work[0].path, "/api/v1/chat/sessions/s-2");
    assert_eq!(work[0].body, HELLO.as_bytes());
    assert_eq!(work[2].path, "/api/v1/chat/start");
    assert_eq!(work[2].body, br#"{"agentId":"g","message":"x"}"#);
    assert!(h.runtime.work().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_mode_runtime_sends_every_verified_org_to_the_runtime() {
    let h = Harness::new()
        .config(move |cfg| {
            cfg.rollout.default_mode = Mode::RuntimeOrchestrator;
        })
        .start()
        .await;

    let r = chat(h.proxy_addr, Some("org-b"), "s-b", HELLO).await;
    assert_eq!(r.status, 200);
    assert_routed(&r, RT, "default");
    assert_eq!(event_names(&r), ["message", "done"]);
    let r = chat(h.proxy_addr, Some("org-a"), "s-a", HELLO).await;
    assert_routed(&r, RT, "allowlist");
    let orgs = h.runtime.work_field("org_id");
    assert_eq!(orgs, [json!("org-b"), json!("org-a")]);

    // Still never an unverified caller.
    let r = chat(h.proxy_addr, None, "s-n", HELLO).await;
    assert_routed(&r, DIRECT, "no_identity");
    assert_eq!(h.legacy.work().len(), 1);
    assert_eq!(h.runtime.work().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_on_the_runtime_path_get_400_and_reach_no_upstream() {
    let h = Harness::new().start().await;

    let bad: &[&[u8]] = &[
        b"not json",
        b"",
        b"{\"message\":\"hi\"",
        b"{}",
        b"{\"message\":\"\"}",
        b"{\"message\":\"  \\n \"}",
        b"{\"message\":5}",
        b"{\"message\":null}",
        b"{\"agentId\":\"a\"}",
        b"[\"message\"]",
        b"\xff\xfe{}",
    ];
    for body in bad {
        let shown = String::from_utf8_lossy(body);
        for path in ["/api/v1/chat/sessions/s-1", "/api/v1/chat/start"] {
            let r = post_chat(h.proxy_addr, Some("org-a"), path, body).await;
            assert_eq!(r.status, 400, "{shown} on {path}");
            assert_eq!(
                mode_reason(&r),
                (Some("runtime_orchestrator"), Some("allowlist")),
                "{shown}"
            );
            assert_eq!(r.header("content-type"), Some("application/json"));
            let err = r.json();
            assert_eq!(err["success"], false, "{err}");
            assert_eq!(err["error"]["code"], "INVALID_REQUEST", "{err}");
            assert!(
                err["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{err}"
            );
        }
    }
    // Barrier: a good request on each path arrives, and is the first either upstream saw.
    for org in ["org-a", "org-b"] {
        let r = chat(h.proxy_addr, Some(org), "s-ok", r#"{"message":"ok"}"#).await;
        assert_eq!(r.status, 200, "{org}");
    }
    assert_eq!(h.runtime.work().len(), 1);
    assert_eq!(h.runtime.work()[0].json()["user_message"], "ok");
    assert_eq!(h.legacy.work().len(), 1);
    assert_eq!(h.legacy.work()[0].body, br#"{"message":"ok"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_chat_limit_get_413_and_reach_no_upstream() {
    let h = Harness::new()
        .config(move |cfg| {
            cfg.limits.max_chat_body_bytes = 1024;
        })
        .start()
        .await;

    let over = format!(r#"{{"message":"{}"}}"#, "x".repeat(1024));
    let path = "/api/v1/chat/sessions/s-big";
    let cases = [
        (
            Some("org-a"),
            (Some("runtime_orchestrator"), Some("allowlist")),
        ),
        (Some("org-b"), (Some("direct_llm"), Some("default"))),
        (None, (Some("direct_llm"), Some("no_identity"))),
    ];
    for (org, expected) in cases {
        let r = post_chat(h.proxy_addr, org, path, over.as_bytes()).await;
        assert_eq!(r.status, 413, "{org:?}");
        assert_eq!(mode_reason(&r), expected, "{org:?}");
        assert_eq!(r.json()["error"]["code"], "PAYLOAD_TOO_LARGE");
    }
    // Without a Content-Length the limit holds as well, on either path. (A legacy-bound body is
    // streamed, so legacy may see the start of it, but never a whole request.)
    let r = post_chat_chunked(h.proxy_addr, "org-a", path, over.as_bytes()).await;
    assert_eq!(r.status, 413);
    assert_routed(&r, RT, "allowlist");
    assert_eq!(r.json()["error"]["code"], "PAYLOAD_TOO_LARGE");
    let r = post_chat_chunked(h.proxy_addr, "org-b", path, over.as_bytes()).await;
    assert_eq!(r.status, 413);
    assert_routed(&r, DIRECT, "default");
    assert_eq!(r.json()["error"]["code"], "PAYLOAD_TOO_LARGE");
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("1024"), "{msg}");

    // Exactly at the limit is fine, with or without Content-Length.
    let at = format!(r#"{{"message":"{}"}}"#, "y".repeat(1024 - 14));
    assert_eq!(at.len(), 1024);
    let r = post_chat(h.proxy_addr, Some("org-a"), path, at.as_bytes()).await;
    assert_eq!(
        (r.status, mode_reason(&r).0),
        (200, Some("runtime_orchestrator"))
    );
    let r = post_chat_chunked(h.proxy_addr, "org-a", path, at.as_bytes()).await;
    assert_eq!(
        (r.status, mode_reason(&r).0),
        (200, Some("runtime_orchestrator"))
    );
    let r = post_chat(h.proxy_addr, Some("org-b"), path, at.as_bytes()).await;
    assert_eq!((r.status, mode_reason(&r).0), (200, Some("direct_llm")));

    let runtime_got = h.runtime.work();
    assert_eq!(runtime_got.len(), 2);
    assert!(runtime_got
        .iter()
        .all(|w| w.json()["user_message"].as_str().unwrap().starts_with('y')));
    assert_eq!(h.legacy.work().len(), 1);
    assert_eq!(h.legacy.work()[0].body, at.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_bound_body_too_large_to_replay_is_served_by_legacy() {
    let h = Harness::new().start().await;

    let limit = cutover_proxy::proxy::REPLAY_LIMIT;
    let big = format!(
        r#"{{"message":"{}","parentMessageId":"m"}}"#,
        "z".repeat(limit)
    );
    assert!(big.len() > limit);
    let r = chat(h.proxy_addr, Some("org-a"), "s-large", &big).await;
    assert_eq!(r.status, 200);
    assert_routed(&r, DIRECT, "large_body");
    assert!(r.text().contains("legacy"));
    let got = h.legacy.work();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/api/v1/chat/sessions/s-large");
    assert_eq!(
        got[0].body,
        big.as_bytes(),
        "legacy must get the original body"
    );
    assert!(h.runtime.work().is_empty());

    // Just under the replay limit the runtime still serves it.
    let fits = format!(r#"{{"message":"{}"}}"#, "z".repeat(limit - 20));
    assert!(fits.len() <= limit);
    let r = chat(h.proxy_addr, Some("org-a"), "s-fits", &fits).await;
    assert_routed(&r, RT, "allowlist");
    assert_eq!(h.runtime.work().len(), 1);
    assert_eq!(
        h.runtime.work()[0].json()["user_message"]
            .as_str()
            .unwrap()
            .len(),
        limit - 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_chat_stream_reaches_the_client_chunk_by_chunk() {
    let h = Harness::new()
        .legacy(released_in_two(
            b"event: message\ndata: {\"n\":1}\n\n",
            b"event: done\ndata: {\"n\":2}\n\n",
        ))
        .start()
        .await;

    let mut c = Client::connect(h.proxy_addr).await;
    let auth = bearer("org-b");
    c.send(
        "POST",
        "/api/v1/chat/sessions/s-stream",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        HI.as_bytes(),
    )
    .await;
    // The second chunk is only sent once the first reached the client: a proxy that buffers
    // the response would never finish here.
    let r = c
        .read_releasing(&h.legacy)
        .await
        .expect("legacy stream was held back by the proxy");
    assert_routed(&r, DIRECT, "default");
    assert!(r.complete);
    assert_eq!(r.chunks[0].1, b"event: message\ndata: {\"n\":1}\n\n");
    assert_eq!(event_names(&r), ["message", "done"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_connections_are_reused_across_executions() {
    let h = Harness::new().start().await;

    let executions = 6;
    for i in 0..executions {
        if i > 0 {
            // The relay hands the runtime connection back to the pool once it read the end of
            // the body, just after the client got its last event: give it that moment.
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        let r = chat(h.proxy_addr, Some("org-a"), &format!("s-{i}"), HI).await;
        assert_eq!(mode_reason(&r).0, Some("runtime_orchestrator"));
        assert_eq!(event_names(&r), ["message", "done"]);
    }
    assert_eq!(h.runtime.work().len(), executions);
    // Without reuse there would be one connection per execution (one more per worker thread
    // is allowed: the pool is kept per thread).
    let used: std::collections::HashSet<_> =
        h.runtime.work().iter().map(|w| w.connection).collect();
    assert!(
        used.len() <= 2,
        "executions used {} connections: {used:?}",
        used.len()
    );
    assert!(
        h.runtime.connections() < executions,
        "{} runtime connections",
        h.runtime.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_that_legacy_cannot_serve_still_says_how_it_was_routed() {
    // Legacy is a closed port: the chat fails, and the answer still carries the mode.
    let h = Harness::new()
        .legacy_server(Unreachable::new())
        .start()
        .await;

    let r = chat(h.proxy_addr, Some("org-b"), "s-x", HELLO).await;
    assert_eq!(r.status, 502);
    assert_routed(&r, DIRECT, "default");
    let r = chat(h.proxy_addr, None, "s-x", HELLO).await;
    assert_eq!(r.status, 502);
    assert_routed(&r, DIRECT, "no_identity");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_expecting_100_continue_is_told_to_send_the_body() {
    // curl sends `Expect: 100-continue` for bodies over 1 KiB and waits before sending them.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::new().start().await;

    let body = format!(r#"{{"message":"{}"}}"#, "x".repeat(2000));
    let mut conn = tokio::net::TcpStream::connect(h.proxy_addr).await.unwrap();
    let head = chat_head("HTTP/1.1", "s-100", body.len(), "Expect: 100-continue\r\n");
    conn.write_all(&head).await.unwrap();
    let mut interim = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_millis(500), conn.read(&mut interim))
        .await
        .expect("no 100 Continue: the client would wait before sending its body")
        .unwrap();
    assert!(
        interim[..n].starts_with(b"HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&interim[..n])
    );
    conn.write_all(body.as_bytes()).await.unwrap();
    h.runtime.wait_for_work(1).await;
    let sent = &h.runtime.work()[0];
    assert_eq!(sent.json()["user_message"].as_str().unwrap().len(), 2000);
    assert_eq!(sent.header("expect"), None);
}
