# SPDX-License-Identifier: Apache-2.0
"""The largest step the engine will run, as a closure, for activation-memory profiling.

``max_step(...)`` prepares (outside the closure, so it is not counted) a one-block KV cache per layer
and the metadata of ``max_num_seqs`` prefill chunks sharing ``max_num_batched_tokens`` tokens; the
closure runs the forward, the logits of one row per request and a softmax + argmax over them (the
sampler's biggest buffers). The engine hands it to ``platform.profile_activation_peak`` before it
sizes the KV cache. Every slot maps into block 0 of the throwaway cache, so nothing of the real
pool is touched and any backend's ops accept it.

May import layers; must not import the engine, the scheduler or a backend.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mindie_llm.ops.attention_metadata import AttentionMetadata

__all__ = ["max_step"]


def max_step(model: nn.Module, *, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
             kv_dtype: torch.dtype, max_num_batched_tokens: int, max_num_seqs: int, vocab_size: int,
             device: torch.device) -> Callable[[], None]:
    """Returns ``run_step()``: one forward of ``max_num_batched_tokens`` tokens in
    ``min(max_num_seqs, max_num_batched_tokens)`` requests, then their logits and sampling."""
    if max_num_batched_tokens < 1 or max_num_seqs < 1:
        raise ValueError(f"max_num_batched_tokens, max_num_seqs: must be >= 1; got "
                         f"{max_num_batched_tokens}, {max_num_seqs}")
    T = int(max_num_batched_tokens)
    B = min(int(max_num_seqs), T)
    lens = [T // B + (1 if i < T % B else 0) for i in range(B)]                 # sums to T
    kv_caches = [torch.zeros(2, 1, block_size, num_kv_heads, head_dim, dtype=kv_dtype, device=device)
                 for _ in range(num_layers)]                                    # [2, 1, Bs, Hk, D] each
    md = AttentionMetadata.build([0] * B, lens, [[0] * -(-n // block_size) for n in lens], block_size,
                                 device=device)
    positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in lens]).to(device)   # [T]
    input_ids = (torch.arange(T, dtype=torch.int64) % max(vocab_size, 1)).to(device)        # [T]
    last = (md.query_start_loc[1:].long() - 1)                                             # [B]

    @torch.inference_mode()
    def run_step() -> None:
        hidden = model(input_ids, positions, kv_caches, md)                    # [T, hidden]
        logits = model.compute_logits(hidden[last])                            # [B, vocab] fp32
        probs = torch.softmax(logits, dim=-1)                                  # [B, vocab]
        torch.argmax(probs, dim=-1)

    return run_step
