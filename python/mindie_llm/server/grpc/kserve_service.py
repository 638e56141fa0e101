# SPDX-License-Identifier: Apache-2.0
"""The KServe v2 / Triton ``inference.GRPCInferenceService`` over an ``AsyncLLM``.

Owns liveness/readiness/metadata answers, ModelInfer (one response with the whole text) and
ModelStreamInfer (decoupled: one response per text delta, ``triton_final_response`` marks the last
one; errors of one request come back as ``error_message`` while the stream stays open). Request
decoding lives in kserve_params.py; the message classes come from a private descriptor pool
(kserve_stubs.py) so that this module and tritonclient can share a process.

Must not import torch or the model code; talks to the engine only through AsyncLLM.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

import grpc

from mindie_llm.sampling_params import SamplingParams
from mindie_llm.server.grpc.common import DeltaTracker, new_request_id, off_loop, timings_ns
from mindie_llm.server.grpc.errors import RpcError, abort_with, last_output, status_for
from mindie_llm.server.grpc.kserve_params import (INPUT_SAMPLING, INPUT_STREAM, INPUT_TEXT, OUTPUT_TEXT,
                                                  KServeRequest, decode_request, option_tensor_types,
                                                  serialize_bytes_tensor)
from mindie_llm.server.grpc.kserve_stubs import load_kserve_messages
from mindie_llm.server.protocol_limits import RequestLimits

__all__ = ["KServeServicer", "SERVICE_NAME"]

logger = logging.getLogger(__name__)

pb2 = load_kserve_messages()   # a private descriptor pool: see kserve_stubs.py
SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_VERSION = "1"
_MAX_STREAM_REQUESTS = 256   # concurrent requests on one ModelStreamInfer stream


class KServeServicer:
    """inference.GRPCInferenceService over one AsyncLLM."""

    def __init__(self, async_llm: Any, config: Any):
        self.llm = async_llm
        self.config = config
        self.limits = RequestLimits.from_config(config)

    # ------------------------------------------------------------------ health and metadata
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb2.ServerLiveResponse(live=bool(self.llm.is_live()))

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb2.ServerReadyResponse(ready=bool(self.llm.is_ready()))

    def _known(self, name: str, version: str) -> bool:
        return name == self.llm.model_name and version in ("", _VERSION)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb2.ModelReadyResponse(ready=self._known(request.name, request.version) and bool(self.llm.is_ready()))

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        from mindie_llm import __version__

        return pb2.ServerMetadataResponse(name="mindie-llm", version=__version__, extensions=["parameters"])

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not self._known(request.name, request.version):
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"name: unknown model {request.name[:128]!r} version {request.version[:16]!r}")
        T = pb2.ModelMetadataResponse.TensorMetadata
        return pb2.ModelMetadataResponse(
            name=self.llm.model_name, versions=[_VERSION], platform="mindie-llm",
            inputs=[T(name=INPUT_TEXT, datatype="BYTES", shape=[1]), T(name=INPUT_STREAM, datatype="BOOL", shape=[1]),
                    T(name=INPUT_SAMPLING, datatype="BYTES", shape=[1]),
                    *(T(name=n, datatype=dt, shape=[1]) for n, dt in option_tensor_types().items())],
            outputs=[T(name=OUTPUT_TEXT, datatype="BYTES", shape=[-1])])

    # ------------------------------------------------------------------ inference
    def _prepare(self, request: Any) -> tuple[KServeRequest, SamplingParams]:
        if request.model_name != self.llm.model_name:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"model_name: unknown model {request.model_name[:128]!r}; "
                           f"this server serves {self.llm.model_name!r}")
        if request.model_version not in ("", _VERSION):
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"model_version: unknown version {request.model_version[:16]!r}")
        for o in request.outputs:
            if o.name != OUTPUT_TEXT:
                raise RpcError(_INVALID, f"outputs: unknown output {o.name[:64]!r}; this model has {OUTPUT_TEXT}")
        decoded = decode_request(request)
        s = decoded.sampling
        self.limits.check(max_tokens=s.get("max_tokens"), stop=s.get("stop"))
        s.setdefault("max_tokens", min(16, self.limits.max_tokens_limit))
        return decoded, SamplingParams(**s)

    def _response(self, request: Any, text: str, out: Any | None, *, final: bool | None,
                  finish_reason: str | None = None) -> Any:
        resp = pb2.ModelInferResponse(model_name=self.llm.model_name, model_version=_VERSION, id=request.id)
        resp.outputs.add(name=OUTPUT_TEXT, datatype="BYTES", shape=[1])
        resp.raw_output_contents.append(serialize_bytes_tensor([text.encode("utf-8")]))
        if finish_reason:
            resp.parameters["finish_reason"].string_param = finish_reason
        if out is not None:
            resp.parameters["prompt_tokens"].int64_param = len(out.prompt_token_ids)
            resp.parameters["completion_tokens"].int64_param = sum(len(o.token_ids) for o in out.outputs)
            for k, v in timings_ns(out.metrics).items():
                resp.parameters[k].int64_param = v
        if final is not None:
            resp.parameters["triton_final_response"].bool_param = final
        return resp

    def _empty_final(self, request: Any, out: Any) -> Any:
        """A response without outputs that only says "this request is complete" (plus usage and
        timings), as Triton sends for ``triton_enable_empty_final_response``."""
        resp = pb2.ModelInferResponse(model_name=self.llm.model_name, model_version=_VERSION, id=request.id)
        resp.parameters["triton_final_response"].bool_param = True
        resp.parameters["prompt_tokens"].int64_param = len(out.prompt_token_ids)
        resp.parameters["completion_tokens"].int64_param = sum(len(o.token_ids) for o in out.outputs)
        for k, v in timings_ns(out.metrics).items():
            resp.parameters[k].int64_param = v
        return resp

    async def _admit(self, request: Any, *, unary: bool = False) -> tuple[KServeRequest, AsyncIterator[Any], Any]:
        """Validates and admits; returns (decoded, generator, first output). Raises on error."""
        decoded, params = self._prepare(request)
        if unary and decoded.stream:
            raise RpcError(_INVALID, "stream: streaming needs ModelStreamInfer (a decoupled stream)")
        ids = list(await off_loop(self.llm, self.llm.tokenizer.encode, decoded.prompt))
        gen = self.llm.generate(ids, params, new_request_id(), priority=decoded.priority)
        try:
            first = await gen.__anext__()
        except BaseException:
            await gen.aclose()
            raise
        return decoded, gen, first

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _, gen, last = await self._admit(request, unary=True)
        except Exception as e:  # noqa: BLE001 - mapped to a status code
            await abort_with(context, e)
        last = await last_output(gen, context, last)
        sample = last.outputs[0]
        return self._response(request, sample.text, last, final=None, finish_reason=sample.finish_reason)

    async def _stream_one(self, request: Any, send: "asyncio.Queue[Any]") -> None:
        """Runs one request of a ModelStreamInfer stream, putting its responses on ``send``."""
        try:
            decoded, gen, out = await self._admit(request)
        except Exception as e:  # noqa: BLE001
            code, message = status_for(e)
            await send.put(pb2.ModelStreamInferResponse(error_message=f"{code.name}: {message}"))
            return
        admitted = True
        try:
            if decoded.stream is False:     # one response with the whole text
                async for nxt in gen:
                    out = nxt
                s = out.outputs[0]
                await send.put(pb2.ModelStreamInferResponse(
                    infer_response=self._response(request, s.text, out, final=True, finish_reason=s.finish_reason)))
                return
            tracker = DeltaTracker()
            sent_final = False
            while True:
                for d in tracker.deltas(out.outputs):
                    last = out.finished and d.finish_reason is not None and not decoded.empty_final_response
                    resp = self._response(request, d.text, out if last else None, final=last,
                                          finish_reason=d.finish_reason)
                    await send.put(pb2.ModelStreamInferResponse(infer_response=resp))
                    sent_final = sent_final or last
                if out.finished:
                    if not sent_final:   # Triton's empty final response (asked for, or nothing left)
                        await send.put(pb2.ModelStreamInferResponse(infer_response=self._empty_final(request, out)))
                    return
                try:
                    out = await gen.__anext__()
                except StopAsyncIteration:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            code, message = status_for(e, admitted=admitted)
            await send.put(pb2.ModelStreamInferResponse(error_message=f"{code.name}: {message}"))
        finally:
            await gen.aclose()

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[Any],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        send: asyncio.Queue[Any] = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        reader_done, task_done = object(), object()
        counts = {"started": 0, "finished": 0}

        async def run_one(req: Any) -> None:
            try:
                await self._stream_one(req, send)
            finally:
                send.put_nowait(task_done)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    if len(tasks) >= _MAX_STREAM_REQUESTS:
                        send.put_nowait(pb2.ModelStreamInferResponse(
                            error_message=f"RESOURCE_EXHAUSTED: at most {_MAX_STREAM_REQUESTS} requests "
                                          "in flight on one stream"))
                        continue
                    counts["started"] += 1
                    t = asyncio.ensure_future(run_one(req))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a malformed message ends the stream
                code, message = status_for(e)
                send.put_nowait(RpcError(code, message))
            finally:
                send.put_nowait(reader_done)

        reader = asyncio.ensure_future(read())
        reading = True
        try:
            while reading or counts["finished"] < counts["started"]:
                item = await send.get()
                if item is reader_done:
                    reading = False
                elif item is task_done:
                    counts["finished"] += 1
                elif isinstance(item, RpcError):
                    await context.abort(item.code, item.message)
                else:
                    yield item
        finally:
            reader.cancel()
            for t in list(tasks):
                t.cancel()   # the client went away: close the generators, aborting the requests
