# SPDX-License-Identifier: Apache-2.0
"""DraftKVCache: the paged KV cache of a proposer's own model (a draft model or an EAGLE head),
separate from the target's and managed here, not by the scheduler.

Per request it keeps a block list and the number of leading positions whose K/V are valid. A
proposer rolls back by lowering that count (rejected positions are simply overwritten later);
the pool grows by doubling when it runs out. ``build(rows)`` turns (request, first position,
tokens) rows into the flat batch tensors and AttentionMetadata the model layers expect
(single-token rows first, as docs/architecture.md orders a batch).

Must not import the engine, the executor or the server.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mindie_llm.ops.attention_metadata import AttentionMetadata

__all__ = ["DraftKVCache", "DraftRow", "DraftBatch"]


@dataclass(slots=True)
class DraftRow:
    req_id: int
    start: int                 # position of the first token
    token_ids: np.ndarray      # [n] int64 tokens at positions start .. start + n - 1


@dataclass(slots=True)
class DraftBatch:
    input_ids: torch.Tensor    # [T] int64
    positions: torch.Tensor    # [T] int64
    md: AttentionMetadata
    order: np.ndarray          # [R] batch position of each input row
    last: torch.Tensor         # [R] int64 token row of each input row's last token (input order)
    token_rows: list[np.ndarray]   # per input row, its token rows in the batch


class DraftKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str, initial_blocks: int = 64) -> None:
        self.shape = (num_kv_heads, head_dim)
        self.block_size, self.dtype, self.device = block_size, dtype, torch.device(device)
        nb = max(initial_blocks, 2)
        self.caches = [torch.zeros(2, nb, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
                       for _ in range(num_layers)]
        self._free = list(range(nb - 1, 0, -1))          # block 0: the null block
        self.blocks: dict[int, list[int]] = {}
        self.num_valid: dict[int, int] = {}              # leading positions with valid K/V

    @property
    def num_blocks(self) -> int:
        return int(self.caches[0].shape[1])

    def _grow(self) -> None:
        old = self.num_blocks
        self.caches = [torch.cat([c, torch.zeros_like(c)], dim=1) for c in self.caches]
        self._free.extend(range(2 * old - 1, old - 1, -1))

    def ensure(self, req_id: int, num_positions: int) -> None:
        """Blocks for positions [0, num_positions) of ``req_id``."""
        blocks = self.blocks.setdefault(req_id, [])
        need = -(-num_positions // self.block_size) - len(blocks)
        while need > len(self._free):
            self._grow()
        for _ in range(max(need, 0)):
            blocks.append(self._free.pop())

    def drop(self, req_id: int) -> None:
        self._free.extend(self.blocks.pop(req_id, ()))
        self.num_valid.pop(req_id, None)

    def build(self, rows: Sequence[DraftRow]) -> DraftBatch:
        """The flat batch of ``rows`` (blocks must already cover every position)."""
        n = np.array([r.token_ids.shape[0] for r in rows], np.int64)            # [R]
        order = np.argsort(n != 1, kind="stable")                               # single-token rows first
        bs = self.block_size
        width = max(len(self.blocks[r.req_id]) for r in rows)
        table = np.zeros((len(rows), max(width, 1)), np.int32)                   # [R, W] batch order
        ids, pos, slots, tok_rows = [], [], [], [None] * len(rows)
        qsl = [0]
        for b, i in enumerate(order.tolist()):
            r = rows[i]
            blk = np.asarray(self.blocks[r.req_id], np.int64)
            table[b, :blk.shape[0]] = blk
            p = np.arange(r.start, r.start + n[i], dtype=np.int64)
            ids.append(np.asarray(r.token_ids, np.int64))
            pos.append(p)
            slots.append(blk[p // bs] * bs + p % bs)
            tok_rows[i] = np.arange(qsl[-1], qsl[-1] + n[i])
            qsl.append(qsl[-1] + int(n[i]))
        dev = self.device
        seq_lens = np.array([rows[i].start + n[i] for i in order.tolist()], np.int32)
        md = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.from_numpy(seq_lens).to(dev), block_tables=torch.from_numpy(table).to(dev),
            num_decodes=int((n == 1).sum()), max_query_len=int(n.max()), max_seq_len=int(seq_lens.max()))
        last = torch.tensor([int(t[-1]) for t in tok_rows], dtype=torch.int64, device=dev)
        return DraftBatch(torch.from_numpy(np.concatenate(ids)).to(dev), torch.from_numpy(np.concatenate(pos)).to(dev),
                          md, order, last, tok_rows)
