# SPDX-License-Identifier: Apache-2.0
"""The CPU platform: gloo collectives, fp32 by default, KV cache sized by cache.kv_cache_memory_gb,
no graph capture. Ops: backends/cpu/ops.py (plain torch, vectorized). Imports no other backend."""
from __future__ import annotations

from typing import Any

import torch

from mindie_llm.backends.platform import Platform

__all__ = ["CpuPlatform"]


class CpuPlatform(Platform):
    device_type = "cpu"
    dist_backend = "gloo"
    ops_module = "mindie_llm.backends.cpu.fast_ops"  # torch ops + C++ kernels where they apply

    @classmethod
    def default_dtype(cls) -> torch.dtype:
        return torch.float32

    @classmethod
    def available_kv_cache_bytes(cls, cache_config: Any) -> int:
        return int(float(cache_config.kv_cache_memory_gb) * (1 << 30))
