# SPDX-License-Identifier: Apache-2.0
"""The llama.cpp peer of scripts/bench_offline.py, run as a subprocess (it may use another
interpreter, e.g. a separate virtual environment holding llama-cpp-python): loads the same GGUF
with the same thread count, decodes greedily with EOS masked, prints one JSON line:
{"load_s", "decode_tok_s", "tokens"} or {"skip": reason}. Imports nothing of mindie_llm.
"""
import argparse
import json
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt", required=True)
    p.add_argument("--extra-bufts", action="store_true",
                   help="keep llama.cpp's extra buffer types (AMX / repacked weights); off by default "
                        "because its AMX matmul crashed on the benchmark VM (AMX flags present)")
    a = p.parse_args()
    t0 = time.perf_counter()
    try:
        import llama_cpp
    except ImportError:
        print(json.dumps({"skip": "llama-cpp-python is not installed for " + sys.executable}))
        return 0
    import numpy as np

    if not a.extra_bufts:
        default_params = llama_cpp.llama_model_default_params

        def params():
            mp = default_params()
            if hasattr(mp, "use_extra_bufts"):
                mp.use_extra_bufts = False
            return mp

        llama_cpp.llama_model_default_params = params
        llama_cpp.llama.llama_cpp.llama_model_default_params = params
    llm = llama_cpp.Llama(model_path=a.model, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=1024,
                          n_batch=512, verbose=False)
    eos = llm.token_eos()

    def no_eos(_ids, logits):
        logits[eos] = -np.inf
        return logits

    procs = llama_cpp.LogitsProcessorList([no_eos])
    kw = dict(temperature=0.0, top_k=1, logits_processor=procs)
    llm.create_completion(a.prompt, max_tokens=1, **kw)  # warm-up; ready to serve
    load_s = time.perf_counter() - t0
    llm.reset()
    t1 = time.perf_counter()
    llm.create_completion(a.prompt, max_tokens=1, **kw)
    prefill_s = time.perf_counter() - t1
    llm.reset()
    t2 = time.perf_counter()
    out = llm.create_completion(a.prompt, max_tokens=a.tokens, **kw)
    total_s = time.perf_counter() - t2
    n = out["usage"]["completion_tokens"]
    print(json.dumps({"load_s": load_s, "decode_tok_s": (n - 1) / max(total_s - prefill_s, 1e-9), "tokens": n,
                      "version": llama_cpp.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
