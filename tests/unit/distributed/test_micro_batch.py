# SPDX-License-Identifier: Apache-2.0
"""The micro-batch split: the request boundary nearest to half the tokens, no split below two
requests, and per-half metadata that describes exactly its requests (checked against metadata
built directly for each half, the oracle); the interleaved schedule's collective order."""
from __future__ import annotations

import numpy as np
import torch

from mindie_llm.distributed.micro_batch import run_interleaved, split_batch, split_point
from mindie_llm.distributed.parallel_state import ParallelContext
from mindie_llm.layers.attention import AttentionMetadata


def test_split_point():
    assert split_point(np.array([0])) == 0
    assert split_point(np.array([0, 7])) == 0                 # one request: not split
    assert split_point(np.array([0, 1, 2, 3, 4])) == 2        # four decodes: two and two
    assert split_point(np.array([0, 1, 2, 30])) == 2          # decodes + a long prefill: the prefill alone
    assert split_point(np.array([0, 10, 11, 12])) == 1


def test_halves_match_metadata_built_for_each_half():
    computed, sched = [5, 9, 0, 3], [1, 1, 6, 4]
    tables = [[1, 2], [3, 4, 5], [6, 7], [8, 9]]
    md = AttentionMetadata.build(computed, sched, tables, 4)
    qsl = np.concatenate([[0], np.cumsum(sched)])
    k = split_point(qsl)
    ids, pos = torch.arange(12), torch.arange(12) + 100
    parts = split_batch(ids, pos, md, k, qsl, np.add(computed, sched))
    for (pi, pp, pm), lo, hi in zip(parts, (0, k), (k, 4)):
        want = AttentionMetadata.build(computed[lo:hi], sched[lo:hi], tables[lo:hi], 4)
        t0, t1 = qsl[lo], qsl[hi]
        assert torch.equal(pi, ids[t0:t1]) and torch.equal(pp, pos[t0:t1])
        assert torch.equal(pm.slot_mapping, want.slot_mapping)
        assert torch.equal(pm.query_start_loc, want.query_start_loc)
        assert torch.equal(pm.seq_lens, want.seq_lens)
        assert torch.equal(pm.block_tables[:, :want.block_tables.shape[1]], want.block_tables)
        assert (pm.num_decodes, pm.max_query_len, pm.max_seq_len) == (want.num_decodes, want.max_query_len,
                                                                      want.max_seq_len)


def test_interleaved_schedule_alternates_micro_batches():
    order = []

    class Recorder(ParallelContext):
        def __post_init__(self):
            pass

        def all_reduce(self, t, async_op=False):
            order.append(int(t.item()))
            return _Done(t)

    class _Done:
        def __init__(self, t):
            self.t = t

        def wait(self):
            return self.t

    def stages(m):
        for s in range(3):
            yield lambda h, r, s=s: (torch.tensor(float(10 * m + s)), r)

    out = run_interleaved([stages(0), stages(1)], Recorder(rank=0, size=2))
    assert order == [0, 10, 1, 11, 2, 12]          # A0 B0 A1 B1 A2 B2: every rank issues this order
    assert [float(h) for h, _ in out] == [2.0, 12.0]
