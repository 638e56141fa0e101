# SPDX-License-Identifier: Apache-2.0
"""InputBatch: block-table diffs and flat batch building from a fake SchedulerOutput (contract 2).
Oracle: a per-token Python loop over the same scheduler output, written in this test."""
import numpy as np

from mindie_llm.contract import SchedulerOutput
from mindie_llm.executor.input_batch import InputBatch, RequestState, SamplingRow

BS = 4


def _out(req_ids, nsched, ncomp, tokens, smask, reset, new_blocks, preempted=(), finished=()):
    offs = np.zeros(len(req_ids) + 1, np.int32)
    np.cumsum([len(b) for b in new_blocks], out=offs[1:])
    return SchedulerOutput(
        req_ids=np.array(req_ids, np.int64), num_scheduled_tokens=np.array(nsched, np.int32),
        num_computed_tokens=np.array(ncomp, np.int32), input_token_ids=np.array(tokens, np.int32),
        sample_mask=np.array(smask, bool), block_table_reset=np.array(reset, bool), new_block_offsets=offs,
        new_block_ids=np.array([b for bl in new_blocks for b in bl], np.int32),
        preempted_ids=np.array(preempted, np.int64), finished_ids=np.array(finished, np.int64),
        finish_reasons=np.zeros(len(finished), np.int32), num_batched_tokens=len(tokens))


def _reference(out, tables):
    """Per-token loop: positions and slots from explicit block tables {req: [blocks]}."""
    pos, slots = [], []
    for r, n, c in zip(out.req_ids, out.num_scheduled_tokens, out.num_computed_tokens):
        for j in range(n):
            p = c + j
            pos.append(p)
            slots.append(tables[int(r)][p // BS] * BS + p % BS)
    return pos, slots


def _add(ib, rid, prompt, plp=False):
    ib.add(RequestState(rid, np.array(prompt, np.int32), SamplingRow(prompt_logprobs=1 if plp else -1), 0))


def test_mixed_batch_positions_slots_and_logits_rows():
    ib = InputBatch(max_num_seqs=4, max_model_len=64, block_size=BS)
    _add(ib, 1, list(range(6)))
    _add(ib, 2, list(range(10, 19)), plp=True)
    # step 1: req 1 whole prompt (6), req 2 first chunk of 5
    o1 = _out([1, 2], [6, 5], [0, 0], list(range(6)) + list(range(10, 15)), [True, False], [True, True],
              [[3, 7], [5, 9]])
    ib.apply_diffs(o1)
    fb = ib.build(o1)
    tables = {1: [3, 7], 2: [5, 9]}
    pos, slots = _reference(o1, tables)
    assert fb.positions.tolist() == pos and fb.slot_mapping.tolist() == slots
    assert fb.query_start_loc.tolist() == [0, 6, 11] and fb.seq_lens.tolist() == [6, 5]
    assert fb.logits_indices.tolist() == [5] and fb.sample_req_ids.tolist() == [1]
    assert fb.num_decodes == 0
    # prompt logprobs rows of req 2: positions 0..4 score prompt tokens 1..5
    assert fb.prompt_rows.tolist() == [6, 7, 8, 9, 10]
    assert fb.prompt_targets.tolist() == [11, 12, 13, 14, 15] and fb.prompt_pos.tolist() == [1, 2, 3, 4, 5]
    # step 2: req 1 decodes (pos 6, needs no new block), req 2 finishes its prompt (4 tokens, new block 11)
    o2 = _out([1, 2], [1, 4], [6, 5], [99, 15, 16, 17, 18], [True, True], [False, False], [[], [11]])
    ib.apply_diffs(o2)
    fb = ib.build(o2)
    tables[2].append(11)
    pos, slots = _reference(o2, tables)
    assert fb.positions.tolist() == pos and fb.slot_mapping.tolist() == slots
    assert fb.num_decodes == 1 and fb.logits_indices.tolist() == [0, 4]
    assert fb.prompt_targets.tolist() == [16, 17, 18]       # last prompt token is not scored
    assert fb.block_tables[1, :3].tolist() == [5, 9, 11] and fb.block_tables[0, 2] == 0


def test_preemption_reset_and_finished_drop():
    ib = InputBatch(max_num_seqs=2, max_model_len=32, block_size=BS)
    _add(ib, 1, [1, 2, 3])
    _add(ib, 2, [4, 5, 6])
    o = _out([1, 2], [3, 3], [0, 0], [1, 2, 3, 4, 5, 6], [True, True], [True, True], [[2], [3]])
    ib.apply_diffs(o)
    ib.build(o)
    # req 2 preempted, req 1 decodes
    o = _out([1], [1], [3], [7], [True], [False], [[]], preempted=[2])
    ib.apply_diffs(o)
    assert ib.requests[2].row == -1 and ib.requests[1].row >= 0
    # req 2 resumes with fresh blocks; req 1 finished
    o = _out([2], [4], [0], [4, 5, 6, 8], [True], [True], [[6, 8]], finished=[1])
    ib.apply_diffs(o)
    fb = ib.build(o)
    assert 1 not in ib.requests
    pos, slots = _reference(o, {2: [6, 8]})
    assert fb.slot_mapping.tolist() == slots


def test_rows_grow_beyond_max_num_seqs():
    ib = InputBatch(max_num_seqs=1, max_model_len=16, block_size=BS)
    for r in (1, 2, 3):
        _add(ib, r, [1])
    o = _out([1, 2, 3], [1, 1, 1], [0, 0, 0], [1, 1, 1], [True] * 3, [True] * 3, [[2], [3], [4]])
    ib.apply_diffs(o)
    fb = ib.build(o)
    assert fb.slot_mapping.tolist() == [8, 12, 16]
