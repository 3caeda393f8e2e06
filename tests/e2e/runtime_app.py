"""A stand-in for the Python runtime orchestrator: FastAPI + sse-starlette, like the real one.

`POST /api/v1/execute/stream` answers an `EventSourceResponse` whose frames are
`data: {"event": NAME, "data": {...}, "timestamp": ISO}` and which ends with `data: [DONE]`.
The line separator comes from the environment (RUNTIME_SSE_SEP = crlf | lf | cr; sse-starlette's
own default is CRLF), so one test run can drive the proxy with each framing.

Like the real runtime (its request model has `agent_id: str`), a body without a non-empty
`agent_id` is answered 422 in FastAPI's validation shape, before any stream.

The conversation is read the way the real runtime reads it (`runtime/src/orchestrator/state.py`):
a non-empty `history_messages` is the whole conversation, its last user entry the question, and
`user_message` is then ignored; an empty one leaves `user_message` as the question. What the
stream does is chosen by that question (`scenario:NAME`, anything else is the full contract
table):

  table                every runtime event of the contract table, then [DONE]
  hold                 first event, then waits until POST /control/release/{session_id}
  error                a few events, then execution_error (with a code)
  think_then_error     two thinking events, then execution_error: the real runtime's usual failure
  think_pause_error    thinking at once, then execution_error RUNTIME_THINK_PAUSE seconds later (a
                       planner that fails after working a while)
  error_nocode         execution_error without a code
  truncate             a few events, then the stream ends (no execution_complete, no [DONE])
  done_early           a few events, then [DONE] without execution_complete
  crash                a few events, then the generator raises: the connection is cut mid-body
  cut_mid_frame        a few events, then half a frame, then a clean end of the response
  complete_no_done     execution_complete, then the stream ends without [DONE]
  slow                 text chunks every RUNTIME_SLOW_GAP seconds with `: ping` comments between
  junk                 a frame that is not JSON and an unknown event between good ones
  big_tool_result      a ~700 KB tool_call_complete (code executor output), then a plan step
  edge                 raw bytes written in awkward pieces (CR|LF split, UTF-8 split, BOM, ...)
  http500              500 before any byte of a stream
  echo                 answers "You asked: <the question>": a test sees which question arrived

Test helpers (not part of the real runtime's API):
  GET  /control/received          JSON bodies and selected headers received, in order
  GET  /control/sent/{session_id} the frames (event, data, timestamp) sent for that session
  GET  /control/ending/{session_id} "finished", "failed", "cancelled" (client gone) or null
  POST /control/release/{key}     releases a `hold` stream
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import datetime, timezone

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

SEPARATORS = {"crlf": "\r\n", "lf": "\n", "cr": "\r"}
SEP = SEPARATORS[os.environ.get("RUNTIME_SSE_SEP", "crlf")]
SLOW_GAP = float(os.environ.get("RUNTIME_SLOW_GAP", "0.15"))
THINK_PAUSE_S = float(os.environ.get("RUNTIME_THINK_PAUSE", "1.0"))

app = FastAPI(title="runtime stand-in")

RECEIVED: list[dict] = []
SENT: dict[str, list[dict]] = {}
RELEASES: dict[str, asyncio.Event] = {}
# How each stream ended on the runtime's side: "finished", or "cancelled" when the client (the
# proxy) went away first.
ENDINGS: dict[str, str] = {}

LONG_CJK = "长文本测试，包含中文、日本語のテキスト、한국어 그리고 emoji 🚀。" * 120

# The contract table, in the order a real execution produces it. Tests import this to know
# what was sent; their expectations of the mapped output are written out separately.
TABLE: list[tuple[str, dict]] = [
    ("plan_created", {"steps": [
        {"id": "s1", "title": "Search the knowledge base"},
        {"id": "s2", "title": "Summarise 结果"},
        {"id": "s3", "title": "Send the report"},
    ]}),
    ("plan_step_start", {"step_id": "s1", "title": "Search the knowledge base",
                         "tool": "kb_search", "params": {"query": "Q3 revenue", "top_k": 5}}),
    ("tool_call_start", {"tool_name": "kb_search", "arguments": {"query": "Q3 revenue", "top_k": 5}}),
    ("tool_call_complete", {"tool_name": "kb_search", "result": {"hits": [{"doc": "q3.pdf", "score": 0.92}]},
                            "success": True, "error": None, "duration": 412}),
    ("plan_step_complete", {"step_id": "s1", "title": "Search the knowledge base",
                            "result": {"hits": 1}, "duration_ms": 415}),
    ("plan_step_start", {"step_id": "s2", "title": "Summarise 结果", "tool": None, "params": {}}),
    ("skill_call_start", {"skill_id": "sk-9", "skill_name": "summarise", "arguments": {"style": "brief"}}),
    ("skill_call_complete", {"skill_id": "sk-9", "skill_name": "summarise", "result": "摘要：收入增长 12%",
                             "success": True, "error": None, "duration": 1200}),
    ("mcp_call_start", {"server_id": "mail", "tool_name": "send_email",
                        "arguments": {"to": "cfo@example.com"}}),
    ("mcp_call_complete", {"server_id": "mail", "tool_name": "send_email", "result": None,
                           "success": False, "error": "SMTP 550 mailbox unavailable", "duration": 80}),
    ("plan_step_failed", {"step_id": "s3", "title": "Send the report", "error": "SMTP 550 mailbox unavailable"}),
    ("thinking", {"content": "The mail failed; answer inline instead.", "stage": "reasoning"}),
    ("text_chunk", {"content": "Revenue grew 12% "}),
    ("text_chunk", {"content": "收入增长百分之十二，详情见附件。"}),
    ("text_chunk", {"content": ""}),
    ("ping", {}),
    ("text_chunk", {"content": LONG_CJK}),
    ("execution_complete", {"final_response": "Revenue grew 12% 收入增长百分之十二，详情见附件。",
                            "usage": {"input_tokens": 321, "output_tokens": 45}}),
]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Stream:
    """Builds the frames of one execution and remembers what was sent."""

    def __init__(self, session_id: str):
        self.sent = SENT.setdefault(session_id, [])

    def frame(self, event: str, data: dict) -> dict:
        payload = {"event": event, "data": data, "timestamp": now_iso()}
        self.sent.append(payload)
        return {"data": json.dumps(payload, ensure_ascii=False)}

    @staticmethod
    def done() -> dict:
        return {"data": "[DONE]"}


def release_event(key: str) -> asyncio.Event:
    return RELEASES.setdefault(key, asyncio.Event())


@app.get("/health")
async def health():
    return {"status": "healthy"}


@app.get("/health/fail")
async def health_fail():
    return JSONResponse({"status": "unhealthy"}, status_code=503)


@app.get("/control/received")
async def received():
    return RECEIVED


@app.get("/control/sent/{session_id}")
async def sent(session_id: str):
    return SENT.get(session_id, [])


@app.get("/control/ending/{session_id}")
async def ending(session_id: str):
    return {"ending": ENDINGS.get(session_id)}


@app.post("/control/release/{key}")
async def release(key: str):
    release_event(key).set()
    return {"released": key}


@app.post("/api/v1/execute/stream")
async def execute_stream(request: Request):
    body = await request.json()
    RECEIVED.append({
        "body": body,
        "headers": {k: v for k, v in request.headers.items()
                    if k in ("authorization", "content-type", "accept", "x-request-id", "traceparent")},
    })
    if not isinstance(body.get("agent_id"), str) or not body["agent_id"]:
        return JSONResponse({"detail": [{"type": "missing", "loc": ["body", "agent_id"], "msg": "Field required",
                                         "input": body}]}, status_code=422)
    session_id = body.get("session_id") or "no-session"
    message = question_of(body)
    rest = message.split(":", 1)[1].split() if message.startswith("scenario:") else []
    scenario = rest[0] if rest else "table"
    if scenario == "echo":
        return EventSourceResponse(tracked(echo_stream(Stream(session_id), message), session_id),
                                   sep=SEP, ping=0)
    if scenario == "http500":
        return JSONResponse({"detail": "agent config not found"}, status_code=500)
    if scenario == "edge":
        return EventSourceResponse(edge_stream(session_id), sep=SEP, ping=0)
    gen = SCENARIOS.get(scenario, table_stream)
    ping = SLOW_GAP / 3 if scenario == "slow" else 0
    return EventSourceResponse(tracked(gen(Stream(session_id), session_id), session_id), sep=SEP, ping=ping)


def question_of(body: dict) -> str:
    """The question, as the real runtime finds it: the last user entry of a non-empty history,
    else `user_message`."""
    history = body.get("history_messages") or []
    if history:
        users = [m.get("content") or "" for m in history if m.get("role") == "user"]
        return users[-1] if users else ""
    return body.get("user_message") or ""


async def echo_stream(s: Stream, question: str):
    answer = f"You asked: {question}"
    yield s.frame("text_chunk", {"content": answer})
    yield s.frame("execution_complete", {"final_response": answer})
    yield s.done()


async def tracked(gen, session_id: str):
    ENDINGS.pop(session_id, None)
    try:
        async for item in gen:
            yield item
        ENDINGS[session_id] = "finished"
    except Exception:
        ENDINGS[session_id] = "failed"
        raise
    except BaseException:  # cancelled: the client went away
        ENDINGS[session_id] = "cancelled"
        raise


def canned(*frames, done=True):
    """A scenario that sends these (event, data) frames at once, then `[DONE]` unless `done` is
    false."""
    async def stream(s: Stream, session_id: str):
        for event, data in frames:
            yield s.frame(event, data)
        if done:
            yield s.done()
    return stream


async def table_stream(s: Stream, session_id: str):
    for event, data in TABLE:
        yield s.frame(event, data)
        await asyncio.sleep(0)
    yield s.done()


async def hold_stream(s: Stream, session_id: str):
    yield s.frame("thinking", {"content": "first, before the hold", "stage": "planning"})
    await asyncio.wait_for(release_event(session_id).wait(), timeout=30)
    yield s.frame("text_chunk", {"content": "second, after the release"})
    yield s.frame("execution_complete", {"final_response": "second, after the release"})
    yield s.done()


error_stream = canned(
    ("thinking", {"content": "looking up the agent", "stage": "planning"}),
    ("text_chunk", {"content": "partial "}),
    ("execution_error", {"error": "LLM provider quota exceeded", "code": "LLM_QUOTA"}),
)


async def think_then_error_stream(s: Stream, session_id: str):
    yield s.frame("thinking", {"content": "reading the question", "stage": "planning"})
    await asyncio.sleep(0.02)
    yield s.frame("thinking", {"content": "calling the model", "stage": "executing"})
    await asyncio.sleep(0.02)
    yield s.frame("execution_error", {"error": "LLM provider returned 429", "code": "LLM_RATE_LIMITED"})
    yield s.done()


async def think_pause_error_stream(s: Stream, session_id: str):
    """A planner that shows its status at once, works for a second, then fails (before content)."""
    yield s.frame("thinking", {"content": "正在分析任务...", "stage": "planning"})
    await asyncio.sleep(THINK_PAUSE_S)
    yield s.frame("execution_error", {"error": "LLM provider returned 503", "code": "LLM_UNAVAILABLE"})
    yield s.done()


error_nocode_stream = canned(
    ("text_chunk", {"content": "partial "}),
    ("execution_error", {"error": "tool registry unavailable"}),
)
truncate_stream = canned(
    ("thinking", {"content": "about to stop", "stage": "planning"}),
    ("text_chunk", {"content": "cut here"}),
    done=False,
)
done_early_stream = canned(("text_chunk", {"content": "no completion follows"}))


async def crash_stream(s: Stream, session_id: str):
    yield s.frame("thinking", {"content": "about to crash", "stage": "planning"})
    yield s.frame("text_chunk", {"content": "half an answer"})
    await asyncio.sleep(0.05)
    raise RuntimeError("runtime worker died mid-stream")


async def cut_mid_frame_stream(s: Stream, session_id: str):
    yield s.frame("text_chunk", {"content": "whole"})
    yield b'data: {"event": "text_chunk", "data": {"content": "half'


complete_no_done_stream = canned(
    ("text_chunk", {"content": "all there"}),
    ("execution_complete", {"final_response": "all there"}),
    done=False,
)


async def slow_stream(s: Stream, session_id: str):
    for i in range(4):
        yield s.frame("text_chunk", {"content": f"slow {i} "})
        await asyncio.sleep(SLOW_GAP)
    yield s.frame("execution_complete", {"final_response": "slow 0 slow 1 slow 2 slow 3"})
    yield s.done()


async def junk_stream(s: Stream, session_id: str):
    yield s.frame("text_chunk", {"content": "before junk"})
    yield {"data": "this is not json {"}
    yield s.frame("quantum_leap", {"content": "an event name not in the table"})
    yield {"data": json.dumps(["an", "array"])}
    yield s.frame("text_chunk", {"content": "after junk"})
    yield s.frame("execution_complete", {"final_response": "before junk after junk"})
    yield s.done()


def edge_pieces(session_id: str) -> list[bytes]:
    """The bytes of a stream, cut where naive parsers break. Framing uses the configured SEP
    except where a piece deliberately mixes in another line ending (all three are legal)."""
    sep = SEP.encode()
    def frame(event: str, data: dict, indent=None) -> bytes:
        text = json.dumps({"event": event, "data": data, "timestamp": now_iso()},
                          ensure_ascii=False, indent=indent)
        # Multi-line data: one `data:` line per JSON line, joined back with LF by the parser.
        return b"".join(b"data: " + line.encode() + sep for line in text.split("\n")) + sep

    whole = b"".join([
        b"\xef\xbb\xbf",                                      # BOM at the start of the stream
        b": connected" + sep,                                  # comment
        b"retry: 3000" + sep + b"id: 1" + sep + sep,           # fields without data: no event
        frame("text_chunk", {"content": "零一二三四五六七八九"}),
        frame("thinking", {"content": "pretty printed, multi-line data", "stage": "x"}, indent=2),
        b"id: 2\r\n" + b"data: " + json.dumps({"event": "text_chunk", "data": {"content": "crlf framed 🚀"},
                                               "timestamp": now_iso()}, ensure_ascii=False).encode()
        + b"\r\n\r\n",
        frame("execution_complete", {"final_response": "edge"}),
        b"data: [DONE]" + sep + sep,
    ])
    # Cut points: inside the BOM, inside "data", inside a 3-byte CJK character, between a CR
    # and its LF, and a few random places.
    cuts = {1, 5}
    idx = whole.find("三".encode())
    cuts.add(idx + 1)
    cuts.add(whole.find(b"dat", 20) + 2)
    crlf = whole.find(b"\r\n\r\n")
    cuts.update({crlf + 1, crlf + 3})
    rocket = whole.find("🚀".encode())
    cuts.update({rocket + 1, rocket + 2})
    cuts.update(range(40, len(whole), 97))
    cuts = sorted(c for c in cuts if 0 < c < len(whole))
    pieces, last = [], 0
    for c in cuts:
        pieces.append(whole[last:c])
        last = c
    pieces.append(whole[last:])
    return [p for p in pieces if p]


async def big_tool_result_stream(s: Stream, session_id: str):
    # The real code executor's output: ~700 KB of stdout with escaped control characters.
    stdout = "line of output \x1b[0m\t" * 30_000
    yield s.frame("tool_call_start", {"tool_name": "code_executor",
                                      "arguments": {"language": "python", "code": "print('x')"}})
    yield s.frame("tool_call_complete", {"tool_name": "code_executor",
                                         "result": {"stdout": stdout, "stderr": "", "exit_code": 0},
                                         "success": True, "error": None, "duration": 2.5})
    yield s.frame("plan_step_start", {"step_id": "s2", "title": "Summarise the output",
                                      "tool": None, "params": {}})
    yield s.frame("text_chunk", {"content": "done"})
    yield s.frame("execution_complete", {"final_response": "done"})
    yield s.done()


async def edge_stream(session_id: str):
    for piece in edge_pieces(session_id):
        yield piece
        # Let each piece leave as its own chunk and TCP segment.
        await asyncio.sleep(0.003)


SCENARIOS = {
    "table": table_stream,
    "hold": hold_stream,
    "error": error_stream,
    "think_then_error": think_then_error_stream,
    "think_pause_error": think_pause_error_stream,
    "error_nocode": error_nocode_stream,
    "truncate": truncate_stream,
    "done_early": done_early_stream,
    "crash": crash_stream,
    "slow": slow_stream,
    "cut_mid_frame": cut_mid_frame_stream,
    "complete_no_done": complete_no_done_stream,
    "junk": junk_stream,
    "big_tool_result": big_tool_result_stream,
}
