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
    got2 = ql.w8a8_matmul(x.to(device), qw.to(device), ws.to(device), None if mul is None else mul.to(device),
                          split=2)                                        # split-K (few-row decode path)
    torch.testing.assert_close(got2.cpu(), want, rtol=1e-4, atol=1e-3 * float(want.abs().max()))


@pytest.mark.parametrize("m,n,k,group", [(2, 64, 128, 32), (17, 72, 256, 128)])
def test_w4a16_matmul(device, m, n, k, group):
    from mindie_llm.backends.cuda import quant_linear as ql

    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, k // group, generator=g) * 0.1
    zeros = torch.randint(0, 16, (n, k // group), generator=g, dtype=torch.uint8)
    qw = ref.w4a16_pack(codes)
    args = (x.to(device), qw.to(device), scales.to(device), zeros.to(device), group)
    want = ref.w4a16_matmul(x, qw, scales, zeros, group)
    for fn in (ql.w4a16_matmul, ql.w4a16_matmul_triton):     # the dispatch (GEMV / dequant) and the GEMM
        got = fn(*args)
        torch.testing.assert_close(got.cpu().float(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    torch.testing.assert_close(ql.w4a16_dequantize(qw.to(device), scales.to(device), zeros.to(device), group,
                                                   torch.float32).cpu(), ref.w4a16_dequantize(qw, scales, zeros, group))


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


@pytest.mark.parametrize("m,n,k,group", [(1, 64, 256, 128), (2, 72, 128, 32), (3, 40, 512, 64), (4, 64, 256, 128)])
def test_w4a16_gemv_few_rows(device, m, n, k, group):
    """The split-K GEMV (M <= 4) against the dequantized reference, for every tile candidate."""
    from mindie_llm.backends.cuda import quant_linear as ql

    g = torch.Generator().manual_seed(m * 7 + k)
    x = torch.randn(m, k, generator=g)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, k // group, generator=g) * 0.1
    zeros = torch.randint(0, 16, (n, k // group), generator=g, dtype=torch.uint8)
    qw = ref.w4a16_pack(codes)
    want = ref.w4a16_matmul(x, qw, scales, zeros, group)
    args = (x.to(device), qw.to(device), scales.to(device), zeros.to(device), group)
    tiles = ql.GEMV_CANDIDATES if device == "cuda" and m == 1 else ql.GEMV_CANDIDATES[:2]   # compile time
    for tile in tiles:
        got = ql.w4a16_gemv(*args, tile=tile)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()), msg=str(tile))
    got = ql.w4a16_matmul(*args)                                  # the dispatch picks the GEMV for M <= 4
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (5, 48, 96), (33, 80, 160)])
def test_fp8_quantize_and_matmul(device, m, n, k):
    """Per-token e4m3 activations and ``fp8_matmul`` against the dequantized reference (on CUDA the
    product is torch._scaled_mm with bf16 out, hence the bf16 tolerance)."""
    from mindie_llm.backends.cuda import quant_linear as ql

    g = torch.Generator().manual_seed(n)
    x = torch.randn(m, k, generator=g) * 3
    w = torch.randn(n, k, generator=g) * 0.05
    qw, ws = ref.quantize_fp8_rows(w)
    xq, sx = ql.quantize_fp8_rows(x.to(device))
    rq, rs = ref.quantize_fp8_rows(x)
    torch.testing.assert_close(sx.cpu(), rs)
    a, b = xq.cpu().float(), rq.float()
    assert float((a != b).float().mean()) < 0.01                       # rare ties / 1-ulp divisions
    assert bool(((a - b).abs() <= 0.125 * b.abs() + 2 ** -9).all())    # and then one e4m3 step apart
    got = ql.fp8_matmul(x.to(device), qw.to(device), ws.to(device))
    want = ref.fp8_matmul(x, qw, ws)
    assert got.dtype == x.dtype
    err = float((got.cpu().double() - want.double()).norm() / want.double().norm())
    assert err < (5e-3 if device == "cuda" else 1e-5), err
    # the quantization error itself, against the float product: bounded (the scheme's accuracy)
    assert float((want - x @ w.T).norm() / (x @ w.T).norm()) < 0.1


def _mixed_batch(device, kv_dtype, seed=5, bs=8, hk=2, hq=8, d=32):
    """A mixed batch over a quantized cache: two decodes with long contexts, then two prefill chunks
    (one continuing a cached prefix). Returns (query, cache, metadata) on ``device`` and the reference."""
    from mindie_llm.ops.attention_metadata import AttentionMetadata

    g = torch.Generator().manual_seed(seed)
    computed, scheduled = [40, 17, 0, 9], [1, 1, 21, 12]
    nblk = [-(-(c + s) // bs) for c, s in zip(computed, scheduled)]
    tables, nxt = [], 1
    for n in nblk:
        tables.append(list(range(nxt, nxt + n))[::-1])          # non-contiguous, reversed blocks
        nxt += n
    md = AttentionMetadata.build(computed, scheduled, tables, bs, num_decodes=2)
    cache = torch.zeros(2, nxt, bs, hk, d + 4, dtype=kv_dtype)
    # the whole context of each request written through the reference quantizer
    for i, (c, s) in enumerate(zip(computed, scheduled)):
        full = AttentionMetadata.build([0], [c + s], [tables[i]], bs)
        kk, vv = torch.randn(c + s, hk, d, generator=g) * 2, torch.randn(c + s, hk, d, generator=g)
        ref.write_kv_cache_quant(kk, vv, cache, full.slot_mapping)
    q = torch.randn(md.num_tokens, hq, d, generator=g)
    return q, cache, md


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("window", [None, 16])
def test_paged_attention_quant_mixed_batch(device, kv_dtype, window):
    """Decodes and prefill chunks over an int8 / fp8 cache in one launch against the reference
    (dequantize the context, then attend), fp32 and bf16 queries."""
    from dataclasses import replace

    from mindie_llm.backends.cuda import quant_kv

    q, cache, md = _mixed_batch(device, kv_dtype)
    want = ref.paged_attention_quant(q, cache, md, 32 ** -0.5, window)
    dmd = replace(md, slot_mapping=md.slot_mapping.to(device), query_start_loc=md.query_start_loc.to(device),
                  seq_lens=md.seq_lens.to(device), block_tables=md.block_tables.to(device))
    got = quant_kv.paged_attention_quant(q.to(device), cache.to(device), dmd, 32 ** -0.5, window)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    got16 = quant_kv.paged_attention_quant(q.to(device, torch.bfloat16), cache.to(device), dmd, 32 ** -0.5, window)
    err = float((got16.cpu().double() - want.double()).norm() / want.double().norm())
    assert got16.dtype == torch.bfloat16 and err < 1e-2, err


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn])
def test_write_kv_cache_quant_and_rotary(device, kv_dtype):
    """The quantizing write (int8 and fp8) and the rotary + write against the reference ops."""
    from mindie_llm.backends.cuda import quant_kv
    from mindie_llm.ops.attention_metadata import AttentionMetadata

    g = torch.Generator().manual_seed(11)
    hq, hk, d, bs = 4, 2, 32, 8
    md = AttentionMetadata.build([0, 3], [6, 4], [[2, 1], [3]], bs)
    slots = md.slot_mapping.clone()
    slots[2] = -1                                                    # padding: not written
    t = md.num_tokens
    q, k, v = (torch.randn(t, h * d, generator=g) for h in (hq, hk, hk))
    pos = torch.tensor([0, 1, 2, 3, 4, 5, 3, 4, 5, 6])
    cos_sin = torch.randn(64, d, generator=g)
    want_cache = torch.zeros(2, 4, bs, hk, d + 4, dtype=kv_dtype)
    wq, wk = ref.rotary_embedding_write_kv_quant(pos, q.clone(), k.clone(), v, want_cache, slots, d, cos_sin, True)
    cache = torch.zeros_like(want_cache).to(device)
    gq, gk = quant_kv.rotary_embedding_write_kv_quant(pos.to(device), q.to(device), k.to(device), v.to(device),
                                                      cache, slots.to(device), d, cos_sin.to(device), True)
    torch.testing.assert_close(gq.cpu(), wq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gk.cpu(), wk, rtol=1e-5, atol=1e-5)
    got, want = cache.cpu(), want_cache
    torch.testing.assert_close(got[..., d:].view(torch.float32), want[..., d:].view(torch.float32))   # scales
    a, b = got[..., :d].float(), want[..., :d].float()                 # codes: equal but for rare ties,
    assert float((a != b).float().mean()) < 0.01                       # and then one code step apart
    step = 1.0 if kv_dtype == torch.int8 else 0.125 * b.abs() + 2 ** -9
    assert bool(((a - b).abs() <= step).all())
