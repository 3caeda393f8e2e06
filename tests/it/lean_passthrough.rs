//! The lean passthrough against Pingora's proxy: the same client bytes through a proxy with
//! `server.lean_passthrough = true` and one with `false`, each in front of its own raw legacy
//! with the same script, give the same bytes at legacy and the same bytes back at the client.
//!
//! What may differ, and is normalised (`normalise`) before comparing:
//! - `Date` on responses: Pingora writes its own on every final response, the lean path keeps
//!   legacy's (legacy here sends none).
//!
//! - hop-by-hop headers in legacy's answer (`Keep-Alive`, those its `Connection` names): Pingora
//!   forwards them, the lean path drops them (RFC 9110 §7.6.1); only the case about them has
//!   them, and drops them from Pingora's answer.
//!
//! One difference is asserted instead: a client that half-closes after its request often gets no
//! answer from Pingora (it takes the end of input for a client gone), the lean path answers.
//!
//! And what the cases avoid rather than normalise:
//! - chunk boundaries: both re-frame a chunked body (extensions and trailers dropped) with a
//!   chunk per read, and where reads fall is timing; legacy sends a chunked body as one chunk.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What raw legacy answers to its `n`th request (0-based), and whether it closes after.
type Script = fn(usize, &[u8]) -> (Vec<u8>, bool);

/// A legacy speaking raw bytes: records every request as received, answers from `script`.
/// Not the scripted upstream: these cases are about the exact bytes, which it would parse.
async fn raw_legacy(script: Script) -> (std::net::SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = read_request_bytes(&mut s, &mut buf).await else {
                        return;
                    };
                    let request: Vec<u8> = buf.drain(..end).collect();
                    let n = {
                        let mut log = log.lock().unwrap();
                        log.push(request.clone());
                        log.len() - 1
                    };
                    let (answer, close) = script(n, &request);
                    if s.write_all(&answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Read one whole request (Content-Length or chunked without trailers) into `buf`: its length.
async fn read_request_bytes(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(end) = request_end(buf) {
            return Some(end);
        }
        let mut chunk = [0u8; 8192];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn request_end(buf: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(head) = req.parse(buf).ok()? else {
        return None;
    };
    message_end(buf, head, req.headers)
}

/// One step of the client.
#[derive(Clone)]
enum Do {
    Send(&'static [u8]),
    /// Wait for one whole response (Content-Length framed) before going on.
    Await,
    /// Shut down the write half.
    HalfClose,
}

/// Read onto `got` until one whole response follows `from`: its length.
async fn read_response(s: &mut TcpStream, got: &mut Vec<u8>, from: usize) -> usize {
    loop {
        if let Some(end) = response_end(&got[from..]) {
            return end;
        }
        let mut chunk = [0u8; 8192];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed before a whole response: {:?}",
            String::from_utf8_lossy(got)
        );
        got.extend_from_slice(&chunk[..n]);
    }
}

/// Run the client's steps against `addr`, then read until the proxy closes: every byte read.
async fn client(addr: std::net::SocketAddr, steps: &[Do]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut got = Vec::new();
    let mut seen = 0;
    for step in steps {
        match step {
            Do::Send(bytes) => s.write_all(bytes).await.unwrap(),
            Do::HalfClose => s.shutdown().await.unwrap(),
            Do::Await => seen += read_response(&mut s, &mut got, seen).await,
        }
    }
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("the proxy did not close the connection")
        .ok();
    got
}

fn response_end(buf: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = resp.parse(buf).ok()? else {
        return None;
    };
    message_end(buf, head, resp.headers)
}

/// Where a message whose head is `head` bytes long ends, by its framing headers, if it is all
/// in `buf`.
fn message_end(buf: &[u8], head: usize, headers: &[httparse::Header]) -> Option<usize> {
    let header = |name: &str| {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_string())
    };
    if header("transfer-encoding").is_some() {
        return chunked_end(buf, head);
    }
    let len: usize = header("content-length").map_or(0, |v| v.trim().parse().unwrap());
    (buf.len() >= head + len).then_some(head + len)
}

/// Where a chunked body without trailers that starts at `at` ends.
fn chunked_end(buf: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let httparse::Status::Complete((n, size)) = httparse::parse_chunk_size(&buf[at..]).ok()?
        else {
            return None;
        };
        at += n + size as usize + 2;
        if buf.len() < at {
            return None;
        }
        if size == 0 {
            return Some(at);
        }
    }
}

/// Drop `Date` lines (see the file comment).
fn normalise(bytes: &[u8]) -> String {
    without_date(bytes)
}

/// What one proxy made of the case: the requests legacy received, the bytes the client got.
async fn through(lean: bool, script: Script, steps: &[Do]) -> (Vec<String>, String) {
    let (legacy, seen) = raw_legacy(script).await;
    let h = Harness::new()
        .legacy_server(legacy)
        .config(move |c| c.server.lean_passthrough = lean)
        .start()
        .await;
    let got = client(h.proxy_addr, steps).await;
    let seen = seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| String::from_utf8_lossy(r).to_string())
        .collect();
    (seen, normalise(&got))
}

async fn same(name: &str, script: Script, steps: &[Do]) -> (Vec<String>, String) {
    eprintln!("case: {name}");
    let pingora = through(false, script, steps).await;
    let lean = through(true, script, steps).await;
    assert_eq!(lean.0, pingora.0, "{name}: what legacy received");
    assert_eq!(lean.1, pingora.1, "{name}: what the client received");
    lean
}

fn ok(_: usize, _: &[u8]) -> (Vec<u8>, bool) {
    (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Legacy: 1\r\nContent-Length: 5\r\n\r\nhello"
            .to_vec(),
        false,
    )
}

fn numbered(n: usize, _: &[u8]) -> (Vec<u8>, bool) {
    let body = format!("answer {n}");
    (
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
        false,
    )
}

const GET: &[u8] = b"GET /api/v1/agents?a=1&b=%20 HTTP/1.1\r\nHost: proxy.test\r\nAccept: */*\r\nX-Multi: 1\r\nX-Multi: 2\r\nConnection: close\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_head_and_bodies_match_pingora() {
    let (seen, got) = same("GET", ok, &[Do::Send(GET)]).await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.ends_with("hello"), "{got}");
    assert_eq!(seen.len(), 1);

    // A client's own forwarded headers and hop-by-hop ones amid the rest: on both paths legacy
    // gets the rest in the client's order, then the proxy's three.
    let (seen, _) = same(
        "a client's X-Forwarded-* among its headers",
        ok,
        &[Do::Send(
            b"GET /h HTTP/1.1\r\nX-Forwarded-For: 203.0.113.66\r\nHost: proxy.test\r\n\
              Connection: close, x-secret\r\nX-Secret: 1\r\nX-Forwarded-Proto: https\r\nAccept: */*\r\n\
              TE: trailers\r\nX-Forwarded-Host: evil.test\r\nX-Last: 1\r\n\r\n",
        )],
    )
    .await;
    assert_eq!(
        seen,
        ["GET /h HTTP/1.1\r\nHost: proxy.test\r\nAccept: */*\r\nX-Last: 1\r\n\
          x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: proxy.test\r\n\r\n"]
    );

    same(
        "HEAD",
        |_, _| {
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec(),
                false,
            )
        },
        &[Do::Send(
            b"HEAD /x HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\n\r\n",
        )],
    )
    .await;
    let (seen, _) = same(
        "POST with Content-Length",
        ok,
        &[Do::Send(
            b"POST /api/v1/agents HTTP/1.1\r\nHost: proxy.test\r\nContent-Type: application/json\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{\"a\":\"xyz\"}",
        )],
    )
    .await;
    assert!(seen[0].ends_with("{\"a\":\"xyz\"}"), "{seen:?}");
    let (seen, _) = same(
        "chunked POST",
        ok,
        &[Do::Send(
            b"POST /api/v1/uploads HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n8;x=y\r\nhelloabc\r\n0\r\n\r\n",
        )],
    )
    .await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    // Split anywhere, a chunked body reaches legacy whole (re-framed by reads, so not compared).
    let (seen, got) = through(
        true,
        ok,
        &[
            Do::Send(b"POST /u HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhel"),
            Do::Send(b"lo\r\n3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"),
        ],
    )
    .await;
    assert!(got.ends_with("hello"), "{got}");
    let body = seen[0].split_once("\r\n\r\n").unwrap().1;
    let mut at = 0;
    let mut payload = Vec::new();
    loop {
        let httparse::Status::Complete((n, size)) =
            httparse::parse_chunk_size(&body.as_bytes()[at..]).unwrap()
        else {
            panic!("{body:?}");
        };
        payload.extend_from_slice(&body.as_bytes()[at + n..at + n + size as usize]);
        at += n + size as usize + 2;
        if size == 0 {
            break;
        }
    }
    assert_eq!(payload, b"helloabc");
    assert_eq!(at, body.len(), "{body:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_framings_match_pingora() {
    let after_one = |path: &'static [u8]| [Do::Send(path), Do::Await, Do::Send(GET)];
    // Name, legacy's answer, the client's steps, and what the client must get.
    type Case = (&'static str, Script, Vec<Do>, fn(&str) -> bool);
    let cases: [Case; 5] = [
        (
            "chunked response",
            |_, _| {
                (
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nb;x=1\r\nhello world\r\n0\r\n\r\n"
                        .to_vec(),
                    false,
                )
            },
            vec![Do::Send(GET)],
            |got| got.contains("hello"),
        ),
        (
            "close-delimited response",
            |_, _| {
                (
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end".to_vec(),
                    true,
                )
            },
            after_one(b"GET /stream HTTP/1.1\r\nHost: proxy.test\r\n\r\n").to_vec(),
            |got| got.contains("until the end"),
        ),
        (
            "204 No Content",
            |_, _| (b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n".to_vec(), false),
            after_one(b"GET /a HTTP/1.1\r\nHost: proxy.test\r\n\r\n").to_vec(),
            |got| got.starts_with("HTTP/1.1 204 No Content"),
        ),
        (
            "304 Not Modified",
            |_, _| {
                (
                    b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n".to_vec(),
                    false,
                )
            },
            after_one(b"GET /a HTTP/1.1\r\nHost: proxy.test\r\n\r\n").to_vec(),
            |got| got.starts_with("HTTP/1.1 304 Not Modified"),
        ),
        (
            "1xx",
            |_, _| {
                (
                    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                        .to_vec(),
                    false,
                )
            },
            vec![Do::Send(GET)],
            |got| got.starts_with("HTTP/1.1 103"),
        ),
    ];
    for (name, script, steps, expected) in cases {
        let (_, got) = same(name, script, &steps).await;
        assert!(expected(&got), "{name}: {got}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_match_pingora() {
    let (seen, got) = same(
        "pipelined",
        numbered,
        &[Do::Send(
            b"GET /1 HTTP/1.1\r\nHost: proxy.test\r\n\r\nPOST /2 HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\n\r\n",
        )],
    )
    .await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(got.contains("answer 2"), "{got}");
    let (seen, _) = same(
        "keep-alive reuse",
        numbered,
        &[
            Do::Send(b"GET /1 HTTP/1.1\r\nHost: proxy.test\r\n\r\n"),
            Do::Await,
            Do::Send(b"GET /2 HTTP/1.1\r\nHost: proxy.test\r\n\r\n"),
            Do::Await,
            Do::Send(GET),
        ],
    )
    .await;
    assert_eq!(seen.len(), 3);
    same(
        "HTTP/1.0 keep-alive",
        numbered,
        &[
            Do::Send(b"GET /1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
            Do::Await,
            Do::Send(b"GET /2 HTTP/1.0\r\n\r\n"),
        ],
    )
    .await;
    let half_close = [
        Do::Send(b"GET /1 HTTP/1.1\r\nHost: proxy.test\r\n\r\n"),
        Do::HalfClose,
    ];
    let pingora = through(false, ok, &half_close).await;
    let lean = through(true, ok, &half_close).await;
    assert_eq!(lean.0, pingora.0, "client half-close: what legacy received");
    // Pingora answers only when its response wins the race with its read of the end of input.
    assert!(
        pingora.1.is_empty() || pingora.1 == lean.1,
        "Pingora: {}",
        pingora.1
    );
    let (_, whole) = through(true, ok, &[Do::Send(GET)]).await;
    assert_eq!(
        lean.1,
        whole.replace("Connection: close", "Connection: keep-alive"),
        "the lean path answers a half-closed client, then closes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_match_pingora() {
    let (_, got) = same(
        "legacy closes without answering",
        |_, _| (Vec::new(), true),
        &[Do::Send(GET)],
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 502"), "{got}");
    let (_, got) = same(
        "legacy closes mid-body",
        |_, _| {
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf".to_vec(),
                true,
            )
        },
        &[Do::Send(GET)],
    )
    .await;
    assert!(got.ends_with("half"), "{got}");
    let hop: Script = |_, _| {
        (
            b"HTTP/1.1 200 OK\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok"
                .to_vec(),
            false,
        )
    };
    let hop_request = [Do::Send(
        b"GET /h HTTP/1.1\r\nHost: proxy.test\r\nConnection: close, x-secret\r\nX-Secret: 1\r\nTE: trailers\r\nKeep-Alive: 300\r\nProxy-Authorization: Basic eA==\r\n\r\n",
    )];
    let pingora = through(false, hop, &hop_request).await;
    let lean = through(true, hop, &hop_request).await;
    assert_eq!(
        lean.0, pingora.0,
        "hop-by-hop headers: what legacy received"
    );
    assert_eq!(
        lean.1,
        pingora
            .1
            .replace("X-Hop: 1\r\nKeep-Alive: timeout=5\r\n", ""),
        "hop-by-hop headers: what the client received"
    );
    assert_eq!(
        lean.0,
        [
            "GET /h HTTP/1.1\r\nHost: proxy.test\r\nx-forwarded-for: 127.0.0.1\r\n\
          x-forwarded-proto: http\r\nx-forwarded-host: proxy.test\r\n\r\n"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lean_request_in_flight_at_shutdown_finishes_and_counts_for_the_drain() {
    let h = Harness::new()
        .legacy(released_in_two(b"first\n", b"second\n"))
        .start()
        .await;
    assert!(h.shared.snapshot().config.server.lean_passthrough);
    let Running {
        legacy,
        runtime: _runtime,
        server,
    } = h;
    let shared = server.shared.clone();
    let mut c = Client::connect(server.proxy_addr).await;
    c.send("GET", "/api/v1/notifications/stream", &[], b"")
        .await;
    let mut server = Some(server);
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        c.read_response_with(|_| {
            if let Some(server) = server.take() {
                // The drain waits for what is in flight: the lean request is.
                assert_eq!(shared.requests.count(), 1);
                drop(server);
                legacy.release();
            }
        }),
    )
    .await
    .expect("the response in flight did not finish after shutdown");
    assert!(r.complete);
    assert_eq!(r.body(), b"first\nsecond\n");
    assert!(c.closed_within(Duration::from_secs(3)).await);
    assert_eq!(shared.requests.count(), 0);
}

/// A legacy that writes its answer's head and body apart, as uvicorn does, and keeps the
/// connection: each part must reach the client as it comes, not wait for the connection's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_written_in_parts_reaches_a_keep_alive_client_as_it_comes() {
    // Not the scripted upstream: the head and the body are written apart, on the test's cue.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let legacy = listener.local_addr().unwrap();
    let (body_tx, body_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        read_request_bytes(&mut s, &mut buf).await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            .await
            .unwrap();
        // The body only once the client has the head.
        body_rx.await.unwrap();
        s.write_all(b"hello").await.unwrap();
        // Held open: nothing but the proxy's own flushing can deliver the answer.
        let _ = s.read(&mut [0u8; 1]).await;
    });
    let h = Harness::new().legacy_server(legacy).start().await;
    assert!(
        h.shared.snapshot().config.server.lean_passthrough,
        "the lean path is the default"
    );

    let mut c = TcpStream::connect(h.proxy_addr).await.unwrap();
    c.write_all(b"GET /api/v1/agents HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    read_until(&mut c, &mut got, "the head", |g| {
        g.windows(4).any(|w| w == b"\r\n\r\n")
    })
    .await;
    body_tx.send(()).unwrap();
    read_until(&mut c, &mut got, "the body", |g| g.ends_with(b"hello")).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
}

/// Read from `c` into `got` until `done` holds, each read within a bounded wait.
async fn read_until(
    c: &mut TcpStream,
    got: &mut Vec<u8>,
    what: &str,
    done: impl Fn(&[u8]) -> bool,
) {
    let mut chunk = [0u8; 1024];
    while !done(got) {
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("{what} did not reach the client"))
            .unwrap();
        assert!(n > 0, "closed before {what}");
        got.extend_from_slice(&chunk[..n]);
    }
}

/// A legacy that answers `413` as soon as it has a request's head, reads the rest of the
/// connection away (as nginx's lingering close does) and closes. Not the scripted upstream,
/// which answers only after the whole request.
async fn early_legacy() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut chunk = [0u8; 4096];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let answer = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!";
                if s.write_all(answer).await.is_err() {
                    return;
                }
                let mut sink = [0u8; 4096];
                let linger = async { while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {} };
                let _ = tokio::time::timeout(Duration::from_secs(5), linger).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_whole_body_reaches_the_client_as_through_pingora() {
    let mut answers = Vec::new();
    for lean in [false, true] {
        let h = Harness::new()
            .legacy_server(early_legacy().await)
            .config(move |c| c.server.lean_passthrough = lean)
            .start()
            .await;
        // A body far larger than the sockets' buffers, of which only the start is ever sent:
        // the client waits for the answer instead.
        let mut s = TcpStream::connect(h.proxy_addr).await.unwrap();
        s.write_all(
            b"POST /api/v1/files HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 50000000\r\n\r\nfirst bytes",
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        read_response(&mut s, &mut got, 0).await;
        if lean {
            // The rest of the body will never be read: the connection cannot carry another
            // request.
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
                .await
                .expect("the lean path keeps a connection whose body it did not read")
                .ok();
        }
        answers.push(normalise(&got));
    }
    assert!(
        answers[1].starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "lean: {}",
        answers[1]
    );
    assert!(answers[1].ends_with("too big!"), "lean: {}", answers[1]);
    assert_eq!(answers[1], answers[0], "lean vs Pingora");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_header_cannot_strip_the_framing_or_the_host() {
    for (name, request) in [
        (
            "Connection: content-length",
            &b"POST /x HTTP/1.1\r\nHost: proxy.test\r\nConnection: content-length\r\nContent-Length: 41\r\n\r\nGET /SMUGGLED HTTP/1.1\r\nHost: proxy.test\r\n\r\n"[..],
        ),
        (
            "Connection: transfer-encoding",
            b"POST /x HTTP/1.1\r\nHost: proxy.test\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "Connection: host",
            b"GET /x HTTP/1.1\r\nHost: proxy.test\r\nConnection: host\r\n\r\n",
        ),
    ] {
        let (lean, pingora) = (
            through(true, ok, &[Do::Send(request), Do::Await, Do::HalfClose]).await,
            through(false, ok, &[Do::Send(request), Do::Await, Do::HalfClose]).await,
        );
        assert_eq!(lean, pingora, "{name}: lean vs Pingora");
        // Pingora answers a request stripped of its Host itself: legacy gets none of it.
        for got in &lean.0 {
            let head = got.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
            assert!(head.contains("\r\nhost: proxy.test"), "{name}: {head}");
        }
        if request.starts_with(b"POST") {
            assert_eq!(lean.0.len(), 1, "{name}: legacy got {:?}", lean.0);
            assert!(
                lean.0[0].contains("\r\nTransfer-Encoding: chunked\r\n"),
                "{name}: the body went on without its framing: {:?}",
                lean.0
            );
        }
    }
}
