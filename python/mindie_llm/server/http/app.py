# SPDX-License-Identifier: Apache-2.0
"""The FastAPI application: OpenAI routes, ``/health``, ``/ready``, ``/metrics``, ``/v1/models``,
and vLLM's ``/tokenize``, ``/detokenize`` and ``/version``.

Owns routing and the middleware order (access log outermost, then API key, then body cap). Must not import torch or
the ``LLMEngine``; it talks to ``AsyncLLM`` only.
"""
from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from mindie_llm.server.http.errors import error_response, install_error_handlers
from mindie_llm.server.http.middleware import AccessLogMiddleware, ApiKeyMiddleware, BodyLimitMiddleware
from mindie_llm.server.http.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from mindie_llm.server.http.serving import OpenAIServing
from mindie_llm.server.metrics import CONTENT_TYPE, ServerMetrics
from mindie_llm.server.protocol_limits import RequestLimits

__all__ = ["build_app"]


def build_app(async_llm: Any, config: Any, metrics: ServerMetrics | None = None) -> FastAPI:
    """An ASGI app serving ``async_llm`` under ``config.server``'s limits and API key."""
    limits = RequestLimits.from_config(config)
    metrics = metrics or ServerMetrics(async_llm)
    serving = OpenAIServing(async_llm, limits,
                            chat_content_special_tokens=config.server.chat_content_special_tokens)
    created = int(time.time())
    app = FastAPI(title="mindie-llm", version="0.1.0",
                  description="OpenAI-compatible API of mindie-llm", docs_url=None, redoc_url=None,
                  strict_content_type=False)  # a body without Content-Type is read as JSON
    install_error_handlers(app)

    @app.get("/health", summary="Liveness: fails when the engine loop stops making progress")
    async def health() -> Response:
        if async_llm.is_live():
            return JSONResponse({"status": "ok"})
        return error_response(503, "the engine loop is not making progress", None, "engine_stalled")

    @app.get("/ready", summary="Readiness: 503 while starting, draining or dead")
    async def ready() -> Response:
        if async_llm.is_ready():
            return JSONResponse({"status": "ready"})
        reason = "draining" if getattr(async_llm, "is_draining", False) else "not_ready"
        return error_response(503, f"the server is not ready ({reason})", None, reason)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", summary="The served model")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": async_llm.model_name, "object": "model", "created": created, "owned_by": "mindie-llm",
            "root": async_llm.model_name, "max_model_len": async_llm.max_model_len}]})

    @app.post("/v1/completions", summary="OpenAI text completion (JSON or SSE stream)")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions", summary="OpenAI chat completion (JSON or SSE stream)")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    @app.post("/tokenize", summary="Token ids of a prompt or of chat messages (vLLM)")
    async def tokenize(body: TokenizeRequest) -> Response:
        return await serving.tokenize(body)

    @app.post("/detokenize", summary="Text of token ids (vLLM)")
    async def detokenize(body: DetokenizeRequest) -> Response:
        return await serving.detokenize(body)

    @app.get("/version", summary="The server's version")
    async def version() -> Response:
        from mindie_llm import __version__

        return JSONResponse({"version": __version__})

    app.state.metrics = metrics
    app.state.async_llm = async_llm
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_request_body_bytes)
    api_key = config.server.resolved_api_key()
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    if config.server.access_log:
        app.add_middleware(AccessLogMiddleware)  # added last = outermost: sees refusals too
    return app
