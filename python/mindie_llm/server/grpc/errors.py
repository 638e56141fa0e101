# SPDX-License-Identifier: Apache-2.0
"""Maps exceptions of the engine front (AsyncLLM) to gRPC status codes, in one place.

ValueError (and its typed subclasses: sampling, admission, config) -> INVALID_ARGUMENT with the
exception's message, which names the field; QueueFullError -> RESOURCE_EXHAUSTED;
EngineDrainingError -> UNAVAILABLE; anything else -> INTERNAL with a generic message (internals are
logged, never sent). Must not import torch or the model code.
"""
from __future__ import annotations

import logging
from typing import Any

import grpc

__all__ = ["RpcError", "status_for", "abort_with", "GENERIC_INTERNAL_MESSAGE"]

logger = logging.getLogger(__name__)

GENERIC_INTERNAL_MESSAGE = "internal error while processing the request"
_MAX_MESSAGE_CHARS = 512


class RpcError(Exception):
    """An error raised by a servicer with an explicit status code and a client-safe message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code.name}: {message}")


def _engine_errors() -> tuple[type, type, type]:
    """(QueueFullError, EngineDrainingError, EngineDeadError), imported lazily so that this module
    loads without the engine."""
    from mindie_llm.engine.async_llm import EngineDeadError, EngineDrainingError, QueueFullError

    return QueueFullError, EngineDrainingError, EngineDeadError


def status_for(exc: BaseException, *, admitted: bool = False) -> tuple[grpc.StatusCode, str]:
    """The status code and the client-safe message for ``exc``.

    ``admitted``: the request had passed validation and admission, so a ValueError now is an
    internal failure, not the client's fault (its text is not sent).
    """
    if isinstance(exc, RpcError):
        return exc.code, exc.message
    if getattr(exc, "grpc_code", None) is not None:   # errors that carry their own status (PD router)
        return exc.grpc_code, str(exc)[:_MAX_MESSAGE_CHARS]
    queue_full, draining, dead = _engine_errors()
    if isinstance(exc, queue_full):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the request queue is full; retry later"
    if isinstance(exc, draining):
        return grpc.StatusCode.UNAVAILABLE, "the server is shutting down and accepts no new requests"
    if isinstance(exc, dead):
        return grpc.StatusCode.INTERNAL, GENERIC_INTERNAL_MESSAGE
    if isinstance(exc, UnicodeError) and not admitted:
        return grpc.StatusCode.INVALID_ARGUMENT, "request text is not valid UTF-8"
    if isinstance(exc, ValueError) and not admitted:
        # Validation errors name the field by contract (SamplingParamsError, RequestRejectedError...).
        text = str(exc) or type(exc).__name__
        return grpc.StatusCode.INVALID_ARGUMENT, text[:_MAX_MESSAGE_CHARS]
    logger.exception("gRPC request failed", exc_info=exc)
    return grpc.StatusCode.INTERNAL, GENERIC_INTERNAL_MESSAGE


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException, *, admitted: bool = False) -> None:
    """Ends the RPC with the status that ``exc`` maps to (raises, as ``context.abort`` does)."""
    code, message = status_for(exc, admitted=admitted)
    await context.abort(code, message)


async def last_output(gen: Any, context: grpc.aio.ServicerContext, last: Any) -> Any:
    """Consumes an admitted request's stream of cumulative outputs and returns the final one
    (``last`` if it yields nothing more); an error becomes the RPC's status, and the generator is
    closed either way (which aborts the request if it is still running)."""
    try:
        async for out in gen:
            last = out
    except Exception as e:  # noqa: BLE001 - mapped to a status code
        await abort_with(context, e, admitted=True)
    finally:
        await gen.aclose()
    return last
