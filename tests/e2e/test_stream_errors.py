"""Runtime failures after the first byte: each ends in exactly one `error` event and a closed stream."""

from __future__ import annotations

import pytest


def errors_of(s):
    return [e.data for e in s.events if e.event == "error"]


def assert_one_final_error(s):
    s.assert_strict()
    errs = errors_of(s)
    assert len(errs) == 1, s.summary()
    assert s.events[-1].event == "error", "the error event is the last one"
    assert not any(e.event == "done" for e in s.events), s.summary()
    err = errs[0]
    assert set(err) == {"code", "message"}, err
    assert isinstance(err["code"], str) and err["code"]
    assert isinstance(err["message"], str) and err["message"]
    return err


def test_execution_error_becomes_an_error_event(proxy):
    s = proxy.run_chat("org-a", "scenario:error")
    assert s.headers.get("x-execution-mode") == "runtime_orchestrator"
    assert s.names()[:2] == ["message:thinking", "message:text"], s.summary()
    err = assert_one_final_error(s)
    assert err == {"code": "LLM_QUOTA", "message": "LLM provider quota exceeded"}


def test_execution_error_without_code_gets_the_default_code(proxy):
    s = proxy.run_chat("org-a", "scenario:error_nocode")
    err = assert_one_final_error(s)
    assert err == {"code": "SSE_STREAM_ERROR", "message": "tool registry unavailable"}


@pytest.mark.parametrize("scenario", ["truncate", "done_early", "crash", "cut_mid_frame"])
def test_stream_ending_without_execution_complete_ends_with_one_error(proxy, scenario):
    """truncate: the runtime closes cleanly without execution_complete; done_early: [DONE] without
    execution_complete; crash: the runtime's generator raises, cutting the connection mid-body;
    cut_mid_frame: the response ends inside a frame (the partial frame is discarded)."""
    s = proxy.run_chat("org-a", f"scenario:{scenario}", timeout=10)  # the response terminates
    assert s.headers.get("x-execution-mode") == "runtime_orchestrator"
    assert s.names()[0].startswith("message:"), "what came before the failure was delivered"
    assert_one_final_error(s)
    assert all(m["data"].get("content") != "half" for m in s.messages()), "no partial frame"


def test_execution_complete_without_done_marker_is_a_success(proxy):
    s = proxy.run_chat("org-a", "scenario:complete_no_done", timeout=10)
    s.assert_strict()
    assert s.names() == ["message:text", "done"], s.summary()


def test_execution_timeout_ends_the_stream_with_an_error(make_proxy, runtime):
    # Committed at the head: the timeout of a stream the user already has.
    proxy = make_proxy(runtime, {"runtime": {"execution_timeout_ms": 700, "commit_timeout_ms": 0}})
    s = proxy.chat("org-a", "scenario:hold")
    try:
        s.read_to_end(timeout=5)
        assert s.names()[0] == "message:thinking", s.summary()
        err = assert_one_final_error(s)
        assert err["code"] == "TIMEOUT", err
        assert s.events[-1].at - s.events[0].at < 3.0
    finally:
        runtime.release(s.session_id)
        s.close()
    m = proxy.admin_get("/runtime/metrics").json()["data"]["runtime"]
    assert (m["total"], m["timeout"]) == (1, 1), m
