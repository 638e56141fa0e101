# SPDX-License-Identifier: Apache-2.0
"""Vocabulary-parallel embedding and LM head (tied to the embedding or not).

With a ``parallel`` context of size N the vocabulary is split in N contiguous ranges of
``ceil(V / N)`` rows (the last one zero-padded): the embedding looks up the ids of its range (zeros
elsewhere) and the partial rows are all-reduced; the LM head computes the logits of its range and
they are all-gathered, so every rank ends with the full ``[S, V]`` logits (every rank can sample).
At size 1 both are plain and run no collective.

Must not import the engine, executor, loader, models or a backend.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mindie_llm.distributed.parallel_state import ParallelContext
from mindie_llm.layers.linear import copy_checked, full_shape, take_shard

__all__ = ["VocabEmbedding", "LMHead", "vocab_range"]


def vocab_range(vocab_size: int, rank: int, size: int) -> tuple[int, int, int]:
    """(start, end, rows per rank) of ``rank``'s vocabulary shard; end - start <= rows."""
    per = -(-vocab_size // size)
    start = min(rank * per, vocab_size)
    return start, min(start + per, vocab_size), per


class _VocabShard(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelContext | None, what: str):
        super().__init__()
        self.parallel = parallel if parallel is not None else ParallelContext.single()
        self.vocab_size = vocab_size
        self.vocab_start, self.vocab_end, self.rows = vocab_range(vocab_size, self.parallel.rank,
                                                                  self.parallel.size)
        self._what = what

    def _new_weight(self, hidden_size: int) -> nn.Parameter:
        w = nn.Parameter(torch.zeros(self.rows, hidden_size), requires_grad=False)  # [V/N, H]
        w.weight_loader = self.weight_loader
        return w

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id=None) -> None:
        if self.parallel.size == 1:
            copy_checked(param, loaded, self._what)
            return
        shape = full_shape(loaded)
        if shape != (self.vocab_size, param.shape[1]):
            raise ValueError(f"{self._what}: checkpoint shape {shape} does not match the model's "
                             f"{(self.vocab_size, param.shape[1])} (is config.json right for these weights?)")
        n = self.vocab_end - self.vocab_start
        param.data[n:].zero_()
        copy_checked(param.data[:n], take_shard(loaded, 0, self.vocab_start, n, self._what), self._what)


class VocabEmbedding(_VocabShard):
    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelContext | None = None):
        super().__init__(vocab_size, hidden_size, parallel, "embedding")
        self.weight = self._new_weight(hidden_size)

    def partial(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] -> [T, H]: the rows of this rank's vocabulary range, zeros for the others' ids."""
        if self.parallel.size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = (input_ids - self.vocab_start).masked_fill_(outside, 0)
        return F.embedding(local, self.weight).masked_fill_(outside.unsqueeze(-1), 0.0)

    def forward(self, input_ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:  # [T] -> [T, H]
        out = self.partial(input_ids)
        return self.parallel.all_reduce(out) if reduce and self.parallel.size > 1 else out


class LMHead(_VocabShard):
    """hidden[S, H] -> logits[S, V] in float32. ``tie_to`` shares the embedding's weight (and its
    vocabulary shard)."""

    def __init__(self, vocab_size: int, hidden_size: int, tie_to: VocabEmbedding | None = None,
                 parallel: ParallelContext | None = None):
        super().__init__(vocab_size, hidden_size, tie_to.parallel if tie_to is not None else parallel, "lm_head")
        self.tied = tie_to is not None
        if tie_to is not None:
            self.weight = tie_to.weight
        else:
            self.weight = self._new_weight(hidden_size)
        self.linear_method = None  # set by a quantization transform

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.linear_method is not None:
            local = self.linear_method(self, hidden).float()               # [S, V/N]
        else:
            local = F.linear(hidden, self.weight).float()
        if self.parallel.size == 1:
            return local
        full = self.parallel.all_gather(local, dim=-1)                      # [S, N * V/N]
        return full if full.shape[-1] == self.vocab_size else full[:, :self.vocab_size].contiguous()
