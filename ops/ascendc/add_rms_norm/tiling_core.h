// SPDX-License-Identifier: Apache-2.0
// Tiling of AddRmsNorm (y = rms_norm(x1 + x2) * gamma, x = x1 + x2, rstd per row): pure C++17,
// shared by the CANN op_host adapter and the CPU tests.
//
// Rows are split over the vector cores; each row is processed in column tiles of `col_tile`
// elements. When one tile holds the whole row (num_col_tiles == 1) the kernel makes one pass per
// row; otherwise it makes two (sum of squares, then normalize), re-reading x1 and x2.
#pragma once

#include <cstdint>

#include "../common/tiling_common.h"

namespace mindie_ascendc {

struct AddRmsNormTilingData {
  uint32_t num_row;
  uint32_t num_col;
  uint32_t block_dim;
  uint32_t rows_per_block;  // every block but the last
  uint32_t col_tile;        // columns per UB tile (a multiple of TileAlign)
  uint32_t num_col_tiles;
  uint32_t last_col_tile;   // columns in the last tile (<= col_tile)
  uint32_t dtype_bytes;     // 2 (float16) or 4 (float32)
  float epsilon;
  float avg_factor;         // 1 / num_col
};

// UB bytes the kernel carves for a column tile of `c` elements (must match op_kernel's InitBuffer
// calls): 4 double-buffered T queues (x1, x2, y, x), gamma, 3 fp32 work tiles, rstd queue, scalar.
constexpr uint64_t AddRmsNormUbBytes(uint64_t c, uint32_t dtype_bytes) {
  return 8 * AlignUp(c * dtype_bytes, kUbAlign) + AlignUp(c * dtype_bytes, kUbAlign) + 3 * AlignUp(c * 4, kUbAlign) +
         2 * kUbAlign + kUbAlign;
}

inline AddRmsNormTilingData ComputeAddRmsNormTiling(uint32_t rows, uint32_t cols, uint32_t dtype_bytes, float eps,
                                                    const CoreInfo& core) {
  CheckDtype(dtype_bytes, "add_rms_norm");
  CheckCores(core, "add_rms_norm");
  if (cols == 0) throw TilingError("add_rms_norm: the normalized dimension is empty");
  if (!(eps >= 0.0f)) throw TilingError("add_rms_norm: epsilon must be >= 0");
  const uint32_t align = TileAlign(dtype_bytes);
  // Largest aligned tile that fits: UB(c) is linear in c.
  const uint64_t per_elem = 9 * dtype_bytes + 12;
  const uint64_t fixed = 3 * kUbAlign + 4 * kUbAlign;  // scalar buffers + rounding slack
  if (core.ub_bytes <= fixed + per_elem * align) throw TilingError("add_rms_norm: UB too small for one tile");
  uint64_t c_max = AlignDown((core.ub_bytes - fixed) / per_elem, align);
  while (c_max > align && AddRmsNormUbBytes(c_max, dtype_bytes) > core.ub_bytes) c_max -= align;

  AddRmsNormTilingData t{};
  t.num_row = rows;
  t.num_col = cols;
  t.dtype_bytes = dtype_bytes;
  t.epsilon = eps;
  t.avg_factor = 1.0f / static_cast<float>(cols);
  const uint64_t padded = AlignUp(cols, align);
  if (padded <= c_max) {
    t.col_tile = static_cast<uint32_t>(padded);
    t.num_col_tiles = 1;
    t.last_col_tile = cols;
  } else {
    t.col_tile = static_cast<uint32_t>(c_max);
    t.num_col_tiles = static_cast<uint32_t>(CeilDiv(cols, c_max));
    t.last_col_tile = cols - (t.num_col_tiles - 1) * t.col_tile;
  }
  RowSplit s = SplitRows(rows, core.vector_cores);
  t.block_dim = s.block_dim;
  t.rows_per_block = s.rows_per_block;
  return t;
}

}  // namespace mindie_ascendc
