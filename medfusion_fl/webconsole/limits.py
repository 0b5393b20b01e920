"""Bounds on what a request may carry, checked before anything parses it: a body larger than its route's limit
is refused with 413 (from its Content-Length, or while it streams in), and a refused body is never echoed: a 422
says which field failed and why, not what was sent."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_LIMIT = 64 * 1024  # a start request with every run-config key set is ~10 KB
LIMITS = {"/api/login": 4 * 1024, "/api/me/password": 4 * 1024}  # a name and a password; two passwords


class BodyLimit:
    """ASGI middleware: each request's body read up to its route's limit (LIMITS by path, else DEFAULT_LIMIT),
    then handed on; over the limit, 413 without reading the rest."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = LIMITS.get(scope.get("path", ""), DEFAULT_LIMIT)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _too_large(send, limit)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await _too_large(send, limit)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    payload = json.dumps({"detail": f"request body over {limit} bytes, this route's limit"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


async def validation_error(_: Request, exc: Exception) -> JSONResponse:
    """422 naming each failed field and why, without the value sent (FastAPI's default echoes it)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    return JSONResponse(status_code=422, content={"detail": [
        {"loc": list(error.get("loc", ())), "msg": str(error.get("msg", ""))[:300], "type": error.get("type", "")}
        for error in errors[:20]]})
