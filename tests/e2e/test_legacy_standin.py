"""The legacy stand-in behaves like the product's Express stack where the proxy meets it: `cors`
on every answer, `compression()` whenever the client accepts it, and a per-IP limit that takes the
client's address from X-Forwarded-For only as the trusted hop (the proxy) appended it."""

from __future__ import annotations


import httpx
import pytest

from e2e_support import Legacy, make_token, new_session_id
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
