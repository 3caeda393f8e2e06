"""A stand-in for the legacy Chat API (direct_llm).

The two chat routes stream Agent2UI `event: message` text frames and an `event: done`, in
several writes, deterministically (ids and timestamps derive from the session id and the
message), so a test can compare the bytes its client got with `legacy_stream()` byte for byte.
Every other route echoes what it received (method, path, query, headers, body size and hash).
Chat requests are recorded: GET /control/received. The message "legacy:hold" makes the stream
wait after its first event until POST /control/release/{session_id}.

The conversation bridge's routes answer the way the source product's API does: sessions, agents
and messages in memory, `{"success":true,"data":...}`, scoped by the org of the caller's JWT
(another org's session or agent is a 404, no valid token a 401), the agent's `config` as a JSON
string as its database stores it. Test helpers for them (not part of the real API):
  POST /control/seed          {org, agent?: {id,name,systemPrompt,config}, session?: {id,agentId},
                              messages?: [{role,content}]} stores them
  POST /control/fault         {route, id, status?, hang?, times?}: the route misbehaves for calls
                              naming that session or agent id (routes: get_session, get_agent,
                              get_messages, post_message, create_session, delete_session)
  GET  /control/bridge        every bridge call: seq, route, method, path, headers, body (and the
                              `created` session id); chat requests carry `seq` too
A request carrying `x-echo-status` is echoed whatever its path, so pass-through tests can aim
at any route, bridge routes included.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
from datetime import datetime, timezone

import jwt
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

app = FastAPI(title="legacy Chat API stand-in")

RECEIVED: list[dict] = []
RELEASES: dict[str, asyncio.Event] = {}

JWT_SECRET = os.environ.get("LEGACY_JWT_SECRET", "")
SESSIONS: dict[str, dict] = {}
AGENTS: dict[str, dict] = {}
MESSAGES: dict[str, list[dict]] = {}
BRIDGE_CALLS: list[dict] = []
# (route, id) -> {"status": int | None, "hang": bool, "times": int | None}
FAULTS: dict[tuple[str, str], dict] = {}
IDS = itertools.count(1)
# One order across chat requests and bridge calls, so a test can tell which came first.
SEQ = itertools.count(1)


def legacy_chunks(session_id: str, message: str) -> list[bytes]:
    """The SSE body of a legacy chat answer, as the writes the legacy API makes."""
    digest = hashlib.sha1(f"{session_id}|{message}".encode()).hexdigest()[:12]
    words = ["Legacy", " answer", " to: ", message, " 你好"]
    chunks = []
    for i, word in enumerate(words):
        msg = {
            "id": f"legacy-{digest}-{i}",
            "type": "text",
            "data": {"content": word},
            "timestamp": f"2024-05-01T12:00:0{i}.000Z",
        }
        chunks.append(b"event: message\ndata: " + json.dumps(msg, ensure_ascii=False).encode() + b"\n\n")
    done = {"sessionId": session_id, "messageId": f"legacy-{digest}", "executionMode": "direct_llm"}
    chunks.append(b"event: done\ndata: " + json.dumps(done).encode() + b"\n\n")
    return chunks


def legacy_stream(session_id: str, message: str) -> bytes:
    return b"".join(legacy_chunks(session_id, message))


async def _chat(request: Request, session_id: str):
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    RECEIVED.append({
        "seq": next(SEQ),
        "path": request.url.path,
        "query": request.url.query,
        "headers": dict(request.headers),
        "body": body,
        "raw_len": len(raw),
    })
    message = body.get("message", "") if isinstance(body, dict) else ""

    async def gen():
        for i, chunk in enumerate(legacy_chunks(session_id, message)):
            yield chunk
            if i == 0 and message == "legacy:hold":
                # Hold the rest until the test says so (proves the proxy streams legacy too).
                await asyncio.wait_for(RELEASES.setdefault(session_id, asyncio.Event()).wait(), 30)
            await asyncio.sleep(0.002)

    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-legacy": "1"})


@app.post("/api/v1/chat/sessions/{session_id}")
async def chat_session(session_id: str, request: Request):
    return await _chat(request, session_id)


@app.post("/api/v1/chat/start")
async def chat_start(request: Request):
    return await _chat(request, "legacy-new-session")


# ---- the conversation bridge's routes -----------------------------------------------------

def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ok(data, status: int = 200) -> JSONResponse:
    return JSONResponse({"success": True, "data": data}, status_code=status)


def failure(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"success": False, "error": {"code": code, "message": message}}, status_code=status)


def not_found(what: str) -> JSONResponse:
    return failure(404, "NOT_FOUND", f"{what} not found")


def caller_org(request: Request) -> str | None:
    """The org of a valid bearer token (HS256, expiry checked), as the Chat API's auth does."""
    header = request.headers.get("authorization", "")
    if not header.startswith("Bearer ") or not JWT_SECRET:
        return None
    try:
        claims = jwt.decode(header[len("Bearer "):], JWT_SECRET, algorithms=["HS256"])
    except jwt.PyJWTError:
        return None
    org = claims.get("orgId")
    return org if isinstance(org, str) and org else None


async def bridge_call(request: Request, route: str, key: str):
    """Record the call, then apply a fault set for (route, key): (org, body) or a response."""
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
    request.state.call = {"seq": next(SEQ), "route": route, "method": request.method,
                          "path": request.url.path, "headers": dict(request.headers), "body": body}
    BRIDGE_CALLS.append(request.state.call)
    fault = FAULTS.get((route, key))
    if fault is not None:
        if fault.get("times") is not None:
            fault["times"] -= 1
            if fault["times"] <= 0:
                del FAULTS[(route, key)]
        if fault.get("hang"):
            await asyncio.sleep(3600)
        return None, None, failure(fault.get("status") or 500, "INJECTED", "injected fault")
    org = caller_org(request)
    if org is None:
        return None, None, failure(401, "UNAUTHORIZED", "missing or invalid token")
    return org, body, None


def own_session(session_id: str, org: str) -> dict | None:
    s = SESSIONS.get(session_id)
    return s if s is not None and s["orgId"] == org else None


def echoed(request: Request) -> bool:
    return "x-echo-status" in request.headers


@app.get("/api/v1/sessions/{session_id}")
async def get_session(session_id: str, request: Request):
    if echoed(request):
        return await echo(request.url.path, request)
    org, _, refused = await bridge_call(request, "get_session", session_id)
    if refused:
        return refused
    s = own_session(session_id, org)
    return ok(s) if s else not_found("session")


@app.delete("/api/v1/sessions/{session_id}")
async def delete_session(session_id: str, request: Request):
    if echoed(request):
        return await echo(request.url.path, request)
    org, _, refused = await bridge_call(request, "delete_session", session_id)
    if refused:
        return refused
    if not own_session(session_id, org):
        return not_found("session")
    del SESSIONS[session_id]
    MESSAGES.pop(session_id, None)
    return ok({"id": session_id})


@app.post("/api/v1/sessions")
async def create_session(request: Request):
    if echoed(request):
        return await echo(request.url.path, request)
    raw = await request.body()
    agent_id = ""
    try:
        agent_id = str(json.loads(raw).get("agentId") or "")
    except (ValueError, AttributeError):
        pass
    org, body, refused = await bridge_call(request, "create_session", agent_id)
    if refused:
        return refused
    agent = AGENTS.get(agent_id)
    if agent is None or agent["orgId"] != org:
        return not_found("agent")
    session_id = f"sess-legacy-{next(IDS)}"
    SESSIONS[session_id] = {"id": session_id, "orgId": org, "agentId": agent_id,
                            "title": (body or {}).get("title", ""), "createdAt": now_iso()}
    MESSAGES[session_id] = []
    request.state.call["created"] = session_id
    return ok({"id": session_id, "agentId": agent_id, "title": SESSIONS[session_id]["title"]}, 201)


@app.get("/api/v1/sessions/{session_id}/messages")
async def list_messages(session_id: str, request: Request):
    if echoed(request):
        return await echo(request.url.path, request)
    org, _, refused = await bridge_call(request, "get_messages", session_id)
    if refused:
        return refused
    if not own_session(session_id, org):
        return not_found("session")
    return ok(MESSAGES.get(session_id, []))


@app.post("/api/v1/sessions/{session_id}/messages")
async def add_message(session_id: str, request: Request):
    if echoed(request):
        return await echo(request.url.path, request)
    org, body, refused = await bridge_call(request, "post_message", session_id)
    if refused:
        return refused
    if not own_session(session_id, org):
        return not_found("session")
    if not isinstance(body, dict) or body.get("role") not in ("user", "assistant") \
            or not isinstance(body.get("content"), str):
        return failure(400, "VALIDATION_ERROR", "role and content are required")
    message = {"id": f"msg-{next(IDS)}", "sessionId": session_id, "role": body["role"],
               "content": body["content"], "parentId": body.get("parentId"),
               "metadata": body.get("metadata"), "createdAt": now_iso()}
    MESSAGES[session_id].append(message)
    return ok(message, 201)


@app.get("/api/v1/agents/{agent_id}")
async def get_agent(agent_id: str, request: Request):
    if echoed(request):
        return await echo(request.url.path, request)
    org, _, refused = await bridge_call(request, "get_agent", agent_id)
    if refused:
        return refused
    agent = AGENTS.get(agent_id)
    if agent is None or agent["orgId"] != org:
        return not_found("agent")
    return ok({**agent, "config": json.dumps(agent["config"])})


@app.post("/control/seed")
async def seed(request: Request):
    spec = await request.json()
    org = spec["org"]
    if "agent" in spec:
        a = spec["agent"]
        AGENTS[a["id"]] = {"id": a["id"], "orgId": org, "name": a.get("name", ""),
                           "systemPrompt": a.get("systemPrompt", ""), "config": a.get("config", {})}
    if "session" in spec:
        s = spec["session"]
        SESSIONS[s["id"]] = {"id": s["id"], "orgId": org, "agentId": s["agentId"],
                             "title": s.get("title", ""), "createdAt": now_iso()}
        MESSAGES[s["id"]] = [
            {"id": f"msg-{next(IDS)}", "sessionId": s["id"], "role": m["role"], "content": m["content"],
             "parentId": None, "metadata": None, "createdAt": now_iso()}
            for m in spec.get("messages", [])
        ]
    return {"seeded": True}


@app.post("/control/fault")
async def fault(request: Request):
    spec = await request.json()
    FAULTS[(spec["route"], spec["id"])] = {"status": spec.get("status"), "hang": bool(spec.get("hang")),
                                          "times": spec.get("times")}
    return {"fault": spec}


@app.get("/control/bridge")
async def bridge_calls():
    return BRIDGE_CALLS


@app.get("/control/sessions/{session_id}")
async def stored_session(session_id: str):
    """Whether legacy still holds the session (as a test needs to know after a delete)."""
    return {"session": SESSIONS.get(session_id)}


@app.post("/control/release/{session_id}")
async def release(session_id: str):
    RELEASES.setdefault(session_id, asyncio.Event()).set()
    return {"released": session_id}


@app.get("/control/received")
async def received():
    return RECEIVED


@app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def echo(path: str, request: Request):
    raw = await request.body()
    status = int(request.headers.get("x-echo-status", "200"))
    return JSONResponse(
        {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "headers": dict(request.headers),
            "body_len": len(raw),
            "body_sha256": hashlib.sha256(raw).hexdigest(),
        },
        status_code=status,
        headers={"x-legacy": "1"},
    )
