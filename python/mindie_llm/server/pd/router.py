# SPDX-License-Identifier: Apache-2.0
"""PDRouter: the front of a disaggregated deployment, shaped like ``AsyncLLM`` so that today's
OpenAI HTTP and mindie.v1 / KServe gRPC servers run on it unchanged.

``generate`` sends each request to a prefill instance (least queued prompt tokens), streams the
first token as soon as it is sampled there, then to a decode instance (least KV blocks reserved)
which pulls the KV from the prefill instance and streams the rest. Outputs are cumulative
``RequestOutput`` objects, as from AsyncLLM.

Failures: a health thread asks every instance for its stats each ``health_interval_s`` and stops
choosing those that do not answer. A request whose prefill instance fails, or whose decode
instance fails before streaming any decode token (the KV transfer included), is run again on other
instances (at most ``max_retries`` times) with the seed of its first attempt, so its first token
is the same; the pinned blocks of the failed attempt are released. A request whose decode
instance fails after it has streamed tokens ends with a PDError naming the instance.

Owns instance choice, retries, the per-phase timings and the instances' health. Must not import
the engine's model code (torch comes in only through the tokenizer loader).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from mindie_llm.engine.async_llm import EngineDrainingError, QueueFullError, RequestRecord
from mindie_llm.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from mindie_llm.server.pd.common import (CHANNEL_OPTIONS, KEY_HEADER, PDError, params_to_json, pd_pb2, pd_pb2_grpc,
                                         service_token)

__all__ = ["PDRouter", "Instance"]

logger = logging.getLogger(__name__)

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
              grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass
class Instance:
    """The router's view of one instance."""

    address: str
    role: str
    up: bool = False
    stats: Any = None                       # the last StatsResponse
    inflight: int = 0                       # requests in a phase on it now (router side)
    inflight_tokens: int = 0                # prefill: prompt tokens sent and not yet answered
    reserved_blocks: int = 0                # decode: blocks of the requests it is decoding for us
    failures: int = 0
    _stub: Any = field(default=None, repr=False)
    _sync: Any = field(default=None, repr=False)


class PDRouter:
    def __init__(self, config: Any, *, tokenizer: Any, model_name: str, max_model_len: int, block_size: int,
                 secret: bytes, start_health: bool = True) -> None:
        d = config.disaggregation
        self.config = config
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.block_size = block_size
        self._meta = ((KEY_HEADER, service_token(secret)),)
        self.prefill = [Instance(a, "prefill") for a in d.instance_list("prefill_instances")]
        self.decode = [Instance(a, "decode") for a in d.instance_list("decode_instances")]
        self._retries = d.max_retries
        self._interval = d.health_interval_s
        self._timeout = d.transfer_timeout_s
        self._listeners: list[Callable[[RequestRecord], None]] = []
        self._active: set[str] = set()
        self._draining = False
        self._stop = threading.Event()
        self._rr = {"prefill": itertools.count(), "decode": itertools.count()}   # tie-break rotation
        self.phase_listeners: list[Callable[[str, str, float, int], None]] = []   # (phase, instance, s, bytes)
        self.events: dict[tuple[str, str], int] = {}                               # (kind, phase) -> count
        self._health = threading.Thread(target=self._health_loop, name="pd-router-health", daemon=True)
        if start_health:
            self._poll_once()
            self._health.start()

    # ------------------------------------------------------------------ start-up
    @classmethod
    def from_config(cls, config: Any) -> "PDRouter":
        """Loads the tokenizer and waits (``startup_timeout_s``) until every instance answers Info;
        they must serve the same model. Raises ValueError naming the key on a mismatch."""
        from mindie_llm.distributed.kv_transfer import secret_from_env

        d = config.disaggregation
        secret = secret_from_env(d.auth_key_env)
        tokenizer = _load_tokenizer(config.model)
        infos: dict[str, Any] = {}
        deadline = time.monotonic() + d.startup_timeout_s
        addresses = d.instance_list("prefill_instances") + d.instance_list("decode_instances")
        meta = ((KEY_HEADER, service_token(secret)),)
        while len(infos) < len(addresses):
            for a in addresses:
                if a in infos:
                    continue
                try:
                    with grpc.insecure_channel(a, options=CHANNEL_OPTIONS) as ch:
                        infos[a] = pd_pb2_grpc.PDInstanceStub(ch).Info(pd_pb2.InfoRequest(), timeout=2, metadata=meta)
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                        raise ValueError(f"disaggregation.auth_key_env: instance {a} refused the key") from None
            if len(infos) < len(addresses):
                if time.monotonic() > deadline:
                    missing = ", ".join(a for a in addresses if a not in infos)
                    raise ValueError(f"disaggregation.startup_timeout_s: no answer from {missing}")
                time.sleep(0.25)
        for key in ("prefill_instances", "decode_instances"):
            for a in d.instance_list(key):
                if infos[a].role != key.split("_")[0]:
                    raise ValueError(f"disaggregation.{key}: {a} is a {infos[a].role} instance")
        first = infos[addresses[0]]
        for a, info in infos.items():
            if (info.model_name, info.block_size) != (first.model_name, first.block_size):
                raise ValueError(f"disaggregation.decode_instances: {a} serves {info.model_name} (block size "
                                 f"{info.block_size}), {addresses[0]} serves {first.model_name} ({first.block_size})")
        return cls(config, tokenizer=tokenizer, model_name=config.model.served_model_name or first.model_name,
                   max_model_len=min(i.max_model_len for i in infos.values()), block_size=first.block_size,
                   secret=secret)

    # ------------------------------------------------------------------ AsyncLLM surface
    def add_listener(self, fn: Callable[[RequestRecord], None]) -> None:
        self._listeners.append(fn)

    @property
    def instances(self) -> list[Instance]:
        return self.prefill + self.decode

    def get_stats(self) -> EngineStats:
        st = [i.stats for i in self.instances if i.stats is not None]
        return EngineStats(num_waiting=sum(s.num_waiting for s in st), num_running=sum(s.num_running for s in st),
                           num_kv_blocks=sum(s.num_kv_blocks for s in st),
                           num_free_kv_blocks=sum(s.num_free_kv_blocks for s in st), last_step_time=time.monotonic())

    @property
    def num_active_requests(self) -> int:
        return len(self._active)

    def is_live(self) -> bool:
        return any(i.up for i in self.prefill) and any(i.up for i in self.decode)

    def is_ready(self) -> bool:
        return not self._draining and self.is_live()

    @property
    def is_draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        self._draining = True

    async def wait_drained(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._active

    async def abort(self, request_id: str) -> None:
        """Requests end when their consumer closes the stream (which cancels the instance RPCs)."""

    async def shutdown(self) -> None:
        self._draining = True
        self._stop.set()
        for inst in self.instances:
            if inst._stub is not None:
                await inst._stub[1].close()
                inst._stub = None

    # ------------------------------------------------------------------ choice
    def _aio(self, inst: Instance) -> Any:
        if inst._stub is None:
            ch = grpc.aio.insecure_channel(inst.address, options=CHANNEL_OPTIONS)
            inst._stub = (pd_pb2_grpc.PDInstanceStub(ch), ch)
        return inst._stub[0]

    def _choose(self, pool: list[Instance], excluded: set[str], key: Callable[[Instance], float]) -> Instance:
        """The best live instance not yet failed by this request; else a live one that failed it
        (a retry on the only instance there is); else any (health may lag behind a restart)."""
        live = ([i for i in pool if i.up and i.address not in excluded] or [i for i in pool if i.up]
                or [i for i in pool if i.address not in excluded])
        if not live:
            raise PDError(f"no {pool[0].role} instance is available")
        rr = next(self._rr[pool[0].role])
        return min(live, key=lambda i: (key(i), (pool.index(i) - rr) % len(pool)))

    def _count(self, kind: str, phase: str) -> None:
        self.events[(kind, phase)] = self.events.get((kind, phase), 0) + 1

    def _phase(self, phase: str, inst: Instance, seconds: float, nbytes: int = 0) -> None:
        for fn in self.phase_listeners:
            fn(phase, inst.address, seconds, nbytes)

    # ------------------------------------------------------------------ generate
    async def generate(self, prompt: str | list[int], params: Any, request_id: str, *,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        record = RequestRecord(request_id=request_id, outcome="error", arrival_time=time.monotonic())
        finished = False
        try:
            if self._draining:
                record.outcome = "rejected_draining"
                raise EngineDrainingError("the server is shutting down")
            if getattr(params, "n", 1) != 1:
                record.outcome = "rejected_invalid"
                raise ValueError("n: the PD router serves n = 1 only")
            for name in ("logprobs", "prompt_logprobs"):
                if getattr(params, name, None) is not None:
                    record.outcome = "rejected_invalid"
                    raise ValueError(f"{name}: not supported through the PD router yet")
            self._active.add(request_id)
            async for out in self._run(prompt, params, request_id, priority, record):
                if record.first_token_time is None:
                    record.first_token_time = time.monotonic()
                record.num_prompt_tokens = len(out.prompt_token_ids)
                record.num_generation_tokens = len(out.outputs[0].token_ids)
                if out.finished:
                    finished = True
                    record.outcome = "length" if out.outputs[0].finish_reason == "length" else "stop"
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            record.outcome = "cancelled"
            raise
        except QueueFullError:
            record.outcome = "rejected_queue_full"
            raise
        except ValueError:
            if record.first_token_time is None:
                record.outcome = "rejected_invalid"
            raise
        finally:
            self._active.discard(request_id)
            if not finished and record.outcome in ("stop", "length"):
                record.outcome = "error"
            record.finished_time = time.monotonic()
            for fn in self._listeners:
                try:
                    fn(record)
                except Exception:  # noqa: BLE001
                    logger.exception("request listener failed")

    async def _run(self, prompt: Any, params: Any, rid: str, priority: int,
                   record: RequestRecord) -> AsyncIterator[RequestOutput]:
        sampling = params_to_json(params)
        seed = params.seed
        sent: list[int] = []
        bad_prefill: set[str] = set()
        bad_decode: set[str] = set()
        est = len(prompt) if not isinstance(prompt, str) else max(len(prompt) // 4, 1)
        metrics = RequestMetrics(arrival_time=time.time())
        for attempt in range(self._retries + 1):
            last = attempt == self._retries
            # -------- prefill
            p = self._choose(self.prefill, bad_prefill, lambda i: i.inflight_tokens)
            req = pd_pb2.PrefillRequest(request_id=f"{rid}#{attempt}", sampling_json=sampling,
                                        seed=seed or 0, has_seed=seed is not None, priority=priority)
            if isinstance(prompt, str):
                req.text = prompt
            else:
                req.token_ids.ids.extend(prompt)
            p.inflight += 1
            p.inflight_tokens += est
            t0 = time.monotonic()
            try:
                pre = await self._aio(p).Prefill(req, metadata=self._meta)
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.INVALID_ARGUMENT and not sent:
                    raise ValueError(e.details()) from None
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED and len(bad_prefill) + 1 >= len(self.prefill) and not sent:
                    raise QueueFullError("every prefill instance's queue is full; retry later") from None
                self._count("retry" if not last else "failure", "prefill")
                logger.warning("prefill on %s failed for %s: %s %s", p.address, rid, code.name, e.details())
                if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    p.failures += 1
                bad_prefill.add(p.address)
                if last:
                    raise PDError(f"prefill failed on {p.address}: {e.details()}") from None
                continue
            finally:
                p.inflight -= 1
                p.inflight_tokens -= est
            self._phase("prefill", p, time.monotonic() - t0)
            seed = pre.seed
            prompt_ids = list(pre.prompt_token_ids)
            stop_reason = pre.stop_reason or (pre.stop_token if pre.has_stop_token else None)
            held = (p, pre.handle) if not pre.finished else None     # pinned until a decode pulls it
            if not sent:
                sent = [pre.first_token]
                metrics.first_token_time = time.time()
                try:
                    yield self._output(rid, prompt, prompt_ids, sent, pre.text, pre.finished,
                                       pre.finish_reason or None, stop_reason, metrics)
                except GeneratorExit:        # the client left after the first token: unpin now
                    if held is not None:
                        asyncio.ensure_future(self._release(*held))
                    raise
            elif sent[0] != pre.first_token:
                raise PDError(f"the retry on {p.address} sampled a different first token")
            if pre.finished:
                return
            # -------- decode (pulls the KV from p)
            d = self._choose(self.decode, bad_decode, lambda i: i.reserved_blocks / max(_total(i), 1))
            blocks = -(-(len(prompt_ids) + params.max_tokens) // max(self.block_size, 1))
            d.inflight += 1
            d.reserved_blocks += blocks
            call = self._aio(d).Decode(pd_pb2.DecodeRequest(
                request_id=f"{rid}#{attempt}", prompt_token_ids=prompt_ids, sampling_json=sampling, seed=seed,
                first_token=pre.first_token, prefill_address=p.address, handle=pre.handle, priority=priority),
                metadata=self._meta)
            t1 = time.monotonic()
            streamed_decode = False
            try:
                async for chunk in call:
                    if chunk.transfer_bytes:
                        self._phase("transfer", d, chunk.transfer_seconds, chunk.transfer_bytes)
                    toks = list(chunk.token_ids)
                    if toks[:len(sent)] != sent[:len(toks)]:
                        raise PDError(f"decode instance {d.address} returned tokens that disagree with those "
                                      "already streamed")
                    if len(toks) > len(sent) or chunk.finished:
                        sent = toks
                        streamed_decode = True
                        stop_reason = chunk.stop_reason or (chunk.stop_token if chunk.has_stop_token else None)
                        yield self._output(rid, prompt, prompt_ids, sent, chunk.text, chunk.finished,
                                           chunk.finish_reason or None, stop_reason, metrics)
                    if chunk.finished:
                        self._phase("decode", d, time.monotonic() - t1)
                        return
                raise PDError(f"decode instance {d.address} ended the stream early")
            except grpc.aio.AioRpcError as e:
                transfer = "kv transfer failed" in (e.details() or "")
                phase = "transfer" if transfer else "decode"
                logger.warning("decode on %s failed for %s: %s %s", d.address, rid, e.code().name, e.details())
                if streamed_decode or e.code() not in _RETRYABLE or last:
                    self._count("failure", phase)
                    raise PDError(f"decode instance {d.address} failed the request: {e.details()}") from None
                self._count("retry", phase)
                if not transfer:
                    d.failures += 1
                    bad_decode.add(d.address)
                else:
                    bad_prefill.add(p.address)
                await self._release(p, pre.handle)
            finally:
                call.cancel()
                d.inflight -= 1
                d.reserved_blocks -= blocks
        raise PDError("no attempt left")  # pragma: no cover - the loop returns or raises

    async def _release(self, p: Instance, handle: int) -> None:
        try:
            await self._aio(p).Release(pd_pb2.ReleaseRequest(handle=handle), timeout=30, metadata=self._meta)
        except grpc.aio.AioRpcError:
            pass                             # dead, or it released on its own (pin timeout)

    def _output(self, rid: str, prompt: Any, prompt_ids: list[int], tokens: list[int], text: str, finished: bool,
                finish_reason: str | None, stop_reason: Any, metrics: RequestMetrics) -> RequestOutput:
        if finished:
            metrics.finished_time = time.time()
        metrics.num_prompt_tokens = len(prompt_ids)
        return RequestOutput(request_id=rid, prompt=prompt if isinstance(prompt, str) else None,
                             prompt_token_ids=prompt_ids, prompt_logprobs=None,
                             outputs=[CompletionOutput(index=0, text=text, token_ids=list(tokens),
                                                       finish_reason=finish_reason if finished else None,
                                                       stop_reason=stop_reason if finished else None)],
                             finished=finished, metrics=metrics)

    # ------------------------------------------------------------------ health
    def _poll_once(self) -> None:
        for inst in self.instances:
            if inst._sync is None:
                ch = grpc.insecure_channel(inst.address, options=CHANNEL_OPTIONS)
                inst._sync = (pd_pb2_grpc.PDInstanceStub(ch), ch)
            try:
                inst.stats = inst._sync[0].Stats(pd_pb2.StatsRequest(), timeout=max(self._interval * 2, 1.0),
                                                 metadata=self._meta)
                if not inst.up:
                    logger.warning("%s instance %s is up", inst.role, inst.address)
                inst.up = bool(inst.stats.live)
            except grpc.RpcError:
                if inst.up:
                    logger.warning("%s instance %s stopped answering: no new requests go there", inst.role,
                                   inst.address)
                inst.up = False

    def _health_loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._poll_once()
        for inst in self.instances:
            if inst._sync is not None:
                inst._sync[1].close()


def _total(inst: Instance) -> int:
    return int(inst.stats.num_kv_blocks) if inst.stats is not None else 1


def _load_tokenizer(model_config: Any) -> Any:
    """The served model's tokenizer without its weights (None for dummy weights)."""
    from mindie_llm.loader import resolve_format
    from mindie_llm.loader.gguf_loader import read_gguf_metadata
    from mindie_llm.tokenizer.tokenizer import Tokenizer

    def from_gguf(path: str) -> Any:
        return Tokenizer.from_gguf_fields(read_gguf_metadata(path), name=path)

    path = model_config.tokenizer
    if path:
        return from_gguf(path) if path.endswith(".gguf") else Tokenizer.from_hf_dir(path)
    fmt, path = resolve_format(model_config.path, model_config.load_format)
    if fmt == "gguf":
        return from_gguf(path)
    if fmt == "dummy" or path is None:
        return None
    return Tokenizer.from_hf_dir(path)
