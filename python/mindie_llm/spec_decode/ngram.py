# SPDX-License-Identifier: Apache-2.0
"""NgramProposer: prompt lookup decoding, no extra model.

For n from ``max_n`` down to ``min_n``, the last n tokens of the request are searched for earlier
in its own prompt and output; the k tokens that followed the most recent earlier occurrence are
proposed. Summaries, code edits and retrieval answers repeat their input, so these guesses are
often right; on open text nothing matches and nothing is proposed (no cost but the search).

Stateless: nothing to forget. Must not import torch, the engine or the executor.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mindie_llm.spec_decode.proposer import ProposalRequest, Proposer

__all__ = ["NgramProposer", "ngram_lookup"]


def ngram_lookup(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> np.ndarray:
    """The up to k tokens that followed the most recent earlier occurrence of the longest suffix
    (of length max_n .. min_n) of ``tokens`` [L]; empty when none recurs."""
    L = int(tokens.shape[0])
    if k <= 0:
        return np.zeros(0, np.int32)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        suffix = tokens[L - n:]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:L - 1], n)   # [L-n, n] starts 0..L-n-1
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k].astype(np.int32)
    return np.zeros(0, np.int32)


class NgramProposer(Proposer):
    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"speculative.ngram_min/ngram_max: need 1 <= min <= max; got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, reqs: Sequence[ProposalRequest]) -> list[np.ndarray]:
        return [ngram_lookup(np.asarray(r.token_ids), r.k, self.min_n, self.max_n) for r in reqs]
