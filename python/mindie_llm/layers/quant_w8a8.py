# SPDX-License-Identifier: Apache-2.0
"""W8A8 (SmoothQuant): int8 weights per output channel, int8 activations per token (dynamic,
symmetric), int32 accumulation, float rescale.

Checkpoint (the compressed-tensors ``int-quantized`` layout vLLM and llm-compressor use): per linear
``weight`` int8 [N, K] and ``weight_scale`` [N] or [N, 1] float. SmoothQuant smoothing factors are
either already folded into the preceding RMSNorm weights (compressed-tensors; nothing to do) or
given per linear as ``smooth_factor`` [K] (SmoothQuant-style: the stored weight is W * s); those
are folded at load time into the activation quantizer as ``act_mul = 1 / s`` (one multiply inside
the per-token quantization, no extra pass). Shards of one fused layer (q/k/v, gate/up) share their
input, so their factors must be equal.

The matmul is ``ops.w8a8_matmul(x, qweight, w_scale, act_mul)``: on the CPU (and as the oracle)
``ops/reference.py``; the CPU path here uses ``torch._int_mm`` (exact int32 accumulation, each row
quantized on its own, so results do not depend on the batch). A float checkpoint with
``model.quantization=w8a8`` is quantized at load (per-channel round-to-nearest, no smoothing; use
``scripts/quantize.py`` for calibrated smoothing).
Must not import models, the engine, the loader or a backend.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mindie_llm import ops
from mindie_llm.layers.quant_base import (CheckpointLinearScheme, QuantCheckpointError, expect, set_linear,
                                          shard_rows)

__all__ = ["W8A8Scheme", "w8a8_linear", "quantize_w8a8_weight", "w8a8_matmul_cpu"]


def quantize_w8a8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w[N, K] float -> (qweight[N, K] int8, w_scale[N] float32), symmetric per output channel."""
    wf = w.float()
    scale = wf.abs().amax(dim=1).clamp(min=1e-8) / 127.0                          # [N]
    return torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


_HAS_INT_MM = hasattr(torch, "_int_mm")


def w8a8_matmul_cpu(x: torch.Tensor, qweight_t: torch.Tensor, w_scale: torch.Tensor,
                    act_mul: torch.Tensor | None) -> torch.Tensor:
    """x[T, K] float -> [T, N] float32 through int8 x int8 -> int32 (``qweight_t`` is [K, N] int8)."""
    xf = x.float() if act_mul is None else x.float() * act_mul
    sx = xf.abs().amax(dim=-1).clamp(min=1e-8) / 127.0                            # [T]
    xq = torch.round(xf / sx[:, None]).clamp(-127, 127).to(torch.int8)            # [T, K]
    acc = torch._int_mm(xq, qweight_t) if _HAS_INT_MM else (xq.float() @ qweight_t.float()).round().int()
    return acc.float() * sx[:, None] * w_scale[None, :]                           # [T, N]


def w8a8_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y[T, N] = W8A8(x[T, K]) (+ bias), in x's dtype."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])                         # [T, K]
    if x2.device.type == "cpu":
        y = w8a8_matmul_cpu(x2, layer.qweight_t, layer.w_scale, layer.act_mul)
    else:
        y = ops.w8a8_matmul(x2, layer.qweight, layer.w_scale, layer.act_mul)
    if layer.bias is not None:
        y = y + layer.bias.float()
    y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def _install(module: nn.Module, qweight: torch.Tensor, w_scale: torch.Tensor,
             act_mul: torch.Tensor | None) -> None:
    dev = getattr(module, "_quant_device", None) or qweight.device
    qweight = qweight.to(dev).contiguous()
    set_linear(module, w8a8_linear, qweight=qweight, qweight_t=qweight.t().contiguous() if dev.type == "cpu"
               else qweight, w_scale=w_scale.float().to(dev).contiguous())
    module.act_mul = None if act_mul is None else act_mul.float().to(dev).contiguous()


class W8A8Scheme(CheckpointLinearScheme):
    name = "w8a8"
    tensor_names = ("weight", "weight_scale")
    optional_names = ("smooth_factor",)

    def build(self, module: nn.Module, shards: dict[Any, tuple[str, dict[str, torch.Tensor]]]) -> None:
        qs, ss, factors = [], [], []
        k = module.in_features
        for sid, (base, t) in shards.items():
            n = shard_rows(module, sid)
            expect(f"{base}.weight", t["weight"], (n, k), (torch.int8,))
            scale = t["weight_scale"]
            if tuple(scale.shape) == (n, 1):
                scale = scale.reshape(n)
            expect(f"{base}.weight_scale", scale, (n,))
            if not bool(torch.isfinite(scale.float()).all()) or bool((scale.float() <= 0).any()):
                raise QuantCheckpointError(f"{base}.weight_scale: scales must be finite and > 0")
            qs.append(t["weight"])
            ss.append(scale.float())
            f = t.get("smooth_factor")
            if f is not None:
                expect(f"{base}.smooth_factor", f, (k,))
                if not bool(torch.isfinite(f.float()).all()) or bool((f.float() <= 0).any()):
                    raise QuantCheckpointError(f"{base}.smooth_factor: factors must be finite and > 0")
            factors.append((base, f))
        present = [f for _, f in factors if f is not None]
        act_mul = None
        if present:
            if len(present) != len(factors):
                base = next(b for b, f in factors if f is None)
                raise QuantCheckpointError(f"{base}.smooth_factor: missing while its fused siblings have one")
            if any(not torch.equal(present[0], f) for f in present[1:]):
                raise QuantCheckpointError(f"{factors[1][0]}.smooth_factor: differs from {factors[0][0]}'s "
                                           "(shards that share an input must share the smoothing)")
            act_mul = 1.0 / present[0].float()
        _install(module, torch.cat(qs), torch.cat(ss), act_mul)

    def quantize_dense(self, module: nn.Module) -> None:
        q, s = quantize_w8a8_weight(module.weight.data)
        _install(module, q, s, None)
