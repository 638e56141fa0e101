# SPDX-License-Identifier: Apache-2.0
"""Triton GEMV for one-row linears (batch-1 decode) and the start-up choice between it and cuBLAS.

At M = 1 a linear is a stream over its weight: the byte floor is ``N * K * 2`` bytes at the card's
copy rate. ``gemv`` spreads the weight rows over ``N / BLOCK_N`` programs (1 to 16 rows each: every
Llama-3-8B shape then gives at least 256 programs, two per SM, so K needs no split), each streaming
its rows in ``BLOCK_K`` chunks of 16-byte vector loads with an fp32 accumulator; ``EVEN_N`` / ``EVEN_K`` drop the masks
where the shape allows, so the loads stay full-width. ``out_dtype=float32`` writes fp32 directly
(the LM head's logits: no separate cast). ``pdl=True`` launches it as a programmatic dependent
(Hopper, ``pdl.py``): the first weight chunk, which no earlier kernel writes, is requested before
the program waits for the kernel before it; x is read and y written only after the wait.

``select_gemv_linears(model)`` times cuBLAS and each candidate tile on every distinct (N, K, dtype)
of the model's dense linears and its LM head, as the decode graph runs them: a CUDA graph of one
M = 1 product per layer of that shape (different weights, so the L2 is cold for each as in the
model), median of replays; ``layer.linear_method`` becomes ``gemv_linear`` (``gemv_lm_head`` for
the head) only where a tile wins. The methods take the GEMV for one-row inputs and cuBLAS for
anything larger, so only batch-1 decode changes.

Imports torch and triton only; uses the layers' ``linear_method`` hook (the dense linears and the
LM head, recognised by name) and must not import layers, models, the executor or the engine.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from mindie_llm.backends.cuda import pdl

__all__ = ["GEMV_TILES", "LEGACY_TILES", "gemv", "gemv_linear", "gemv_lm_head", "select_gemv_linears",
           "time_in_graph"]

logger = logging.getLogger(__name__)

# (BLOCK_N, BLOCK_K, num_warps) candidates; the start-up timing picks one per shape. The first
# five are the tiles of the previous version of this kernel (the benchmark compares against them).
LEGACY_TILES: tuple[tuple[int, int, int], ...] = ((8, 512, 4), (16, 256, 4), (4, 1024, 4), (8, 1024, 8),
                                                 (16, 512, 8))
GEMV_TILES: tuple[tuple[int, int, int], ...] = ((2, 2048, 4), (4, 2048, 8), (4, 1024, 4), (8, 1024, 8),
                                               (2, 4096, 8), (8, 512, 4), (16, 512, 8), (1, 4096, 4), (1, 2048, 4), (1, 1024, 4))


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                 USE_PDL: tl.constexpr):
    """Program ``pid`` computes ``y[pid*BLOCK_N : (pid+1)*BLOCK_N]`` over the whole K range.
    USE_PDL: launched as a programmatic dependent; the first weight chunk (which no earlier kernel
    writes) is loaded before waiting for the kernel before, x and y only after."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)                          # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)                                          # [BLOCK_K]
    nmask = offs_n < N
    if EVEN_N:
        rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn              # [BLOCK_N, 1]
    else:   # out-of-range rows read row N-1 (in bounds, never stored): the loads need no row mask
        rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * stride_wn
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if EVEN_K:
        w = tl.load(rows + offs_k[None, :], eviction_policy="evict_first")                    # [BLOCK_N, BLOCK_K]
    else:
        w = tl.load(rows + offs_k[None, :], mask=(offs_k < K)[None, :], other=0.0, eviction_policy="evict_first")
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    if EVEN_K:
        x = tl.load(x_ptr + offs_k).to(tl.float32)                                             # [BLOCK_K]
    else:
        x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    acc = w.to(tl.float32) * x[None, :]                                                        # [BLOCK_N, BLOCK_K]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            xk = tl.load(x_ptr + kk).to(tl.float32)
            wk = tl.load(rows + kk[None, :], eviction_policy="evict_first").to(tl.float32)
        else:
            kmask = kk < K
            xk = tl.load(x_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
            wk = tl.load(rows + kk[None, :], mask=kmask[None, :], other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
        acc += wk * xk[None, :]
    y = tl.sum(acc, axis=1)                                                 # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=nmask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         tile: tuple[int, int, int] = GEMV_TILES[0], out_dtype: torch.dtype | None = None,
         pdl: bool = False) -> torch.Tensor:
    """``x[1, K] @ weight[N, K]^T (+ bias[N])`` -> [1, N] in ``out_dtype`` (default x's dtype),
    accumulated in fp32. ``pdl``: launch as a programmatic dependent (``pdl.supported()`` only)."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"x: expected one row [1, K]; got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.stride(-1) != 1:
        raise ValueError(f"weight: expected [N, {x.shape[1]}] with a contiguous last dimension; "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias: expected [{weight.shape[0]}]; got {tuple(bias.shape)}")
    n, k = weight.shape
    block_n, block_k, warps = tile
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))             # tiny K: no wasted lanes
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty((1, n), dtype=out_dtype or x.dtype, device=x.device)    # [1, N]
    extra = {"launch_pdl": True} if pdl else {}
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, bias if bias is not None else weight, y, n, k,
                                             weight.stride(0), HAS_BIAS=bias is not None, BLOCK_N=block_n,
                                             BLOCK_K=block_k, EVEN_N=n % block_n == 0, EVEN_K=k % block_k == 0,
                                             USE_PDL=pdl, num_warps=warps, **extra)
    return y


def gemv_linear(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """A ``linear_method``: the GEMV (tile ``layer.gemv_tile``) for one row, cuBLAS otherwise."""
    if x.dim() == 2 and x.shape[0] == 1:
        return gemv(x, layer.weight, layer.bias, layer.gemv_tile, pdl=getattr(layer, "gemv_pdl", False))
    return F.linear(x, layer.weight, layer.bias)


def gemv_lm_head(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """The LM head's ``linear_method``: fp32 logits straight from the GEMV for one row (the head's
    ``.float()`` is then a no-op), cuBLAS otherwise."""
    if x.dim() == 2 and x.shape[0] == 1:
        return gemv(x, layer.weight, None, layer.gemv_tile, out_dtype=torch.float32,
                    pdl=getattr(layer, "gemv_pdl", False))
    return F.linear(x, layer.weight)


def _m1_linears(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """(layer, is_lm_head) for the layers whose one-row product can move to the GEMV: bf16/fp16
    weights on the GPU computed by the plain dense method, and the LM head when no quantization
    method owns it. Recognised by the method's and the head's names, so that this backend imports
    nothing from the layers above it."""
    out = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_cuda or w.dtype not in (torch.bfloat16,
                                                                                             torch.float16):
            continue
        method = getattr(m, "linear_method", "absent")
        if getattr(method, "__name__", None) == "dense_linear":
            out.append((m, False))
        elif method is None and type(m).__name__ == "LMHead":
            out.append((m, True))
    return out


def time_in_graph(fns: list[Callable[[], Any]], reps: int = 20, stream: torch.cuda.Stream | None = None) -> float:
    """Median seconds per call of ``fns`` (run in order) replayed from one CUDA graph: launch
    overhead out, as inside the decode graph. Each fn is run once eagerly first (compiles).
    ``stream``: the capture stream (pass one for many calls: cuBLAS keeps a workspace per stream)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    stream = stream or torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / len(fns))
    del g
    times.sort()
    return times[len(times) // 2]


def _graph_group(group: list[nn.Module], l2_bytes: int, min_calls: int = 8) -> list[nn.Module]:
    """Layers of one shape to time together, in order: enough different weights to read past the
    L2 twice between two reads of one weight (where the model has them), cycled to ``min_calls``."""
    per = group[0].weight.numel() * group[0].weight.element_size()
    need = max(1, -(-2 * l2_bytes // per))
    base = group[:need]
    return [base[i % len(base)] for i in range(max(min_calls, len(base)))]


@torch.inference_mode()
def select_gemv_linears(model: nn.Module, min_gain: float = 0.0,
                        tiles: tuple[tuple[int, int, int], ...] = GEMV_TILES) -> dict[tuple[int, int, str], Any]:
    """Times cuBLAS and every GEMV tile at M = 1 on each distinct weight shape of the model's dense
    bf16/fp16 linears and LM head (``time_in_graph`` over the layers of that shape); where the best
    tile is faster by more than ``min_gain``, sets those layers' ``linear_method``. Returns
    {(N, K, dtype): (cuBLAS µs, best GEMV µs, tile or None, PDL launch)} for the log and the
    benchmark. The chosen tile is then timed as a programmatic dependent launch (``pdl.py``) and
    launched so where that is faster."""
    layers = _m1_linears(model)
    if not layers:
        return {}
    l2 = int(getattr(torch.cuda.get_device_properties(layers[0][0].weight.device), "L2_cache_size", 50 << 20))
    by_shape: dict[tuple[int, int, str, bool], list[nn.Module]] = {}
    for m, head in layers:
        by_shape.setdefault((m.weight.shape[0], m.weight.shape[1], str(m.weight.dtype), head), []).append(m)
    report: dict[tuple[int, int, str], Any] = {}
    stream = torch.cuda.Stream(device=layers[0][0].weight.device)
    for (n, k, dt, head), group in by_shape.items():
        timed = _graph_group(group, l2)
        w0 = group[0].weight
        x = torch.randn(1, k, dtype=w0.dtype, device=w0.device)            # [1, K]
        odt = torch.float32 if head else None

        def blas(m):
            return lambda: F.linear(x, m.weight, getattr(m, "bias", None))

        t_blas = time_in_graph([blas(m) for m in timed], stream=stream)
        ref = F.linear(x.float(), w0.float(), None if head or group[0].bias is None else group[0].bias.float())
        best = (t_blas, None)
        for tile in tiles:
            bias = None if head else group[0].bias
            out = gemv(x, w0, bias, tile, out_dtype=odt)
            err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
            if not err < 1e-2:                   # never choose a tile that disagrees with cuBLAS
                logger.warning("gemv tile %s on %s: relative error %.3g, skipped", tile, (n, k), err)
                continue
            t = time_in_graph([(lambda m=m: gemv(x, m.weight, None if head else m.bias, tile, out_dtype=odt))
                               for m in timed], stream=stream)
            if t < best[0]:
                best = (t, tile)
        use_pdl = False
        if best[1] is not None and pdl.supported(w0.device):
            t_pdl = _time_pdl(x, timed, best[1], head, odt, ref, stream)
            if t_pdl is not None and t_pdl < best[0]:
                best, use_pdl = (t_pdl, best[1]), True
        chosen = best[1] if best[1] is not None and best[0] < t_blas * (1 - min_gain) else None
        key = (n, k, dt + (" lm_head" if head else ""))
        report[key] = (t_blas * 1e6, best[0] * 1e6, chosen, use_pdl and chosen is not None)
        if chosen is not None:
            for m in group:
                m.gemv_tile = chosen
                m.gemv_pdl = use_pdl
                m.linear_method = gemv_lm_head if head else gemv_linear
        logger.info("M=1 linear %s: cuBLAS %.1f us, best GEMV %.1f us -> %s", key, t_blas * 1e6,
                    best[0] * 1e6, f"GEMV {chosen}{' PDL' if use_pdl else ''}" if chosen else "cuBLAS")
    return report


def _time_pdl(x: torch.Tensor, timed: list[nn.Module], tile: tuple[int, int, int], head: bool,
              odt: torch.dtype | None, ref: torch.Tensor, stream: torch.cuda.Stream) -> float | None:
    """The tile launched as a programmatic dependent: seconds per call in a graph, or None when its
    capture fails or its output disagrees with cuBLAS (then the plain launch stays)."""
    try:
        out = gemv(x, timed[0].weight, None if head else timed[0].bias, tile, out_dtype=odt, pdl=True)
        err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
        if not err < 1e-2:
            logger.warning("gemv PDL launch on %s: relative error %.3g, not used", tuple(timed[0].weight.shape), err)
            return None
        return time_in_graph([(lambda m=m: gemv(x, m.weight, None if head else m.bias, tile, out_dtype=odt,
                                                 pdl=True)) for m in timed], stream=stream)
    except Exception as e:  # a driver or Triton that cannot capture the launch attribute
        logger.warning("gemv PDL launch unavailable (%r); plain launches kept", e)
        return None
