// SPDX-License-Identifier: Apache-2.0
// Entry points of the CPU kernels (raw pointers; the Python side checks shapes, dtypes and
// contiguity before calling). Threads come from one process-wide pool (set_threads).
#pragma once
#include <cstdint>
#include <string>

namespace mindie_kernels {

void set_threads(int n_threads, int spin_us);
int num_threads();
// "avx512", "avx2" or "portable"; set_isa forces one (tests compare them).
const char* isa();
void set_isa(const std::string& name);

std::int64_t packed_bytes(int qtype, std::int64_t n, std::int64_t k);
// raw: [n, k/32 GGUF blocks]; returns -1, or the first (row * nkb + block) whose scale is not finite.
std::int64_t pack(const std::uint8_t* raw, int qtype, std::int64_t n, std::int64_t k, std::uint8_t* out);
// y[t, n] = x[t, k] @ W^T for the packed W.
void gemm(const float* x, std::int64_t t, std::int64_t ldx, const std::uint8_t* w, int qtype,
          std::int64_t n, std::int64_t k, float* y, std::int64_t ldy);
// out[i, :] = row ids[i] of the dequantized W (ids checked by the caller).
void dequant_rows(const std::uint8_t* w, int qtype, std::int64_t n, std::int64_t k,
                  const std::int64_t* ids, std::int64_t n_ids, float* out);
// Paged attention of T query tokens (decodes and prefill chunks alike): token i attends
// positions [window start, token_len[i]) of request token_req[i]. Returns -1, or the first token
// whose request, length or block ids are out of range (nothing computed then).
std::int64_t paged_attention(const float* q, const float* cache, const std::int32_t* block_tables,
                             std::int64_t ldbt, std::int64_t n_reqs, const std::int32_t* token_req,
                             const std::int32_t* token_len, float* out, std::int64_t t,
                             std::int64_t nblocks, std::int64_t bs, std::int64_t hq, std::int64_t hk,
                             std::int64_t d, float scale, std::int64_t window);
// Rotates q and k in place (qkv rows of stride ldqkv: [Hq + 2 Hk, D]) and writes k, v to the cache
// at slots (negative slots are skipped); n_slots = num_blocks * block_size (one plane).
// Returns -1, or the first token whose slot or position is out of range (nothing written then).
std::int64_t rope_write_kv(float* qkv, std::int64_t t, std::int64_t ldqkv, const std::int64_t* positions,
                   const float* cos_sin, std::int64_t rot, bool neox, std::int64_t hq, std::int64_t hk,
                   std::int64_t d, float* cache, std::int64_t n_slots, const std::int64_t* slots,
                           std::int64_t max_pos);
// res_out = x + res (if res); out = res_out * rsqrt(mean(res_out^2) + eps) * w.
void add_rms_norm(const float* x, const float* res, const float* w, float eps, std::int64_t t,
                  std::int64_t h, float* out, float* res_out);

// out[r, j] = silu(x[r, j]) * x[r, i + j] for x rows [gate | up] of stride ldx, out [t, i] contiguous.
void silu_and_mul(const float* x, std::int64_t t, std::int64_t i, std::int64_t ldx, float* out);

}  // namespace mindie_kernels
