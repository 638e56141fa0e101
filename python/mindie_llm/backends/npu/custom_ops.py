# SPDX-License-Identifier: Apache-2.0
"""The project's own Ascend C operators (ops/ascendc) as an alternative op table: when the torch
extension that registers ``torch.ops.mindie_ascendc.*`` is loaded (built from
ops/ascendc/*/torch_adapter.cpp on an Ascend host; ``MINDIE_ASCENDC_OPS=/path/lib.so`` makes the
platform load it), these replace the torch_npu builtins for

    fused_add_rms_norm         mindie_ascendc.add_rms_norm(x1, x2, gamma, epsilon) -> (y, rstd, x)
    silu_and_mul               mindie_ascendc.swiglu(x)
    rotary_embedding_write_kv  mindie_ascendc.rotary_kv_write(...) -> (q, k); K/V into the caches
    paged_attention (decodes)  mindie_ascendc.paged_decode_attention(...)  (FlashDecoding, split-KV)

for float16 and float32 tensors (the kernels' dtypes); bfloat16 and prefill rows keep the
torch_npu calls. Must not import anything above ``mindie_llm.ops``.
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import torch

from mindie_llm.backends.npu.attention import plan_for, prefill_attention

__all__ = ["available", "load_from_env", "custom_op_table", "OPS", "ENV"]

ENV = "MINDIE_ASCENDC_OPS"
OPS = ("add_rms_norm", "swiglu", "rotary_kv_write", "paged_decode_attention")
_DTYPES = (torch.float16, torch.float32)


def load_from_env() -> None:
    """Loads the extension named by $MINDIE_ASCENDC_OPS (a ValueError naming it if that fails)."""
    path = os.environ.get(ENV)
    if not path:
        return
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{ENV}: cannot load the Ascend C op library {path!r}: {str(e).splitlines()[0]}") from None


def available() -> bool:
    ns = torch.ops.mindie_ascendc
    try:
        return all(getattr(ns, name) is not None for name in OPS)
    except (AttributeError, RuntimeError):
        return False


def custom_op_table(base: SimpleNamespace) -> SimpleNamespace:
    """``base`` (ops.op_table) with the four ops above routed to torch.ops.mindie_ascendc."""
    ns = torch.ops.mindie_ascendc

    def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        if x.dtype not in _DTYPES:
            return base.fused_add_rms_norm(x, residual, weight, eps)
        y, _rstd, x_sum = ns.add_rms_norm(x, residual, weight, eps)        # [T, H] each
        return y, x_sum

    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        return ns.swiglu(x) if x.dtype in _DTYPES and x.dim() == 2 else base.silu_and_mul(x)

    def rotary_embedding_write_kv(positions, query, key, value, kv_cache, slot_mapping, head_dim, cos_sin_cache,
                                  is_neox):
        if query.dtype not in _DTYPES or kv_cache.dtype != query.dtype:
            return base.rotary_embedding_write_kv(positions, query, key, value, kv_cache, slot_mapping, head_dim,
                                                  cos_sin_cache, is_neox)
        t = query.shape[0]
        return ns.rotary_kv_write(positions, query, key, value.reshape(t, -1), kv_cache[0], kv_cache[1],
                                  slot_mapping, head_dim, cos_sin_cache.float(), is_neox)

    def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: Any, scale: float,
                        sliding_window: int | None = None) -> torch.Tensor:
        # decode rows: FlashDecoding (device tables and lengths); prefill rows: FIA as in attention.py
        nd = int(attn_metadata.num_decodes)
        if query.dtype not in _DTYPES or nd == 0 or sliding_window is not None:
            return base.paged_attention(query, kv_cache, attn_metadata, scale, sliding_window)
        plan = plan_for(attn_metadata)
        out = torch.empty_like(query)
        out[:nd] = ns.paged_decode_attention(query[:nd].contiguous(), kv_cache[0], kv_cache[1],
                                             attn_metadata.block_tables[:nd].to(torch.int32).contiguous(),
                                             attn_metadata.seq_lens[:nd].to(torch.int32), float(scale))
        prefill_attention(query, kv_cache, plan, scale, out)
        return out

    return SimpleNamespace(**dict(vars(base), fused_add_rms_norm=fused_add_rms_norm, silu_and_mul=silu_and_mul,
                                  rotary_embedding_write_kv=rotary_embedding_write_kv,
                                  paged_attention=paged_attention))
