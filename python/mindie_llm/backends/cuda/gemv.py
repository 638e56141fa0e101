# SPDX-License-Identifier: Apache-2.0
"""Triton GEMV for one-row linears (batch-1 decode) and the start-up choice between it and cuBLAS.

At M = 1 cuBLAS picks, for some shapes, a kernel that leaves most SMs idle (Llama-3-8B o_proj,
N = K = 4096: 20.8 µs against an 11.1 µs byte floor on an H100). ``gemv`` spreads the weight rows
over ``N / BLOCK_N`` programs, each streaming its rows once in ``BLOCK_K`` chunks with an fp32
accumulator. ``select_gemv_linears(model)`` times cuBLAS and each GEMV tile on every distinct
(N, K, dtype) of the model's dense linears with a cold L2 (``triton.testing.do_bench``) and sets
``layer.linear_method = gemv_linear`` only where a GEMV tile wins; ``gemv_linear`` takes the GEMV
for one-row inputs and cuBLAS for anything larger, so only batch-1 decode changes.

Imports torch and triton; uses the layers' ``linear_method`` hook (``layers/linear.py``); must not
import models, the executor or the engine.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

__all__ = ["GEMV_TILES", "gemv", "gemv_linear", "select_gemv_linears"]

logger = logging.getLogger(__name__)

# (BLOCK_N, BLOCK_K, num_warps) candidates; the start-up timing picks one per shape.
GEMV_TILES: tuple[tuple[int, int, int], ...] = ((8, 512, 4), (16, 256, 4), (4, 1024, 4), (8, 1024, 8),
                                               (16, 512, 8))


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)                          # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)                                          # [BLOCK_K]
    nmask = offs_n < N
    rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn                  # [BLOCK_N, 1]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < K
        x = tl.load(x_ptr + kk, mask=kmask, other=0.0).to(tl.float32)                          # [BLOCK_K]
        w = tl.load(rows + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1)                                                 # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=nmask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         tile: tuple[int, int, int] = GEMV_TILES[0]) -> torch.Tensor:
    """``x[1, K] @ weight[N, K]^T (+ bias[N])`` -> [1, N] in x's dtype (fp32 accumulation)."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"x: expected one row [1, K]; got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.stride(-1) != 1:
        raise ValueError(f"weight: expected [N, {x.shape[1]}] with a contiguous last dimension; "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias: expected [{weight.shape[0]}]; got {tuple(bias.shape)}")
    n, k = weight.shape
    block_n, block_k, warps = tile
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)                 # [1, N]
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, bias if bias is not None else weight, y, n, k,
                                             weight.stride(0), HAS_BIAS=bias is not None, BLOCK_N=block_n,
                                             BLOCK_K=block_k, num_warps=warps)
    return y


def gemv_linear(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """A ``linear_method``: the GEMV (tile ``layer.gemv_tile``) for one row, cuBLAS otherwise."""
    if x.dim() == 2 and x.shape[0] == 1:
        return gemv(x, layer.weight, layer.bias, layer.gemv_tile)
    return F.linear(x, layer.weight, layer.bias)


def _dense_linears(model: nn.Module) -> list[nn.Module]:
    """Linears computed by the plain dense method (recognised by their ``linear_method`` name, so
    that this backend needs no import of the layers above it)."""
    return [m for m in model.modules()
            if getattr(getattr(m, "linear_method", None), "__name__", None) == "dense_linear"
            and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 2 and m.weight.is_cuda and m.weight.dtype in (torch.bfloat16, torch.float16)]


@torch.inference_mode()
def select_gemv_linears(model: nn.Module, min_gain: float = 0.05) -> dict[tuple[int, int, str], Any]:
    """Times cuBLAS and every GEMV tile at M = 1 on each distinct weight shape of the model's dense
    bf16/fp16 linears (cold L2, median); where the best tile is faster by more than ``min_gain``,
    sets those layers' ``linear_method`` to ``gemv_linear``. Returns {(N, K, dtype): (cuBLAS µs,
    best GEMV µs, tile or None)} for the log and the benchmark."""
    layers = _dense_linears(model)
    by_shape: dict[tuple[int, int, str], list[nn.Module]] = {}
    for m in layers:
        by_shape.setdefault((m.weight.shape[0], m.weight.shape[1], str(m.weight.dtype)), []).append(m)
    report: dict[tuple[int, int, str], Any] = {}
    for key, group in by_shape.items():
        w, b = group[0].weight, group[0].bias
        x = torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device)      # [1, K]
        ref = F.linear(x, w, b)
        t_blas = triton.testing.do_bench(lambda x=x, w=w, b=b: F.linear(x, w, b), warmup=5, rep=20,
                                          return_mode="median")
        best = (t_blas, None)
        for tile in GEMV_TILES:
            out = gemv(x, w, b, tile)
            err = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
            if not err < 1e-2:                   # never choose a tile that disagrees with cuBLAS
                logger.warning("gemv tile %s on %s: relative error %.3g, skipped", tile, key, err)
                continue
            t = triton.testing.do_bench(lambda x=x, w=w, b=b, tile=tile: gemv(x, w, b, tile), warmup=5, rep=20,
                                        return_mode="median")
            if t < best[0]:
                best = (t, tile)
        chosen = best[1] if best[1] is not None and best[0] < t_blas * (1 - min_gain) else None
        report[key] = (t_blas * 1e3, best[0] * 1e3, chosen)
        if chosen is not None:
            for m in group:
                m.gemv_tile = chosen
                m.linear_method = gemv_linear
        logger.info("M=1 linear %s: cuBLAS %.1f us, best GEMV %.1f us -> %s", key, t_blas * 1e3,
                    best[0] * 1e3, f"GEMV {chosen}" if chosen else "cuBLAS")
    return report
