"""Soak client for cutover-proxy: mixed traffic for a while, periodic config reloads, a summary.

Started by scripts/soak.sh, which runs the release binary in front of the end-to-end stand-ins
(tests/e2e/runtime_app.py, tests/e2e/legacy/app.js). The traffic mix, per request:

  runtime chat     an allowlisted org; mostly the full contract table, some failing scenarios
                   (execution_error, crash mid-stream, truncated stream, HTTP 500 before the
                   first byte, which is failed over to legacy)
  legacy chat      an org that is never on the allowlist
  passthrough      GET and POST on other routes, to legacy untouched

Every `--reload-every` seconds the config is rewritten (write + rename) with the allowlist moved
between two groups of orgs; every fifth rewrite is a broken file, which must be refused.

Each response is checked the strict way the web app reads it. Expected outcomes (a runtime stream
ending in `done`, a scenario's own error event, a failover, a legacy stream) are counted by kind;
anything else (a status other than 200, a stream without a terminal event, CR or a cut event,
data that is not one line of JSON, a connection error, a timeout) is a failure, counted by cause.
Every good rewrite must be applied and every broken one refused (the proxy's reload counters).
The proxy's RSS and open fds are sampled every `--sample-every` seconds. Exit status 1 when any
request failed or the proxy died.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import jwt

RUNTIME_SCENARIOS = [
    # (user message, weight, what the client must get)
    ("table", 70, "done"),
    ("scenario:slow", 8, "done"),
    ("scenario:junk", 6, "done"),
    ("scenario:error", 5, "error:LLM_QUOTA"),
    ("scenario:crash", 4, "error:*"),
    ("scenario:truncate", 4, "error:STREAM_TRUNCATED"),
    ("scenario:http500", 3, "failover"),
]
KINDS = [("runtime", 60), ("legacy", 25), ("passthrough", 15)]

GROUP_A = [f"org-a{i}" for i in range(4)]
GROUP_B = [f"org-b{i}" for i in range(4)]
LEGACY_ORGS = [f"org-l{i}" for i in range(4)]


def weighted(rng: random.Random, items):
    total = sum(w for _, w, *_ in items)
    x = rng.uniform(0, total)
    for item in items:
        x -= item[1]
        if x <= 0:
            return item
    return items[-1]


def parse_sse(body: bytes) -> list[tuple[str, object]]:
    """Strict client SSE: `event: X\\ndata: <one line of JSON>\\n\\n` blocks only."""
    text = body.decode("utf-8")
    if "\r" in text:
        raise ValueError("CR in the stream")
    if not text.endswith("\n\n"):
        raise ValueError("the stream does not end on an event boundary")
    events = []
    for block in text[:-2].split("\n\n"):
        lines = block.split("\n")
        if len(lines) != 2 or not lines[0].startswith("event: ") or not lines[1].startswith("data: "):
            raise ValueError(f"malformed block {block[:120]!r}")
        events.append((lines[0][7:], json.loads(lines[1][6:])))
    return events


class Stats:
    def __init__(self):
        self.ok = Counter()
        self.failed = Counter()
        self.examples: dict[str, str] = {}
        self.latencies: list[float] = []
        self.first_byte: list[float] = []

    def fail(self, cause: str, detail: str):
        self.failed[cause] += 1
        self.examples.setdefault(cause, detail[:300])


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.stats = Stats()
        self.base = f"http://{args.proxy}"
        self.legacy = f"http://{args.legacy}"
        secret = os.environ[args.jwt_env]
        exp = int(time.time()) + 86400
        self.tokens = {
            org: jwt.encode({"orgId": org, "userId": "soak-user", "exp": exp}, secret, algorithm="HS256")
            for org in GROUP_A + GROUP_B + LEGACY_ORGS
        }
        self.config_path = Path(args.config)
        self.template = self.config_path.read_text()
        self.generation = 0
        self.reloads_written = Counter()
        self.samples: list[tuple[float, int, int]] = []
        self.stop_at = time.monotonic() + args.secs
        self.seq = 0

    # -- traffic

    async def one(self, client: httpx.AsyncClient):
        kind = weighted(self.rng, KINDS)[0]
        self.seq += 1
        started = time.monotonic()
        first = None
        try:
            if kind == "passthrough":
                if self.rng.random() < 0.5:
                    req = client.build_request("GET", f"{self.base}/api/v1/agents?page={self.seq % 7}")
                else:
                    body = os.urandom(self.rng.choice([0, 100, 5000, 70000]))
                    req = client.build_request("POST", f"{self.base}/api/v1/files", content=body)
                resp = await client.send(req)
                first = time.monotonic()
                data = await resp.aread()
                if resp.status_code != 200:
                    self.stats.fail(f"passthrough_http_{resp.status_code}", data.decode(errors="replace"))
                    return
                json.loads(data)
                self.stats.ok["passthrough"] += 1
                return
            if kind == "runtime":
                org = self.rng.choice(GROUP_A + GROUP_B)
                message, _, expect = weighted(self.rng, RUNTIME_SCENARIOS)
            else:
                org = self.rng.choice(LEGACY_ORGS)
                message, expect = "hello from the soak", "legacy"
            session = f"soak-{self.seq}"
            if kind == "runtime":
                # The runtime serves a conversation legacy keeps: its session must exist there
                # (the conversation bridge reads its agent and history), as in the product.
                seeded = await client.post(f"{self.legacy}/control/seed", json={
                    "org": org,
                    "agent": {"id": f"agent-{org}", "name": "soak", "systemPrompt": "be brief"},
                    "session": {"id": session, "agentId": f"agent-{org}"},
                })
                seeded.raise_for_status()
            req = client.build_request(
                "POST", f"{self.base}/api/v1/chat/sessions/{session}",
                headers={"authorization": f"Bearer {self.tokens[org]}", "content-type": "application/json"},
                content=json.dumps({"message": message}).encode(),
            )
            resp = await client.send(req, stream=True)
            body = b""
            try:
                async for chunk in resp.aiter_raw():
                    if first is None:
                        first = time.monotonic()
                    body += chunk
            finally:
                await resp.aclose()
            if resp.status_code != 200:
                self.stats.fail(f"chat_http_{resp.status_code}", body.decode(errors="replace"))
                return
            try:
                events = parse_sse(body)
            except (ValueError, UnicodeDecodeError) as e:
                self.stats.fail("malformed_sse", f"{e}: {body[-200:]!r}")
                return
            names = [e for e, _ in events]
            terminal = [e for e in names if e in ("done", "error")]
            if len(terminal) != 1 or names[-1] not in ("done", "error"):
                self.stats.fail("no_single_terminal_event", f"{names}")
                return
            mode = resp.headers.get("x-execution-mode")
            reason = resp.headers.get("x-execution-reason")
            if mode == "direct_llm":
                if reason in ("bridge_refused", "bridge_unavailable"):
                    # Every runtime chat's session is seeded: legacy must not refuse the bridge.
                    self.stats.fail(f"legacy_{reason}", f"{session}: {names}")
                    return
                if names[-1] != "done":
                    self.stats.fail("legacy_stream_error", f"{names}")
                    return
                self.stats.ok[f"legacy/{reason}"] += 1
                return
            if mode != "runtime_orchestrator":
                self.stats.fail("no_mode_header", str(resp.headers))
                return
            if names[-1] == "done":
                if expect != "done":
                    # A failing scenario's org was on the allowlist but the runtime... completed?
                    self.stats.fail("unexpected_done", f"{message}: {names}")
                    return
                self.stats.ok["runtime/done"] += 1
                return
            code = events[-1][1].get("code") if isinstance(events[-1][1], dict) else None
            if expect.startswith("error:") and (expect == "error:*" or expect == f"error:{code}"):
                self.stats.ok[f"runtime/expected_error/{code}"] += 1
                return
            self.stats.fail(f"runtime_error_{code}", f"{message}: {events[-1]}")
        except httpx.TimeoutException as e:
            self.stats.fail("timeout", f"{kind}: {e!r}")
        except httpx.HTTPError as e:
            self.stats.fail(f"connection_{type(e).__name__}", f"{kind}: {e!r}")
        except json.JSONDecodeError as e:
            self.stats.fail("bad_json", f"{kind}: {e}")
        finally:
            done = time.monotonic()
            self.stats.latencies.append(done - started)
            if first is not None:
                self.stats.first_byte.append(first - started)

    async def worker(self):
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
        timeout = httpx.Timeout(self.args.request_timeout)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            while time.monotonic() < self.stop_at:
                await self.one(client)

    # -- reloads

    def config_text(self, broken: bool) -> str:
        group = GROUP_A if self.generation % 2 == 0 else GROUP_B
        other = GROUP_B if group is GROUP_A else GROUP_A
        # Orgs off the allowlist go to legacy, which the client accepts for any chat (a complete
        # legacy stream): the checks hold whichever config is in force.
        text = re.sub(r"runtime_orgs = \[.*?\]", "runtime_orgs = " + json.dumps(group + other[:2]), self.template)
        # Every generation differs (an unused setting carries it), so each good one is a reload.
        text = text.replace("[rollout]\n", f"[rollout]\nshadow_max_inflight = {32 + self.generation}\n", 1)
        if broken:
            text = text.replace("[breaker]", "[breaker")
        return text

    async def reloader(self):
        while time.monotonic() < self.stop_at:
            await asyncio.sleep(self.args.reload_every)
            if time.monotonic() >= self.stop_at:
                return
            self.generation += 1
            broken = self.generation % 5 == 0
            tmp = self.config_path.with_suffix(".tmp")
            tmp.write_text(self.config_text(broken))
            os.replace(tmp, self.config_path)
            self.reloads_written["broken" if broken else "good"] += 1
        # Leave a valid file behind.
        self.config_path.write_text(self.config_text(False))

    # -- sampling

    def sample(self):
        pid = self.args.pid
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, AttributeError):
            rss, fds = -1, -1
        self.samples.append((time.monotonic(), rss, fds))
        return rss, fds

    async def sampler(self):
        started = time.monotonic()
        while time.monotonic() < self.stop_at:
            rss, fds = self.sample()
            done = sum(self.stats.ok.values()) + sum(self.stats.failed.values())
            print(f"  t={time.monotonic() - started:5.0f}s  requests={done:7d}  failed={sum(self.stats.failed.values()):4d}"
                  f"  rss={rss / 1024:6.1f} MB  fds={fds}", flush=True)
            await asyncio.sleep(self.args.sample_every)
        self.sample()

    async def run(self):
        started = time.monotonic()
        await asyncio.gather(self.sampler(), self.reloader(), *[self.worker() for _ in range(self.args.concurrency)])
        return time.monotonic() - started


def scrape(metrics_addr: str) -> dict[str, float]:
    try:
        text = httpx.get(f"http://{metrics_addr}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy", required=True)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--legacy", required=True, help="the legacy stand-in, for seeding sessions")
    ap.add_argument("--config", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--secs", type=float, default=600)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--reload-every", type=float, default=15)
    ap.add_argument("--sample-every", type=float, default=10)
    ap.add_argument("--request-timeout", type=float, default=30)
    ap.add_argument("--jwt-env", default="SOAK_JWT_SECRET")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    soak = Soak(args)
    before = scrape(args.metrics)
    print(f"soak: {args.secs:.0f} s, {args.concurrency} workers, reload every {args.reload_every:.0f} s", flush=True)
    elapsed = asyncio.run(soak.run())
    after = scrape(args.metrics)
    alive = Path(f"/proc/{args.pid}").exists()

    def delta(name: str) -> int:
        return int(after.get(name, 0) - before.get(name, 0))

    st = soak.stats
    total = sum(st.ok.values()) + sum(st.failed.values())
    print("\n==== soak summary ====")
    print(f"duration            {elapsed:.0f} s")
    print(f"requests            {total}  ({total / max(elapsed, 1e-9):.1f}/s)")
    print(f"failed              {sum(st.failed.values())}")
    for cause, n in sorted(st.failed.items(), key=lambda x: -x[1]):
        print(f"  {cause:40s} {n:7d}   e.g. {st.examples[cause]!r}")
    print("served by outcome")
    for kind, n in sorted(st.ok.items(), key=lambda x: -x[1]):
        print(f"  {kind:40s} {n:7d}")
    print(f"latency (whole response)  p50 {percentile(st.latencies, 50) * 1000:.1f} ms"
          f"  p90 {percentile(st.latencies, 90) * 1000:.1f} ms  p99 {percentile(st.latencies, 99) * 1000:.1f} ms"
          f"  max {max(st.latencies, default=0) * 1000:.1f} ms")
    print(f"time to first byte        p50 {percentile(st.first_byte, 50) * 1000:.1f} ms"
          f"  p99 {percentile(st.first_byte, 99) * 1000:.1f} ms")
    applied = delta('cutover_config_reloads_total{result="success"}')
    refused = delta('cutover_config_reloads_total{result="invalid"}')
    print(f"reloads written     good {soak.reloads_written['good']}, broken {soak.reloads_written['broken']}; "
          f"proxy counted applied {applied}, refused {refused}")
    transitions = {k.split("{", 1)[1].rstrip("}"): int(v - before.get(k, 0)) for k, v in after.items()
                   if k.startswith("chat_runtime_breaker_transitions_total") and v - before.get(k, 0) > 0}
    print(f"breaker transitions {transitions or 'none'}")
    print(f"failovers           {delta('chat_runtime_failover_total')}")
    print("RSS / fds trend (every sample)")
    t0 = soak.samples[0][0] if soak.samples else 0
    for t, rss, fds in soak.samples:
        print(f"  t={t - t0:5.0f}s  rss={rss / 1024:7.1f} MB  fds={fds}")
    rss_values = [r for _, r, _ in soak.samples if r > 0]
    if len(rss_values) >= 3:
        warm = rss_values[min(2, len(rss_values) - 1)]
        print(f"RSS after warm-up {warm / 1024:.1f} MB, at the end {rss_values[-1] / 1024:.1f} MB, "
              f"peak {max(rss_values) / 1024:.1f} MB")
    # Each good rewrite is applied and each broken one refused (the last rewrite may land
    # after the final scrape).
    reloads_ok = refused >= soak.reloads_written["broken"] and applied >= soak.reloads_written["good"] - 1
    if not reloads_ok:
        print("reloads            MISMATCH between rewrites and the proxy's reload counters")
    ok = alive and not st.failed and reloads_ok
    print(f"proxy alive         {alive}")
    print(f"RESULT              {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
