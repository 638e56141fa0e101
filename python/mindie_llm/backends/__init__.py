# SPDX-License-Identifier: Apache-2.0
"""Device backends. ``get_platform(device)`` returns the Platform class of "cpu", "cuda", "npu" or
"auto" (cuda if available, else cpu) and registers its ops with mindie_llm.ops. Device modules are
imported only when their platform is asked for. Must not import models, the engine or executor."""
from __future__ import annotations

import torch

from mindie_llm.backends.platform import Platform, import_qualname, kv_cache_bytes_per_block

__all__ = ["Platform", "get_platform", "kv_cache_bytes_per_block", "PLATFORMS"]

PLATFORMS = {
    "cpu": "mindie_llm.backends.cpu.platform.CpuPlatform",
    "cuda": "mindie_llm.backends.cuda.platform.CudaPlatform",
    "npu": "mindie_llm.backends.npu.platform.NpuPlatform",
}


def get_platform(device: str = "auto") -> type[Platform]:
    """The Platform class for ``device`` with its ops registered. Raises ValueError naming
    ``backend.device`` when the device is unknown or its runtime is missing."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in PLATFORMS:
        raise ValueError(f"backend.device: must be one of auto, {', '.join(PLATFORMS)}; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("backend.device: cuda was asked for but torch sees no CUDA device "
                         "(is this a CPU-only torch build?)")
    if device == "npu":  # one line naming what is missing: torch_npu, the CANN libraries or a device
        from mindie_llm.backends.npu.runtime import require_device

        require_device()
    try:
        platform = import_qualname(PLATFORMS[device])
    except (ImportError, AttributeError) as e:
        raise ValueError(f"backend.device: the {device} backend cannot be loaded: {e}") from None
    platform.register_ops()
    return platform
