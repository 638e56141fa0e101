# SPDX-License-Identifier: Apache-2.0
"""Torch-facing wrappers of the C++ CPU kernels (``mindie_llm._cpu_kernels``, cpp/kernels).

Each wrapper checks dtypes, shapes and contiguity before handing raw pointers to C++; the
indices a kernel follows (token ids, block tables, sequence lengths, slots, positions) are
checked by the caller once per step (``backends/cpu/fast_ops.py``) or here. ``available()`` is
False when the extension was not built; callers then keep the plain-torch ops.

Threads: the kernels run on one process-wide pool of ``torch.get_num_threads()`` threads (the
caller is one of them), re-created when that number changes. Idle workers spin ``SPIN_US``
microseconds, then sleep (passive waiting); work is claimed item by item, so a thread that loses
its core to another process delays a kernel by one item, not by its share.

Must not import models, layers, the engine or another backend.
"""
from __future__ import annotations

import os

import torch

try:
    from mindie_llm import _cpu_kernels as _ck
except ImportError:  # the extension is optional: plain-torch ops remain
    _ck = None

__all__ = ["available", "isa", "set_isa", "ensure_threads", "PACKED_TYPES", "packed_bytes", "repack",
           "matmul", "dequant_rows", "paged_attention", "rope_write_kv", "add_rms_norm", "silu_and_mul",
           "SPIN_US", "BLOCK_VALUES"]

PACKED_TYPES = {2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 12: "Q4_K", 14: "Q6_K"}  # ggml type id -> name
BLOCK_VALUES = {2: 32, 3: 32, 8: 32, 12: 256, 14: 256}     # values of one GGUF block
BLOCK_BYTES = {2: 18, 3: 20, 8: 34, 12: 144, 14: 210}      # bytes of one GGUF block
_TILE_BYTES = {2: 288, 3: 320, 8: 544, 12: 2368, 14: 3360}  # one 16-row x one-block tile, packed
# Idle spin before sleeping: covers the gap between two kernels of a decode step (tens of us)
# but not the gap between steps of an idle server. Measured in docs/performance.md.
SPIN_US = int(os.environ.get("MINDIE_CPU_SPIN_US", "200"))
_F32, _U8 = torch.float32, torch.uint8


def available() -> bool:
    return _ck is not None


def isa() -> str:
    return _ck.isa() if _ck is not None else "none"


def set_isa(name: str) -> None:
    """Forces an instruction set ("avx512", "avx2", "portable" or "auto"); tests compare them."""
    _ck.set_isa(name)


def ensure_threads(n: int | None = None) -> int:
    n = n or torch.get_num_threads()
    if _ck.num_threads() != n:
        _ck.set_threads(n, SPIN_US)
    return n


def _check_type(ggml_type: int, k: int) -> None:
    if ggml_type not in PACKED_TYPES:
        raise ValueError(f"ggml type {ggml_type} has no packed kernel (supported: "
                         f"{', '.join(PACKED_TYPES.values())})")
    qk = BLOCK_VALUES[ggml_type]
    if k % qk:
        raise ValueError(f"in_features {k} is not a multiple of the {qk}-value "
                         f"{PACKED_TYPES[ggml_type]} GGUF block")


def packed_bytes(ggml_type: int, n: int, k: int) -> int:
    _check_type(ggml_type, k)
    return (n + 15) // 16 * (k // BLOCK_VALUES[ggml_type]) * _TILE_BYTES[ggml_type]


def repack(raw: torch.Tensor, ggml_type: int, n: int, k: int) -> torch.Tensor:
    """raw[n, k/qk * block_bytes] uint8 (GGUF blocks of qk values, row-major) -> packed uint8
    [packed_bytes]. A block whose scale (or Q4_1 / Q4_K minimum) is not finite raises ValueError
    naming its row and block."""
    _check_type(ggml_type, k)
    nkb = k // BLOCK_VALUES[ggml_type]
    if raw.dtype != torch.uint8 or tuple(raw.shape) != (n, nkb * BLOCK_BYTES[ggml_type]):
        raise ValueError(f"GGUF blocks: expected uint8 [{n}, {nkb * BLOCK_BYTES[ggml_type]}], got "
                         f"{raw.dtype} {list(raw.shape)}")
    raw = raw.contiguous()
    out = torch.empty(packed_bytes(ggml_type, n, k), dtype=torch.uint8)
    bad = _ck.pack(raw.data_ptr(), ggml_type, n, k, out.data_ptr())
    if bad >= 0:
        raise ValueError(f"malformed {PACKED_TYPES[ggml_type]} block: row {bad // nkb}, block {bad % nkb} "
                         "has a non-finite scale")
    return out


def _check_packed(packed: torch.Tensor, ggml_type: int, n: int, k: int) -> None:
    bt, qk = _TILE_BYTES.get(ggml_type), BLOCK_VALUES.get(ggml_type, 32)
    if (bt is not None and k % qk == 0 and packed.dtype == torch.uint8 and packed.is_contiguous()
            and packed.numel() == (n + 15) // 16 * (k // qk) * bt):
        return
    if packed.dtype != torch.uint8 or not packed.is_contiguous() or packed.numel() != packed_bytes(ggml_type, n, k):
        raise ValueError(f"packed weight: expected {packed_bytes(ggml_type, n, k)} contiguous uint8 bytes for "
                         f"{PACKED_TYPES.get(ggml_type, ggml_type)} [{n}, {k}], got {packed.dtype} "
                         f"{packed.numel()}")


def matmul(x: torch.Tensor, packed: torch.Tensor, ggml_type: int, n: int, k: int) -> torch.Tensor:
    """x[T, K] float32 -> x @ W^T [T, N] float32, W the packed GGUF weight [N, K]."""
    bt = _TILE_BYTES.get(ggml_type)  # the common case checked inline (a decode step has ~120 calls)
    if not (bt is not None and packed.dtype is _U8 and packed.is_contiguous()
            and packed.numel() == (n + 15) // 16 * (k // BLOCK_VALUES[ggml_type]) * bt
            and k % BLOCK_VALUES[ggml_type] == 0):
        _check_packed(packed, ggml_type, n, k)
    if x.dtype is not _F32 or x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"gguf matmul: x must be float32 [T, {k}], got {x.dtype} {list(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    t = x.shape[0]
    y = torch.empty(t, n, dtype=_F32)
    if t:
        if _ck.num_threads() != torch.get_num_threads():
            ensure_threads()
        _ck.gemm(x.data_ptr(), t, x.stride(0), packed.data_ptr(), ggml_type, n, k, y.data_ptr(), n)
    return y


def dequant_rows(ids: torch.Tensor, packed: torch.Tensor, ggml_type: int, n: int, k: int) -> torch.Tensor:
    """Rows ``ids[T]`` of the packed weight, dequantized: [T, K] float32 (an embedding lookup)."""
    _check_packed(packed, ggml_type, n, k)
    ids = ids.reshape(-1).to(torch.int64).contiguous()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise IndexError(f"token id out of range [0, {n})")
    out = torch.empty(ids.numel(), k, dtype=torch.float32)
    _ck.dequant_rows(packed.data_ptr(), ggml_type, n, k, ids.data_ptr(), ids.numel(), out.data_ptr())
    return out


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                    token_req: torch.Tensor, token_len: torch.Tensor, scale: float,
                    window: int | None) -> torch.Tensor:
    """q[T, Hq, D] float32, kv_cache[2, N, Bs, Hk, D] float32 contiguous, block_tables[B, W] int32
    (unit column stride), token_req[T] / token_len[T] int32 contiguous: token i attends positions
    [0, token_len[i]) (the last ``window`` of them) of request token_req[i] -> [T, Hq, D].
    Out-of-range requests, lengths or block ids raise IndexError (checked in C++ first)."""
    t, hq, d = q.shape
    _, nblocks, bs, hk, _ = kv_cache.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    ensure_threads()
    bad = _ck.paged_attention(q.data_ptr(), kv_cache.data_ptr(), block_tables.data_ptr(), block_tables.stride(0),
                              block_tables.shape[0], token_req.data_ptr(), token_len.data_ptr(), out.data_ptr(), t,
                              nblocks, bs, hq, hk, d, float(scale), int(window or 0))
    if bad >= 0:
        raise IndexError(f"paged attention: token {bad} has an out-of-range request, length or block id")
    return out


def rope_write_kv(qkv: torch.Tensor, t: int, hq: int, hk: int, d: int, positions: torch.Tensor,
                  cos_sin_cache: torch.Tensor, is_neox: bool, kv_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """qkv: a float32 [T, (Hq + 2 Hk) * D] view with unit column stride; rotates q and k in place
    and writes k, v to ``kv_cache`` at ``slot_mapping`` (int64; negative = skip). An out-of-range
    slot or position raises IndexError before anything is written (checked in C++)."""
    _, nblocks, bs, _, _ = kv_cache.shape
    bad = _ck.rope_write_kv(qkv.data_ptr(), t, qkv.stride(0), positions.data_ptr(), cos_sin_cache.data_ptr(),
                            cos_sin_cache.shape[-1], bool(is_neox), hq, hk, d, kv_cache.data_ptr(), nblocks * bs,
                            slot_mapping.data_ptr(), cos_sin_cache.shape[0])
    if bad >= 0:
        raise IndexError(f"rotary/KV write: token {bad} has an out-of-range slot or position")


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x[T, 2I] float32 with unit column stride (gate | up) -> silu(gate) * up, [T, I] float32."""
    t, two_i = x.shape
    out = torch.empty(t, two_i // 2, dtype=torch.float32)
    if t:
        ensure_threads()
        _ck.silu_and_mul(x.data_ptr(), t, two_i // 2, x.stride(0), out.data_ptr())
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual) for float32 contiguous [T, H]."""
    t, h = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    _ck.add_rms_norm(x.data_ptr(), residual.data_ptr() if residual is not None else 0, weight.data_ptr(),
                     float(eps), t, h, out.data_ptr(), res_out.data_ptr())
    return out, res_out
