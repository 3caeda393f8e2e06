"""A stand-in for the legacy Chat API (direct_llm).

The two chat routes stream Agent2UI `event: message` text frames and an `event: done`, in
several writes, deterministically (ids and timestamps derive from the session id and the
message), so a test can compare the bytes its client got with `legacy_stream()` byte for byte.
Every other route echoes what it received (method, path, query, headers, body size and hash).
Chat requests are recorded: GET /control/received. The message "legacy:hold" makes the stream
wait after its first event until POST /control/release/{session_id}.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

app = FastAPI(title="legacy Chat API stand-in")

RECEIVED: list[dict] = []
RELEASES: dict[str, asyncio.Event] = {}


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
