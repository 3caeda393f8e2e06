"""The shadow scorecard against the FastAPI + sse-starlette stand-ins: copies of `rollout.shadow_orgs`
chats compared with the legacy answer the client got, read on GET /runtime/shadow/{orgId}."""

from __future__ import annotations

from e2e_support import wait_until
from legacy_stream import legacy_stream

S_KEYS = {"orgId", "samples", "agreement", "verdict", "reasons", "samplesNeeded", "legacy", "runtime"}
LEGACY_KEYS = {"success", "error", "ttfeMsP50", "durationMsP50", "textCharsP50"}
RUNTIME_KEYS = LEGACY_KEYS | {"timeout"}


def scorecard(proxy, org: str, samples: int) -> dict:
    def read():
        r = proxy.admin_get(f"/runtime/shadow/{org}")
        return r.status_code == 200 and r.json()["data"]["samples"] >= samples and r.json()["data"]
    return wait_until(read, 10.0, what=f"{samples} shadow comparisons of {org}")


def test_shadow_orgs_are_scored_against_what_legacy_answered(make_proxy):
    proxy = make_proxy(overrides={
        "rollout": {"shadow_orgs": ["org-s", "org-f"]},
        # The stand-in runtime's first event may well be slower than the stand-in legacy's on a
        # loaded machine; the ratio is not this test's subject.
        # Five clean comparisons bound the runtime's error rate below 0.36 (one-sided 95 %), five
        # failed ones above 0.5: with this delta both orgs are decided on five.
        "shadow": {"ready_min_samples": 5, "ready_max_ttfe_ratio": 1000.0, "ready_max_error_rate_delta": 0.4},
    })
    r = proxy.admin_get("/runtime/shadow/org-s")
    assert r.status_code == 404 and r.json()["success"] is False

    for _ in range(5):
        s = proxy.run_chat("org-s", "hello")
        assert s.headers["x-execution-mode"] == "direct_llm"
        assert s.raw == legacy_stream(s.session_id, "hello"), "the shadowed client got legacy's bytes exactly"
        f = proxy.run_chat("org-f", "scenario:error")
        assert f.raw == legacy_stream(f.session_id, "scenario:error")

    ok = scorecard(proxy, "org-s", 5)
    assert set(ok) == S_KEYS and set(ok["legacy"]) == LEGACY_KEYS and set(ok["runtime"]) == RUNTIME_KEYS, ok
    assert ok["verdict"] == "ready" and ok["reasons"] == [], ok
    assert ok["agreement"] == 1.0
    assert ok["legacy"]["success"] == 5 and ok["runtime"]["success"] == 5, ok
    # "Legacy answer to: hello 你好", in characters.
    assert ok["legacy"]["textCharsP50"] == 26, ok
    assert ok["runtime"]["textCharsP50"] > 0 and ok["runtime"]["ttfeMsP50"] > 0, ok

    bad = scorecard(proxy, "org-f", 5)
    assert bad["verdict"] == "not_ready", bad
    assert any(r.startswith("runtime error rate 1.00 > legacy 0.00 + 0.40 (95 % bound") for r in bad["reasons"]), bad
    assert bad["runtime"]["error"] == 5 and bad["legacy"]["success"] == 5 and bad["agreement"] == 0.0, bad

    listed = proxy.admin_get("/runtime/shadow").json()["data"]["orgs"]
    assert [o["orgId"] for o in listed] == ["org-f", "org-s"], listed
    text = proxy.metrics_text()
    assert 'cutover_shadow_comparisons_total{org="org-s",result="both_ok"} 5' in text
    assert 'cutover_shadow_comparisons_total{org="org-f",result="runtime_failed"} 5' in text
