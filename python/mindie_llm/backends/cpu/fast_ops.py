# SPDX-License-Identifier: Apache-2.0
"""The CPU op table: the plain-torch ops of ``backends/cpu/ops.py`` with C++ kernels
(``backends/cpu/kernels.py``) where they apply, so that a float32 decode layer is a handful of
calls: add + RMSNorm (one call), the qkv matmul, rotary + KV write (one call, in place), paged
decode attention (one call, no gather), the o matmul, add + RMSNorm, gate_up, SiLU-and-mul (one
call), down.

Each fast path falls back to the torch op when its conditions do not hold (another dtype,
non-adjacent q/k/v, a prefill chunk in the batch for attention). Indices the kernels follow are
checked once per step against the cache and cached in ``attn_metadata.backend_state``.
``ops/reference.py`` stays the oracle; tests compare every function here against it.

Must not import models, layers, the engine or another backend.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mindie_llm.backends.cpu import kernels as _k
from mindie_llm.backends.cpu import ops as _torch_ops
from mindie_llm.backends.cpu.ops import write_kv_cache, rotary_embedding  # noqa: F401
from mindie_llm.ops import reference as _ref

if TYPE_CHECKING:
    from mindie_llm.ops.attention_metadata import AttentionMetadata

__all__ = ["rms_norm", "fused_add_rms_norm", "rotary_embedding", "write_kv_cache",
           "rotary_embedding_write_kv", "paged_attention", "silu_and_mul", "gguf_repack", "gguf_matmul",
           "gguf_embedding"]

_FAST = _k.available()


_F32 = torch.float32
# The checks below are written out (no helper, no generator): they run ~10 times per layer and
# step, and a decode step at batch 1 is bound by this per-call Python cost.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if (_FAST and x.dtype is _F32 and weight.dtype is _F32 and x.dim() == 2 and x.is_contiguous()
            and weight.is_contiguous()):
        return _k.add_rms_norm(x, None, weight, eps)[0]
    return _torch_ops.rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if (_FAST and x.dtype is _F32 and residual.dtype is _F32 and weight.dtype is _F32 and x.dim() == 2
            and x.shape == residual.shape and x.is_contiguous() and residual.is_contiguous()
            and weight.is_contiguous()):
        return _k.add_rms_norm(x, residual, weight, eps)
    return _torch_ops.fused_add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> [T, I]: one C++ call (instead of silu, then mul) for float32 rows."""
    if _FAST and x.dtype is _F32 and x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % 2 == 0:
        return _k.silu_and_mul(x)
    return _torch_ops.silu_and_mul(x)


def _token_map(md: "AttentionMetadata") -> tuple[torch.Tensor, torch.Tensor]:
    """Once per step: the request of each query token and how many keys it attends (causal),
    both int32 [T]; the kernels check every index they follow against the cache."""
    key = "cpu_token_map"
    st = md.backend_state.get(key)
    if st is None:
        qsl = md.query_start_loc.long()
        counts = qsl[1:] - qsl[:-1]                                             # [B]
        if md.num_decodes == md.num_reqs:
            req = torch.arange(md.num_reqs, dtype=torch.int32)
            length = md.seq_lens.to(torch.int32).contiguous()
        else:
            req = torch.repeat_interleave(torch.arange(counts.numel()), counts)   # [T]
            tok = torch.arange(req.numel())
            length = (md.seq_lens.long()[req] - (qsl[1:][req] - 1 - tok)).to(torch.int32)
            req = req.to(torch.int32)
        st = md.backend_state[key] = (req, length)
    return st


def rotary_embedding_write_kv(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                              head_dim: int, cos_sin_cache: torch.Tensor,
                              is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """In place (q and k of the qkv output rotated; K and V written) in one C++ call when q, k, v
    are adjacent float32 column ranges of one qkv tensor (the model's case)."""
    t = query.shape[0]
    es = 4  # float32 bytes
    if (_FAST and t > 0 and query.dtype == key.dtype == value.dtype == kv_cache.dtype == cos_sin_cache.dtype
            == torch.float32 and kv_cache.is_contiguous() and cos_sin_cache.is_contiguous()
            and query.stride() == key.stride() == value.stride() and query.stride(1) == 1
            and key.data_ptr() == query.data_ptr() + query.shape[1] * es
            and value.data_ptr() == key.data_ptr() + key.shape[1] * es and value.shape[1] == key.shape[1]
            and kv_cache.shape[-1] == head_dim and cos_sin_cache.shape[-1] <= head_dim
            and slot_mapping.numel() == t and positions.numel() == t):
        if (slot_mapping.dtype == positions.dtype == torch.int64 and slot_mapping.is_contiguous()
                and positions.is_contiguous()):
            _k.rope_write_kv(query, t, query.shape[1] // head_dim, key.shape[1] // head_dim, head_dim,
                             positions, cos_sin_cache, is_neox, kv_cache, slot_mapping)
            return query, key
    return _torch_ops.rotary_embedding_write_kv(positions, query, key, value, kv_cache, slot_mapping,
                                                head_dim, cos_sin_cache, is_neox)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: "AttentionMetadata",
                    scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Decodes and prefill chunks in one C++ call (no gather of the context) for float32."""
    md = attn_metadata
    t, hq, d = query.shape
    bt = md.block_tables
    if (_FAST and t and query.dtype == kv_cache.dtype == torch.float32 and kv_cache.is_contiguous()
            and d % 16 == 0 and hq % kv_cache.shape[3] == 0 and bt.dtype == torch.int32 and bt.dim() == 2
            and bt.stride(1) == 1 and md.num_tokens == t):
        req, length = _token_map(md)
        return _k.paged_attention(query, kv_cache, bt, req, length, scale, sliding_window)
    return _torch_ops.paged_attention(query, kv_cache, md, scale, sliding_window)


def gguf_repack(raw: torch.Tensor, ggml_type: int, n: int, k: int) -> torch.Tensor:
    if _FAST:
        return _k.repack(raw, ggml_type, n, k)
    return _ref.gguf_repack(raw, ggml_type, n, k)


def gguf_matmul(x: torch.Tensor, packed: torch.Tensor, ggml_type: int, n: int, k: int) -> torch.Tensor:
    if _FAST:
        return _k.matmul(x if x.dtype is _F32 else x.float(), packed, ggml_type, n, k)
    return _ref.gguf_matmul(x, packed, ggml_type, n, k)


def gguf_embedding(ids: torch.Tensor, packed: torch.Tensor, ggml_type: int, n: int, k: int) -> torch.Tensor:
    if _FAST:
        return _k.dequant_rows(ids, packed, ggml_type, n, k)
    return _ref.gguf_embedding(ids, packed, ggml_type, n, k)
