# SPDX-License-Identifier: Apache-2.0
"""CudaPlatform: what the CUDA backend tells the engine (device, NCCL, dtypes, KV-cache size, the
graph runner's device pieces) and the registration of its Triton ops with ``mindie_llm.ops``.

KV-cache size (vLLM's rule, per process): ``total * cache.gpu_memory_utilization`` minus what this
process already holds (weights, other tensors, an allowance for the CUDA context) minus the
activation peak of the largest step, measured by ``profile_activation_peak`` when it has run, else
a conservative reserve; capped by the memory free now. Two instances (or ranks) on one card each
take their own fraction.

Imports torch only at module level; the kernels (triton) are imported by ``register_ops``. Must not
import the engine or the scheduler.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from mindie_llm.backends.platform import Platform

__all__ = ["CudaPlatform"]

logger = logging.getLogger(__name__)

_GIB = 1 << 30
CONTEXT_BYTES = 1 << 30     # the CUDA context, cuBLAS/NCCL buffers: outside torch's allocator


class CudaPlatform(Platform):
    device_type = "cuda"
    dist_backend = "nccl"
    ops_module = "mindie_llm.backends.cuda.ops"
    model_runner = "mindie_llm.executor.graph_runner.GraphModelRunner"   # given the pieces below
    profiles_activation_peak = True
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    activation_peak_bytes: int | None = None

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    @classmethod
    def device(cls, index: int | None = None) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device() if index is None else index)

    @classmethod
    def default_dtype(cls) -> torch.dtype:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    @classmethod
    def synchronize(cls) -> None:
        torch.cuda.synchronize()

    @classmethod
    def graph_wrapper_cls(cls) -> type | None:
        from mindie_llm.backends.cuda.graph import CudaGraphDecodeModel

        return CudaGraphDecodeModel

    @classmethod
    def runner_kwargs(cls, config: Any) -> dict[str, Any]:
        """The pieces the executor's GraphModelRunner takes from this platform (graph wrapper,
        events, synchronization, the start-up GEMV choice) and, from the deployment's ``backend``
        section, CUDA graphs on/off and the largest graphed decode batch."""
        from mindie_llm.backends.cuda.gemv import select_gemv_linears

        kwargs: dict[str, Any] = {"graph_wrapper_cls": cls.graph_wrapper_cls(), "event_cls": torch.cuda.Event,
                                  "synchronize": torch.cuda.synchronize, "select_kernels": select_gemv_linears}
        backend = getattr(config, "backend", None)
        if backend is not None:
            kwargs.update(enable_cuda_graph=bool(backend.enable_cuda_graph),
                          cuda_graph_max_batch_size=int(backend.cuda_graph_max_batch_size))
        return kwargs

    # ------------------------------------------------------------------ KV-cache sizing
    @classmethod
    @torch.inference_mode()
    def profile_activation_peak(cls, run_step: Callable[[], Any]) -> int:
        """Runs ``run_step`` (the largest step the engine will run: ``max_num_batched_tokens``
        tokens, then logits and sampling of ``max_num_seqs`` rows) and records how far the memory
        allocated rose above what was allocated before it."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_step()
        torch.cuda.synchronize()
        cls.activation_peak_bytes = int(torch.cuda.max_memory_allocated() - before)
        torch.cuda.empty_cache()
        return cls.activation_peak_bytes

    @classmethod
    def available_kv_cache_bytes(cls, cache_config: Any) -> int:
        """This process's share: ``total * gpu_memory_utilization`` - what this process holds
        (torch's reserved memory: weights, buffers; plus ``CONTEXT_BYTES`` for the CUDA context and
        the libraries' own buffers) - activation peak (profiled, else max(2 GiB, 4% of the card)),
        and never more than is free now minus that peak. Other processes on the card do not shrink
        the share (they have their own), so that instances or tensor-parallel ranks sharing one GPU
        each take the fraction they are given (their fractions must add up to <= 1)."""
        util = float(getattr(cache_config, "gpu_memory_utilization", 0.9))
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        own = torch.cuda.memory_reserved() + CONTEXT_BYTES
        others = max(0, total - free - own)                       # other processes on this card
        reserve = cls.activation_peak_bytes
        if reserve is None:
            reserve = max(2 * _GIB, int(0.04 * total))
        budget = min(int(total * util) - own - reserve, free - reserve)
        logger.info("cuda KV cache: total %.1f GiB, this process %.1f GiB, others %.1f GiB, free %.1f GiB, "
                    "activation reserve %.2f GiB -> budget %.1f GiB", total / _GIB, own / _GIB, others / _GIB,
                    free / _GIB, reserve / _GIB, max(budget, 0) / _GIB)
        if budget <= 0:
            raise ValueError(f"cache.gpu_memory_utilization: {util} leaves no room for the KV cache "
                             f"(this process {own / _GIB:.1f} GiB, other processes {others / _GIB:.1f} GiB, "
                             f"free {free / _GIB:.1f} GiB of {total / _GIB:.1f} GiB, activation reserve "
                             f"{reserve / _GIB:.2f} GiB)")
        return budget
