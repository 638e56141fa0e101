# SPDX-License-Identifier: Apache-2.0
"""The step message's wire form: encode() -> decode() is the identity on random messages
(hypothesis), and every kind of malformed message is refused with ContractError before any array
is built from it. Also: the contract's FinishReason equals the C++ core's."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mindie_llm.contract import ContractError, FinishReason, NewRequests, SchedulerOutput, csr_offsets

I32 = st.integers(-2**31, 2**31 - 1)


@st.composite
def messages(draw) -> SchedulerOutput:
    B = draw(st.integers(0, 6))
    nsched = np.array(draw(st.lists(st.integers(1, 5), min_size=B, max_size=B)), np.int32)
    T = int(nsched.sum())
    spec_lens = [draw(st.integers(0, int(n) - 1)) for n in nsched]
    blocks = [draw(st.lists(st.integers(0, 1000), max_size=3)) for _ in range(B)]
    N = draw(st.integers(0, B))
    prompts = [draw(st.lists(st.integers(0, 50000), min_size=1, max_size=6)) for _ in range(N)]
    outs = [draw(st.lists(st.integers(0, 50000), max_size=3)) for _ in range(N)]
    bans = [draw(st.lists(st.integers(0, 50000), max_size=3)) for _ in range(N)]
    biases = [draw(st.dictionaries(st.integers(0, 2**31 - 1), st.floats(-100, 100, width=32), max_size=4))
              for _ in range(N)]
    f = (lambda lo, hi: np.array([draw(st.floats(lo, hi, width=32)) for _ in range(N)], np.float32))
    ints = (lambda lo, hi, n: np.array(draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)), np.int32))
    new = NewRequests(
        req_ids=np.array(draw(st.lists(st.integers(-2**63, 2**63 - 1), min_size=N, max_size=N)), np.int64),
        prompt_offsets=csr_offsets([len(p) for p in prompts]),
        prompt_token_ids=np.array(sum(prompts, []), np.int32),
        output_offsets=csr_offsets([len(o) for o in outs]), output_token_ids=np.array(sum(outs, []), np.int32),
        seeds=np.array(draw(st.lists(st.integers(-2**63, 2**63 - 1), min_size=N, max_size=N)), np.int64),
        temperature=f(0, 100), top_k=ints(0, 1000, N), top_p=f(0, 1), min_p=f(0, 1),
        presence_penalty=f(-2, 2), frequency_penalty=f(-2, 2), repetition_penalty=f(0.125, 2),
        min_tokens=ints(0, 100, N), logprobs=ints(-1, 20, N), prompt_logprobs=ints(-1, 20, N),
        ban_offsets=csr_offsets([len(b) for b in bans]), ban_token_ids=np.array(sum(bans, []), np.int32),
        bias_offsets=csr_offsets([len(b) for b in biases]),
        bias_token_ids=np.array([k for b in biases for k in b], np.int32),
        bias_values=np.array([v for b in biases for v in b.values()], np.float32))
    P, F = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    return SchedulerOutput(
        req_ids=np.array(draw(st.lists(st.integers(-2**63, 2**63 - 1), min_size=B, max_size=B)), np.int64),
        num_scheduled_tokens=nsched, num_computed_tokens=ints(0, 2**31 - 1, B),
        input_token_ids=ints(0, 2**31 - 1, T),
        spec_offsets=csr_offsets(spec_lens), spec_token_ids=ints(0, 50000, sum(spec_lens)),
        sample_mask=np.array(draw(st.lists(st.booleans(), min_size=B, max_size=B)), bool),
        block_table_reset=np.array(draw(st.lists(st.booleans(), min_size=B, max_size=B)), bool),
        new_block_offsets=csr_offsets([len(b) for b in blocks]), new_block_ids=np.array(sum(blocks, []), np.int32),
        preempted_ids=np.arange(P, dtype=np.int64), finished_ids=np.arange(F, dtype=np.int64) + 7,
        finish_reasons=ints(0, 7, F), num_batched_tokens=T, new_requests=new)


def _assert_same(a: SchedulerOutput, b: SchedulerOutput) -> None:
    assert a.num_batched_tokens == b.num_batched_tokens
    for f in dataclasses.fields(SchedulerOutput):
        if f.name in ("new_requests", "num_batched_tokens"):
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.dtype == y.dtype and np.array_equal(x, y), f.name
    for f in dataclasses.fields(NewRequests):
        x, y = getattr(a.new_requests, f.name), getattr(b.new_requests, f.name)
        assert x.dtype == y.dtype and np.array_equal(x, y), f.name


@settings(max_examples=150, deadline=None)
@given(messages())
def test_round_trip(msg):
    ints, floats = msg.encode()
    assert ints.dtype == np.int64 and floats.dtype == np.float32
    _assert_same(SchedulerOutput.decode(ints, floats), msg)


def _encoded():
    msg = SchedulerOutput(
        req_ids=np.array([5, 9], np.int64), num_scheduled_tokens=np.array([1, 3], np.int32),
        num_computed_tokens=np.array([7, 0], np.int32), input_token_ids=np.array([1, 2, 3, 4], np.int32),
        sample_mask=np.array([True, True]), block_table_reset=np.array([False, True]),
        new_block_offsets=np.array([0, 0, 1], np.int32), new_block_ids=np.array([4], np.int32),
        preempted_ids=np.zeros(0, np.int64), finished_ids=np.zeros(0, np.int64),
        finish_reasons=np.zeros(0, np.int32), num_batched_tokens=4)
    return msg.encode()


@pytest.mark.parametrize("mutate,match", [
    (lambda i, f: (i[:5], f), "bad header|past the end|out of range"),
    (lambda i, f: (np.concatenate([[0], i[1:]]), f), "bad header"),
    (lambda i, f: (np.concatenate([i[:1], [99], i[2:]]), f), "bad header"),
    (lambda i, f: (np.concatenate([i[:2], [-1], i[3:]]), f), "out of range"),
    (lambda i, f: (np.concatenate([i[:2], [2**45], i[3:]]), f), "out of range"),
    (lambda i, f: (i[:-1], f), "past the end"),
    (lambda i, f: (np.concatenate([i, [0]]), f), "trailing"),
    (lambda i, f: (i, np.concatenate([f, np.zeros(1, np.float32)])), "trailing"),
    (lambda i, f: (i.astype(np.int32), f), "int64 and float32"),
])
def test_malformed_is_refused(mutate, match):
    ints, floats = _encoded()
    with pytest.raises(ContractError, match=match):
        SchedulerOutput.decode(*mutate(ints.copy(), floats.copy()))


def _field_offset(name: str) -> int:
    """Index of ``name``'s first element in the encoded int array of ``_encoded()``."""
    from mindie_llm import contract

    msg = SchedulerOutput.decode(*_encoded())
    pos = contract._HEADER
    for n, _, _ in contract._INT_SCHEMA:
        if n == name:
            return pos
        pos += np.asarray(msg._get(n)).size
    raise KeyError(name)


@pytest.mark.parametrize("field,value,match", [
    ("new_block_offsets", 5, "must start at 0"),                # offsets must start at 0
    ("num_scheduled_tokens", 7, "add up to T"),                 # 1 + 7 != T
    ("sample_mask", 2, "0 or 1"),
    ("num_computed_tokens", 2**40, "outside int32"),
    ("spec_offsets", 0, "not decrease|start at 0"),
])
def test_inconsistent_fields_are_refused(field, value, match):
    ints, floats = _encoded()
    ints = ints.copy()
    at = _field_offset(field)
    if field == "spec_offsets":      # [0, 0, 0] -> [0, 2, 0]: decreasing
        ints[at + 1] = 2
    else:
        ints[at] = value
    with pytest.raises(ContractError, match=match):
        SchedulerOutput.decode(ints, floats)


def _with_bias(ids, values, offsets=None) -> tuple[np.ndarray, np.ndarray]:
    """An encoded two-request message whose NewRequests carry the given logit_bias CSR (written
    straight into the arrays, bypassing the builders' checks)."""
    n = len(offsets) - 1 if offsets is not None else 1
    z32, zf = np.zeros(n, np.int32), np.zeros(n, np.float32)
    new = NewRequests(req_ids=np.arange(n, dtype=np.int64) + 5, prompt_offsets=np.arange(n + 1, dtype=np.int32),
                      prompt_token_ids=np.ones(n, np.int32), output_offsets=np.zeros(n + 1, np.int32),
                      seeds=np.zeros(n, np.int64), temperature=zf, top_k=z32, top_p=zf + 1, min_p=zf,
                      presence_penalty=zf, frequency_penalty=zf, repetition_penalty=zf + 1, min_tokens=z32,
                      logprobs=z32 - 1, prompt_logprobs=z32 - 1, ban_offsets=np.zeros(n + 1, np.int32),
                      bias_offsets=np.asarray(offsets if offsets is not None else [0, len(ids)], np.int32),
                      bias_token_ids=np.asarray(ids, np.int32), bias_values=np.asarray(values, np.float32))
    msg = SchedulerOutput.decode(*_encoded())
    msg.new_requests = new
    return msg.encode()


def test_logit_bias_round_trips():
    msg = SchedulerOutput.decode(*_with_bias([7, 3, 7], [100.0, -100.0, 0.5], offsets=[0, 2, 3]))
    new = msg.new_requests
    assert [(a.tolist(), b.tolist()) for a, b in (new.logit_bias(0), new.logit_bias(1))] == \
        [([7, 3], [100.0, -100.0]), ([7], [0.5])]      # the same id in two requests is fine


@pytest.mark.parametrize("ids,values,offsets,match", [
    ([-1], [1.0], None, "negative token id"),
    ([4], [100.5], None, "within"),
    ([4], [float("nan")], None, "finite"),
    ([4], [float("-inf")], None, "finite"),
    ([4, 4], [1.0, 2.0], None, "repeats a token id"),
    ([4, 5], [1.0, 2.0], [0, 3], "past the end"),          # offsets end past the ids
    ([4, 5], [1.0, 2.0], [1, 2], "start at 0"),
    ([4, 5], [1.0], None, "past the end"),                  # fewer biases than ids
])
def test_malformed_logit_bias_is_refused(ids, values, offsets, match):
    with pytest.raises(ContractError, match=match):
        SchedulerOutput.decode(*_with_bias(ids, values, offsets))


def test_finish_reason_matches_the_cpp_core():
    _scheduler = pytest.importorskip("mindie_llm._scheduler")
    assert {m.name: int(m) for m in FinishReason} == \
        {name: int(v) for name, v in _scheduler.FinishReason.__members__.items()}
