# SPDX-License-Identifier: Apache-2.0
"""PenaltyState: per-slot prompt-token masks and output-token counts on the device, for the
requests with presence / frequency / repetition penalties.

Filled once at admission (the prompt's tokens, any tokens already generated) and advanced on the
device by the tokens each step keeps, so that a step gathers ``mask[slots]`` / ``counts[slots]``
instead of rebuilding [S, V] tensors from Python lists. Allocated on the first penalized request
(N slots x V: bool + int32) and grown with the slot table.

Must not import the engine, the scheduler extension or a backend.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["PenaltyState"]


class PenaltyState:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.prompt_mask: torch.Tensor | None = None     # [N, V] bool
        self.counts: torch.Tensor | None = None          # [N, V] int32

    def ensure(self, capacity: int) -> None:
        n = 0 if self.counts is None else self.counts.shape[0]
        if capacity <= n:
            return
        V, dev = self.vocab_size, self.device
        mask = torch.zeros(capacity, V, dtype=torch.bool, device=dev)
        counts = torch.zeros(capacity, V, dtype=torch.int32, device=dev)
        if n:
            mask[:n].copy_(self.prompt_mask)
            counts[:n].copy_(self.counts)
        self.prompt_mask, self.counts = mask, counts

    def admit(self, slot: int, capacity: int, prompt: np.ndarray, outputs: np.ndarray) -> None:
        """A penalized request took ``slot``: its prompt mask and the counts of ``outputs``."""
        self.ensure(capacity)
        self.prompt_mask[slot].zero_()
        self.counts[slot].zero_()
        p = torch.from_numpy(np.asarray(prompt, np.int64)).to(self.device)
        self.prompt_mask[slot, p[(p >= 0) & (p < self.vocab_size)]] = True
        if len(outputs):
            self.add(torch.full((len(outputs),), slot, dtype=torch.int64, device=self.device),
                     torch.from_numpy(np.asarray(outputs, np.int64)).to(self.device))

    def add(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """counts[slots[i], tokens[i]] += 1 (device tensors [K] int64; no host sync)."""
        if self.counts is None or slots.numel() == 0:
            return
        one = torch.ones(slots.shape[0], dtype=torch.int32, device=self.device)
        self.counts.index_put_((slots, tokens.to(torch.int64)), one, accumulate=True)

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([L, V] bool, [L, V] int32) for logits rows of ``slots`` ([L] int64, device)."""
        return self.prompt_mask.index_select(0, slots), self.counts.index_select(0, slots)
