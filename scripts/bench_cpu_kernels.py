# SPDX-License-Identifier: Apache-2.0
"""The CPU GGUF-block matmul kernels alone, per block type, beside a dense float32 matmul.

    python scripts/bench_cpu_kernels.py [--n 1536] [--k 2048] [--rows 1 16] [--threads 2] [--iters 30]

For each type (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) a random [N, K] weight of that type is repacked and
multiplied by x[T, K] for each T of ``--rows``; the table gives the median (and best) time per call
and the packed bytes streamed per second (the batch-1 figure to hold against the machine's memory
bandwidth), and the same for ``torch.nn.functional.linear`` on the dense float32 weight. Also
SiLU-and-mul [T, 2I] -> [T, I], fused (one call) against torch's silu then mul.

A benchmark, not a test: nothing here asserts timings. On a shared machine report the spread.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

BLOCK = {2: (32, 18), 3: (32, 20), 8: (32, 34), 12: (256, 144), 14: (256, 210)}
HALVES = {2: (0,), 3: (0, 2), 8: (0,), 12: (0, 2), 14: (208,)}


def random_blocks(ggml_type: int, n: int, k: int) -> torch.Tensor:
    qk, bb = BLOCK[ggml_type]
    raw = torch.randint(0, 256, (n, k // qk, bb), dtype=torch.uint8)
    for off in HALVES[ggml_type]:
        raw[:, :, off:off + 2] = (torch.rand(n, k // qk, 1) * 1e-3).half().view(torch.uint8)
    return raw.reshape(n, -1)


def timeit(fn, iters: int) -> list[float]:
    fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1536)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--iters", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from mindie_llm.backends.cpu import kernels as K

    if not K.available():
        print("mindie_llm._cpu_kernels is not built")
        return 1
    n, k = args.n, args.k
    print(f"kernels isa {K.isa()}; threads {args.threads}; W [{n}, {k}]; {args.iters} calls each; "
          f"load average {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| weight | T | packed MB | median us (best) | GB/s at median (best) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    dense = torch.randn(n, k) * 0.02
    for ggml_type, name in K.PACKED_TYPES.items():
        packed = K.repack(random_blocks(ggml_type, n, k), ggml_type, n, k)
        for t in args.rows:
            x = torch.randn(t, k)
            ts = timeit(lambda: K.matmul(x, packed, ggml_type, n, k), args.iters)
            med, best = statistics.median(ts), min(ts)
            mb = packed.numel() / 1e6
            print(f"| {name} | {t} | {mb:.2f} | {med * 1e6:.0f} ({best * 1e6:.0f}) | "
                  f"{mb / 1e3 / med:.1f} ({mb / 1e3 / best:.1f}) |")
    for t in args.rows:
        x = torch.randn(t, k)
        ts = timeit(lambda: torch.nn.functional.linear(x, dense), args.iters)
        med, best = statistics.median(ts), min(ts)
        mb = dense.numel() * 4 / 1e6
        print(f"| F32 (torch linear) | {t} | {mb:.2f} | {med * 1e6:.0f} ({best * 1e6:.0f}) | "
              f"{mb / 1e3 / med:.1f} ({mb / 1e3 / best:.1f}) |")
    print("\n| SiLU-and-mul [T, 2I] -> [T, I] | T | I | median us (best) |")
    print("| --- | ---: | ---: | ---: |")
    for t in args.rows:
        x = torch.randn(t, 2 * n)

        def torch_two() -> torch.Tensor:
            return torch.nn.functional.silu(x[:, :n]) * x[:, n:]

        for label, fn in (("fused C++ (one call)", lambda: K.silu_and_mul(x)), ("torch silu, then mul", torch_two)):
            ts = timeit(fn, args.iters * 10)
            print(f"| {label} | {t} | {n} | {statistics.median(ts) * 1e6:.1f} ({min(ts) * 1e6:.1f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
