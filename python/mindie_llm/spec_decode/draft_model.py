# SPDX-License-Identifier: Apache-2.0
"""DraftModelProposer: a smaller model of the same vocabulary, with its own paged KV cache, run for
k steps per proposal.

Per request the draft remembers which tokens its KV holds; each step it recomputes from the first
position that differs from the request's tokens (rejected proposals), feeding the tokens the
target accepted in one catch-up forward that also yields the first proposal, then k - 1
one-token forwards. All requests of a step share each forward. Greedy rows take the draft's
argmax; sampled rows draw with the target's own (seed, position) noise (``draw_coupled``).

Must not import the engine, the executor or the server.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from mindie_llm.spec_decode.draft_cache import DraftKVCache, DraftRow
from mindie_llm.spec_decode.proposer import ProposalRequest, Proposer, draw_coupled

__all__ = ["DraftModelProposer"]


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.shape[0], b.shape[0])
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class DraftModelProposer(Proposer):
    def __init__(self, model: Any, *, target_vocab_size: int, block_size: int, max_model_len: int,
                 device: torch.device | str) -> None:
        arch = model.arch
        if arch.vocab_size != target_vocab_size:
            raise ValueError(f"speculative.draft_model: vocabulary of {arch.vocab_size} tokens differs from "
                             f"the target's {target_vocab_size}")
        self.model = model
        self.max_model_len = max_model_len
        dtype = next(model.parameters()).dtype
        self.cache = DraftKVCache(arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim, block_size,
                                  dtype, device)
        self.cached_tokens: dict[int, np.ndarray] = {}     # tokens whose K/V the draft holds, per request

    def drop(self, req_ids: Sequence[int]) -> None:
        for rid in req_ids:
            self.cache.drop(rid)
            self.cached_tokens.pop(rid, None)

    def _forward(self, rows: list[DraftRow]) -> torch.Tensor:
        b = self.cache.build(rows)
        hidden = self.model(b.input_ids, b.positions, self.cache.caches, b.md)       # [T, H]
        return self.model.compute_logits(hidden[b.last])                           # [R, V]

    @torch.inference_mode()
    def propose(self, reqs: Sequence[ProposalRequest]) -> list[np.ndarray]:
        reqs = list(reqs)
        k_max = max(r.k for r in reqs)
        props = np.zeros((len(reqs), k_max), np.int32)
        rows = []
        for r in reqs:
            toks = np.asarray(r.token_ids, np.int64)
            L = toks.shape[0]
            start = min(_common_prefix(self.cached_tokens.get(r.req_id, toks[:0]), toks), L - 1)
            self.cache.ensure(r.req_id, L + r.k - 1)
            rows.append(DraftRow(r.req_id, start, toks[start:]))
        props[:, 0] = draw_coupled(self._forward(rows), reqs, [0] * len(reqs))
        for j in range(1, k_max):
            live = [i for i, r in enumerate(reqs) if r.k > j]
            if not live:
                break
            drows = [DraftRow(reqs[i].req_id, int(reqs[i].token_ids.shape[0]) + j - 1,
                              props[i, j - 1:j].astype(np.int64)) for i in live]
            props[live, j] = draw_coupled(self._forward(drows), [reqs[i] for i in live], [j] * len(live))
        out = []
        for i, r in enumerate(reqs):
            p = props[i, :r.k]
            # K/V now hold the tokens plus all proposals but the last (never fed).
            self.cached_tokens[r.req_id] = np.concatenate([np.asarray(r.token_ids, np.int32), p[:-1]])
            out.append(p)
        return out
