//! Browsers on another origin: every response the proxy makes itself (a runtime chat, its own
//! refusals and errors) carries the CORS headers legacy's Express `cors` would have sent for the
//! same request; legacy's own answers pass as legacy sent them, and a drift between the two is
//! counted. Chats reach legacy without compression; other requests keep their Accept-Encoding.

use crate::support;

use serde_json::json;
use support::*;

const APP: &str = "http://127.0.0.1:5173";
const EXPOSED: &str = "X-RateLimit-Limit,X-RateLimit-Remaining,X-RateLimit-Reset";

fn chat_path(session: &str) -> String {
    format!("/api/v1/chat/sessions/{session}")
}

/// A chat as `org` from a page on `origin`, as the web app's `fetch` sends it.
async fn browser_chat(h: &Running, org: &str, origin: Option<&str>, body: &str) -> Response {
    let auth = format!("Bearer {}", token(org));
    let mut headers = vec![
        ("content-type", "application/json"),
        ("accept", "text/event-stream"),
        ("accept-encoding", "gzip, deflate, br, zstd"),
        ("authorization", auth.as_str()),
    ];
    if let Some(o) = origin {
        headers.push(("origin", o));
    }
    request(
        h.proxy_addr,
        "POST",
        &chat_path("s-cors"),
        &headers,
        body.as_bytes(),
    )
    .await
}

#[track_caller]
fn assert_cors(r: &Response, allow_origin: Option<&str>, vary: bool) {
    assert_eq!(
        r.header("access-control-allow-origin"),
        allow_origin,
        "{:?}",
        r.headers
    );
    assert_eq!(
        r.header("vary"),
        vary.then_some("Origin"),
        "{:?}",
        r.headers
    );
    assert_eq!(
        r.header("access-control-allow-credentials"),
        Some("true"),
        "{:?}",
        r.headers
    );
    assert_eq!(
        r.header("access-control-expose-headers"),
        Some(EXPOSED),
        "{:?}",
        r.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_chat_carries_legacy_s_default_cors_headers() {
    let h = Harness::new()
        .config(|c| c.cors.origin_env = String::new())
        .start()
        .await;
    let r = browser_chat(&h, "org-a", Some(APP), HI).await;
    assert_served(&r, RT, "allowlist");
    assert_eq!(event_names(&r).last().map(String::as_str), Some("done"));
    // `cors({origin: '*', credentials: true, exposedHeaders: [...]})`: a star, not the origin.
    assert_cors(&r, Some("*"), false);
    // The same without an Origin: `*` does not depend on the request.
    let r = browser_chat(&h, "org-a", None, HI).await;
    assert_cors(&r, Some("*"), false);
    // Preflights stay legacy's: the proxy answers none itself.
    let pre = request(
        h.proxy_addr,
        "OPTIONS",
        &chat_path("s-cors"),
        &[
            ("origin", APP),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization,content-type",
            ),
        ],
        b"",
    )
    .await;
    assert_eq!(pre.json()["method"], "OPTIONS", "{}", pre.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_legacy_reads_from_its_env_var_is_the_proxy_s_too() {
    const ENV: &str = "CUTOVER_TEST_CORS_ORIGIN_FIXED";
    std::env::set_var(ENV, APP);
    let h = Harness::new()
        .config(|c| c.cors.origin_env = ENV.into())
        .start()
        .await;
    let r = browser_chat(&h, "org-a", Some("http://elsewhere.example"), HI).await;
    assert_served(&r, RT, "allowlist");
    // A string origin is sent as is, whatever the request's, and varies by Origin.
    assert_cors(&r, Some(APP), true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflecting_origins_and_the_proxy_s_own_refusals_and_errors() {
    // A port held bound but never listening: connecting to it is refused, and no other test's
    // server can take it meanwhile.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead = held.local_addr().unwrap().to_string();
    let h = Harness::new()
        .config(|c| {
            c.cors.origin = Some(cutover_proxy::core::cors::OriginSetting::Flag(true));
            c.limits.max_chat_body_bytes = 1024;
        })
        .start()
        .await;
    let r = browser_chat(&h, "org-a", Some(APP), HI).await;
    assert_served(&r, RT, "allowlist");
    assert_cors(&r, Some(APP), true);

    // The proxy's refusals: a body over the limit (413), a body that is not a chat (400).
    let big = format!(r#"{{"message":"{}"}}"#, "x".repeat(2000));
    let r = browser_chat(&h, "org-a", Some(APP), &big).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_cors(&r, Some(APP), true);
    let r = browser_chat(&h, "org-a", Some(APP), "not json").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_cors(&r, Some(APP), true);
    assert_eq!(r.json()["error"]["code"], "INVALID_REQUEST");

    // Legacy down: the proxy's 502, on the lean passthrough and through Pingora.
    for lean in [true, false] {
        let dead = dead.clone();
        let down = Harness::new()
            .config(move |c| {
                c.cors.origin = Some(cutover_proxy::core::cors::OriginSetting::Flag(true));
                c.legacy.address = dead;
                c.server.lean_passthrough = lean;
            })
            .start()
            .await;
        let r = request(
            down.proxy_addr,
            "GET",
            "/api/v1/sessions",
            &[("origin", APP)],
            b"",
        )
        .await;
        assert_eq!(r.status, 502, "lean {lean}");
        assert_cors(&r, Some(APP), true);
        // A legacy chat that cannot reach legacy: Pingora's error, with CORS too.
        let r = browser_chat(&down, "org-z", Some(APP), HI).await;
        assert_eq!(r.status, 502, "lean {lean}");
        assert_cors(&r, Some(APP), true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_allows_only_listed_origins() {
    let h = Harness::new()
        .config(|c| {
            c.cors.origin = Some(cutover_proxy::core::cors::OriginSetting::List(vec![
                APP.into(),
                "https://app.example".into(),
            ]))
        })
        .start()
        .await;
    let r = browser_chat(&h, "org-a", Some("https://app.example"), HI).await;
    assert_cors(&r, Some("https://app.example"), true);
    let r = browser_chat(&h, "org-a", Some("https://evil.example"), HI).await;
    assert_served(&r, RT, "allowlist");
    assert_cors(&r, None, true);
}

/// A legacy whose chats answer with `cors` headers of its own (`allow`), for the drift check.
fn legacy_with_cors(allow: &'static str) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    move |req: &Received| {
        let mut reply = echo_legacy(req);
        reply.headers.extend([
            ("access-control-allow-origin".into(), allow.into()),
            ("access-control-allow-credentials".into(), "true".into()),
            ("access-control-expose-headers".into(), EXPOSED.into()),
        ]);
        reply
    }
}

/// A proxy with the default CORS policy (no origin from the environment) in front of
/// [`legacy_with_cors`].
async fn proxy_before_legacy_with_cors(allow: &'static str) -> Running {
    Harness::new()
        .legacy(legacy_with_cors(allow))
        .config(|c| c.cors.origin_env = String::new())
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_drifted_from_legacy_s_is_counted() {
    let h = proxy_before_legacy_with_cors("*").await;
    let r = browser_chat(&h, "org-z", Some(APP), HI).await;
    assert_served(&r, DIRECT, "default");
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(metric(&h, "cutover_cors_mismatch_total", &[]), 0.0);

    let drifted = proxy_before_legacy_with_cors("https://app.example").await;
    let r = browser_chat(&drifted, "org-z", Some(APP), HI).await;
    // Legacy's answer passes as legacy sent it.
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(metric(&drifted, "cutover_cors_mismatch_total", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_reach_legacy_uncompressed_and_other_requests_keep_their_encoding() {
    let h = Harness::new().start().await;
    let r = browser_chat(&h, "org-z", Some(APP), HI).await;
    assert_served(&r, DIRECT, "default");
    let r = request(
        h.proxy_addr,
        "GET",
        "/api/v1/sessions",
        &[("accept-encoding", "gzip, br")],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = h.legacy.work();
    let chat = seen
        .iter()
        .find(|w| w.path.starts_with("/api/v1/chat/"))
        .unwrap();
    assert_eq!(chat.header("accept-encoding"), Some("identity"));
    let other = seen.iter().find(|w| w.path == "/api/v1/sessions").unwrap();
    assert_eq!(other.header("accept-encoding"), Some("gzip, br"));

    // A failed-over chat is a chat too.
    let failing = Harness::new()
        .runtime(runtime_answering(|_: &Received| {
            Reply::json(500, json!({"detail": "boom"}))
        }))
        .start()
        .await;
    let r = browser_chat(&failing, "org-a", Some(APP), HI).await;
    assert_served(&r, DIRECT, "failover");
    let seen = failing.legacy.work();
    assert_eq!(seen[0].header("accept-encoding"), Some("identity"));

    let off = Harness::new()
        .config(|c| c.legacy.chat_identity_encoding = false)
        .start()
        .await;
    browser_chat(&off, "org-z", Some(APP), HI).await;
    assert_eq!(
        off.legacy.work()[0].header("accept-encoding"),
        Some("gzip, deflate, br, zstd")
    );
}
