//! The HTTP/1 front door against hostile clients, with raw TCP and the exact bytes of the
//! findings: what the client is answered (or that it is closed), and what the upstream received
//! (nothing, or exactly the one valid request).

use crate::support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cutover_proxy::app::LocalServer;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the proxy sent back on one connection, read until it closed.
#[derive(Debug)]
struct Answer {
    /// The first response's status, if one came.
    status: Option<u16>,
    text: String,
    closed: bool,
    took: Duration,
}

/// Read from `conn` until it closes or `wait` passes.
async fn read_until_close(conn: &mut TcpStream, wait: Duration) -> Answer {
    let started = Instant::now();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(wait, async {
        loop {
            buf.reserve(16 * 1024);
            match conn.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok();
    let text = String::from_utf8_lossy(&buf).to_string();
    Answer {
        status: text.get(9..12).and_then(|s| s.parse().ok()),
        text,
        closed,
        took: started.elapsed(),
    }
}

/// Send `bytes` on a fresh connection; a failed write is fine (the proxy may close first).
async fn send(addr: SocketAddr, bytes: &[u8]) -> Answer {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let _ = conn.write_all(bytes).await;
    read_until_close(&mut conn, Duration::from_secs(5)).await
}

fn rejections(server: &LocalServer, reason: &str) -> f64 {
    metric(
        server,
        "cutover_front_door_rejections_total",
        &[("reason", reason)],
    )
}

const SMUGGLING: &[u8] = b"POST /empty2 HTTP/1.1\r\nHost: example\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n\r\n31\r\nX: y\r\n\r\nGET /SMUGGLED HTTP/1.1\r\nHost: example\r\n\r\n\r\n0\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_size_line_without_digits_never_ends_the_body() {
    let h = Harness::new().start().await;
    // The finding's bytes, and the same body with each size line httparse took for the last
    // chunk: empty, a space, a tab, an extension alone; then a size above 2^63.
    let mut cases = vec![SMUGGLING.to_vec()];
    for line in [" ", "\t", ";x"] {
        let body = String::from_utf8_lossy(SMUGGLING).replacen(
            "hello\r\n\r\n31",
            &format!("hello\r\n{line}\r\n31"),
            1,
        );
        cases.push(body.into_bytes());
    }
    cases.push(
        b"POST /empty2 HTTP/1.1\r\nHost: example\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\nGET /SMUGGLED HTTP/1.1\r\nHost: example\r\n\r\n".to_vec(),
    );
    for bytes in &cases {
        let a = send(h.proxy_addr, bytes).await;
        // The head was good, so the request had begun; its body broke off: the connection is
        // closed without an answer (the upstream never got the request whole to answer it).
        assert!(a.closed, "{}: {a:?}", bytes.escape_ascii());
        assert_eq!(a.status, None, "{}: {a:?}", bytes.escape_ascii());
        assert!(a.took < Duration::from_secs(3), "{a:?}");
    }
    let paths: Vec<String> = h.legacy.work().into_iter().map(|r| r.path).collect();
    assert!(paths.is_empty(), "legacy received {paths:?}");
    let refused: f64 = ["chunk_size", "chunk_extension"]
        .iter()
        .map(|r| rejections(&h, r))
        .sum();
    assert_eq!(refused, cases.len() as f64);

    // The same request well framed is served, once, with its body.
    let good = b"POST /empty2 HTTP/1.1\r\nHost: example\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;ext=\"a b\"\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n";
    let a = send(h.proxy_addr, good).await;
    assert_eq!(a.status, Some(200), "{a:?}");
    let work = h.legacy.work();
    assert_eq!(work.len(), 1, "{work:?}");
    assert_eq!(
        (work[0].path.as_str(), work[0].body.as_slice()),
        ("/empty2", &b"hello"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_heads_are_answered_400_and_reach_no_upstream() {
    let h = Harness::new().start().await;
    let cases: &[(&[u8], u16, &str)] = &[
        (b"POST /x HTTP/1.1\r\nHost: e\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400, "content_length"),
        (b"POST /x HTTP/1.1\r\nHost: e\r\nContent-Length: 5, 5\r\n\r\nhello", 400, "content_length"),
        (b"POST /x HTTP/1.1\r\nHost: e\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400, "transfer_encoding"),
        (b"POST /x HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "unknown_transfer_coding"),
        (b"GET /x HTTP/1.1\r\n\r\n", 400, "host"),
        (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "host"),
        (b"GET /a\x01b HTTP/1.1\r\nHost: e\r\n\r\n", 400, "malformed"),
        (b"GET /a\x7fb HTTP/1.1\r\nHost: e\r\n\r\n", 400, "malformed"),
        (b"GET /x HTTP/1.1\nHost: e\n\n", 400, "malformed"),
    ];
    for (bytes, status, reason) in cases {
        let before = rejections(&h, reason);
        let a = send(h.proxy_addr, bytes).await;
        assert_eq!(a.status, Some(*status), "{}: {a:?}", bytes.escape_ascii());
        assert!(a.closed, "{}: {a:?}", bytes.escape_ascii());
        assert_eq!(rejections(&h, reason), before + 1.0, "{reason}");
    }
    assert!(h.legacy.work().is_empty(), "{:?}", h.legacy.work());
    assert!(h.runtime.work().is_empty(), "{:?}", h.runtime.work());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_reaches_legacy_as_its_path_with_its_host() {
    let h = Harness::new().start().await;
    let a = send(
        h.proxy_addr,
        b"GET http://legacy.example:8080/api/v1/agents?page=2 HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, Some(200), "{a:?}");
    let work = h.legacy.work();
    assert_eq!(work.len(), 1, "{work:?}");
    assert_eq!(work[0].path, "/api/v1/agents?page=2");
    assert_eq!(work[0].header("host"), Some("legacy.example:8080"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_over_the_limit_is_answered_431() {
    let h = Harness::new()
        .config(|c| c.limits.max_header_bytes = 4096)
        .start()
        .await;
    let mut conn = TcpStream::connect(h.proxy_addr).await.unwrap();
    conn.write_all(b"GET /x HTTP/1.1\r\nHost: e\r\nX-Big: ")
        .await
        .unwrap();
    conn.write_all(&vec![b'a'; 8192]).await.unwrap();
    let a = read_until_close(&mut conn, Duration::from_secs(5)).await;
    assert_eq!(a.status, Some(431), "{a:?}");
    assert!(a.closed);
    assert_eq!(rejections(&h, "header_too_large"), 1.0);
    // Just under the limit is served.
    let mut head = b"GET /x HTTP/1.1\r\nHost: e\r\nConnection: close\r\nX-Big: ".to_vec();
    head.resize(4096 - 4, b'a');
    head.extend_from_slice(b"\r\n\r\n");
    assert_eq!(send(h.proxy_addr, &head).await.status, Some(200));
    assert_eq!(h.legacy.work().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_trickled_a_byte_at_a_time_is_cut_at_the_header_deadline() {
    let h = Harness::new()
        .config(|c| c.server.header_timeout_ms = 400)
        .start()
        .await;
    let conn = TcpStream::connect(h.proxy_addr).await.unwrap();
    let started = Instant::now();
    let (mut rd, mut wr) = conn.into_split();
    // One byte every 50 ms: each read comes well within any per-read timeout.
    let trickle = tokio::spawn(async move {
        wr.write_all(b"GET /x HTTP/1.1\r\nHost: e\r\nX-Big: ")
            .await
            .unwrap();
        loop {
            if wr.write_all(b"a").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while !matches!(rd.read_buf(&mut buf).await, Ok(0) | Err(_)) {}
    })
    .await
    .is_ok();
    let took = started.elapsed();
    trickle.abort();
    assert!(closed, "a trickled head kept the connection open");
    assert!(took >= Duration::from_millis(350), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(buf.starts_with(b"HTTP/1.1 408 "), "{}", buf.escape_ascii());
    assert_eq!(rejections(&h, "header_timeout"), 1.0);
    assert!(h.legacy.work().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout() {
    let h = Harness::new()
        .config(|c| c.server.keepalive_timeout_ms = 300)
        .start()
        .await;
    let mut c = Client::connect(h.proxy_addr).await;
    c.send("GET", "/api/v1/agents", &[], b"").await;
    assert_eq!(c.read_response().await.status, 200);
    let idle = Instant::now();
    // Still open right after the response, closed once the timeout has passed.
    assert!(!c.closed_within(Duration::from_millis(100)).await);
    assert!(c.closed_within(Duration::from_secs(3)).await);
    assert!(
        idle.elapsed() >= Duration::from_millis(280),
        "{:?}",
        idle.elapsed()
    );
    assert_eq!(h.legacy.work().len(), 1);
    // Idling out is no refusal.
    assert_eq!(rejections(&h, "header_timeout"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_on_shutdown() {
    let h = Harness::new().start().await;
    let mut c = Client::connect(h.proxy_addr).await;
    c.send("GET", "/api/v1/agents", &[], b"").await;
    assert_eq!(c.read_response().await.status, 200);
    assert!(!c.closed_within(Duration::from_millis(100)).await);
    // Dropping the server raises its shutdown signal; the default keep-alive timeout is 75 s.
    drop(h);
    assert!(c.closed_within(Duration::from_secs(2)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_max_connections_are_refused_at_once() {
    let h = Harness::new()
        .config(|c| c.server.max_connections = 2)
        .start()
        .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect(h.proxy_addr).await;
        c.send("GET", "/api/v1/agents", &[], b"").await;
        assert_eq!(c.read_response().await.status, 200);
        held.push(c);
    }
    assert_eq!(metric(&h, "cutover_front_door_connections", &[]), 2.0);
    let a = send(
        h.proxy_addr,
        b"GET /api/v1/agents HTTP/1.1\r\nHost: e\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, Some(503), "{a:?}");
    assert!(a.closed && a.took < Duration::from_secs(1), "{a:?}");
    assert_eq!(rejections(&h, "max_connections"), 1.0);
    // A slot frees when a connection ends.
    drop(held.pop());
    let shared = h.shared.clone();
    assert!(
        eventually(Duration::from_secs(3), move || {
            shared.metrics.front_door.connections.get() == 1
        })
        .await
    );
    let a = send(
        h.proxy_addr,
        b"GET /api/v1/agents HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, Some(200), "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_each_served_once_in_order() {
    let h = Harness::new().start().await;
    let mut conn = TcpStream::connect(h.proxy_addr).await.unwrap();
    conn.write_all(
        b"GET /one HTTP/1.1\r\nHost: e\r\n\r\n\
          POST /two HTTP/1.1\r\nHost: e\r\nContent-Length: 3\r\n\r\nabc\
          POST /three HTTP/1.1\r\nHost: e\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n\
          GET /four HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let a = read_until_close(&mut conn, Duration::from_secs(5)).await;
    assert!(a.closed, "{a:?}");
    assert_eq!(a.text.matches("HTTP/1.1 200 ").count(), 4, "{}", a.text);
    let order: Vec<usize> = ["/one", "/two", "/three", "/four"]
        .iter()
        .map(|p| {
            a.text
                .find(&format!("\"echo\":\"{p}\""))
                .unwrap_or_else(|| panic!("{p}: {}", a.text))
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{}", a.text);
    let work = h.legacy.work();
    let got: Vec<(&str, &[u8])> = work
        .iter()
        .map(|r| (r.path.as_str(), r.body.as_slice()))
        .collect();
    assert_eq!(
        got,
        [
            ("/one", &b""[..]),
            ("/two", b"abc"),
            ("/three", b"de"),
            ("/four", b"")
        ]
    );
}

/// VmRSS and VmHWM of `pid`, in kB.
fn memory_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_one_megabyte_heads_leave_memory_bounded() {
    // Not the Harness: the memory measured is the shipped binary's, run as a child process.
    let legacy = Upstream::start(echo_legacy).await;
    let runtime = Upstream::start(healthy_runtime).await;
    let dir = TempDir::new("front-door-memory");
    let (port, admin, metrics) = (free_port(), free_port(), free_port());
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\n\
         [legacy]\naddress = \"{}\"\n[runtime]\naddress = \"{}\"\ndefault_agent_id = \"{TEST_AGENT}\"\n\
         [identity]\njwt_secret_env = \"{JWT_ENV}\"\n[admin]\ntoken_env = \"{ADMIN_ENV}\"\n{BRIDGE_OFF_TOML}",
        legacy.address(),
        runtime.address()
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cutover-proxy"))
        .arg("--config")
        .arg(&path)
        .env(JWT_ENV, JWT_SECRET)
        .env(ADMIN_ENV, ADMIN_TOKEN)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let ready = until(Duration::from_secs(15), || async {
        let Ok(mut c) = TcpStream::connect(addr).await else {
            return Err(());
        };
        let _ = c
            .write_all(b"GET /api/v1/agents HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n")
            .await;
        let status = read_until_close(&mut c, Duration::from_secs(2))
            .await
            .status;
        (status == Some(200)).then_some(()).ok_or(())
    })
    .await;
    assert!(ready.is_ok(), "proxy did not start");
    let (rss_before, _) = memory_kb(child.id());

    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..250 {
        clients.spawn(async move {
            let conn = TcpStream::connect(addr).await.unwrap();
            let (mut rd, mut wr) = conn.into_split();
            let writer = tokio::spawn(async move {
                let _ = wr.write_all(b"GET /x HTTP/1.1\r\nHost: e\r\nX-Big: ").await;
                let _ = wr.write_all(&vec![b'a'; 1_000_000]).await;
                // Never end the line; keep the connection open.
                std::future::pending::<()>().await;
            });
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(20), async {
                while !matches!(rd.read_buf(&mut buf).await, Ok(0) | Err(_)) {}
            })
            .await;
            writer.abort();
            buf.starts_with(b"HTTP/1.1 431 ")
        });
    }
    let mut answered = 0;
    while let Some(r) = clients.join_next().await {
        answered += r.unwrap() as usize;
    }
    let (rss_after, peak) = memory_kb(child.id());
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("VmRSS {rss_before} kB before, {rss_after} kB after, VmHWM {peak} kB; {answered}/250 answered 431");
    assert_eq!(answered, 250);
    assert!(peak < 40 * 1024, "peak RSS {peak} kB");
    // 250 connections at the 32 KiB limit each: the heads' share is a few MB, not 250 MB.
    assert!(
        peak - rss_before < 16 * 1024,
        "RSS grew {} kB",
        peak - rss_before
    );
    // Only the readiness probe reached legacy.
    let paths: Vec<String> = legacy.work().into_iter().map(|r| r.path).collect();
    assert!(paths.iter().all(|p| p == "/api/v1/agents"), "{paths:?}");
}
