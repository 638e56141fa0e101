# SPDX-License-Identifier: Apache-2.0
"""Sampler: logits of the sampling rows -> one token per row, plus the logprobs asked for.

Order (vLLM v1): structured-output token mask -> raw logprobs (log_softmax of the model's logits, what ``logprobs`` reports) ->
min_tokens mask -> logit_bias -> penalties -> temperature -> min-p -> top-k/top-p -> greedy argmax or a seeded
draw. Each step is skipped when no row in the batch needs it, so an all-greedy batch costs one
argmax. Device-agnostic: every computation is in ``ops/sampling.py``.

Must not import the engine, the scheduler or the executor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mindie_llm.ops import sampling as ops

__all__ = ["SamplingMetadata", "SamplerOutput", "Sampler"]


@dataclass
class SamplingMetadata:
    """Per-row sampling parameters of one step (S = rows that sample), built by the runner."""

    temperature: torch.Tensor          # [S] f32, 0 = greedy
    top_k: torch.Tensor                # [S] int64, <= 0 = off
    top_p: torch.Tensor                # [S] f32
    min_p: torch.Tensor                # [S] f32
    seeds: list[int]                   # S seeds (int64)
    output_positions: list[int]        # S indices of the token being sampled in the output
    all_greedy: bool
    need_top_k_top_p: bool
    need_min_p: bool
    # Penalties (None when no row has one).
    presence: torch.Tensor | None = None      # [S] f32
    frequency: torch.Tensor | None = None     # [S] f32
    repetition: torch.Tensor | None = None    # [S] f32
    prompt_mask: torch.Tensor | None = None   # [S, V] bool
    output_counts: torch.Tensor | None = None  # [S, V] int32
    # min_tokens: (row, token) pairs to mask to -inf this step.
    banned_rows: torch.Tensor | None = None   # [K] int64
    banned_tokens: torch.Tensor | None = None  # [K] int64
    max_num_logprobs: int = 0                 # top-N over rows asking for logprobs; -1 = none asks
    # logit_bias: (row, token, bias) triples added to the logits (after the raw logprobs, as vLLM).
    bias_rows: torch.Tensor | None = None     # [K] int64
    bias_tokens: torch.Tensor | None = None   # [K] int64
    bias_values: torch.Tensor | None = None   # [K] f32
    # Structured output: packed allowed-token mask [S, ceil(V/32)] int32 (-1 words = all allowed).
    token_bitmask: torch.Tensor | None = None
    random_rows: list[int] | None = None      # rows with temperature > 0 (None: derived here)


@dataclass
class SamplerOutput:
    sampled: torch.Tensor                  # [S] int64
    top_ids: torch.Tensor | None = None     # [S, N] int64
    top_logprobs: torch.Tensor | None = None  # [S, N] f32
    token_logprob: torch.Tensor | None = None  # [S] f32
    token_rank: torch.Tensor | None = None  # [S] int64


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:  # logits [S, V]
        logits = logits.to(torch.float32)
        if md.token_bitmask is not None:   # first, as vLLM: constrained rows' logprobs see the mask
            logits = ops.apply_token_bitmask(logits, md.token_bitmask)
        raw_logprobs = ops.compute_logprobs(logits) if md.max_num_logprobs >= 0 else None
        if md.banned_rows is not None and md.banned_rows.numel():
            logits = logits.index_put((md.banned_rows, md.banned_tokens),
                                      torch.tensor(float("-inf"), device=logits.device))
        if md.bias_rows is not None and md.bias_rows.numel():
            logits = ops.apply_logit_bias(logits, md.bias_rows, md.bias_tokens, md.bias_values)
        if md.presence is not None:
            logits = ops.apply_penalties(logits, md.prompt_mask, md.output_counts,
                                         md.presence, md.frequency, md.repetition)
        greedy_tokens = logits.argmax(dim=-1)                          # [S]
        if md.all_greedy:
            sampled = greedy_tokens
        else:
            # Only the rows that sample randomly pay for temperature, filtering and the draw.
            rows = md.random_rows
            if rows is None:
                rows = [i for i, t in enumerate(md.temperature.tolist()) if t > 0]
            idx = torch.tensor(rows, dtype=torch.int64, device=logits.device)
            x = ops.apply_temperature(logits[idx], md.temperature[idx])   # [R, V]
            if md.need_min_p:
                x = ops.apply_min_p(x, md.min_p[idx])
            if md.need_top_k_top_p:
                x = ops.apply_top_k_top_p(x, md.top_k[idx], md.top_p[idx])
            drawn = ops.sample_seeded(x, [md.seeds[i] for i in rows], [md.output_positions[i] for i in rows])
            sampled = greedy_tokens.index_copy(0, idx, drawn)
        out = SamplerOutput(sampled=sampled)
        if raw_logprobs is not None:
            out.top_ids, out.top_logprobs, out.token_logprob, out.token_rank = ops.gather_logprobs(
                raw_logprobs, sampled, md.max_num_logprobs)
        return out
