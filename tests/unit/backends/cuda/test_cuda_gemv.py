# SPDX-License-Identifier: Apache-2.0
"""The one-row GEMV of the CUDA backend against torch's matmul in float64 (the oracle), every tile,
odd N and K (masked) and multiples of the tile (unmasked), with and without bias, fp32 and bf16,
fp32 output from bf16 weights (the LM head); ``gemv_linear`` / ``gemv_lm_head`` fall back to
cuBLAS above one row; on a GPU, the start-up selection keeps the model's logits equal to the dense
path's and every shape's report is filled."""
from __future__ import annotations

import pytest
import torch
from cuda_checks import TOL, rel_err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K,bias", [(37, 300, False), (64, 1030, True), (5, 17, True), (32, 4096, False)])
def test_gemv_matches_matmul(device, dtype, N, K, bias):
    from mindie_llm.backends.cuda import gemv as g

    gen = torch.Generator().manual_seed(N * 7 + K)
    x = torch.randn(1, K, generator=gen).to(dtype)
    w = torch.randn(N, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    ref = x.double() @ w.double().T + (b.double() if bias else 0)                  # [1, N]
    for tile in g.GEMV_TILES:
        out = g.gemv(x.to(device), w.to(device), b.to(device) if bias else None, tile)
        assert out.shape == (1, N) and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], tile


def test_gemv_fp32_output_for_the_lm_head(device):
    from mindie_llm.backends.cuda import gemv as g
    from mindie_llm.layers.embedding import LMHead

    gen = torch.Generator().manual_seed(3)
    head = LMHead(200, 64)
    head.weight.data = torch.randn(200, 64, generator=gen).to(torch.bfloat16).to(device)
    head.gemv_tile = g.GEMV_TILES[0]
    head.linear_method = g.gemv_lm_head
    x = torch.randn(2, 64, generator=gen).to(torch.bfloat16).to(device)
    ref = x.double() @ head.weight.double().T                                       # [2, 200]
    one = head(x[:1])
    assert one.dtype == torch.float32 and rel_err(one, ref[:1]) < 1e-5            # fp32 out: no bf16 rounding
    assert rel_err(head(x), ref) < TOL[torch.bfloat16]


def test_pdl_is_off_without_a_hopper_gpu(device):
    """No programmatic dependent launch in the interpreter or on a CPU tensor: the kernels get
    USE_PDL=False and no launch attribute (a GPU before sm_90 answers the same)."""
    from mindie_llm.backends.cuda import pdl
    assert pdl.supported("cpu") is False and pdl.launch_kwargs("cpu") == {"USE_PDL": False}
    if device == "cpu":
        assert pdl.supported() is False
    elif torch.cuda.get_device_capability()[0] < 9:
        assert pdl.supported("cuda") is False


def test_gemv_rejects_bad_shapes(device):
    from mindie_llm.backends.cuda import gemv as g

    with pytest.raises(ValueError, match="x"):
        g.gemv(torch.randn(2, 8, device=device), torch.randn(4, 8, device=device))
    with pytest.raises(ValueError, match="weight"):
        g.gemv(torch.randn(1, 8, device=device), torch.randn(4, 9, device=device))


def test_gemv_linear_uses_the_gemv_for_one_row_only(device, monkeypatch):
    from mindie_llm.backends.cuda import gemv as g
    from mindie_llm.layers.linear import ReplicatedLinear

    layer = ReplicatedLinear(24, 10, bias=True).to(device)
    torch.nn.init.normal_(layer.weight)
    layer.gemv_tile = g.GEMV_TILES[0]
    calls = []
    real = g.gemv
    monkeypatch.setattr(g, "gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, 24, device=device)
    for rows in (1, 3):
        out = g.gemv_linear(layer, x[:rows])
        assert rel_err(out, x[:rows].double() @ layer.weight.double().T + layer.bias.double()) < 1e-4
    assert calls == [1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_selection_keeps_the_model_output():
    from mindie_llm.backends import get_platform
    from mindie_llm.backends.cuda import gemv as g
    from mindie_llm.config import ModelConfig
    from mindie_llm.layers.attention import AttentionMetadata
    from mindie_llm.layers.linear import LinearBase
    from mindie_llm.loader import load_model

    get_platform("cuda")
    arch = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=512, intermediate_size=1376,
                num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = load_model(ModelConfig(load_format="dummy", seed=1), "cpu", "bfloat16", progress=False,
                       hf_config=arch).model.to("cuda")
    kv = [torch.zeros(2, 4, 16, 2, 64, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    md = AttentionMetadata.build([0], [1], [[1]], 16, device="cuda")
    ids = torch.tensor([5], device="cuda")
    pos = torch.tensor([0], device="cuda")
    dense = model.compute_logits(model(ids, pos, kv, md))                            # [1, vocab]
    report = g.select_gemv_linears(model)
    assert len(report) == 5 and all(len(v) == 4 and v[0] > 0 and v[1] > 0 for v in report.values())
    assert any("lm_head" in k[2] for k in report)                   # the head is timed too
    chosen = model.compute_logits(model(ids, pos, kv, md))
    assert chosen.dtype == torch.float32 and rel_err(chosen, dense) < TOL[torch.bfloat16]
    for m in model.modules():                        # force every layer through the GEMV as well
        if isinstance(m, LinearBase):
            m.gemv_tile = getattr(m, "gemv_tile", g.GEMV_TILES[0])
            m.linear_method = g.gemv_linear
    model.lm_head.gemv_tile = g.GEMV_TILES[0]
    model.lm_head.linear_method = g.gemv_lm_head
    out = model.compute_logits(model(ids, pos, kv, md))
    assert rel_err(out, dense) < TOL[torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_pdl_gemv_waits_for_the_kernel_before_it():
    """A programmatic-dependent GEMV after the norm that produces its input, replayed from a CUDA
    graph with new inputs each time: it must read the norm's output of that replay (it prefetches
    only weights before its wait). Oracle: float64 matmul of the reference norm."""
    from mindie_llm.backends.cuda import gemv as g, norm, pdl
    if not pdl.supported():
        pytest.skip("programmatic dependent launch needs sm_90 and a Triton with gdc ops")
    K, N = 4096, 6144
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    wn = torch.randn(K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    for tile in ((1, 2048, 4), (4, 1024, 4)):
        norm.fused_add_rms_norm(x, r, wn, 1e-5)
        g.gemv(x, w, None, tile, pdl=True)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            h, _ = norm.fused_add_rms_norm(x, r, wn, 1e-5)
            y = g.gemv(h, w, None, tile, pdl=True)
        for _ in range(3):
            x.copy_(torch.randn_like(x))
            graph.replay()
            s = (x.double() + r.double())
            ref_h = (s / torch.sqrt((s * s).mean() + 1e-5) * wn.double()).to(torch.bfloat16)
            assert rel_err(y, ref_h.double() @ w.double().T) < TOL[torch.bfloat16], tile
