"""Mode decision and the legacy path: contract "Routes", "Identity", "Mode decision" and failover."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from e2e_support import make_token, metric_value, new_session_id, wait_until
from legacy_stream import legacy_stream


def assert_legacy_untouched(s, legacy, message: str, reason: str):
    assert s.status == 200
    assert s.headers.get("x-execution-mode") == "direct_llm", dict(s.headers)
    assert s.headers.get("x-execution-reason") == reason, dict(s.headers)
    assert s.headers.get("x-legacy") == "1", "legacy's own headers pass through"
    assert s.raw == legacy_stream(s.session_id, message), "legacy's stream reaches the client byte for byte"
    s.assert_strict()
    got = legacy.received_for(f"/api/v1/chat/sessions/{s.session_id}")
    assert len(got) == 1 and got[0]["body"] == {"message": message}, got


def test_other_org_gets_the_legacy_stream_untouched(proxy, legacy, runtime):
    s = proxy.run_chat("org-b", "legacy please")
    assert_legacy_untouched(s, legacy, "legacy please", "default")
    assert runtime.received_for(s.session_id) == [], "the runtime never saw it"
    assert s.names() == ["message:text"] * 5 + ["done"]


@pytest.mark.parametrize("case", ["no_token", "bad_signature", "expired", "no_org_claim", "x_org_id_header"])
def test_unverified_callers_go_to_legacy(proxy, legacy, runtime, case):
    headers, token = {}, None
    if case == "bad_signature":
        token = make_token("org-a", secret="not-the-proxy-secret-0123456789abcdef")
    elif case == "expired":
        token = make_token("org-a", exp_in=-3600)
    elif case == "no_org_claim":
        token = make_token(None)
    elif case == "x_org_id_header":
        headers = {"x-org-id": "org-a"}  # not trusted: no trusted_org_header in the config
    org = None
    s = proxy.run_chat(org, "who am i", token=token, headers=headers)
    assert_legacy_untouched(s, legacy, "who am i", "no_identity")
    assert runtime.received_for(s.session_id) == []
    if case == "no_token":
        forwarded = legacy.received_for(f"/api/v1/chat/sessions/{s.session_id}")[0]["headers"]
        assert "authorization" not in forwarded


def test_non_chat_requests_pass_through_untouched(proxy):
    c = proxy.client
    r = c.get(proxy.base + "/api/v1/agents?page=2&q=%E4%BD%A0", headers={"x-custom": "kept",
                                                                       "authorization": "Bearer opaque"})
    assert r.status_code == 200 and r.headers.get("x-legacy") == "1"
    echo = r.json()
    assert echo["method"] == "GET" and echo["path"] == "/api/v1/agents"
    assert echo["query"] == "page=2&q=%E4%BD%A0"
    assert echo["headers"]["x-custom"] == "kept" and echo["headers"]["authorization"] == "Bearer opaque"
    assert "x-execution-mode" not in r.headers, "only chat responses carry the mode"

    big = os.urandom(3 * 1024 * 1024)
    r = c.put(proxy.base + "/api/v1/files/upload", content=big, headers={"x-echo-status": "201"})
    assert r.status_code == 201
    assert r.json()["body_len"] == len(big)
    assert r.json()["body_sha256"] == hashlib.sha256(big).hexdigest()

    # GET on a chat path is not a chat route either.
    r = c.get(proxy.base + f"/api/v1/chat/sessions/{new_session_id()}")
    assert r.status_code == 200 and r.json()["method"] == "GET"

    r = c.delete(proxy.base + "/api/v1/sessions/abc", headers={"x-echo-status": "404"})
    assert r.status_code == 404 and r.json()["method"] == "DELETE"


def test_denylist_and_default_mode(make_proxy, legacy, runtime):
    proxy = make_proxy(overrides={"rollout": {"default_mode": "runtime_orchestrator", "runtime_orgs": ["org-a"],
                                              "direct_orgs": ["org-x"]}})
    assert proxy.mode_of("org-zz") == ("runtime_orchestrator", "default")
    assert proxy.mode_of("org-a") == ("runtime_orchestrator", "allowlist")
    assert proxy.mode_of("org-x") == ("direct_llm", "denylist")
    assert proxy.mode_of(None) == ("direct_llm", "no_identity")


def test_runtime_refusing_connections_fails_over_to_legacy(make_proxy, legacy):
    from e2e_support import free_port
    dead = f"127.0.0.1:{free_port()}"
    # Health checks against the dead runtime must not open the breaker during this test.
    proxy = make_proxy(dead, {"runtime": {"health_failures": 1000}})
    s = proxy.run_chat("org-a", "fail me over")
    assert_legacy_untouched(s, legacy, "fail me over", "failover")


def test_runtime_answering_500_fails_over_to_legacy(proxy, legacy, runtime):
    s = proxy.run_chat("org-a", "scenario:http500")
    assert_legacy_untouched(s, legacy, "scenario:http500", "failover")
    assert len(runtime.received_for(s.session_id)) == 1, "the runtime was tried first"


@pytest.mark.parametrize("pre_content", ["hold", "stream"])
def test_runtime_failing_before_its_first_content_fails_over_to_legacy(make_proxy, legacy, runtime, pre_content):
    """Two thinking events, then execution_error. Held (`pre_content = "hold"`), nothing reached
    the user: legacy serves the chat with its original body, with no error event. Streamed, the
    user saw the thinking at once, and legacy's own stream continues the same response, byte for
    byte after the status."""
    proxy = make_proxy(runtime, {"runtime": {"pre_content": pre_content}})
    message = "scenario:think_then_error"
    s = proxy.run_chat("org-a", message)
    if pre_content == "hold":
        assert_legacy_untouched(s, legacy, message, "failover")
    else:
        assert s.status == 200
        assert s.headers.get("x-execution-mode") == "runtime_orchestrator", dict(s.headers)
        assert s.headers.get("x-execution-reason") == "allowlist"
        answer = legacy_stream(s.session_id, message)
        assert s.raw.endswith(answer), s.summary()
        status = s.raw[: len(s.raw) - len(answer)]
        assert status.count(b"event: message\n") == 2 and b'"type":"thinking"' in status, status
        s.assert_strict()
        got = legacy.received_for(f"/api/v1/chat/sessions/{s.session_id}")
        assert len(got) == 1 and got[0]["body"] == {"message": message}, got
        assert "accept-encoding" not in got[0]["headers"], got[0]["headers"]
    assert [f["event"] for f in runtime.sent(s.session_id)] == ["thinking", "thinking", "execution_error"]
    m = proxy.admin_get("/runtime/metrics").json()["data"]
    assert (m["runtime"]["total"], m["runtime"]["error"]) == (1, 1), m
    text = proxy.metrics_text()
    stage = "before_commit" if pre_content == "hold" else "in_stream"
    assert metric_value(text, "cutover_runtime_failovers_total", stage=stage) == 1.0


def test_shadow_copy_never_delays_the_legacy_answer(make_proxy, legacy, runtime):
    """rollout.shadow_percent = 100: org-b is answered by legacy, untouched and at once, while a
    copy of its request runs on the runtime in the background (held there until released)."""
    import time

    proxy = make_proxy(runtime, {"rollout": {"shadow_percent": 100}})
    t0 = time.monotonic()
    s = proxy.run_chat("org-b", "scenario:hold", timeout=5)
    elapsed = time.monotonic() - t0
    try:
        assert_legacy_untouched(s, legacy, "scenario:hold", "default")
        assert elapsed < 2.0, f"the client waited {elapsed:.2f}s"
        shadow = wait_until(lambda: runtime.received_for(s.session_id), 3.0, what="the shadow copy")
        assert shadow[0]["body"]["org_id"] == "org-b"
        assert shadow[0]["body"]["user_message"] == "scenario:hold"
        assert runtime.ending(s.session_id) is None, "the shadow is still held by the runtime"
    finally:
        runtime.release(s.session_id)
    wait_until(lambda: proxy.metric("chat_shadow_total", outcome="success") == 1, 3.0,
               what="the shadow outcome to be recorded")
    data = proxy.admin_get("/runtime/metrics").json()["data"]
    assert data["runtime"]["total"] == 0, "shadow executions are not runtime traffic"
    assert data["fallbackEnabled"] is False


def test_legacy_chat_stream_is_not_buffered(proxy, legacy):
    s = proxy.chat("org-b", "legacy:hold")
    try:
        assert s.headers.get("x-execution-mode") == "direct_llm"
        first = s.next_event(timeout=5)
        assert first is not None and first.data["data"]["content"] == "Legacy"
        assert len(s.events) == 1
        legacy.post(f"/control/release/{s.session_id}")
        s.read_to_end(5)
        assert s.raw == legacy_stream(s.session_id, "legacy:hold")
        s.assert_strict()
    finally:
        legacy.post(f"/control/release/{s.session_id}")
        s.close()


def test_trusted_org_header_is_used_and_never_forwarded(make_proxy, legacy, runtime):
    """identity.trusted_org_header: the header an ingress sets picks the org; legacy never sees
    any copy of it (the proxy cannot tell the ingress's copy from a client's)."""
    proxy = make_proxy(runtime, {"identity": {"trusted_org_header": "x-org-id"}})
    s = proxy.run_chat(None, "via ingress", headers={"x-org-id": "org-a"})
    assert s.headers["x-execution-mode"] == "runtime_orchestrator", dict(s.headers)
    assert runtime.received_for(s.session_id)[0]["body"]["org_id"] == "org-a"

    s = proxy.run_chat(None, "via ingress", headers={"x-org-id": "org-b"})
    assert s.headers["x-execution-mode"] == "direct_llm"
    got = legacy.received_for(f"/api/v1/chat/sessions/{s.session_id}")[0]["headers"]
    assert "x-org-id" not in got, got

    echo = proxy.client.get(proxy.base + "/api/v1/agents", headers={"x-org-id": "org-a"}).json()
    assert "x-org-id" not in echo["headers"], echo["headers"]


def test_the_access_log_line_carries_the_request_id_and_first_event(proxy, runtime):
    """One JSON line per chat on stdout, joined to the client's own logs by its x-request-id;
    without one, by the id the proxy made for the runtime's request."""
    def access_line(session_id):
        path = f"/api/v1/chat/sessions/{session_id}"
        for line in proxy.proc.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"target":"access"' in line:
                rec = json.loads(line)
                if rec.get("path") == path:
                    return rec
        return None

    s = proxy.run_chat("org-a", headers={"x-request-id": "e2e-req-42"})
    assert s.names()[-1] == "done", s.summary()
    rec = wait_until(lambda: access_line(s.session_id), 5, what="the chat's access log line")
    assert rec["request_id"] == "e2e-req-42", rec
    assert rec["mode"] == "runtime_orchestrator" and rec["status"] == 200, rec
    assert isinstance(rec["first_event_ms"], int) and rec["events"] >= 2, rec

    s = proxy.run_chat("org-a")
    assert s.names()[-1] == "done", s.summary()
    rec = wait_until(lambda: access_line(s.session_id), 5, what="the chat's access log line")
    sent = [r["headers"].get("x-request-id") for r in runtime.received_for(s.session_id)]
    assert rec["request_id"] and sent == [rec["request_id"]], (rec, sent)
