# SPDX-License-Identifier: Apache-2.0
"""CUDA-backend kernel tests: on a GPU they run the compiled Triton kernels; without one they run
the same kernels in the Triton interpreter (TRITON_INTERPRET=1, set here before any kernel module
is imported) on small CPU shapes, so CI checks the kernels' indexing."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_TRITON = importlib.util.find_spec("triton") is not None

@pytest.fixture
def device() -> str:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if not HAS_CUDA:
        from mindie_llm.backends.cuda import norm
        if type(norm._rms_norm_kernel).__name__ != "InterpretedFunction":
            pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; no GPU")
    return "cuda" if HAS_CUDA else "cpu"
