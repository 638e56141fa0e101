# SPDX-License-Identifier: Apache-2.0
"""Quantization schemes: the interface (``QuantizationScheme``: prepare the layers' parameters and
loaders, load the checkpoint's tensors, process them once after loading, compute through a backend
op) and its schemes, selected by ``model.quantization`` (``get_scheme``). Model code has no branch
for any of them: a scheme swaps the ``linear_method`` of linear layers and of the LM head (and, for
a quantized embedding table, the lookup).

- ``gguf``: a GGUF file's own blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) computed on directly: each tensor's bytes
  are repacked once at load time (``ops.gguf_repack``) and the matmul is ``ops.gguf_matmul``
  (C++ kernels on the CPU); nothing is expanded to a full-precision copy. A fused layer of mixed
  block types (Q4_K q/k beside a Q6_K v, as llama.cpp's Q4_K_M files have) keeps one packed
  weight per type and concatenates the matmuls' outputs. A layer with a tensor of another type
  (F16, Q5_K, ...) is dequantized to the model dtype.
- ``int8``: weight-only int8 per output channel (below).

Weight-only int8 quantization (per output channel, symmetric) as a module transform: it swaps
the ``linear_method`` of every linear layer and of the LM head; model code has no branch for it.

On the CPU the matmul is ``torch._weight_int8pack_mm`` with bfloat16 activations: for a few rows
(decode) it reads a quarter of the fp32 bytes and was 2-3x faster than fp32 for SmolLM2 shapes on a
2-core AVX512-VNNI machine (fp32 activations through the same kernel were ~10x slower). Its cost
grows linearly with the rows, so past ``INT8_MAX_ROWS`` rows (prefill, large batches) the layer
uses the dense weight it keeps (``keep_dense=True``, the default). Without a dense copy, or off the
CPU, the int8 weight is dequantized per call (correct, not fast).
Must not import models, the engine or a backend.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mindie_llm import ops
from mindie_llm.layers.embedding import LMHead, VocabEmbedding
from mindie_llm.layers.linear import LinearBase

__all__ = ["quantize_weight_int8", "int8_linear", "quantize_int8", "INT8_MAX_ROWS", "QuantizedTensor",
           "QuantizationScheme", "GGUFBlocksScheme", "Int8Scheme", "get_scheme", "SCHEMES",
           "GGUF_PACKED_TYPES", "gguf_linear", "gguf_linear_parts", "weight_bytes", "CHECKPOINT_SCHEMES"]

_HAS_INT8PACK = hasattr(torch, "_weight_int8pack_mm")
INT8_MAX_ROWS = 16  # above this many rows the dense weight (if kept) is faster on the CPU


def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w[N, K] -> (qweight[N, K] int8, scales[N] float32) with w ~= qweight * scales[:, None]."""
    wf = w.float()
    scales = wf.abs().amax(dim=1).clamp(min=1e-12) / 127.0            # [N]
    q = torch.round(wf / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def int8_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y[T, N] = x[T, K] @ (qweight * scales)^T (+ bias), in x's dtype."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])                # [T, K]
    dense, bias = layer.weight, getattr(layer, "bias", None)
    if dense is not None and (x2.shape[0] > INT8_MAX_ROWS or x2.device.type != "cpu"):
        y = F.linear(x2, dense, bias)
    else:
        if x2.device.type == "cpu" and _HAS_INT8PACK:
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), layer.qweight,
                                          layer.scales_bf16).to(x.dtype)
        else:
            y = F.linear(x2, layer.qweight.to(x.dtype) * layer.scales.to(x.dtype)[:, None])
        if bias is not None:
            y.add_(bias)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def _quantize_layer(layer: nn.Module, drop_weight: bool) -> None:
    q, s = quantize_weight_int8(layer.weight.data)
    layer.register_buffer("qweight", q, persistent=False)
    layer.register_buffer("scales", s, persistent=False)
    layer.register_buffer("scales_bf16", s.to(torch.bfloat16), persistent=False)
    if drop_weight:
        del layer.weight
        layer.register_parameter("weight", None)
    layer.linear_method = int8_linear


@torch.no_grad()
def quantize_int8(model: nn.Module, keep_dense: bool = True) -> nn.Module:
    """Quantizes every LinearBase and the LM head of ``model`` in place; returns it. With
    ``keep_dense`` the original weights stay for many-row matmuls; a tied head always keeps the
    (shared) embedding weight for lookups and gets its own int8 copy for the matmul."""
    for module in list(model.modules()):
        if isinstance(module, LinearBase):
            _quantize_layer(module, drop_weight=not keep_dense)
        elif isinstance(module, LMHead):
            _quantize_layer(module, drop_weight=not (keep_dense or module.tied))
    return model


# ----------------------------------------------------------------------------------------------
# The scheme interface
# ----------------------------------------------------------------------------------------------
GGUF_PACKED_TYPES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 12: "Q4_K", 14: "Q6_K"}  # ggml ids with a kernel
_GGUF_BLOCK_VALUES = {2: 32, 3: 32, 8: 32, 12: 256, 14: 256}


@dataclass
class QuantizedTensor:
    """A checkpoint tensor still in its quantized form: GGUF blocks ``raw[rows, row_bytes]`` (uint8,
    row-major, rows in PyTorch order) of ``ggml_type`` for a logical float tensor of ``shape``.
    ``dequantize()`` gives the float32 tensor (for layers that cannot use the blocks)."""

    name: str
    raw: torch.Tensor                       # [rows, row_bytes] uint8
    ggml_type: int
    shape: tuple[int, ...]                  # [out, in]
    dequantize: Callable[[], torch.Tensor]  # -> float32 [out, in]


class QuantizationScheme:
    """What a scheme does, in load order: ``prepare(model)`` before any weight is loaded (replace
    parameters / weight loaders), the loader then feeds checkpoint tensors through the parameters'
    ``weight_loader``; ``process_weights_after_loading(model)`` once at the end (pack, drop dense
    copies, set ``linear_method``). The matmul goes through a backend op."""

    name = "none"

    def prepare(self, model: nn.Module) -> None:
        pass

    def process_weights_after_loading(self, model: nn.Module) -> None:
        pass


class Int8Scheme(QuantizationScheme):
    name = "int8"

    def process_weights_after_loading(self, model: nn.Module) -> None:
        quantize_int8(model)


def gguf_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y[T, N] = x[T, K] @ W^T (+ bias), W the layer's packed GGUF blocks; float32 out, cast to x's
    dtype."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])                  # [T, K]
    y = ops.gguf_matmul(x2, layer.gguf_packed, layer.gguf_type, layer.gguf_n, layer.gguf_k)
    bias = getattr(layer, "bias", None)
    if bias is not None:
        y.add_(bias)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def _gguf_embedding_forward(self: nn.Module, input_ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    # [T] -> [T, H]: only the looked-up rows are dequantized (tensor-parallel size 1 only)
    out = ops.gguf_embedding(input_ids, self.gguf_packed, self.gguf_type, self.gguf_n, self.gguf_k)
    return out.reshape(*input_ids.shape, out.shape[-1]).to(self.gguf_dtype)


def _tp_size(module: nn.Module) -> int:
    size = getattr(module, "tp_size", None)
    return size if size is not None else getattr(getattr(module, "parallel", None), "size", 1)


def _shard_order(layer: nn.Module) -> list[Any]:
    sizes = getattr(layer, "output_sizes", None)
    if sizes is not None:
        return list(range(len(sizes)))
    if hasattr(layer, "q_size") and hasattr(layer, "kv_size"):
        return ["q", "k", "v"]
    return [None]


class GGUFBlocksScheme(QuantizationScheme):
    """GGUF Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K blocks, repacked at load and computed on directly
    (see module doc)."""

    name = "gguf"

    def __init__(self, optional: bool = False):
        self.optional = optional  # chosen by "auto": fall back to dense weights where unsupported
        self.active = True

    def prepare(self, model: nn.Module) -> None:
        targets = [m for m in model.modules()
                   if isinstance(m, (LinearBase, VocabEmbedding)) or (isinstance(m, LMHead) and not m.tied)]
        if any(_tp_size(m) > 1 for m in targets):
            if self.optional:
                self.active = False
                return
            raise ValueError("model.quantization=gguf supports tensor_parallel_size 1 only "
                             "(use model.quantization=none to shard a GGUF model)")
        for module in targets:
            self._wrap_loader(module)

    @staticmethod
    def _wrap_loader(module: nn.Module) -> None:
        param = module.weight
        dense_loader = param.weight_loader
        module._gguf_shards = {}            # shard id -> QuantizedTensor, until processed
        module._gguf_dense_shards = set()
        module._gguf_dense_loader = dense_loader

        def loader(p: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
            if isinstance(loaded, QuantizedTensor):
                want = _shard_rows(module, shard_id)
                if tuple(loaded.shape) != (want, p.shape[1]):
                    raise ValueError(f"checkpoint shape {tuple(loaded.shape)} does not match the model's "
                                     f"{(want, p.shape[1])} (is the config right for these weights?)")
                if (loaded.ggml_type in GGUF_PACKED_TYPES
                        and loaded.shape[1] % _GGUF_BLOCK_VALUES[loaded.ggml_type] == 0):
                    module._gguf_shards[shard_id] = loaded
                    return
                loaded = loaded.dequantize()
            dense_loader(p, loaded, shard_id) if shard_id is not None else dense_loader(p, loaded)
            module._gguf_dense_shards.add(shard_id)

        param.weight_loader = loader

    def process_weights_after_loading(self, model: nn.Module) -> None:
        for module in list(model.modules()):
            shards = getattr(module, "_gguf_shards", None)
            if shards is None:
                continue
            dense, dense_loader = module._gguf_dense_shards, module._gguf_dense_loader
            del module._gguf_shards, module._gguf_dense_shards, module._gguf_dense_loader
            module.weight.weight_loader = dense_loader
            if not shards:
                continue
            order = _shard_order(module)
            types_ = {q.ggml_type for q in shards.values()}
            if dense or set(shards) != set(order):
                # part of a fused layer is of a type without a kernel: dequantize the blocks into
                # the dense weight
                for sid, q in shards.items():
                    args = (module.weight, q.dequantize()) + ((sid,) if sid is not None else ())
                    dense_loader(*args)
                continue
            n, k = module.weight.shape
            if len(types_) > 1:
                # a fused layer of mixed block types (Q4_K q/k beside a Q6_K v): one packed
                # weight per run of equal types, one matmul each, outputs concatenated
                _install_parts(module, [[shards[sid] for sid in run] for run in _runs(order, shards)], k)
                continue
            (ggml_type,) = types_
            raw = torch.cat([shards[sid].raw for sid in order]) if len(order) > 1 else shards[order[0]].raw
            _install_packed(model, module, _repack_named([shards[sid] for sid in order], raw, ggml_type, n, k),
                            ggml_type, n, k)


def _repack_named(parts: list[QuantizedTensor], raw: torch.Tensor, ggml_type: int, n: int, k: int) -> torch.Tensor:
    try:
        return ops.gguf_repack(raw, ggml_type, n, k)
    except ValueError as e:
        raise ValueError(f"{', '.join(q.name for q in parts)}: {e}") from None


def _runs(order: list[Any], shards: dict[Any, QuantizedTensor]) -> list[list[Any]]:
    """Consecutive shard ids of one ggml type: [[q, k], [v]] for Q4_K q, k and a Q6_K v."""
    runs: list[list[Any]] = []
    for sid in order:
        if runs and shards[runs[-1][-1]].ggml_type == shards[sid].ggml_type:
            runs[-1].append(sid)
        else:
            runs.append([sid])
    return runs


def gguf_linear_parts(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A fused layer of mixed GGUF types: y[T, N] = cat over parts of x @ W_part^T (+ bias)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])                  # [T, K]
    k = layer.gguf_k
    y = torch.cat([ops.gguf_matmul(x2, getattr(layer, f"gguf_packed_{i}"), t, n, k)
                   for i, (t, n) in enumerate(layer.gguf_parts)], dim=-1)    # [T, N]
    bias = getattr(layer, "bias", None)
    if bias is not None:
        y.add_(bias)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def _install_parts(module: nn.Module, runs: list[list[QuantizedTensor]], k: int) -> None:
    parts = []
    for i, run in enumerate(runs):
        ggml_type, n = run[0].ggml_type, sum(q.shape[0] for q in run)
        raw = torch.cat([q.raw for q in run]) if len(run) > 1 else run[0].raw
        module.register_buffer(f"gguf_packed_{i}", _repack_named(run, raw, ggml_type, n, k), persistent=False)
        parts.append((ggml_type, n))
    module.gguf_parts, module.gguf_k = parts, k
    module.linear_method = gguf_linear_parts
    module.register_parameter("weight", None)


def _shard_rows(module: nn.Module, shard_id: Any) -> int:
    if shard_id is None:
        return module.weight.shape[0]
    if shard_id in ("q", "k", "v"):
        return module.q_size if shard_id == "q" else module.kv_size
    return module.output_sizes[shard_id]


def _install_packed(model: nn.Module, module: nn.Module, packed: torch.Tensor, ggml_type: int,
                    n: int, k: int) -> None:
    dtype = module.weight.dtype
    module.register_buffer("gguf_packed", packed, persistent=False)
    module.gguf_type, module.gguf_n, module.gguf_k, module.gguf_dtype = ggml_type, n, k, dtype
    if isinstance(module, VocabEmbedding):
        module.forward = types.MethodType(_gguf_embedding_forward, module)
        for head in model.modules():  # a tied head computes on the same blocks
            if isinstance(head, LMHead) and head.tied and head.weight is module.weight:
                head.register_buffer("gguf_packed", packed, persistent=False)
                head.gguf_type, head.gguf_n, head.gguf_k = ggml_type, n, k
                head.register_parameter("weight", None)
                head.linear_method = gguf_linear
    else:
        module.linear_method = gguf_linear
    module.register_parameter("weight", None)


SCHEMES: dict[str, type[QuantizationScheme]] = {"none": QuantizationScheme, "int8": Int8Scheme,
                                                 "gguf": GGUFBlocksScheme}


# Checkpoint-quantized linear schemes, in their own modules (imported on first use):
# name -> (module, class). Keyword arguments of get_scheme go to their constructors.
CHECKPOINT_SCHEMES: dict[str, tuple[str, str]] = {
    "w8a8": ("mindie_llm.layers.quant_w8a8", "W8A8Scheme"),
    "w4a16": ("mindie_llm.layers.quant_w4a16", "W4A16Scheme"),
    "awq": ("mindie_llm.layers.quant_w4a16", "AWQScheme"),
    "gptq": ("mindie_llm.layers.quant_w4a16", "GPTQScheme"),
    "fp8": ("mindie_llm.layers.quant_fp8", "FP8Scheme"),
}


def get_scheme(name: str, optional: bool = False, **kwargs: Any) -> QuantizationScheme:
    """The scheme called ``name``; ``optional`` (for "auto") lets a scheme fall back to dense
    weights where it does not apply instead of refusing."""
    if name in CHECKPOINT_SCHEMES:
        import importlib

        module, cls = CHECKPOINT_SCHEMES[name]
        return getattr(importlib.import_module(module), cls)(**kwargs)
    if name not in SCHEMES:
        raise ValueError(f"model.quantization: unknown scheme {name!r}; known: "
                         f"{', '.join([*SCHEMES, *CHECKPOINT_SCHEMES])}")
    return GGUFBlocksScheme(optional) if name == "gguf" else SCHEMES[name]()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of matmul weights one decode step reads (packed blocks, int8 or dense weights of the
    linear layers and the LM head; embedding lookups excluded; shared tensors counted once)."""
    seen, total = set(), 0
    for mod in model.modules():
        if isinstance(mod, VocabEmbedding):
            continue
        parts = [getattr(mod, f"gguf_packed_{i}") for i in range(len(getattr(mod, "gguf_parts", ())))]
        for t in (getattr(mod, "gguf_packed", None), getattr(mod, "qweight", None),
                  getattr(mod, "w4_qweight", None), *parts):
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        if getattr(mod, "qweight", None) is None and isinstance(mod, (LinearBase, LMHead)):
            w = mod._parameters.get("weight")
            if w is not None and w.data_ptr() not in seen:
                seen.add(w.data_ptr())
                total += w.numel() * w.element_size()
    return total
