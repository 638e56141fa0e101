# SPDX-License-Identifier: Apache-2.0
"""AttentionMetadata: the attention view of one step's flat mixed batch (docs/architecture.md).

It lives in ``ops`` because the op functions (reference and every backend) and the layers that
call them both read it. Must not import layers, models, the executor or a backend.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

__all__ = ["AttentionMetadata"]


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes and what context each request attends over.

    Batch order: the first ``num_decodes`` requests have exactly one query token, prefill chunks
    follow. ``backend_state`` is scratch space a backend may fill once per step (for example index
    tensors shared by all layers); the runner leaves it empty.
    """

    slot_mapping: torch.Tensor     # [T] int64: block_id * block_size + offset
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative num_scheduled_tokens
    seq_lens: torch.Tensor         # [B] int32: num_computed_tokens + num_scheduled_tokens
    block_tables: torch.Tensor     # [B, max_blocks_per_seq] int32, padded with 0 (null block)
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    backend_state: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, num_computed: Sequence[int], num_scheduled: Sequence[int],
              block_tables: Sequence[Sequence[int]], block_size: int, num_decodes: int | None = None,
              device: torch.device | str = "cpu") -> "AttentionMetadata":
        """Builds the metadata of a batch from per-request counts and block tables (host-side
        helper for tests and benchmarks; the runner builds the same tensors from its buffers)."""
        assert len(num_computed) == len(num_scheduled) == len(block_tables)
        slots: list[int] = []
        for start, n, table in zip(num_computed, num_scheduled, block_tables):
            for pos in range(start, start + n):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        if num_decodes is None:
            num_decodes = 0
            while num_decodes < len(num_scheduled) and num_scheduled[num_decodes] == 1:
                num_decodes += 1
        width = max((len(t) for t in block_tables), default=1) or 1
        tables = torch.zeros(len(block_tables), width, dtype=torch.int32)
        for i, t in enumerate(block_tables):
            tables[i, :len(t)] = torch.tensor(list(t), dtype=torch.int32)
        qsl = [0]
        for n in num_scheduled:
            qsl.append(qsl[-1] + n)
        seq_lens = [c + n for c, n in zip(num_computed, num_scheduled)]
        return cls(slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
                   query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
                   seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                   block_tables=tables.to(device), num_decodes=num_decodes,
                   max_query_len=max(num_scheduled, default=0), max_seq_len=max(seq_lens, default=0))

    @property
    def num_reqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])
