# SPDX-License-Identifier: Apache-2.0
"""Every op of the NPU backend through mindie_llm.ops, on the CPU under the torch_npu double
(each torch_npu call bound and checked against the pinned wheel's schema and constraints), against
``ops/reference.py`` (the oracle) in float16 and bfloat16, with the torch_npu function each op
reached; the quantized matmuls against dequantized float references; the fused matmul +
all-reduce against matmul (world size 1)."""
from __future__ import annotations

import pytest
import torch

from mindie_llm import ops
from mindie_llm.ops import reference

TOL = {torch.float16: 3e-3, torch.bfloat16: 1e-2}   # the CUDA kernel tests' relative-norm tolerances
DTYPES = [torch.float16, torch.bfloat16]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    if torch.isnan(out64).any():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_and_swiglu(npu_double, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 576, generator=g).to(dtype)
    res = torch.randn(7, 576, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(576, generator=g)).to(dtype)
    assert rel_err(ops.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5)) < TOL[dtype]
    y, r = ops.fused_add_rms_norm(x, res, w, 1e-5)
    ry, rr = reference.fused_add_rms_norm(x, res, w, 1e-5)
    assert rel_err(y, ry) < TOL[dtype] and rel_err(r, rr) < TOL[dtype]
    gu = torch.randn(5, 2 * 1536, generator=g).to(dtype)
    assert rel_err(ops.silu_and_mul(gu), reference.silu_and_mul(gu)) < TOL[dtype]
    assert npu_double.names() == ["npu_rms_norm", "npu_add_rms_norm", "npu_swiglu"]


def _cos_sin(max_pos: int, rot: int) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    f = torch.outer(torch.arange(max_pos).float(), inv)
    return torch.cat((f.cos(), f.sin()), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_and_fused_kv_write(npu_double, dtype, is_neox):
    g = torch.Generator().manual_seed(1)
    t, hq, hk, d, n, bs = 9, 9, 3, 64, 4, 128
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(dtype)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)           # views, as the model passes them
    pos = torch.randint(0, 200, (t,), generator=g)
    cs = _cos_sin(256, d)
    rq, rk = reference.rotary_embedding(pos, q, k, d, cs, is_neox)
    oq, ok = ops.rotary_embedding(pos, q, k, d, cs, is_neox)
    assert rel_err(oq, rq) < TOL[dtype] and rel_err(ok, rk) < TOL[dtype]
    slots = torch.randperm(n * bs - bs, generator=g)[:t] + bs
    slots[4] = -1                                                       # a padding row writes nothing real
    cache = torch.zeros(2, n, bs, hk, d, dtype=dtype)
    ref_cache = cache.clone()
    fq, fk = ops.rotary_embedding_write_kv(pos, q.clone(), k.clone(), v.clone(), cache, slots, d, cs, is_neox)
    reference.write_kv_cache(rk.view(t, hk, d), v.reshape(t, hk, d), ref_cache, slots)
    assert rel_err(fq, rq) < TOL[dtype] and rel_err(fk, rk) < TOL[dtype]
    assert rel_err(cache[:, 1:], ref_cache[:, 1:]) < TOL[dtype]        # block 0 = null block, never read
    assert npu_double.names() == ["_npu_rotary_embedding", "_npu_rotary_embedding", "npu_scatter_pa_kv_cache"]
    _, args = npu_double.calls[-1]
    assert args["cache_mode"] == "Norm" and args["slot_mapping"].min() >= 0


def _batch(q_lens, ctx_lens, bs, n_blocks, g):
    """AttentionMetadata-shaped namespace of a mixed batch (decodes first) with shuffled blocks."""
    from types import SimpleNamespace

    b = len(q_lens)
    width = max((c + bs - 1) // bs for c in ctx_lens)
    perm = torch.randperm(n_blocks - 1, generator=g) + 1
    tables = torch.zeros(b, width, dtype=torch.int32)
    used = 0
    for i, c in enumerate(ctx_lens):
        nb = (c + bs - 1) // bs
        tables[i, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    nd = 0
    while nd < b and q_lens[nd] == 1:
        nd += 1
    return SimpleNamespace(query_start_loc=qsl, seq_lens=torch.tensor(ctx_lens, dtype=torch.int32),
                           block_tables=tables, num_decodes=nd, backend_state={},
                           slot_mapping=torch.zeros(sum(q_lens), dtype=torch.int64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_lens,ctx_lens", [
    ([1, 1, 1], [5, 130, 300]),            # decode only: _npu_paged_attention
    ([7, 20], [7, 20]),                    # prefill without cache: FIA
    ([1, 1, 12, 5], [40, 257, 140, 5]),    # mixed: decodes, a chunk with cached context, a fresh prompt
])
def test_paged_attention_mixed_batch(npu_double, dtype, q_lens, ctx_lens):
    g = torch.Generator().manual_seed(2)
    hq, hk, d, bs, n_blocks = 8, 2, 64, 128, 12
    md = _batch(q_lens, ctx_lens, bs, n_blocks, g)
    cache = torch.randn(2, n_blocks, bs, hk, d, generator=g).to(dtype)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    out = ops.paged_attention(q, cache, md, d ** -0.5)
    ref = reference.paged_attention(q, cache, md, d ** -0.5)
    assert rel_err(out, ref) < TOL[dtype]
    names = set(npu_double.names())
    assert ("_npu_paged_attention" in names) == (q_lens[0] == 1)
    assert ("npu_fused_infer_attention_score" in names) == any(n > 1 for n in q_lens)
    ops.paged_attention(q, cache, md, d ** -0.5)                        # a second layer reuses the plan
    assert md.backend_state["npu_plan"].state.value == (
        "DecodeOnly" if max(q_lens) == 1 else "PrefillNoCache" if q_lens == ctx_lens else "Mixed")


def test_sliding_window_is_refused(npu_double):
    md = _batch([1], [3], 128, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="sliding_window"):
        ops.paged_attention(torch.zeros(1, 2, 16, dtype=torch.float16), torch.zeros(2, 2, 128, 1, 16,
                            dtype=torch.float16), md, 1.0, sliding_window=4)


def test_310p_table_uses_reshape_and_cache(npu_double):
    from mindie_llm.backends.npu.ops import op_table

    table = op_table(is_310p=True)
    cache = torch.zeros(2, 3, 128, 2, 16, dtype=torch.float16)
    k, v = torch.randn(4, 2, 16).half(), torch.randn(4, 2, 16).half()
    slots = torch.tensor([130, 131, 300, 129])
    table.write_kv_cache(k, v, cache, slots)
    ref = torch.zeros_like(cache)
    reference.write_kv_cache(k, v, ref, slots)
    assert torch.equal(cache, ref) and npu_double.names() == ["_npu_reshape_and_cache"]
    assert npu_double.calls[0][1]["slot_indices"].dtype == torch.int32


def test_quantized_matmuls_against_dequantized_references(npu_double):
    from mindie_llm.backends.npu import quant

    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 64, generator=g).half()
    w = torch.randn(32, 64, generator=g)                                  # a linear layer's [N, K] weight
    sw = w.abs().amax(dim=1) / 127.0                                      # per output channel
    qw = torch.round(w / sw[:, None]).clamp(-127, 127).to(torch.int8)     # [N, K]
    # W8A16: dequantized reference x @ (qw * s)^T
    y = quant.weight_quant_matmul(x, qw.t().contiguous(), sw.half())
    ref = x.float() @ (qw.float() * sw.half().float()[:, None]).t()
    assert rel_err(y, ref) < 3e-3
    # W8A8 with dynamic per-token activation scales
    qx, sx = quant.dynamic_quant(x)
    assert qx.dtype == torch.int8 and sx.shape == (6,)
    y8 = quant.quant_matmul(qx, qw.t().contiguous(), sw, pertoken_scale=sx, output_dtype=torch.float16)
    ref8 = (qx.float() * sx[:, None]) @ (qw.float() * sw[:, None]).t()
    assert rel_err(y8, ref8) < 3e-3
    assert rel_err(y8, x.float() @ w.t()) < 3e-2                          # and close to the float layer
    assert npu_double.names() == ["npu_weight_quant_batchmatmul", "npu_dynamic_quant", "npu_quant_matmul"]


def test_matmul_all_reduce_fused_for_prefill_and_plain_for_decode(npu_double):
    from mindie_llm.backends.npu import comm

    npu_double.register_hcom("hccl_world_0")
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(48, 64, generator=g).half(), torch.randn(48, generator=g).half()
    for m, fused in ((5, True), (1, False)):
        npu_double.calls.clear()
        x = torch.randn(m, 64, generator=g).half()
        y = comm.matmul_all_reduce(x, w, hcom="hccl_world_0", bias=b)
        assert rel_err(y, x.float() @ w.float().t() + b.float()) < 3e-3
        assert ("npu_mm_all_reduce_base" in npu_double.names()) == fused
    with pytest.raises(AssertionError, match="not a communicator name"):
        comm.matmul_all_reduce(torch.randn(4, 64).half(), w, hcom="nope")

    class Backend:
        def get_hccl_comm_name(self, rank):
            return f"hccl_world_{rank}"

    class Group:
        def _get_backend(self, device):
            assert device == torch.device("npu")
            return Backend()

    assert comm.hccl_comm_name(Group(), rank=0) == "hccl_world_0"
