# SPDX-License-Identifier: Apache-2.0
"""W4A16: group-wise 4-bit weights with zero points (group 32, 64 or 128), float activations,
from AWQ and GPTQ checkpoints (the published tensor layouts, below), or from a float checkpoint
quantized at load (min-max round-to-nearest, ``model.quantization=w4a16``).

Checkpoint layouts (W[N, K] the linear's weight, G the group size, 8 codes per int32):
- AWQ (AutoAWQ GEMM): ``qweight`` int32 [K, N/8], ``qzeros`` int32 [K/G, N/8], ``scales`` fp16
  [K/G, N]; int32 j of a row holds columns 8j..8j+7 in the nibble order 0 2 4 6 1 3 5 7;
  w = (q - z) * s.
- GPTQ (AutoGPTQ / GPTQModel): ``qweight`` int32 [K/8, N] packed along K (nibble i = row 8r+i),
  ``qzeros`` int32 [K/G, N/8] packed along N with z - 1 stored (format v1; ``gptq_v2`` stores z),
  ``scales`` fp16 [K/G, N], ``g_idx`` int32 [K] (the group of each input channel; with act-order
  it is not k // G: the input columns are permuted at load and x is gathered to match).

At load everything becomes one canonical form: codes [N, K] (two per byte, ``ops/reference.py``
``w4a16_pack``), scales [N, K/G] float32, zeros [N, K/G] uint8, an optional input permutation.
The matmul: on the CPU the weight is re-expressed as GGUF Q4_1 blocks (d = s, m = -s*z in fp16,
exact apart from that rounding) and computed on by ``ops.gguf_matmul`` (the CPU kernels); on other
devices ``ops.w4a16_matmul`` on the canonical form (the Triton kernel on CUDA).
Must not import models, the engine, the loader or a backend.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mindie_llm import ops
from mindie_llm.layers.quant_base import (CheckpointLinearScheme, QuantCheckpointError, expect, set_linear,
                                          shard_rows)
from mindie_llm.ops import reference as ref

__all__ = ["AWQ_ORDER", "pack_int32", "unpack_int32", "awq_pack", "awq_unpack", "gptq_pack", "gptq_unpack",
           "quantize_w4_groupwise", "w4a16_linear", "W4A16Scheme", "AWQScheme", "GPTQScheme", "GROUP_SIZES",
           "q4_1_blocks"]

GROUP_SIZES = (32, 64, 128)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)    # nibble i of an AWQ int32 holds column 8j + AWQ_ORDER[i]


def pack_int32(codes: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """codes (0..15) packed 8 per int32 along ``dim``: nibble i of pack j = codes[8j + order[i]]."""
    c = codes.to(torch.int64).movedim(dim, -1)
    c = c.reshape(*c.shape[:-1], -1, 8)[..., list(order)]                        # [..., n/8, 8]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    v = (c << shifts).sum(dim=-1)
    v = torch.where(v >= 2 ** 31, v - 2 ** 32, v).to(torch.int32)
    return v.movedim(-1, dim).contiguous()


def unpack_int32(packed: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """The inverse of ``pack_int32``: uint8 codes, 8x longer along ``dim``."""
    v = packed.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    nib = (v.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int64)) & 0xF      # [..., n/8, 8] by nibble
    inv = [0] * 8
    for i, o in enumerate(order):
        inv[o] = i
    c = nib[..., inv].reshape(*v.shape[:-1], -1)
    return c.to(torch.uint8).movedim(-1, dim).contiguous()


def quantize_w4_groupwise(w: torch.Tensor, group_size: int, clip_search: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w[N, K] -> (codes[N, K] uint8, scales[N, K/G] float32, zeros[N, K/G] uint8): asymmetric min-max
    round-to-nearest per group, w ~= (codes - zeros) * scales. With ``clip_search`` each group's
    range is shrunk by the factor (1.0, 0.95, ..., 0.6) that minimizes its squared error."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo0, hi0 = g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0)
    best = None
    for r in ((1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6) if clip_search else (1.0,)):
        lo, hi = lo0 * r, hi0 * r
        scales = ((hi - lo) / 15).clamp(min=1e-8)                                  # [N, K/G]
        zeros = torch.round(-lo / scales).clamp(0, 15)
        codes = torch.round(g / scales[..., None] + zeros[..., None]).clamp(0, 15)
        err = ((codes - zeros[..., None]) * scales[..., None] - g).pow(2).sum(dim=-1)   # [N, K/G]
        if best is None:
            best = [err, codes, scales, zeros]
        else:
            better = err < best[0]
            best[0] = torch.where(better, err, best[0])
            best[1] = torch.where(better[..., None], codes, best[1])
            best[2] = torch.where(better, scales, best[2])
            best[3] = torch.where(better, zeros, best[3])
    _, codes, scales, zeros = best
    return codes.reshape(n, k).to(torch.uint8), scales, zeros.to(torch.uint8)


def awq_pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """Canonical (codes[N, K], scales/zeros[N, K/G]) -> the AWQ GEMM tensors."""
    return {"qweight": pack_int32(codes.t(), 1, AWQ_ORDER), "qzeros": pack_int32(zeros.t(), 1, AWQ_ORDER),
            "scales": scales.t().to(torch.float16).contiguous()}


def awq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWQ tensors -> canonical (codes[N, K], scales[N, K/G] float32, zeros[N, K/G])."""
    return (unpack_int32(qweight, 1, AWQ_ORDER).t().contiguous(), scales.float().t().contiguous(),
            unpack_int32(qzeros, 1, AWQ_ORDER).t().contiguous())


def gptq_pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor | None = None,
              v2: bool = False) -> dict[str, torch.Tensor]:
    """Canonical -> GPTQ tensors. ``codes``[N, K] are in the checkpoint's input order; ``g_idx``[K]
    (default k // G) names each input channel's group; zeros are stored minus one unless ``v2``."""
    n, k = codes.shape
    g = k // scales.shape[1]
    if g_idx is None:
        g_idx = torch.arange(k, dtype=torch.int32) // g
    stored = zeros.to(torch.int64) - (0 if v2 else 1)
    return {"qweight": pack_int32(codes.t(), 0), "qzeros": pack_int32(stored.t() & 0xF, 1),
            "scales": scales.t().to(torch.float16).contiguous(), "g_idx": g_idx.to(torch.int32)}


def gptq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, v2: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ tensors -> (codes[N, K] in input order, scales[N, K/G] float32, zeros[N, K/G])."""
    zeros = unpack_int32(qzeros, 1).t().to(torch.int16) + (0 if v2 else 1)
    return unpack_int32(qweight, 0).t().contiguous(), scales.float().t().contiguous(), zeros.to(torch.uint8)


def q4_1_blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Canonical form -> GGUF Q4_1 raw blocks [N, K/32 * 20] uint8 (d = s, m = -s*z, fp16)."""
    n, k = codes.shape
    rep = group_size // 32
    d = scales.repeat_interleave(rep, dim=1).to(torch.float16)                      # [N, K/32]
    m = (-scales * zeros.float()).repeat_interleave(rep, dim=1).to(torch.float16)
    c = codes.reshape(n, k // 32, 2, 16)
    qs = c[:, :, 0] | (c[:, :, 1] << 4)                                             # [N, K/32, 16]
    raw = torch.cat((d.unsqueeze(-1).view(torch.uint8), m.unsqueeze(-1).view(torch.uint8), qs), dim=-1)
    return raw.reshape(n, -1).contiguous()


def w4a16_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y[T, N] = x[T, K] @ W^T (+ bias), W the layer's 4-bit weight; in x's dtype."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])                        # [T, K]
    if layer.w4_perm is not None:
        x2 = x2.index_select(1, layer.w4_perm)
    if layer.gguf_packed is not None:
        y = ops.gguf_matmul(x2, layer.gguf_packed, 3, layer.out_features, layer.in_features)
    else:
        y = ops.w4a16_matmul(x2, layer.w4_qweight, layer.w4_scales, layer.w4_zeros, layer.w4_group)
    if layer.bias is not None:
        y = y + layer.bias
    y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def _install(module: nn.Module, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
             perm: torch.Tensor | None) -> None:
    dev = getattr(module, "_quant_device", None) or codes.device
    n, k = codes.shape
    if dev.type == "cpu":
        packed = ops.gguf_repack(q4_1_blocks(codes, scales, zeros, group), 3, n, k)
        set_linear(module, w4a16_linear, gguf_packed=packed)
        module.w4_qweight = module.w4_scales = module.w4_zeros = None
    else:
        set_linear(module, w4a16_linear, w4_qweight=ref.w4a16_pack(codes).to(dev),
                   w4_scales=scales.float().to(dev).contiguous(), w4_zeros=zeros.to(dev).contiguous())
        module.gguf_packed = None
    module.w4_group = group
    module.w4_perm = None if perm is None else perm.to(dev)


class W4A16Scheme(CheckpointLinearScheme):
    """Group-wise 4-bit weights. ``fmt`` = "awq" or "gptq" (checkpoint tensors) or None (a float
    checkpoint quantized at load with ``group_size``)."""

    name = "w4a16"

    def __init__(self, fmt: str | None = None, group_size: int = 128, from_float: bool = False,
                 gptq_v2: bool = False, **kw: Any):
        if group_size not in GROUP_SIZES:
            raise ValueError(f"quantization_config.group_size: {group_size} is not supported "
                             f"(one of {', '.join(map(str, GROUP_SIZES))})")
        super().__init__(from_float=from_float or fmt is None, **kw)
        self.fmt, self.group_size, self.gptq_v2 = fmt, group_size, gptq_v2
        self.tensor_names = ("qweight", "qzeros", "scales")
        self.optional_names = ("g_idx",) if fmt == "gptq" else ()

    def build(self, module: nn.Module, shards: dict[Any, tuple[str, dict[str, torch.Tensor]]]) -> None:
        k, g = module.in_features, self.group_size
        if k % g:
            raise QuantCheckpointError(f"{next(iter(shards.values()))[0]}.qweight: in_features {k} is not a "
                                       f"multiple of group_size {g}")
        parts, perms = [], []
        for sid, (base, t) in shards.items():
            n = shard_rows(module, sid)
            if n % 8:
                raise QuantCheckpointError(f"{base}.qweight: out_features {n} is not a multiple of 8")
            i32 = (torch.int32,)
            expect(f"{base}.qzeros", t["qzeros"], (k // g, n // 8), i32)
            expect(f"{base}.scales", t["scales"], (k // g, n), (torch.float16, torch.bfloat16, torch.float32))
            if not bool(torch.isfinite(t["scales"].float()).all()):
                raise QuantCheckpointError(f"{base}.scales: not finite")
            if self.fmt == "awq":
                expect(f"{base}.qweight", t["qweight"], (k, n // 8), i32)
                codes, scales, zeros = awq_unpack(t["qweight"], t["qzeros"], t["scales"])
                perm = None
            else:
                expect(f"{base}.qweight", t["qweight"], (k // 8, n), i32)
                codes, scales, zeros = gptq_unpack(t["qweight"], t["qzeros"], t["scales"], self.gptq_v2)
                perm = self._perm(base, t.get("g_idx"), k, g)
                if perm is not None:
                    codes = codes.index_select(1, perm)
            parts.append((codes, scales, zeros))
            perms.append((base, perm))
        if any(p is not None for _, p in perms) and any(
                p is None or not torch.equal(p, perms[0][1]) for _, p in perms):
            raise QuantCheckpointError(f"{perms[0][0]}.g_idx: fused shards (q/k/v, gate/up) must share one "
                                       "act-order permutation")
        _install(module, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                 torch.cat([p[2] for p in parts]), g, perms[0][1])

    @staticmethod
    def _perm(base: str, g_idx: torch.Tensor | None, k: int, g: int) -> torch.Tensor | None:
        if g_idx is None:
            return None
        expect(f"{base}.g_idx", g_idx, (k,), (torch.int32, torch.int64))
        g_idx = g_idx.long()
        if torch.equal(g_idx, torch.arange(k) // g):
            return None
        counts = torch.bincount(g_idx, minlength=k // g) if int(g_idx.min()) >= 0 else None
        if counts is None or counts.numel() != k // g or bool((counts != g).any()):
            raise QuantCheckpointError(f"{base}.g_idx: every group must hold exactly group_size={g} channels")
        return torch.sort(g_idx, stable=True).indices

    def quantize_dense(self, module: nn.Module) -> None:
        w = module.weight.data
        if w.shape[1] % self.group_size:
            raise ValueError(f"model.quantization=w4a16: in_features {w.shape[1]} is not a multiple of "
                             f"group_size {self.group_size}")
        codes, scales, zeros = quantize_w4_groupwise(w, self.group_size)    # on the weight's device
        module._quant_device = w.device
        _install(module, codes, scales, zeros, self.group_size, None)


class AWQScheme(W4A16Scheme):
    name = "awq"

    def __init__(self, group_size: int = 128, **kw: Any):
        super().__init__("awq", group_size, **kw)


class GPTQScheme(W4A16Scheme):
    name = "gptq"

    def __init__(self, group_size: int = 128, **kw: Any):
        super().__init__("gptq", group_size, **kw)
