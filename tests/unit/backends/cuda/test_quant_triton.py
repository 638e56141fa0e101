# SPDX-License-Identifier: Apache-2.0
"""Triton kernels of the quantized linears and KV cache against ops/reference.py (dequantize, then
matmul / attend). Without a GPU they run in the Triton interpreter (conftest): indexing and math
are checked, speed is not."""
import pytest
import torch

from mindie_llm.ops import reference as ref


@pytest.mark.parametrize("m,n,k,smooth", [(3, 64, 128, False), (20, 96, 192, True)])
def test_w8a8_matmul(device, m, n, k, smooth):
    from mindie_llm.backends.cuda import quant_linear as ql

    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g)
    qw = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, generator=g) * 0.01 + 1e-3
    mul = torch.rand(k, generator=g) + 0.5 if smooth else None
    xq, sx = ql.quantize_per_token_int8(x.to(device), None if mul is None else mul.to(device))
    rq, rs = ref.quantize_per_token_int8(x if mul is None else x * mul)
    torch.testing.assert_close(sx.cpu(), rs)
    assert int((xq.cpu().int() - rq.int()).abs().max()) <= 1           # ties may round the other way
    got = ql.w8a8_matmul(x.to(device), qw.to(device), ws.to(device), None if mul is None else mul.to(device))
    want = ref.w8a8_matmul(x, qw, ws, mul)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-3 * float(want.abs().max()))


@pytest.mark.parametrize("m,n,k,group", [(2, 64, 128, 32), (17, 72, 256, 128)])
def test_w4a16_matmul(device, m, n, k, group):
    from mindie_llm.backends.cuda import quant_linear as ql

    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, k // group, generator=g) * 0.1
    zeros = torch.randint(0, 16, (n, k // group), generator=g, dtype=torch.uint8)
    qw = ref.w4a16_pack(codes)
    got = ql.w4a16_matmul(x.to(device), qw.to(device), scales.to(device), zeros.to(device), group)
    want = ref.w4a16_matmul(x, qw, scales, zeros, group)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_kv_int8_write_and_decode_attention(device):
    from mindie_llm.backends.cuda import quant_kv
    from mindie_llm.ops.attention_metadata import AttentionMetadata

    g = torch.Generator().manual_seed(3)
    hq, hk, d, bs = 4, 2, 32, 8
    ctx = [13, 5]
    md = AttentionMetadata.build([0, 0], ctx, [[1, 2], [3]], bs)               # prefill writes the context
    t = md.num_tokens
    k, v = torch.randn(t, hk, d, generator=g) * 2, torch.randn(t, hk, d, generator=g)
    want_cache = torch.zeros(2, 4, bs, hk, d + 4, dtype=torch.int8)
    ref.write_kv_cache_quant(k, v, want_cache, md.slot_mapping)
    cache = torch.zeros_like(want_cache).to(device)
    quant_kv.write_kv_cache_quant(k.to(device), v.to(device), cache, md.slot_mapping.to(device))
    torch.testing.assert_close(ref.kv_dequantize(cache.cpu()), ref.kv_dequantize(want_cache), atol=0.05, rtol=0)
    # decode: one query per request at the last position, against the reference on the same cache
    q = torch.randn(2, hq, d, generator=g)
    dmd = AttentionMetadata.build([c - 1 for c in ctx], [1, 1], [[1, 2], [3]], bs)
    want = ref.paged_attention_quant(q, want_cache, dmd, d ** -0.5)
    got = quant_kv.paged_decode_attention_quant(q.to(device), want_cache.to(device), dmd.block_tables.to(device),
                                                dmd.seq_lens.to(device), d ** -0.5)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
