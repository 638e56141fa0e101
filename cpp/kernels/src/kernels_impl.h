// SPDX-License-Identifier: Apache-2.0
// Kernel bodies, compiled once per instruction set: the including file defines MK_NS (namespace),
// MK_W (lanes: 16, 8 or 1) and the vector primitives below. Every lane runs the same sequence of
// IEEE operations on every instruction set, so results are bit-identical across them.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace mindie_kernels {
namespace MK_NS {

namespace {

constexpr int W = MK_W;
constexpr int kSubs = kTileRows / W;      // vectors per 16-row tile
constexpr int kTB = (W == 16) ? 4 : (W == 8 ? 2 : 1);  // activation rows per pass

inline void store_rows(float* y, const VF& v, std::int64_t valid) {
  if (valid >= W) {
    vstore(y, v);
  } else if (valid > 0) {
    alignas(64) float tmp[W];
    vstore(tmp, v);
    std::memcpy(y, tmp, sizeof(float) * static_cast<std::size_t>(valid));
  }
}

// Partial dot products of one 32-value block of Q4 codes (nibble layout) with TB activation rows:
// s[j] = sum_k code_k * x_j[k] in a fixed order (four chains, then a fixed tree).
template <int TB>
inline void q4_dot(const std::uint8_t* codes, const float* const* xb, VF* s) {
  VF p0[TB], p1[TB], p2[TB], p3[TB];
  for (int j = 0; j < TB; ++j) p0[j] = p1[j] = p2[j] = p3[j] = vzero();
  for (int kk = 0; kk < 16; kk += 2) {
    const VI c0 = load_u8(codes + kk * 16);
    const VI c1 = load_u8(codes + (kk + 1) * 16);
    const VF lo0 = vcvt(vand15(c0)), hi0 = vcvt(vshr4(c0));
    const VF lo1 = vcvt(vand15(c1)), hi1 = vcvt(vshr4(c1));
    for (int j = 0; j < TB; ++j) {
      p0[j] = vfma(lo0, vset1(xb[j][kk]), p0[j]);
      p1[j] = vfma(hi0, vset1(xb[j][kk + 16]), p1[j]);
      p2[j] = vfma(lo1, vset1(xb[j][kk + 1]), p2[j]);
      p3[j] = vfma(hi1, vset1(xb[j][kk + 17]), p3[j]);
    }
  }
  for (int j = 0; j < TB; ++j) s[j] = vadd(vadd(p0[j], p1[j]), vadd(p2[j], p3[j]));
}

template <int TB, bool kHasMin>
void q4_pass(const GemmArgs& a, std::int64_t tile, std::int64_t t, int sub) {
  const std::int64_t nkb = a.k / kBlock;
  const std::size_t bt = block_tile_bytes(a.qtype);
  const std::uint8_t* base = a.w + static_cast<std::size_t>(tile) * nkb * bt;
  VF acc[TB];
  for (int j = 0; j < TB; ++j) acc[j] = vzero();
  for (std::int64_t kb = 0; kb < nkb; ++kb) {
    const std::uint8_t* blk = base + kb * bt;
    const float* xb[TB];
    for (int j = 0; j < TB; ++j) xb[j] = a.x + (t + j) * a.ldx + kb * kBlock;
    VF s[TB];
    q4_dot<TB>(blk + sub * W, xb, s);
    const VF d = load_f16(reinterpret_cast<const std::uint16_t*>(blk + 256) + sub * W);
    const VF m = kHasMin ? load_f16(reinterpret_cast<const std::uint16_t*>(blk + 288) + sub * W)
                         : vmul(d, vset1(-8.0f));
    for (int j = 0; j < TB; ++j) {
      acc[j] = vfma(d, s[j], acc[j]);
      acc[j] = vfma(m, vset1(a.xsum[(t + j) * nkb + kb]), acc[j]);
    }
  }
  const std::int64_t r0 = tile * kTileRows + sub * W;
  for (int j = 0; j < TB; ++j) store_rows(a.y + (t + j) * a.ldy + r0, acc[j], a.n - r0);
}

// Q4_K: per sub-block, acc += (d * sc) * dot + (-dmin * m) * sum(x) (d * sc is exact in fp32).
template <int TB>
void q4k_pass(const GemmArgs& a, std::int64_t tile, std::int64_t t, int sub) {
  const std::int64_t nsb = a.k / kSuper, nkb = a.k / kBlock;
  const std::size_t bt = block_tile_bytes(kQ4_K);
  const std::uint8_t* base = a.w + static_cast<std::size_t>(tile) * nsb * bt;
  VF acc[TB];
  for (int j = 0; j < TB; ++j) acc[j] = vzero();
  for (std::int64_t sb = 0; sb < nsb; ++sb) {
    const std::uint8_t* sbp = base + sb * bt;
    const VF d = load_f16(reinterpret_cast<const std::uint16_t*>(sbp) + sub * W);
    const VF nmin = vmul(load_f16(reinterpret_cast<const std::uint16_t*>(sbp + 32) + sub * W), vset1(-1.0f));
    for (int s8 = 0; s8 < 8; ++s8) {
      const std::uint8_t* blk = sbp + 64 + s8 * kQ4KSub;
      const std::int64_t kb = sb * 8 + s8;
      const float* xb[TB];
      for (int j = 0; j < TB; ++j) xb[j] = a.x + (t + j) * a.ldx + kb * kBlock;
      VF s[TB];
      q4_dot<TB>(blk + sub * W, xb, s);
      const VF ds = vmul(d, vcvt(load_u8(blk + 256 + sub * W)));
      const VF ms = vmul(nmin, vcvt(load_u8(blk + 272 + sub * W)));
      for (int j = 0; j < TB; ++j) {
        acc[j] = vfma(ds, s[j], acc[j]);
        acc[j] = vfma(ms, vset1(a.xsum[(t + j) * nkb + kb]), acc[j]);
      }
    }
  }
  const std::int64_t r0 = tile * kTileRows + sub * W;
  for (int j = 0; j < TB; ++j) store_rows(a.y + (t + j) * a.ldy + r0, acc[j], a.n - r0);
}

// Q6_K: 6-bit codes q - 32 from a low nibble and a 2-bit high part; two 16-value scales per
// sub-block: acc += (d * sc_lo) * dot(values 0-15) + (d * sc_hi) * dot(values 16-31).
template <int TB>
void q6k_pass(const GemmArgs& a, std::int64_t tile, std::int64_t t, int sub) {
  const std::int64_t nsb = a.k / kSuper;
  const std::size_t bt = block_tile_bytes(kQ6_K);
  const std::uint8_t* base = a.w + static_cast<std::size_t>(tile) * nsb * bt;
  VF acc[TB];
  for (int j = 0; j < TB; ++j) acc[j] = vzero();
  for (std::int64_t sb = 0; sb < nsb; ++sb) {
    const std::uint8_t* sbp = base + sb * bt;
    const VF d = load_f16(reinterpret_cast<const std::uint16_t*>(sbp) + sub * W);
    for (int s8 = 0; s8 < 8; ++s8) {
      const std::uint8_t* blk = sbp + 32 + s8 * kQ6KSub;
      const std::uint8_t* lo = blk + sub * W;
      const std::uint8_t* hb = blk + 256 + sub * W;
      const float* xb[TB];
      VF a0[TB], a1[TB], b0[TB], b1[TB];
      for (int j = 0; j < TB; ++j) {
        xb[j] = a.x + (t + j) * a.ldx + (sb * 8 + s8) * kBlock;
        a0[j] = a1[j] = b0[j] = b1[j] = vzero();
      }
      for (int i = 0; i < 8; ++i) {
        const VI h = load_u8(hb + i * 16);
        const VI c0 = load_u8(lo + i * 16), c1 = load_u8(lo + (i + 8) * 16);
        const VF qa0 = vcvt(vsubc(vor(vand15(c0), vandc(vshl4(h), 0x30)), 32));   // value i
        const VF qa1 = vcvt(vsubc(vor(vand15(c1), vandc(vshl2(h), 0x30)), 32));   // value i + 8
        const VF qb0 = vcvt(vsubc(vor(vshr4(c0), vandc(h, 0x30)), 32));           // value i + 16
        const VF qb1 = vcvt(vsubc(vor(vshr4(c1), vandc(vshr2(h), 0x30)), 32));    // value i + 24
        for (int j = 0; j < TB; ++j) {
          a0[j] = vfma(qa0, vset1(xb[j][i]), a0[j]);
          a1[j] = vfma(qa1, vset1(xb[j][i + 8]), a1[j]);
          b0[j] = vfma(qb0, vset1(xb[j][i + 16]), b0[j]);
          b1[j] = vfma(qb1, vset1(xb[j][i + 24]), b1[j]);
        }
      }
      const std::int8_t* sc = reinterpret_cast<const std::int8_t*>(blk + 384) + sub * W;
      const VF da = vmul(d, vcvt(load_i8(sc))), db = vmul(d, vcvt(load_i8(sc + 16)));
      for (int j = 0; j < TB; ++j) {
        acc[j] = vfma(da, vadd(a0[j], a1[j]), acc[j]);
        acc[j] = vfma(db, vadd(b0[j], b1[j]), acc[j]);
      }
    }
  }
  const std::int64_t r0 = tile * kTileRows + sub * W;
  for (int j = 0; j < TB; ++j) store_rows(a.y + (t + j) * a.ldy + r0, acc[j], a.n - r0);
}

template <int TB>
void q8_pass(const GemmArgs& a, std::int64_t tile, std::int64_t t, int sub) {
  const std::int64_t nkb = a.k / kBlock;
  const std::size_t bt = block_tile_bytes(a.qtype);
  const std::uint8_t* base = a.w + static_cast<std::size_t>(tile) * nkb * bt;
  VF acc[TB];
  for (int j = 0; j < TB; ++j) acc[j] = vzero();
  for (std::int64_t kb = 0; kb < nkb; ++kb) {
    const std::uint8_t* blk = base + kb * bt;
    const std::int8_t* codes = reinterpret_cast<const std::int8_t*>(blk) + sub * W;
    VF p0[TB], p1[TB], p2[TB], p3[TB];
    const float* xb[TB];
    for (int j = 0; j < TB; ++j) {
      p0[j] = p1[j] = p2[j] = p3[j] = vzero();
      xb[j] = a.x + (t + j) * a.ldx + kb * kBlock;
    }
    for (int k = 0; k < kBlock; k += 4) {
      const VF c0 = vcvt(load_i8(codes + k * 16));
      const VF c1 = vcvt(load_i8(codes + (k + 1) * 16));
      const VF c2 = vcvt(load_i8(codes + (k + 2) * 16));
      const VF c3 = vcvt(load_i8(codes + (k + 3) * 16));
      for (int j = 0; j < TB; ++j) {
        p0[j] = vfma(c0, vset1(xb[j][k]), p0[j]);
        p1[j] = vfma(c1, vset1(xb[j][k + 1]), p1[j]);
        p2[j] = vfma(c2, vset1(xb[j][k + 2]), p2[j]);
        p3[j] = vfma(c3, vset1(xb[j][k + 3]), p3[j]);
      }
    }
    const VF d = load_f16(reinterpret_cast<const std::uint16_t*>(blk + 512) + sub * W);
    for (int j = 0; j < TB; ++j) acc[j] = vfma(d, vadd(vadd(p0[j], p1[j]), vadd(p2[j], p3[j])), acc[j]);
  }
  const std::int64_t r0 = tile * kTileRows + sub * W;
  for (int j = 0; j < TB; ++j) store_rows(a.y + (t + j) * a.ldy + r0, acc[j], a.n - r0);
}

template <int TB>
void pass(const GemmArgs& a, std::int64_t tile, std::int64_t t, int sub) {
  switch (a.qtype) {
    case kQ4_0: q4_pass<TB, false>(a, tile, t, sub); break;
    case kQ4_1: q4_pass<TB, true>(a, tile, t, sub); break;
    case kQ4_K: q4k_pass<TB>(a, tile, t, sub); break;
    case kQ6_K: q6k_pass<TB>(a, tile, t, sub); break;
    default: q8_pass<TB>(a, tile, t, sub); break;
  }
}

// 16 partial sums (as 16 / W vectors), reduced by a fixed tree: the same on every ISA.
inline float dot16(const float* x, const float* y, std::int64_t n) {
  VF part[kSubs];
  for (int v = 0; v < kSubs; ++v) part[v] = vzero();
  for (std::int64_t i = 0; i < n; i += 16)
    for (int v = 0; v < kSubs; ++v) part[v] = vfma(vload(x + i + v * W), vload(y + i + v * W), part[v]);
  alignas(64) float p[16];
  for (int v = 0; v < kSubs; ++v) vstore(p + v * W, part[v]);
  for (int s = 8; s >= 1; s /= 2)
    for (int j = 0; j < s; ++j) p[j] = p[j] + p[j + s];
  return p[0];
}

// expf (Cephes' range reduction and polynomial, ~1 ulp): the same operations on every ISA.
inline VF vexp(VF x) {
  x = vmin(vmax(x, vset1(-87.0f)), vset1(88.0f));
  const VF n = vround(vmul(x, vset1(1.44269504088896341f)));
  VF r = vfma(n, vset1(-0.693359375f), x);
  r = vfma(n, vset1(2.12194440e-4f), r);
  VF p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vset1(1.0f)));
  return vmul(p, vpow2i(n));
}

inline VF vsilu_mul(VF g, VF u) {
  return vmul(vdiv(g, vadd(vset1(1.0f), vexp(vmul(g, vset1(-1.0f))))), u);
}

}  // namespace

void silu_rows(const float* x, std::int64_t ldx, std::int64_t i, std::int64_t r0, std::int64_t r1, float* out) {
  for (std::int64_t r = r0; r < r1; ++r) {
    const float* g = x + r * ldx;
    const float* u = g + i;
    float* o = out + r * i;
    std::int64_t j = 0;
    for (; j + W <= i; j += W) vstore(o + j, vsilu_mul(vload(g + j), vload(u + j)));
    if (j < i) {  // the tail through one padded vector: the same operations as the body
      alignas(64) float tg[W] = {0}, tu[W] = {0}, to[W];
      std::memcpy(tg, g + j, sizeof(float) * static_cast<std::size_t>(i - j));
      std::memcpy(tu, u + j, sizeof(float) * static_cast<std::size_t>(i - j));
      vstore(to, vsilu_mul(vload(tg), vload(tu)));
      std::memcpy(o + j, to, sizeof(float) * static_cast<std::size_t>(i - j));
    }
  }
}

void gemm_tile(const GemmArgs& a, std::int64_t tile, std::int64_t t0, std::int64_t t1) {
  for (int sub = 0; sub < kSubs; ++sub) {
    if (tile * kTileRows + sub * W >= a.n) break;
    std::int64_t t = t0;
    for (; t + kTB <= t1; t += kTB) pass<kTB>(a, tile, t, sub);
    for (; t < t1; ++t) pass<1>(a, tile, t, sub);
  }
}

void attn_item(const AttnArgs& a, std::int64_t tok, std::int64_t kvh, float* scratch) {
  // scratch: [G, L] scores then [G, D] output accumulators
  const std::int64_t g_count = a.hq / a.hk, d = a.d;
  const std::int64_t req = a.token_req[tok];
  const std::int64_t len = a.token_len[tok];
  const std::int64_t start = a.window > 0 ? std::max<std::int64_t>(0, len - a.window) : 0;
  const std::int64_t span = len - start;
  float* scores = scratch;
  float* acc = scratch + g_count * std::max<std::int64_t>(span, 1);
  const std::int32_t* table = a.block_tables + req * a.ldbt;
  const std::int64_t tok_stride = a.hk * d;                  // one token of one plane
  const std::int64_t plane = a.nblocks * a.bs * tok_stride;  // K plane -> V plane
  for (std::int64_t p = start; p < len; ++p) {
    const float* k = a.cache + (static_cast<std::int64_t>(table[p / a.bs]) * a.bs + p % a.bs) * tok_stride
                     + kvh * d;
    for (std::int64_t g = 0; g < g_count; ++g) {
      const float* q = a.q + (tok * a.hq + kvh * g_count + g) * d;
      scores[g * span + (p - start)] = dot16(q, k, d) * a.scale;
    }
  }
  for (std::int64_t g = 0; g < g_count; ++g) {
    float* s = scores + g * span;
    float mx = -INFINITY;
    for (std::int64_t i = 0; i < span; ++i) mx = std::max(mx, s[i]);
    float sum = 0.0f;
    for (std::int64_t i = 0; i < span; ++i) {
      s[i] = std::exp(s[i] - mx);
      sum = sum + s[i];
    }
    const float inv = 1.0f / sum;
    for (std::int64_t i = 0; i < span; ++i) s[i] = s[i] * inv;
    std::fill(acc + g * d, acc + (g + 1) * d, 0.0f);
  }
  for (std::int64_t p = start; p < len; ++p) {
    const float* v = a.cache + plane
                     + (static_cast<std::int64_t>(table[p / a.bs]) * a.bs + p % a.bs) * tok_stride + kvh * d;
    for (std::int64_t g = 0; g < g_count; ++g) {
      const VF w = vset1(scores[g * span + (p - start)]);
      float* o = acc + g * d;
      for (std::int64_t i = 0; i < d; i += W) vstore(o + i, vfma(w, vload(v + i), vload(o + i)));
    }
  }
  for (std::int64_t g = 0; g < g_count; ++g)
    std::memcpy(a.out + (tok * a.hq + kvh * g_count + g) * d, acc + g * d, sizeof(float) * d);
}

}  // namespace MK_NS
}  // namespace mindie_kernels
