# SPDX-License-Identifier: Apache-2.0
"""Rotary position embedding: the cos/sin cache (plain, linear-scaled or llama3-scaled frequencies)
and the layer that applies it through ``ops.rotary_embedding``. Imports only ops."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from mindie_llm import ops

__all__ = ["RotaryEmbedding", "get_rope", "SUPPORTED_ROPE_TYPES"]

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    # Same arithmetic as transformers so that fp32 logits agree to ~1e-6.
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def rope_type_of(rope_scaling: Mapping[str, Any] | None) -> str:
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to q[T, Hq*D] and k[T, Hk*D] at ``positions[T]``.

    ``cos_sin_cache``: [max_position, rotary_dim] = cat(cos, sin), float32 (a buffer, so it follows
    the module's device; kept in float32 whatever the model dtype).
    """

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, base: float,
                 is_neox: bool = True, rope_scaling: Mapping[str, Any] | None = None):
        super().__init__()
        rope_type = rope_type_of(rope_scaling)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type: {rope_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.is_neox = is_neox
        inv_freq = _inv_freq(rotary_dim, base)
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, rope_scaling or {})
        elif rope_type == "linear":
            inv_freq = inv_freq / float((rope_scaling or {})["factor"])
        t = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)                       # [max_pos, rotary_dim // 2]
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_pos, rotary_dim]
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def _apply(self, fn, recurse=True):  # noqa: D401 - keep the cache in float32 across .to(dtype)
        cache = self.cos_sin_cache
        out = super()._apply(fn, recurse)
        if self.cos_sin_cache.dtype != torch.float32:
            self.cos_sin_cache = cache.to(device=self.cos_sin_cache.device)
        return out

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.rotary_embedding(positions, q, k, self.head_dim, self.cos_sin_cache, self.is_neox)


def get_rope(head_dim: int, rotary_dim: int, max_position: int, base: float,
             rope_scaling: Mapping[str, Any] | None = None, is_neox: bool = True) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, rotary_dim, max_position, base, is_neox, rope_scaling)
