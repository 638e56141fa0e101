# SPDX-License-Identifier: Apache-2.0
"""One function per fused op, dispatched on the device type of the first tensor argument.

A backend registers a module with some or all of the op functions
(``register_backend("cuda", module)``); ops it lacks fall back to ``ops/reference.py``. Dispatch
is one dict lookup per call. Sampling ops are in ``ops/sampling.py`` (not dispatched here).

Must not import models, layers, the engine or any backend module (backends import this).
"""
from __future__ import annotations

import types
from typing import Any, Callable

import torch

from mindie_llm.ops import reference

__all__ = ["register_backend", "registered_backends", "rms_norm", "fused_add_rms_norm",
           "rotary_embedding", "write_kv_cache", "rotary_embedding_write_kv", "paged_attention",
           "silu_and_mul", "gguf_repack", "gguf_matmul", "gguf_embedding", "w8a8_matmul", "w4a16_matmul",
           "fp8_matmul", "OP_NAMES"]

OP_NAMES = ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "write_kv_cache",
            "rotary_embedding_write_kv", "paged_attention", "silu_and_mul",
            "gguf_repack", "gguf_matmul", "gguf_embedding",  # gguf_*: matmuls on repacked GGUF blocks
            "w8a8_matmul", "w4a16_matmul", "fp8_matmul",     # quantized linears (layers/quant_*.py)
            # the KV ops on a quantized cache (int8 / fp8 e4m3 with per-head scales): a call whose
            # kv_cache has such a dtype goes to these entries instead of the plain ones
            "write_kv_cache_quant", "rotary_embedding_write_kv_quant", "paged_attention_quant")

# op name -> {device type -> implementation}
_TABLES: dict[str, dict[str, Callable[..., Any]]] = {name: {} for name in OP_NAMES}
_REGISTERED: dict[str, types.ModuleType] = {}


def register_backend(device_type: str, module: Any) -> None:
    """Routes every op that ``module`` defines to it for tensors on ``device_type``
    ("cpu", "cuda", "npu"). Registering again replaces the earlier module."""
    if not isinstance(device_type, str) or not device_type:
        raise ValueError(f"device_type must be a non-empty string; got {device_type!r}")
    _REGISTERED[device_type] = module
    for name in OP_NAMES:
        fn = getattr(module, name, None)
        if fn is None:
            _TABLES[name].pop(device_type, None)
        else:
            _TABLES[name][device_type] = fn


def unregister_backend(device_type: str) -> None:
    """Sends ``device_type`` back to the reference ops (tests use this)."""
    _REGISTERED.pop(device_type, None)
    for table in _TABLES.values():
        table.pop(device_type, None)


def registered_backends() -> dict[str, Any]:
    return dict(_REGISTERED)


def _make(name: str) -> Callable[..., Any]:
    table = _TABLES[name]
    fallback = getattr(reference, name)

    def op(first: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return table.get(first.device.type, fallback)(first, *args, **kwargs)

    op.__name__ = name
    op.__qualname__ = name
    op.__doc__ = fallback.__doc__
    return op


def _make_kv(name: str, cache_arg: int) -> Callable[..., Any]:
    """A KV op that routes a call on a quantized cache (argument ``cache_arg``) to ``name + "_quant"``."""
    plain, quant = _make(name), _make(name + "_quant")
    quant_dtypes = reference.KV_QUANT_DTYPES

    def op(*args: Any, **kwargs: Any) -> Any:
        cache = args[cache_arg] if len(args) > cache_arg else kwargs["kv_cache"]
        return (quant if cache.dtype in quant_dtypes else plain)(*args, **kwargs)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = plain.__doc__
    return op


rms_norm = _make("rms_norm")
fused_add_rms_norm = _make("fused_add_rms_norm")
rotary_embedding = _make("rotary_embedding")
write_kv_cache = _make_kv("write_kv_cache", 2)
rotary_embedding_write_kv = _make_kv("rotary_embedding_write_kv", 4)
paged_attention = _make_kv("paged_attention", 1)
silu_and_mul = _make("silu_and_mul")
gguf_repack = _make("gguf_repack")
gguf_matmul = _make("gguf_matmul")
gguf_embedding = _make("gguf_embedding")
w8a8_matmul = _make("w8a8_matmul")
w4a16_matmul = _make("w4a16_matmul")
fp8_matmul = _make("fp8_matmul")
