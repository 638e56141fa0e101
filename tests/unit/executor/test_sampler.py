# SPDX-License-Identifier: Apache-2.0
"""Sampler and ops/sampling.py against per-row reference implementations written in this test
(plain Python loops over one row at a time, vLLM semantics)."""
import math

import pytest
import torch

from mindie_llm.layers.sampler import Sampler, SamplingMetadata
from mindie_llm.ops import sampling as ops


def _md(S, **kw):
    base = dict(temperature=torch.ones(S), top_k=torch.full((S,), -1), top_p=torch.ones(S),
                min_p=torch.zeros(S), seeds=list(range(S)),
                output_positions=[0] * S, all_greedy=False,
                need_top_k_top_p=False, need_min_p=False)
    base.update(kw)
    return SamplingMetadata(**base)


def _ref_penalties(row, prompt, output, pres, freq, rep):
    row = row.clone()
    for t in set(prompt) | set(output):
        row[t] = row[t] / rep if row[t] > 0 else row[t] * rep
    for t in set(output):
        row[t] -= freq * output.count(t) + pres
    return row


def test_penalties_match_reference():
    g = torch.Generator().manual_seed(0)
    S, V = 3, 50
    logits = torch.randn(S, V, generator=g)
    prompts = [[1, 2, 3], [4, 4], []]
    outputs = [[2, 2, 7], [], [9, 9, 9, 1]]
    pres, freq, rep = [0.5, -1.0, 0.0], [0.3, 0.0, 1.5], [1.2, 0.8, 1.0]
    pm = torch.zeros(S, V, dtype=torch.bool)
    oc = torch.zeros(S, V, dtype=torch.int32)
    for i in range(S):
        pm[i, prompts[i]] = True
        for t in outputs[i]:
            oc[i, t] += 1
    got = ops.apply_penalties(logits, pm, oc, torch.tensor(pres), torch.tensor(freq), torch.tensor(rep))
    for i in range(S):
        want = _ref_penalties(logits[i], prompts[i], outputs[i], pres[i], freq[i], rep[i])
        torch.testing.assert_close(got[i], want)


def _ref_top_k_top_p(row, k, p):
    order = sorted(range(len(row)), key=lambda j: -float(row[j]))
    keep = order[:k] if k > 0 else order
    probs = torch.softmax(row[keep], -1).tolist()
    kept, mass = [], 0.0
    for j, pr in zip(keep, probs):
        if mass > p and kept:
            break
        kept.append(j)
        mass += pr
    out = torch.full_like(row, -math.inf)
    out[kept] = row[kept]
    return out


@pytest.mark.parametrize("k,p", [(-1, 1.0), (5, 1.0), (-1, 0.5), (10, 0.3), (1, 0.9), (100, 0.01)])
def test_top_k_top_p_match_reference(k, p):
    g = torch.Generator().manual_seed(k * 7 + int(p * 100))
    logits = torch.randn(4, 64, generator=g)
    got = ops.apply_top_k_top_p(logits, torch.full((4,), k), torch.full((4,), p))
    for i in range(4):
        want = _ref_top_k_top_p(logits[i], k, p)
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want))
        torch.testing.assert_close(got[i][~torch.isinf(want)], want[~torch.isinf(want)])


def test_min_p_masks_below_fraction_of_max():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    got = ops.apply_min_p(logits, torch.tensor([0.2]))    # threshold 0.1
    assert torch.isinf(got[0, 3]) and not torch.isinf(got[0, :3]).any()


def test_mix_seed_distinct_and_in_range():
    vals = {ops.mix_seed(s, p) for s in (0, 1, -1, (1 << 63) - 1, -(1 << 63)) for p in range(50)}
    assert len(vals) == 250 and all(0 <= v < (1 << 63) for v in vals)


def test_seeded_sampling_follows_the_distribution():
    """Empirical frequencies of 8000 seeded draws vs softmax (oracle: the softmax itself)."""
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    n = 8000
    logits = torch.log(probs).expand(n, -1)
    tok = ops.sample_seeded(logits, [7] * n, list(range(n)))
    freq = torch.bincount(tok, minlength=5).float() / n
    assert torch.allclose(freq, probs, atol=0.02), freq
    # Same (seed, position) -> same token; the row's neighbours do not matter.
    again = ops.sample_seeded(logits[:3], [7, 7, 7], [2, 1, 0])
    assert again.tolist() == tok[:3].flip(0).tolist()


def test_sampler_greedy_seeded_and_batch_independent():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 100, generator=g)
    s = Sampler()
    md = _md(3, temperature=torch.tensor([0.0, 0.8, 1.3]), seeds=[5, 6, 7], output_positions=[0, 4, 9])
    out = s(logits, md)
    assert out.sampled[0] == logits[0].argmax()
    # Row 1 alone, with the same seed/position, gives the same token.
    md1 = _md(1, temperature=torch.tensor([0.8]), seeds=[6], output_positions=[4])
    assert s(logits[1:2], md1).sampled[0] == out.sampled[1]
    # All-greedy fast path equals argmax.
    mdg = _md(3, temperature=torch.zeros(3), all_greedy=True)
    assert torch.equal(s(logits, mdg).sampled, logits.argmax(-1))


def test_sampler_top_k_1_is_greedy_and_banned_tokens():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 30, generator=g)
    md = _md(2, top_k=torch.tensor([1, 1]), need_top_k_top_p=True)
    assert torch.equal(Sampler()(logits, md).sampled, logits.argmax(-1))
    top = logits.argmax(-1)
    md = _md(2, temperature=torch.zeros(2), all_greedy=True, banned_rows=torch.tensor([0]),
             banned_tokens=top[:1])
    got = Sampler()(logits, md).sampled
    assert got[0] != top[0] and got[1] == top[1]


def test_sampler_logprobs_are_raw_log_softmax():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 40, generator=g)
    md = _md(2, temperature=torch.tensor([0.0, 0.5]), max_num_logprobs=3,
             presence=torch.tensor([1.0, 1.0]), frequency=torch.zeros(2), repetition=torch.ones(2),
             prompt_mask=torch.zeros(2, 40, dtype=torch.bool), output_counts=torch.ones(2, 40, dtype=torch.int32))
    out = Sampler()(logits, md)
    ref = torch.log_softmax(logits, -1)
    want_lp, want_ids = torch.topk(ref, 3, -1)
    assert torch.equal(out.top_ids, want_ids)
    torch.testing.assert_close(out.top_logprobs, want_lp)
    torch.testing.assert_close(out.token_logprob, ref.gather(-1, out.sampled[:, None])[:, 0])
    for i in range(2):
        assert out.token_rank[i] == 1 + int((ref[i] > ref[i, out.sampled[i]]).sum())


def test_logit_bias_adds_to_the_named_logits_only():
    # Oracle: a per-entry Python loop over the (row, token, bias) triples.
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 20, generator=g)
    rows, toks, vals = [0, 0, 2], [3, 19, 3], [1.5, -100.0, 100.0]
    got = ops.apply_logit_bias(logits, torch.tensor(rows), torch.tensor(toks), torch.tensor(vals))
    want = logits.clone()
    for r, t, v in zip(rows, toks, vals):
        want[r, t] += v
    torch.testing.assert_close(got, want)
    assert not torch.equal(got, logits)          # a new tensor; the input is left alone


def test_sampler_logit_bias_forces_bans_and_leaves_logprobs_raw():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 40, generator=g)
    top = logits.argmax(-1)
    forced = (top + 1) % 40
    for temp in (torch.zeros(2), torch.tensor([1.0, 0.7])):
        md = _md(2, temperature=temp, all_greedy=bool((temp == 0).all()), max_num_logprobs=2,
                 seeds=[11, 12], bias_rows=torch.tensor([0, 1]), bias_tokens=forced,
                 bias_values=torch.tensor([100.0, 100.0]))
        out = Sampler()(logits, md)
        assert torch.equal(out.sampled, forced), temp             # +100 forces the token
        ref = torch.log_softmax(logits, -1)                       # logprobs: the unbiased distribution (vLLM)
        torch.testing.assert_close(out.token_logprob, ref.gather(-1, forced[:, None])[:, 0])
        torch.testing.assert_close(out.top_logprobs, torch.topk(ref, 2, -1).values)
    # -100 on the top token of row 0: greedy takes the runner-up; row 1 is unchanged.
    md = _md(2, temperature=torch.zeros(2), all_greedy=True, bias_rows=torch.tensor([0]),
             bias_tokens=top[:1], bias_values=torch.tensor([-100.0]))
    got = Sampler()(logits, md).sampled
    assert got[0] == torch.topk(logits[0], 2).indices[1] and got[1] == top[1]
