//! Hot reload of proxy.toml: every way ops change the file takes effect within a second, a broken
//! file keeps the last good config (refused once, counted once), requests in flight finish under
//! the config they started with, and restart-only keys are reported while the rest applies.
//!
//! The proxy runs in-process with the file watched (`LocalServer::start(config, Some(path))`),
//! except for SIGHUP, which is sent to the real binary.

use crate::support;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_proxy::app::LocalServer;
use cutover_proxy::ops::reload::{reload_from, ReloadResult};
use support::*;

/// The contract: an edit is in force within a second.
const WITHIN: Duration = Duration::from_secs(1);

/// A complete proxy.toml like `support::config`, with the given listener and `[rollout]` body.
fn toml_text(legacy: &str, runtime: &str, listen: &str, rollout: &str) -> String {
    let text = test_toml(legacy, runtime);
    let text = retoml(
        &text,
        "listen = \"127.0.0.1:1\"",
        &format!("listen = \"{listen}\""),
    );
    let text = retoml(&text, "commit_timeout_ms = 1000", "commit_timeout_ms = 200");
    retoml(&text, "runtime_orgs = [\"org-a\"]", rollout)
}

/// The config at these upstreams' addresses with org-a on the allowlist (`true`) or nobody
/// (`false`).
fn org_a_toml(legacy: &str, runtime: &str, on: bool) -> String {
    let orgs = if on { r#"["org-a"]"# } else { "[]" };
    toml_text(
        legacy,
        runtime,
        "127.0.0.1:1",
        &format!("runtime_orgs = {orgs}"),
    )
}

/// `org_a_toml` for a started proxy's upstreams.
fn with_org_a(legacy: &Upstream, runtime: &Upstream, on: bool) -> String {
    org_a_toml(&legacy.address(), &runtime.address(), on)
}

/// A proxy between `legacy` and `runtime` watching `path`, which starts with org-a on the
/// allowlist.
fn watching_org_a(path: &Path) -> Harness {
    Harness::new().watched(path.to_path_buf(), |l, r| org_a_toml(l, r, true))
}

/// [`watching_org_a`] started on `proxy.toml` in a new directory (tagged `tag`), org-a served
/// by the runtime.
async fn watching_org_a_in(tag: &str) -> (TempDir, PathBuf, Running) {
    let dir = TempDir::new(tag);
    let path = dir.join("proxy.toml");
    let h = watching_org_a(&path).start().await;
    assert_eq!(mode_of(h.proxy_addr, "org-a").await, RT);
    (dir, path, h)
}

async fn mode_of(addr: std::net::SocketAddr, org: &str) -> String {
    let r = chat(addr, Some(org), "s-reload", HI).await;
    assert_eq!(r.status, 200);
    assert!(r.complete);
    r.header("x-execution-mode").unwrap_or("").to_string()
}

/// Send chats as `org` until one is served in `mode`; how long that took. Panics after `within`.
async fn until_mode(
    addr: std::net::SocketAddr,
    org: &str,
    mode: &str,
    since: Instant,
    within: Duration,
) -> Duration {
    let served = until(within.saturating_sub(since.elapsed()), || async {
        let got = mode_of(addr, org).await;
        if got == mode {
            Ok(since.elapsed())
        } else {
            Err(got)
        }
    })
    .await;
    served.unwrap_or_else(|got| {
        panic!(
            "{org} still served in {got} {:?} after the change (wanted {mode})",
            since.elapsed()
        )
    })
}

/// The config with org-a on the allowlist or off it (`on`), put in place by `write`; how long
/// until chats of org-a are served so (within a second, or the test fails).
async fn org_a_switched(h: &Running, on: bool, write: impl FnOnce(&str)) -> Duration {
    let t = Instant::now();
    write(&with_org_a(&h.legacy, &h.runtime, on));
    let mode = if on { RT } else { DIRECT };
    until_mode(h.proxy_addr, "org-a", mode, t, WITHIN).await
}

fn reloads(server: &LocalServer, result: &str) -> u64 {
    counter(&server.shared.metrics.config_reloads_total, result)
}

/// `text` replaces the config file at `path` and is refused within a second (the `invalid`
/// count reaching `invalid`), and is still counted once after `settle`.
async fn refused_once(
    server: &LocalServer,
    path: &Path,
    text: &str,
    invalid: u64,
    settle: Duration,
    what: &str,
) {
    replace(path, text);
    assert!(
        eventually(WITHIN, || reloads(server, "invalid") == invalid).await,
        "{what} not refused within a second"
    );
    tokio::time::sleep(settle).await;
    assert_eq!(
        reloads(server, "invalid"),
        invalid,
        "{what}: refusal counted again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_rewrite_takes_effect_within_a_second() {
    let (_dir, path, h) = watching_org_a_in("inplace").await;

    let took = org_a_switched(&h, false, |text| std::fs::write(&path, text).unwrap()).await;
    eprintln!("in-place rewrite in force after {took:?}");

    org_a_switched(&h, true, |text| std::fs::write(&path, text).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_over_the_file_takes_effect_within_a_second() {
    let (dir, path, h) = watching_org_a_in("rename").await;

    for on in [false, true, false] {
        // What editors and config management do: write a temp file, then rename it over.
        let tmp = dir.join(".proxy.toml.swp");
        let took = org_a_switched(&h, on, |text| {
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        })
        .await;
        eprintln!("rename in force after {took:?}");
    }
}

/// kubelet's layout of a ConfigMap volume: `proxy.toml -> ..data/proxy.toml`,
/// `..data -> ..<timestamp>`; an update writes a new timestamped directory, points a new
/// `..data_tmp` symlink at it, renames that over `..data` and removes the old directory.
struct ConfigMap {
    dir: TempDir,
    generation: usize,
}

impl ConfigMap {
    fn new(text: &str) -> ConfigMap {
        let dir = TempDir::new("configmap");
        let mut cm = ConfigMap { dir, generation: 0 };
        let ts = cm.write_generation(text);
        std::os::unix::fs::symlink(&ts, cm.dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/proxy.toml", cm.dir.join("proxy.toml")).unwrap();
        cm
    }
    fn path(&self) -> PathBuf {
        self.dir.join("proxy.toml")
    }
    fn ts_name(generation: usize) -> String {
        format!("..2026_02_09_10_00_{generation:02}.{:09}", 100 + generation)
    }
    fn write_generation(&mut self, text: &str) -> String {
        self.generation += 1;
        let ts = Self::ts_name(self.generation);
        std::fs::create_dir(self.dir.join(&ts)).unwrap();
        std::fs::write(self.dir.join(&ts).join("proxy.toml"), text).unwrap();
        ts
    }
    /// The atomic swap; returns when `..data` points at the new content.
    fn update(&mut self, text: &str) {
        let old = Self::ts_name(self.generation);
        let ts = self.write_generation(text);
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&ts, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        std::fs::remove_dir_all(self.dir.join(&old)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_data_symlink_swap_takes_effect_within_a_second() {
    // The Harness writes the first config through proxy.toml's links.
    let mut cm = ConfigMap::new("");
    let h = watching_org_a(&cm.path()).start().await;
    assert_eq!(mode_of(h.proxy_addr, "org-a").await, RT);

    for on in [false, true, false] {
        let took = org_a_switched(&h, on, |text| cm.update(text)).await;
        eprintln!("ConfigMap swap in force after {took:?}");
    }
}

/// `proxy.toml` a symlink to a file kept elsewhere (a checkout, a hostPath): editing the target
/// is an edit of proxy.toml too, though it happens outside the watched directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_of_a_symlinked_file_in_another_directory_takes_effect_within_a_second() {
    let etc = TempDir::new("link");
    let srv = TempDir::new("target");
    let target = srv.join("proxy.toml");
    let path = etc.join("proxy.toml");
    std::os::unix::fs::symlink(&target, &path).unwrap();
    // Written through the link, into the target.
    let h = watching_org_a(&path).start().await;
    assert_eq!(mode_of(h.proxy_addr, "org-a").await, RT);

    let took = org_a_switched(&h, false, |text| std::fs::write(&target, text).unwrap()).await;
    eprintln!("edit of the symlink target in force after {took:?}");
}

/// Put `text` at `path` in one step, as a rename over it.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_file_keeps_the_last_good_config_is_counted_once_and_a_fix_reloads() {
    let (_dir, path, h) = watching_org_a_in("broken").await;
    // Each version replaces the file whole: counted exactly, a refusal must not depend on the
    // reloader catching an in-place write half done (which it refuses too).
    let invalid0 = reloads(&h, "invalid");
    let success0 = reloads(&h, "success");

    // A syntax error, with org-a removed: nothing of it may apply.
    let broken = with_org_a(&h.legacy, &h.runtime, false).replace("[breaker]", "[breaker");
    // Refused once, not once per poll or per file event: wait out several poll periods.
    refused_once(
        &h,
        &path,
        &broken,
        invalid0 + 1,
        Duration::from_millis(2500),
        "syntax error",
    )
    .await;
    assert_eq!(
        h.shared.metrics.config_file_valid.get(),
        0,
        "a refused file on disk must stay visible after the refusal was counted"
    );
    assert_eq!(mode_of(h.proxy_addr, "org-a").await, RT);
    assert_eq!(reloads(&h, "success"), success0);

    // A value that parses but fails validation.
    let invalid = with_org_a(&h.legacy, &h.runtime, false)
        .replace("[breaker]\n", "[breaker]\nerror_rate = 2\n");
    refused_once(
        &h,
        &path,
        &invalid,
        invalid0 + 2,
        Duration::from_millis(1500),
        "error_rate = 2",
    )
    .await;
    assert_eq!(mode_of(h.proxy_addr, "org-a").await, RT);
    assert_eq!(h.shared.snapshot().config.breaker.error_rate, 0.5);

    // The fix applies.
    org_a_switched(&h, false, |text| replace(&path, text)).await;
    assert_eq!(reloads(&h, "success"), success0 + 1);
    assert_eq!(reloads(&h, "invalid"), invalid0 + 2);
    assert_eq!(h.shared.metrics.config_file_valid.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_in_flight_during_a_reload_completes_under_the_config_it_started_with() {
    // The execution of session s-held is held until released; any other answers at once. (By
    // session, not by order: the harness records a request before its handler runs.)
    let dir = TempDir::new("inflight");
    let path = dir.join("proxy.toml");
    let h = watching_org_a(&path)
        .runtime(runtime_answering(move |req: &Received| {
            if req.json()["session_id"] != "s-held" {
                return Reply::sse(runtime_ok_steps());
            }
            Reply::sse(vec![
                Step::Send(frame(
                    "text_chunk",
                    serde_json::json!({"content": "started before the reload"}),
                )),
                Step::WaitRelease,
                Step::Send(frame(
                    "execution_complete",
                    serde_json::json!({"final_response": "done"}),
                )),
                Step::Send(done_frame()),
            ])
        }))
        .start()
        .await;

    let addr = h.proxy_addr;
    let held = tokio::spawn(async move {
        chat(addr, Some("org-a"), "s-held", r#"{"message":"long one"}"#).await
    });
    h.runtime.wait_for_work(1).await;

    // org-a leaves the allowlist while its stream is open: new requests go to legacy ...
    org_a_switched(&h, false, |text| std::fs::write(&path, text).unwrap()).await;
    assert!(!held.is_finished(), "the held stream ended early");
    let executions = h.runtime.work().len();
    for _ in 0..3 {
        assert_eq!(mode_of(h.proxy_addr, "org-a").await, DIRECT);
    }
    assert_eq!(
        h.runtime.work().len(),
        executions,
        "org-a still reaches the runtime"
    );

    // ... and the one in flight finishes on the runtime, normally.
    h.runtime.release();
    let r = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("held stream did not finish")
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-execution-mode"), Some(RT));
    assert_eq!(r.header("x-execution-reason"), Some("allowlist"));
    assert!(r.complete);
    let events = r.events();
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names, ["message", "done"], "{events:?}");
    assert!(events[0].1.contains("started before the reload"));
    assert!(events[1].1.contains("runtime_orchestrator"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_while_the_config_is_swapped_repeatedly() {
    let dir = TempDir::new("churn");
    let path = dir.join("proxy.toml");
    let h = watching_org_a(&path).start().await;

    let addr = h.proxy_addr;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..3 {
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut served = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let r = chat(
                    addr,
                    Some("org-a"),
                    &format!("s-churn-{c}"),
                    r#"{"message":"x"}"#,
                )
                .await;
                assert_eq!(r.status, 200);
                assert!(r.complete, "a response was cut during a reload");
                let names: Vec<String> = r.events().into_iter().map(|(e, _)| e).collect();
                assert_eq!(names, ["message", "done"]);
                served.push(r.header("x-execution-mode").unwrap().to_string());
            }
            served
        }));
    }
    for i in 0..8 {
        let tmp = dir.join("proxy.toml.new");
        std::fs::write(&tmp, with_org_a(&h.legacy, &h.runtime, i % 2 == 1)).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut modes = Vec::new();
    for c in clients {
        modes.extend(c.await.unwrap());
    }
    assert!(modes.iter().any(|m| m == RT) && modes.iter().any(|m| m == DIRECT));
    assert_eq!(
        h.runtime.work().len() + h.legacy.work().len(),
        modes.len(),
        "every request reached exactly one upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_only_keys_are_reported_and_the_rest_of_the_change_applies() {
    let dir = TempDir::new("restart");
    let path = dir.join("proxy.toml");
    // No watcher: the reload is driven by hand to see its report.
    let h = Harness::new()
        .config_text(|l, r| org_a_toml(l, r, true))
        .start()
        .await;
    std::fs::write(&path, with_org_a(&h.legacy, &h.runtime, true)).unwrap();
    assert_eq!(mode_of(h.proxy_addr, "org-a").await, RT);

    let changed = toml_text(
        &h.legacy.address(),
        &h.runtime.address(),
        "127.0.0.1:2",
        "runtime_orgs = []",
    );
    std::fs::write(&path, changed).unwrap();
    assert_eq!(
        reload_from(&h.shared, &path),
        ReloadResult::Applied {
            restart_only: vec!["server.listen"]
        }
    );
    // The listener in use is unchanged, the routing change is in force.
    assert_eq!(mode_of(h.proxy_addr, "org-a").await, DIRECT);
    // Reported once, not at every later look at the same file.
    assert_eq!(reload_from(&h.shared, &path), ReloadResult::Unchanged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_addresses_and_timeouts_are_reloadable() {
    let legacy2 = Upstream::start(echo_legacy).await;
    let dir = TempDir::new("addresses");
    let path = dir.join("proxy.toml");
    // Executions take 600 ms.
    let mut slow = vec![Step::Sleep(Duration::from_millis(600))];
    slow.extend(runtime_ok_steps());
    let h = watching_org_a(&path)
        .runtime(runtime_sse(slow))
        .start()
        .await;
    let text = with_org_a(&h.legacy, &h.runtime, true);
    let names = |r: &Response| -> Vec<String> { r.events().into_iter().map(|(e, _)| e).collect() };

    let r = chat(h.proxy_addr, Some("org-a"), "s-slow", r#"{"message":"x"}"#).await;
    assert_eq!(names(&r), ["message", "done"]);
    assert_eq!(mode_of(h.proxy_addr, "org-b").await, DIRECT);
    assert_eq!(h.legacy.work().len(), 1);

    // Another legacy, and a runtime execution timeout shorter than the runtime takes.
    let t = Instant::now();
    std::fs::write(
        &path,
        text.replace(&h.legacy.address(), &legacy2.address())
            .replace("execution_timeout_ms = 5000", "execution_timeout_ms = 300"),
    )
    .unwrap();
    while legacy2.work().is_empty() {
        assert_eq!(mode_of(h.proxy_addr, "org-b").await, DIRECT);
        assert!(t.elapsed() < WITHIN, "legacy.address not reloaded");
    }
    let before = h.legacy.work().len();
    assert_eq!(mode_of(h.proxy_addr, "org-b").await, DIRECT);
    assert_eq!(
        h.legacy.work().len(),
        before,
        "the old legacy still gets requests"
    );
    let r = chat(h.proxy_addr, Some("org-a"), "s-slow", r#"{"message":"x"}"#).await;
    assert_eq!(r.header("x-execution-mode"), Some(RT));
    assert_eq!(names(&r), ["error"], "{:?}", r.events());
    assert!(r.events()[0].1.contains("TIMEOUT"), "{:?}", r.events());
}

/// A log written beside proxy.toml (`cutover-proxy --config proxy.toml >> proxy.log`) keeps the
/// watched directory busy; that must neither postpone a reload nor make the proxy re-read the
/// config at every line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_neighbour_file_does_not_postpone_a_reload() {
    let (dir, path, h) = watching_org_a_in("neighbour").await;

    let log = dir.join("proxy.log");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap();
            while !stop.load(Ordering::SeqCst) {
                writeln!(f, "tick").unwrap();
                f.flush().unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for on in [false, true] {
        let took = org_a_switched(&h, on, |text| std::fs::write(&path, text).unwrap()).await;
        eprintln!("reload beside a busy log in force after {took:?}");
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
}

/// The watcher must not wake itself up: opening the file is an event on the watched directory
/// (inotify `IN_OPEN`), and reacting to it re-reads the file, which is another such event, forever
/// once anything (an operator's `cat`, the periodic poll) has opened it. Measured as bytes read by
/// this process while nothing changes, with a config padded to 1 MB so the loop cannot hide.
/// `text` and 1 MiB of comments.
fn padded(mut text: String) -> String {
    for _ in 0..16 {
        text.push('#');
        text.push_str(&"x".repeat(64 * 1024));
        text.push('\n');
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_file_is_not_read_again_and_again() {
    // Bytes read by this process: any other test's traffic would count.
    crate::run_alone!("an_unchanged_file_is_not_read_again_and_again");
    let dir = TempDir::new("quiet");
    let path = dir.join("proxy.toml");
    let h = Harness::new()
        .watched(path.clone(), |l, r| padded(org_a_toml(l, r, true)))
        .start()
        .await;
    let text = padded(with_org_a(&h.legacy, &h.runtime, true));
    assert_eq!(mode_of(h.proxy_addr, "org-a").await, RT);
    // Someone looks at the file (`cat proxy.toml`, `cutover-proxy check`, a poll of our own).
    assert_eq!(std::fs::read(&path).unwrap().len(), text.len());
    tokio::time::sleep(Duration::from_millis(500)).await;

    let rchar = || -> u64 {
        let io = std::fs::read_to_string("/proc/self/io").unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = rchar();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let read = rchar() - before;
    // A poll may read it once a second; a loop reads it tens of times.
    assert!(
        read < 6 * text.len() as u64,
        "{read} bytes read in 2 s of an unchanged {} byte config",
        text.len()
    );
    drop(h);
}

// ---- SIGHUP, on the real binary ----

struct Binary {
    child: std::process::Child,
    log: PathBuf,
}

impl Binary {
    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
    fn hup(&self) {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// Whether the process has a handler installed for SIGHUP (whose default action is to exit).
    fn catches_hup(&self) -> bool {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .is_some_and(|mask| mask & 1 != 0)
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn scrape(addr: std::net::SocketAddr, series: &str) -> u64 {
    let mut c = Client::connect(addr).await;
    c.send("GET", "/metrics", &[], b"").await;
    let text = c.read_response().await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

/// Whether the binary counts `n` refused reloads within a second.
async fn invalid_reloads_reach(metrics: std::net::SocketAddr, n: u64) -> bool {
    let series = "cutover_config_reloads_total{result=\"invalid\"}";
    let reached = until(WITHIN, || async {
        (scrape(metrics, series).await >= n).then_some(()).ok_or(())
    })
    .await;
    reached.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_running_binary() {
    // Boxed: this future is too large for the test thread's stack in debug builds.
    Box::pin(sighup_scenario()).await;
}

async fn sighup_scenario() {
    // Not the Harness: the reload on SIGHUP is the shipped binary's, run as a child process.
    let (legacy, runtime) = (
        Upstream::start(echo_legacy).await,
        Upstream::start(healthy_runtime).await,
    );
    let dir = TempDir::new("sighup");
    let path = dir.join("proxy.toml");
    let (port, admin_port, metrics_port) = (free_port(), free_port(), free_port());
    let text = |rollout: &str| {
        toml_text(
            &legacy.address(),
            &runtime.address(),
            &format!("127.0.0.1:{port}"),
            rollout,
        )
        .replace(
            "[legacy]",
            &format!(
                "admin_listen = \"127.0.0.1:{admin_port}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n[legacy]"
            ),
        )
    };
    std::fs::write(&path, text(r#"runtime_orgs = ["org-a"]"#)).unwrap();
    // The log beside the config, as operators often run it: every request writes to the watched
    // directory while the reload must still happen.
    let log = dir.join("proxy.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_cutover-proxy"))
        .arg("--config")
        .arg(&path)
        .env(JWT_ENV, JWT_SECRET)
        .env(ADMIN_ENV, ADMIN_TOKEN)
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join("proxy.err")).unwrap())
        .spawn()
        .unwrap();
    let mut bin = Binary { child, log };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();

    // Up, and with its SIGHUP handler installed (before that, SIGHUP would kill it).
    let started = until(Duration::from_secs(15), || {
        assert!(bin.alive(), "proxy exited: {}", bin.log());
        let hup = bin.catches_hup();
        async move {
            let up = hup && tokio::net::TcpStream::connect(addr).await.is_ok();
            up.then_some(()).ok_or(())
        }
    })
    .await;
    assert!(started.is_ok(), "proxy did not start: {}", bin.log());
    assert_eq!(mode_of(addr, "org-a").await, RT);

    // Edit + SIGHUP: in force within a second (the watcher may see the edit too).
    std::fs::write(&path, text("runtime_orgs = []")).unwrap();
    let t = Instant::now();
    bin.hup();
    until_mode(addr, "org-a", DIRECT, t, WITHIN).await;
    assert!(bin.alive(), "SIGHUP killed the proxy");
    assert!(
        eventually(WITHIN, || bin.log().contains("SIGHUP")).await,
        "no trace of the SIGHUP in the log: {}",
        bin.log()
    );

    // A broken file is refused once; only SIGHUP makes the proxy try it (and refuse it) again,
    // which shows that the signal itself triggers a reload.
    std::fs::write(
        &path,
        text(r#"runtime_orgs = ["org-a"]"#).replace("[breaker]\n", "[breaker]\nerror_rate = 2\n"),
    )
    .unwrap();
    assert!(
        invalid_reloads_reach(metrics, 1).await,
        "broken file not refused"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        scrape(metrics, "cutover_config_reloads_total{result=\"invalid\"}").await,
        1
    );
    bin.hup();
    assert!(
        invalid_reloads_reach(metrics, 2).await,
        "SIGHUP did not re-read the file"
    );
    assert_eq!(mode_of(addr, "org-a").await, DIRECT, "refused file applied");
    let log = bin.log();
    assert!(
        log.contains("breaker.error_rate"),
        "refusal logged without its reason: {log}"
    );
    assert!(bin.alive());
}
