//! `X-Forwarded-For`, `-Proto` and `-Host` on every request the proxy sends to legacy for a
//! caller, as legacy received them: a plain request on the lean path and through Pingora, a chat
//! routed to legacy, a chat failed over, and the conversation bridge's calls. A client's own
//! headers are kept only when it connects from a trusted hop (`identity.trusted_proxies`).

use crate::support;

use cutover_proxy::app::LocalServer;
use serde_json::json;
use support::legacy::FakeLegacy;
use support::*;

/// What the test client (on loopback, `host: proxy.test`) sends besides its request: forwarded
/// headers of its own, which only a trusted hop's are believed.
const CLAIMED: [(&str, &str); 3] = [
    ("x-forwarded-for", "203.0.113.66"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-host", "app.example.com"),
];

fn forwarded(r: &Received) -> (Option<&str>, Option<&str>, Option<&str>) {
    (
        r.header("x-forwarded-for"),
        r.header("x-forwarded-proto"),
        r.header("x-forwarded-host"),
    )
}

/// Each forwarded header arrived once.
fn once_each(r: &Received) {
    for name in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
        let n = r.headers_named(name).len();
        assert_eq!(n, 1, "{name} on {} {}: {:?}", r.method, r.path, r.headers);
    }
}

const THE_PROXY_S: (Option<&str>, Option<&str>, Option<&str>) =
    (Some("127.0.0.1"), Some("http"), Some("proxy.test"));

/// `CLAIMED` from a trusted hop: its chain kept with the hop's address appended, its proto and
/// host believed.
const CLAIMS_KEPT_HOP_APPENDED: (Option<&str>, Option<&str>, Option<&str>) = (
    Some("203.0.113.66, 127.0.0.1"),
    Some("https"),
    Some("app.example.com"),
);

async fn get(h: &Running, headers: &[(&str, &str)]) -> Response {
    request(h.proxy_addr, "GET", "/api/v1/agents?page=1", headers, b"").await
}

/// A chat as `org` carrying a client's own `X-Forwarded-*` claims.
async fn claimed_chat(h: &LocalServer, org: &str) -> Response {
    let auth = format!("Bearer {}", token(org));
    let mut headers = vec![
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    headers.extend_from_slice(&CLAIMED);
    request(
        h.proxy_addr,
        "POST",
        "/api/v1/chat/sessions/s-1",
        &headers,
        HI.as_bytes(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_request_carries_the_caller_s_address_on_either_path() {
    for lean in [true, false] {
        let h = Harness::new()
            .config(move |c| c.server.lean_passthrough = lean)
            .start()
            .await;
        let r = get(&h, &CLAIMED).await;
        assert_eq!(r.status, 200, "lean {lean}");
        let got = &h.legacy.received()[0];
        once_each(got);
        assert_eq!(
            forwarded(got),
            THE_PROXY_S,
            "lean {lean}: a client's own claims"
        );
        let r = get(&h, &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            forwarded(&h.legacy.received()[1]),
            THE_PROXY_S,
            "lean {lean}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_hop_s_chain_is_kept_and_its_address_appended() {
    for lean in [true, false] {
        let h = Harness::new()
            .config(move |c| {
                c.server.lean_passthrough = lean;
                c.identity.trusted_proxies = vec!["127.0.0.0/8".into()];
            })
            .start()
            .await;
        get(&h, &CLAIMED).await;
        let got = &h.legacy.received()[0];
        once_each(got);
        assert_eq!(forwarded(got), CLAIMS_KEPT_HOP_APPENDED, "lean {lean}");
    }
    // A trusted list that does not hold the peer believes nothing it sent.
    let h = Harness::new()
        .config(|c| c.identity.trusted_proxies = vec!["10.0.0.0/8".into()])
        .start()
        .await;
    get(&h, &CLAIMED).await;
    assert_eq!(forwarded(&h.legacy.received()[0]), THE_PROXY_S);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_routed_to_legacy_and_failed_over_carry_it_too() {
    let failing = |req: &Received| {
        if req.path == "/health" {
            Reply::json(200, json!({"status": "ok"}))
        } else {
            Reply::json(500, json!({"detail": "boom"}))
        }
    };
    for lean_runtime in [true, false] {
        let h = Harness::new()
            .runtime(failing)
            .config(move |c| c.server.lean_runtime = lean_runtime)
            .start()
            .await;
        // org-b is not on the allowlist: legacy's chat.
        assert_served(&claimed_chat(&h, "org-b").await, DIRECT, "default");
        // org-a's chat: the runtime answers 500, the chat fails over.
        assert_served(&claimed_chat(&h, "org-a").await, DIRECT, "failover");
        let chats = h.legacy.received();
        assert_eq!(chats.len(), 2, "lean_runtime {lean_runtime}");
        for got in &chats {
            once_each(got);
            assert_eq!(forwarded(got), THE_PROXY_S, "lean_runtime {lean_runtime}");
        }
        assert_eq!(h.runtime.work().len(), 1, "the runtime was tried once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_s_calls_carry_the_caller_s_address() {
    let legacy = FakeLegacy::seeded().await;
    let h = Harness::new()
        .bridged(legacy)
        .config(|c| c.identity.trusted_proxies = vec!["127.0.0.1".into()])
        .start()
        .await;
    assert_served(&claimed_chat(&h, "org-a").await, RT, "allowlist");
    let calls = h.legacy.received();
    // The session, the agent and the history; the user's message and the answer.
    assert_eq!(calls.len(), 5, "{calls:?}");
    for got in &calls {
        once_each(got);
        assert_eq!(
            forwarded(got),
            CLAIMS_KEPT_HOP_APPENDED,
            "{} {}",
            got.method,
            got.path
        );
    }
    // The runtime is not legacy: it gets none of them.
    assert_eq!(h.runtime.work()[0].header("x-forwarded-for"), None);
}
