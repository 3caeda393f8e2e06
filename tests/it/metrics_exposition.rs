//! `GET /metrics` after a scripted mix of traffic: the counters move by exactly the number of
//! requests made, org labels stay bounded, and the exposition is what `promtool check metrics`
//! accepts. The text is written to `<target>/metrics-exposition.txt` for
//! scripts/check-observability.sh.
//!
//! The registry is process-global, so everything is asserted as a delta between two scrapes, and
//! all of it lives in one test function: nothing else in this binary counts in between.

use crate::support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use cutover_proxy::ops::reload::{reload_from, ReloadResult};
use support::*;

/// `promtool check metrics` problems we accept, each for a named reason: the contract fixes
/// `chat_execution_latency_ms`. Every series of our own is in base units (`_seconds`), so
/// anything else promtool reports fails the test.
const ACCEPTED_LINT: &[(&str, &str)] = &[(
    "chat_execution_latency_ms",
    "metric names should not contain abbreviated units",
)];

/// One scrape: samples keyed by name and sorted labels, plus `# TYPE` lines.
#[derive(Debug, Clone)]
struct Scrape {
    text: String,
    samples: BTreeMap<(String, Vec<(String, String)>), f64>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let mut samples = BTreeMap::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                let (name, ty) = (it.next().unwrap(), it.next().unwrap());
                types.insert(name.to_string(), ty.to_string());
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample line has a value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.strip_suffix('}').expect("}"))),
                None => (series, Vec::new()),
            };
            samples.insert((name.to_string(), labels), value);
        }
        Scrape {
            text,
            samples,
            types,
        }
    }

    /// The value of one series (labels in any order); 0 when it is not exported.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut key: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        key.sort();
        self.samples
            .get(&(name.to_string(), key))
            .copied()
            .unwrap_or(0.0)
    }

    /// Sum over every series of `name`.
    fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, v)| v)
            .sum()
    }

    /// Every value the label `label` takes on any series.
    fn label_values(&self, label: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .samples
            .keys()
            .flat_map(|(_, ls)| {
                ls.iter()
                    .filter(|(k, _)| k == label)
                    .map(|(_, v)| v.clone())
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() {
            break;
        }
        assert_eq!(
            chars.next(),
            Some('"'),
            "label value starts with a quote in {s:?}"
        );
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((key.trim_start_matches(',').to_string(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    out.sort();
    out
}

async fn scrape(server: &cutover_proxy::app::LocalServer) -> Scrape {
    let mut c = Client::connect(server.metrics_addr).await;
    c.send("GET", "/metrics", &[], b"").await;
    let r = c.read_response().await;
    assert_eq!(r.status, 200, "GET /metrics");
    let ct = r.header("content-type").unwrap_or_default().to_string();
    assert!(ct.starts_with("text/plain"), "content-type {ct:?}");
    Scrape::parse(r.text())
}

/// Scrape until `cond` holds (outcomes are counted when Pingora logs the request, which can be
/// a moment after the client read the last byte).
async fn scrape_until(
    server: &cutover_proxy::app::LocalServer,
    what: &str,
    cond: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let got = poll_until(Duration::from_secs(10), || scrape(server), cond).await;
    got.unwrap_or_else(|s| panic!("timed out waiting for {what}; last scrape:\n{}", s.text))
}

fn config_text(legacy: &str, runtime: &str, health_interval_ms: u64) -> String {
    retoml(
        &test_toml(legacy, runtime),
        "health_interval_ms = 200",
        &format!("health_interval_ms = {health_interval_ms}"),
    )
}

/// A runtime that is healthy, answers 503 to session `s-fail` (the proxy fails over to legacy)
/// and sends one malformed frame and one unknown event before a normal answer to `s-drop`.
fn scripted_runtime(req: &Received) -> Reply {
    if req.path == "/health" {
        return Reply::json(200, serde_json::json!({"status": "ok"}));
    }
    match req.json()["session_id"].as_str() {
        Some("s-fail") => Reply::json(503, serde_json::json!({"detail": "overloaded"})),
        Some("s-drop") => {
            let mut steps = vec![
                Step::Send(b"data: {not json\r\n\r\n".to_vec()),
                Step::Send(frame("brand_new_event", serde_json::json!({"x": 1}))),
            ];
            steps.extend(runtime_ok_steps());
            Reply::sse(steps)
        }
        _ => Reply::sse(runtime_ok_steps()),
    }
}

fn exposition_path() -> PathBuf {
    // CARGO_TARGET_TMPDIR is `<target dir>/tmp`, wherever CARGO_TARGET_DIR points.
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("metrics-exposition.txt")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposition_counts_a_scripted_mix_of_traffic() {
    let h = Harness::new()
        .runtime(scripted_runtime)
        .config_text(|legacy, runtime| config_text(legacy, runtime, 200))
        .start()
        .await;
    let body = r#"{"message":"hello"}"#;

    // Every series of the contract exists before any traffic, and the runtime is up.
    let before = scrape_until(&h, "a passing health check", |s| {
        s.get("chat_runtime_health_up", &[]) == 1.0
    })
    .await;
    for (name, ty) in [
        ("chat_execution_total", "counter"),
        ("chat_execution_success_total", "counter"),
        ("chat_execution_error_total", "counter"),
        ("chat_execution_timeout_total", "counter"),
        ("chat_execution_latency_ms", "histogram"),
        ("chat_runtime_fallback_enabled", "gauge"),
    ] {
        assert_eq!(
            before.types.get(name).map(String::as_str),
            Some(ty),
            "# TYPE of {name}"
        );
    }
    assert_eq!(before.get("chat_runtime_fallback_enabled", &[]), 0.0);
    assert_eq!(
        before.get("chat_runtime_breaker_state", &[("state", "closed")]),
        1.0
    );

    // The scripted mix.
    for (session, want_mode, want_reason) in [
        ("s-a1", RT, "allowlist"),
        ("s-a2", RT, "allowlist"),
        ("s-drop", RT, "allowlist"),
        ("s-fail", DIRECT, "failover"),
    ] {
        let r = chat(h.proxy_addr, Some("org-a"), session, body).await;
        assert_eq!(r.status, 200, "{session}");
        assert!(r.complete, "{session}");
        assert_eq!(r.header("x-execution-mode"), Some(want_mode), "{session}");
        assert_eq!(
            r.header("x-execution-reason"),
            Some(want_reason),
            "{session}"
        );
    }
    for session in ["s-b1", "s-b2"] {
        let r = chat(h.proxy_addr, Some("org-b"), session, body).await;
        assert_eq!(r.header("x-execution-mode"), Some(DIRECT));
        assert_eq!(r.header("x-execution-reason"), Some("default"));
    }
    let r = chat(h.proxy_addr, None, "s-anon", body).await;
    assert_eq!(r.header("x-execution-reason"), Some("no_identity"));
    let sent = 7.0;
    let mid = scrape_until(&h, "7 requests counted", |s| {
        s.sum("chat_requests_total") - before.sum("chat_requests_total") == sent
    })
    .await;
    assert_eq!(
        mid.get("chat_runtime_failover_total", &[]),
        before.get("chat_runtime_failover_total", &[]) + 1.0
    );

    // Kill switch: the fallback gauge and the breaker series follow, and org-a goes to legacy.
    let (status, _) = admin(&h, "POST", "/runtime/fallback/trip", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
    let tripped = scrape(&h).await;
    assert_eq!(tripped.get("chat_runtime_fallback_enabled", &[]), 1.0);
    assert_eq!(
        tripped.get("chat_runtime_breaker_state", &[("state", "open")]),
        1.0
    );
    assert_eq!(
        tripped.get("chat_runtime_breaker_state", &[("state", "closed")]),
        0.0
    );
    let r = chat(h.proxy_addr, Some("org-a"), "s-a3", body).await;
    assert_eq!(r.header("x-execution-mode"), Some(DIRECT));
    assert_eq!(r.header("x-execution-reason"), Some("breaker_open"));
    let (status, _) = admin(&h, "POST", "/runtime/fallback/reset", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200);

    // Config reloads: one refused file, then one that takes effect.
    let dir = std::env::temp_dir().join(format!("cutover-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.toml");
    std::fs::write(&path, "[server\nlisten = ").unwrap();
    assert!(matches!(
        reload_from(&h.shared, &path),
        ReloadResult::Refused(_)
    ));
    let reload_started = support::now() as f64;
    std::fs::write(
        &path,
        config_text(&h.legacy.address(), &h.runtime.address(), 250),
    )
    .unwrap();
    assert!(matches!(
        reload_from(&h.shared, &path),
        ReloadResult::Applied { .. }
    ));
    let _ = std::fs::remove_dir_all(&dir);

    let sent = sent + 1.0;
    let after = scrape_until(&h, "8 requests counted, streams done", |s| {
        s.sum("chat_requests_total") - before.sum("chat_requests_total") == sent
            && s.get("chat_streams_in_flight", &[("mode", RT)]) == 0.0
            && s.get("chat_streams_in_flight", &[("mode", DIRECT)]) == 0.0
    })
    .await;
    std::fs::write(exposition_path(), &after.text).expect("write the exposition file");

    let delta =
        |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);
    let mut failures = Vec::new();
    let mut expect = |name: &str, labels: &[(&str, &str)], want: f64| {
        let got = delta(name, labels);
        if got != want {
            failures.push(format!("{name}{labels:?}: moved by {got}, expected {want}"));
        }
    };

    // The source document's series. Runtime: 3 complete streams and 1 failed open (503);
    // direct: 2 org-b, 1 unverified, 1 failover, 1 while the breaker was open. Direct's first
    // events are each of its streams'; the runtime's, its complete streams'.
    for (mode, total, success, error, first_events) in
        [(RT, 4.0, 3.0, 1.0, 3.0), (DIRECT, 5.0, 5.0, 0.0, 5.0)]
    {
        for (name, want) in [
            ("chat_execution_total", total),
            ("chat_execution_success_total", success),
            ("chat_execution_error_total", error),
            ("chat_execution_timeout_total", 0.0),
            ("chat_execution_cancelled_total", 0.0),
            ("chat_execution_latency_ms_count", total),
            ("chat_time_to_first_event_seconds_count", first_events),
        ] {
            expect(name, &[("mode", mode)], want);
        }
    }
    expect(
        "chat_execution_latency_ms_bucket",
        &[("mode", DIRECT), ("le", "+Inf")],
        5.0,
    );

    // Traffic split: final mode, reason, and org only when the config names it.
    for (mode, reason, org, n) in [
        (RT, "allowlist", "org-a", 3.0),
        (DIRECT, "failover", "org-a", 1.0),
        (DIRECT, "breaker_open", "org-a", 1.0),
        (DIRECT, "default", "other", 2.0),
        (DIRECT, "no_identity", "other", 1.0),
    ] {
        expect(
            "chat_requests_total",
            &[("mode", mode), ("reason", reason), ("org", org)],
            n,
        );
    }
    expect("chat_runtime_failover_total", &[], 1.0);
    expect(
        "chat_identity_unverified_total",
        &[("cause", "missing")],
        1.0,
    );

    // The runtime stream: one text and one done per complete stream, two dropped frames.
    for kind in ["text", "done"] {
        expect("chat_sse_events_total", &[("type", kind)], 3.0);
    }
    for cause in ["malformed", "unknown_event"] {
        expect("chat_sse_dropped_frames_total", &[("cause", cause)], 1.0);
    }

    // Breaker: tripped by hand and reset.
    for (from, to, n) in [
        ("closed", "open", 1.0),
        ("open", "closed", 1.0),
        ("open", "half_open", 0.0),
        ("half_open", "open", 0.0),
        ("half_open", "closed", 0.0),
    ] {
        expect(
            "chat_runtime_breaker_transitions_total",
            &[("from", from), ("to", to)],
            n,
        );
    }

    // Reloads: one refused, one applied.
    for result in ["invalid", "success"] {
        expect("cutover_config_reloads_total", &[("result", result)], 1.0);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let reloaded_at = after.get("cutover_config_last_reload_success_timestamp_seconds", &[]);
    assert!(
        reloaded_at >= reload_started - 1.0 && reloaded_at <= support::now() as f64 + 1.0,
        "last reload timestamp {reloaded_at}, reload at {reload_started}"
    );
    assert_eq!(after.get("chat_runtime_fallback_enabled", &[]), 0.0);
    assert_eq!(
        after.get("chat_runtime_breaker_state", &[("state", "closed")]),
        1.0
    );
    assert_eq!(after.get("chat_runtime_health_up", &[]), 1.0);
    assert!(after.get("chat_runtime_health_checks_total", &[("result", "ok")]) >= 1.0);

    // Bounded labels: org-b is not named in the config, so it is never a label value. The
    // shadow series carry an empty `org` for every org not on `rollout.shadow_orgs`.
    assert_eq!(after.label_values("org"), ["", "org-a", "other"]);
    assert!(
        !after.text.contains("org-b"),
        "org-b leaked into the exposition"
    );
    assert_eq!(after.label_values("mode"), [DIRECT, RT]);

    // Histogram buckets are cumulative and end at the count.
    for mode in [DIRECT, RT] {
        let mut buckets: Vec<(f64, f64)> = after
            .samples
            .iter()
            .filter(|((n, ls), _)| {
                n == "chat_execution_latency_ms_bucket"
                    && ls.contains(&("mode".to_string(), mode.to_string()))
            })
            .map(|((_, ls), v)| {
                let le = &ls.iter().find(|(k, _)| k == "le").unwrap().1;
                (
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    },
                    *v,
                )
            })
            .collect();
        buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        assert!(buckets.len() >= 10, "{mode}: {} buckets", buckets.len());
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{mode}: not cumulative"
        );
        assert_eq!(
            buckets.last().unwrap(),
            &(
                f64::INFINITY,
                after.get("chat_execution_latency_ms_count", &[("mode", mode)])
            )
        );
    }

    promtool_check_metrics(&after.text);
}

/// `promtool check metrics` on the exposition: clean except for `ACCEPTED_LINT`.
fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};

    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("note: promtool is not on PATH; skipping `promtool check metrics` (scripts/install-deps.sh test installs it)");
            return;
        }
        Err(e) => panic!("running promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let unexpected: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            !ACCEPTED_LINT
                .iter()
                .any(|(name, problem)| l.trim() == format!("{name} {problem}"))
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "promtool check metrics (exit {:?}) reported:\n{}",
        out.status.code(),
        unexpected.join("\n")
    );
    // 0: clean; 3: only lint problems, all of them accepted above. Anything else is an error.
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "promtool check metrics failed: {report}"
    );
}
