# SPDX-License-Identifier: Apache-2.0
"""SlotTable: the runner's persistent per-request arrays (vLLM v1's persistent batch idea).

A request gets a *slot* when a step message introduces it and keeps it until it finishes or is
aborted (preemption keeps it). Everything the per-step hot path reads about a request lives in
one array per field, indexed by slot, filled once at admission: sampling parameters, seed,
min-tokens ban list and logit_bias map (padded), prompt length, and the output tokens so far (appended per step with
one fancy-indexed store, no per-request Python loop). A step only gathers ``array[slots]``.

``slots_of(req_ids)`` maps the step's int64 request ids to slots with one ``searchsorted`` over a
sorted id table kept at admission and removal, and reuses the last answer when the rows repeat.

Plain numpy: must not import torch, the engine or the scheduler extension.
"""
from __future__ import annotations

import numpy as np

__all__ = ["SlotTable"]

_F32 = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_I64 = ("top_k", "min_tokens", "logprobs", "prompt_logprobs", "seed", "num_prompt", "num_output", "row")


class SlotTable:
    """Per-slot arrays (N slots, grown by doubling). ``row`` is the block-table row (-1: none)."""

    def __init__(self, num_slots: int, max_model_len: int) -> None:
        n = max(int(num_slots), 1)
        self.max_model_len = max_model_len
        for name in _F32:
            setattr(self, name, np.zeros(n, np.float32))           # [N]
        for name in _I64:
            setattr(self, name, np.zeros(n, np.int64))             # [N]
        self.has_penalties = np.zeros(n, bool)                     # [N]
        self.ban = np.full((n, 0), -1, np.int32)                   # [N, Wb] -1-padded ban lists
        self.has_bias = np.zeros(n, bool)                          # [N]
        self.bias_ids = np.full((n, 0), -1, np.int32)              # [N, Wl] -1-padded logit_bias ids
        self.bias_values = np.zeros((n, 0), np.float32)            # [N, Wl] their biases
        self.outputs = np.zeros((n, min(256, max(max_model_len, 1))), np.int32)   # [N, Wo]
        self._free = list(range(n - 1, -1, -1))
        self._ids = np.zeros(0, np.int64)                          # sorted live request ids
        self._id_slots = np.zeros(0, np.int64)                     # their slots
        self._last_ids: np.ndarray | None = None
        self._last_slots: np.ndarray | None = None

    @property
    def capacity(self) -> int:
        return int(self.temperature.shape[0])

    # -------------------------------------------------------------------------------- admission
    def add(self, req_id: int, sampling, seed: int, num_prompt: int, outputs: np.ndarray) -> int:
        """Takes a slot for ``req_id`` and fills its row once. ``sampling``: a SamplingRow."""
        if not self._free:
            self._grow()
        s = self._free.pop()
        for name in _F32:
            getattr(self, name)[s] = getattr(sampling, name)
        self.top_k[s], self.min_tokens[s] = sampling.top_k, sampling.min_tokens
        self.logprobs[s], self.prompt_logprobs[s] = sampling.logprobs, sampling.prompt_logprobs
        self.seed[s], self.num_prompt[s], self.row[s] = seed, num_prompt, -1
        self.has_penalties[s] = sampling.has_penalties
        self.ban = _set_row(self.ban, s, np.asarray(sampling.banned, np.int32), -1)
        bias_ids = np.asarray(getattr(sampling, "bias_ids", ()), np.int32)
        self.has_bias[s] = bias_ids.shape[0] > 0
        self.bias_ids = _set_row(self.bias_ids, s, bias_ids, -1)
        self.bias_values = _set_row(self.bias_values, s, np.asarray(getattr(sampling, "bias_values", ()),
                                                                    np.float32), 0)
        self.num_output[s] = 0
        self.append(np.array([s], np.int64), np.zeros(2, np.int32) + [0, outputs.shape[0]], outputs)
        i = int(np.searchsorted(self._ids, req_id))
        self._ids = np.insert(self._ids, i, req_id)
        self._id_slots = np.insert(self._id_slots, i, s)
        self._last_ids = None
        return s

    def remove(self, req_id: int, slot: int) -> None:
        i = int(np.searchsorted(self._ids, req_id))
        assert i < self._ids.shape[0] and self._ids[i] == req_id, req_id
        self._ids = np.delete(self._ids, i)
        self._id_slots = np.delete(self._id_slots, i)
        self.row[slot] = -1
        self._free.append(slot)
        self._last_ids = None

    def _grow(self) -> None:
        old = self.capacity
        for name in _F32 + _I64 + ("has_penalties", "has_bias"):
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.zeros_like(a)]))
        self.ban = np.concatenate([self.ban, np.full_like(self.ban, -1)])
        self.bias_ids = np.concatenate([self.bias_ids, np.full_like(self.bias_ids, -1)])
        self.bias_values = np.concatenate([self.bias_values, np.zeros_like(self.bias_values)])
        self.outputs = np.concatenate([self.outputs, np.zeros_like(self.outputs)])
        self._free = list(range(2 * old - 1, old - 1, -1))

    # -------------------------------------------------------------------------------- per step
    def slots_of(self, req_ids: np.ndarray) -> np.ndarray:
        """[B] int64 request ids -> [B] int64 slots (KeyError naming the first unknown id)."""
        req_ids = np.asarray(req_ids, np.int64)
        last = self._last_ids
        if last is not None and last.shape == req_ids.shape and np.array_equal(last, req_ids):
            return self._last_slots
        idx = np.searchsorted(self._ids, req_ids)
        idx_c = np.minimum(idx, max(self._ids.shape[0] - 1, 0))
        ok = (idx < self._ids.shape[0]) & (self._ids[idx_c] == req_ids) if self._ids.shape[0] else \
            np.zeros(req_ids.shape[0], bool)
        if not ok.all():
            raise KeyError(int(req_ids[np.flatnonzero(~ok)[0]]))
        slots = self._id_slots[idx_c]
        self._last_ids, self._last_slots = req_ids.copy(), slots
        return slots

    def append(self, slots: np.ndarray, offsets: np.ndarray, tokens: np.ndarray) -> None:
        """Appends tokens[offsets[i]:offsets[i+1]] to the outputs of slots[i] (CSR, vectorized)."""
        counts = np.diff(np.asarray(offsets, np.int64))                  # [S]
        total = int(counts.sum())
        if not total:
            return
        start = self.num_output[slots]                                   # [S]
        need = int((start + counts).max())
        if need > self.outputs.shape[1]:
            width = min(max(need, 2 * self.outputs.shape[1]), max(self.max_model_len, need))
            grown = np.zeros((self.capacity, width), np.int32)
            grown[:, :self.outputs.shape[1]] = self.outputs
            self.outputs = grown
        owner = np.repeat(np.arange(slots.shape[0]), counts)             # [total]
        col = start[owner] + np.arange(total) - np.asarray(offsets, np.int64)[owner]
        self.outputs[slots[owner], col] = tokens[:total]
        self.num_output[slots] = start + counts

    def output_tokens(self, slot: int) -> np.ndarray:
        return self.outputs[slot, :int(self.num_output[slot])]


def _set_row(mat: np.ndarray, slot: int, values: np.ndarray, pad) -> np.ndarray:
    """mat[slot] = values padded with ``pad``, widening ``mat`` first if needed (returns it)."""
    if values.shape[0] > mat.shape[1]:
        mat = np.concatenate([mat, np.full((mat.shape[0], values.shape[0] - mat.shape[1]), pad, mat.dtype)], axis=1)
    mat[slot] = pad
    mat[slot, :values.shape[0]] = values
    return mat
