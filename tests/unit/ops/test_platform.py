# SPDX-License-Identifier: Apache-2.0
"""backends.get_platform and the CPU Platform: op registration with mindie_llm.ops, KV block
count from cache.num_blocks or the memory budget, and clear errors for unusable devices."""
from __future__ import annotations

import pytest
import torch

from mindie_llm import ops
from mindie_llm.backends import get_platform, kv_cache_bytes_per_block
from mindie_llm.backends.cpu import fast_ops, ops as cpu_ops  # noqa: F401
from mindie_llm.config import CacheConfig


def test_cpu_platform_registers_its_ops():
    saved = ops.registered_backends().get("cpu")
    try:
        ops.unregister_backend("cpu")
        p = get_platform("cpu")
        assert p.device_type == "cpu" and p.dist_backend == "gloo"
        assert ops.registered_backends()["cpu"] is fast_ops
        assert p.device() == torch.device("cpu") and p.default_dtype() == torch.float32
        assert p.graph_wrapper_cls() is None
    finally:
        ops.unregister_backend("cpu")
        if saved is not None:
            ops.register_backend("cpu", saved)


def test_kv_block_count_from_budget_or_override():
    p = get_platform("cpu")
    per_block = kv_cache_bytes_per_block(30, 16, 3, 64, torch.float32)
    assert per_block == 2 * 30 * 16 * 3 * 64 * 4
    assert p.num_kv_blocks(CacheConfig(kv_cache_memory_gb=0.5), per_block) == (1 << 29) // per_block
    assert p.num_kv_blocks(CacheConfig(num_blocks=7), per_block) == 7
    with pytest.raises(ValueError, match="at least 2"):
        p.num_kv_blocks(CacheConfig(kv_cache_memory_gb=1e-9), per_block)


def test_unusable_devices_are_value_errors_naming_backend_device():
    with pytest.raises(ValueError, match="backend.device"):
        get_platform("tpu")
    if importlib_util_find("torch_npu") is None:
        with pytest.raises(ValueError, match="torch_npu"):
            get_platform("npu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            get_platform("cuda")
        assert get_platform("auto").device_type == "cpu"


def importlib_util_find(name: str):
    import importlib.util

    return importlib.util.find_spec(name)
