//! The runtime path on the front door's own connection (`server.lean_runtime`), against Pingora's
//! `HttpProxy` serving the same chat: for each case the same request bytes go through a proxy
//! with `lean_runtime = true` and one with `false`, in front of the same scripted upstreams, and
//! the client's bytes (but `Date` and the ids a stream makes up), what the runtime was asked and
//! what legacy received must be the same. The counters say which path served each.

use crate::support;

use std::time::Duration;

use cutover_proxy::core::config::PreContent;
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One case: the runtime's answer, and the requests the client writes on one connection.
struct Case {
    name: &'static str,
    runtime: fn(&Received) -> Reply,
    requests: Vec<Vec<u8>>,
    /// `limits.max_chat_body_bytes`.
    body_limit: usize,
    pre_content: PreContent,
    /// Chats legacy answered inside the runtime's open stream: served where the stream was.
    rescued: u64,
}

fn chat_request(org: &str, version: &str, body: &[u8], extra: &str) -> Vec<u8> {
    let mut r = format!(
        "POST /api/v1/chat/sessions/s-1 {version}\r\nHost: proxy.test\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nX-Request-Id: req-1\r\n{extra}Content-Length: {}\r\n\r\n",
        token(org),
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn ok(org: &str) -> Vec<u8> {
    chat_request(
        org,
        "HTTP/1.1",
        br#"{"message":"h\u00e9llo","agentId":"a-1"}"#,
        "",
    )
}

fn streams(req: &Received) -> Reply {
    healthy_runtime(req)
}

fn fails_first(req: &Received) -> Reply {
    if req.path == "/health" {
        return healthy_runtime(req);
    }
    Reply::json(503, json!({"detail": "overloaded"}))
}

fn errors_before_commit(req: &Received) -> Reply {
    if req.path == "/health" {
        return healthy_runtime(req);
    }
    Reply::sse(vec![Step::Send(frame(
        "execution_error",
        json!({"error": "model overloaded", "code": "E"}),
    ))])
}

fn cases() -> Vec<Case> {
    let case = |name, runtime: fn(&Received) -> Reply, requests| Case {
        name,
        runtime,
        requests,
        body_limit: 64 * 1024,
        pre_content: PreContent::Stream,
        rescued: 0,
    };
    vec![
        case("a runtime stream", streams, vec![ok("org-a")]),
        case(
            "two streams and a passthrough request on one connection",
            streams,
            vec![
                ok("org-a"),
                ok("org-a"),
                b"GET /api/v1/agents HTTP/1.1\r\nHost: proxy.test\r\n\r\n".to_vec(),
            ],
        ),
        case(
            "an HTTP/1.0 stream, ended by closing",
            streams,
            vec![chat_request(
                "org-a",
                "HTTP/1.0",
                br#"{"message":"hi"}"#,
                "",
            )],
        ),
        case(
            "a client that closes after the stream",
            streams,
            vec![chat_request(
                "org-a",
                "HTTP/1.1",
                br#"{"message":"hi"}"#,
                "Connection: close\r\n",
            )],
        ),
        case(
            "failed over before the runtime's head",
            fails_first,
            vec![ok("org-a"), ok("org-a")],
        ),
        Case {
            pre_content: PreContent::Hold,
            ..case(
                "failed over before the commit",
                errors_before_commit,
                vec![ok("org-a")],
            )
        },
        Case {
            rescued: 1,
            ..case(
                "rescued in the open stream before content",
                errors_before_commit,
                vec![ok("org-a")],
            )
        },
        case(
            "a body that is not JSON",
            streams,
            vec![chat_request("org-a", "HTTP/1.1", b"{not json", "")],
        ),
        case(
            "an org routed to legacy",
            streams,
            vec![ok("org-b"), ok("org-b")],
        ),
        Case {
            body_limit: 10,
            ..case("a body over the limit", streams, vec![ok("org-a")])
        },
    ]
}

/// `Date`, which the two paths may differ in, and the ids and latency each stream makes up.
fn normalise(raw: &[u8]) -> String {
    let text = without_date(raw);
    // `messageId`s, `done`'s ids and the like: uuids.
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes.len() - i >= 36 && is_uuid(&bytes[i..i + 36]) {
            out.extend_from_slice(b"<uuid>");
            i += 36;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let out = String::from_utf8(out).expect("uuids are ASCII: the rest stays UTF-8");
    // And the stream's measured latency.
    let mut parts = out.split("\"latencyMs\":");
    let mut normalised = parts.next().unwrap_or_default().to_string();
    for part in parts {
        // The size line of the chunk that carries it changes with its digits (9 ms: `a4`, 10 ms:
        // `a5`).
        if let Some(size) = last_chunk_size(&normalised) {
            normalised.replace_range(size, "<size>");
        }
        normalised.push_str("\"latencyMs\":<ms>");
        normalised.push_str(part.trim_start_matches(|c: char| c.is_ascii_digit()));
    }
    normalised
}

/// Where the last chunk-size line in `text` is: a line of hex digits alone, between CRLFs.
fn last_chunk_size(text: &str) -> Option<std::ops::Range<usize>> {
    let mut end = text.len();
    while let Some(line_end) = text[..end].rfind("\r\n") {
        let start = text[..line_end].rfind("\r\n").map_or(0, |i| i + 2);
        let line = &text[start..line_end];
        if !line.is_empty() && line.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Some(start..line_end);
        }
        end = line_end;
    }
    None
}

fn is_uuid(b: &[u8]) -> bool {
    b.iter().enumerate().all(|(i, c)| match i {
        8 | 13 | 18 | 23 => *c == b'-',
        _ => c.is_ascii_hexdigit(),
    })
}

/// What one proxy made of a case.
#[derive(Debug, PartialEq)]
struct Seen {
    client: String,
    runtime: Vec<Value>,
    legacy: Vec<(String, Vec<u8>)>,
}

/// What a proxy made of `case`, and how many requests the front door and Pingora served.
async fn through(lean: bool, case: &Case) -> (Seen, u64, u64) {
    let limit = case.body_limit;
    let pre_content = case.pre_content;
    let h = Harness::new()
        .runtime(case.runtime)
        .config(move |c| {
            c.server.lean_runtime = lean;
            c.runtime.pre_content = pre_content;
            c.limits.max_chat_body_bytes = limit;
            // The connection's end is the end of each case.
            c.server.keepalive_timeout_ms = 200;
        })
        .start()
        .await;
    let mut s = TcpStream::connect(h.proxy_addr).await.unwrap();
    for r in &case.requests {
        s.write_all(r).await.unwrap();
    }
    let mut raw = Vec::new();
    // Every case ends with the proxy closing the connection: after its last answer, or when
    // the idle wait for a next request runs out.
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("the proxy closes the connection")
        .unwrap();
    let runtime = h
        .runtime
        .work()
        .iter()
        .map(|r| {
            let mut v = r.json();
            v["headers"] = json!({
                "x-request-id": r.header("x-request-id"),
                "content-type": r.header("content-type"),
            });
            v
        })
        .collect();
    let legacy = h
        .legacy
        .received()
        .into_iter()
        .map(|r| (format!("{} {}", r.method, r.path), r.body))
        .collect();
    let fd = &h.metrics().front_door;
    let seen = Seen {
        client: normalise(&raw),
        runtime,
        legacy,
    };
    (seen, fd.served_lean_runtime.get(), fd.served_pingora.get())
}

#[tokio::test]
async fn the_front_door_serves_a_runtime_chat_as_pingora_does() {
    for case in cases() {
        let (lean, lean_served, lean_pingora) = through(true, &case).await;
        let (pingora, pingora_lean_served, _) = through(false, &case).await;
        assert_eq!(lean, pingora, "{}", case.name);
        assert!(!lean.client.is_empty(), "{}: no answer", case.name);
        assert_eq!(pingora_lean_served, 0, "{}", case.name);
        // The runtime's answers and the proxy's own refusals stay on the front door; what
        // legacy serves goes through Pingora.
        let is_chat = |r: &[u8]| r.starts_with(b"POST /api/v1/chat/");
        let chats = case.requests.iter().filter(|r| is_chat(r)).count() as u64;
        let to_legacy = lean
            .legacy
            .iter()
            .filter(|(route, _)| is_chat(route.as_bytes()))
            .count() as u64;
        assert_eq!(
            lean_served,
            chats - to_legacy + case.rescued,
            "{}: {lean:?}",
            case.name
        );
        assert!(lean_pingora >= to_legacy - case.rescued, "{}", case.name);
    }
}

#[tokio::test]
async fn a_failover_from_the_front_door_gives_legacy_the_original_bytes() {
    let case = cases()
        .into_iter()
        .find(|c| c.name == "failed over before the runtime's head")
        .unwrap();
    let (seen, _, pingora) = through(true, &case).await;
    let body = br#"{"message":"h\u00e9llo","agentId":"a-1"}"#.to_vec();
    assert_eq!(
        seen.legacy,
        vec![
            ("POST /api/v1/chat/sessions/s-1".to_string(), body.clone()),
            ("POST /api/v1/chat/sessions/s-1".to_string(), body)
        ]
    );
    assert_eq!(pingora, 2);
    assert_eq!(
        seen.client.matches("x-execution-reason: failover").count(),
        2
    );
}

#[tokio::test]
async fn an_http10_client_asking_for_keep_alive_is_told_the_stream_ends_with_the_connection() {
    let h = Harness::new().start().await;
    let mut s = TcpStream::connect(h.proxy_addr).await.unwrap();
    let req = chat_request(
        "org-a",
        "HTTP/1.0",
        br#"{"message":"hi"}"#,
        "Connection: keep-alive\r\n",
    );
    s.write_all(&req).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("the proxy closes the connection after the stream")
        .unwrap();
    let text = String::from_utf8_lossy(&raw);
    let head = &text[..text.find("\r\n\r\n").expect("a response head")];
    assert!(
        head.contains("x-execution-mode: runtime_orchestrator"),
        "{head}"
    );
    assert!(head.contains("Connection: close"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    assert!(
        text.ends_with("\n\n") && text.contains("event: done"),
        "{text}"
    );
    assert_eq!(h.metrics().front_door.served_lean_runtime.get(), 1);
}

/// A request's clock starts at its first byte, as nginx's `$request_time` does: a client slow to
/// send its head shows in the time to first event, on either path.
#[tokio::test]
async fn time_to_first_event_counts_from_the_requests_first_byte() {
    const GAP: Duration = Duration::from_millis(300);
    for lean in [true, false] {
        let h = Harness::new()
            .config(move |c| c.server.lean_runtime = lean)
            .start()
            .await;
        let req = chat_request(
            "org-a",
            "HTTP/1.1",
            br#"{"message":"hi"}"#,
            "Connection: close\r\n",
        );
        let mut s = TcpStream::connect(h.proxy_addr).await.unwrap();
        s.write_all(&req[..20]).await.unwrap();
        // The client's own pace, not a wait for the proxy.
        tokio::time::sleep(GAP).await;
        s.write_all(&req[20..]).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
            .await
            .expect("the stream ends")
            .unwrap();
        assert!(
            String::from_utf8_lossy(&raw).contains("event: done"),
            "lean = {lean}"
        );
        let ttfe = h
            .metrics()
            .time_to_first_event_seconds
            .with_label_values(&["runtime_orchestrator"]);
        // Recorded as the request finishes, which can be just after the client read its end.
        assert!(
            eventually(Duration::from_secs(5), || ttfe.get_sample_count() == 1).await,
            "lean = {lean}"
        );
        assert!(
            ttfe.get_sample_sum() >= GAP.as_secs_f64(),
            "lean = {lean}: {} s",
            ttfe.get_sample_sum()
        );
        let served = &h.metrics().front_door;
        let on_lean = served.served_lean_runtime.get();
        assert_eq!(on_lean, u64::from(lean), "lean = {lean}");
    }
}
