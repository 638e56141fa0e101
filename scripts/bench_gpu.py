#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""GPU benchmark of the CUDA backend: checks, then measures, then prints one table.

One call on the GPU machine, from the repository root (the C++ scheduler extension built in place):

    PYTHONPATH=python python3 scripts/bench_gpu.py --out $OUT [--hf-peers path/to/hf_peers.py]
        [--vllm-log vllm.log]     # vllm_peer.py's output on the same card (else the issue's figures)

Sections (``--sections``, comma separated, all by default):
  ceilings   copy bandwidth and bf16 GEMM rate of this card (the floors below use these)
  tests      tests/unit/backends/cuda on the GPU (every kernel vs ops/reference.py; the whole model
             vs the CPU reference backend and vs transformers)
  gemv       each M=1 linear of Llama-3-8B (qkv, o_proj, gate_up, down, LM head): cuBLAS, the
             previous GEMV tiles and the current ones, replayed from a CUDA graph over enough
             different weights that the L2 is cold for each, against the copy floor; the chosen
             tile checked against float64 matmul on the card (``--gemv-sweep``: a wider tile grid)
  kernels    each kernel at Llama-3-8B shapes against its byte floor
  bs1        Llama-3-8B batch-1 decode only, with the decode graph's kernel profile (kernels per
             step, time per kernel): runs on any tree of this package (``--label`` names it)
  8b         Llama-3-8B shapes, random bf16 weights: batch-1 decode, TTFT, offline throughput,
             continuous vs static (uniform and log-normal outputs), SplitFuse vs prefill_first
             under Poisson load, KV waste, profiles
  1b         Llama-3.2-1B shapes: batch-1 decode
  idle       Llama-3-8B offline 256 x (64-512 -> 128) with asynchronous scheduling off and on: out
             tok/s and the GPU idle time between steps (CUDA events, executor/step_timer.py)
  peers      transformers on the same card (the ``--hf-peers`` script), run after ours
  quant      (not in the default list) Llama-3-8B per quantization scheme (``--quant-schemes``: bf16,
             w4a16, w8a8, fp8, kv-int8, kv-fp8): M=1 linears of each scheme against their byte floor
             (the W4A16 GEMV tiles swept), then batch-1 decode and the offline workload per scheme

Environment switches: ``BENCH_NO_PROFILE=1`` skips the torch-profiler tables; ``BENCH_NO_KV_SAMPLE=1``
skips the KV-waste sampling of the offline workload (its ``scheduler.get_block_ids`` calls between
steps ended runs on an H200 with a segmentation fault, 2026-12-01; open).

Workloads copy vLLM's peer script (token-id prompts from random.Random(seed), ignore EOS, no
detokenization) so that the figures compare. Every figure is printed as a JSON line as it is
measured and the table at the end; with ``--out`` both also go to files there.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import traceback

import numpy as np
import torch

ROWS: list[dict] = []
LOG = None
# vLLM 0.25 figures the comparisons use: the issue's, unless --vllm-log names vllm_peer.py output
ISSUE_VLLM = {"bs1": 211.6, "ttft": 29.9, "offline": 10031.0, "varied": 10963.0, "bs1_1b": 481.0}   # H200
VLLM_SRC = ["issue"]
_PEER_KEYS = {("llama3-8b", "vllm_bs1_tok_s"): "bs1", ("llama3-8b", "vllm_ttft_1024_ms"): "ttft",
              ("llama3-8b", "vllm_offline_out_tok_s"): "offline",
              ("llama3-8b", "vllm_offline_varied_out_tok_s"): "varied", ("llama3.2-1b", "vllm_bs1_tok_s"): "bs1_1b"}


def load_vllm_log(path: str) -> None:
    """Reads vllm_peer.py's JSON lines (one figure a line; other lines ignored) into ISSUE_VLLM."""
    found = 0
    with open(path) as f:
        for line in f:
            if not line.startswith("{"):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            key = _PEER_KEYS.get((row.get("model"), row.get("figure")))
            if key is not None:
                ISSUE_VLLM[key] = float(row["value"])
                found += 1
    if not found:
        raise ValueError(f"--vllm-log: no vllm_peer.py figures in {path}")
    VLLM_SRC[0] = "same card"


LABEL = [""]


def emit(figure: str, value, unit: str = "", floor=None, note: str = "", **extra) -> None:
    row = dict(figure=LABEL[0] + figure, value=value, unit=unit, floor=floor, note=note, **extra)
    ROWS.append(row)
    line = json.dumps(row, default=str)
    print(line, flush=True)
    if LOG:
        LOG.write(line + "\n")
        LOG.flush()


def guarded(name: str):
    def deco(fn):
        def run(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            except Exception as e:  # one failing section must not lose the others' figures
                emit(f"{name}: FAILED", repr(e)[:300])
                traceback.print_exc()
            finally:
                print(f"# section {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        return run
    return deco


def prompts(n, lo, hi, vocab, seed=1):
    r = random.Random(seed)
    return [[r.randrange(10, vocab) for _ in range(r.randint(lo, hi))] for _ in range(n)]


# ---------------------------------------------------------------------------------------- ceilings
CEIL = {"bw": 3.0e12, "flops": 7.9e14}


@guarded("ceilings")
def ceilings() -> None:
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(10):
        y.copy_(x)
    e.record()
    torch.cuda.synchronize()
    CEIL["bw"] = 2 * x.numel() * 10 / (s.elapsed_time(e) / 1e3)
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    s.record()
    for _ in range(10):
        a @ b
    e.record()
    torch.cuda.synchronize()
    CEIL["flops"] = 2 * 8192 ** 3 * 10 / (s.elapsed_time(e) / 1e3)
    emit("copy bandwidth (read+write)", round(CEIL["bw"] / 1e12, 3), "TB/s")
    emit("bf16 GEMM 8192^3", round(CEIL["flops"] / 1e12, 1), "TFLOP/s")


# ---------------------------------------------------------------------------------------- tests
@guarded("tests")
def run_tests(out_dir: str | None) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit/backends/cuda"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    tail = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-300:]
    if out_dir:
        with open(os.path.join(out_dir, "tests.log"), "w") as f:
            f.write(res.stdout + res.stderr)
    if res.returncode != 0:
        print(res.stdout[-6000:], res.stderr[-3000:])
    emit("GPU correctness tests (tests/unit/backends/cuda)", tail, note=f"rc={res.returncode}")


# ---------------------------------------------------------------------------------------- gemv
GEMV_SHAPES_8B = (("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
                  ("lm_head", 128256, 4096))


def sweep_tiles() -> list[tuple[int, int, int]]:
    return [(bn, bk, nw) for bn in (1, 2, 4, 8, 16) for bk in (512, 1024, 2048, 4096) for nw in (4, 8)
            if bn * bk <= 16384 and bn * bk >= 2048]


@guarded("gemv")
def gemv_section(wide: bool) -> None:
    """M=1 linears at the 8B shapes, each variant replayed from one CUDA graph over several weights."""
    import torch.nn.functional as F

    from mindie_llm.backends.cuda import gemv as g, pdl
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    bw = CEIL["bw"]
    total_floor = total_best = total_blas = 0.0
    counts = {"qkv": 32, "o_proj": 32, "gate_up": 32, "down": 32, "lm_head": 1}
    stream = torch.cuda.Stream()
    for name, n, k in GEMV_SHAPES_8B:
        per = n * k * 2
        copies = max(1, -(-2 * l2 // per))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        calls = [ws[i % copies] for i in range(max(8, copies))]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        odt = torch.float32 if name == "lm_head" else None
        t_blas = g.time_in_graph([(lambda w=w: F.linear(x, w)) for w in calls], reps=30, stream=stream)

        def best_of(tiles):
            best = (float("inf"), None)
            for tile in tiles:
                try:
                    t = g.time_in_graph([(lambda w=w: g.gemv(x, w, None, tile, out_dtype=odt)) for w in calls], reps=30, stream=stream)
                except Exception as e:   # e.g. out of registers
                    print(f"# gemv {name} {tile}: {e!r}"[:200])
                    continue
                print(f"# gemv {name} N={n} K={k} {tile}: {t * 1e6:.2f} us ({per / t / 1e12:.2f} TB/s)", flush=True)
                best = min(best, (t, tile))
            return best

        t_old, tile_old = best_of(g.LEGACY_TILES)
        cand = sorted(set(g.GEMV_TILES) | (set(sweep_tiles()) if wide else set()))
        t_new, tile_new = best_of(cand)
        t_rep = g.time_in_graph([(lambda w=w: g.gemv(x, w, None, tile_new, out_dtype=odt)) for w in calls], reps=30, stream=stream)
        floor = per / bw
        t_pdl, pdl_note = float("inf"), "PDL not supported"
        if pdl.supported():
            t_pdl = g.time_in_graph([(lambda w=w: g.gemv(x, w, None, tile_new, out_dtype=odt, pdl=True)) for w in calls],
                                    reps=30, stream=stream)
            pdl_note = f"as programmatic dependents {t_pdl * 1e6:.2f} us ({floor / t_pdl * 100:.0f}%)"
        t_new = min(t_new, t_pdl)
        xr = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)           # fresh input for the check
        out = torch.full((1, n), float("nan"), device="cuda")
        out.copy_(g.gemv(xr, ws[0], None, tile_new, out_dtype=odt).float())
        ref = xr.double() @ ws[0].double().T
        err = float((out.double() - ref).norm() / ref.norm())
        total_floor += counts[name] * floor
        total_best += counts[name] * min(t_new, t_blas)
        total_blas += counts[name] * t_blas
        emit(f"M=1 linear {name} N={n} K={k}", round(t_new * 1e6, 2), "us", round(floor * 1e6, 2),
             f"{floor / t_new * 100:.0f}% of copy bw (repeat {t_rep * 1e6:.2f} us); tile {tile_new}; "
             f"previous tiles {t_old * 1e6:.2f} us {tile_old}; cuBLAS {t_blas * 1e6:.2f} us "
             f"({floor / t_blas * 100:.0f}%); {pdl_note}; rel err vs float64 {err:.1e}; in graph, {copies} weights")
        del ws, calls
        torch.cuda.empty_cache()
    emit("8B decode linears, sum over the step (best of GEMV / cuBLAS)", round(total_best * 1e3, 3), "ms",
         round(total_floor * 1e3, 3), f"{total_floor / total_best * 100:.0f}% of copy bw; cuBLAS only "
                                      f"{total_blas * 1e3:.3f} ms")


# ---------------------------------------------------------------------------------------- kernels
@guarded("kernels")
def kernels() -> None:
    import triton.testing

    from mindie_llm.backends.cuda import activation, attention, norm, rotary
    bw = CEIL["bw"]
    bf = torch.bfloat16
    dev = "cuda"

    def bench(fn):   # replayed from a CUDA graph: launch overhead out, as inside the decode graphs
        fn()
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e-3   # s

    def row(name, secs, nbytes):
        floor = nbytes / bw
        emit(f"kernel {name}", round(secs * 1e6, 1), "us", round(floor * 1e6, 1),
             f"{nbytes / secs / 1e9:.0f} GB/s, {secs / floor:.2f}x floor")

    for T in (1, 256, 2048):
        x = torch.randn(T, 4096, device=dev, dtype=bf)
        r = torch.randn_like(x)
        w = torch.randn(4096, device=dev, dtype=bf)
        row(f"fused_add_rms_norm T={T} H=4096", bench(lambda: norm.fused_add_rms_norm(x, r, w, 1e-5)),
            4 * x.numel() * 2)
    x = torch.randn(256, 2 * 14336, device=dev, dtype=bf)
    row("silu_and_mul T=256 I=14336", bench(lambda: activation.silu_and_mul(x)), x.numel() * 2 * 3 // 2)
    T, hq, hk, d, bs = 256, 32, 8, 128, 16
    qkv = torch.randn(T, (hq + 2 * hk) * d, device=dev, dtype=bf)
    cache = torch.randn(8192, d, device=dev)
    pos = torch.randint(0, 8192, (T,), device=dev)
    kv = torch.zeros(2, 4096, bs, hk, d, device=dev, dtype=bf)
    slots = torch.randperm(4096 * bs, device=dev)[:T]
    q, k, v = qkv[:, :hq * d], qkv[:, hq * d:(hq + hk) * d], qkv[:, (hq + hk) * d:]
    row("rotary+kv_write T=256 (8B heads)",
        bench(lambda: rotary.rotary_embedding_write_kv(pos, q, k, v, kv, slots, d, cache, True)),
        qkv.numel() * 2 * 2 + 2 * T * hk * d * 2)
    for B, ctx in ((1, 256), (1, 8192), (64, 1024), (256, 512)):
        nblk = -(-ctx // bs)
        kvc = torch.randn(2, B * nblk + 1, bs, hk, d, device=dev, dtype=bf)
        bt = (torch.arange(B * nblk, device=dev, dtype=torch.int32) + 1).view(B, nblk)
        qq = torch.randn(B, hq, d, device=dev, dtype=bf)
        qsl = torch.arange(B + 1, device=dev, dtype=torch.int32)
        sl = torch.full((B,), ctx, device=dev, dtype=torch.int32)
        nbytes = 2 * B * ctx * hk * d * 2 + 2 * qq.numel() * 2
        variants = [("split_kv=False", dict(split_kv=False)), ("split_kv=True two-pass", dict(split_kv=True,
                    merge="two_pass"))]
        if "merge" in attention.paged_attention_raw.__code__.co_varnames:
            cnt = torch.zeros(B * hk, dtype=torch.int32, device=dev)
            variants.append(("split_kv=True merged in-kernel", dict(split_kv=True, counters=cnt)))
        else:
            variants[1] = ("split_kv=True", dict(split_kv=True))
        for label, kw in variants:
            row(f"paged_attention decode B={B} ctx={ctx} {label}",
                bench(lambda: attention.paged_attention_raw(qq, kvc, qsl, sl, bt, B, 1, d ** -0.5, **kw)), nbytes)
    prefill_sweep(bench)


def prefill_sweep(bench) -> None:
    """Tile choices of the prefill attention (causal, one sequence, 8B heads); the fastest for the
    1024-token prompt is reported (the default attention.PREFILL_TILE was the best on the cards measured)."""
    from mindie_llm.backends.cuda import attention
    hq, hk, d, bs, dev = 32, 8, 128, 16, "cuda"
    best = {}
    for L in (1024, 2048):
        nblk = L // bs
        kvc = torch.randn(2, nblk + 1, bs, hk, d, device=dev, dtype=torch.bfloat16)
        bt = (torch.arange(nblk, device=dev, dtype=torch.int32) + 1)[None]
        qq = torch.randn(L, hq, d, device=dev, dtype=torch.bfloat16)
        qsl = torch.tensor([0, L], device=dev, dtype=torch.int32)
        sl = torch.tensor([L], device=dev, dtype=torch.int32)
        flops = 4 * L * L / 2 * hq * d
        for bm in (64, 128):
            for tn in (32, 64):
                for nw in (4,):
                    for st in (2, 3):
                        cfg = {"block_m": bm, "tile_n": tn, "num_warps": nw, "num_stages": st}
                        attention.PREFILL_TILE = cfg
                        try:
                            secs = bench(lambda: attention.paged_attention_raw(qq, kvc, qsl, sl, bt, 1, L, d ** -0.5))
                        except Exception as e:  # e.g. out of shared memory
                            print(f"# prefill tile {cfg}: {e!r}"[:200])
                            continue
                        print(f"# prefill L={L} {cfg}: {secs * 1e6:.1f} us", flush=True)
                        if L not in best or secs < best[L][0]:
                            best[L] = (secs, dict(cfg))
        secs, cfg = best[L]
        emit(f"kernel paged_attention prefill L={L} (causal, best tile)", round(secs * 1e6, 1), "us",
             round(flops / CEIL["flops"] * 1e6, 1), f"{flops / secs / 1e12:.0f} TFLOP/s, {cfg}")
    attention.PREFILL_TILE = best[1024][1]     # the engines have run by now (kernels is the last section)


# ---------------------------------------------------------------------------------------- engine
def make_engine(shape: str, **over):
    from mindie_llm.config import EngineConfig
    from mindie_llm.engine.llm_engine import LLMEngine

    kw = dict(model=shape, load_format="dummy", dtype="bfloat16", device="cuda", max_model_len=4096,
              max_num_seqs=256, max_num_batched_tokens=8192, gpu_memory_utilization=0.9)
    kw.update(over)
    t0 = time.perf_counter()
    eng = LLMEngine(EngineConfig.from_kwargs(**kw))     # dummy weights: no tokenizer, token ids in
    gm = getattr(eng.runner, "graph_model", None)
    emit(f"{shape} engine start-up", round(time.perf_counter() - t0, 1), "s",
         note=f"{eng.num_kv_blocks} KV blocks, {len(gm.graphs) if gm else 0} decode graphs "
              f"({getattr(eng.runner, 'graph_capture_s', 0):.1f} s), runner {type(eng.runner).__name__}")
    for (n, k, dt), rep in getattr(eng.runner, "gemv_report", {}).items():
        t_blas, t_gemv, tile = rep[:3]
        pdl = " PDL" if len(rep) > 3 and rep[3] else ""
        floor_us = n * k * 2 / CEIL["bw"] * 1e6                     # weight bytes at the copy rate
        emit(f"{shape} M=1 linear N={n} K={k}", round(min(t_blas, t_gemv), 1), "us", round(floor_us, 1),
             f"cuBLAS {t_blas:.1f} us, best Triton GEMV {t_gemv:.1f} us -> {'GEMV ' + str(tile) + pdl if tile else 'cuBLAS'}"
             " (start-up timing)")
    return eng


def set_scheduler(eng, **kw) -> None:
    from mindie_llm.scheduler import Scheduler, SchedulerCoreConfig
    base = dict(num_blocks=eng.num_kv_blocks, block_size=eng.block_size,
                max_num_batched_tokens=eng.max_num_batched_tokens, max_num_seqs=eng.max_num_seqs,
                max_model_len=eng.max_model_len, enable_prefix_caching=True, enable_chunked_prefill=True,
                policy="fcfs", role="colocated")
    base.update(kw)
    eng.scheduler = Scheduler(SchedulerCoreConfig(**base))


GC_PAUSE = [0.0, 0]


def _gc_timer(phase, info, _t=[0.0]):
    if phase == "start":
        _t[0] = time.perf_counter()
    else:
        GC_PAUSE[0] += time.perf_counter() - _t[0]
        GC_PAUSE[1] += 1


def run(eng, ps, outs, *, arrivals=None, kv_sample_every=0):
    """Runs requests to completion. Returns (seconds, output tokens, token times per request, kv samples)."""
    from mindie_llm.sampling_params import SamplingParams
    n = len(ps)
    order = sorted(range(n), key=lambda i: arrivals[i]) if arrivals else list(range(n))
    times: dict[str, list[float]] = {}
    seen: dict[str, int] = {}
    waste = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    nxt, steps = 0, 0
    while nxt < n or eng.has_unfinished_requests():
        now = time.perf_counter() - t0
        while nxt < n and (arrivals is None or arrivals[order[nxt]] <= now):
            i = order[nxt]
            rid = f"r{i}"
            eng.add_request(rid, ps[i], SamplingParams(temperature=0.0, max_tokens=outs[i], min_tokens=outs[i],
                                                       ignore_eos=True))
            times[rid] = [time.perf_counter()]
            nxt += 1
        if not eng.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[order[nxt]] - (time.perf_counter() - t0)))
            continue
        for o in eng.step():
            k = len(o.outputs[0].token_ids)
            if k > seen.get(o.request_id, 0):
                seen[o.request_id] = k
                times[o.request_id].append(time.perf_counter())
        steps += 1
        if kv_sample_every and steps % kv_sample_every == 0:
            held = stored = 0
            for rid in list(eng.runner.batch.requests):
                try:
                    nb = len(eng.scheduler.get_block_ids(rid))
                    if nb:
                        held += nb * eng.block_size
                        stored += eng.scheduler.get_num_computed_tokens(rid)
                except Exception:
                    pass
            if held:
                waste.append(1.0 - stored / held)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, sum(seen.values()), times, waste


def gpu_idle(eng, ps, outs, label: str) -> tuple[float, float]:
    """Runs the workload with a StepTimer on the runner: CUDA events at each step's first and last
    device operation give the GPU time per step and the gaps between steps (the GPU waiting on the
    host). Emits "GPU idle between steps" (ms/step and % of wall) and the host's time per step;
    returns (out tok/s, idle % of wall)."""
    from mindie_llm.executor.step_timer import StepTimer
    timer = StepTimer(lambda: torch.cuda.Event(enable_timing=True))
    eng.runner.step_timer = timer
    try:
        dt, n, _, _ = run(eng, ps, outs)
    finally:
        eng.runner.step_timer = None
    s = timer.summary()
    emit(f"{label}: GPU idle between steps", round(s.idle_ms_per_step, 3), "ms/step",
         note=f"{s.idle_pct_of_wall:.1f}% of wall; {s.steps} steps, GPU busy {s.busy_ms / max(s.steps, 1):.2f} ms/step, "
              f"host {s.host_ms_per_step:.2f} ms/step; {n / dt:.0f} out tok/s")
    return n / dt, s.idle_pct_of_wall


def set_async(eng, on: bool) -> None:
    """Asynchronous scheduling on or off on a running engine: the runner's mode and a scheduler
    that hands out the lookahead slot (a fresh scheduler: call between runs only)."""
    eng.runner.set_async_scheduling(on)
    set_scheduler(eng, num_lookahead_slots=1 if on else 0)


@guarded("idle")
def bench_idle(out_dir: str | None) -> None:
    """Llama-3-8B offline 256 x (64-512 -> 128): out tok/s and GPU idle between steps with
    asynchronous scheduling off and on (one engine, the same requests)."""
    eng = make_engine("llama3-8b")
    V = eng.arch.vocab_size
    run(eng, prompts(8, 64, 128, V, seed=9), [8] * 8)                          # warm-up
    ps = prompts(256, 64, 512, V)
    res = {}
    for on in (False, True):
        set_async(eng, on)
        run(eng, prompts(16, 64, 128, V, seed=10), [8] * 16)                  # warm-up of the mode
        res[on] = gpu_idle(eng, ps, [128] * 256, f"8B offline 256 x (64-512 -> 128) async={'on' if on else 'off'}")
        if on:
            emit("async scheduling: steps queued ahead used / dropped",
                 f"{eng.runner.num_ahead_used} / {eng.runner.num_ahead_dropped}", "",
                 note=f"{eng.runner.num_ahead_trimmed} used without rows that had finished")
    set_async(eng, False)
    emit("async scheduling on / off, 8B offline", round(res[True][0] / res[False][0], 3), "x",
         note=f"idle {res[False][1]:.1f}% -> {res[True][1]:.1f}% of wall")
    del eng
    torch.cuda.empty_cache()


def weight_bytes(eng) -> int:
    """Bytes a decode step must read: every parameter except the input embedding (one row)."""
    tot = 0
    for name, p in eng.model.named_parameters():
        if "embed_tokens" in name and not eng.arch.tie_word_embeddings:
            continue
        tot += p.numel() * p.element_size()
    return tot


def decode_gpu_time(eng, bs: int = 1) -> float | None:
    gm = getattr(eng.runner, "graph_model", None)
    if not gm or bs not in gm.graphs:
        return None
    g = gm.graphs[bs]
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    g.replay()
    s.record()
    for _ in range(50):
        g.replay()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / 50 / 1e3


def profile(eng, ps, outs, path: str | None, label: str) -> None:
    if os.environ.get("BENCH_NO_PROFILE") == "1":      # the torch profiler can crash a long run
        return
    from torch.profiler import ProfilerActivity, profile as tprof
    with tprof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(eng, ps, outs)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18)
    cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
    if path:
        with open(path, "a") as f:
            f.write(f"\n===== {label}\n{table}\n----- by host time\n{cpu_table}\n")
    print(f"# profile {label}\n{table[:4000]}")


def host_profile(eng, ps, outs, path: str | None) -> None:
    if os.environ.get("BENCH_NO_PROFILE") == "1":
        return
    """Where the host's time goes in engine steps (cProfile, cumulative)."""
    import cProfile
    import io
    import pstats
    pr = cProfile.Profile()
    pr.enable()
    dt, n, _, _ = run(eng, ps, outs)
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(30)
    if path:
        with open(path, "a") as f:
            f.write(f"\n===== host cProfile: {len(ps)} requests x {outs[0]} new, {dt:.2f} s\n{buf.getvalue()}\n")


def graph_profile(eng, path: str | None, label: str, bs: int = 1, reps: int = 10) -> None:
    """Kernels of one decode-graph replay (batch ``bs``): count per step and mean time per kernel."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as tprof
    gm = getattr(eng.runner, "graph_model", None)
    if not gm or bs not in gm.graphs:
        return
    g = gm.graphs[bs]
    g.replay()
    torch.cuda.synchronize()
    with tprof(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            g.replay()
        torch.cuda.synchronize()
    evs = [e for e in prof.key_averages() if getattr(e, "device_type", None) == DeviceType.CUDA]
    n = sum(e.count for e in evs) / reps
    busy = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in evs) / reps
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    if path:
        with open(path, "a") as f:
            f.write(f"\n===== {label}: {reps} replays of the batch-{bs} decode graph\n{table}\n")
    print(f"# graph profile {label}\n{table[:5000]}")
    emit(f"{label}: kernels per decode step (graph, batch {bs})", round(n, 1), "",
         note=f"kernel time {busy / 1e3:.3f} ms per step (sum of kernel durations)")


def batch1(eng, prof_path: str | None, tag: str = "8B", vkey: str = "bs1") -> None:
    """Batch-1 decode figures of a warmed engine (vLLM's workload: 128-token prompt, 128 new)."""
    import gc
    V = eng.arch.vocab_size
    wb = weight_bytes(eng)
    GC_PAUSE[0], GC_PAUSE[1] = 0.0, 0
    gc.callbacks.append(_gc_timer)
    dt, n, times, _ = run(eng, prompts(1, 128, 128, V), [128])
    gc.callbacks.remove(_gc_timer)
    emit(f"{tag} batch-1: Python GC pauses during the run", round(GC_PAUSE[0] * 1e3, 1), "ms",
         note=f"{GC_PAUSE[1]} collections")
    floor = wb / CEIL["bw"]
    emit(f"{tag} batch-1 decode 128+128", round(n / dt, 1), "tok/s", round(1 / floor, 1),
         f"vLLM ({VLLM_SRC[0]}) {ISSUE_VLLM[vkey]}; {n / dt / ISSUE_VLLM[vkey]:.2f}x vLLM; weights {wb / 1e9:.2f} GB")
    t = times["r0"]
    itl = np.diff(t[2:])
    emit(f"{tag} batch-1: first token (prefill 128) / second token", round((t[1] - t[0]) * 1e3, 1), "ms",
         note=f"second {(t[2] - t[1]) * 1e3:.1f} ms")
    dt2, n2, t2, _ = run(eng, prompts(1, 128, 128, V, seed=31), [128])
    emit(f"{tag} batch-1 decode 128+128, repeat (fresh prompt)", round(n2 / dt2, 1), "tok/s",
         note=f"first token {(t2['r0'][1] - t2['r0'][0]) * 1e3:.1f} ms")
    emit(f"{tag} batch-1 decode step (median ITL)", round(float(np.median(itl)) * 1e3, 3), "ms", round(floor * 1e3, 3),
         f"{getattr(eng.runner, 'num_overlapped_steps', 0)} steps so far overlapped with the host")
    g = decode_gpu_time(eng, 1)
    if g:
        emit(f"{tag} batch-1 decode graph replay (GPU only)", round(g * 1e3, 3), "ms", round(floor * 1e3, 3),
             f"{floor / g * 100:.0f}% of the byte floor; host overhead per step {float(np.median(itl)) * 1e3 - g * 1e3:.3f} ms")
    try:
        graph_profile(eng, prof_path, tag)
    except Exception:   # the profile is a note; the figures after it must not be lost
        traceback.print_exc()


@guarded("bs1")
def bench_bs1(out_dir: str | None) -> None:
    eng = make_engine("llama3-8b")
    V = eng.arch.vocab_size
    run(eng, prompts(4, 64, 128, V, seed=9), [8] * 4)
    run(eng, prompts(1, 100, 100, V, seed=8), [4])
    batch1(eng, os.path.join(out_dir, "profiles.txt") if out_dir else None)
    ttfts = [run(eng, prompts(1, 1024, 1024, V, seed=3 + rep), [1])[0] for rep in range(3)]
    emit("8B TTFT 1024-token prompt", round(min(ttfts) * 1e3, 1), "ms",
         note=f"median {np.median(ttfts) * 1e3:.1f} ms; vLLM ({VLLM_SRC[0]}) {ISSUE_VLLM['ttft']} ms")
    del eng
    torch.cuda.empty_cache()


@guarded("8b")
def bench_8b(out_dir: str | None) -> None:
    eng = make_engine("llama3-8b")
    V = eng.arch.vocab_size
    wb = weight_bytes(eng)
    prof_path = os.path.join(out_dir, "profiles.txt") if out_dir else None
    run(eng, prompts(4, 64, 128, V, seed=9), [8] * 4)                         # warm-up (4 sequences)
    run(eng, prompts(1, 100, 100, V, seed=8), [4])                            # warm-up (one sequence)
    batch1(eng, prof_path)
    # time to first token, 1024-token prompt
    ttfts = []
    for rep in range(3):
        dt, n, times, _ = run(eng, prompts(1, 1024, 1024, V, seed=3 + rep), [1])
        ttfts.append(dt)
    flops = 2 * (wb / 2) * 1024 + 4 * 1024 * 1024 / 2 * 4096 * 32
    emit("8B TTFT 1024-token prompt", round(min(ttfts) * 1e3, 1), "ms", round(flops / CEIL["flops"] * 1e3, 1),
         f"median {np.median(ttfts) * 1e3:.1f} ms; vLLM ({VLLM_SRC[0]}) {ISSUE_VLLM['ttft']} ms")
    profile(eng, prompts(1, 1024, 1024, V, seed=20), [1], prof_path, "8B prefill 1024 (fresh prompt)")
    # offline: 256 requests, prompts 64-512, 128 new
    ps = prompts(256, 64, 512, V)
    dt, n, _, waste = run(eng, ps, [128] * 256, kv_sample_every=0 if os.environ.get("BENCH_NO_KV_SAMPLE") == "1" else 8)
    emit("8B offline 256 x (64-512 -> 128)", round(n / dt, 1), "out tok/s", None,
         f"{dt:.2f} s; vLLM ({VLLM_SRC[0]}) {ISSUE_VLLM['offline']}; {n / dt / ISSUE_VLLM['offline']:.2f}x vLLM")
    gpu_idle(eng, ps, [128] * 256, "8B offline 256 x (64-512 -> 128)")
    if waste:
        emit("KV memory waste (blocks held vs tokens stored)", round(100 * float(np.mean(waste)), 2), "%",
             note=f"mean of {len(waste)} samples, max {100 * max(waste):.2f}%, block {eng.block_size}")
    profile(eng, prompts(256, 64, 512, V, seed=21), [16] * 256, prof_path, "8B offline 256 x (64-512 -> 16)")
    host_profile(eng, prompts(256, 64, 512, V, seed=22), [16] * 256, prof_path)
    # outputs uniform 16-512
    r = random.Random(5)
    ps = prompts(256, 64, 512, V, seed=4)
    outs = [r.randint(16, 512) for _ in ps]
    dt, n, _, _ = run(eng, ps, outs)
    cont = n / dt
    emit("8B offline 256 x (64-512 -> 16-512)", round(cont, 1), "out tok/s", None,
         f"{dt:.2f} s; vLLM ({VLLM_SRC[0]}) {ISSUE_VLLM['varied']}; {cont / ISSUE_VLLM['varied']:.2f}x vLLM")
    # continuous vs static policy, same engine, outputs uniform 16-512, batch cap 64
    res = {}
    for policy in ("fcfs", "static"):
        set_scheduler(eng, policy=policy, max_num_seqs=64)
        dt, n, _, _ = run(eng, ps, outs)
        res[policy] = n / dt
        emit(f"8B policy={policy} max_batch=64 (16-512 out)", round(n / dt, 1), "out tok/s", note=f"{dt:.1f} s")
    emit("continuous / static throughput", round(res["fcfs"] / res["static"], 2), "x",
         note="outputs U(16, 512); bound about 1.9x by E[max of 64] / E[output]")
    # the same with long-tailed (chat-like) outputs: log-normal, median 128, sigma 1, clipped to 16-2048
    rl = np.random.default_rng(13)
    outs_ln = np.clip(np.round(np.exp(np.log(128) + rl.standard_normal(len(ps)))), 16, 2048).astype(int).tolist()
    res_ln = {}
    for policy in ("fcfs", "static"):
        set_scheduler(eng, policy=policy, max_num_seqs=64)
        dt, n, _, _ = run(eng, ps, outs_ln)
        res_ln[policy] = n / dt
        emit(f"8B policy={policy} max_batch=64 (log-normal out)", round(n / dt, 1), "out tok/s", note=f"{dt:.1f} s")
    bound = float(np.mean([max(outs_ln[i:i + 64]) for i in range(0, len(outs_ln), 64)]) / np.mean(outs_ln))
    emit("continuous / static throughput, log-normal outputs", round(res_ln["fcfs"] / res_ln["static"], 2), "x",
         note=f"outputs median 128, sigma 1, mean {np.mean(outs_ln):.0f}, max {max(outs_ln)}; "
              f"step-count bound {bound:.2f}x (mean batch max / mean)")
    # SplitFuse vs prefill_first, Poisson arrivals of 2k-token prompts: three arrival seeds, median
    N, rate = 64, 6.0
    ps2 = prompts(N, 2048, 2048, V, seed=11)
    outs2 = [128] * N
    ratios, tput = [], []
    for seed in (7, 8, 9):
        arrivals = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, N)).tolist()
        pois = {}
        for label, kw in (("splitfuse", dict(policy="fcfs", enable_chunked_prefill=True, max_num_batched_tokens=512)),
                          ("prefill_first", dict(policy="prefill_first", enable_chunked_prefill=False,
                                                 max_num_batched_tokens=8192))):
            set_scheduler(eng, max_num_seqs=256, **kw)
            dt, n, times, _ = run(eng, ps2, outs2, arrivals=arrivals)
            itl = np.concatenate([np.diff(t[2:]) for t in times.values() if len(t) > 3])
            pois[label] = (float(np.percentile(itl, 99)), n / dt)
            emit(f"Poisson {rate}/s 2k prompts (seed {seed}): {label} p99 ITL", round(pois[label][0] * 1e3, 1), "ms",
                 note=f"p50 {np.percentile(itl, 50) * 1e3:.1f} ms, {n / dt:.0f} out tok/s, {dt:.1f} s")
        ratios.append(pois["prefill_first"][0] / pois["splitfuse"][0])
        tput.append(pois["splitfuse"][1] / pois["prefill_first"][1])
    emit("SplitFuse vs prefill_first: p99 ITL ratio (median of 3 Poisson runs)", round(float(np.median(ratios)), 2),
         "x", note=f"runs {', '.join(f'{r:.2f}' for r in ratios)}; throughput ratio median "
                   f"{float(np.median(tput)):.3f} (runs {', '.join(f'{t:.3f}' for t in tput)}; target >= 2x, within 5%)")
    del eng
    torch.cuda.empty_cache()


@guarded("1b")
def bench_1b(out_dir: str | None) -> None:
    import gc
    gc.collect()
    torch.cuda.empty_cache()
    eng = make_engine("llama3.2-1b")
    V = eng.arch.vocab_size
    run(eng, prompts(4, 64, 128, V, seed=9), [8] * 4)
    run(eng, prompts(1, 100, 100, V, seed=8), [4])
    batch1(eng, os.path.join(out_dir, "profiles.txt") if out_dir else None, tag="1B", vkey="bs1_1b")


@guarded("peers")
def peers(path: str, out_dir: str | None) -> None:
    import gc
    gc.collect()                       # the engines (runner <-> graph wrapper cycles) and their pools
    torch.cuda.empty_cache()
    log = os.path.join(out_dir or "/tmp", "hf_peers.log")
    with open(log, "w") as f:
        try:
            rc = subprocess.run([sys.executable, path, "llama3-8b"], stdout=f, stderr=subprocess.STDOUT,
                                timeout=float(os.environ.get("HF_PEERS_TIMEOUT", "300"))).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    for line in open(log).read().splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if d.get("figure") != "env":
            emit(f"transformers peer: {d.get('model', '')} {d['figure']}", d.get("value"), note="same card")
    if rc:
        emit("transformers peer: exit", rc, note="see hf_peers.log")


# ---------------------------------------------------------------------------------------- quant
QUANT_SCHEMES = {"bf16": ("none", "auto"), "w8a8": ("w8a8", "auto"), "w4a16": ("w4a16", "auto"),
                 "fp8": ("fp8", "auto"), "kv-int8": ("none", "int8"), "kv-fp8": ("none", "fp8_e4m3")}


def quant_weight_bytes(model) -> int:
    """Bytes one decode step reads: every parameter and buffer except the input embedding
    (packed codes, scales, zero points, dense weights), each storage counted once."""
    seen, tot = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "embed_tokens" in name or t is None or t.device.type != "cuda" or t.data_ptr() in seen:
            continue
        if name.endswith("cos_sin_cache"):
            continue
        seen.add(t.data_ptr())
        tot += t.numel() * t.element_size()
    return tot


def _quant_kernels() -> None:
    """M=1 (and M=4) linears of Llama-3-8B per scheme, replayed from a CUDA graph over enough
    different weights that the L2 is cold for each; floor = the scheme's weight bytes at the copy
    rate. Sweeps the W4A16 GEMV tiles and installs the best per shape for the engine runs after."""
    from mindie_llm.backends.cuda import quant_linear as ql
    from mindie_llm.backends.cuda.gemv import time_in_graph
    from mindie_llm.ops import reference as ref

    l2 = 60 << 20
    chosen = {}
    for name, n, k in GEMV_SHAPES_8B[:4]:
        copies = max(2, -(-3 * l2 // (n * k // 2)))
        codes = [torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda") for _ in range(copies)]
        qws = [ref.w4a16_pack(c) for c in codes]
        del codes
        sc = [torch.rand(n, k // 128, device="cuda") * 0.01 for _ in range(copies)]
        zs = [torch.randint(0, 16, (n, k // 128), dtype=torch.uint8, device="cuda") for _ in range(copies)]
        for m in (1, 4):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            want = ref.w4a16_matmul(x[:1], qws[0], sc[0], zs[0], 128)
            best = None
            cands = ql.GEMV_CANDIDATES if m == 1 else tuple({ql.GEMV_DEFAULT_TILE, chosen.get((n, k),
                                                                                           ql.GEMV_DEFAULT_TILE)})
            for tile in cands:
                try:
                    got = ql.w4a16_gemv(x, qws[0], sc[0], zs[0], 128, tile=tile)
                    err = float((got[:1] - want).norm() / want.norm())
                    if not err < 1e-3:
                        emit(f"quant W4A16 GEMV {name} tile {tile}: WRONG", round(err, 6))
                        continue
                    t = time_in_graph([(lambda i=i: ql.w4a16_gemv(x, qws[i], sc[i], zs[i], 128, tile=tile))
                                       for i in range(copies)])
                except Exception as e:
                    emit(f"quant W4A16 GEMV {name} tile {tile}: FAILED", repr(e)[:200])
                    continue
                if best is None or t < best[0]:
                    best = (t, tile)
            wbytes = n * k // 2 + n * (k // 128) * 5                  # codes + fp32 scales + uint8 zeros
            floor = wbytes / CEIL["bw"]
            if best:
                emit(f"quant W4A16 GEMV M={m} {name} {n}x{k}", round(best[0] * 1e6, 2), "us", round(floor * 1e6, 2),
                     f"tile {best[1]}; {floor / best[0] * 100:.0f}% of the byte floor")
                if m == 1:
                    chosen[(n, k)] = best[1]
        del qws, sc, zs
        # bf16 cuBLAS and the other schemes at M=1 on the same shape
        copies = max(2, -(-3 * l2 // (n * k * 2)))
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]
        t_bf16 = time_in_graph([(lambda w=w: torch.nn.functional.linear(x, w)) for w in ws])
        emit(f"quant bf16 cuBLAS M=1 {name}", round(t_bf16 * 1e6, 2), "us", round(n * k * 2 / CEIL["bw"] * 1e6, 2))
        q8 = [ref.quantize_per_token_int8(w) for w in ws]
        f8 = [ref.quantize_fp8_rows(w) for w in ws]
        del ws
        for label, fn in (("W8A8 Triton", lambda i: ql.w8a8_matmul(x, q8[i][0], q8[i][1])),
                          ("FP8 _scaled_mm", lambda i: ql.fp8_matmul(x, f8[i][0], f8[i][1]))):
            try:
                t = time_in_graph([(lambda i=i: fn(i)) for i in range(copies)])
                emit(f"quant {label} M=1 {name}", round(t * 1e6, 2), "us", round(n * k / CEIL["bw"] * 1e6, 2))
            except Exception as e:
                emit(f"quant {label} M=1 {name}: FAILED", repr(e)[:200])
        # many rows (prefill chunks, large decode batches): one weight, flops-bound
        for m in (256, 2048):
            xm = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            w0 = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
            qw4 = ref.w4a16_pack(torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda"))
            s4 = torch.rand(n, k // 128, device="cuda") * 0.01
            z4 = torch.randint(0, 16, (n, k // 128), dtype=torch.uint8, device="cuda")
            fl = 2 * m * n * k
            for label, fn in (("bf16 cuBLAS", lambda: torch.nn.functional.linear(xm, w0)),
                              ("W8A8 Triton", lambda: ql.w8a8_matmul(xm, q8[0][0], q8[0][1])),
                              ("W8A8 _int_mm", lambda: ql.w8a8_matmul_int_mm(xm, q8[0][0], q8[0][1])),
                              ("FP8 _scaled_mm", lambda: ql.fp8_matmul(xm, f8[0][0], f8[0][1])),
                              ("W4A16 dequant+cuBLAS", lambda: ql.w4a16_matmul(xm, qw4, s4, z4, 128))):
                try:
                    t = time_in_graph([fn], reps=10)
                    emit(f"quant {label} M={m} {name}", round(t * 1e6, 1), "us", None,
                         f"{fl / t / 1e12:.0f} TFLOP/s")
                except Exception as e:
                    emit(f"quant {label} M={m} {name}: FAILED", repr(e)[:200])
            del xm, w0, qw4, s4, z4
        del q8, f8
        torch.cuda.empty_cache()
    ql.GEMV_TILES.update(chosen)
    emit("quant W4A16 GEMV tiles chosen (paste into GEMV_TILES)", json.dumps({f"{n},{k}": t for (n, k), t in chosen.items()}))


def _quant_engine(sch: str) -> None:
    """One scheme's engine figures (run in its own process: an engine's KV cache holds the card)."""
    quant, kv = QUANT_SCHEMES[sch]
    try:
        eng = make_engine("llama3-8b", quantization=quant, kv_cache_dtype=kv)
    except Exception as e:
        emit(f"quant {sch}: start-up FAILED", repr(e)[:300])
        traceback.print_exc()
        return
    try:
        V = eng.arch.vocab_size
        wb = quant_weight_bytes(eng.model)
        floor = wb / CEIL["bw"]
        run(eng, prompts(4, 64, 128, V, seed=9), [8] * 4)
        dt, n, _, _ = run(eng, prompts(1, 128, 128, V), [128])
        emit(f"quant 8B {sch} batch-1 decode 128+128", round(n / dt, 1), "tok/s", round(1 / floor, 1),
             f"weights {wb / 1e9:.2f} GB", scheme=sch, kind="bs1")
        g = decode_gpu_time(eng, 1)
        if g:
            emit(f"quant 8B {sch} batch-1 decode graph replay", round(g * 1e3, 3), "ms", round(floor * 1e3, 3),
                 f"{floor / g * 100:.0f}% of the byte floor")
        dt, n, _, _ = run(eng, prompts(256, 64, 512, V), [128] * 256)
        emit(f"quant 8B {sch} offline 256 x (64-512 -> 128)", round(n / dt, 1), "out tok/s", None, f"{dt:.2f} s",
             scheme=sch, kind="offline")
    except Exception as e:
        emit(f"quant {sch}: FAILED", repr(e)[:300])
        traceback.print_exc()
    finally:
        eng.shutdown()


@guarded("quant")
def quant_section(out_dir: str | None, schemes: str = "bf16,w4a16,w8a8,fp8,kv-int8,kv-fp8",
                  kernels: bool = True) -> None:
    """Llama-3-8B shapes, dummy weights, per scheme (each engine in its own process): batch-1
    decode (128+128) against the weight-bytes floor, the decode graph's replay time, and the
    offline workload (256 x (64-512 -> 128)); ratios against the bf16 engine of the same run."""
    from mindie_llm.backends.cuda import quant_linear as ql

    if kernels:
        try:
            _quant_kernels()
        except Exception as e:
            emit("quant kernels: FAILED", repr(e)[:300])
            traceback.print_exc()
    base: dict[str, float] = {}
    tiles = json.dumps({f"{n},{k}": list(t) for (n, k), t in ql.GEMV_TILES.items()})
    for sch in schemes.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--quant-child", sch, "--quant-bw", str(CEIL["bw"]),
               "--quant-gemv-tiles", tiles]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
            out, rc = res.stdout, res.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        for line in out.splitlines():
            if not line.startswith("{"):
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            kind = row.pop("kind", None)
            row.pop("scheme", None)
            fig = row.pop("figure")
            note = row.pop("note", "") or ""
            if kind in ("bs1", "offline") and isinstance(row.get("value"), (int, float)):
                if sch == "bf16":
                    base[kind] = row["value"]
                elif base.get(kind):
                    note += f"; {row['value'] / base[kind]:.2f}x bf16"
            emit(fig, row.pop("value"), row.pop("unit", ""), row.pop("floor", None), note, **row)
        if rc != 0:
            emit(f"quant {sch}: child exit", rc, note=(res.stderr[-300:] if rc != "timeout" else ""))


def print_table() -> str:
    lines = ["| figure | measured | unit | floor | note |", "| --- | --- | --- | --- | --- |"]
    for r in ROWS:
        lines.append(f"| {r['figure']} | {r['value']} | {r['unit']} | {'' if r['floor'] is None else r['floor']} "
                     f"| {r['note']} |")
    return "\n".join(lines)


def main() -> None:
    global LOG
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="ceilings,gemv,tests,kernels,8b,1b,peers")
    ap.add_argument("--label", default="", help="prefix of every figure (e.g. the tree measured)")
    ap.add_argument("--gemv-sweep", action="store_true", help="gemv section: time a wider tile grid too")
    ap.add_argument("--no-pdl", action="store_true", help="launch no kernel as a programmatic dependent (A/B)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--hf-peers", default=None, help="path of hf_peers.py (transformers on the same card)")
    ap.add_argument("--vllm-log", default=None, help="output of vllm_peer.py on this card (else the issue's figures)")
    ap.add_argument("--quant-schemes", default="bf16,w4a16,w8a8,fp8,kv-int8,kv-fp8",
                    help="quant section: schemes to run (" + ",".join(QUANT_SCHEMES) + ")")
    ap.add_argument("--quant-no-kernels", action="store_true", help="quant section: skip the per-linear timings")
    ap.add_argument("--quant-child", default=None, help=argparse.SUPPRESS)     # one scheme's engine, then exit
    ap.add_argument("--quant-bw", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quant-gemv-tiles", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quant_child:
        from mindie_llm.backends.cuda import quant_linear as ql
        if args.quant_bw:
            CEIL["bw"] = args.quant_bw
        for key, t in json.loads(args.quant_gemv_tiles or "{}").items():
            n, k = map(int, key.split(","))
            ql.GEMV_TILES[(n, k)] = tuple(t)
        _quant_engine(args.quant_child)
        return
    secs = set(args.sections.split(","))
    LABEL[0] = f"[{args.label}] " if args.label else ""
    if args.no_pdl:
        try:
            from mindie_llm.backends.cuda import pdl
            pdl.supported = lambda *a, **k: False
        except ImportError:   # a tree without programmatic dependent launches
            pass
    if args.vllm_log:
        load_vllm_log(args.vllm_log)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        LOG = open(os.path.join(args.out, "bench_gpu.jsonl"), "w")
    emit("env", f"{torch.cuda.get_device_name()} torch {torch.__version__} "
                f"triton {__import__('triton').__version__} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if "ceilings" in secs:
        ceilings()
    if "gemv" in secs:
        gemv_section(args.gemv_sweep)
    if "tests" in secs:
        run_tests(args.out)
    if "bs1" in secs:
        bench_bs1(args.out)
    if "8b" in secs:
        bench_8b(args.out)
    if "1b" in secs:
        bench_1b(args.out)
    if "idle" in secs:
        bench_idle(args.out)
    if "kernels" in secs:      # after the engines: nothing it leaves behind can touch their figures
        kernels()
    if "quant" in secs:        # its own section (not in the default list): one engine per scheme
        quant_section(args.out, args.quant_schemes, not args.quant_no_kernels)
    if "peers" in secs and args.hf_peers:
        peers(args.hf_peers, args.out)
    table = print_table()
    if args.out:
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
