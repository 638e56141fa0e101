# SPDX-License-Identifier: Apache-2.0
"""Triton kernels of the quantized linears: ``w8a8_matmul`` (per-token int8 quantization of the
activations, then int8 x int8 -> int32 tiles, rescaled) and ``w4a16_matmul`` (4-bit codes unpacked
and dequantized per group inside the GEMM tile loop, never to a full-precision copy).

Signatures and semantics are those of ``ops/reference.py`` (the oracle). Verified only under
``TRITON_INTERPRET=1`` on CPU tensors (tests/unit/backends/cuda/test_quant_triton.py): no GPU
has run these kernels, and their speed is not measured. Rounding of the activation quantizer is
round-half-away-from-zero (the reference rounds half to even; they differ only on exact ties).

Must not import models, layers or executor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["quantize_per_token_int8", "w8a8_matmul", "w4a16_matmul"]


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


def w8a8_matmul(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                act_mul: torch.Tensor | None = None) -> torch.Tensor:
    """x[T, K] -> [T, N] float32; qweight[N, K] int8, w_scale[N] (see ops/reference.py)."""
    xq, sx = quantize_per_token_int8(x, act_mul)
    m, k = xq.shape
    n = qweight.shape[0]
    w = qweight.contiguous()
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    if m:
        bm, bn, bk = 16 if m <= 16 else 64, 64, 64
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _w8a8_mm_kernel[grid](xq, w, sx, w_scale.float().contiguous(), out, m, n, k, xq.stride(0), w.stride(0),
                              out.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return out


@triton.jit
def _w4a16_mm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, c_ptr, M, N, K, GROUP, stride_xm, stride_qn, stride_sn,
                     stride_cm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
        acc += tl.dot(a.to(tl.float32), w)
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
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    if m:
        bm, bn, bk = 16 if m <= 16 else 64, 64, 32
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _w4a16_mm_kernel[grid](x, qweight.contiguous(), scales, zeros, out, m, n, k, group_size, x.stride(0),
                               qweight.stride(0), scales.stride(0), out.stride(0),
                               BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return out
