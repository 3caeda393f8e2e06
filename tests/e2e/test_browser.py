"""The web app in a real browser: headless Chromium (Debian's, driven by Playwright, which downloads
nothing) runs the app's own chat request and read loop (browser/chat.js, as useChat.ts has them)
from a page on another origin, against the proxy, on the legacy path and on the runtime path, and
opens a runtime file as the app's FileDownload does: a plain link, carrying only the auth_token
cookie. A browser reads a cross-origin answer only when it carries CORS headers, so these fail when
the proxy's own responses lack them (`cors.origin = false` shows it).

The page's origin serves /api/* by forwarding to the proxy, as the app's Next.js rewrites do: the
file link the proxy writes is relative, so the browser resolves it against the page's origin."""

from __future__ import annotations

import http.client
import http.server
import os
import shutil
import threading
import uuid
from pathlib import Path

import pytest

from e2e_support import App, make_token, new_session_id
from legacy_stream import legacy_chunks

playwright_api = pytest.importorskip("playwright.sync_api")

HERE = Path(__file__).resolve().parent
PAGE_DIR = HERE / "browser"
FILE_BYTES = "report line 1\nreport line 2 你好\n".encode()
# Chromium as root, on a machine with no network beyond loopback: no sandbox (root), and nothing
# that reaches out on its own.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--disable-gpu", "--disable-quic",
]


def chromium_path() -> str:
    path = os.environ.get("E2E_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.fail(f"Chromium not found at {path}: scripts/install-deps.sh test installs Debian's chromium")
    return path


class PageServer:
    """The web app's origin: the page and its script, and /api/* forwarded to the proxy."""

    def __init__(self, proxy_port: int):
        page = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.startswith("/api/"):
                    return self.forward()
                name = "index.html" if self.path.split("?")[0] == "/" else self.path.lstrip("/")
                file = PAGE_DIR / name
                if not file.is_file() or file.parent != PAGE_DIR:
                    self.send_error(404)
                    return
                body = file.read_bytes()
                self.send_response(200)
                self.send_header("content-type", "text/html" if name.endswith(".html") else "text/javascript")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def forward(self):
                conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("cookie", "accept")}
                conn.request("GET", self.path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                page.forwarded.append((self.path, resp.status, dict(headers)))
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() in ("content-type", "content-disposition", "cache-control"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                conn.close()

        self.forwarded: list[tuple[str, int, dict]] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def files_runtime(tmp_path_factory):
    app = App("runtime-files", "files_runtime", tmp_path_factory.mktemp("files-runtime"))
    app.wait_ready()
    yield app
    app.proc.stop()


@pytest.fixture(scope="module")
def chromium():
    with playwright_api.sync_playwright() as p:
        # Playwright gives each launch a fresh, temporary --user-data-dir.
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def web_app(chromium):
    """open(proxy) -> (page, page server): the chat page on its own origin, talking to `proxy`."""
    opened = []

    def open_(proxy):
        server = PageServer(proxy.port)
        context = chromium.new_context(accept_downloads=True)
        page = context.new_page()
        page.goto(f"{server.origin}/?api=http://127.0.0.1:{proxy.port}")
        page.wait_for_selector("#ready")
        opened.append((server, context))
        return page, server

    yield open_
    for server, context in opened:
        context.close()
        server.close()


def send(page, org: str, **message) -> dict:
    page.evaluate("t => login(t)", make_token(org))
    return page.evaluate("m => sendMessage(m)", message)


def test_the_web_app_gets_every_event_on_both_paths_and_downloads_a_file(make_proxy, files_runtime, web_app):
    proxy = make_proxy(files_runtime)
    page, server = web_app(proxy)
    assert page.evaluate("location.origin") != f"http://127.0.0.1:{proxy.port}", "the page is cross-origin"

    # The legacy path (org-z is not on the allowlist): legacy's events, as legacy sent them.
    session = new_session_id()
    seen = send(page, "org-z", sessionId=session, message="hello")
    assert seen["error"] is None, seen
    assert seen["status"] == 200
    expected = [chunk.decode() for chunk in legacy_chunks(session, "hello")]
    assert len(seen["events"]) == len(expected) == 6, seen
    assert [e["event"] for e in seen["events"]] == ["message"] * 5 + ["done"]
    assert "".join(e["data"]["data"]["content"] for e in seen["events"][:5]) == "Legacy answer to: hello 你好"
    assert seen["events"][-1]["data"]["executionMode"] == "direct_llm"

    # The runtime path: the proxy's own stream, every event dispatched by the app's reader.
    seen = send(page, "org-a", sessionId=new_session_id(), message="make me a report")
    assert seen["error"] is None, seen
    assert seen["status"] == 200
    assert seen["headers"].get("x-execution-mode") is None, "the page reads only what CORS exposes"
    kinds = [e["event"] if e["event"] != "message" else e["data"]["type"] for e in seen["events"]]
    assert kinds == ["thinking", "text", "file", "done"], seen
    assert seen["events"][1]["data"]["data"]["content"] == "Here is your report."
    done = seen["events"][-1]["data"]
    assert done["executionMode"] == "runtime_orchestrator"
    file = seen["events"][2]["data"]["data"]
    assert file["url"].startswith("/api/v1/runtime/files/f-1?"), file

    # The file, opened as FileDownload.tsx opens it: a plain link, no Authorization; the browser
    # sends the auth_token cookie the login set.
    with page.expect_download(timeout=15_000) as download:
        page.evaluate("([u, f]) => openFile(u, f)", [file["url"], file["filename"]])
    got = Path(download.value.path()).read_bytes()
    assert got == FILE_BYTES
    assert download.value.suggested_filename == "report.txt"
    path, status, headers = server.forwarded[-1]
    assert status == 200 and path == file["url"]
    assert "authorization" not in {k.lower() for k in headers}
    assert "auth_token=" in headers.get("Cookie", headers.get("cookie", ""))


def test_the_web_app_reads_the_status_of_the_proxy_s_own_refusal(make_proxy, files_runtime, web_app):
    proxy = make_proxy(files_runtime, {"limits": {"max_chat_body_bytes": 2048}})
    page, _ = web_app(proxy)
    seen = send(page, "org-a", sessionId=new_session_id(), message="x" * 4000)
    # Without CORS on the 413 the app would see only "Failed to fetch".
    assert seen["status"] == 413, seen
    assert seen["headers"].get("x-execution-mode") is None, "not exposed to the page"
    assert seen["error"] == "Error: chat request body exceeds 2048 bytes", seen


def test_without_cors_on_the_proxy_s_answers_the_browser_blocks_them(make_proxy, files_runtime, web_app):
    """The control: the same page, a proxy told to send no CORS headers. Legacy's answers still
    carry its own; the proxy's do not, and Chromium refuses them to the page."""
    proxy = make_proxy(files_runtime, {"cors": {"origin": False}})
    page, _ = web_app(proxy)
    seen = send(page, "org-a", sessionId=new_session_id(), message="hello")
    assert seen["status"] is None and seen["error"] == "TypeError: Failed to fetch", seen
    seen = send(page, "org-z", sessionId=new_session_id(), message="hello")
    assert seen["error"] is None and seen["events"][-1]["event"] == "done", seen


def test_the_web_app_sees_the_runtime_s_status_at_once_then_legacy_s_rescue(make_proxy, legacy, runtime, web_app):
    """`runtime.pre_content = "stream"` (the default), the bridge on: a planner that shows
    `thinking` at once, works for a second, then fails before any content. The page sees the
    status well before the failure (held, it would see nothing for that second), then legacy's
    answer and legacy's `done` in the same response, and the session holds exactly what legacy
    saved for the chat it served: the question and its answer."""
    agent_id, session_id = "agent-" + uuid.uuid4().hex[:12], new_session_id()
    legacy.seed("org-a", agent={"id": agent_id, "name": "Planner", "systemPrompt": "You plan.", "config": {}})
    legacy.seed("org-a", session={"id": session_id, "agentId": agent_id})
    proxy = make_proxy(runtime, {"bridge": {"enabled": True}})
    page, _ = web_app(proxy)
    message = "scenario:think_pause_error"

    seen = send(page, "org-a", sessionId=session_id, message=message)
    assert seen["error"] is None and seen["status"] == 200, seen
    events = seen["events"]
    kinds = [e["event"] if e["event"] != "message" else e["data"]["type"] for e in events]
    assert kinds == ["thinking"] + ["text"] * 5 + ["done"], seen
    thinking, first_answer, done = events[0], events[1], events[-1]
    assert thinking["data"]["data"]["content"] == "正在分析任务..."
    # The runtime's first byte is its thinking: the page has it within the proxy's overhead
    # (the bridge's lookups and the runtime's connection included), a second before the failure.
    assert thinking["at"] < 500, f"thinking reached the page after {thinking['at']:.0f} ms"
    assert first_answer["at"] >= 900, f"legacy's answer came {first_answer['at']:.0f} ms in: before the failure?"
    answer = "".join(e["data"]["data"]["content"] for e in events[1:-1])
    assert answer == f"Legacy answer to: {message} 你好"
    assert done["data"]["executionMode"] == "direct_llm"

    saved = legacy.messages(session_id, "org-a")
    assert [(m["role"], m["content"]) for m in saved] == [("user", message), ("assistant", answer)], saved
    assert done["data"]["messageId"] == saved[1]["id"]
    # Legacy was asked once, by the proxy, with the caller's own request.
    got = legacy.received_for(f"/api/v1/chat/sessions/{session_id}")
    assert len(got) == 1 and got[0]["body"] == {"message": message}, got

    # The control, held: the page sees nothing for that second, then legacy's stream alone.
    session_id = new_session_id()
    legacy.seed("org-a", session={"id": session_id, "agentId": agent_id})
    held = make_proxy(runtime, {"bridge": {"enabled": True}, "runtime": {"pre_content": "hold"}})
    page, _ = web_app(held)
    seen = send(page, "org-a", sessionId=session_id, message=message)
    assert [e["event"] for e in seen["events"]] == ["message"] * 5 + ["done"], seen
    assert seen["events"][0]["at"] >= 900, seen["events"][0]
