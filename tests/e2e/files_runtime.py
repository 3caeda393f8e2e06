"""A runtime stand-in whose executions make a file, and that serves it: what a browser downloads
through the proxy's runtime files route. FastAPI + sse-starlette, like the real runtime.

`POST /api/v1/execute/stream` (422 without `agent_id`, as the real one) streams `thinking`, a
`text_chunk`, a `file_created` whose `url` points into the runtime, `execution_complete` and
`[DONE]`; `GET /api/v1/files/{file_id}/download` answers the file's bytes as an attachment.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

app = FastAPI(title="runtime stand-in with files")

FILE_BYTES = "report line 1\nreport line 2 你好\n".encode()
TEXT = "Here is your report."


def frame(event: str, data: dict) -> dict:
    stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"data": json.dumps({"event": event, "data": data, "timestamp": stamp}, ensure_ascii=False)}


@app.get("/health")
async def health():
    return {"status": "ok"}


@app.post("/api/v1/execute/stream")
async def execute(request: Request):
    body = await request.json()
    if not body.get("agent_id"):
        return JSONResponse({"detail": [{"type": "missing", "loc": ["body", "agent_id"],
                                         "msg": "Field required"}]}, status_code=422)

    async def stream():
        yield frame("thinking", {"content": "planning", "stage": "planning"})
        await asyncio.sleep(0.02)
        yield frame("text_chunk", {"content": TEXT})
        yield frame("file_created", {"file_id": "f-1", "filename": "report.txt", "mime_type": "text/plain",
                                     "size": len(FILE_BYTES), "url": "http://runtime:8000/api/v1/files/f-1/download"})
        yield frame("execution_complete", {"final_response": TEXT})
        yield {"data": "[DONE]"}

    return EventSourceResponse(stream(), ping=0)


@app.get("/api/v1/files/{file_id}/download")
async def download(file_id: str):
    if file_id != "f-1":
        return JSONResponse({"detail": "no such file"}, status_code=404)
    return Response(FILE_BYTES, media_type="text/plain",
                    headers={"content-disposition": 'attachment; filename="report.txt"'})
