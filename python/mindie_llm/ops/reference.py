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
           "rotary_embedding_write_kv", "paged_attention", "silu_and_mul", "gguf_repack", "gguf_unpack",
           "gguf_dequantize", "gguf_matmul", "gguf_embedding", "quantize_per_token_int8", "w8a8_matmul",
           "w4a16_pack", "w4a16_unpack", "w4a16_dequantize", "w4a16_matmul", "FP8_MAX", "quantize_fp8_rows",
           "fp8_matmul", "KV_QUANT_DTYPES", "kv_quantize",
           "kv_dequantize", "write_kv_cache_quant", "rotary_embedding_write_kv_quant", "paged_attention_quant",
           "rejection_sample"]


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
        if kv_cache.dtype in KV_QUANT_DTYPES:  # quantized cache: [S, Hk, D + 4] -> [S, Hk, D]
            k, v = kv_dequantize(k), kv_dequantize(v)
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


# --- GGUF blocks, repacked ("tile-major": 16 output rows per tile, one 32-value block per step) ---
# Q4_0 / Q4_1: codes[16 kk][16 rows] (GGUF's qs byte kk of each row: low nibble k = kk, high nibble
# k = kk + 16), d[16] fp16, (Q4_1) m[16] fp16. Q8_0: codes[32 k][16 rows] int8, d[16] fp16.
# Rows past N are zero. The CPU backend's C++ kernels read this layout; these are the oracles.
_GGUF_BLOCK_BYTES = {2: 18, 3: 20, 8: 34}   # ggml type id -> bytes per 32-value block
_GGUF_QS_START = {2: 2, 3: 4, 8: 2}


# K-quants (ggml-quants.c): one block = 256 values of a row.
#   block_q4_K (144 B): d fp16, dmin fp16, scales[12] (8 6-bit scales, 8 6-bit mins), qs[128]:
#     value 64 g + l in the low nibble of qs[32 g + l], value 64 g + 32 + l in its high nibble;
#     w = d * sc[v / 32] * q - dmin * m[v / 32].
#   block_q6_K (210 B): ql[128], qh[64], scales[16] int8, d fp16; in half h of 128 values, value
#     32 s + l has low bits in ql[64 h + l + 32 (s & 1)] (low nibble for s < 2) and high bits at
#     bit 2 s of qh[32 h + l]; w = d * scales[v / 16] * (q - 32).
# Packed per 16-row tile and super-block (see cpp/kernels/src/kernels.h): Q4_K: d[16], dmin[16]
# fp16, then 8 sub-blocks of codes[16 kk][16 rows] (Q4 nibble layout), sc[16] u8, m[16] u8.
# Q6_K: d[16] fp16, then 8 sub-blocks of lo[16 kk][16] (low 4 bits, Q4 nibble layout),
# hi[8 j][16] (2-bit high parts of values j, j+8, j+16, j+24 at bits 0, 2, 4, 6), sc[2][16] i8.
_K_BLOCK_BYTES = {12: 144, 14: 210}
_K_TILE_BYTES = {12: 2368, 14: 3360}


def _gguf_block_values(ggml_type: int) -> int:
    return 256 if ggml_type in _K_BLOCK_BYTES else 32


def _k_decode(raw: torch.Tensor, ggml_type: int, n: int, k: int) -> dict[str, torch.Tensor]:
    """raw K-quant blocks [n, k/256 * bytes] -> q [n, nsb, 256] int64 (unsigned codes), scales
    (Q4_K sc/m [n, nsb, 8], Q6_K sc [n, nsb, 16]) int64, d (and dmin) as raw fp16 bits [n, nsb, 2]."""
    bb, nsb = _K_BLOCK_BYTES[ggml_type], k // 256
    if raw.dtype != torch.uint8 or tuple(raw.shape) != (n, nsb * bb):
        raise ValueError(f"GGUF blocks: expected uint8 [{n}, {nsb * bb}], got {raw.dtype} {list(raw.shape)}")
    b = raw.reshape(n, nsb, bb)
    if ggml_type == 12:
        s = b[..., 4:16].long()
        d_, m_, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
        sc = torch.cat((d_ & 63, (md & 15) | ((d_ >> 6) << 4)), dim=-1)            # [n, nsb, 8]
        mn = torch.cat((m_ & 63, (md >> 4) | ((m_ >> 6) << 4)), dim=-1)
        qs = b[..., 16:].long().reshape(n, nsb, 4, 1, 32)
        q = torch.cat((qs & 15, qs >> 4), dim=3).reshape(n, nsb, 256)
        return {"q": q, "sc": sc, "m": mn, "d": b[..., 0:2], "dmin": b[..., 2:4]}
    ql = b[..., :128].long().reshape(n, nsb, 2, 64)
    qh = b[..., 128:192].long().reshape(n, nsb, 2, 1, 32)
    lo = torch.cat((ql & 15, ql >> 4), dim=-1)                                       # [n, nsb, 2, 128]
    hi = torch.cat([(qh >> (2 * i)) & 3 for i in range(4)], dim=3).reshape(n, nsb, 2, 128)
    q = (lo | (hi << 4)).reshape(n, nsb, 256)
    sc = b[..., 192:208].contiguous().view(torch.int8).long()                        # [n, nsb, 16]
    return {"q": q, "sc": sc, "d": b[..., 208:210]}


def _f16(bits: torch.Tensor) -> torch.Tensor:
    return bits.contiguous().view(torch.float16).float().squeeze(-1)


def _k_check_finite(dec: dict[str, torch.Tensor], nsb: int) -> None:
    bad = ~torch.isfinite(_f16(dec["d"]))
    if "dmin" in dec:
        bad |= ~torch.isfinite(_f16(dec["dmin"]))
    idx = bad.reshape(-1).nonzero()
    if idx.numel():
        i = int(idx[0])
        raise ValueError(f"malformed block: row {i // nsb}, block {i % nsb} has a non-finite scale")


def gguf_dequantize(raw: torch.Tensor, ggml_type: int, n: int, k: int) -> torch.Tensor:
    """raw GGUF blocks [n, row_bytes] uint8 (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) -> [n, k] float32,
    following ggml's block formats (the oracle of the repack and of the kernels)."""
    if ggml_type in _K_BLOCK_BYTES:
        if k % 256:
            raise ValueError(f"gguf_dequantize: k={k} is not a multiple of 256")
        dec, nsb = _k_decode(raw, ggml_type, n, k), k // 256
        d = _f16(dec["d"])                                                        # [n, nsb]
        if ggml_type == 12:
            ds = (d[..., None] * dec["sc"].float())[..., None]                      # [n, nsb, 8, 1]
            ms = (_f16(dec["dmin"])[..., None] * dec["m"].float())[..., None]
            w = ds * dec["q"].reshape(n, nsb, 8, 32).float() - ms
        else:
            ds = (d[..., None] * dec["sc"].float())[..., None]                      # [n, nsb, 16, 1]
            w = ds * (dec["q"] - 32).reshape(n, nsb, 16, 16).float()
        return w.reshape(n, k)
    if ggml_type not in _GGUF_BLOCK_BYTES or k % 32:
        raise ValueError(f"gguf_dequantize: ggml type {ggml_type} with k={k} is not supported")
    bb, nkb = _GGUF_BLOCK_BYTES[ggml_type], k // 32
    b = raw.reshape(n, nkb, bb)
    d = b[..., 0:2].contiguous().view(torch.float16).float()                        # [n, nkb, 1]
    if ggml_type == 8:
        return (b[..., 2:].contiguous().view(torch.int8).float() * d).reshape(n, k)
    qs = b[..., _GGUF_QS_START[ggml_type]:].long()
    q = torch.cat((qs & 15, qs >> 4), dim=-1)                                       # [n, nkb, 32]
    if ggml_type == 3:
        return (d * q.float() + b[..., 2:4].contiguous().view(torch.float16).float()).reshape(n, k)
    return (d * (q - 8).float()).reshape(n, k)


def _k_repack(raw: torch.Tensor, ggml_type: int, n: int, k: int) -> torch.Tensor:
    dec, nsb = _k_decode(raw, ggml_type, n, k), k // 256
    _k_check_finite(dec, nsb)
    n_pad = (n + 15) // 16 * 16
    nt = n_pad // 16

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat((t, t.new_zeros(n_pad - n, *t.shape[1:]))) if n_pad != n else t

    def tiled(t: torch.Tensor) -> torch.Tensor:      # [n, nsb, *rest] -> [nt, nsb, *rest, 16 rows]
        t = pad(t).reshape(nt, 16, *t.shape[1:])
        return t.permute(0, 2, *range(3, t.dim()), 1)

    q = tiled(dec["q"].reshape(n, nsb, 8, 32))                                        # [nt, nsb, 8, 32, 16]
    d = tiled(dec["d"]).transpose(-1, -2).reshape(nt, nsb, 32)                        # fp16 bytes per row
    if ggml_type == 12:
        codes = (q[..., :16, :] | (q[..., 16:, :] << 4)).reshape(nt, nsb, 8, 256)
        sub = torch.cat((codes, tiled(dec["sc"]), tiled(dec["m"])), dim=-1)          # [nt, nsb, 8, 288]
        dmin = tiled(dec["dmin"]).transpose(-1, -2).reshape(nt, nsb, 32)
        head = torch.cat((d.long(), dmin.long()), dim=-1)
    else:
        lo, hb = q & 15, q >> 4
        codes = (lo[..., :16, :] | (lo[..., 16:, :] << 4)).reshape(nt, nsb, 8, 256)
        hi = (hb[..., 0:8, :] | (hb[..., 8:16, :] << 2) | (hb[..., 16:24, :] << 4)
              | (hb[..., 24:32, :] << 6)).reshape(nt, nsb, 8, 128)
        sc = tiled(dec["sc"].reshape(n, nsb, 8, 2)).reshape(nt, nsb, 8, 32) & 0xFF  # int8 bytes
        sub = torch.cat((codes, hi, sc), dim=-1)                                       # [nt, nsb, 8, 416]
        head = d.long()
    out = torch.cat((head, sub.reshape(nt, nsb, -1)), dim=-1)
    return out.to(torch.uint8).reshape(-1).contiguous()


def _k_unpack(packed: torch.Tensor, ggml_type: int, n: int, k: int) -> torch.Tensor:
    nsb, n_pad = k // 256, (n + 15) // 16 * 16
    t = packed.reshape(n_pad // 16, nsb, _K_TILE_BYTES[ggml_type])
    d = t[..., :32].contiguous().view(torch.float16).float()                        # [nt, nsb, 16]
    if ggml_type == 12:
        dmin = t[..., 32:64].contiguous().view(torch.float16).float()
        sub = t[..., 64:].reshape(*t.shape[:2], 8, 288)
        c = sub[..., :256].reshape(*t.shape[:2], 8, 16, 16)
        q = torch.cat((c & 15, c >> 4), dim=-2).float()                               # [nt, nsb, 8, 32, 16]
        ds = d[:, :, None, :] * sub[..., 256:272].float()                             # [nt, nsb, 8, 16]
        ms = dmin[:, :, None, :] * sub[..., 272:288].float()
        w = ds[..., None, :] * q - ms[..., None, :]
    else:
        sub = t[..., 32:].reshape(*t.shape[:2], 8, 416)
        c = sub[..., :256].reshape(*t.shape[:2], 8, 16, 16)
        lo = torch.cat((c & 15, c >> 4), dim=-2).long()                               # [.., 32, 16]
        h = sub[..., 256:384].reshape(*t.shape[:2], 8, 8, 16).long()
        hi = torch.cat([(h >> (2 * i)) & 3 for i in range(4)], dim=-2)                 # [.., 32, 16]
        sc = sub[..., 384:416].contiguous().view(torch.int8).reshape(*t.shape[:2], 8, 2, 16).float()
        ds = (d[:, :, None, None, :] * sc).repeat_interleave(16, dim=-2)              # [.., 32, 16]
        w = ds * ((lo | (hi << 4)) - 32).float()
    return w.permute(0, 4, 1, 2, 3).reshape(n_pad, k)[:n]                              # [n, k]


def gguf_repack(raw: torch.Tensor, ggml_type: int, n: int, k: int) -> torch.Tensor:
    """raw[n, k/qk * block_bytes] uint8 GGUF blocks (Q4_0, Q4_1, Q8_0; Q4_K, Q6_K with qk = 256)
    -> packed uint8 bytes. A block whose scale (or Q4_1 / Q4_K minimum) is not finite raises
    ValueError naming row and block."""
    if ggml_type in _K_BLOCK_BYTES and k % 256 == 0:
        return _k_repack(raw, ggml_type, n, k)
    if ggml_type not in _GGUF_BLOCK_BYTES or k % 32:
        raise ValueError(f"gguf_repack: ggml type {ggml_type} with k={k} is not supported")
    bb, nkb = _GGUF_BLOCK_BYTES[ggml_type], k // 32
    if raw.dtype != torch.uint8 or tuple(raw.shape) != (n, nkb * bb):
        raise ValueError(f"GGUF blocks: expected uint8 [{n}, {nkb * bb}], got {raw.dtype} {list(raw.shape)}")
    blocks = raw.reshape(n, nkb, bb)
    scales = blocks[:, :, :4 if ggml_type == 3 else 2].contiguous().view(torch.float16).float()
    bad = (~torch.isfinite(scales)).any(dim=-1).reshape(-1).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"malformed block: row {i // nkb}, block {i % nkb} has a non-finite scale")
    n_pad = (n + 15) // 16 * 16
    if n_pad != n:
        blocks = torch.cat((blocks, blocks.new_zeros(n_pad - n, nkb, bb)))
    tiles = blocks.reshape(n_pad // 16, 16, nkb, bb).permute(0, 2, 1, 3)       # [tiles, nkb, 16, bb]
    qs = tiles[..., _GGUF_QS_START[ggml_type]:].transpose(-1, -2)              # [tiles, nkb, 16|32, 16]
    parts = [qs.reshape(*qs.shape[:2], -1), tiles[..., 0:2].reshape(*qs.shape[:2], -1)]
    if ggml_type == 3:
        parts.append(tiles[..., 2:4].reshape(*qs.shape[:2], -1))
    return torch.cat(parts, dim=-1).reshape(-1).contiguous()


def gguf_unpack(packed: torch.Tensor, ggml_type: int, n: int, k: int) -> torch.Tensor:
    """The packed weight dequantized: [n, k] float32, equal to dequantizing the GGUF blocks."""
    if ggml_type in _K_BLOCK_BYTES:
        return _k_unpack(packed, ggml_type, n, k)
    nkb, n_pad = k // 32, (n + 15) // 16 * 16
    code_bytes = 512 if ggml_type == 8 else 256
    bt = code_bytes + (64 if ggml_type == 3 else 32)
    t = packed.reshape(n_pad // 16, nkb, bt)
    d = t[..., code_bytes:code_bytes + 32].contiguous().view(torch.float16).float()   # [tiles, nkb, 16]
    if ggml_type == 8:
        q = t[..., :512].contiguous().view(torch.int8).reshape(*t.shape[:2], 32, 16).float()
        w = q * d[:, :, None, :]                                                    # [tiles, nkb, 32, 16]
    else:
        c = t[..., :256].reshape(*t.shape[:2], 16, 16)
        q = torch.cat((c & 0x0F, c >> 4), dim=2)                                    # [tiles, nkb, 32, 16]
        if ggml_type == 3:
            m = t[..., 288:320].contiguous().view(torch.float16).float()
            w = d[:, :, None, :] * q.float() + m[:, :, None, :]
        else:
            w = d[:, :, None, :] * (q.to(torch.int8) - 8).float()
    return w.permute(0, 3, 1, 2).reshape(n_pad, k)[:n]                              # [n, k]


def gguf_matmul(x: torch.Tensor, packed: torch.Tensor, ggml_type: int, n: int, k: int) -> torch.Tensor:
    """x[T, K] @ W^T -> [T, N] float32 with W the dequantized packed weight (dequantize, then matmul)."""
    return x.float() @ gguf_unpack(packed, ggml_type, n, k).T


def gguf_embedding(ids: torch.Tensor, packed: torch.Tensor, ggml_type: int, n: int, k: int) -> torch.Tensor:
    """Rows ``ids[T]`` of the dequantized packed weight: [T, K] float32."""
    return gguf_unpack(packed, ggml_type, n, k)[ids.reshape(-1).long()]


# --- Quantized linears (W8A8, W4A16): dequantize, then matmul in float32 ---------------------
def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x[T, K] -> (xq[T, K] int8, scale[T] float32), symmetric per row: x ~= xq * scale[:, None]."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp(min=1e-8) / 127.0                       # [T]
    xq = torch.round(xf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return xq, scale


def w8a8_matmul(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                act_mul: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8: x[T, K] (times ``act_mul[K]``, the folded inverse SmoothQuant factors, when given) is
    quantized per token to int8; y[T, N] = (xq * sx) @ (qweight[N, K] int8 * w_scale[N])^T, float32."""
    xf = x.float() if act_mul is None else x.float() * act_mul.float()
    xq, sx = quantize_per_token_int8(xf)
    w = qweight.float() * w_scale.float()[:, None]                              # [N, K]
    return (xq.float() * sx[:, None]) @ w.T


def w4a16_unpack(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """qweight[N, K/2] uint8 (low nibble = even k, high nibble = odd k) -> codes[N, K] uint8 in 0..15."""
    lo, hi = qweight & 0x0F, qweight >> 4
    return torch.stack((lo, hi), dim=-1).reshape(qweight.shape[0], -1)[:, :k]


def w4a16_pack(codes: torch.Tensor) -> torch.Tensor:
    """codes[N, K] (0..15, K even) -> qweight[N, K/2] uint8; the inverse of ``w4a16_unpack``."""
    c = codes.to(torch.uint8).reshape(codes.shape[0], -1, 2)
    return (c[..., 0] | (c[..., 1] << 4)).contiguous()


def w4a16_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """W[N, K] float32 = (code - zero[n, k // G]) * scale[n, k // G]; scales, zeros: [N, K/G]."""
    k = scales.shape[1] * group_size
    q = w4a16_unpack(qweight, k).float()                                        # [N, K]
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    return (q - z) * s


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """x[T, K] @ W^T -> [T, N] float32, W the dequantized group-wise 4-bit weight."""
    return x.float() @ w4a16_dequantize(qweight, scales, zeros, group_size).T


# --- FP8 linears (e4m3 weights per output channel, activations per token, both dynamic scales) ---
FP8_MAX = 448.0   # the largest finite float8_e4m3fn


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x[R, K] -> (xq[R, K] float8_e4m3fn, scale[R] float32), symmetric per row: x ~= xq * scale[:, None]
    (round to nearest even, saturated at +-448). Used for weights (rows = output channels) and for
    activations (rows = tokens)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX                    # [R]
    xq = (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq, scale


def fp8_matmul(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """FP8: x[T, K] is quantized per token to e4m3; y[T, N] = (xq * sx) @ (qweight[N, K] e4m3 *
    w_scale[N])^T, accumulated in float32, returned in x's dtype."""
    xq, sx = quantize_fp8_rows(x)
    w = qweight.float() * w_scale.float()[:, None]                              # [N, K]
    return ((xq.float() * sx[:, None]) @ w.T).to(x.dtype)


# --- Quantized KV cache (int8, fp8 e4m3) ------------------------------------------------------
# A quantized cache is [2, num_blocks, block_size, Hk, D + 4] of int8 or float8_e4m3fn: each head
# of each token holds D codes and, in its last 4 bytes, its own float32 scale (per-head scales,
# computed when the token is written): value = code * scale.
KV_QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)
KV_SCALE_BYTES = 4
_KV_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def kv_quantize(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x[..., D] -> [..., D + 4] of ``dtype``: codes then the float32 scale's bytes."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / _KV_QMAX[dtype]   # [..., 1]
    y = xf / scale
    codes = torch.round(y).clamp(-127, 127).to(dtype) if dtype == torch.int8 else y.to(dtype)
    return torch.cat((codes, scale.contiguous().view(dtype)), dim=-1)


def kv_dequantize(cached: torch.Tensor) -> torch.Tensor:
    """[..., D + 4] quantized entries -> [..., D] float32."""
    d = cached.shape[-1] - KV_SCALE_BYTES
    scale = cached[..., d:].contiguous().view(torch.float32)                    # [..., 1]
    return cached[..., :d].float() * scale


def write_kv_cache_quant(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> None:
    """``write_kv_cache`` into a quantized cache: key, value[T, Hk, D] are quantized per head."""
    write_kv_cache(kv_quantize(key, kv_cache.dtype), kv_quantize(value, kv_cache.dtype), kv_cache,
                   slot_mapping)


def rotary_embedding_write_kv_quant(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                    value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                                    head_dim: int, cos_sin_cache: torch.Tensor,
                                    is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary_embedding_write_kv`` into a quantized cache."""
    q, k = rotary_embedding(positions, query, key, head_dim, cos_sin_cache, is_neox)
    t = k.shape[0]
    write_kv_cache_quant(k.view(t, -1, head_dim), value.reshape(t, -1, head_dim), kv_cache, slot_mapping)
    return q, k


def paged_attention_quant(query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: "AttentionMetadata",
                          scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """``paged_attention`` over a quantized cache: each request's context is dequantized, then attended."""
    assert kv_cache.dtype in KV_QUANT_DTYPES, kv_cache.dtype
    return paged_attention(query, kv_cache, attn_metadata, scale, sliding_window)



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
