//! Runtime files through the proxy: a `file_created` event reaches the client as a link to the
//! proxy's own route, signed for the org whose stream made it; the link downloads the runtime's
//! bytes for that org only, from any replica with the same config, and everything else is 404.

use crate::support;

use std::time::Duration;

use cutover_proxy::core::config::Config;
use cutover_proxy::core::files::{self, FileKey};
use serde_json::json;
use support::*;

const PDF: &[u8] = b"%PDF-1.7 the runtime's own bytes\x00\x01\x02";
/// The runtime's own URL for a file: a host browsers cannot reach, and that the proxy never uses.
const RUNTIME_URL: &str = "http://runtime.internal:8000/api/v1/files/f-1/download?v=1";
const BIG_URL: &str = "http://runtime.internal:8000/api/v1/files/f-big/download";
const FILE_KEY_ENV: &str = "CUTOVER_TEST_FILE_URL_KEY";

fn file_created(id: &str, url: &str) -> Vec<u8> {
    frame(
        "file_created",
        json!({"file_id": id, "filename": "报告.pdf", "mime_type": "application/pdf", "size": PDF.len(), "url": url}),
    )
}

/// A runtime whose executions create two files, and that serves them: f-1 whole with a
/// Content-Length, f-big chunked in two halves with a pause the test ends.
fn files_runtime(req: &Received) -> Reply {
    match (req.method.as_str(), req.path.as_str()) {
        (_, "/health") => Reply::json(200, json!({"status": "ok"})),
        ("GET", "/api/v1/files/f-1/download?v=1") => Reply {
            status: 200,
            headers: vec![
                ("content-type".into(), "application/pdf".into()),
                (
                    "content-disposition".into(),
                    "attachment; filename=\"report.pdf\"".into(),
                ),
                ("x-runtime-internal".into(), "secret".into()),
            ],
            steps: vec![],
            fixed_body: Some(PDF.to_vec()),
            no_head: false,
        },
        ("GET", "/api/v1/files/f-big/download") => Reply {
            status: 200,
            headers: vec![("content-type".into(), "application/octet-stream".into())],
            steps: vec![
                Step::Send(vec![b'a'; 100_000]),
                Step::WaitRelease,
                Step::Send(vec![b'b'; 100_000]),
            ],
            fixed_body: None,
            no_head: false,
        },
        ("GET", _) => Reply::json(404, json!({"detail": "no such file"})),
        _ => Reply::sse(vec![
            Step::Send(file_created("f-1", RUNTIME_URL)),
            Step::Send(file_created("f-big", BIG_URL)),
            Step::Send(file_created("f-gone", "/api/v1/files/f-gone/download")),
            Step::Send(frame(
                "execution_complete",
                json!({"final_response": "here you are"}),
            )),
            Step::Send(done_frame()),
        ]),
    }
}

/// The `url` of every `file` message of a chat as `org`.
async fn file_links(h: &Running, org: &str) -> Vec<String> {
    let r = h.chat(org).send().await;
    assert_served(&r, RT, "allowlist");
    r.events()
        .iter()
        .filter(|(event, _)| event == "message")
        .map(|(_, data)| serde_json::from_str::<serde_json::Value>(data).unwrap())
        .filter(|m| m["type"] == "file")
        .map(|m| {
            assert_eq!(m["data"]["filename"], "报告.pdf");
            assert_eq!(m["data"]["mimeType"], "application/pdf");
            assert_eq!(m["data"]["size"], PDF.len());
            m["data"]["url"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// A proxy in front of `files_runtime`, with `tweak`, and the file links org-a's chat got.
async fn with_org_a_links(tweak: impl FnOnce(&mut Config) + 'static) -> (Running, Vec<String>) {
    let h = Harness::new()
        .runtime(files_runtime)
        .config(tweak)
        .start()
        .await;
    let links = file_links(&h, "org-a").await;
    (h, links)
}

/// GET `url` on the proxy, as `org` when given.
async fn download(addr: std::net::SocketAddr, url: &str, org: Option<&str>) -> Response {
    let auth = org.map(|o| format!("Bearer {}", token(o)));
    let headers: Vec<(&str, &str)> = auth
        .iter()
        .map(|a| ("authorization", a.as_str()))
        .chain([("x-request-id", "req-file-1")])
        .collect();
    request(addr, "GET", url, &headers, b"").await
}

#[track_caller]
fn assert_not_found(r: &Response) {
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.text(), "Not Found", "a refusal says nothing more");
}

fn query_of(url: &str) -> &str {
    url.split_once('?').unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_link_downloads_the_runtime_bytes_for_its_own_org_only() {
    let h = Harness::new()
        .runtime(files_runtime)
        .config(|cfg| cfg.rollout.runtime_orgs = vec!["org-a".into(), "org-b".into()])
        .start()
        .await;
    let links = file_links(&h, "org-a").await;
    assert_eq!(links.len(), 3, "{links:?}");
    let link = &links[0];
    assert!(link.starts_with("/api/v1/runtime/files/f-1?exp="), "{link}");
    assert!(!link.contains("runtime.internal:8000/"), "{link}");

    let r = download(h.proxy_addr, link, Some("org-a")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.complete);
    assert_eq!(r.body(), PDF);
    assert_eq!(r.header("content-type"), Some("application/pdf"));
    assert_eq!(
        r.header("content-disposition"),
        Some("attachment; filename=\"report.pdf\"")
    );
    assert_eq!(
        r.header("content-length"),
        Some(PDF.len().to_string().as_str())
    );
    assert_eq!(r.header("x-runtime-internal"), None);
    assert_eq!(r.header("cache-control"), Some("private, no-store"));

    // Fetched from the configured runtime, by path: never the host the link names, never with
    // the caller's token.
    let fetched: Vec<_> = h
        .runtime
        .work()
        .into_iter()
        .filter(|r| r.method == "GET")
        .collect();
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0].path, "/api/v1/files/f-1/download?v=1");
    assert_eq!(
        fetched[0].header("host"),
        Some(h.runtime.address().as_str())
    );
    assert_eq!(fetched[0].header("authorization"), None);
    assert_eq!(fetched[0].header("x-request-id"), Some("req-file-1"));

    // Another org, no token, a token that does not verify: the same bare 404.
    assert_not_found(&download(h.proxy_addr, link, Some("org-b")).await);
    assert_not_found(&download(h.proxy_addr, link, None).await);
    let forged = request(
        h.proxy_addr,
        "GET",
        link,
        &[("authorization", "Bearer not.a.token")],
        b"",
    )
    .await;
    assert_not_found(&forged);
    // org-b's own link to the same file is org-b's, not org-a's.
    let b_link = &file_links(&h, "org-b").await[0];
    assert_eq!(
        download(h.proxy_addr, b_link, Some("org-b")).await.status,
        200
    );
    assert_not_found(&download(h.proxy_addr, b_link, Some("org-a")).await);

    // A file the runtime no longer has is a 404 too, not the runtime's answer.
    let r = download(h.proxy_addr, &links[2], Some("org-a")).await;
    assert_not_found(&r);
    assert!(!r.text().contains("no such file"));

    // Only GET, and the route is the proxy's own: legacy never sees it.
    let r = request(h.proxy_addr, "POST", link, &[], b"x").await;
    assert_not_found(&r);
    assert!(h.legacy.work().is_empty(), "{:?}", h.legacy.work());

    let served = metric(
        &h,
        "cutover_runtime_file_requests_total",
        &[("result", "served")],
    );
    let refused = metric(
        &h,
        "cutover_runtime_file_requests_total",
        &[("result", "refused")],
    );
    assert_eq!((served, refused), (2.0, 6.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_and_expired_links_are_404() {
    let (h, mut links) = with_org_a_links(|_| {}).await;
    let link = links.remove(0);
    let query = query_of(&link);

    let sig_at = link.find("sig=").unwrap() + 4;
    let mut flipped = link.clone().into_bytes();
    flipped[sig_at] = if flipped[sig_at] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).unwrap();
    let exp: u64 = query
        .split('&')
        .find_map(|p| p.strip_prefix("exp="))
        .unwrap()
        .parse()
        .unwrap();
    let tampered = [
        flipped,
        // Another file id with f-1's signature.
        format!("/api/v1/runtime/files/f-big?{query}"),
        // A later expiry, another runtime path, a dropped parameter.
        link.replace(&format!("exp={exp}"), &format!("exp={}", exp + 3600)),
        link.replace("f-1%2Fdownload", "f-big%2Fdownload"),
        link[..link.find("&sig=").unwrap()].to_owned(),
        // Path tricks around the one id segment.
        format!("/api/v1/runtime/files/f-1/x?{query}"),
        format!("/api/v1/runtime/files/?{query}"),
    ];
    for url in &tampered {
        assert_ne!(url, &link);
        let r = download(h.proxy_addr, url, Some("org-a")).await;
        assert_eq!(r.status, 404, "{url}: {}", r.text());
    }

    // Signed with the instance's own key (derived from the JWT secret: no file_url_secret_env
    // is set) but with an expiry already past.
    let key = FileKey::derived_from_jwt_secret(JWT_SECRET.as_bytes());
    let expired = files::sign(&key, "org-a", "f-1", RUNTIME_URL, now() - 1);
    let r = download(
        h.proxy_addr,
        &format!("/api/v1/runtime/files/f-1?{expired}"),
        Some("org-a"),
    )
    .await;
    assert_not_found(&r);
    // The same key and a future expiry: the link is good, so the refusal above was the expiry.
    let fresh = files::sign(&key, "org-a", "f-1", RUNTIME_URL, now() + 60);
    let r = download(
        h.proxy_addr,
        &format!("/api/v1/runtime/files/f-1?{fresh}"),
        Some("org-a"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body(), PDF);
    let fetched = h.runtime.work().into_iter().filter(|r| r.method == "GET");
    assert_eq!(fetched.count(), 1, "refused links never reach the runtime");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_made_by_one_replica_downloads_from_another() {
    std::env::set_var(FILE_KEY_ENV, "shared-file-link-key");
    let (h, mut links) = with_org_a_links(|cfg| {
        cfg.runtime.file_url_secret_env = FILE_KEY_ENV.into();
        cfg.runtime.file_url_ttl_secs = 120;
    })
    .await;
    let link = links.remove(0);
    let exp: u64 = query_of(&link)
        .split('&')
        .find_map(|p| p.strip_prefix("exp="))
        .unwrap()
        .parse()
        .unwrap();
    assert!((now() + 115..=now() + 120).contains(&exp), "{exp}");

    let mut cfg: Config = config(&h.legacy.address(), &h.runtime.address());
    cfg.runtime.file_url_secret_env = FILE_KEY_ENV.into();
    cfg.runtime.file_url_ttl_secs = 120;
    // A replica: a second proxy in front of the same upstreams, which a Harness does not share.
    let replica = proxy(cfg.clone()).await;
    let r = download(replica.proxy_addr, &link, Some("org-a")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body(), PDF);

    // A replica with another link key cannot vouch for it.
    cfg.runtime.file_url_secret_env = "CUTOVER_TEST_FILE_URL_KEY_UNSET".into();
    let stranger = proxy(cfg).await;
    assert_not_found(&download(stranger.proxy_addr, &link, Some("org-a")).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_streams_as_the_runtime_sends_it() {
    let (h, mut links) = with_org_a_links(|_| {}).await;
    let big = links.remove(1);
    let auth = format!("Bearer {}", token("org-a"));
    let mut c = Client::connect(h.proxy_addr).await;
    c.send("GET", &big, &[("authorization", &auth)], b"").await;
    // The runtime holds its second half until the client has bytes of the first: a proxy that
    // buffered the file whole would never answer.
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        c.read_response_with(|_| h.runtime.release()),
    )
    .await
    .expect("the first half did not arrive before the second was sent");
    assert_eq!(r.status, 200);
    assert!(r.complete);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    let body = r.body();
    assert_eq!(body.len(), 200_000);
    assert!(body[..100_000].iter().all(|b| *b == b'a'));
    assert!(body[100_000..].iter().all(|b| *b == b'b'));
}

/// GET `url` as a browser opens a plain `<a href>`: no `Authorization`, the app's cookies.
async fn open_link(addr: std::net::SocketAddr, url: &str, cookie: &str) -> Response {
    request(
        addr,
        "GET",
        url,
        &[("cookie", cookie), ("origin", "http://127.0.0.1:5173")],
        b"",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_link_downloads_with_the_auth_token_cookie() {
    let (h, mut links) = with_org_a_links(|c| c.cors.origin_env = String::new()).await;
    let link = links.remove(0);

    let cookies = format!("theme=dark; auth_token={}; lang=zh", token("org-a"));
    let r = open_link(h.proxy_addr, &link, &cookies).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body(), PDF);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));

    // A cookie that does not verify is refused exactly like such a header.
    let forged = token_with(json!({"orgId": "org-a", "exp": now() + 60}))
        .rsplit_once('.')
        .map(|(head, _)| format!("{head}.AAAA"))
        .unwrap();
    let expired = token_with(json!({"orgId": "org-a", "exp": now() - 60}));
    for bad in [
        format!("auth_token={forged}"),
        format!("auth_token={expired}"),
        format!("auth_token={}", token("org-b")),
        format!("other={}", token("org-a")),
    ] {
        let r = open_link(h.proxy_addr, &link, &bad).await;
        assert_not_found(&r);
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some("*"),
            "CORS on the 404 too"
        );
    }

    // The header wins: one that speaks for another org is not rescued by a good cookie.
    let other = format!("Bearer {}", token("org-b"));
    let r = request(
        h.proxy_addr,
        "GET",
        &link,
        &[
            ("authorization", other.as_str()),
            ("cookie", cookies.as_str()),
        ],
        b"",
    )
    .await;
    assert_not_found(&r);

    // Chats read the header alone, as legacy's auth does: a cookie-only chat is not identified.
    let chat = request(
        h.proxy_addr,
        "POST",
        "/api/v1/chat/sessions/s-cookie",
        &[
            ("content-type", "application/json"),
            ("cookie", cookies.as_str()),
        ],
        HI.as_bytes(),
    )
    .await;
    assert_served(&chat, DIRECT, "no_identity");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_cookie_can_be_turned_off() {
    let (h, mut links) = with_org_a_links(|c| c.identity.token_cookie = String::new()).await;
    let link = links.remove(0);
    let r = open_link(
        h.proxy_addr,
        &link,
        &format!("auth_token={}", token("org-a")),
    )
    .await;
    assert_not_found(&r);
    assert_eq!(
        download(h.proxy_addr, &link, Some("org-a")).await.status,
        200
    );
}
