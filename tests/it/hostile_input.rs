//! Hostile input, from both sides: each gets a clear, bounded answer, and the proxy stays up.
//!
//! Client side: malformed request lines and headers, oversized headers, conflicting framing,
//! huge or non-UTF-8 chat bodies, forged and broken JWTs. Runtime side: binary garbage, a line
//! that never ends, a 100 MB frame, silence after the head or no head at all, a head that is not
//! HTTP. After each, a normal request still works (`still_serves`).
//!
//! The memory test measures this process's RSS (the proxy runs in-process), so it runs alone in
//! a child process (`alone_in_process`).

use crate::support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_proxy::app::LocalServer;
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---- a raw exchange with the proxy ------------------------------------------------------------

/// What came back for a hand-written request.
#[derive(Debug)]
struct Raw {
    status: Option<u16>,
    head: String,
    body: Vec<u8>,
    /// The proxy closed the connection.
    closed: bool,
    took: Duration,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether `buf` holds a whole response: head plus Content-Length body, or a chunked body up to
/// its last chunk. (Close-delimited bodies end with the connection.)
fn response_complete(buf: &[u8]) -> bool {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let body = &buf[end + 4..];
    if let Some(len) = head.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    }) {
        return body.len() >= len;
    }
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    false
}

/// Read into `buf` until it holds a whole response, the peer closes (true), or `wait` passes.
async fn read_response_bytes(
    conn: &mut (impl AsyncReadExt + Unpin),
    buf: &mut Vec<u8>,
    wait: Duration,
) -> bool {
    let mut chunk = vec![0u8; 64 * 1024];
    let read = tokio::time::timeout(wait, async {
        while !response_complete(buf) {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        false
    })
    .await;
    read.unwrap_or(false)
}

/// Send `bytes` on a fresh connection and read what comes back until the response is whole, the
/// connection closes, or `wait` passes.
async fn exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Raw {
    let started = Instant::now();
    let mut conn = TcpStream::connect(addr).await.unwrap();
    // The proxy may answer (and close) before it has read everything: a failed write is fine.
    let _ = conn.write_all(bytes).await;
    let mut buf = Vec::new();
    let mut closed = read_response_bytes(&mut conn, &mut buf, wait).await;
    let mut chunk = vec![0u8; 64 * 1024];
    if !closed && response_complete(&buf) {
        // Does the proxy close the connection after this response?
        closed = matches!(
            tokio::time::timeout(Duration::from_millis(300), conn.read(&mut chunk)).await,
            Ok(Ok(0)) | Ok(Err(_))
        );
    }
    let (head, body) = match find(&buf, b"\r\n\r\n") {
        Some(i) => (
            String::from_utf8_lossy(&buf[..i]).to_string(),
            buf[i + 4..].to_vec(),
        ),
        None => (String::from_utf8_lossy(&buf).to_string(), Vec::new()),
    };
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| head.strip_prefix("HTTP/1.0 "))
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok());
    Raw {
        status,
        head,
        body,
        closed,
        took: started.elapsed(),
    }
}

fn header_of<'a>(raw: &'a Raw, name: &str) -> Option<&'a str> {
    raw.head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn json_body(raw: &Raw) -> Value {
    serde_json::from_slice(&raw.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&raw.body)))
}

/// The proxy still answers: a runtime chat, a legacy chat and a passthrough GET.
async fn still_serves(server: &LocalServer) {
    let r = chat(server.proxy_addr, Some("org-a"), "after", HI).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.complete);
    let names: Vec<String> = r.events().into_iter().map(|(e, _)| e).collect();
    assert_eq!(names.last().map(String::as_str), Some("done"), "{r:?}");
    let r = chat(server.proxy_addr, Some("org-z"), "after", HI).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-execution-mode"), Some(DIRECT));
    let r = request(server.proxy_addr, "GET", "/api/v1/agents", &[], b"").await;
    assert_eq!(r.status, 200, "{r:?}");
}

const WAIT: Duration = Duration::from_secs(5);

// ---- malformed requests -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_lines_and_headers_get_400_and_reach_no_upstream() {
    let h = Harness::new().start().await;
    let cases: &[(&str, &[u8])] = &[
        ("garbage line", b"GARBAGE\r\n\r\n"),
        ("method only", b"GET\r\n\r\n"),
        ("binary", b"\x00\x01\x02\xff\xfe\xfd\r\n\r\n"),
        ("unknown version", b"GET / HTTP/9.9\r\nhost: a\r\n\r\n"),
        (
            "header without colon",
            b"GET / HTTP/1.1\r\nhost: a\r\nno-colon-here\r\n\r\n",
        ),
        (
            "space in header name",
            b"GET / HTTP/1.1\r\nhost: a\r\nbad name: x\r\n\r\n",
        ),
        (
            "NUL in header value",
            b"GET / HTTP/1.1\r\nhost: a\r\nx-a: a\x00b\r\n\r\n",
        ),
        (
            "non-numeric length",
            b"POST /api/v1/chat/sessions/s HTTP/1.1\r\nhost: a\r\ncontent-length: ten\r\n\r\n",
        ),
        (
            "negative length",
            b"POST /api/v1/chat/sessions/s HTTP/1.1\r\nhost: a\r\ncontent-length: -1\r\n\r\n",
        ),
        (
            "HTTP/2 preface in cleartext",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ),
    ];
    for (what, bytes) in cases {
        let raw = exchange(h.proxy_addr, bytes, WAIT).await;
        eprintln!("{what}: {:?} in {:?}", raw.status, raw.took);
        assert_eq!(raw.status, Some(400), "{what}: {raw:?}");
        assert!(
            raw.took < Duration::from_secs(2),
            "{what}: took {:?}",
            raw.took
        );
    }
    assert!(h.legacy.work().is_empty(), "{:?}", h.legacy.work());
    assert!(h.runtime.work().is_empty());
    still_serves(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_a_bounded_answer() {
    let h = Harness::new()
        .config(move |c| {
            c.limits.max_header_bytes = 256 * 1024;
        })
        .start()
        .await;
    let auth = format!("Bearer {}", token("org-a"));

    // 100 KB: within a raised `limits.max_header_bytes`, so the request is served (passed
    // through untouched on a legacy route; on a chat route the huge header is not forwarded to
    // the runtime, which only gets a fixed list of headers).
    let big = "x".repeat(100 * 1024);
    let req = format!("GET /api/v1/agents HTTP/1.1\r\nhost: a\r\nx-big: {big}\r\n\r\n");
    let raw = exchange(h.proxy_addr, req.as_bytes(), WAIT).await;
    eprintln!(
        "100 KB header, passthrough: {:?} in {:?}",
        raw.status, raw.took
    );
    assert_eq!(raw.status, Some(200), "{raw:?}");
    assert_eq!(
        h.legacy
            .work()
            .last()
            .unwrap()
            .header("x-big")
            .map(str::len),
        Some(big.len()),
        "passthrough must keep the header whole"
    );
    let body = HI;
    let req = format!(
        "POST /api/v1/chat/sessions/big HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\ncontent-type: application/json\r\nx-big: {big}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let raw = exchange(h.proxy_addr, req.as_bytes(), WAIT).await;
    eprintln!(
        "100 KB header, runtime chat: {:?} in {:?}",
        raw.status, raw.took
    );
    assert_eq!(raw.status, Some(200), "{raw:?}");
    assert_eq!(header_of(&raw, "x-execution-mode"), Some(RT));
    assert!(h.runtime.work().last().unwrap().header("x-big").is_none());

    // Beyond the limit: 2 MB of header, and 300 header lines. Refused, bounded, nothing sent on.
    let legacy_before = h.legacy.work().len();
    let huge = "y".repeat(2 * 1024 * 1024);
    let req = format!("GET /api/v1/agents HTTP/1.1\r\nhost: a\r\nx-huge: {huge}\r\n\r\n");
    let raw = exchange(h.proxy_addr, req.as_bytes(), WAIT).await;
    eprintln!("2 MB header: {:?} in {:?}", raw.status, raw.took);
    assert_eq!(raw.status, Some(431), "{:?}", raw.head);
    let mut many = String::from("GET /api/v1/agents HTTP/1.1\r\nhost: a\r\n");
    for i in 0..300 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let raw = exchange(h.proxy_addr, many.as_bytes(), WAIT).await;
    eprintln!("300 headers: {:?} in {:?}", raw.status, raw.took);
    assert_eq!(raw.status, Some(431), "{:?}", raw.head);
    // A 100 KB token: not a valid JWT, so legacy, never the runtime.
    let runtime_before = h.runtime.work().len();
    let req = format!(
        "POST /api/v1/chat/sessions/t HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {big}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let raw = exchange(h.proxy_addr, req.as_bytes(), WAIT).await;
    assert_eq!(raw.status, Some(200), "{:?}", raw.head);
    assert_eq!(header_of(&raw, "x-execution-reason"), Some("no_identity"));
    assert_eq!(h.runtime.work().len(), runtime_before);
    assert_eq!(h.legacy.work().len(), legacy_before + 1);
    still_serves(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_message_framing_is_refused_or_normalised() {
    let h = Harness::new().start().await;
    let auth = format!("Bearer {}", token("org-a"));
    let body = HI;

    // Two different Content-Lengths (request smuggling): 400, on a chat route and elsewhere.
    for path in ["/api/v1/chat/sessions/s", "/api/v1/upload"] {
        for lengths in [
            format!("content-length: {}\r\ncontent-length: 5", body.len()),
            format!("content-length: {}, 5", body.len()),
        ] {
            let req = format!(
                "POST {path} HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\n{lengths}\r\n\r\n{body}"
            );
            let raw = exchange(h.proxy_addr, req.as_bytes(), WAIT).await;
            eprintln!("{path} {lengths:?}: {:?}", raw.status);
            assert_eq!(raw.status, Some(400), "{path} {lengths:?}: {raw:?}");
            assert!(raw.closed, "{path}: the connection must not be reused");
        }
    }
    // A final Transfer-Encoding that is not chunked (a coding we do not implement: 501), and
    // Transfer-Encoding in HTTP/1.0.
    for (req, status) in [
        (format!("POST /api/v1/chat/sessions/s HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\ntransfer-encoding: gzip\r\n\r\n{body}"), 501),
        (format!("POST /api/v1/chat/sessions/s HTTP/1.0\r\nhost: a\r\nauthorization: {auth}\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"), 400),
    ] {
        let raw = exchange(h.proxy_addr, req.as_bytes(), WAIT).await;
        assert_eq!(raw.status, Some(status), "{req:?}: {raw:?}");
        assert!(raw.closed, "{req:?}");
    }
    assert!(h.legacy.work().is_empty(), "{:?}", h.legacy.work());
    assert!(h.runtime.work().is_empty());

    // Content-Length and chunked together: refused (RFC 9112 6.1 lets a server reject it, and an
    // upstream that reads the length instead would take the remainder for a request), the
    // connection closed, nothing sent on.
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let smuggled = "GET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n";
    for path in ["/api/v1/chat/sessions/te-cl", "/api/v1/upload"] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\ncontent-type: application/json\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n{chunked}{smuggled}"
        );
        let raw = exchange(h.proxy_addr, req.as_bytes(), WAIT).await;
        assert_eq!(raw.status, Some(400), "{path}: {raw:?}");
        assert!(raw.closed, "{path}: keep-alive after TE+CL: {:?}", raw.head);
    }
    assert!(
        h.legacy.work().is_empty(),
        "a request with both framings reached legacy: {:?}",
        h.legacy.work()
    );
    assert!(h.runtime.work().is_empty(), "{:?}", h.runtime.work());
    still_serves(&h).await;
}

// ---- chat bodies ------------------------------------------------------------------------------

async fn send_chunked_body(addr: SocketAddr, org: &str, total: usize) -> Raw {
    let auth = format!("Bearer {}", token(org));
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/v1/chat/sessions/chunky HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let (mut rd, mut wr) = conn.into_split();
    let writer = tokio::spawn(async move {
        let piece = vec![b' '; 16 * 1024];
        let mut sent = 0;
        while sent < total {
            let mut c = format!("{:x}\r\n", piece.len()).into_bytes();
            c.extend_from_slice(&piece);
            c.extend_from_slice(b"\r\n");
            if wr.write_all(&c).await.is_err() {
                return;
            }
            sent += piece.len();
        }
        let _ = wr.write_all(b"0\r\n\r\n").await;
        std::future::pending::<()>().await;
    });
    let started = Instant::now();
    let mut buf = Vec::new();
    let closed = read_response_bytes(&mut rd, &mut buf, WAIT).await;
    writer.abort();
    let i = find(&buf, b"\r\n\r\n").unwrap_or(buf.len());
    let head = String::from_utf8_lossy(&buf[..i]).to_string();
    Raw {
        status: head.get(9..12).and_then(|s| s.parse().ok()),
        body: buf.get(i + 4..).unwrap_or_default().to_vec(),
        head,
        closed,
        took: started.elapsed(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_or_invalid_chat_bodies_get_4xx_without_reaching_the_runtime() {
    let h = Harness::new().start().await;
    let addr = h.proxy_addr;

    // Declared too large: 413 before a byte of the body is read, for both modes.
    for org in ["org-a", "org-z"] {
        let auth = format!("Bearer {}", token(org));
        let req = format!(
            "POST /api/v1/chat/sessions/huge HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\ncontent-length: {}\r\n\r\n",
            64 * 1024 * 1024
        );
        let raw = exchange(addr, req.as_bytes(), WAIT).await;
        assert_eq!(raw.status, Some(413), "{org}: {raw:?}");
        assert_eq!(json_body(&raw)["error"]["code"], "PAYLOAD_TOO_LARGE");
        assert!(raw.took < Duration::from_secs(2));
    }
    // Streamed (chunked) without a length: cut off once over the limit.
    let raw = send_chunked_body(addr, "org-a", 256 * 1024).await;
    eprintln!(
        "chunked 256 KB, runtime org: {:?} in {:?}",
        raw.status, raw.took
    );
    assert_eq!(raw.status, Some(413), "{raw:?}");
    let raw = send_chunked_body(addr, "org-z", 4 * 1024 * 1024).await;
    eprintln!(
        "chunked 4 MB, legacy org: {:?} in {:?}",
        raw.status, raw.took
    );
    assert_eq!(raw.status, Some(413), "{raw:?}");
    assert!(h.runtime.work().is_empty());

    // Bodies that are not a chat message: 400 for the runtime path, no upstream contacted.
    let nested = format!(
        "{{\"message\":\"hi\",\"x\":{}{}}}",
        "[".repeat(20_000),
        "]".repeat(20_000)
    );
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("non-UTF-8", b"{\"message\":\"\xff\xfe\xfd\"}".to_vec()),
        (
            "invalid UTF-8 in a key",
            b"{\"mess\xc3age\":\"hi\"}".to_vec(),
        ),
        ("not JSON", b"message=hi".to_vec()),
        ("JSON array", b"[\"hi\"]".to_vec()),
        ("message not a string", br#"{"message": 42}"#.to_vec()),
        ("blank message", br#"{"message": "   "}"#.to_vec()),
        ("empty body", Vec::new()),
        ("NUL bytes", b"\0\0\0\0".to_vec()),
        ("deeply nested", nested.into_bytes()),
    ];
    let before = h.legacy.work().len();
    for (what, body) in &bodies {
        let auth = format!("Bearer {}", token("org-a"));
        let mut req = format!(
            "POST /api/v1/chat/sessions/bad HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        let raw = exchange(addr, &req, WAIT).await;
        assert_eq!(raw.status, Some(400), "{what}: {raw:?}");
        assert_eq!(
            json_body(&raw)["error"]["code"],
            "INVALID_REQUEST",
            "{what}"
        );
        assert_eq!(header_of(&raw, "x-execution-mode"), Some(RT), "{what}");
    }
    assert!(h.runtime.work().is_empty());
    assert_eq!(h.legacy.work().len(), before);
    still_serves(&h).await;
}

// ---- forged and broken tokens -----------------------------------------------------------------

fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A token with any header, signed with HMAC-SHA256 under `secret` (or unsigned with `None`).
fn crafted(header: Value, claims: Value, secret: Option<&str>) -> String {
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let signature = match secret {
        Some(s) => jsonwebtoken::crypto::sign(
            signing_input.as_bytes(),
            &jsonwebtoken::EncodingKey::from_secret(s.as_bytes()),
            jsonwebtoken::Algorithm::HS256,
        )
        .unwrap(),
        None => String::new(),
    };
    format!("{signing_input}.{signature}")
}

/// Chats counted as unverified, whatever the reason.
fn unverified_total(h: &Running) -> u64 {
    ["invalid", "expired", "missing", "no_org_claim"]
        .iter()
        .map(|k| counter(&h.shared.metrics.unverified_total, k))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_broken_tokens_never_reach_the_runtime() {
    let h = Harness::new()
        .config(move |c| {
            c.identity.issuer = Some("chat-api".into());
            // Room for the 64 KB token below: it is about verification, not the head limit.
            c.limits.max_header_bytes = 128 * 1024;
        })
        .start()
        .await;
    let now = now();
    let good = json!({"orgId": "org-a", "userId": "u1", "exp": now + 600, "iss": "chat-api"});
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});

    // The control: a valid token of the allowlisted org reaches the runtime.
    let valid = crafted(hs256.clone(), good.clone(), Some(JWT_SECRET));
    let r = chat_as(h.proxy_addr, &format!("Bearer {valid}")).await;
    assert_eq!(r.header("x-execution-reason"), Some("allowlist"), "{r:?}");
    let runtime_calls = h.runtime.work().len();

    let with = |patch: Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let mut cases: Vec<(&str, String)> = vec![
        (
            "expired",
            crafted(
                hs256.clone(),
                with(json!({"exp": now - 120})),
                Some(JWT_SECRET),
            ),
        ),
        (
            "no exp",
            crafted(hs256.clone(), with(json!({"exp": null})), Some(JWT_SECRET)),
        ),
        (
            "not yet valid",
            crafted(
                hs256.clone(),
                with(json!({"nbf": now + 300})),
                Some(JWT_SECRET),
            ),
        ),
        (
            "alg none",
            crafted(json!({"alg": "none", "typ": "JWT"}), good.clone(), None),
        ),
        (
            "alg None",
            crafted(json!({"alg": "None"}), good.clone(), None),
        ),
        (
            "alg NONE signed",
            crafted(json!({"alg": "NONE"}), good.clone(), Some(JWT_SECRET)),
        ),
        // HS/RS confusion: an RS256 header over an HMAC made with the shared secret, as a
        // verifier that took the secret for a public key would check it.
        (
            "RS256 header, HMAC with the secret",
            crafted(
                json!({"alg": "RS256", "typ": "JWT"}),
                good.clone(),
                Some(JWT_SECRET),
            ),
        ),
        (
            "ES256 header, HMAC with the secret",
            crafted(json!({"alg": "ES256"}), good.clone(), Some(JWT_SECRET)),
        ),
        (
            "HS512 header, HS256 signature",
            crafted(json!({"alg": "HS512"}), good.clone(), Some(JWT_SECRET)),
        ),
        (
            "wrong secret",
            crafted(hs256.clone(), good.clone(), Some("guessed-secret")),
        ),
        (
            "empty secret",
            crafted(hs256.clone(), good.clone(), Some("")),
        ),
        (
            "wrong issuer",
            crafted(
                hs256.clone(),
                with(json!({"iss": "evil"})),
                Some(JWT_SECRET),
            ),
        ),
        (
            "header not JSON",
            format!(
                "{}.{}.{}",
                b64url(b"{not json"),
                b64url(good.to_string().as_bytes()),
                "sig"
            ),
        ),
        (
            "claims not JSON",
            format!(
                "{}.{}.{}",
                b64url(hs256.to_string().as_bytes()),
                b64url(b"\xff\xfe"),
                "sig"
            ),
        ),
        (
            "two segments",
            valid.rsplit_once('.').unwrap().0.to_string(),
        ),
        ("four segments", format!("{valid}.extra")),
        ("truncated signature", valid[..valid.len() - 6].to_string()),
        (
            "truncated in the claims",
            valid[..valid.len() / 2].to_string(),
        ),
        ("empty", String::new()),
        ("64 KB", "a".repeat(64 * 1024)),
        ("non-ASCII", "ünïcødé.tøkën.sïg".to_string()),
    ];
    // A valid signature over claims with a swapped org: the signature no longer matches.
    let (head, rest) = valid.split_once('.').unwrap();
    let sig = rest.rsplit_once('.').unwrap().1;
    let other = b64url(with(json!({"orgId": "org-evil"})).to_string().as_bytes());
    cases.push((
        "claims swapped under a valid signature",
        format!("{head}.{other}.{sig}"),
    ));

    let unverified = unverified_total(&h);
    for (what, t) in &cases {
        let r = chat_as(h.proxy_addr, &format!("Bearer {t}")).await;
        assert_eq!(r.status, 200, "{what}: {r:?}");
        assert!(r.complete, "{what}");
        assert_eq!(r.header("x-execution-mode"), Some(DIRECT), "{what}");
        assert_eq!(
            r.header("x-execution-reason"),
            Some("no_identity"),
            "{what}"
        );
    }
    // A client-supplied org header is not an identity either.
    let r = request(
        h.proxy_addr,
        "POST",
        "/api/v1/chat/sessions/spoof",
        &[("x-org-id", "org-a"), ("content-type", "application/json")],
        HI.as_bytes(),
    )
    .await;
    assert_eq!(r.header("x-execution-reason"), Some("no_identity"));

    assert_eq!(
        h.runtime.work().len(),
        runtime_calls,
        "a forged token reached the runtime"
    );
    let unverified_after = unverified_total(&h);
    assert!(unverified_after >= unverified + cases.len() as u64);
    still_serves_with_issuer(&h).await;
}

/// `identity.issuer` / `identity.audience` say "tokens must carry this iss / aud". jsonwebtoken
/// checks `iss` and `aud` only when the token has them (or has them in a shape it can parse), so
/// a token signed with the shared secret by another issuer that just leaves `iss` out, or sets it
/// to a number, is taken as this issuer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_without_the_configured_issuer_or_audience_are_refused() {
    let h = Harness::new()
        .config(move |c| {
            c.identity.issuer = Some("chat-api".into());
            c.identity.audience = Some("chat".into());
        })
        .start()
        .await;
    let exp = now() + 600;
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    let sign = |claims: Value| crafted(hs256.clone(), claims, Some(JWT_SECRET));

    let valid = sign(json!({"orgId": "org-a", "exp": exp, "iss": "chat-api", "aud": "chat"}));
    let r = chat_as(h.proxy_addr, &format!("Bearer {valid}")).await;
    assert_eq!(r.header("x-execution-reason"), Some("allowlist"), "{r:?}");
    let runtime_calls = h.runtime.work().len();

    let cases = [
        (
            "no iss",
            json!({"orgId": "org-a", "exp": exp, "aud": "chat"}),
        ),
        (
            "iss a number",
            json!({"orgId": "org-a", "exp": exp, "iss": 7, "aud": "chat"}),
        ),
        (
            "iss null",
            json!({"orgId": "org-a", "exp": exp, "iss": null, "aud": "chat"}),
        ),
        (
            "no aud",
            json!({"orgId": "org-a", "exp": exp, "iss": "chat-api"}),
        ),
        (
            "aud an object",
            json!({"orgId": "org-a", "exp": exp, "iss": "chat-api", "aud": {"x": 1}}),
        ),
    ];
    let mut accepted = Vec::new();
    for (what, claims) in cases {
        let r = chat_as(h.proxy_addr, &format!("Bearer {}", sign(claims))).await;
        assert_eq!(r.status, 200, "{what}");
        if r.header("x-execution-reason") != Some("no_identity") {
            accepted.push(what);
        }
    }
    assert!(
        accepted.is_empty(),
        "accepted without the configured claims: {accepted:?}"
    );
    assert_eq!(h.runtime.work().len(), runtime_calls);
}

async fn chat_as(addr: SocketAddr, authorization: &str) -> Response {
    request(
        addr,
        "POST",
        "/api/v1/chat/sessions/jwt",
        &[
            ("authorization", authorization),
            ("content-type", "application/json"),
        ],
        HI.as_bytes(),
    )
    .await
}

async fn still_serves_with_issuer(server: &LocalServer) {
    let t = token_with(json!({"orgId": "org-a", "exp": now() + 600, "iss": "chat-api"}));
    let r = chat_as(server.proxy_addr, &format!("Bearer {t}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-execution-mode"), Some(RT), "{r:?}");
}

// ---- a hostile runtime ------------------------------------------------------------------------

/// What a hostile runtime does with an execution request (health checks get a 200).
#[derive(Clone, Copy, Debug)]
enum Misbehaviour {
    /// Pseudo-random bytes, SSE-ish tokens among them, then a clean end of the body.
    Garbage { seed: u64, then_close: bool },
    /// `data: ` and then bytes without a line end, forever.
    EndlessLine,
    /// One 100 MB frame (then a valid ending, if the proxy were still reading).
    HugeFrame,
    /// A 200 SSE head, then nothing.
    HeadThenSilence,
    /// Not even a head.
    Silence,
    /// Bytes that are not an HTTP response, then close.
    GarbageHead,
    /// A 200 JSON document instead of a stream.
    NotSse,
    /// A response head of 2 MB (one endless header), then nothing.
    HugeHead,
}

fn garbage(seed: u64, len: usize) -> Vec<u8> {
    const TOKENS: &[&[u8]] = &[
        b"data: ",
        b"data:",
        b"event: ",
        b"id: ",
        b"retry: x",
        b": ping",
        b"\r\n",
        b"\n",
        b"\r",
        b"\n\n",
        b"\r\n\r\n",
        b"{\"event\":\"text_chunk\",\"data\":{\"content\":\"",
        b"{\"event\":\"execution_complete\",\"data\":{}}",
        b"{\"event\":\"ping\"}",
        b"[DONE]",
        b"\"}}",
        b"\xef\xbb\xbf",
        b"\xff\xfe",
        b"\xc3",
        b"\0",
        b"\xe4\xbd",
    ];
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        if rng.bool() {
            out.extend_from_slice(TOKENS[rng.usize(..TOKENS.len())]);
        } else {
            for _ in 0..rng.usize(1..32) {
                out.push(rng.u8(..));
            }
        }
    }
    out
}

/// The runtime's answer to an execution when it misbehaves `how`.
fn misbehaving(how: Misbehaviour) -> Reply {
    match how {
        Misbehaviour::Garbage { seed, then_close } => {
            let mut steps: Vec<Step> = garbage(seed, 256 * 1024)
                .chunks(4096)
                .map(|piece| Step::Send(piece.to_vec()))
                .collect();
            if then_close {
                // Cut mid-body: no last chunk, the connection closed.
                steps.push(Step::Close);
            }
            Reply::sse(steps)
        }
        Misbehaviour::EndlessLine => Reply::sse(vec![
            Step::Send(b"data: {\"event\":\"text_chunk\",\"data\":{\"content\":\"".to_vec()),
            Step::fill(b'y', 64 * 1024, 100_000, Duration::from_millis(1)),
        ]),
        Misbehaviour::HugeFrame => Reply::sse(vec![
            Step::Send(b"data: ".to_vec()),
            Step::fill(b'x', 1024 * 1024, 100, Duration::ZERO),
            Step::Send(b"\n\n".to_vec()),
            Step::Send(frame("execution_complete", json!({}))),
            Step::Send(done_frame()),
        ]),
        Misbehaviour::HeadThenSilence => Reply::sse(vec![Step::Hang]),
        Misbehaviour::Silence => Reply::silent(vec![Step::Hang]),
        Misbehaviour::GarbageHead => Reply::silent(vec![Step::Send(
            b"\x00\xffNOT HTTP AT ALL\r\n\r\n".to_vec(),
        )]),
        Misbehaviour::HugeHead => Reply::silent(vec![
            Step::Send(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-huge: ".to_vec()),
            Step::fill(b'h', 64 * 1024, 32, Duration::ZERO),
            Step::Hang,
        ]),
        Misbehaviour::NotSse => Reply::json(200, json!({"result": "not a stream"})),
    }
}

/// The client side of a runtime stream: 200, the runtime's mode, a terminated body of whole
/// LF-only events of the four kinds, each with one line of JSON data (or `null`).
fn well_formed_stream(r: &Response) -> Vec<(String, String)> {
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-execution-mode"), Some(RT));
    assert!(r.complete, "the response was not terminated");
    let events = whole_events(r);
    for (name, data) in &events {
        assert!(
            ["message", "heartbeat", "done", "error"].contains(&name.as_str()),
            "unexpected event {name}"
        );
        let v: Value = serde_json::from_str(data)
            .unwrap_or_else(|e| panic!("{name} data is not JSON ({e}): {data}"));
        if name == "message" {
            assert!(v["id"].is_string() && v["type"].is_string(), "{v}");
        }
    }
    events
}

/// A well-formed runtime stream ending in exactly one `error` event (and no `done`); its code.
fn ends_in_one_error_event(r: &Response) -> String {
    let events = well_formed_stream(r);
    let errors: Vec<_> = events.iter().filter(|(e, _)| e == "error").collect();
    assert_eq!(errors.len(), 1, "{events:?}");
    assert!(
        !events.iter().any(|(e, _)| e == "done"),
        "done and error: {events:?}"
    );
    let last = events.last().unwrap();
    assert_eq!(last.0, "error", "{events:?}");
    let err: Value = serde_json::from_str(&last.1).unwrap();
    err["code"].as_str().unwrap().to_string()
}

async fn against(how: Misbehaviour, timeout_ms: u64) -> Running {
    Harness::new()
        .runtime(runtime_script(move |_| misbehaving(how)))
        .config(move |c| {
            c.runtime.execution_timeout_ms = timeout_ms;
            // The relay's defences once the stream is the client's (before the commit these
            // streams fail over: commit_point.rs).
            c.runtime.commit_timeout_ms = Some(0);
            // Health checks must not open the breaker in the middle of a test.
            c.runtime.health_interval_ms = 60_000;
        })
        .start()
        .await
}

/// After a hostile runtime, the proxy still serves: the same runtime org gets an answer (an
/// error event from the same hostile runtime), and legacy traffic is untouched.
async fn still_up(server: &LocalServer) {
    let r = chat(server.proxy_addr, Some("org-z"), "after", HI).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.events().len(), 2);
    let r = request(server.proxy_addr, "GET", "/api/v1/agents", &[], b"").await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_sending_binary_garbage_gets_well_formed_output_and_one_terminal_event() {
    for seed in 1..=12u64 {
        for then_close in [false, true] {
            let how = Misbehaviour::Garbage { seed, then_close };
            let h = against(how, 10_000).await;
            let t = Instant::now();
            let r = chat(h.proxy_addr, Some("org-a"), "garbage", HI).await;
            // Garbage may happen to hold a valid frame (the tokens include execution_complete
            // and execution_error): then it ends like a runtime that sent it. Either way the
            // stream ends with one terminal event, last.
            let events = well_formed_stream(&r);
            let terminal: Vec<&str> = events
                .iter()
                .map(|(e, _)| e.as_str())
                .filter(|e| *e == "error" || *e == "done")
                .collect();
            let last = events.last().map(|(e, _)| e.as_str());
            eprintln!(
                "{how:?}: {} events, last {last:?}, in {:?}",
                events.len(),
                t.elapsed()
            );
            assert!(t.elapsed() < Duration::from_secs(5));
            assert!(
                matches!(last, Some("error") | Some("done")),
                "no terminal event: {events:?}"
            );
            assert_eq!(terminal.len(), 1, "several terminal events: {terminal:?}");
            assert!(h.legacy.work().is_empty());
            still_up(&h).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_line_without_end_is_cut_at_max_frame_bytes() {
    let h = against(Misbehaviour::EndlessLine, 30_000).await;
    let t = Instant::now();
    let r = chat(h.proxy_addr, Some("org-a"), "endless", HI).await;
    let took = t.elapsed();
    assert_eq!(ends_in_one_error_event(&r), "FRAME_TOO_LARGE");
    let cut = h.runtime.wait_for_hang_ups(1, Duration::from_secs(3)).await;
    eprintln!(
        "endless line: error after {took:?}, runtime cut off after {} KB",
        h.runtime.bytes_sent() / 1024
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(cut, "the proxy kept reading an endless line");
    still_up(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_100_mb_frame_ends_quickly_with_bounded_memory() {
    crate::run_alone!("runtime_100_mb_frame_ends_quickly_with_bounded_memory");
    let h = against(Misbehaviour::HugeFrame, 30_000).await;
    // Warm the allocator and the connection paths with one ordinary request first.
    still_up(&h).await;
    let rss_before = rss_kb();
    let peak = Arc::new(AtomicU64::new(rss_before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::SeqCst) {
                peak.fetch_max(rss_kb(), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let t = Instant::now();
    let r = chat(h.proxy_addr, Some("org-a"), "huge", HI).await;
    let took = t.elapsed();
    let code = ends_in_one_error_event(&r);
    let cut = h.runtime.wait_for_hang_ups(1, Duration::from_secs(5)).await;
    sampling.store(false, Ordering::SeqCst);
    sampler.await.unwrap();
    let peak_delta_mb = (peak.load(Ordering::SeqCst).saturating_sub(rss_before)) / 1024;
    let sent_mb = h.runtime.bytes_sent() / (1024 * 1024);
    eprintln!(
        "100 MB frame: {code} after {took:?}; runtime sent {sent_mb} MB before being cut off; RSS peak +{peak_delta_mb} MB"
    );
    assert_eq!(code, "FRAME_TOO_LARGE");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(cut, "the proxy read the whole 100 MB frame");
    assert!(sent_mb < 50, "the proxy kept reading: {sent_mb} MB");
    assert!(peak_delta_mb < 32, "RSS grew by {peak_delta_mb} MB");
    still_up(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_runtime_times_out_with_an_error_event() {
    for how in [Misbehaviour::HeadThenSilence, Misbehaviour::Silence] {
        let h = against(how, 800).await;
        let t = Instant::now();
        let r = chat(h.proxy_addr, Some("org-a"), "silent", HI).await;
        let took = t.elapsed();
        eprintln!("{how:?}: answered after {took:?}");
        assert_eq!(ends_in_one_error_event(&r), "TIMEOUT", "{how:?}");
        assert!(
            took >= Duration::from_millis(750) && took < Duration::from_millis(2500),
            "{how:?}: {took:?}"
        );
        assert!(
            h.legacy.work().is_empty(),
            "{how:?}: no failover after a timeout"
        );
        still_up(&h).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_answering_something_else_than_sse() {
    // Not HTTP at all: nothing reached the client yet, so legacy serves it.
    let h = against(Misbehaviour::GarbageHead, 5_000).await;
    let r = chat(h.proxy_addr, Some("org-a"), "nothttp", HI).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-execution-mode"), Some(DIRECT), "{r:?}");
    assert_eq!(r.header("x-execution-reason"), Some("failover"));
    assert_eq!(h.legacy.work().len(), 1);
    still_up(&h).await;
    drop(h);

    // A response head that never ends (2 MB of one header): refused before a byte reached the
    // client, so legacy serves it; bounded in time.
    let h = against(Misbehaviour::HugeHead, 5_000).await;
    let t = Instant::now();
    let r = chat(h.proxy_addr, Some("org-a"), "hugehead", HI).await;
    eprintln!(
        "2 MB response head: {:?} {:?} after {:?}",
        r.header("x-execution-mode"),
        r.header("x-execution-reason"),
        t.elapsed()
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-execution-reason"), Some("failover"), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(h.legacy.work().len(), 1);
    still_up(&h).await;
    drop(h);

    // A 200 JSON document: no event, no completion: one error event.
    let h = against(Misbehaviour::NotSse, 5_000).await;
    let r = chat(h.proxy_addr, Some("org-a"), "json", HI).await;
    assert_eq!(ends_in_one_error_event(&r), "STREAM_TRUNCATED");
    assert!(h.legacy.work().is_empty());
    still_up(&h).await;
}

/// A runtime that keeps talking after `execution_complete`: the client got its `done`, so the
/// stream is over for it. An `execution_error` after it must not add an `error` event (the web
/// app would show a failure under a complete answer), nor a second `execution_complete` a
/// second `done`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_talking_after_completion_gets_one_terminal_event() {
    let h = Harness::new()
        .runtime(runtime_answering(|req: &Received| {
            let complete = frame("execution_complete", json!({"final_response": "x"}));
            let after = match req.json()["session_id"].as_str() {
                Some("then-error") => frame("execution_error", json!({"error": "late failure"})),
                Some("then-complete") => complete.clone(),
                _ => frame("text_chunk", json!({"content": "after the end"})),
            };
            Reply::sse(vec![
                Step::Send(frame("text_chunk", json!({"content": "answer"}))),
                Step::Send(complete),
                Step::Send(after),
                Step::Send(done_frame()),
            ])
        }))
        .start()
        .await;
    let mut wrong = Vec::new();
    for session in ["then-error", "then-complete", "then-text"] {
        let r = chat(h.proxy_addr, Some("org-a"), session, HI).await;
        let names: Vec<String> = well_formed_stream(&r).into_iter().map(|(e, _)| e).collect();
        eprintln!("{session}: {names:?}");
        if names != ["message", "done"] {
            wrong.push(format!("{session}: {names:?}"));
        }
    }
    assert!(wrong.is_empty(), "events after done: {wrong:?}");
}

/// HTTP/1.1 lets a client send its next request before the current response is over
/// (pipelining, RFC 9112 9.3.2). The relay watches the client connection for a hang-up, and
/// takes the first pipelined byte for one: the runtime stream is cut after the events sent so
/// far and terminated without `done` or `error` (the client sees a clean but truncated answer),
/// and the execution is counted as cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_request_during_a_runtime_stream_does_not_cut_it() {
    let h = Harness::new()
        .runtime(runtime_script(|_| {
            Reply::sse(vec![
                Step::Send(frame("text_chunk", json!({"content": "a"}))),
                Step::WaitRelease,
                Step::Send(frame("execution_complete", json!({}))),
                Step::Send(done_frame()),
            ])
        }))
        .start()
        .await;
    let auth = format!("Bearer {}", token("org-a"));
    let body = HI;
    let mut c = Client::connect(h.proxy_addr).await;
    c.send(
        "POST",
        "/api/v1/chat/sessions/pipelined",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await;
    // Pipelined while the stream is being relayed, before the runtime finishes it.
    let relaying = || h.metrics().streams_in_flight.with_label_values(&[RT]).get() == 1;
    assert!(eventually(WAIT, relaying).await, "the stream never began");
    c.send_raw(b"GET /api/v1/second HTTP/1.1\r\nhost: a\r\n\r\n")
        .await;
    h.runtime.release();
    let first = c.read_response().await;
    let names: Vec<String> = well_formed_stream(&first)
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    assert_eq!(names, ["message", "done"], "the runtime stream was cut");
    let second = c.read_response().await;
    assert_eq!(second.status, 200, "the pipelined request was not answered");
}
