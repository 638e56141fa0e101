# SPDX-License-Identifier: Apache-2.0
"""StepTimer: how long the device waits on the host between steps.

A runner that has a timer calls ``device_begin()`` just before it queues a step's first device
operation and ``step_end()`` after it has queued its last one (the host has the step's tokens by
then). Each call records a device event on the current stream, so

    busy(n)        = elapsed(begin(n), end(n))          device time of step n (gaps inside it too)
    idle(n -> n+1) = elapsed(end(n), begin(n + 1))      the device had nothing queued

because events complete in stream order: ``begin(n + 1)`` completes when the device reaches it,
which is right after ``end(n)`` if the host queued it in time, else when the host did. The host's
time per step (from one ``step_end`` to the next) is kept beside it. ``summary()`` synchronizes
once and reduces all of it; nothing here synchronizes per step.

``event_factory`` makes one timing event (CUDA: ``lambda: torch.cuda.Event(enable_timing=True)``);
``HostEvent`` stands in on a device whose work is synchronous (the CPU), for tests.
Must not import torch, the engine or a backend.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["StepTimer", "HostEvent", "IdleSummary"]


class HostEvent:
    """An event that records the host clock (a synchronous device finishes work when queued)."""

    def __init__(self) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, later: "HostEvent") -> float:
        return (later.t - self.t) * 1e3                          # ms, as torch.cuda.Event


@dataclass
class IdleSummary:
    steps: int
    wall_s: float                 # first begin to last end, host clock
    busy_ms: float                # sum of busy(n)
    idle_ms: float                # sum of idle(n -> n+1)
    host_ms_per_step: float       # mean host time from one step_end to the next

    @property
    def idle_ms_per_step(self) -> float:
        return self.idle_ms / max(self.steps - 1, 1)

    @property
    def idle_pct_of_wall(self) -> float:
        return 100.0 * self.idle_ms / max(self.wall_s * 1e3, 1e-9)


class StepTimer:
    def __init__(self, event_factory: Callable[[], Any]) -> None:
        self._make = event_factory
        self.reset()

    def reset(self) -> None:
        self._begins: list[Any] = []
        self._ends: list[Any] = []
        self._host: list[float] = []
        self._open = False

    def device_begin(self) -> None:
        """Before the step's first device operation (only the first call of a step counts)."""
        if self._open:
            return
        e = self._make()
        e.record()
        self._begins.append(e)
        self._open = True
        if not self._host:
            self._host.append(time.perf_counter())

    def step_end(self) -> None:
        """After the step's last device operation; closes the step (no-op if none began)."""
        if not self._open:
            return
        e = self._make()
        e.record()
        self._ends.append(e)
        self._host.append(time.perf_counter())
        self._open = False

    def summary(self) -> IdleSummary:
        n = len(self._ends)
        if n == 0:
            return IdleSummary(0, 0.0, 0.0, 0.0, 0.0)
        self._ends[-1].synchronize()
        busy = sum(b.elapsed_time(e) for b, e in zip(self._begins, self._ends))
        idle = sum(max(self._ends[i].elapsed_time(self._begins[i + 1]), 0.0) for i in range(n - 1))
        wall = self._host[-1] - self._host[0]
        return IdleSummary(n, wall, busy, idle, 1e3 * wall / n)
