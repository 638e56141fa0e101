# SPDX-License-Identifier: Apache-2.0
"""The op table of the NPU backend: every mindie_llm.ops function mapped to the torch_npu call that
vllm-ascend makes (signatures: the pinned torch-npu wheel's ``_op_plugin_docs.py`` and op-plugin
headers; docs/npu.md lists them). Semantics are those of ``ops/reference.py``.

    rms_norm                  torch_npu.npu_rms_norm(x, gamma, epsilon) -> (y, rstd)
    fused_add_rms_norm        torch_npu.npu_add_rms_norm(x1, x2, gamma, epsilon) -> (y, rstd, x1 + x2)
    rotary_embedding          torch_npu._npu_rotary_embedding(positions, q, k, head_size, cos_sin_cache,
                              is_neox_style), in place on contiguous copies of q and k
    write_kv_cache            A2/A3: torch_npu.npu_scatter_pa_kv_cache(..., cache_mode="Norm");
                              310P: torch_npu._npu_reshape_and_cache(..., slot_indices=int32)
    rotary_embedding_write_kv the two above (q and k rotated in place, as the op contract allows)
    paged_attention           attention.paged_attention: _npu_paged_attention (decode rows) and
                              npu_fused_infer_attention_score, TND layout (prefill / chunked rows)
    silu_and_mul              torch_npu.npu_swiglu(x, dim=-1)

Layouts: the KV cache of a layer is [2, num_blocks, 128, num_kv_heads, head_dim] (vllm-ascend's);
``kv_cache[0]`` / ``kv_cache[1]`` are the contiguous key / value caches the calls take. Padding
slots (slot < 0) are redirected to block 0, the null block that no real token reads, because the
torch_npu KV writes require every slot in [0, num_blocks * block_size).

Must not import anything above ``mindie_llm.ops``; torch_npu is reached through ``runtime.load()``.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from mindie_llm.backends.npu import runtime
from mindie_llm.backends.npu.attention import paged_attention

__all__ = ["rms_norm", "fused_add_rms_norm", "rotary_embedding", "write_kv_cache", "write_kv_cache_310p",
           "rotary_embedding_write_kv", "paged_attention", "silu_and_mul", "op_table"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [T, H] -> [T, H]
    return runtime.load().npu_rms_norm(x, weight, epsilon=eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # x, residual: [T, H] -> (rms_norm(x + residual), x + residual)
    y, _rstd, x_sum = runtime.load().npu_add_rms_norm(x, residual, weight, eps)
    return y, x_sum


def _cos_sin(cos_sin_cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The ATB rope kernel reads the cache in the query's dtype (vllm-ascend casts it the same way).
    return cos_sin_cache if cos_sin_cache.dtype == dtype else cos_sin_cache.to(dtype)


def _rotate_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, head_dim: int,
             cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    runtime.load()._npu_rotary_embedding(positions, q, k, head_dim, _cos_sin(cos_sin_cache, q.dtype), is_neox)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_dim: int,
                     cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # query: [T, Hq*D], key: [T, Hk*D] -> rotated copies (the torch_npu op works in place)
    q = query.clone(memory_format=torch.contiguous_format)
    k = key.clone(memory_format=torch.contiguous_format)
    _rotate_(positions, q, k, head_dim, cos_sin_cache, is_neox)
    return q, k


def _slots(slot_mapping: torch.Tensor) -> torch.Tensor:
    return slot_mapping.clamp_min(0)  # padding rows -> block 0 (the null block, never read)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    # key, value: [T, Hk, D]; kv_cache: [2, N, Bs, Hk, D] (scenario 2 of npu_scatter_pa_kv_cache)
    dt = kv_cache.dtype
    runtime.load().npu_scatter_pa_kv_cache(key=key.to(dt).contiguous(), value=value.to(dt).contiguous(),
                                           key_cache=kv_cache[0], value_cache=kv_cache[1],
                                           slot_mapping=_slots(slot_mapping), cache_mode="Norm")


def write_kv_cache_310p(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    # Atlas 310P: ATB ReshapeAndCache with int32 slot indices
    dt = kv_cache.dtype
    runtime.load()._npu_reshape_and_cache(key=key.to(dt).contiguous(), value=value.to(dt).contiguous(),
                                          key_cache=kv_cache[0], value_cache=kv_cache[1],
                                          slot_indices=_slots(slot_mapping).to(torch.int32))


def _rotary_write(write: Any):
    def rotary_embedding_write_kv(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                                  head_dim: int, cos_sin_cache: torch.Tensor,
                                  is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # query [T, Hq*D], key/value [T, Hk*D]; q, k rotated in place (contiguous copies of views)
        t = query.shape[0]
        q, k = query.contiguous(), key.contiguous()
        _rotate_(positions, q, k, head_dim, cos_sin_cache, is_neox)
        write(k.view(t, -1, head_dim), value.reshape(t, -1, head_dim), kv_cache, slot_mapping)
        return q, k

    return rotary_embedding_write_kv


rotary_embedding_write_kv = _rotary_write(write_kv_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    # x: [T, 2I] = cat(gate, up) -> silu(gate) * up, [T, I]
    return runtime.load().npu_swiglu(x, dim=-1)


def op_table(is_310p: bool = False) -> SimpleNamespace:
    """The functions ``ops.register_backend`` routes to, for A2/A3 or (``is_310p``) Atlas 310P."""
    write = write_kv_cache_310p if is_310p else write_kv_cache
    return SimpleNamespace(rms_norm=rms_norm, fused_add_rms_norm=fused_add_rms_norm,
                           rotary_embedding=rotary_embedding, write_kv_cache=write,
                           rotary_embedding_write_kv=_rotary_write(write), paged_attention=paged_attention,
                           silu_and_mul=silu_and_mul)
