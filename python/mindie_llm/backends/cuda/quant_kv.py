# SPDX-License-Identifier: Apache-2.0
"""Triton kernels for the quantized KV cache (int8 and fp8 e4m3; layout of ``ops/reference.py``:
``[2, N, Bs, Hk, D + 4]`` of 1-byte codes, each token's head = D codes + its float32 scale in the
last 4 bytes): ``write_kv_cache_quant`` (quantize each head and store it),
``rotary_embedding_write_kv_quant`` (the CUDA rotary, then that write) and ``paged_attention_quant``
(the ``ops.paged_attention`` contract over a quantized cache: decodes and prefill chunks in one
launch, K and V dequantized tile by tile inside the attention loop).

The codes are converted exactly to the query's dtype (|int8| <= 127 and every e4m3 value are
representable in bf16 / fp16), so the tensor-core products run on the codes and the scales are
applied outside them: scores of key j are ``(q . k_codes_j) * k_scale_j``, and the probabilities
are multiplied by ``v_scale_j`` before the product with the V codes. The mixed-batch kernel reuses
the query-tile and sequence-search helpers of ``attention.py``; it has no split-KV variant (a
decode of a long context is one program per (sequence, KV head)). fp8 needs a GPU with e4m3
conversions (compute capability 8.9 or newer); the platform refuses it elsewhere.

``paged_decode_attention_quant`` (one query token per request, one program per query head) stays
as the small second kernel the tests compare against. Grids depend on host integers only, so the
decode launches can be captured in a CUDA graph. Must not import models, layers or executor.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mindie_llm.backends.cuda.attention import _find_seq_idx, _q_tile
from mindie_llm.backends.cuda.quant_linear import e4m3_round
from mindie_llm.backends.cuda.rotary import rotary_embedding

__all__ = ["write_kv_cache_quant", "rotary_embedding_write_kv_quant", "paged_attention_quant",
           "paged_decode_attention_quant", "KV_QUANT_DTYPES"]

KV_QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


@triton.jit
def _write_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, stride_kt, stride_vt, HALF, ENTRY, HK, QMAX,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, IS_FP8: tl.constexpr, ROUND_HERE: tl.constexpr):
    t, h, which = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, BLOCK_D)
        m = offs < D
        if which == 0:
            x = tl.load(k_ptr + t * stride_kt + h * D + offs, mask=m, other=0.0).to(tl.float32)
        else:
            x = tl.load(v_ptr + t * stride_vt + h * D + offs, mask=m, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-8) / QMAX
        y = x / scale
        if IS_FP8:   # e4m3 codes stored through the cache's int8 view
            y = tl.minimum(tl.maximum(y, -448.0), 448.0)
            if ROUND_HERE:   # the interpreter's conversion mis-rounds (quant_linear.e4m3_round)
                y = e4m3_round(y)
            q = y.to(tl.float8e4nv).to(tl.int8, bitcast=True)
        else:
            q = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(-y + 0.5))
            q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)
        base = cache_ptr + which * HALF + (slot * HK + h) * ENTRY
        tl.store(base + offs, q, mask=m)
        tl.store((base + D).to(tl.pointer_type(tl.float32)), scale)


def _check_quant_cache(kv_cache: torch.Tensor, hk: int, d: int) -> None:
    if kv_cache.dtype not in KV_QUANT_DTYPES or kv_cache.dim() != 5 or kv_cache.shape[0] != 2 \
            or kv_cache.shape[3] != hk or kv_cache.shape[4] != d + 4 or not kv_cache.is_contiguous():
        raise ValueError(f"kv_cache: expected a contiguous int8 / float8_e4m3fn [2, N, block_size, {hk}, {d + 4}]; "
                         f"got {kv_cache.dtype} {tuple(kv_cache.shape)}")


def write_kv_cache_quant(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> None:
    """key, value[T, Hk, D] -> kv_cache[2, N, Bs, Hk, D + 4] (int8 or fp8 e4m3) at ``slot_mapping``
    (< 0: skip), each head quantized with its own scale (amax / 127 or amax / 448)."""
    t, hk, d = key.shape
    _check_quant_cache(kv_cache, hk, d)
    if t == 0:
        return
    key, value = key.reshape(t, hk * d), value.reshape(t, hk * d)
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    half = kv_cache[0].numel()
    _write_kernel[(t, hk, 2)](key, value, kv_cache.view(torch.int8), slot_mapping, key.stride(0), value.stride(0),
                              half, d + 4, hk,
                              _QMAX[kv_cache.dtype], D=d, BLOCK_D=triton.next_power_of_2(d),
                              IS_FP8=kv_cache.dtype == torch.float8_e4m3fn,
                              ROUND_HERE=os.environ.get("TRITON_INTERPRET") == "1")


def rotary_embedding_write_kv_quant(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                    value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                                    head_dim: int, cos_sin_cache: torch.Tensor,
                                    is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary_embedding_write_kv`` into a quantized cache: query[T, Hq*D] and key[T, Hk*D] are
    rotated in place (returned), then the rotated key and value[T, Hk*D] are quantized and stored."""
    q, k = rotary_embedding(positions, query, key, head_dim, cos_sin_cache, is_neox)
    t = k.shape[0]
    write_kv_cache_quant(k.view(t, -1, head_dim), value.reshape(t, -1, head_dim), kv_cache, slot_mapping)
    return q, k


@triton.jit
def _qattn_tile(q, acc, m_i, l_i, j, kv_ptr, bt_row_ptr, seq_len, abs_q, kv_head, qk_scale, sliding_window,
                stride_c0, stride_cn, stride_cb, stride_ch, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, USE_WINDOW: tl.constexpr, IEEE: tl.constexpr,
                IS_FP8: tl.constexpr):
    """One tile of TILE_N keys over the quantized cache (its int8 view; online softmax in base 2)."""
    offs_d = tl.arange(0, HEAD_DIM_P)
    dmask = offs_d < HEAD_DIM
    key_pos = j * TILE_N + tl.arange(0, TILE_N)                                 # [N]
    kmask = key_pos < seq_len
    blk = tl.load(bt_row_ptr + key_pos // BLOCK_SIZE, mask=kmask, other=0).to(tl.int64)
    base = kv_ptr + blk * stride_cn + (key_pos % BLOCK_SIZE) * stride_cb + kv_head * stride_ch   # [N]
    ptrs = base[:, None] + offs_d[None, :]                                      # [N, D]
    lmask = kmask[:, None] & dmask[None, :]
    k = tl.load(ptrs, mask=lmask, other=0)                                      # [N, D] int8 (or e4m3 bits)
    v = tl.load(ptrs + stride_c0, mask=lmask, other=0)
    if IS_FP8:
        k = k.to(tl.float8e4nv, bitcast=True)
        v = v.to(tl.float8e4nv, bitcast=True)
    k = k.to(q.dtype)                                                           # codes: exact in q's dtype
    v = v.to(q.dtype)
    ks = tl.load((base + HEAD_DIM).to(tl.pointer_type(tl.float32)), mask=kmask, other=0.0)              # [N]
    vs = tl.load((base + stride_c0 + HEAD_DIM).to(tl.pointer_type(tl.float32)), mask=kmask, other=0.0)  # [N]
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * (ks * qk_scale)[None, :]                                            # [M, N], log2 units
    mask = (key_pos[None, :] <= abs_q[:, None]) & kmask[None, :]
    if USE_WINDOW:
        mask = mask & (abs_q[:, None] - key_pos[None, :] < sliding_window)
    s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    pv = (p * vs[None, :]).to(q.dtype)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(pv, v)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["num_seqs", "sliding_window"])
def _qattn_kernel(out_ptr, q_ptr, kv_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, scale, sliding_window, num_seqs,
                  stride_qt, stride_qh, stride_ot, stride_oh, stride_c0, stride_cn, stride_cb, stride_ch, stride_bt,
                  QPKV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
                  USE_WINDOW: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, IS_FP8: tl.constexpr):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq_idx(qsl_ptr, q_block, num_seqs, BLOCK_Q)
    cur_q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - cur_q_start
    q_block_local = q_block - (cur_q_start // BLOCK_Q + seq)
    if q_block_local * BLOCK_Q < q_len:
        q, query_pos, tok, head, mask = _q_tile(q_ptr, q_block_local, cur_q_start, q_len, kv_head, stride_qt,
                                                stride_qh, QPKV, BLOCK_Q, BLOCK_M, HEAD_DIM, HEAD_DIM_P)
        if UPCAST:   # the Triton interpreter's bf16/fp16 dot is wrong: compute it in fp32
            q = q.to(tl.float32)
        seq_len = tl.load(seq_lens_ptr + seq)
        context_len = seq_len - q_len
        last_key = tl.minimum(seq_len, context_len + (q_block_local + 1) * BLOCK_Q)   # exclusive
        tile_hi = tl.cdiv(last_key, TILE_N)
        tile_lo = 0
        if USE_WINDOW:
            tile_lo = tl.maximum(context_len + q_block_local * BLOCK_Q - sliding_window + 1, 0) // TILE_N
        abs_q = context_len + query_pos                                         # [M]
        qk_scale = scale * 1.4426950408889634                                   # log2(e)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
        for j in range(tile_lo, tile_hi):
            acc, m_i, l_i = _qattn_tile(q, acc, m_i, l_i, j, kv_ptr, bt_row, seq_len, abs_q, kv_head, qk_scale,
                                        sliding_window, stride_c0, stride_cn, stride_cb, stride_ch, HEAD_DIM,
                                        HEAD_DIM_P, BLOCK_SIZE, TILE_N, USE_WINDOW, IEEE, IS_FP8)
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        offs_d = tl.arange(0, HEAD_DIM_P)
        o_off = tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=mask)


def paged_attention_quant(query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata, scale: float,
                          sliding_window: int | None = None) -> torch.Tensor:
    """``ops.paged_attention`` over a quantized cache: ``query[T, Hq, D]`` (decodes and prefill
    chunks of ``attn_metadata``'s batch) -> [T, Hq, D] in query's dtype."""
    if query.dim() != 3 or query.stride(-1) != 1:
        raise ValueError(f"query: expected [T, Hq, D] with a contiguous last dimension; got {tuple(query.shape)}")
    T, hq, d = query.shape
    _check_quant_cache(kv_cache, kv_cache.shape[3] if kv_cache.dim() == 5 else -1, d)
    hk = kv_cache.shape[3]
    if hq % hk:
        raise ValueError(f"query: {hq} query heads are not a multiple of {hk} KV heads")
    qpkv = hq // hk
    md = attn_metadata
    num_seqs = int(md.seq_lens.shape[0])
    out = torch.empty_like(query)                                               # [T, Hq, D]
    if T == 0 or num_seqs == 0:
        return out
    ieee = query.dtype == torch.float32
    upcast = not ieee and os.environ.get("TRITON_INTERPRET") == "1"
    max_query_len = int(md.max_query_len)
    small = max_query_len <= max(1, 16 // qpkv)
    block_m = max(16 if small else 64, triton.next_power_of_2(qpkv))
    block_q = block_m // qpkv
    tile_n = 32 if (ieee or not small) else 64
    use_window = sliding_window is not None and sliding_window > 0
    bt = md.block_tables
    _qattn_kernel[(T // block_q + num_seqs, hk)](
        out, query, kv_cache.view(torch.int8), bt, md.seq_lens, md.query_start_loc, scale,
        int(sliding_window) if use_window else 0,
        num_seqs, query.stride(0), query.stride(1), out.stride(0), out.stride(1), kv_cache.stride(0),
        kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), bt.stride(0), QPKV=qpkv, BLOCK_Q=block_q,
        BLOCK_M=block_m, HEAD_DIM=d, HEAD_DIM_P=triton.next_power_of_2(d), BLOCK_SIZE=kv_cache.shape[2],
        TILE_N=tile_n, USE_WINDOW=use_window, IEEE=ieee, UPCAST=upcast, IS_FP8=kv_cache.dtype == torch.float8_e4m3fn,
        num_warps=4, num_stages=2)
    return out


@triton.jit
def _decode_kernel(q_ptr, cache_ptr, bt_ptr, len_ptr, out_ptr, scale, HALF, ENTRY, HK, GROUP,
                   stride_qt, stride_bt, BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   IS_FP8: tl.constexpr):
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
        blk = tl.load(bt_ptr + r * stride_bt + start // BS).to(tl.int64)
        ms = start + offs_s < seq_len
        rows = (blk * BS + offs_s) * HK + h                                          # [BS] entries
        kc = tl.load(cache_ptr + rows[:, None] * ENTRY + offs_d[None, :], mask=ms[:, None] & md[None, :],
                     other=0)                                                        # [BS, D]
        if IS_FP8:
            kc = kc.to(tl.float8e4nv, bitcast=True)
        kc = kc.to(tl.float32)
        ks = tl.load((cache_ptr + rows * ENTRY + D).to(tl.pointer_type(tl.float32)), mask=ms, other=0.0)
        s = tl.sum(kc * q[None, :], axis=1) * ks * scale                             # [BS]
        s = tl.where(ms, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        vc = tl.load(cache_ptr + HALF + rows[:, None] * ENTRY + offs_d[None, :],
                     mask=ms[:, None] & md[None, :], other=0)
        if IS_FP8:
            vc = vc.to(tl.float8e4nv, bitcast=True)
        vc = vc.to(tl.float32)
        vs = tl.load((cache_ptr + HALF + rows * ENTRY + D).to(tl.pointer_type(tl.float32)), mask=ms, other=0.0)
        acc = acc * alpha + tl.sum((p * vs)[:, None] * vc, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    tl.store(out_ptr + r * stride_qt + hq * D + offs_d, acc / l_i, mask=md)


def paged_decode_attention_quant(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                                 seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """query[B, Hq, D] (one token per request, the last of its context) over the quantized cache ->
    [B, Hq, D] float32; block_tables[B, max_blocks] int32, seq_lens[B] int32."""
    b, hq, d = query.shape
    _, _, bs, hk, entry = kv_cache.shape
    assert entry == d + 4 and kv_cache.dtype in KV_QUANT_DTYPES and kv_cache.is_contiguous()
    q = query.reshape(b, hq * d).contiguous()
    out = torch.empty((b, hq * d), dtype=torch.float32, device=query.device)
    bt = block_tables.contiguous()
    _decode_kernel[(b, hq)](q, kv_cache.view(torch.int8), bt, seq_lens.contiguous(), out, scale, kv_cache[0].numel(),
                            entry, hk,
                            hq // hk, q.stride(0), bt.stride(0), BS=bs, D=d, BLOCK_D=triton.next_power_of_2(d),
                            IS_FP8=kv_cache.dtype == torch.float8_e4m3fn)
    return out.reshape(b, hq, d)
