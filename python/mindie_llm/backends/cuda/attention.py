# SPDX-License-Identifier: Apache-2.0
"""Triton paged attention over the mixed batch (decodes and prefill chunks in one launch).

Owns the attention kernels of the CUDA backend. One program computes ``BLOCK_Q`` query tokens of
one sequence for all the query heads that share one KV head (GQA rows packed into the tile's M
dimension), walking the sequence's block table in tiles of ``TILE_N`` keys with an online softmax;
causal masking is over the cached context plus the chunk (query token ``i`` of a chunk sees keys
``< context_len + i + 1``). For batches of decodes only, a split-KV (Flash-Decoding) variant splits
each sequence's keys into ``NUM_SEGMENTS`` segments computed by separate programs: this keeps the
GPU busy when the batch is small and the contexts long. The segments are merged in the same launch
by whichever program of a (sequence, KV head) finishes last (an arrival counter per pair, reset by
that program), so a short-context batch-1 decode is one kernel, not a split pass and a reduce pass;
the two-kernel form (``merge="two_pass"``) stays for comparison.

Grids depend only on host integers (T, B, heads), never on device values, so a decode launch can be
captured in a CUDA graph. Imports triton and torch only; must not import models, layers or executor.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mindie_llm.backends.cuda import pdl

__all__ = ["paged_attention", "paged_attention_raw", "NUM_SEGMENTS"]

NUM_SEGMENTS = 16          # split-KV segments of the decode-only variant
_SPLIT_MIN_SEQ_LEN = 512   # eager batches with a shorter longest context use the single-pass kernel
# Tile of batches with prefill chunks (max_query_len > 1): rows of the M tile (query tokens x GQA
# group), keys per step, warps and software-pipelining stages. Measured on an H100: docs/gpu_notes.md.
PREFILL_TILE = {"block_m": 64, "tile_n": 32, "num_warps": 4, "num_stages": 2}


@triton.jit
def _find_seq_idx(qsl_ptr, target, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose q blocks contain global q block ``target`` (binary search)."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if start <= target:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attn_tile(q, acc, m_i, l_i, j, kv_ptr, bt_row_ptr, seq_len, abs_q, kv_head, qk_scale, sliding_window,
               stride_c0, stride_cn, stride_cb, stride_ch, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, MASKED: tl.constexpr, USE_WINDOW: tl.constexpr,
               IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One tile of TILE_N keys (online softmax in base 2). MASKED: the tile crosses the causal
    diagonal, the sequence end or the window; otherwise every key is visible to every row."""
    offs_d = tl.arange(0, HEAD_DIM_P)
    dmask = offs_d < HEAD_DIM
    key_pos = j * TILE_N + tl.arange(0, TILE_N)                                 # [N]
    if MASKED:
        kmask = key_pos < seq_len
    else:
        kmask = key_pos >= 0
    blk = tl.load(bt_row_ptr + key_pos // BLOCK_SIZE, mask=kmask, other=0).to(tl.int64)
    base = kv_ptr + blk * stride_cn + (key_pos % BLOCK_SIZE) * stride_cb + kv_head * stride_ch
    ptrs = base[:, None] + offs_d[None, :]                                      # [N, D]
    lmask = kmask[:, None] & dmask[None, :]
    k = tl.load(ptrs, mask=lmask, other=0.0)
    v = tl.load(ptrs + stride_c0, mask=lmask, other=0.0)
    if UPCAST:   # the Triton interpreter's bf16/fp16 dot is wrong (triton 3.9): compute it in fp32
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale                                                            # [M, N], log2 units
    if MASKED:
        mask = (key_pos[None, :] <= abs_q[:, None]) & kmask[None, :]
        if USE_WINDOW:
            mask = mask & (abs_q[:, None] - key_pos[None, :] < sliding_window)
        s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _attn_tile_loop(q, acc, m_i, l_i, kv_ptr, bt_row_ptr, tile_lo, tile_hi, full_hi, seq_len, context_len,
                    query_pos, kv_head, scale, sliding_window, stride_c0, stride_cn, stride_cb, stride_ch,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    TILE_N: tl.constexpr, USE_WINDOW: tl.constexpr, IEEE: tl.constexpr,
                    UPCAST: tl.constexpr):
    """Tiles [tile_lo, tile_hi): those below ``full_hi`` unmasked, the rest masked."""
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale = scale * 1.4426950408889634                                       # log2(e)
    abs_q = context_len + query_pos                                             # [M]
    mid = tl.minimum(tl.maximum(full_hi, tile_lo), tile_hi)
    for j in range(tile_lo, mid):
        acc, m_i, l_i = _attn_tile(q, acc, m_i, l_i, j, kv_ptr, bt_row_ptr, seq_len, abs_q, kv_head, qk_scale,
                                   sliding_window, stride_c0, stride_cn, stride_cb, stride_ch, HEAD_DIM,
                                   HEAD_DIM_P, BLOCK_SIZE, TILE_N, False, USE_WINDOW, IEEE, UPCAST)
    for j in range(mid, tile_hi):
        acc, m_i, l_i = _attn_tile(q, acc, m_i, l_i, j, kv_ptr, bt_row_ptr, seq_len, abs_q, kv_head, qk_scale,
                                   sliding_window, stride_c0, stride_cn, stride_cb, stride_ch, HEAD_DIM,
                                   HEAD_DIM_P, BLOCK_SIZE, TILE_N, True, USE_WINDOW, IEEE, UPCAST)
    return acc, m_i, l_i


@triton.jit
def _q_tile(q_ptr, q_block_local, cur_q_start, q_len, kv_head, stride_qt, stride_qh,
            QPKV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
            HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_P)
    query_pos = q_block_local * BLOCK_Q + offs_m // QPKV                        # [M] position in chunk
    head = kv_head * QPKV + offs_m % QPKV                                       # [M] query head
    row_mask = (offs_m < BLOCK_Q * QPKV) & (query_pos < q_len)
    tok = (cur_q_start + query_pos).to(tl.int64)
    q_off = tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + q_off, mask=mask, other=0.0)                             # [M, D]
    return q, query_pos, tok, head, mask


@triton.jit(do_not_specialize=["num_seqs", "sliding_window"])
def _unified_attn_kernel(out_ptr, q_ptr, kv_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, scale, sliding_window,
                         num_seqs, stride_qt, stride_qh, stride_ot, stride_oh, stride_c0, stride_cn,
                         stride_cb, stride_ch, stride_bt, QPKV: tl.constexpr, BLOCK_Q: tl.constexpr,
                         BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, USE_WINDOW: tl.constexpr,
                         IEEE: tl.constexpr, UPCAST: tl.constexpr):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq_idx(qsl_ptr, q_block, num_seqs, BLOCK_Q)
    cur_q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - cur_q_start
    q_block_local = q_block - (cur_q_start // BLOCK_Q + seq)
    if q_block_local * BLOCK_Q < q_len:
        q, query_pos, tok, head, mask = _q_tile(q_ptr, q_block_local, cur_q_start, q_len, kv_head, stride_qt,
                                                stride_qh, QPKV, BLOCK_Q, BLOCK_M, HEAD_DIM, HEAD_DIM_P)
        seq_len = tl.load(seq_lens_ptr + seq)
        context_len = seq_len - q_len
        last_key = tl.minimum(seq_len, context_len + (q_block_local + 1) * BLOCK_Q)   # exclusive
        tile_hi = tl.cdiv(last_key, TILE_N)
        tile_lo = 0
        full_hi = (context_len + q_block_local * BLOCK_Q + 1) // TILE_N        # tiles every row sees whole
        if USE_WINDOW:
            first_key = tl.maximum(context_len + q_block_local * BLOCK_Q - sliding_window + 1, 0)
            tile_lo = first_key // TILE_N
            full_hi = tile_lo
        acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc, m_i, l_i = _attn_tile_loop(q, acc, m_i, l_i, kv_ptr, bt_ptr + seq.to(tl.int64) * stride_bt,
                                        tile_lo, tile_hi, full_hi, seq_len, context_len, query_pos, kv_head, scale,
                                        sliding_window, stride_c0, stride_cn, stride_cb, stride_ch, HEAD_DIM,
                                        HEAD_DIM_P, BLOCK_SIZE, TILE_N, USE_WINDOW, IEEE, UPCAST)
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        offs_d = tl.arange(0, HEAD_DIM_P)
        o_off = tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_kv_decode_kernel(part_out_ptr, part_m_ptr, part_l_ptr, q_ptr, kv_ptr, bt_ptr, seq_lens_ptr,
                            scale, sliding_window, stride_qt, stride_qh, stride_c0, stride_cn, stride_cb,
                            stride_ch, stride_bt, QPKV: tl.constexpr, BLOCK_M: tl.constexpr,
                            HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                            TILE_N: tl.constexpr, NUM_SEG: tl.constexpr, USE_WINDOW: tl.constexpr,
                            IEEE: tl.constexpr, UPCAST: tl.constexpr, count_ptr, out_ptr, stride_ot, stride_oh,
                            MERGE: tl.constexpr, QPKV_P: tl.constexpr, USE_PDL: tl.constexpr):
    """Decode-only batch (one query token per sequence): segment ``pid2`` of sequence ``pid0``.
    MERGE: the last program of the (sequence, KV head) to arrive merges the segments into ``out``.
    USE_PDL: a programmatic-dependent launch (the o_proj GEMV after it may start its weight loads;
    this waits for the kernel before it first)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    q, query_pos, tok, head, mask = _q_tile(q_ptr, 0, seq, 1, kv_head, stride_qt, stride_qh, QPKV, 1, BLOCK_M,
                                            HEAD_DIM, HEAD_DIM_P)
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - 1
    num_tiles = tl.cdiv(seq_len, TILE_N)
    tiles_per_seg = tl.cdiv(num_tiles, NUM_SEG)
    tile_lo = segment * tiles_per_seg
    tile_hi = tl.minimum(tile_lo + tiles_per_seg, num_tiles)
    full_hi = seq_len // TILE_N
    if USE_WINDOW:
        first_tile = tl.maximum(context_len - sliding_window + 1, 0) // TILE_N
        tile_lo = tl.maximum(tile_lo, first_tile)
        full_hi = tile_lo
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attn_tile_loop(q, acc, m_i, l_i, kv_ptr, bt_ptr + seq.to(tl.int64) * stride_bt, tile_lo,
                                    tile_hi, full_hi, seq_len, context_len, query_pos, kv_head, scale, sliding_window,
                                    stride_c0, stride_cn, stride_cb, stride_ch, HEAD_DIM, HEAD_DIM_P,
                                    BLOCK_SIZE, TILE_N, USE_WINDOW, IEEE, UPCAST)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_P)
    row_ok = offs_m < QPKV
    # partials laid out [B, Hq, NUM_SEG, D] and [B, Hq, NUM_SEG]
    ml_off = (tok * (tl.num_programs(1) * QPKV) + head) * NUM_SEG + segment                 # [M]
    tl.store(part_m_ptr + ml_off, m_i, mask=row_ok)
    tl.store(part_l_ptr + ml_off, l_i, mask=row_ok)
    tl.store(part_out_ptr + ml_off[:, None] * HEAD_DIM_P + offs_d[None, :], acc, mask=row_ok[:, None])
    if MERGE:
        # Every thread's partial stores come before the barrier; the acq_rel counter increment
        # (one thread, GPU scope) publishes them, and the last arrival's acquire sees all of them.
        tl.debug_barrier()
        cnt_ptr = count_ptr + seq * tl.num_programs(1) + kv_head
        arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
        if arrived == NUM_SEG - 1:
            tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")     # ready for the next launch
            offs_h = tl.arange(0, QPKV_P)
            offs_s = tl.arange(0, NUM_SEG)
            hmask = offs_h < QPKV
            row0 = seq.to(tl.int64)                        # decode-only: token index = sequence index
            hrow = row0 * (tl.num_programs(1) * QPKV) + kv_head * QPKV + offs_h                # [H]
            ml = hrow[:, None] * NUM_SEG + offs_s[None, :]                                    # [H, S]
            m = tl.load(part_m_ptr + ml, mask=hmask[:, None], other=float("-inf"), cache_modifier=".cg")
            l = tl.load(part_l_ptr + ml, mask=hmask[:, None], other=0.0, cache_modifier=".cg")
            m_max = tl.max(m, axis=1)                                                         # [H]
            m_max = tl.where(m_max > float("-inf"), m_max, 0.0)
            w = tl.exp2(m - m_max[:, None])               # log2 units; empty segments weigh 0  [H, S]
            denom = tl.sum(l * w, axis=1)                                                     # [H]
            parts = tl.load(part_out_ptr + ml[:, :, None] * HEAD_DIM_P + offs_d[None, None, :],
                            mask=hmask[:, None, None], other=0.0, cache_modifier=".cg")       # [H, S, D]
            o = tl.sum(parts * w[:, :, None], axis=1) / tl.where(denom > 0, denom, 1.0)[:, None]  # [H, D]
            o_off = row0 * stride_ot + (kv_head * QPKV + offs_h)[:, None] * stride_oh + offs_d[None, :]
            tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=hmask[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _split_kv_reduce_kernel(out_ptr, part_out_ptr, part_m_ptr, part_l_ptr, stride_ot, stride_oh,
                            HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, NUM_SEG: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = tok * tl.num_programs(1) + head
    offs_s = tl.arange(0, NUM_SEG)
    offs_d = tl.arange(0, HEAD_DIM_P)
    m = tl.load(part_m_ptr + row * NUM_SEG + offs_s)                            # [S]
    l = tl.load(part_l_ptr + row * NUM_SEG + offs_s)                            # [S]
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)
    w = tl.exp2(m - m_max)                                 # maxima are in log2 units; empty segments: 0
    denom = tl.sum(l * w, axis=0)
    acc = tl.load(part_out_ptr + (row * NUM_SEG + offs_s)[:, None] * HEAD_DIM_P + offs_d[None, :])  # [S, D]
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + tok * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def _common(query: torch.Tensor, kv_cache: torch.Tensor) -> tuple[int, int, int, int, int]:
    if query.dim() != 3 or query.stride(-1) != 1:
        raise ValueError(f"query: expected [T, Hq, D] with a contiguous last dimension; got {tuple(query.shape)}")
    T, hq, d = query.shape
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[4] != d or kv_cache.stride(-1) != 1:
        raise ValueError(f"kv_cache: expected [2, N, block_size, Hk, {d}]; got {tuple(kv_cache.shape)}")
    hk = kv_cache.shape[3]
    if hq % hk:
        raise ValueError(f"query: {hq} query heads are not a multiple of {hk} KV heads")
    return T, hq, d, hk, hq // hk


def _use_split(split_kv: bool | None, max_query_len: int, max_seq_len: int | None) -> bool:
    if split_kv is None:
        return max_query_len == 1 and (max_seq_len is None or max_seq_len >= _SPLIT_MIN_SEQ_LEN)
    return bool(split_kv)


def paged_attention_raw(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                        seq_lens: torch.Tensor, block_tables: torch.Tensor, num_seqs: int, max_query_len: int,
                        scale: float, sliding_window: int | None = None, out: torch.Tensor | None = None,
                        split_kv: bool | None = None, max_seq_len: int | None = None,
                        merge: str = "in_kernel", counters: torch.Tensor | None = None) -> torch.Tensor:
    """``query[T, Hq, D]`` attends to the paged cache; returns ``[T, Hq, D]`` (into ``out`` if given).

    ``split_kv=None`` picks the split-KV variant for decode-only batches whose longest context is at
    least ``_SPLIT_MIN_SEQ_LEN`` (or unknown); CUDA-graph capture passes it explicitly. Its segments
    are merged ``"in_kernel"`` (one launch; ``counters``: int32 [>= T * Hk] zeros, left zero again,
    allocated here when not given) or ``"two_pass"`` (a second kernel).
    """
    T, hq, d, hk, qpkv = _common(query, kv_cache)
    if out is None:
        out = torch.empty_like(query)                                           # [T, Hq, D]
    if T == 0 or num_seqs == 0:
        return out
    block_size = kv_cache.shape[2]
    head_dim_p = triton.next_power_of_2(d)
    ieee = query.dtype == torch.float32
    upcast = not ieee and os.environ.get("TRITON_INTERPRET") == "1"
    use_window = sliding_window is not None and sliding_window > 0
    window = int(sliding_window) if use_window else 0
    if _use_split(split_kv, max_query_len, max_seq_len):
        assert max_query_len == 1 and T == num_seqs, "split-KV needs a decode-only batch"
        block_m = max(16, triton.next_power_of_2(qpkv))
        tile_n = 32 if ieee else 64
        part_out = torch.empty((T, hq, NUM_SEGMENTS, head_dim_p), dtype=torch.float32, device=query.device)
        part_m = torch.empty((T, hq, NUM_SEGMENTS), dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
        if merge not in ("in_kernel", "two_pass"):
            raise ValueError(f"merge: expected 'in_kernel' or 'two_pass'; got {merge!r}")
        fused = merge == "in_kernel"
        if fused and counters is None:
            counters = torch.zeros(T * hk, dtype=torch.int32, device=query.device)
        if fused and (counters.dtype != torch.int32 or counters.numel() < T * hk):
            raise ValueError(f"counters: expected int32 [>= {T * hk}]; got {counters.dtype} [{counters.numel()}]")
        _split_kv_decode_kernel[(T, hk, NUM_SEGMENTS)](
            part_out, part_m, part_l, query, kv_cache, block_tables, seq_lens, scale, window, query.stride(0),
            query.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
            block_tables.stride(0), QPKV=qpkv, BLOCK_M=block_m, HEAD_DIM=d, HEAD_DIM_P=head_dim_p,
            BLOCK_SIZE=block_size, TILE_N=tile_n, NUM_SEG=NUM_SEGMENTS, USE_WINDOW=use_window, IEEE=ieee,
            UPCAST=upcast, count_ptr=counters if fused else part_m, out_ptr=out, stride_ot=out.stride(0),
            stride_oh=out.stride(1), MERGE=fused, QPKV_P=triton.next_power_of_2(qpkv),
            num_warps=4, **(pdl.launch_kwargs(query.device) if fused else {"USE_PDL": False}))
        if not fused:
            _split_kv_reduce_kernel[(T, hq)](out, part_out, part_m, part_l, out.stride(0), out.stride(1),
                                             HEAD_DIM=d, HEAD_DIM_P=head_dim_p, NUM_SEG=NUM_SEGMENTS, num_warps=4)
        return out
    small = max_query_len <= max(1, 16 // qpkv)                                 # decodes (and tiny chunks)
    cfg = {"block_m": 16, "tile_n": 32 if ieee else 64, "num_warps": 4, "num_stages": 2} if small else PREFILL_TILE
    block_m = max(cfg["block_m"], triton.next_power_of_2(qpkv))
    block_q = block_m // qpkv
    tile_n = 32 if ieee else cfg["tile_n"]
    grid = (T // block_q + num_seqs, hk)
    _unified_attn_kernel[grid](
        out, query, kv_cache, block_tables, seq_lens, query_start_loc, scale, window, num_seqs,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), kv_cache.stride(0), kv_cache.stride(1),
        kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0), QPKV=qpkv, BLOCK_Q=block_q,
        BLOCK_M=block_m, HEAD_DIM=d, HEAD_DIM_P=head_dim_p, BLOCK_SIZE=block_size, TILE_N=tile_n,
        USE_WINDOW=use_window, IEEE=ieee, UPCAST=upcast, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return out


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata, scale: float,
                    sliding_window: int | None = None) -> torch.Tensor:
    """The ``ops.paged_attention`` contract: ``query[T, Hq, D]`` over ``attn_metadata``'s batch."""
    md = attn_metadata
    num_seqs = int(md.seq_lens.shape[0])
    state = getattr(md, "backend_state", None)
    state = state if isinstance(state, dict) else {}
    split = state.get("cuda_split_kv")                              # fixed by the CUDA-graph capture
    max_seq_len = int(md.max_seq_len) if md.max_seq_len is not None else None
    counters = None
    if query.shape[0] and _use_split(split, int(md.max_query_len), max_seq_len):
        counters = _step_counters(state, query.shape[0] * kv_cache.shape[3], query.device)
    return paged_attention_raw(query, kv_cache, md.query_start_loc, md.seq_lens, md.block_tables, num_seqs,
                               int(md.max_query_len), scale, sliding_window, split_kv=split,
                               max_seq_len=max_seq_len, counters=counters)


def _step_counters(state: dict, n: int, device: torch.device) -> torch.Tensor:
    """The split-KV arrival counters of one step, shared by its layers (each launch leaves them
    zero). Allocated once per step (metadata), and once inside a CUDA-graph capture: the tensor
    must belong to the graph's pool, since the metadata of a capture does not outlive it."""
    key = "cuda_split_counters_graph" if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing() \
        else "cuda_split_counters"
    c = state.get(key)
    if c is None or c.numel() < n or c.device != device:
        c = state[key] = torch.zeros(max(n, 1), dtype=torch.int32, device=device)
    return c
