# SPDX-License-Identifier: Apache-2.0
"""The reference ops against independent formulations: paged attention vs torch SDPA over the
same context stored contiguously, rotary vs complex multiplication, RMSNorm vs its formula."""
from __future__ import annotations

import torch

from mindie_llm.layers.attention import AttentionMetadata
from mindie_llm.ops import reference as ref


def test_paged_attention_equals_sdpa_on_contiguous_context():
    torch.manual_seed(0)
    hq, hk, d, bs = 4, 2, 8, 4
    s = 10  # context length; the chunk is its last 6 tokens
    k = torch.randn(s, hk, d)
    v = torch.randn(s, hk, d)
    q = torch.randn(6, hq, d)
    table = [7, 3, 5]  # scattered blocks
    kv = torch.zeros(2, 8, bs, hk, d)
    md_all = AttentionMetadata.build([0], [s], [table], bs)
    ref.write_kv_cache(k, v, kv, md_all.slot_mapping)
    md = AttentionMetadata.build([4], [6], [table], bs)
    got = ref.paged_attention(q, kv, md, 0.3)
    # SDPA with explicit causal offset, KV heads repeated
    kk = k.repeat_interleave(2, dim=1).transpose(0, 1)
    vv = v.repeat_interleave(2, dim=1).transpose(0, 1)
    mask = torch.arange(s)[None, :] <= torch.arange(4, 10)[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask,
                                                            scale=0.3).transpose(0, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rotary_neox_equals_complex_rotation():
    torch.manual_seed(1)
    d, base = 8, 10000.0
    inv = 1.0 / (base ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(32).float(), inv)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    pos = torch.tensor([0, 3, 31])
    q = torch.randn(3, d)
    got, _ = ref.rotary_embedding(pos, q, q.clone(), d, cache, is_neox=True)
    z = torch.complex(q[:, : d // 2], q[:, d // 2:]) * torch.polar(torch.ones(3, d // 2), freqs[pos])
    torch.testing.assert_close(got, torch.cat((z.real, z.imag), dim=-1), atol=1e-5, rtol=1e-5)
    got_i, _ = ref.rotary_embedding(pos, q, q.clone(), d, cache, is_neox=False)
    zi = torch.complex(q[:, 0::2], q[:, 1::2]) * torch.polar(torch.ones(3, d // 2), freqs[pos])
    torch.testing.assert_close(got_i, torch.stack((zi.real, zi.imag), -1).flatten(1), atol=1e-5, rtol=1e-5)


def test_rms_norm_formula_and_fused_residual():
    x = torch.tensor([[3.0, 4.0]])
    w = torch.tensor([1.0, 2.0])
    # rms = sqrt((9 + 16) / 2)
    torch.testing.assert_close(ref.rms_norm(x, w, 0.0), x / (12.5 ** 0.5) * w)
    n, r = ref.fused_add_rms_norm(x, torch.ones(1, 2), w, 0.0)
    torch.testing.assert_close(r, x + 1)
    torch.testing.assert_close(n, ref.rms_norm(x + 1, w, 0.0))
    torch.testing.assert_close(ref.silu_and_mul(torch.tensor([[0.0, 5.0]])), torch.tensor([[0.0]]))
