# SPDX-License-Identifier: Apache-2.0
"""Quantized matmuls of the NPU backend, as functions the quantization and tensor-parallel code
calls (they are not mindie_llm.ops entries: linear layers choose them through their
``linear_method``). Each maps to one torch_npu call; shapes follow the torch_npu docs:

    quant_matmul          W8A8: torch_npu.npu_quant_matmul(x1 int8 [M, K], x2 int8 [K, N], scale [N] or [1],
                          *, offset, pertoken_scale [M] fp32, bias [N], output_dtype) -> [M, N]
    dynamic_quant         per-token activation quantization: torch_npu.npu_dynamic_quant(x) -> (int8, fp32 scale [M])
    weight_quant_matmul   W8A16 / W4A16: torch_npu.npu_weight_quant_batchmatmul(x [M, K] fp16/bf16,
                          weight int8 [K, N], antiquant_scale [N] / [ceil(K/g), N], ...) -> [M, N]

``weight`` arguments are [K, N] (the transpose of a linear layer's [N, K] weight), as torch_npu
takes them. Must not import anything above ``mindie_llm.ops``.
"""
from __future__ import annotations

import torch

from mindie_llm.backends.npu import runtime

__all__ = ["quant_matmul", "dynamic_quant", "weight_quant_matmul"]


def quant_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, offset: torch.Tensor | None = None,
                 pertoken_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 output_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y[M, N] = (x[M, K] int8 @ weight[K, N] int8) * scale (* pertoken_scale) + bias, in output_dtype."""
    return runtime.load().npu_quant_matmul(x, weight, scale, offset=offset, pertoken_scale=pertoken_scale,
                                           bias=bias, output_dtype=output_dtype)


def dynamic_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x[M, K] fp16/bf16 -> (int8 [M, K], fp32 scale [M]) with x ~= q * scale[:, None]."""
    return runtime.load().npu_dynamic_quant(x)


def weight_quant_matmul(x: torch.Tensor, weight: torch.Tensor, antiquant_scale: torch.Tensor,
                        antiquant_offset: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                        antiquant_group_size: int = 0) -> torch.Tensor:
    """y[M, N] = x[M, K] @ ((weight[K, N] + offset) * antiquant_scale) + bias, in x's dtype."""
    return runtime.load().npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=antiquant_offset,
                                                       bias=bias, antiquant_group_size=antiquant_group_size)
