# SPDX-License-Identifier: Apache-2.0
"""Shared tolerances and the error measure of the CUDA-backend kernel tests."""
from __future__ import annotations

import torch

# Relative-norm tolerances (device tool METHOD.md): fp32 far under 1e-3, bf16 between 1e-3 and 1e-2.
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 3e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere never passes."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if torch.isnan(out64).any():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))
