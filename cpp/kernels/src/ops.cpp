// SPDX-License-Identifier: Apache-2.0
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <vector>

#include <unistd.h>

#include "kernels.h"
#include "thread_pool.h"

namespace mindie_kernels {

float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do { ++e; mant <<= 1; } while ((mant & 0x400u) == 0);
      bits = sign | static_cast<std::uint32_t>(127 - 15 - e) << 23 | (mant & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

namespace {

using GemmFn = void (*)(const GemmArgs&, std::int64_t, std::int64_t, std::int64_t);
using AttnFn = void (*)(const AttnArgs&, std::int64_t, std::int64_t, float*);
using SiluFn = void (*)(const float*, std::int64_t, std::int64_t, std::int64_t, std::int64_t, float*);

struct Isa {
  const char* name;
  GemmFn gemm;
  AttnFn attn;
  SiluFn silu;
};

#define MK_ISA(ns) Isa{#ns, ns::gemm_tile, ns::attn_item, ns::silu_rows}

Isa detect() {
#if defined(MINDIE_KERNELS_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return MK_ISA(avx512);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return MK_ISA(avx2);
#endif
  return MK_ISA(portable);
}

Isa& current_isa() {
  static Isa isa = detect();
  return isa;
}

struct PoolHolder {
  std::mutex mu;
  std::unique_ptr<ThreadPool> pool;
  pid_t owner = 0;  // a forked child has none of the parent's threads: it builds its own pool
  int threads = 1, spin_us = 100;
};
PoolHolder& holder() {
  static PoolHolder* h = new PoolHolder;  // never destroyed: exit must not join worker threads
  return *h;
}
ThreadPool& pool() {
  PoolHolder& h = holder();
  std::lock_guard<std::mutex> lk(h.mu);
  if (h.pool && h.owner != getpid()) (void)h.pool.release();  // the parent's threads: abandon
  if (!h.pool) {
    h.pool = std::make_unique<ThreadPool>(h.threads, h.spin_us);
    h.owner = getpid();
  }
  return *h.pool;
}

constexpr std::int64_t kRowsPerItem = 64;  // activation rows per work item (prefill)

struct GemmCtx {
  GemmArgs a;
  std::int64_t t, ntiles;
  GemmFn fn;
};
void gemm_item(void* ctx, std::int64_t item, int) {
  auto* c = static_cast<GemmCtx*>(ctx);
  const std::int64_t tile = item % c->ntiles, chunk = item / c->ntiles;
  const std::int64_t t0 = chunk * kRowsPerItem, t1 = std::min(c->t, t0 + kRowsPerItem);
  c->fn(c->a, tile, t0, t1);
}

struct AttnCtx {
  AttnArgs a;
  AttnFn fn;
  std::int64_t scratch;
};
void attn_work(void* ctx, std::int64_t item, int) {
  auto* c = static_cast<AttnCtx*>(ctx);
  thread_local std::vector<float> scratch;
  if (static_cast<std::int64_t>(scratch.size()) < c->scratch) scratch.resize(c->scratch);
  c->fn(c->a, item / c->a.hk, item % c->a.hk, scratch.data());  // (token, kv head)
}

inline std::uint16_t load_u16(const std::uint8_t* p) {
  std::uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline bool finite_half(std::uint16_t h) { return ((h >> 10) & 0x1f) != 0x1f; }

// One GGUF K-quant block (256 values of one row), unpacked: codes q[256], per-32 (Q4_K) or
// per-16 (Q6_K) scales, Q4_K mins. Follows ggml's block_q4_K / block_q6_K.
struct KBlock {
  std::uint16_t d = 0, dmin = 0;
  std::uint8_t q[kSuper];
  int sc[16];
  int m[8];
};

// block_q4_K: d, dmin (fp16), scales[12] (8 6-bit scales + 8 6-bit mins), qs[128] (value 64 g + l
// in the low nibble of qs[32 g + l], value 64 g + 32 + l in its high nibble).
void decode_q4k(const std::uint8_t* src, KBlock& b) {
  b.d = load_u16(src);
  b.dmin = load_u16(src + 2);
  const std::uint8_t* s = src + 4;
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      b.sc[j] = s[j] & 63;
      b.m[j] = s[j + 4] & 63;
    } else {
      b.sc[j] = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
      b.m[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
  }
  const std::uint8_t* qs = src + 16;
  for (int v = 0; v < kSuper; ++v) {
    const int g = v / 64, w = v % 64;
    b.q[v] = w < 32 ? (qs[32 * g + w] & 0xF) : (qs[32 * g + w - 32] >> 4);
  }
}

// block_q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d (fp16); in each half
// h of 128 values, value 32 s + l (s = 0..3) has its low bits in ql[64 h + l + 32 (s & 1)] (low
// nibble for s < 2) and its high bits at bit 2 s of qh[32 h + l]. Codes are q - 32.
void decode_q6k(const std::uint8_t* src, KBlock& b) {
  const std::uint8_t* ql = src;
  const std::uint8_t* qh = src + 128;
  for (int i = 0; i < 16; ++i) b.sc[i] = static_cast<std::int8_t>(src[192 + i]);
  b.d = load_u16(src + 208);
  for (int v = 0; v < kSuper; ++v) {
    const int h = v / 128, w = v % 128, s = w / 32, l = w % 32;
    const std::uint8_t byte = ql[64 * h + l + 32 * (s & 1)];
    const int lo = s < 2 ? (byte & 0xF) : (byte >> 4);
    b.q[v] = static_cast<std::uint8_t>(lo | ((qh[32 * h + l] >> (2 * s)) & 3) << 4);
  }
}

// Writes row r of one tile super-block (dst = its first byte) in the packed layout (kernels.h).
void put_kblock(int qtype, const KBlock& b, int r, std::uint8_t* dst) {
  if (qtype == kQ4_K) {
    std::memcpy(dst + 2 * r, &b.d, 2);
    std::memcpy(dst + 32 + 2 * r, &b.dmin, 2);
    for (int s = 0; s < 8; ++s) {
      std::uint8_t* blk = dst + 64 + s * kQ4KSub;
      const std::uint8_t* q = b.q + 32 * s;
      for (int kk = 0; kk < 16; ++kk) blk[kk * 16 + r] = static_cast<std::uint8_t>(q[kk] | q[kk + 16] << 4);
      blk[256 + r] = static_cast<std::uint8_t>(b.sc[s]);
      blk[272 + r] = static_cast<std::uint8_t>(b.m[s]);
    }
  } else {
    std::memcpy(dst + 2 * r, &b.d, 2);
    for (int s = 0; s < 8; ++s) {
      std::uint8_t* blk = dst + 32 + s * kQ6KSub;
      const std::uint8_t* q = b.q + 32 * s;
      for (int kk = 0; kk < 16; ++kk)
        blk[kk * 16 + r] = static_cast<std::uint8_t>((q[kk] & 0xF) | (q[kk + 16] & 0xF) << 4);
      for (int j = 0; j < 8; ++j)
        blk[256 + j * 16 + r] = static_cast<std::uint8_t>((q[j] >> 4) | (q[j + 8] >> 4) << 2 |
                                                          (q[j + 16] >> 4) << 4 | (q[j + 24] >> 4) << 6);
      blk[384 + r] = static_cast<std::uint8_t>(b.sc[2 * s]);
      blk[400 + r] = static_cast<std::uint8_t>(b.sc[2 * s + 1]);
    }
  }
}

// Row r of one packed tile super-block -> 256 floats (the same IEEE operations as the reference).
void get_kblock(int qtype, const std::uint8_t* src, int r, float* out) {
  const float d = half_to_float(load_u16(src + 2 * r));
  if (qtype == kQ4_K) {
    const float dmin = half_to_float(load_u16(src + 32 + 2 * r));
    for (int s = 0; s < 8; ++s) {
      const std::uint8_t* blk = src + 64 + s * kQ4KSub;
      const float ds = d * static_cast<float>(blk[256 + r]), ms = dmin * static_cast<float>(blk[272 + r]);
      for (int kk = 0; kk < 16; ++kk) {
        const int c = blk[kk * 16 + r];
        out[32 * s + kk] = ds * static_cast<float>(c & 0xF) - ms;
        out[32 * s + kk + 16] = ds * static_cast<float>(c >> 4) - ms;
      }
    }
  } else {
    for (int s = 0; s < 8; ++s) {
      const std::uint8_t* blk = src + 32 + s * kQ6KSub;
      const float da = d * static_cast<float>(static_cast<std::int8_t>(blk[384 + r]));
      const float db = d * static_cast<float>(static_cast<std::int8_t>(blk[400 + r]));
      for (int i = 0; i < 32; ++i) {
        const int c = blk[(i % 16) * 16 + r];
        const int lo = i < 16 ? (c & 0xF) : (c >> 4);
        const int hi = (blk[256 + (i % 8) * 16 + r] >> (2 * (i / 8))) & 3;
        out[32 * s + i] = (i < 16 ? da : db) * static_cast<float>((lo | hi << 4) - 32);
      }
    }
  }
}

}  // namespace

void set_threads(int n_threads, int spin_us) {
  if (n_threads < 1) throw std::invalid_argument("n_threads must be >= 1");
  PoolHolder& h = holder();
  std::lock_guard<std::mutex> lk(h.mu);
  h.threads = n_threads;
  h.spin_us = spin_us;
  if (h.pool && h.owner != getpid()) (void)h.pool.release();
  h.pool.reset();
}

int num_threads() { return holder().threads; }

const char* isa() { return current_isa().name; }

void set_isa(const std::string& name) {
  Isa best = detect();
  if (name == "portable") {
    current_isa() = MK_ISA(portable);
#if defined(MINDIE_KERNELS_X86)
  } else if (name == "avx2" && (std::string(best.name) == "avx2" || std::string(best.name) == "avx512")) {
    current_isa() = MK_ISA(avx2);
#endif
  } else if (name == "avx512" && std::string(best.name) == "avx512") {
    current_isa() = best;
  } else if (name == "auto") {
    current_isa() = best;
  } else {
    throw std::invalid_argument("instruction set '" + name + "' is not available on this CPU (best: " +
                                best.name + ")");
  }
}

std::int64_t packed_bytes(int qtype, std::int64_t n, std::int64_t k) {
  const std::size_t bt = block_tile_bytes(qtype);
  if (bt == 0) throw std::invalid_argument("unsupported ggml type " + std::to_string(qtype));
  const int qk = gguf_block_values(qtype);
  if (k % qk) throw std::invalid_argument("k must be a multiple of " + std::to_string(qk));
  const std::int64_t ntiles = (n + kTileRows - 1) / kTileRows;
  return ntiles * (k / qk) * static_cast<std::int64_t>(bt);
}

std::int64_t pack(const std::uint8_t* raw, int qtype, std::int64_t n, std::int64_t k, std::uint8_t* out) {
  const std::int64_t nkb = k / gguf_block_values(qtype), ntiles = (n + kTileRows - 1) / kTileRows;
  const std::size_t bt = block_tile_bytes(qtype), gb = gguf_block_bytes(qtype);
  std::memset(out, 0, static_cast<std::size_t>(packed_bytes(qtype, n, k)));
  if (is_kquant(qtype)) {
    KBlock b;
    for (std::int64_t row = 0; row < n; ++row) {
      for (std::int64_t kb = 0; kb < nkb; ++kb) {
        const std::uint8_t* src = raw + (row * nkb + kb) * gb;
        if (qtype == kQ4_K) {
          decode_q4k(src, b);
          if (!finite_half(b.d) || !finite_half(b.dmin)) return row * nkb + kb;
        } else {
          decode_q6k(src, b);
          if (!finite_half(b.d)) return row * nkb + kb;
        }
        put_kblock(qtype, b, static_cast<int>(row % kTileRows), out + ((row / kTileRows) * nkb + kb) * bt);
      }
    }
    return -1;
  }
  for (std::int64_t tile = 0; tile < ntiles; ++tile) {
    for (std::int64_t kb = 0; kb < nkb; ++kb) {
      std::uint8_t* dst = out + (tile * nkb + kb) * bt;
      for (int r = 0; r < kTileRows; ++r) {
        const std::int64_t row = tile * kTileRows + r;
        if (row >= n) break;
        const std::uint8_t* src = raw + (row * nkb + kb) * gb;
        const std::uint16_t d = load_u16(src);
        if (!finite_half(d)) return row * nkb + kb;
        if (qtype == kQ8_0) {
          for (int kk = 0; kk < 32; ++kk) dst[kk * 16 + r] = src[2 + kk];
          std::memcpy(dst + 512 + 2 * r, src, 2);
        } else {
          const int qs = qtype == kQ4_1 ? 4 : 2;
          for (int kk = 0; kk < 16; ++kk) dst[kk * 16 + r] = src[qs + kk];
          std::memcpy(dst + 256 + 2 * r, src, 2);
          if (qtype == kQ4_1) {
            if (!finite_half(load_u16(src + 2))) return row * nkb + kb;
            std::memcpy(dst + 288 + 2 * r, src + 2, 2);
          }
        }
      }
    }
  }
  return -1;
}

void gemm(const float* x, std::int64_t t, std::int64_t ldx, const std::uint8_t* w, int qtype,
          std::int64_t n, std::int64_t k, float* y, std::int64_t ldy) {
  const std::int64_t nkb = k / kBlock;
  thread_local std::vector<float> xsum;
  if (qtype == kQ4_0 || qtype == kQ4_1 || qtype == kQ4_K) {
    xsum.resize(static_cast<std::size_t>(t * nkb));
    for (std::int64_t i = 0; i < t; ++i)
      for (std::int64_t kb = 0; kb < nkb; ++kb) {
        const float* xb = x + i * ldx + kb * kBlock;
        float s = 0.0f;
        for (int j = 0; j < kBlock; ++j) s = s + xb[j];
        xsum[i * nkb + kb] = s;
      }
  }
  GemmCtx c{{x, ldx, w, y, ldy, xsum.data(), n, k, qtype}, t, (n + kTileRows - 1) / kTileRows,
            current_isa().gemm};
  const std::int64_t chunks = (t + kRowsPerItem - 1) / kRowsPerItem;
  pool().run(c.ntiles * chunks, gemm_item, &c);
}

void dequant_rows(const std::uint8_t* w, int qtype, std::int64_t n, std::int64_t k,
                  const std::int64_t* ids, std::int64_t n_ids, float* out) {
  (void)n;
  const std::int64_t nkb = k / gguf_block_values(qtype);
  const std::size_t bt = block_tile_bytes(qtype);
  for (std::int64_t i = 0; i < n_ids; ++i) {
    const std::int64_t row = ids[i], tile = row / kTileRows, r = row % kTileRows;
    float* o = out + i * k;
    if (is_kquant(qtype)) {
      for (std::int64_t kb = 0; kb < nkb; ++kb)
        get_kblock(qtype, w + (tile * nkb + kb) * bt, static_cast<int>(r), o + kb * kSuper);
      continue;
    }
    for (std::int64_t kb = 0; kb < nkb; ++kb) {
      const std::uint8_t* blk = w + (tile * nkb + kb) * bt;
      float* ob = o + kb * kBlock;
      if (qtype == kQ8_0) {
        const float d = half_to_float(load_u16(blk + 512 + 2 * r));
        for (int kk = 0; kk < 32; ++kk) ob[kk] = static_cast<float>(static_cast<std::int8_t>(blk[kk * 16 + r])) * d;
      } else {
        const float d = half_to_float(load_u16(blk + 256 + 2 * r));
        const bool q41 = qtype == kQ4_1;
        const float m = q41 ? half_to_float(load_u16(blk + 288 + 2 * r)) : 0.0f;
        for (int kk = 0; kk < 16; ++kk) {
          const int lo = blk[kk * 16 + r] & 15, hi = blk[kk * 16 + r] >> 4;
          if (q41) {
            ob[kk] = d * static_cast<float>(lo) + m;
            ob[kk + 16] = d * static_cast<float>(hi) + m;
          } else {
            ob[kk] = d * static_cast<float>(lo - 8);
            ob[kk + 16] = d * static_cast<float>(hi - 8);
          }
        }
      }
    }
  }
}

std::int64_t paged_attention(const float* q, const float* cache, const std::int32_t* block_tables,
                             std::int64_t ldbt, std::int64_t n_reqs, const std::int32_t* token_req,
                             const std::int32_t* token_len, float* out, std::int64_t t,
                             std::int64_t nblocks, std::int64_t bs, std::int64_t hq, std::int64_t hk,
                             std::int64_t d, float scale, std::int64_t window) {
  std::int64_t max_len = 1;
  for (std::int64_t i = 0; i < t; ++i) {
    const std::int64_t r = token_req[i], len = token_len[i];
    if (r < 0 || r >= n_reqs || len < 1 || len > ldbt * bs) return i;
    const std::int32_t* table = block_tables + r * ldbt;
    for (std::int64_t b = 0; b < (len + bs - 1) / bs; ++b)
      if (table[b] < 0 || table[b] >= nblocks) return i;
    max_len = std::max(max_len, len);
  }
  const std::int64_t g = hq / hk;
  AttnCtx c{{q, cache, block_tables, ldbt, token_req, token_len, out, nblocks, bs, hq, hk, d, scale, window},
            current_isa().attn, g * (max_len + d)};
  pool().run(t * hk, attn_work, &c);
  return -1;
}

std::int64_t rope_write_kv(float* qkv, std::int64_t t, std::int64_t ldqkv, const std::int64_t* positions,
                           const float* cos_sin, std::int64_t rot, bool neox, std::int64_t hq, std::int64_t hk,
                           std::int64_t d, float* cache, std::int64_t n_slots, const std::int64_t* slots,
                           std::int64_t max_pos) {
  for (std::int64_t i = 0; i < t; ++i)
    if (slots[i] >= n_slots || positions[i] < 0 || positions[i] >= max_pos) return i;
  const std::int64_t half = rot / 2;
  for (std::int64_t i = 0; i < t; ++i) {
    float* row = qkv + i * ldqkv;
    const float* cs = cos_sin + positions[i] * rot;
    for (std::int64_t h = 0; h < hq + hk; ++h) {
      float* x = row + h * d;
      for (std::int64_t j = 0; j < half; ++j) {
        const std::int64_t a = neox ? j : 2 * j, b = neox ? j + half : 2 * j + 1;
        const float c = cs[j], s = cs[half + j], x1 = x[a], x2 = x[b];
        x[a] = x1 * c - x2 * s;
        x[b] = x2 * c + x1 * s;
      }
    }
    const std::int64_t slot = slots[i];
    if (slot < 0) continue;
    const std::int64_t kv = hk * d;
    std::memcpy(cache + slot * kv, row + hq * d, sizeof(float) * kv);                     // K plane
    std::memcpy(cache + n_slots * kv + slot * kv, row + (hq + hk) * d, sizeof(float) * kv);  // V plane
  }
  return -1;
}

void add_rms_norm(const float* x, const float* res, const float* w, float eps, std::int64_t t,
                  std::int64_t h, float* out, float* res_out) {
  for (std::int64_t i = 0; i < t; ++i) {
    const float* xr = x + i * h;
    float* rr = res_out + i * h;
    float part[16] = {0};
    for (std::int64_t j = 0; j < h; ++j) {
      const float v = res ? xr[j] + res[i * h + j] : xr[j];
      rr[j] = v;
      part[j & 15] = part[j & 15] + v * v;
    }
    for (int s = 8; s >= 1; s /= 2)
      for (int j = 0; j < s; ++j) part[j] = part[j] + part[j + s];
    const float inv = 1.0f / std::sqrt(part[0] / static_cast<float>(h) + eps);
    float* o = out + i * h;
    for (std::int64_t j = 0; j < h; ++j) o[j] = rr[j] * inv * w[j];
  }
}

namespace {
struct SiluCtx {
  const float* x;
  std::int64_t ldx, i, rows_per_item, t;
  float* out;
  SiluFn fn;
};
void silu_item(void* ctx, std::int64_t item, int) {
  auto* c = static_cast<SiluCtx*>(ctx);
  const std::int64_t r0 = item * c->rows_per_item, r1 = std::min(c->t, r0 + c->rows_per_item);
  c->fn(c->x, c->ldx, c->i, r0, r1, c->out);
}
}  // namespace

void silu_and_mul(const float* x, std::int64_t t, std::int64_t i, std::int64_t ldx, float* out) {
  // One item per 16k outputs at least: a decode row stays on the caller (no wake-up cost).
  const std::int64_t rows = std::max<std::int64_t>(1, (16384 + i - 1) / i);
  SiluCtx c{x, ldx, i, rows, t, out, current_isa().silu};
  const std::int64_t items = (t + rows - 1) / rows;
  if (items == 1) {
    silu_item(&c, 0, 0);
  } else {
    pool().run(items, silu_item, &c);
  }
}

}  // namespace mindie_kernels
