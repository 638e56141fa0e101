# SPDX-License-Identifier: Apache-2.0
"""Tensor-parallel step-time benchmark (CPU gloo here; NCCL on GPUs with --device cuda).

    python scripts/bench_tp.py [--shape llama3.2-1b] [--layers 4] [--batches 1,32] [--tp 2]

Dummy weights of a named shape (``--layers`` cuts the layer count to keep a run short), decode
steps of ``--batches`` requests with ``--context`` tokens of KV each, at TP=1 and TP=N, with
micro-batch overlap off and on. Prints, per batch size: step time (median and spread over
``--steps``), the communication time alone (the same all-reduces and all-gather without the
compute, measured in the same run), the share of it hidden by overlap
((t_off - t_on) / t_comm), and the all-reduce bandwidth against the loopback copy floor (one
TCP loopback stream and a memcpy of the same bytes).

It starts its own rank processes on loopback (torchrun variables); nothing outlives it.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import torch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_REPO, "python"))


def _stats(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def _batch(b: int, context: int, new: int, block: int, device):
    """b requests, each with ``context`` tokens of KV and ``new`` tokens to compute (1 = decode)."""
    from mindie_llm.layers.attention import AttentionMetadata

    per = -(-(context + new) // block)
    tables = [list(range(1 + i * per, 1 + (i + 1) * per)) for i in range(b)]
    md = AttentionMetadata.build([context] * b, [new] * b, tables, block, device=device)
    ids = torch.randint(0, 1000, (b * new,), device=device)
    pos = torch.arange(context, context + new, device=device).repeat(b)
    qsl = np.arange(b + 1) * new
    return ids, pos, md, qsl, np.full(b, context + new), b * per + 1


def _time(fn, steps: int, warmup: int, parallel) -> list[float]:
    out = []
    for i in range(warmup + steps):
        parallel.barrier()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i >= warmup:
            out.append(dt)
    # every rank reports the slowest rank's time of each step
    t = torch.tensor(out, dtype=torch.float64)
    if parallel.size > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=parallel.cpu_group)     # host tensor: the CPU group
    return t.tolist()


def rank_main(args) -> dict:
    from mindie_llm.backends import get_platform
    from mindie_llm.config import ModelConfig
    from mindie_llm.distributed.micro_batch import forward_overlapped
    from mindie_llm.distributed.parallel_state import init_from_env, resolve_backend
    from mindie_llm.loader import load_model, named_shape

    platform = get_platform(args.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = platform.rank_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = resolve_backend(args.comm_backend, platform.device_type, platform.dist_backend)
    parallel = init_from_env(backend, tensor_parallel_size=world, timeout_s=300, device=device)
    cfg = named_shape(args.shape)
    cfg["num_hidden_layers"] = args.layers or cfg["num_hidden_layers"]
    loaded = load_model(ModelConfig(load_format="dummy"), device, torch.float32 if args.device == "cpu"
                        else torch.bfloat16, progress=False, hf_config=cfg, parallel=parallel)
    model, arch = loaded.model, loaded.arch
    dtype = next(model.parameters()).dtype
    kvh = model.model.layers[0].self_attn.qkv_proj.num_kv_heads
    block = 16
    res: dict = {"world": world, "batches": {}}
    for b in args.batches:
        ids, pos, md, qsl, sl, nblocks = _batch(b, args.context, args.new_tokens, block, device)
        kv = [torch.zeros(2, nblocks, block, kvh, arch.head_dim, dtype=dtype, device=device)
              for _ in range(arch.num_hidden_layers)]
        rows = torch.arange(b, device=device) * args.new_tokens + args.new_tokens - 1   # last token of each

        def plain():
            with torch.inference_mode():
                model.compute_logits(model(ids, pos, kv, md)[rows])
                platform.synchronize()

        def overlapped():
            with torch.inference_mode():
                model.compute_logits(forward_overlapped(model, ids, pos, kv, md, qsl, sl)[rows])
                platform.synchronize()

        hbuf = [torch.randn(b * args.new_tokens, arch.hidden_size, dtype=dtype, device=device) for _ in range(2 * arch.num_hidden_layers + 1)]
        lbuf = torch.randn(b, -(-arch.vocab_size // world), dtype=torch.float32, device=device)

        def comm():
            for h in hbuf:
                parallel.all_reduce(h)
            parallel.all_gather(lbuf, dim=-1)
            platform.synchronize()

        entry = {"off": _time(plain, args.steps, args.warmup, parallel)}
        if world > 1:
            entry["on"] = _time(overlapped, args.steps, args.warmup, parallel)
            entry["comm"] = _time(comm, args.steps, args.warmup, parallel)
            big = torch.randn(args.bw_bytes // 4, device=device)
            entry["ar_big"] = _time(lambda: (parallel.all_reduce(big), platform.synchronize()), 5, 1, parallel)
            small = hbuf[0]
            entry["ar_small"] = _time(lambda: (parallel.all_reduce(small), platform.synchronize()), 20, 3, parallel)
            entry["small_bytes"] = small.numel() * small.element_size()
        res["batches"][b] = entry
    return res


def _loopback_floor(nbytes: int) -> tuple[float, float]:
    """(TCP loopback stream GB/s, memcpy GB/s) for ``nbytes``."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    payload = bytearray(nbytes)

    def sink():
        c, _ = srv.accept()
        got, buf = 0, bytearray(1 << 20)
        while got < nbytes:
            n = c.recv_into(buf)
            if not n:
                break
            got += n
        c.sendall(b"k")
        c.close()

    t = threading.Thread(target=sink)
    t.start()
    cl = socket.create_connection(srv.getsockname())
    t0 = time.perf_counter()
    cl.sendall(payload)
    cl.recv(1)
    tcp = nbytes / (time.perf_counter() - t0) / 1e9
    cl.close()
    t.join()
    srv.close()
    a = torch.empty(nbytes // 4)
    bb = torch.empty_like(a)
    bb.copy_(a)
    t0 = time.perf_counter()
    for _ in range(5):
        bb.copy_(a)
    mem = 5 * nbytes / (time.perf_counter() - t0) / 1e9
    return tcp, mem


def _spawn(world: int, argv: list[str], out: str, timeout: float) -> None:
    from mindie_llm.distributed.comm_env import with_comm_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    try:
        for r in range(world):
            env = with_comm_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=str(port), BENCH_TP_OUT=out if r == 0 else "")
            procs.append(subprocess.Popen([sys.executable, __file__, "--rank-process"] + argv, env=env))
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(1, deadline - time.monotonic()))
            if p.returncode:
                raise SystemExit(f"a rank exited with code {p.returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--layers", type=int, default=4, help="cut the layer count (0 = the shape's own)")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=1, help="tokens each request computes (1 = decode; "
                    "more = a prefill chunk)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--comm-backend", default="auto", help="auto (the device's) | nccl | gloo (gloo on cuda: "
                    "ranks may share one GPU; collectives staged through host memory)")
    ap.add_argument("--bw-bytes", type=int, default=16 << 20)
    ap.add_argument("--timeout", type=float, default=540)
    ap.add_argument("--rank-process", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.rank_process:
        res = rank_main(args)
        if os.environ.get("BENCH_TP_OUT"):
            with open(os.environ["BENCH_TP_OUT"], "w") as f:
                json.dump(res, f)
        os._exit(0)
    import tempfile

    argv = [a for a in sys.argv[1:]]
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for world in (1, args.tp):
            out = os.path.join(d, f"tp{world}.json")
            _spawn(world, argv, out, args.timeout)
            with open(out) as f:
                results[world] = json.load(f)
    tcp, mem = _loopback_floor(args.bw_bytes)
    print(f"# bench_tp: shape={args.shape} layers={args.layers or 'all'} context={args.context} "
          f"new_tokens/request={args.new_tokens} "
          f"threads/rank={args.threads} device={args.device} comm={args.comm_backend} steps={args.steps} "
          "(median [min-max] ms)")
    print("| batch | TP=1 step | TP=%d step, overlap off | TP=%d step, overlap on | comm alone | hidden |"
          % (args.tp, args.tp))
    print("|---|---|---|---|---|---|")
    fmt = (lambda xs: "%.1f [%.1f-%.1f]" % tuple(1e3 * v for v in _stats(xs)))
    for b in args.batches:
        one, par = results[1]["batches"][str(b)], results[args.tp]["batches"][str(b)]
        off, on, comm = (statistics.median(par[k]) for k in ("off", "on", "comm"))
        if b < 2:   # one request is not split: "on" runs the plain forward
            print(f"| {b} | {fmt(one['off'])} | {fmt(par['off'])} | n/a (one request: no split) | "
                  f"{fmt(par['comm'])} | n/a |")
            continue
        print(f"| {b} | {fmt(one['off'])} | {fmt(par['off'])} | {fmt(par['on'])} | {fmt(par['comm'])} | "
              f"{100 * (off - on) / comm:.0f}% |")
    b0 = str(args.batches[-1])
    big = statistics.median(results[args.tp]["batches"][b0]["ar_big"])
    small = statistics.median(results[args.tp]["batches"][b0]["ar_small"])
    sb = results[args.tp]["batches"][b0]["small_bytes"]
    n = args.tp
    print(f"\nall-reduce {args.bw_bytes >> 20} MiB: {1e3 * big:.1f} ms, algbw {args.bw_bytes / big / 1e9:.2f} GB/s, "
          f"busbw {args.bw_bytes / big / 1e9 * 2 * (n - 1) / n:.2f} GB/s; "
          f"all-reduce {sb} B: {1e6 * small:.0f} us")
    print(f"loopback floor, same bytes: TCP stream {tcp:.2f} GB/s, memcpy {mem:.2f} GB/s")


if __name__ == "__main__":
    main()
