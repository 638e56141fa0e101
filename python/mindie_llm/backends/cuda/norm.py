# SPDX-License-Identifier: Apache-2.0
"""Triton RMSNorm and residual-add fused with RMSNorm (one pass over each row).

Owns the two norm kernels of the CUDA backend. Imports triton and torch only; must not import the
package's models, layers or executor. The reference semantics are ``ops/reference.py``: the norm and the
weight product are computed in float32 and cast back to the input dtype once. On Hopper both are
programmatic-dependent launches (``pdl.py``): trigger, then wait for the kernel before, at their
start.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mindie_llm.backends.cuda import pdl

__all__ = ["rms_norm", "fused_add_rms_norm"]


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, H, eps, BLOCK_H: tl.constexpr,
                     USE_PDL: tl.constexpr):
    if USE_PDL:   # the GEMV after this may start streaming its weights; wait for the kernel before
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * rstd * w
    tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, stride_x, stride_res,
                               stride_out, stride_new_res, H, eps, BLOCK_H: tl.constexpr,
                               USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(new_res_ptr.dtype.element_ty)            # the residual stream keeps the model dtype
    tl.store(new_res_ptr + row * stride_new_res + offs, s, mask=mask)
    s32 = s.to(tl.float32)
    var = tl.sum(s32 * s32, axis=0) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = s32 * rstd * w
    tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_params(H: int) -> tuple[int, int]:
    block = triton.next_power_of_2(H)
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    return block, num_warps


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])                          # [T, H]
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x[T, H]`` -> ``[T, H]``: ``x / sqrt(mean(x^2) + eps) * weight``."""
    shape = x.shape
    x2 = _rows(x)                                            # [T, H]
    out = torch.empty_like(x2)
    T, H = x2.shape
    if T == 0:
        return out.reshape(shape)
    block, warps = _launch_params(H)
    _rms_norm_kernel[(T,)](x2, weight, out, x2.stride(0), out.stride(0), H, eps, BLOCK_H=block,
                           num_warps=warps, **pdl.launch_kwargs(x2.device))
    return out.reshape(shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` in one pass; inputs are not modified."""
    shape = x.shape
    x2 = _rows(x)                                            # [T, H]
    r2 = _rows(residual)                                     # [T, H]
    out = torch.empty_like(x2)
    new_res = torch.empty_like(r2)
    T, H = x2.shape
    if T > 0:
        block, warps = _launch_params(H)
        _fused_add_rms_norm_kernel[(T,)](x2, r2, weight, out, new_res, x2.stride(0), r2.stride(0),
                                         out.stride(0), new_res.stride(0), H, eps,
                                         BLOCK_H=block, num_warps=warps, **pdl.launch_kwargs(x2.device))
    return out.reshape(shape), new_res.reshape(shape)
