// SPDX-License-Identifier: Apache-2.0
// Tiling of paged decode attention with split-KV (FlashDecoding): pure C++17, shared by the CANN
// op_host adapter and the CPU tests.
//
// Phase 1 (split): work item (request b, KV head g, split s) attends the G = Hq / Hk query heads
// of g over KV positions [s * split_len, min((s + 1) * split_len, context_len)) in chunks of
// `chunk` tokens (a chunk never crosses a cache block) with an online softmax, and writes one
// record per query head to the workspace: acc[D] (unnormalized), m (x8), l (x8), i.e.
// record = D + 16 floats at ((b * Hq + h) * num_splits + s) * record.
// Phase 2 (combine): per (b, h), out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
// split_len = blocks_per_split * block_size; the number of splits is chosen so that
// B * Hk * num_splits work items fill the vector cores (tests can force it).
#pragma once

#include <cstdint>

#include "../common/tiling_common.h"

namespace mindie_ascendc {

struct PagedDecodeTilingData {
  uint32_t num_seqs;
  uint32_t num_q_heads;
  uint32_t num_kv_heads;
  uint32_t head_dim;
  uint32_t block_size;
  uint32_t max_blocks_per_seq;  // block table width
  uint32_t dtype_bytes;
  uint32_t num_splits;
  uint32_t blocks_per_split;
  uint32_t chunk;               // KV tokens per UB tile (a power of two dividing block_size)
  uint32_t split_block_dim;
  uint32_t items_per_block;     // phase 1: B * Hk * num_splits items
  uint32_t combine_block_dim;
  uint32_t combine_per_block;   // phase 2: B * Hq items
  uint32_t record;              // floats per partial record: head_dim + 16
  float scale;
  uint64_t num_cache_blocks;
  uint64_t workspace_bytes;
};

constexpr uint32_t kMaxGroup = 64;  // Hq / Hk (torch_npu documents the same bound for GQA)

constexpr uint64_t PagedSplitUbBytes(uint32_t G, uint32_t D, uint32_t db, uint32_t chunk) {
  return AlignUp(uint64_t(G) * D * db, kUbAlign) + 2 * AlignUp(uint64_t(G) * D * 4, kUbAlign) +
         4 * AlignUp(uint64_t(chunk) * D * db, kUbAlign) + 2 * AlignUp(uint64_t(chunk) * D * 4, kUbAlign) +
         uint64_t(G) * AlignUp(uint64_t(chunk) * 4, kUbAlign) + AlignUp(uint64_t(D) * 4, kUbAlign) +
         AlignUp(uint64_t(D > chunk ? D : chunk) * 4, kUbAlign) + kUbAlign + 2 * AlignUp(uint64_t(D + 16) * 4, kUbAlign);
}

constexpr uint64_t PagedCombineUbBytes(uint32_t S, uint32_t D, uint32_t db) {
  return 2 * AlignUp(uint64_t(S) * (D + 16) * 4, kUbAlign) + 2 * AlignUp(uint64_t(D) * db, kUbAlign) +
         AlignUp(uint64_t(D) * 4, kUbAlign) + AlignUp(uint64_t(S) * 4, kUbAlign) + kUbAlign;
}

inline PagedDecodeTilingData ComputePagedDecodeTiling(uint32_t seqs, uint32_t q_heads, uint32_t kv_heads,
                                                      uint32_t head_dim, uint32_t block_size,
                                                      uint32_t max_blocks_per_seq, uint64_t num_cache_blocks,
                                                      uint32_t dtype_bytes, float scale, const CoreInfo& core,
                                                      uint32_t forced_splits = 0) {
  CheckDtype(dtype_bytes, "paged_decode_attention");
  CheckCores(core, "paged_decode_attention");
  if (q_heads == 0 || kv_heads == 0 || q_heads % kv_heads != 0 || q_heads / kv_heads > kMaxGroup) {
    throw TilingError("paged_decode_attention: num_heads must be a multiple of num_kv_heads, at most 64x");
  }
  if (head_dim == 0 || (uint64_t(head_dim) * dtype_bytes) % kUbAlign != 0) {
    throw TilingError("paged_decode_attention: head_dim * sizeof(dtype) must be a multiple of 32 bytes");
  }
  if (block_size == 0 || (block_size & (block_size - 1)) != 0) {
    throw TilingError("paged_decode_attention: block_size must be a power of two");
  }
  if (max_blocks_per_seq == 0 || seqs == 0) throw TilingError("paged_decode_attention: empty batch or block table");
  if ((uint64_t(kv_heads - 1) * head_dim * dtype_bytes) / kUbAlign > 65535) {
    throw TilingError("paged_decode_attention: KV row stride exceeds the DataCopy stride field");
  }
  PagedDecodeTilingData t{};
  t.num_seqs = seqs;
  t.num_q_heads = q_heads;
  t.num_kv_heads = kv_heads;
  t.head_dim = head_dim;
  t.block_size = block_size;
  t.max_blocks_per_seq = max_blocks_per_seq;
  t.dtype_bytes = dtype_bytes;
  t.scale = scale;
  t.num_cache_blocks = num_cache_blocks;
  t.record = head_dim + 16;
  const uint32_t G = q_heads / kv_heads;
  uint32_t chunk = block_size;
  while (chunk > 1 && PagedSplitUbBytes(G, head_dim, dtype_bytes, chunk) > core.ub_bytes) chunk /= 2;
  if (PagedSplitUbBytes(G, head_dim, dtype_bytes, chunk) > core.ub_bytes) {
    throw TilingError("paged_decode_attention: one KV token of this head group does not fit the UB");
  }
  t.chunk = chunk;
  const uint64_t pairs = uint64_t(seqs) * kv_heads;
  uint64_t want = forced_splits ? forced_splits : CeilDiv(core.vector_cores, pairs);
  if (want > max_blocks_per_seq) want = max_blocks_per_seq;
  if (want == 0) want = 1;
  t.blocks_per_split = static_cast<uint32_t>(CeilDiv(max_blocks_per_seq, want));
  t.num_splits = static_cast<uint32_t>(CeilDiv(max_blocks_per_seq, t.blocks_per_split));
  while (PagedCombineUbBytes(t.num_splits, head_dim, dtype_bytes) > core.ub_bytes) {  // fewer, longer splits
    t.blocks_per_split *= 2;
    t.num_splits = static_cast<uint32_t>(CeilDiv(max_blocks_per_seq, t.blocks_per_split));
  }
  const uint64_t items = pairs * t.num_splits;
  RowSplit s1 = SplitRows(items, core.vector_cores);
  t.split_block_dim = s1.block_dim;
  t.items_per_block = s1.rows_per_block;
  RowSplit s2 = SplitRows(uint64_t(seqs) * q_heads, core.vector_cores);
  t.combine_block_dim = s2.block_dim;
  t.combine_per_block = s2.rows_per_block;
  t.workspace_bytes = uint64_t(seqs) * q_heads * t.num_splits * t.record * 4;
  return t;
}

}  // namespace mindie_ascendc
