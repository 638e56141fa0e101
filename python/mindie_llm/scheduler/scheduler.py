# SPDX-License-Identifier: Apache-2.0
"""Thin Python facade over the C++ scheduler extension ``mindie_llm._scheduler``.

Owns argument conversion (ids and numpy arrays only) and the Python-side types of the scheduler
API. Request state lives in C++; nothing here loops over requests. The rules (config fields, request
fields, the step contract) live in C++ only: this module converts types (ints beyond int32/int64,
non-int values, policy and role names) with errors naming the field, nothing more. Must not import
torch, the engine, the executor or the server.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mindie_llm import _scheduler
from mindie_llm.contract import NewRequests
from mindie_llm.scheduler.outputs import FinishReason, SchedulerOutput, UpdateResult

SchedulerError = _scheduler.SchedulerError                    # base, a RuntimeError
RequestRejectedError = _scheduler.RequestRejectedError        # ValueError: refused at admission; .field
                                                              # names the request field (None: none)
NoFreeBlocksError = _scheduler.NoFreeBlocksError              # add_prefilled: no room now, retry
UnknownRequestError = _scheduler.UnknownRequestError          # KeyError and ValueError
SchedulerContractError = _scheduler.SchedulerContractError    # ValueError: step contract broken
SchedulerConfigError = _scheduler.SchedulerConfigError        # ValueError: bad config field

POLICIES = tuple(name.lower() for name in _scheduler.Policy.__members__)   # fcfs priority static prefill_first
ROLES = tuple(name.lower() for name in _scheduler.Role.__members__)        # colocated prefill decode
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
_INT_FIELDS = ("num_blocks", "block_size", "max_num_batched_tokens", "max_num_seqs", "max_model_len",
               "num_lookahead_slots")


@dataclass(frozen=True, slots=True)
class SchedulerCoreConfig:
    """Configuration of the scheduler core. Construction builds the C++ ``SchedulerConfig`` and
    validates it there (SchedulerConfigError names the field); this class only converts types."""

    num_blocks: int                     # including the null block 0
    block_size: int
    max_num_batched_tokens: int         # token budget of one step
    max_num_seqs: int                   # running requests at most
    max_model_len: int                  # prompt + output tokens at most
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"                # fcfs | priority | static | prefill_first
    role: str = "colocated"             # colocated | prefill | decode
    num_lookahead_slots: int = 0        # 1: a decode's next block one step early (async scheduling)

    def __post_init__(self) -> None:
        self.to_core().validate()

    def to_core(self) -> _scheduler.SchedulerConfig:
        """The C++ struct of this config (types converted; the rules are checked by its validate())."""
        core = _scheduler.SchedulerConfig()
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
                    not -_INT32_MAX - 1 <= value <= _INT32_MAX:
                raise SchedulerConfigError(f"{name} must be an int32, got {value!r}")
            setattr(core, name, int(value))
        core.enable_prefix_caching = bool(self.enable_prefix_caching)
        core.enable_chunked_prefill = bool(self.enable_chunked_prefill)
        if self.policy not in POLICIES:
            raise SchedulerConfigError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.role not in ROLES:
            raise SchedulerConfigError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        core.policy = _scheduler.Policy.__members__[self.policy.upper()]
        core.role = _scheduler.Role.__members__[self.role.upper()]
        return core


def _read_only(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


def _rejected(field: str, message: str) -> RequestRejectedError:
    exc = RequestRejectedError(f"{field} {message}")
    exc.field = field
    return exc


def _checked_int(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise _rejected(name, f"must be an int in [{low}, {high}], got {value!r}")
    return int(value)


def _int32_array(name: str, values, error=_rejected) -> np.ndarray:
    """``values`` as a 1-D int32 array; ``error(name, message)`` for non-ints and values beyond int32
    (the C++ core checks what the values mean, e.g. that token ids are not negative)."""
    if type(values) is np.ndarray and values.dtype == np.int32 and values.ndim == 1:
        return values   # the common case of the step path: nothing to convert
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, np.int32)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise error(name, f"must be a 1-D sequence of ints, got dtype {arr.dtype} ndim {arr.ndim}")
    if arr.dtype != np.int32:
        if int(arr.min()) < -_INT32_MAX - 1 or int(arr.max()) > _INT32_MAX:
            raise error(name, "has a value outside int32")
        arr = arr.astype(np.int32)
    return arr


def _token_array(name: str, values: Sequence[int] | np.ndarray) -> np.ndarray:
    return _int32_array(name, values)


def _contract_error(name: str, message: str) -> SchedulerContractError:
    return SchedulerContractError(f"update(): {name} {message}")


def _step_array(name: str, values) -> np.ndarray | None:
    return None if values is None else np.require(_int32_array(name, values, _contract_error), requirements="CA")


def _update_arrays(req_ids, token_offsets, token_ids, draft_offsets, draft_token_ids) -> tuple:
    """update()'s arguments as 1-D aligned contiguous int64 / int32 arrays (SchedulerContractError names
    the field of a non-int or out-of-range one)."""
    ids = np.asarray(req_ids)
    if ids.dtype != np.int64:
        if ids.size and ids.dtype.kind not in "iu":
            raise SchedulerContractError(f"req_ids must be ints, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
    if ids.ndim != 1 or token_ids is None:
        raise SchedulerContractError("update(): req_ids must be 1-D and token_ids given")
    return (np.require(ids, requirements="CA"), _step_array("token_offsets", token_offsets),
            _step_array("token_ids", token_ids), _step_array("draft_offsets", draft_offsets),
            _step_array("draft_token_ids", draft_token_ids))


class Scheduler:
    """Continuous-batching scheduler (C++): SplitFuse chunked prefill, prefix caching, preemption
    by recompute, fcfs / priority / static / prefill_first policies, and the PD roles.

    One engine step is ``out = schedule()``, run the model on ``out``, then
    ``update(req_ids, token_offsets, token_ids, draft_offsets, draft_token_ids)`` (always exactly
    once after every schedule())."""

    def __init__(self, config: SchedulerCoreConfig) -> None:
        """Creates the block pool and empty queues for ``config``."""
        self.config = config
        self._core = _scheduler.SchedulerCore(config.to_core())
        # The plan's fields after the core's: no new requests (the engine sets them each step) and
        # no grammar rows, as shared read-only empties instead of ~20 fresh arrays per step.
        self._no_new_requests = NewRequests()
        self._plan_tail = (self._no_new_requests, _read_only(np.zeros(0, np.int64)), _read_only(np.zeros(0, np.int32)))

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

    def check_request(self, prompt_token_ids: Sequence[int] | np.ndarray, max_tokens: int, *, min_tokens: int = 0,
                      priority: int = 0, arrival_time: float = 0.0, eos_token_ids: Sequence[int] = (),
                      stop_token_ids: Sequence[int] = (), ignore_eos: bool = False, parent_id: int = -1) -> None:
        """The checks of add_request on the request's fields (all but the id), with no side effect:
        raises RequestRejectedError (``.field`` names the field) exactly when add_request would."""
        self._core.check_request(*self._request_args(
            0, prompt_token_ids, max_tokens, min_tokens, priority, arrival_time, eos_token_ids,
            stop_token_ids, ignore_eos, parent_id)[1:])

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
        return SchedulerOutput(*self._core.schedule(), *self._plan_tail)   # SCHEDULE_FIELDS order

    def update(self, req_ids: np.ndarray, token_offsets: np.ndarray | None = None, token_ids: np.ndarray | None = None,
               draft_offsets: np.ndarray | None = None, draft_token_ids: np.ndarray | None = None) -> UpdateResult:
        """Takes the step's result: S sampling rows of the last schedule() in batch order
        (``req_ids`` int64[S]) with 1..k+1 tokens each (``token_offsets`` int32[S+1], ``token_ids``;
        k = the row's proposed tokens), and optional proposals for the next step (``draft_offsets``
        int32[S+1], ``draft_token_ids``). Appends the tokens one at a time with the stop checks (EOS,
        stop token, min_tokens, max_tokens, max_model_len, PREFILL_DONE) and stops at the first that
        finishes; rolls back rejected proposals (num_computed_tokens, lookahead blocks). The
        two-argument form ``update(req_ids, sampled_token_ids)`` means one token per row. A live
        sampling request left out is allowed only in an empty update(): the step is rolled back."""
        if token_ids is None:   # update(req_ids, sampled_token_ids): one token each (also token_ids=x alone)
            token_offsets, token_ids = None, token_offsets
        # The step path hands exact 1-D int64 / int32 arrays straight to the core; it answers None
        # (changing nothing) when some argument is anything else, which is converted here first.
        r = self._core.update(req_ids, token_offsets, token_ids, draft_offsets, draft_token_ids)
        if r is None:
            r = self._core.update(*_update_arrays(req_ids, token_offsets, token_ids, draft_offsets, draft_token_ids))
            if r is None:
                raise SchedulerContractError("update(): arrays must be 1-D")
        return UpdateResult(*r)

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
