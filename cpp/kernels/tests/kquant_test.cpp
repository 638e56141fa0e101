// SPDX-License-Identifier: Apache-2.0
// The K-quant kernels (Q4_K, Q6_K) and SiLU-and-mul of cpp/kernels against a transcription of
// ggml's dequantize_row_q4_K / dequantize_row_q6_K (ggml-quants.c) on random blocks:
// pack + dequant_rows equals the reference exactly; the matmul equals dequantize-then-dot up to
// float32 summation order and is bit-identical on every instruction set this CPU has; a block
// with a non-finite fp16 scale is refused with its index.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../src/kernels.h"
#include "../src/ops.h"

namespace mk = mindie_kernels;

namespace {

void scale_min_k4(int j, const std::uint8_t* q, int* d, int* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
  }
}

std::uint16_t u16(const std::uint8_t* p) {
  std::uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// ggml's dequantize_row_q4_K for one 144-byte block.
void ref_q4k(const std::uint8_t* x, float* y) {
  const float d = mk::half_to_float(u16(x)), mn = mk::half_to_float(u16(x + 2));
  const std::uint8_t* scales = x + 4;
  const std::uint8_t* q = x + 16;
  int is = 0, sc, m;
  for (int j = 0; j < 256; j += 64) {
    scale_min_k4(is + 0, scales, &sc, &m);
    const float d1 = d * sc, m1 = mn * m;
    scale_min_k4(is + 1, scales, &sc, &m);
    const float d2 = d * sc, m2 = mn * m;
    for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
    q += 32;
    is += 2;
  }
}

// ggml's dequantize_row_q6_K for one 210-byte block.
void ref_q6k(const std::uint8_t* x, float* y) {
  const float d = mk::half_to_float(u16(x + 208));
  const std::uint8_t* ql = x;
  const std::uint8_t* qh = x + 128;
  const std::int8_t* sc = reinterpret_cast<const std::int8_t*>(x + 192);
  for (int n = 0; n < 256; n += 128) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = static_cast<std::int8_t>((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = static_cast<std::int8_t>((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = static_cast<std::int8_t>((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = static_cast<std::int8_t>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l + 0] = d * sc[is + 0] * q1;
      y[l + 32] = d * sc[is + 2] * q2;
      y[l + 64] = d * sc[is + 4] * q3;
      y[l + 96] = d * sc[is + 6] * q4;
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

std::vector<std::uint8_t> random_blocks(int qtype, std::int64_t n, std::int64_t k, unsigned seed) {
  const std::size_t bb = mk::gguf_block_bytes(qtype);
  const std::int64_t nsb = k / 256;
  std::mt19937 rng(seed);
  std::vector<std::uint8_t> raw(static_cast<std::size_t>(n * nsb) * bb);
  for (auto& b : raw) b = static_cast<std::uint8_t>(rng());
  for (std::int64_t i = 0; i < n * nsb; ++i) {
    std::uint8_t* blk = raw.data() + i * bb;
    // positive normal fp16 scales around 1e-3 (exponent 5..8 of 31)
    const auto half = [&] { return static_cast<std::uint16_t>(0x1400 + rng() % 0x0C00); };
    const std::uint16_t d = half(), dmin = half();
    if (qtype == mk::kQ4_K) {
      std::memcpy(blk, &d, 2);
      std::memcpy(blk + 2, &dmin, 2);
    } else {
      std::memcpy(blk + 208, &d, 2);
    }
  }
  return raw;
}

std::vector<float> dequant_ref(int qtype, const std::vector<std::uint8_t>& raw, std::int64_t n, std::int64_t k) {
  std::vector<float> w(static_cast<std::size_t>(n * k));
  const std::size_t bb = mk::gguf_block_bytes(qtype);
  for (std::int64_t i = 0; i < n * (k / 256); ++i)
    (qtype == mk::kQ4_K ? ref_q4k : ref_q6k)(raw.data() + i * bb, w.data() + i * 256);
  return w;
}

std::vector<std::string> isas() {
  const std::string best = mk::isa();
  if (best == "avx512") return {"portable", "avx2", "avx512"};
  if (best == "avx2") return {"portable", "avx2"};
  return {"portable"};
}

class KQuant : public ::testing::TestWithParam<int> {};

TEST_P(KQuant, PackThenDequantEqualsGgmlReference) {
  const int qtype = GetParam();
  const std::int64_t n = 37, k = 512;
  const auto raw = random_blocks(qtype, n, k, 1);
  std::vector<std::uint8_t> packed(static_cast<std::size_t>(mk::packed_bytes(qtype, n, k)));
  ASSERT_EQ(mk::pack(raw.data(), qtype, n, k, packed.data()), -1);
  const auto want = dequant_ref(qtype, raw, n, k);
  std::vector<std::int64_t> ids(n);
  for (std::int64_t i = 0; i < n; ++i) ids[i] = n - 1 - i;
  std::vector<float> got(static_cast<std::size_t>(n * k));
  mk::dequant_rows(packed.data(), qtype, n, k, ids.data(), n, got.data());
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < k; ++j)
      ASSERT_EQ(got[i * k + j], want[ids[i] * k + j]) << "row " << ids[i] << " col " << j;
}

TEST_P(KQuant, MatmulMatchesDequantizedDotOnEveryIsa) {
  const int qtype = GetParam();
  const std::int64_t n = 40, k = 768;
  const auto raw = random_blocks(qtype, n, k, 2);
  std::vector<std::uint8_t> packed(static_cast<std::size_t>(mk::packed_bytes(qtype, n, k)));
  ASSERT_EQ(mk::pack(raw.data(), qtype, n, k, packed.data()), -1);
  const auto w = dequant_ref(qtype, raw, n, k);
  for (std::int64_t t : {1, 5, 70}) {
    std::mt19937 rng(static_cast<unsigned>(t));
    std::normal_distribution<float> nd;
    std::vector<float> x(static_cast<std::size_t>(t * k));
    for (auto& v : x) v = nd(rng);
    std::vector<std::vector<float>> outs;
    for (const auto& name : isas()) {
      mk::set_isa(name);
      std::vector<float> y(static_cast<std::size_t>(t * n));
      mk::gemm(x.data(), t, k, packed.data(), qtype, n, k, y.data(), n);
      outs.push_back(y);
    }
    mk::set_isa("auto");
    for (std::int64_t i = 0; i < t; ++i)
      for (std::int64_t r = 0; r < n; ++r) {
        double want = 0.0, mag = 0.0;
        for (std::int64_t j = 0; j < k; ++j) {
          want += static_cast<double>(x[i * k + j]) * w[r * k + j];
          mag += std::fabs(static_cast<double>(x[i * k + j]) * w[r * k + j]);
        }
        ASSERT_NEAR(outs[0][i * n + r], want, 1e-5 * mag + 1e-6) << "t " << t << " row " << r;
      }
    for (const auto& y : outs) ASSERT_EQ(0, std::memcmp(y.data(), outs[0].data(), y.size() * sizeof(float)));
  }
}

TEST_P(KQuant, NonFiniteScaleIsRefusedWithItsIndex) {
  const int qtype = GetParam();
  const std::int64_t n = 20, k = 512;
  auto raw = random_blocks(qtype, n, k, 3);
  const std::size_t bb = mk::gguf_block_bytes(qtype);
  const std::uint16_t inf = 0x7C00;
  std::memcpy(raw.data() + (7 * 2 + 1) * bb + (qtype == mk::kQ4_K ? 2 : 208), &inf, 2);  // dmin / d
  std::vector<std::uint8_t> packed(static_cast<std::size_t>(mk::packed_bytes(qtype, n, k)));
  EXPECT_EQ(mk::pack(raw.data(), qtype, n, k, packed.data()), 7 * 2 + 1);
  EXPECT_THROW(mk::packed_bytes(qtype, n, 384), std::invalid_argument);
}

INSTANTIATE_TEST_SUITE_P(Types, KQuant, ::testing::Values(static_cast<int>(mk::kQ4_K), static_cast<int>(mk::kQ6_K)));

TEST(SiluAndMul, MatchesFormulaOnEveryIsaBitIdentical) {
  for (std::int64_t t : {1, 40}) {
    const std::int64_t i = 1003, ld = 2 * i + 8;  // a tail past the vector width
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.0f, 8.0f);
    std::vector<float> x(static_cast<std::size_t>(t * ld));
    for (auto& v : x) v = nd(rng);
    x[0] = -100.0f;  // past the clamp of exp on both sides
    x[1] = 100.0f;
    std::vector<std::vector<float>> outs;
    for (const auto& name : isas()) {
      mk::set_isa(name);
      std::vector<float> y(static_cast<std::size_t>(t * i));
      mk::silu_and_mul(x.data(), t, i, ld, y.data());
      outs.push_back(y);
    }
    mk::set_isa("auto");
    for (std::int64_t r = 0; r < t; ++r)
      for (std::int64_t j = 0; j < i; ++j) {
        const double g = x[r * ld + j], u = x[r * ld + i + j];
        ASSERT_NEAR(outs[0][r * i + j], g / (1.0 + std::exp(-g)) * u, 1e-6 * (1.0 + std::fabs(g * u)))
            << "t " << t << " r " << r << " j " << j;
      }
    for (const auto& y : outs) ASSERT_EQ(0, std::memcmp(y.data(), outs[0].data(), y.size() * sizeof(float)));
  }
}

}  // namespace
