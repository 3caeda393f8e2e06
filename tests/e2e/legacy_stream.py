"""The legacy stand-in's chat answer (legacy/app.js), byte for byte, for tests to compare with.

Ids and timestamps derive from the session id and the message; each event is one line of compact
JSON (as `JSON.stringify` writes it), non-ASCII text as UTF-8.
"""

from __future__ import annotations

import hashlib
import json


def _compact(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


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
        chunks.append(b"event: message\ndata: " + _compact(msg) + b"\n\n")
    done = {"sessionId": session_id, "messageId": f"legacy-{digest}", "executionMode": "direct_llm"}
    chunks.append(b"event: done\ndata: " + _compact(done) + b"\n\n")
    return chunks


def legacy_stream(session_id: str, message: str) -> bytes:
    return b"".join(legacy_chunks(session_id, message))
