# SPDX-License-Identifier: Apache-2.0
"""Linear layers with tensor-parallel sharding (vLLM-shaped): Replicated, ColumnParallel,
MergedColumnParallel (gate+up), QKVParallel and RowParallel.

Every parameter carries a ``weight_loader(param, loaded_weight, shard_id=None)`` that takes the
full checkpoint tensor and keeps this rank's shard. Tensor parallelism is read from
``tp_state()`` (set by the executor's workers with ``set_tensor_parallel``); at tp_size 1 nothing
is sharded and no collective runs. Quantization replaces a layer's ``linear_method`` (see
``layers/quantization.py``), never a branch in model code.

Must not import the engine, executor, loader, models or a backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TensorParallelState", "set_tensor_parallel", "tp_state", "LinearBase",
           "ReplicatedLinear", "ColumnParallelLinear", "MergedColumnParallelLinear",
           "QKVParallelLinear", "RowParallelLinear", "copy_checked"]


@dataclass
class TensorParallelState:
    rank: int = 0
    size: int = 1
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # sum across the TP group


_TP = TensorParallelState()


def set_tensor_parallel(rank: int, size: int,
                        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
    """Called once per worker before the model is built."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"tensor_parallel: rank {rank} / size {size} is impossible")
    if size > 1 and all_reduce is None:
        raise ValueError("tensor_parallel: an all_reduce hook is required when size > 1")
    _TP.rank, _TP.size, _TP.all_reduce = rank, size, all_reduce


def tp_state() -> TensorParallelState:
    return _TP


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    """Copies ``loaded`` into ``param``; a shape mismatch is a ValueError naming both shapes."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"{what}: checkpoint shape {tuple(loaded.shape)} does not match the "
                         f"model's {tuple(param.shape)} (is config.json right for these weights?)")
    param.data.copy_(loaded.to(param.dtype))


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what}={n} is not divisible by tensor_parallel_size={d}")
    return n // d


def dense_linear(layer: "LinearBase", x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


class LinearBase(nn.Module):
    """y = x @ W^T + b with W: [out_local, in_local]. ``linear_method(layer, x)`` does the math."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features = in_features     # local (this rank's) sizes
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.linear_method: Callable[[LinearBase, torch.Tensor], torch.Tensor] = dense_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return self.linear_method(self, x)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        copy_checked(param, loaded, "weight")

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class ReplicatedLinear(LinearBase):
    pass


class ColumnParallelLinear(LinearBase):
    """Output features sharded across ranks; no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        self.tp_rank, self.tp_size = _TP.rank, _TP.size
        super().__init__(in_features, _divide(out_features, self.tp_size, "out_features"), bias)

    def _shard(self, loaded: torch.Tensor, rows: int) -> torch.Tensor:
        return loaded.narrow(0, self.tp_rank * rows, rows) if self.tp_size > 1 else loaded

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        copy_checked(param, self._shard(loaded, param.shape[0]), "weight")


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stacked (gate_proj and up_proj -> gate_up_proj)."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool = False):
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(self.output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        assert shard_id is not None and 0 <= shard_id < len(self.output_sizes), shard_id
        local = [s // self.tp_size for s in self.output_sizes]
        start = sum(local[:shard_id])
        dst = param.data.narrow(0, start, local[shard_id])
        copy_checked(dst, self._shard(loaded, local[shard_id]), f"shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections stacked; heads sharded by rank (KV heads replicated when there are
    fewer KV heads than ranks)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False):
        tp = _TP.size
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp, "num_attention_heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = _divide(num_kv_heads, tp, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = _divide(tp, num_kv_heads, "tensor_parallel_size / num_key_value_heads")
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        assert shard_id in ("q", "k", "v"), shard_id
        if shard_id == "q":
            start, size, rank = 0, self.q_size, self.tp_rank
        else:
            start = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size, rank = self.kv_size, self.tp_rank // self.kv_replicas
        src = loaded.narrow(0, rank * size, size) if self.tp_size > 1 else loaded
        copy_checked(param.data.narrow(0, start, size), src, f"{shard_id}_proj")


class RowParallelLinear(LinearBase):
    """Input features sharded across ranks; the partial outputs are all-reduced (bias added once)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        self.tp_rank, self.tp_size = _TP.rank, _TP.size
        super().__init__(_divide(in_features, self.tp_size, "in_features"), out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 2 and self.tp_size > 1:
            loaded = loaded.narrow(1, self.tp_rank * param.shape[1], param.shape[1])
        copy_checked(param, loaded, "weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.linear_method(self, x)
        bias, self.bias = self.bias, None
        try:
            y = self.linear_method(self, x)
        finally:
            self.bias = bias
        y = _TP.all_reduce(y)
        return y if bias is None else y + bias
