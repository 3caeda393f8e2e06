"""Helpers of the end-to-end suite: processes, ports, proxy.toml, tokens and the strict client.

The strict client reads a chat response the way the web app's reader (`useChat.ts`) does: every
network read is decoded and split on "\\n" by itself, with fresh state per read, and an event is
dispatched only on a bare empty line. Anything that reader would lose (a CR, an event cut between
two reads, data that is not one line of JSON) is recorded as a violation, and tests assert there
are none.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

JWT_ENV = "E2E_JWT_SECRET"
JWT_SECRET = "e2e-jwt-secret-0123456789abcdef-0123456789"
ADMIN_ENV = "E2E_ADMIN_TOKEN"
ADMIN_TOKEN = "e2e-admin-token"

DEFAULT_AGENT_ID = "agent-e2e"

SEPS = {"crlf": "\r\n", "lf": "\n", "cr": "\r"}


# ---- processes -----------------------------------------------------------------------------

def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports: each socket stays bound until all are chosen, since a port
    just released may be handed out again at once (the proxy's listen and metrics ports once
    came out the same, and its listener then found the port taken)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _child_setup():
    """In the child: own process group (so teardown can kill the whole group) and die with
    the test runner even if it is killed without running teardown."""
    os.setsid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Proc:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None):
        self.name = name
        self.log = log
        self._logf = open(log, "ab")
        self.popen = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._logf,
            stderr=subprocess.STDOUT, preexec_fn=_child_setup,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, sig=signal.SIGTERM, grace: float = 3.0):
        if self.alive():
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of the group (the leader included) goes now.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._logf.close()


class Fatal(Exception):
    """Raised by a polled predicate to stop polling at once."""


def wait_until(pred, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll `pred` until it returns a truthy value; return it, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except Fatal:
            raise
        except Exception as e:  # noqa: BLE001 - polled until the deadline
            last_exc = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_ports(proc: Proc, ports: list[int], timeout: float):
    def ready():
        if not proc.alive():
            raise Fatal(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        return all(port_accepts(p) for p in ports)

    try:
        wait_until(ready, timeout, what=f"{proc.name} to accept on {ports}")
    except Fatal as e:
        raise AssertionError(str(e)) from None
    except AssertionError as e:
        raise AssertionError(f"{e}\n{proc.log_tail()}") from None


# ---- upstream stand-ins --------------------------------------------------------------------

LEGACY_APP = HERE / "legacy" / "app.js"


def node_bin() -> str:
    return os.environ.get("E2E_NODE", "node")


class App:
    """One of the stand-ins in a subprocess: a FastAPI app run by uvicorn, or (`argv`) a command
    that listens on $PORT."""

    def __init__(self, name: str, module: str, log_dir: Path, extra_env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None, argv: list[str] | None = None,
                 unset: tuple[str, ...] = ()):
        self.name = name
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.base = f"http://{self.address}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PORT": str(self.port), **(extra_env or {})}
        for name_ in unset:
            env.pop(name_, None)
        self.proc = Proc(name, argv or [
            sys.executable, "-m", "uvicorn", f"{module}:app", "--app-dir", str(HERE),
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
            "--no-access-log", *(extra_args or []),
        ], env, log_dir / f"{name}.log")

    def wait_ready(self, timeout: float = 20.0):
        wait_ports(self.proc, [self.port], timeout)

    def get(self, path: str) -> Any:
        r = httpx.get(self.base + path, timeout=5)
        r.raise_for_status()
        return r.json()

    def post(self, path: str) -> Any:
        r = httpx.post(self.base + path, timeout=5)
        r.raise_for_status()
        return r.json()


class Runtime(App):
    def __init__(self, sep_name: str, log_dir: Path, name: str | None = None, extra_args: list[str] | None = None):
        super().__init__(name or f"runtime-{sep_name}", "runtime_app", log_dir, {"RUNTIME_SSE_SEP": sep_name},
                         extra_args)
        self.sep_name = sep_name

    def received_for(self, session_id: str) -> list[dict]:
        return [r for r in self.get("/control/received") if r["body"].get("session_id") == session_id]

    def sent(self, session_id: str) -> list[dict]:
        return self.get(f"/control/sent/{session_id}")

    def ending(self, session_id: str) -> str | None:
        return self.get(f"/control/ending/{session_id}")["ending"]

    def release(self, key: str):
        self.post(f"/control/release/{key}")


class Legacy(App):
    """The Express legacy stand-in (legacy/app.js). The suite's shares one client address (the
    proxy on loopback) across every test, so its per-IP limit is set out of reach unless a test
    asks for one; CORS_ORIGIN is the test's to set (unset: '*', as the product)."""

    def __init__(self, log_dir: Path, name: str = "legacy", env: dict[str, str] | None = None):
        settings = {"LEGACY_JWT_SECRET": JWT_SECRET, "RATE_LIMIT_PER_MINUTE": "1000000000", **(env or {})}
        unset = () if "CORS_ORIGIN" in settings else ("CORS_ORIGIN",)
        super().__init__(name, "", log_dir, settings, argv=[node_bin(), str(LEGACY_APP)], unset=unset)

    def received_for(self, path: str) -> list[dict]:
        return [r for r in self.get("/control/received") if r["path"] == path]

    # -- the conversation bridge's side

    def _post_json(self, path: str, body: dict) -> Any:
        r = httpx.post(self.base + path, json=body, timeout=5)
        r.raise_for_status()
        return r.json()

    def seed(self, org: str, agent: dict | None = None, session: dict | None = None,
             messages: list[dict] | None = None):
        """Store an agent and/or a session (with earlier messages) owned by `org`."""
        spec: dict[str, Any] = {"org": org}
        if agent is not None:
            spec["agent"] = agent
        if session is not None:
            spec["session"] = session
            spec["messages"] = messages or []
        self._post_json("/control/seed", spec)

    def fault(self, route: str, id_: str, status: int | None = None, hang: bool = False,
              times: int | None = None):
        """Make one bridge route misbehave for calls naming session or agent `id_`."""
        self._post_json("/control/fault", {"route": route, "id": id_, "status": status, "hang": hang,
                                           "times": times})

    def bridge_calls(self, route: str | None = None, id_: str | None = None) -> list[dict]:
        calls = self.get("/control/bridge")
        return [c for c in calls if (route is None or c["route"] == route)
                and (id_ is None or id_ in c["path"] or (c["body"] or {}).get("agentId") == id_)]

    def messages(self, session_id: str, org: str) -> list[dict]:
        """The session's messages as the web app lists them, through the Chat API's own route."""
        r = httpx.get(f"{self.base}/api/v1/sessions/{session_id}/messages",
                      headers={"authorization": f"Bearer {make_token(org)}"}, timeout=5)
        r.raise_for_status()
        return r.json()["data"]

    def stored_session(self, session_id: str) -> dict | None:
        return self.get(f"/control/sessions/{session_id}")["session"]


# ---- proxy.toml ----------------------------------------------------------------------------

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def to_toml(config: dict[str, dict[str, Any]]) -> str:
    out = ["# written by tests/e2e"]
    for table, keys in config.items():
        out.append(f"\n[{table}]")
        for k, v in keys.items():
            if v is not None:
                out.append(f"{k} = {_toml_value(v)}")
    return "\n".join(out) + "\n"


def merge(base: dict, overrides: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for table, keys in (overrides or {}).items():
        out.setdefault(table, {}).update(keys)
    return out


# ---- the proxy -----------------------------------------------------------------------------

def proxy_bin() -> Path:
    return Path(os.environ.get("CUTOVER_PROXY_BIN") or REPO / "target" / "debug" / "cutover-proxy")


def run_check(config_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(proxy_bin()), "check", "--config", str(config_path)],
                          capture_output=True, text=True, timeout=30)


class Proxy:
    """One cutover-proxy process with its own proxy.toml and ports."""

    START_ATTEMPTS = 3

    def __init__(self, workdir: Path, legacy: Legacy, runtime_address: str, overrides: dict | None = None,
                 config_path: Path | None = None):
        self.workdir = workdir
        # The config lives in a directory of its own: the proxy watches that directory, and its
        # log file must not be a neighbour (see test_reload.py's busy-directory test).
        if config_path is None:
            (workdir / "etc").mkdir(exist_ok=True)
            config_path = workdir / "etc" / "proxy.toml"
        self.config_path = config_path
        env = {k: v for k, v in os.environ.items() if k not in ("JWT_SECRET", "CUTOVER_ADMIN_TOKEN")}
        env.update({JWT_ENV: JWT_SECRET, ADMIN_ENV: ADMIN_TOKEN, "RUST_BACKTRACE": "1",
                    "RUST_LOG": env.get("RUST_LOG", "info,pingora_core=warn")})
        # Free ports are picked before the proxy binds them; should another process take one in
        # between, the proxy exits at once and is started again on fresh ports.
        for attempt in range(1, self.START_ATTEMPTS + 1):
            self.port, self.admin_port, self.metrics_port = free_ports(3)
            self.base = f"http://127.0.0.1:{self.port}"
            self.admin = f"http://127.0.0.1:{self.admin_port}"
            self.metrics_base = f"http://127.0.0.1:{self.metrics_port}"
            self.config = merge(self._base_config(legacy, runtime_address), overrides or {})
            self.write_config(self.config)
            self.proc = Proc("proxy", [str(proxy_bin()), "--config", str(self.config_path)], env,
                             workdir / "proxy.log", cwd=workdir)
            try:
                wait_ports(self.proc, [self.port, self.admin_port, self.metrics_port], timeout=20)
                break
            except BaseException:
                exited = not self.proc.alive()
                self.proc.stop(signal.SIGKILL, grace=0)
                if not exited or attempt == self.START_ATTEMPTS:
                    raise
        self.client = httpx.Client(timeout=httpx.Timeout(10.0, read=20.0))

    def _base_config(self, legacy: Legacy, runtime_address: str) -> dict:
        """The contract's proxy.toml, on test ports, with a short health interval."""
        return {
            "server": {
                "listen": f"127.0.0.1:{self.port}",
                "admin_listen": f"127.0.0.1:{self.admin_port}",
                "metrics_listen": f"127.0.0.1:{self.metrics_port}",
                "threads": 2,
                "grace_period_secs": 1,
            },
            "legacy": {"address": legacy.address},
            "runtime": {
                "address": runtime_address,
                "stream_path": "/api/v1/execute/stream",
                "health_path": "/health",
                "execution_timeout_ms": 20000,
                "health_interval_ms": 200,
                # The suite's default is a runtime that owns its conversations (bridge off, below):
                # most tests are about the stream, not the legacy API's sessions. test_bridge.py
                # turns the bridge on against the stand-in legacy's routes.
                "default_agent_id": DEFAULT_AGENT_ID,
            },
            "rollout": {"default_mode": "direct_llm", "runtime_orgs": ["org-a"]},
            "identity": {"jwt_secret_env": JWT_ENV, "org_claim": "orgId"},
            "breaker": {"window_secs": 300, "min_requests": 10, "error_rate": 0.5, "timeout_rate": 0.3,
                        "latency_ratio": 0.8, "open_secs": 30, "half_open_probes": 3},
            "admin": {"token_env": ADMIN_ENV},
            "bridge": {"enabled": False},
        }

    def write_config(self, config: dict, path: Path | None = None):
        """Rewrite the file in place (same inode), as an editor without rename does."""
        text = to_toml(config)
        with open(path or self.config_path, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def config_with(self, overrides: dict) -> dict:
        return merge(self.config, overrides)

    def close(self) -> list[str]:
        """Stop the proxy; returns what went wrong in it (crash, panics) for the test to report."""
        problems = []
        if not self.proc.alive():
            problems.append(f"the proxy exited during the test with {self.proc.popen.returncode}")
        self.client.close()
        self.proc.stop(signal.SIGINT, grace=3.0)
        try:
            log = self.proc.log.read_text(errors="replace")
        except OSError:
            log = ""
        problems += [line for line in log.splitlines() if "panicked at" in line]
        return problems

    # -- requests

    def chat(self, org: str | None = "org-a", message: str = "hello", session_id: str | None = None,
             route: str = "session", headers: dict | None = None, token: str | None = None,
             body: dict | None = None) -> "ChatStream":
        session_id = session_id or new_session_id()
        path = f"/api/v1/chat/sessions/{session_id}" if route == "session" else "/api/v1/chat/start"
        h = {"accept": "text/event-stream"}
        if token is not None:
            h["authorization"] = f"Bearer {token}"
        elif org is not None:
            h["authorization"] = f"Bearer {make_token(org)}"
        h.update(headers or {})
        payload = body if body is not None else {"message": message}
        return ChatStream(self.client, self.base + path, h, payload, session_id)

    def run_chat(self, *args, timeout: float = 15.0, **kwargs) -> "ChatStream":
        """Send a chat request and read its response to the end."""
        s = self.chat(*args, **kwargs)
        s.read_to_end(timeout)
        return s

    def mode_of(self, org: str | None, message: str = "hello") -> tuple[str, str]:
        s = self.run_chat(org, message)
        return s.headers.get("x-execution-mode"), s.headers.get("x-execution-reason")

    def admin_get(self, path: str) -> httpx.Response:
        return self.client.get(self.admin + path)

    def admin_post(self, path: str, token: str | None = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        return self.client.post(self.admin + path, headers=headers)

    def metrics_text(self) -> str:
        r = self.client.get(self.metrics_base + "/metrics")
        r.raise_for_status()
        return r.text

    def metric(self, name: str, **labels) -> float | None:
        return metric_value(self.metrics_text(), name, **labels)


def metric_value(text: str, name: str, **labels) -> float | None:
    """The value of one sample of the Prometheus text exposition (labels must match exactly)."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if "{" in series:
            metric, _, rest = series.partition("{")
            got = {}
            for part in rest.rstrip("}").split(","):
                if part:
                    k, _, v = part.partition("=")
                    got[k] = v.strip('"')
        else:
            metric, got = series, {}
        if metric == name and got == {k: str(v) for k, v in labels.items()}:
            return float(value)
    return None


def new_session_id() -> str:
    return "sess-" + uuid.uuid4().hex[:16]


def make_token(org: str | None, user: str = "user-1", exp_in: int = 600, secret: str = JWT_SECRET,
               **claims) -> str:
    """An HS256 token like the Chat API's; `org=None` leaves the org claim out."""
    now = int(time.time())
    payload = {"userId": user, "iat": now, "exp": now + exp_in, **claims}
    if org is not None:
        payload["orgId"] = org
    return jwt.encode(payload, secret, algorithm="HS256")


# ---- the strict client ---------------------------------------------------------------------

@dataclass
class Event:
    event: str
    data: Any
    at: float  # time.monotonic() of the read that carried it
    read_index: int


END = object()
NO_DATA = object()


@dataclass
class ChatStream:
    """A chat request whose response body is read on a thread, read by read."""

    client: httpx.Client
    url: str
    req_headers: dict
    payload: dict
    session_id: str
    events: list[Event] = field(default_factory=list)
    reads: list[bytes] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    ended: bool = False
    error: BaseException | None = None

    def __post_init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._consumed = 0
        request = self.client.build_request("POST", self.url, json=self.payload, headers=self.req_headers)
        self.response = self.client.send(request, stream=True)
        self.status = self.response.status_code
        self.headers = self.response.headers
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    @property
    def raw(self) -> bytes:
        return b"".join(self.reads)

    def _read(self):
        strict = self.headers.get("content-type", "").startswith("text/event-stream")
        try:
            for chunk in self.response.iter_raw():
                if not chunk:
                    continue
                now = time.monotonic()
                index = len(self.reads)
                self.reads.append(chunk)
                if strict:
                    for ev in self._parse_read(chunk, index):
                        ev.at = now
                        self.events.append(ev)
                        self._queue.put(ev)
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            self.error = e
        finally:
            self.ended = True
            self._queue.put(END)

    def _parse_read(self, chunk: bytes, index: int) -> list[Event]:
        """One network read, the web app's way: split on LF, state reset per read."""
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as e:
            self.violations.append(f"read {index}: not whole UTF-8 ({e}): {chunk[:80]!r}")
            text = chunk.decode("utf-8", errors="replace")
        if "\r" in text:
            self.violations.append(f"read {index}: contains CR: {chunk[:120]!r}")
        if not text.endswith("\n\n"):
            self.violations.append(f"read {index}: does not end with a whole event: ...{chunk[-120:]!r}")
        out = []
        none = NO_DATA
        event_name, data = None, none
        for line in text.split("\n"):
            if line == "":
                if data is not none:
                    out.append(Event(event_name or "message", data, 0.0, index))
                elif event_name is not None:
                    self.violations.append(f"read {index}: event {event_name!r} without data")
                event_name, data = None, none
            elif line.startswith(":"):
                continue
            elif line.startswith("event: "):
                event_name = line[len("event: "):]
            elif line.startswith("data: "):
                if data is not none:
                    self.violations.append(f"read {index}: data spans several lines")
                raw = line[len("data: "):]
                try:
                    data = json.loads(raw)
                except ValueError:
                    self.violations.append(f"read {index}: data is not one line of JSON: {raw[:120]!r}")
                    data = raw
            else:
                self.violations.append(f"read {index}: unexpected line {line[:120]!r}")
        if event_name is not None or data is not none:
            self.violations.append(f"read {index}: event cut at the end of the read (lost by the web app)")
        return out

    def next_event(self, timeout: float) -> Event | None:
        """The next event, None at the end of the stream; fails after `timeout` seconds."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event within {timeout}s; got so far: {self.summary()}") from None
        if item is END:
            self._queue.put(END)
            return None
        return item

    def read_to_end(self, timeout: float = 15.0) -> "ChatStream":
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.close()
            raise AssertionError(f"response did not end within {timeout}s; got: {self.summary()}")
        self.response.close()
        if self.error is not None:
            raise AssertionError(f"reading the response failed: {self.error!r}; got: {self.summary()}")
        return self

    def disconnect(self):
        """Drop the connection under the reader, as a closed browser tab does."""
        try:
            sock = self.response.extensions["network_stream"].get_extra_info("socket")
            sock.shutdown(socket.SHUT_RDWR)
        except (KeyError, AttributeError, OSError):
            pass

    def close(self):
        if self._thread.is_alive():
            self.disconnect()
            self._thread.join(5)
        try:
            self.response.close()
        except Exception:  # noqa: BLE001
            pass

    def summary(self) -> str:
        return repr([(e.event, (e.data or {}).get("type") if isinstance(e.data, dict) else e.data)
                     for e in self.events])

    def messages(self) -> list[dict]:
        return [e.data for e in self.events if e.event == "message"]

    def names(self) -> list[str]:
        return [e.event if e.event != "message" else f"message:{e.data.get('type')}" for e in self.events]

    def assert_strict(self):
        assert self.violations == [], "the web app's reader would lose events:\n" + "\n".join(self.violations)


# ---- Prometheus ----------------------------------------------------------------------------

class Prometheus:
    """A real Prometheus (Debian's `prometheus` package) scraping `targets` every second, with the
    shipped rule files loaded and evaluated every second."""

    RULES = REPO / "deploy" / "prometheus" / "rules.yml"

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: Proc | None = None

    def start(self, targets: list[str], job: str = "cutover-proxy") -> "Prometheus":
        import shutil
        binary = shutil.which("prometheus")
        if binary is None:
            raise AssertionError("prometheus not found: install Debian's prometheus package "
                                 "(scripts/install-deps.sh test)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {self.RULES}\n"
            f"scrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: {json.dumps(targets)}\n")
        self.proc = Proc("prometheus", [
            binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
        ], dict(os.environ), self.workdir / "prometheus.log", cwd=self.workdir)
        wait_ports(self.proc, [self.port], timeout=30)

        def ready():
            return httpx.get(self.base + "/-/ready", timeout=2).status_code == 200
        wait_until(ready, 30, interval=0.1, what="prometheus to be ready")
        # Every target scraped once: counters are seen at their starting 0, so increase() counts
        # from the first event on.
        wait_until(lambda: len(self.query("up == 1")) == len(targets), 30, interval=0.1,
                   what="every target scraped")
        return self

    def query(self, promql: str) -> list[dict]:
        r = httpx.get(self.base + "/api/v1/query", params={"query": promql}, timeout=5)
        r.raise_for_status()
        return r.json()["data"]["result"]

    def kill(self):
        if self.proc is not None:
            self.proc.stop(signal.SIGKILL, grace=0)

    def stop(self):
        if self.proc is not None:
            self.proc.stop()
