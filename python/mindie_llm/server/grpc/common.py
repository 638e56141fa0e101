# SPDX-License-Identifier: Apache-2.0
"""Helpers both gRPC services share: stub import, request ids, limits, timings, finish reasons and
the delta bookkeeping that turns cumulative ``RequestOutput`` objects into stream messages.

Must not import torch or the model code; only the engine front's public types.
"""
from __future__ import annotations

import asyncio
import importlib
import itertools
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from mindie_llm.outputs import CompletionOutput, RequestMetrics

__all__ = ["load_stubs", "new_request_id", "off_loop", "timings_ns", "DeltaTracker", "SampleDelta"]

_counter = itertools.count()
_PREFIX = f"grpc-{os.getpid()}-{os.urandom(4).hex()}"


def load_stubs(stem: str) -> tuple[ModuleType, ModuleType]:
    """Imports ``<stem>_pb2`` and ``<stem>_pb2_grpc`` from server/proto, or explains how to build them."""
    try:
        pb2 = importlib.import_module(f"mindie_llm.server.proto.{stem}_pb2")
        pb2_grpc = importlib.import_module(f"mindie_llm.server.proto.{stem}_pb2_grpc")
    except ImportError as e:  # pragma: no cover - a build step was skipped
        raise ImportError(
            f"gRPC stubs for {stem}.proto are missing; they are generated at build time: "
            "run `python setup.py build_ext --inplace` or `pip install -e .`") from e
    return pb2, pb2_grpc


async def off_loop(llm: Any, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` off the event loop (tokenizing is CPU-heavy): on the AsyncLLM's preparation
    threads, or a worker thread for engine fronts without them."""
    run = getattr(llm, "run_cpu", None)
    if run is None:
        return await asyncio.to_thread(fn, *args)
    return await run(fn, *args)


def new_request_id() -> str:
    """A server-side request id, unique in this process (clients' ids are only echoed)."""
    return f"{_PREFIX}-{next(_counter)}"


def _span_ns(start: float | None, end: float | None) -> int:
    if start is None or end is None or end < start:
        return 0
    return int(round((end - start) * 1e9))


def timings_ns(metrics: "RequestMetrics | None") -> dict[str, int]:
    """queue / prefill / decode / total spans of a request, in nanoseconds (0 when unknown)."""
    if metrics is None:
        return {"queue_ns": 0, "prefill_ns": 0, "decode_ns": 0, "total_ns": 0}
    end = metrics.finished_time or metrics.last_token_time
    return {
        "queue_ns": _span_ns(metrics.arrival_time, metrics.first_scheduled_time),
        "prefill_ns": _span_ns(metrics.first_scheduled_time, metrics.first_token_time),
        "decode_ns": _span_ns(metrics.first_token_time, metrics.last_token_time),
        "total_ns": _span_ns(metrics.arrival_time, end),
    }


@dataclass
class SampleDelta:
    """What one sample produced since its previous message."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Any]] | None
    finish_reason: str | None
    stop_reason: str | int | None
    first_token_offset: int   # position of token_ids[0] in the sample's output


@dataclass
class DeltaTracker:
    """Remembers how much of each sample was already sent, to emit only what is new."""

    sent_chars: dict[int, int] = field(default_factory=dict)
    sent_tokens: dict[int, int] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)

    def deltas(self, outputs: "list[CompletionOutput]") -> list[SampleDelta]:
        """New text/tokens per sample; a finished sample yields its final delta once."""
        result = []
        for out in outputs:
            if out.index in self.done:
                continue
            c0 = self.sent_chars.get(out.index, 0)
            t0 = self.sent_tokens.get(out.index, 0)
            text = out.text[c0:]
            toks = list(out.token_ids[t0:])
            finished = out.finish_reason is not None
            if not text and not toks and not finished:
                continue
            lps = list(out.logprobs[t0:len(out.token_ids)]) if out.logprobs is not None else None
            self.sent_chars[out.index] = len(out.text)
            self.sent_tokens[out.index] = len(out.token_ids)
            if finished:
                self.done.add(out.index)
            result.append(SampleDelta(out.index, text, toks, lps, out.finish_reason,
                                      out.stop_reason if finished else None, t0))
        return result
