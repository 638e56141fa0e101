# SPDX-License-Identifier: Apache-2.0
"""The persistent per-slot arrays (executor/slot_table.py) and the runner's per-step sampling
metadata gathered from them. Oracle: a per-request Python loop over the requests' own sampling
parameters and outputs, written in this test (what the runner did per step before the slot table)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mindie_llm.contract import SchedulerOutput
from mindie_llm.engine.new_requests import NewRequestTable
from mindie_llm.executor.model_runner import ModelRunner, SamplingPositions
from mindie_llm.executor.slot_table import SlotTable
from mindie_llm.sampling_params import SamplingParams

V, BS = 50, 4


def test_slots_lookup_append_grow_and_reuse():
    from mindie_llm.executor.input_batch import SamplingRow

    tab = SlotTable(2, max_model_len=1000)
    s = [tab.add(rid, SamplingRow(temperature=0.1 * rid), rid, 3, np.array([rid], np.int32)) for rid in (30, 10, 20)]
    assert tab.capacity >= 3 and len(set(s)) == 3                       # grew past 2 slots
    np.testing.assert_array_equal(tab.slots_of(np.array([20, 30, 10])), [s[2], s[0], s[1]])
    with pytest.raises(KeyError):
        tab.slots_of(np.array([10, 99]))
    tab.append(np.array([s[1], s[2]]), np.array([0, 300, 301]), np.arange(301, dtype=np.int32))  # outgrows 256
    assert tab.output_tokens(s[1]).tolist() == [10] + list(range(300))
    assert tab.output_tokens(s[2]).tolist() == [20, 300] and tab.output_tokens(s[0]).tolist() == [30]
    np.testing.assert_allclose(tab.temperature[[s[1], s[2]]], [1.0, 2.0])
    tab.remove(10, s[1])
    with pytest.raises(KeyError):
        tab.slots_of(np.array([10]))
    s4 = tab.add(40, SamplingRow(), 0, 1, np.zeros(0, np.int32))
    assert s4 == s[1] and tab.num_output[s4] == 0 and tab.temperature[s4] == 1.0   # the slot is refilled


PARAMS = [dict(temperature=0.0),
          dict(temperature=0.7, top_k=5, seed=3, logprobs=2),
          dict(temperature=1.0, top_p=0.9, min_p=0.05, presence_penalty=0.5, repetition_penalty=1.2, min_tokens=4),
          dict(temperature=0.0, frequency_penalty=0.3, min_tokens=1)]


def _out(req_ids, nsched, ncomp, tokens, new, blocks, spec=None, finished=()):
    B = len(req_ids)
    spec = spec or [[] for _ in req_ids]
    offs = np.zeros(B + 1, np.int32)
    np.cumsum([len(b) for b in blocks], out=offs[1:])
    return SchedulerOutput(
        req_ids=np.array(req_ids, np.int64), num_scheduled_tokens=np.array(nsched, np.int32),
        num_computed_tokens=np.array(ncomp, np.int32), input_token_ids=np.array(tokens, np.int32),
        sample_mask=np.ones(B, bool), block_table_reset=np.zeros(B, bool), new_block_offsets=offs,
        new_block_ids=np.array([b for bl in blocks for b in bl], np.int32), preempted_ids=np.zeros(0, np.int64),
        finished_ids=np.array(finished, np.int64), finish_reasons=np.zeros(len(finished), np.int32),
        num_batched_tokens=len(tokens), spec_offsets=np.cumsum([0] + [len(x) for x in spec]).astype(np.int32),
        spec_token_ids=np.array([t for x in spec for t in x], np.int32), new_requests=new)


def _oracle(runner, pos, outputs):
    """Per logits row: (temperature, top_k, top_p, min_p, seed, output position, banned set,
    penalty counts row or None) from a loop over the requests."""
    rows = []
    for r in range(pos.num_rows):
        st = runner.batch.requests[int(pos.req_ids[r])]
        p = st.sampling
        n = len(outputs[st.req_id]) + int(pos.within[r])
        banned = set(p.banned.tolist()) if n < p.min_tokens else set()
        counts = None
        if p.has_penalties:
            counts = np.zeros(V, np.int64)
            lo = int(pos.spec_offsets[pos.owner[r]])
            for t in outputs[st.req_id] + pos.spec[lo:lo + int(pos.within[r])].tolist():
                counts[t] += 1
        rows.append((p.temperature, p.top_k, p.top_p, p.min_p, st.seed, n, banned, counts))
    return rows


def test_sampling_metadata_equals_the_per_request_loop():
    runner = ModelRunner(torch.nn.Identity(), V, [], block_size=BS, max_num_seqs=2, max_num_batched_tokens=64,
                         max_model_len=64, device=torch.device("cpu"))
    table = NewRequestTable()
    prompts = {i + 1: list(range(5 + i, 8 + 2 * i)) for i in range(len(PARAMS))}
    for rid, kw in zip(prompts, PARAMS):
        table.add(rid, prompts[rid], SamplingParams(max_tokens=20, **kw), seed=100 + rid,
                  banned=[2, 7] if kw.get("min_tokens") else [])
    ids = list(prompts)
    outputs = {rid: [] for rid in ids}
    rng = np.random.default_rng(0)
    ncomp = {rid: 0 for rid in ids}
    for step in range(6):
        spec = [[int(t) for t in rng.integers(0, V, k)] for k in ([0, 2, 1, 3] if step >= 2 else [0] * 4)]
        if step == 0:
            nsched = [len(prompts[r]) for r in ids]
            toks = sum((prompts[r] for r in ids), [])
            blocks = [list(range(12 * i + 1, 12 * i + 13)) for i in range(len(ids))]
        else:
            nsched = [1 + len(s) for s in spec]
            toks = sum(([outputs[r][-1]] + s for r, s in zip(ids, spec)), [])
            blocks = [[] for _ in ids]
        out = _out(ids, nsched, [ncomp[r] for r in ids], toks, table.take(np.array(ids)), blocks, spec)
        runner.apply(out)
        fb = runner.batch.build(out)
        pos = SamplingPositions(fb)
        md = runner._sampling_metadata(pos)
        want = _oracle(runner, pos, outputs)
        np.testing.assert_allclose(md.temperature.numpy(), [w[0] for w in want])
        assert md.top_k.tolist() == [w[1] for w in want]
        np.testing.assert_allclose(md.top_p.numpy(), [w[2] for w in want])
        np.testing.assert_allclose(md.min_p.numpy(), [w[3] for w in want])
        assert md.seeds == [w[4] for w in want] and md.output_positions == [w[5] for w in want]
        got_ban = [set() for _ in want]
        if md.banned_rows is not None:
            for r, t in zip(md.banned_rows.tolist(), md.banned_tokens.tolist()):
                got_ban[r].add(t)
        assert got_ban == [w[6] for w in want]
        assert md.max_num_logprobs == 2
        for r, w in enumerate(want):
            if w[7] is not None:
                np.testing.assert_array_equal(md.output_counts[r].numpy(), w[7])
                st = runner.batch.requests[int(pos.req_ids[r])]
                assert md.prompt_mask[r].nonzero().flatten().tolist() == sorted(set(st.prompt_token_ids.tolist()))
        # What the runner would keep: a random accepted prefix per row plus one token.
        logits = torch.randn(pos.num_rows, V)
        res = runner.sample_and_verify(fb, None, logits=logits)
        for rid, lo, hi in zip(res.req_ids.tolist(), res.token_offsets[:-1].tolist(), res.token_offsets[1:].tolist()):
            outputs[rid] += res.token_ids[lo:hi].tolist()
            assert runner.batch.requests[rid].output_token_ids.tolist() == outputs[rid]
        for r in ids:
            ncomp[r] = len(prompts[r]) + len(outputs[r]) - 1      # every token but the last sampled
