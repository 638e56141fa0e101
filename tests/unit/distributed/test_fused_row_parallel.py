# SPDX-License-Identifier: Apache-2.0
"""The fused matmul + all-reduce hook of the row-parallel linears (Ascend MC2 behind the same layer
interface), through a CPU test double of the fused op: the layer hands it this rank's input, local
weight and (rank 0 only) the bias; the micro-batch path (reduce=False) keeps the matmul and the
separate all-reduce. The oracle is the unfused layer: matmul, then all_reduce."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mindie_llm.distributed.parallel_state import ParallelContext
from mindie_llm.layers.linear import RowParallelLinear


class TwoRanks(ParallelContext):
    """Rank r of 2 where the other rank's partial sum is ``other`` (no processes needed)."""

    def __post_init__(self) -> None:
        self.other = None
        self.calls = []

    def all_reduce(self, t, async_op=False):
        t.add_(self.other)
        return t


def _layer(ctx, seed=0):
    torch.manual_seed(seed)
    layer = RowParallelLinear(8, 4, bias=True, parallel=ctx)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    return layer


def test_fused_op_gets_local_weight_and_rank0_bias_and_matches_unfused():
    x = torch.randn(3, 4)                       # this rank's half of the 8 input features
    other = torch.randn(3, 4)
    for rank in (0, 1):
        plain = TwoRanks(rank=rank, size=2)
        plain.other = other
        want = _layer(plain)(x.clone())         # matmul, then all-reduce

        fused_ctx = TwoRanks(rank=rank, size=2)

        def mc2(xx, w, b, ctx=fused_ctx):        # the test double of npu_mm_all_reduce_base
            ctx.calls.append((tuple(w.shape), b is not None))
            return F.linear(xx, w, b) + other

        fused_ctx.matmul_all_reduce = mc2
        layer = _layer(fused_ctx)
        got = layer(x.clone())
        assert fused_ctx.calls == [((4, 4), rank == 0)]
        torch.testing.assert_close(got, want)
        fused_ctx.other = other                  # reduce=False: the partial only, no fused op
        part = layer(x.clone(), reduce=False)
        assert len(fused_ctx.calls) == 1
        torch.testing.assert_close(part, F.linear(x, layer.weight, layer.bias if rank == 0 else None))
