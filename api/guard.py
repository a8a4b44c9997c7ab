"""An ASGI guard in front of every route: a body over the size limit gets 413 before it is read,
and a NUL byte in the path or query string gets 422 (no database can store one)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException, status

Scope = dict[str, Any]


class RequestGuard:
    """Refuses oversized bodies (by Content-Length, or while streaming) and NUL bytes in the URL."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        where = _nul_in_url(scope)
        if where:
            detail = [
                {
                    "loc": [where],
                    "field": where,
                    "msg": f"NUL bytes are not allowed in the {where}",
                    "type": "value_error",
                }
            ]
            await _send_json(send, status.HTTP_422_UNPROCESSABLE_CONTENT, {"detail": detail})
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _send_json(send, status.HTTP_413_CONTENT_TOO_LARGE, {"detail": self._too_large()})
            return
        await self.app(scope, self._counting(receive), send)

    def _too_large(self) -> str:
        return f"request body over {self.max_body_bytes} bytes (ICD_MAX_BODY_BYTES)"

    def _counting(self, receive: Any) -> Any:
        """`receive` that stops a chunked body once it passes the limit (FastAPI answers the 413)."""
        seen = 0

        async def wrapped() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, detail=self._too_large())
            return message

        return wrapped


def _nul_in_url(scope: Scope) -> str | None:
    if "\x00" in scope.get("path", ""):
        return "path"
    query = scope.get("query_string", b"").lower()
    return "query" if b"%00" in query or b"\x00" in query else None


async def _send_json(send: Any, code: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": code,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})
