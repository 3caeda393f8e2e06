"""The fleet: several proxy replicas scraped by a real Prometheus (1 s scrapes, the shipped rule
files loaded and evaluated every second).

- A runtime that fails every execution after its first content (so no failover is possible),
  chats round-robin over the replicas: the user-visible errors before every replica routes to
  legacy, with the fleet signal on and off.
- Prometheus killed mid-test: the replicas carry on on their own, nothing fails on the request path.
- `rollout status --json` for shadow orgs whose traffic is spread over the replicas reads as the
  verdict of all the samples together (a reference proxy that saw every chat), and `rollout plan`
  promotes exactly the ready orgs into a config that passes `cutover-proxy check`.
"""

from __future__ import annotations

import json
import math
import subprocess
import time

import pytest

from e2e_support import Prometheus, proxy_bin, run_check, wait_until

REPLICAS = 4
MIN_REQUESTS = 5
POLL_MS = 500
# One scrape (1 s), one rule evaluation (1 s) and one poll: how long a failure takes to reach
# every replica's breaker through Prometheus.
SIGNAL_DELAY_S = 1.0 + 1.0 + POLL_MS / 1000
CHAT_EVERY_S = 0.5

pytestmark = pytest.mark.timeout(120)


def breaker_config(prometheus_url: str | None) -> dict:
    fleet = {"prometheus_url": prometheus_url, "poll_ms": POLL_MS, "timeout_ms": 400} if prometheus_url else {}
    return {
        # window_secs 300: the shipped recording rule's 5 minutes. open_secs long enough that an
        # opened replica stays open for the rest of the test.
        "breaker": {"window_secs": 300, "min_requests": MIN_REQUESTS, "error_rate": 0.5, "timeout_rate": 0.3,
                    "latency_ratio": 0.8, "open_secs": 120, "half_open_probes": 3},
        "fleet": fleet,
    }


def status(proxy) -> dict:
    """GET /runtime/fallback/status, with GET /runtime/fleet as `fleet` and its `openedBy`."""
    data = proxy.admin_get("/runtime/fallback/status").json()["data"]
    fleet = proxy.admin_get("/runtime/fleet").json()["data"]
    return {**data, "openedBy": fleet.pop("openedBy"), "fleet": fleet}


def saw_an_error(stream) -> bool:
    return any(e.event == "error" or (isinstance(e.data, dict) and e.data.get("type") == "error")
               for e in stream.events)


def errors_until_every_replica_is_open(proxies, max_chats: int = 120) -> tuple[int, list[dict]]:
    """Failing chats round-robin, one every CHAT_EVERY_S: the user-visible errors (runtime
    answers carrying an error) until every replica sends its chats to legacy."""
    errors = 0
    start = time.monotonic()
    for i in range(max_chats):
        # Paced: the bound under test is a number of chats per signal delay.
        time.sleep(max(0.0, start + i * CHAT_EVERY_S - time.monotonic()))
        s = proxies[i % len(proxies)].run_chat("org-a", "scenario:error")
        if s.headers["x-execution-mode"] == "runtime_orchestrator":
            assert saw_an_error(s), s.summary()
            errors += 1
        else:
            assert s.headers["x-execution-reason"] == "breaker_open", s.headers
        statuses = [status(p) for p in proxies]
        if all(st["state"] == "open" for st in statuses):
            return errors, statuses
    raise AssertionError(f"not every replica opened after {max_chats} chats: {[status(p) for p in proxies]}")


def test_the_fleet_signal_bounds_the_errors_whatever_the_replica_count(make_proxy, tmp_path):
    # Off: each replica needs min_requests errors of its own.
    alone = [make_proxy(overrides=breaker_config(None)) for _ in range(REPLICAS)]
    errors_off, statuses = errors_until_every_replica_is_open(alone)
    assert all(st["openedBy"] == "local" and st["fleet"]["state"] == "off" for st in statuses), statuses
    assert errors_off >= REPLICAS * MIN_REQUESTS - 1, errors_off

    # On: the fleet's errors open every replica.
    prom = Prometheus(tmp_path / "prometheus")
    url = f"http://127.0.0.1:{prom.port}"
    fleet = [make_proxy(overrides=breaker_config(url)) for _ in range(REPLICAS)]
    prom.start([f"127.0.0.1:{p.metrics_port}" for p in fleet])
    try:
        wait_until(lambda: all(status(p)["fleet"]["state"] == "ok" for p in fleet), 30, interval=0.1,
                   what="every replica reading the fleet")
        errors_on, statuses = errors_until_every_replica_is_open(fleet)
    finally:
        prom.stop()
    by_fleet = [st for st in statuses if st["openedBy"] == "fleet"]
    assert by_fleet, statuses
    assert all(st["fallbackReason"].startswith("fleet: ") for st in by_fleet), statuses
    bound = MIN_REQUESTS + math.ceil(SIGNAL_DELAY_S / CHAT_EVERY_S) + 2
    print(f"\nuser-visible errors before all {REPLICAS} replicas routed to legacy: "
          f"fleet signal off {errors_off}, on {errors_on} (bound {bound}; "
          f"{len(by_fleet)} replicas opened by the fleet)")
    assert errors_on <= bound, (errors_on, statuses)
    assert errors_on < errors_off
    for p in fleet:
        assert p.metric("chat_runtime_breaker_opens_total", signal="fleet") in (0.0, 1.0)
        assert p.metric("cutover_fleet_polls_total", result="ok") >= 1


def test_with_prometheus_killed_the_replicas_carry_on_alone(make_proxy, tmp_path):
    prom = Prometheus(tmp_path / "prometheus")
    fleet = [make_proxy(overrides=breaker_config(f"http://127.0.0.1:{prom.port}")) for _ in range(3)]
    prom.start([f"127.0.0.1:{p.metrics_port}" for p in fleet])
    wait_until(lambda: all(status(p)["fleet"]["state"] == "ok" for p in fleet), 30, interval=0.1,
               what="every replica reading the fleet")
    for i in range(6):
        s = fleet[i % 3].run_chat("org-a", "hello")
        assert s.headers["x-execution-mode"] == "runtime_orchestrator" and not saw_an_error(s)

    prom.kill()
    # Requests go on while the polls fail.
    for i in range(9):
        s = fleet[i % 3].run_chat("org-a", "hello")
        assert s.status == 200 and s.headers["x-execution-mode"] == "runtime_orchestrator", s.headers
        assert not saw_an_error(s), s.summary()
        s.assert_strict()
    wait_until(lambda: all(status(p)["fleet"]["state"] == "unavailable" for p in fleet), 10, interval=0.1,
               what="every replica to notice Prometheus is gone")
    for p in fleet:
        st = status(p)
        assert st["state"] == "closed" and st["fleet"]["detail"].startswith("connect to"), st
        assert p.metric("cutover_fleet_signal_up") == 0.0
        assert p.metric("cutover_fleet_polls_total", result="unavailable") >= 1
        assert "fleet signal unavailable" in p.proc.log.read_text(errors="replace")

    # Alone again: each replica still opens on its own window, which holds its 5 successes: at
    # the 6th error of 11 (error rate above 0.5).
    errors, statuses = errors_until_every_replica_is_open(fleet, max_chats=60)
    assert all(st["openedBy"] == "local" for st in statuses), statuses
    assert errors == 3 * 6, errors


SHADOW = {
    "rollout": {"default_mode": "direct_llm", "runtime_orgs": ["org-a"], "shadow_orgs": ["org-s", "org-f"]},
    # 30 clean comparisons bound the runtime's extra error rate below 0.1; 10 (one replica's
    # share) do not. The stand-ins' first events are a loopback millisecond or two apart: the
    # ratio is not this test's subject.
    "shadow": {"ready_min_samples": 20, "ready_max_error_rate_delta": 0.1, "ready_max_ttfe_ratio": 1000.0},
}


def rollout(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(proxy_bin()), "rollout", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def shadow_report(proxy, org: str, samples: int) -> dict:
    def read():
        r = proxy.admin_get(f"/runtime/shadow/{org}")
        return r.status_code == 200 and r.json()["data"]["samples"] >= samples and r.json()["data"]
    return wait_until(read, 15.0, what=f"{samples} comparisons of {org}")


def test_rollout_status_judges_the_fleet_as_one_and_plan_promotes_the_ready(make_proxy, tmp_path):
    prom = Prometheus(tmp_path / "prometheus")
    fleet = [make_proxy(overrides=SHADOW) for _ in range(3)]
    # The reference: not scraped, it sees every chat the fleet sees.
    reference = make_proxy(overrides=SHADOW)
    prom.start([f"127.0.0.1:{p.metrics_port}" for p in fleet])
    try:
        per_org = 30
        for i in range(per_org):
            for org, message in (("org-s", "hello"), ("org-f", "scenario:error")):
                for p in (fleet[i % 3], reference):
                    s = p.run_chat(org, message)
                    assert s.headers["x-execution-mode"] == "direct_llm"
        together = {org: shadow_report(reference, org, per_org) for org in ("org-s", "org-f")}
        assert together["org-s"]["verdict"] == "ready", together
        assert together["org-f"]["verdict"] == "not_ready", together
        for p in fleet:
            alone = shadow_report(p, "org-s", per_org // 3)
            assert alone["verdict"] == "insufficient", alone

        # Every comparison scraped (the counters themselves), and the recording rules sum them.
        def scraped(promql):
            got = {r["metric"]["org"]: float(r["value"][1]) for r in prom.query(promql)}
            return got.get("org-s", 0) >= per_org and got.get("org-f", 0) >= per_org
        wait_until(lambda: scraped('sum by (org) (cutover_shadow_comparisons_total{org!=""})'), 20,
                   interval=0.2, what="every comparison scraped")
        wait_until(lambda: scraped("org:cutover_shadow_comparisons:increase5m"), 20, interval=0.2,
                   what="the recording rule")

        r = rollout("status", "--prometheus", prom.base, "--json", "--config", str(reference.config_path))
        assert r.returncode == 0, r.stderr
        orgs = {o["orgId"]: o for o in json.loads(r.stdout)["orgs"]}
        for org in ("org-s", "org-f"):
            fleet_s, ref = orgs[org], together[org]
            assert fleet_s["verdict"] == ref["verdict"], (fleet_s, ref)
            # Every replica's comparisons, counted exactly.
            assert fleet_s["samples"] == ref["samples"], (fleet_s, ref)
            for side in ("legacy", "runtime"):
                for k in ("success", "error"):
                    assert fleet_s[side][k] == ref[side][k], (side, k, fleet_s, ref)
            assert fleet_s["requests"]["direct_llm"] >= per_org, fleet_s
        assert orgs["org-f"]["reasons"] == together["org-f"]["reasons"]
        assert "org-a" not in orgs or orgs["org-a"]["samples"] == 0

        table = rollout("status", "--prometheus", prom.base, "--config", str(reference.config_path))
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert any(line.startswith("org-s ") and " ready " in line for line in lines), table.stdout
        assert any(line.startswith("org-f ") and " not_ready " in line for line in lines), table.stdout

        # plan: org-s moves to runtime_orgs, org-f stays shadowed; the file itself is untouched.
        config = reference.config_path
        before = config.read_text()
        out = tmp_path / "promoted.toml"
        plan = rollout("plan", "--prometheus", prom.base, "--config", str(config), "--write", str(out))
        assert plan.returncode == 0, plan.stderr
        assert config.read_text() == before
        diff = plan.stdout.splitlines()
        assert diff[:2] == [f"--- {config}", f"+++ {config}"], plan.stdout
        assert sorted(line for line in diff if line[:1] in "+-" and not line.startswith(("---", "+++"))) == [
            '+runtime_orgs = ["org-a", "org-s"]', '+shadow_orgs = ["org-f"]',
            '-runtime_orgs = ["org-a"]', '-shadow_orgs = ["org-s", "org-f"]'], plan.stdout
        assert "org-s: ready: promoted to runtime_orgs" in plan.stderr, plan.stderr
        assert "org-f: not_ready: stays on shadow_orgs" in plan.stderr, plan.stderr
        check = run_check(out)
        assert check.returncode == 0, check.stderr
        assert out.read_text() == before.replace('runtime_orgs = ["org-a"]', 'runtime_orgs = ["org-a", "org-s"]') \
            .replace('shadow_orgs = ["org-s", "org-f"]', 'shadow_orgs = ["org-f"]')

        # Nothing ready: an empty diff and exit 0.
        again = rollout("plan", "--prometheus", prom.base, "--config", str(out))
        assert again.returncode == 0 and again.stdout == "", (again.stdout, again.stderr)
    finally:
        prom.stop()

    # Prometheus gone: status says so and fails.
    gone = rollout("status", "--prometheus", prom.base)
    assert gone.returncode != 0 and "cannot read the fleet" in gone.stderr, gone.stderr
