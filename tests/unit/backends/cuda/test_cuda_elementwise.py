# SPDX-License-Identifier: Apache-2.0
"""Norm, activation, rotary and KV-write kernels of the CUDA backend against ops/reference.py
(the oracle), on fresh random inputs, odd sizes and fp32/bf16."""
from __future__ import annotations

import pytest
import torch

from mindie_llm.ops import reference
from cuda_checks import TOL, rel_err

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(1, 64), (7, 96), (33, 200)])
def test_rms_norm_and_fused_add(device, dtype, T, H):
    from mindie_llm.backends.cuda import norm
    g = torch.Generator().manual_seed(T * 1000 + H)
    x = torch.randn(T, H, generator=g).to(dtype)
    res = torch.randn(T, H, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)
    out = norm.rms_norm(x.to(device), w.to(device), 1e-6)
    assert rel_err(out, reference.rms_norm(x, w, 1e-6)) < TOL[dtype]
    normed, new_res = norm.fused_add_rms_norm(x.to(device), res.to(device), w.to(device), 1e-5)
    ref_normed, ref_res = reference.fused_add_rms_norm(x, res, w, 1e-5)
    assert rel_err(new_res, ref_res) < TOL[dtype]
    assert rel_err(normed, ref_normed) < TOL[dtype]


def test_norm_empty_batch(device):
    from mindie_llm.backends.cuda import norm
    x = torch.randn(0, 32, device=device)
    assert norm.rms_norm(x, torch.ones(32, device=device), 1e-6).shape == (0, 32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,I", [(1, 16), (5, 100), (3, 1500)])
def test_silu_and_mul(device, dtype, T, I):
    from mindie_llm.backends.cuda import activation
    x = torch.randn(T, 2 * I, generator=torch.Generator().manual_seed(I)).to(dtype)
    out = activation.silu_and_mul(x.to(device))
    assert out.shape == (T, I)
    assert rel_err(out, reference.silu_and_mul(x)) < TOL[dtype]


def test_silu_and_mul_rejects_odd_width(device):
    from mindie_llm.backends.cuda import activation
    with pytest.raises(ValueError, match="x"):
        activation.silu_and_mul(torch.randn(2, 5, device=device))


def _rotary_inputs(T, hq, hk, d, rot, dtype, seed, max_pos=64):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (hq + 2 * hk) * d, generator=g).to(dtype)   # q, k, v as views of one tensor
    pos = torch.randint(0, max_pos, (T,), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)             # [max_pos, rot]
    return qkv, pos, cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("T,hq,hk,d,rot", [(1, 4, 2, 16, 16), (9, 6, 2, 32, 16), (5, 3, 3, 64, 64)])
def test_rotary_embedding(device, dtype, is_neox, T, hq, hk, d, rot):
    from mindie_llm.backends.cuda import rotary
    qkv, pos, cache = _rotary_inputs(T, hq, hk, d, rot, dtype, seed=T + hq + rot)
    ref_q, ref_k = reference.rotary_embedding(pos, qkv[:, :hq * d], qkv[:, hq * d:(hq + hk) * d], d, cache, is_neox)
    qkv_dev = qkv.to(device)
    q, k = qkv_dev[:, :hq * d], qkv_dev[:, hq * d:(hq + hk) * d]       # strided views, as in the model
    out_q, out_k = rotary.rotary_embedding(pos.to(device), q, k, d, cache.to(device), is_neox)
    assert rel_err(out_q, ref_q) < TOL[dtype] and rel_err(out_k, ref_k) < TOL[dtype]
    # v (the rest of the row) is untouched
    assert torch.equal(qkv_dev[:, (hq + hk) * d:].cpu(), qkv[:, (hq + hk) * d:])


def _poisoned_cache(nblocks, bs, hk, d, dtype, device):
    return torch.full((2, nblocks, bs, hk, d), float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_cache_with_padding_slots(device, dtype):
    from mindie_llm.backends.cuda import rotary
    T, hk, d, bs, nblocks = 11, 2, 16, 4, 8
    g = torch.Generator().manual_seed(3)
    k = torch.randn(T, hk, d, generator=g).to(dtype)
    v = torch.randn(T, hk, d, generator=g).to(dtype)
    slots = torch.randperm(nblocks * bs, generator=g)[:T]
    slots[[2, 7]] = -1                                                 # padding: not written
    ref = _poisoned_cache(nblocks, bs, hk, d, dtype, "cpu")
    reference.write_kv_cache(k, v, ref, slots)
    out = _poisoned_cache(nblocks, bs, hk, d, dtype, device)
    rotary.write_kv_cache(k.to(device), v.to(device), out, slots.to(device))
    assert torch.equal(out.cpu().isnan(), ref.isnan())                 # exactly the right slots written
    assert torch.equal(out.cpu().nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox,d,rot", [(True, 32, 32), (False, 32, 16), (True, 64, 32)])
def test_fused_rotary_write_kv_matches_two_ops(device, dtype, is_neox, d, rot):
    from mindie_llm.backends.cuda import rotary
    T, hq, hk, bs, nblocks = 7, 4, 2, 4, 6
    qkv, pos, cache = _rotary_inputs(T, hq, hk, d, rot, dtype, seed=d + rot)
    slots = torch.randperm(nblocks * bs, generator=torch.Generator().manual_seed(1))[:T]
    slots[3] = -1
    ref_q, ref_k = reference.rotary_embedding(pos, qkv[:, :hq * d], qkv[:, hq * d:(hq + hk) * d], d, cache, is_neox)
    ref_cache = _poisoned_cache(nblocks, bs, hk, d, dtype, "cpu")
    reference.write_kv_cache(ref_k.view(T, hk, d), qkv[:, (hq + hk) * d:].reshape(T, hk, d), ref_cache, slots)
    qkv_dev = qkv.to(device)
    out_cache = _poisoned_cache(nblocks, bs, hk, d, dtype, device)
    q, k = rotary.rotary_embedding_write_kv(pos.to(device), qkv_dev[:, :hq * d], qkv_dev[:, hq * d:(hq + hk) * d],
                                            qkv_dev[:, (hq + hk) * d:], out_cache, slots.to(device), d,
                                            cache.to(device), is_neox)
    assert rel_err(q, ref_q) < TOL[dtype] and rel_err(k, ref_k) < TOL[dtype]
    assert torch.equal(out_cache.cpu().isnan(), ref_cache.isnan())
    assert rel_err(out_cache.cpu().nan_to_num(), ref_cache.nan_to_num()) < TOL[dtype]


@pytest.mark.parametrize("S,V", [(1, 100), (3, 4096), (5, 9000)])
def test_argmax_first_index_of_max(device, S, V):
    """Oracle: torch.argmax (first index of the maximum), with planted ties across chunks."""
    from mindie_llm.backends.cuda import sampling
    g = torch.Generator().manual_seed(S * V)
    x = torch.randn(S, V, generator=g)
    x[0, V - 1] = x[0, V // 3] = 50.0                                  # tie: the lower index wins
    if S > 1:
        x[1, :] = 7.0                                                  # all equal: index 0
    out = sampling.argmax(x.to(device))
    assert torch.equal(out.cpu(), torch.argmax(x, dim=-1))
