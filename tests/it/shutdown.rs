//! Graceful shutdown of the real binary: SIGTERM while SSE streams are in flight.
//!
//! The proxy runs as a child process (`cutover-proxy --config …`) on free loopback ports, in
//! front of scripted upstreams from `support`. Each test sends SIGTERM with `kill` and watches
//! what a client, a new client, the readiness probe and the process itself see.

// Not the Harness: signals and exit codes are the shipped binary's, run as a child process.
use crate::support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use support::*;
use tokio::sync::mpsc;

/// A free loopback port (the listener is closed again, so the proxy can bind it).
/// The proxy binary running as a child process; killed if the test fails before it exits.
struct ProxyProcess {
    child: Child,
    dir: PathBuf,
    proxy: SocketAddr,
    admin: SocketAddr,
    metrics: SocketAddr,
}

impl ProxyProcess {
    async fn start(
        name: &str,
        legacy: &Upstream,
        runtime: &Upstream,
        grace: Duration,
    ) -> ProxyProcess {
        let (legacy, runtime) = (legacy.address(), runtime.address());
        ProxyProcess::start_with(name, &legacy, &runtime, grace.as_secs(), BRIDGE_OFF_TOML).await
    }

    /// `start`, with this `[bridge]` table.
    async fn start_with(
        name: &str,
        legacy: &str,
        runtime: &str,
        grace_secs: u64,
        bridge: &str,
    ) -> ProxyProcess {
        let dir =
            std::env::temp_dir().join(format!("cutover-shutdown-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (proxy, admin, metrics) = (free_port(), free_port(), free_port());
        let config = test_toml(legacy, runtime);
        let config = retoml(
            &config,
            "listen = \"127.0.0.1:1\"",
            &format!(
                "listen = \"127.0.0.1:{proxy}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
                 metrics_listen = \"127.0.0.1:{metrics}\"\nthreads = 2\n\
                 grace_period_secs = {grace_secs}"
            ),
        );
        let config = retoml(
            &config,
            "execution_timeout_ms = 5000",
            "execution_timeout_ms = 60000",
        );
        // The shipped defaults for the commit point and the breaker.
        let config = retoml(&config, "commit_timeout_ms = 1000\n", "");
        let config = retoml(&config, "[breaker]\nopen_secs = 1\n", "");
        let config = retoml(&config, BRIDGE_OFF_TOML, bridge);
        let path = dir.join("proxy.toml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.join("proxy.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cutover-proxy"))
            .arg("--config")
            .arg(&path)
            .env(JWT_ENV, JWT_SECRET)
            .env(ADMIN_ENV, ADMIN_TOKEN)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start cutover-proxy");
        let p = ProxyProcess {
            child,
            dir,
            proxy: SocketAddr::from(([127, 0, 0, 1], proxy)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            metrics: SocketAddr::from(([127, 0, 0, 1], metrics)),
        };
        p.wait_ready().await;
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("proxy.log")).unwrap_or_default()
    }

    /// Wait until the proxy accepts connections and `/readyz` answers 200.
    async fn wait_ready(&self) {
        let ready = until(Duration::from_secs(15), || async {
            let up = tokio::net::TcpStream::connect(self.proxy).await.is_ok()
                && get(self.admin, "/readyz").await.map(|(s, _)| s) == Some(200);
            up.then_some(()).ok_or(())
        })
        .await;
        assert!(
            ready.is_ok(),
            "proxy did not become ready; log:\n{}",
            self.log()
        );
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Exit cleanly less than `bound` after a signal sent at `signalled` (within 5 s, else fail
    /// saying `what`).
    async fn exits_in_time(&mut self, signalled: Instant, bound: Duration, what: &str) {
        let took = self
            .exits_cleanly_within(Duration::from_secs(5), what)
            .await
            - signalled;
        assert!(took < bound, "{what}: exited {took:?} after the signal");
    }

    /// Wait for the process to exit, at most `within` (else fail saying `otherwise`), and check
    /// that it exited with success; when it did.
    async fn exits_cleanly_within(&mut self, within: Duration, otherwise: &str) -> Instant {
        let child = &mut self.child;
        let (status, at): (ExitStatus, Instant) = until(within, || {
            let status = child.try_wait().unwrap();
            std::future::ready(status.map(|s| (s, Instant::now())).ok_or(()))
        })
        .await
        .expect(otherwise);
        assert!(status.success(), "exit status {status:?}");
        at
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("proxy log ({}):\n{}", self.dir.display(), self.log());
        }
    }
}

/// One GET on a fresh connection: `None` when the connection is refused or fails.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    drop(stream);
    let mut c = Client::connect(addr).await;
    c.send("GET", path, &[], b"").await;
    let r = tokio::time::timeout(Duration::from_secs(5), c.read_response_with(|_| {}))
        .await
        .ok()?;
    Some((r.status, r.text()))
}

/// Whether a new TCP connection to `addr` is refused.
async fn refused(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Start a chat request as `org`; the response is read on a task that reports the arrival of
/// the first body chunk, then returns the whole response and when it ended.
async fn start_chat(
    addr: SocketAddr,
    org: &str,
    session: &str,
) -> (
    mpsc::UnboundedReceiver<()>,
    tokio::task::JoinHandle<(Response, Instant)>,
) {
    let mut c = Client::connect(addr).await;
    c.post_chat(Some(org), session, br#"{"message":"hello"}"#)
        .await;
    let (first_tx, first_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            c.read_response_with(move |_| {
                let _ = first_tx.send(());
            }),
        )
        .await
        .expect("response did not end");
        (r, Instant::now())
    });
    (first_rx, task)
}

async fn first_chunk(rx: &mut mpsc::UnboundedReceiver<()>) {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no first chunk")
        .expect("stream ended before its first chunk");
}

/// A runtime whose executions stream for about `secs` seconds before completing.
fn slow_runtime(secs: u64) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    runtime_script(move |_| {
        let mut steps = vec![Step::Send(frame(
            "text_chunk",
            serde_json::json!({"content": "one"}),
        ))];
        for i in 0..secs * 2 {
            steps.push(Step::Sleep(Duration::from_millis(500)));
            steps.push(Step::Send(frame(
                "text_chunk",
                serde_json::json!({"content": format!("more {i}")}),
            )));
        }
        steps.push(Step::Send(frame(
            "execution_complete",
            serde_json::json!({"final_response": "done"}),
        )));
        steps.push(Step::Send(done_frame()));
        Reply::sse(steps)
    })
}

/// A legacy Chat API whose chat answers stream for about `secs` seconds.
fn slow_legacy(secs: u64) -> impl Fn(&Received) -> Reply + Send + Sync + 'static {
    move |req: &Received| {
        if !req.path.starts_with("/api/v1/chat/") {
            return echo_legacy(req);
        }
        let event = |i: u64| {
            format!("event: message\ndata: {{\"id\":\"l{i}\",\"type\":\"text\",\"data\":{{\"content\":\"legacy {i}\"}}}}\n\n")
                .into_bytes()
        };
        let mut steps = vec![Step::Send(event(0))];
        for i in 1..=secs * 2 {
            steps.push(Step::Sleep(Duration::from_millis(500)));
            steps.push(Step::Send(event(i)));
        }
        steps.push(Step::Send(
            b"event: done\ndata: {\"executionMode\":\"direct_llm\"}\n\n".to_vec(),
        ));
        Reply::sse(steps)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_streams_finish_then_exits() {
    let legacy = Upstream::start(slow_legacy(2)).await;
    let runtime = Upstream::start(slow_runtime(2)).await;
    let grace = Duration::from_secs(10);
    let mut proxy = ProxyProcess::start("finish", &legacy, &runtime, grace).await;

    // One stream on each path, both well under way when SIGTERM arrives.
    let (mut rt_first, rt_stream) = start_chat(proxy.proxy, "org-a", "s-rt").await;
    let (mut legacy_first, legacy_stream) = start_chat(proxy.proxy, "org-b", "s-legacy").await;
    first_chunk(&mut rt_first).await;
    first_chunk(&mut legacy_first).await;
    let term_at = Instant::now();
    proxy.sigterm();

    // Readiness turns false (the admin API stays up to say so) and new connections are refused.
    // (readiness, refused once) seen so far.
    let seen = std::cell::Cell::new((None, false));
    let drain = Duration::from_secs(1).saturating_sub(term_at.elapsed());
    let _ = until(drain, || async {
        let (mut ready, mut was_refused) = seen.get();
        if ready != Some(503) {
            ready = get(proxy.admin, "/readyz").await.map(|(s, _)| s);
        }
        was_refused = was_refused || refused(proxy.proxy).await;
        seen.set((ready, was_refused));
        (ready == Some(503) && was_refused).then_some(()).ok_or(())
    })
    .await;
    let (ready_during_drain, refused_during_drain) = seen.get();
    assert_eq!(ready_during_drain, Some(503), "/readyz during the drain");
    assert!(
        refused_during_drain,
        "new connections are refused after SIGTERM"
    );
    let (status, body) = get(proxy.admin, "/healthz")
        .await
        .expect("healthz during the drain");
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    assert!(
        get(proxy.metrics, "/metrics")
            .await
            .is_some_and(|(s, _)| s == 200),
        "metrics stay scrapeable during the drain"
    );
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "the process waits for the streams in flight"
    );

    // Both streams run to their natural end, inside the grace period.
    let (rt, rt_end) = rt_stream.await.unwrap();
    assert_eq!(rt.header("x-execution-mode"), Some("runtime_orchestrator"));
    assert!(rt.complete, "runtime stream was cut");
    let events = rt.events();
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    assert!(!names.contains(&"error"), "{events:?}");
    assert_eq!(
        names.len(),
        1 + 4 + 1,
        "every runtime event arrived: {names:?}"
    );

    let (lg, legacy_end) = legacy_stream.await.unwrap();
    assert_eq!(lg.header("x-execution-mode"), Some("direct_llm"));
    assert!(lg.complete, "legacy stream was cut");
    let names: Vec<String> = lg.events().into_iter().map(|(e, _)| e).collect();
    assert_eq!(names.len(), 1 + 4 + 1, "{names:?}");
    assert_eq!(names.last().map(String::as_str), Some("done"));

    let last_end = rt_end.max(legacy_end);
    assert!(
        last_end - term_at >= Duration::from_millis(1000),
        "streams ran on after SIGTERM"
    );
    assert!(
        last_end - term_at < grace,
        "streams ended within the grace period"
    );

    // Nothing in flight any more: the process exits 0 at once, not at the end of the grace period.
    let exited_at = proxy
        .exits_cleanly_within(
            Duration::from_secs(5),
            "proxy did not exit after its streams ended",
        )
        .await;
    assert!(
        exited_at.saturating_duration_since(last_end) < Duration::from_millis(1500),
        "exited {:?} after the last stream ended",
        exited_at.saturating_duration_since(last_end)
    );
    let log = proxy.log();
    assert!(log.contains("drained; exiting"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outliving_the_grace_period_ends_with_an_error_event() {
    let legacy = Upstream::start(echo_legacy).await;
    // Far longer than the grace period.
    let runtime = Upstream::start(slow_runtime(60)).await;
    let grace = Duration::from_secs(2);
    let mut proxy = ProxyProcess::start("cutoff", &legacy, &runtime, grace).await;

    let (mut first, stream) = start_chat(proxy.proxy, "org-a", "s-long").await;
    first_chunk(&mut first).await;
    let term_at = Instant::now();
    proxy.sigterm();

    let (r, ended) = stream.await.unwrap();
    let after = ended - term_at;
    // Told to finish one second before the grace period ends, not cut at its end.
    assert!(
        after >= Duration::from_millis(800),
        "ended {after:?} after SIGTERM"
    );
    assert!(after < grace, "ended {after:?} after SIGTERM");
    assert_eq!(r.status, 200);
    assert!(r.complete, "the chunked response is terminated, not cut");
    let events = r.events();
    let (last, data) = events.last().expect("events");
    assert_eq!(last, "error", "{events:?}");
    let data: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(data["code"], "SHUTTING_DOWN", "{data}");
    assert!(
        events.iter().filter(|(e, _)| e == "error").count() == 1,
        "{events:?}"
    );
    assert!(events.iter().any(|(e, _)| e == "message"), "{events:?}");

    let bound = grace + Duration::from_millis(1000);
    proxy
        .exits_in_time(term_at, bound, "the drain ends with its grace")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_proxy_exits_at_once_on_sigterm() {
    let legacy = Upstream::start(echo_legacy).await;
    let runtime = Upstream::start(healthy_runtime).await;
    let mut proxy = ProxyProcess::start("idle", &legacy, &runtime, Duration::from_secs(30)).await;
    // A finished request leaves nothing in flight behind it.
    let r = chat(proxy.proxy, Some("org-a"), "s-idle", r#"{"message":"hi"}"#).await;
    assert!(r.complete);
    let term_at = Instant::now();
    proxy.sigterm();
    let what = "an idle proxy exits without waiting out the 30 s grace period";
    proxy
        .exits_in_time(term_at, Duration::from_secs(2), what)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_port_in_use_fails_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("cutover-shutdown-{}-taken", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{}\"\nmetrics_listen = \"127.0.0.1:{}\"\n[legacy]\naddress = \"127.0.0.1:9\"\n[runtime]\naddress = \"127.0.0.1:9\"\n",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_cutover-proxy"))
            .arg("--config")
            .arg(&path)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the proxy kept running on a port in use")
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.listen"), "{stderr}");
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_during_the_drain_exits_at_once() {
    let legacy = Upstream::start(echo_legacy).await;
    let runtime = Upstream::start(slow_runtime(60)).await;
    let mut proxy = ProxyProcess::start("sigint", &legacy, &runtime, Duration::from_secs(30)).await;
    let (mut first, stream) = start_chat(proxy.proxy, "org-a", "s-int").await;
    first_chunk(&mut first).await;
    proxy.sigterm();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "still draining the stream"
    );
    let int_at = Instant::now();
    let status = Command::new("kill")
        .args(["-INT", &proxy.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let what = "SIGINT ends the drain";
    proxy
        .exits_in_time(int_at, Duration::from_secs(1), what)
        .await;
    let (r, _) = stream.await.unwrap();
    assert!(!r.complete, "the stream is cut, not finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_still_being_saved_at_exit_are_logged_whole() {
    // Legacy answers every save 503: the chat's two messages are still being retried when the
    // proxy is told to stop. The drain waits for them up to its cutoff, then logs each whole.
    let legacy = support::legacy::FakeLegacy::seeded().await;
    legacy.fail(
        support::legacy::LegacyRoute::PostMessage,
        support::legacy::Fault::Status(503),
    );
    let runtime = Upstream::start(healthy_runtime).await;
    let mut proxy = ProxyProcess::start_with(
        "pending-saves",
        &legacy.address(),
        &runtime.address(),
        2,
        "[bridge]\nenabled = true\n",
    )
    .await;
    let content = "kept whole: 多字节 \"quoted\"";
    let body = serde_json::json!({"message": content}).to_string();
    let r = chat(proxy.proxy, Some("org-a"), "s-1", &body).await;
    assert_served(&r, RT, "allowlist");
    assert!(r.text().contains("event: done"), "{}", r.text());

    let sent = Instant::now();
    proxy.sigterm();
    let at = proxy
        .exits_cleanly_within(Duration::from_secs(10), "the proxy did not exit")
        .await;
    // The pending saves held the drain until its cutoff (1 s before the 2 s grace ends).
    assert!(at - sent >= Duration::from_millis(900), "{:?}", at - sent);
    let log = proxy.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .or(l["message"].as_str())
                .is_some_and(|m| m.contains("shutting down"))
        })
        .collect();
    let roles: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            let f = if l["fields"].is_object() {
                &l["fields"]
            } else {
                l
            };
            (
                f["role"].as_str().unwrap_or_default().to_string(),
                f["content"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        roles,
        [
            ("user".to_string(), content.to_string()),
            ("assistant".to_string(), content.to_string())
        ],
        "log:\n{log}"
    );
    assert!(legacy.messages("s-1").len() == 3, "nothing was saved");
}
