# SPDX-License-Identifier: Apache-2.0
"""The NPU mapping of the quantized linears (backends/npu/quant_ops.py) through the CPU double of
torch_npu, against the ops/reference.py dequantize-then-matmul oracles. The double checks the
torch_npu signatures; no NPU ran this."""
import torch

from mindie_llm import ops
from mindie_llm.ops import reference as ref


def test_w8a8_and_w4a16_map_to_torch_npu(npu_double):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g).half()
    qw = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
    ws = torch.rand(32, generator=g) * 0.01 + 1e-3
    mul = torch.rand(64, generator=g) + 0.5
    got = ops.w8a8_matmul(x, qw, ws, mul)            # the double serves CPU tensors as the NPU table
    want = ref.w8a8_matmul(x.float(), qw, ws, mul)
    assert float((got - want).abs().max()) < 2e-2 * float(want.abs().max())   # fp16 activations
    codes = torch.randint(0, 16, (32, 64), generator=g, dtype=torch.uint8)
    scales = torch.rand(32, 2, generator=g) * 0.1
    zeros = torch.randint(0, 16, (32, 2), generator=g, dtype=torch.uint8)
    got4 = ops.w4a16_matmul(x, ref.w4a16_pack(codes), scales, zeros, 32)
    want4 = ref.w4a16_matmul(x.float(), ref.w4a16_pack(codes), scales, zeros, 32)
    assert float((got4 - want4).abs().max()) < 1e-2 * float(want4.abs().max())
    assert {"npu_dynamic_quant", "npu_quant_matmul", "npu_weight_quant_batchmatmul"} <= set(npu_double.names())
