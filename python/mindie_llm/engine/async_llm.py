# SPDX-License-Identifier: Apache-2.0
"""AsyncLLM: the asyncio front of the engine, shared by the HTTP and gRPC servers.

Owns the engine-loop thread (the only thread that touches the single-threaded ``LLMEngine``), the
thread-safe inbox through which requests are added and aborted, admission control
(``scheduler.max_queued_requests``, ``n > 1`` all-or-nothing), per-request asyncio queues that
carry cumulative ``RequestOutput`` objects back to the event loop, liveness (engine progress, not
the event loop) and drain.

Nothing crosses a process boundary: no pickle, no sockets. Must not import the server package,
torch, or any web framework.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from mindie_llm.config import EngineConfig
    from mindie_llm.outputs import RequestOutput
    from mindie_llm.sampling_params import SamplingParams

__all__ = [
    "AsyncLLM",
    "EngineDeadError",
    "EngineDrainingError",
    "QueueFullError",
    "RequestRecord",
]

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.2  # how long the idle engine thread sleeps on its inbox before refreshing stats
_ABORTED = object()  # queued by abort(): the stream ends without a final output


class QueueFullError(RuntimeError):
    """``scheduler.max_queued_requests`` would be exceeded (HTTP 429 / gRPC RESOURCE_EXHAUSTED)."""


class EngineDrainingError(RuntimeError):
    """The server is shutting down and admits no new requests (HTTP 503 / gRPC UNAVAILABLE)."""


class EngineDeadError(RuntimeError):
    """The engine loop has stopped after an unrecoverable error (HTTP 500 / gRPC INTERNAL)."""


@dataclass
class RequestRecord:
    """What listeners (metrics) learn about a request once it ends.

    ``outcome`` is one of ``stop``, ``length``, ``abort`` (finished by the engine), ``cancelled``
    (the client went away), ``rejected_invalid``, ``rejected_queue_full``, ``rejected_draining``,
    ``error``. Times are ``time.monotonic()`` seconds taken on the event loop.
    """

    request_id: str
    outcome: str
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    inter_token_latencies: list[float] = field(default_factory=list)  # seconds, one per token after the first
    engine_metrics: Any = None      # the last RequestOutput.metrics (queue / prefill / decode spans)
    n: int = 1
    max_tokens: int = 0


@dataclass
class _Stream:
    """Event-loop side of one request."""

    queue: asyncio.Queue
    admitted: asyncio.Future
    num_samples: int
    finished: bool = False
    record: RequestRecord | None = None
    last: Any = None          # the last RequestOutput delivered (to end it with "abort" on drain)


@dataclass
class _Add:
    request_id: str
    prompt: Any
    params: Any
    priority: int
    stream: _Stream


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Stop:
    pass


@dataclass
class _LoopState:
    """Written by the engine thread, read by anyone (single assignments only)."""

    stats: Any = None
    step_started_at: float | None = None   # monotonic; None while not inside step()
    last_progress_at: float = field(default_factory=time.monotonic)
    dead: bool = False
    fatal_error: str | None = None         # why the workers are gone (names the rank), if they are


class AsyncLLM:
    """Runs ``engine`` on its own thread and exposes it to asyncio code.

    Build with :meth:`from_config` (loads the model) or pass any object with the ``LLMEngine``
    methods (tests use a small fake). Call :meth:`shutdown` to stop the thread.
    """

    def __init__(self, engine: Any, config: EngineConfig, *, start: bool = True) -> None:
        self.engine = engine
        self.config = config
        self.tokenizer = engine.tokenizer
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        self.block_size: int = engine.block_size
        self._max_queued = config.scheduler.max_queued_requests
        self._stall_timeout_s = config.server.health_stall_timeout_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}   # event-loop thread only
        self._state = _LoopState(stats=engine.get_stats())
        self._draining = False
        self._started = False
        self._listeners: list[Callable[[RequestRecord], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        # CPU-heavy request preparation (tokenizing, chat templates) runs here, never on the event
        # loop that HTTP, gRPC and the liveness probe share (the tokenizer releases the GIL).
        self._cpu_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mindie-tokenize")
        self._thread = threading.Thread(target=self._run, name="mindie-engine-loop", daemon=True)
        if start:
            self.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLM:
        """Builds the ``LLMEngine`` (loads the model) and starts the engine-loop thread."""
        from mindie_llm.engine.llm_engine import LLMEngine

        engine = LLMEngine(config)
        return cls(engine, engine.config)

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    # ------------------------------------------------------------------ public API
    def add_listener(self, fn: Callable[[RequestRecord], None]) -> None:
        """``fn(record)`` is called on the event loop when a request ends (metrics use this)."""
        self._listeners.append(fn)

    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Tokenizes and checks a request without admitting it; ValueError names the field.

        ``LLMEngine.validate_request`` has no side effects and reads only the tokenizer and the
        configuration, so it is safe to call from the event-loop thread.
        """
        return self.engine.validate_request(prompt, params)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str, *,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yields cumulative ``RequestOutput`` objects; the last one has ``finished=True``.

        Admission happens on the first ``__anext__``, before anything is yielded: ValueError,
        QueueFullError, EngineDrainingError or EngineDeadError raise there. Leaving the loop early
        (break, aclose, cancellation) aborts the request within one engine step.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        record = RequestRecord(request_id=request_id, outcome="error", arrival_time=time.monotonic(),
                               n=int(getattr(params, "n", 1) or 1), max_tokens=int(getattr(params, "max_tokens", 0) or 0))
        last_token_at = 0.0
        if self._state.dead:
            self._notify(record, "error")
            raise EngineDeadError("the engine has stopped")
        if self._draining:
            self._notify(record, "rejected_draining")
            raise EngineDrainingError("the server is shutting down")
        if not isinstance(request_id, str) or not request_id or request_id in self._streams:
            self._notify(record, "rejected_invalid")
            raise ValueError(f"request_id: must be a unique non-empty string; got {request_id!r}")
        stream = _Stream(queue=asyncio.Queue(), admitted=loop.create_future(),
                         num_samples=max(1, int(getattr(params, "n", 1) or 1)), record=record)
        self._streams[request_id] = stream
        self._inbox.put(_Add(request_id, prompt, params, priority, stream))
        finished = False
        try:
            try:
                await stream.admitted
            except ValueError:
                record.outcome = "rejected_invalid"
                raise
            except QueueFullError:
                record.outcome = "rejected_queue_full"
                raise
            except EngineDrainingError:
                record.outcome = "rejected_draining"
                raise
            while True:
                item = await stream.queue.get()
                if item is _ABORTED:
                    finished = True
                    record.outcome = "abort"
                    return
                if isinstance(item, BaseException):
                    raise item
                now = time.monotonic()
                generated = sum(len(o.token_ids) for o in item.outputs)
                if record.first_token_time is None and generated:
                    record.first_token_time = last_token_at = now
                elif generated > record.num_generation_tokens:
                    new = generated - record.num_generation_tokens
                    record.inter_token_latencies.extend([(now - last_token_at) / new] * new)
                    last_token_at = now
                record.num_prompt_tokens = len(item.prompt_token_ids)
                record.num_generation_tokens = generated
                record.engine_metrics = item.metrics
                if item.finished:
                    finished = True
                    reasons = [o.finish_reason for o in item.outputs]
                    record.outcome = ("abort" if "abort" in reasons else
                                      "length" if "length" in reasons else "stop")
                yield item
                if finished:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            record.outcome = "cancelled"
            raise
        finally:
            if not finished:
                # The consumer left early (or admission failed): free the request's KV blocks.
                self._inbox.put(_Abort(request_id))
            self._streams.pop(request_id, None)
            self._notify(record, record.outcome)

    async def run_cpu(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the request-preparation threads (tokenizing, chat templates)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._cpu_pool, functools.partial(fn, *args, **kwargs))

    def abort_all(self) -> int:
        """Aborts every request in flight (drain timeout): the engine frees them, and each stream
        ends with a final output whose unfinished samples have ``finish_reason`` "abort" (a request
        that produced nothing yet fails with EngineDrainingError). Returns how many were aborted."""
        n = 0
        for rid, stream in list(self._streams.items()):
            if stream.finished:
                continue
            n += 1
            stream.finished = True
            self._inbox.put(_Abort(rid))
            last = stream.last
            if last is not None:
                outs = [o if o.finish_reason is not None else dataclasses.replace(o, finish_reason="abort")
                        for o in last.outputs]
                stream.queue.put_nowait(dataclasses.replace(last, outputs=outs, finished=True))
            elif not stream.admitted.done():
                stream.admitted.set_exception(EngineDrainingError("the server is shutting down"))
            else:
                stream.queue.put_nowait(EngineDrainingError("the server is shutting down"))
        return n

    async def abort(self, request_id: str) -> None:
        """Aborts a request; a no-op if it is unknown or has finished."""
        self._inbox.put(_Abort(request_id))
        stream = self._streams.get(request_id)
        if stream is not None and not stream.finished:
            stream.finished = True
            stream.queue.put_nowait(_ABORTED)

    def get_stats(self) -> Any:
        """The engine's ``EngineStats`` as of its last step (refreshed at least every 0.2 s while
        idle). ``num_waiting`` is the queue length that admission control counts."""
        return self._state.stats

    @property
    def num_active_requests(self) -> int:
        """Requests admitted or awaiting admission that have not ended (event-loop view)."""
        return len(self._streams)

    def is_live(self) -> bool:
        """False once the engine loop died, or has been inside one step longer than
        ``server.health_stall_timeout_s``."""
        st = self._state
        if st.dead or (self._started and not self._thread.is_alive()):
            return False
        check = getattr(self.engine, "check_health", None)
        if check is not None:
            try:
                check()
            except Exception as e:  # noqa: BLE001 - a dead or hung worker
                st.fatal_error = str(e)
                return False
        started = st.step_started_at
        return started is None or time.monotonic() - started < self._stall_timeout_s

    @property
    def fatal_error(self) -> str | None:
        """Set once a tensor-parallel worker died or hung (one line naming the rank)."""
        return self._state.fatal_error

    def is_ready(self) -> bool:
        return self._started and not self._draining and self.is_live()

    @property
    def is_draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        """Refuses new requests from now on; in-flight ones continue."""
        self._draining = True

    async def wait_drained(self, timeout_s: float) -> bool:
        """Waits until no request is in flight; False if ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        while self._streams:
            if time.monotonic() >= deadline or self._state.dead:
                return not self._streams
            await asyncio.sleep(0.05)
        return True

    async def shutdown(self) -> None:
        """Aborts what is left, stops the engine thread and waits for it."""
        self._draining = True
        for rid, stream in list(self._streams.items()):
            self._inbox.put(_Abort(rid))
            if not stream.admitted.done():
                stream.admitted.set_exception(EngineDrainingError("the server is shutting down"))
            stream.queue.put_nowait(EngineDrainingError("the server is shutting down"))
        self._inbox.put(_Stop())
        self._cpu_pool.shutdown(wait=False, cancel_futures=True)
        if self._started and self._thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30.0)

    # ------------------------------------------------------------------ event-loop helpers
    def _notify(self, record: RequestRecord, outcome: str) -> None:
        record.outcome = outcome
        record.finished_time = time.monotonic()
        for fn in self._listeners:
            try:
                fn(record)
            except Exception:  # a metrics bug must not fail a request
                logger.exception("request listener failed")

    def _deliver(self, outputs: list) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None or stream.finished:
                continue
            if out.finished:
                stream.finished = True
            stream.last = out
            stream.queue.put_nowait(out)

    def _fail_all(self, exc: BaseException) -> None:
        for stream in list(self._streams.values()):
            if not stream.admitted.done():
                stream.admitted.set_exception(exc)
            elif not stream.finished:
                stream.queue.put_nowait(exc)

    @staticmethod
    def _resolve(fut: asyncio.Future, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)

    # ------------------------------------------------------------------ engine thread
    def _post(self, fn: Callable, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # loop closed between the check and the call
                pass

    def _admit(self, cmd: _Add) -> None:
        exc: BaseException | None = None
        if self._draining:
            exc = EngineDrainingError("the server is shutting down")
        else:
            waiting = self.engine.get_stats().num_waiting
            if waiting + cmd.stream.num_samples > self._max_queued:
                exc = QueueFullError(
                    f"the request queue is full ({waiting} waiting, limit {self._max_queued}); retry later")
            else:
                try:
                    self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params, priority=cmd.priority)
                except ValueError as e:
                    exc = e
                except Exception:
                    logger.exception("add_request failed for %s", cmd.request_id)
                    exc = ValueError("request: could not be admitted")
        self._post(self._resolve, cmd.stream.admitted, exc)

    def _handle(self, cmd: Any) -> bool:
        """Applies one inbox command; False on stop."""
        if isinstance(cmd, _Stop):
            return False
        if isinstance(cmd, _Add):
            self._admit(cmd)
        elif isinstance(cmd, _Abort):
            self.engine.abort_request(cmd.request_id)
        return True

    def _drain_inbox(self, block: bool) -> bool:
        try:
            cmd = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        if not self._handle(cmd):
            return False
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if not self._handle(cmd):
                return False

    def _run(self) -> None:
        st = self._state
        try:
            while True:
                busy = self.engine.has_unfinished_requests()
                if not self._drain_inbox(block=not busy):
                    break
                if self.engine.has_unfinished_requests():
                    st.step_started_at = time.monotonic()
                    outputs = self.engine.step()
                    st.step_started_at = None
                    st.last_progress_at = time.monotonic()
                    if outputs:
                        self._post(self._deliver, outputs)
                st.stats = self.engine.get_stats()
        except Exception as e:
            logger.exception("the engine loop stopped after an unrecoverable error")
            if type(e).__name__ == "WorkerDiedError":
                st.fatal_error = str(e)
            st.dead = True
            self._post(self._fail_all, EngineDeadError("the engine has stopped"))
        finally:
            st.step_started_at = None
            stop = getattr(self.engine, "shutdown", None)
            if stop is not None:
                try:
                    stop()                          # the workers stop with the engine thread
                except Exception:  # noqa: BLE001
                    logger.exception("stopping the workers failed")

