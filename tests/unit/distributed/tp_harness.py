# SPDX-License-Identifier: Apache-2.0
"""Model-level tensor-parallel harness: the same fixed schedule of steps (prefill of two requests,
chunked prefill mixed with decodes, decodes, a greedy loop) run by one process (TP=1, the oracle)
or by N processes started here with torchrun's variables (gloo on loopback).

As a script it is one rank: ``tp_harness.py JOBS_JSON OUT_DIR``; rank 0 writes each job's logits
and greedy tokens to OUT_DIR as .npy (read back with allow_pickle=False).

A job runs on the CPU in float32 unless it names ``device`` ("cuda": rank r on
``Platform.rank_device(LOCAL_RANK)``), ``dtype`` and ``block`` (the KV block size; 16 on CUDA);
the ranks' backend is ``MINDIE_TP_HARNESS_BACKEND`` (gloo unless set: nccl, or gloo with device
tensors for ranks that share one GPU). Every job of one run must name the same device.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import torch

BLOCK = 4
NUM_BLOCKS = 64

# (request, number of tokens to compute) per step; decodes (1 token) first in each step.
SCHEDULE = [
    [("a", 5), ("b", 3)],                      # two prefills
    [("a", 1), ("b", 1), ("c", 4)],            # mixed: two decodes + a prefill chunk
    [("a", 1), ("b", 1), ("c", 5)],            # chunked prefill continues
    [("a", 1), ("b", 1), ("c", 1)],            # decode only
    [("a", 1), ("c", 2), ("b", 3)],            # decode + two chunks
]


def _tokens(vocab: int) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(5)
    return {r: torch.randint(0, vocab, (16,), generator=g).tolist() for r in "abc"}


class Stepper:
    """Feeds steps to a (possibly sharded) model with its own paged KV cache."""

    def __init__(self, model, overlap: bool, device="cpu", block: int = BLOCK):
        self.model, self.overlap, self.device, self.block = model, overlap, torch.device(device), block
        attn = model.model.layers[0].self_attn
        arch = model.arch
        dtype = next(model.parameters()).dtype
        self.kv = [torch.zeros(2, NUM_BLOCKS, block, attn.qkv_proj.num_kv_heads, arch.head_dim, dtype=dtype,
                               device=self.device) for _ in range(arch.num_hidden_layers)]
        self.free = list(range(NUM_BLOCKS - 1, 0, -1))
        self.tables: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}

    def step(self, reqs: list[tuple[str, list[int]]]) -> torch.Tensor:
        """reqs: (name, the new tokens); returns the logits of every new token [T, V]."""
        from mindie_llm.distributed.micro_batch import forward_overlapped
        from mindie_llm.layers.attention import AttentionMetadata

        computed, scheduled, tables, ids, pos = [], [], [], [], []
        for name, new in reqs:
            c = self.computed.get(name, 0)
            table = self.tables.setdefault(name, [])
            while len(table) * self.block < c + len(new):
                table.append(self.free.pop())
            computed.append(c)
            scheduled.append(len(new))
            tables.append(table)
            ids += new
            pos += list(range(c, c + len(new)))
            self.computed[name] = c + len(new)
        md = AttentionMetadata.build(computed, scheduled, tables, self.block, device=self.device)
        ids_t, pos_t = torch.tensor(ids, device=self.device), torch.tensor(pos, device=self.device)
        with torch.inference_mode():
            if self.overlap:
                qsl = np.concatenate([[0], np.cumsum(scheduled)])
                hidden = forward_overlapped(self.model, ids_t, pos_t, self.kv, md, qsl,
                                            np.asarray(computed) + np.asarray(scheduled))
            else:
                hidden = self.model(ids_t, pos_t, self.kv, md)
            return self.model.compute_logits(hidden).float().cpu()


def run_job(job: dict, parallel, device="cpu") -> dict[str, np.ndarray]:
    """Runs one job on ``device``; returns {"logits": [T_total, V], "greedy": [R, n]}."""
    from mindie_llm.config import ModelConfig
    from mindie_llm.loader import load_model

    dtype = job.get("dtype", "float32")
    mc = ModelConfig(path=job["model"], dtype=dtype) if job["model"] else ModelConfig(dtype=dtype)
    loaded = load_model(mc, device, getattr(torch, dtype), progress=False, parallel=parallel)
    model = loaded.model
    block = int(job.get("block", BLOCK))
    out: dict[str, np.ndarray] = {}
    if job.get("logits", True):
        toks = _tokens(loaded.arch.vocab_size)
        st = Stepper(model, job["overlap"], device, block)
        used = {r: 0 for r in toks}
        rows = []
        for step in SCHEDULE:
            reqs = []
            for name, n in step:
                reqs.append((name, toks[name][used[name]:used[name] + n]))
                used[name] += n
            rows.append(st.step(reqs))
        out["logits"] = torch.cat(rows).numpy()
    if job.get("greedy"):
        prompts = job["greedy"]          # list of token lists
        st = Stepper(model, job["overlap"], device, block)
        names = [str(i) for i in range(len(prompts))]
        logits = st.step(list(zip(names, prompts)))
        ends = np.cumsum([len(p) for p in prompts]) - 1
        gen = [[int(logits[e].argmax())] for e in ends]
        for _ in range(job.get("steps", 6) - 1):
            logits = st.step([(n, [g[-1]]) for n, g in zip(names, gen)])
            for i, g in enumerate(gen):
                g.append(int(logits[i].argmax()))
        out["greedy"] = np.asarray(gen, dtype=np.int64)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(jobs: list[dict], out_dir: str, world: int = 2, timeout: float = 240.0,
              extra_env: dict | None = None) -> list[dict[str, np.ndarray]]:
    """Starts ``world`` rank processes on loopback; returns rank 0's results per job. Every
    process is killed on the way out, whatever happens."""
    from mindie_llm.distributed.comm_env import with_comm_env

    os.makedirs(out_dir, exist_ok=True)
    jobs_file = os.path.join(out_dir, "jobs.json")
    with open(jobs_file, "w") as f:
        json.dump(jobs, f)
    port = free_port()
    procs = []
    try:
        for rank in range(world):
            env = with_comm_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       **(extra_env or {}))
            procs.append(subprocess.Popen([sys.executable, __file__, jobs_file, out_dir], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + timeout
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                raise AssertionError(f"rank processes did not finish within {timeout:g} s")
        for rank, (p, log) in enumerate(zip(procs, logs)):
            assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{log[-3000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for i in range(len(jobs)):
        res = {}
        for key in ("logits", "greedy"):
            path = os.path.join(out_dir, f"job{i}_{key}.npy")
            if os.path.exists(path):
                res[key] = np.load(path, allow_pickle=False)
        results.append(res)
    return results


def _main(jobs_file: str, out_dir: str) -> int:
    from mindie_llm.backends import get_platform
    from mindie_llm.distributed.parallel_state import destroy, init_from_env

    torch.set_num_threads(1)
    with open(jobs_file) as f:
        jobs = json.load(f)
    platform = get_platform(jobs[0].get("device", "cpu") if jobs else "cpu")
    device = platform.rank_device(int(os.environ.get("LOCAL_RANK", "0")))
    world = int(os.environ["WORLD_SIZE"])
    parallel = init_from_env(os.environ.get("MINDIE_TP_HARNESS_BACKEND", "gloo"), tensor_parallel_size=world,
                             timeout_s=120, device=device)
    try:
        for i, job in enumerate(jobs):
            res = run_job(job, parallel, device)
            if parallel.rank == 0:
                for key, arr in res.items():
                    np.save(os.path.join(out_dir, f"job{i}_{key}.npy"), arr, allow_pickle=False)
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    code = _main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)   # no interpreter teardown: gloo's threads can abort a normal exit
