# SPDX-License-Identifier: Apache-2.0
"""Kernels of the quantized linears on CUDA: ``w8a8_matmul`` (per-token int8 quantization of the
activations, then int8 x int8 -> int32 Triton tiles, rescaled; ``w8a8_matmul_int_mm`` the same
through cuBLAS's int8 GEMM), ``w4a16_matmul`` (4-bit codes unpacked and dequantized per group
inside the GEMM tile loop, never to a full-precision copy; up to ``GEMV_MAX_ROWS`` rows a split-K
GEMV, ``w4a16_gemv``, whose tile per weight shape comes from ``GEMV_TILES``) and ``fp8_matmul``
(per-token e4m3 activations, ``torch._scaled_mm`` with row-wise scales).

Signatures and semantics are those of ``ops/reference.py`` (the oracle), checked by
tests/unit/backends/cuda/test_quant_triton.py (on a GPU, or under ``TRITON_INTERPRET=1`` on CPU
tensors). Rounding of the int8 activation quantizer is round-half-away-from-zero (the reference
rounds half to even; they differ only on exact ties).

Must not import models, layers or executor.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["quantize_per_token_int8", "w8a8_matmul", "w8a8_matmul_int_mm", "W8A8_INT_MM_MIN_ROWS",
           "w4a16_matmul", "w4a16_gemv", "GEMV_TILES",
           "GEMV_CANDIDATES", "quantize_fp8_rows", "fp8_matmul", "e4m3_round"]


@triton.jit
def _quant_per_token_kernel(x_ptr, mul_ptr, xq_ptr, s_ptr, K, stride_x, stride_q,
                            HAS_MUL: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), tl.float32)
    for k in range(0, K, BLOCK_K):
        m = k + offs < K
        x = tl.load(x_ptr + row * stride_x + k + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_MUL:
            x = x * tl.load(mul_ptr + k + offs, mask=m, other=0.0)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-8) / 127.0
    tl.store(s_ptr + row, scale)
    for k in range(0, K, BLOCK_K):
        m = k + offs < K
        x = tl.load(x_ptr + row * stride_x + k + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_MUL:
            x = x * tl.load(mul_ptr + k + offs, mask=m, other=0.0)
        y = x / scale
        q = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(-y + 0.5))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(xq_ptr + row * stride_q + k + offs, q.to(tl.int8), mask=m)


def quantize_per_token_int8(x: torch.Tensor, act_mul: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """x[T, K] (times act_mul[K]) -> (xq[T, K] int8, scale[T] float32)."""
    t, k = x.shape
    x = x.contiguous()
    xq = torch.empty((t, k), dtype=torch.int8, device=x.device)
    s = torch.empty((t,), dtype=torch.float32, device=x.device)
    if t:
        mul = act_mul.float().contiguous() if act_mul is not None else s
        _quant_per_token_kernel[(t,)](x, mul, xq, s, k, x.stride(0), xq.stride(0),
                                      HAS_MUL=act_mul is not None, BLOCK_K=min(1024, triton.next_power_of_2(k)))
    return xq, s


def _mm_tile(m: int, bk: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the GEMM kernels for M rows (not tuned on a
    GPU yet; the interpreter keeps small tiles)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return (16 if m <= 16 else 64), 64, min(bk, 64), 4, 1
    if m <= 16:
        return 16, 64, bk, 4, 3
    if m <= 64:
        return 64, 128, bk, 4, 3
    return 128, 128, bk, 8, 3


@triton.jit
def _w8a8_mm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    for k in range(0, K, BLOCK_K):
        mk = k + offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + (k + offs_k)[None, :],
                    mask=(offs_m[:, None] < M) & mk[None, :], other=0)                  # [BM, BK] int8
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + (k + offs_k)[:, None],
                    mask=(offs_n[None, :] < N) & mk[:, None], other=0)                  # [BK, BN] int8
        acc += tl.dot(a, b, out_dtype=tl.int32)
    sa = tl.load(sa_ptr + offs_m, mask=offs_m < M, other=0.0)
    sb = tl.load(sb_ptr + offs_n, mask=offs_n < N, other=0.0)
    c = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], c,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# rows from which W8A8 uses cuBLAS's int8 GEMM (torch._int_mm, then one rescale pass) instead of
# the Triton GEMM; None: always Triton (the benchmark times both)
W8A8_INT_MM_MIN_ROWS: int | None = None


@triton.jit
def _rescale_kernel(acc_ptr, sa_ptr, sb_ptr, c_ptr, N, stride_am, stride_cm, BLOCK_N: tl.constexpr):
    row, pid_n = tl.program_id(0), tl.program_id(1)
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = offs < N
    acc = tl.load(acc_ptr + row * stride_am + offs, mask=m, other=0).to(tl.float32)
    sa = tl.load(sa_ptr + row)
    sb = tl.load(sb_ptr + offs, mask=m, other=0.0)
    tl.store(c_ptr + row * stride_cm + offs, acc * sa * sb, mask=m)


def w8a8_matmul_int_mm(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                       act_mul: torch.Tensor | None = None) -> torch.Tensor:
    """``w8a8_matmul`` through ``torch._int_mm`` (needs T > 16, K and N multiples of 8)."""
    xq, sx = quantize_per_token_int8(x, act_mul)
    acc = torch._int_mm(xq, qweight.t())                                          # [T, N] int32
    m, n = acc.shape
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    _rescale_kernel[(m, triton.cdiv(n, 1024))](acc, sx, w_scale.float().contiguous(), out, n, acc.stride(0),
                                               out.stride(0), BLOCK_N=1024)
    return out


def w8a8_matmul(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                act_mul: torch.Tensor | None = None) -> torch.Tensor:
    """x[T, K] -> [T, N] float32; qweight[N, K] int8, w_scale[N] (see ops/reference.py)."""
    lim = W8A8_INT_MM_MIN_ROWS
    if lim is not None and x.shape[0] >= max(lim, 17) and x.is_cuda and x.shape[1] % 8 == 0 \
            and qweight.shape[0] % 8 == 0:
        return w8a8_matmul_int_mm(x, qweight, w_scale, act_mul)
    xq, sx = quantize_per_token_int8(x, act_mul)
    m, k = xq.shape
    n = qweight.shape[0]
    w = qweight.contiguous()
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    if m:
        bm, bn, bk, warps, stages = _mm_tile(m, 128)
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _w8a8_mm_kernel[grid](xq, w, sx, w_scale.float().contiguous(), out, m, n, k, xq.stride(0), w.stride(0),
                              out.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out


@triton.jit
def _w4a16_mm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, c_ptr, M, N, K, GROUP, stride_xm, stride_qn, stride_sn,
                     stride_cm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     HALF_DOT: tl.constexpr):
    """HALF_DOT: x is bf16/fp16 and the dequantized tile is rounded to it for a tensor-core dot;
    otherwise the dot is fp32 (IEEE, not TF32)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mn = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, K, BLOCK_K):                     # BLOCK_K divides GROUP: one group per step
        kk = k + offs_k
        mk = kk < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                    mask=(offs_m[:, None] < M) & mk[None, :], other=0.0)                   # [BM, BK]
        packed = tl.load(q_ptr + offs_n[None, :] * stride_qn + (kk // 2)[:, None],
                         mask=mn[None, :] & mk[:, None], other=0)                          # [BK, BN] uint8
        codes = (packed >> ((kk % 2) * 4).to(tl.uint8)[:, None]) & 0xF
        g = k // GROUP
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mn, other=0.0)                  # [BN]
        z = tl.load(z_ptr + offs_n * stride_sn + g, mask=mn, other=0).to(tl.float32)
        w = (codes.to(tl.float32) - z[None, :]) * s[None, :]                              # [BK, BN]
        if HALF_DOT:
            acc += tl.dot(a, w.to(a.dtype))
        else:
            acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc,
             mask=(offs_m[:, None] < M) & mn[None, :])


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """x[T, K] @ W^T -> [T, N] float32; qweight[N, K/2] uint8, scales/zeros[N, K/G]."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    scales, zeros = scales.float().contiguous(), zeros.contiguous()
    assert zeros.stride(0) == scales.stride(0) and group_size % 32 == 0, (zeros.stride(), group_size)
    if 0 < m <= GEMV_MAX_ROWS:
        return w4a16_gemv(x, qweight, scales, zeros, group_size)
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    if m:
        bm, bn, bk, warps, stages = _mm_tile(m, min(64, group_size))
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        half = x.dtype in (torch.bfloat16, torch.float16) and os.environ.get("TRITON_INTERPRET") != "1"
        _w4a16_mm_kernel[grid](x, qweight.contiguous(), scales, zeros, out, m, n, k, group_size, x.stride(0),
                               qweight.stride(0), scales.stride(0), out.stride(0),
                               BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HALF_DOT=half, num_warps=warps,
                               num_stages=stages)
    return out


# ---------------------------------------------------------------------------------------------
# W4A16 GEMV for a few rows (batch-1..4 decode): split-K over the packed weight
# ---------------------------------------------------------------------------------------------
GEMV_MAX_ROWS = 4
# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps) by (N, K); a shape not listed uses GEMV_DEFAULT_TILE.
# BLOCK_K codes (BLOCK_K / 2 bytes) per row per step; a step spans BLOCK_K / group_size groups
# (or lies inside one group). The tile candidates are the ones the benchmark sweeps.
GEMV_DEFAULT_TILE = (16, 256, 4, 4)
GEMV_TILES: dict[tuple[int, int], tuple[int, int, int, int]] = {}
GEMV_CANDIDATES = ((16, 128, 4, 4), (16, 256, 4, 4), (8, 512, 4, 4), (16, 512, 2, 4), (32, 256, 4, 8),
                   (32, 512, 2, 8), (64, 256, 2, 8), (16, 1024, 1, 8), (8, 1024, 2, 4), (16, 256, 8, 4),
                   (8, 256, 8, 2), (32, 128, 8, 4))


@triton.jit
def _w4a16_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K, GROUP, stride_xm, stride_qn, stride_sn,
                       stride_os, stride_om, K_PER_SPLIT, M_P: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, NG: tl.constexpr):
    """Program (n, s): rows [n*BLOCK_N, +BLOCK_N) over K slice s (K_PER_SPLIT codes), BLOCK_K codes
    (NG groups, or part of one when NG = 1) a step: y += s * (codes . x - z * sum(x)) per group,
    the exact algebra of sum((c - z) * s * x)."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                             # [BN]
    nmask = offs_n < N
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)                            # in bounds; never stored
    offs_b = tl.arange(0, BLOCK_K // 2)                                          # byte offsets in a step
    offs_m = tl.arange(0, M_P)
    mmask = offs_m < M
    acc = tl.zeros((M_P, BLOCK_N), tl.float32)
    k_lo = pid_s * K_PER_SPLIT
    for k0 in range(k_lo, k_lo + K_PER_SPLIT, BLOCK_K):
        packed = tl.load(q_ptr + rows_n[:, None] * stride_qn + (k0 // 2 + offs_b)[None, :],
                         eviction_policy="evict_first")                               # [BN, BK/2] uint8
        lo = (packed & 0xF).to(tl.float32)
        hi = (packed >> 4).to(tl.float32)
        xk = x_ptr + offs_m[:, None] * stride_xm + (k0 + 2 * offs_b)[None, :]
        xe = tl.load(xk, mask=mmask[:, None], other=0.0).to(tl.float32)              # [M, BK/2] even k
        xo = tl.load(xk + 1, mask=mmask[:, None], other=0.0).to(tl.float32)          # odd k
        prod = lo[None, :, :] * xe[:, None, :] + hi[None, :, :] * xo[:, None, :]      # [M, BN, BK/2]
        g0 = k0 // GROUP
        if NG == 1:
            dot = tl.sum(prod, axis=2)                                               # [M, BN]
            xs = tl.sum(xe + xo, axis=1)                                             # [M]
            sc = tl.load(s_ptr + rows_n * stride_sn + g0)                            # [BN]
            z = tl.load(z_ptr + rows_n * stride_sn + g0).to(tl.float32)
            acc += sc[None, :] * (dot - z[None, :] * xs[:, None])
        else:
            dot = tl.sum(tl.reshape(prod, (M_P, BLOCK_N, NG, BLOCK_K // 2 // NG)), axis=3)     # [M, BN, NG]
            xs = tl.sum(tl.reshape(xe + xo, (M_P, NG, BLOCK_K // 2 // NG)), axis=2)             # [M, NG]
            gs = rows_n[:, None] * stride_sn + g0 + tl.arange(0, NG)[None, :]                  # [BN, NG]
            sc = tl.load(s_ptr + gs)
            z = tl.load(z_ptr + gs).to(tl.float32)
            acc += tl.sum(sc[None, :, :] * (dot - z[None, :, :] * xs[:, None, :]), axis=2)
    o = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(o, acc, mask=mmask[:, None] & nmask[None, :])


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int, tile: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``w4a16_matmul`` for x[M, K] with M <= 4 -> [M, N] float32 (split-K partials summed in a
    fixed order, so the result does not depend on scheduling)."""
    m, k = x.shape
    n = qweight.shape[0]
    bn, bk, split, warps = tile or GEMV_TILES.get((n, k), GEMV_DEFAULT_TILE)
    while bk > 32 and k % bk:
        bk //= 2
    while split > 1 and k % (split * bk):
        split //= 2
    if k % bk or (bk % group_size and group_size % bk):
        raise ValueError(f"w4a16_gemv: K={k} / group {group_size} do not fit the step {bk}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    scales = scales if scales.dtype == torch.float32 and scales.is_contiguous() else scales.float().contiguous()
    zeros = zeros.contiguous()
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)      # [S, M, N]
    m_p = 1 if m == 1 else (2 if m == 2 else 4)
    _w4a16_gemv_kernel[(triton.cdiv(n, bn), split)](
        x, qweight, scales, zeros, part, m, n, k, group_size, x.stride(0), qweight.stride(0), scales.stride(0),
        part.stride(0), part.stride(1), k // split, M_P=m_p, BLOCK_N=bn, BLOCK_K=bk, NG=max(1, bk // group_size),
        num_warps=warps)
    return part[0] if split == 1 else part.sum(dim=0)


# ---------------------------------------------------------------------------------------------
# FP8 (e4m3) weights with dynamic per-token activation scales: torch._scaled_mm
# ---------------------------------------------------------------------------------------------
@triton.jit
def e4m3_round(y):
    """y (fp32, |y| <= 448) rounded to the nearest e4m3 value (ties away from zero), in fp32: the
    Triton interpreter's fp32 -> fp8 conversion mis-rounds where the rounding carries into the
    exponent (31 -> 16), so under the interpreter the codes are rounded here and converted exactly."""
    a = tl.abs(y)
    e = tl.maximum(tl.floor(tl.log2(tl.maximum(a, 1e-30))), -6.0)          # subnormals: spacing 2^-9
    step = tl.exp2(e - 3.0)
    r = tl.floor(a / step + 0.5) * step
    return tl.where(y < 0, -r, r)


@triton.jit
def _quant_fp8_kernel(x_ptr, xq_ptr, s_ptr, K, stride_x, stride_q, BLOCK_K: tl.constexpr,
                      ROUND_HERE: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), tl.float32)
    for k in range(0, K, BLOCK_K):
        m = k + offs < K
        x = tl.load(x_ptr + row * stride_x + k + offs, mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
    tl.store(s_ptr + row, scale)
    for k in range(0, K, BLOCK_K):
        m = k + offs < K
        x = tl.load(x_ptr + row * stride_x + k + offs, mask=m, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        if ROUND_HERE:
            y = e4m3_round(y)
        tl.store(xq_ptr + row * stride_q + k + offs, y.to(tl.float8e4nv).to(tl.int8, bitcast=True), mask=m)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x[T, K] -> (xq[T, K] float8_e4m3fn, scale[T] float32), as ``ops/reference.py``."""
    t, k = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    xq = torch.empty((t, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((t,), dtype=torch.float32, device=x.device)
    if t:
        _quant_fp8_kernel[(t,)](x, xq.view(torch.int8), s, k, x.stride(0), xq.stride(0),
                                BLOCK_K=min(1024, triton.next_power_of_2(k)),
                                ROUND_HERE=os.environ.get("TRITON_INTERPRET") == "1")
    return xq, s


def fp8_matmul(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x[T, K] -> [T, N] in x's dtype; qweight[N, K] float8_e4m3fn (row-major), w_scale[N] float32.
    ``torch._scaled_mm`` with row-wise scales (bf16 out; for fp32 x, unit scales and fp32 out, the
    scales applied after) where the shape allows (K and N multiples of 16), else the dequantized
    product."""
    m, k = x.shape
    n = qweight.shape[0]
    if m == 0:
        return torch.empty((0, n), dtype=x.dtype, device=x.device)
    xq, sx = quantize_fp8_rows(x)
    if x.is_cuda and k % 16 == 0 and n % 16 == 0:
        if x.dtype == torch.float32:   # row-wise scales need bf16 out: fp32 out, scales applied after
            one = torch.ones((), dtype=torch.float32, device=x.device)
            y = torch._scaled_mm(xq, qweight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
            return y.mul_(sx[:, None]).mul_(w_scale[None, :])                        # [T, N]
        y = torch._scaled_mm(xq, qweight.t(), scale_a=sx[:, None], scale_b=w_scale[None, :],
                             out_dtype=torch.bfloat16)                               # [T, N]
        return y if y.dtype == x.dtype else y.to(x.dtype)
    w = qweight.float() * w_scale.float()[:, None]
    return ((xq.float() * sx[:, None]) @ w.T).to(x.dtype)
