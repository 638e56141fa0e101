# SPDX-License-Identifier: Apache-2.0
"""CPU op table (registered with ``ops.register_backend("cpu", this module)``): plain torch, but
vectorized. Decodes attend in one batched SDPA call over blocks gathered with ``index_select``;
prefill chunks use SDPA over their gathered context. Per-step index tensors (gathered block ids,
masks) are computed once and shared by all layers. ``ops/reference.py`` stays the
oracle; tests compare every function here against it.

Must not import models, layers (except for typing), the engine or another backend.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from mindie_llm.ops.attention_metadata import AttentionMetadata

__all__ = ["rms_norm", "fused_add_rms_norm", "rotary_embedding", "write_kv_cache",
           "rotary_embedding_write_kv", "paged_attention", "silu_and_mul"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = x + residual  # [T, H]
    return rms_norm(new_residual, weight, eps), new_residual


def _cos_sin(positions: torch.Tensor, cos_sin_cache: torch.Tensor, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
    # NOTE: recomputed per layer (3 small ops): a cross-layer cache cannot be keyed safely, since
    # inference-mode tensors carry no version counter.
    cs = cos_sin_cache.index_select(0, positions)                                  # [T, r]
    if cs.dtype != dtype:
        cs = cs.to(dtype)
    cs = cs.view(cs.shape[0], 1, 2, -1)                                            # [T, 1, 2, r/2]
    return cs[:, :, 0], cs[:, :, 1]                                                # [T, 1, r/2] each


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int, is_neox: bool) -> torch.Tensor:
    """x[T, H, D] -> rotated copy (first ``rot`` dims), 4 arithmetic kernels for neox."""
    half = rot // 2
    out = torch.empty_like(x)
    if is_neox:
        x1, x2 = x[..., :half], x[..., half:rot]
        o1, o2 = out[..., :half], out[..., half:rot]
    else:
        x1, x2 = x[..., 0:rot:2], x[..., 1:rot:2]
        o1, o2 = out[..., 0:rot:2], out[..., 1:rot:2]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1.0)          # x1 cos - x2 sin
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)                      # x2 cos + x1 sin
    if rot < x.shape[-1]:
        out[..., rot:] = x[..., rot:]
    return out


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_dim: int,
                     cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # query: [T, Hq*D], key: [T, Hk*D]; returns new tensors of the same shapes and dtypes
    rot = cos_sin_cache.shape[-1]
    t = query.shape[0]
    if query.dtype != torch.float32:  # low precision: rotate in fp32 like the reference
        q, k = rotary_embedding(positions, query.float(), key.float(), head_dim, cos_sin_cache, is_neox)
        return q.to(query.dtype), k.to(key.dtype)
    cos, sin = _cos_sin(positions, cos_sin_cache, query.dtype)     # [T, 1, r/2]
    hq = query.shape[1] // head_dim
    es = query.element_size()
    if (t > 0 and query.stride() == key.stride() and query.stride(1) == 1
            and key.data_ptr() == query.data_ptr() + query.shape[1] * es):
        # q and k are adjacent column ranges of one qkv output: rotate both in one pass
        qk = query.as_strided((t, hq + key.shape[1] // head_dim, head_dim), (query.stride(0), head_dim, 1))
        out = _rotate_(qk, cos, sin, rot, is_neox)                # [T, Hq + Hk, D]
        return out[:, :hq].reshape(query.shape), out[:, hq:].reshape(key.shape)
    q = _rotate_(query.reshape(t, -1, head_dim), cos, sin, rot, is_neox)
    k = _rotate_(key.reshape(t, -1, head_dim), cos, sin, rot, is_neox)
    return q.reshape(query.shape), k.reshape(key.shape)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    # key, value: [T, Hk, D]; kv_cache: [2, N, Bs, Hk, D]
    n, bs, hk, d = kv_cache.shape[1:]
    flat = kv_cache.view(2, n * bs, hk, d)
    slots = slot_mapping
    if slots.numel() and int(slots.min()) < 0:
        keep = slots >= 0
        slots, key, value = slots[keep], key[keep], value[keep]
    flat[0].index_copy_(0, slots, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slots, value.to(kv_cache.dtype))


def _rotate_inplace_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int, is_neox: bool) -> None:
    """Rotates the first ``rot`` dims of x[T, H, D] in place (5 arithmetic kernels, one temporary)."""
    half = rot // 2
    if is_neox:
        x1, x2 = x[..., :half], x[..., half:rot]
    else:
        x1, x2 = x[..., 0:rot:2], x[..., 1:rot:2]
    t1 = x1 * sin                             # x1 sin
    x1.mul_(cos).addcmul_(x2, sin, value=-1.0)  # x1 cos - x2 sin
    x2.mul_(cos).add_(t1)                     # x2 cos + x1 sin


def rotary_embedding_write_kv(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                              head_dim: int, cos_sin_cache: torch.Tensor,
                              is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary + KV write. When q, k, v are adjacent column ranges of one qkv output (the model's
    case) q and k are rotated in place in one pass and K and V land in the cache with one
    ``index_put_``; otherwise (or in low precision) the two CPU ops run in sequence."""
    t = query.shape[0]
    hq, hk = query.shape[1] // head_dim, key.shape[1] // head_dim
    es = query.element_size()
    fused = (t > 0 and query.dtype == torch.float32 and key.dtype == value.dtype == kv_cache.dtype
             == torch.float32 and query.stride() == key.stride() == value.stride() and query.stride(1) == 1
             and key.data_ptr() == query.data_ptr() + query.shape[1] * es
             and value.data_ptr() == key.data_ptr() + key.shape[1] * es and value.shape[1] == key.shape[1])
    if not fused:
        q, k = rotary_embedding(positions, query, key, head_dim, cos_sin_cache, is_neox)
        write_kv_cache(k.view(t, hk, head_dim), value.reshape(t, hk, head_dim), kv_cache, slot_mapping)
        return q, k
    qkv = query.as_strided((t, hq + 2 * hk, head_dim), (query.stride(0), head_dim, 1))  # [T, Hq+2Hk, D]
    cos, sin = _cos_sin(positions, cos_sin_cache, query.dtype)                          # [T, 1, r/2]
    _rotate_inplace_(qkv[:, :hq + hk], cos, sin, cos_sin_cache.shape[-1], is_neox)
    n, bs = kv_cache.shape[1:3]
    kv = qkv[:, hq:].unflatten(1, (2, hk)).transpose(0, 1)                              # [2, T, Hk, D]
    slots = slot_mapping
    if int(slots.min()) < 0:
        keep = slots >= 0
        slots, kv = slots[keep], kv[:, keep]
    kv_cache.view(2, n * bs, hk, head_dim).index_put_((_PLANES, slots[None, :]), kv)
    return query, key


_PLANES = torch.arange(2).view(2, 1)  # [2, 1]: the K and V planes of a layer's cache


def _decode_state(md: "AttentionMetadata", block_size: int, sliding_window: int | None):
    """Per-step (all layers): flat block ids [nd * nb] and an additive mask [nd, 1, 1, nb * Bs]."""
    key = ("cpu_decode", block_size, sliding_window)
    st = md.backend_state.get(key)
    if st is not None:
        return st
    nd = md.num_decodes
    seq_lens = md.seq_lens[:nd].long()                                   # [nd]
    max_len = int(seq_lens.max())
    nb = (max_len + block_size - 1) // block_size
    blocks = md.block_tables[:nd, :nb].reshape(-1).long()               # [nd * nb]
    pos = torch.arange(nb * block_size)                                  # [S]
    allowed = pos[None, :] < seq_lens[:, None]                           # [nd, S]
    if sliding_window is not None:
        allowed &= pos[None, :] >= (seq_lens[:, None] - sliding_window)
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, float("-inf"))
    st = (blocks, nb, mask[:, None, None, :])                            # mask [nd, 1, 1, S]
    md.backend_state[key] = st
    return st


def _prefill_state(md: "AttentionMetadata", block_size: int, sliding_window: int | None):
    """Per-step: for each prefill request, (q_start, q_end, context slot ids, bool mask or None)."""
    key = ("cpu_prefill", block_size, sliding_window)
    st = md.backend_state.get(key)
    if st is not None:
        return st
    qsl = md.query_start_loc.tolist()
    seq_lens = md.seq_lens.tolist()
    tables = md.block_tables
    st = []
    for i in range(md.num_decodes, len(seq_lens)):
        qs, qe, s = qsl[i], qsl[i + 1], seq_lens[i]
        q_len = qe - qs
        if q_len == 0:
            continue
        pos = torch.arange(s)
        slots = tables[i, :(s + block_size - 1) // block_size].long()[pos // block_size] * block_size \
            + pos % block_size                                           # [S]
        mask = None
        if q_len != s or sliding_window is not None:
            q_pos = torch.arange(s - q_len, s)[:, None]                  # [L, 1]
            mask = pos[None, :] <= q_pos                                 # [L, S]
            if sliding_window is not None:
                mask &= pos[None, :] > q_pos - sliding_window
        st.append((qs, qe, slots, mask))
    md.backend_state[key] = st
    return st


def _buffer(md: "AttentionMetadata", name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A scratch tensor shared by all layers of one step (large fresh allocations page-fault)."""
    key = ("cpu_buf", name, shape, dtype)
    buf = md.backend_state.get(key)
    if buf is None:
        buf = md.backend_state[key] = torch.empty(shape, dtype=dtype)
    return buf


def _decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, md: "AttentionMetadata", scale: float,
                      sliding_window: int | None) -> torch.Tensor:
    # query: [nd, Hq, D] (one token per request) -> [nd, Hq, D]
    nd, hq, d = query.shape
    _, n, bs, hk, _ = kv_cache.shape
    blocks, nb, mask = _decode_state(md, bs, sliding_window)
    kvbuf = _buffer(md, "kv", (2, nd * nb, bs * hk * d), kv_cache.dtype)
    torch.index_select(kv_cache.view(2, n, bs * hk * d), 1, blocks, out=kvbuf)  # K and V in one gather
    k, v = kvbuf.view(2, nd, nb * bs, hk, d).unbind(0)                                 # [nd, S, Hk, D]
    if k.dtype != query.dtype:
        k, v = k.to(query.dtype), v.to(query.dtype)
    if mask.dtype != query.dtype:
        mask = mask.to(query.dtype)
    # NOTE: SDPA and an explicit grouped bmm + softmax measured the same here; SDPA is kept.
    o = F.scaled_dot_product_attention(query.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, scale=scale, enable_gqa=hq != hk)  # [nd, Hq, 1, D]
    return o.squeeze(2)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: "AttentionMetadata",
                    scale: float, sliding_window: int | None = None) -> torch.Tensor:
    # query: [T, Hq, D]; kv_cache: [2, N, Bs, Hk, D] -> [T, Hq, D]
    md = attn_metadata
    t, hq, d = query.shape
    _, n, bs, hk, _ = kv_cache.shape
    nd = md.num_decodes
    if nd == t and nd:
        return _decode_attention(query, kv_cache, md, scale, sliding_window)
    out = torch.empty_like(query)
    if nd:
        out[:nd] = _decode_attention(query[:nd], kv_cache, md, scale, sliding_window)
    if t > nd:
        flat = kv_cache.view(2, n * bs, hk, d)
        for qs, qe, slots, mask in _prefill_state(md, bs, sliding_window):
            k = flat[0].index_select(0, slots).transpose(0, 1).unsqueeze(0)   # [1, Hk, S, D]
            v = flat[1].index_select(0, slots).transpose(0, 1).unsqueeze(0)
            q = query[qs:qe].transpose(0, 1).unsqueeze(0)                     # [1, Hq, L, D]
            o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                               is_causal=mask is None, scale=scale,
                                               enable_gqa=hq != hk)          # [1, Hq, L, D]
            out[qs:qe] = o[0].transpose(0, 1)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]  # [T, 2I] -> [T, I]
