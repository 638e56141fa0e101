# SPDX-License-Identifier: Apache-2.0
"""The scheduler's lookahead slot for asynchronous scheduling (num_lookahead_slots = 1): a decode
row is handed the block of its next position one step early, from free blocks only, never past
max_model_len, and every block comes back when the request ends. Oracle: the block arithmetic
written out here (block b holds positions [b*BS, (b+1)*BS))."""
import numpy as np
import pytest

from mindie_llm.scheduler import Scheduler, SchedulerCoreConfig, SchedulerConfigError

BS = 4


def _sched(num_blocks, slots=1, max_model_len=64):
    return Scheduler(SchedulerCoreConfig(num_blocks=num_blocks, block_size=BS, max_num_batched_tokens=64,
                                         max_num_seqs=4, max_model_len=max_model_len, enable_prefix_caching=False,
                                         num_lookahead_slots=slots))


def _step(s, token=7):
    out = s.schedule()
    ids = np.asarray(out.req_ids)[np.asarray(out.sample_mask, bool)]
    s.update(ids, np.arange(len(ids) + 1, dtype=np.int32), np.full(len(ids), token, np.int32))
    return out


@pytest.mark.parametrize("slots", [0, 1])
def test_decode_holds_the_block_of_its_next_position(slots):
    s = _sched(32, slots)
    s.add_request(1, np.arange(3, 9, dtype=np.int32), 20, ignore_eos=True)     # prompt of 6 tokens
    _step(s)                                                                    # prefill: positions 0..5
    for _ in range(12):
        out = _step(s)
        pos = int(np.asarray(out.num_computed_tokens)[0])                       # the decode's position
        held = len(s.get_block_ids(1))
        need = pos + 1 + slots                                                  # positions 0..pos(+1)
        assert held == -(-need // BS), (pos, held)
        if slots and (pos + 1) % BS == 0:                                       # the next position opens a block:
            assert len(out.new_block_ids) == 1                                  # handed out in this step


def test_lookahead_never_preempts_and_stays_within_max_model_len():
    s = _sched(5, 1, max_model_len=12)          # 4 usable blocks; 12 tokens need 3
    s.add_request(1, np.arange(3, 9, dtype=np.int32), 6, ignore_eos=True)
    _step(s)
    for _ in range(5):                          # decodes at positions 6..10, the last one finishes it
        assert len(s.get_block_ids(1)) <= 3
        _step(s)
    assert not s.has_unfinished()
    s2 = _sched(4, 1)
    s2.add_request(1, np.arange(3, 10, dtype=np.int32), 5, ignore_eos=True)   # 7 tokens: blocks 2
    s2.add_request(2, np.arange(3, 6, dtype=np.int32), 9, ignore_eos=True)    # 3 tokens: block 1
    _step(s2)
    out = _step(s2)                             # no free block left for a lookahead: nobody preempted
    assert s2.stats()["num_preemptions"] == 0 and len(np.asarray(out.req_ids)) == 2


def test_finished_request_returns_its_lookahead_block():
    s = _sched(16, 1)
    free0 = s.stats()["num_free_blocks"]
    s.add_request(1, np.arange(3, 10, dtype=np.int32), 2, ignore_eos=True)     # 7 + 2 tokens
    _step(s)
    _step(s)                                    # finishes (max_tokens), its lookahead block was held
    assert not s.has_unfinished()
    s.schedule()                                # the finished id goes out; blocks are back
    assert s.stats()["num_free_blocks"] == free0


def test_num_lookahead_slots_is_validated():
    with pytest.raises(SchedulerConfigError):
        _sched(8, 2)
