# SPDX-License-Identifier: Apache-2.0
"""The internal ``mindie.pd.v1.PDInstance`` service of a prefill or decode instance, and
``serve_instance`` (what ``mindie-llm serve`` runs for ``disaggregation.role: prefill | decode``).

Decode, step by step: admit with the first token (``add_prefilled``; waits for free blocks up to
the transfer timeout) -> ask the prefill instance to PushKV into the returned blocks -> wait for
the connector to confirm every layer -> ``kv_ready`` -> stream the engine's outputs. Any failure
on the way cancels the transfer and frees the blocks before the RPC ends UNAVAILABLE with the
reason; a cancelled RPC (the router went away) aborts the request the same way.

Owns the RPC <-> PDInstance mapping. Must not import torch (the engine does).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

import grpc

from mindie_llm.server.pd.common import (CHANNEL_OPTIONS, KEY_HEADER, KeyInterceptor, params_from_json, pd_pb2,
                                         pd_pb2_grpc, service_token)

__all__ = ["PDInstanceServicer", "serve_instance"]

logger = logging.getLogger(__name__)


def _finish_fields(msg: Any, finish_reason: str | None, stop_reason: Any) -> None:
    msg.finish_reason = finish_reason or ""
    if isinstance(stop_reason, str):
        msg.stop_reason = stop_reason
    elif isinstance(stop_reason, int):
        msg.stop_token = stop_reason
        msg.has_stop_token = True


async def _wait(fut: Any) -> Any:
    """Awaits an engine-thread future without cancelling it when the RPC is cancelled (the engine
    thread still settles it, and what it settles may hold resources to give back)."""
    return await asyncio.shield(asyncio.wrap_future(fut))


class PDInstanceServicer(pd_pb2_grpc.PDInstanceServicer):
    def __init__(self, instance: Any, config: Any, secret: bytes) -> None:
        self.inst = instance
        self.config = config
        self._meta = ((KEY_HEADER, service_token(secret)),)
        self._peers: dict[str, Any] = {}
        self._max_queued = config.scheduler.max_queued_requests

    def _peer(self, address: str) -> Any:
        stub = self._peers.get(address)
        if stub is None:
            stub = pd_pb2_grpc.PDInstanceStub(grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
            self._peers[address] = stub
        return stub

    async def _role(self, context: Any, role: str) -> None:
        if self.inst.role != role:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this is a {self.inst.role} instance")

    # ------------------------------------------------------------------ both roles
    async def Info(self, request: Any, context: Any) -> Any:
        eng = self.inst.engine
        return pd_pb2.InfoResponse(role=self.inst.role, model_name=eng.model_name, max_model_len=eng.max_model_len,
                                   vocab_size=eng.arch.vocab_size, block_size=eng.block_size,
                                   kv_connector=self.inst.connector.name, kv_address=self.inst.connector.address)

    async def Stats(self, request: Any, context: Any) -> Any:
        return pd_pb2.StatsResponse(**self.inst.stats())

    # ------------------------------------------------------------------ prefill role
    async def Prefill(self, request: Any, context: Any) -> Any:
        await self._role(context, "prefill")
        try:
            params = params_from_json(request.sampling_json)
            if request.has_seed:
                params.seed = int(request.seed)
            kind = request.WhichOneof("prompt")
            if kind is None:
                raise ValueError("prompt: missing")
            prompt = request.text if kind == "text" else list(request.token_ids.ids)
        except (ValueError, TypeError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)[:512])
        st = self.inst.stats()
        if st["num_waiting"] >= self._max_queued:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the prefill queue is full")
        fut = self.inst.prefill(request.request_id, prompt, params, priority=int(request.priority))
        try:
            r = await _wait(fut)
        except asyncio.CancelledError:      # the router went away: nobody will pull these blocks
            self.inst.abort(request.request_id)
            fut.add_done_callback(lambda f: f.exception() is None and f.result().handle
                                  and self.inst.release(f.result().handle))
            raise
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)[:512])
        except Exception as e:  # noqa: BLE001 - the engine failed this request
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill failed: {e}"[:512])
        msg = pd_pb2.PrefillResponse(prompt_token_ids=r.prompt_token_ids, first_token=r.first_token, text=r.text,
                                     seed=r.seed, finished=r.finished, handle=r.handle, num_blocks=r.num_blocks,
                                     prefill_seconds=r.seconds)
        _finish_fields(msg, r.finish_reason, r.stop_reason)
        return msg

    async def PushKV(self, request: Any, context: Any) -> Any:
        await self._role(context, "prefill")
        timeout = min(max(request.timeout_s, 0.1), self.config.disaggregation.transfer_timeout_s)
        res = await asyncio.get_running_loop().run_in_executor(
            None, self.inst.push_kv, int(request.handle), int(request.transfer_id), request.kv_address,
            list(request.dst_block_ids), timeout)
        return pd_pb2.PushKVResponse(ok=res.ok, reason=res.reason, num_bytes=res.num_bytes, seconds=res.seconds)

    async def Release(self, request: Any, context: Any) -> Any:
        await self._role(context, "prefill")
        released = await _wait(self.inst.release(int(request.handle)))
        return pd_pb2.ReleaseResponse(released=bool(released))

    # ------------------------------------------------------------------ decode role
    async def Decode(self, request: Any, context: Any) -> Any:
        await self._role(context, "decode")
        from mindie_llm.scheduler import NoFreeBlocksError

        inst, rid = self.inst, request.request_id
        try:
            params = params_from_json(request.sampling_json)
        except (ValueError, TypeError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)[:512])
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(out: Any) -> None:
            loop.call_soon_threadsafe(q.put_nowait, out)

        timeout = self.config.disaggregation.transfer_timeout_s
        deadline = time.monotonic() + timeout
        while True:
            try:
                tid, blocks, transfer = await _wait(inst.admit_prefilled(
                    rid, list(request.prompt_token_ids), params, int(request.seed), int(request.first_token), sink,
                    priority=int(request.priority)))
                break
            except NoFreeBlocksError:
                if time.monotonic() > deadline:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no free KV blocks on the decode instance")
                await asyncio.sleep(0.02)
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)[:512])
            except asyncio.CancelledError:
                inst.abort(rid)                 # admitted meanwhile or not: nothing stays behind
                raise
        finished = False
        try:
            t0 = time.monotonic()
            reason = ""
            try:
                push = await self._peer(request.prefill_address).PushKV(
                    pd_pb2.PushKVRequest(handle=request.handle, transfer_id=tid, kv_address=inst.connector.address,
                                         dst_block_ids=blocks.tolist(), timeout_s=timeout),
                    timeout=timeout + 5, metadata=self._meta)
                if not push.ok:
                    reason = push.reason
            except grpc.aio.AioRpcError as e:
                reason = f"prefill instance {request.prefill_address}: {e.code().name}: {e.details()}"
            if not reason:
                res = await _wait(transfer)
                reason = "" if res.ok else res.reason
            if reason:
                await _wait(inst.abort(rid))
                finished = True
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"kv transfer failed: {reason}"[:512])
            await _wait(inst.kv_ready(rid))
            first = True
            while True:
                out = await q.get()
                o = out.outputs[0]
                msg = pd_pb2.DecodeChunk(token_ids=o.token_ids, text=o.text, finished=out.finished)
                if first:
                    msg.transfer_seconds, msg.transfer_bytes, first = time.monotonic() - t0, res.num_bytes, False
                if out.finished:
                    _finish_fields(msg, o.finish_reason, o.stop_reason)
                    finished = True
                yield msg
                if finished:
                    return
        finally:
            if not finished:
                inst.abort(rid)


async def serve_instance(cfg: Any) -> int:
    """Loads the model, starts the connector and the internal service; runs until SIGTERM/SIGINT."""
    from mindie_llm.distributed.kv_transfer import secret_from_env
    from mindie_llm.engine.pd_instance import PDInstance

    d, s = cfg.disaggregation, cfg.server
    secret = secret_from_env(d.auth_key_env)
    if s.grpc_port < 0:
        raise ValueError("server.grpc_port: a prefill/decode instance serves its internal gRPC service there")
    inst = await asyncio.get_running_loop().run_in_executor(None, PDInstance.from_config, cfg)
    server = grpc.aio.server(interceptors=[KeyInterceptor(secret)], options=CHANNEL_OPTIONS + [("grpc.so_reuseport", 0)])
    pd_pb2_grpc.add_PDInstanceServicer_to_server(PDInstanceServicer(inst, inst.config, secret), server)
    port = server.add_insecure_port(f"{s.host}:{s.grpc_port}")
    if port == 0:
        inst.shutdown()
        raise OSError(f"server.grpc_port: cannot bind {s.host}:{s.grpc_port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"mindie-llm {inst.role} ready: grpc={s.host}:{port} kv={inst.connector.address} "
          f"model={inst.engine.model_name} blocks={inst.engine.num_kv_blocks}", flush=True)
    await stop.wait()
    await server.stop(grace=min(s.drain_timeout_s, 5.0))
    inst.shutdown()
    print(f"mindie-llm {inst.role} stopped", flush=True)
    return 0
