# SPDX-License-Identifier: Apache-2.0
"""Benchmark of the C++ scheduler against the pure-Python reference scheduler (not a test).

A synthetic trace keeps ``--running`` requests running (prompts 64-2048 tokens drawn over shared
system-prompt prefixes, outputs 16-1024 tokens, block 16, prefix caching on, SplitFuse with a
token budget) and times ``schedule()`` + ``update()`` of every step once the running set is full,
for the C++ scheduler (through its Python facade) and for the reference
(tests/unit/scheduler/reference_scheduler.py) driven by the same trace. Prints p50 / p99 in
microseconds per step and the speed-up as a Markdown table. ``--drafts K``: every sampling row
proposes K tokens for the next step and accepts a pseudo-random 0..K of them (the speculative path:
lookahead slots, multi-token update, rollback).

    python scripts/bench_scheduler.py [--running 256 1024] [--steps 200] [--budget 8192] [--clock wall|cpu]
                                      [--drafts K]
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "tests" / "unit" / "scheduler"))

from mindie_llm.scheduler import Scheduler, SchedulerCoreConfig  # noqa: E402
from reference_scheduler import RefScheduler  # noqa: E402

BLOCK = 16
VOCAB = 32000


def make_trace(num_requests: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt, max_tokens) pairs: prompts 64-2048 tokens, each starting with one of 8 shared
    system prompts (32-512 tokens), outputs 16-1024 tokens."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(1, VOCAB, int(rng.integers(32, 513))).tolist() for _ in range(8)]
    trace = []
    for _ in range(num_requests):
        length = int(rng.integers(64, 2049))
        prefix = systems[int(rng.integers(0, len(systems)))][:length]
        prompt = prefix + rng.integers(1, VOCAB, length - len(prefix)).tolist()
        trace.append((prompt, int(rng.integers(16, 1025))))
    return trace


def next_tokens(n: int, step: int) -> np.ndarray:
    # Never 0 (no EOS in the trace): requests end at max_tokens.
    return (np.arange(n, dtype=np.int32) * 7 + step) % (VOCAB - 1) + 1


def step_result(ids: list[int], spec: list[list[int]], step: int, drafts: int):
    """Accepted tokens per row (a pseudo-random prefix of its proposals plus one new token) and the
    next proposals, as lists."""
    toks = next_tokens(len(ids), step).tolist()
    rows = [p[:(i * 5 + step) % (len(p) + 1)] + [t] for i, (p, t) in enumerate(zip(spec, toks))]
    return rows, [[(t * 3 + j) % (VOCAB - 1) + 1 for j in range(drafts)] for t in toks]


def csr(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(rows) + 1, np.int32)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    return offsets, np.asarray([t for r in rows for t in r], np.int32)


def run(sched, trace, running: int, steps: int, is_ref: bool, clock, drafts: int = 0) -> tuple[list[float], float]:
    """Adds the whole trace, steps until `running` requests run (warm-up, untimed), then times the
    next `steps` steps. Returns the per-step times and the mean number running while timed."""
    for rid, (prompt, max_tokens) in enumerate(trace, start=1):
        if is_ref:
            sched.add_request(rid, prompt, max_tokens, arrival_time=float(rid))
        else:
            sched.add_request(rid, np.asarray(prompt, np.int32), max_tokens, arrival_time=float(rid))
    gc.collect()
    gc.freeze()  # the trace's millions of list items would otherwise make GC passes slow and random
    times: list[float] = []
    counts: list[int] = []
    step, warm = 0, False
    while len(times) < steps:
        t0 = clock()
        out = sched.schedule()
        t1 = clock()
        if drafts:
            offs = out["spec_offsets"] if is_ref else out.spec_offsets.tolist()
            spec_ids = out["spec_token_ids"] if is_ref else out.spec_token_ids.tolist()
            mask = out["sample_mask"] if is_ref else out.sample_mask.tolist()
            rids = out["req_ids"] if is_ref else out.req_ids.tolist()
            ids = [r for r, m in zip(rids, mask) if m]
            spec = [spec_ids[offs[i]:offs[i + 1]] for i, m in enumerate(mask) if m]
            rows, props = step_result(ids, spec, step, drafts)
            args = (ids, rows, props) if is_ref else (np.asarray(ids, np.int64), *csr(rows), *csr(props))
        elif is_ref:
            ids = [r for r, m in zip(out["req_ids"], out["sample_mask"]) if m]
            args = (ids, next_tokens(len(ids), step).tolist())
        else:
            ids = out.req_ids[out.sample_mask]
            args = (ids, next_tokens(len(ids), step))
        t2 = clock()
        sched.update(*args)
        t3 = clock()
        num_running = len(sched.running) if is_ref else sched.num_running
        num_waiting = len(sched.waiting) if is_ref else sched.num_waiting
        if warm:
            times.append((t1 - t0) + (t3 - t2))
            counts.append(num_running)
        warm = warm or num_running >= running
        if num_waiting == 0:
            raise RuntimeError("the trace ran out of waiting requests: lengthen it")
        step += 1
    return times, float(np.mean(counts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--running", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--steps", type=int, default=200, help="timed steps per configuration")
    ap.add_argument("--budget", type=int, default=8192, help="max_num_batched_tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reference", action="store_true", help="time the C++ scheduler only")
    ap.add_argument("--drafts", type=int, default=0, help="proposed tokens per sampling row (0: no speculation)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter; cpu: this thread's CPU time (less noisy on a shared machine)")
    args = ap.parse_args()

    print(f"machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()}")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"block {BLOCK}, max_num_batched_tokens {args.budget}, prefix caching on, {args.steps} timed steps, "
          f"{args.clock} clock, {args.drafts} proposed tokens per row, load average {load}\n")
    print("running: max_num_seqs (mean running while timed)\n")
    print("| running | C++ p50 us | C++ p99 us | Python ref p50 us | Python ref p99 us | speed-up (p50) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for running in args.running:
        trace = make_trace(running * 2 + args.steps * 8, args.seed)
        num_blocks = running * (2048 + 1024) // BLOCK + 1
        cfg = dict(num_blocks=num_blocks, block_size=BLOCK, max_num_batched_tokens=args.budget,
                   max_num_seqs=running, max_model_len=2048 + 1024)
        cpp_times, mean_running = run(Scheduler(SchedulerCoreConfig(**cfg)), trace, running, args.steps, False, clock,
                                      args.drafts)
        cpp = np.asarray(cpp_times) * 1e6
        c50, c99 = np.percentile(cpp, 50), np.percentile(cpp, 99)
        if args.no_reference:
            print(f"| {running} ({mean_running:.0f}) | {c50:.1f} | {c99:.1f} | - | - | - |")
            continue
        ref = np.asarray(run(RefScheduler(**cfg), trace, running, args.steps, True, clock, args.drafts)[0]) * 1e6
        r50, r99 = np.percentile(ref, 50), np.percentile(ref, 99)
        print(f"| {running} ({mean_running:.0f}) | {c50:.1f} | {c99:.1f} | {r50:.0f} | {r99:.0f} | {r50 / c50:.0f}x |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
