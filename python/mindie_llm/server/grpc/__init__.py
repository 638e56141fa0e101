# SPDX-License-Identifier: Apache-2.0
"""The gRPC front end: ``mindie.v1.GenerationService`` (native) and the KServe v2 / Triton
``inference.GRPCInferenceService``, with grpc.health.v1 and server reflection.

``build_grpc_server(async_llm, config)`` returns a bound, not yet started ``grpc.aio.Server``.
Imports are lazy so that ``import mindie_llm.server.grpc`` does not load the generated stubs.
Must not import torch or the model code.
"""
from __future__ import annotations

from typing import Any

__all__ = ["build_grpc_server"]


def build_grpc_server(async_llm: Any, config: Any, **kwargs: Any) -> Any:
    """See :func:`mindie_llm.server.grpc.server.build_grpc_server`."""
    from mindie_llm.server.grpc.server import build_grpc_server as _build

    return _build(async_llm, config, **kwargs)
