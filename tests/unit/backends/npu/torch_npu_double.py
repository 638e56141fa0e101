# SPDX-License-Identifier: Apache-2.0
"""A CPU test double of torch_npu: ``install()`` puts a module named ``torch_npu`` into
``sys.modules`` (and ``torch.npu``) whose functions

1. bind every call against the schema of the pinned wheel (npu_signatures.SCHEMAS): unknown or
   missing argument names and wrong argument types fail as they would against the real op;
2. check the dtypes, layouts and shape constraints the torch_npu docs give for the way the
   backend uses the op (each check names its source; features the backend does not use, such as
   quantized attention or NZ caches, are refused as "not emulated" rather than guessed);
3. compute the result with ``mindie_llm.ops.reference`` (the project's oracle), on the CPU.

Every call is recorded in ``Double.calls`` (name, bound arguments) so tests can assert which
torch_npu functions a code path reached. A violated rule raises ``DoubleCallError``
(an AssertionError, so a wrong call fails any test). The module marks itself with
``__mindie_cpu_double__ = True``: the NPU platform then places tensors on the CPU.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import torch

from mindie_llm.ops import reference
from npu_graph_double import GraphEmulation
from npu_signatures import ATB, DOCS, META, SCHEMAS

__all__ = ["DoubleCallError", "Double", "install", "uninstall"]

FLOAT_NPU = (torch.float16, torch.bfloat16)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
VLLM_ASCEND = "vllm-ascend call site (reference/ascend.md)"


class DoubleCallError(AssertionError):
    """A call the real torch_npu would reject (or that this double does not emulate)."""


def need(cond: bool, op: str, rule: str, source: str) -> None:
    if not cond:
        raise DoubleCallError(f"torch_npu.{op}: {rule} [{source}]")


def _check_type(op: str, name: str, typ: str, value: Any) -> None:
    optional = typ.endswith("?")
    base = typ.rstrip("?")
    if value is None:
        need(optional, op, f"{name} ({typ}) is required, got None", SCHEMAS[op].source)
        return
    ok = {"Tensor": lambda v: isinstance(v, torch.Tensor),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "str": lambda v: isinstance(v, str),
          "bool": lambda v: isinstance(v, bool),
          "SymInt[]": lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool)
                                                                      for x in v),
          "ScalarType": lambda v: isinstance(v, torch.dtype)}.get(base)
    need(ok is not None and ok(value), op, f"{name} must be {typ}, got {type(value).__name__}", SCHEMAS[op].source)


def _t(*shape_dtype: Any) -> str:
    return ", ".join(str(x) for x in shape_dtype)


# ------------------------------------------------------------------------------------------- ops
def _rstd(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    # META: rstd keeps the leading x.dim() - gamma.dim() dims, 1 elsewhere, float32
    keep = x.dim() - gamma.dim()
    dims = tuple(range(keep, x.dim()))
    return torch.rsqrt(x.float().pow(2).mean(dim=dims, keepdim=True) + eps)


def npu_rms_norm(a: dict) -> Any:
    x, g = a["self"], a["gamma"]
    need(x.dtype in FLOATS and 2 <= x.dim() <= 8, "npu_rms_norm", "self: float16/bfloat16/float32, 2-8 dims", DOCS)
    need(g.dtype == x.dtype, "npu_rms_norm", "gamma: same dtype as self", DOCS)
    need(tuple(g.shape) == tuple(x.shape[x.dim() - g.dim():]), "npu_rms_norm", "gamma: the trailing dims of self",
         DOCS)
    return reference.rms_norm(x, g, a["epsilon"]), _rstd(x, g, a["epsilon"])


def npu_add_rms_norm(a: dict) -> Any:
    x1, x2, g = a["x1"], a["x2"], a["gamma"]
    need(x1.shape == x2.shape and x1.dtype == x2.dtype, "npu_add_rms_norm", "x1, x2: same shape and dtype", META)
    need(x1.dtype in FLOATS and g.dtype == x1.dtype, "npu_add_rms_norm", "float dtypes, gamma like x1", META)
    need(tuple(g.shape) == tuple(x1.shape[x1.dim() - g.dim():]), "npu_add_rms_norm", "gamma: trailing dims of x1",
         META)
    y, x = reference.fused_add_rms_norm(x1, x2, g, a["epsilon"])
    return y, _rstd(x, g, a["epsilon"]), x


def _rotary_embedding(a: dict) -> None:
    op = "_npu_rotary_embedding"
    pos, q, k, d, cs = a["positions"], a["query"], a["key"], a["head_size"], a["cos_sin_cache"]
    need(pos.dim() == 1 and pos.dtype in (torch.int32, torch.int64), op, "positions: 1-D int32/int64 [T]", VLLM_ASCEND)
    need(q.dim() == 2 and k.dim() == 2 and q.shape[0] == k.shape[0] == pos.shape[0], op,
         f"query [T, Hq*D], key [T, Hk*D] with T = len(positions); got {_t(tuple(q.shape), tuple(k.shape))}",
         VLLM_ASCEND)
    need(q.is_contiguous() and k.is_contiguous(), op, "query, key: contiguous (rotated in place)", VLLM_ASCEND)
    need(q.dtype in FLOAT_NPU and k.dtype == q.dtype, op, f"query, key: float16/bfloat16; got {q.dtype}", VLLM_ASCEND)
    need(d > 0 and q.shape[1] % d == 0 and k.shape[1] % d == 0, op, "head_size divides the query/key widths", ATB)
    need(cs.dim() == 2 and cs.shape[1] % 2 == 0 and cs.shape[1] <= d, op, "cos_sin_cache [max_pos, rot <= head_size]",
         VLLM_ASCEND)
    need(cs.dtype == q.dtype, op, f"cos_sin_cache in the query's dtype; got {cs.dtype}", VLLM_ASCEND)
    need(pos.numel() == 0 or (int(pos.min()) >= 0 and int(pos.max()) < cs.shape[0]), op,
         "positions within cos_sin_cache", ATB)
    rq, rk = reference.rotary_embedding(pos, q, k, d, cs.float(), a["is_neox_style"])
    q.copy_(rq)
    k.copy_(rk)


def _check_slots(op: str, slots: torch.Tensor, n: int, dtypes: tuple, block_size: int) -> None:
    need(slots.dim() == 1 and slots.dtype in dtypes, op, f"slot mapping: 1-D {dtypes}", DOCS)
    if slots.numel():
        need(int(slots.min()) >= 0 and int(slots.max()) < n, op,
             f"slot_mapping values in [0, num_blocks*block_size-1] = [0, {n - 1}]", DOCS)
        real = slots[slots >= block_size]   # block 0 (the null block) may take several padding rows
        need(real.unique().numel() == real.numel(), op, "slot_mapping values must not repeat", DOCS)


def _scatter(key: torch.Tensor, value: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor) -> None:
    n, bs = kc.shape[0], kc.shape[1]
    kc.view(n * bs, *kc.shape[2:]).index_copy_(0, slots.long(), key)
    vc.view(n * bs, *vc.shape[2:]).index_copy_(0, slots.long(), value)


def npu_scatter_pa_kv_cache(a: dict) -> None:
    op = "npu_scatter_pa_kv_cache"
    key, value, kc, vc, slots = a["key"], a["value"], a["key_cache"], a["value_cache"], a["slot_mapping"]
    need(all(t.is_contiguous() for t in (key, value, kc, vc, slots)), op, "inputs must be contiguous", DOCS)
    need(key.dtype == value.dtype == kc.dtype == vc.dtype, op, "key, value, key_cache, value_cache: one dtype", DOCS)
    need(a["compress_lens"] is None and a["compress_seq_offsets"] is None and a["seq_lens"] is None, op,
         "the compress scenario (3) is not emulated", DOCS)
    need(key.dim() == 3 and value.dim() == 3 and key.shape[:2] == value.shape[:2], op,
         "key [T, H, Dk], value [T, H, Dv]: same first two dims", DOCS)
    need(kc.dim() == 4 and vc.dim() == 4, op, "key_cache, value_cache: 4-D", DOCS)
    mode = a["cache_mode"]
    need(mode in (None, "Norm"), op, f"cache_mode {mode!r} expects NZ caches [N, H*D/16, Bs, 16]; this backend keeps "
         "ND caches [N, Bs, H, D] (cache_mode='Norm')", DOCS)
    t, h, dk = key.shape
    need(kc.shape[2:] == (h, dk) and vc.shape[2:] == (h, value.shape[2]) and kc.shape[:2] == vc.shape[:2], op,
         f"scenario 2: key_cache [N, Bs, {h}, {dk}]; got {tuple(kc.shape)}", DOCS)
    need(slots.shape[0] == t, op, "slot_mapping [T]", DOCS)
    _check_slots(op, slots, kc.shape[0] * kc.shape[1], (torch.int32, torch.int64), kc.shape[1])
    _scatter(key, value, kc, vc, slots)


def _reshape_and_cache(a: dict) -> None:
    op = "_npu_reshape_and_cache"
    key, value, kc, vc, slots = a["key"], a["value"], a["key_cache"], a["value_cache"], a["slot_indices"]
    need(key.dim() == 3 and kc.dim() == 4 and kc.shape[2:] == key.shape[1:] and vc.shape == kc.shape, op,
         "key/value [T, H, D], caches [N, Bs, H, D]", VLLM_ASCEND)
    need(key.dtype == value.dtype == kc.dtype == vc.dtype, op, "one dtype", VLLM_ASCEND)
    _check_slots(op, slots, kc.shape[0] * kc.shape[1], (torch.int32,), kc.shape[1])
    _scatter(key, value, kc, vc, slots)


def _paged_attention(a: dict) -> None:
    op = "_npu_paged_attention"
    q, kc, vc, out = a["query"], a["key_cache"], a["value_cache"], a["out"]
    bt, lens = a["block_table"], a["context_lens"]
    need(q.dim() == 3 and q.dtype in FLOAT_NPU and q.is_contiguous(), op,
         f"query [B, Hq, D] float16/bfloat16 contiguous; got {tuple(q.shape)} {q.dtype}", VLLM_ASCEND)
    need(kc.dim() == 4 and kc.shape == vc.shape and kc.dtype == vc.dtype == q.dtype, op,
         "key_cache, value_cache [N, Bs, Hk, D] in the query's dtype", VLLM_ASCEND)
    need(kc.shape[1] == 128, op, f"block size 128 (get_supported_kernel_block_sizes); got {kc.shape[1]}", VLLM_ASCEND)
    need(a["num_heads"] == q.shape[1] and a["num_kv_heads"] == kc.shape[2] and q.shape[1] % kc.shape[2] == 0, op,
         "num_heads / num_kv_heads match the query and cache heads", ATB)
    need(kc.shape[3] == q.shape[2], op, "head dims of query and cache agree", ATB)
    need(bt.dim() == 2 and bt.dtype == torch.int32 and bt.shape[0] == q.shape[0], op, "block_table [B, W] int32",
         VLLM_ASCEND)
    need(lens.dim() == 1 and lens.dtype == torch.int32 and lens.shape[0] == q.shape[0], op, "context_lens [B] int32",
         VLLM_ASCEND)
    need(int(lens.min()) >= 1 and int(lens.max()) <= bt.shape[1] * kc.shape[1], op,
         "context_lens in [1, W * block_size]", ATB)
    need(out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous(), op, "out like query", ATB)
    b = q.shape[0]
    md = SimpleNamespace(query_start_loc=torch.arange(b + 1, dtype=torch.int32), seq_lens=lens, block_tables=bt)
    out.copy_(reference.paged_attention(q, torch.stack((kc, vc)), md, a["scale_value"]))


_FIA_UNEMULATED = ("pse_shift", "dequant_scale1", "quant_scale1", "dequant_scale2", "quant_scale2", "quant_offset2",
                   "antiquant_scale", "antiquant_offset", "query_padding_size", "kv_padding_size",
                   "key_antiquant_scale", "key_antiquant_offset", "value_antiquant_scale", "value_antiquant_offset",
                   "key_shared_prefix", "value_shared_prefix", "actual_shared_prefix_len", "query_rope", "key_rope",
                   "key_rope_antiquant_scale")


def npu_fused_infer_attention_score(a: dict) -> Any:
    op = "npu_fused_infer_attention_score"
    q, k, v, bt = a["query"], a["key"], a["value"], a["block_table"]
    for name in _FIA_UNEMULATED:
        need(a[name] is None, op, f"{name} (quantization / prefix / padding / MLA) is not emulated", DOCS)
    need(a["input_layout"] == "TND", op, f"the backend uses input_layout='TND'; got {a['input_layout']!r}", DOCS)
    need(q.dim() == 3 and q.dtype in FLOAT_NPU and q.is_contiguous(), op,
         f"query [T, N, D] float16/bfloat16, contiguous; got {tuple(q.shape)} {q.dtype}", DOCS)
    t, n, d = q.shape
    need(d % 16 == 0, op, "D must be 16-aligned for float16/bfloat16", DOCS)
    need(bt is not None, op, "page attention (block_table) is the only emulated KV form", DOCS)
    need(k.dim() == 3 and k.shape == v.shape and k.dtype == v.dtype == q.dtype, op,
         "page attention: key, value (blocknum, blocksize, H) in the query's dtype", DOCS)
    bs = a["block_size"]
    need(bs == k.shape[1] and bs % 128 == 0 and 128 <= bs <= 512, op,
         f"page attention: block_size a multiple of 128 in [128, 512] equal to the cache's; got {bs}", DOCS)
    kvn = a["num_key_value_heads"]
    need(a["num_heads"] == n and kvn > 0 and n % kvn == 0 and n // kvn <= 64, op,
         "num_heads = N; num_key_value_heads divides it, ratio <= 64", DOCS)
    need(k.shape[2] == kvn * d and kvn * d <= 65535, op, "cache H = num_key_value_heads * D <= 65535", DOCS)
    qs, kvs = a["actual_seq_lengths"], a["actual_seq_lengths_kv"]
    need(qs is not None and kvs is not None, op, "TND / page attention: actual_seq_lengths(_kv) must be passed", DOCS)
    need(all(x <= y for x, y in zip([0] + list(qs), qs)) and (qs[-1] if qs else 0) == t, op,
         "TND: actual_seq_lengths is the non-decreasing cumulative query length, ending at T", DOCS)
    nb = len(qs)
    need(len(kvs) == nb and all(x >= 0 for x in kvs), op, "page attention: actual_seq_lengths_kv per batch", DOCS)
    need(bt.dim() == 2 and bt.dtype == torch.int32 and bt.shape[0] == nb, op, "block_table [B, W] int32", DOCS)
    need(bt.shape[1] * bs >= max(kvs, default=0), op, "block_table: at least maxBlockNumPerSeq columns", DOCS)
    q_lens = [y - x for x, y in zip([0] + list(qs), qs)]
    need(all(ql <= kl for ql, kl in zip(q_lens, kvs)), op, "each batch's query length <= its KV length", DOCS)
    mode, mask = a["sparse_mode"], a["atten_mask"]
    need(mode == 3, op, f"the backend uses sparse_mode=3 (rightDownCausal); got {mode}", DOCS)
    need(mask is not None and tuple(mask.shape) == (2048, 2048) and mask.dtype in (torch.bool, torch.int8, torch.uint8),
         op, "sparse_mode 3: atten_mask (2048, 2048) bool/int8/uint8", DOCS)
    need(bool((mask.bool() == torch.ones(2048, 2048, dtype=torch.bool).triu(1)).all()), op,
         "sparse_mode 3: the optimized causal mask (1 above the diagonal)", DOCS)
    need(not a["softmax_lse_flag"], op, "softmax_lse output is not emulated", DOCS)
    nblk = k.shape[0]
    kc = k.view(nblk, bs, kvn, d)
    md = SimpleNamespace(query_start_loc=torch.tensor([0] + list(qs), dtype=torch.int32),
                         seq_lens=torch.tensor(kvs, dtype=torch.int32), block_tables=bt)
    out = reference.paged_attention(q, torch.stack((kc, v.view(nblk, bs, kvn, d))), md, a["scale"])
    return out, torch.zeros(1, dtype=torch.float32)


def npu_swiglu(a: dict) -> torch.Tensor:
    x, dim = a["self"], a["dim"]
    need(1 <= x.dim() <= 8 and x.dtype in FLOATS, "npu_swiglu", "self: 1-8 dims, float32/float16/bfloat16", DOCS)
    need(x.shape[dim] % 2 == 0, "npu_swiglu", "the split dim must be even", DOCS)
    return reference.silu_and_mul(x.movedim(dim, -1)).movedim(-1, dim)


def npu_quant_matmul(a: dict) -> torch.Tensor:
    op = "npu_quant_matmul"
    x1, x2, scale = a["x1"], a["x2"], a["scale"]
    need(x1.dtype == torch.int8 and x2.dtype == torch.int8, op, "x1, x2 int8 (int4-in-int32 not emulated)", DOCS)
    need(2 <= x1.dim() <= 6 and 2 <= x2.dim() <= 6 and x1.shape[-1] == x2.shape[-2], op, "2-6 dims, K agrees", DOCS)
    n = x2.shape[-1]
    need(scale.dim() == 1 and scale.shape[0] in (1, n) and scale.dtype in (torch.float32, torch.bfloat16), op,
         "scale (t,), t = 1 or n, float32/bfloat16 (int64 via npu_trans_quant_param not emulated)", DOCS)
    pts, bias, off = a["pertoken_scale"], a["bias"], a["offset"]
    need(pts is None or (pts.dtype == torch.float32 and pts.shape == (x1.shape[-2],)), op, "pertoken_scale (m,) fp32",
         DOCS)
    need(off is None or (off.dtype == torch.float32 and off.dim() == 1), op, "offset (t,) fp32", DOCS)
    need(bias is None or (bias.shape[-1] == n and bias.dtype in (torch.int32, torch.bfloat16, torch.float16,
                                                                 torch.float32)), op, "bias (n,)", DOCS)
    od = a["output_dtype"] or torch.int8
    need(od in (torch.int8, torch.float16, torch.bfloat16, torch.int32), op, f"output_dtype {od}", DOCS)
    y = (x1.double() @ x2.double()) * scale.double()
    if pts is not None:
        y = y * pts.double()[:, None]
    if bias is not None:
        y = y + bias.double()
    if off is not None:
        y = y + off.double()
    return y.round().clamp(-128, 127).to(od) if od == torch.int8 else y.to(od)


def npu_dynamic_quant(a: dict) -> Any:
    x = a["x"]
    need(x.dtype in FLOAT_NPU, "npu_dynamic_quant", "x float16/bfloat16", DOCS)
    need(a["smooth_scales"] is None and a["group_index"] is None and a["dst_type"] is None, "npu_dynamic_quant",
         "smooth / group / dst_type variants are not emulated", DOCS)
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    return torch.round(xf / scale[..., None]).clamp(-128, 127).to(torch.int8), scale


def npu_weight_quant_batchmatmul(a: dict) -> torch.Tensor:
    op = "npu_weight_quant_batchmatmul"
    x, w, s, off, bias, g = a["x"], a["weight"], a["antiquant_scale"], a["antiquant_offset"], a["bias"], \
        a["antiquant_group_size"]
    need(x.dim() == 2 and x.dtype in FLOAT_NPU, op, "x (M, K) float16/bfloat16", DOCS)
    need(w.dim() == 2 and w.dtype == torch.int8 and w.shape[0] == x.shape[1], op, "weight (K, N) int8", DOCS)
    k, n = w.shape
    need(a["quant_scale"] is None and a["quant_offset"] is None, op, "output quantization is not emulated", DOCS)
    need(s.dtype == x.dtype, op, "antiquant_scale in x's dtype (int64 form not emulated)", DOCS)
    shapes = [(1,), (1, 1), (1, n), (n,)] if g == 0 else [((k + g - 1) // g, n)]
    need(tuple(s.shape) in shapes, op, f"antiquant_scale shape {tuple(s.shape)} not in {shapes}", DOCS)
    need(g == 0 or (g % 32 == 0 and 32 <= g <= k - 1), op, "antiquant_group_size 0 or a multiple of 32 in [32, k-1]",
         DOCS)
    need(off is None or (off.dtype == s.dtype and off.shape == s.shape), op, "antiquant_offset like the scale", DOCS)
    wf = w.float() + (0 if off is None else (off.float().repeat_interleave(g, 0)[:k] if g else off.float()))
    sf = s.float().repeat_interleave(g, 0)[:k] if g else s.float()
    y = x.float() @ (wf * sf)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@dataclass
class Communicators:
    """hcom name -> (group, world size) of the fake HCCL communicators (see Double.register_hcom)."""
    groups: dict = field(default_factory=dict)


def _mm_all_reduce(double: "Double") -> Callable[[dict], torch.Tensor]:
    def npu_mm_all_reduce_base(a: dict) -> torch.Tensor:
        op = "npu_mm_all_reduce_base"
        x1, x2, bias = a["x1"], a["x2"], a["bias"]
        need(x1.dim() in (2, 3) and x1.dtype in FLOAT_NPU, op, "x1 (m, k) or (b, s, k), float16/bfloat16", DOCS)
        need(x2.dim() == 2 and x2.dtype == x1.dtype and x2.shape[0] == x1.shape[-1], op, "x2 (k, n) like x1", DOCS)
        need(a["hcom"] in double.comms.groups, op, f"hcom {a['hcom']!r} is not a communicator name", DOCS)
        need(a["reduce_op"] == "sum" and a["comm_turn"] == 0, op, "reduce_op 'sum', comm_turn 0 only", DOCS)
        need(bias is None or (bias.dim() == 1 and bias.shape[0] == x2.shape[1]), op, "bias (n,)", DOCS)
        for name in ("antiquant_scale", "antiquant_offset", "x3", "dequant_scale", "pertoken_scale",
                     "comm_quant_scale_1", "comm_quant_scale_2"):
            need(a[name] is None, op, f"{name} (quantized MC2) is not emulated", DOCS)
        y = x1.float() @ x2.float() + (0 if bias is None else bias.float())
        group, world = double.comms.groups[a["hcom"]]
        if world > 1:
            torch.distributed.all_reduce(y, group=group)
        return y.to(x1.dtype)

    return npu_mm_all_reduce_base


class _Event:
    """torch.npu.Event on the CPU: work is synchronous, so an event is complete once recorded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_IMPLS: dict[str, Callable[[dict], Any]] = {
    "npu_rms_norm": npu_rms_norm, "npu_add_rms_norm": npu_add_rms_norm, "_npu_rotary_embedding": _rotary_embedding,
    "npu_scatter_pa_kv_cache": npu_scatter_pa_kv_cache, "_npu_reshape_and_cache": _reshape_and_cache,
    "_npu_paged_attention": _paged_attention, "npu_fused_infer_attention_score": npu_fused_infer_attention_score,
    "npu_swiglu": npu_swiglu, "npu_quant_matmul": npu_quant_matmul, "npu_dynamic_quant": npu_dynamic_quant,
    "npu_weight_quant_batchmatmul": npu_weight_quant_batchmatmul,
}


# ------------------------------------------------------------------------------------ the module
class Double:
    """The installed double: the module, its call log, its fake device state."""

    def __init__(self, soc: str = "Ascend910B3", total_memory: int = 64 << 30, in_use: int = 4 << 30,
                 peak: int = 1 << 30) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.comms = Communicators()
        self.soc, self.total_memory, self.in_use, self.peak = soc, total_memory, in_use, peak
        self.graphs = GraphEmulation()
        self.module = types.ModuleType("torch_npu")
        self.module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
        self.module.__mindie_cpu_double__ = True
        self.module.__version__ = "2.13.0"
        impls = dict(_IMPLS, npu_mm_all_reduce_base=_mm_all_reduce(self))
        for name, schema in SCHEMAS.items():
            setattr(self.module, name, self._bind(name, impls[name]))
        self.module.npu = self._npu_module()
        self._saved: dict[str, Any] = {}

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def register_hcom(self, name: str, group: Any = None, world_size: int = 1) -> None:
        self.comms.groups[name] = (group, world_size)

    def _bind(self, name: str, impl: Callable[[dict], Any]) -> Callable[..., Any]:
        schema = SCHEMAS[name]

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = schema.signature.bind(*args, **kwargs)
            except TypeError as e:
                raise DoubleCallError(f"torch_npu.{name}: {e} (schema: {schema.schema}) [{schema.source}]") from None
            bound.apply_defaults()
            for pname, value in bound.arguments.items():
                _check_type(name, pname, schema.types[pname], value)
            self.calls.append((name, dict(bound.arguments)))
            return self.graphs.call(lambda **kw: impl(kw), (), dict(bound.arguments))

        call.__name__ = name
        return call

    def _npu_module(self) -> types.ModuleType:
        npu = types.ModuleType("torch_npu.npu")
        d = self
        npu.is_available = lambda: True
        npu.device_count = lambda: 1
        npu.current_device = lambda: 0
        npu.set_device = lambda i: None
        npu.synchronize = lambda *a: None
        npu.empty_cache = lambda: None
        npu.get_device_name = lambda i=0: d.soc
        npu.mem_get_info = lambda *a: (d.total_memory - d.in_use, d.total_memory)
        npu.memory_allocated = lambda *a: d.in_use
        npu.max_memory_allocated = lambda *a: d.in_use + d.peak
        npu.reset_peak_memory_stats = lambda *a: None
        npu.current_stream = lambda *a: "stream0"
        npu.Event = _Event
        self.graphs.attach(npu)
        return npu

    def install(self) -> "Double":
        # As torch_npu does on import (and vllm-ascend's CPU conftest): PrivateUse1 is named "npu",
        # so torch.device("npu") parses. Irreversible for the process, and harmless without tensors.
        if torch._C._get_privateuse1_backend_name() != "npu":
            torch.utils.rename_privateuse1_backend("npu")
        self._saved = {k: sys.modules.get(k) for k in ("torch_npu", "torch_npu.npu")}
        self._saved["torch.npu"] = getattr(torch, "npu", None)
        sys.modules["torch_npu"] = self.module
        sys.modules["torch_npu.npu"] = self.module.npu
        torch.npu = self.module.npu
        return self

    def uninstall(self) -> None:
        for k in ("torch_npu", "torch_npu.npu"):
            if self._saved.get(k) is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = self._saved[k]
        if self._saved.get("torch.npu") is None:
            if hasattr(torch, "npu"):
                del torch.npu
        else:
            torch.npu = self._saved["torch.npu"]


def install(**kwargs: Any) -> Double:
    return Double(**kwargs).install()


def uninstall(double: Double) -> None:
    double.uninstall()
