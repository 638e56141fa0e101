# SPDX-License-Identifier: Apache-2.0
"""Connection guards of the HTTP server: a header-read timeout and a cap on open connections.

uvicorn's keep-alive timer is cancelled by any byte received, so a client that sends its headers
one byte at a time keeps a connection forever. This protocol (uvicorn's h11 protocol plus two
rules) closes a connection whose request headers are not complete ``header_timeout_s`` after it
opened or after the previous response, and answers 503 and closes a connection that would exceed
``max_connections``. Must not import the engine or torch.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["guarded_protocol"]


def _busy_response() -> bytes:
    body = json.dumps({"error": {"message": "too many open connections; retry later", "type": "service_unavailable",
                                 "param": None, "code": "too_many_connections"}}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\nretry-after: 1\r\n\r\n%s" % (len(body), body))


class _GuardedH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0
    max_connections: int = 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        if len(self.server_state.connections) > self.max_connections:
            transport.write(_busy_response())
            transport.close()
            return
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_timeout)

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:   # the next request's headers are not complete
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[Any]:
    """A uvicorn ``http`` protocol class with these limits (pass it as ``uvicorn.Config(http=...)``)."""
    return type("GuardedH11Protocol", (_GuardedH11Protocol,),
                {"header_timeout_s": float(header_timeout_s), "max_connections": int(max_connections)})
