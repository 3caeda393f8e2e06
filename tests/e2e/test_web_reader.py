"""The web app's own reader (apps/web/hooks/useChat.ts): every network read is split on LF with its
state reset, so an event that spans two reads is lost. `ChatStream` reads the proxy's response
exactly that way and records every such loss as a violation."""

from __future__ import annotations

import json


def test_a_700_kb_tool_result_and_the_events_after_it_all_reach_the_web_app(proxy, runtime):
    s = proxy.run_chat("org-a", "scenario:big_tool_result", timeout=20)
    sent = runtime.sent(s.session_id)
    big = next(f for f in sent if f["event"] == "tool_call_complete")
    assert len(json.dumps(big)) > 700_000, "the runtime sent a ~700 KB frame"

    s.assert_strict()  # no event was cut between reads, no CR, one line of JSON per event
    assert s.names() == [
        "message:tool_call", "message:tool_result", "message:plan_step", "message:text", "done",
    ], s.summary()
    result = s.messages()[1]["data"]
    assert result["truncated"] is True
    assert result["toolName"] == "code_executor" and result["success"] is True
    assert isinstance(result["result"], str) and result["result"].endswith("…")
    assert result["result"].startswith('{"stdout": "line of output')
    step = s.messages()[2]["data"]
    assert (step["stepId"], step["status"]) == ("s2", "running")
    # The shortened event fits one read of the web app's reader, with room to spare.
    tool_result_read = next(r for r in s.reads if b'"type":"tool_result"' in r)
    assert len(tool_result_read) <= 64 * 1024


def test_without_the_cap_the_same_stream_loses_events_in_the_web_app(make_proxy, runtime):
    """Why `limits.max_client_event_bytes` exists: the uncut 700 KB event spans reads."""
    proxy = make_proxy(runtime, {"limits": {"max_client_event_bytes": 0}})
    s = proxy.run_chat("org-a", "scenario:big_tool_result", timeout=20)
    assert any("cut at the end of the read" in v or "does not end with a whole event" in v
               for v in s.violations), s.violations
