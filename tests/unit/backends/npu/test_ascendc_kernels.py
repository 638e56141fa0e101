# SPDX-License-Identifier: Apache-2.0
"""The Ascend C kernels (ops/ascendc, compiled for the CPU emulator) against ``ops/reference.py``
itself, the project's oracle, on fixed random data in float32 and float16 (the C++ suite covers the
larger shape grid against its double-precision reference, plain and under ASan/UBSan). Tolerances
are the CUDA kernel tests' relative-norm ones."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import ascendc_emu_lib as emu
from mindie_llm.ops import reference

TOL = {torch.float32: 1e-4, torch.float16: 3e-3}
DTYPES = [torch.float32, torch.float16]


def rel_err(out, ref) -> float:
    out64, ref64 = out.double(), ref.double()
    return float("inf") if torch.isnan(out64).any() else float((out64 - ref64).norm() / ref64.norm())


@pytest.fixture(scope="module")
def lib():
    try:
        return emu.load()
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(lib, dtype):
    g = torch.Generator().manual_seed(0)
    for t, h in ((1, 8), (5, 576), (3, 1001), (2, 9000)):
        x, r = torch.randn(t, h, generator=g).to(dtype), torch.randn(t, h, generator=g).to(dtype)
        w = (1 + 0.1 * torch.randn(h, generator=g)).to(dtype)
        y, xs, rstd = emu.add_rms_norm(lib, x, r, w, 1e-5)
        ry, rx = reference.fused_add_rms_norm(x, r, w, 1e-5)
        assert rel_err(xs, rx) < TOL[dtype] and rel_err(y, ry) < TOL[dtype], (t, h)
        assert rel_err(rstd, torch.rsqrt(rx.float().pow(2).mean(-1) + 1e-5)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(lib, dtype):
    g = torch.Generator().manual_seed(1)
    for t, i in ((1, 8), (7, 1536), (3, 1001)):
        x = (3 * torch.randn(t, 2 * i, generator=g)).to(dtype)
        assert rel_err(emu.swiglu(lib, x), reference.silu_and_mul(x)) < TOL[dtype], (t, i)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_kv_write(lib, dtype, is_neox):
    g = torch.Generator().manual_seed(2)
    t, hq, hk, d, n, bs = 11, 9, 3, 64, 5, 16
    q, k, v = (torch.randn(t, h * d, generator=g).to(dtype) for h in (hq, hk, hk))
    pos = torch.randint(0, 100, (t,), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    f = torch.outer(torch.arange(128).float(), inv)
    cs = torch.cat((f.cos(), f.sin()), -1)
    slots = torch.randperm(n * bs, generator=g)[:t]
    slots[3] = -1
    cache = torch.randn(2, n, bs, hk, d, generator=g).to(dtype)
    ref_cache = cache.clone()
    oq, ok = emu.rotary_kv_write(lib, pos, q, k, v, cache, slots, d, cs, is_neox)
    rq, rk = reference.rotary_embedding_write_kv(pos, q, k, v, ref_cache, slots, d, cs, is_neox)
    assert rel_err(oq, rq) < TOL[dtype] and rel_err(ok, rk) < TOL[dtype]
    assert rel_err(cache, ref_cache) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("forced_splits", [0, 1, 3])
def test_paged_decode_attention(lib, dtype, forced_splits):
    g = torch.Generator().manual_seed(3)
    hq, hk, d, bs, n = 8, 2, 64, 16, 20
    lens = [1, 17, 45, 64]
    width = 5
    perm = torch.randperm(n - 1, generator=g) + 1
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    used = 0
    for i, c in enumerate(lens):
        nb = -(-c // bs)
        tables[i, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    cache = torch.randn(2, n, bs, hk, d, generator=g).to(dtype)
    q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    out = emu.paged_decode(lib, q, cache[0], cache[1], tables, seq_lens, d ** -0.5, forced_splits)
    md = SimpleNamespace(query_start_loc=torch.arange(len(lens) + 1, dtype=torch.int32), seq_lens=seq_lens,
                         block_tables=tables)
    assert rel_err(out, reference.paged_attention(q, cache, md, d ** -0.5)) < TOL[dtype]


def test_emulator_violations_surface_as_errors(lib):
    with pytest.raises(emu.EmulatorError, match="head_dim"):      # tiling refusal: 60 fp16 = 120 bytes per row
        q = torch.zeros(1, 60, dtype=torch.float16)
        emu.rotary_kv_write(lib, torch.zeros(1, dtype=torch.int64), q, q, q,
                            torch.zeros(2, 1, 16, 1, 60, dtype=torch.float16), torch.zeros(1, dtype=torch.int64), 60,
                            torch.zeros(4, 60), True)
    with pytest.raises(emu.EmulatorError, match="GM bounds"):     # a slot past the cache
        q = torch.zeros(1, 16)
        emu.rotary_kv_write(lib, torch.zeros(1, dtype=torch.int64), q, q, q, torch.zeros(2, 1, 16, 1, 16),
                            torch.tensor([16]), 16, torch.zeros(4, 16), True)
