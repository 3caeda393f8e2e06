//! Identity: only a caller whose org is verified can reach the runtime; a client's own org header
//! is never believed unless the config names the header an ingress sets, and that header never
//! reaches legacy.

use crate::support;

use serde_json::json;
use support::*;

const BODY: &str = r#"{"message":"hello"}"#;

/// POST a chat message on session `s-id` with exactly these extra headers.
async fn chat_with(addr: std::net::SocketAddr, headers: &[(&str, &str)]) -> Response {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    request(
        addr,
        "POST",
        "/api/v1/chat/sessions/s-id",
        &all,
        BODY.as_bytes(),
    )
    .await
}

const LEGACY_NO_IDENTITY: (Option<&str>, Option<&str>) = (Some("direct_llm"), Some("no_identity"));
const RUNTIME_ALLOWLIST: (Option<&str>, Option<&str>) =
    (Some("runtime_orchestrator"), Some("allowlist"));

fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | *b as u32) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn signed_with(secret: &str, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[test]
fn b64url_matches_the_jwt_encoding() {
    // The payload segment jsonwebtoken writes is the unpadded base64url of the claims JSON.
    let t = token_with(json!({"orgId": "org-a"}));
    assert_eq!(
        t.split('.').nth(1).unwrap(),
        b64url(br#"{"orgId":"org-a"}"#)
    );
    assert_eq!(b64url(b"ab"), "YWI");
    assert_eq!(b64url(b"a"), "YQ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unverifiable_callers_are_served_by_legacy_and_never_reach_the_runtime() {
    let h = Harness::new().start().await;

    let exp = now() + 3600;
    let org_a = json!({"orgId": "org-a", "userId": "user-1", "exp": exp});
    let valid = token("org-a");
    let segments: Vec<&str> = valid.split('.').collect();
    let (head, sig) = (segments[0], segments[2]);
    // Every token below names org-a, which is allowlisted: only verification keeps it out.
    let cases: Vec<(&str, Option<String>)> = vec![
        (
            "expired",
            Some(token_with(json!({"orgId": "org-a", "exp": now() - 120}))),
        ),
        (
            "wrong signature",
            Some(signed_with("not-the-secret", org_a.clone())),
        ),
        (
            "alg none",
            Some(format!(
                "{}.{}.",
                b64url(br#"{"alg":"none","typ":"JWT"}"#),
                b64url(org_a.to_string().as_bytes())
            )),
        ),
        (
            "payload swapped under a valid signature",
            Some(format!(
                "{head}.{}.{sig}",
                b64url(
                    json!({"orgId": "org-a", "userId": "admin", "exp": exp})
                        .to_string()
                        .as_bytes()
                )
            )),
        ),
        ("garbage", Some("not-a-jwt".into())),
        ("three garbage segments", Some("aaa.bbb.ccc".into())),
        (
            "without orgId",
            Some(token_with(json!({"userId": "user-1", "exp": exp}))),
        ),
        (
            "empty orgId",
            Some(token_with(json!({"orgId": "", "exp": exp}))),
        ),
        ("without exp", Some(token_with(json!({"orgId": "org-a"})))),
        ("missing Authorization", None),
    ];
    for (i, (name, tok)) in cases.iter().enumerate() {
        let auth = tok.as_ref().map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let r = chat_with(h.proxy_addr, &headers).await;
        assert_eq!(r.status, 200, "{name}");
        assert_eq!(mode_reason(&r), LEGACY_NO_IDENTITY, "{name}");
        assert!(r.text().contains("legacy"), "{name}: {}", r.text());
        let got = h.legacy.work();
        assert_eq!(got.len(), i + 1, "{name}");
        // Legacy answers it as before: same body, same Authorization.
        assert_eq!(got[i].body, BODY.as_bytes(), "{name}");
        assert_eq!(got[i].header("authorization"), auth.as_deref(), "{name}");
    }
    // A Basic credential is not a bearer token either.
    let r = chat_with(h.proxy_addr, &[("authorization", "Basic dXNlcjpwYXNz")]).await;
    assert_eq!(mode_reason(&r), LEGACY_NO_IDENTITY);
    assert!(
        h.runtime.work().is_empty(),
        "an unverified caller reached the runtime"
    );

    // Control: the same request with a valid token is served by the runtime.
    let auth = format!("Bearer {valid}");
    let r = chat_with(h.proxy_addr, &[("authorization", &auth)]).await;
    assert_eq!(mode_reason(&r), RUNTIME_ALLOWLIST);
    assert_eq!(h.runtime.work().len(), 1);
    assert_eq!(h.runtime.work()[0].json()["org_id"], "org-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_org_header_is_not_trusted_by_default() {
    let h = Harness::new().start().await;

    // No JWT, a forged org header naming the allowlisted org.
    let r = chat_with(h.proxy_addr, &[("x-org-id", "org-a")]).await;
    assert_eq!(mode_reason(&r), LEGACY_NO_IDENTITY);

    // A verified org-b caller claiming org-a in a header stays org-b.
    let auth = format!("Bearer {}", token("org-b"));
    let r = chat_with(
        h.proxy_addr,
        &[("authorization", &auth), ("x-org-id", "org-a")],
    )
    .await;
    assert_eq!(mode_reason(&r), (Some("direct_llm"), Some("default")));

    assert!(h.runtime.work().is_empty());
    // With no trusted header configured the header is just another header: legacy gets it as sent.
    let got = h.legacy.work();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|r| r.header("x-org-id") == Some("org-a")));
}

fn trusting() -> Harness {
    Harness::new().config(|c| c.identity.trusted_org_header = Some("x-org-id".into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_ingress_header_names_the_org() {
    let h = trusting().start().await;

    // The ingress authenticated the caller: no JWT needed.
    let r = chat_with(h.proxy_addr, &[("x-org-id", "org-a")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(mode_reason(&r), RUNTIME_ALLOWLIST);
    let sent = h.runtime.work()[0].json();
    assert_eq!(sent["org_id"], "org-a");
    assert_eq!(sent["metadata"]["user_id"], serde_json::Value::Null);
    assert_eq!(h.runtime.work()[0].header("x-org-id"), None);

    // A token of the same org adds the user; one of another org is a conflict (below).
    let auth = format!("Bearer {}", token("org-a"));
    let r = chat_with(
        h.proxy_addr,
        &[("authorization", &auth), ("x-org-id", "org-a")],
    )
    .await;
    assert_eq!(mode_reason(&r), RUNTIME_ALLOWLIST);
    let sent = h.runtime.work()[1].json();
    assert_eq!(sent["org_id"], "org-a");
    assert_eq!(sent["metadata"]["user_id"], "user-1");

    // Header absent or empty: the JWT decides, as without the setting.
    let auth = format!("Bearer {}", token("org-a"));
    let r = chat_with(h.proxy_addr, &[("authorization", &auth)]).await;
    assert_eq!(mode_reason(&r), RUNTIME_ALLOWLIST);
    let r = chat_with(h.proxy_addr, &[("x-org-id", "  ")]).await;
    assert_eq!(mode_reason(&r), LEGACY_NO_IDENTITY);
    assert_eq!(h.runtime.work().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_another_org_than_the_ingress_header_is_served_by_legacy() {
    let h = Harness::new()
        .config(|cfg| {
            cfg.identity.trusted_org_header = Some("x-org-id".into());
            cfg.rollout.runtime_orgs = vec!["org-a".into(), "org-b".into()];
        })
        .start()
        .await;

    // Both orgs are allowlisted: only the conflict keeps this off the runtime.
    let auth = format!("Bearer {}", token("org-b"));
    let r = chat_with(
        h.proxy_addr,
        &[("authorization", &auth), ("X-Org-Id", "org-a")],
    )
    .await;
    assert_served(&r, DIRECT, "identity_conflict");
    assert!(h.runtime.work().is_empty(), "{:?}", h.runtime.work());
    // Legacy judges the caller by its token as always, and never sees the header.
    let got = h.legacy.work();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header("authorization"), Some(auth.as_str()));
    assert_eq!(got[0].header("x-org-id"), None);
    assert_eq!(
        metric(
            &h,
            "chat_identity_unverified_total",
            &[("cause", "conflict")]
        ),
        1.0
    );
    assert!(
        eventually(std::time::Duration::from_secs(3), || metric(
            &h,
            "chat_requests_total",
            &[("reason", "identity_conflict"), ("mode", DIRECT)]
        ) == 1.0)
        .await
    );

    // The same token and header agreeing reach the runtime as that org.
    let r = chat_with(
        h.proxy_addr,
        &[("authorization", &auth), ("x-org-id", "org-b")],
    )
    .await;
    assert_served(&r, RT, "allowlist");
    let sent = h.runtime.work()[0].json();
    assert_eq!(sent["org_id"], "org-b");
    assert_eq!(sent["metadata"]["user_id"], "user-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trusted_header_is_dropped_on_the_way_to_legacy() {
    let h = trusting().start().await;

    // A legacy-bound chat (org-b is not allowlisted) ...
    let r = chat_with(h.proxy_addr, &[("x-org-id", "org-b"), ("x-keep", "1")]).await;
    assert_eq!(mode_reason(&r), (Some("direct_llm"), Some("default")));
    // ... an unverified one ...
    let r = chat_with(h.proxy_addr, &[("x-org-id", ""), ("x-keep", "2")]).await;
    assert_eq!(mode_reason(&r), LEGACY_NO_IDENTITY);
    // ... and a request that is not a chat at all.
    let r = request(
        h.proxy_addr,
        "GET",
        "/api/v1/agents",
        &[
            ("x-org-id", "org-a"),
            ("X-Org-Id", "org-c"),
            ("x-keep", "3"),
        ],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);

    let got = h.legacy.work();
    assert_eq!(got.len(), 3);
    for (i, req) in got.iter().enumerate() {
        assert_eq!(
            req.header("x-org-id"),
            None,
            "request {i} kept the trusted header"
        );
        assert_eq!(req.header("x-keep"), Some((i + 1).to_string().as_str()));
    }
    assert!(h.runtime.work().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_trusted_header_is_ambiguous_and_not_trusted() {
    let h = trusting().start().await;

    // A client copy plus an ingress copy appended after it: neither can be told apart.
    let r = chat_with(
        h.proxy_addr,
        &[("x-org-id", "org-a"), ("x-org-id", "org-b")],
    )
    .await;
    assert_eq!(mode_reason(&r), LEGACY_NO_IDENTITY);
    let r = chat_with(
        h.proxy_addr,
        &[("x-org-id", "org-b"), ("x-org-id", "org-a")],
    )
    .await;
    assert_eq!(mode_reason(&r), LEGACY_NO_IDENTITY);
    assert!(h.runtime.work().is_empty());
    assert!(h
        .legacy
        .work()
        .iter()
        .all(|r| r.header("x-org-id").is_none()));

    // A verified token still identifies the caller.
    let auth = format!("Bearer {}", token("org-a"));
    let r = chat_with(
        h.proxy_addr,
        &[
            ("authorization", &auth),
            ("x-org-id", "org-b"),
            ("x-org-id", "org-c"),
        ],
    )
    .await;
    assert_eq!(mode_reason(&r), RUNTIME_ALLOWLIST);
    assert_eq!(h.runtime.work()[0].json()["org_id"], "org-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_nobody_is_verified() {
    let h = Harness::new()
        .config(move |cfg| {
            cfg.identity.jwt_secret_env = "CUTOVER_TEST_JWT_SECRET_NEVER_SET".into();
        })
        .start()
        .await;

    let r = chat(h.proxy_addr, Some("org-a"), "s-1", BODY).await;
    assert_eq!(r.status, 200);
    assert_eq!(mode_reason(&r), LEGACY_NO_IDENTITY);
    assert_eq!(h.legacy.work().len(), 1);
    assert!(h.runtime.work().is_empty());
}
