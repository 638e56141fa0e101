# SPDX-License-Identifier: Apache-2.0
"""NewRequestTable: requests the engine has admitted that no step message has carried yet.

``add`` records what a worker will need (prompt, sampling parameters, seed, min-tokens ban, the
``logit_bias`` map) when a request is admitted; ``take(req_ids)`` removes the ones a step schedules
and returns them as the step's ``NewRequests`` (flat arrays of the step contract, the bias maps as
a CSR pair). Must not import torch, the scheduler extension or the executor.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mindie_llm.contract import NewRequests, csr_offsets
from mindie_llm.sampling_params import SamplingParams

__all__ = ["NewRequestTable"]


class NewRequestTable:
    def __init__(self) -> None:
        self._rows: dict[int, tuple] = {}
        # Most steps carry no new request: one empty message with read-only arrays, not ~20 new arrays.
        self._none = NewRequests()
        for name in NewRequests.__slots__:
            getattr(self._none, name).flags.writeable = False

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, req_id: int, prompt_token_ids: Sequence[int], params: SamplingParams, seed: int,
            banned: Sequence[int], *, prompt_logprobs: bool = False, output_token_ids: Sequence[int] = ()) -> None:
        self._rows[int(req_id)] = (np.asarray(prompt_token_ids, np.int32), params, int(seed),
                                   np.asarray(banned, np.int32), bool(prompt_logprobs),
                                   np.asarray(output_token_ids, np.int32))

    def discard(self, req_id: int) -> None:
        self._rows.pop(int(req_id), None)

    def take(self, req_ids: np.ndarray, block_table_reset: np.ndarray | None = None) -> NewRequests:
        """The rows among ``req_ids`` not sent before, in batch order (removed from the table).
        ``block_table_reset`` (the plan's bool[B]) narrows the search: a row a worker has never
        seen always sends its whole table, so only rows with a reset can be new."""
        if not self._rows:
            return self._none
        cand = np.asarray(req_ids)
        if block_table_reset is not None:
            cand = cand[np.asarray(block_table_reset, bool)]
        ids = [r for r in cand.tolist() if r in self._rows]
        if not ids:
            return self._none
        rows = [self._rows.pop(r) for r in ids]
        ps = [row[1] for row in rows]
        biases = [_bias_arrays(p.logit_bias) for p in ps]
        f32 = (lambda vals: np.fromiter(vals, np.float32, len(ps)))
        i32 = (lambda vals: np.fromiter(vals, np.int32, len(ps)))
        seeds = np.array([row[2] for row in rows], np.int64)           # SamplingParams keeps seeds in int64
        return NewRequests(
            req_ids=np.asarray(ids, np.int64),
            prompt_offsets=csr_offsets([row[0].shape[0] for row in rows]),
            prompt_token_ids=np.concatenate([row[0] for row in rows]),
            output_offsets=csr_offsets([row[5].shape[0] for row in rows]),
            output_token_ids=np.concatenate([row[5] for row in rows]),
            seeds=seeds,
            temperature=f32(p.temperature for p in ps), top_k=i32(max(p.top_k, 0) for p in ps),
            top_p=f32(p.top_p for p in ps), min_p=f32(p.min_p for p in ps),
            presence_penalty=f32(p.presence_penalty for p in ps),
            frequency_penalty=f32(p.frequency_penalty for p in ps),
            repetition_penalty=f32(p.repetition_penalty for p in ps),
            min_tokens=i32(p.min_tokens for p in ps),
            logprobs=i32(-1 if p.logprobs is None else p.logprobs for p in ps),
            prompt_logprobs=i32((p.prompt_logprobs or 0) if row[4] else -1 for p, row in zip(ps, rows)),
            ban_offsets=csr_offsets([row[3].shape[0] for row in rows]),
            ban_token_ids=np.concatenate([row[3] for row in rows]),
            bias_offsets=csr_offsets([b[0].shape[0] for b in biases]),
            bias_token_ids=np.concatenate([b[0] for b in biases]),
            bias_values=np.concatenate([b[1] for b in biases]))


_NO_BIAS = (np.zeros(0, np.int32), np.zeros(0, np.float32))


def _bias_arrays(bias: dict[int, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """SamplingParams.logit_bias (validated there: distinct int32 ids, biases in range) ->
    (token ids int32[K], biases f32[K])."""
    if not bias:
        return _NO_BIAS
    return (np.fromiter(bias.keys(), np.int32, len(bias)), np.fromiter(bias.values(), np.float32, len(bias)))
