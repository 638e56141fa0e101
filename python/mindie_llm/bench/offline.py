# SPDX-License-Identifier: Apache-2.0
"""Offline throughput benchmark (``mindie-llm bench``, ``scripts/bench_offline.py``).

Measures, in one run on the same weights: batch-1 decode tok/s and the aggregate output tok/s of
N concurrent requests x L tokens, for mindie-llm and for transformers (``model.generate``, static
batching with left padding, fp32, loading the same GGUF). Prints a table with the memory-bandwidth
floor of each row: weight bytes read per decode step / bandwidth (batch 1 cannot be faster than
``bandwidth / weight_bytes`` tokens per second).

A benchmark, not a test: nothing here asserts timings. Must not import the server.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["add_arguments", "run", "main"]

PROMPT = "Write a long story about a robot who learns to paint. Describe every color in detail."


@dataclass
class Row:
    system: str
    case: str
    tok_s: float
    weight_bytes: int          # weight bytes read per decode step
    bandwidth_gbs: float
    batch: int = 1             # tokens produced per decode step

    @property
    def floor_tok_s(self) -> float:
        """The memory-bandwidth bound: each step reads the weights once and yields ``batch`` tokens."""
        return self.batch * self.bandwidth_gbs * 1e9 / max(self.weight_bytes, 1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2)")
    p.add_argument("--config", default=None, help="deployment YAML (the model section is used)")
    p.add_argument("--dtype", default=None, help="mindie-llm weight dtype: auto|float32|bfloat16")
    p.add_argument("--quantization", default=None, help="mindie-llm weight quantization: none|int8")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--batch1-tokens", type=int, default=64, help="tokens decoded in the batch-1 case")
    p.add_argument("--bandwidth-gbs", type=float, default=11.0, help="memory bandwidth for the floor column")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")


def _weight_bytes(model: Any, rows: int) -> int:
    """Bytes of matmul weights one decode step of ``rows`` rows reads: int8 weights (+ scales) of
    layers that take the int8 path at that many rows, else the dense weight. Embedding lookups
    (one row each) are not counted; a tied LM head counts once."""
    from torch import nn

    try:
        from mindie_llm.layers.quantization import INT8_MAX_ROWS
    except ImportError:
        INT8_MAX_ROWS = 0
    from mindie_llm.layers.quantization import weight_bytes

    if any(getattr(m, "gguf_packed", None) is not None or getattr(m, "w4_qweight", None) is not None
           for m in model.modules()):
        return weight_bytes(model)          # packed GGUF / 4-bit blocks: the scheme knows its bytes
    seen, total = set(), 0
    for mod in model.modules():
        if isinstance(mod, nn.Embedding) or type(mod).__name__ in ("VocabEmbedding", "VocabParallelEmbedding"):
            continue
        q = getattr(mod, "qweight", None)
        w = mod._parameters.get("weight") if hasattr(mod, "_parameters") else None
        if q is not None and (rows <= INT8_MAX_ROWS or w is None):
            total += q.numel() * q.element_size() + mod.scales_bf16.numel() * 2
            continue
        for t in mod._parameters.values():
            if t is None or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _progress(step: int, total: int, what: str) -> None:
    """One line per phase on stderr, so a long run shows where it is."""
    import sys

    print(f"[{step}/{total}] {what}", file=sys.stderr, flush=True)


def _bench_mindie(args: argparse.Namespace, rows: list[Row], total: int) -> Any:
    from mindie_llm.engine.llm import LLM, build_config
    from mindie_llm.sampling_params import SamplingParams

    kw = {"dtype": args.dtype, "quantization": args.quantization}
    if args.model:
        kw["model"] = args.model
    cfg = build_config(getattr(args, "config", None), args.overrides, **kw)
    _progress(1, total, "mindie-llm: loading the model")
    llm = LLM(config=cfg)
    model = llm.engine.model
    _progress(2, total, f"mindie-llm: batch 1 decode ({args.batch1_tokens} tokens)")
    warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate([PROMPT], warm, use_tqdm=False)
    sp1 = SamplingParams(temperature=0, max_tokens=args.batch1_tokens, ignore_eos=True)
    # Batch 1 decode: time from the first token to the last.
    out = llm.generate([PROMPT], sp1, use_tqdm=False)[0]
    m = out.metrics
    decode_s = (m.last_token_time - m.first_token_time) if m.last_token_time and m.first_token_time else 0.0
    rows.append(Row("mindie-llm", "batch 1 decode", (len(out.outputs[0].token_ids) - 1) / max(decode_s, 1e-9),
                    _weight_bytes(model, 1), args.bandwidth_gbs))
    spn = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    prompts = [f"{PROMPT} Story number {i}." for i in range(args.num_requests)]
    _progress(3, total, f"mindie-llm: {args.num_requests} requests x {args.output_len} tokens")
    t0 = time.perf_counter()
    outs = llm.generate(prompts, spn, use_tqdm=False)
    dt = time.perf_counter() - t0
    ntok = sum(len(o.outputs[0].token_ids) for o in outs)
    rows.append(Row("mindie-llm", f"{args.num_requests} x {args.output_len} aggregate", ntok / dt,
                    _weight_bytes(model, args.num_requests), args.bandwidth_gbs, args.num_requests))
    return llm


def _bench_hf(args: argparse.Namespace, gguf_path: str, rows: list[Row]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(gguf_path)
    _progress(4, 5, "transformers: loading the same GGUF")
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).train(False)
    wbytes = _weight_bytes(model, 1)

    def gen(prompts: list[str], n: int) -> tuple[int, float, float]:
        enc = tok(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(**enc, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
            t1 = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            t2 = time.perf_counter()
        ntok = (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
        return ntok, t1 - t0, t2 - t1

    _progress(5, 5, f"transformers: batch 1 decode, then {args.num_requests} x {args.output_len}")
    gen([PROMPT], 4)  # warm-up
    ntok, prefill_s, total_s = gen([PROMPT], args.batch1_tokens)
    rows.append(Row("transformers", "batch 1 decode", (ntok - 1) / max(total_s - prefill_s, 1e-9), wbytes,
                    args.bandwidth_gbs))
    prompts = [f"{PROMPT} Story number {i}." for i in range(args.num_requests)]
    ntok, _, total_s = gen(prompts, args.output_len)
    rows.append(Row("transformers", f"{args.num_requests} x {args.output_len} aggregate", ntok / total_s, wbytes,
                    args.bandwidth_gbs, args.num_requests))


def format_table(rows: list[Row]) -> str:
    lines = ["| system | case | output tok/s | weight MB read per step | bandwidth floor tok/s "
             "| % of floor |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.system} | {r.case} | {r.tok_s:.1f} | {r.weight_bytes / 1e6:.0f} | "
                     f"{r.floor_tok_s:.1f} | {100 * r.tok_s / r.floor_tok_s:.0f}% |")
    by_case: dict[str, dict[str, float]] = {}
    for r in rows:
        by_case.setdefault(r.case, {})[r.system] = r.tok_s
    for case, d in by_case.items():
        if "mindie-llm" in d and "transformers" in d:
            lines.append(f"\n{case}: mindie-llm / transformers = {d['mindie-llm'] / d['transformers']:.2f}x")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[Row]:
    """Runs the cases, printing progress; on Ctrl-C prints the rows measured so far."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[Row] = []
    total = 3 if args.no_hf else 5
    interrupted = False
    try:
        llm = _bench_mindie(args, rows, total)
        if not args.no_hf:
            path = llm.config.model.path
            if path is None:
                from mindie_llm.loader.default_model import default_model_path

                path = default_model_path()
            del llm
            if path.endswith(".gguf"):
                _bench_hf(args, path, rows)
            else:
                print("transformers baseline skipped: it loads the same GGUF, and the model is not a .gguf file")
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: the rows measured so far", flush=True)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(format_table(rows) if rows else "(no case finished)")
    if interrupted:
        raise KeyboardInterrupt
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mindie-llm bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    run(p.parse_args(argv))
    return 0
