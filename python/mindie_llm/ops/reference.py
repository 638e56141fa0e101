# SPDX-License-Identifier: Apache-2.0
"""Plain-torch reference implementations of every fused op: the oracle all backends are tested
against, and the fallback when a device registers nothing faster.

Written to be obviously correct, not fast: loops over requests, explicit gathers, float32 math.
Sampling reference ops live in ``ops/sampling.py``; ``rejection_sample`` here is the one-token-
at-a-time loop its vectorized form is checked against (it borrows the seed mixing of
``ops.sampling``, imported lazily). Must not import anything of the package but
(lazily, for typing) ``layers.attention.AttentionMetadata``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mindie_llm.ops.attention_metadata import AttentionMetadata

__all__ = ["rms_norm", "fused_add_rms_norm", "rotary_embedding", "write_kv_cache",
           "rotary_embedding_write_kv", "paged_attention", "silu_and_mul", "rejection_sample"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x[T, H] -> x / rms(x) * weight, computed in float32, returned in x's dtype."""
    xf = x.float()
    var = xf.pow(2).mean(dim=-1, keepdim=True)
    return (xf * torch.rsqrt(var + eps) * weight.float()).to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); both [T, H]."""
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(new_residual, weight, eps), new_residual


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    # x: [T, H, rot_dim]; cos, sin: [T, 1, rot_dim // 2]
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return torch.stack((o1, o2), dim=-1).flatten(-2)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_dim: int,
                     cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates the first ``rot_dim`` dims of every head of query[T, Hq*D] and key[T, Hk*D].

    cos_sin_cache[max_pos, rot_dim] = cat(cos, sin) as in vLLM. ``is_neox`` rotates the two halves;
    otherwise adjacent pairs (GPT-J / interleaved). Returns new tensors of the input shapes.
    """
    rot_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)  # [T, rot_dim // 2] each
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                  # [T, 1, rot_dim // 2]
    out = []
    for x in (query, key):
        t = x.shape[0]
        xh = x.view(t, -1, head_dim).float()                       # [T, H, D]
        rot = _rotate(xh[..., :rot_dim], cos, sin, is_neox)
        xh = torch.cat((rot, xh[..., rot_dim:]), dim=-1)
        out.append(xh.reshape(x.shape).to(x.dtype))
    return out[0], out[1]


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """key, value[T, Hk, D] -> kv_cache[2, N, Bs, Hk, D] at slot = block * Bs + offset (in place).
    A negative slot means "do not write" (padding)."""
    block_size = kv_cache.shape[2]
    for i in range(slot_mapping.shape[0]):
        slot = int(slot_mapping[i])
        if slot < 0:
            continue
        b, o = divmod(slot, block_size)
        kv_cache[0, b, o] = key[i].to(kv_cache.dtype)
        kv_cache[1, b, o] = value[i].to(kv_cache.dtype)


def rotary_embedding_write_kv(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                              head_dim: int, cos_sin_cache: torch.Tensor,
                              is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary_embedding`` then ``write_kv_cache(rotated key, value)``: query[T, Hq*D],
    key[T, Hk*D], value[T, Hk*D]; returns the rotated (query, key). A backend may rotate query and
    key in place; callers use the returned tensors and must not rely on the inputs afterwards."""
    q, k = rotary_embedding(positions, query, key, head_dim, cos_sin_cache, is_neox)
    t = k.shape[0]
    write_kv_cache(k.view(t, -1, head_dim), value.reshape(t, -1, head_dim), kv_cache, slot_mapping)
    return q, k


def gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor,
                   seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``seq_len`` cached K and V of one request: two [seq_len, Hk, D] tensors."""
    block_size = kv_cache.shape[2]
    pos = torch.arange(seq_len, device=kv_cache.device)
    blocks = block_table.long()[pos // block_size]
    offsets = pos % block_size
    return kv_cache[0, blocks, offsets], kv_cache[1, blocks, offsets]


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: "AttentionMetadata",
                    scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Attention of query[T, Hq, D] over each request's cached context (which already holds the new
    tokens' K/V). Request i owns query rows query_start_loc[i]:query_start_loc[i+1]; its last query
    token sits at position seq_lens[i] - 1. Causal inside a chunk; GQA/MQA by repeating KV heads;
    with ``sliding_window`` a token sees only the last ``sliding_window`` positions (itself included).
    Returns [T, Hq, D] in query's dtype.
    """
    t, num_heads, head_dim = query.shape
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    qsl = attn_metadata.query_start_loc.tolist()
    seq_lens = attn_metadata.seq_lens.tolist()
    for i, seq_len in enumerate(seq_lens):
        qs, qe = qsl[i], qsl[i + 1]
        q_len = qe - qs
        if q_len == 0:
            continue
        k, v = gather_context(kv_cache, attn_metadata.block_tables[i], seq_len)  # [S, Hk, D]
        k = k.float().repeat_interleave(group, dim=1)                          # [S, Hq, D]
        v = v.float().repeat_interleave(group, dim=1)
        q = query[qs:qe].float()                                               # [L, Hq, D]
        scores = torch.einsum("lhd,shd->hls", q, k) * scale                    # [Hq, L, S]
        q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)            # [L, 1]
        k_pos = torch.arange(seq_len).unsqueeze(0)                             # [1, S]
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[qs:qe] = torch.einsum("hls,shd->lhd", probs, v).to(query.dtype)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x[T, 2I] = cat(gate, up) -> silu(gate) * up, [T, I]."""
    d = x.shape[-1] // 2
    return (torch.nn.functional.silu(x[..., :d].float()) * x[..., d:].float()).to(x.dtype)


def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor,
                     seeds: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop form of ``ops.sampling.rejection_sample`` (same arguments, same draws, same result):
    per row, per proposal: accept if u < p(x)/q(x), else draw from norm(max(0, p - q)) and stop;
    after k accepts draw the bonus token from p."""
    from mindie_llm.ops.sampling import ACCEPT_STREAM, mix_seed

    S, k1, V = target_probs.shape
    out = torch.full((S, k1), -1, dtype=torch.int64)
    num = torch.zeros(S, dtype=torch.int64)
    for i in range(S):
        n = 0
        last_dist = target_probs[i, k1 - 1].float()
        for j in range(k1 - 1):
            x = int(draft_tokens[i, j])
            p, q = target_probs[i, j].float(), draft_probs[i, j].float()
            g = torch.Generator(device=target_probs.device).manual_seed(mix_seed(seeds[i] ^ ACCEPT_STREAM, positions[i] + j))
            u = float(torch.rand((), generator=g, device=target_probs.device))
            if u * float(q[x]) < float(p[x]):
                out[i, j] = x
                n += 1
                continue
            resid = (p - q).clamp_min(0)
            last_dist = resid if float(resid.sum()) > 0 else p
            break
        g = torch.Generator(device=target_probs.device).manual_seed(mix_seed(seeds[i], positions[i] + n))
        e = torch.empty_like(last_dist).exponential_(generator=g)
        out[i, n] = int((last_dist / e).argmax())
        num[i] = n + 1
    return out, num

def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Structured output: ``logits`` [S, V] with every token whose bit is 0 set to -inf.
    ``bitmask`` [S, W] int32, W = ceil(V/32): token t is allowed when bit t%32 of word t//32 is set
    (the layout of llguidance and xgrammar). Out of place; the plain-torch oracle."""
    S, V = logits.shape
    bits = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bitmask.to(torch.int32).unsqueeze(-1) >> bits) & 1).reshape(S, -1)[:, :V].bool()   # [S, V]
    return logits.masked_fill(~allowed, float("-inf"))
