# SPDX-License-Identifier: Apache-2.0
"""FP8: float8_e4m3fn weights per output channel, activations quantized to e4m3 per token at run
time (dynamic, symmetric), the product through ``ops.fp8_matmul`` (``torch._scaled_mm`` with
row-wise scales on CUDA; ``ops/reference.py``, the dequantized product, elsewhere).

Selected by ``model.quantization=fp8``: a bf16/fp16/fp32 checkpoint is quantized once at load
(per-channel amax / 448, round to nearest even); a compressed-tensors FP8 checkpoint
(llm-compressor's ``FP8_DYNAMIC``: ``weight`` float8_e4m3fn [N, K] and ``weight_scale`` [N, 1] per
channel, or one per-tensor scale) is loaded as stored. Fused shards (q/k/v, gate/up) keep their
own scales. On CUDA it needs fp8 tensor cores (compute capability 8.9 or newer): refused with one
line elsewhere; NPU has no mapping yet (refused). The CPU runs the reference (correct, not fast).
Must not import models, the engine, the loader or a backend.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mindie_llm import ops
from mindie_llm.layers.linear import LinearBase
from mindie_llm.layers.quant_base import CheckpointLinearScheme, QuantCheckpointError, expect, set_linear, shard_rows
from mindie_llm.ops import reference as ref

__all__ = ["FP8Scheme", "fp8_linear", "fp8_supported"]


def fp8_supported(device: torch.device) -> str | None:
    """None when ``model.quantization=fp8`` can run on ``device``, else the one-line reason."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not hasattr(torch, "_scaled_mm"):
            return "this torch has no torch._scaled_mm"
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            return (f"FP8 matmuls need a GPU of compute capability 8.9 or newer (this one is {cap[0]}.{cap[1]}); "
                    "use w8a8 or w4a16")
        return None
    return f"no FP8 matmul on the {device.type} backend yet"


def fp8_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y[T, N] = FP8(x[T, K]) (+ bias), in x's dtype."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])                         # [T, K]
    y = ops.fp8_matmul(x2, layer.qweight, layer.w_scale)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def _install(module: nn.Module, qweight: torch.Tensor, w_scale: torch.Tensor) -> None:
    dev = getattr(module, "_quant_device", None) or qweight.device
    set_linear(module, fp8_linear, qweight=qweight.to(dev).contiguous(),
               w_scale=w_scale.float().to(dev).contiguous())


class FP8Scheme(CheckpointLinearScheme):
    name = "fp8"
    tensor_names = ("weight", "weight_scale")

    def prepare(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, LinearBase) and isinstance(getattr(m, "weight", None), torch.Tensor):
                why = fp8_supported(m.weight.device)
                if why is not None:
                    raise ValueError(f"model.quantization=fp8: {why}")
                break
        super().prepare(model)

    def build(self, module: nn.Module, shards: dict[Any, tuple[str, dict[str, torch.Tensor]]]) -> None:
        qs, ss = [], []
        k = module.in_features
        for sid, (base, t) in shards.items():
            n = shard_rows(module, sid)
            expect(f"{base}.weight", t["weight"], (n, k), (torch.float8_e4m3fn,))
            scale = t["weight_scale"].float()
            if scale.numel() == 1:                       # per-tensor: the same scale for every channel
                scale = scale.reshape(1).expand(n)
            elif tuple(scale.shape) == (n, 1):
                scale = scale.reshape(n)
            expect(f"{base}.weight_scale", scale, (n,))
            if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
                raise QuantCheckpointError(f"{base}.weight_scale: scales must be finite and > 0")
            qs.append(t["weight"])
            ss.append(scale)
        _install(module, torch.cat(qs), torch.cat(ss))

    def quantize_dense(self, module: nn.Module) -> None:
        why = fp8_supported(module.weight.device)
        if why is not None:
            raise ValueError(f"model.quantization=fp8: {why}")
        q, s = ref.quantize_fp8_rows(module.weight.data)
        module._quant_device = module.weight.device
        _install(module, q, s)
