#!/usr/bin/env python3
"""Time to a chat's first event from the Express legacy stand-in (tests/e2e/legacy/app.js, the
product's cors + compression stack) when the client accepts gzip, as every browser does: directly,
and through cutover-proxy with `legacy.chat_identity_encoding` on (the default) and off.

Legacy's `compression()` compresses an SSE answer whenever the request accepts it, and its chat
service never flushes the compressor: the whole answer then arrives at its end. The proxy sends
chats to legacy with `Accept-Encoding: identity`, so each event leaves legacy as it is written.

Usage: bench/legacy_encoding.py [--chats N] [--gap-ms MS]   (stdlib only; needs node, the stand-in's
npm packages (make test-e2e installs them) and a built proxy: CUTOVER_PROXY_BIN, else
target/release, else target/debug). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port}")


def proxy_bin() -> str:
    for p in (os.environ.get("CUTOVER_PROXY_BIN"), ROOT / "target/release/cutover-proxy",
              ROOT / "target/debug/cutover-proxy"):
        if p and Path(p).is_file():
            return str(p)
    raise SystemExit("no cutover-proxy binary: cargo build")


def chat(port: int) -> tuple[float, float, str]:
    """One chat; (seconds to the first whole event, seconds to the end, content coding)."""
    body = b'{"message":"hello"}'
    head = (f"POST /api/v1/chat/sessions/bench-1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            "Accept-Encoding: gzip, deflate\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    start = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(head + body)
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += s.recv(65536)
    header, rest = raw.split(b"\r\n\r\n", 1)
    coding = ""
    for line in header.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-encoding":
            coding = value.strip().decode()
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if coding == "gzip" else None
    decoded, first, buf, ended = b"", None, rest, False
    while not ended:
        # De-chunk what has arrived.
        while True:
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                break
            size = int(buf[:line_end].split(b";")[0], 16)
            if size == 0:
                ended = True
                break
            if len(buf) < line_end + 2 + size + 2:
                break
            piece = buf[line_end + 2:line_end + 2 + size]
            buf = buf[line_end + 2 + size + 2:]
            decoded += inflate.decompress(piece) if inflate else piece
            if first is None and b"\n\n" in decoded:
                first = time.perf_counter() - start
        if ended:
            break
        more = s.recv(65536)
        if not more:
            break
        buf += more
    s.close()
    return first if first is not None else float("nan"), time.perf_counter() - start, coding or "identity"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chats", type=int, default=20)
    ap.add_argument("--gap-ms", type=int, default=50, help="between legacy's events (6 events)")
    args = ap.parse_args()
    procs = []
    try:
        legacy_port = free_port()
        env = {**os.environ, "PORT": str(legacy_port), "RATE_LIMIT_PER_MINUTE": "1000000000",
               "LEGACY_EVENT_GAP_MS": str(args.gap_ms)}
        env.pop("CORS_ORIGIN", None)
        legacy = subprocess.Popen(["node", str(ROOT / "tests/e2e/legacy/app.js")], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(legacy)
        wait_port(legacy_port, legacy, "legacy")
        ports = {"legacy, direct": legacy_port}
        work = Path(tempfile.mkdtemp(prefix="legacy-encoding-"))
        for key in ("true", "false"):
            port, admin, metrics = free_port(), free_port(), free_port()
            cfg = work / f"proxy-{key}.toml"
            cfg.write_text(f"""[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
metrics_listen = "127.0.0.1:{metrics}"
threads = 1
[legacy]
address = "127.0.0.1:{legacy_port}"
chat_identity_encoding = {key}
[runtime]
address = "127.0.0.1:{free_port()}"
[bridge]
enabled = false
""")
            p = subprocess.Popen([proxy_bin(), "--config", str(cfg)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
            procs.append(p)
            wait_port(port, p, "proxy")
            ports[f"through the proxy, chat_identity_encoding = {key}"] = port
        print(f"{args.chats} chats per case; legacy writes 6 events {args.gap_ms} ms apart; "
              "the client sends Accept-Encoding: gzip, deflate\n")
        print("| path | coding legacy sent | first event p50 (ms) | whole answer p50 (ms) |")
        print("|---|---|---:|---:|")
        for name, port in ports.items():
            runs = [chat(port) for _ in range(args.chats)]
            codings = sorted({r[2] for r in runs})
            first = statistics.median(r[0] for r in runs) * 1000
            total = statistics.median(r[1] for r in runs) * 1000
            print(f"| {name} | {', '.join(codings)} | {first:.1f} | {total:.1f} |")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    main()
