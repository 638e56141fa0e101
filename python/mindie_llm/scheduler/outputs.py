# SPDX-License-Identifier: Apache-2.0
"""The scheduler's side of the step contract: SchedulerOutput and FinishReason come from the
torch-free ``mindie_llm.contract`` (one definition); UpdateResult is what one update() returns.

Owns plain containers of numpy arrays only. Must not import torch, the engine or the executor.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mindie_llm.contract import FinishReason, SchedulerOutput

__all__ = ["FinishReason", "SchedulerOutput", "UpdateResult"]


@dataclass(slots=True)
class UpdateResult:
    """Requests finished by one update(): ids and FinishReason values (int32)."""

    finished_ids: np.ndarray    # int64[*]
    finish_reasons: np.ndarray  # int32[*]
