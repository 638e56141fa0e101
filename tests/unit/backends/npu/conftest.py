# SPDX-License-Identifier: Apache-2.0
"""Fixtures of the NPU-backend tests: ``npu_double`` installs the CPU test double of torch_npu
(torch_npu_double.py), registers the NPU op table for CPU tensors and restores the CPU backend,
sys.modules and torch.npu afterwards."""
from __future__ import annotations

import pytest

from mindie_llm import ops


@pytest.fixture
def npu_double():
    import torch_npu_double

    saved = ops.registered_backends().get("cpu")
    double = torch_npu_double.install()
    try:
        from mindie_llm.backends import get_platform

        get_platform("npu")
        yield double
    finally:
        double.uninstall()
        ops.unregister_backend("cpu")
        if saved is not None:
            ops.register_backend("cpu", saved)
