// SPDX-License-Identifier: Apache-2.0
// Tiling of SwiGLU (y = silu(a) * b with x = cat(a, b) on the last dim; torch_npu.npu_swiglu with
// dim=-1): pure C++17, shared by the CANN op_host adapter and the CPU tests. Rows over cores,
// the half-width I in column tiles.
#pragma once

#include <cstdint>

#include "../common/tiling_common.h"

namespace mindie_ascendc {

struct SwiGluTilingData {
  uint32_t num_row;
  uint32_t half_col;        // I: x has 2*I columns, y has I
  uint32_t block_dim;
  uint32_t rows_per_block;
  uint32_t col_tile;
  uint32_t num_col_tiles;
  uint32_t last_col_tile;
  uint32_t dtype_bytes;
};

// UB bytes for a tile of c: 3 double-buffered T queues (a, b, y) + 3 fp32 work tiles.
constexpr uint64_t SwiGluUbBytes(uint64_t c, uint32_t dtype_bytes) {
  return 6 * AlignUp(c * dtype_bytes, kUbAlign) + 3 * AlignUp(c * 4, kUbAlign);
}

inline SwiGluTilingData ComputeSwiGluTiling(uint32_t rows, uint32_t cols, uint32_t dtype_bytes, const CoreInfo& core) {
  CheckDtype(dtype_bytes, "swiglu");
  CheckCores(core, "swiglu");
  if (cols == 0 || cols % 2 != 0) throw TilingError("swiglu: the last dimension must be even and > 0");
  const uint32_t half = cols / 2;
  const uint32_t align = TileAlign(dtype_bytes);
  const uint64_t per_elem = 6 * dtype_bytes + 12;
  uint64_t c_max = AlignDown(core.ub_bytes / per_elem, align);
  while (c_max > align && SwiGluUbBytes(c_max, dtype_bytes) > core.ub_bytes) c_max -= align;
  if (c_max < align) throw TilingError("swiglu: UB too small for one tile");
  SwiGluTilingData t{};
  t.num_row = rows;
  t.half_col = half;
  t.dtype_bytes = dtype_bytes;
  const uint64_t padded = AlignUp(half, align);
  if (padded <= c_max) {
    t.col_tile = static_cast<uint32_t>(padded);
    t.num_col_tiles = 1;
    t.last_col_tile = half;
  } else {
    t.col_tile = static_cast<uint32_t>(c_max);
    t.num_col_tiles = static_cast<uint32_t>(CeilDiv(half, c_max));
    t.last_col_tile = half - (t.num_col_tiles - 1) * t.col_tile;
  }
  RowSplit s = SplitRows(rows, core.vector_cores);
  t.block_dim = s.block_dim;
  t.rows_per_block = s.rows_per_block;
  return t;
}

}  // namespace mindie_ascendc
