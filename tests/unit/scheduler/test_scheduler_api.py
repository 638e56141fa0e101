# SPDX-License-Identifier: Apache-2.0
"""The Python facade of the C++ scheduler: contract types, errors at the API edge, finishing rules,
abort/finish in every state, PD roles, n > 1 sharing and the policies. Expected values are worked
out by hand in each test from the rules of docs/architecture.md (the oracle)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from mindie_llm.scheduler import (
    FinishReason,
    NoFreeBlocksError,
    RequestRejectedError,
    Scheduler,
    SchedulerConfigError,
    SchedulerContractError,
    SchedulerCoreConfig,
    SchedulerError,
    SchedulerOutput,
    UnknownRequestError,
    UpdateResult,
)
from mindie_llm.scheduler.outputs import SCHEDULE_FIELDS


def make(**kw) -> Scheduler:
    cfg = dict(num_blocks=33, block_size=4, max_num_batched_tokens=16, max_num_seqs=4, max_model_len=64)
    cfg.update(kw)
    return Scheduler(SchedulerCoreConfig(**cfg))


def step(s: Scheduler, token: int = 5) -> tuple[SchedulerOutput, UpdateResult]:
    out = s.schedule()
    ids = out.req_ids[out.sample_mask]
    return out, s.update(ids, np.full(len(ids), token, np.int32))


def test_output_types_and_dtypes():
    s = make()
    s.add_request(7, [1, 2, 3, 4, 5], 2)
    out, res = step(s)
    assert out.req_ids.dtype == np.int64 and out.preempted_ids.dtype == np.int64
    assert out.finished_ids.dtype == np.int64
    for name in ("num_scheduled_tokens", "num_computed_tokens", "input_token_ids", "new_block_offsets",
                 "new_block_ids", "finish_reasons"):
        assert getattr(out, name).dtype == np.int32, name
    assert out.sample_mask.dtype == np.bool_ and out.block_table_reset.dtype == np.bool_
    assert out.req_ids.tolist() == [7] and out.input_token_ids.tolist() == [1, 2, 3, 4, 5]
    assert out.new_block_offsets.tolist() == [0, 2] and out.num_batched_tokens == 5
    assert not out.req_ids.flags.writeable
    assert res.finished_ids.dtype == np.int64 and res.finish_reasons.dtype == np.int32


def test_output_arrays_stay_valid_after_later_steps():
    s = make()
    s.add_request(1, list(range(1, 12)), 4)
    first, _ = step(s)
    for _ in range(3):
        step(s)
    assert first.input_token_ids.tolist() == list(range(1, 12))


def test_kept_outputs_survive_buffer_reuse():
    # The core refills output buffers nobody holds: every plan still referenced must keep its values
    # however many steps (more than the buffers kept) run after it, and dropped ones do not leak values.
    s = make(num_blocks=64, max_num_batched_tokens=8)
    for rid in range(1, 5):
        s.add_request(rid, list(range(rid, rid + 9)), 6)
    kept = []
    for i in range(10):
        out, _ = step(s, token=10 + i)
        if i % 2 == 0:
            kept.append((out, {f: np.array(getattr(out, f)) for f in SCHEDULE_FIELDS if f != "num_batched_tokens"}))
    for out, copy in kept:
        for f, v in copy.items():
            assert np.array_equal(getattr(out, f), v), f


def test_update_accepts_lists_other_dtypes_and_strided_arrays_alike():
    # Oracle: the same steps with exact contiguous int64 / int32 arrays in a twin scheduler.
    def run(convert):
        s = make(num_blocks=64)
        for rid in (1, 2, 3):
            s.add_request(rid, [rid, 4, 5], 3, stop_token_ids=[9])
        log = []
        for step_no in range(4):
            out = s.schedule()
            ids = out.req_ids[out.sample_mask]
            toks = np.arange(len(ids), dtype=np.int32) + 5 + step_no
            res = s.update(*convert(ids, np.arange(len(ids) + 1, dtype=np.int32), toks))
            log.append((res.finished_ids.tolist(), res.finish_reasons.tolist(), res.num_appended.tolist()))
        return log

    exact = run(lambda i, o, t: (i, o, t))
    assert exact == run(lambda i, o, t: (i.tolist(), o.tolist(), t.tolist()))
    assert exact == run(lambda i, o, t: (i.astype(np.int32), o.astype(np.int64), t.astype(np.int64)))
    assert exact == run(lambda i, o, t: (np.repeat(i, 2)[::2], np.repeat(o, 2)[::2], np.repeat(t, 2)[::2]))

    def unaligned(a):
        raw = np.zeros(a.nbytes + 1, np.uint8)
        u = np.ndarray(a.shape, a.dtype, raw.data, offset=1)
        u[...] = a
        assert not u.flags.aligned or a.size == 0
        return u

    assert exact == run(lambda i, o, t: (unaligned(i), unaligned(o), unaligned(t)))


def test_shared_step_arrays_are_read_only_and_right():
    s = make()
    s.add_request(1, [1, 2, 3], 4)
    s.add_request(2, [4, 5, 6], 4)
    out, res = step(s)
    assert out.spec_offsets.tolist() == [0, 0, 0] and out.spec_token_ids.size == 0
    assert out.preempted_ids.size == 0 and out.finished_ids.size == 0
    assert res.num_appended.tolist() == [1, 1] and res.finished_ids.size == 0
    assert res.num_appended.dtype == np.int32 and res.finish_reasons.dtype == np.int32
    for arr in (out.spec_offsets, out.spec_token_ids, out.preempted_ids, out.finished_ids, out.grammar_req_ids,
                res.num_appended, res.finished_ids):
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[...] = 0


def test_exception_hierarchy():
    assert issubclass(RequestRejectedError, ValueError) and issubclass(RequestRejectedError, SchedulerError)
    assert issubclass(UnknownRequestError, KeyError) and issubclass(UnknownRequestError, SchedulerError)
    assert issubclass(NoFreeBlocksError, RequestRejectedError)
    assert issubclass(SchedulerError, RuntimeError)
    assert issubclass(SchedulerConfigError, ValueError)


@pytest.mark.parametrize("field,value", [("num_blocks", 1), ("block_size", 0), ("max_num_seqs", 0),
                                         ("max_num_batched_tokens", -1), ("max_model_len", 0),
                                         ("policy", "lifo"), ("role", "both"), ("num_blocks", 2.5)])
def test_config_errors_name_the_field(field, value):
    cfg = dict(num_blocks=8, block_size=4, max_num_batched_tokens=8, max_num_seqs=2, max_model_len=16)
    cfg[field] = value
    with pytest.raises(SchedulerConfigError, match=field):
        SchedulerCoreConfig(**cfg)


@pytest.mark.parametrize("prompt,max_tokens,kw,match", [
    ([], 4, {}, "empty"),
    ([1] * 60, 5, {}, "max_model_len"),
    ([1, 2], 0, {}, "max_tokens"),
    ([1, 2], 2, {"min_tokens": 3}, "min_tokens"),
    ([1, -2], 2, {}, "prompt_token_ids"),
    ([1, 2], 2, {"arrival_time": float("nan")}, "arrival_time"),
    (np.array([1.5, 2.0]), 2, {}, "prompt_token_ids"),
    ([1, 2], 2**40, {}, "max_tokens"),
    ([1, 2], 2, {"priority": 2**40}, "priority"),
    ([1, 2], 2, {"parent_id": 2**70}, "parent_id"),
    ([1, 2], 2.5, {}, "max_tokens"),
    ([1, 2**40], 2, {}, "prompt_token_ids"),
])
def test_add_request_rejections(prompt, max_tokens, kw, match):
    s = make()
    with pytest.raises(RequestRejectedError, match=match):
        s.add_request(1, prompt, max_tokens, **kw)
    assert not s.has_unfinished()


def test_rejects_duplicate_ids_and_requests_beyond_the_pool():
    s = make(num_blocks=5, max_model_len=100)  # 4 usable blocks of 4 tokens
    s.add_request(1, [1, 2], 2)
    with pytest.raises(RequestRejectedError, match="already live"):
        s.add_request(1, [3], 1)
    with pytest.raises(RequestRejectedError, match="blocks"):
        s.add_request(2, [1] * 14, 3)  # 17 tokens > 16 slots
    s.add_request(3, [1] * 13, 3)       # exactly 16: fits


def test_rejects_prompt_over_budget_without_chunking():
    s = make(enable_chunked_prefill=False, max_num_batched_tokens=8)
    with pytest.raises(RequestRejectedError, match="max_num_batched_tokens"):
        s.add_request(1, [1] * 9, 2)
    s.add_request(2, [1] * 8, 2)


def test_step_contract_violations():
    s = make()
    with pytest.raises(SchedulerContractError, match="update"):
        s.update(np.zeros(0, np.int64), np.zeros(0, np.int32))
    s.add_request(1, [1, 2, 3], 3)
    s.schedule()
    with pytest.raises(SchedulerContractError, match="schedule"):
        s.schedule()
    with pytest.raises(SchedulerContractError, match="did not sample"):
        s.update(np.array([9], np.int64), np.array([1], np.int32))
    with pytest.raises(SchedulerContractError):
        s.update(np.array([1, 1], np.int64), np.array([1], np.int32))
    s.update(np.array([1], np.int64), np.array([4], np.int32))
    with pytest.raises(UnknownRequestError):
        s.get_block_ids(99)
    with pytest.raises(UnknownRequestError):
        s.release(99)
    assert s.abort(99) is False


@pytest.mark.parametrize("kw,tokens,reason,num_out", [
    (dict(eos_token_ids=[9]), [5, 9], FinishReason.EOS, 2),
    (dict(eos_token_ids=[9], min_tokens=3), [9, 9, 9], FinishReason.EOS, 3),
    (dict(eos_token_ids=[9], ignore_eos=True), [9, 9, 9, 9], FinishReason.LENGTH, 4),
    (dict(stop_token_ids=[8]), [5, 5, 8], FinishReason.STOP_TOKEN, 3),
    (dict(stop_token_ids=[8], ignore_eos=True), [8], FinishReason.STOP_TOKEN, 1),
    (dict(), [5, 5, 5, 5], FinishReason.LENGTH, 4),
])
def test_finish_rules(kw, tokens, reason, num_out):
    s = make()
    s.add_request(1, [1, 2, 3], 4, **kw)
    for i, tok in enumerate(tokens):
        _, res = step(s, tok)
        if i < len(tokens) - 1:
            assert res.finished_ids.tolist() == []
    assert res.finished_ids.tolist() == [1] and res.finish_reasons.tolist() == [reason]
    assert len(tokens) == num_out
    out, _ = step(s)
    assert out.finished_ids.tolist() == [1] and out.finish_reasons.tolist() == [reason]
    assert s.stats()["num_free_blocks"] == 32


def _free(s):
    return s.stats()["num_free_blocks"]


def test_abort_in_every_state():
    s = make(max_num_batched_tokens=8, max_num_seqs=2)
    s.add_request(1, list(range(1, 20)), 4)   # running, mid-prefill after one step
    s.add_request(2, [1, 2], 4)               # waiting (budget spent by request 1)
    out, _ = step(s)
    assert out.req_ids.tolist() == [1] and not out.sample_mask[0]
    assert s.abort(2) and s.abort(1)          # waiting, then running mid-prefill
    assert not s.abort(1)
    out, _ = step(s)
    assert sorted(out.finished_ids.tolist()) == [1, 2] and set(out.finish_reasons.tolist()) == {6}
    assert _free(s) == 32
    s.add_request(3, [1, 2, 3], 5)
    step(s)                                   # prefill done: decoding
    out = s.schedule()                        # between schedule() and update()
    assert out.req_ids.tolist() == [3]
    assert s.abort(3)
    res = s.update(np.array([3], np.int64), np.array([5], np.int32))  # the late token is dropped
    assert res.finished_ids.tolist() == []
    out, _ = step(s)
    assert out.finished_ids.tolist() == [3] and _free(s) == 32 and not s.has_unfinished()


def test_finish_with_stop_string_reason():
    s = make()
    s.add_request(1, [1, 2, 3], 8)
    step(s)
    assert s.finish(1, FinishReason.STOP_STRING) is True
    assert s.finish(1, FinishReason.STOP_STRING) is False
    out, _ = step(s)
    assert out.finished_ids.tolist() == [1] and out.finish_reasons.tolist() == [3]
    with pytest.raises(SchedulerContractError, match="reason"):
        s.finish(1, FinishReason.NONE)


def test_left_out_sample_is_rolled_back_and_recomputed():
    s = make()
    s.add_request(1, [1, 2, 3, 4, 5, 6], 3)
    out = s.schedule()
    assert out.sample_mask.tolist() == [True]
    s.update(np.zeros(0, np.int64), np.zeros(0, np.int32))  # the forward failed
    assert s.get_num_computed_tokens(1) == 0
    assert s.stats()["num_cached_blocks"] == 0  # nothing of the failed step reached the cache
    out, _ = step(s)
    assert out.num_computed_tokens.tolist() == [0] and out.num_scheduled_tokens.tolist() == [6]
    assert not out.block_table_reset[0] and out.new_block_ids.tolist() == []  # same blocks kept
    assert s.stats()["num_cached_blocks"] == 1  # the step ran: its full block is cached


def test_failed_step_rolls_back_every_row_and_partial_update_is_refused():
    s = make(max_num_batched_tokens=8)
    s.add_request(1, [1, 2, 3], 4)
    s.add_request(2, [4, 5], 4)
    s.add_request(3, list(range(1, 21)), 4)
    out = s.schedule()
    assert out.req_ids.tolist() == [1, 2, 3] and out.sample_mask.tolist() == [True, True, False]
    with pytest.raises(SchedulerContractError, match="empty update"):
        s.update(np.array([1], np.int64), np.array([3], np.int32))   # request 2's token is missing
    s.update(np.zeros(0, np.int64), np.zeros(0, np.int32))            # the forward failed
    assert [s.get_num_computed_tokens(i) for i in (1, 2, 3)] == [0, 0, 0]  # every row rolled back
    out, _ = step(s)
    assert out.num_computed_tokens.tolist() == [0, 0, 0] and out.num_scheduled_tokens.tolist() == [3, 2, 3]


def test_chunked_prefill_then_decode_fused_with_other_prefill():
    s = make(max_num_batched_tokens=6)
    s.add_request(1, list(range(1, 11)), 3)   # 10 tokens: chunks 6 + 4
    s.add_request(2, list(range(20, 29)), 3)  # 9 tokens
    out, _ = step(s)
    assert out.req_ids.tolist() == [1] and out.num_scheduled_tokens.tolist() == [6]
    out, _ = step(s)   # rest of 1 (4 tokens, samples) + first 2 tokens of 2
    assert out.req_ids.tolist() == [1, 2] and out.num_scheduled_tokens.tolist() == [4, 2]
    assert out.sample_mask.tolist() == [True, False] and out.num_computed_tokens.tolist() == [6, 0]
    out, _ = step(s)   # decode of 1 first, then 5 more tokens of 2
    assert out.req_ids.tolist() == [1, 2] and out.num_scheduled_tokens.tolist() == [1, 5]
    assert out.input_token_ids.tolist() == [5, 22, 23, 24, 25, 26]


def test_full_prefix_hit_still_computes_the_last_token():
    s = make()
    prompt = list(range(1, 9))  # exactly two blocks
    s.add_request(1, prompt, 1)
    step(s)
    step(s)  # request 1 done; its blocks are cached
    s.add_request(2, prompt, 2)
    out, _ = step(s)
    # One block hit (not two): at least the last prompt token is computed.
    assert out.num_computed_tokens.tolist() == [4] and out.num_scheduled_tokens.tolist() == [4]
    assert s.stats()["prefix_cache_hits"] == 4


def test_n_gt_1_children_share_the_parent_prompt_blocks():
    s = make(enable_prefix_caching=False)
    prompt = list(range(1, 11))  # 10 tokens: blocks [0:4], [4:8] full, tail of 2
    s.add_request(1, prompt, 4)
    s.add_request(2, prompt, 4, parent_id=1)
    s.add_request(3, prompt, 4, parent_id=1)
    out, _ = step(s)
    assert out.req_ids.tolist() == [1]  # children wait for the parent's prompt
    out, _ = step(s)
    assert out.req_ids.tolist() == [1, 2, 3]
    assert out.num_computed_tokens.tolist() == [10, 8, 8] and out.num_scheduled_tokens.tolist() == [1, 2, 2]
    parent, c2, c3 = (s.get_block_ids(i).tolist() for i in (1, 2, 3))
    assert c2[:2] == parent[:2] == c3[:2] and c2[2] != parent[2] != c3[2]
    assert _free(s) == 32 - 3 - 2


def test_preemption_by_recompute_and_resume():
    s = make(num_blocks=5, max_num_batched_tokens=16, max_model_len=16, enable_prefix_caching=False)
    s.add_request(1, [1, 2, 3, 4, 5, 6, 7], 5)   # 2 blocks, needs a 3rd for position 8
    s.add_request(2, [8, 9, 10, 11, 12, 13], 5)  # 2 blocks
    out, _ = step(s)
    assert out.req_ids.tolist() == [1, 2] and _free(s) == 0
    step(s)           # 1 computes position 7, 2 computes position 6
    out, _ = step(s)  # 1 needs a block for position 8: the later arrival (2) is preempted
    assert out.preempted_ids.tolist() == [2] and out.req_ids.tolist() == [1]
    assert s.stats()["num_preemptions"] == 1 and s.num_waiting == 1
    rows = []
    for _ in range(12):
        out, _ = step(s)
        rows += [(bool(b), int(c), int(n)) for r, b, c, n in zip(
            out.req_ids.tolist(), out.block_table_reset.tolist(), out.num_computed_tokens.tolist(),
            out.num_scheduled_tokens.tolist()) if r == 2]
    # Resumed with a fresh table, recomputing its 6 prompt tokens and the 2 it had sampled.
    assert rows[0] == (True, 0, 8) and not s.has_unfinished()


def test_priority_preempts_at_max_num_seqs():
    s = make(policy="priority", max_num_seqs=2)
    s.add_request(1, [1, 2, 3], 8, priority=1, arrival_time=0.0)
    s.add_request(2, [4, 5, 6], 8, priority=2, arrival_time=1.0)
    step(s)
    s.add_request(3, [7, 8, 9], 8, priority=0, arrival_time=2.0)
    out, _ = step(s)
    assert out.preempted_ids.tolist() == [2]
    assert out.req_ids.tolist() == [1, 3] and s.num_running == 2 and s.num_waiting == 1


def test_fcfs_ignores_priority():
    s = make(max_num_seqs=1)
    s.add_request(1, [1, 2], 2, priority=5, arrival_time=0.0)
    s.add_request(2, [1, 2], 2, priority=0, arrival_time=1.0)
    out, _ = step(s)
    assert out.req_ids.tolist() == [1] and out.preempted_ids.tolist() == []


def test_static_policy_waits_for_the_whole_batch():
    s = make(policy="static", max_num_seqs=4)
    s.add_request(1, [1, 2], 1)
    s.add_request(2, [3, 4], 3)
    step(s)
    s.add_request(3, [5, 6], 1)
    seen = [step(s)[0].req_ids.tolist() for _ in range(4)]
    assert seen[0] == [2] and seen[1] == [2] and seen[2] == [3]


def test_prefill_first_runs_whole_prompts_before_decodes():
    s = make(policy="prefill_first", max_num_batched_tokens=8)
    s.add_request(1, [1, 2, 3], 4)
    step(s)
    s.add_request(2, [4, 5, 6, 7, 8], 4)
    out, _ = step(s)
    assert out.req_ids.tolist() == [2] and out.num_scheduled_tokens.tolist() == [5]  # no decode of 1
    out, _ = step(s)
    assert out.req_ids.tolist() == [1, 2]


def test_prefill_role_pins_blocks_until_release():
    s = make(role="prefill")
    s.add_request(1, list(range(1, 10)), 8)
    out, res = step(s)
    assert res.finished_ids.tolist() == [1] and res.finish_reasons.tolist() == [FinishReason.PREFILL_DONE]
    assert len(s.get_block_ids(1)) == 3 and _free(s) == 32 - 3 and not s.has_unfinished()
    out, _ = step(s)
    assert out.finished_ids.tolist() == [1] and out.req_ids.tolist() == []
    s.add_request(2, [1], 2)
    with pytest.raises(SchedulerContractError, match="PREFILL_DONE"):
        s.release(2)  # still waiting
    s.release(1)
    assert _free(s) == 32
    with pytest.raises(UnknownRequestError):
        s.release(1)


def test_prefill_role_abort_after_prefill_done_frees_the_pinned_blocks():
    s = make(role="prefill")
    s.add_request(1, [1, 2, 3, 4, 5], 8)
    step(s)
    assert _free(s) == 30 and s.abort(1) and _free(s) == 32


def test_decode_role_joins_at_decode_after_kv_ready():
    s = make(role="decode")
    blocks = s.add_prefilled(1, list(range(1, 10)), [42], 5)   # 9 prompt tokens + 1 sampled
    assert blocks.dtype == np.int32 and len(blocks) == 3        # KV of 9 positions
    out, _ = step(s)
    assert out.req_ids.tolist() == [] and s.has_unfinished()    # waits for its KV
    s.kv_ready(1)
    out, _ = step(s)
    assert out.req_ids.tolist() == [1] and out.num_computed_tokens.tolist() == [9]
    assert out.input_token_ids.tolist() == [42] and out.block_table_reset.tolist() == [True]
    assert out.new_block_ids.tolist() == blocks.tolist() and out.sample_mask.tolist() == [True]
    with pytest.raises(SchedulerContractError, match="kv_ready"):
        s.kv_ready(1)


def test_decode_role_out_of_blocks_and_abort_while_awaiting_kv():
    s = make(role="decode", num_blocks=9, max_model_len=64)   # 8 usable blocks
    s.add_prefilled(1, [1] * 20, [3], 8)                      # 20 positions: 5 blocks
    with pytest.raises(NoFreeBlocksError, match="blocks"):
        s.add_prefilled(2, [1] * 20, [3], 8)
    assert s.abort(1) and _free(s) == 8 and not s.has_unfinished()
    out, _ = step(s)
    assert out.finished_ids.tolist() == [1]


def test_add_prefilled_needs_decode_role():
    with pytest.raises(SchedulerContractError, match="decode"):
        make().add_prefilled(1, [1, 2], [3], 4)


def test_schedule_releases_the_gil_and_is_thread_safe():
    s = make(num_blocks=400, max_num_seqs=64, max_num_batched_tokens=512, max_model_len=128)
    stop = threading.Event()
    errors = []

    def churn():
        rid = 1000
        while not stop.is_set():
            try:
                s.add_request(rid, [1, 2, 3, 4, 5], 3)
                s.abort(rid - 3)
            except Exception as e:  # noqa: BLE001 - collected and re-raised below
                errors.append(e)
            rid += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(300):
            step(s)
    finally:
        stop.set()
        t.join()
    assert not errors


def test_check_request_has_the_admission_rules_and_no_side_effect():
    """check_request refuses exactly what add_request would (oracle: add_request itself) and
    leaves nothing behind."""
    s = make()
    cases = [([1, 2, 3], 4), ([], 4), ([1, -2], 4), ([1] * 60, 10), ([1, 2], 0)]
    for prompt, max_tokens in cases:
        try:
            s.check_request(prompt, max_tokens)
            checked = None
        except RequestRejectedError as e:
            checked = str(e)
        assert s.stats()["num_waiting"] == 0 and not s.has_unfinished()
        try:
            s.add_request(99, prompt, max_tokens)
            added = None
            s.abort(99)
            s.schedule()
            s.update(np.zeros(0, np.int64), np.zeros(0, np.int32))
        except RequestRejectedError as e:
            added = str(e)
        assert (checked is None) == (added is None), (prompt, max_tokens, checked, added)
