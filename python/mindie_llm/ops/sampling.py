# SPDX-License-Identifier: Apache-2.0
"""Sampling ops in plain torch: penalties, temperature, min-p, top-k/top-p, seeded sampling and
logprob gathering. This file is the reference every device backend's sampling must match.

Seeded randomness is counter-based: the exponential noise of the token at output position ``p``
of a request comes from a generator seeded with ``mix_seed(seed, p)`` (splitmix64). A request's
draws therefore depend only on its own seed and position: the same whatever else is in the batch,
and the same after preemption and recompute. No global RNG is touched. (Numbers differ between
devices, whose generators differ; on one device they are reproducible.)

Must not import anything of the package but torch (no engine, no scheduler, no models).
"""
from __future__ import annotations

import torch

__all__ = [
    "apply_penalties", "apply_logit_bias", "apply_temperature", "apply_min_p", "apply_top_k_top_p", "mix_seed",
    "sample_seeded", "compute_logprobs", "gather_logprobs", "apply_token_bitmask", "rejection_sample",
    "ACCEPT_STREAM",
]

_M64 = (1 << 64) - 1


def mix_seed(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): the generator seed of one draw, in [0, 2**63)."""
    z = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) >> 1


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


def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, biases: torch.Tensor
                     ) -> torch.Tensor:
    """OpenAI's ``logit_bias``: ``logits[rows[k], tokens[k]] += biases[k]``. logits [S, V] f32;
    rows, tokens [K] int64 ((row, token) pairs distinct); biases [K]. A new tensor (vectorized,
    no host sync)."""
    return logits.index_put((rows, tokens), biases.to(logits.dtype), accumulate=True)


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


def sample_seeded(logits: torch.Tensor, seeds: list[int], positions: list[int]) -> torch.Tensor:
    """Draws one token per row from softmax(logits) by the exponential race ``argmax(p / E)``,
    E ~ Exp(1) drawn from a generator seeded with ``mix_seed(seed, position)`` of that row.
    logits [S, V]; seeds, positions: S ints. Returns [S] int64."""
    probs = torch.softmax(logits, dim=-1)                                 # [S, V]
    q = torch.empty_like(probs)
    gen = torch.Generator(device=logits.device)
    for i, (seed, pos) in enumerate(zip(seeds, positions)):  # one generator draw per row
        gen.manual_seed(mix_seed(seed, pos))
        q[i].exponential_(generator=gen)
    return (probs / q).argmax(dim=-1)


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


ACCEPT_STREAM = 0x5EC0DE5EC0DE       # xor-ed into a seed for the accept/reject uniforms


def _uniform(seed: int, position: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(mix_seed(seed ^ ACCEPT_STREAM, position))
    return torch.rand((), generator=gen, device=device)


def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor,
                     seeds: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling for probabilistic drafts (Leviathan et al., Chen et al.): proposal j
    of row i, drawn from q = ``draft_probs[i, j]``, is accepted with probability
    min(1, p(x) / q(x)), p = ``target_probs[i, j]``; at the first rejection a token is drawn from
    norm(max(0, p - q)) and the row stops; when all k are accepted a bonus token is drawn from
    ``target_probs[i, k]``. The emitted tokens are distributed exactly as sampling from the
    target. Randomness is counter-based per (seed, output position): the uniform of position
    ``positions[i] + j`` comes from the ``ACCEPT_STREAM`` generator, the resampled or bonus token
    from the exponential race of ``sample_seeded`` at the same position.

    target_probs [S, k+1, V], draft_probs [S, k, V], draft_tokens [S, k] int64; seeds, positions:
    S ints (``positions[i]``: output position of row i's first proposal).
    Returns (tokens [S, k+1] int64 padded with -1, num_emitted [S] int64 in 1..k+1)."""
    S, k1, V = target_probs.shape
    k = k1 - 1
    dev = target_probs.device
    x = draft_tokens.to(torch.int64)                                              # [S, k]
    p_x = target_probs[:, :k].gather(-1, x[..., None]).squeeze(-1)               # [S, k]
    q_x = draft_probs.gather(-1, x[..., None]).squeeze(-1)                        # [S, k]
    u = torch.stack([torch.stack([_uniform(sd, ps + j, dev) for j in range(k)]) if k else
                     torch.zeros(0, device=dev) for sd, ps in zip(seeds, positions)]).reshape(S, k)
    accept = u * q_x < p_x                                                        # u < p/q without dividing
    n_acc = torch.cumprod(accept.to(torch.int64), dim=1).sum(dim=1)               # [S] leading accepts
    # The distribution of the last token: the residual at the first rejection, else the bonus p.
    rows = torch.arange(S, device=dev)
    last_p = target_probs[rows, n_acc]                                            # [S, V]
    rejected = n_acc < k
    q_at = torch.zeros_like(last_p)
    if k:
        q_at[rejected] = draft_probs[rows[rejected], n_acc[rejected]]
    resid = (last_p - q_at).clamp_min(0)
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, last_p)           # p == q: any p-draw is exact
    q = torch.empty_like(resid)
    gen = torch.Generator(device=dev)
    for i, (sd, ps) in enumerate(zip(seeds, positions)):
        gen.manual_seed(mix_seed(sd, ps + int(n_acc[i])))
        q[i].exponential_(generator=gen)
    last = (resid / q).argmax(dim=-1)                                             # [S]
    out = torch.full((S, k1), -1, dtype=torch.int64, device=dev)
    cols = torch.arange(k1, device=dev)[None, :]
    if k:
        out[:, :k] = torch.where(cols[:, :k] < n_acc[:, None], x, out[:, :k])
    out[rows, n_acc] = last
    return out, n_acc + 1

def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` [S, V] with the tokens a packed int32 mask [S, ceil(V/32)] forbids set to -inf
    (bit t%32 of word t//32 = token t allowed). Rows whose words are all -1 are unchanged."""
    S, V = logits.shape
    bits = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bitmask.to(device=logits.device, dtype=torch.int32).unsqueeze(-1) >> bits) & 1)
    allowed = allowed.reshape(S, -1)[:, :V].bool()                                       # [S, V]
    return logits.masked_fill(~allowed, float("-inf"))
