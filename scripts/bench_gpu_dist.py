#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Distributed execution on CUDA (tensor parallelism, PD disaggregation): checks, then
measurements, then one table. One call on the GPU machine, from the repository root (the C++
scheduler extension built in place):

    PYTHONPATH=python python3 scripts/bench_gpu_dist.py --out $OUT [--sections a,b,...]

With two or more GPUs the ranks and the instances get one GPU each and talk NCCL; with one GPU
the script runs what one card allows: ranks that share the card over gloo (device tensors staged
through host memory, device graphs off), NCCL with two ranks on the card (its error recorded),
both PD instances on the card (each sizing its KV pool from its share of the memory fraction).

Sections (``--sections``; all by default, each skips itself where the GPUs do not suffice):
  env         GPUs, torch / NCCL versions; NVLink multicast off in this process and in a child
  nccl        NCCL between two ranks: on two GPUs a sanity all-reduce, on one GPU the error
  tp_tiny     tiny random Llama (fp32): TP=2 vs TP=1 (oracle) through the whole engine, overlap
              off and on: greedy and seeded tokens identical, prompt logprobs within 1e-3; and the
              model-level harness of tests/ (prefill, chunked prefill, mixed, decode; logits)
  tp_small    SmolLM2-135M (the embedded model if installed, else its shapes with random weights):
              TP=3 vs TP=1 (9 heads do not split in two): logits and greedy tokens
  tp_8b       Llama-3-8B shapes (``--layers`` of them), random bf16 checkpoint: TP=2 vs TP=1,
              logits within the bf16 tolerance of tests/ (relative norm 3e-2), greedy tokens
  tp_allreduce  all-reduce time and bus bandwidth, ours against torch.distributed's on the group
  kv_share    KV pools sized from gpu_memory_utilization: one rank at 0.9, two ranks sharing a card
  tp_perf     (2 GPUs) 8B, random bf16: TP=1 and TP=2, batch-1 decode and the offline 256-request
              workload of bench_gpu.py, micro_batch_overlap off and on; step time, comm time and
              share hidden (scripts/bench_tp.py); all-reduce bandwidth against torch.distributed's
  pd          PD through the engine's PD instances (two processes, no server: the router's
              hand-off done here) against a colocated engine (the oracle), tcp and p2p
              connectors; one GPU: both instances on it; two: prefill on GPU 0, decode on GPU 1
  pd_bw       KV connector bandwidth GPU -> GPU (scripts/bench_pd.py transfer, 8B layout)
  pd_load     (2 GPUs, needs the server stack) scripts/bench_pd.py load
  cuda_tests  tests/unit/backends/cuda and the distributed tests

Every figure is printed as a JSON line as it is measured and the table at the end (also to
``--out``). Every process started here runs with NVLink multicast off and is gone at the end.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "tests" / "unit" / "distributed"))

from mindie_llm.distributed.comm_env import MULTICAST_OFF, apply_comm_env, with_comm_env  # noqa: E402

apply_comm_env()

import torch  # noqa: E402

ROWS: list[dict] = []
OUT: str | None = None
DEV = "cuda"               # --device cpu: a smoke run of the code paths on a machine without a GPU
SECRET = "gpu-dist-secret-0123456789abcdef"
BF16_TOL = 3e-2            # tests/unit/backends/cuda: model logits vs the reference, bf16
FP32_TOL = 1e-3


def emit(section: str, what: str, value, unit: str = "", ok: bool | None = None, note: str = "") -> None:
    row = dict(section=section, what=what, value=value, unit=unit,
               status="" if ok is None else ("ok" if ok else "FAIL"), note=note)
    ROWS.append(row)
    line = json.dumps(row, default=str)
    print(line, flush=True)
    if OUT:
        with open(os.path.join(OUT, "gpu_dist.jsonl"), "a") as f:
            f.write(line + "\n")


def guarded(fn):
    def run(*a, **kw):
        t0 = time.perf_counter()
        try:
            fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - a failed section is a row, the next section runs
            traceback.print_exc()
            emit(fn.__name__, "section error", f"{type(e).__name__}: {' '.join(str(e).split())[:400]}", ok=False)
        finally:
            gc.collect()
            torch.cuda.empty_cache()
            print(f"# section {fn.__name__}: {time.perf_counter() - t0:.1f} s", flush=True)
    run.__name__ = fn.__name__
    return run


def ngpu() -> int:
    return torch.cuda.device_count() if DEV == "cuda" else 1


def tp_backend(world: int) -> str:
    """NCCL when every rank has a GPU of its own, else gloo (ranks share a card)."""
    return "nccl" if DEV == "cuda" and ngpu() >= world else "gloo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.isfinite(a64).all():
        return float("inf")
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


# ---------------------------------------------------------------------------------- checkpoints
def write_tiny(root: Path) -> str:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   attention_bias=True, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM._from_config(cfg).float().train(False)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.5)
            elif n.endswith("proj.weight"):
                p.mul_(8.0)           # peaked distributions: sampling differences show
    path = root / "tiny"
    hf.save_pretrained(path, safe_serialization=True)
    return str(path)


def write_random(root: Path, shape: str, layers: int, dtype: torch.dtype, name: str) -> str:
    """A safetensors checkpoint of a named shape (``layers`` of them; 0 = all) with random
    weights generated on the GPU (std 0.02, norms 1): TP=1 and TP=N load the same weights."""
    from safetensors.torch import save_file

    from mindie_llm.loader import named_shape

    cfg = named_shape(shape)
    if layers:
        cfg["num_hidden_layers"] = layers
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = H // nh
    gen_dev = "cuda" if DEV == "cuda" else "cpu"
    g = torch.Generator(device=gen_dev).manual_seed(1)

    def rnd(*shp, std=0.02):
        return (torch.randn(*shp, generator=g, device=gen_dev) * std).to(dtype).cpu()

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(V, H, std=1.0), "model.norm.weight":
                                  torch.ones(H, dtype=dtype)}
    if not cfg.get("tie_word_embeddings"):
        t["lm_head.weight"] = rnd(V, H)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(H, dtype=dtype)
        t[p + "post_attention_layernorm.weight"] = torch.ones(H, dtype=dtype)
        t[p + "self_attn.q_proj.weight"] = rnd(nh * hd, H)
        t[p + "self_attn.k_proj.weight"] = rnd(kvh * hd, H)
        t[p + "self_attn.v_proj.weight"] = rnd(kvh * hd, H)
        t[p + "self_attn.o_proj.weight"] = rnd(H, nh * hd)
        t[p + "mlp.gate_proj.weight"] = rnd(I, H)
        t[p + "mlp.up_proj.weight"] = rnd(I, H)
        t[p + "mlp.down_proj.weight"] = rnd(H, I)
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"))
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


# ---------------------------------------------------------------------------------- env
@guarded
def env() -> None:
    props = [torch.cuda.get_device_name(i) for i in range(ngpu())] if DEV == "cuda" else ["cpu smoke run"]
    emit("env", "GPUs", ngpu(), note=", ".join(props))
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # noqa: BLE001 - a CPU build
        nccl = "none"
    emit("env", "torch / NCCL", f"{torch.__version__} / {nccl}")
    mine = {k: os.environ.get(k) for k in MULTICAST_OFF}
    code = "import os,json;print(json.dumps({k: os.environ.get(k) for k in %r}))" % sorted(MULTICAST_OFF)
    child = json.loads(subprocess.run([sys.executable, "-c", code], env=with_comm_env({"PATH": os.environ["PATH"]}),
                                      capture_output=True, text=True, timeout=60).stdout)
    emit("env", "multicast off (this process, a child)", f"{mine} {child}", ok=mine == child == MULTICAST_OFF)


# ---------------------------------------------------------------------------------- nccl
def _job_nccl(args) -> None:
    """One rank of the NCCL check: join, all-reduce a CUDA tensor, report."""
    from mindie_llm.backends import get_platform
    from mindie_llm.distributed.parallel_state import destroy, init_from_env

    platform = get_platform("cuda")
    device = platform.rank_device(int(os.environ["LOCAL_RANK"]))
    out = {"rank": int(os.environ["RANK"]), "device": str(device)}
    try:
        ctx = init_from_env("nccl", tensor_parallel_size=int(os.environ["WORLD_SIZE"]), timeout_s=60, device=device)
        t = torch.full((1024,), float(ctx.rank + 1), device=device)
        ctx.all_reduce(t)
        torch.cuda.synchronize()
        out["sum"] = float(t[0])
        destroy()
    except Exception as e:  # noqa: BLE001 - the error is the result on one GPU
        out["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:600]}"
    Path(args.job_out).write_text(json.dumps(out))


def spawn_ranks(job: str, world: int, tmp: Path, timeout: float = 180, extra: list[str] | None = None) -> list[dict]:
    port = free_port()
    procs, outs = [], []
    for r in range(world):
        out = tmp / f"{job}-{r}.json"
        outs.append(out)
        e = with_comm_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, __file__, "--job", job, "--job-out", str(out), "--device", DEV,
                                       *(extra or [])], env=e))
    try:
        for p in procs:
            p.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads(o.read_text()) if o.exists() else {"error": "no result (killed or crashed)"} for o in outs]


@guarded
def nccl(tmp: Path) -> None:
    res = spawn_ranks("nccl", 2, tmp, timeout=120)
    if ngpu() >= 2:
        ok = all(r.get("sum") == 3.0 for r in res)
        emit("nccl", "NCCL all-reduce, rank 0 on cuda:0, rank 1 on cuda:1", [r.get("sum", r.get("error")) for r in res],
             ok=ok)
    else:
        errs = [r.get("error", f"no error: sum {r.get('sum')}") for r in res]
        emit("nccl", "NCCL with both ranks on cuda:0 (expected to be refused)", errs[0], ok=None,
             note="rank 1: " + errs[1][:300])


# ---------------------------------------------------------------------------------- tp through the engine
PROMPTS = [[1, 5, 9, 22, 40, 41, 42, 43, 7, 8, 9, 10, 11], [3, 4, 5], [7] * 20, [1, 5, 9, 22, 40, 41, 2],
           list(range(10, 50))]


def run_llm(path: str, tp: int, *, backend: str = "auto", overlap: bool = False, dtype: str = "float32",
            max_tokens: int = 12, graphs: bool = True) -> dict:
    from mindie_llm import LLM, SamplingParams

    llm = LLM(model=path, dtype=dtype, device=DEV, num_blocks=128, block_size=16, tensor_parallel_size=tp,
              max_num_batched_tokens=32, max_model_len=256, enable_prefix_caching=True,
              parallel__micro_batch_overlap=overlap, parallel__comm_backend=backend, enforce_eager=not graphs)
    try:
        greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
        sampled = [SamplingParams(max_tokens=max_tokens, temperature=1.0, top_k=20, seed=100 + i, ignore_eos=True)
                   for i in range(len(PROMPTS))]
        g = llm.generate(PROMPTS, greedy, use_tqdm=False)
        s = llm.generate(PROMPTS, sampled, use_tqdm=False)
        runner = llm.engine.executor.driver.runner
        gm = getattr(runner, "graph_model", None)
        plp = [[d[t].logprob for d, t in zip(r.prompt_logprobs[1:], r.prompt_token_ids[1:])] for r in g]
        out = dict(greedy=[r.outputs[0].token_ids for r in g], sampled=[r.outputs[0].token_ids for r in s],
                   prompt_lp=plp, graphs=len(gm.graphs) if gm else 0, replays=gm.num_replays if gm else 0,
                   children=list(getattr(llm.engine.executor, "_children", {}).values()))
    finally:
        llm.engine.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    out["children_gone"] = all(c.poll() is not None for c in out.pop("children"))
    return out


def compare_llm(section: str, what: str, want: dict, got: dict, tol: float) -> None:
    same_g, same_s = got["greedy"] == want["greedy"], got["sampled"] == want["sampled"]
    err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(got["prompt_lp"], want["prompt_lp"]))
    emit(section, f"{what}: greedy tokens identical to TP=1", same_g, ok=same_g,
         note=f"seeded sampling identical: {same_s}; decode graphs {got['graphs']} ({got['replays']} replays); "
              f"workers gone after shutdown: {got['children_gone']}")
    emit(section, f"{what}: max |prompt logprob - TP=1|", round(err, 6), ok=err <= tol and same_s,
         note=f"tolerance {tol:g}")


def harness(section: str, what: str, jobs: list[dict], world: int, backend: str, tmp: Path, tol: float) -> None:
    """tests/unit/distributed/tp_harness.py on CUDA: TP=world ranks vs TP=1 in this process."""
    import tp_harness

    from mindie_llm.distributed.parallel_state import ParallelContext

    want = [tp_harness.run_job(j, ParallelContext.single(), torch.device(DEV, 0) if DEV == "cuda" else "cpu")
            for j in jobs]
    gc.collect()
    torch.cuda.empty_cache()
    got = tp_harness.run_ranks(jobs, str(tmp / f"harness-{section}"), world=world, timeout=400,
                               extra_env={"MINDIE_TP_HARNESS_BACKEND": backend, "LOCAL_WORLD_SIZE": str(world)})
    for job, w, g in zip(jobs, want, got):
        label = f"{what} overlap={'on' if job['overlap'] else 'off'}"
        if "logits" in w:
            e = rel_err(g["logits"], w["logits"])
            agree = float((g["logits"].argmax(-1) == w["logits"].argmax(-1)).mean())
            emit(section, f"{label}: logits rel. error vs TP=1 (prefill, chunked, mixed, decode)", round(e, 7),
                 ok=e <= tol, note=f"tolerance {tol:g}; argmax agreement {agree:.3f}")
        if "greedy" in w:
            same = bool(np.array_equal(g["greedy"], w["greedy"]))
            frac = float((g["greedy"] == w["greedy"]).mean())
            emit(section, f"{label}: greedy tokens identical to TP=1", same, ok=same if tol <= FP32_TOL else None,
                 note=f"{frac:.3f} of the tokens agree" + ("" if tol <= FP32_TOL else " (bf16: reported, "
                                                            "a near-tie may flip)"))


@guarded
def tp_tiny(tmp: Path) -> None:
    path = write_tiny(tmp)
    backend = tp_backend(2)
    want = run_llm(path, 1)
    emit("tp_tiny", f"TP=1 engine on {DEV}", "ran", note=f"decode graphs {want['graphs']}, {want['replays']} replays")
    for overlap in (False, True):
        label = f"engine TP=2 {backend} overlap={'on' if overlap else 'off'}"
        try:
            got = run_llm(path, 2, backend=backend, overlap=overlap)
        except Exception as e:  # noqa: BLE001 - e.g. a decode-graph capture with the all-reduce inside
            traceback.print_exc()
            emit("tp_tiny", f"{label}, decode graphs on", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
                 ok=False)
            label += ", decode graphs off (retry)"
            got = run_llm(path, 2, backend=backend, overlap=overlap, graphs=False)
        compare_llm("tp_tiny", label, want, got, FP32_TOL)
    jobs = [dict(name="tiny", model=path, overlap=ov, logits=True, greedy=[[1, 50, 34, 28, 4, 20], [1, 90, 42, 12]],
                 device=DEV, dtype="float32", block=16) for ov in (False, True)]
    harness("tp_tiny", f"model TP=2 {backend}", jobs, 2, backend, tmp, FP32_TOL)


@guarded
def tp_small(tmp: Path) -> None:
    try:
        from mindie_llm.loader.default_model import default_model_path

        path, src = default_model_path(), "embedded SmolLM2-135M-Instruct (GGUF)"
        dtype = "float32"
    except Exception:  # noqa: BLE001 - not installed on this machine: its shapes, random weights
        path, src, dtype = write_random(tmp, "smollm2-135m", 0, torch.float32, "smol"), \
            "SmolLM2-135M shapes, random fp32 weights (the embedded model is not installed here)", "float32"
    world = 3
    backend = tp_backend(world)
    emit("tp_small", "model", src)
    jobs = [dict(name="smol", model=path, overlap=ov, logits=True, greedy=[[1, 50, 34, 28, 4, 20], [1, 90, 42, 12]],
                 device=DEV, dtype=dtype, block=16) for ov in (False, True)]
    harness("tp_small", f"model TP=3 {backend}", jobs, world, backend, tmp, FP32_TOL)


@guarded
def tp_8b(tmp: Path, layers: int) -> None:
    path = write_random(tmp, "llama3-8b", layers, torch.bfloat16, "llama8b")
    backend = tp_backend(2)
    jobs = [dict(name="8b", model=path, overlap=ov, logits=True, greedy=[[1, 50, 34, 28, 4, 20], [1, 90, 42, 12]],
                 device=DEV, dtype="bfloat16", block=16) for ov in (False, True)]
    harness("tp_8b", f"Llama-3-8B shapes x{layers} layers, TP=2 {backend}", jobs, 2, backend, tmp, BF16_TOL)
    shutil.rmtree(path, ignore_errors=True)


@guarded
def kv_share(tmp: Path) -> None:
    """KV pools sized from the memory fraction (no cache.num_blocks): one rank alone at 0.9, then
    two tensor-parallel ranks sharing the card (each sizes from 0.45): the card stays under the
    fraction and TP=2 decodes what TP=1 does."""
    from mindie_llm import LLM, SamplingParams

    path = write_tiny(tmp)
    outs = []
    for tp in (1, 2):
        llm = LLM(model=path, dtype="float32", device=DEV, tensor_parallel_size=tp, max_model_len=256,
                  parallel__comm_backend="auto" if tp == 1 else tp_backend(2), gpu_memory_utilization=0.9)
        try:
            free, total = torch.cuda.mem_get_info() if DEV == "cuda" else (0, 1)
            used = (total - free) / total
            g = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), use_tqdm=False)
            outs.append([r.outputs[0].token_ids for r in g])
            cfg = llm.engine.config.cache
            emit("kv_share", f"TP={tp}{' (2 ranks on one card)' if tp == 2 and ngpu() < 2 else ''}: card in use with "
                 "the pools allocated", round(100 * used, 1), "%", ok=used <= 0.93 if DEV == "cuda" else None,
                 note=f"{llm.engine.num_kv_blocks} KV blocks of the tiny Llama; rank 0's "
                      f"gpu_memory_utilization {cfg.gpu_memory_utilization:.3f}")
        finally:
            llm.engine.shutdown()
            del llm
            gc.collect()
            torch.cuda.empty_cache()
    emit("kv_share", "TP=2 greedy tokens identical to TP=1 (both sized from the fraction)", outs[0] == outs[1],
         ok=outs[0] == outs[1])


# ---------------------------------------------------------------------------------- tp performance
def _job_allreduce(args) -> None:
    """One rank: our ParallelContext.all_reduce against torch.distributed.all_reduce on the same group."""
    from mindie_llm.backends import get_platform
    from mindie_llm.distributed.parallel_state import destroy, init_from_env

    import torch.distributed as dist

    device = get_platform(DEV).rank_device(int(os.environ["LOCAL_RANK"]))
    backend = args.job_arg or "nccl"
    sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
    ctx = init_from_env(backend, tensor_parallel_size=int(os.environ["WORLD_SIZE"]), timeout_s=120, device=device)
    res = {}
    sizes = [8192 * 2, 64 << 10, 1 << 20, 16 << 20, 256 << 20] if backend == "nccl" else [8192 * 2, 1 << 20]
    for nbytes in sizes:
        t = torch.randn(nbytes // 4, device=device, dtype=torch.float32)
        for label, fn in (("ours", lambda: ctx.all_reduce(t)),
                          ("torch", lambda: dist.all_reduce(t if backend == "nccl" else t.cpu(), group=ctx.group))):
            reps = 50 if nbytes <= (1 << 20) else 10
            for _ in range(3):
                fn()
            ctx.barrier()
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            sync()
            res[f"{label}:{nbytes}"] = (time.perf_counter() - t0) / reps
    if ctx.rank == 0:
        Path(args.job_out).write_text(json.dumps(res))
    destroy()


@guarded
def tp_allreduce(tmp: Path) -> None:
    world = 2
    backend = tp_backend(world)
    res = spawn_ranks("allreduce", world, tmp, timeout=180, extra=["--job-arg", backend])[0]
    if "error" in res:
        raise RuntimeError(res["error"])
    n = world
    for key in sorted(k for k in res if k.startswith("ours:")):
        nbytes = int(key.split(":")[1])
        ours, ref = res[key], res[f"torch:{nbytes}"]
        bus = nbytes / ours / 1e9 * 2 * (n - 1) / n
        emit("tp_allreduce", f"all-reduce {nbytes} B fp32, TP=2 {backend}", round(ours * 1e6, 1), "us",
             note=f"busbw {bus:.1f} GB/s; torch.distributed.all_reduce on the same group {ref * 1e6:.1f} us "
                  f"(ours takes {ours / ref:.2f}x its time)"
                  + ("" if backend == "nccl" else "; gloo staged through host memory: not a figure"))


def _engine_perf(tp: int, overlap: bool, label: str) -> None:
    """bench_gpu.py's batch-1 and offline 256 workloads on an 8B engine (random weights)."""
    import bench_gpu

    from mindie_llm.config import EngineConfig
    from mindie_llm.engine.llm_engine import LLMEngine

    kw = dict(model="llama3-8b", load_format="dummy", dtype="bfloat16", device="cuda", max_model_len=4096,
              max_num_seqs=256, max_num_batched_tokens=8192, gpu_memory_utilization=0.85, tensor_parallel_size=tp,
              parallel__micro_batch_overlap=overlap)
    t0 = time.perf_counter()
    eng = LLMEngine(EngineConfig.from_kwargs(**kw))
    try:
        V = eng.arch.vocab_size
        gm = getattr(eng.runner, "graph_model", None)
        emit("tp_perf", f"{label}: engine start-up", round(time.perf_counter() - t0, 1), "s",
             note=f"{eng.num_kv_blocks} KV blocks, {len(gm.graphs) if gm else 0} decode graphs")
        bench_gpu.run(eng, bench_gpu.prompts(4, 64, 128, V, seed=9), [8] * 4)               # warm-up
        dt, n, times, _ = bench_gpu.run(eng, bench_gpu.prompts(1, 128, 128, V), [128])
        itl = np.diff(times["r0"][2:])
        emit("tp_perf", f"{label}: batch-1 decode 128+128", round(n / dt, 1), "tok/s",
             note=f"median ITL {np.median(itl) * 1e3:.3f} ms")
        dt, n, _, _ = bench_gpu.run(eng, bench_gpu.prompts(256, 64, 512, V), [128] * 256)
        emit("tp_perf", f"{label}: offline 256 x (64-512 -> 128)", round(n / dt, 1), "out tok/s", note=f"{dt:.2f} s")
    finally:
        eng.shutdown() if hasattr(eng, "shutdown") else eng.executor.shutdown()
        del eng
        gc.collect()
        torch.cuda.empty_cache()


@guarded
def tp_perf(tmp: Path) -> None:
    if ngpu() < 2:
        emit("tp_perf", "TP=1 / TP=2 figures", "not measured: needs two GPUs")
        return
    sys.path.insert(0, str(ROOT / "scripts"))
    for tp, overlap in ((1, False), (2, False), (2, True)):
        _engine_perf(tp, overlap, f"8B TP={tp} overlap={'on' if overlap else 'off'}")
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_tp.py"), "--device", "cuda", "--shape", "llama3-8b",
           "--layers", "0", "--batches", "1,32,64,128", "--tp", "2", "--steps", "10", "--warmup", "3",
           "--bw-bytes", str(64 << 20)]
    r = subprocess.run(cmd, env=with_comm_env(), capture_output=True, text=True, timeout=500)
    print(r.stdout[-4000:], r.stderr[-2000:])
    if OUT:
        Path(OUT, "bench_tp.txt").write_text(r.stdout + r.stderr)
    emit("tp_perf", "bench_tp.py 8B TP=2 step / comm / hidden table", "see bench_tp.txt", ok=r.returncode == 0,
         note=" | ".join(l for l in r.stdout.splitlines() if l.startswith("| ") or l.startswith("all-reduce"))[:1500])


# ---------------------------------------------------------------------------------- PD
def _job_pd(args) -> None:
    """A PD instance (prefill or decode) driven over stdin/stdout JSON lines by the parent, which
    does the router's hand-off."""
    from concurrent.futures import Future

    from mindie_llm.config import EngineConfig
    from mindie_llm.engine.pd_instance import PDInstance
    from mindie_llm.sampling_params import SamplingParams

    cfg = EngineConfig.from_dict(json.loads(Path(args.job_arg).read_text()))
    inst = PDInstance.from_config(cfg)
    done: dict[str, Future] = {}

    def reply(obj) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "address": inst.connector.address, "num_kv_blocks": inst.engine.num_kv_blocks,
           "gpu_memory_utilization": inst.engine.config.cache.gpu_memory_utilization,
           "device": str(inst.engine.executor.driver.device)})
    for line in sys.stdin:
        m = json.loads(line)
        op = m["op"]
        try:
            if op == "prefill":
                r = inst.prefill(m["rid"], m["prompt"], SamplingParams(**m["params"])).result(120)
                reply({"first_token": r.first_token, "seed": r.seed, "handle": r.handle, "finished": r.finished,
                       "prompt_token_ids": r.prompt_token_ids})
            elif op == "push":
                res = inst.push_kv(m["handle"], m["tid"], m["address"], np.asarray(m["blocks"]), 60.0)
                reply({"ok": res.ok, "reason": res.reason, "num_bytes": res.num_bytes, "seconds": res.seconds})
            elif op == "admit":
                fut: Future = Future()
                done[m["rid"]] = fut

                def sink(out, fut=fut) -> None:
                    if out.finished and not fut.done():
                        fut.set_result(list(out.outputs[0].token_ids))
                tid, blocks, transfer = inst.admit_prefilled(m["rid"], m["prompt"], SamplingParams(**m["params"]),
                                                             m["seed"], m["first_token"], sink).result(60)

                def ready(f, rid=m["rid"], fut=fut) -> None:
                    if f.result().ok:
                        inst.kv_ready(rid)
                    elif not fut.done():
                        fut.set_result({"transfer_failed": f.result().reason})
                transfer.add_done_callback(ready)
                reply({"tid": int(tid), "blocks": [int(b) for b in blocks], "address": inst.connector.address})
            elif op == "result":
                reply({"token_ids": done.pop(m["rid"]).result(120)})
            elif op == "quit":
                break
        except Exception as e:  # noqa: BLE001 - reported to the parent
            reply({"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})
    inst.shutdown()
    inst.engine.shutdown()
    sys.stdout.flush()
    os._exit(0)


class _Inst:
    def __init__(self, name: str, cfg: dict, tmp: Path, cuda_visible: str | None):
        path = tmp / f"{name}.json"
        path.write_text(json.dumps(cfg))
        e = with_comm_env(MINDIE_KV_TRANSFER_KEY=SECRET, **({"CUDA_VISIBLE_DEVICES": cuda_visible} if cuda_visible
                                                           else {}))
        self.log = open(tmp / f"{name}.log", "wb")
        self.p = subprocess.Popen([sys.executable, __file__, "--job", "pd", "--job-arg", str(path)], env=e,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.name = name

    def read(self, timeout: float = 180) -> dict:
        box: list = []
        th = threading.Thread(target=lambda: box.append(self.p.stdout.readline()), daemon=True)
        th.start()
        th.join(timeout)
        if not box or not box[0]:
            raise RuntimeError(f"{self.name}: no reply (rc={self.p.poll()})")
        return json.loads(box[0])

    def ask(self, **m) -> dict:
        self.p.stdin.write(json.dumps(m) + "\n")
        self.p.stdin.flush()
        r = self.read()
        if "error" in r:
            raise RuntimeError(f"{self.name}: {r['error']}")
        return r

    def stop(self) -> None:
        try:
            if self.p.poll() is None:
                self.p.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.p.stdin.flush()
                self.p.wait(30)
        except Exception:  # noqa: BLE001
            pass
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self.log.close()


PD_PROMPTS = [list(range(3, 3 + n)) for n in (5, 17, 40, 100)] + [[7, 1, 9] * 30]


def _pd_params(i: int, greedy: bool) -> dict:
    return dict(max_tokens=16, temperature=0.0, ignore_eos=True) if greedy else \
        dict(max_tokens=16, temperature=1.0, top_k=20, seed=500 + i, ignore_eos=True)


def _pd_base(path: str, dtype: str) -> dict:
    return {"model": {"path": path, "dtype": dtype, "max_seq_len": 512},
            "cache": {"cache_block_size": 16, "gpu_memory_utilization": 0.9, "enable_prefix_caching": False},
            "scheduler": {"max_batch_size": 32, "max_prefill_tokens": 1024},
            "backend": {"device": DEV},
            "disaggregation": {"transfer_timeout_s": 30.0}}


def _colocated(path: str, dtype: str) -> list:
    from mindie_llm import LLM, SamplingParams

    llm = LLM(model=path, dtype=dtype, device=DEV, num_blocks=256, block_size=16, max_model_len=512,
              enable_prefix_caching=False)
    try:
        out = []
        for greedy in (True, False):        # one request at a time, as the PD run below: the same batches
            for i, prompt in enumerate(PD_PROMPTS):
                r = llm.generate([prompt], SamplingParams(**_pd_params(i, greedy)), use_tqdm=False)[0]
                out.append(r.outputs[0].token_ids)
    finally:
        llm.engine.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _pd_run(path: str, dtype: str, tmp: Path, connector: str, backend: str) -> tuple[list, dict]:
    two = ngpu() >= 2
    base = _pd_base(path, dtype)
    share = 0.9 if two else 0.4                   # one card: each instance sizes its pool from 0.4 of it
    base["cache"]["gpu_memory_utilization"] = share
    d = {"kv_connector": connector}
    if connector == "p2p":
        d.update(transfer_group_address=f"127.0.0.1:{free_port()}", transfer_group_size=2, transfer_backend=backend)
    insts = []
    try:
        for rank, role in enumerate(("prefill", "decode")):
            cfg = json.loads(json.dumps(base))
            cfg["disaggregation"] = {**base["disaggregation"], **d, "role": role}
            if connector == "p2p":
                cfg["disaggregation"]["transfer_group_rank"] = rank
            insts.append(_Inst(f"{role}-{connector}-{backend}", cfg, tmp, str(rank) if two else None))
        info = [i.read(300) for i in insts]
        pre, dec = insts
        out = []
        bytes_moved = 0
        t_transfer = 0.0
        k = 0
        for greedy in (True, False):
            for i, prompt in enumerate(PD_PROMPTS):
                rid = f"r{k}"
                k += 1
                params = _pd_params(i, greedy)
                r = pre.ask(op="prefill", rid=rid, prompt=prompt, params=params)
                a = dec.ask(op="admit", rid=rid, prompt=r["prompt_token_ids"], params=params, seed=r["seed"],
                            first_token=r["first_token"])
                push = pre.ask(op="push", handle=r["handle"], tid=a["tid"], address=a["address"], blocks=a["blocks"])
                if not push["ok"]:
                    raise RuntimeError(f"push failed: {push['reason']}")
                bytes_moved += push["num_bytes"]
                t_transfer += push["seconds"]
                toks = dec.ask(op="result", rid=rid)["token_ids"]
                if isinstance(toks, dict):
                    raise RuntimeError(f"transfer failed: {toks}")
                out.append(toks)
        return out, {"info": info, "bytes": bytes_moved, "seconds": t_transfer}
    finally:
        for i in insts:
            i.stop()


@guarded
def pd(tmp: Path) -> None:
    path = write_random(tmp, "smollm2-135m", 0, torch.float32, "smol-pd")
    dtype = "float32"
    want = _colocated(path, dtype)
    emit("pd", "colocated oracle (SmolLM2 shapes, random fp32, one request at a time)", f"{len(want)} requests")
    two = ngpu() >= 2
    cases = [("tcp", "gloo"), ("p2p", "gloo")] + ([("p2p", "nccl")] if two else [])
    where = "prefill cuda:0, decode cuda:1" if two else f"both instances on {DEV}:0"
    for connector, backend in cases:
        label = connector if connector == "tcp" else f"p2p over {backend}"
        try:
            got, st = _pd_run(path, dtype, tmp, connector, backend)
        except Exception as e:  # noqa: BLE001
            emit("pd", f"PD {label} ({where})", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}", ok=False)
            continue
        same = got == want
        agree = sum(a == b for a, b in zip(got, want))
        info = "; ".join(f"{x['device']} util {x['gpu_memory_utilization']:.2f} {x['num_kv_blocks']} blocks"
                         for x in st["info"])
        emit("pd", f"PD {label} ({where}): tokens identical to colocated (greedy + seeded)", same, ok=same,
             note=f"{agree}/{len(want)} requests identical; {st['bytes'] / 1e6:.1f} MB moved in "
                  f"{st['seconds'] * 1e3:.0f} ms of pushes; pools: {info}")
    shutil.rmtree(path, ignore_errors=True)


@guarded
def pd_bw(tmp: Path) -> None:
    two = ngpu() >= 2
    d0 = "cuda:0" if DEV == "cuda" else "cpu"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_pd.py"), "transfer", "--device", d0, "--peer-device",
           "cuda:1" if two else d0, "--layout", "llama3-8b", "--blocks", "64", "--repeats", "5",
           "--connectors", "tcp,p2p-gloo" + (",p2p-nccl" if two else "")]
    r = subprocess.run(cmd, env=with_comm_env(), capture_output=True, text=True, timeout=400)
    print(r.stdout[-3000:], r.stderr[-3000:])
    head = next((l for l in r.stdout.splitlines() if l.startswith("KV transfer")), "")
    for l in r.stdout.splitlines():
        if not ("floor" in l or "connector" in l) or l.startswith("KV transfer"):
            continue
        parts = l[44:].split()
        check = " ".join(parts[3:])
        emit("pd_bw", l[:44].strip(), parts[0] if parts else "?", "MB/s",
             ok=(check == "bit-exact") if "connector" in l else None,
             note=f"min {parts[1] if len(parts) > 1 else '?'} max {parts[2] if len(parts) > 2 else '?'}; {check}; "
                  f"{head}")
    if r.returncode:
        emit("pd_bw", "bench_pd.py transfer", f"exit {r.returncode}", ok=False, note=r.stderr[-300:])


@guarded
def pd_load(tmp: Path) -> None:
    missing = []
    for mod in ("fastapi", "uvicorn", "grpc", "mindie_llm.server.proto.mindie_pd_pb2"):
        try:
            __import__(mod)
        except Exception:  # noqa: BLE001
            missing.append(mod)
    if ngpu() < 2 or missing:
        emit("pd_load", "PD vs colocated goodput (bench_pd.py load)", "not measured",
             note=("needs two GPUs; " if ngpu() < 2 else "") + (f"missing here: {', '.join(missing)}" if missing else ""))
        return
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_pd.py"), "load", "--device", "cuda",
           "--deployments", "colocated-dp2,pd", "--rates", "4,8,16,32", "--requests", "64", "--max-tokens", "64",
           "--prompt-words", "256", "--ttft-slo", "0.5", "--itl-slo", "0.05,0.1"]
    r = subprocess.run(cmd, env=with_comm_env(), capture_output=True, text=True, timeout=500)
    if OUT:
        Path(OUT, "bench_pd_load.txt").write_text(r.stdout + r.stderr)
    emit("pd_load", "bench_pd.py load", "see bench_pd_load.txt", ok=r.returncode == 0, note=r.stdout[-1200:])


@guarded
def cuda_tests(tmp: Path) -> None:
    for what, paths in (("tests/unit/backends/cuda", ["tests/unit/backends/cuda"]),
                        ("distributed tests (CPU gloo)", ["tests/unit/distributed/test_comm_backend.py",
                                                          "tests/unit/distributed/test_kv_transfer_p2p.py"])):
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *paths],
                           env=with_comm_env(PYTHONPATH=str(ROOT / "python")), capture_output=True, text=True,
                           timeout=500, cwd=ROOT)
        tail = [l for l in r.stdout.splitlines() if " passed" in l or " failed" in l or "error" in l.lower()]
        emit("cuda_tests", what, tail[-1] if tail else f"exit {r.returncode}", ok=r.returncode == 0)


# ---------------------------------------------------------------------------------- main
def print_table() -> str:
    lines = ["", f"# bench_gpu_dist: {ngpu()} GPU(s), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             "| section | check / figure | value | status | note |", "|---|---|---|---|---|"]
    for r in ROWS:
        v = f"{r['value']} {r['unit']}".strip()
        lines.append(f"| {r['section']} | {r['what']} | {v[:200]} | {r['status']} | {str(r['note'])[:300]} |")
    fails = sum(r["status"] == "FAIL" for r in ROWS)
    lines.append(f"\n{len(ROWS)} rows, {fails} FAIL")
    text = "\n".join(lines)
    print(text, flush=True)
    if OUT:
        Path(OUT, "gpu_dist_table.md").write_text(text + "\n")
    return text


SECTIONS = ["env", "nccl", "tp_tiny", "tp_small", "tp_8b", "tp_allreduce", "kv_share", "pd", "pd_bw", "tp_perf",
            "pd_load", "cuda_tests"]
ONE_GPU = ["env", "nccl", "tp_tiny", "tp_small", "tp_8b", "tp_allreduce", "kv_share", "pd", "pd_bw", "tp_perf",
           "pd_load"]


def main() -> int:
    global OUT, DEV
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default="auto", help="comma-separated, or auto: every section on two or more "
                    "GPUs, the single-GPU parts on one (tp_perf and pd_load then record what was not measured)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--layers", type=int, default=4, help="tp_8b: Llama-3-8B layers in the random checkpoint")
    ap.add_argument("--device", default="cuda", help="cuda; cpu = a smoke run of the code paths (no figures)")
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--job-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--job-arg", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    DEV = args.device
    if args.job:
        {"nccl": _job_nccl, "allreduce": _job_allreduce, "pd": _job_pd}[args.job](args)
        sys.stdout.flush()
        os._exit(0)
    OUT = args.out
    if OUT:
        os.makedirs(OUT, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-dist-"))
    t0 = time.perf_counter()

    def on_term(*_):            # a wall-clock limit still gets the table of what ran
        raise SystemExit(124)
    signal.signal(signal.SIGTERM, on_term)
    try:
        names = (SECTIONS if ngpu() >= 2 else ONE_GPU) if args.sections == "auto" else args.sections.split(",")
        for name in names:
            fn = globals()[name]
            if name == "env":
                fn()
            elif name == "tp_8b":
                fn(tmp, args.layers)
            else:
                fn(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"# total {time.perf_counter() - t0:.0f} s")
        print_table()
    return 1 if any(r["status"] == "FAIL" for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
