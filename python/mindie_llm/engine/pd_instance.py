# SPDX-License-Identifier: Apache-2.0
"""PDInstance: a prefill or decode instance of a disaggregated deployment, around one LLMEngine.

Prefill role: ``prefill`` admits a request and resolves once its prompt KV is written and its
first token sampled (the scheduler finishes it with PREFILL_DONE and keeps its blocks pinned);
``push_kv`` sends the pinned blocks to a decode instance through the KV connector and then
``release``-s them; pinned blocks nobody pulls within ``disaggregation.kv_pin_timeout_s`` are
released by the engine thread. A first token that ends the request (EOS, stop string,
max_tokens = 1) releases at once and reports the request finished.

Decode role: ``admit_prefilled`` admits a request prefilled elsewhere with its first token and
the seed it was drawn with (scheduler ``add_prefilled``: the receiving blocks come back) and
registers the transfer with the connector; ``kv_ready`` lets it decode; outputs go to the sink
given at admission. Seeded sampling draws token p with ``mix_seed(seed, p)``, so the decode side,
which continues at output position 1 with the same seed, draws what a colocated engine would. A
preempted decode request is recomputed locally from prompt + output tokens (the scheduler's
recompute path); nothing goes back to a prefill instance.

Owns the engine thread (the only one that touches the engine) and the hand-off bookkeeping. Must
not import the server. Reaches into LLMEngine's request tables (``_groups``, ``_samples``,
``_unsent``) in ``_admit_prefilled`` only, and into the in-process driver worker's KV caches for
the connector: those are the seams to move when the engine exposes an admission API and the
executor more than one worker (tensor parallelism: one connector per rank).
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any

import numpy as np

from mindie_llm.config import EngineConfig
from mindie_llm.distributed.kv_transfer.base import KVConnector, TransferResult
from mindie_llm.sampling_params import SamplingParams

__all__ = ["PDInstance", "PrefillResult", "build_connector"]

logger = logging.getLogger(__name__)

_INT63 = (1 << 63) - 1


@dataclass
class PrefillResult:
    prompt_token_ids: list[int]
    first_token: int
    text: str
    seed: int
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    handle: int                 # the pinned request (0 when finished)
    num_blocks: int
    seconds: float


def build_connector(config: EngineConfig, kv_caches: list) -> KVConnector:
    """The connector ``disaggregation.kv_connector`` names: ``tcp`` listening on
    kv_transfer_host:port, or ``p2p`` on the transfer group (blocks until every member joined;
    its payload over ``disaggregation.transfer_backend``: auto = NCCL for a CUDA pool, HCCL for an
    NPU one, gloo for a CPU one)."""
    import ssl

    from mindie_llm.distributed.kv_transfer import secret_from_env
    from mindie_llm.distributed.kv_transfer.tcp import TcpConnector

    d = config.disaggregation
    if d.kv_connector == "p2p":
        from mindie_llm.distributed.kv_transfer.p2p import P2PConnector, make_transfer_group
        from mindie_llm.distributed.parallel_state import resolve_backend

        device = kv_caches[0].device.type
        backend = resolve_backend(d.transfer_backend, device, {"cuda": "nccl", "npu": "hccl"}.get(device, "gloo"),
                                  key="disaggregation.transfer_backend")
        group = make_transfer_group(d.transfer_group_address, d.transfer_group_rank, d.transfer_group_size,
                                    timeout_s=max(d.transfer_timeout_s, 120.0), backend=backend)
        return P2PConnector(kv_caches, group=group, receive=d.role == "decode")
    secret = secret_from_env(d.auth_key_env)
    server_tls = client_tls = None
    if d.kv_tls_cert_file:
        server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_tls.load_cert_chain(d.kv_tls_cert_file, d.kv_tls_key_file)
        client_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_tls.check_hostname = False        # peers are addressed by IP; the CA pins them
        client_tls.load_verify_locations(d.kv_tls_ca_file or d.kv_tls_cert_file)
    return TcpConnector(kv_caches, secret=secret, host=d.kv_transfer_host, port=d.kv_transfer_port,
                        server_tls=server_tls, client_tls=client_tls, stall_s=d.test_stall_transfer_s)


def _settle(fut: Future, value: Any = None, exc: BaseException | None = None) -> None:
    """Resolves ``fut`` unless its waiter already gave up (a cancelled RPC cancels its future)."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)
    except InvalidStateError:
        pass


class PDInstance:
    def __init__(self, engine: Any, config: EngineConfig, connector: KVConnector | None = None) -> None:
        self.engine = engine
        self.config = config
        self.role = config.disaggregation.role
        assert self.role in ("prefill", "decode"), self.role
        self.connector = connector or build_connector(config, engine.executor.driver.kv_caches)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pinned: dict[int, float] = {}            # prefill: handle -> release deadline (monotonic)
        self._sending: set[int] = set()                # prefill: handles being pushed now
        self._pin_lock = threading.Lock()              # guards _pinned and _sending (push_kv runs off-thread)
        self._waiters: dict[str, tuple] = {}           # prefill: rid -> (fut, t0, int id, P, params)
        self._sinks: dict[str, Callable[[Any], None]] = {}               # decode: rid -> sink
        self._ids: dict[str, int] = {}                 # decode: rid -> int id
        self.queued_prompt_tokens = 0
        self.transfer_failures = 0
        self.pin_timeouts = 0
        self._stop = threading.Event()
        self.dead = False
        self._thread = threading.Thread(target=self._run, name=f"mindie-pd-{self.role}", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "PDInstance":
        from mindie_llm.engine.llm_engine import LLMEngine

        engine = LLMEngine(config)
        return cls(engine, engine.config)

    # ------------------------------------------------------------------ engine-thread calls
    def call(self, fn: Callable[[], Any]) -> Future:
        """Runs ``fn()`` on the engine thread; the future carries its result or exception."""
        fut: Future = Future()
        if self.dead:
            fut.set_exception(RuntimeError("the engine has stopped"))
        else:
            self._inbox.put((fn, fut))
        return fut

    def _busy(self) -> bool:
        s = self.engine.scheduler
        return s.num_waiting + s.num_running > 0

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    item = self._inbox.get(timeout=0 if self._busy() else 0.02)
                except queue.Empty:
                    item = None
                while item is not None:
                    fn, fut = item
                    try:
                        _settle(fut, fn())
                    except Exception as e:  # noqa: BLE001 - handed to the caller
                        _settle(fut, exc=e)
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        item = None
                self._expire_pins()
                if self._busy():
                    self._deliver(self.engine.step())
        except Exception:
            logger.exception("the %s instance's engine loop stopped", self.role)
            self.dead = True
            for fut, *_ in self._waiters.values():
                _settle(fut, exc=RuntimeError("the engine has stopped"))

    def _deliver(self, outputs: list) -> None:
        for out in outputs:
            rid = out.request_id
            if rid in self._waiters and out.finished:
                self._prefill_done(rid, out)
            sink = self._sinks.get(rid)
            if sink is not None:
                if out.finished:
                    self._sinks.pop(rid, None)
                    self._ids.pop(rid, None)
                try:
                    sink(out)
                except Exception:  # a broken consumer must not stop the engine
                    logger.exception("decode sink of %s failed", rid)

    # ------------------------------------------------------------------ prefill role
    def prefill(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                priority: int = 0) -> Future:
        """Admits ``request_id`` (a ValueError naming the field resolves the future if refused);
        resolves to a PrefillResult once the first token is sampled."""
        fut: Future = Future()
        params = params.clone()
        if params.seed is None:                     # fixed here so that the decode side continues it
            params.seed = random.randint(0, _INT63)

        def admit() -> None:
            eng = self.engine
            eng.add_request(request_id, prompt, params, priority=priority)
            group = eng._groups[request_id]
            int_id = group.samples[0].int_id
            self._waiters[request_id] = (fut, time.monotonic(), int_id, len(group.prompt_token_ids), params)
            self.queued_prompt_tokens += len(group.prompt_token_ids)

        def on_admit(f: Future) -> None:
            if not f.cancelled() and f.exception() is not None:
                _settle(fut, exc=f.exception())
        self.call(admit).add_done_callback(on_admit)
        return fut

    def _prefill_done(self, rid: str, out: Any) -> None:
        fut, t0, int_id, num_prompt, params = self._waiters.pop(rid)
        self.queued_prompt_tokens -= num_prompt
        o = out.outputs[0]
        pinned = o.finish_reason == "stop" and o.stop_reason is None and len(o.token_ids) == 1
        num_blocks = 0
        if pinned:
            num_blocks = -(-num_prompt // self.engine.block_size)
            with self._pin_lock:
                self._pinned[int_id] = time.monotonic() + self.config.disaggregation.kv_pin_timeout_s
        else:
            self._release_now(int_id)                # a stop string leaves PREFILL_DONE blocks pinned
        if not o.token_ids:
            _settle(fut, exc=RuntimeError(f"prefill of {rid} ended without a token ({o.finish_reason})"))
            return
        text = o.text if not pinned else self._open_text(list(out.prompt_token_ids), int(o.token_ids[0]), params)
        _settle(fut, PrefillResult(
            prompt_token_ids=list(out.prompt_token_ids), first_token=int(o.token_ids[0]), text=text,
            seed=int(params.seed),
            finished=not pinned, finish_reason=None if pinned else o.finish_reason,
            stop_reason=None if pinned else o.stop_reason, handle=int_id if pinned else 0,
            num_blocks=num_blocks, seconds=time.monotonic() - t0))

    def _open_text(self, prompt_ids: list[int], first_token: int, params: SamplingParams) -> str:
        """The text of the first token as a request that goes on sees it (what the decode instance's
        detokenizer will hold after admission): incomplete UTF-8 and a possible stop-string start
        held back, where the finished prefill output flushed them."""
        from mindie_llm.engine.detokenizer import IncrementalDetokenizer
        from mindie_llm.engine.llm_engine import _NULL_DECODER

        d = IncrementalDetokenizer(self.engine.tokenizer or _NULL_DECODER, prompt_ids,
                                   skip_special_tokens=params.skip_special_tokens, stop=params.stop_strings,
                                   min_tokens=params.min_tokens,
                                   include_stop_str_in_output=params.include_stop_str_in_output)
        d.update([first_token])
        return d.visible_text(False)

    def _release_now(self, handle: int) -> bool:
        """Engine thread: frees the pinned blocks of ``handle`` (the caller has unpinned it)."""
        with self._pin_lock:
            self._pinned.pop(handle, None)
        try:
            self.engine.scheduler.release(handle)
            return True
        except (KeyError, ValueError, RuntimeError):
            return False

    def _unpin(self, handle: int, *, expired_only: bool = False) -> bool:
        """Takes ``handle`` out of the pinned set unless a transfer holds it; True if it did."""
        with self._pin_lock:
            deadline = self._pinned.get(handle)
            if deadline is None or handle in self._sending or (expired_only and deadline > time.monotonic()):
                return False
            del self._pinned[handle]
            return True

    def _expire_pins(self) -> None:
        if not self._pinned:
            return
        for handle in list(self._pinned):
            if self._unpin(handle, expired_only=True):
                logger.warning("prefill: request %d was not pulled within %.1fs; releasing its blocks", handle,
                               self.config.disaggregation.kv_pin_timeout_s)
                self.pin_timeouts += 1
                self._release_now(handle)

    def release(self, handle: int) -> Future:
        return self.call(lambda: self._unpin(handle) and self._release_now(handle))

    def push_kv(self, handle: int, transfer_id: int, address: str, dst_block_ids: np.ndarray,
                timeout_s: float) -> TransferResult:
        """Blocking (call from a worker thread, not the engine thread): sends the pinned blocks of
        ``handle`` into the receiver's ``dst_block_ids`` and releases them whatever the outcome.
        The claim does not wait for the engine thread (a long step must not eat the deadline):
        the scheduler's block query is thread-safe and a claimed handle cannot be released."""
        with self._pin_lock:
            claimed = handle in self._pinned and handle not in self._sending
            if claimed:
                self._sending.add(handle)
        if not claimed:
            return TransferResult(transfer_id, False, f"unknown or already sent handle {handle} "
                                  "(released after a timeout?)")
        try:
            blocks = np.asarray(self.engine.scheduler.get_block_ids(handle), dtype=np.int64)
            dst = np.asarray(dst_block_ids, dtype=np.int64)
            if dst.size > blocks.size:
                res = TransferResult(transfer_id, False, f"{dst.size} destination blocks for {blocks.size} pinned")
            else:
                res = self.connector.send(transfer_id, blocks[:dst.size], address, dst, timeout_s=timeout_s)
        except Exception as e:  # noqa: BLE001 - reported to the caller
            res = TransferResult(transfer_id, False, f"prefill instance: {type(e).__name__}: {e}")
        finally:
            def done() -> None:
                with self._pin_lock:
                    self._sending.discard(handle)
                self._release_now(handle)
            self.call(done)
        if not res.ok:
            self.transfer_failures += 1
        return res

    # ------------------------------------------------------------------ decode role
    def admit_prefilled(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, seed: int,
                        first_token: int, sink: Callable[[Any], None], *, priority: int = 0) -> Future:
        """Resolves to ``(transfer_id, block_ids, transfer future)``; NoFreeBlocksError (retry later) or
        ValueError naming the field."""
        params = params.clone()
        params.seed = seed
        return self.call(lambda: self._admit_prefilled(request_id, prompt_token_ids, params, first_token, sink,
                                                       priority))

    def _admit_prefilled(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                         first_token: int, sink: Callable[[Any], None], priority: int) -> tuple:
        from mindie_llm.engine.detokenizer import IncrementalDetokenizer
        from mindie_llm.engine.llm_engine import _NULL_DECODER, InvalidRequestError
        from mindie_llm.engine.request import RequestGroup, Sample
        from mindie_llm.outputs import RequestMetrics

        eng = self.engine
        if request_id in eng._groups:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        ids = eng.validate_request(list(prompt_token_ids), params)
        if not 0 <= first_token < eng.arch.vocab_size:
            raise InvalidRequestError("first_token", f"{first_token} is outside the vocabulary")
        now = time.time()
        int_id = eng._next_id
        block_ids = eng.scheduler.add_prefilled(
            int_id, np.asarray(ids, np.int32), np.asarray([first_token], np.int32), params.max_tokens,
            min_tokens=params.min_tokens, priority=priority, arrival_time=now, eos_token_ids=eng.eos_token_ids,
            stop_token_ids=tuple(params.stop_token_ids or ()), ignore_eos=params.ignore_eos)
        eng._next_id += 1
        try:
            transfer = self.connector.expect(int_id, block_ids,
                                             timeout_s=self.config.disaggregation.transfer_timeout_s)
        except ValueError:
            eng.scheduler.abort(int_id)
            raise
        group = RequestGroup(request_id=request_id, prompt=None, prompt_token_ids=ids, params=params,
                             metrics=RequestMetrics(arrival_time=now, num_prompt_tokens=len(ids)))
        # The step message carries the first token as an output already generated: the runner's
        # next draw is output position 1 with the same seed, as on a colocated engine.
        eng._unsent.add(int_id, ids, params, params.seed, eng._min_tokens_ban(params), output_token_ids=[first_token])
        detok = IncrementalDetokenizer(eng.tokenizer or _NULL_DECODER, ids, skip_special_tokens=params.skip_special_tokens,
                                       stop=params.stop_strings, min_tokens=params.min_tokens,
                                       include_stop_str_in_output=params.include_stop_str_in_output)
        detok.update([int(first_token)])
        sample = Sample(int_id=int_id, index=0, group=group, detok=detok, token_ids=[int(first_token)])
        group.samples.append(sample)
        group.metrics.first_token_time = now
        eng._groups[request_id] = group
        eng._samples[int_id] = sample
        self._sinks[request_id] = sink
        self._ids[request_id] = int_id
        # Whoever waits on it, a failed or timed-out transfer frees the receiving blocks.
        transfer.add_done_callback(lambda f: None if f.result().ok else self.abort(request_id, int_id))
        return int_id, np.asarray(block_ids, dtype=np.int64), transfer

    def kv_ready(self, request_id: str) -> Future:
        def ready() -> None:
            int_id = self._ids.get(request_id)
            if int_id is None:
                raise KeyError(f"request {request_id!r} is not awaiting its KV")
            self.engine.scheduler.kv_ready(int_id)
        return self.call(ready)

    def abort(self, request_id: str, only_int_id: int | None = None) -> Future:
        """Stops receiving (no write after this) and frees the request's blocks. ``only_int_id``:
        only if the request still has that id (a late callback must not hit a reused name)."""
        def stop() -> None:
            if only_int_id is not None and self._ids.get(request_id) != only_int_id:
                return
            int_id = self._ids.pop(request_id, None)
            self._sinks.pop(request_id, None)
            if int_id is not None:
                self.connector.cancel(int_id, "aborted")
            self.engine.abort_request(request_id)
            w = self._waiters.pop(request_id, None)
            if w is not None:
                self.queued_prompt_tokens -= w[3]
                _settle(w[0], exc=RuntimeError("aborted"))
        return self.call(stop)

    # ------------------------------------------------------------------ misc
    def stats(self) -> dict[str, Any]:
        st = self.engine.get_stats()
        return dict(live=not self.dead and self._thread.is_alive(), num_waiting=st.num_waiting,
                    num_running=st.num_running, queued_prompt_tokens=max(self.queued_prompt_tokens, 0),
                    num_kv_blocks=st.num_kv_blocks, num_free_kv_blocks=st.num_free_kv_blocks,
                    num_pinned_requests=len(self._pinned), num_pending_transfers=self.connector.num_pending,
                    kv_bytes_sent=self.connector.bytes_sent, kv_bytes_received=self.connector.bytes_received,
                    num_transfer_failures=self.transfer_failures, num_pin_timeouts=self.pin_timeouts)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.connector.close()
