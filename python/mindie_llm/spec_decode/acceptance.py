# SPDX-License-Identifier: Apache-2.0
"""AcceptanceTracker: per request, how many proposed tokens the target accepted lately, and the
switch that turns speculation off for a request whose acceptance is low.

A request whose accepted / proposed ratio over its last ``window`` proposed tokens falls below
``min_acceptance`` gets no proposals for ``cooldown`` steps, then is tried again (its history is
reset). On open text this keeps a poor proposer from paying for k extra tokens per step.

Plain Python; must not import torch, the engine or the executor.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

__all__ = ["AcceptanceTracker"]


@dataclass
class _History:
    events: deque = field(default_factory=deque)     # (proposed, accepted) of recent steps
    proposed: int = 0
    accepted: int = 0
    off_until: int = -1


class AcceptanceTracker:
    def __init__(self, min_acceptance: float = 0.2, window: int = 16, cooldown: int = 32) -> None:
        self.min_acceptance, self.window, self.cooldown = min_acceptance, window, cooldown
        self.step_no = 0
        self._h: dict[int, _History] = {}

    def tick(self) -> None:
        self.step_no += 1

    def record(self, req_id: int, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        h = self._h.setdefault(req_id, _History())
        h.events.append((proposed, accepted))
        h.proposed += proposed
        h.accepted += accepted
        while h.events and h.proposed - h.events[0][0] >= self.window:
            p, a = h.events.popleft()
            h.proposed -= p
            h.accepted -= a
        if self.min_acceptance > 0 and h.proposed >= self.window and h.accepted < self.min_acceptance * h.proposed:
            h.off_until = self.step_no + self.cooldown
            h.events.clear()
            h.proposed = h.accepted = 0

    def enabled(self, req_id: int) -> bool:
        h = self._h.get(req_id)
        return h is None or self.step_no >= h.off_until

    def drop(self, req_id: int) -> None:
        self._h.pop(req_id, None)
