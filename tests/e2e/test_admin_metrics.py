"""Admin API (admin_listen), Prometheus metrics (metrics_listen) and the breaker, end to end."""

from __future__ import annotations

from e2e_support import ADMIN_TOKEN, metric_value, wait_until

M_KEYS = {"total", "success", "error", "timeout", "avgLatencyMs", "errorRate", "timeoutRate"}


def runtime_metrics(proxy) -> dict:
    r = proxy.admin_get("/runtime/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["success"] is True
    return body["data"]


def status(proxy) -> dict:
    r = proxy.admin_get("/runtime/fallback/status")
    assert r.status_code == 200
    body = r.json()
    assert body["success"] is True
    return body["data"]


def counts(m: dict) -> tuple:
    return m["total"], m["success"], m["error"], m["timeout"]


def test_runtime_metrics_count_what_happened(proxy):
    for _ in range(2):
        assert proxy.run_chat("org-a").names()[-1] == "done"
    assert proxy.run_chat("org-a", "scenario:error").names()[-1] == "error"
    for org in ("org-b", "org-b", None):
        assert proxy.run_chat(org).headers["x-execution-mode"] == "direct_llm"

    # Outcomes are recorded when the proxy finishes the request, which may be just after the
    # client read the last byte: poll briefly.
    data = wait_until(lambda: (d := runtime_metrics(proxy)) and d["runtime"]["total"] == 3
                      and d["direct"]["total"] == 3 and d, 3.0, what="6 recorded executions")
    assert set(data) == {"direct", "runtime", "fallbackEnabled", "fallbackReason"}, data
    rt, direct = data["runtime"], data["direct"]
    assert set(rt) == M_KEYS and set(direct) == M_KEYS, data
    assert counts(rt) == (3, 2, 1, 0), rt
    assert counts(direct) == (3, 3, 0, 0), direct
    assert abs(rt["errorRate"] - 1 / 3) < 1e-6 and rt["timeoutRate"] == 0, rt
    assert direct["errorRate"] == 0 and direct["timeoutRate"] == 0, direct
    assert rt["avgLatencyMs"] > 0 and direct["avgLatencyMs"] > 0, data
    assert data["fallbackEnabled"] is False
    assert isinstance(data["fallbackReason"], str)

    org_a = proxy.admin_get("/runtime/metrics/org-a").json()
    assert org_a["success"] is True
    assert org_a["data"]["orgId"] == "org-a"
    assert counts(org_a["data"]["runtime"]) == (3, 2, 1, 0), org_a
    assert counts(org_a["data"]["direct"]) == (0, 0, 0, 0), org_a
    assert set(org_a["data"]["runtime"]) == M_KEYS
    org_b = proxy.admin_get("/runtime/metrics/org-b").json()["data"]
    assert counts(org_b["direct"]) == (2, 2, 0, 0) and counts(org_b["runtime"]) == (0, 0, 0, 0), org_b

    st = status(proxy)
    assert st["fallbackEnabled"] is False and st["state"] == "closed", st
    assert proxy.admin_get("/healthz").status_code == 200
    assert proxy.admin_get("/readyz").status_code == 200


def test_prometheus_metrics_count_executions_per_mode(proxy):
    for _ in range(3):
        proxy.run_chat("org-a")
    proxy.run_chat("org-a", "scenario:truncate")
    proxy.run_chat("org-b")

    def ready():
        text = proxy.metrics_text()
        return (metric_value(text, "chat_execution_total", mode="runtime_orchestrator") == 4
                and metric_value(text, "chat_execution_total", mode="direct_llm") == 1 and text)

    text = wait_until(ready, 3.0, what="chat_execution_total == 4 (runtime) and 1 (direct)")
    rt = {"mode": "runtime_orchestrator"}
    assert metric_value(text, "chat_execution_total", **rt) == 4
    assert metric_value(text, "chat_execution_success_total", **rt) == 3
    assert metric_value(text, "chat_execution_error_total", **rt) == 1
    assert metric_value(text, "chat_execution_timeout_total", **rt) in (0, None)
    assert metric_value(text, "chat_execution_latency_ms_count", **rt) == 4
    assert metric_value(text, "chat_execution_total", mode="direct_llm") == 1
    assert metric_value(text, "chat_execution_success_total", mode="direct_llm") == 1
    assert metric_value(text, "chat_runtime_fallback_enabled") == 0
    assert "# TYPE chat_execution_latency_ms histogram" in text
    assert "# TYPE chat_execution_total counter" in text
    for line in text.splitlines():
        if line.startswith("chat_execution_"):
            assert "org" not in line.partition("{")[2], f"unbounded label: {line}"
    r = proxy.client.get(proxy.metrics_base + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")


def test_manual_trip_needs_the_token_and_sends_everyone_to_legacy(proxy, legacy):
    assert proxy.mode_of("org-a") == ("runtime_orchestrator", "allowlist")

    for token in (None, "wrong-token"):
        r = proxy.admin_post("/runtime/fallback/trip", token)
        assert r.status_code == 401, r.text
        assert r.json()["success"] is False
    assert status(proxy)["state"] == "closed"
    assert proxy.mode_of("org-a") == ("runtime_orchestrator", "allowlist")

    r = proxy.admin_post("/runtime/fallback/trip", ADMIN_TOKEN)
    assert r.status_code == 200, r.text
    assert r.json()["success"] is True
    st = status(proxy)
    assert st["fallbackEnabled"] is True and st["state"] == "open", st
    assert runtime_metrics(proxy)["fallbackEnabled"] is True

    s = proxy.run_chat("org-a", "tripped")
    assert (s.headers["x-execution-mode"], s.headers["x-execution-reason"]) == ("direct_llm", "breaker_open")
    assert s.headers.get("x-legacy") == "1" and s.names()[-1] == "done"
    assert s.events[-1].data["executionMode"] == "direct_llm", "served by legacy"
    assert proxy.metric("chat_runtime_fallback_enabled") == 1

    assert proxy.admin_post("/runtime/fallback/reset").status_code == 401
    assert status(proxy)["state"] == "open"
    r = proxy.admin_post("/runtime/fallback/reset", ADMIN_TOKEN)
    assert r.status_code == 200, r.text
    st = status(proxy)
    assert st["fallbackEnabled"] is False and st["state"] == "closed", st
    assert proxy.mode_of("org-a") == ("runtime_orchestrator", "allowlist")
    assert proxy.metric("chat_runtime_fallback_enabled") == 0


def test_breaker_opens_on_errors_and_closes_by_itself(make_proxy):
    proxy = make_proxy(overrides={"breaker": {"min_requests": 3, "error_rate": 0.5, "open_secs": 1,
                                              "half_open_probes": 1, "window_secs": 60}})
    for _ in range(3):
        s = proxy.run_chat("org-a", "scenario:error")
        assert s.headers["x-execution-mode"] == "runtime_orchestrator"
    st = wait_until(lambda: (d := status(proxy))["state"] == "open" and d, 3.0, what="the breaker to open")
    assert st["fallbackEnabled"] is True and st["fallbackReason"], st
    assert proxy.mode_of("org-a") == ("direct_llm", "breaker_open")
    # No manual step: after open_secs a probe gets through, succeeds and closes the breaker.
    wait_until(lambda: proxy.mode_of("org-a")[0] == "runtime_orchestrator", 5.0, interval=0.1,
               what="a half-open probe to reach the runtime")
    wait_until(lambda: status(proxy)["state"] == "closed", 3.0, what="the breaker to close")
    assert proxy.mode_of("org-a") == ("runtime_orchestrator", "allowlist")


def test_failing_health_check_opens_the_breaker_until_the_runtime_recovers(make_proxy, runtime):
    proxy = make_proxy(runtime, {"runtime": {"health_path": "/health/fail", "health_interval_ms": 100,
                                             "health_failures": 2},
                                 "breaker": {"open_secs": 1, "half_open_probes": 1}})
    st = wait_until(lambda: (d := status(proxy))["state"] == "open" and d, 3.0, what="health checks to open it")
    assert st["fallbackEnabled"] is True, st
    assert proxy.mode_of("org-a") == ("direct_llm", "breaker_open")
    assert proxy.metric("chat_runtime_fallback_enabled") == 1
    # The runtime is healthy again (its health path is fixed by a config edit): back by itself.
    proxy.write_config(proxy.config_with({"runtime": {"health_path": "/health"}}))
    wait_until(lambda: proxy.mode_of("org-a")[0] == "runtime_orchestrator", 6.0, interval=0.1,
               what="the runtime to be let back in")


def test_manual_trip_outlasts_open_secs(make_proxy):
    """A kill switch stays on until reset, whatever open_secs says."""
    import time
    proxy = make_proxy(overrides={"breaker": {"open_secs": 1, "half_open_probes": 1}})
    assert proxy.admin_post("/runtime/fallback/trip", ADMIN_TOKEN).status_code == 200
    time.sleep(1.5)  # past open_secs: an automatic opening would let a probe through now
    for _ in range(3):
        assert proxy.mode_of("org-a") == ("direct_llm", "breaker_open")
    assert status(proxy)["state"] == "open"
    assert proxy.admin_post("/runtime/fallback/reset", ADMIN_TOKEN).status_code == 200
    assert proxy.mode_of("org-a") == ("runtime_orchestrator", "allowlist")


def test_breaker_opens_on_mean_latency(make_proxy):
    """latency_ratio x execution_timeout_ms = 0.2 x 1000 ms: slow executions (~0.6 s) open it."""
    proxy = make_proxy(overrides={"runtime": {"execution_timeout_ms": 1000, "commit_timeout_ms": 0},
                                  "breaker": {"min_requests": 2, "latency_ratio": 0.2}})
    for _ in range(2):
        s = proxy.run_chat("org-a", "scenario:slow")
        assert s.names()[-1] == "done", s.summary()
    st = wait_until(lambda: (d := status(proxy))["state"] == "open" and d, 3.0, what="the breaker to open")
    assert st["fallbackEnabled"] is True
    assert proxy.mode_of("org-a") == ("direct_llm", "breaker_open")
