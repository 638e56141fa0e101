# SPDX-License-Identifier: Apache-2.0
"""The CUDA backend's paged attention (unified mixed-batch kernel and split-KV decode kernel, its
segments merged in the same launch or by a second kernel) against ops/reference.py's
paged_attention, the oracle: random caches with shuffled block tables, poisoned outputs, odd
lengths, one-token prompts, an empty decode set, 1 and 300 sequences, GQA groups of 1, 3 and 4."""
from __future__ import annotations

import pytest
import torch

from cuda_checks import TOL, rel_err
from mindie_llm.layers.attention import AttentionMetadata
from mindie_llm.ops import reference


def make_batch(q_lens, ctx_lens, hq, hk, d, bs, dtype, seed, device, extra_blocks=3):
    """A mixed batch: request i computes q_lens[i] new tokens after ctx_lens[i] cached ones."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    need = [(s + bs - 1) // bs for s in seq_lens]
    nblocks = 1 + sum(need) + extra_blocks
    kv = torch.randn(2, nblocks, bs, hk, d, generator=g).to(dtype)        # [2, N, Bs, Hk, D]
    perm = (torch.randperm(nblocks - 1, generator=g) + 1).to(torch.int32)  # block 0 is the null block
    width = max(need + [1]) + 2
    bt = torch.zeros(len(q_lens), width, dtype=torch.int32)               # padded with the null block
    used = 0
    for i, n in enumerate(need):
        bt[i, :n] = perm[used:used + n]
        used += n
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
    q = torch.randn(int(qsl[-1]), hq, d, generator=g).to(dtype)           # [T, Hq, D]
    num_decodes = 0
    while num_decodes < len(q_lens) and q_lens[num_decodes] == 1:
        num_decodes += 1

    def md(dev):
        return AttentionMetadata(slot_mapping=torch.zeros(q.shape[0], dtype=torch.int64, device=dev),
                                 query_start_loc=qsl.to(dev), seq_lens=torch.tensor(seq_lens, dtype=torch.int32,
                                                                                   device=dev),
                                 block_tables=bt.to(dev), num_decodes=num_decodes,
                                 max_query_len=max(q_lens + [0]), max_seq_len=max(seq_lens + [0]))
    return q, kv, md("cpu"), q.to(device), kv.to(device), md(device)


def check(device, q_lens, ctx_lens, dtype=torch.float32, hq=4, hk=2, d=32, bs=4, window=None,
          split_kv=None, seed=0, merge="in_kernel", counters=None):
    from mindie_llm.backends.cuda import attention
    q, kv, md, q_d, kv_d, md_d = make_batch(q_lens, ctx_lens, hq, hk, d, bs, dtype, seed, device)
    ref = reference.paged_attention(q, kv, md, d ** -0.5, window)
    out = torch.full_like(q_d, float("nan"))                              # poisoned: every row must be written
    attention.paged_attention_raw(q_d, kv_d, md_d.query_start_loc, md_d.seq_lens, md_d.block_tables,
                                  len(q_lens), md.max_query_len, d ** -0.5, window, out=out, split_kv=split_kv,
                                  max_seq_len=md.max_seq_len, merge=merge, counters=counters)
    err = rel_err(out, ref)
    assert err < TOL[dtype], (q_lens, ctx_lens, err)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_decodes_then_chunks(device, dtype):
    # decodes first, then prefill chunks over cached context; lengths not multiples of block or tile
    check(device, [1, 1, 1, 13, 5, 1], [0, 6, 37, 0, 22, 0], dtype=dtype)


def test_one_token_prompts_and_single_sequence(device):
    check(device, [1], [0])
    check(device, [1, 1, 1], [0, 0, 0])
    check(device, [70], [0], seed=1)


def test_empty_decode_set_prefill_only(device):
    check(device, [9, 17, 3], [4, 0, 30])


def test_empty_batch(device):
    from mindie_llm.backends.cuda import attention
    q = torch.empty(0, 4, 32, device=device)
    kv = torch.randn(2, 3, 4, 2, 32, device=device)
    z = torch.zeros(1, dtype=torch.int32, device=device)
    out = attention.paged_attention_raw(q, kv, z, z[:0], torch.zeros(0, 2, dtype=torch.int32, device=device), 0, 0,
                                        1.0)
    assert out.shape == (0, 4, 32)


@pytest.mark.parametrize("qpkv,d", [(1, 16), (3, 32), (8, 64)])
def test_gqa_groups_and_head_dims(device, qpkv, d):
    check(device, [1, 1, 6], [10, 0, 3], hq=2 * qpkv, hk=2, d=d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_kv_decode(device, dtype):
    # long and short contexts, some shorter than the number of segments (empty segments)
    check(device, [1] * 5, [300, 0, 7, 129, 64], dtype=dtype, hq=4, hk=1, split_kv=True)
    check(device, [1] * 5, [300, 0, 7, 129, 64], dtype=dtype, hq=4, hk=1, split_kv=False)


@pytest.mark.parametrize("qpkv,hk", [(1, 2), (3, 1)])
def test_split_kv_merged_in_kernel_equals_two_pass(device, qpkv, hk):
    """The one-launch split-KV decode (segments merged by the last program to arrive) against the
    reference and the two-kernel form; the arrival counters are left zero for the next launch,
    and a second launch on the same counters is right again."""
    lens = [70, 3, 1]
    counters = torch.zeros(3 * hk + 3, dtype=torch.int32, device=device)
    for rep in range(2):
        one = check(device, [1] * 3, lens, hq=hk * qpkv, hk=hk, split_kv=True, counters=counters, seed=rep)
        assert int(counters.abs().sum()) == 0
    two = check(device, [1] * 3, lens, hq=hk * qpkv, hk=hk, split_kv=True, merge="two_pass", seed=1)
    assert rel_err(one, two) < 1e-5


def test_split_kv_rejects_bad_counters_and_merge(device):
    from mindie_llm.backends.cuda import attention
    q, kv, md, q_d, kv_d, md_d = make_batch([1, 1], [5, 9], 4, 2, 32, 4, torch.float32, 0, device)
    args = (q_d, kv_d, md_d.query_start_loc, md_d.seq_lens, md_d.block_tables, 2, 1, 0.1)
    with pytest.raises(ValueError, match="counters"):
        attention.paged_attention_raw(*args, split_kv=True, counters=torch.zeros(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="merge"):
        attention.paged_attention_raw(*args, split_kv=True, merge="tree")


def test_sliding_window(device):
    check(device, [1, 1, 9], [40, 3, 20], window=8)
    check(device, [1, 1], [40, 3], window=8, split_kv=True)


def test_300_sequences(device):
    g = torch.Generator().manual_seed(5)
    ctx = torch.randint(0, 12, (300,), generator=g).tolist()
    check(device, [1] * 290 + [2] * 10, ctx, hq=2, hk=1, d=16, seed=2)   # 290 decodes + 10 chunks


def test_ops_contract_entry_point(device):
    """``paged_attention(query, kv_cache, attn_metadata, scale)`` as ops dispatch calls it."""
    from mindie_llm.backends.cuda import attention
    q, kv, md, q_d, kv_d, md_d = make_batch([1, 4], [5, 2], 4, 2, 32, 4, torch.float32, 9, device)
    out = attention.paged_attention(q_d, kv_d, md_d, 0.2)
    assert rel_err(out, reference.paged_attention(q, kv, md, 0.2)) < 1e-4
