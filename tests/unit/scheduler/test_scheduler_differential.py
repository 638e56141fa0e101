# SPDX-License-Identifier: Apache-2.0
"""Differential test: the C++ scheduler against the pure-Python reference_scheduler.RefScheduler
(the oracle), driven in lock-step by randomized hypothesis traces; every step's decisions (the
whole SchedulerOutput), every update() result and the block statistics must be identical. With
speculation, random drafts (scheduler_harness.RandomDrafter) are verified greedily, so rows take
0, some or all of their proposals; the outputs must then also equal those without speculation."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mindie_llm.scheduler import RequestRejectedError, Scheduler, SchedulerCoreConfig
from scheduler_harness import RandomDrafter, configs, csr, fake_next_token, greedy_verify, traces
from reference_scheduler import RefScheduler

FIELDS = ("req_ids", "num_scheduled_tokens", "num_computed_tokens", "input_token_ids", "spec_offsets",
          "spec_token_ids", "sample_mask", "block_table_reset", "new_block_offsets", "new_block_ids",
          "preempted_ids", "finished_ids", "finish_reasons")
STAT_KEYS = ("num_free_blocks", "num_cached_blocks", "prefix_cache_queries", "prefix_cache_hits",
             "num_preemptions", "num_waiting", "num_running")


def _add(sched, ref, rid, kw, parent, arrival):
    args = dict(min_tokens=kw["min_tokens"], priority=kw["priority"], arrival_time=arrival,
                eos_token_ids=kw["eos"], stop_token_ids=kw["stop"], ignore_eos=kw["ignore_eos"], parent_id=parent)
    try:
        ref.add_request(rid, kw["prompt"], kw["max_tokens"], **args)
        ref_ok = True
    except ValueError:
        ref_ok = False
    try:
        sched.add_request(rid, kw["prompt"], kw["max_tokens"], **args)
        ok = True
    except RequestRejectedError:
        ok = False
    assert ok == ref_ok, f"admission of {rid} differs: C++ {ok}, reference {ref_ok}"
    return ok


def run_lockstep(cfg: dict, events: list, max_steps: int = 400, drafter: RandomDrafter | None = None):
    """Returns (final tokens, finish reason) per admitted request."""
    sched, ref = Scheduler(SchedulerCoreConfig(**cfg)), RefScheduler(**cfg)
    reasons: dict[int, int] = {}
    tokens: dict[int, list[int]] = {}
    ids: list[int] = []
    next_id = 1
    for step in range(max_steps):
        for ev in events:
            if ev[1] != step:
                continue
            if ev[0] == "add":
                kw = ev[2]
                parent = -1
                for k in range(kw["n"]):
                    rid, next_id = next_id, next_id + 1
                    if _add(sched, ref, rid, kw, parent, float(step)):
                        tokens[rid] = list(kw["prompt"])
                        ids.append(rid)
                        parent = rid if k == 0 else parent
            elif ev[0] == "abort" and ids:
                rid = ids[ev[2] % len(ids)]
                assert sched.abort(rid) == ref.abort(rid)
        out = sched.schedule()
        expect = ref.schedule()
        for name in FIELDS:
            got = getattr(out, name).tolist()
            assert got == expect[name], f"step {step} {name}: C++ {got} != reference {expect[name]}"
        assert out.num_batched_tokens == len(expect["input_token_ids"])
        fails = [ev[2] for ev in events if ev[0] == "fail" and ev[1] == step]
        fail, fail_abort = bool(fails) and bool(out.sample_mask.any()), bool(fails) and fails[0]
        if fail:
            # The engine's path after a failed forward: empty update, then abort the step's rows.
            res, (ref_done, _) = sched.update(np.zeros(0, np.int64), np.zeros(0, np.int32)), ref.update([], [])
            # Or, where the engine retries, keep them: their chunks are computed again.
            for rid in out.req_ids.tolist() if fail_abort else []:
                assert sched.abort(rid) == ref.abort(rid)
        elif drafter is None:
            rows = out.req_ids[out.sample_mask].tolist()
            toks = [fake_next_token(tokens[r]) for r in rows]
            res = sched.update(np.asarray(rows, np.int64), np.asarray(toks, np.int32))
            ref_done, _ = ref.update(rows, toks)
            for r, t in zip(rows, toks):
                tokens[r].append(t)
        else:
            rows, accepted = [], []
            for i, r in enumerate(out.req_ids.tolist()):
                if out.sample_mask[i]:
                    rows.append(r)
                    accepted.append(greedy_verify(tokens[r], out.spec_token_ids[
                        out.spec_offsets[i]:out.spec_offsets[i + 1]].tolist()))
            drafts = [drafter.propose(tokens[r] + a) for r, a in zip(rows, accepted)]
            (offsets, flat), (d_offsets, d_flat) = csr(accepted), csr(drafts)
            res = sched.update(np.asarray(rows, np.int64), offsets, flat, d_offsets, d_flat)
            ref_done, ref_appended = ref.update(rows, accepted, drafts)
            assert res.num_appended.tolist() == ref_appended
            for r, a, n in zip(rows, accepted, res.num_appended.tolist()):
                assert 1 <= n <= len(a)
                tokens[r] += a[:n]
        assert list(zip(res.finished_ids.tolist(), res.finish_reasons.tolist())) == ref_done
        reasons.update(ref_done)
        stats, ref_stats = sched.stats(), ref.stats()
        assert {k: stats[k] for k in STAT_KEYS} == ref_stats, f"step {step}"
        if not sched.has_unfinished() and step > max(ev[1] for ev in events):
            assert stats["num_free_blocks"] == cfg["num_blocks"] - 1, "blocks leaked"
            return {rid: (tokens[rid], reasons.get(rid)) for rid in ids}
    raise AssertionError("requests did not finish within max_steps")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), events=traces())
def test_cpp_matches_reference_on_random_traces(cfg, events):
    run_lockstep(cfg, events)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(policies=("fcfs",)), events=traces(max_requests=16, allow_aborts=False))
def test_cpp_matches_reference_under_block_pressure(cfg, events):
    cfg = dict(cfg, num_blocks=max(6, cfg["num_blocks"] // 4), max_model_len=min(cfg["max_model_len"],
               (max(6, cfg["num_blocks"] // 4) - 1) * cfg["block_size"]))
    run_lockstep(cfg, events)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), events=traces(), seed=st.integers(0, 2**31), p_right=st.sampled_from([0.0, 0.5, 0.9, 1.0]))
def test_cpp_matches_reference_with_speculation(cfg, events, seed, p_right):
    run_lockstep(cfg, events, drafter=RandomDrafter(seed, p_right=p_right))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(policies=("fcfs", "priority")), events=traces(allow_aborts=False), seed=st.integers(0, 2**31))
def test_speculation_does_not_change_outputs(cfg, events, seed):
    # Oracle: the same trace without speculation (greedy verification must give the same tokens
    # and the same finish reasons, with stops landing inside accepted runs).
    plain = run_lockstep(cfg, events)
    spec = run_lockstep(cfg, events, drafter=RandomDrafter(seed))
    assert spec == plain
