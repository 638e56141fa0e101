# SPDX-License-Identifier: Apache-2.0
"""The scheduler's step messages (contracts 2 and 3 of docs/architecture.md) and FinishReason.

Owns plain containers of numpy arrays only. Must not import torch, the engine, the executor or the
C++ extension (FinishReason mirrors the extension's enum; a test checks that they agree).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class FinishReason(enum.IntEnum):
    """Why a request stopped; the values are shared with the C++ core."""

    NONE = 0
    EOS = 1
    STOP_TOKEN = 2
    STOP_STRING = 3
    LENGTH = 4            # max_tokens
    MAX_MODEL_LEN = 5
    ABORTED = 6
    PREFILL_DONE = 7      # prefill role: KV kept until release(id)


@dataclass(slots=True)
class SchedulerOutput:
    """One step's plan (B scheduled requests, T tokens). The arrays are read-only views over a
    buffer owned by the C++ core; they stay valid as long as they are referenced."""

    req_ids: np.ndarray               # int64[B] batch order: decodes, then prefill chunks
    num_scheduled_tokens: np.ndarray  # int32[B] 1 for a decode, the chunk for a prefill
    num_computed_tokens: np.ndarray   # int32[B] position of each request's first scheduled token
    input_token_ids: np.ndarray       # int32[T] the tokens to compute, concatenated in batch order
    spec_offsets: np.ndarray          # int32[B+1] CSR offsets into spec_token_ids
    spec_token_ids: np.ndarray        # int32[*] proposed tokens of each row: its LAST tokens in input_token_ids
    sample_mask: np.ndarray           # bool[B] True: samples a token after this step
    block_table_reset: np.ndarray     # bool[B] True: the row restarts from new_block_ids (drop the old
                                      #   table: it may also be shorter, after rejected lookahead)
    new_block_offsets: np.ndarray     # int32[B+1] CSR offsets into new_block_ids
    new_block_ids: np.ndarray         # int32[*] blocks appended to each row this step
    preempted_ids: np.ndarray         # int64[*] preempted (by recompute) in this step
    finished_ids: np.ndarray          # int64[*] finished or aborted since the last schedule()
    finish_reasons: np.ndarray        # int32[*] FinishReason of each finished_ids entry
    num_batched_tokens: int           # T

    @property
    def num_reqs(self) -> int:
        """B, the number of scheduled requests."""
        return int(self.req_ids.shape[0])


@dataclass(slots=True)
class UpdateResult:
    """Requests finished by one update(): ids and FinishReason values (int32), and the number of
    tokens each given row took (fewer than given when a token in the middle finished the request)."""

    finished_ids: np.ndarray    # int64[*]
    finish_reasons: np.ndarray  # int32[*]
    num_appended: np.ndarray    # int32[S] aligned with update()'s req_ids
