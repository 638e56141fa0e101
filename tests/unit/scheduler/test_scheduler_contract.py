# SPDX-License-Identifier: Apache-2.0
"""The one-source-of-truth seams between the C++ core and the facade: FinishReason, Policy and Role
exported from C++ and the Python copies checked against them; the bound SchedulerConfig struct and
its C++ validation; request validation in C++ with errors naming the field; the CSR update() with
proposals through the facade. Expected values are worked out by hand from scheduler.h's rules."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mindie_llm import _scheduler
from mindie_llm.scheduler import (
    FinishReason,
    RequestRejectedError,
    Scheduler,
    SchedulerConfigError,
    SchedulerContractError,
    SchedulerCoreConfig,
)
from mindie_llm.scheduler.scheduler import POLICIES, ROLES


def make(**kw) -> Scheduler:
    cfg = dict(num_blocks=17, block_size=4, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64)
    cfg.update(kw)
    return Scheduler(SchedulerCoreConfig(**cfg))


def i64(*v):
    return np.asarray(v, np.int64)


def i32(*v):
    return np.asarray(v, np.int32)


# ------------------------------------------------------------------------------- enums

def test_finish_reason_agrees_with_the_cpp_export():
    cpp = {name: int(value) for name, value in _scheduler.FinishReason.__members__.items()}
    py = {m.name: int(m) for m in FinishReason}
    assert cpp == py
    assert cpp["PREFILL_DONE"] == 7 and cpp["NONE"] == 0


def test_schedule_tuple_order_is_the_positional_order_of_scheduler_output():
    import dataclasses

    from mindie_llm.scheduler.outputs import SCHEDULE_FIELDS, SchedulerOutput
    names = [f.name for f in dataclasses.fields(SchedulerOutput)]
    assert tuple(names[:len(SCHEDULE_FIELDS)]) == SCHEDULE_FIELDS and names[len(SCHEDULE_FIELDS)] == "new_requests"


def test_policy_and_role_names_come_from_the_cpp_enums():
    assert POLICIES == ("fcfs", "priority", "static", "prefill_first")
    assert ROLES == ("colocated", "prefill", "decode")


# ------------------------------------------------------------------------------- config struct

def test_config_struct_is_filled_field_by_field():
    core = SchedulerCoreConfig(num_blocks=9, block_size=2, max_num_batched_tokens=7, max_num_seqs=3,
                               max_model_len=11, enable_prefix_caching=False, enable_chunked_prefill=False,
                               policy="prefill_first", role="decode").to_core()
    assert (core.num_blocks, core.block_size, core.max_num_batched_tokens, core.max_num_seqs,
            core.max_model_len) == (9, 2, 7, 3, 11)
    assert core.enable_prefix_caching is False and core.enable_chunked_prefill is False
    assert core.policy == _scheduler.Policy.PREFILL_FIRST and core.role == _scheduler.Role.DECODE


@pytest.mark.parametrize("field,value", [("num_blocks", 1), ("block_size", 0), ("max_num_batched_tokens", 0),
                                         ("max_num_seqs", -3), ("max_model_len", 0)])
def test_cpp_validates_the_struct_and_names_the_field(field, value):
    core = _scheduler.SchedulerConfig()
    core.num_blocks, core.max_model_len = 8, 16
    core.validate()
    setattr(core, field, value)
    with pytest.raises(SchedulerConfigError, match=field):
        core.validate()
    with pytest.raises(SchedulerConfigError, match=field):
        _scheduler.SchedulerCore(core)


@pytest.mark.parametrize("field,value", [("num_blocks", 2**31), ("max_model_len", True), ("block_size", "4")])
def test_facade_converts_types_and_names_the_field(field, value):
    cfg = dict(num_blocks=8, block_size=4, max_num_batched_tokens=8, max_num_seqs=2, max_model_len=16)
    cfg[field] = value
    with pytest.raises(SchedulerConfigError, match=field):
        SchedulerCoreConfig(**cfg)


# ------------------------------------------------------------------------------- request validation

@pytest.mark.parametrize("prompt,max_tokens,kw,field", [
    ([1, 2], 4, dict(eos_token_ids=[-1]), "eos_token_ids"),
    ([1, 2], 4, dict(stop_token_ids=[3, -7]), "stop_token_ids"),
    ([1, 2], 4, dict(stop_token_ids=[2**33]), "stop_token_ids"),     # facade: beyond int32
    ([1, 2], 4, dict(eos_token_ids=[1.5]), "eos_token_ids"),         # facade: not ints
    ([1, 2], 4, dict(min_tokens=-1), "min_tokens"),
    ([1, 2], 4, dict(min_tokens=5), "min_tokens"),
    ([1, 2], 0, {}, "max_tokens"),
    ([], 4, {}, "prompt_token_ids"),
    ([3, -1], 4, {}, "prompt_token_ids"),
    ([1] * 60, 5, {}, "max_tokens"),            # 65 > max_model_len 64: max_tokens is at fault
    ([1] * 64, 1, {}, "prompt_token_ids"),      # the prompt alone fills max_model_len
    ([1, 2], 4, dict(arrival_time=float("inf")), "arrival_time"),
])
def test_request_fields_are_checked_in_cpp_and_named(prompt, max_tokens, kw, field):
    s = make()
    with pytest.raises(RequestRejectedError, match=field) as err:
        s.check_request(prompt, max_tokens, **kw)
    assert err.value.field == field
    with pytest.raises(RequestRejectedError, match=field) as err:
        s.add_request(1, prompt, max_tokens, **kw)
    assert err.value.field == field
    assert not s.has_unfinished()


def test_pool_and_budget_rejections_name_the_field():
    s = make(num_blocks=5, max_model_len=100, enable_chunked_prefill=False, max_num_batched_tokens=8)
    with pytest.raises(RequestRejectedError, match="KV blocks") as err:
        s.add_request(1, [1] * 8, 9)     # 17 tokens, 16 slots
    assert err.value.field == "max_tokens"
    with pytest.raises(RequestRejectedError, match="max_num_batched_tokens") as err:
        s.add_request(1, [1] * 9, 2)
    assert err.value.field == "prompt_token_ids"
    s.add_request(1, [1] * 8, 2)
    with pytest.raises(RequestRejectedError, match="already live") as err:
        s.add_request(1, [1], 1)
    assert err.value.field == "req_id"
    s.check_request([1], 1)  # the id is not checked (none is assigned yet)


@settings(max_examples=60, deadline=None)
@given(prompt=st.lists(st.integers(-2, 9), max_size=70), max_tokens=st.integers(-1, 70),
       min_tokens=st.integers(-1, 4), eos=st.lists(st.integers(-1, 9), max_size=2))
def test_check_request_agrees_with_add_request_and_changes_nothing(prompt, max_tokens, min_tokens, eos):
    s = make()
    kw = dict(min_tokens=min_tokens, eos_token_ids=eos)
    try:
        s.check_request(prompt, max_tokens, **kw)
        checked = None
    except RequestRejectedError as e:
        checked = e.field
    assert not s.has_unfinished()
    try:
        s.add_request(1, prompt, max_tokens, **kw)
        added = None
    except RequestRejectedError as e:
        added = e.field
    assert checked == added


# ------------------------------------------------------------------------------- CSR update()

def _start(s: Scheduler, drafts=(11, 12, 13, 14), **kw):
    """Request 1 (prompt 1..6, blocks 1 and 2) samples 10 and proposes ``drafts``."""
    s.add_request(1, list(range(1, 7)), 20, **kw)
    s.schedule()
    res = s.update(i64(1), i32(0, 1), i32(10), i32(0, len(drafts)), np.asarray(drafts, np.int32))
    assert res.num_appended.tolist() == [1] and res.num_appended.dtype == np.int32
    return s.schedule()


def test_proposals_are_scheduled_as_the_last_tokens_of_the_row():
    s = make()
    out = _start(s)
    assert out.num_scheduled_tokens.tolist() == [5] and out.num_computed_tokens.tolist() == [6]
    assert out.input_token_ids.tolist() == [10, 11, 12, 13, 14]
    assert out.spec_offsets.tolist() == [0, 4] and out.spec_token_ids.tolist() == [11, 12, 13, 14]
    assert out.spec_offsets.dtype == np.int32 and out.spec_token_ids.dtype == np.int32
    assert not out.spec_token_ids.flags.writeable
    assert out.new_block_ids.tolist() == [3] and out.num_batched_tokens == 5


def test_rejected_proposals_roll_back_and_the_row_is_resent():
    s = make()
    _start(s)
    res = s.update(i64(1), i32(0, 1), i32(20))  # 11 rejected (20 is the correction, at position 7)
    assert res.num_appended.tolist() == [1] and res.finished_ids.tolist() == []
    assert s.get_num_computed_tokens(1) == 7 and s.get_block_ids(1).tolist() == [1, 2]  # block 3 freed
    out = s.schedule()
    assert out.block_table_reset.tolist() == [True] and out.new_block_ids.tolist() == [1, 2]
    assert out.num_scheduled_tokens.tolist() == [1] and out.spec_offsets.tolist() == [0, 0]


def test_stop_token_inside_the_accepted_run_finishes_there():
    s = make()
    _start(s, stop_token_ids=[12])
    res = s.update(i64(1), i32(0, 3), i32(11, 12, 13))
    assert res.num_appended.tolist() == [2]
    assert list(zip(res.finished_ids.tolist(), res.finish_reasons.tolist())) == [(1, FinishReason.STOP_TOKEN)]
    assert s.stats()["num_free_blocks"] == 16


def test_empty_step_in_csr_form():
    s = make()
    s.schedule()
    assert s.update(i64(), i32(0), i32()).num_appended.tolist() == []
    s.schedule()
    assert s.update(i64(), i32(), i32(), i32(), i32()).num_appended.tolist() == []  # [] read as [0]


def test_two_argument_update_still_means_one_token_each():
    s = make()
    s.add_request(1, [1, 2, 3], 2)
    s.add_request(2, [4, 5], 1)
    s.schedule()
    res = s.update(i64(1, 2), i32(7, 8))
    assert res.num_appended.tolist() == [1, 1]
    assert res.finished_ids.tolist() == [2]
    s.schedule()
    res = s.update(i64(1), token_offsets=i32(0, 1), token_ids=i32(9))
    assert res.finish_reasons.tolist() == [FinishReason.LENGTH]


@pytest.mark.parametrize("args,match", [
    ((i32(0, 1), np.asarray([1.5], np.float32)), "token_ids"),
    ((i32(0, 1, 2), i32(4, 5)), "token_offsets"),
    ((i32(0, 2), i32(4, 5)), "at most 1"),
    ((i32(0, 1), i32(4), i32(0), i32()), "draft_offsets"),
    ((i32(0, 1), i32(2**31 - 1), i32(0, 1), np.asarray([2**40])), "draft_token_ids"),
])
def test_malformed_updates_are_refused_naming_the_field(args, match):
    s = make()
    s.add_request(1, [1, 2, 3], 4)
    s.schedule()
    with pytest.raises(SchedulerContractError, match=match):
        s.update(i64(1), *args)
    assert s.update(i64(1), i32(4)).num_appended.tolist() == [1]  # nothing changed
