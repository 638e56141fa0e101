# SPDX-License-Identifier: Apache-2.0
"""CPU backend ops vs the plain-torch oracle (ops/reference.py) on random inputs: odd sizes,
one-token prompts, empty decode set, mixed decode + prefill-chunk batches, GQA/MQA, sliding
window, partial rotary, fp32 and bf16 tolerances; and the ops dispatch table."""
from __future__ import annotations

import random

import pytest
import torch

from mindie_llm import ops
from mindie_llm.backends.cpu import ops as cpu_ops
from mindie_llm.layers.attention import AttentionMetadata
from mindie_llm.ops import reference as ref

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _random_batch(rng: random.Random, num_decodes: int, prefill_chunks: list[tuple[int, int]],
                  block_size: int, num_blocks: int) -> AttentionMetadata:
    """decodes with random context lengths, then prefill chunks (computed, scheduled); every request
    gets distinct random blocks (block 0 stays the null block)."""
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    computed, scheduled, tables = [], [], []
    reqs = [(rng.randint(0, 40), 1) for _ in range(num_decodes)] + list(prefill_chunks)
    for c, s in reqs:
        need = (c + s + block_size - 1) // block_size
        tables.append([free.pop() for _ in range(need)])
        computed.append(c)
        scheduled.append(s)
    return AttentionMetadata.build(computed, scheduled, tables, block_size, num_decodes=num_decodes)


CASES = [
    # (num_decodes, prefill chunks (computed, scheduled), Hq, Hk, D, block_size)
    (0, [(0, 1)], 4, 4, 8, 4),               # one-token prompt, MHA
    (0, [(0, 7), (0, 13)], 6, 2, 16, 4),      # two prefills, GQA, empty decode set
    (3, [], 4, 1, 8, 8),                      # decodes only, MQA
    (5, [(9, 6), (0, 11)], 8, 2, 12, 4),      # mixed: decodes + a later chunk + a first chunk
    (1, [(16, 16)], 3, 3, 6, 16),             # chunk aligned to blocks, odd head count
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_matches_reference(case, dtype, window):
    nd, chunks, hq, hk, d, bs = case
    rng = random.Random(hash((nd, len(chunks), hq, d, window)) & 0xFFFF)
    torch.manual_seed(rng.randint(0, 1 << 30))
    md = _random_batch(rng, nd, chunks, bs, num_blocks=64)
    kv = torch.randn(2, 64, bs, hk, d).to(dtype)
    q = torch.randn(md.num_tokens, hq, d).to(dtype)
    want = ref.paged_attention(q, kv, md, d ** -0.5, window)
    got = cpu_ops.paged_attention(q, kv, md, d ** -0.5, window)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache_matches_reference_and_touches_only_its_slots(dtype):
    torch.manual_seed(0)
    kv_ref = torch.full((2, 9, 4, 2, 8), float("nan")).to(dtype)   # poisoned
    kv_cpu = kv_ref.clone()
    slots = torch.tensor([5, 6, 7, 8, 30, -1, 2], dtype=torch.int64)   # -1: padding, not written
    k = torch.randn(7, 2, 8).to(dtype)
    v = torch.randn(7, 2, 8).to(dtype)
    ref.write_kv_cache(k, v, kv_ref, slots)
    cpu_ops.write_kv_cache(k, v, kv_cpu, slots)
    torch.testing.assert_close(kv_cpu, kv_ref, equal_nan=True, atol=0, rtol=0)
    written = ~torch.isnan(kv_cpu[0, :, :, 0, 0].float()).flatten()
    assert written.nonzero().flatten().tolist() == [2, 5, 6, 7, 8, 30]
    assert torch.equal(kv_cpu.view(2, 36, 2, 8)[1, 30], v[4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot_dim", [16, 8])  # 8 of 16: partial rotary
def test_rotary_matches_reference(dtype, is_neox, rot_dim):
    torch.manual_seed(1)
    t, hq, hk, d = 11, 3, 1, 16
    inv = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    freqs = torch.outer(torch.arange(64).float(), inv)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    pos = torch.randint(0, 64, (t,))
    q = torch.randn(t, hq * d).to(dtype)
    k = torch.randn(t, hk * d).to(dtype)
    wq, wk = ref.rotary_embedding(pos, q, k, d, cache, is_neox)
    gq, gk = cpu_ops.rotary_embedding(pos, q, k, d, cache, is_neox)
    torch.testing.assert_close(gq, wq, **TOL[dtype])
    torch.testing.assert_close(gk, wk, **TOL[dtype])
    # a second call with other positions must not reuse the first call's cos/sin
    pos2 = pos.flip(0)
    torch.testing.assert_close(cpu_ops.rotary_embedding(pos2, q, k, d, cache, is_neox)[0],
                               ref.rotary_embedding(pos2, q, k, d, cache, is_neox)[0], **TOL[dtype])
    pos2.add_(1).clamp_(max=63)  # in-place change of the same tensor
    torch.testing.assert_close(cpu_ops.rotary_embedding(pos2, q, k, d, cache, is_neox)[0],
                               ref.rotary_embedding(pos2, q, k, d, cache, is_neox)[0], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 7])
def test_norms_and_activation_match_reference(dtype, t):
    torch.manual_seed(2)
    x = torch.randn(t, 33).to(dtype)
    r = torch.randn(t, 33).to(dtype)
    w = torch.randn(33).to(dtype)
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), **TOL[dtype])
    got_n, got_r = cpu_ops.fused_add_rms_norm(x, r, w, 1e-5)
    want_n, want_r = ref.fused_add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(got_n, want_n, **TOL[dtype])
    torch.testing.assert_close(got_r, want_r, **TOL[dtype])
    g = torch.randn(t, 2 * 19).to(dtype)
    torch.testing.assert_close(cpu_ops.silu_and_mul(g), ref.silu_and_mul(g), **TOL[dtype])


def test_dispatch_routes_by_device_and_falls_back_to_reference():
    calls = []

    class Fake:
        @staticmethod
        def silu_and_mul(x):
            calls.append(x.shape)
            return ref.silu_and_mul(x)

    saved = ops.registered_backends().get("cpu")
    try:
        ops.register_backend("cpu", Fake)
        x = torch.randn(2, 8)
        ops.silu_and_mul(x)
        assert calls == [torch.Size([2, 8])]
        # an op the backend lacks falls back to the reference
        torch.testing.assert_close(ops.rms_norm(x, torch.ones(8), 1e-6), ref.rms_norm(x, torch.ones(8), 1e-6))
        with pytest.raises(ValueError, match="device_type"):
            ops.register_backend("", Fake)
    finally:
        ops.unregister_backend("cpu")
        if saved is not None:
            ops.register_backend("cpu", saved)


@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_on_adjacent_views_of_one_qkv_output(is_neox):
    # the model passes q and k as column ranges of the same qkv tensor; the CPU op rotates both
    # in one pass when it sees that layout, and must not touch v
    torch.manual_seed(3)
    t, hq, hk, d = 5, 6, 2, 8
    freqs = torch.outer(torch.arange(32).float(), 1.0 / (100 ** (torch.arange(0, d, 2).float() / d)))
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    qkv = torch.randn(t, (hq + 2 * hk) * d)
    before = qkv.clone()
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    pos = torch.tensor([0, 1, 7, 30, 2])
    gq, gk = cpu_ops.rotary_embedding(pos, q, k, d, cache, is_neox)
    wq, wk = ref.rotary_embedding(pos, q.clone(), k.clone(), d, cache, is_neox)
    torch.testing.assert_close(gq, wq, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gk, wk, atol=1e-6, rtol=1e-6)
    assert torch.equal(qkv, before)  # inputs are not modified
