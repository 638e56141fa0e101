# SPDX-License-Identifier: Apache-2.0
"""Triton SiLU-and-mul: ``x[T, 2I] -> silu(x[:, :I]) * x[:, I:]`` in one pass.

Owns the activation kernel of the CUDA backend; imports triton and torch only (never models,
layers or executor).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mindie_llm.backends.cuda import pdl

__all__ = ["silu_and_mul"]


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, I, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    if USE_PDL:   # the GEMV after this may start streaming its weights; wait for the kernel before
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x[T, 2I]`` -> ``[T, I]``."""
    if x.shape[-1] % 2 != 0:
        raise ValueError(f"x: last dimension must be even (gate and up halves); got {x.shape[-1]}")
    x2 = x.reshape(-1, x.shape[-1])                          # [T, 2I]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T, I = x2.shape[0], x2.shape[1] // 2
    out = torch.empty((T, I), dtype=x.dtype, device=x.device)  # [T, I]
    if T > 0:
        block = min(1024, triton.next_power_of_2(I))
        _silu_and_mul_kernel[(T, triton.cdiv(I, block))](x2, out, x2.stride(0), out.stride(0), I,
                                                         BLOCK=block, num_warps=4,
                                                         **pdl.launch_kwargs(x2.device))
    return out.reshape(*x.shape[:-1], I)
