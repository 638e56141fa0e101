# SPDX-License-Identifier: Apache-2.0
"""Triton kernels for the int8 KV cache (layout of ``ops/reference.py``: ``[2, N, Bs, Hk, D + 4]``
int8, each token's head = D codes + its float32 scale in the last 4 bytes):
``write_kv_cache_quant`` (quantize each head and store it) and ``paged_decode_attention_quant``
(one query token per request, dequantizing K and V block by block inside the attention loop).

Verified only under ``TRITON_INTERPRET=1`` against the reference; not yet registered in the CUDA
op table (a quantized cache is refused off the CPU at start-up), because prefill chunks still
need a kernel. Must not import models, layers or executor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["write_kv_cache_quant", "paged_decode_attention_quant"]


@triton.jit
def _write_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, stride_kt, stride_vt, HALF, ENTRY, HK,
                  D: tl.constexpr, BLOCK_D: tl.constexpr):
    t, h, which = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        offs = tl.arange(0, BLOCK_D)
        m = offs < D
        if which == 0:
            x = tl.load(k_ptr + t * stride_kt + h * D + offs, mask=m, other=0.0).to(tl.float32)
        else:
            x = tl.load(v_ptr + t * stride_vt + h * D + offs, mask=m, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-8) / 127.0
        y = x / scale
        q = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(-y + 0.5))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)
        base = cache_ptr + which * HALF + (slot * HK + h) * ENTRY
        tl.store(base + offs, q, mask=m)
        tl.store((base + D).to(tl.pointer_type(tl.float32)), scale)


def write_kv_cache_quant(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> None:
    """key, value[T, Hk, D] -> int8 kv_cache[2, N, Bs, Hk, D + 4] at ``slot_mapping`` (< 0: skip)."""
    assert kv_cache.dtype == torch.int8 and kv_cache.is_contiguous()
    t, hk, d = key.shape
    if t == 0:
        return
    key, value = key.reshape(t, hk * d).contiguous(), value.reshape(t, hk * d).contiguous()
    half = kv_cache[0].numel()
    _write_kernel[(t, hk, 2)](key, value, kv_cache, slot_mapping.contiguous(), key.stride(0), value.stride(0),
                              half, d + 4, hk, D=d, BLOCK_D=triton.next_power_of_2(d))


@triton.jit
def _decode_kernel(q_ptr, cache_ptr, bt_ptr, len_ptr, out_ptr, scale, HALF, ENTRY, HK, GROUP,
                   stride_qt, stride_bt, BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    r, hq = tl.program_id(0), tl.program_id(1)
    h = hq // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < D
    offs_s = tl.arange(0, BS)
    q = tl.load(q_ptr + r * stride_qt + hq * D + offs_d, mask=md, other=0.0).to(tl.float32)
    seq_len = tl.load(len_ptr + r)
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(0, seq_len, BS):
        blk = tl.load(bt_ptr + r * stride_bt + start // BS)
        ms = start + offs_s < seq_len
        rows = (blk * BS + offs_s) * HK + h                                          # [BS] entries
        kc = tl.load(cache_ptr + rows[:, None] * ENTRY + offs_d[None, :], mask=ms[:, None] & md[None, :],
                     other=0).to(tl.float32)                                         # [BS, D]
        ks = tl.load((cache_ptr + rows * ENTRY + D).to(tl.pointer_type(tl.float32)), mask=ms, other=0.0)
        s = tl.sum(kc * q[None, :], axis=1) * ks * scale                             # [BS]
        s = tl.where(ms, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        vc = tl.load(cache_ptr + HALF + rows[:, None] * ENTRY + offs_d[None, :],
                     mask=ms[:, None] & md[None, :], other=0).to(tl.float32)
        vs = tl.load((cache_ptr + HALF + rows * ENTRY + D).to(tl.pointer_type(tl.float32)), mask=ms, other=0.0)
        acc = acc * alpha + tl.sum((p * vs)[:, None] * vc, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    tl.store(out_ptr + r * stride_qt + hq * D + offs_d, acc / l_i, mask=md)


def paged_decode_attention_quant(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                                 seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """query[B, Hq, D] (one token per request, the last of its context) over the int8 cache ->
    [B, Hq, D] float32; block_tables[B, max_blocks] int32, seq_lens[B] int32."""
    b, hq, d = query.shape
    _, _, bs, hk, entry = kv_cache.shape
    assert entry == d + 4 and kv_cache.dtype == torch.int8 and kv_cache.is_contiguous()
    q = query.reshape(b, hq * d).contiguous()
    out = torch.empty((b, hq * d), dtype=torch.float32, device=query.device)
    bt = block_tables.contiguous()
    _decode_kernel[(b, hq)](q, kv_cache, bt, seq_lens.contiguous(), out, scale, kv_cache[0].numel(), entry, hk,
                            hq // hk, q.stride(0), bt.stride(0), BS=bs, D=d, BLOCK_D=triton.next_power_of_2(d))
    return out.reshape(b, hq, d)
