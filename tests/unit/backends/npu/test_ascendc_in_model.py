# SPDX-License-Identifier: Apache-2.0
"""The model through the project's Ascend C kernels: ``torch.ops.mindie_ascendc.*`` is registered
on the CPU with the schemas of ops/ascendc/*/torch_adapter.cpp (parsed from those files) and
implementations that run the kernels under the emulator (ascendc_emu_lib), so the NPU platform
picks its custom op table (backends/npu/custom_ops.py); greedy tokens must equal the CPU
backend's on the same float16 weights."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import ascendc_emu_lib as emu
from test_npu_model import TINY, _generate

ADAPTERS = sorted((Path(__file__).resolve().parents[4] / "ops" / "ascendc").glob("*/torch_adapter.cpp"))


def adapter_schemas() -> dict[str, str]:
    """name -> schema of every m.def("...") in the torch adapters (adjacent literals joined)."""
    out = {}
    for path in ADAPTERS:
        for body in re.findall(r"m\.def\(((?:\s*\"[^\"]*\")+)\s*\)", path.read_text()):
            schema = "".join(re.findall(r"\"([^\"]*)\"", body))
            out[schema.split("(")[0]] = schema
    return out


@pytest.fixture
def ascendc_ops():
    try:
        lib = emu.load()
    except RuntimeError as e:
        pytest.skip(str(e))
    calls: Counter = Counter()

    def add_rms_norm(x1, x2, gamma, epsilon=1e-6):
        calls["add_rms_norm"] += 1
        y, x, rstd = emu.add_rms_norm(lib, x1, x2, gamma, epsilon)
        return y, rstd[:, None], x

    def swiglu(x):
        calls["swiglu"] += 1
        return emu.swiglu(lib, x)

    def rotary_kv_write(positions, query, key, value, key_cache, value_cache, slot_mapping, head_dim, cos_sin_cache,
                        is_neox):
        calls["rotary_kv_write"] += 1
        return emu.rotary_kv_write(lib, positions, query, key, value, (key_cache, value_cache), slot_mapping, head_dim,
                                   cos_sin_cache, is_neox)

    def paged_decode_attention(query, key_cache, value_cache, block_tables, context_lens, scale):
        calls["paged_decode_attention"] += 1
        return emu.paged_decode(lib, query, key_cache, value_cache, block_tables, context_lens, scale)

    schemas = adapter_schemas()
    assert sorted(schemas) == sorted(["add_rms_norm", "swiglu", "rotary_kv_write", "paged_decode_attention"])
    library = torch.library.Library("mindie_ascendc", "DEF")
    for name, fn in (("add_rms_norm", add_rms_norm), ("swiglu", swiglu), ("rotary_kv_write", rotary_kv_write),
                     ("paged_decode_attention", paged_decode_attention)):
        library.define(schemas[name])
        library.impl(name, fn, "CPU")
    try:
        yield calls
    finally:
        library._destroy()


@pytest.fixture(scope="module")
def tiny16():
    from mindie_llm.config import ModelConfig
    from mindie_llm.loader import load_model

    w = load_model(ModelConfig(load_format="dummy", seed=5), "cpu", "float16", progress=False, hf_config=TINY)
    from mindie_llm.backends import get_platform

    get_platform("cpu")
    prompts = [np.random.default_rng(i).integers(3, 300, n).tolist() for i, n in enumerate((1, 9, 140))]
    return w, prompts, _generate(w, "cpu", prompts, 6, max_num_batched_tokens=64)


def test_model_through_the_emulated_ascendc_kernels(tiny16, ascendc_ops, npu_double):
    from mindie_llm import ops

    weights, prompts, cpu_tokens = tiny16
    assert ops.registered_backends()["cpu"].silu_and_mul.__module__ == "mindie_llm.backends.npu.custom_ops"
    assert _generate(weights, "npu", prompts, 6, max_num_batched_tokens=64, enforce_eager=True) == cpu_tokens
    assert all(ascendc_ops[name] > 0 for name in ("add_rms_norm", "swiglu", "rotary_kv_write",
                                                  "paged_decode_attention")), ascendc_ops
    assert "npu_fused_infer_attention_score" in npu_double.names()     # prefill rows stay on FIA
