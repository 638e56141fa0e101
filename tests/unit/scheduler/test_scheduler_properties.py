# SPDX-License-Identifier: Apache-2.0
"""Property tests of the C++ scheduler on randomized traces, with scheduler_harness.FakeRunner as
the oracle of what a model would read: every context position must hold the K/V of the request's
own token prefix (so prefix hits, shared blocks and preemption are checked by content), a block
written in a step belongs to its writer alone, budget and sequence cap hold, every admitted
request finishes, no block leaks, FCFS admits in arrival order, and preemption does not change
any request's output. With speculation (random drafts, greedy verification) the same checks hold
-- so rolled-back KV is never read as context -- and the outputs equal those without it."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scheduler_harness import FakeRunner, RandomDrafter, configs, csr, traces

from mindie_llm.scheduler import RequestRejectedError, Scheduler, SchedulerCoreConfig


def drive(cfg: dict, events: list, hash_mask: int | None = None, max_steps: int = 600,
          drafter: RandomDrafter | None = None):
    """Runs a trace through the C++ scheduler and FakeRunner; returns per-request results."""
    sched = Scheduler(SchedulerCoreConfig(**cfg))
    if hash_mask is not None:
        sched.set_hash_mask_for_testing(hash_mask)
    runner = FakeRunner(cfg["block_size"], cfg["num_blocks"], cfg["max_num_batched_tokens"], cfg["max_num_seqs"])
    admitted: dict[int, float] = {}
    first_scheduled: dict[int, int] = {}
    finished: dict[int, int] = {}
    next_id, last_event = 1, max(ev[1] for ev in events)
    for step in range(max_steps):
        for ev in events:
            if ev[0] == "add" and ev[1] == step:
                kw, parent = ev[2], -1
                for k in range(kw["n"]):
                    rid, next_id = next_id, next_id + 1
                    try:
                        sched.add_request(rid, kw["prompt"], kw["max_tokens"], min_tokens=kw["min_tokens"],
                                          priority=kw["priority"], arrival_time=float(step),
                                          eos_token_ids=kw["eos"], stop_token_ids=kw["stop"],
                                          ignore_eos=kw["ignore_eos"], parent_id=parent)
                    except RequestRejectedError:
                        continue
                    runner.add(rid, kw["prompt"])
                    admitted[rid] = float(step)
                    parent = rid if k == 0 else parent
            elif ev[0] == "abort" and ev[1] == step and admitted:
                rid = sorted(admitted)[ev[2] % len(admitted)]
                if sched.abort(rid):
                    finished[rid] = 6
        out = sched.schedule()
        assert sched.num_running <= cfg["max_num_seqs"]
        for rid in out.req_ids.tolist():
            first_scheduled.setdefault(rid, step)
        if drafter is None:
            ids, toks = runner.execute(out)
            res = sched.update(ids, toks)
            runner.commit(ids, toks)
        else:
            rows = runner.execute_rows(out)
            drafts = [drafter.propose(runner.tokens[rid] + toks) for rid, toks in rows]
            res = sched.update(np.asarray([rid for rid, _ in rows], np.int64), *csr([t for _, t in rows]),
                               *csr(drafts))
            runner.commit_rows(rows, res.num_appended)
        finished.update(zip(res.finished_ids.tolist(), res.finish_reasons.tolist()))
        if step > last_event and not sched.has_unfinished():
            stats = sched.stats()
            assert stats["num_free_blocks"] == cfg["num_blocks"] - 1, "a block leaked"
            assert set(finished) == set(admitted), "an admitted request never finished"
            outputs = {rid: runner.tokens[rid] for rid in admitted}
            return dict(admitted=admitted, first=first_scheduled, finished=finished, outputs=outputs,
                        stats=stats)
    raise AssertionError("requests did not finish")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), events=traces())
def test_invariants_hold_on_random_traces(cfg, events):
    drive(cfg, events)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(policies=("fcfs",)), events=traces(allow_children=False, allow_aborts=False))
def test_fcfs_admits_in_arrival_order(cfg, events):
    r = drive(cfg, events)
    order = sorted(r["admitted"], key=lambda rid: (r["admitted"][rid], rid))
    firsts = [r["first"][rid] for rid in order if rid in r["first"]]
    assert firsts == sorted(firsts)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), events=traces(allow_aborts=False))
def test_forced_hash_collisions_never_give_a_wrong_prefix(cfg, events):
    # Mask 0: every block hashes to one table key; hits must still be confirmed by token ids.
    drive(dict(cfg, enable_prefix_caching=True), events, hash_mask=0)
    drive(dict(cfg, enable_prefix_caching=True), events, hash_mask=0x3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(policies=("fcfs", "priority")), events=traces(max_requests=12, allow_aborts=False))
def test_preemption_does_not_change_outputs(cfg, events):
    roomy = drive(dict(cfg, num_blocks=400), events)
    small = max(6, cfg["num_blocks"] // 4)
    tight_cfg = dict(cfg, num_blocks=small, max_model_len=min(cfg["max_model_len"], (small - 1) * cfg["block_size"]))
    tight = drive(tight_cfg, events)
    for rid in tight["admitted"]:
        if rid in roomy["admitted"]:
            assert tight["outputs"][rid] == roomy["outputs"][rid]
            assert tight["finished"][rid] == roomy["finished"][rid]


def test_prefix_hits_are_counted_and_reused():
    cfg = dict(num_blocks=32, block_size=4, max_num_batched_tokens=64, max_num_seqs=4, max_model_len=64)
    prompt = list(range(1, 14))  # 13 tokens: 3 full blocks
    events = [("add", 0, dict(prompt=prompt, max_tokens=2, min_tokens=0, priority=0, eos=(), stop=(),
                              ignore_eos=False, n=1)),
              ("add", 5, dict(prompt=prompt[:12] + [5, 6], max_tokens=2, min_tokens=0, priority=0, eos=(),
                              stop=(), ignore_eos=False, n=1))]
    r = drive(cfg, events)
    assert r["stats"]["prefix_cache_hits"] == 12      # three blocks of the second prompt
    assert r["stats"]["prefix_cache_queries"] == 13 + 14
    np.testing.assert_allclose(r["stats"]["prefix_cache_hit_rate"], 12 / 27)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(policies=("fcfs", "priority")), events=traces(max_requests=12, allow_aborts=False),
       seed=st.integers(0, 2**31), tight=st.booleans())
def test_speculation_keeps_the_invariants_and_the_outputs(cfg, events, seed, tight):
    # Oracle: the outputs without speculation; FakeRunner checks every context position's KV.
    if tight:  # block pressure: lookahead competes with preemption
        small = max(6, cfg["num_blocks"] // 4)
        cfg = dict(cfg, num_blocks=small, max_model_len=min(cfg["max_model_len"], (small - 1) * cfg["block_size"]))
    plain = drive(cfg, events)
    spec = drive(cfg, events, drafter=RandomDrafter(seed))
    assert spec["outputs"] == plain["outputs"]
    assert spec["finished"] == plain["finished"]
