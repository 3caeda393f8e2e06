"""The legacy stand-in behaves like the product's Express stack where the proxy meets it: `cors`
on every answer, `compression()` whenever the client accepts it, and a per-IP limit that takes the
client's address from X-Forwarded-For only as the trusted hop (the proxy) appended it."""

from __future__ import annotations


import httpx
import pytest

from e2e_support import Legacy, Proxy, make_token, new_session_id
from legacy_stream import legacy_stream


@pytest.fixture
def limited_legacy(tmp_path):
    app = Legacy(tmp_path, name="legacy-limited", env={"RATE_LIMIT_PER_MINUTE": "3",
                                                      "CORS_ORIGIN": "http://app.example"})
    app.wait_ready()
    yield app
    app.proc.stop()


def test_the_per_ip_limit_keys_on_the_address_the_trusted_hop_appended(limited_legacy):
    def get(xff: str) -> httpx.Response:
        return httpx.get(f"{limited_legacy.base}/api/v1/agents", headers={"x-forwarded-for": xff}, timeout=5)

    assert [get("203.0.113.1").status_code for _ in range(3)] == [200, 200, 200]
    refused = get("203.0.113.1")
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    # CORS is applied before the limit, as in the product: a browser can read the 429.
    assert refused.headers["access-control-allow-origin"] == "http://app.example"
    assert refused.headers["vary"].startswith("Origin")
    assert "limit=3" in refused.headers["ratelimit"]
    # Another user behind the same sidecar has a budget of their own.
    assert get("203.0.113.2").status_code == 200
    # A client cannot buy a fresh budget with a forged entry: only the hop's own counts.
    assert get("198.51.100.7, 203.0.113.1").status_code == 429
    keys = [r["key"] for r in limited_legacy.get("/control/limited")]
    assert keys == ["203.0.113.1"] * 4 + ["203.0.113.2", "203.0.113.1"]


def test_a_chat_answer_is_compressed_whole_when_the_client_accepts_it(legacy):
    session = new_session_id()
    with httpx.Client(timeout=10) as client:
        r = client.post(f"{legacy.base}/api/v1/chat/sessions/{session}", json={"message": "hi"},
                        headers={"authorization": f"Bearer {make_token('org-z')}", "accept-encoding": "gzip"})
        assert r.headers["content-encoding"] == "gzip"
        assert r.headers["vary"] == "Accept-Encoding"
        assert r.headers["access-control-expose-headers"] == \
            "X-RateLimit-Limit,X-RateLimit-Remaining,X-RateLimit-Reset"
        assert r.content == legacy_stream(session, "hi"), "httpx decodes it"
        plain = client.post(f"{legacy.base}/api/v1/chat/sessions/{session}", json={"message": "hi"},
                            headers={"accept-encoding": "identity"})
        assert "content-encoding" not in plain.headers
        assert plain.content == legacy_stream(session, "hi")


# Loopback is a whole /8: each client binds its own source address, as users behind the sidecar
# come from their own.
USER_A, USER_B, USER_C = "127.0.0.2", "127.0.0.3", "127.0.0.4"


def from_address(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10)


@pytest.fixture
def proxy_to_limited(tmp_path, limited_legacy, runtime):
    (tmp_path / "proxy").mkdir()
    proxy = Proxy(tmp_path / "proxy", limited_legacy, runtime.address,
                  {"bridge": {"enabled": True, "timeout_ms": 2000}})
    yield proxy
    assert proxy.close() == []


def test_users_behind_the_proxy_keep_their_own_rate_limit_budgets(proxy_to_limited, limited_legacy):
    proxy = proxy_to_limited
    with from_address(USER_A) as a, from_address(USER_B) as b:
        # A client's own X-Forwarded-For is not believed: it does not come from a trusted hop.
        forged = {"x-forwarded-for": "203.0.113.9"}
        statuses = [a.get(f"{proxy.base}/api/v1/agents", headers=forged).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        assert b.get(f"{proxy.base}/api/v1/agents").status_code == 200
    keys = [r["key"] for r in limited_legacy.get("/control/limited")]
    assert keys == [USER_A] * 4 + [USER_B]


def test_a_runtime_chat_s_legacy_calls_count_against_its_own_user(proxy_to_limited, limited_legacy):
    # Three calls a minute: a runtime chat's lookups and saves (history, session, agent, two
    # saves) would exhaust it at once if legacy saw only the sidecar; they count for the user who
    # chatted, and another user is untouched.
    proxy = proxy_to_limited
    agent_id, session_id = "agent-" + new_session_id(), new_session_id()
    limited_legacy._post_json("/control/seed", {"org": "org-a", "agent": {"id": agent_id, "name": "A"}})
    limited_legacy._post_json("/control/seed", {"org": "org-a", "session": {"id": session_id, "agentId": agent_id}})
    with from_address(USER_C) as c, from_address(USER_B) as b:
        token = make_token("org-a")
        r = c.post(f"{proxy.base}/api/v1/chat/sessions/{session_id}", json={"message": "hi"},
                   headers={"authorization": f"Bearer {token}"})
        assert r.headers["x-execution-mode"] == "runtime_orchestrator", r.headers
        assert b"event: done" in r.content
        assert b.get(f"{proxy.base}/api/v1/agents").status_code == 200
    limited = limited_legacy.get("/control/limited")
    calls = [r["key"] for r in limited]
    assert len(calls) >= 4, calls
    assert set(calls) == {USER_C, USER_B}
    # The chat's own calls spent its user's budget (its saves are refused and retried in the
    # background); the other user's request was still served.
    assert any(r["refused"] for r in limited if r["key"] == USER_C), limited
    assert [r["refused"] for r in limited if r["key"] == USER_B] == [False]
