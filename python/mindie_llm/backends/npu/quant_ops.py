# SPDX-License-Identifier: Apache-2.0
"""The ``mindie_llm.ops`` quantized-linear entries on the NPU, mapped onto the backend's torch_npu
calls (``backends/npu/quant.py``), with the semantics of ``ops/reference.py``:

    w8a8_matmul(x, qweight[N, K] int8, w_scale[N], act_mul[K] | None)
        -> npu_dynamic_quant(x * act_mul) then npu_quant_matmul(xq, qweight^T, w_scale,
           pertoken_scale=sx)                                   (SmoothQuant factors multiplied first:
                                                                 the double does not emulate smooth_scales)
    w4a16_matmul(x, qweight[N, K/2] uint8 codes, scales[N, K/G], zeros[N, K/G], G)
        -> npu_weight_quant_batchmatmul(x, codes^T as int8 [K, N], antiquant_scale=scales^T,
           antiquant_offset=-zeros^T, antiquant_group_size=G)

The 4-bit codes are handed over one per int8 (an int4 pack through npu_convert_weight_to_int4pack
would halve the bytes; not done). The codes are unpacked per call: correct, not fast; a layer
that runs on the NPU for real should keep the [K, N] int8 form (to do). Verified only against the
CPU double of torch_npu (tests/unit/backends/npu/test_quant_npu.py). Must not import anything above
``mindie_llm.ops``.
"""
from __future__ import annotations

import torch

from mindie_llm.backends.npu import quant

__all__ = ["w8a8_matmul", "w4a16_matmul"]

_FLOAT_NPU = (torch.float16, torch.bfloat16)


def _npu_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in _FLOAT_NPU else torch.float16


def w8a8_matmul(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                act_mul: torch.Tensor | None = None) -> torch.Tensor:
    # x: [T, K] -> [T, N] float32
    xs = x if act_mul is None else x.float() * act_mul.float()
    xq, sx = quant.dynamic_quant(xs.to(_npu_dtype(x)))
    y = quant.quant_matmul(xq, qweight.t().contiguous(), w_scale.float().contiguous(), pertoken_scale=sx.float(),
                           output_dtype=torch.float32 if x.dtype == torch.float32 else _npu_dtype(x))
    return y.float()


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    # x: [T, K] -> [T, N] float32
    from mindie_llm.ops.reference import w4a16_unpack

    dt = _npu_dtype(x)
    k = scales.shape[1] * group_size
    codes = w4a16_unpack(qweight, k).to(torch.int8).t().contiguous()          # [K, N]
    s = scales.t().to(dt).contiguous()                                         # [K/G, N]
    off = (-zeros.float()).t().to(dt).contiguous()
    return quant.weight_quant_matmul(x.to(dt), codes, s, off, antiquant_group_size=group_size).float()
