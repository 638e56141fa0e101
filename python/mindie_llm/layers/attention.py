# SPDX-License-Identifier: Apache-2.0
"""The Attention layer: (rotary +) write the new tokens' K/V into the paged cache, then paged attention.

Must not import the engine, executor, loader or a backend; device work goes through mindie_llm.ops.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mindie_llm import ops
from mindie_llm.ops.attention_metadata import AttentionMetadata

__all__ = ["AttentionMetadata", "Attention"]


class Attention(nn.Module):
    """Paged attention of one layer. Holds no weights; the KV cache tensor of the layer is passed in
    (``[2, num_blocks, block_size, num_kv_heads, head_dim]``)."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int,
                 sliding_window: int | None = None):
        super().__init__()
        assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata, positions: torch.Tensor | None = None,
                rotary_emb: Any = None) -> torch.Tensor:
        # q: [T, Hq*D]; k, v: [T, Hk*D] -> [T, Hq*D]. With ``rotary_emb`` (a RotaryEmbedding) and
        # ``positions[T]``, q and k are rotated here, fused with the KV write (one op).
        t = q.shape[0]
        if rotary_emb is not None:
            q, k = ops.rotary_embedding_write_kv(positions, q, k, v, kv_cache, attn_metadata.slot_mapping,
                                                 self.head_dim, rotary_emb.cos_sin_cache, rotary_emb.is_neox)
        else:
            ops.write_kv_cache(k.view(t, self.num_kv_heads, self.head_dim),
                               v.view(t, self.num_kv_heads, self.head_dim), kv_cache, attn_metadata.slot_mapping)
        out = ops.paged_attention(q.view(t, self.num_heads, self.head_dim), kv_cache, attn_metadata,
                                  self.scale, self.sliding_window)  # [T, Hq, D]
        return out.reshape(t, self.num_heads * self.head_dim)
