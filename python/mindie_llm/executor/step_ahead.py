# SPDX-License-Identifier: Apache-2.0
"""Asynchronous scheduling, the runner's half: the step queued one step ahead.

With ``scheduler.async_scheduling`` the runner, right after it has queued decode step n on the
device and before it reads step n's tokens, queues step n+1 of the same requests: each row one
position further, its input token taken on the device from step n's sampled token, its sampling
parameters those of the slot table with the output position one further (every sampling mode:
greedy, seeded draws, top-k/top-p/min-p, penalties, min-tokens bans). The block of that next
position is already in the row's table: the scheduler hands it out one step early (the C++
scheduler's lookahead slot, ``num_lookahead_slots = 1``). The host then returns step n's tokens,
the engine updates the scheduler and schedules step n+1 while the device computes it.

When step n+1's message arrives it is compared with what was queued (``match``):

- the same decode rows, or the same rows minus some (requests that finished, were aborted or
  were preempted at step n, known only once step n's tokens reached the scheduler): the queued
  step is used; the dropped rows' tokens are never shown and their extra KV write is abandoned
  with their blocks (it went to a slot the request owned, queued before anything the host did
  after step n, so any new owner of the block overwrites it later in stream order);
- anything else (new requests, prefill chunks, a block-table reset, proposals): the queued step is
  discarded (nothing on the host was touched by it) and the message runs normally.

This module is the bookkeeping (numpy only): what was queued, and which rows of it a message
keeps. The runner (model_runner.py) queues and consumes the device work.
Must not import torch, the engine or the scheduler extension.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mindie_llm.contract import NewRequests, SchedulerOutput

__all__ = ["AheadStep", "predict_next", "match"]


@dataclass
class AheadStep:
    """A decode step queued on the device before the host knew its message (m rows)."""

    req_ids: np.ndarray          # [m] int64, batch order
    ncomp: np.ndarray            # [m] int64 position of each row's token
    prev_tokens: np.ndarray      # [m] int64 the token each row computes (step n's, known on the host once synced)
    launched: Any                # the runner's handle of the queued work (sampler output on the device)


def predict_next(out: SchedulerOutput) -> SchedulerOutput:
    """The message the scheduler will most likely send after decode step ``out``: the same rows,
    one position further, no new blocks. Input tokens are placeholders (0): the device fills them."""
    B = out.num_reqs
    z32 = np.zeros(0, np.int32)
    return SchedulerOutput(
        req_ids=np.asarray(out.req_ids, np.int64).copy(), num_scheduled_tokens=np.ones(B, np.int32),
        num_computed_tokens=np.asarray(out.num_computed_tokens, np.int32) + 1,
        input_token_ids=np.zeros(B, np.int32), sample_mask=np.ones(B, bool), block_table_reset=np.zeros(B, bool),
        new_block_offsets=np.zeros(B + 1, np.int32), new_block_ids=z32, preempted_ids=np.zeros(0, np.int64),
        finished_ids=np.zeros(0, np.int64), finish_reasons=z32, num_batched_tokens=B, new_requests=NewRequests())


def is_plain_decode(out: SchedulerOutput) -> bool:
    """Every row one token, every row samples, no proposals, no grammar masks."""
    return (out.num_reqs > 0 and bool((np.asarray(out.num_scheduled_tokens) == 1).all())
            and bool(np.asarray(out.sample_mask).all()) and not len(out.spec_token_ids)
            and not len(getattr(out, "grammar_req_ids", ())))


def match(ahead: AheadStep, out: SchedulerOutput) -> np.ndarray | None:
    """Rows of ``ahead`` that ``out`` computes ([k] int64 indices, increasing), or None when
    ``out`` is not the queued step restricted to some of its rows."""
    if not is_plain_decode(out) or out.new_requests.num_reqs or np.asarray(out.block_table_reset).any():
        return None
    ids = np.asarray(out.req_ids, np.int64)
    order = np.argsort(ahead.req_ids, kind="stable")
    at = np.searchsorted(ahead.req_ids[order], ids)
    if (at >= order.shape[0]).any():
        return None
    idx = order[at]                                                          # [k]
    if not np.array_equal(ahead.req_ids[idx], ids) or (np.diff(idx) <= 0).any():
        return None
    if not np.array_equal(ahead.ncomp[idx], np.asarray(out.num_computed_tokens, np.int64)):
        return None
    if not np.array_equal(ahead.prev_tokens[idx], np.asarray(out.input_token_ids, np.int64)):
        return None
    return idx
