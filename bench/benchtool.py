#!/usr/bin/env python3
"""Helpers for bench/run.sh: stdlib only (no pip), so `make bench` needs nothing but python3.

Subcommands:
  render TEMPLATE OUT KEY=VALUE...   fill @KEY@ placeholders
  gen-sse OUT --chunks N             canned runtime stream: N text_chunk frames + complete + [DONE]
  jwt --org ORG --user USER          HS256 token signed with $BENCH_JWT_SECRET
  sse ...                            time to first event / total time of runtime streams
  idle-runtime --port P              runtime stand-in: first event, then holds every stream open
  idle-client ...                    opens N streams, waits for the first event on each, holds them
  gen-bridge DIR                     the bridge legacy stand-in's answers (nginx serves them)
  bridge-counts --port P             one proxy's bridge calls so far, by route (its metrics port)
  rtt --port P --path PATH           one legacy round trip: GETs on one keep-alive connection
  rss PID...                         VmRSS (KiB) summed over the given pids
  cputime PID...                     user+system CPU seconds of processes
  wrk URL --out F --case C ...       run `wrk --latency`, keep its output, print one JSON line
  keepalive --port P --path PATH     the fixed request mix of the instruction counts (keep-alive GETs)
  cg-record DUMP --case C ...        one callgrind dump's instructions per request / event / stream
  collect OUT ...                    merge JSON runs and settings into one document
  report OUT_DIR RESULTS_MD          write bench/results.md from the JSON files in OUT_DIR
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import math
import os
import re
import signal
import socket
import statistics
import struct
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# --------------------------------------------------------------------------------------------
# small utilities


def render(args):
    text = open(args.template).read()
    for kv in args.pairs:
        k, _, v = kv.partition("=")
        text = text.replace("@" + k + "@", v)
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        sys.exit(f"render {args.template}: unfilled placeholders {sorted(set(left))}")
    with open(args.out, "w") as f:
        f.write(text)


SENTENCES = [
    "你好！我是你的智能助手，",
    "Sure — here is how ownership works in Rust: ",
    "首先，我们来看一下所有权（ownership）的概念：",
    "each value has exactly one owner, ",
    "当所有者离开作用域时，值会被丢弃。🦀",
    "and when the owner goes out of scope the value is dropped.\n",
]


def gen_sse(args):
    """sse-starlette framing (CRLF), Python json.dumps defaults (ASCII-escaped non-ASCII)."""
    ts = "2026-02-09T10:11:12.345678"
    out = bytearray()

    def frame(obj):
        out.extend(b"data: ")
        out.extend((obj if isinstance(obj, str) else json.dumps(obj)).encode())
        out.extend(b"\r\n\r\n")

    for i in range(args.chunks):
        frame({"event": "text_chunk", "data": {"content": SENTENCES[i % len(SENTENCES)]},
               "timestamp": ts})
    frame({"event": "execution_complete",
           "data": {"final_response": "…", "usage": {"prompt_tokens": 812,
                                                     "completion_tokens": args.chunks,
                                                     "total_tokens": 812 + args.chunks}},
           "timestamp": ts})
    frame("[DONE]")
    with open(args.out, "wb") as f:
        f.write(out)
    print(f"{args.out}: {len(out)} bytes, {args.chunks + 2} runtime frames")


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def make_jwt(org, user, secret):
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = {"orgId": org, "userId": user, "exp": int(time.time()) + 24 * 3600}
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode()
    sig = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(sig)}"


def jwt_cmd(args):
    secret = os.environ.get(args.secret_env)
    if not secret:
        sys.exit(f"jwt: ${args.secret_env} is not set")
    print(make_jwt(args.org, args.user, secret))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def rss_cmd(args):
    print(sum(rss_kib(p) for p in args.pids))


def cputime(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cputime_cmd(args):
    print(f"{sum(cputime(p) for p in args.pids):.3f}")


# --------------------------------------------------------------------------------------------
# SSE timing client


def chat_request(host, port, path, token, body, close=True, request_id=None):
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
    ]
    if request_id:
        lines.append(f"X-Request-Id: {request_id}")
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


EVENT_END = re.compile(rb"\r?\n\r?\n")


def dechunk(body):
    out = bytearray()
    i = 0
    while True:
        j = body.index(b"\r\n", i)
        size = int(body[i:j].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out.extend(body[j + 2:j + 2 + size])
        i = j + 2 + size + 2


FIRST_CONTENT = b'"type":"text"'


# Linux's SO_TIMESTAMPNS (asm-generic; Python names it only on some builds): each read also
# carries the kernel's receive time of the last segment it copied.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def received_at(ancdata):
    """The kernel receive time (ns, wall clock) in a recvmsg's ancillary data, or None."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack("qq", data[:16])
            return sec * 1_000_000_000 + nsec
    return None


def one_stream(host, port, path, token, body, timeout, request_id=None, timings=None):
    """One request on a fresh connection. Returns (first_event_s, total_s, body bytes); with
    `timings` (a dict), also sets its "first_content_s": when the first text event arrived, and
    "first_arrived_s": when the segment that completed the first event reached the client's
    socket (the kernel's receive time), which leaves out how long the client took to wake up."""
    req = chat_request(host, port, path, token, body, request_id=request_id)
    t0 = time.perf_counter()
    t0_wall = time.time_ns()
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.sendall(req)
    buf = bytearray()
    head_end = -1
    first = None
    length = None
    chunked = False
    total = None
    arrived = None
    while True:
        if first is None:
            # Small reads until the first event: the timestamp is then that of the segment that
            # completed it, not of one that came later.
            data, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(16))
            arrived = received_at(anc)
        else:
            data = s.recv(1 << 18)
        if not data:
            break
        buf.extend(data)
        if head_end < 0:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                continue
            head = bytes(buf[:head_end]).decode("latin-1").lower()
            status = head.split("\r\n", 1)[0]
            if " 200 " not in status + " ":
                raise RuntimeError(f"unexpected status: {status!r}")
            m = re.search(r"\r\ncontent-length:\s*(\d+)", head)
            length = int(m.group(1)) if m else None
            chunked = "transfer-encoding: chunked" in head
            head_end += 4
        if first is None and EVENT_END.search(buf, head_end):
            first = time.perf_counter() - t0
            if timings is not None and arrived is not None:
                timings["first_arrived_s"] = (arrived - t0_wall) / 1e9
        if timings is not None and "first_content_s" not in timings and buf.find(FIRST_CONTENT, head_end) >= 0:
            timings["first_content_s"] = time.perf_counter() - t0
        if length is not None and len(buf) - head_end >= length:
            total = time.perf_counter() - t0
            break
        if chunked and buf.endswith(b"\r\n0\r\n\r\n"):
            total = time.perf_counter() - t0
            break
    if total is None:  # close-delimited
        total = time.perf_counter() - t0
    s.close()
    raw = bytes(buf[head_end:])
    return first, total, (dechunk(raw) if chunked else raw)


def pct(values, p):
    """Nearest-rank percentile."""
    v = sorted(values)
    if not v:
        return None
    k = max(0, min(len(v) - 1, int(round(p / 100.0 * len(v) + 0.5)) - 1))
    return v[k]


def sse_cmd(args):
    token = make_jwt(args.org, "bench-user", os.environ[args.secret_env]) if args.org else None
    body = json.dumps({"message": args.message}).encode()
    firsts, totals, contents, arrivals = [], [], [], []
    events = None
    cpu0 = cputime(args.cpu_pid) if args.cpu_pid else None
    for i in range(args.warmup + args.count):
        # The runtime stand-in answers the short stream to request ids starting "short-".
        timings = {}
        # `{i}` in the path: a fresh session id per stream (section 4's new-session case).
        path = args.path.replace("{i}", f"{os.getpid()}-{i}")
        first, total, payload = one_stream(args.host, args.port, path, token, body,
                                           args.timeout, f"{args.stream}-{os.getpid()}-{i}", timings)
        if args.kind == "proxy":
            n = payload.count(b"event: message\n") + payload.count(b"event: done\n")
            if b"event: error" in payload:
                raise RuntimeError("proxy stream carried an error event: "
                                   + payload[payload.find(b"event: error"):][:300].decode())
        else:
            n = len(re.findall(rb"(?m)^data: ", payload))
        if events is None:
            events = n
        elif n != events:
            raise RuntimeError(f"stream {i}: {n} events, earlier streams had {events}")
        if i >= args.warmup:
            firsts.append(first)
            totals.append(total)
            if "first_content_s" in timings:
                contents.append(timings["first_content_s"])
            # None where a read carried no timestamp.
            arrivals.append(timings.get("first_arrived_s"))
    cpu = cputime(args.cpu_pid) - cpu0 if args.cpu_pid else None
    res = {
        "kind": args.kind,
        "case": args.case,
        "threads": args.threads,
        "stream": args.stream,
        "count": args.count,
        "events_per_stream": events,
        "first_event_s": firsts,
        "first_content_s": contents,
        "first_arrived_s": arrivals,
        "total_s": totals,
        "cpu_s": cpu,  # CPU used by --cpu-pid (the proxy) over warm-up + measured streams
        "streams_for_cpu": args.warmup + args.count,
    }
    with open(args.out, "w") as f:
        json.dump(res, f)
    ms = lambda x: f"{x * 1000:.2f} ms"
    print(f"  {args.kind:6} {args.stream:5} n={args.count} events/stream={events} "
          f"first event p50 {ms(pct(firsts, 50))} p99 {ms(pct(firsts, 99))}; "
          f"total p50 {ms(pct(totals, 50))} p99 {ms(pct(totals, 99))}"
          + (f"; proxy CPU {cpu:.2f} s" if cpu is not None else ""))


# --------------------------------------------------------------------------------------------
# commit point: a runtime that plans before it answers


class PlanningRuntime(BaseHTTPRequestHandler):
    """A runtime that thinks before it answers, like the real one: two `thinking` events
    `gap` seconds apart, then after another gap the text, `execution_complete` and [DONE], each
    frame flushed on its own (chunked, keep-alive, as uvicorn serves sse-starlette). Asked
    `benchmark-fail`, the same planning ends in an `execution_error` instead of the text.

    It is also a legacy Chat API's chat route (`POST /api/v1/chat/...`): the answer at once, five
    Agent2UI `message` text events and a `done`, one write each, as Express writes them (LF)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    gap = 0.02

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b'{"status":"ok"}'
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
        ts = "2026-02-09T10:00:00.000000+00:00"

        def chunk(f):
            self.wfile.write(f"{len(f):x}\r\n".encode() + f + b"\r\n")
            self.wfile.flush()

        def frame(event, data):
            chunk(("data: " + json.dumps({"event": event, "data": data, "timestamp": ts}) + "\r\n\r\n").encode())

        if self.path.startswith("/api/v1/chat/"):
            for i, word in enumerate(["Legacy", " answer", " to", " the", " question."]):
                msg = {"id": f"legacy-{i}", "type": "text", "data": {"content": word}, "timestamp": ts}
                chunk(f"event: message\ndata: {json.dumps(msg, separators=(',', ':'))}\n\n".encode())
            done = {"sessionId": "bench-session", "messageId": "legacy-m", "executionMode": "direct_llm"}
            chunk(f"event: done\ndata: {json.dumps(done, separators=(',', ':'))}\n\n".encode())
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            return
        fail = b"benchmark-fail" in body
        frame("thinking", {"content": "reading the question", "stage": "planning"})
        time.sleep(self.gap)
        frame("thinking", {"content": "choosing a tool", "stage": "planning"})
        time.sleep(self.gap)
        if fail:
            frame("execution_error", {"error": "LLM provider returned 503", "code": "LLM_UNAVAILABLE"})
        else:
            frame("text_chunk", {"content": "Here is the answer."})
            frame("execution_complete", {"final_response": "Here is the answer."})
        done = b"data: [DONE]\r\n\r\n"
        self.wfile.write(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
        self.wfile.flush()


def planning_runtime_cmd(args):
    PlanningRuntime.gap = args.gap_ms / 1000.0
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), PlanningRuntime)
    srv.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    srv.serve_forever()


# --------------------------------------------------------------------------------------------
# conversation bridge: legacy stand-in and round-trip probe

BRIDGE_HISTORY = 20  # messages a session keeps (so every measured chat reads the same history)


def gen_bridge(args):
    """The bridge legacy stand-in's answers (served by the upstream nginx)."""
    os.makedirs(args.dir, exist_ok=True)
    history = [{"id": f"m{i}", "role": "user" if i % 2 == 0 else "assistant",
                "content": SENTENCES[i % len(SENTENCES)] * 3} for i in range(BRIDGE_HISTORY)]
    config = json.dumps({"model": "bench-model", "temperature": 0.3, "maxTokens": 2048})
    docs = {
        "session.json": {"id": "bench-session", "agentId": "agent-bench", "title": "bench"},
        "agent.json": {"id": "agent-bench", "name": "Bench", "systemPrompt": "You are a benchmark.",
                       "config": config},
        "messages.json": history,
    }
    for name, data in docs.items():
        with open(os.path.join(args.dir, name), "w") as f:
            json.dump({"success": True, "data": data}, f, ensure_ascii=False)


# The proxy's route labels, as the report names the calls.
BRIDGE_ROUTES = {"session": "session", "agent": "agent", "messages": "messages",
                 "save_message": "save", "create_session": "create", "delete_session": "delete"}


def series(text, name):
    """(labels, value) of each sample of `name` in a Prometheus text exposition."""
    for m in re.finditer(r'^' + re.escape(name) + r'\{([^}]*)\} (\S+)$', text, re.M):
        yield dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))), float(m.group(2))


def bridge_counts(args):
    """The bridge's calls so far, by route, from one proxy's metrics, and the seconds they took as
    the proxy timed them (keys "s:<route>"): a JSON object."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{args.port}/metrics", timeout=5).read().decode()
    counts = {}
    for labels, n in series(text, "cutover_bridge_requests_total"):
        route = BRIDGE_ROUTES.get(labels.get("route"), labels.get("route"))
        counts[route] = counts.get(route, 0) + int(n)
    for labels, secs in series(text, "cutover_bridge_request_duration_seconds_sum"):
        route = BRIDGE_ROUTES.get(labels.get("route"), labels.get("route"))
        counts["s:" + route] = counts.get("s:" + route, 0) + secs
    print(json.dumps(counts))


def rtt_cmd(args):
    """Requests on one keep-alive connection, as the proxy's pooled bridge calls make them."""
    token = make_jwt(args.org, "bench-user", os.environ[args.secret_env])
    body = (args.body or "").encode()
    length = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body else ""
    req = (f"{args.method} {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
           f"Authorization: Bearer {token}\r\n{length}\r\n").encode() + body
    s = socket.create_connection(("127.0.0.1", args.port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for i in range(args.warmup + args.count):
        t0 = time.perf_counter()
        s.sendall(req)
        buf = bytearray()
        while True:
            buf.extend(s.recv(1 << 16))
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                continue
            m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", bytes(buf[:head_end]))
            if len(buf) >= head_end + 4 + int(m.group(1)):
                break
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    s.close()
    with open(args.out, "w") as f:
        json.dump({"kind": "rtt", "route": args.route, "path": args.path, "rtt_s": times}, f)
    print(f"  legacy round trip {args.path}: p50 {pct(times, 50) * 1e3:.2f} ms, "
          f"p99 {pct(times, 99) * 1e3:.2f} ms", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# idle streams: runtime stand-in and client

IDLE_FIRST = ("data: " + json.dumps({"event": "text_chunk", "data": {"content": "hello"},
                                     "timestamp": "2026-02-09T10:11:12.345678"}) + "\r\n\r\n")


async def idle_conn(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            text = head.decode("latin-1")
            method, path = text.split(" ", 2)[:2]
            m = re.search(r"(?i)\r\ncontent-length:\s*(\d+)", text)
            if m and int(m.group(1)):
                await reader.readexactly(int(m.group(1)))
            if method == "GET":
                body = b'{"status":"ok"}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                continue
            frame = IDLE_FIRST.encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
                         + b"%x\r\n%s\r\n" % (len(frame), frame))
            await writer.drain()
            # Hold the stream until the other side goes away.
            while await reader.read(65536):
                pass
            return
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


def idle_runtime_cmd(args):
    async def main():
        server = await asyncio.start_server(idle_conn, "127.0.0.1", args.port, backlog=4096)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            await stop.wait()
    asyncio.run(main())


def idle_client_cmd(args):
    token = make_jwt(args.org, "bench-user", os.environ[args.secret_env]) if args.org else None
    req = chat_request("127.0.0.1", args.port, args.path, token,
                       json.dumps({"message": "idle"}).encode(), close=False)

    async def main():
        sem = asyncio.Semaphore(args.concurrency)
        conns, errors = [], []

        async def one(i):
            async with sem:
                try:
                    r, w = await asyncio.open_connection("127.0.0.1", args.port)
                    w.write(req)
                    await w.drain()
                    buf = b""
                    while True:
                        he = buf.find(b"\r\n\r\n")
                        if he >= 0 and EVENT_END.search(buf, he + 4):
                            break
                        data = await asyncio.wait_for(r.read(65536), args.timeout)
                        if not data:
                            raise ConnectionError("closed before the first event")
                        buf += data
                    if not buf.startswith(b"HTTP/1.1 200"):
                        raise RuntimeError(buf[:80])
                    conns.append((r, w))
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(repr(e))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(args.n)))
        took = time.perf_counter() - t0
        with open(args.ready_file, "w") as f:
            json.dump({"requested": args.n, "established": len(conns), "errors": len(errors),
                       "first_errors": errors[:5], "seconds": took}, f)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        try:
            await asyncio.wait_for(stop.wait(), args.hold)
        except asyncio.TimeoutError:
            pass
        for _, w in conns:
            w.transport.abort()
    asyncio.run(main())


# --------------------------------------------------------------------------------------------
# instruction counts (section 6): a fixed request mix, and callgrind's totals


def keepalive_cmd(args):
    """--conns keep-alive connections at once, --requests GETs on each, one after another; every
    answer must be a 200 with the body its Content-Length announces. The same mix is sent to
    every server whose instructions are counted."""
    req = f"GET {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n\r\n".encode()

    async def conn():
        r, w = await asyncio.open_connection("127.0.0.1", args.port)
        for _ in range(args.requests):
            w.write(req)
            head = (await r.readuntil(b"\r\n\r\n")).decode("latin-1")
            if not head.startswith("HTTP/1.1 200"):
                raise RuntimeError(f"unexpected answer: {head[:80]!r}")
            m = re.search(r"(?i)\r\ncontent-length:\s*(\d+)", head)
            if not m:
                raise RuntimeError(f"no content-length: {head[:200]!r}")
            await r.readexactly(int(m.group(1)))
        w.close()
        return args.requests

    async def main():
        return sum(await asyncio.gather(*(conn() for _ in range(args.conns))))

    print(json.dumps({"requests": asyncio.run(main())}))


def callgrind_total(path):
    """Instructions (Ir) in one callgrind dump: its `totals:` line (`summary:` in older files)."""
    total = None
    for line in open(path):
        if line.startswith(("totals:", "summary:")):
            total = int(line.split()[1])
    if total is None:
        sys.exit(f"{path}: no totals line")
    return total


def cg_record_cmd(args):
    """One JSON line: the instructions of one counted window and what it did (--units of --unit)."""
    units = args.units
    if args.units_from:
        units = json.load(open(args.units_from))[args.units_key] * args.units_scale
    ir = callgrind_total(args.dump)
    rec = {"case": args.case, "what": args.what, "run": args.run, "instructions": ir,
           "units": units, "per_unit": ir / units}
    print(json.dumps(rec))
    print(f"  {args.what:<10} {args.case:<22} run {args.run}: {ir:,} instructions / {units:,} "
          f"= {ir / units:,.0f} per unit", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# wrk output

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def to_ms(s):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", s.strip())
    return float(m.group(1)) * UNITS[m.group(2)] if m else None


def parse_wrk(text):
    res = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    res["rps"] = float(m.group(1)) if m else None
    for p in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{p}%\s+(\S+)", text, re.M)
        res[f"p{p}_ms"] = to_ms(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", text)
    res["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    res["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    res["non_2xx"] = int(m.group(1)) if m else 0
    return res


def wrk_cmd(args):
    """Run wrk, keep its output in --out, print one JSON line. With --pids, also the CPU time
    (user+system) those processes used during the run, per request: less sensitive than req/s
    to what else the machine is doing."""
    import subprocess
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}",
           "--latency", args.url]
    cpu0 = sum(cputime(p) for p in args.pids) if args.pids else None
    text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    cpu1 = sum(cputime(p) for p in args.pids) if args.pids else None
    with open(args.out, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n" + text)
    res = parse_wrk(text)
    if res["rps"] is None:
        sys.exit(f"wrk: no Requests/sec in {args.out}")
    res.update(case=args.case, round=args.round, file=os.path.basename(args.out))
    res["cpu_us_per_req"] = ((cpu1 - cpu0) * 1e6 / res["requests"]
                             if args.pids and res["requests"] else None)
    print(json.dumps(res))
    errs = res["socket_errors"] + res["non_2xx"]
    cpu = (f"  CPU {res['cpu_us_per_req']:.1f} us/req" if res["cpu_us_per_req"] is not None
           else "")
    print(f"  round {args.round} {args.case:<11} {res['rps']:>10,.0f} req/s  p50 {res['p50_ms']:.2f} ms"
          f"  p99 {res['p99_ms']:.2f} ms{cpu}" + (f"  ERRORS {errs}" if errs else ""),
          file=sys.stderr)


def idle_record_cmd(args):
    r = json.load(open(args.ready))
    rec = {"case": args.case, "requested": args.want, "opened": r["requested"],
           "established": r["established"], "errors": r["errors"],
           "first_errors": r["first_errors"], "connect_seconds": r["seconds"],
           "rss_before_kib": args.before, "rss_after_kib": args.after}
    print(json.dumps(rec))
    per = (args.after - args.before) / max(1, r["established"])
    print(f"  {args.case:<9} {r['established']:,}/{r['requested']:,} streams in {r['seconds']:.1f} s"
          f" ({r['errors']} errors); RSS {args.before / 1024:.1f} -> {args.after / 1024:.1f} MiB,"
          f" {per:.1f} KiB per stream", file=sys.stderr)


def collect_cmd(args):
    """Merge JSON lines (one per run) and key=value settings into one JSON document."""
    doc = {}
    for kv in args.set or []:
        k, _, v = kv.partition("=")
        try:
            doc[k] = json.loads(v)
        except ValueError:
            doc[k] = v
    runs = []
    for path in args.jsonl or []:
        with open(path) as f:
            runs += [json.loads(line) for line in f if line.strip()]
    for path in args.json or []:
        with open(path) as f:
            runs.append(json.load(f))
    doc["runs"] = runs
    if args.case:
        doc["cases"] = [dict(zip(("name", "label"), c.split("=", 1))) for c in args.case]
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)


# --------------------------------------------------------------------------------------------
# report


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=2):
    return "–" if x is None else f"{x:,.{nd}f}"


def ratio(a, b):
    return "–" if a is None or not b else f"{a / b:.2f}×"


# Issue 17's bound on the time to first event through the proxy, over direct, at p99.
TTFE_TARGET_S = 0.5e-3


# Section 6's counts at commit 2d03616 (before the one-pass writer), by (count, case): the
# figures the rewrite's target (a third) and the request path's (no more than 5 % worse) are
# judged against. Medians of three runs of bench/run.sh section 6 on that commit.
COUNTS_BEFORE = {
    ("passthrough", "proxy-lean"): 23_160,
    ("passthrough", "proxy-pingora"): 82_108,
    ("event", "rewrite-text"): 10_820,
    ("event", "rewrite-table"): 25_384,
    ("event", "proxy"): 11_012,
    ("stream", "proxy"): 128_757,
}


def mann_whitney_greater(xs, ys):
    """One-sided Mann-Whitney U test: the p-value of "xs tend to be larger than ys" (H0: the
    same distribution). Exact (by counting arrangements) for small samples without ties, else
    the normal approximation with the tie correction and a continuity correction."""
    xs, ys = [x for x in xs if x is not None], [y for y in ys if y is not None]
    n, m = len(xs), len(ys)
    if not n or not m:
        return None
    pooled = sorted([(v, 0) for v in xs] + [(v, 1) for v in ys])
    ranks, ties, i = [0.0] * len(pooled), [], 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        if j > i:
            ties.append(j - i + 1)
        i = j + 1
    u = sum(r for r, (_, who) in zip(ranks, pooled) if who == 0) - n * (n + 1) / 2
    if not ties and n * m <= 2500:
        # counts[k]: arrangements of n xs among n + m values with U = k (U counts x-above-y pairs).
        table = {(0, b): [1] for b in range(m + 1)}
        for a in range(1, n + 1):
            table[(a, 0)] = [1]
            for b in range(1, m + 1):
                # The largest value is an x (adds b to U) or a y.
                with_x, with_y = table[(a - 1, b)], table[(a, b - 1)]
                size = a * b + 1
                row = [0] * size
                for k, c in enumerate(with_x):
                    row[k + b] += c
                for k, c in enumerate(with_y):
                    row[k] += c
                table[(a, b)] = row
        dist = table[(n, m)]
        total = sum(dist)
        return sum(dist[int(round(u)):]) / total
    mean = n * m / 2
    var = n * m / 12 * ((n + m + 1) - sum(t ** 3 - t for t in ties) / ((n + m) * (n + m - 1)))
    if var <= 0:
        return 1.0 if u <= mean else 0.0
    z = (u - mean - 0.5) / var ** 0.5
    return 0.5 * math.erfc(z / 2 ** 0.5)


# A verdict is "worse" only when the rank test says so at this level.
ALPHA = 0.05


def rank_verdict(p):
    """The rank test's word on "worse": not significantly worse passes."""
    if p is None:
        return "no data"
    return (f"**significantly worse** (one-sided Mann-Whitney U, p = {p:.3g})" if p < ALPHA
            else f"**not significantly worse** at 95 % (one-sided Mann-Whitney U, p = {p:.3g})")


def spread(seconds):
    """min–max of per-round values, in ms: how far one round's p99 moves from the next."""
    xs = [x for x in seconds if x is not None]
    return "–" if not xs else f"{min(xs) * 1e3:.2f}–{max(xs) * 1e3:.2f} ms"


def report_cmd(args):
    out = args.out_dir
    meta = json.load(open(os.path.join(out, "meta.json")))
    lines = []
    w = lines.append
    w("# Benchmarks: cutover-proxy side by side with direct and nginx")
    w("")
    w(f"Produced by `{meta['command']}` on {meta['date']}"
      + (" — **quick smoke run (`BENCH_QUICK=1`): indicative only**" if meta.get("quick") else "")
      + ".")
    w("")
    w(f"- Machine: {meta['nproc']} cores (`nproc`), {meta['cpu']}, {meta['mem']}, "
      f"kernel {meta['kernel']}")
    w(f"- cutover-proxy {meta['proxy_version']} (release build, commit {meta['commit']}); "
      f"{meta['nginx']}; " + (f"{meta['haproxy']}; " if meta.get("haproxy") else "")
      + f"{meta['wrk']}; Python {meta['python']}")
    w(f"- Load average at start: {meta['loadavg']}. Everything (load generator, proxy under test, "
      "stand-in upstream) shares these cores over loopback, as a sidecar does; numbers are only "
      "comparable within one run.")
    w("- Raw outputs (every wrk run, every stream timing) are kept in `bench/out/`.")
    w("")

    sections = {}
    reports = [
        ("passthrough.json", report_passthrough),
        ("sse.json", report_sse),
        ("idle.json", report_idle),
        ("bridge.json", report_bridge),
        ("commit.json", report_commit),
        ("counts.json", report_counts),
    ]
    for n, (name, report) in enumerate(reports, 1):
        if os.path.exists(os.path.join(out, name)):
            sections[n] = []
            report(out, sections[n].append)
    write_results(args.results, lines, sections)


def write_results(path, header, sections):
    """Sections without data in this run keep their text from the existing results.md."""
    old_header, old = [], {}
    if os.path.exists(path):
        current = old_header
        for line in open(path).read().split("\n"):
            m = re.match(r"^## (\d+)\. ", line)
            if m:
                current = old[int(m.group(1))] = []
            elif line == "## Reproduce":
                current = []
            current.append(line)
        while old_header and not old_header[-1]:
            old_header.pop()
        old_header.append("")
    missing = [n for n in (1, 2, 3, 4, 5, 6) if n not in sections and n in old]
    merged = []
    for n in (1, 2, 3, 4, 5, 6):
        body = sections.get(n) or old.get(n) or []
        while body and not body[-1]:
            body = body[:-1]
        if body:
            merged += body + [""]
    lines = (old_header if missing and old_header else header) + merged
    w = lines.append
    w("## Reproduce")
    w("")
    w("```sh")
    w("make bench                 # ~25 minutes: release build, all six sections, this file")
    w("BENCH_QUICK=1 make bench   # a few minutes' smoke run (short runs, one round, 1k idle streams)")
    w("BENCH_SECTIONS=4 bench/run.sh   # only section 4 (release build first); the others stay as they are here")
    w("```")
    w("")
    w("Knobs (environment): `BENCH_SECTIONS`, `BENCH_ROUNDS`, `BENCH_DURATION`, `BENCH_CONNS`, "
      "`BENCH_WRK_THREADS`, `BENCH_PROXY_THREADS` (space-separated list, one proxy per value), "
      "`BENCH_SSE_STREAMS`, `BENCH_BRIDGE_STREAMS`, `BENCH_COMMIT_STREAMS`, `BENCH_PLAN_GAP_MS`, "
      "`BENCH_IDLE_N`, `BENCH_IDLE_ROUNDS`, `BENCH_NGINX_AUTO`, `BENCH_PT_ROUNDS`, `BENCH_CG_RUNS`, `BENCH_CG_CONNS`, "
      "`BENCH_CG_REQUESTS`, `BENCH_CG_STREAMS`, `BENCH_CG_SSE`, `BENCH_PORT_BASE`, "
      "`CUTOVER_PROXY_BIN`, `BENCH_LEAN_BIN`, `BENCH_REWRITE_BIN`. See the top of `bench/run.sh`.")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}" + (f" (sections {missing} kept from the earlier run)" if missing else ""))


def section(out, name, w, title):
    """The results in `name` under `out`, once their section's heading is written."""
    results = json.load(open(os.path.join(out, name)))
    w(f"## {title}")
    w("")
    return results


def report_passthrough(out, w):
    pt = section(out, "passthrough.json", w, "1. Non-chat passthrough (small JSON GET)")
    w(f"`wrk -t{pt['wrk_threads']} -c{pt['connections']} -d{pt['duration']} --latency` against "
      f"`GET /api/v1/bench/status` (a {pt['body_bytes']}-byte JSON body from a static nginx "
      f"upstream, its own instance, {pt['upstream_workers']} worker(s)). "
      f"{pt['rounds']} round(s), cases interleaved; medians over rounds (min–max of req/s in "
      "brackets). Ratios: req/s and p99 against direct and against nginx with one worker.")
    w("")
    w("| case | req/s | p50 | p99 | CPU per request | req/s vs direct | req/s vs nginx-1w "
      "| p99 vs nginx-1w | CPU/req vs nginx-1w | errors |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    cases = pt["cases"]
    summary = {}
    for c in cases:
        runs = [r for r in pt["runs"] if r["case"] == c["name"]]
        rps = [r["rps"] for r in runs]
        summary[c["name"]] = {
            "rps": med(rps), "rps_min": min(rps) if rps else None,
            "rps_max": max(rps) if rps else None,
            "p50": med(r["p50_ms"] for r in runs), "p99": med(r["p99_ms"] for r in runs),
            "cpu": med(r.get("cpu_us_per_req") for r in runs),
            "errors": sum(r["socket_errors"] + r["non_2xx"] for r in runs),
        }
    d = summary.get("direct", {})
    n1 = summary.get("nginx-1w", {})
    for c in cases:
        s = summary[c["name"]]
        w(f"| {c['label']} | {fmt(s['rps'], 0)} ({fmt(s['rps_min'], 0)}–{fmt(s['rps_max'], 0)}) "
          f"| {fmt(s['p50'])} ms | {fmt(s['p99'])} ms | {fmt(s['cpu'], 1)} µs "
          f"| {ratio(s['rps'], d.get('rps'))} | {ratio(s['rps'], n1.get('rps'))} "
          f"| {ratio(s['p99'], n1.get('p99'))} | {ratio(s['cpu'], n1.get('cpu'))} | {s['errors']} |")
    w("")
    w("*CPU per request*: user+system CPU time of the tier under test (the proxy process; nginx "
      "master and workers; for *direct*, the upstream nginx itself) during the run, from "
      "/proc/<pid>/stat, divided by the requests wrk completed. It is less sensitive than req/s "
      "to what else the machine runs (though not immune: preemption and cache contention "
      "still show), so compare it first when the machine was busy.")
    w("")
    w("*lean forwarder*: `examples/lean_forwarder.rs`, Pingora's `Server` and listeners with a "
      "`ServerApp` of its own (httparse head, per-worker upstream pool, head bytes forwarded "
      "as read): the floor of a passthrough on Pingora's lower layer. Workers of HAProxy, the "
      "lean forwarder and cutover-proxy are threads of one process.")
    w("")
    for c in [c for c in cases if c["name"].startswith("lean-")]:
        s = summary[c["name"]]
        t = c["name"][len("lean-t"):]
        h = summary.get(f"haproxy-t{t}", {})
        if s["cpu"] and n1.get("cpu"):
            r = s["cpu"] / n1["cpu"]
            w(f"- Floor (CPU/req ≤ 1.1× nginx-1w), {c['label']}: "
              f"**{'reachable' if r <= 1.1 else 'not reached'}** ({r:.2f}× nginx-1w's CPU/req, "
              f"{ratio(s['p99'], n1.get('p99'))} its p99; {ratio(s['cpu'], h.get('cpu'))} "
              f"HAProxy nbthread {t}'s CPU/req, {ratio(s['p99'], h.get('p99'))} its p99).")
    for c in [c for c in cases if c["name"].startswith("proxy")]:
        s = summary[c["name"]]
        if s["rps"] and n1.get("rps"):
            ok = s["rps"] >= n1["rps"] and s["p99"] <= n1["p99"]
            w(f"- Target (req/s ≥ nginx-1w and p99 ≤ nginx-1w), {c['label']}: "
              f"**{'met' if ok else 'not met'}** "
              f"({s['rps'] / n1['rps']:.2f}× req/s, {s['p99'] / n1['p99']:.2f}× p99).")
    # The same worker count: nginx with one worker, or with auto workers when that is the count
    # (its label names it).
    for c in [c for c in cases if c["name"].startswith("proxy-t")]:
        s = summary[c["name"]]
        t = c["name"][len("proxy-t"):]
        peer = next((n for n in cases
                     if (n["name"] == "nginx-1w" and t == "1")
                     or (n["name"] == "nginx-auto" and f"({t})" in n["label"])), None)
        p = summary.get(peer["name"], {}) if peer else {}
        if s["cpu"] and p.get("cpu") and s["p99"] and p.get("p99"):
            ok = s["cpu"] <= p["cpu"] and s["p99"] <= p["p99"]
            w(f"- Target (CPU/req ≤ nginx's and p99 ≤ nginx's at the same worker count), "
              f"{c['label']} vs {peer['label']}: **{'met' if ok else 'not met'}** "
              f"({s['cpu'] / p['cpu']:.2f}× CPU/req, {s['p99'] / p['p99']:.2f}× p99).")
            mine = [r["p99_ms"] for r in pt["runs"] if r["case"] == c["name"]]
            theirs = [r["p99_ms"] for r in pt["runs"] if r["case"] == peer["name"]]
            w(f"  Judged by rank (issue 17's p99 target re-judged: each round's p99, "
              f"{len(mine)} against {len(theirs)}, cases interleaved): "
              f"{rank_verdict(mann_whitney_greater(mine, theirs))}"
              + (" — with fewer than four rounds a side the test cannot reject at 95 %."
                 if min(len(mine), len(theirs)) < 4 else "."))
    w("")


def report_sse(out, w):
    sse = section(out, "sse.json", w, "2. SSE on the runtime path (10k-event runtime stream)")
    w(f"One `POST` per stream on a fresh connection (`Connection: close`), one stream at a time. "
      f"The runtime stand-in is nginx serving a canned {sse['stream_bytes']:,}-byte stream of "
      f"{sse['runtime_frames']:,} runtime frames ({sse['chunks']:,} `text_chunk`, "
      "`execution_complete`, `[DONE]`; sse-starlette framing) as a static file. "
      "*direct*: the client reads the runtime stream itself. *nginx*: section 1's nginx "
      "(one worker and auto workers, `proxy_buffering off`) relays the same stream unchanged, "
      "what a proxy that "
      "adds nothing costs here. *cutover-proxy*: chat route, "
      "allowlisted org (HS256 JWT), so every frame is parsed and rewritten into Agent2UI events, "
      "once per proxy thread count of section 1. "
      f"{sse['rounds']} round(s) × {sse['per_round']} streams per case, interleaved; percentiles "
      "over all streams. The *short* rows (a 12-frame stream, same path) isolate the fixed "
      "per-request cost of the first event from the cost of rewriting the first read's worth of "
      "frames before the first write.")
    w("")
    w("| case | stream | streams | events/stream | first event p50 | first event p99 | total p50 "
      "| total p99 | events/s (one stream, p50) |")
    w("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    proxy_threads = sorted({r.get("threads") or 0 for r in sse["runs"] if r["kind"] == "proxy"})
    nginx_workers = sorted({r.get("threads") or 1 for r in sse["runs"] if r["kind"] == "nginx"})
    cases = ([("direct", None)] + [("nginx", n) for n in nginx_workers]
             + [("proxy", t) for t in proxy_threads])
    agg = {}
    for stream in ("long", "short"):
        for kind, threads in cases:
            runs = [r for r in sse["runs"]
                    if r["kind"] == kind and r.get("stream", "long") == stream
                    and (kind == "direct" or (r.get("threads") or 1) == threads)]
            if not runs:
                continue
            f = [x for r in runs for x in r["first_event_s"]]
            t = [x for r in runs for x in r["total_s"]]
            ev = runs[0]["events_per_stream"]
            agg[kind, threads, stream] = a = {
                "firsts": f,
                "f50": pct(f, 50), "f99": pct(f, 99), "t50": pct(t, 50), "t99": pct(t, 99),
                "events": ev, "n": len(t), "cpu": sum(r["cpu_s"] or 0 for r in runs),
                "nstreams": sum(r["streams_for_cpu"] for r in runs),
                "f99_rounds": [pct(r["first_event_s"], 99) for r in runs]}
            # (read, arrived) per stream, for the streams whose first read carried a timestamp.
            pairs = [(x, y) for r in runs
                     for x, y in zip(r["first_event_s"], r.get("first_arrived_s") or [])
                     if y is not None]
            if pairs and len(pairs) >= 0.95 * len(f):
                arrived = [y for _, y in pairs]
                a["arrived"] = arrived
                a["a50"], a["a99"] = pct(arrived, 50), pct(arrived, 99)
                a["a99_rounds"] = [pct([y for y in r["first_arrived_s"] if y is not None], 99)
                                   for r in runs]
                a["w50"] = pct([x - y for x, y in pairs], 50)
                a["w99"] = pct([x - y for x, y in pairs], 99)
            label = {"direct": "direct (client ← runtime)",
                     "nginx": f"nginx, {threads} worker(s) (`proxy_pass`, no rewrite)"}.get(
                         kind, f"cutover-proxy, threads = {threads} (rewrite on)")
            name = (f"{sse['chunks']:,} chunks" if stream == "long" else "short (12 frames)")
            w(f"| {label} | {name} | {a['n']} | {fmt(ev, 0)} | {fmt(a['f50'] * 1e3)} ms "
              f"| {fmt(a['f99'] * 1e3)} ms | {fmt(a['t50'] * 1e3)} ms | {fmt(a['t99'] * 1e3)} ms "
              f"| {fmt(ev / a['t50'], 0) if stream == 'long' else '–'} |")
    w("")
    dr = agg[("direct", None, "long")]

    def first_event(who, px):
        """The first event of the long stream against direct's: as read, and at the socket."""
        w(f"- {who}, {sse['chunks']:,}-chunk stream: first event "
          f"{(px['f50'] - dr['f50']) * 1e3:+.2f} ms at p50, "
          f"{(px['f99'] - dr['f99']) * 1e3:+.2f} ms at p99 over direct (target ≤ "
          f"+{TTFE_TARGET_S * 1e3:g} ms at p99: "
          f"**{'met' if px['f99'] - dr['f99'] <= TTFE_TARGET_S else 'not met'}**; p99 round by "
          f"round: direct {spread(dr['f99_rounds'])}, this {spread(px['f99_rounds'])}); total "
          f"time {ratio(px['t50'], dr['t50'])} direct's at p50 (the direct row is the stand-in's "
          "own speed: it is not the bottleneck).")
        # Issue 17's first-event target re-judged: every stream of the case against every
        # direct stream moved 0.5 ms later (the rounds interleave the cases).
        p_read = mann_whitney_greater(px["firsts"], [x + TTFE_TARGET_S for x in dr["firsts"]])
        w(f"  Judged by rank (first event per stream, {len(px['firsts'])} against direct's "
          f"{len(dr['firsts'])} + {TTFE_TARGET_S * 1e3:g} ms): {rank_verdict(p_read)}"
          + ("" if "arrived" not in px or "arrived" not in dr else
             f"; at the client's socket: "
             f"{rank_verdict(mann_whitney_greater(px['arrived'], [x + TTFE_TARGET_S for x in dr['arrived']]))}")
          + ".")
        if "a99" in px and "a99" in dr:
            over = px["a99"] - dr["a99"]
            w(f"  At the client's socket (the kernel's receive time of the segment that completed "
              f"the first event, so the client's own wake-up is left out): "
              f"{(px['a50'] - dr['a50']) * 1e3:+.2f} ms at p50, {over * 1e3:+.2f} ms at p99 "
              f"(**{'met' if over <= TTFE_TARGET_S else 'not met'}** there; p99 round by round: "
              f"direct {spread(dr['a99_rounds'])}, this {spread(px['a99_rounds'])}). The "
              f"client's wake-up and read after that segment, p50 / p99: direct "
              f"{dr['w50'] * 1e3:.2f} / {dr['w99'] * 1e3:.2f} ms, this "
              f"{px['w50'] * 1e3:.2f} / {px['w99'] * 1e3:.2f} ms.")

    for n in nginx_workers:
        first_event(f"nginx, {n} worker(s) (a plain proxy, no rewrite: the floor of a proxy on "
                    "these cores)", agg[("nginx", n, "long")])
    for threads in proxy_threads:
        px = agg[("proxy", threads, "long")]
        first_event(f"threads = {threads}", px)
        if ("proxy", threads, "short") in agg:
            ds, ps = agg[("direct", None, "short")], agg[("proxy", threads, "short")]
            w(f"- threads = {threads}, short stream: first event "
              f"{(ps['f50'] - ds['f50']) * 1e3:+.2f} ms at p50, "
              f"{(ps['f99'] - ds['f99']) * 1e3:+.2f} ms at p99 over direct: the fixed part.")
        own = proxy_first_byte_buckets(os.path.join(out, "sse", f"proxy-t{threads}.metrics"))
        if own:
            total = own[-1][1]
            some = [f"{n:,} within {le * 1e3:g} ms" for le, n in own if le <= 0.01 and n < total]
            w(f"- threads = {threads}, the proxy's own count (`chat_time_to_first_event_seconds`, "
              f"the request's first byte read to the first event written, long and short streams "
              f"and warm-ups together): {total:,} streams, {''.join(x + ', ' for x in some)}all "
              f"within {next(le for le, n in own if n == total) * 1e3:g} ms. What the client "
              "sees beyond that is outside this span: the connection's handshake and the "
              "request's way in before it, the client's wake-up after it.")
        if px["cpu"]:
            per_core = px["events"] * px["nstreams"] / px["cpu"]
            w(f"- threads = {threads}: rewritten events per CPU-second of the proxy process "
              f"(events/s per core): **{per_core:,.0f}** ({px['events'] * px['nstreams']:,} "
              f"events, {px['cpu']:.2f} s user+system CPU, from /proc/<pid>/stat, warm-up "
              "streams included).")
    w("")


def proxy_first_byte_buckets(path):
    """[(le seconds, cumulative streams)] of the runtime mode's first-byte histogram in a saved
    /metrics exposition; empty without one."""
    if not os.path.exists(path):
        return []
    text = open(path).read()
    return sorted((float(labels["le"]), int(n))
                  for labels, n in series(text, "chat_time_to_first_event_seconds_bucket")
                  if labels.get("mode") == "runtime_orchestrator" and labels.get("le") != "+Inf")


def report_idle(out, w):
    idle = section(out, "idle.json", w, "3. Idle SSE streams held open")
    w("A Python asyncio runtime stand-in sends one event per stream, then holds it; the client "
      "opens N streams (chat route, allowlisted org: the proxy's runtime path, which reads the "
      "runtime connection in the stream's own task), waits for the first event on every one, "
      "then the proxy's VmRSS is read "
      "from /proc/<pid>/status. nginx (one worker, `proxy_buffering off`, no rewrite) proxies "
      "the same streams for comparison. The proxy is measured with the conversation bridge off "
      "(the stream path alone) and on (as the product runs: section 4's legacy stand-in answers "
      "the lookups and the user message's save at the commit). A fresh proxy process per case "
      "and N; heartbeat and execution timeout are set far beyond the run.")
    w("")
    if idle.get("note"):
        w(f"> {idle['note']}")
        w("")
    def per_stream(r):
        return (r["rss_after_kib"] - r["rss_before_kib"]) / max(1, r["established"])

    # Each (case, N) is measured once per round; the round with the median RSS per stream
    # stands for it, the others give the range.
    rounds = {}
    for r in idle["runs"]:
        rounds.setdefault((r["case"], r["requested"]), []).append(r)
    by, spread = {}, {}
    for key, rs in rounds.items():
        rs = sorted(rs, key=per_stream)
        by[key] = rs[(len(rs) - 1) // 2]
        spread[key] = (per_stream(rs[0]), per_stream(rs[-1]), len(rs))
    w(f"{idle.get('rounds', 1)} round(s), the cases interleaved in each; each row is the round "
      "with the median RSS per stream, the range over all rounds beside it.")
    w("")
    w("| case | streams requested | established | RSS before | RSS with streams | RSS per stream "
      "| range over rounds | RSS per stream vs nginx |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, r in by.items():
        per = per_stream(r)
        ng = by.get(("nginx-1w", r["requested"]))
        ngper = per_stream(ng) if ng else None
        lo, hi, n = spread[key]
        label = {"proxy": f"cutover-proxy ({idle['threads']} threads), bridge off",
                 "proxy-bridge": f"cutover-proxy ({idle['threads']} threads), bridge on",
                 "nginx-1w": "nginx, 1 worker"}[r["case"]]
        w(f"| {label} | {r['requested']:,} | {r['established']:,} "
          f"| {r['rss_before_kib'] / 1024:.1f} MiB | {r['rss_after_kib'] / 1024:.1f} MiB "
          f"| {per:.1f} KiB | {f'{lo:.1f}–{hi:.1f} KiB' if n > 1 else '–'} "
          f"| {ratio(per, ngper) if r['case'] != 'nginx-1w' else '1.00×'} |")
    w("")
    # Between two N in the same run, what one more stream costs: a fixed cost (pools, caches,
    # what the allocator keeps of a burst of set-ups) drops out.
    marginal = {}
    for case in ("proxy", "proxy-bridge", "nginx-1w"):
        runs = sorted((r for r in by.values() if r["case"] == case), key=lambda r: r["established"])
        if len(runs) >= 2 and runs[-1]["established"] > runs[0]["established"]:
            lo, hi = runs[0], runs[-1]
            marginal[case] = ((hi["rss_after_kib"] - lo["rss_after_kib"])
                              / (hi["established"] - lo["established"]))
    if marginal:
        parts = {"proxy": "cutover-proxy, bridge off", "proxy-bridge": "bridge on",
                 "nginx-1w": "nginx"}
        w("- One more stream, from the smallest N to the largest (what is fixed drops out): "
          + ", ".join(f"{parts[c]} {v:.1f} KiB" for c, v in marginal.items())
          + (f"; with the bridge on {marginal['proxy-bridge'] / marginal['nginx-1w']:.2f}× nginx"
             if "proxy-bridge" in marginal and "nginx-1w" in marginal else "")
          + ". At the smallest N the bridged figure also carries the fixed costs of its burst "
          "of set-ups (legacy lookups and saves, 200 at a time): memory the allocator keeps, "
          "idle connections in the bridge's legacy pool.")
    for r in [r for r in by.values() if r["case"] == "proxy-bridge"]:
        per = per_stream(r)
        ng = by.get(("nginx-1w", r["requested"]))
        if ng:
            ngper = per_stream(ng)
            w(f"- Target (a held stream with the bridge on ≤ nginx's per stream), "
              f"{r['requested']:,} streams: **{'met' if per <= ngper else 'not met'}** "
              f"({per:.1f} KiB against {ngper:.1f} KiB, {per / ngper:.2f}×).")
    big = [r for r in by.values() if r["case"] == "proxy"]
    if big:
        r = max(big, key=lambda r: r["established"])
        mb = r["rss_after_kib"] * 1024 / 1e6
        if r["established"] >= 10000:
            w(f"- Target (10k idle streams ≤ 300 MB RSS): {r['established']:,} streams → "
              f"{mb:.0f} MB: **{'met' if mb <= 300 else 'not met'}**.")
        else:
            per = per_stream(r)
            est = (r["rss_before_kib"] + 10000 * per) * 1024 / 1e6
            w(f"- Target (10k idle streams ≤ 300 MB RSS): measured {r['established']:,} streams → "
              f"{mb:.0f} MB; extrapolated to 10,000 (RSS before + 10,000 × per stream) → "
              f"{est:.0f} MB: **{'met' if est <= 300 else 'not met'} (extrapolated)**.")
    w("")


def report_bridge(out, w):
    br = section(out, "bridge.json", w, "4. The conversation bridge: time to first event, bridge off and on")
    w(f"Measured by `{br['command']}` on {br['date']} (commit {br['commit']}, load average "
      f"{br['loadavg']}). The short runtime stream of section 2 (nginx, 12 frames) through three "
      "cutover-proxy instances (1 thread each) whose legacy is an nginx stand-in with the "
      "bridge's routes (`bench/nginx-upstream.conf`, answers from `benchtool.py gen-bridge`: "
      "session, agent with its config as a JSON string, a 20-message history, message saves), chat route, allowlisted org, one stream at "
      "a time on a fresh connection. *off*: `bridge.enabled = false` (the runtime owns its "
      "conversations). *on*: the defaults (`cache_ttl_ms = 30000`): after the first chat the "
      "session's agent id and the agent's config come from the cache, the history is read every "
      "time. *new session*: the same proxy, each chat in a session it has not seen (the agent "
      "cached): the session lookup and the history read go out together. "
      "*no cache*: `cache_ttl_ms = 0`, every lookup asks legacy. The first event waits for "
      "the lookups and for the user message's save at the commit point; the assistant message's "
      "save happens before `done`, so it shows in the total. *legacy round trip*: each of the "
      "bridge's calls on its own, on a keep-alive connection, as the proxy's pooled calls make "
      "them. "
      f"{br['rounds']} round(s) × {br['per_round']} streams per case, interleaved; percentiles "
      "over all streams.")
    w("")
    w("| case | streams | legacy calls per chat | first event p50 | first event p99 | total p50 "
      "| total p99 | first event p50 over off |")
    w("|---|---:|---|---:|---:|---:|---:|---:|")
    calls = [r for r in br["runs"] if "before" in r]
    agg = {}
    for c in br["cases"]:
        runs = [r for r in br["runs"] if r.get("kind") == "proxy" and r.get("case") == c["name"]]
        f = [x for r in runs for x in r["first_event_s"]]
        t = [x for r in runs for x in r["total_s"]]
        if not f:
            continue
        per = {}
        chats = 0
        for r in calls:
            if r["case"] != c["name"]:
                continue
            chats += br["per_round"] + br.get("warmup", 0)
            for k, v in r["after"].items():
                per[k] = per.get(k, 0) + v - r["before"].get(k, 0)
        per_chat = ", ".join(f"{k} {v / chats:.2f}" for k, v in sorted(per.items())
                             if v and not k.startswith("s:")) if chats else ""
        # The proxy's own time per call (its histogram's sum over its count), by route.
        timed = {k: per["s:" + k] / per[k] for k in ("messages", "save") if per.get(k) and per.get("s:" + k)}
        agg[c["name"]] = a = {"f50": pct(f, 50), "f99": pct(f, 99), "t50": pct(t, 50),
                              "t99": pct(t, 99), "n": len(f), "timed": timed}
        off = agg.get("off")
        over = "–" if c["name"] == "off" or not off else f"+{(a['f50'] - off['f50']) * 1e3:.2f} ms"
        w(f"| {c['label']} | {a['n']} | {per_chat or '–'} | {fmt(a['f50'] * 1e3)} ms "
          f"| {fmt(a['f99'] * 1e3)} ms | {fmt(a['t50'] * 1e3)} ms | {fmt(a['t99'] * 1e3)} ms | {over} |")
    rtts = {}
    for r in br["runs"]:
        if r.get("kind") == "rtt":
            rtts.setdefault(r.get("route", "session"), []).extend(r["rtt_s"])
    labels = {"session": "GET session", "messages": "GET messages (the history)",
              "save": "POST messages (a save)"}
    for route in ("session", "messages", "save"):
        if rtts.get(route):
            t = rtts[route]
            w(f"| legacy round trip: {labels[route]}, keep-alive | {len(t)} | – | {fmt(pct(t, 50) * 1e3)} ms "
              f"| {fmt(pct(t, 99) * 1e3)} ms | – | – | – |")
    w("")
    off = agg.get("off")
    hist = pct(rtts["messages"], 50) if rtts.get("messages") else None
    save = pct(rtts["save"], 50) if rtts.get("save") else None
    for name, label in (("on", "cached lookups"), ("newsession", "a new session each chat"),
                        ("nocache", "no cache")):
        a = agg.get(name)
        if not (a and off and hist and save):
            continue
        extra = a["f50"] - off["f50"]
        # This runtime answers at once, so the save at the commit is not overlapped with anything:
        # what is left after it is what the lookups cost.
        lookups = extra - save
        w(f"- Bridge on, {label}: first event +{extra * 1e3:.2f} ms at p50 over off; less the "
          f"save's round trip ({save * 1e3:.2f} ms, which the commit point puts before the first "
          f"event) the lookups cost +{lookups * 1e3:.2f} ms = **{lookups / hist:.2f} history round "
          "trips** (target ≤ 1 at p50 with the cache: "
          + (f"**{'met' if lookups <= hist else 'not met'}**" if name == "on" else "for reference")
          + f"); total +{(a['t50'] - off['t50']) * 1e3:.2f} ms at p50.")
        t = a.get("timed", {})
        if t.get("messages") and t.get("save"):
            own = extra - t["save"]
            w(f"  As the proxy times its own calls (mean per call, from "
              f"`cutover_bridge_request_duration_seconds`): history read {t['messages'] * 1e3:.2f} ms, "
              f"save {t['save'] * 1e3:.2f} ms; less the save, the lookups cost "
              f"**{own / t['messages']:.2f} of the proxy's history calls** (target ≤ 1 at p50 "
              "with the cache: "
              + (f"**{'met' if own <= t['messages'] else 'not met'}**" if name == "on" else "for reference")
              + "). The proxy's call costs more than the blocking client's round trip above: its "
              "event loop's wake-ups, the JSON and the runtime request it builds.")
    w("")
    return {"history_s": hist, "save_s": save}


def report_commit(out, w):
    cm = section(out, "commit.json", w, "5. The commit point: the head held or streamed, and the rescue")
    gap = cm["gap_ms"]
    w(f"Measured by `{cm['command']}` on {cm['date']} (commit {cm['commit']}, load average "
      f"{cm['loadavg']}). A runtime stand-in that plans (`benchtool.py planning-runtime`: two "
      f"`thinking` events {gap} ms apart, then after another {gap} ms the text, "
      "`execution_complete` and [DONE]) through cutover-proxy instances (1 thread each, "
      "`commit_timeout_ms = 5000`): *hold* is `runtime.pre_content = \"hold\"` (the head and "
      "the `thinking` events wait for the text), *stream* the default (the head and each "
      "`thinking` go out as they come; the commit, and with the bridge on the user message's save, "
      "still wait for the text), each with the bridge off and on (section 4's legacy stand-in). "
      "*rescued*: the same planning ends in an `execution_error` instead of the text; the proxy "
      "asks legacy (the same stand-in's chat route: five text events and `done` at once) and "
      "continues the open stream with its answer. *direct*: the same legacy answering a chat "
      "routed to it (an org off the allowlist), through the same proxy. First event: the first "
      "event the client gets; first content: its first `text` event (legacy's, when rescued). "
      f"{cm['rounds']} round(s) × {cm['per_round']} streams per case, interleaved; percentiles "
      "over all streams.")
    w("")
    w("| case | streams | first event p50 | first event p99 | first content p50 | first content p99 "
      "| total p50 |")
    w("|---|---:|---:|---:|---:|---:|---:|")
    agg = {}
    for c in cm["cases"]:
        runs = [r for r in cm["runs"] if r.get("kind") == "proxy" and r.get("case") == c["name"]]
        f = [x for r in runs for x in r["first_event_s"]]
        fc = [x for r in runs for x in r.get("first_content_s", [])]
        t = [x for r in runs for x in r["total_s"]]
        if not fc:
            continue
        agg[c["name"]] = a = {"f50": pct(f, 50), "f99": pct(f, 99), "c50": pct(fc, 50),
                              "c99": pct(fc, 99), "t50": pct(t, 50), "n": len(fc)}
        w(f"| {c['label']} | {a['n']} | {fmt(a['f50'] * 1e3)} ms | {fmt(a['f99'] * 1e3)} ms "
          f"| {fmt(a['c50'] * 1e3)} ms | {fmt(a['c99'] * 1e3)} ms | {fmt(a['t50'] * 1e3)} ms |")
    w("")
    for bridge in ("off", "on"):
        hold, stream = agg.get(f"hold-bridge-{bridge}"), agg.get(f"stream-bridge-{bridge}")
        if not (hold and stream):
            continue
        earlier = hold["f50"] - stream["f50"]
        ratio = hold["f50"] / stream["f50"] if stream["f50"] else float("inf")
        w(f"- Bridge {bridge}: with `stream` the user sees the runtime's status "
          f"**{earlier * 1e3:.2f} ms earlier** at p50 ({fmt(stream['f50'] * 1e3)} against "
          f"{fmt(hold['f50'] * 1e3)} ms, {ratio:.1f}× sooner); the first content moves by "
          f"{(stream['c50'] - hold['c50']) * 1e3:+.2f} ms at p50 (it waits for the runtime either way).")
    rescued, direct = agg.get("rescued"), agg.get("direct")
    stream = agg.get("stream-bridge-off")
    if rescued and direct and stream:
        # The same planning ends with the text (stream) or the error (rescued) at the same point:
        # the stream case's first content is when the runtime failed.
        leg = rescued["c50"] - stream["c50"]
        w(f"- Rescue: legacy's first content reached the user {fmt(rescued['c50'] * 1e3)} ms after "
          f"the request at p50, {leg * 1e3:.2f} ms after the point where the same planning's own "
          f"text arrives ({fmt(stream['c50'] * 1e3)} ms, *stream, bridge off*), which is when "
          f"this runtime failed. A chat routed to legacy directly has its first content after "
          f"{fmt(direct['c50'] * 1e3)} ms: the rescue's leg (the failure noticed, the request sent "
          f"to legacy, its events rewritten into the open stream) costs "
          f"**{(leg - direct['c50']) * 1e3:+.2f} ms** over a direct legacy answer "
          f"({leg / direct['c50']:.1f}× its time to first content). Meanwhile the user had the "
          f"runtime's status after {fmt(rescued['f50'] * 1e3)} ms.")
    w("")


def report_counts(out, w):
    cg = section(out, "counts.json", w, "6. Instruction counts (callgrind)")
    w("Instructions retired, counted by Valgrind's callgrind: on a shared, noisy machine they move "
      "by a fraction of a percent from run to run where times move by tens of percent, so the "
      "targets below are judged on them. Each server runs alone under callgrind (one worker: "
      "nginx with `master_process off`, HAProxy `nbthread 1`, cutover-proxy `threads = 1`); the "
      "upstream stand-ins and the clients run outside it. After a warm-up the counters are "
      "zeroed (`callgrind_control -z`), the same mix is sent to each, and the window is dumped "
      f"(`-d`). {cg['count_runs']} run(s) of each count, each in a fresh process; the spread is "
      "(max − min) / median over the runs.")
    w("")
    w(f"- *passthrough*: {cg['conns']} keep-alive connections × {cg['requests']} `GET "
      "/api/v1/bench/status` each (section 1's request); cutover-proxy's lean path (the default) "
      "and Pingora's path (`server.lean_passthrough = false`).")
    w("- *rewrite alone*: `examples/rewrite_ir.rs`, the relay's parse-and-map loop over a whole "
      "runtime body read 16 KiB at a time, counted inside its measured function only, per "
      "runtime event: *text* is section 2's kind of stream (CJK `text_chunk` frames, half "
      "ASCII-escaped); *table* is the e2e sse-starlette runtime stand-in's full contract table "
      "as recorded in `tests/fixtures/runtime/table.sse` (no recording of the real runtime is "
      "kept in the repo).")
    w(f"- *through the proxy*: {cg['sse_streams']} of section 2's 10k-event streams per count, "
      "per event written (cutover-proxy, rewrite on) or per runtime frame relayed (nginx).")
    w(f"- *held stream set-up*: {cg['streams']} streams opened through the proxy (chat route, "
      "bridge off) or nginx, each to its first event (section 3's runtime stand-in), per stream.")
    w("")
    by = {}
    for r in cg["runs"]:
        by.setdefault((r["what"], r["case"]), []).append(r["per_unit"])

    def stat(what, case):
        xs = by.get((what, case))
        if not xs:
            return None, None
        m = statistics.median(xs)
        return m, (max(xs) - min(xs)) / m if m else None

    labels = [
        ("passthrough", "nginx", "per request", "nginx, 1 worker"),
        ("passthrough", "haproxy", "per request", "HAProxy, nbthread 1"),
        ("passthrough", "proxy-lean", "per request", "cutover-proxy, lean path"),
        ("passthrough", "proxy-pingora", "per request", "cutover-proxy, Pingora's path"),
        ("event", "rewrite-text", "per runtime event", "rewrite alone, text_chunk stream"),
        ("event", "rewrite-table", "per runtime event", "rewrite alone, recorded runtime mix"),
        ("event", "nginx", "per runtime frame", "nginx relaying the 10k stream (no rewrite)"),
        ("event", "proxy", "per event", "cutover-proxy, 10k stream (rewrite on)"),
        ("stream", "nginx", "per held stream set-up", "nginx, 1 worker"),
        ("stream", "proxy", "per held stream set-up", "cutover-proxy (bridge off)"),
    ]
    w("| count | case | instructions | spread over runs | vs nginx | vs before (2d03616) |")
    w("|---|---|---:|---:|---:|---:|")
    for what, case, unit, label in labels:
        m, sp = stat(what, case)
        if m is None:
            continue
        ref = None if case.startswith("rewrite") else stat(what, "nginx")[0]
        before = COUNTS_BEFORE.get((what, case))
        w(f"| {unit} | {label} | {m:,.0f} | {fmt(sp * 100 if sp is not None else None)} % "
          f"| {ratio(m, ref) if ref and case != 'nginx' else '–'} "
          f"| {ratio(m, before) if before else '–'} |")
    w("")
    ng, hp = stat("passthrough", "nginx")[0], stat("passthrough", "haproxy")[0]
    vs_haproxy = (lambda m: f", {m / hp:.2f}× HAProxy") if hp else (lambda m: "")
    m = stat("passthrough", "proxy-lean")[0]
    if m and ng:
        w(f"- Target (passthrough instructions per request ≤ nginx's), on the path a passthrough "
          f"request takes (the lean one, `server.lean_passthrough`, the default): "
          f"**{'met' if m <= ng else 'not met'}** ({m / ng:.2f}× nginx{vs_haproxy(m)}).")
    m = stat("passthrough", "proxy-pingora")[0]
    if m and ng:
        w(f"- Pingora's path, for the requests the lean path leaves to it (chats for legacy and "
          f"their failovers, runtime file links, `Upgrade`, `Expect`, `CONNECT`, absolute-form "
          f"targets, a `Connection` naming the framing or `Host`), or every request with the lean "
          f"passthrough off: {m / ng:.2f}× nginx{vs_haproxy(m)}. Most of it is Pingora's own "
          f"work for a request (its proxy flow, its per-request future, its header maps), which "
          f"is why the lean path exists; it is held to the 5 % rule below, not to nginx's count.")
    for case, label in (("rewrite-text", "text_chunk stream"), ("rewrite-table", "recorded mix")):
        m, before = stat("event", case)[0], COUNTS_BEFORE.get(("event", case))
        if m and before:
            w(f"- Target (the rewrite ≤ ⅓ of its instructions per event at 2d03616), {label}: "
              f"**{'met' if m <= before / 3 else 'not met'}** ({m:,.0f} against {before:,.0f}: "
              f"{before / m:.2f}× fewer).")
    cpu = [v for k, v in sorted(cg.items()) if k.startswith("cpu_rewrite-cpu-r")]
    if cpu:
        best = [c["events_per_cpu_second_best"] for c in cpu]
        median = [c["events_per_cpu_second_median"] for c in cpu]
        w(f"- Target (the rewrite alone ≥ 3M events per CPU-second, its quiet-run figure: the "
          f"best of ten passes over a 200k-event text_chunk stream, on the thread's own CPU "
          f"clock): **{'met' if statistics.median(best) >= 3e6 else 'not met'}** "
          f"({statistics.median(best):,.0f} events per CPU-second, runs "
          f"{min(best):,.0f}–{max(best):,.0f}; the median pass {statistics.median(median):,.0f}). "
          "Criterion's wall-clock figure for the same loop: `cargo bench --bench sse_throughput`.")
    worst = []
    for key in (("passthrough", "proxy-lean"), ("passthrough", "proxy-pingora"),
                ("stream", "proxy")):
        m, before = stat(*key)[0], COUNTS_BEFORE.get(key)
        if m and before:
            worst.append((m / before, key))
    if worst:
        r, key = max(worst)
        w(f"- Target (nothing on the request path regresses by more than 5 % since 2d03616): "
          f"**{'met' if r <= 1.05 else 'not met'}** (worst: {key[0]} {key[1]}, {r:.3f}× before).")
    w("")


# --------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("render")
    s.add_argument("template")
    s.add_argument("out")
    s.add_argument("pairs", nargs="*")
    s.set_defaults(fn=render)

    s = sub.add_parser("gen-sse")
    s.add_argument("out")
    s.add_argument("--chunks", type=int, default=10_000)
    s.set_defaults(fn=gen_sse)

    s = sub.add_parser("jwt")
    s.add_argument("--org", required=True)
    s.add_argument("--user", default="bench-user")
    s.add_argument("--secret-env", default="BENCH_JWT_SECRET")
    s.set_defaults(fn=jwt_cmd)

    s = sub.add_parser("sse")
    s.add_argument("--kind", choices=["direct", "nginx", "proxy"], required=True)
    s.add_argument("--stream", choices=["long", "short"], default="long")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--path", required=True, help="`{i}` is replaced with a per-stream id")
    s.add_argument("--org", help="sign a JWT for this org (proxy)")
    s.add_argument("--secret-env", default="BENCH_JWT_SECRET")
    s.add_argument("--count", type=int, default=50)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--timeout", type=float, default=30)
    s.add_argument("--cpu-pid", type=int)
    s.add_argument("--threads", type=int, help="worker threads of the proxy measured")
    s.add_argument("--case", help="name of the case measured (section 4: bridge off / on)")
    s.add_argument("--message", default="benchmark", help="the chat's message")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=sse_cmd)

    s = sub.add_parser("idle-runtime")
    s.add_argument("--port", type=int, required=True)
    s.set_defaults(fn=idle_runtime_cmd)

    s = sub.add_parser("idle-client")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--path", required=True)
    s.add_argument("--org")
    s.add_argument("--secret-env", default="BENCH_JWT_SECRET")
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--concurrency", type=int, default=200)
    s.add_argument("--timeout", type=float, default=30)
    s.add_argument("--hold", type=float, default=300, help="give up holding after this long")
    s.add_argument("--ready-file", required=True)
    s.set_defaults(fn=idle_client_cmd)

    s = sub.add_parser("planning-runtime")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--gap-ms", type=float, default=20)
    s.set_defaults(fn=planning_runtime_cmd)

    s = sub.add_parser("gen-bridge")
    s.add_argument("dir")
    s.set_defaults(fn=gen_bridge)

    s = sub.add_parser("bridge-counts")
    s.add_argument("--port", type=int, required=True, help="a cutover-proxy's metrics port")
    s.set_defaults(fn=bridge_counts)

    s = sub.add_parser("rtt")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--path", required=True)
    s.add_argument("--method", default="GET")
    s.add_argument("--body", help="a JSON body, sent with its Content-Length")
    s.add_argument("--route", default="session", help="the bridge route this is, for the report")
    s.add_argument("--org", default="org-bench")
    s.add_argument("--secret-env", default="BENCH_JWT_SECRET")
    s.add_argument("--count", type=int, default=300)
    s.add_argument("--warmup", type=int, default=20)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=rtt_cmd)

    s = sub.add_parser("rss")
    s.add_argument("pids", nargs="+", type=int)
    s.set_defaults(fn=rss_cmd)

    s = sub.add_parser("cputime")
    s.add_argument("pids", nargs="+", type=int)
    s.set_defaults(fn=cputime_cmd)

    s = sub.add_parser("wrk")
    s.add_argument("url")
    s.add_argument("--out", required=True)
    s.add_argument("--case", required=True)
    s.add_argument("--round", type=int, required=True)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--connections", type=int, default=50)
    s.add_argument("--duration", default="10s")
    s.add_argument("--pids", type=int, nargs="*", help="processes whose CPU time to count")
    s.set_defaults(fn=wrk_cmd)

    s = sub.add_parser("keepalive")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--path", required=True)
    s.add_argument("--conns", type=int, default=10)
    s.add_argument("--requests", type=int, default=100, help="per connection")
    s.set_defaults(fn=keepalive_cmd)

    s = sub.add_parser("cg-record")
    s.add_argument("dump", help="a callgrind dump file")
    s.add_argument("--case", required=True)
    s.add_argument("--what", required=True, help="passthrough, event, stream")
    s.add_argument("--run", type=int, required=True)
    s.add_argument("--units", type=int, help="requests, events or streams in the window")
    s.add_argument("--units-from", help="a JSON file holding the count instead")
    s.add_argument("--units-key", default="runtime_events")
    s.add_argument("--units-scale", type=int, default=1)
    s.set_defaults(fn=cg_record_cmd)

    s = sub.add_parser("idle-record")
    s.add_argument("ready")
    s.add_argument("case")
    s.add_argument("want", type=int)
    s.add_argument("before", type=int)
    s.add_argument("after", type=int)
    s.set_defaults(fn=idle_record_cmd)

    s = sub.add_parser("collect")
    s.add_argument("out")
    s.add_argument("--jsonl", action="append")
    s.add_argument("--json", action="append")
    s.add_argument("--set", action="append")
    s.add_argument("--case", action="append", help="name=label, in table order")
    s.set_defaults(fn=collect_cmd)

    s = sub.add_parser("report")
    s.add_argument("out_dir")
    s.add_argument("results")
    s.set_defaults(fn=report_cmd)

    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
