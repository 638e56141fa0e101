# SPDX-License-Identifier: Apache-2.0
"""W8A8 and W4A16 (AWQ, GPTQ) linears and packing.

Oracles: the dequantize-then-matmul references in ops/reference.py (w8a8_matmul, w4a16_matmul),
independent re-implementations of the published AutoAWQ / AutoGPTQ packing loops, and the float
matmul (quantization error bounds stated per test).
"""
import pytest
import torch

from mindie_llm.layers import quant_w4a16 as w4
from mindie_llm.layers.linear import ReplicatedLinear
from mindie_llm.layers.quantization import get_scheme
from mindie_llm.ops import reference as ref


def _linear(n=64, k=128, seed=0, bias=False):
    torch.manual_seed(seed)
    lin = ReplicatedLinear(k, n, bias=bias)
    lin.weight.data.normal_(0, 0.05)
    if bias:
        lin.bias.data.normal_()
    return lin


def _awq_pack_published(intweight):  # AutoAWQ WQLinear_GEMM.from_linear, intweight [K, N]
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    out = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int64)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            out[:, col] |= intweight[:, col * 8 + order[i]].to(torch.int64) << (i * 4)
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


def _gptq_pack_published(intweight):  # AutoGPTQ QuantLinear.pack, intweight [K, N]: 8 rows per int32
    out = torch.zeros(intweight.shape[0] // 8, intweight.shape[1], dtype=torch.int64)
    for row in range(out.shape[0]):
        for j in range(8):
            out[row] |= intweight[row * 8 + j].to(torch.int64) << (4 * j)
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


def test_packing_round_trips():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (32, 64), generator=g, dtype=torch.uint8)
    assert torch.equal(ref.w4a16_unpack(ref.w4a16_pack(codes), 64), codes)
    for order in (tuple(range(8)), w4.AWQ_ORDER):
        for dim in (0, 1):
            assert torch.equal(w4.unpack_int32(w4.pack_int32(codes, dim, order), dim, order), codes)
    scales, zeros = torch.rand(32, 2, generator=g) + 0.1, torch.randint(1, 16, (32, 2), generator=g, dtype=torch.uint8)
    a = w4.awq_pack(codes, scales, zeros)
    c2, s2, z2 = w4.awq_unpack(a["qweight"], a["qzeros"], a["scales"])
    assert torch.equal(c2, codes) and torch.equal(z2, zeros) and torch.allclose(s2, scales, rtol=1e-3)
    for v2 in (False, True):
        gq = w4.gptq_pack(codes, scales, zeros, v2=v2)
        c3, _, z3 = w4.gptq_unpack(gq["qweight"], gq["qzeros"], gq["scales"], v2=v2)
        assert torch.equal(c3, codes) and torch.equal(z3, zeros)


def test_published_layouts():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (16, 32), generator=g, dtype=torch.uint8)       # [N, K]
    assert torch.equal(w4.awq_pack(codes, torch.ones(16, 1), torch.zeros(16, 1, dtype=torch.uint8))["qweight"],
                       _awq_pack_published(codes.t()))
    assert torch.equal(w4.gptq_pack(codes, torch.ones(16, 1), torch.zeros(16, 1, dtype=torch.uint8) + 1)["qweight"],
                       _gptq_pack_published(codes.t()))
    # GPTQ v1 stores zero - 1: a zero point of 8 is stored as 7 in every nibble
    z = w4.gptq_pack(codes, torch.ones(16, 1), torch.full((16, 1), 8, dtype=torch.uint8))["qzeros"]
    assert int(z[0, 0]) == 0x77777777


def test_w8a8_linear_matches_reference():
    lin = _linear(bias=True)
    w = lin.weight.data.clone()
    get_scheme("w8a8", from_float=True).quantize_dense(lin)
    x = torch.randn(5, 128)
    want = ref.w8a8_matmul(x, lin.qweight, lin.w_scale) + lin.bias
    got = lin(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)       # int32 accumulation: exact up to fp32
    dense = x @ w.T + lin.bias
    assert (got - dense).norm() / dense.norm() < 0.02                  # W8A8 quantization error < 2%
    # each row quantized on its own: the result of a row does not depend on the batch
    torch.testing.assert_close(lin(x[2:3]), got[2:3], rtol=0, atol=0)


def test_w8a8_smoothing_folded_into_activation_quantizer():
    lin = _linear()
    x = torch.randn(4, 128) * torch.linspace(0.1, 20, 128)              # outlier channels
    s = x.abs().amax(0).sqrt() / lin.weight.data.abs().amax(0).sqrt()
    from mindie_llm.layers.quant_w8a8 import _install, quantize_w8a8_weight
    q, sc = quantize_w8a8_weight(lin.weight.data * s)
    _install(lin, q, sc, 1.0 / s)
    want = ref.w8a8_matmul(x, q, sc, 1.0 / s)
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_w4a16_linear_matches_reference(group):
    lin = _linear(k=256)
    w = lin.weight.data.clone()
    codes, scales, zeros = w4.quantize_w4_groupwise(w, group)
    get_scheme("w4a16", group_size=group).quantize_dense(lin)
    x = torch.randn(3, 256)
    want = ref.w4a16_matmul(x, ref.w4a16_pack(codes), scales, zeros, group)
    # the CPU path computes on Q4_1 blocks whose d and m are fp16: within 1e-3 of the reference
    torch.testing.assert_close(lin(x), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    dense = x @ w.T
    assert (want - dense).norm() / dense.norm() < 0.15                # 4-bit RTN error on N(0, .05) weights


def test_w4a16_dequantize_is_the_canonical_formula():
    codes = torch.tensor([[0, 15, 7, 8] * 8])
    scales, zeros = torch.tensor([[0.5]]), torch.tensor([[8]], dtype=torch.uint8)
    w = ref.w4a16_dequantize(ref.w4a16_pack(codes), scales, zeros, 32)
    assert w[0, :4].tolist() == [-4.0, 3.5, -0.5, 0.0]
