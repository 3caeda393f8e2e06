"""The runtime path: a real sse-starlette runtime's frames become Agent2UI events, inline.

Contract: "Runtime request", "Runtime stream → Agent2UI" (every row), LF-only whole events per
write, and "events reach the client as soon as their frame is complete".
"""

from __future__ import annotations

import re

import pytest

import runtime_app
from e2e_support import DEFAULT_AGENT_ID, SEPS, make_token

ISO_8601 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")

ABSENT_OR_NULL = object()


def assert_data(actual: dict, expected: dict, what: str):
    """Field by field; a None expectation means "null or absent" (the contract allows both)."""
    assert isinstance(actual, dict), f"{what}: data is {actual!r}"
    extra = set(actual) - set(expected)
    assert not extra, f"{what}: unexpected fields {sorted(extra)} in {actual}"
    for key, want in expected.items():
        if want is None:
            assert actual.get(key) is None, f"{what}.{key}: want null/absent, got {actual.get(key)!r}"
        else:
            assert key in actual, f"{what}: missing {key} in {actual}"
            assert actual[key] == want, f"{what}.{key}: want {want!r}, got {actual[key]!r}"


# What the client must receive for runtime_app.TABLE, row by row: (client event, Agent2UI type,
# data, index of the runtime frame it comes from). Written out by hand from the contract table.
KB_ARGS = {"query": "Q3 revenue", "top_k": 5}
EXPECTED = [
    ("message", "plan", {"steps": [
        {"id": "s1", "title": "Search the knowledge base", "status": "pending"},
        {"id": "s2", "title": "Summarise 结果", "status": "pending"},
        {"id": "s3", "title": "Send the report", "status": "pending"},
    ], "currentStep": ""}, 0),
    ("message", "plan_step", {"stepId": "s1", "title": "Search the knowledge base", "status": "running",
                              "tool": "kb_search", "params": KB_ARGS}, 1),
    ("message", "tool_call", {"toolName": "kb_search", "arguments": KB_ARGS, "status": "calling"}, 2),
    ("message", "tool_result", {"toolName": "kb_search", "result": {"hits": [{"doc": "q3.pdf", "score": 0.92}]},
                                "success": True, "error": None, "duration": 412}, 3),
    ("message", "plan_step", {"stepId": "s1", "title": "Search the knowledge base", "status": "completed",
                              "result": {"hits": 1}, "durationMs": 415}, 4),
    ("message", "plan_step", {"stepId": "s2", "title": "Summarise 结果", "status": "running",
                              "tool": None, "params": {}}, 5),
    ("message", "skill_call", {"skillId": "sk-9", "skillName": "summarise", "arguments": {"style": "brief"},
                               "status": "calling"}, 6),
    ("message", "skill_result", {"skillId": "sk-9", "skillName": "summarise", "result": "摘要：收入增长 12%",
                                 "success": True, "error": None, "duration": 1200}, 7),
    ("message", "mcp_call", {"serverId": "mail", "toolName": "send_email", "arguments": {"to": "cfo@example.com"},
                             "status": "calling"}, 8),
    ("message", "mcp_result", {"serverId": "mail", "toolName": "send_email", "result": None, "success": False,
                               "error": "SMTP 550 mailbox unavailable", "duration": 80}, 9),
    ("message", "plan_step", {"stepId": "s3", "title": "Send the report", "status": "failed",
                              "error": "SMTP 550 mailbox unavailable"}, 10),
    ("message", "thinking", {"content": "The mail failed; answer inline instead.", "stage": "reasoning"}, 11),
    ("message", "text", {"content": "Revenue grew 12% "}, 12),
    ("message", "text", {"content": "收入增长百分之十二，详情见附件。"}, 13),
    # 14: text_chunk with empty content → no event at all
    ("heartbeat", None, None, 15),
    ("message", "text", {"content": runtime_app.LONG_CJK}, 16),
    ("done", None, None, 17),
]


def assert_sse_headers(stream, mode: str):
    h = stream.headers
    assert stream.status == 200, stream.raw[:300]
    assert h.get("content-type", "").startswith("text/event-stream"), dict(h)
    assert h.get("x-execution-mode") == mode, dict(h)


@pytest.mark.parametrize("sep", list(SEPS))
def test_contract_table_is_mapped_field_by_field(make_proxy, runtimes, sep):
    rt = runtimes[sep]
    proxy = make_proxy(rt)
    s = proxy.run_chat("org-a", "What was Q3 revenue?", headers={"x-request-id": f"req-{sep}"},
                       body={"message": "What was Q3 revenue?", "parentMessageId": "msg-parent-1"})

    assert_sse_headers(s, "runtime_orchestrator")
    assert s.headers.get("x-execution-reason") == "allowlist"
    assert s.headers.get("cache-control") == "no-cache"
    assert s.headers.get("x-accel-buffering") == "no"
    assert "content-length" not in s.headers
    s.assert_strict()

    # What the runtime was asked.
    received = rt.received_for(s.session_id)
    assert len(received) == 1, received
    body = received[0]["body"]
    assert body["session_id"] == s.session_id
    assert body["org_id"] == "org-a"
    assert body["user_message"] == "What was Q3 revenue?"
    assert body["metadata"]["user_id"] == "user-1"
    assert body["metadata"]["parent_message_id"] == "msg-parent-1"
    assert body["agent_id"] == DEFAULT_AGENT_ID
    assert received[0]["headers"]["content-type"].startswith("application/json")
    assert received[0]["headers"].get("x-request-id") == f"req-{sep}"

    sent = rt.sent(s.session_id)
    assert [f["event"] for f in sent] == [e for e, _ in runtime_app.TABLE]

    got = s.events
    assert [e.event for e in got] == [e for e, *_ in EXPECTED], s.summary()
    ids = set()
    for i, (ev, (event, kind, data, frame)) in enumerate(zip(got, EXPECTED)):
        what = f"event {i} ({event}/{kind} from {runtime_app.TABLE[frame][0]})"
        if event == "message":
            msg = ev.data
            assert set(msg) <= {"id", "type", "data", "timestamp", "metadata"}, f"{what}: {msg}"
            assert msg["type"] == kind, f"{what}: {msg}"
            assert isinstance(msg["id"], str) and msg["id"], f"{what}: {msg}"
            ids.add(msg["id"])
            assert ISO_8601.match(msg["timestamp"]), f"{what}: timestamp {msg['timestamp']!r}"
            assert msg["timestamp"] == sent[frame]["timestamp"], f"{what}: the runtime's timestamp is kept"
            assert_data(msg["data"], data, what)
        elif event == "heartbeat":
            assert ev.data is None, f"{what}: {ev.data!r}"
        elif event == "done":
            done = ev.data
            assert done["sessionId"] == s.session_id
            assert isinstance(done["messageId"], str) and done["messageId"]
            assert done["executionMode"] == "runtime_orchestrator"
            assert set(done) <= {"sessionId", "messageId", "executionMode", "usage"}, done
            # The contract's usage: the runtime's token count (321 in + 45 out) and the latency.
            assert set(done["usage"]) == {"tokens", "latencyMs"}, done
            assert done["usage"]["tokens"] == 366, done
            assert isinstance(done["usage"]["latencyMs"], int) and done["usage"]["latencyMs"] >= 0, done
    assert len(ids) == len(s.messages()), "Agent2UI message ids are unique"


def test_chat_start_route_carries_agent_id_and_a_fresh_session(proxy, runtime):
    s = proxy.run_chat("org-a", route="start", body={"agentId": "agent-42", "message": "你好，开始吧"})
    assert_sse_headers(s, "runtime_orchestrator")
    s.assert_strict()
    done = [e.data for e in s.events if e.event == "done"]
    assert len(done) == 1, s.summary()
    session_id = done[0]["sessionId"]
    assert session_id, done
    received = runtime.received_for(session_id)
    assert len(received) == 1, "the runtime got the session id the client is told about"
    body = received[0]["body"]
    assert body["agent_id"] == "agent-42"
    assert body["user_message"] == "你好，开始吧"
    assert body["org_id"] == "org-a"
    assert body["metadata"]["user_id"] == "user-1"
    assert body["metadata"].get("parent_message_id") is None


@pytest.mark.parametrize("sep", list(SEPS))
def test_first_event_arrives_while_runtime_holds_the_second(make_proxy, runtimes, sep):
    rt = runtimes[sep]
    # Committed at the first event: the thinking is not held for content.
    proxy = make_proxy(rt, {"runtime": {"commit_on": "first_event"}})
    s = proxy.chat("org-a", "scenario:hold")
    try:
        assert_sse_headers(s, "runtime_orchestrator")
        first = s.next_event(timeout=5)
        assert first is not None and first.event == "message", s.summary()
        assert first.data["type"] == "thinking"
        assert first.data["data"]["content"] == "first, before the hold"
        # The runtime has sent exactly one frame and is waiting for us.
        assert [f["event"] for f in rt.sent(s.session_id)] == ["thinking"]
        assert len(s.events) == 1
        rt.release(s.session_id)
        rest = []
        while (ev := s.next_event(timeout=5)) is not None:
            rest.append(ev)
        assert [e.event for e in rest] == ["message", "done"], s.summary()
        assert rest[0].data["data"]["content"] == "second, after the release"
        s.read_to_end(5)
        s.assert_strict()
    finally:
        rt.release(s.session_id)
        s.close()


def test_awkwardly_cut_runtime_bytes_lose_nothing(make_proxy, runtimes):
    """BOM, comments, id/retry fields, multi-line data, a CRLF frame inside another framing, and
    reads cut inside the BOM, a field name, multi-byte characters and between CR and LF."""
    for sep, rt in runtimes.items():
        proxy = make_proxy(rt)
        s = proxy.run_chat("org-a", "scenario:edge")
        assert_sse_headers(s, "runtime_orchestrator")
        s.assert_strict()
        assert s.names() == ["message:text", "message:thinking", "message:text", "done"], (sep, s.summary())
        msgs = s.messages()
        assert msgs[0]["data"] == {"content": "零一二三四五六七八九"}
        assert msgs[1]["data"] == {"content": "pretty printed, multi-line data", "stage": "x"}
        assert msgs[2]["data"] == {"content": "crlf framed 🚀"}


def test_malformed_frames_and_unknown_events_are_dropped_and_counted(proxy):
    s = proxy.run_chat("org-a", "scenario:junk")
    assert_sse_headers(s, "runtime_orchestrator")
    s.assert_strict()
    assert s.names() == ["message:text", "message:text", "done"], s.summary()
    assert [m["data"]["content"] for m in s.messages()] == ["before junk", "after junk"]
    text = proxy.metrics_text()
    dropped = sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                  if line.startswith("chat_sse_dropped_frames_total{"))
    assert dropped >= 2, [line for line in text.splitlines() if "dropped" in line]


def test_slow_stream_with_ping_comments_is_relayed_as_it_goes(proxy):
    s = proxy.run_chat("org-a", "scenario:slow")
    assert_sse_headers(s, "runtime_orchestrator")
    s.assert_strict()
    assert s.names() == ["message:text"] * 4 + ["done"], s.summary()
    # The chunks (sent 0.15 s apart) arrived spread out as they were sent, not all at the end.
    times = [e.at for e in s.events]
    assert times[3] - times[0] > 0.25, times
    assert len({e.read_index for e in s.events}) >= 3


def test_heartbeat_when_the_runtime_is_quiet(make_proxy, runtime):
    proxy = make_proxy(runtime, {"runtime": {"heartbeat_secs": 1}})
    s = proxy.chat("org-a", "scenario:hold")
    try:
        first = s.next_event(timeout=5)
        assert first is not None and first.event == "message"
        beat = s.next_event(timeout=3)
        assert beat is not None and beat.event == "heartbeat" and beat.data is None, s.summary()
        runtime.release(s.session_id)
        s.read_to_end(5)
        assert s.names()[-2:] == ["message:text", "done"], s.summary()
        s.assert_strict()
    finally:
        runtime.release(s.session_id)
        s.close()


def test_authorization_is_never_sent_to_the_runtime(proxy, runtime):
    # The contract: the runtime gets x-request-id and traceparent, never the caller's token.
    token = make_token("org-a", user="user-77")
    s = proxy.run_chat(token=token, message="hi", headers={"x-request-id": "req-77"})
    assert s.headers.get("x-execution-mode") == "runtime_orchestrator"
    received = runtime.received_for(s.session_id)
    assert "authorization" not in received[0]["headers"], received[0]["headers"]
    assert received[0]["headers"].get("x-request-id") == "req-77"
    assert received[0]["headers"].get("traceparent"), received[0]["headers"]
    assert received[0]["body"]["metadata"]["user_id"] == "user-77"


def test_client_disconnect_cancels_the_runtime_stream_and_is_not_an_error(make_proxy, runtime):
    from e2e_support import wait_until
    # Committed at the first event, so the client has part of the answer when it leaves.
    proxy = make_proxy(runtime, {"runtime": {"commit_on": "first_event"}})
    s = proxy.chat("org-a", "scenario:hold")
    try:
        first = s.next_event(timeout=5)
        assert first is not None
    finally:
        s.close()  # the browser tab is closed mid-answer
    try:
        wait_until(lambda: runtime.ending(s.session_id) == "cancelled", 3.0,
                   what="the proxy to close its runtime stream after the client left")
    finally:
        runtime.release(s.session_id)
    data = proxy.admin_get("/runtime/metrics").json()["data"]
    assert data["runtime"]["error"] == 0 and data["runtime"]["timeout"] == 0, data
    assert data["fallbackEnabled"] is False


def test_frame_larger_than_max_frame_bytes_ends_with_an_error(make_proxy, runtime):
    proxy = make_proxy(runtime, {"runtime": {"max_frame_bytes": 4096}})
    s = proxy.run_chat("org-a")  # the table has a ~14 KB text_chunk frame
    s.assert_strict()
    names = s.names()
    assert names[-1] == "error" and names.count("error") == 1, s.summary()
    assert "done" not in names
    assert names[:3] == ["message:plan", "message:plan_step", "message:tool_call"], s.summary()


def test_concurrent_streams_do_not_mix(make_proxy, runtimes):
    from concurrent.futures import ThreadPoolExecutor
    proxy = make_proxy(runtimes["lf"])
    n = 12

    def one(i):
        return proxy.run_chat("org-a", f"question {i}", timeout=20)

    with ThreadPoolExecutor(n) as pool:
        streams = list(pool.map(one, range(n)))
    for s in streams:
        s.assert_strict()
        assert s.events[-1].event == "done" and s.events[-1].data["sessionId"] == s.session_id
        assert len(s.events) == len(EXPECTED), s.summary()
        rec = runtimes["lf"].received_for(s.session_id)
        assert len(rec) == 1
    message_ids = {s.events[-1].data["messageId"] for s in streams}
    assert len(message_ids) == n


def test_chunked_request_body_reaches_the_runtime(proxy, runtime):
    import json as _json
    from e2e_support import new_session_id
    session_id = new_session_id()
    payload = _json.dumps({"message": "sent in pieces 分块", "parentMessageId": "p-9"}).encode()

    def pieces():
        for i in range(0, len(payload), 7):
            yield payload[i:i + 7]

    r = proxy.client.post(proxy.base + f"/api/v1/chat/sessions/{session_id}", content=pieces(),
                          headers={"authorization": f"Bearer {make_token('org-a')}",
                                   "content-type": "application/json"})
    assert r.status_code == 200 and r.headers["x-execution-mode"] == "runtime_orchestrator", r.text[:300]
    assert "event: done" in r.text
    body = runtime.received_for(session_id)[0]["body"]
    assert body["user_message"] == "sent in pieces 分块"
    assert body["metadata"]["parent_message_id"] == "p-9"


def test_runtime_closing_idle_keepalive_connections_is_harmless(make_runtime, make_proxy):
    """uvicorn closes idle keep-alive connections (here after 1 s); a proxy that kept such a
    connection pooled longer must not fail the next request over it (nor fail over to legacy)."""
    import time
    rt = make_runtime("crlf", ["--timeout-keep-alive", "1"])
    proxy = make_proxy(rt, {"runtime": {"pool_idle_timeout_ms": 60000, "health_interval_ms": 60000}})
    for i in range(2):
        if i:
            time.sleep(1.3)  # past uvicorn's keep-alive: the pooled connection is closed
        s = proxy.run_chat("org-a", f"round {i}")
        assert (s.headers["x-execution-mode"], s.headers["x-execution-reason"]) == \
            ("runtime_orchestrator", "allowlist"), f"round {i}: {dict(s.headers)}"
        assert s.names()[-1] == "done", s.summary()
