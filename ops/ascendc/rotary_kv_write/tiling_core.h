// SPDX-License-Identifier: Apache-2.0
// Tiling of RotaryKvWrite (rotary embedding of q and k, then K and V into the paged cache at each
// token's slot; ops.rotary_embedding_write_kv): pure C++17, shared by the CANN op_host adapter and
// the CPU tests. Tokens are split over the vector cores; each head row (head_dim elements) is one
// UB tile, so head_dim * sizeof(T) must be a multiple of 32 bytes.
#pragma once

#include <cstdint>

#include "../common/tiling_common.h"

namespace mindie_ascendc {

struct RotaryKvWriteTilingData {
  uint32_t num_tokens;
  uint32_t num_q_heads;
  uint32_t num_kv_heads;
  uint32_t head_dim;
  uint32_t rot_dim;         // rotated leading dims of each head (even, <= head_dim)
  uint32_t is_neox;         // 1: rotate halves; 0: rotate adjacent pairs (GPT-J / interleaved)
  uint32_t dtype_bytes;
  uint32_t block_dim;
  uint32_t tokens_per_block;
  uint32_t cs_tile;         // floats of the cos/sin tile: AlignUp(rot_dim, 8) + 16 (constants 1, 0)
  uint64_t num_slots;       // num_blocks * block_size of the cache
  uint64_t max_position;    // rows of cos_sin_cache
};

// 4 T head tiles (in/out double-buffered), 8 fp32/uint32 head-sized tiles (x, swapped x, cos,
// sin, sign, 3 gather tables), the cos/sin row.
constexpr uint64_t RotaryKvWriteUbBytes(uint32_t head_dim, uint32_t dtype_bytes, uint32_t cs_tile) {
  return 4 * AlignUp(uint64_t(head_dim) * dtype_bytes, kUbAlign) + 8 * AlignUp(uint64_t(head_dim) * 4, kUbAlign) +
         AlignUp(uint64_t(cs_tile) * 4, kUbAlign);
}

inline RotaryKvWriteTilingData ComputeRotaryKvWriteTiling(uint32_t tokens, uint32_t q_heads, uint32_t kv_heads,
                                                          uint32_t head_dim, uint32_t rot_dim, bool is_neox,
                                                          uint32_t dtype_bytes, uint64_t num_slots,
                                                          uint64_t max_position, const CoreInfo& core) {
  CheckDtype(dtype_bytes, "rotary_kv_write");
  CheckCores(core, "rotary_kv_write");
  if (q_heads == 0 || kv_heads == 0 || q_heads % kv_heads != 0) {
    throw TilingError("rotary_kv_write: num_q_heads must be a positive multiple of num_kv_heads");
  }
  if (head_dim == 0 || (uint64_t(head_dim) * dtype_bytes) % kUbAlign != 0) {
    throw TilingError("rotary_kv_write: head_dim * sizeof(dtype) must be a multiple of 32 bytes");
  }
  if (rot_dim < 2 || rot_dim % 2 != 0 || rot_dim > head_dim) {
    throw TilingError("rotary_kv_write: rot_dim must be even and in [2, head_dim]");
  }
  RotaryKvWriteTilingData t{};
  t.num_tokens = tokens;
  t.num_q_heads = q_heads;
  t.num_kv_heads = kv_heads;
  t.head_dim = head_dim;
  t.rot_dim = rot_dim;
  t.is_neox = is_neox ? 1 : 0;
  t.dtype_bytes = dtype_bytes;
  t.cs_tile = static_cast<uint32_t>(AlignUp(rot_dim, 8) + 16);
  t.num_slots = num_slots;
  t.max_position = max_position;
  if (RotaryKvWriteUbBytes(head_dim, dtype_bytes, t.cs_tile) > core.ub_bytes) {
    throw TilingError("rotary_kv_write: head_dim too large for the UB");
  }
  RowSplit s = SplitRows(tokens, core.vector_cores);
  t.block_dim = s.block_dim;
  t.tokens_per_block = s.rows_per_block;
  return t;
}

}  // namespace mindie_ascendc
