"""The conversation bridge, end to end: the legacy stand-in holds sessions, agents and messages
behind the source product's routes, and the proxy reads and saves them around a runtime chat.

The suite's default config has the bridge off (see e2e_support.py); every test here turns it on.
Ids are fresh per test, so the session-wide legacy stand-in never mixes two tests' data.
"""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

import runtime_app
from e2e_support import make_token, new_session_id, wait_until
from legacy_stream import legacy_stream

BRIDGE_ON = {"bridge": {"enabled": True, "history_limit": 3, "timeout_ms": 400}}
AGENT_CONFIG = {"model": "gpt-4o-mini", "temperature": 0.2, "maxTokens": 1024}
FINAL = dict(runtime_app.TABLE)["execution_complete"]["final_response"]


def new_agent_id() -> str:
    return "agent-" + uuid.uuid4().hex[:12]


def seed_conversation(legacy, org: str = "org-a", agent_org: str | None = None,
                      messages: list[dict] | None = None) -> tuple[str, str]:
    """An agent and a session of `org` using it (the agent may belong to `agent_org`)."""
    agent_id, session_id = new_agent_id(), new_session_id()
    legacy.seed(agent_org or org, agent={"id": agent_id, "name": "Analyst",
                                         "systemPrompt": "You answer finance questions.",
                                         "config": AGENT_CONFIG})
    legacy.seed(org, session={"id": session_id, "agentId": agent_id}, messages=messages)
    return agent_id, session_id


def roles_and_contents(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


def done_of(s) -> dict:
    done = [e.data for e in s.events if e.event == "done"]
    assert len(done) == 1, s.summary()
    return done[0]


def runtime_metrics(proxy) -> dict:
    return proxy.admin_get("/runtime/metrics").json()["data"]["runtime"]


def test_session_chat_reads_agent_and_history_and_saves_both_messages(make_proxy, legacy, runtime):
    earlier = [{"role": "user", "content": "Hi, I need Q3 numbers."},
               {"role": "assistant", "content": "Sure, which region?"}]
    agent_id, session_id = seed_conversation(legacy, messages=earlier)
    proxy = make_proxy(overrides=BRIDGE_ON)
    token = make_token("org-a")

    s = proxy.run_chat(token=token, session_id=session_id, headers={"x-request-id": "req-bridge-1"},
                       body={"message": "What was Q3 revenue?", "parentMessageId": "msg-parent-1"})
    assert s.headers.get("x-execution-mode") == "runtime_orchestrator", s.headers
    assert s.headers.get("x-execution-reason") == "allowlist"
    s.assert_strict()
    assert s.names()[-1] == "done", s.summary()

    # The runtime got the session's agent, its config and the history, never the caller's token.
    received = runtime.received_for(session_id)
    assert len(received) == 1, received
    body = received[0]["body"]
    assert body["agent_id"] == agent_id
    assert body["agent_config"] == {"system_prompt": "You answer finance questions.", "model": "gpt-4o-mini",
                                    "temperature": 0.2, "max_tokens": 1024}, body
    # The conversation as the runtime takes it: the saved messages, then the question itself.
    assert [(m["role"], m["content"]) for m in body["history_messages"]] == roles_and_contents(earlier) + [
        ("user", "What was Q3 revenue?")]
    assert body["user_message"] == "What was Q3 revenue?"
    assert body["metadata"]["parent_message_id"] == "msg-parent-1"
    assert "authorization" not in received[0]["headers"]

    # Every bridge call (before the test's own reads below) carried the caller's own token and request id, and said what it is.
    calls = legacy.bridge_calls(id_=session_id)
    assert {c["route"] for c in calls} >= {"get_session", "get_messages", "post_message"}, calls
    for c in calls:
        assert c["headers"].get("authorization") == f"Bearer {token}", c
        assert c["headers"].get("x-cutover-bridge") == "1", c
        assert c["headers"].get("x-request-id") == "req-bridge-1", c

    # Legacy now lists both messages after the earlier ones; done names the saved answer.
    stored = legacy.messages(session_id, "org-a")
    assert roles_and_contents(stored) == roles_and_contents(earlier) + [
        ("user", "What was Q3 revenue?"), ("assistant", FINAL)]
    user, assistant = stored[-2], stored[-1]
    assert user["parentId"] == "msg-parent-1"
    assert assistant["metadata"]["executionMode"] == "runtime_orchestrator"
    assert isinstance(assistant["metadata"]["latencyMs"], int), assistant
    done = done_of(s)
    assert done["messageId"] == assistant["id"], (done, assistant)
    assert done["sessionId"] == session_id
    assert set(done["usage"]) == {"tokens", "latencyMs"}, done

    assert legacy.received_for(f"/api/v1/chat/sessions/{session_id}") == [], "legacy's chat route was not used"

    # The next chat's conversation: the last history_limit − 1 = 2 saved messages, then its question.
    s2 = proxy.run_chat(token=token, session_id=session_id,
                        body={"message": "And Q4?", "parentMessageId": assistant["id"]})
    assert s2.names()[-1] == "done", s2.summary()
    body2 = runtime.received_for(session_id)[1]["body"]
    assert [(m["role"], m["content"]) for m in body2["history_messages"]] == [
        ("user", "What was Q3 revenue?"), ("assistant", FINAL), ("user", "And Q4?")]
    assert roles_and_contents(legacy.messages(session_id, "org-a"))[-2:] == [("user", "And Q4?"),
                                                                           ("assistant", FINAL)]


def test_each_turn_s_own_question_reaches_the_runtime(make_proxy, legacy, runtime):
    # The runtime stand-in reads the conversation as the real one does and answers with the
    # question it understood: a conversation that ended with the previous answer would be
    # answered with the previous question.
    _, session_id = seed_conversation(legacy)
    proxy = make_proxy(overrides=BRIDGE_ON)
    token = make_token("org-a")
    for turn in ("scenario:echo turn one", "scenario:echo turn two", "scenario:echo turn three"):
        s = proxy.run_chat(token=token, session_id=session_id, body={"message": turn})
        assert s.headers.get("x-execution-mode") == "runtime_orchestrator", s.headers
        texts = [e.data["data"]["content"] for e in s.events
                 if e.event == "message" and e.data.get("type") == "text"]
        assert "".join(texts) == f"You asked: {turn}", s.summary()
        assert roles_and_contents(legacy.messages(session_id, "org-a"))[-2:] == [
            ("user", turn), ("assistant", f"You asked: {turn}")]


def test_chat_start_creates_the_session_first(make_proxy, legacy, runtime):
    agent_id = new_agent_id()
    legacy.seed("org-a", agent={"id": agent_id, "name": "数据助手", "systemPrompt": "", "config": {}})
    proxy = make_proxy(overrides=BRIDGE_ON)
    message = "请帮我总结一下第三季度的收入情况，并且列出增长最快的三个地区，以及每个地区的主要驱动因素和风险。"

    s = proxy.run_chat("org-a", route="start", body={"agentId": agent_id, "message": message})
    assert s.headers.get("x-execution-mode") == "runtime_orchestrator", s.headers
    s.assert_strict()
    session_id = done_of(s)["sessionId"]

    stored = legacy.stored_session(session_id)
    assert stored is not None and stored["orgId"] == "org-a" and stored["agentId"] == agent_id, stored
    assert stored["title"] == message[:50], "the title is the message's first 50 characters"
    body = runtime.received_for(session_id)[0]["body"]
    assert body["agent_id"] == agent_id
    assert body["history_messages"] == [{"role": "user", "content": message}], "a new session: the question alone"
    assert body["agent_config"]["system_prompt"] == "你是 数据助手，一个有帮助的 AI 助手。"
    assert body["agent_config"]["temperature"] == 0.7 and body["agent_config"]["max_tokens"] == 4096
    assert roles_and_contents(legacy.messages(session_id, "org-a")) == [("user", message), ("assistant", FINAL)]
    assert all(r["body"].get("agentId") != agent_id for r in legacy.received_for("/api/v1/chat/start"))


def test_chat_start_that_fails_over_deletes_the_session_it_created(make_proxy, legacy, runtime):
    agent_id = new_agent_id()
    legacy.seed("org-a", agent={"id": agent_id, "name": "Analyst", "systemPrompt": "p", "config": AGENT_CONFIG})
    proxy = make_proxy(overrides=BRIDGE_ON)
    original = {"agentId": agent_id, "message": "scenario:http500"}

    s = proxy.run_chat("org-a", route="start", body=original)
    assert s.headers.get("x-execution-mode") == "direct_llm", s.headers
    assert s.headers.get("x-execution-reason") == "failover"
    assert s.raw == legacy_stream("legacy-new-session", "scenario:http500")

    created = legacy.bridge_calls("create_session", agent_id)
    assert len(created) == 1, created
    session_id = created[0]["created"]
    assert runtime.received_for(session_id), "the runtime was asked about the created session"
    deleted = legacy.bridge_calls("delete_session", session_id)
    assert len(deleted) == 1, deleted
    assert legacy.stored_session(session_id) is None, "the user's list holds no empty session"
    forwarded = [r for r in legacy.received_for("/api/v1/chat/start") if r["body"] == original]
    assert len(forwarded) == 1, "legacy got the original /chat/start"
    assert deleted[0]["seq"] < forwarded[0]["seq"], "deleted before legacy got the chat"


@pytest.mark.parametrize("whose", ["session", "agent"])
def test_another_orgs_session_or_agent_goes_to_legacy_as_refused(make_proxy, legacy, runtime, whose):
    if whose == "session":
        _, session_id = seed_conversation(legacy, org="org-b")
    else:
        _, session_id = seed_conversation(legacy, org="org-a", agent_org="org-b")
    proxy = make_proxy(overrides=BRIDGE_ON)
    body = {"message": "peek", "parentMessageId": "p-1"}

    s = proxy.run_chat("org-a", session_id=session_id, body=body)
    assert s.headers.get("x-execution-mode") == "direct_llm", s.headers
    assert s.headers.get("x-execution-reason") == "bridge_refused"
    assert s.raw == legacy_stream(session_id, "peek"), "the client gets exactly what legacy answers"
    assert runtime.received_for(session_id) == [], "the runtime never saw it"
    got = legacy.received_for(f"/api/v1/chat/sessions/{session_id}")
    assert len(got) == 1 and got[0]["body"] == body, "legacy got the original body"
    assert legacy.bridge_calls("post_message", session_id) == [], "nothing was saved"
    rt = runtime_metrics(proxy)
    assert rt["total"] == 0 and rt["error"] == 0, "not the runtime's fault"


FAILURES = [
    ("get_session", {"status": 503}, "session"),
    ("get_messages", {"status": 500}, "messages"),
    ("get_agent", {"hang": True}, "agent"),
]


@pytest.mark.parametrize("route,fault,metric_route", FAILURES, ids=[f[0] for f in FAILURES])
def test_failing_legacy_routes_go_to_legacy_as_unavailable(make_proxy, legacy, runtime, route, fault,
                                                            metric_route):
    agent_id, session_id = seed_conversation(legacy)
    legacy.fault(route, agent_id if route == "get_agent" else session_id, **fault)
    proxy = make_proxy(overrides=BRIDGE_ON)

    started = time.monotonic()
    s = proxy.run_chat("org-a", "are you there?", session_id=session_id)
    elapsed = time.monotonic() - started
    assert s.headers.get("x-execution-mode") == "direct_llm", s.headers
    assert s.headers.get("x-execution-reason") == "bridge_unavailable"
    assert s.raw == legacy_stream(session_id, "are you there?")
    assert runtime.received_for(session_id) == []
    assert elapsed < 3.0, f"a hung lookup is bounded by bridge.timeout_ms (took {elapsed:.2f}s)"
    assert legacy.bridge_calls("post_message", session_id) == []
    rt = runtime_metrics(proxy)
    assert rt["total"] == 0 and rt["error"] == 0, "not the runtime's fault"
    wait_until(lambda: (proxy.metric("cutover_bridge_requests_total", route=metric_route,
                                     result="unavailable") or 0) >= 1, 3.0,
               what=f"the {metric_route} lookup counted as unavailable")


def test_without_the_bridge_or_an_agent_id_legacy_answers(make_proxy, legacy, runtime):
    # The real runtime refuses a request without agent_id (422), so the proxy does not ask it.
    r = httpx.post(runtime.base + "/api/v1/execute/stream", json={"session_id": "x", "user_message": "hi"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "agent_id"], r.text

    proxy = make_proxy(overrides={"runtime": {"default_agent_id": ""}})
    s = proxy.run_chat("org-a", "hello")
    assert s.headers.get("x-execution-mode") == "direct_llm", s.headers
    assert s.headers.get("x-execution-reason") == "no_agent"
    assert s.raw == legacy_stream(s.session_id, "hello")
    assert runtime.received_for(s.session_id) == []
