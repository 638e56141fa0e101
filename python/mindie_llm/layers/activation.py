# SPDX-License-Identifier: Apache-2.0
"""Gated activations (through mindie_llm.ops). Imports only ops."""
from __future__ import annotations

import torch
from torch import nn

from mindie_llm import ops

__all__ = ["SiluAndMul", "get_act_and_mul"]


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)  # [T, 2I] -> [T, I]


def get_act_and_mul(name: str) -> nn.Module:
    if name != "silu":
        raise ValueError(f"hidden_act: only 'silu' is supported by the Llama family; got {name!r}")
    return SiluAndMul()
