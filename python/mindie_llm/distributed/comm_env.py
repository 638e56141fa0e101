# SPDX-License-Identifier: Apache-2.0
"""The environment every distributed process of a deployment runs with: NVLink multicast (NVLS,
symmetric-memory multicast, NVSHMEM NVLS) stays off. Multicast objects on a shared host can take
the GPUs out of service for every tenant, and nothing here needs them (NCCL's ring and tree
all-reduce over NVLink is what tensor parallelism uses). The launchers, the tensor-parallel
executor and the benchmark scripts build their children's environment with ``with_comm_env`` and
apply it to their own (``apply_comm_env``) before a communicator is created.

Imports nothing but the standard library.
"""
from __future__ import annotations

import os
from typing import Mapping, MutableMapping

__all__ = ["MULTICAST_OFF", "with_comm_env", "apply_comm_env"]

MULTICAST_OFF: dict[str, str] = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def with_comm_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """A copy of ``base`` (default: this process's environment) plus ``extra``, with multicast off
    (these values win over anything in ``base`` or ``extra``)."""
    env = dict(os.environ if base is None else base)
    env.update(extra)
    env.update(MULTICAST_OFF)
    return env


def apply_comm_env(environ: MutableMapping[str, str] | None = None) -> None:
    """Turns multicast off in this process's environment (before any communicator exists)."""
    (os.environ if environ is None else environ).update(MULTICAST_OFF)
