# SPDX-License-Identifier: Apache-2.0
"""What the router and the instances share: the internal service's stubs, its key metadata, the
SamplingParams <-> JSON mapping and the error the router raises when an instance fails a request
after it has begun streaming. Must not import torch or the engine."""
from __future__ import annotations

import hmac
import json
from typing import Any, Callable

import grpc

from mindie_llm.sampling_params import SamplingParams
from mindie_llm.server.proto import mindie_pd_pb2 as pd_pb2
from mindie_llm.server.proto import mindie_pd_pb2_grpc as pd_pb2_grpc

__all__ = ["pd_pb2", "pd_pb2_grpc", "KEY_HEADER", "params_to_json", "params_from_json", "PDError", "KeyInterceptor",
           "CHANNEL_OPTIONS", "service_token"]

KEY_HEADER = "x-mindie-pd-key"
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
                   ("grpc.enable_retries", 0)]
_FIELDS = [f for f in SamplingParams.__dataclass_fields__ if not f.startswith("_")]


def params_to_json(params: SamplingParams) -> str:
    return json.dumps({k: getattr(params, k) for k in _FIELDS})


def params_from_json(text: str) -> SamplingParams:
    """SamplingParams from the router's JSON; ValueError naming the field (SamplingParams checks values)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"sampling_json: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError("sampling_json: must be a JSON object")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(f"sampling_json.{unknown[0]}: unknown field")
    bias = data.get("logit_bias")
    if isinstance(bias, dict):   # JSON keys are strings; SamplingParams wants token ids
        if not all(isinstance(k, str) and k.isascii() and k.isdigit() for k in bias):
            raise ValueError("sampling_json.logit_bias: keys must be token ids")
        data["logit_bias"] = {int(k): v for k, v in bias.items()}
    return SamplingParams(**data)


class PDError(RuntimeError):
    """A request failed inside the disaggregated deployment after it was admitted (an instance died
    mid-stream, a transfer failed with no retry left). Carries its own HTTP status and gRPC code so
    that both front ends report it as it is, not as a generic internal error."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


def service_token(secret: bytes) -> str:
    """What callers of the internal service send in ``x-mindie-pd-key``: derived from the shared
    secret, so that a copy seen on the (plaintext) service does not reveal the transfer secret."""
    return hmac.new(secret, b"mindie.pd.v1 internal service", "sha256").hexdigest()


class KeyInterceptor(grpc.aio.ServerInterceptor):
    """Every call of the internal service needs ``x-mindie-pd-key: service_token(secret)``."""

    def __init__(self, secret: bytes) -> None:
        self._secret = service_token(secret).encode()

        async def deny(_request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong {KEY_HEADER}")

        async def deny_stream(_request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong {KEY_HEADER}")
            yield None  # pragma: no cover

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny_stream)

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        got = dict(details.invocation_metadata or ()).get(KEY_HEADER, "")
        if isinstance(got, str) and hmac.compare_digest(got.encode(), self._secret):
            return await continuation(details)
        return self._deny_stream if details.method.endswith("/Decode") else self._deny_unary
