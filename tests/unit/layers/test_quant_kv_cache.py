# SPDX-License-Identifier: Apache-2.0
"""KV cache int8 / fp8 e4m3 with per-head scales (ops/reference.py layout: D codes + a float32
scale per token and head). Oracle: paged attention over the float cache (tolerances stated), and
the dispatch: a quantized cache reaches the *_quant ops whatever backend is registered."""
import pytest
import torch

from mindie_llm import ops
from mindie_llm.config import ConfigError, EngineConfig
from mindie_llm.executor.kv_cache import KVCacheSpec, allocate_kv_caches, resolve_kv_cache_dtype
from mindie_llm.ops import reference as ref
from mindie_llm.ops.attention_metadata import AttentionMetadata


@pytest.mark.parametrize("dtype,tol", [(torch.int8, 0.02), (torch.float8_e4m3fn, 0.08)])
def test_quantized_cache_attention_close_to_float(dtype, tol):
    torch.manual_seed(0)
    hq, hk, d, bs = 4, 2, 32, 8
    md = AttentionMetadata.build([5, 0], [1, 12], [[1, 2], [3, 4]], bs)       # one decode, one prefill
    t = md.num_tokens
    k, v, q = torch.randn(t, hk, d) * 3, torch.randn(t, hk, d), torch.randn(t, hq, d)
    prior_k, prior_v = torch.randn(5, hk, d) * 3, torch.randn(5, hk, d)
    prior_slots = torch.tensor([8, 9, 10, 11, 12])
    f = torch.zeros(2, 5, bs, hk, d)
    qc = allocate_kv_caches(KVCacheSpec(1, hk, d, bs, dtype), 5, "cpu")[0]
    assert qc.shape == (2, 5, bs, hk, d + 4) and qc.dtype == dtype
    for cache in (f, qc):
        ops.write_kv_cache(prior_k, prior_v, cache, prior_slots)
        ops.write_kv_cache(k, v, cache, md.slot_mapping)
    want = ref.paged_attention(q, f, md, d ** -0.5)
    got = ops.paged_attention(q, qc, md, d ** -0.5)
    assert float((got - want).abs().max()) < tol * float(want.abs().max())
    # the stored entry round-trips within one quantization step of its head's scale
    deq = ref.kv_dequantize(qc[0, 1, 0])                                       # slot 8 = prior_k[0]
    step = prior_k[0].abs().amax(-1, keepdim=True) / (127 if dtype == torch.int8 else 16)
    assert bool(((deq - prior_k[0]).abs() <= step).all())


def test_rotary_write_kv_routes_quantized_cache():
    torch.manual_seed(1)
    t, hq, hk, d = 3, 2, 1, 16
    cos_sin = torch.randn(32, d)
    q, k, v = torch.randn(t, hq * d), torch.randn(t, hk * d), torch.randn(t, hk * d)
    pos, slots = torch.tensor([0, 1, 2]), torch.tensor([4, 5, 6])
    qc = torch.zeros(2, 2, 4, hk, d + 4, dtype=torch.int8)
    rq, rk = ops.rotary_embedding_write_kv(pos, q.clone(), k.clone(), v, qc, slots, d, cos_sin, True)
    wq, wk = ref.rotary_embedding(pos, q, k, d, cos_sin, True)
    torch.testing.assert_close(rq, wq)
    torch.testing.assert_close(ref.kv_dequantize(qc[0, 1, :3]).reshape(t, -1), wk, atol=0.05, rtol=0)


def test_kv_cache_dtype_config_and_refusals():
    cfg = EngineConfig.from_kwargs(kv_cache_dtype="int8")
    assert cfg.cache.cache_dtype == "int8"
    with pytest.raises(ConfigError, match="cache.cache_dtype"):
        EngineConfig.from_kwargs(kv_cache_dtype="int4")
    assert resolve_kv_cache_dtype("fp8_e4m3", torch.float32, torch.device("cpu")) == torch.float8_e4m3fn
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="cache.cache_dtype=int8: a quantized KV cache runs on the CPU and CUDA"):
        resolve_kv_cache_dtype("int8", torch.float16, torch.device("meta"))
    spec = KVCacheSpec(2, 4, 64, 16, torch.int8)
    assert spec.bytes_per_block == 2 * 2 * 16 * 4 * 68                          # codes + 4-byte scales
