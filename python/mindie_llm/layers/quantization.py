# SPDX-License-Identifier: Apache-2.0
"""Weight-only int8 quantization (per output channel, symmetric) as a module transform: it swaps
the ``linear_method`` of every linear layer and of the LM head; model code has no branch for it.

On the CPU the matmul is ``torch._weight_int8pack_mm`` with bfloat16 activations: for a few rows
(decode) it reads a quarter of the fp32 bytes and was 2-3x faster than fp32 for SmolLM2 shapes on a
2-core AVX512-VNNI machine (fp32 activations through the same kernel were ~10x slower). Its cost
grows linearly with the rows, so past ``INT8_MAX_ROWS`` rows (prefill, large batches) the layer
uses the dense weight it keeps (``keep_dense=True``, the default). Without a dense copy, or off the
CPU, the int8 weight is dequantized per call (correct, not fast).
Must not import models, the engine or a backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mindie_llm.layers.embedding import LMHead
from mindie_llm.layers.linear import LinearBase

__all__ = ["quantize_weight_int8", "int8_linear", "quantize_int8", "INT8_MAX_ROWS"]

_HAS_INT8PACK = hasattr(torch, "_weight_int8pack_mm")
INT8_MAX_ROWS = 16  # above this many rows the dense weight (if kept) is faster on the CPU


def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w[N, K] -> (qweight[N, K] int8, scales[N] float32) with w ~= qweight * scales[:, None]."""
    wf = w.float()
    scales = wf.abs().amax(dim=1).clamp(min=1e-12) / 127.0            # [N]
    q = torch.round(wf / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def int8_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y[T, N] = x[T, K] @ (qweight * scales)^T (+ bias), in x's dtype."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])                # [T, K]
    dense, bias = layer.weight, getattr(layer, "bias", None)
    if dense is not None and (x2.shape[0] > INT8_MAX_ROWS or x2.device.type != "cpu"):
        y = F.linear(x2, dense, bias)
    else:
        if x2.device.type == "cpu" and _HAS_INT8PACK:
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), layer.qweight,
                                          layer.scales_bf16).to(x.dtype)
        else:
            y = F.linear(x2, layer.qweight.to(x.dtype) * layer.scales.to(x.dtype)[:, None])
        if bias is not None:
            y.add_(bias)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


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
def quantize_int8(model: nn.Module, keep_dense: bool = True) -> nn.Module:
    """Quantizes every LinearBase and the LM head of ``model`` in place; returns it. With
    ``keep_dense`` the original weights stay for many-row matmuls; a tied head always keeps the
    (shared) embedding weight for lookups and gets its own int8 copy for the matmul."""
    for module in list(model.modules()):
        if isinstance(module, LinearBase):
            _quantize_layer(module, drop_weight=not keep_dense)
        elif isinstance(module, LMHead):
            _quantize_layer(module, drop_weight=not (keep_dense or module.tied))
    return model
