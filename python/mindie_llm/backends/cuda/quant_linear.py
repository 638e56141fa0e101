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
           "w4a16_matmul", "w4a16_matmul_triton", "w4a16_gemv", "w4a16_dequantize", "W4A16_GEMM", "GEMV_TILES",
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


def _mm_tile(m: int, bk: int, n: int | None = None) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the GEMM kernels for M rows. 128 x 128 tiles
    reached 0.9-1.2 PFLOP/s on an H200 at M = 2048 (8B shapes); with ``n`` given, the tile shrinks
    until the grid has two programs per SM (at M = 256 128 x 128 left 64-96 programs for 132 SMs;
    the smaller tiles are not measured yet). The interpreter keeps small tiles."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return (16 if m <= 16 else 64), 64, min(bk, 64), 4, 1
    if m <= 16:
        return 16, 64, bk, 4, 3
    bm, bn, warps = (64, 128, 4) if m <= 64 else (128, 128, 8)
    if n is not None:
        while bm > 32 and -(-m // bm) * -(-n // bn) < 264:
            bm, warps = bm // 2, 4
        while bn > 64 and -(-m // bm) * -(-n // bn) < 264:
            bn //= 2
    return bm, bn, bk, warps, 3


@triton.jit
def _w8a8_mm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                    K_PER_SPLIT, stride_cs, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tile (m, n) over K slice s (split-K for few rows: each slice's rescaled partial is stored at
    ``c_ptr + s * stride_cs``; the caller sums them)."""
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k in range(k_lo, k_hi, BLOCK_K):
        mk = k + offs_k < k_hi
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + (k + offs_k)[None, :],
                    mask=(offs_m[:, None] < M) & mk[None, :], other=0)                  # [BM, BK] int8
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + (k + offs_k)[:, None],
                    mask=(offs_n[None, :] < N) & mk[:, None], other=0)                  # [BK, BN] int8
        acc += tl.dot(a, b, out_dtype=tl.int32)
    sa = tl.load(sa_ptr + offs_m, mask=offs_m < M, other=0.0)
    sb = tl.load(sb_ptr + offs_n, mask=offs_n < N, other=0.0)
    c = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    tl.store(c_ptr + pid_s * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :], c,
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
                act_mul: torch.Tensor | None = None, split: int | None = None) -> torch.Tensor:
    """x[T, K] -> [T, N] float32; qweight[N, K] int8, w_scale[N] (see ops/reference.py).
    ``split``: the split-K factor (default: chosen from the shape for T <= 16, else 1)."""
    lim = W8A8_INT_MM_MIN_ROWS
    if lim is not None and x.shape[0] >= max(lim, 17) and x.is_cuda and x.shape[1] % 8 == 0 \
            and qweight.shape[0] % 8 == 0:
        return w8a8_matmul_int_mm(x, qweight, w_scale, act_mul)
    xq, sx = quantize_per_token_int8(x, act_mul)
    m, k = xq.shape
    n = qweight.shape[0]
    w = qweight.contiguous()
    if not m:
        return torch.empty((0, n), dtype=torch.float32, device=x.device)
    bm, bn, bk, warps, stages = _mm_tile(m, 128, n)
    if split is None:
        split = 1
        while m <= 16 and os.environ.get("TRITON_INTERPRET") != "1" and \
                 triton.cdiv(n, bn) * split * 2 <= 264 and k % (split * 2 * bk) == 0 and k // (split * 2) >= 4 * bk:
            split *= 2                     # few rows: split K until about two programs per SM
    out = torch.empty((split, m, n), dtype=torch.float32, device=x.device)          # [S, T, N]
    _w8a8_mm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), split)](
        xq, w, sx, w_scale.float().contiguous(), out, m, n, k, xq.stride(0), w.stride(0), out.stride(1),
        triton.cdiv(k, split), out.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        num_stages=stages)
    return out[0] if split == 1 else out.sum(dim=0)


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


# the many-row path: "dequant" (transient float weight + cuBLAS) or "triton" (the GEMM kernel)
W4A16_GEMM = "dequant"


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """x[T, K] @ W^T -> [T, N]; qweight[N, K/2] uint8, scales/zeros[N, K/G]. Float32 out up to
    ``GEMV_MAX_ROWS`` rows (the GEMV) and from the Triton GEMM; x's dtype from the dequant path."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    scales, zeros = scales.float().contiguous(), zeros.contiguous()
    assert zeros.stride(0) == scales.stride(0) and group_size % 32 == 0, (zeros.stride(), group_size)
    if 0 < m <= GEMV_MAX_ROWS:
        return w4a16_gemv(x, qweight, scales, zeros, group_size)
    if m > GEMV_MAX_ROWS and W4A16_GEMM == "dequant":
        # the Triton GEMM below reached ~46 TFLOP/s on an H200 (8B shapes, M = 256-2048), slower than
        # writing the layer's bf16 weight and calling cuBLAS; out in x's dtype
        return torch.nn.functional.linear(x, w4a16_dequantize(qweight, scales, zeros, group_size, x.dtype))
    return w4a16_matmul_triton(x, qweight, scales, zeros, group_size)


def w4a16_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group_size: int) -> torch.Tensor:
    """The Triton GEMM (codes dequantized per tile inside the K loop) -> [T, N] float32."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    scales, zeros = scales.float().contiguous(), zeros.contiguous()
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
# W4A16 for a few rows (batch-1..4 decode): a split-K GEMV over the packed weight
# ---------------------------------------------------------------------------------------------
GEMV_MAX_ROWS = 4
# (BLOCK_N, groups per step, SPLIT_K or 0 = chosen from the shape, num_warps) by (N, K); a shape
# not listed uses GEMV_DEFAULT_TILE. The candidates are the tiles the benchmark sweeps.
GEMV_DEFAULT_TILE = (16, 2, 0, 4)
GEMV_TILES: dict[tuple[int, int], tuple[int, int, int, int]] = {}
GEMV_CANDIDATES = ((16, 2, 0, 4), (8, 2, 0, 4), (16, 1, 0, 4), (32, 1, 0, 4), (16, 4, 0, 8), (8, 4, 0, 4),
                   (32, 2, 0, 8), (16, 2, 1, 4), (16, 2, 4, 4), (8, 1, 0, 2))
_GEMV_MIN_PROGRAMS = 512          # SPLIT_K 0: the smallest split giving at least this many programs


@triton.jit
def _w4a16_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_xm, stride_qn, stride_sn, stride_os,
                       stride_om, K_PER_SPLIT, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr):
    """Program (m, n, s): output row m, weight rows [n*BLOCK_N, +BLOCK_N), K slice s. The weight is
    read as int32 words (8 codes each, code 8w + i in nibble i), NG whole groups of BLOCK_N rows per
    step as one [BLOCK_N, NG, GROUP/8] word tile (16-byte loads along the row). Each nibble becomes a
    float without a conversion instruction (bits 0x4B000000 | c are the float 2^23 + c, so the zero
    point and 2^23 leave in one subtraction); per word t = sum_i (c_i - z) * x_{8w+i}, then acc += t * s.
    The row sums are taken once, at the end."""
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    WORDS: tl.constexpr = GROUP // 8
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                             # [BN]
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)                              # in bounds; never stored
    offs_g = tl.arange(0, NG)
    word_off = offs_g[:, None] * WORDS + tl.arange(0, WORDS)[None, :]           # [NG, G/8]
    q_rows = q_ptr + rows[:, None, None] * stride_qn                             # [BN, 1, 1]
    x_row = x_ptr + pid_m * stride_xm
    acc = tl.zeros((BLOCK_N, NG, WORDS), tl.float32)
    k_lo = pid_s * K_PER_SPLIT
    for k0 in range(k_lo, k_lo + K_PER_SPLIT, NG * GROUP):
        words = tl.load(q_rows + (k0 // 8 + word_off)[None, :, :], eviction_policy="evict_first")  # [BN,NG,G/8]
        g = k0 // GROUP + offs_g                                                 # [NG]
        sc = tl.load(s_ptr + rows[:, None] * stride_sn + g[None, :])             # [BN, NG]
        zc = tl.load(z_ptr + rows[:, None] * stride_sn + g[None, :]).to(tl.float32) + 8388608.0
        t = tl.zeros((BLOCK_N, NG, WORDS), tl.float32)
        for i in tl.static_range(8):
            xi = tl.load(x_row + k0 + 8 * word_off + i).to(tl.float32)           # [NG, G/8]
            c = (((words >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)   # 2^23 + code
            t += (c - zc[:, :, None]) * xi[None, :, :]
        acc += t * sc[:, :, None]
    y = tl.sum(tl.sum(acc, axis=2), axis=1)                                      # [BN]
    tl.store(out_ptr + pid_s * stride_os + pid_m * stride_om + offs_n, y, mask=offs_n < N)


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int, tile: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``w4a16_matmul`` for x[M, K] with M <= 4 -> [M, N] float32 (split-K partials summed in a
    fixed order, so the result does not depend on scheduling)."""
    m, k = x.shape
    n = qweight.shape[0]
    bn, ng, split, warps = tile or GEMV_TILES.get((n, k), GEMV_DEFAULT_TILE)
    while ng > 1 and (k // group_size) % ng:
        ng //= 2
    step = ng * group_size
    if k % step:
        raise ValueError(f"w4a16_gemv: K={k} is not a multiple of group_size {group_size}")
    if split == 0:
        split = 1
        while triton.cdiv(n, bn) * m * split < _GEMV_MIN_PROGRAMS and k % (2 * split * step) == 0 \
                and k // (2 * split) >= 4 * step:
            split *= 2
    while split > 1 and k % (split * step):
        split //= 2
    x = x if x.stride(-1) == 1 else x.contiguous()
    scales = scales if scales.dtype == torch.float32 and scales.is_contiguous() else scales.float().contiguous()
    zeros = zeros.contiguous()
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)      # [S, M, N]
    words = qweight.view(torch.int32)                                           # [N, K/8]
    _w4a16_gemv_kernel[(m, triton.cdiv(n, bn), split)](
        x, words, scales, zeros, part, n, k, x.stride(0), words.stride(0), scales.stride(0), part.stride(0),
        part.stride(1), k // split, GROUP=group_size, BLOCK_N=bn, NG=ng, num_warps=warps)
    return part[0] if split == 1 else part.sum(dim=0)


# ---------------------------------------------------------------------------------------------
# W4A16 for many rows: the layer's weight dequantized into a transient bf16/fp32 buffer, then cuBLAS
# ---------------------------------------------------------------------------------------------
@triton.jit
def _w4a16_dequant_kernel(q_ptr, s_ptr, z_ptr, w_ptr, N, K, stride_qn, stride_sn, stride_wn, GROUP: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (cols < K)[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    b = tl.load(q_ptr + rows * stride_qn + (cols // 2)[None, :], mask=mask, other=0)              # [BN, BK]
    c = ((b >> ((cols % 2) * 4).to(tl.uint8)[None, :]) & 0xF).to(tl.float32)
    g = (cols // GROUP)[None, :]
    sc = tl.load(s_ptr + rows * stride_sn + g, mask=mask, other=0.0)
    z = tl.load(z_ptr + rows * stride_sn + g, mask=mask, other=0).to(tl.float32)
    tl.store(w_ptr + rows * stride_wn + cols[None, :], ((c - z) * sc).to(w_ptr.dtype.element_ty), mask=mask)


def w4a16_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """The float weight W[N, K] = (code - zero) * scale in ``dtype`` (a transient buffer)."""
    n = qweight.shape[0]
    k = qweight.shape[1] * 2
    w = torch.empty((n, k), dtype=dtype, device=qweight.device)
    bn, bk = 8, 512
    _w4a16_dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        qweight, scales, zeros, w, n, k, qweight.stride(0), scales.stride(0), w.stride(0), GROUP=group_size,
        BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return w


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
