# SPDX-License-Identifier: Apache-2.0
"""Test harness of the scheduler tests: a fake model (the next token is a function of the prefix),
a fake runner that keeps block tables and per-slot KV "contents" (the token prefix written there)
and verifies proposed tokens greedily, a random drafter, and hypothesis strategies for configs and
request traces. Imports the facade only.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

VOCAB = 7
EOS = 0


def fake_next_token(tokens: list[int]) -> int:
    """Deterministic stand-in for a model: the token after ``tokens``."""
    return (sum(tokens[-3:]) * 31 + 7 * len(tokens)) % VOCAB


def greedy_verify(tokens: list[int], proposals: list[int]) -> list[int]:
    """Greedy verification of ``proposals`` after ``tokens``: the longest prefix the model agrees
    with, plus the model's next token (the correction, or the bonus after a full match)."""
    accepted: list[int] = []
    for j in range(len(proposals) + 1):
        t = fake_next_token(tokens + accepted)
        accepted.append(t)
        if j == len(proposals) or proposals[j] != t:
            return accepted
    return accepted


class RandomDrafter:
    """Proposals for the next step: up to ``max_len`` tokens, each the model's own with probability
    ``p_right`` (so runs get accepted in part, in whole or not at all) else a random token."""

    def __init__(self, seed: int, max_len: int = 4, p_right: float = 0.6) -> None:
        self.rng, self.max_len, self.p_right = random.Random(seed), max_len, p_right

    def propose(self, tokens: list[int]) -> list[int]:
        out: list[int] = []
        for _ in range(self.rng.randint(0, self.max_len)):
            right = fake_next_token(tokens + out)
            out.append(right if self.rng.random() < self.p_right else self.rng.randrange(VOCAB))
        return out


def csr(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """int32 offsets [len(rows)+1] and the concatenated int32 values."""
    offsets = np.zeros(len(rows) + 1, np.int32)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    return offsets, np.asarray([t for r in rows for t in r], np.int32)


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
    # Rows with rejected proposals: the scheduler may have freed their lookahead blocks, which the
    # runner learns only from the row's next schedule (block_table_reset). Until then their tables
    # are not checked for blocks written by others.
    maybe_stale: set[int] = field(default_factory=set)

    def add(self, rid: int, prompt: list[int]) -> None:
        self.tokens[rid] = list(prompt)

    def drop(self, rid: int) -> None:
        self.tables.pop(rid, None)
        self.maybe_stale.discard(rid)

    def execute(self, out) -> tuple[np.ndarray, np.ndarray]:
        """Checks the step's invariants, 'computes' it and returns (req_ids, sampled tokens)."""
        rows = self.execute_rows(out)
        return (np.asarray([r for r, _ in rows], np.int64),
                np.asarray([t[0] for _, t in rows], np.int32))

    def execute_rows(self, out) -> list[tuple[int, list[int]]]:
        """Checks the step's invariants, 'computes' it and returns the sampling rows in batch order,
        each with its greedily verified tokens (one unless the row carried proposals)."""
        bs = self.block_size
        for rid in out.preempted_ids.tolist() + out.finished_ids.tolist():
            self.drop(rid)
        n = out.num_reqs
        assert n <= self.max_num_seqs
        assert out.num_batched_tokens == int(out.num_scheduled_tokens.sum()) <= self.max_num_batched_tokens
        assert len(out.input_token_ids) == out.num_batched_tokens
        assert len(set(out.req_ids.tolist())) == n
        assert len(out.spec_offsets) == n + 1 and out.spec_offsets[-1] == len(out.spec_token_ids)
        written: dict[int, int] = {}
        pos = 0
        rows: list[tuple[int, list[int]]] = []
        for i, rid in enumerate(out.req_ids.tolist()):
            self.maybe_stale.discard(rid)
            lo, hi = out.new_block_offsets[i], out.new_block_offsets[i + 1]
            if out.block_table_reset[i]:
                self.tables[rid] = []
            table = self.tables.setdefault(rid, [])
            table.extend(out.new_block_ids[lo:hi].tolist())
            start, num = int(out.num_computed_tokens[i]), int(out.num_scheduled_tokens[i])
            spec = out.spec_token_ids[out.spec_offsets[i]:out.spec_offsets[i + 1]].tolist()
            k = len(spec)
            assert num >= 1 and start + num - k <= len(self.tokens[rid]) and k < num
            if k:
                assert start + 1 == len(self.tokens[rid]), "proposals only on a decode"
            toks = self.tokens[rid][:start + num - k] + spec   # the sequence this row computes
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
            assert bool(out.sample_mask[i]) == (start + num - k == len(self.tokens[rid]))
            if out.sample_mask[i]:
                rows.append((rid, greedy_verify(self.tokens[rid], spec)))
                if len(rows[-1][1]) <= k:
                    self.maybe_stale.add(rid)
        # A block written this step belongs to the writer alone.
        for blk, rid in written.items():
            for other, table in self.tables.items():
                assert other == rid or other in self.maybe_stale or blk not in table, \
                    f"block {blk} written by {rid} is in {other}'s table"
        return rows

    def commit(self, ids: np.ndarray, toks: np.ndarray) -> None:
        for rid, tok in zip(ids.tolist(), toks.tolist()):
            self.tokens[rid].append(tok)

    def commit_rows(self, rows: list[tuple[int, list[int]]], num_appended: np.ndarray) -> None:
        for (rid, toks), n in zip(rows, num_appended.tolist()):
            self.tokens[rid] += toks[:n]


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
