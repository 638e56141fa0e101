// SPDX-License-Identifier: Apache-2.0
// Plain C++17 helpers shared by the tiling cores (no CANN header, no emulator): what the host knows
// about the SoC (vector cores, UB bytes) and the alignment arithmetic every tiling needs. The
// CANN op_host adapters fill CoreInfo from the platform (GetCoreNumAiv, GetCoreMemSize(UB)) and
// call the same tiling functions the CPU tests call.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace mindie_ascendc {

struct CoreInfo {
  uint32_t vector_cores;  // AIV cores the kernel may use (blockDim upper bound)
  uint32_t ub_bytes;      // unified buffer per core
};

// A shape or SoC the kernel cannot handle: the op_host adapter turns it into a tiling failure.
class TilingError : public std::invalid_argument {
 public:
  explicit TilingError(const std::string& what) : std::invalid_argument(what) {}
};

constexpr uint32_t kUbAlign = 32;  // bytes: DataCopy granule, UB address alignment

constexpr uint64_t CeilDiv(uint64_t a, uint64_t b) { return (a + b - 1) / b; }
constexpr uint64_t AlignUp(uint64_t a, uint64_t b) { return CeilDiv(a, b) * b; }
constexpr uint64_t AlignDown(uint64_t a, uint64_t b) { return a / b * b; }

// Elements of a dtype in one 32-byte block, and the element count that keeps both a T tile and
// its fp32 working copy 32-byte aligned (16 for fp16, 8 for fp32).
constexpr uint32_t ElemsPerBlock(uint32_t dtype_bytes) { return kUbAlign / dtype_bytes; }
constexpr uint32_t TileAlign(uint32_t dtype_bytes) { return dtype_bytes == 2 ? 16 : 8; }

inline void CheckDtype(uint32_t dtype_bytes, const char* op) {
  if (dtype_bytes != 2 && dtype_bytes != 4) {
    throw TilingError(std::string(op) + ": dtype must be float16 (2 bytes) or float32 (4 bytes)");
  }
}

inline void CheckCores(const CoreInfo& core, const char* op) {
  if (core.vector_cores == 0 || core.ub_bytes < 1024) {
    throw TilingError(std::string(op) + ": the SoC reports no vector core or almost no UB");
  }
}

// Rows split over cores: every block but the last gets rows_per_block rows.
struct RowSplit {
  uint32_t block_dim;
  uint32_t rows_per_block;
};

inline RowSplit SplitRows(uint64_t rows, uint32_t cores) {
  if (rows == 0) return {1, 0};
  uint64_t per = CeilDiv(rows, cores);
  return {static_cast<uint32_t>(CeilDiv(rows, per)), static_cast<uint32_t>(per)};
}

}  // namespace mindie_ascendc
