# SPDX-License-Identifier: Apache-2.0
"""Pure-ASGI middleware of the HTTP server: access log, API-key check and request-body size cap.

Both run before routing, on every request, so that no route can be reached around them (plain ASGI
rather than Starlette's BaseHTTPMiddleware, which streams and cancels badly). Must not import the
engine or torch.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mindie_llm.server.auth import api_key_matches, extract_api_key
from mindie_llm.server.http.errors import error_body

__all__ = ["AccessLogMiddleware", "ApiKeyMiddleware", "BodyLimitMiddleware", "USAGE_STATE_KEY"]

access_logger = logging.getLogger("mindie_llm.access")
# Handlers put (prompt_tokens, completion_tokens) under this key of scope["state"] for the access log.
USAGE_STATE_KEY = "mindie_usage"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


async def _discard_body(receive: Receive, limit: int) -> None:
    """Reads and drops what is left of a refused body (up to ``limit`` bytes) before the 413 is
    sent, so that the server does not close with unread data: such a close sends a TCP reset, and
    a client still uploading then loses the response."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class ApiKeyMiddleware:
    """Requires the API key on every path except those in ``open_paths`` (liveness only)."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: tuple[str, ...] = ("/health",)) -> None:
        self.app = app
        self.api_key = api_key
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        provided = extract_api_key(_header(scope, b"authorization"), _header(scope, b"x-api-key"))
        if not api_key_matches(provided, self.api_key):
            await _send_json(send, 401, error_body(401, "missing or invalid API key", None, "invalid_api_key"),
                             [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses bodies over ``max_bytes`` with 413, by Content-Length and by counting what arrives.

    The body is read here (at most ``max_bytes``) and replayed to the app as one message; later
    ``receive()`` calls go to the server, so disconnects are still seen by the routes.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = error_body(413, f"body: larger than the limit of {self.max_bytes} bytes", "body", "body_too_large")
        close = [(b"connection", b"close")]
        drain_limit = max(16 << 20, 8 * self.max_bytes)
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _send_json(send, 400, error_body(400, "content-length: not an integer", "content-length"))
                return
            if declared > self.max_bytes:
                if declared <= drain_limit:
                    await _discard_body(receive, drain_limit)
                await _send_json(send, 413, too_big, close)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await _discard_body(receive, drain_limit)
                await _send_json(send, 413, too_big, close)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class AccessLogMiddleware:
    """One line per HTTP request once its response ends: client, method, route, status, latency
    and, for generation routes, prompt and completion tokens (logger ``mindie_llm.access``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            client = scope.get("client") or ("-", 0)
            usage = (scope.get("state") or {}).get(USAGE_STATE_KEY)
            tokens = f" prompt_tokens={usage[0]} completion_tokens={usage[1]}" if usage else ""
            access_logger.info('%s:%s "%s %s" %d %.1fms%s', client[0], client[1], scope.get("method", "-"),
                               scope.get("path", "-"), status or 499, (time.perf_counter() - start) * 1e3, tokens)
