# SPDX-License-Identifier: Apache-2.0
"""Rejection sampling for probabilistic drafts preserves the target distribution.

Oracle: the target distribution p itself. Over many seeded draws on a 6-token vocabulary the first
emitted token (accepted proposal or resampled residual) and, when the first proposal was
accepted, the second must follow p (chi-square, p-value > 1e-3); a deliberately wrong accept rule
(min(1, q/p) instead of min(1, p/q)) or resampling from p instead of the residual must be caught
(p-value < 1e-6). The vectorized op equals the loop reference draw for draw. (The chi-square
p-value is the regularized upper incomplete gamma of torch.special.)
"""
import numpy as np
import pytest
import torch

from mindie_llm.ops import reference, sampling

V, K, N = 6, 2, 12000


def _dists(seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(K + 1, V, generator=g) * 1.5, -1)        # target, per position
    q = torch.softmax(torch.randn(K, V, generator=g) * 1.5, -1)            # draft, per position
    return p, q


def _draws(p, q, n=N, op=sampling.rejection_sample):
    g = torch.Generator().manual_seed(123)
    x = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=g) for j in range(K)], 1)   # [n, K]
    tp, dp = p.expand(n, K + 1, V).contiguous(), q.expand(n, K, V).contiguous()
    return op(tp, dp, x, list(range(n)), [7] * n)


def _pvalue(tokens, p):
    counts = torch.from_numpy(np.bincount(tokens, minlength=V)).double()
    expected = p.double() * counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((V - 1) / 2, dtype=torch.float64), stat / 2))


def test_first_and_second_token_follow_the_target():
    p, q = _dists()
    out, num = _draws(p, q)
    assert _pvalue(out[:, 0].numpy(), p[0]) > 1e-3
    two = num >= 2
    assert int(two.sum()) > 2000 and _pvalue(out[two, 1].numpy(), p[1]) > 1e-3
    assert 0 < float((num == K + 1).float().mean()) < 1                     # some bonus tokens, not all


def test_a_wrong_accept_rule_is_detected():
    p, q = _dists()
    n = N
    g = torch.Generator().manual_seed(123)
    x = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=g) for j in range(K)], 1)
    # Wrong rule 1: accept every proposal (the op told q == p), so the first token follows q.
    tp = p.expand(n, K + 1, V).contiguous()
    out, _ = sampling.rejection_sample(tp, p[:K].expand(n, K, V).contiguous(), x, list(range(n)), [7] * n)
    assert _pvalue(out[:, 0].numpy(), p[0]) < 1e-6
    # Wrong rule 2: the right accept test but resampling from p instead of the residual.
    out_ok, num = _draws(p, q)
    bad = out_ok[:, 0].clone()
    rej = num == 1
    gen = torch.Generator().manual_seed(5)
    bad[rej] = torch.multinomial(p[0], int(rej.sum()), replacement=True, generator=gen)
    assert _pvalue(bad.numpy(), p[0]) < 1e-6


def test_vectorized_equals_the_loop_reference():
    p, q = _dists(1)
    a = _draws(p, q, n=300)
    b = _draws(p, q, n=300, op=reference.rejection_sample)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
