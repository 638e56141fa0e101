# SPDX-License-Identifier: Apache-2.0
"""NPU attention over the flat mixed batch: the per-step plan (``NpuAttentionPlan``, built once per
step from the model-facing metadata and shared by all layers) and the two torch_npu calls.

- Decode rows (one query token each): ``torch_npu._npu_paged_attention`` (ATB PagedAttention) over
  key/value caches [num_blocks, 128, Hk, D], int32 block tables [nd, W] and int32 context lengths
  on the host (vllm-ascend passes ``seq_lens_cpu``).
- Prefill and chunked-prefill rows: ``torch_npu.npu_fused_infer_attention_score`` with
  ``input_layout="TND"`` (query [Tp, Hq, D]), page attention (``block_table``, caches viewed as
  [num_blocks, 128, Hk*D]), ``actual_seq_lengths`` = cumulative query lengths and
  ``actual_seq_lengths_kv`` = per-request context lengths (host lists), ``sparse_mode=3``
  (right-down causal) with the 2048 x 2048 upper-triangular mask the docs require.

The attention state names follow vllm-ascend's AscendAttentionState. Sliding windows are not
mapped (refused with a ValueError). Must not import anything above ``mindie_llm.ops``: the
metadata is read by attribute (slot_mapping, query_start_loc, seq_lens, block_tables,
num_decodes, backend_state).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch

from mindie_llm.backends.npu import runtime

__all__ = ["AttentionState", "NpuAttentionPlan", "build_plan", "plan_for", "paged_attention", "decode_attention",
           "prefill_attention", "FIA_MASK_SIZE"]

FIA_MASK_SIZE = 2048   # sparse_mode 2/3/4 take a fixed (2048, 2048) mask (torch_npu docs)


class AttentionState(enum.Enum):
    DECODE_ONLY = "DecodeOnly"
    PREFILL_NO_CACHE = "PrefillNoCache"      # every request starts at position 0
    CHUNKED_PREFILL = "ChunkedPrefill"       # some prefill chunk has cached context
    MIXED = "Mixed"                          # decodes and prefill chunks in one step


@dataclass
class NpuAttentionPlan:
    state: AttentionState
    num_decodes: int
    num_prefill_tokens: int
    decode_block_tables: torch.Tensor | None      # [nd, W] int32, device
    decode_context_lens: torch.Tensor | None      # [nd] int32, host
    prefill_block_tables: torch.Tensor | None     # [np, W] int32, device
    actual_seq_lengths: list[int]                 # [np] cumulative query lengths (TND)
    actual_seq_lengths_kv: list[int]              # [np] context length of each prefill request
    attn_mask: torch.Tensor | None                # [2048, 2048] bool, True = masked


def build_plan(md: Any) -> NpuAttentionPlan:
    """Host-side index work of one step (one device-to-host copy of seq_lens / query_start_loc)."""
    nd = int(md.num_decodes)
    seq_lens = md.seq_lens.to("cpu", torch.int32, copy=True)             # [B], a host copy
    qsl = md.query_start_loc.to("cpu").tolist()                          # [B + 1]
    b = seq_lens.shape[0]
    tables = md.block_tables
    dec_tables = tables[:nd].to(torch.int32).contiguous() if nd else None
    dec_lens = seq_lens[:nd].contiguous() if nd else None
    q_lens = [qsl[i + 1] - qsl[i] for i in range(nd, b)]
    kv_lens = seq_lens[nd:].tolist()
    cum, acc = [], 0
    for n in q_lens:
        acc += n
        cum.append(acc)
    pre_tables = tables[nd:].to(torch.int32).contiguous() if b > nd else None
    mask = None
    if b > nd:
        mask = torch.ones(FIA_MASK_SIZE, FIA_MASK_SIZE, dtype=torch.bool, device=tables.device).triu_(1)
        chunked = any(kv != q for kv, q in zip(kv_lens, q_lens))
        state = AttentionState.MIXED if nd else (AttentionState.CHUNKED_PREFILL if chunked
                                                 else AttentionState.PREFILL_NO_CACHE)
    else:
        state = AttentionState.DECODE_ONLY
    return NpuAttentionPlan(state=state, num_decodes=nd, num_prefill_tokens=acc, decode_block_tables=dec_tables,
                            decode_context_lens=dec_lens, prefill_block_tables=pre_tables, actual_seq_lengths=cum,
                            actual_seq_lengths_kv=kv_lens, attn_mask=mask)


def plan_for(md: Any) -> NpuAttentionPlan:
    """The step's plan, built by the first layer and cached in ``md.backend_state``."""
    plan = md.backend_state.get("npu_plan")
    if plan is None:
        plan = md.backend_state["npu_plan"] = build_plan(md)
    return plan


def decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: Any, plan: NpuAttentionPlan,
                     scale: float, out: torch.Tensor) -> None:
    """out[:nd] = attention of the decode rows (ATB PagedAttention; a graph task group in capture)."""
    tnpu = runtime.load()
    nd, hq, hk = plan.num_decodes, query.shape[1], kv_cache.shape[3]
    kwargs = dict(query=query[:nd].contiguous(), key_cache=kv_cache[0], value_cache=kv_cache[1],
                  num_kv_heads=hk, num_heads=hq, scale_value=float(scale),
                  block_table=plan.decode_block_tables, context_lens=plan.decode_context_lens, out=out[:nd])
    tasks = attn_metadata.backend_state.get("npu_graph_tasks")
    if tasks is None:
        tnpu._npu_paged_attention(**kwargs)
    else:  # graph capture: a task group whose context lengths graph.py updates per replay
        stream = tnpu.npu.current_stream()
        tnpu.npu.graph_task_group_begin(stream)
        tnpu._npu_paged_attention(**kwargs)
        tasks.append({"handle": tnpu.npu.graph_task_group_end(stream), "kwargs": kwargs})


def prefill_attention(query: torch.Tensor, kv_cache: torch.Tensor, plan: NpuAttentionPlan, scale: float,
                      out: torch.Tensor) -> None:
    """out[nd:] = attention of the prefill / chunked rows (FIA, TND, page attention); rows past the
    last request (padding to a token bucket) are zeroed."""
    t, hq, d = query.shape
    _, n, bs, hk, _ = kv_cache.shape
    nd = plan.num_decodes
    end = nd + plan.num_prefill_tokens
    if end > nd:
        o, _lse = runtime.load().npu_fused_infer_attention_score(
            query[nd:end].contiguous(), kv_cache[0].view(n, bs, hk * d), kv_cache[1].view(n, bs, hk * d),
            atten_mask=plan.attn_mask, block_table=plan.prefill_block_tables, input_layout="TND", block_size=bs,
            actual_seq_lengths=plan.actual_seq_lengths, actual_seq_lengths_kv=plan.actual_seq_lengths_kv,
            num_key_value_heads=hk, num_heads=hq, scale=float(scale), sparse_mode=3)
        out[nd:end] = o
    if end < t:
        out[end:] = 0


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: Any, scale: float,
                    sliding_window: int | None = None) -> torch.Tensor:
    # query: [T, Hq, D]; kv_cache: [2, N, Bs, Hk, D] -> [T, Hq, D]
    if sliding_window is not None:
        raise ValueError("sliding_window: sliding-window attention is not mapped on the npu backend")
    plan = plan_for(attn_metadata)
    out = torch.empty_like(query)
    if plan.num_decodes:
        decode_attention(query, kv_cache, attn_metadata, plan, scale, out)
    prefill_attention(query, kv_cache, plan, scale, out)
    return out
