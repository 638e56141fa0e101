# SPDX-License-Identifier: Apache-2.0
"""The C++ CPU kernels (``backends/cpu/kernels.py`` / ``fast_ops.py``) against ``ops/reference.py``:

- GGUF repacking (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K): the C++ packer equals the torch reference packer
  byte for byte, and unpacking round-trips to ``gguf_reader.dequantize`` of the original blocks (an
  independent dequantizer: the gguf package's for the K-quants), as does
  ``reference.gguf_dequantize`` (ggml's block formats, read directly);
- the packed matmul against dequantize-then-matmul (tolerance: float32 summation order only),
  the K-quants against the raw blocks dequantized by ``reference.gguf_dequantize``,
  for T = 1 (decode), a few rows, and more than one 64-row work item; every instruction set this
  CPU has gives bit-identical results;
- malformed blocks (a non-finite scale) and mismatched shapes are refused, naming row and block;
- paged attention over a mixed batch (decodes + prefill chunks, sliding window) against the
  reference, and out-of-range block ids refused; rotary + KV write and add + RMSNorm against the
  reference; the embedding lookup against the unpacked rows; SiLU-and-mul against the reference.
"""
from __future__ import annotations

import pytest
import torch

from mindie_llm.backends.cpu import fast_ops
from mindie_llm.backends.cpu import kernels as K
from mindie_llm.layers.attention import AttentionMetadata
from mindie_llm.loader.gguf_reader import dequantize
from mindie_llm.ops import reference as ref



def test_kernels_are_built():
    """The build (pip install -e ., build_ext --inplace) must install the kernels: without them the
    default GGUF deployment falls back to torch ops ten times slower than fp32. Every CPU has at
    least the portable path, so there is no platform on which skipping would be right."""
    assert K.available(), "mindie_llm._cpu_kernels is not built (setup.py must register it)"


TYPES = [2, 3, 8]  # Q4_0, Q4_1, Q8_0
K_TYPES = [12, 14]  # Q4_K, Q6_K (256-value blocks)
# where a K-quant block keeps its fp16 scales: (d, dmin) of Q4_K, d of Q6_K (ggml-quants.c)
_K_HALVES = {12: (0, 2), 14: (208,)}


def _raw_k(ggml_type: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random valid K-quant blocks [n, k/256 * block_bytes]: random codes and sub-block scales,
    finite fp16 super-block scales (Q6_K's int8 scales of either sign)."""
    g = torch.Generator().manual_seed(seed)
    bb, nsb = K.BLOCK_BYTES[ggml_type], k // 256
    raw = torch.randint(0, 256, (n, nsb, bb), dtype=torch.uint8, generator=g)
    for off in _K_HALVES[ggml_type]:
        raw[:, :, off:off + 2] = (torch.rand(n, nsb, 1, generator=g) * 0.002).half().view(torch.uint8)
    return raw.reshape(n, nsb * bb)


def _raw(ggml_type: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random valid GGUF blocks [n, k/32 * block_bytes]: random codes, finite fp16 scales."""
    if ggml_type in K_TYPES:
        return _raw_k(ggml_type, n, k, seed)
    g = torch.Generator().manual_seed(seed)
    bb, nkb = K.BLOCK_BYTES[ggml_type], k // 32
    raw = torch.randint(0, 256, (n, nkb, bb), dtype=torch.uint8, generator=g)
    scales = (torch.rand(n, nkb, 2, generator=g) * 0.02 - 0.01).half().view(torch.uint8)  # [n, nkb, 4]
    raw[:, :, :2] = scales[:, :, :2]
    if ggml_type == 3:
        raw[:, :, 2:4] = scales[:, :, 2:4]
    return raw.reshape(n, nkb * bb)


def _isas() -> list[str]:
    best = K.isa()
    return {"avx512": ["portable", "avx2", "avx512"], "avx2": ["portable", "avx2"]}.get(best, ["portable"])


@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("n,k", [(48, 64), (37, 96), (1, 32)])
def test_repack_matches_reference_and_round_trips(ggml_type, n, k):
    raw = _raw(ggml_type, n, k)
    packed = K.repack(raw, ggml_type, n, k)
    assert torch.equal(packed, ref.gguf_repack(raw, ggml_type, n, k))
    want = dequantize(raw.numpy(), ggml_type, (n, k))                 # the loader's dequantizer
    torch.testing.assert_close(ref.gguf_unpack(packed, ggml_type, n, k), want, atol=0, rtol=0)


@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("t", [1, 3, 70])
def test_matmul_matches_dequantized_reference_on_every_isa(ggml_type, t):
    n, k = 40, 160
    packed = K.repack(_raw(ggml_type, n, k, seed=t), ggml_type, n, k)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(1))
    want = ref.gguf_matmul(x, packed, ggml_type, n, k)
    outs = []
    try:
        for name in _isas():
            K.set_isa(name)
            outs.append(fast_ops.gguf_matmul(x, packed, ggml_type, n, k))
    finally:
        K.set_isa("auto")
    for y in outs:
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-4)
        assert torch.equal(y, outs[0])                               # bit-identical across ISAs
    # a strided view as input (rows of a wider tensor) gives the same result
    wide = torch.zeros(t, k + 32)
    wide[:, :k] = x
    assert torch.equal(fast_ops.gguf_matmul(wide[:, :k], packed, ggml_type, n, k), outs[0])


@pytest.mark.parametrize("ggml_type", K_TYPES)
@pytest.mark.parametrize("n,k", [(48, 256), (37, 512), (1, 256)])
def test_kquant_repack_matches_reference_and_round_trips(ggml_type, n, k):
    raw = _raw(ggml_type, n, k, seed=n)
    packed = K.repack(raw, ggml_type, n, k)
    assert packed.numel() == K.packed_bytes(ggml_type, n, k)
    assert torch.equal(packed, ref.gguf_repack(raw, ggml_type, n, k))
    want = dequantize(raw.numpy(), ggml_type, (n, k))                 # the gguf package's dequantizer
    assert torch.equal(ref.gguf_dequantize(raw, ggml_type, n, k), want)
    assert torch.equal(ref.gguf_unpack(packed, ggml_type, n, k), want)
    ids = torch.tensor([0, n - 1, n // 2])
    assert torch.equal(K.dequant_rows(ids, packed, ggml_type, n, k), want[ids])


@pytest.mark.parametrize("ggml_type", K_TYPES)
@pytest.mark.parametrize("t", [1, 5, 70])
def test_kquant_matmul_matches_dequantized_blocks_on_every_isa(ggml_type, t):
    n, k = 40, 512
    raw = _raw(ggml_type, n, k, seed=t)
    packed = K.repack(raw, ggml_type, n, k)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(2))
    want = x.double() @ ref.gguf_dequantize(raw, ggml_type, n, k).double().T    # dequantize, then matmul
    outs = []
    try:
        for name in _isas():
            K.set_isa(name)
            outs.append(fast_ops.gguf_matmul(x, packed, ggml_type, n, k))
    finally:
        K.set_isa("auto")
    for y in outs:
        torch.testing.assert_close(y.double(), want, atol=2e-4, rtol=1e-4)
        assert torch.equal(y, outs[0])                               # bit-identical across ISAs
    torch.testing.assert_close(outs[0], ref.gguf_matmul(x, packed, ggml_type, n, k), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("ggml_type", K_TYPES)
def test_malformed_kquant_blocks_are_refused_naming_row_and_block(ggml_type):
    n, k = 20, 512
    raw = _raw(ggml_type, n, k)
    raw.view(n, 2, -1)[7, 1, _K_HALVES[ggml_type][-1] + 1] = 0x7C         # the last fp16 scale: inf/nan
    with pytest.raises(ValueError, match="row 7, block 1"):
        K.repack(raw, ggml_type, n, k)
    with pytest.raises(ValueError, match="row 7, block 1"):
        ref.gguf_repack(raw, ggml_type, n, k)
    with pytest.raises(ValueError, match="multiple of the 256-value"):
        K.repack(raw, ggml_type, n, 384)
    with pytest.raises(ValueError, match="expected uint8"):
        K.repack(raw[:, :-1], ggml_type, n, k)


@pytest.mark.parametrize("t,i", [(1, 96), (3, 1536), (40, 1003)])
def test_silu_and_mul_matches_reference_on_every_isa(t, i):
    x = torch.randn(t, 2 * i) * 4
    outs = []
    try:
        for name in _isas():
            K.set_isa(name)
            outs.append(fast_ops.silu_and_mul(x))
    finally:
        K.set_isa("auto")
    got = outs[0]
    torch.testing.assert_close(got, ref.silu_and_mul(x), atol=1e-6, rtol=1e-5)
    assert all(torch.equal(y, got) for y in outs)                     # bit-identical across ISAs
    wide = torch.zeros(t, 2 * i + 16)
    wide[:, :2 * i] = x
    assert torch.equal(fast_ops.silu_and_mul(wide[:, :2 * i]), got)     # a strided row view
    assert fast_ops.silu_and_mul(torch.empty(0, 2 * i)).shape == (0, i)


def test_matmul_threads_do_not_change_results():
    n, k, ggml_type = 512, 256, 3
    packed = K.repack(_raw(ggml_type, n, k), ggml_type, n, k)
    x = torch.randn(5, k)
    one = K.matmul(x, packed, ggml_type, n, k) if K.ensure_threads(1) else None
    two = K.matmul(x, packed, ggml_type, n, k) if K.ensure_threads(2) else None
    K.ensure_threads()
    assert torch.equal(one, two)


@pytest.mark.parametrize("ggml_type", TYPES)
def test_malformed_blocks_are_refused_naming_row_and_block(ggml_type):
    n, k = 20, 96
    raw = _raw(ggml_type, n, k)
    raw.view(n, k // 32, -1)[7, 2, 1] = 0x7C                           # fp16 exponent all ones: inf/nan
    with pytest.raises(ValueError, match="row 7, block 2"):
        K.repack(raw, ggml_type, n, k)
    with pytest.raises(ValueError, match="row 7, block 2"):
        ref.gguf_repack(raw, ggml_type, n, k)
    with pytest.raises(ValueError, match="expected uint8"):
        K.repack(raw[:, :-1], ggml_type, n, k)
    with pytest.raises(ValueError, match="multiple of the 32"):
        K.repack(raw, ggml_type, n, 100)
    packed = K.repack(_raw(ggml_type, n, k), ggml_type, n, k)
    with pytest.raises(ValueError, match=r"x must be float32 \[T, 96\]"):
        K.matmul(torch.randn(2, 64), packed, ggml_type, n, k)


def test_embedding_lookup_matches_unpacked_rows():
    n, k, ggml_type = 50, 64, 8
    packed = K.repack(_raw(ggml_type, n, k), ggml_type, n, k)
    ids = torch.tensor([0, 49, 7, 7])
    want = ref.gguf_embedding(ids, packed, ggml_type, n, k)
    assert torch.equal(fast_ops.gguf_embedding(ids, packed, ggml_type, n, k), want)
    with pytest.raises(IndexError):
        K.dequant_rows(torch.tensor([50]), packed, ggml_type, n, k)


def _mixed_batch(bs: int, nb: int, hk: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, nb, bs, hk, d, generator=g)
    # two decodes (context 9 and 1) then a prefill chunk of 5 tokens after 3 cached, then a fresh prompt of 4
    computed, scheduled = [8, 0, 3, 0], [1, 1, 5, 4]
    perm = (torch.randperm(nb - 1, generator=g) + 1).tolist()
    tables, used = [], 0
    for c, s in zip(computed, scheduled):
        need = (c + s + bs - 1) // bs
        tables.append(perm[used:used + need])
        used += need
    md = AttentionMetadata.build(computed, scheduled, tables, bs)
    return kv, md


@pytest.mark.parametrize("window", [None, 3])
def test_paged_attention_matches_reference_on_a_mixed_batch(window):
    bs, nb, hq, hk, d = 4, 12, 6, 2, 32
    kv, md = _mixed_batch(bs, nb, hk, d, seed=3)
    q = torch.randn(md.num_tokens, hq, d)
    want = ref.paged_attention(q, kv, md, 0.125, window)
    got = fast_ops.paged_attention(q, kv, AttentionMetadata(**{**md.__dict__, "backend_state": {}}), 0.125, window)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_paged_attention_refuses_out_of_range_block_ids():
    bs, nb, hq, hk, d = 4, 12, 6, 2, 32
    kv, md = _mixed_batch(bs, nb, hk, d, seed=4)
    md.block_tables[0, 0] = nb                                          # past the cache
    with pytest.raises(IndexError, match="token 0"):
        fast_ops.paged_attention(torch.randn(md.num_tokens, hq, d), kv, md, 0.125)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot", [16, 8])
def test_rotary_write_kv_matches_reference(is_neox, rot):
    t, hq, hk, d, bs, nb = 5, 4, 2, 16, 4, 6
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    freqs = torch.outer(torch.arange(40).float(), inv)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)             # [max_pos, rot]
    qkv = torch.randn(t, (hq + 2 * hk) * d)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    pos = torch.tensor([3, 0, 39, 7, 7])
    slots = torch.tensor([5, -1, 23, 0, 11])
    kv_want, kv_got = torch.zeros(2, nb, bs, hk, d), torch.zeros(2, nb, bs, hk, d)
    wq, wk = ref.rotary_embedding_write_kv(pos, q.clone(), k.clone(), v.clone(), kv_want, slots, d, cos_sin, is_neox)
    gq, gk = fast_ops.rotary_embedding_write_kv(pos, q, k, v, kv_got, slots, d, cos_sin, is_neox)
    assert gq.data_ptr() == q.data_ptr()                                # the in-place fast path ran
    torch.testing.assert_close(gq, wq, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(gk, wk, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(kv_got, kv_want, atol=2e-6, rtol=1e-6)
    with pytest.raises(IndexError, match="token 2"):
        fast_ops.rotary_embedding_write_kv(torch.tensor([0, 1, 40, 2, 3]), q, k, v, kv_got, slots, d, cos_sin,
                                           is_neox)


def test_add_rms_norm_matches_reference():
    x, res, w = torch.randn(7, 96), torch.randn(7, 96), torch.randn(96)
    got, got_res = fast_ops.fused_add_rms_norm(x, res, w, 1e-6)
    want, want_res = ref.fused_add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_res, want_res)
    torch.testing.assert_close(fast_ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), atol=1e-5, rtol=1e-5)


def test_isa_is_reported_and_unknown_isa_refused():
    assert K.isa() in ("avx512", "avx2", "portable")
    with pytest.raises(ValueError):
        K.set_isa("sse9")
