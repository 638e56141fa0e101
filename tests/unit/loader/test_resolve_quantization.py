# SPDX-License-Identifier: Apache-2.0
"""What ``model.quantization: auto`` resolves to (loader.resolve_quantization)."""
from __future__ import annotations

import importlib.util
import logging

import pytest

from mindie_llm import loader


def test_auto_is_gguf_blocks_on_cpu_with_kernels():
    assert loader.resolve_quantization("auto", "gguf", "cpu") == "gguf"
    assert loader.resolve_quantization(None, "gguf", "cpu") == "gguf"


@pytest.mark.parametrize("fmt,device", [("safetensors", "cpu"), ("gguf", "meta")])
def test_auto_is_dense_elsewhere(fmt, device):
    assert loader.resolve_quantization("auto", fmt, device) == "none"


def test_explicit_choice_is_kept():
    assert loader.resolve_quantization("int8", "gguf", "cpu") == "int8"


def test_auto_without_kernels_falls_back_to_dense_and_says_so(monkeypatch, caplog):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mindie_llm._cpu_kernels" else real(name, *a))
    with caplog.at_level(logging.WARNING, logger="mindie_llm.loader"):
        assert loader.resolve_quantization("auto", "gguf", "cpu") == "none"
    assert "_cpu_kernels is not built" in caplog.text
