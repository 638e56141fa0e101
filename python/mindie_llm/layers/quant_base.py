# SPDX-License-Identifier: Apache-2.0
"""The shared part of the checkpoint-quantized linear schemes (W8A8, W4A16): replace a linear
layer's float ``weight`` by placeholders for the checkpoint's own tensors (``qweight``,
``scales``, ...), collect what the loader feeds them (per fused shard: q/k/v, gate/up), and hand
the collected tensors, checked, to the scheme once loading is done.

A scheme subclasses ``CheckpointLinearScheme`` and defines ``tensor_names`` (required),
``optional_names``, ``build(module, shards) -> None`` (validate, pack, install buffers and
``linear_method``) and ``quantize_dense(module)`` (the same from a float weight, for a float
checkpoint quantized at load). Error messages name the checkpoint tensor
(``model.layers.0.self_attn.k_proj.scales``).

Must not import models, the engine, the loader or a backend.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mindie_llm.layers.linear import LinearBase
from mindie_llm.layers.quantization import QuantizationScheme

__all__ = ["CheckpointLinearScheme", "QuantCheckpointError", "shard_names"]

# fused parameter -> the checkpoint names of its shards (the HF Llama layout)
_SHARD_FRAGMENTS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", 0: "gate_proj", 1: "up_proj"}


class QuantCheckpointError(ValueError):
    """A quantized checkpoint tensor is missing, of the wrong shape or dtype, or inconsistent.
    The message starts with the tensor's checkpoint name (the loader reports it as the tensor)."""


def shard_names(prefix: str, module: nn.Module) -> dict[Any, str]:
    """shard id -> checkpoint module name (``model.layers.0.self_attn.q_proj``) of a linear layer."""
    if getattr(module, "output_sizes", None) is not None:
        parent = prefix.rsplit(".", 1)[0]
        return {i: f"{parent}.{_SHARD_FRAGMENTS[i]}" for i in range(len(module.output_sizes))}
    if hasattr(module, "q_size") and hasattr(module, "kv_size"):
        parent = prefix.rsplit(".", 1)[0]
        return {s: f"{parent}.{_SHARD_FRAGMENTS[s]}" for s in ("q", "k", "v")}
    return {None: prefix}


def shard_rows(module: nn.Module, shard_id: Any) -> int:
    if shard_id is None:
        return module.out_features
    if shard_id in ("q", "k", "v"):
        return module.q_size if shard_id == "q" else module.kv_size
    return module.output_sizes[shard_id]


class CheckpointLinearScheme(QuantizationScheme):
    """Linear layers whose checkpoint tensors are already quantized (or, with ``from_float``,
    float weights this scheme quantizes once at load). Tensor parallelism is not supported yet."""

    tensor_names: tuple[str, ...] = ()
    optional_names: tuple[str, ...] = ()

    def __init__(self, from_float: bool = False, ignore: tuple[str, ...] = ("lm_head",)):
        self.from_float = from_float   # True: the checkpoint is float; quantize after loading
        self.ignore = ignore           # checkpoint module names left in float (compressed-tensors "ignore")

    # -- load order: prepare -> loader feeds tensors -> process_weights_after_loading ------------
    def prepare(self, model: nn.Module) -> None:
        targets = [(n, m) for n, m in model.named_modules() if isinstance(m, LinearBase)]
        if any(getattr(m, "tp_size", 1) > 1 for _, m in targets):
            raise ValueError(f"model.quantization={self.name} supports tensor_parallel_size 1 only")
        if self.from_float:
            return
        optional: set[str] = set()
        for prefix, module in targets:
            names = shard_names(prefix, module)
            if any(n.rsplit(".", 1)[-1] in self.ignore or n in self.ignore for n in names.values()):
                continue
            module._quant_names = names
            module._quant_shards = {}                  # (tensor name, shard id) -> tensor
            module._quant_device = module.weight.device
            del module.weight
            for tname in self.tensor_names + self.optional_names:
                p = nn.Parameter(torch.empty(0), requires_grad=False)
                p.weight_loader = self._collector(module, tname)
                module.register_parameter(tname, p)
                if tname in self.optional_names:
                    optional.add(f"{prefix}.{tname}")
        original = model.load_weights

        def load_weights(weights: Any) -> set[str]:
            return original(weights) | optional    # optional tensors may be absent

        model.load_weights = load_weights

    @staticmethod
    def _collector(module: nn.Module, tname: str):
        def loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
            module._quant_shards[(tname, shard_id)] = loaded
        return loader

    def process_weights_after_loading(self, model: nn.Module) -> None:
        if self.from_float:
            for prefix, module in list(model.named_modules()):
                if isinstance(module, LinearBase) and not any(
                        n.rsplit(".", 1)[-1] in self.ignore for n in shard_names(prefix, module).values()):
                    self.quantize_dense(module)
            return
        for _, module in list(model.named_modules()):
            shards = getattr(module, "_quant_shards", None)
            if shards is None:
                continue
            names = module._quant_names
            del module._quant_shards, module._quant_names
            for sid, base in names.items():
                for tname in self.tensor_names:
                    if (tname, sid) not in shards:
                        raise QuantCheckpointError(f"{base}.{tname}: missing from the checkpoint "
                                                   f"(model.quantization={self.name} needs "
                                                   f"{', '.join(self.tensor_names)})")
            for tname in self.tensor_names + self.optional_names:
                delattr(module, tname)
            self.build(module, {sid: (base, {t: shards[(t, sid)] for t in self.tensor_names + self.optional_names
                                             if (t, sid) in shards})
                                for sid, base in names.items()})

    # -- what a scheme defines ---------------------------------------------------------------
    def build(self, module: nn.Module, shards: dict[Any, tuple[str, dict[str, torch.Tensor]]]) -> None:
        raise NotImplementedError

    def quantize_dense(self, module: nn.Module) -> None:
        raise NotImplementedError


def expect(name: str, t: torch.Tensor, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    """Raises QuantCheckpointError naming ``name`` unless ``t`` has ``shape`` (and one of ``dtypes``)."""
    if tuple(t.shape) != tuple(shape):
        raise QuantCheckpointError(f"{name}: checkpoint shape {tuple(t.shape)} does not match the "
                                   f"expected {tuple(shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise QuantCheckpointError(f"{name}: dtype {t.dtype} is not one of "
                                   f"{', '.join(str(d) for d in dtypes)}")


def set_linear(module: nn.Module, method: Any, **buffers: torch.Tensor) -> None:
    """Installs the quantized buffers and ``linear_method``; the float weight is gone."""
    if "weight" in module._parameters:
        del module.weight
    module.register_parameter("weight", None)
    for k, v in buffers.items():
        module.register_buffer(k, v, persistent=False)
    module.linear_method = method
