// SPDX-License-Identifier: Apache-2.0
// CPU kernels of mindie_llm._cpu_kernels: matmuls on repacked GGUF blocks (Q4_0, Q4_1, Q8_0,
// Q4_K, Q6_K), decode attention over the paged KV cache, rotary + KV write, fused add + RMSNorm,
// SiLU-and-mul.
//
// Packed layout ("tile-major", 16 output rows per tile, one 32-wide GGUF block per step):
//   for tile in ceil(N / 16): for kb in K / 32:
//     Q4_0 / Q4_1: codes[16 kk][16 rows] u8 (low nibble = k kk, high nibble = k kk + 16, exactly
//                  GGUF's qs byte kk of that row), d[16] fp16, (Q4_1 only) m[16] fp16
//     Q8_0:        codes[32 k][16 rows] i8, d[16] fp16
//   K-quants, per tile and 256-value super-block (the GGUF block), 8 sub-blocks of 32 values:
//     Q4_K: d[16] fp16, dmin[16] fp16, then per sub-block: codes[16 kk][16 rows] u8 (the Q4 nibble
//           layout above), sc[16] u8, m[16] u8 (the 6-bit scales / mins, unpacked);
//           w = d * sc * q - dmin * m
//     Q6_K: d[16] fp16, then per sub-block: lo[16 kk][16 rows] u8 (low 4 bits, Q4 nibble layout),
//           hi[8 j][16 rows] u8 (2-bit high parts of values j, j+8, j+16, j+24 at bits 0, 2, 4, 6),
//           sc[2][16 rows] i8 (values 0-15, 16-31); w = d * sc * (q - 32)
//     (the same bytes as the GGUF blocks, +64 B per Q4_K tile super-block; no fp32 copy)
// Rows past N are zero. Each SIMD lane computes one output row with the same sequence of
// IEEE operations on every instruction set (fma explicitly, -ffp-contract=off), so AVX-512,
// AVX2 and the portable path give bit-identical results.
#pragma once
#include <cstddef>
#include <cstdint>

namespace mindie_kernels {

constexpr int kTileRows = 16;
constexpr int kBlock = 32;

constexpr int kSuper = 256;  // values of one K-quant block
constexpr std::size_t kQ4KSub = 256 + 32;             // one Q4_K sub-block of a tile
constexpr std::size_t kQ6KSub = 256 + 128 + 32;       // one Q6_K sub-block of a tile

enum QType : int { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14 };  // ggml type ids

inline bool is_kquant(int qtype) { return qtype == kQ4_K || qtype == kQ6_K; }
// Values of one GGUF block of this type.
inline int gguf_block_values(int qtype) { return is_kquant(qtype) ? kSuper : kBlock; }
// Bytes of one tile x one GGUF block in the packed layout.
inline std::size_t block_tile_bytes(int qtype) {
  switch (qtype) {
    case kQ4_0: return 256 + 32;
    case kQ4_1: return 256 + 64;
    case kQ8_0: return 512 + 32;
    case kQ4_K: return 64 + 8 * kQ4KSub;
    case kQ6_K: return 32 + 8 * kQ6KSub;
    default: return 0;
  }
}
inline std::size_t gguf_block_bytes(int qtype) {
  switch (qtype) {
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    case kQ8_0: return 34;
    case kQ4_K: return 144;
    case kQ6_K: return 210;
    default: return 0;
  }
}

// One work item of a matmul: output tile `tile`, activation rows [t0, t1).
struct GemmArgs {
  const float* x;        // [T, K] row stride ldx
  std::int64_t ldx;
  const std::uint8_t* w; // packed
  float* y;              // [T, N] row stride ldy
  std::int64_t ldy;
  const float* xsum;     // [T, K/32] sums of x per 32 values (Q4_0, Q4_1, Q4_K)
  std::int64_t n, k;
  int qtype;
};

struct AttnArgs {
  const float* q;            // [T, Hq, D] contiguous
  const float* cache;        // [2, nblocks, bs, Hk, D]
  const std::int32_t* block_tables;  // [B, ldbt]
  std::int64_t ldbt;
  const std::int32_t* token_req;     // [T] request (row of block_tables) of each query token
  const std::int32_t* token_len;     // [T] keys it attends: positions [0, token_len) (causal)
  float* out;                // [T, Hq, D]
  std::int64_t nblocks, bs, hq, hk, d;
  float scale;
  std::int64_t window;       // <= 0: none
};

// Implementations per instruction set (kernels_impl.h compiled three times).
namespace avx512 {
void gemm_tile(const GemmArgs& a, std::int64_t tile, std::int64_t t0, std::int64_t t1);
void silu_rows(const float* x, std::int64_t ldx, std::int64_t i, std::int64_t r0, std::int64_t r1, float* out);
void attn_item(const AttnArgs& a, std::int64_t tok, std::int64_t kvh, float* scratch);
}
namespace avx2 {
void gemm_tile(const GemmArgs& a, std::int64_t tile, std::int64_t t0, std::int64_t t1);
void silu_rows(const float* x, std::int64_t ldx, std::int64_t i, std::int64_t r0, std::int64_t r1, float* out);
void attn_item(const AttnArgs& a, std::int64_t tok, std::int64_t kvh, float* scratch);
}
namespace portable {
void gemm_tile(const GemmArgs& a, std::int64_t tile, std::int64_t t0, std::int64_t t1);
void silu_rows(const float* x, std::int64_t ldx, std::int64_t i, std::int64_t r0, std::int64_t r1, float* out);
void attn_item(const AttnArgs& a, std::int64_t tok, std::int64_t kvh, float* scratch);
}

float half_to_float(std::uint16_t h);

}  // namespace mindie_kernels
