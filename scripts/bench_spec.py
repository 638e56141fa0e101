#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Speculative decoding benchmark: decode tok/s with and without each proposer, batch 1 and 16,
on input-grounded prompts (repeat / edit a given text or code: the answer copies the prompt) and
on open prompts (stories, explanations), with acceptance rates. Greedy, so each proposer's output
is checked token for token against no speculation ("same").

Decode tok/s of a run = tokens after the first of every request / (last token time - first
token time over the batch): prefill is excluded. A benchmark, not a test: prints a table.

    python scripts/bench_spec.py [--methods none,ngram,draft,eagle --eagle-dir DIR --max-tokens 64]
    python scripts/bench_spec.py --model llama3-8b --load-format dummy --draft-model llama3.2-1b  # GPU shapes
"""
from __future__ import annotations

import argparse
import statistics
import time

GROUNDED_TEXT = (
    "The river rose slowly through the night. By morning the lower streets were under water, and the "
    "baker on Mill Lane carried his flour sacks up to the attic one by one. Nobody in the town had seen "
    "a flood like it since the old bridge was built, and the old bridge, people said, would not survive "
    "another one.")
GROUNDED_CODE = (
    "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n\n"
    "def variance(values):\n    m = mean(values)\n    total = 0\n    for v in values:\n        total += (v - m) ** 2\n"
    "    return total / len(values)\n")
GROUNDED = [
    f"Repeat the following text exactly, word for word:\n\n{GROUNDED_TEXT}",
    f"Rename the variable `total` to `acc` in this code and print the whole file:\n\n{GROUNDED_CODE}",
    f"Fix the spelling and repeat the paragraph: {GROUNDED_TEXT.replace('flood', 'flod')}",
    f"Add type hints to every function and return the complete code:\n\n{GROUNDED_CODE}",
]
OPEN = ["Write a short story about a robot who learns to paint.", "Explain how a rainbow forms.",
        "Give me five ideas for a birthday party.", "Describe a walk through a busy market."]


def _spec(method: str, args) -> dict | None:
    k = args.k
    if method == "none":
        return None
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "ngram_min": 2, "ngram_max": 4}
    if method == "draft":
        return {"method": "draft", "draft_model": args.draft_model, "num_speculative_tokens": k}
    if method == "eagle":
        return {"method": "eagle", "draft_model": args.eagle_dir, "num_speculative_tokens": k}
    raise SystemExit(f"--methods: unknown {method!r}")


def run_case(llm, prompts, max_tokens):
    from mindie_llm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    eng = llm.engine
    before = eng.get_stats()
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], sp, use_tqdm=False) \
        if eng.tokenizer is not None else llm.generate([list(range(10, 60))] * len(prompts), sp, use_tqdm=False)
    first = min(o.metrics.first_token_time for o in outs)
    last = max(o.metrics.last_token_time for o in outs)
    n = sum(len(o.outputs[0].token_ids) - 1 for o in outs)
    st = eng.get_stats()
    drafts = st.spec_num_draft_tokens - before.spec_num_draft_tokens
    acc = st.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    verifies = st.spec_num_drafts - before.spec_num_drafts
    return ([o.outputs[0].token_ids for o in outs], n / max(last - first, 1e-9),
            acc / drafts if drafts else 0.0, 1 + acc / verifies if verifies else 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model path or named shape (default: the embedded SmolLM2)")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", default="none,ngram,draft")
    ap.add_argument("--draft-model", default="target-layers:6", help="draft: a path, or target-layers:N")
    ap.add_argument("--eagle-dir", default=None)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch

    from mindie_llm import LLM
    from mindie_llm.config import ModelConfig
    from mindie_llm.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    mc = ModelConfig(path=args.model, load_format=args.load_format, dtype=args.dtype)
    loaded = load_model(mc, args.device, args.dtype, progress=False)
    methods = args.methods.split(",")
    rows = []
    for kind, pool in (("grounded", GROUNDED), ("open", OPEN)):
        for b in (int(x) for x in args.batches.split(",")):
            prompts = [pool[i % len(pool)] for i in range(b)]
            ref, base = None, None
            for m in methods:
                llm = LLM(loaded_model=loaded, model=args.model, load_format=args.load_format, dtype=args.dtype,
                          device=args.device, max_model_len=1024, max_num_seqs=max(b, 1),
                          speculative_config=_spec(m, args))
                run_case(llm, prompts[:1], 4)                                # warm-up
                speeds, acc, mal = [], 0.0, 1.0
                for _ in range(args.repeats):
                    toks, tps, acc, mal = run_case(llm, prompts, args.max_tokens)
                    speeds.append(tps)
                ref = toks if ref is None else ref
                med = statistics.median(speeds)
                base = med if base is None else base
                spread = (max(speeds) - min(speeds)) / med * 100 if len(speeds) > 1 else 0.0
                rows.append((kind, b, m, med, spread, med / base, acc, mal, toks == ref))
                print(f"{kind:9s} b={b:<3d} {m:6s} {med:8.1f} tok/s ±{spread:4.0f}%  x{med / base:4.2f}  "
                      f"accept {acc:4.2f}  mean len {mal:4.2f}  same {toks == ref}", flush=True)
                del llm
    print("\n| prompts | batch | method | decode tok/s | spread | speedup | acceptance | mean accepted length | same output |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, b, m, med, spread, sp, acc, mal, same in rows:
        print(f"| {kind} | {b} | {m} | {med:.1f} | ±{spread:.0f}% | {sp:.2f}x | {acc:.2f} | {mal:.2f} | {same} |")
    print(f"\n(k={args.k}, max_tokens={args.max_tokens}, greedy, device {args.device}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; medians of {args.repeats} run(s))")


if __name__ == "__main__":
    main()
