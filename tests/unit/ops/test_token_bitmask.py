# SPDX-License-Identifier: Apache-2.0
"""apply_token_bitmask (structured output): ops.sampling against ops.reference and against
llguidance's own numpy implementation of the same packed layout (the oracle), and in the sampler."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mindie_llm.ops import reference
from mindie_llm.ops import sampling as ops

llg_np = pytest.importorskip("llguidance.numpy")


@pytest.mark.parametrize("S,V", [(1, 31), (3, 64), (5, 49152 + 7)])
def test_bitmask_matches_llguidance_and_the_reference(S, V):
    g = torch.Generator().manual_seed(S * V)
    logits = torch.randn(S, V, generator=g)
    words = -(-V // 32)
    mask = torch.randint(-(1 << 31), (1 << 31) - 1, (S, words), generator=g, dtype=torch.int64).to(torch.int32)
    mask[0] = -1                                     # an unconstrained row stays unchanged
    want = logits.numpy().copy()
    llg_np.apply_token_bitmask_inplace(want, mask.numpy())
    got = ops.apply_token_bitmask(logits, mask)
    assert torch.equal(got, reference.apply_token_bitmask(logits, mask))
    assert np.array_equal(got.numpy(), want)
    assert torch.equal(got[0], logits[0])


def test_sampler_only_picks_allowed_tokens():
    from mindie_llm.layers.sampler import Sampler, SamplingMetadata

    S, V = 4, 100
    logits = torch.randn(S, V)
    allowed = [7, 42, 99, 3]
    mask = torch.zeros(S, 4, dtype=torch.int32)
    for r, t in enumerate(allowed):
        mask[r, t // 32] = np.int32(np.uint32(1 << (t % 32)).view(np.int32))
    md = SamplingMetadata(temperature=torch.tensor([0.0, 1.0, 0.0, 1.0]), top_k=torch.zeros(S, dtype=torch.int64),
                          top_p=torch.ones(S), min_p=torch.zeros(S), seeds=[1, 2, 3, 4], output_positions=[0] * S,
                          all_greedy=False, need_top_k_top_p=False, need_min_p=False, token_bitmask=mask)
    assert Sampler()(logits, md).sampled.tolist() == allowed
