# SPDX-License-Identifier: Apache-2.0
"""Triton rotary embedding, paged KV-cache write, and the two fused (rotary + KV write).

Owns the kernels that touch a step's new keys: ``rotary_embedding`` (neox and interleaved, in
place), ``write_kv_cache`` (slot < 0 = padding, skipped) and ``rotary_embedding_write_kv`` which
rotates q and k and writes the rotated k and v into the cache in the same pass. Imports triton and
torch only; must not import models, layers or executor.

``cos_sin_cache[max_pos, rot_dim]`` holds cos in its first ``rot_dim / 2`` columns and sin in the
rest (vLLM layout); dimensions past ``rot_dim`` pass through unrotated.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mindie_llm.backends.cuda import pdl

__all__ = ["rotary_embedding", "write_kv_cache", "rotary_embedding_write_kv"]


@triton.jit
def _rotate_heads(x_ptr, stride_t, tok, num_heads, cos, sin, HEAD_DIM: tl.constexpr,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, IS_NEOX: tl.constexpr):
    """Rotates every head of one token in place; returns the rotated halves for a cache store."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    if IS_NEOX:
        i1 = offs_r
        i2 = offs_r + HALF
    else:
        i1 = offs_r * 2
        i2 = offs_r * 2 + 1
    mask = (offs_h[:, None] < num_heads) & (offs_r[None, :] < HALF)
    base = x_ptr + tok * stride_t + offs_h[:, None] * HEAD_DIM              # [BLOCK_H, 1]
    x1 = tl.load(base + i1[None, :], mask=mask, other=0.0).to(tl.float32)   # [BLOCK_H, BLOCK_R]
    x2 = tl.load(base + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    o1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(x_ptr.dtype.element_ty)
    o2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(x_ptr.dtype.element_ty)
    tl.store(base + i1[None, :], o1, mask=mask)
    tl.store(base + i2[None, :], o2, mask=mask)
    return o1, o2, i1, i2, mask


@triton.jit
def _load_cos_sin(pos_ptr, cache_ptr, stride_cache, tok, HALF: tl.constexpr, BLOCK_R: tl.constexpr):
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    rmask = offs_r < HALF
    cos = tl.load(cache_ptr + pos * stride_cache + offs_r, mask=rmask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + offs_r, mask=rmask, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, stride_qt, stride_kt, stride_cache, num_q_heads,
                   num_k_heads, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                   BLOCK_HK: tl.constexpr, BLOCK_R: tl.constexpr, IS_NEOX: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    cos, sin = _load_cos_sin(pos_ptr, cache_ptr, stride_cache, tok, HALF, BLOCK_R)
    _rotate_heads(q_ptr, stride_qt, tok, num_q_heads, cos, sin, HEAD_DIM, HALF, BLOCK_HQ, BLOCK_R, IS_NEOX)
    _rotate_heads(k_ptr, stride_kt, tok, num_k_heads, cos, sin, HEAD_DIM, HALF, BLOCK_HK, BLOCK_R, IS_NEOX)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kv_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_c0, stride_cn, stride_cb, stride_ch, num_heads, block_size,
                     HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        dst = (kv_ptr + (slot // block_size) * stride_cn + (slot % block_size) * stride_cb
               + offs_h[:, None] * stride_ch + offs_d[None, :])
        tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + stride_c0, v.to(kv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_write_kv_kernel(pos_ptr, q_ptr, k_ptr, v_ptr, cache_ptr, kv_ptr, slot_ptr, stride_qt,
                            stride_kt, stride_vt, stride_cache, stride_c0, stride_cn, stride_cb, stride_ch,
                            num_q_heads, num_k_heads, block_size, HEAD_DIM: tl.constexpr,
                            HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, IS_NEOX: tl.constexpr,
                            HAS_PASS: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:   # a programmatic-dependent launch: trigger, then wait for the kernel before
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    tok = tl.program_id(0).to(tl.int64)
    cos, sin = _load_cos_sin(pos_ptr, cache_ptr, stride_cache, tok, HALF, BLOCK_R)
    _rotate_heads(q_ptr, stride_qt, tok, num_q_heads, cos, sin, HEAD_DIM, HALF, BLOCK_HQ, BLOCK_R, IS_NEOX)
    k1, k2, i1, i2, kmask = _rotate_heads(k_ptr, stride_kt, tok, num_k_heads, cos, sin, HEAD_DIM, HALF,
                                          BLOCK_HK, BLOCK_R, IS_NEOX)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        offs_h = tl.arange(0, BLOCK_HK)
        row = kv_ptr + (slot // block_size) * stride_cn + (slot % block_size) * stride_cb + offs_h[:, None] * stride_ch
        tl.store(row + i1[None, :], k1.to(kv_ptr.dtype.element_ty), mask=kmask)
        tl.store(row + i2[None, :], k2.to(kv_ptr.dtype.element_ty), mask=kmask)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = (offs_h[:, None] < num_k_heads) & (offs_d[None, :] < HEAD_DIM)
        v = tl.load(v_ptr + tok * stride_vt + offs_h[:, None] * HEAD_DIM + offs_d[None, :], mask=dmask)
        tl.store(row + stride_c0 + offs_d[None, :], v.to(kv_ptr.dtype.element_ty), mask=dmask)
        if HAS_PASS:   # dimensions past rot_dim: copied unrotated
            pmask = dmask & (offs_d[None, :] >= 2 * HALF)
            kp = tl.load(k_ptr + tok * stride_kt + offs_h[:, None] * HEAD_DIM + offs_d[None, :], mask=pmask)
            tl.store(row + offs_d[None, :], kp.to(kv_ptr.dtype.element_ty), mask=pmask)


def _check_rotary(query: torch.Tensor, key: torch.Tensor, head_dim: int, cos_sin_cache: torch.Tensor) -> int:
    if query.dim() != 2 or key.dim() != 2 or query.stride(-1) != 1 or key.stride(-1) != 1:
        raise ValueError("query/key: expected [T, heads * head_dim] with a contiguous last dimension")
    if query.shape[1] % head_dim or key.shape[1] % head_dim:
        raise ValueError(f"head_dim: {head_dim} does not divide query/key widths {query.shape[1]}, {key.shape[1]}")
    rot_dim = cos_sin_cache.shape[-1]
    if rot_dim % 2 or rot_dim > head_dim:
        raise ValueError(f"cos_sin_cache: rot_dim {rot_dim} must be even and <= head_dim {head_dim}")
    return rot_dim


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_dim: int,
                     cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates ``query[T, Hq*D]`` and ``key[T, Hk*D]`` in place at ``positions[T]``; returns them."""
    rot_dim = _check_rotary(query, key, head_dim, cos_sin_cache)
    T = query.shape[0]
    if T == 0:
        return query, key
    half = rot_dim // 2
    hq, hk = query.shape[1] // head_dim, key.shape[1] // head_dim
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    _rotary_kernel[(T,)](positions, query, key, cache, query.stride(0), key.stride(0), cache.stride(0), hq, hk,
                         HEAD_DIM=head_dim, HALF=half, BLOCK_HQ=triton.next_power_of_2(hq),
                         BLOCK_HK=triton.next_power_of_2(hk), BLOCK_R=triton.next_power_of_2(half),
                         IS_NEOX=bool(is_neox), num_warps=4)
    return query, key


def _check_cache(kv_cache: torch.Tensor, num_heads: int, head_dim: int) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[3] != num_heads \
            or kv_cache.shape[4] != head_dim or kv_cache.stride(-1) != 1:
        raise ValueError(f"kv_cache: expected [2, N, block_size, {num_heads}, {head_dim}] with a contiguous "
                         f"last dimension; got {tuple(kv_cache.shape)}")


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Stores ``key/value[T, Hk, D]`` into ``kv_cache[2, N, Bs, Hk, D]`` at ``slot_mapping[T]`` (in place)."""
    T, hk, d = key.shape
    _check_cache(kv_cache, hk, d)
    if T == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    _write_kv_kernel[(T,)](key, value, kv_cache, slot_mapping, key.stride(0), key.stride(1), value.stride(0),
                           value.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
                           kv_cache.stride(3), hk, kv_cache.shape[2], HEAD_DIM=d,
                           BLOCK_H=triton.next_power_of_2(hk), BLOCK_D=triton.next_power_of_2(d), num_warps=4)


def rotary_embedding_write_kv(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                              head_dim: int, cos_sin_cache: torch.Tensor,
                              is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary_embedding`` then ``write_kv_cache(key, value)`` in one launch; ``value[T, Hk*D]``.

    Same results as the two ops in sequence (query and key are rotated in place and returned).
    """
    rot_dim = _check_rotary(query, key, head_dim, cos_sin_cache)
    hq, hk = query.shape[1] // head_dim, key.shape[1] // head_dim
    _check_cache(kv_cache, hk, head_dim)
    value = value.reshape(value.shape[0], -1)                                 # [T, Hk*D]
    if value.shape[1] != hk * head_dim or value.stride(-1) != 1:
        raise ValueError(f"value: expected [T, {hk * head_dim}] with a contiguous last dimension")
    T = query.shape[0]
    if T == 0:
        return query, key
    half = rot_dim // 2
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    _rotary_write_kv_kernel[(T,)](
        positions, query, key, value, cache, kv_cache, slot_mapping, query.stride(0), key.stride(0),
        value.stride(0), cache.stride(0), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3), hq, hk, kv_cache.shape[2], HEAD_DIM=head_dim, HALF=half,
        BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
        BLOCK_R=triton.next_power_of_2(half), BLOCK_D=triton.next_power_of_2(head_dim),
        IS_NEOX=bool(is_neox), HAS_PASS=rot_dim < head_dim, num_warps=4, **pdl.launch_kwargs(query.device))
    return query, key
