//! Chat requests are routed per org; everything else reaches legacy untouched.

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlisted_org_is_served_by_the_runtime_with_the_mapped_body() {
    let legacy = Upstream::start(echo_legacy).await;
    let runtime = Upstream::start(healthy_runtime).await;
    let server = proxy(config(&legacy.address(), &runtime.address())).await;

    let r = chat(server.proxy_addr, Some("org-a"), "s-1", r#"{"message":"hello","parentMessageId":"m-0"}"#).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-execution-mode"), Some("runtime_orchestrator"));
    assert_eq!(r.header("x-execution-reason"), Some("allowlist"));
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert!(r.complete);
    let events = r.events();
    assert_eq!(events.iter().map(|(e, _)| e.as_str()).collect::<Vec<_>>(), ["message", "done"]);

    let work = runtime.work();
    assert_eq!(work.len(), 1);
    let sent = &work[0];
    assert_eq!(sent.method, "POST");
    assert_eq!(sent.path, "/api/v1/execute/stream");
    assert_eq!(sent.header("content-length"), Some(sent.body.len().to_string().as_str()));
    assert_eq!(
        sent.json(),
        serde_json::json!({
            "session_id": "s-1", "org_id": "org-a", "user_message": "hello",
            "metadata": {"user_id": "user-1", "parent_message_id": "m-0"}
        })
    );
    assert!(legacy.work().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_orgs_and_unverified_callers_go_to_legacy() {
    let legacy = Upstream::start(echo_legacy).await;
    let runtime = Upstream::start(healthy_runtime).await;
    let server = proxy(config(&legacy.address(), &runtime.address())).await;

    let r = chat(server.proxy_addr, Some("org-b"), "s-2", r#"{"message":"hello"}"#).await;
    assert_eq!(r.header("x-execution-mode"), Some("direct_llm"));
    assert_eq!(r.header("x-execution-reason"), Some("default"));
    let r = chat(server.proxy_addr, None, "s-3", r#"{"message":"hello"}"#).await;
    assert_eq!(r.header("x-execution-mode"), Some("direct_llm"));
    assert_eq!(r.header("x-execution-reason"), Some("no_identity"));
    assert_eq!(legacy.work().len(), 2);
    assert_eq!(legacy.work()[0].body, br#"{"message":"hello"}"#);
    assert!(runtime.work().is_empty());
}
