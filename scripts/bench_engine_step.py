# SPDX-License-Identifier: Apache-2.0
"""Benchmark of one engine step on a tiny random Llama (CPU), not a test.

``LLMEngine.step()`` = schedule() + the step message (new requests) + the runner (executor ->
worker -> model on a 2-layer, 64-wide random Llama, so the model costs little) + update() + the
per-request output processing. ``--running`` requests decode greedily with ``ignore_eos`` and a
queue of ``--waiting`` more wait behind them (admitted as the running ones finish, as in serving);
the timed steps start once the running set is full. Prints p50 / p99 per step and of the step
without the runner's ``execute()`` (the engine's own part: scheduler, messages, outputs) as a
Markdown table.

    python scripts/bench_engine_step.py [--running 64 256] [--steps 200] [--clock wall|cpu]
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

TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=2)


def run(running: int, waiting: int, steps: int, clock, weights) -> tuple[list[float], list[float]]:
    from mindie_llm import LLM, SamplingParams

    llm = LLM(load_format="dummy", dtype="float32", max_model_len=1024, block_size=16, loaded_model=weights,
              max_num_seqs=running, max_num_batched_tokens=2048, num_blocks=running * 1024 // 16 + 64)
    engine = llm.engine
    rng = np.random.default_rng(0)
    for i in range(running + waiting):
        prompt = rng.integers(3, 256, int(rng.integers(8, 64))).tolist()
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=int(rng.integers(400, 900)),
                                                           ignore_eos=True))
    execute = engine.executor.execute
    in_runner = [0.0]

    def timed_execute(out):
        t = clock()
        try:
            return execute(out)
        finally:
            in_runner[0] += clock() - t

    engine.executor.execute = timed_execute
    gc.collect()
    times: list[float] = []
    own: list[float] = []
    warm = False
    while len(times) < steps:
        in_runner[0] = 0.0
        t0 = clock()
        engine.step()
        t1 = clock()
        if warm:
            times.append(t1 - t0)
            own.append(t1 - t0 - in_runner[0])
        warm = warm or engine.scheduler.num_running >= running
        if not engine.has_unfinished_requests():
            raise RuntimeError("ran out of requests: lengthen them")
    return times, own


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--running", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--waiting", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()

    import torch

    from mindie_llm.config import ModelConfig
    from mindie_llm.loader import load_model

    torch.set_num_threads(1)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    weights = load_model(ModelConfig(load_format="dummy", seed=3), "cpu", "float32", progress=False, hf_config=TINY)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {platform.machine()} python {platform.python_version()} torch {torch.__version__}, 1 thread, "
          f"{args.steps} timed steps, {args.clock} clock, load average {load}\n")
    print("| running | step p50 us | step p99 us | without the runner p50 us | without the runner p99 us |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for running in args.running:
        t, own = (np.asarray(x) * 1e6 for x in run(running, args.waiting, args.steps, clock, weights))
        print(f"| {running} | {np.percentile(t, 50):.0f} | {np.percentile(t, 99):.0f} | "
              f"{np.percentile(own, 50):.0f} | {np.percentile(own, 99):.0f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
