# SPDX-License-Identifier: Apache-2.0
"""Weight-only int8 quantization (per output channel, symmetric) as a module transform: it swaps
the ``linear_method`` of every linear layer and of the LM head; model code has no branch for it.

On the CPU the matmul is ``torch._weight_int8pack_mm`` with bfloat16 activations (measured fastest
for SmolLM2 shapes on a 2-core AVX512-VNNI machine at batch 1 and 16; fp32 activations through the
same kernel were ~10x slower). Elsewhere the weight is dequantized per call (correct, not fast).
Must not import models, the engine or a backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mindie_llm.layers.embedding import LMHead
from mindie_llm.layers.linear import LinearBase

__all__ = ["quantize_weight_int8", "int8_linear", "quantize_int8"]

_HAS_INT8PACK = hasattr(torch, "_weight_int8pack_mm")


def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w[N, K] -> (qweight[N, K] int8, scales[N] float32) with w ~= qweight * scales[:, None]."""
    wf = w.float()
    scales = wf.abs().amax(dim=1).clamp(min=1e-12) / 127.0            # [N]
    q = torch.round(wf / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def int8_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y[T, N] = x[T, K] @ (qweight * scales)^T (+ bias), in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.device.type == "cpu" and _HAS_INT8PACK:
        y = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), layer.qweight,
                                      layer.scales_bf16).to(x.dtype)
    else:
        w = layer.qweight.to(x.dtype) * layer.scales.to(x.dtype)[:, None]
        y = F.linear(x2, w)
    bias = getattr(layer, "bias", None)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], y.shape[-1])


def _quantize_layer(layer: nn.Module, drop_weight: bool) -> None:
    q, s = quantize_weight_int8(layer.weight.data)
    layer.register_buffer("qweight", q, persistent=False)
    layer.register_buffer("scales", s, persistent=False)
    layer.register_buffer("scales_bf16", s.to(torch.bfloat16), persistent=False)
    if drop_weight:
        del layer.weight
        layer.register_parameter("weight", None)
    layer.linear_method = int8_linear


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantizes every LinearBase and the LM head of ``model`` in place; returns it. A tied head
    keeps the (shared) embedding weight for lookups and gets its own int8 copy for the matmul."""
    for module in list(model.modules()):
        if isinstance(module, LinearBase):
            _quantize_layer(module, drop_weight=True)
        elif isinstance(module, LMHead):
            _quantize_layer(module, drop_weight=not module.tied)
    return model
