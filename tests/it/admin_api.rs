//! The admin API: the exact JSON shapes of the contract, bearer-token protected mutations (refused
//! outright when no token is configured), the kill switch, and the Kubernetes probes.
//!
//! Each test has its own proxy, so the numbers read here are its own; nothing process-wide is
//! asserted.

use crate::support;

use std::collections::BTreeSet;
use std::time::Duration;

use cutover_proxy::app::LocalServer;
use serde_json::{json, Value};
use support::*;

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect()
}

fn set<'a>(k: &[&'a str]) -> BTreeSet<&'a str> {
    k.iter().copied().collect()
}

/// `M = {total,success,error,timeout,avgLatencyMs,errorRate,timeoutRate}`, all numbers.
fn assert_m(m: &Value, what: &str) {
    assert_eq!(
        keys(m),
        set(&[
            "total",
            "success",
            "error",
            "timeout",
            "avgLatencyMs",
            "errorRate",
            "timeoutRate"
        ]),
        "{what}: {m}"
    );
    for k in ["total", "success", "error", "timeout"] {
        assert!(m[k].is_u64(), "{what}.{k} is not a count: {m}");
    }
    for k in ["avgLatencyMs", "errorRate", "timeoutRate"] {
        assert!(m[k].is_number(), "{what}.{k} is not a number: {m}");
    }
    let n = m["total"].as_u64().unwrap();
    assert_eq!(
        n,
        m["success"].as_u64().unwrap()
            + m["error"].as_u64().unwrap()
            + m["timeout"].as_u64().unwrap(),
        "{what}: {m}"
    );
}

fn counts(m: &Value) -> (u64, u64, u64, u64) {
    let g = |k: &str| m[k].as_u64().unwrap();
    (g("total"), g("success"), g("error"), g("timeout"))
}

/// `GET /runtime/fallback/status` → `data`, after checking the envelope and shape.
async fn fallback_status(server: &LocalServer) -> Value {
    let data = &admin_data(server, "/runtime/fallback/status").await;
    assert_eq!(
        keys(data),
        set(&["fallbackEnabled", "fallbackReason", "state"]),
        "{data}"
    );
    assert!(
        data["fallbackEnabled"].is_boolean() && data["fallbackReason"].is_string(),
        "{data}"
    );
    assert!(
        ["closed", "open", "half_open"].contains(&data["state"].as_str().unwrap()),
        "{data}"
    );
    data.clone()
}

/// `GET path` on the admin API → `data`, after checking the 200 and the `{success, data}` envelope.
async fn admin_data(server: &LocalServer, path: &str) -> Value {
    let (status, body) = admin(server, "GET", path, None).await;
    assert_eq!(status, 200, "{path}: {body}");
    assert_eq!(keys(&body), set(&["success", "data"]), "{path}: {body}");
    assert_eq!(body["success"], true, "{path}: {body}");
    body["data"].clone()
}

/// Trip the breaker through the admin API with this `Authorization`; the status.
async fn trip_with(h: &Running, authorization: &str) -> u16 {
    let mut c = Client::connect(h.admin_addr).await;
    let headers = [("authorization", authorization)];
    c.send("POST", "/runtime/fallback/trip", &headers, b"")
        .await;
    c.read_response().await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_endpoints_have_the_contract_shapes() {
    let h = Harness::new()
        .runtime(runtime_failing_session_fails(frame(
            "execution_error",
            json!({"error": "no"}),
        )))
        // The failing session's error is counted as one the user saw, after the commit.
        .config(|c| c.runtime.commit_timeout_ms = Some(0))
        .start()
        .await;

    // Before any traffic: zeros, closed.
    let data = &admin_data(&h, "/runtime/metrics").await;
    assert_eq!(
        keys(data),
        set(&["direct", "runtime", "fallbackEnabled", "fallbackReason"]),
        "{data}"
    );
    assert_m(&data["direct"], "direct");
    assert_m(&data["runtime"], "runtime");
    assert_eq!(
        data["runtime"],
        json!({"total": 0, "success": 0, "error": 0, "timeout": 0, "avgLatencyMs": 0.0, "errorRate": 0.0, "timeoutRate": 0.0})
    );
    assert_eq!(data["fallbackEnabled"], false);
    assert!(data["fallbackReason"].is_string());
    let st = fallback_status(&h).await;
    assert_eq!(
        (st["fallbackEnabled"].clone(), st["state"].clone()),
        (json!(false), json!("closed"))
    );

    // org-a: two runtime successes and one runtime error; org-b: one direct success.
    for session in ["ok-1", "ok-2", "fails"] {
        let r = chat(h.proxy_addr, Some("org-a"), session, HI).await;
        assert_eq!(r.header("x-execution-mode"), Some("runtime_orchestrator"));
    }
    let r = h.chat("org-b").session("b-1").send().await;
    assert_eq!(r.header("x-execution-mode"), Some("direct_llm"));
    recorded(&h, 3, 1).await;

    let (_, body) = admin(&h, "GET", "/runtime/metrics", None).await;
    let data = &body["data"];
    assert_m(&data["runtime"], "runtime");
    assert_m(&data["direct"], "direct");
    assert_eq!(counts(&data["runtime"]), (3, 2, 1, 0), "{data}");
    assert_eq!(counts(&data["direct"]), (1, 1, 0, 0), "{data}");
    let rate = data["runtime"]["errorRate"].as_f64().unwrap();
    assert!((rate - 1.0 / 3.0).abs() < 1e-9, "{data}");
    assert_eq!(data["runtime"]["timeoutRate"].as_f64(), Some(0.0));
    assert!(
        data["runtime"]["avgLatencyMs"].as_f64().unwrap() > 0.0,
        "{data}"
    );

    let data = &admin_data(&h, "/runtime/metrics/org-a").await;
    assert_eq!(keys(data), set(&["orgId", "direct", "runtime"]), "{data}");
    assert_eq!(data["orgId"], "org-a");
    assert_m(&data["direct"], "org-a direct");
    assert_m(&data["runtime"], "org-a runtime");
    assert_eq!(counts(&data["runtime"]), (3, 2, 1, 0), "{data}");
    assert_eq!(counts(&data["direct"]), (0, 0, 0, 0), "{data}");

    let (_, body) = admin(&h, "GET", "/runtime/metrics/org-b", None).await;
    assert_eq!(counts(&body["data"]["direct"]), (1, 1, 0, 0), "{body}");
    assert_eq!(counts(&body["data"]["runtime"]), (0, 0, 0, 0), "{body}");

    // An org never seen: the same shape, all zero.
    let (status, body) = admin(&h, "GET", "/runtime/metrics/org-unknown", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["orgId"], "org-unknown");
    assert_m(&body["data"]["runtime"], "unknown runtime");
    assert_eq!(counts(&body["data"]["runtime"]), (0, 0, 0, 0));
    assert_eq!(counts(&body["data"]["direct"]), (0, 0, 0, 0));

    // Kubernetes probes.
    let (status, body) = admin(&h, "GET", "/healthz", None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = admin(&h, "GET", "/readyz", None).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_need_the_admin_token() {
    let h = Harness::new().start().await;

    for path in ["/runtime/fallback/trip", "/runtime/fallback/reset"] {
        let (status, body) = admin(&h, "POST", path, None).await;
        assert_eq!(status, 401, "{path} without a token: {body}");
        let (status, body) = admin(&h, "POST", path, Some("not-the-token")).await;
        assert_eq!(status, 401, "{path} with a wrong token: {body}");
        let wrong_prefix = format!("{ADMIN_TOKEN}x");
        let (status, _) = admin(&h, "POST", path, Some(&wrong_prefix)).await;
        assert_eq!(status, 401, "{path} with the token plus a byte");
        let (status, _) = admin(
            &h,
            "POST",
            path,
            Some(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]),
        )
        .await;
        assert_eq!(status, 401, "{path} with a prefix of the token");
        // A refused trip must not have tripped anything.
        assert_eq!(fallback_status(&h).await["state"], "closed", "{path}");
    }
    // The token in another scheme is not a bearer token.
    assert_eq!(trip_with(&h, &format!("Basic {ADMIN_TOKEN}")).await, 401);
    assert_eq!(fallback_status(&h).await["state"], "closed");

    let (status, body) = admin(&h, "POST", "/runtime/fallback/reset", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true);

    // The scheme is case-insensitive; the token is not.
    assert_eq!(trip_with(&h, &format!("BEARER {ADMIN_TOKEN}")).await, 200);
    assert_eq!(fallback_status(&h).await["state"], "open");
    let (status, _) = admin(
        &h,
        "POST",
        "/runtime/fallback/reset",
        Some(&ADMIN_TOKEN.to_uppercase()),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = admin(&h, "POST", "/runtime/fallback/reset", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(fallback_status(&h).await["state"], "closed");
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trip_sends_everyone_to_legacy_until_reset() {
    let h = Harness::new()
        .config(move |cfg| {
            cfg.breaker.open_secs = 1;
        })
        .start()
        .await;

    let r = h.chat("org-a").session("before").send().await;
    assert_eq!(r.header("x-execution-mode"), Some("runtime_orchestrator"));

    let (status, body) = admin(&h, "POST", "/runtime/fallback/trip", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true);
    let st = fallback_status(&h).await;
    assert_eq!(
        (st["fallbackEnabled"].clone(), st["state"].clone()),
        (json!(true), json!("open")),
        "{st}"
    );
    assert!(
        st["fallbackReason"].as_str().unwrap().contains("manual"),
        "{st}"
    );
    let (_, body) = admin(&h, "GET", "/runtime/metrics", None).await;
    assert_eq!(body["data"]["fallbackEnabled"], true);

    for org in [Some("org-a"), Some("org-b"), None] {
        let r = chat(h.proxy_addr, org, "tripped", HI).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-execution-mode"), Some("direct_llm"), "{org:?}");
        assert_eq!(
            r.header("x-execution-reason"),
            Some("breaker_open"),
            "{org:?}"
        );
    }

    // A kill switch outlasts open_secs and healthy health checks: no probe gets through. There is
    // no event to wait for here, only time passing.
    let health_before = h.runtime.count() - h.runtime.work().len();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(
        h.runtime.count() - h.runtime.work().len() > health_before,
        "health checks kept running"
    );
    for i in 0..3 {
        let r = chat(h.proxy_addr, Some("org-a"), &format!("later-{i}"), HI).await;
        assert_eq!(
            r.header("x-execution-reason"),
            Some("breaker_open"),
            "request {i} after open_secs"
        );
    }
    assert_eq!(fallback_status(&h).await["state"], "open");
    assert_eq!(
        h.runtime.work().len(),
        1,
        "nothing reached the runtime while tripped"
    );

    // A trip again is harmless; reset without the token changes nothing; with it, closes.
    let (status, _) = admin(&h, "POST", "/runtime/fallback/trip", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
    let (status, _) = admin(&h, "POST", "/runtime/fallback/reset", None).await;
    assert_eq!(status, 401);
    assert_eq!(fallback_status(&h).await["state"], "open");
    let (status, body) = admin(&h, "POST", "/runtime/fallback/reset", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let st = fallback_status(&h).await;
    assert_eq!(
        (st["fallbackEnabled"].clone(), st["state"].clone()),
        (json!(false), json!("closed")),
        "{st}"
    );
    let r = h.chat("org-a").session("after").send().await;
    assert_eq!(r.header("x-execution-mode"), Some("runtime_orchestrator"));
    assert_eq!(r.header("x-execution-reason"), Some("allowlist"));
    assert_eq!(h.runtime.work().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_are_refused_when_no_token_is_configured() {
    // An env var nobody sets (changing ADMIN_ENV would race the other tests of this process).
    const UNSET: &str = "CUTOVER_TEST_ADMIN_TOKEN_NEVER_SET";
    assert!(std::env::var(UNSET).is_err());
    let h = Harness::new()
        .config(|c| c.admin.token_env = UNSET.into())
        .start()
        .await;

    for path in ["/runtime/fallback/trip", "/runtime/fallback/reset"] {
        for token in [None, Some(ADMIN_TOKEN), Some(""), Some("anything")] {
            let (status, body) = admin(&h, "POST", path, token).await;
            assert_eq!(status, 401, "{path} with {token:?}: {body}");
        }
    }
    assert_eq!(fallback_status(&h).await["state"], "closed");
    let r = chat(h.proxy_addr, Some("org-a"), "s", HI).await;
    assert_eq!(r.header("x-execution-mode"), Some("runtime_orchestrator"));
    // Reads stay open.
    let (status, _) = admin(&h, "GET", "/runtime/metrics", None).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_endpoint_exports_the_source_document_names() {
    let h = Harness::new().start().await;
    let r = h.chat("org-a").session("s").send().await;
    assert!(r.complete);
    let r = h.chat("org-b").session("s").send().await;
    assert!(r.complete);

    let mut c = Client::connect(h.metrics_addr).await;
    c.send("GET", "/metrics", &[], b"").await;
    let r = c.read_response().await;
    assert_eq!(r.status, 200);
    let text = r.text();
    for name in [
        "chat_execution_total{mode=\"runtime_orchestrator\"}",
        "chat_execution_total{mode=\"direct_llm\"}",
        "chat_execution_success_total{mode=\"runtime_orchestrator\"}",
        "chat_execution_error_total{mode=",
        "chat_execution_timeout_total{mode=",
        "chat_execution_latency_ms_bucket{mode=\"runtime_orchestrator\"",
        "chat_runtime_fallback_enabled ",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
}
