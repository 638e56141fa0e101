# SPDX-License-Identifier: Apache-2.0
"""The fused ``rotary_embedding_write_kv`` op: the CPU backend against the reference composition
(``reference.rotary_embedding`` then ``reference.write_kv_cache``) on random inputs, a NaN-poisoned
cache, odd head counts/sizes, partial rotary, padding slots (-1), q/k/v as adjacent views of one
qkv output (the in-place fast path) and as separate tensors; plus the dispatch entry and the
reference op equal to its two parts."""
from __future__ import annotations

import pytest
import torch
from mindie_llm import ops
from mindie_llm.backends.cpu import ops as cpu_ops
from mindie_llm.ops import reference as ref

TOL = {torch.float32: {"atol": 2e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def _cache(rot_dim: int, max_pos: int = 97) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_pos, rot_dim]


def _composition(pos, q, k, v, kv, slots, d, cache, is_neox):
    """The oracle: the two reference ops in sequence."""
    wq, wk = ref.rotary_embedding(pos, q, k, d, cache, is_neox)
    t = q.shape[0]
    ref.write_kv_cache(wk.view(t, -1, d), v.reshape(t, -1, d), kv, slots)
    return wq, wk


CASES = [
    # (T, Hq, Hk, D, rot_dim, block_size, num_blocks)
    (1, 9, 3, 64, 64, 16, 5),     # one decode token, SmolLM2-like heads
    (7, 5, 1, 12, 12, 4, 9),      # MQA, odd head count, D not a power of two
    (13, 6, 2, 16, 8, 3, 11),     # partial rotary, odd block size
    (4, 2, 2, 6, 6, 1, 7),        # MHA, block size 1
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("adjacent", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_write_kv_matches_reference_composition(case, is_neox, adjacent, dtype):
    t, hq, hk, d, rot, bs, nb = case
    g = torch.Generator().manual_seed(t * 1000 + hq * 10 + d)
    cache = _cache(rot)
    pos = torch.randint(0, cache.shape[0], (t,), generator=g)
    perm = torch.randperm(nb * bs, generator=g)
    slots = perm[:t].clone()
    if t > 2:
        slots[t // 2] = -1                                      # padding: not written
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(dtype)  # [T, (Hq + 2Hk) * D]
    if adjacent:
        q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    else:
        q, k, v = (x.contiguous() for x in qkv.split([hq * d, hk * d, hk * d], dim=-1))
    kv_ref = torch.full((2, nb, bs, hk, d), float("nan")).to(dtype)   # poisoned
    kv_got = kv_ref.clone()
    wq, wk = _composition(pos, q.clone(), k.clone(), v.clone(), kv_ref, slots, d, cache, is_neox)
    v_before = v.clone()
    gq, gk = cpu_ops.rotary_embedding_write_kv(pos, q, k, v, kv_got, slots, d, cache, is_neox)
    assert gq.shape == (t, hq * d) and gk.shape == (t, hk * d)
    torch.testing.assert_close(gq, wq, **TOL[dtype])
    torch.testing.assert_close(gk, wk, **TOL[dtype])
    torch.testing.assert_close(kv_got, kv_ref, equal_nan=True, **TOL[dtype])
    assert torch.equal(v, v_before)                             # value is never modified
    written = ~torch.isnan(kv_got[0, :, :, 0, 0].float()).flatten()
    assert sorted(written.nonzero().flatten().tolist()) == sorted(s for s in slots.tolist() if s >= 0)


def test_reference_fused_op_is_its_two_parts_and_dispatch_reaches_cpu():
    t, hq, hk, d = 5, 4, 2, 8
    g = torch.Generator().manual_seed(3)
    cache = _cache(d)
    pos = torch.tensor([0, 3, 9, 9, 40])
    q, k, v = (torch.randn(t, h * d, generator=g) for h in (hq, hk, hk))
    slots = torch.tensor([3, 0, 17, 8, 11])
    kv1 = torch.zeros(2, 6, 4, hk, d)
    kv2 = kv1.clone()
    rq, rk = ref.rotary_embedding_write_kv(pos, q, k, v, kv1, slots, d, cache, True)
    wq, wk = ref.rotary_embedding(pos, q, k, d, cache, True)
    ref.write_kv_cache(wk.view(t, hk, d), v.view(t, hk, d), kv2, slots)
    assert torch.equal(rq, wq) and torch.equal(rk, wk) and torch.equal(kv1, kv2)
    assert kv1[0].view(-1, hk, d)[17].abs().sum() > 0
    # the dispatch table routes CPU tensors to the registered CPU backend (or the reference)
    kv3 = torch.zeros_like(kv1)
    dq, dk = ops.rotary_embedding_write_kv(pos, q.clone(), k.clone(), v, kv3, slots, d, cache, True)
    torch.testing.assert_close(dq, wq, **TOL[torch.float32])
    torch.testing.assert_close(dk, wk, **TOL[torch.float32])
    torch.testing.assert_close(kv3, kv1, **TOL[torch.float32])
    assert "rotary_embedding_write_kv" in ops.OP_NAMES
