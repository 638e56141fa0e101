# SPDX-License-Identifier: Apache-2.0
"""OpenAI-style error bodies and the mapping from exceptions to HTTP status codes.

Every error is ``{"error": {"message", "type", "param", "code"}}``; messages name the field and
never carry tracebacks or internal state. Must not import the engine loop or torch.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mindie_llm.engine.async_llm import (
    EngineDeadError,
    EngineDrainingError,
    QueueFullError,
)
from mindie_llm.server.protocol_limits import ModelNotFoundError

__all__ = ["error_body", "error_for_exception", "error_response", "install_error_handlers", "param_of"]

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def param_of(exc: BaseException) -> str | None:
    """The field a ValueError names: its ``param``/``field``/``key`` attribute, else the text before
    the first colon when that looks like a field name."""
    for attr in ("param", "field", "key"):
        v = getattr(exc, attr, None)
        if isinstance(v, str) and v:
            return v
    head, sep, _ = str(exc).partition(":")
    if sep and head and len(head) <= 64 and all(c.isalnum() or c in "._[]" for c in head):
        return head
    return None


def error_for_exception(exc: BaseException) -> tuple[int, str, str | None, str | None]:
    """(status, message, param, code) for an exception raised while admitting or running a request."""
    if isinstance(exc, QueueFullError):
        return 429, "the server is overloaded: request queue is full; retry later", None, "queue_full"
    if isinstance(exc, EngineDrainingError):
        return 503, "the server is shutting down", None, "draining"
    if isinstance(exc, EngineDeadError):
        return 500, "the engine has stopped; the server cannot serve requests", None, "engine_dead"
    if isinstance(exc, ModelNotFoundError):
        return 404, str(exc)[:512], "model", "model_not_found"
    if getattr(exc, "http_status", None) is not None:   # errors that carry their own status (PD router)
        return int(exc.http_status), str(exc).splitlines()[0][:512], None, "unavailable"
    if isinstance(exc, ValueError):
        msg = str(exc).splitlines()[0][:512] if str(exc) else "invalid request"
        return 400, msg, param_of(exc), "invalid_value"
    logger.error("unexpected error while serving a request: %s", type(exc).__name__)
    return 500, "internal error", None, "internal_error"


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    # pydantic adds the union member it tried ("str", "list[int]", ...) to the location: drop those.
    parts = [p for p in parts if not any(ch in p for ch in "[]") and p not in
             ("str", "int", "float", "bool", "list", "StreamOptions", "function-after")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _count_rejected(request: Request) -> None:
    """Requests refused by the HTTP layer never reach AsyncLLM: count them here."""
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None and request.url.path.startswith("/v1/"):
        metrics.count_outcome("rejected_invalid")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        _count_rejected(request)
        errors = exc.errors()
        if not errors:
            return error_response(400, "invalid request body", "body", "invalid_value")
        first = errors[0]
        # A union field (prompt: str | list[int] | ...) reports one error per member: name the most
        # specific one (prompt[0] out of range beats "prompt: should be a string").
        head = tuple(first.get("loc", ()))[:2]
        same = [e for e in errors if tuple(e.get("loc", ()))[:2] == head]
        first = max(same, key=lambda e: len(_loc_to_param(tuple(e.get("loc", ())))))
        kind = first.get("type", "")
        if kind == "json_invalid":
            return error_response(400, "body: not valid JSON", "body", "invalid_json")
        param = _loc_to_param(tuple(first.get("loc", ())))
        if kind == "extra_forbidden":
            msg = f"{param}: unknown field"
        elif kind == "missing":
            msg = f"{param}: field required"
        elif param == "body":
            msg = "body: must be a JSON object"
        else:
            msg = f"{param}: {first.get('msg', 'invalid value')}"
        return error_response(400, msg[:512], param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 400:
            _count_rejected(request)
            return error_response(400, "body: not a valid JSON document", "body", "invalid_json")
        msg = {404: "no such route", 405: "method not allowed"}.get(status, "request failed")
        return error_response(status, msg, None, None, headers=getattr(exc, "headers", None))

    @app.exception_handler(ValueError)
    async def _value(request: Request, exc: ValueError) -> JSONResponse:
        _count_rejected(request)
        status, msg, param, code = error_for_exception(exc)
        return error_response(status, msg, param, code)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        status, msg, param, code = error_for_exception(exc)
        return error_response(status, msg, param, code)
