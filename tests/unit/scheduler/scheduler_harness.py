# SPDX-License-Identifier: Apache-2.0
"""Test harness of the scheduler tests: a fake model (the next token is a function of the prefix),
a fake runner that keeps block tables and per-slot KV "contents" (the token prefix written there),
and hypothesis strategies for configs and request traces. Imports the facade only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

VOCAB = 7
EOS = 0


def fake_next_token(tokens: list[int]) -> int:
    """Deterministic stand-in for a model: the token after ``tokens``."""
    return (sum(tokens[-3:]) * 31 + 7 * len(tokens)) % VOCAB


@dataclass
class FakeRunner:
    """Consumes SchedulerOutputs like the model runner, checking what the model would see.

    kv[block][slot] holds the token prefix whose last token's K/V was written there, so a read of a
    wrong block (a bad prefix hit, a stale table, a shared block overwritten) is caught."""

    block_size: int
    num_blocks: int
    max_num_batched_tokens: int
    max_num_seqs: int
    tables: dict[int, list[int]] = field(default_factory=dict)
    tokens: dict[int, list[int]] = field(default_factory=dict)
    kv: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)

    def add(self, rid: int, prompt: list[int]) -> None:
        self.tokens[rid] = list(prompt)

    def drop(self, rid: int) -> None:
        self.tables.pop(rid, None)

    def execute(self, out) -> tuple[np.ndarray, np.ndarray]:
        """Checks the step's invariants, 'computes' it and returns (req_ids, sampled tokens)."""
        bs = self.block_size
        for rid in out.preempted_ids.tolist() + out.finished_ids.tolist():
            self.drop(rid)
        n = out.num_reqs
        assert n <= self.max_num_seqs
        assert out.num_batched_tokens == int(out.num_scheduled_tokens.sum()) <= self.max_num_batched_tokens
        assert len(out.input_token_ids) == out.num_batched_tokens
        assert len(set(out.req_ids.tolist())) == n
        written: dict[int, int] = {}
        pos = 0
        sample_ids, sample_toks = [], []
        for i, rid in enumerate(out.req_ids.tolist()):
            lo, hi = out.new_block_offsets[i], out.new_block_offsets[i + 1]
            if out.block_table_reset[i]:
                self.tables[rid] = []
            table = self.tables.setdefault(rid, [])
            table.extend(out.new_block_ids[lo:hi].tolist())
            start, num = int(out.num_computed_tokens[i]), int(out.num_scheduled_tokens[i])
            toks = self.tokens[rid]
            assert num >= 1 and start + num <= len(toks)
            assert out.input_token_ids[pos:pos + num].tolist() == toks[start:start + num]
            pos += num
            assert len(table) * bs >= start + num, "block table too short"
            assert 0 not in table, "null block in a table"
            for p in range(start):  # the context must hold this request's own prefix
                assert self.kv.get((table[p // bs], p % bs)) == tuple(toks[:p + 1]), f"bad KV at {p} of {rid}"
            for p in range(start, start + num):
                blk = table[p // bs]
                assert written.setdefault(blk, rid) == rid, "two requests write one block in a step"
                self.kv[(blk, p % bs)] = tuple(toks[:p + 1])
            assert bool(out.sample_mask[i]) == (start + num == len(toks))
            if out.sample_mask[i]:
                sample_ids.append(rid)
                sample_toks.append(fake_next_token(toks))
        # A block written this step belongs to the writer alone.
        for blk, rid in written.items():
            for other, table in self.tables.items():
                assert other == rid or blk not in table, f"block {blk} written by {rid} is in {other}'s table"
        return np.asarray(sample_ids, np.int64), np.asarray(sample_toks, np.int32)

    def commit(self, ids: np.ndarray, toks: np.ndarray) -> None:
        for rid, tok in zip(ids.tolist(), toks.tolist()):
            self.tokens[rid].append(tok)


@st.composite
def configs(draw, policies=("fcfs", "priority", "static", "prefill_first"), roles=("colocated",)):
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    return dict(
        num_blocks=draw(st.integers(8, 48)), block_size=block_size,
        max_num_batched_tokens=draw(st.integers(1, 48)), max_num_seqs=draw(st.integers(1, 6)),
        max_model_len=draw(st.sampled_from([48, 96])), enable_prefix_caching=draw(st.booleans()),
        enable_chunked_prefill=draw(st.booleans()), policy=draw(st.sampled_from(policies)),
        role=draw(st.sampled_from(roles)))


@st.composite
def traces(draw, max_requests=10, allow_children=True, allow_aborts=True):
    """A list of events: ("add", step, kwargs), ("abort", step, index), ("fail", step, abort_rows)."""
    prefixes = [draw(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=24)) for _ in range(3)]
    events = []
    num = draw(st.integers(1, max_requests))
    for i in range(num):
        base = draw(st.sampled_from(prefixes))
        prompt = base[:draw(st.integers(1, len(base)))] + draw(st.lists(st.integers(0, VOCAB - 1), max_size=10))
        kw = dict(prompt=prompt, max_tokens=draw(st.integers(1, 16)), min_tokens=draw(st.integers(0, 2)),
                  priority=draw(st.integers(0, 3)), eos=draw(st.sampled_from([(), (EOS,)])),
                  stop=draw(st.sampled_from([(), (3,)])), ignore_eos=draw(st.booleans()),
                  n=draw(st.sampled_from([1, 1, 1, 2, 3])) if allow_children else 1)
        kw["min_tokens"] = min(kw["min_tokens"], kw["max_tokens"])
        events.append(("add", draw(st.integers(0, 12)), kw))
    if allow_aborts:
        for _ in range(draw(st.integers(0, 3))):
            events.append(("abort", draw(st.integers(0, 20)), draw(st.integers(0, 3 * num))))
        for _ in range(draw(st.integers(0, 2))):
            events.append(("fail", draw(st.integers(0, 20)), draw(st.booleans())))
    return events
