# SPDX-License-Identifier: Apache-2.0
"""Linear layers with tensor-parallel sharding (vLLM-shaped): Replicated, ColumnParallel,
MergedColumnParallel (gate+up), QKVParallel and RowParallel.

Every layer takes its ``parallel`` context (``distributed.ParallelContext``: rank, size and the
group's collectives) explicitly at construction; with none given it is the single-rank context,
nothing is sharded and no collective runs. There is no module-global parallel state.

Every parameter carries a ``weight_loader(param, loaded, shard_id=None)`` that takes the full
checkpoint tensor, or a lazy safetensors slice of it (``get_shape()`` + indexing), and keeps this
rank's shard: from a slice only this rank's bytes are read. Quantization replaces a layer's
``linear_method`` (see ``layers/quantization.py``), never a branch in model code.

Must not import the engine, executor, loader, models or a backend (``distributed.parallel_state``
imports only torch).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mindie_llm.distributed.parallel_state import ParallelContext

__all__ = ["LinearBase", "ReplicatedLinear", "ColumnParallelLinear", "MergedColumnParallelLinear",
           "QKVParallelLinear", "RowParallelLinear", "copy_checked", "full_shape", "materialize",
           "take_shard", "kv_heads_per_rank", "load_checkpoint_tensor"]

_SINGLE = ParallelContext.single()


def _ctx(parallel: ParallelContext | None) -> ParallelContext:
    return parallel if parallel is not None else _SINGLE


def full_shape(loaded: Any) -> tuple[int, ...]:
    """Shape of a checkpoint tensor or of a lazy safetensors slice."""
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def materialize(loaded: Any) -> torch.Tensor:
    """The whole tensor (reads every byte of a lazy slice)."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def take_shard(loaded: Any, dim: int, start: int, size: int, what: str) -> torch.Tensor:
    """``loaded`` narrowed to [start, start + size) along ``dim``; from a lazy slice only those
    bytes are read. A range past the tensor's end is a ValueError naming both."""
    shape = full_shape(loaded)
    if dim >= len(shape) or start < 0 or start + size > shape[dim]:
        raise ValueError(f"{what}: checkpoint shape {shape} has no rows [{start}, {start + size}) along "
                         f"dim {dim} (is config.json right for these weights?)")
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    idx = [slice(None)] * len(shape)
    idx[dim] = slice(start, start + size)
    return loaded[tuple(idx)]


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank holds (one, replicated, when there are fewer KV heads than ranks)."""
    return max(num_kv_heads // tp_size, 1)


def copy_checked(param: torch.Tensor, loaded: Any, what: str) -> None:
    """Copies ``loaded`` into ``param``; a shape mismatch is a ValueError naming both shapes."""
    if full_shape(loaded) != tuple(param.shape):
        raise ValueError(f"{what}: checkpoint shape {full_shape(loaded)} does not match the "
                         f"model's {tuple(param.shape)} (is config.json right for these weights?)")
    param.data.copy_(materialize(loaded).to(param.dtype))


def load_checkpoint_tensor(name: str, param: torch.Tensor, tensor: Any, shard: Any = None) -> None:
    """Fills ``param`` from the checkpoint tensor ``name``: through the parameter's ``weight_loader``
    (with ``shard``, the stacked-parameter part, when given), else a shape-checked copy. Errors are a
    ValueError starting with ``name``."""
    loader = getattr(param, "weight_loader", None)
    try:
        if loader is None:
            copy_checked(param, tensor, "weight")
        elif shard is None:
            loader(param, tensor)
        else:
            loader(param, tensor, shard)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


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
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 parallel: ParallelContext | None = None):
        self.parallel = _ctx(parallel)
        super().__init__(in_features, out_features, bias)


class ColumnParallelLinear(LinearBase):
    """Output features sharded across ranks; no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 parallel: ParallelContext | None = None):
        self.parallel = _ctx(parallel)
        self.tp_rank, self.tp_size = self.parallel.rank, self.parallel.size
        super().__init__(in_features, _divide(out_features, self.tp_size, "out_features"), bias)

    def _shard(self, loaded: Any, rows: int, what: str, full_rows: int | None = None) -> Any:
        """This rank's ``rows`` rows of ``loaded`` (whose dim 0 must be ``full_rows``)."""
        if self.tp_size == 1:
            return loaded
        full_rows = rows * self.tp_size if full_rows is None else full_rows
        if full_shape(loaded)[0] != full_rows:
            raise ValueError(f"{what}: checkpoint shape {full_shape(loaded)} does not match the model's "
                             f"{full_rows} rows before sharding (is config.json right for these weights?)")
        return take_shard(loaded, 0, self.tp_rank * rows, rows, what)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id=None) -> None:
        copy_checked(param, self._shard(loaded, param.shape[0], "weight"), "weight")


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stacked (gate_proj and up_proj -> gate_up_proj)."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool = False,
                 parallel: ParallelContext | None = None):
        self.output_sizes = list(output_sizes)
        tp = _ctx(parallel).size
        for s in self.output_sizes:
            _divide(s, tp, "intermediate_size")
        super().__init__(in_features, sum(self.output_sizes), bias, parallel)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id=None) -> None:
        assert shard_id is not None and 0 <= shard_id < len(self.output_sizes), shard_id
        local = [s // self.tp_size for s in self.output_sizes]
        start = sum(local[:shard_id])
        dst = param.data.narrow(0, start, local[shard_id])
        copy_checked(dst, self._shard(loaded, local[shard_id], f"shard {shard_id}"), f"shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections stacked; heads sharded by rank (KV heads replicated when there are
    fewer KV heads than ranks: rank r holds KV head r // (tp / num_kv_heads))."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, parallel: ParallelContext | None = None):
        tp = _ctx(parallel).size
        self.head_dim = head_dim
        self.total_num_kv_heads = num_kv_heads
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
        super().__init__(hidden_size, out, bias, parallel)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id=None) -> None:
        assert shard_id in ("q", "k", "v"), shard_id
        if shard_id == "q":
            start, size, rank, full = 0, self.q_size, self.tp_rank, self.q_size * self.tp_size
        else:
            start = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size, rank = self.kv_size, self.tp_rank // self.kv_replicas
            full = self.total_num_kv_heads * self.head_dim
        what = f"{shard_id}_proj"
        if self.tp_size > 1:
            if full_shape(loaded)[0] != full:
                raise ValueError(f"{what}: checkpoint shape {full_shape(loaded)} does not match the "
                                 f"model's {full} rows before sharding (is config.json right?)")
            loaded = take_shard(loaded, 0, rank * size, size, what)
        copy_checked(param.data.narrow(0, start, size), loaded, what)


class RowParallelLinear(LinearBase):
    """Input features sharded across ranks; the partial outputs are all-reduced. The bias is
    replicated and added by rank 0 only, before the reduction (so it is counted once)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 parallel: ParallelContext | None = None):
        self.parallel = _ctx(parallel)
        self.tp_rank, self.tp_size = self.parallel.rank, self.parallel.size
        super().__init__(_divide(in_features, self.tp_size, "in_features"), out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id=None) -> None:
        if param.dim() == 2 and self.tp_size > 1:
            if full_shape(loaded)[1:] != (param.shape[1] * self.tp_size,):
                raise ValueError(f"weight: checkpoint shape {full_shape(loaded)} does not match the model's "
                                 f"{param.shape[1] * self.tp_size} input features before sharding")
            loaded = take_shard(loaded, 1, self.tp_rank * param.shape[1], param.shape[1], "weight")
        copy_checked(param, loaded, "weight")

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's term of the sum: x[T, in_local] @ W_local^T (+ bias on rank 0) -> [T, out]."""
        if self.tp_rank == 0 or self.bias is None:
            return self.linear_method(self, x)
        bias, self.bias = self.bias, None
        try:
            return self.linear_method(self, x)
        finally:
            self.bias = bias

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """``reduce=False`` returns the partial sum; the caller all-reduces it (micro-batch overlap)."""
        if self.tp_size == 1:
            return self.linear_method(self, x)
        fused = self.parallel.matmul_all_reduce
        if reduce and fused is not None and self.linear_method is dense_linear:
            return fused(x, self.weight, self.bias if self.tp_rank == 0 else None)   # one fused op (MC2)
        y = self.partial(x)
        return self.parallel.all_reduce(y) if reduce else y
