# SPDX-License-Identifier: Apache-2.0
"""Weight-only int8: the quantizer against its definition, the int8 matmul against the matmul of
the dequantized weight (oracle), and the row threshold that switches to the kept dense weight."""
from __future__ import annotations

import pytest
import torch

from mindie_llm.layers.linear import ReplicatedLinear
from mindie_llm.layers.quantization import INT8_MAX_ROWS, quantize_int8, quantize_weight_int8


def test_quantize_weight_int8_definition():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [127.0, 63.5, -127.0]])
    q, s = quantize_weight_int8(w)
    assert q.dtype == torch.int8 and s.shape == (3,)
    torch.testing.assert_close(s[0], torch.tensor(2.0 / 127))
    assert q[0].tolist() == [64, -127, 32] and q[1].tolist() == [0, 0, 0]
    assert q[2].tolist() == [127, 64, -127]
    assert (q.float() * s[:, None] - w).abs().max() <= s.max() / 2 + 1e-6


def _layer(bias: bool, keep_dense: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = ReplicatedLinear(96, 40, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.1)
        if bias:
            layer.bias.normal_()
    dense = layer.weight.detach().clone()
    wrapper = torch.nn.Sequential(layer)
    quantize_int8(wrapper, keep_dense=keep_dense)
    return layer, dense


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, INT8_MAX_ROWS])
def test_int8_matmul_matches_dequantized_weight(rows, bias):
    layer, dense = _layer(bias, keep_dense=True)
    x = torch.randn(rows, 96)
    deq = layer.qweight.float() * layer.scales[:, None]
    want = torch.nn.functional.linear(x, deq, layer.bias)
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 40)
    torch.testing.assert_close(got, want, atol=3e-2, rtol=2e-2)  # bf16 activations
    assert not torch.equal(got, torch.nn.functional.linear(x, dense, layer.bias))  # int8 path taken


def test_many_rows_use_the_dense_weight_unless_dropped():
    layer, dense = _layer(True, keep_dense=True)
    x = torch.randn(INT8_MAX_ROWS + 5, 96)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, dense, layer.bias))
    slim, _ = _layer(True, keep_dense=False)
    assert slim.weight is None
    deq = slim.qweight.float() * slim.scales[:, None]
    torch.testing.assert_close(slim(x), torch.nn.functional.linear(x, deq, slim.bias), atol=3e-2, rtol=2e-2)
