# SPDX-License-Identifier: Apache-2.0
"""Sampling ops in plain torch: penalties, temperature, min-p, top-k/top-p, seeded sampling and
logprob gathering. This file is the reference every device backend's sampling must match.

Seeded randomness is counter-based: the uniform number of (request seed, output position, token)
is a 32-bit integer hash of the three, computed with vectorized torch integer ops. A request's
draws therefore depend only on its own seed and position: the same whatever else is in the batch,
and the same after preemption and recompute. No global RNG is touched.

Must not import anything of the package but torch (no engine, no scheduler, no models).
"""
from __future__ import annotations

import torch

__all__ = [
    "apply_penalties", "apply_temperature", "apply_min_p", "apply_top_k_top_p", "hash_uniform",
    "sample_seeded", "compute_logprobs", "gather_logprobs",
]

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 in int64 without overflow (c split in 16-bit halves)."""
    lo = x * (c & 0xFFFF)                    # < 2**48
    hi = ((x * (c >> 16)) & 0xFFFF) << 16    # < 2**32
    return (lo + hi) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Chris Wellons), an avalanching 32-bit integer hash; x int64 in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return x


def hash_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform numbers in (0, 1) from (seed, position, token): [S, V] float32.

    seeds: [S] int64 (any int64), positions: [S] int64 (output index of the token being drawn).
    """
    dev = seeds.device
    s = seeds.to(torch.int64)
    k0 = s & _M32                                        # [S]
    k1 = (s >> 32) & _M32                                # [S] (arithmetic shift, masked)
    row = _hash32(k0 ^ _hash32(k1 ^ _hash32(positions.to(torch.int64) & _M32)))  # [S]
    cols = torch.arange(vocab_size, device=dev, dtype=torch.int64)               # [V]
    h = _hash32(row[:, None] ^ _hash32((cols * 0x9E37 + 0x6A09) & _M32)[None, :])  # [S, V]
    h = _hash32(h ^ 0x5BD1E995)
    # 24 high bits, centred: never 0 or 1, exactly representable in float32.
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor, output_counts: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """vLLM semantics. logits [S, V] f32; prompt_mask [S, V] bool (token occurs in the prompt);
    output_counts [S, V] int (occurrences in the output so far); presence/frequency/repetition [S].

    Repetition divides positive / multiplies negative logits of tokens seen in prompt or output;
    frequency subtracts ``frequency * count``; presence subtracts ``presence`` once per seen token.
    """
    out_mask = output_counts > 0                                   # [S, V]
    rep = repetition[:, None].to(logits.dtype)                     # [S, 1]
    seen = prompt_mask | out_mask
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - frequency[:, None].to(logits.dtype) * output_counts.to(logits.dtype)
    logits = logits - presence[:, None].to(logits.dtype) * out_mask.to(logits.dtype)
    return logits


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits [S, V] / temperature [S]; rows with temperature 0 (greedy) are left unscaled."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits / t[:, None].to(logits.dtype)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Masks tokens whose probability is below ``min_p * max_prob`` of their row. min_p [S] (0 = off)."""
    probs = torch.softmax(logits, dim=-1)                          # [S, V]
    top = probs.amax(dim=-1, keepdim=True)                         # [S, 1]
    drop = probs < min_p[:, None].to(probs.dtype) * top
    return logits.masked_fill(drop, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keeps the ``top_k`` most likely tokens (top_k [S] int, <= 0 = all) and, of those, the
    smallest set whose probability reaches ``top_p`` (top_p [S], 1 = all). Always keeps the top token."""
    vocab = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)   # [S, V]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab)).to(torch.int64)
    ranks = torch.arange(vocab, device=logits.device)[None, :]           # [1, V]
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs                          # mass strictly above each token
    drop_p = before > top_p[:, None].to(probs.dtype)
    drop_p[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop_p, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample_seeded(logits: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Draws one token per row from softmax(logits) by the exponential race
    ``argmax(p / E)``, E = -log(U), U = hash_uniform(seed, position, token). Returns [S] int64."""
    u = hash_uniform(seeds, positions, logits.shape[-1])                  # [S, V]
    # argmax(p / E) == argmax(log p - log E); log p = logits - logsumexp is a per-row shift.
    score = logits - torch.log(-torch.log(u))
    return score.argmax(dim=-1)


def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax in float32: [S, V]."""
    return torch.log_softmax(logits.to(torch.float32), dim=-1)


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each row: the top-``num_top`` token ids [S, N] and logprobs [S, N], the logprob of
    ``token_ids`` [S] and its rank [S] (1 = most likely; ties count as better-ranked tokens)."""
    tok_lp = logprobs.gather(-1, token_ids.to(torch.int64)[:, None]).squeeze(-1)   # [S]
    rank = (logprobs > tok_lp[:, None]).sum(dim=-1) + 1                             # [S]
    if num_top > 0:
        top_lp, top_ids = torch.topk(logprobs, num_top, dim=-1)
    else:
        top_lp = logprobs.new_empty((logprobs.shape[0], 0))
        top_ids = torch.empty((logprobs.shape[0], 0), dtype=torch.int64, device=logprobs.device)
    return top_ids, top_lp, tok_lp, rank
