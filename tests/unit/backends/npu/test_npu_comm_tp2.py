# SPDX-License-Identifier: Apache-2.0
"""The row-parallel matmul + all-reduce of the NPU backend at tensor-parallel size 2, in two CPU
processes: each installs the torch_npu double, and "hccl" is registered as a stand-in backend
built on gloo, so ``comm.init_process_group`` and the reductions really run across ranks. The
fused path (``npu_mm_all_reduce_base``, prefill-sized inputs) and the fallback (matmul +
``all_reduce``, one row) must both equal the unsharded matmul plus the bias added once (the oracle:
TP=1 on the full weight)."""
from __future__ import annotations

import os
import sys

import torch
import torch.multiprocessing as mp


def _worker(rank: int, init_file: str, results) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    import torch.distributed as dist

    import torch_npu_double
    from mindie_llm.backends.npu import comm

    double = torch_npu_double.install()
    try:
        dist.Backend.register_backend(
            "hccl", lambda store, r, size, timeout: dist.ProcessGroupGloo(store, r, size, timeout), devices=["cpu"])
        comm.init_process_group(rank, 2, init_method=f"file://{init_file}")
        double.register_hcom("hccl_tp", group=dist.group.WORLD, world_size=2)
        g = torch.Generator().manual_seed(0)
        w, b = torch.randn(24, 64, generator=g).half(), torch.randn(24, generator=g).half()
        out = {}
        for m in (6, 1):   # fused (m > 1) and the decode fallback
            x = torch.randn(m, 64, generator=g).half()
            shard = slice(rank * 32, (rank + 1) * 32)
            double.calls.clear()
            y = comm.matmul_all_reduce(x[:, shard].contiguous(), w[:, shard].contiguous(), hcom="hccl_tp",
                                       group=dist.group.WORLD, bias=b, rank=rank, world_size=2)
            ref = x.float() @ w.float().t() + b.float()
            err = float((y.float() - ref).norm() / ref.norm())
            out[m] = (err, "npu_mm_all_reduce_base" in double.names())
        results[rank] = out
        dist.destroy_process_group()
    finally:
        double.uninstall()


def test_matmul_all_reduce_at_tp2_equals_tp1(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_worker, args=(str(tmp_path / "rendezvous"), results), nprocs=2, join=True,
                           start_method="spawn")
        results = dict(results)
    for rank in (0, 1):
        assert results[rank][6][0] < 3e-3 and results[rank][6][1], results      # fused path
        assert results[rank][1][0] < 3e-3 and not results[rank][1][1], results  # matmul + all_reduce
