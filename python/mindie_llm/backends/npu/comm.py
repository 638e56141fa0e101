# SPDX-License-Identifier: Apache-2.0
"""HCCL communication of the NPU backend: process groups for the distributed executor and the PD
transfer plane, the HCCL communicator name that torch_npu's fused (MC2) ops take, and the
row-parallel matmul + all-reduce, fused into ``torch_npu.npu_mm_all_reduce_base`` where the docs
allow it (prefill-sized inputs, 1/2/4/8 ranks) and matmul + ``all_reduce`` otherwise.

The communicator name comes from ``group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)``
(vllm-ascend, PR #1926). The fused op adds ``bias`` on every rank before the reduction, so only
rank 0 passes it (as vllm-ascend's RowParallelLinear does). Must not import anything above
``mindie_llm.ops``.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mindie_llm.backends.npu import runtime

__all__ = ["init_process_group", "new_group", "hccl_comm_name", "matmul_all_reduce", "MC2_WORLD_SIZES"]

MC2_WORLD_SIZES = (1, 2, 4, 8)   # npu_mm_all_reduce_base: "supports 1, 2, 4, 8 cards" (torch_npu docs)


def init_process_group(rank: int, world_size: int, init_method: str | None = None,
                       timeout_s: float = 600.0) -> None:
    """The default HCCL group (torchrun sets the rendezvous environment when init_method is None)."""
    tnpu = runtime.require_device()
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"parallel: rank {rank} / world size {world_size} is impossible")
    if not runtime.is_cpu_double(tnpu):
        tnpu.npu.set_device(rank % max(tnpu.npu.device_count(), 1))
    dist.init_process_group("hccl", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def new_group(ranks: list[int]) -> Any:
    """An HCCL subgroup (tensor-parallel or KV-transfer ranks)."""
    return dist.new_group(ranks=ranks, backend="hccl")


def hccl_comm_name(group: Any, rank: int | None = None) -> str:
    """The HCCL communicator name (``hcom``) of ``group`` on this rank."""
    rank = dist.get_rank() if rank is None else rank
    name = group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)
    if not isinstance(name, str) or not name:
        raise ValueError("parallel: the HCCL backend returned no communicator name for this group")
    return name


def matmul_all_reduce(x: torch.Tensor, weight: torch.Tensor, *, hcom: str | None, group: Any = None,
                      bias: torch.Tensor | None = None, rank: int = 0, world_size: int = 1,
                      fused: bool = True) -> torch.Tensor:
    """Row-parallel linear: sum over ranks of x[M, K_local] @ weight[N, K_local]^T, plus bias once.

    Fused (``npu_mm_all_reduce_base``) when ``fused``, ``hcom`` is known, M > 1 (the docs enable the
    fused op for full, not incremental, steps) and the world size is one the op supports.
    """
    if fused and hcom and x.shape[0] > 1 and world_size in MC2_WORLD_SIZES:
        return runtime.load().npu_mm_all_reduce_base(x, weight.t(), hcom, reduce_op="sum",
                                                     bias=bias if rank == 0 else None, comm_turn=0)
    y = F.linear(x, weight)
    if world_size > 1:
        dist.all_reduce(y, group=group)
    return y if bias is None else y + bias
