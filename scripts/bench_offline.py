# SPDX-License-Identifier: Apache-2.0
"""Offline CPU benchmark of the default deployment beside llama.cpp on the same GGUF file.

    python scripts/bench_offline.py [--config configs/default.yaml] [--threads 2] [--repeats 3]
        [--llama-python /path/to/venv/bin/python] [--fp32] [--transformers]

Cases, each run ``--repeats`` times in this one run (median and min-max spread printed):
- start-up: a fresh process from start until the engine has produced its first token;
- batch-1 decode tok/s (greedy, EOS ignored) on a quiet machine, and with one core kept busy by a
  helper process that this script starts (pinned to core 0) and stops around the case;
- N x L aggregate output tok/s (N concurrent requests, L tokens each).
Peers on the same file and thread count: llama.cpp through llama-cpp-python (``scripts/
llamacpp_peer.py``, run by ``--llama-python`` or this interpreter; skipped with one line when it
is not installed), and optionally mindie-llm's fp32 reference (``--fp32``) and transformers
(``--transformers``, through ``mindie_llm.bench.offline``). The floor column is the
memory-bandwidth bound: weight bytes read per decode step / ``--bandwidth-gbs``.

A benchmark, not a test: nothing here asserts timings. Figures on a shared machine are noisy:
report the spread.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

PROMPT = "Write a long story about a robot who learns to paint. Describe every color in detail."
HERE = os.path.dirname(os.path.abspath(__file__))


@contextlib.contextmanager
def busy_core(enabled: bool = True):
    """A helper process spinning on core 0 for the duration of the block (then killed)."""
    if not enabled:
        yield
        return
    code = "import os\nos.sched_setaffinity(0, {0})\nwhile True:\n    pass\n"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.3)
        yield
    finally:
        proc.kill()
        proc.wait()


def _spread(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def _startup_mindie(args: argparse.Namespace) -> float:
    code = ("import time, sys\nt0 = time.perf_counter()\n"
            "from mindie_llm.engine.llm import LLM, build_config\n"
            "from mindie_llm.sampling_params import SamplingParams\n"
            f"llm = LLM(config=build_config({args.config!r}, {args.set!r}))\n"
            "llm.generate(['hi'], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)\n"
            "print(time.perf_counter() - t0)\n")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0                       # includes the interpreter's own start
    float(out.stdout.strip().splitlines()[-1])
    return wall


def _mindie_rows(args: argparse.Namespace, overrides: list[str], label: str, batch: bool):
    from mindie_llm.engine.llm import LLM, build_config
    from mindie_llm.layers.quantization import weight_bytes
    from mindie_llm.sampling_params import SamplingParams

    llm = LLM(config=build_config(args.config, overrides))
    wbytes = weight_bytes(llm.engine.model)
    llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    sp1 = SamplingParams(temperature=0, max_tokens=args.batch1_tokens, ignore_eos=True)

    def batch1() -> float:
        out = llm.generate([PROMPT], sp1, use_tqdm=False)[0]
        m = out.metrics
        return (len(out.outputs[0].token_ids) - 1) / max(m.last_token_time - m.first_token_time, 1e-9)

    res = {"b1": [batch1() for _ in range(args.repeats)], "wbytes": wbytes}
    if batch:
        if not args.no_busy:
            with busy_core():
                res["b1_busy"] = [batch1() for _ in range(args.repeats)]
        spn = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        prompts = [f"{PROMPT} Story number {i}." for i in range(args.num_requests)]
        agg = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, spn, use_tqdm=False)
            agg.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0))
        res["agg"] = agg
    del llm
    return label, res


def _llamacpp(args: argparse.Namespace, path: str, busy: bool) -> dict | None:
    py = args.llama_python or sys.executable
    cmd = [py, os.path.join(HERE, "llamacpp_peer.py"), "--model", path, "--threads", str(args.threads),
           "--tokens", str(args.batch1_tokens), "--prompt", PROMPT]
    with busy_core(busy):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        print(f"llama.cpp peer failed (exit {out.returncode}): {out.stderr.strip()[-300:]}")
        return None
    res = json.loads(lines[-1])
    res["wall_s"] = wall
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(HERE, "..", "configs", "default.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--batch1-tokens", type=int, default=128)
    p.add_argument("--bandwidth-gbs", type=float, default=14.0, help="memory bandwidth for the floor column")
    p.add_argument("--llama-python", default=None, help="interpreter that has llama-cpp-python")
    p.add_argument("--fp32", action="store_true", help="also the fp32 reference (model.quantization=none)")
    p.add_argument("--transformers", action="store_true", help="also transformers fp32 (slow)")
    p.add_argument("--no-busy", action="store_true", help="skip the one-core-busy cases (they take long when "
                   "a system collapses under contention)")
    args = p.parse_args(argv)
    args.set = list(args.set) + [f"backend.num_threads={args.threads}"]
    import torch

    torch.set_num_threads(args.threads)
    from mindie_llm.loader.default_model import default_model_path

    from mindie_llm.engine.llm import build_config

    path = build_config(args.config, args.set).model.path or default_model_path()
    starts = [_startup_mindie(args) for _ in range(args.repeats)]
    systems = [_mindie_rows(args, args.set, "mindie-llm (default: GGUF blocks)", batch=True)]
    if args.fp32:
        systems.append(_mindie_rows(args, args.set + ["model.quantization=none"], "mindie-llm fp32 reference",
                                    batch=False))
    lc = [r for r in (_llamacpp(args, path, False) for _ in range(args.repeats)) if r]
    lc_busy = [r for r in (_llamacpp(args, path, True) for _ in range(args.repeats)) if r] \
        if lc and not args.no_busy else []
    skip = next((r["skip"] for r in lc if "skip" in r), None)
    lc = [r for r in lc if "skip" not in r]
    lc_busy = [r for r in lc_busy if "skip" not in r]

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    simd = " ".join(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    from mindie_llm.backends.cpu import kernels

    print(f"machine: {cpu}, {os.cpu_count()} cpus ({simd}); kernels isa {kernels.isa()}; threads {args.threads}; "
          f"load average {os.getloadavg()[0]:.1f} at the end; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"median (min-max) of {args.repeats} runs; batch 1 = {args.batch1_tokens} tokens; "
          f"aggregate = {args.num_requests} x {args.output_len}")
    print("| system | start-up s | batch-1 tok/s quiet | batch-1 tok/s one core busy | busy / quiet "
          f"| {args.num_requests} x {args.output_len} aggregate tok/s | weight MB / step | batch-1 floor tok/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, (label, r) in enumerate(systems):
        busy = r.get("b1_busy", [])
        ratio = f"{statistics.median(busy) / statistics.median(r['b1']):.2f}" if busy else "-"
        floor = args.bandwidth_gbs * 1e9 / r["wbytes"]
        print(f"| {label} | {_spread(starts) if i == 0 else '-'} | {_spread(r['b1'])} | {_spread(busy)} | {ratio} "
              f"| {_spread(r.get('agg', []))} | {r['wbytes'] / 1e6:.0f} | {floor:.0f} |")
    if lc:
        b1 = [r["decode_tok_s"] for r in lc]
        busy = [r["decode_tok_s"] for r in lc_busy]
        ratio = f"{statistics.median(busy) / statistics.median(b1):.2f}" if busy else "-"
        print(f"| llama.cpp {lc[0]['version']} (same file) | {_spread([r['wall_s'] for r in lc])} | {_spread(b1)} "
              f"| {_spread(busy)} | {ratio} | - | - | - |")
        mine = systems[0][1]
        print(f"\nbatch-1 quiet: mindie-llm / llama.cpp = {statistics.median(mine['b1']) / statistics.median(b1):.2f}x; "
              f"aggregate / llama.cpp batch-1 = {statistics.median(mine['agg']) / statistics.median(b1):.2f}x")
    else:
        print(f"\nllama.cpp peer skipped: {skip or 'it failed (see above)'}")
    if args.transformers:
        from mindie_llm.bench import offline as hf_bench

        ns = argparse.Namespace(num_requests=args.num_requests, output_len=args.output_len,
                                batch1_tokens=args.batch1_tokens, bandwidth_gbs=args.bandwidth_gbs)
        hf_rows: list = []
        hf_bench._bench_hf(ns, path, hf_rows)
        print(hf_bench.format_table(hf_rows))
    print(f"platform: {platform.platform()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
