# SPDX-License-Identifier: Apache-2.0
"""ctypes access to the project's Ascend C kernels under the CPU emulator (ops/ascendc/test/capi.cpp
+ every op_kernel/*.cpp, compiled with g++ -DASCENDC_EMU into build/ascendc-capi/, rebuilt when a
source changes), with torch-tensor wrappers shaped like the ``ops/reference.py`` functions.

A kernel that breaks an emulator rule (UB overflow, unaligned copy, unbalanced queue, ...) or a
tiling refusal raises ``EmulatorError`` with the emulator's message."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

__all__ = ["EmulatorError", "load", "add_rms_norm", "swiglu", "rotary_kv_write", "paged_decode"]

REPO = Path(__file__).resolve().parents[4]
ASCENDC = REPO / "ops" / "ascendc"


class EmulatorError(RuntimeError):
    pass


def _sources() -> list[Path]:
    return sorted([ASCENDC / "test" / "capi.cpp", *ASCENDC.glob("*/op_kernel/*.cpp")])


def load() -> ctypes.CDLL:
    """Builds (once per source hash) and loads the emulated kernels; raises RuntimeError without g++."""
    cxx = shutil.which("g++")
    if cxx is None:
        raise RuntimeError("g++ is needed to build the Ascend C emulator kernels")
    deps = _sources() + sorted(ASCENDC.glob("**/*.h"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in deps)).hexdigest()[:16]
    out = REPO / "build" / "ascendc-capi" / f"libascendc_emu_{digest}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp.so")   # concurrent test processes each build
        subprocess.run([cxx, "-std=c++17", "-O1", "-DASCENDC_EMU", "-shared", "-fPIC", "-o", str(tmp),
                        *map(str, _sources())], check=True, capture_output=True, timeout=600)
        tmp.replace(out)
    return ctypes.CDLL(str(out))


def _call(fn, *args) -> None:
    err = ctypes.create_string_buffer(512)
    if fn(*args, err, 512) != 0:
        raise EmulatorError(err.value.decode())


def _p(t: torch.Tensor) -> ctypes.c_void_p:
    assert t.is_contiguous() and t.device.type == "cpu"
    return ctypes.c_void_p(t.data_ptr())


def _db(t: torch.Tensor) -> int:
    assert t.dtype in (torch.float16, torch.float32), t.dtype
    return t.element_size()


u32, u64, f32 = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_float


def add_rms_norm(lib, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual) * weight, x + residual, rstd) of x, residual [T, H]."""
    x, residual, weight = x.contiguous(), residual.contiguous(), weight.contiguous()
    y, xs = torch.empty_like(x), torch.empty_like(x)
    rstd = torch.empty(x.shape[0], dtype=torch.float32)
    _call(lib.mindie_emu_add_rms_norm, _p(x), _p(residual), _p(weight), _p(y), _p(rstd), _p(xs), u32(x.shape[0]),
          u32(x.shape[1]), u32(_db(x)), f32(eps))
    return y, xs, rstd


def swiglu(lib, x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
    _call(lib.mindie_emu_swiglu, _p(x), _p(y), u32(x.shape[0]), u32(x.shape[1]), u32(_db(x)))
    return y


def rotary_kv_write(lib, positions, query, key, value, kv_cache, slot_mapping, head_dim, cos_sin_cache, is_neox):
    """ops.rotary_embedding_write_kv: returns rotated (query, key); writes kv_cache [2, N, Bs, Hk, D]."""
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    pos, slots, cs = positions.to(torch.int64).contiguous(), slot_mapping.to(torch.int64).contiguous(), \
        cos_sin_cache.float().contiguous()
    kc, vc = kv_cache[0], kv_cache[1]
    t = q.shape[0]
    _call(lib.mindie_emu_rotary_kv_write, _p(pos), _p(q), _p(k), _p(v), _p(cs), _p(slots), _p(kc), _p(vc), _p(qo),
          _p(ko), u32(t), u32(q.shape[1] // head_dim), u32(k.shape[1] // head_dim), u32(head_dim),
          u32(cs.shape[1]), ctypes.c_int(int(is_neox)), u32(_db(q)), u64(kc.shape[0] * kc.shape[1]),
          u64(cs.shape[0]))
    return qo, ko


def paged_decode(lib, query, key_cache, value_cache, block_tables, seq_lens, scale,
                 forced_splits: int = 0) -> torch.Tensor:
    """Decode attention of query [B, Hq, D] (one token each) over caches [N, Bs, Hk, D]."""
    q = query.contiguous()
    out = torch.empty_like(q)
    bt, lens = block_tables.to(torch.int32).contiguous(), seq_lens.to(torch.int32).contiguous()
    n, bs, hk, d = key_cache.shape
    _call(lib.mindie_emu_paged_decode, _p(q), _p(key_cache), _p(value_cache), _p(bt), _p(lens), _p(out),
          u32(q.shape[0]), u32(q.shape[1]), u32(hk), u32(d), u32(bs), u32(bt.shape[1]), u64(n), u32(_db(q)),
          f32(scale), u32(forced_splits))
    return out
