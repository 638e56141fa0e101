# SPDX-License-Identifier: Apache-2.0
"""The scheduler's side of the step contract: SchedulerOutput and FinishReason come from the
torch-free ``mindie_llm.contract`` (one definition; FinishReason mirrors the extension's enum and a
test checks that they agree); UpdateResult is what one update() returns.

Owns plain containers of numpy arrays only. Must not import torch, the engine, the executor or the
C++ extension.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mindie_llm.contract import FinishReason, SchedulerOutput

__all__ = ["FinishReason", "SchedulerOutput", "UpdateResult", "SCHEDULE_FIELDS"]

# The order of the tuple the C++ core's schedule() returns: SchedulerOutput's positional fields
# (a test checks it), so the facade builds the message without keyword arguments.
SCHEDULE_FIELDS = ("req_ids", "num_scheduled_tokens", "num_computed_tokens", "input_token_ids", "sample_mask",
                   "block_table_reset", "new_block_offsets", "new_block_ids", "preempted_ids", "finished_ids",
                   "finish_reasons", "num_batched_tokens", "spec_offsets", "spec_token_ids")


@dataclass(slots=True)
class UpdateResult:
    """Requests finished by one update(): ids and FinishReason values (int32), and the number of
    tokens each given row took (fewer than given when a token in the middle finished the request).
    The arrays may be read-only and shared between steps (empty ones, all-one counts)."""

    finished_ids: np.ndarray    # int64[*]
    finish_reasons: np.ndarray  # int32[*]
    num_appended: np.ndarray    # int32[S] aligned with update()'s req_ids
