# SPDX-License-Identifier: Apache-2.0
"""The periodic engine stats line (as vLLM prints it): prompt and generation throughput over the
last interval, running and waiting requests, KV-cache usage and the prefix-cache hit rate.

Owns the line's format and the deltas between two ``EngineStats`` snapshots; the launcher calls
:meth:`StatsLine.tick` every ``server.stats_interval_s``. Quiet while nothing runs. Must not import
the engine or torch (it reads ``AsyncLLM.get_stats()`` only).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

__all__ = ["StatsLine", "run_stats_line"]

stats_logger = logging.getLogger("mindie_llm.stats")


class StatsLine:
    """Formats one line from the change in cumulative engine counters since the last call."""

    def __init__(self, stats: Any, now: float | None = None) -> None:
        self._prev = stats
        self._prev_t = time.monotonic() if now is None else now

    def tick(self, stats: Any, now: float | None = None) -> str | None:
        """The line for the interval ending now, or None when the engine was idle throughout."""
        now = time.monotonic() if now is None else now
        dt = max(now - self._prev_t, 1e-9)
        prev, self._prev, self._prev_t = self._prev, stats, now
        d_prompt = stats.num_prompt_tokens_total - prev.num_prompt_tokens_total
        d_gen = stats.num_generation_tokens_total - prev.num_generation_tokens_total
        if not (d_prompt or d_gen or stats.num_running or stats.num_waiting):
            return None
        total = stats.num_kv_blocks or 0
        kv = 100.0 * (total - stats.num_free_kv_blocks) / total if total else 0.0
        hit = 100.0 * stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0
        return (f"Avg prompt throughput: {d_prompt / dt:.1f} tokens/s, Avg generation throughput: "
                f"{d_gen / dt:.1f} tokens/s, Running: {stats.num_running} reqs, Waiting: {stats.num_waiting} reqs, "
                f"KV cache usage: {kv:.1f}%, Prefix cache hit rate: {hit:.1f}%")


async def run_stats_line(async_llm: Any, interval_s: float) -> None:
    """Logs the stats line every ``interval_s`` seconds until cancelled."""
    line = StatsLine(async_llm.get_stats())
    while True:
        await asyncio.sleep(interval_s)
        text = line.tick(async_llm.get_stats())
        if text:
            stats_logger.info("%s", text)
