# SPDX-License-Identifier: Apache-2.0
"""The torch_npu double itself: its schemas are those of the pinned wheel (spot checks of the
verbatim rows), and wrong calls fail: an unknown or missing argument name, a wrong argument type,
a layout the op does not take (NZ cache mode on an ND cache, float32 or a BSH layout into fused
attention, a block size other than 128 into paged attention, non-contiguous in-place rope
inputs), out-of-range slots; and a wrong call inside the backend fails the model step."""
from __future__ import annotations

import pytest
import torch

from npu_signatures import SCHEMAS, parse_schema
from torch_npu_double import DoubleCallError


def test_schemas_parse_as_the_wheel_prints_them():
    name, sig, types = parse_schema("torch_npu.npu_swiglu(Tensor self, int dim=-1) -> (Tensor)")
    assert name == "npu_swiglu" and list(sig.parameters) == ["self", "dim"] and types["dim"] == "int"
    fia = SCHEMAS["npu_fused_infer_attention_score"].signature.parameters
    assert list(fia)[:3] == ["query", "key", "value"] and fia["input_layout"].default == "BSH"
    assert fia["sparse_mode"].kind.name == "KEYWORD_ONLY" and fia["block_size"].default == 0
    assert SCHEMAS["npu_scatter_pa_kv_cache"].signature.parameters["cache_mode"].default == "PA_NZ"
    assert all(s.source.startswith("torch-npu 2.13.0 wheel") for s in SCHEMAS.values())


def test_wrong_names_and_types_fail(npu_double):
    tnpu = npu_double.module
    x, w = torch.randn(2, 8).half(), torch.ones(8).half()
    tnpu.npu_rms_norm(x, w, epsilon=1e-6)
    with pytest.raises(DoubleCallError, match="unexpected keyword argument 'eps'"):
        tnpu.npu_rms_norm(x, w, eps=1e-6)
    with pytest.raises(DoubleCallError, match="missing a required argument: 'gamma'"):
        tnpu.npu_rms_norm(x)
    with pytest.raises(DoubleCallError, match="dim must be int"):
        tnpu.npu_swiglu(x, dim=-1.0)
    with pytest.raises(DoubleCallError, match="too many positional"):   # everything after * is keyword-only
        tnpu.npu_quant_matmul(x, x, w, None)
    with pytest.raises(DoubleCallError, match="gamma: same dtype"):
        tnpu.npu_rms_norm(x, w.float(), 1e-6)


def test_wrong_layouts_fail(npu_double):
    tnpu = npu_double.module
    kc = torch.zeros(4, 128, 2, 16, dtype=torch.float16)
    k = torch.randn(3, 2, 16).half()
    with pytest.raises(DoubleCallError, match="cache_mode 'PA_NZ'"):   # the default expects NZ caches
        tnpu.npu_scatter_pa_kv_cache(k, k, kc, kc.clone(), torch.tensor([130, 131, 132]))
    with pytest.raises(DoubleCallError, match="slot_mapping values in"):
        tnpu.npu_scatter_pa_kv_cache(k, k, kc, kc.clone(), torch.tensor([130, 131, 4 * 128]), cache_mode="Norm")
    with pytest.raises(DoubleCallError, match="must not repeat"):
        tnpu.npu_scatter_pa_kv_cache(k, k, kc, kc.clone(), torch.tensor([130, 130, 131]), cache_mode="Norm")
    q = torch.randn(2, 4, 16).half()
    kw = dict(num_kv_heads=2, num_heads=4, scale_value=0.25, block_table=torch.ones(2, 1, dtype=torch.int32),
              context_lens=torch.tensor([3, 5], dtype=torch.int32), out=torch.empty_like(q))
    small = torch.zeros(4, 16, 2, 16, dtype=torch.float16)
    with pytest.raises(DoubleCallError, match="block size 128"):
        tnpu._npu_paged_attention(query=q, key_cache=small, value_cache=small, **kw)
    with pytest.raises(DoubleCallError, match="block_table"):
        tnpu._npu_paged_attention(query=q, key_cache=kc, value_cache=kc, **dict(kw, block_table=torch.ones(2, 1)))
    qp = torch.randn(5, 4, 16)
    fia = dict(block_table=torch.ones(1, 1, dtype=torch.int32), input_layout="TND", block_size=128,
               actual_seq_lengths=[5], actual_seq_lengths_kv=[5], num_key_value_heads=2, num_heads=4, scale=0.25,
               sparse_mode=3, atten_mask=torch.ones(2048, 2048, dtype=torch.bool).triu(1))
    cache = kc.view(4, 128, 32)
    tnpu.npu_fused_infer_attention_score(qp.half(), cache, cache, **fia)
    with pytest.raises(DoubleCallError, match="float16/bfloat16"):
        tnpu.npu_fused_infer_attention_score(qp, cache.float(), cache.float(), **fia)
    with pytest.raises(DoubleCallError, match="input_layout='TND'"):
        tnpu.npu_fused_infer_attention_score(qp.half(), cache, cache, **dict(fia, input_layout="BSH"))
    with pytest.raises(DoubleCallError, match="cumulative"):
        tnpu.npu_fused_infer_attention_score(qp.half(), cache, cache, **dict(fia, actual_seq_lengths=[4]))
    with pytest.raises(DoubleCallError, match="causal mask"):
        tnpu.npu_fused_infer_attention_score(qp.half(), cache, cache,
                                             **dict(fia, atten_mask=torch.zeros(2048, 2048, dtype=torch.bool)))
    qkv = torch.randn(3, 64).half()
    with pytest.raises(DoubleCallError, match="contiguous"):
        tnpu._npu_rotary_embedding(torch.arange(3), qkv[:, :32], qkv[:, 32:], 16, torch.zeros(8, 16).half(), True)


def test_a_wrong_call_inside_the_backend_fails_the_step(npu_double, monkeypatch):
    from mindie_llm import ops
    from mindie_llm.backends.npu import runtime

    def write_without_cache_mode(key, value, kv_cache, slot_mapping):   # forgets cache_mode="Norm"
        runtime.load().npu_scatter_pa_kv_cache(key, value, kv_cache[0], kv_cache[1], slot_mapping.clamp_min(0))

    table = ops.registered_backends()["cpu"]
    monkeypatch.setattr(table, "write_kv_cache", write_without_cache_mode)
    ops.register_backend("cpu", table)
    cache = torch.zeros(2, 2, 128, 1, 16, dtype=torch.float16)
    with pytest.raises(DoubleCallError, match="PA_NZ"):
        ops.write_kv_cache(torch.randn(2, 1, 16).half(), torch.randn(2, 1, 16).half(), cache, torch.tensor([128, 129]))
