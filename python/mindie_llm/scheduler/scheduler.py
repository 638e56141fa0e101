# SPDX-License-Identifier: Apache-2.0
"""Thin Python facade over the C++ scheduler extension ``mindie_llm._scheduler``.

Owns argument conversion (ids and numpy arrays only) and the Python-side types of the scheduler
API. Request state lives in C++; nothing here loops over requests. Must not import torch, the
engine, the executor or the server.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mindie_llm import _scheduler
from mindie_llm.scheduler.outputs import FinishReason, SchedulerOutput, UpdateResult

SchedulerError = _scheduler.SchedulerError                    # base, a RuntimeError
RequestRejectedError = _scheduler.RequestRejectedError        # ValueError: refused at admission
NoFreeBlocksError = _scheduler.NoFreeBlocksError              # add_prefilled: no room now, retry
UnknownRequestError = _scheduler.UnknownRequestError          # KeyError and ValueError
SchedulerContractError = _scheduler.SchedulerContractError    # ValueError: step contract broken
SchedulerConfigError = _scheduler.SchedulerConfigError        # ValueError: bad config field

POLICIES = ("fcfs", "priority", "static", "prefill_first")
ROLES = ("colocated", "prefill", "decode")
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class SchedulerCoreConfig:
    """Configuration of the scheduler core; every field is validated here (SchedulerConfigError)."""

    num_blocks: int                     # including the null block 0
    block_size: int
    max_num_batched_tokens: int         # token budget of one step
    max_num_seqs: int                   # running requests at most
    max_model_len: int                  # prompt + output tokens at most
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"                # fcfs | priority | static | prefill_first
    role: str = "colocated"             # colocated | prefill | decode

    def __post_init__(self) -> None:
        minimum = {"num_blocks": 2, "block_size": 1, "max_num_batched_tokens": 1, "max_num_seqs": 1,
                   "max_model_len": 1}
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= _INT32_MAX:
                raise SchedulerConfigError(f"{name} must be an int in [{low}, {_INT32_MAX}], got {value!r}")
        if self.policy not in POLICIES:
            raise SchedulerConfigError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.role not in ROLES:
            raise SchedulerConfigError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")


def _checked_int(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise RequestRejectedError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return int(value)


def _token_array(name: str, values: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, np.int32)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise RequestRejectedError(f"{name} must be a 1-D sequence of ints, got dtype {arr.dtype} ndim {arr.ndim}")
    if arr.dtype != np.int32:
        if int(arr.min()) < 0 or int(arr.max()) > _INT32_MAX:
            raise RequestRejectedError(f"{name} has a token id outside [0, {_INT32_MAX}]")
        arr = arr.astype(np.int32)
    return arr


class Scheduler:
    """Continuous-batching scheduler (C++): SplitFuse chunked prefill, prefix caching, preemption
    by recompute, fcfs / priority / static / prefill_first policies, and the PD roles.

    One engine step is ``out = schedule()``, run the model on ``out``, then
    ``update(req_ids, sampled_token_ids)`` (always exactly once after every schedule())."""

    def __init__(self, config: SchedulerCoreConfig) -> None:
        """Creates the block pool and empty queues for ``config``."""
        self.config = config
        self._core = _scheduler.SchedulerCore(
            int(config.num_blocks), int(config.block_size), int(config.max_num_batched_tokens),
            int(config.max_num_seqs), int(config.max_model_len), bool(config.enable_prefix_caching),
            bool(config.enable_chunked_prefill), POLICIES.index(config.policy), ROLES.index(config.role))

    # ------------------------------------------------------------------ requests
    def add_request(self, req_id: int, prompt_token_ids: Sequence[int] | np.ndarray, max_tokens: int, *,
                    min_tokens: int = 0, priority: int = 0, arrival_time: float = 0.0,
                    eos_token_ids: Sequence[int] = (), stop_token_ids: Sequence[int] = (),
                    ignore_eos: bool = False, parent_id: int = -1) -> None:
        """Queues a request. ``parent_id`` (n > 1) names sample 0 of the same prompt, whose full
        prompt blocks the request shares. Raises RequestRejectedError if it can never run."""
        self._core.add_request(*self._request_args(
            req_id, prompt_token_ids, max_tokens, min_tokens, priority, arrival_time, eos_token_ids,
            stop_token_ids, ignore_eos, parent_id))

    @staticmethod
    def _request_args(req_id, prompt_token_ids, max_tokens, min_tokens, priority, arrival_time, eos_token_ids,
                      stop_token_ids, ignore_eos, parent_id) -> tuple:
        """Validates the fields of a request at the API edge (RequestRejectedError names the field)."""
        return (_checked_int("req_id", req_id, -_INT64_MAX - 1, _INT64_MAX),
                _token_array("prompt_token_ids", prompt_token_ids),
                _checked_int("max_tokens", max_tokens, -_INT32_MAX - 1, _INT32_MAX),
                _checked_int("min_tokens", min_tokens, -_INT32_MAX - 1, _INT32_MAX),
                _checked_int("priority", priority, -_INT32_MAX - 1, _INT32_MAX), float(arrival_time),
                _token_array("eos_token_ids", eos_token_ids), _token_array("stop_token_ids", stop_token_ids),
                bool(ignore_eos), _checked_int("parent_id", parent_id, -_INT64_MAX - 1, _INT64_MAX))

    def abort(self, req_id: int) -> bool:
        """Aborts a request in any state (its id comes back in finished_ids); False if not live."""
        return self._core.abort(int(req_id))

    def finish(self, req_id: int, reason: FinishReason | int) -> bool:
        """Finishes a live request now (e.g. STOP_STRING found by the detokenizer); False if not live."""
        return self._core.finish(int(req_id), int(reason))

    # ------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        """Plans one step (GIL released) and advances num_computed_tokens of each scheduled request."""
        return SchedulerOutput(*self._core.schedule())

    def update(self, req_ids: np.ndarray, sampled_token_ids: np.ndarray) -> UpdateResult:
        """Appends one sampled token per sampling request of the last schedule(), in batch order,
        and finishes requests (EOS, stop token, max_tokens, max_model_len, PREFILL_DONE). A live
        sampling request left out is rolled back (its chunk is computed again next step)."""
        finished_ids, finish_reasons = self._core.update(req_ids, sampled_token_ids)
        return UpdateResult(finished_ids, finish_reasons)

    # ------------------------------------------------------------------ PD hand-over
    def release(self, req_id: int) -> None:
        """Prefill role: frees the pinned blocks of a PREFILL_DONE request once its KV is sent."""
        self._core.release(int(req_id))

    def add_prefilled(self, req_id: int, prompt_token_ids: Sequence[int] | np.ndarray,
                      output_token_ids: Sequence[int] | np.ndarray, max_tokens: int, *, min_tokens: int = 0,
                      priority: int = 0, arrival_time: float = 0.0, eos_token_ids: Sequence[int] = (),
                      stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                      parent_id: int = -1) -> np.ndarray:
        """Decode role: admits a request prefilled elsewhere (``output_token_ids`` holds at least the
        first sampled token) and returns the int32 block ids its KV must be written to. Raises
        NoFreeBlocksError (a RequestRejectedError) when the blocks are not free now."""
        args = self._request_args(req_id, prompt_token_ids, max_tokens, min_tokens, priority, arrival_time,
                                  eos_token_ids, stop_token_ids, ignore_eos, parent_id)
        return self._core.add_prefilled(*args[:2], _token_array("output_token_ids", output_token_ids), *args[2:])

    def kv_ready(self, req_id: int) -> None:
        """Decode role: the KV of an add_prefilled request has arrived; it joins at decode."""
        self._core.kv_ready(int(req_id))

    # ------------------------------------------------------------------ queries
    def get_block_ids(self, req_id: int) -> np.ndarray:
        """The int32 block table of a live request."""
        return self._core.get_block_ids(int(req_id))

    def get_num_computed_tokens(self, req_id: int) -> int:
        """Tokens of a live request whose KV is (being) computed."""
        return self._core.get_num_computed_tokens(int(req_id))

    def has_unfinished(self) -> bool:
        """True while any request waits, runs or awaits its KV."""
        return self._core.has_unfinished()

    @property
    def num_waiting(self) -> int:
        """Requests in the waiting queue."""
        return self._core.num_waiting

    @property
    def num_running(self) -> int:
        """Requests in the running set."""
        return self._core.num_running

    def stats(self) -> dict[str, Any]:
        """Block and queue statistics: num_blocks, num_free_blocks, num_cached_blocks,
        prefix_cache_queries, prefix_cache_hits (tokens), prefix_cache_hit_rate, num_preemptions,
        num_waiting, num_running."""
        return self._core.stats()

    # ------------------------------------------------------------------ test hooks
    def set_hash_mask_for_testing(self, mask: int) -> None:
        """Test hook: prefix-cache table keys become ``hash & mask`` (0 forces every collision)."""
        self._core.set_hash_mask_for_testing(int(mask))

    def free_list_for_testing(self) -> list[int]:
        """Test hook: the free-block list, next to be allocated (least recently used) first."""
        return self._core.free_list_for_testing()
