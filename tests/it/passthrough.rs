//! Everything that is not a chat route reaches legacy untouched, and legacy's answer reaches the
//! client untouched: method, path, query, headers, body of any size, status, streaming.

use crate::support;

use std::time::Duration;

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn no_execution_headers(r: &Response) -> bool {
    r.headers
        .iter()
        .all(|(k, _)| !k.starts_with("x-execution-"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_paths_queries_and_bodies_reach_legacy_byte_exact() {
    let h = Harness::new()
        .legacy(|req: &Received| Reply::json(200, json!({"echo": req.path, "method": req.method})))
        .start()
        .await;
    // An allowlisted caller: were any of these taken for a chat, it would go to the runtime.
    let auth = format!("Bearer {}", token("org-a"));

    let cases: &[(&str, &str, &[u8])] = &[
        (
            "GET",
            "/api/v1/agents?b=2&a=1&q=%E4%BD%A0%20x+y&empty=&flag&a=1",
            b"",
        ),
        ("PUT", "/api/v1/agents/7", br#"{"name":"n"}"#),
        ("DELETE", "/api/v1/agents/7?hard=true", b""),
        ("PATCH", "/api/v1/users/me", br#"{"theme":"dark"}"#),
        ("POST", "/api/v1/agents", br#"{"message":"not a chat"}"#),
        ("OPTIONS", "/api/v1/chat/start", b""),
        // Chat paths with another method, and look-alikes of chat paths.
        ("GET", "/api/v1/chat/sessions/s-1?limit=50", b""),
        (
            "PUT",
            "/api/v1/chat/sessions/s-1",
            br#"{"message":"rename"}"#,
        ),
        ("DELETE", "/api/v1/chat/sessions/s-1", b""),
        ("POST", "/api/v1/chat/sessions/s-1/messages", HI.as_bytes()),
        ("POST", "/api/v1/chat/sessions", HI.as_bytes()),
        ("POST", "/api/v1/chat/started", HI.as_bytes()),
        ("POST", "/api/v2/chat/start", HI.as_bytes()),
        (
            "POST",
            "/api/v1/chat/sessions/s-1/../../agents",
            b"not json at all",
        ),
        ("GET", "/", b""),
    ];
    for (i, (method, path, body)) in cases.iter().enumerate() {
        let r = request(
            h.proxy_addr,
            method,
            path,
            &[("authorization", &auth)],
            body,
        )
        .await;
        assert_eq!(r.status, 200, "{method} {path}");
        assert!(no_execution_headers(&r), "{method} {path}: {:?}", r.headers);
        assert_eq!(
            r.json(),
            json!({"echo": path, "method": method}),
            "{method} {path}"
        );
        let got = &h.legacy.work()[i];
        assert_eq!(got.method, *method);
        assert_eq!(got.path, *path, "path and query must be byte-exact");
        assert_eq!(got.body, *body, "{method} {path}");
        assert_eq!(got.header("authorization"), Some(auth.as_str()));
    }
    assert_eq!(h.legacy.work().len(), cases.len());
    assert!(h.runtime.work().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_headers_reach_legacy_including_repeated_ones() {
    let h = Harness::new().start().await;

    let headers = [
        ("x-custom", "v1"),
        ("x-multi", "first"),
        ("cookie", "a=1; b=2"),
        ("x-multi", "second"),
        ("accept-encoding", "gzip, br"),
        ("user-agent", "test-agent/1.0"),
        ("x-org-id", "org-z"),
        ("x-request-id", "req-42"),
        ("x-spaces", "a  b\tc"),
    ];
    let r = request(h.proxy_addr, "GET", "/api/v1/me", &headers, b"").await;
    assert_eq!(r.status, 200);
    let got = &h.legacy.work()[0];
    assert_eq!(got.header("host"), Some("proxy.test"));
    for (name, value) in headers.iter().filter(|(n, _)| *n != "x-multi") {
        assert_eq!(got.header(name), Some(*value), "{name}");
    }
    let multi = got.headers_named("x-multi");
    assert_eq!(
        multi,
        ["first", "second"],
        "repeated header values, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_request_body_reaches_legacy_unchanged() {
    let h = Harness::new().start().await;

    let body: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let mut raw = b"POST /api/v1/uploads?id=9 HTTP/1.1\r\nhost: proxy.test\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for piece in body.chunks(30_000) {
        raw.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        raw.extend_from_slice(piece);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let mut c = Client::connect(h.proxy_addr).await;
    c.send_raw(&raw).await;
    let r = c.read_response().await;
    assert_eq!(r.status, 200);
    let got = &h.legacy.work()[0];
    assert_eq!(got.path, "/api/v1/uploads?id=9");
    assert!(
        got.body == body,
        "chunked body changed on the way ({} bytes)",
        got.body.len()
    );
}

/// A legacy that takes one request with a Content-Length body, reports body bytes as they arrive,
/// and answers once it has the whole body. Not the scripted upstream, which reports a request
/// only once it is whole.
async fn counting_legacy() -> (
    std::net::SocketAddr,
    tokio::sync::watch::Receiver<usize>,
    tokio::task::JoinHandle<(String, Vec<u8>)>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(0usize);
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 256 * 1024];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before the head");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .expect("the proxy kept the Content-Length");
        let mut body = buf.split_off(head_end);
        tx.send_replace(body.len());
        while body.len() < len {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed mid-body at {} of {len}", body.len());
            body.extend_from_slice(&chunk[..n]);
            tx.send_replace(body.len());
        }
        s.write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        (head, body)
    });
    (addr, rx, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_body_is_streamed_to_legacy_byte_identical() {
    let (legacy_addr, mut progress, received) = counting_legacy().await;
    let h = Harness::new().legacy_server(legacy_addr).start().await;

    let size = 5 * 1024 * 1024;
    let body: Vec<u8> = (0..size as u64)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    let half = size / 2;
    let mut c = Client::connect(h.proxy_addr).await;
    c.send_raw(format!("PUT /api/v1/files/blob.bin HTTP/1.1\r\nhost: proxy.test\r\ncontent-length: {size}\r\n\r\n").as_bytes())
        .await;
    c.send_raw(&body[..half]).await;
    // Legacy gets the first half before the client sent the rest: the body is not buffered.
    tokio::time::timeout(Duration::from_secs(5), progress.wait_for(|n| *n >= half))
        .await
        .expect("the first half of the body did not reach legacy before the rest was sent")
        .unwrap();
    c.send_raw(&body[half..]).await;
    let r = c.read_response().await;
    assert_eq!(r.status, 201);
    assert_eq!(r.body(), b"ok");
    assert!(no_execution_headers(&r));
    let (head, got) = received.await.unwrap();
    assert!(
        head.starts_with("PUT /api/v1/files/blob.bin HTTP/1.1\r\n"),
        "{head}"
    );
    assert_eq!(got.len(), size);
    assert!(got == body, "body changed on the way");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_status_headers_and_body_come_back_unchanged() {
    let h = Harness::new()
        .legacy(|req: &Received| {
            let (status, extra): (u16, Vec<(&str, &str)>) = match req.path.as_str() {
                "/missing" => (
                    404,
                    vec![
                        ("set-cookie", "a=1; Path=/"),
                        ("set-cookie", "b=2; HttpOnly"),
                    ],
                ),
                "/busy" => (503, vec![("retry-after", "7")]),
                "/created" => (201, vec![("location", "/api/v1/agents/8")]),
                _ => (200, vec![]),
            };
            let mut headers = vec![
                (
                    "content-type".to_string(),
                    "application/json; charset=utf-8".to_string(),
                ),
                ("x-legacy-trace".to_string(), format!("t{}", req.path)),
            ];
            headers.extend(
                extra
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            );
            Reply {
                status,
                headers,
                steps: vec![],
                fixed_body: Some(format!(r#"{{"status":{status}}}"#).into_bytes()),
                no_head: false,
            }
        })
        .start()
        .await;

    for (path, status) in [("/missing", 404), ("/busy", 503), ("/created", 201)] {
        let r = request(h.proxy_addr, "GET", path, &[], b"").await;
        assert_eq!(r.status, status, "{path}");
        assert_eq!(
            r.header("content-type"),
            Some("application/json; charset=utf-8")
        );
        assert_eq!(
            r.header("x-legacy-trace"),
            Some(format!("t{path}").as_str())
        );
        assert_eq!(r.json(), json!({"status": status}));
        assert!(no_execution_headers(&r), "{path}: {:?}", r.headers);
        match path {
            "/missing" => {
                let cookies = r.headers_named("set-cookie");
                assert_eq!(cookies, ["a=1; Path=/", "b=2; HttpOnly"]);
            }
            "/busy" => assert_eq!(r.header("retry-after"), Some("7")),
            _ => assert_eq!(r.header("location"), Some("/api/v1/agents/8")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_legacy_response_arrives_chunk_by_chunk() {
    let h = Harness::new()
        .legacy(|_: &Received| {
            let mut reply = Reply::sse(vec![
                Step::Send(b"first piece\n".to_vec()),
                Step::WaitRelease,
                Step::Send(b"second piece\n".to_vec()),
            ]);
            reply.headers = vec![("content-type".into(), "text/plain".into())];
            reply
        })
        .start()
        .await;

    let mut c = Client::connect(h.proxy_addr).await;
    c.send("GET", "/api/v1/notifications/stream", &[], b"")
        .await;
    // Legacy sends its second piece only after the first reached the client.
    let r = c
        .read_releasing(&h.legacy)
        .await
        .expect("the proxy held back the first piece of a streamed response");
    assert_eq!(r.status, 200);
    assert!(r.complete);
    assert_eq!(r.chunks[0].1, b"first piece\n");
    assert_eq!(r.body(), b"first piece\nsecond piece\n");
    assert!(no_execution_headers(&r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_share_one_legacy_connection() {
    let h = Harness::new().start().await;

    // Each request on its own client connection: the reuse is the proxy's upstream pool.
    let auth = format!("Bearer {}", token("org-b"));
    let requests = 8;
    for i in 0..requests {
        if i > 0 {
            // Pingora puts the upstream connection back in its pool just after the last byte went
            // to the client; nothing outside the proxy can observe that, so give it a moment.
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        let r = if i % 2 == 0 {
            request(
                h.proxy_addr,
                "GET",
                &format!("/api/v1/agents/{i}"),
                &[],
                b"",
            )
            .await
        } else {
            // Legacy-bound chats use the same pool.
            request(
                h.proxy_addr,
                "POST",
                &format!("/api/v1/chat/sessions/s-{i}"),
                &[("authorization", &auth)],
                HI.as_bytes(),
            )
            .await
        };
        assert_eq!(r.status, 200);
        assert!(r.complete);
    }
    assert_eq!(h.legacy.work().len(), requests);
    // Without a pool there would be one connection per request. The plain requests take the
    // front door's lean path and legacy's client, the chats Pingora's pool: each keeps its
    // connections per worker thread, and this test's runtime has two, so at most two each.
    let opened = h.legacy.connections();
    assert!(
        opened <= 4,
        "{requests} requests opened {opened} legacy connections"
    );

    // Several requests on one client connection as well.
    let mut c = Client::connect(h.proxy_addr).await;
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(15)).await;
        c.send("GET", &format!("/api/v1/ping/{i}"), &[], b"").await;
        let r = c.read_response().await;
        assert_eq!(r.status, 200);
    }
    assert!(h.legacy.connections() <= opened + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_legacy_gives_502_and_the_proxy_keeps_serving() {
    let h = Harness::new()
        .legacy_server(Unreachable::new())
        .start()
        .await;

    for path in ["/api/v1/agents", "/api/v1/agents?again=1"] {
        let r = request(h.proxy_addr, "GET", path, &[], b"").await;
        assert_eq!(r.status, 502, "{path}");
        assert!(no_execution_headers(&r));
    }
    let r = request(h.proxy_addr, "POST", "/api/v1/files", &[], &[7u8; 10_000]).await;
    assert_eq!(r.status, 502);

    // Legacy comes back on the same port: the next request is served.
    let back = TcpListener::bind(h.legacy.address()).await.unwrap();
    let legacy = Upstream::on(back, echo_legacy);
    let r = request(h.proxy_addr, "GET", "/api/v1/agents", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"echo": "/api/v1/agents", "method": "GET"}));
    assert_eq!(legacy.work().len(), 1);
}
