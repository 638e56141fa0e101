# SPDX-License-Identifier: Apache-2.0
"""The paged KV cache: one tensor per layer, ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(index 0 = K, 1 = V), and the block count derived from a memory budget.

Block 0 is the scheduler's null block: padded block-table entries point at it and it is never
read for a real token. Must not import the engine or the scheduler.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mindie_llm.backends.platform import kv_cache_bytes_per_block

__all__ = ["KVCacheSpec", "bytes_per_block", "allocate_kv_caches", "num_blocks_for_budget"]


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers (K and V): the platforms' one formula."""
        return kv_cache_bytes_per_block(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim,
                                        self.dtype)


def bytes_per_block(spec: KVCacheSpec) -> int:
    return spec.bytes_per_block


def num_blocks_for_budget(spec: KVCacheSpec, budget_bytes: int) -> int:
    """How many blocks fit in ``budget_bytes`` (at least 2: the null block and one real one)."""
    return max(int(budget_bytes // spec.bytes_per_block), 2)


def allocate_kv_caches(spec: KVCacheSpec, num_blocks: int, device: torch.device | str) -> list[torch.Tensor]:
    """Zeroed caches, one per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]."""
    assert num_blocks >= 2, num_blocks
    shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
