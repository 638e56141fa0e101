# SPDX-License-Identifier: Apache-2.0
"""Greedy sampling on the GPU: a two-pass argmax over the vocabulary (many programs per row, then
one per row), the first index of the maximum as ``torch.argmax``. A single-row argmax of a 128k
vocabulary in torch runs on one block (about 30 us on an H100); this spreads it over the chip.

The other sampling ops (temperature, min-p, top-k/top-p, penalties, seeded draws) are the
vectorized torch of ``ops/sampling.py``, which runs on the GPU without host synchronisation.
Imports triton and torch only; must not import models, layers or executor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["argmax"]

_CHUNK = 4096


@triton.jit
def _argmax_partial_kernel(x_ptr, val_ptr, idx_ptr, V, stride_x, NUM_CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    i = tl.min(tl.where(x == m, offs, 2147483647), axis=0)                     # first index of the max
    tl.store(val_ptr + row * NUM_CHUNKS + chunk, m)
    tl.store(idx_ptr + row * NUM_CHUNKS + chunk, i)


@triton.jit
def _argmax_final_kernel(val_ptr, idx_ptr, out_ptr, NUM_CHUNKS: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < NUM_CHUNKS
    v = tl.load(val_ptr + row * NUM_CHUNKS + offs, mask=mask, other=float("-inf"))
    i = tl.load(idx_ptr + row * NUM_CHUNKS + offs, mask=mask, other=2147483647)
    m = tl.max(v, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(v == m, i, 2147483647), axis=0).to(tl.int64))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits[S, V]`` -> ``[S]`` int64, the first index of each row's maximum."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [S, V]; got {tuple(logits.shape)}")
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    S, V = x.shape
    out = torch.empty(S, dtype=torch.int64, device=x.device)
    if S == 0:
        return out
    chunks = triton.cdiv(V, _CHUNK)
    vals = torch.empty((S, chunks), dtype=torch.float32, device=x.device)
    idxs = torch.empty((S, chunks), dtype=torch.int32, device=x.device)
    _argmax_partial_kernel[(S, chunks)](x, vals, idxs, V, x.stride(0), NUM_CHUNKS=chunks, BLOCK=_CHUNK, num_warps=8)
    _argmax_final_kernel[(S,)](vals, idxs, out, NUM_CHUNKS=chunks, BLOCK_C=triton.next_power_of_2(chunks),
                               num_warps=1)
    return out
