# SPDX-License-Identifier: Apache-2.0
"""NpuPlatform: what the Ascend backend tells the engine (device "npu" / PrivateUse1, HCCL,
float16/bfloat16, block size 128, KV-cache size from NPU memory after a profiled step, the
NPUGraph decode wrapper) and the registration of its op table with ``mindie_llm.ops``.

torch_npu is imported lazily (``runtime.load``): without CANN, ``get_platform("npu")`` raises a
one-line ValueError naming what is missing. Under the CPU test double of torch_npu,
``device()`` is the CPU and the op table is registered for "cpu" tensors, so the model runs on the
CPU through exactly the torch_npu calls it makes on an NPU.

KV-cache size (as on CUDA): ``total * cache.gpu_memory_utilization`` - bytes in use now - the
activation peak of the largest step (``profile_activation_peak``), else a 2 GiB / 4 % reserve.
Must not import anything above ``mindie_llm.ops``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch

from mindie_llm.backends.npu import runtime
from mindie_llm.backends.platform import Platform

__all__ = ["NpuPlatform", "NPU_BLOCK_SIZE"]

logger = logging.getLogger(__name__)

_GIB = 1 << 30
NPU_BLOCK_SIZE = 128          # torch_npu paged attention / FIA page attention block size (vllm-ascend: [128])
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


class NpuPlatform(Platform):
    device_type = "npu"
    dispatch_key = "PrivateUse1"
    device_control_env_var = "ASCEND_RT_VISIBLE_DEVICES"
    dist_backend = "hccl"
    ops_module = "mindie_llm.backends.npu.ops"
    model_runner = "mindie_llm.executor.graph_runner.GraphModelRunner"   # given the pieces below
    profiles_activation_peak = True
    supported_dtypes = (torch.bfloat16, torch.float16)
    activation_peak_bytes: int | None = None

    @classmethod
    def is_available(cls) -> bool:
        try:
            runtime.require_device()
        except runtime.NpuUnavailableError:
            return False
        return True

    @classmethod
    def device(cls, index: int | None = None) -> torch.device:
        tnpu = runtime.require_device()
        if runtime.is_cpu_double(tnpu):
            return torch.device("cpu")
        return torch.device("npu", tnpu.npu.current_device() if index is None else index)

    @classmethod
    def default_dtype(cls) -> torch.dtype:
        # Atlas 300I (310P) has no bfloat16; A2 / A3 run bfloat16 checkpoints natively.
        return torch.float16 if runtime.is_310p() else torch.bfloat16

    @classmethod
    def synchronize(cls) -> None:
        runtime.load().npu.synchronize()

    @classmethod
    def graph_wrapper_cls(cls) -> type | None:
        from mindie_llm.backends.npu.graph import NPUGraphDecodeModel

        return NPUGraphDecodeModel

    @classmethod
    def runner_kwargs(cls, config: Any) -> dict[str, Any]:
        """The pieces the executor's GraphModelRunner takes from this platform: the NPUGraph decode
        wrapper, torch.npu events and synchronization, pinned staging; ACL graphs on/off and the
        largest graphed batch come from ``backend.enable_cuda_graph`` / ``cuda_graph_max_batch_size``
        (the device-graph keys, shared with CUDA)."""
        tnpu = runtime.load()
        kwargs: dict[str, Any] = {"graph_wrapper_cls": cls.graph_wrapper_cls(), "event_cls": tnpu.npu.Event,
                                  "synchronize": lambda device=None: tnpu.npu.synchronize(),
                                  "pin_memory": not runtime.is_cpu_double(tnpu)}
        backend = getattr(config, "backend", None)
        if backend is not None:
            kwargs.update(enable_cuda_graph=bool(backend.enable_cuda_graph),
                          cuda_graph_max_batch_size=int(backend.cuda_graph_max_batch_size))
        return kwargs

    @classmethod
    def register_ops(cls) -> None:
        """Routes mindie_llm.ops calls on this platform's tensors (``device().type``: "npu", or
        "cpu" under the test double) to the op table for this SoC, with the project's Ascend C ops
        (custom_ops) where their torch extension is loaded."""
        from mindie_llm import ops
        from mindie_llm.backends.npu import custom_ops
        from mindie_llm.backends.npu.ops import op_table

        table = op_table(is_310p=runtime.is_310p())
        custom_ops.load_from_env()
        if custom_ops.available():      # the project's Ascend C kernels (ops/ascendc)
            table = custom_ops.custom_op_table(table)
        ops.register_backend(cls.device().type, table)

    @classmethod
    def check_and_update_config(cls, config: Any) -> Any:
        """float16/bfloat16 only (torch_npu attention takes no float32), block size 128; "auto"
        dtypes become the SoC's default. Raises ValueError naming the key otherwise."""
        model, cache = config.model, config.cache
        if model.dtype == "float32":
            raise ValueError("model.dtype: float32 is not supported on npu (torch_npu paged and fused "
                             "attention take float16 or bfloat16); use auto, float16 or bfloat16")
        if cache.cache_dtype == "float32":
            raise ValueError("cache.cache_dtype: float32 is not supported on npu; use auto, float16 or bfloat16")
        if model.dtype == "bfloat16" and runtime.is_310p():
            raise ValueError("model.dtype: bfloat16 is not supported on Atlas 310P; use float16")
        if cache.cache_block_size != NPU_BLOCK_SIZE:
            raise ValueError(f"cache.cache_block_size: the npu backend needs {NPU_BLOCK_SIZE} (torch_npu paged "
                             f"attention); got {cache.cache_block_size}")
        dtype = _DTYPE_NAMES[cls.default_dtype()] if model.dtype == "auto" else model.dtype
        if cache.cache_dtype not in ("auto", dtype):
            raise ValueError(f"cache.cache_dtype: must match the model dtype on npu ({dtype}: torch_npu attention "
                             f"reads the cache in the query's dtype); got {cache.cache_dtype}")
        if dtype != model.dtype:
            config = config.replace(model=dataclasses.replace(model, dtype=dtype))
        return config

    # ------------------------------------------------------------------ KV-cache sizing
    @classmethod
    @torch.inference_mode()
    def profile_activation_peak(cls, run_step: Callable[[], Any]) -> int:
        """Runs the largest step and records how far NPU memory allocated rose above the start."""
        npu = runtime.load().npu
        npu.synchronize()
        npu.empty_cache()
        before = npu.memory_allocated()
        npu.reset_peak_memory_stats()
        run_step()
        npu.synchronize()
        cls.activation_peak_bytes = int(npu.max_memory_allocated() - before)
        npu.empty_cache()
        return cls.activation_peak_bytes

    @classmethod
    def available_kv_cache_bytes(cls, cache_config: Any) -> int:
        """``total * gpu_memory_utilization`` - bytes in use - activation peak (profiled, else
        max(2 GiB, 4 % of the device))."""
        npu = runtime.load().npu
        util = float(getattr(cache_config, "gpu_memory_utilization", 0.9))
        npu.synchronize()
        npu.empty_cache()
        free, total = npu.mem_get_info()
        in_use = total - free
        reserve = cls.activation_peak_bytes
        if reserve is None:
            reserve = max(2 * _GIB, int(0.04 * total))
        budget = int(total * util) - in_use - reserve
        logger.info("npu KV cache: total %.1f GiB, in use %.1f GiB, activation reserve %.2f GiB -> budget %.1f GiB",
                    total / _GIB, in_use / _GIB, reserve / _GIB, max(budget, 0) / _GIB)
        if budget <= 0:
            raise ValueError(f"cache.gpu_memory_utilization: {util} leaves no room for the KV cache on npu "
                             f"({in_use / _GIB:.1f} GiB in use of {total / _GIB:.1f} GiB, activation reserve "
                             f"{reserve / _GIB:.2f} GiB)")
        return budget
