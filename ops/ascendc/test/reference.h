// SPDX-License-Identifier: Apache-2.0
// Double-precision C++ references of the Ascend C ops, written from the same definitions as
// python/mindie_llm/ops/reference.py (the project's oracle); test_ascendc_kernels.py checks the
// kernels against ops/reference.py itself on fixed data. Inputs are the values the kernel sees
// (fp16 inputs already rounded); outputs are exact, the test compares with a tolerance.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace mindie_ascendc_test {

// x = x1 + x2 rounded to the storage dtype by `round`; y = x * rstd * gamma.
template <typename Round>
void RefAddRmsNorm(const std::vector<double>& x1, const std::vector<double>& x2, const std::vector<double>& g,
                   uint32_t rows, uint32_t cols, double eps, Round round, std::vector<double>& y,
                   std::vector<double>& rstd, std::vector<double>& x) {
  y.assign(size_t(rows) * cols, 0);
  x.assign(size_t(rows) * cols, 0);
  rstd.assign(rows, 0);
  for (uint32_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (uint32_t c = 0; c < cols; ++c) {
      size_t i = size_t(r) * cols + c;
      x[i] = round(x1[i] + x2[i]);
      ss += x[i] * x[i];
    }
    rstd[r] = 1.0 / std::sqrt(ss / cols + eps);
    for (uint32_t c = 0; c < cols; ++c) {
      size_t i = size_t(r) * cols + c;
      y[i] = x[i] * rstd[r] * g[c];
    }
  }
}

inline void RefSwiGlu(const std::vector<double>& x, uint32_t rows, uint32_t half, std::vector<double>& y) {
  y.assign(size_t(rows) * half, 0);
  for (uint32_t r = 0; r < rows; ++r) {
    for (uint32_t c = 0; c < half; ++c) {
      double a = x[size_t(r) * 2 * half + c], b = x[size_t(r) * 2 * half + half + c];
      y[size_t(r) * half + c] = a / (1.0 + std::exp(-a)) * b;
    }
  }
}

// Rotates the first rot dims of one head (neox: halves; else adjacent pairs) at cos/sin row cs.
inline void RefRotateHead(const double* x, double* out, uint32_t d, uint32_t rot, const double* cs, bool neox) {
  const uint32_t h = rot / 2;
  for (uint32_t i = 0; i < d; ++i) out[i] = x[i];
  for (uint32_t i = 0; i < h; ++i) {
    double c = cs[i], s = cs[h + i];
    uint32_t a = neox ? i : 2 * i, b = neox ? i + h : 2 * i + 1;
    out[a] = x[a] * c - x[b] * s;
    out[b] = x[b] * c + x[a] * s;
  }
}

// Paged decode attention: query [B, Hq, D]; caches [N, Bs, Hk, D]; tables [B, W]; out [B, Hq, D].
inline void RefPagedDecode(const std::vector<double>& q, const std::vector<double>& kc, const std::vector<double>& vc,
                           const std::vector<int32_t>& tables, const std::vector<int32_t>& lens, uint32_t B,
                           uint32_t Hq, uint32_t Hk, uint32_t D, uint32_t Bs, uint32_t W, double scale,
                           std::vector<double>& out) {
  out.assign(size_t(B) * Hq * D, 0);
  const uint32_t G = Hq / Hk;
  for (uint32_t b = 0; b < B; ++b) {
    for (uint32_t h = 0; h < Hq; ++h) {
      const uint32_t g = h / G;
      std::vector<double> s(lens[b]);
      double m = -std::numeric_limits<double>::infinity();
      for (int32_t t = 0; t < lens[b]; ++t) {
        size_t row = (size_t(tables[size_t(b) * W + t / Bs]) * Bs + t % Bs) * Hk + g;
        double acc = 0;
        for (uint32_t i = 0; i < D; ++i) acc += q[(size_t(b) * Hq + h) * D + i] * kc[row * D + i];
        s[t] = acc * scale;
        m = std::max(m, s[t]);
      }
      double l = 0;
      for (auto& v : s) l += (v = std::exp(v - m));
      for (int32_t t = 0; t < lens[b]; ++t) {
        size_t row = (size_t(tables[size_t(b) * W + t / Bs]) * Bs + t % Bs) * Hk + g;
        for (uint32_t i = 0; i < D; ++i) out[(size_t(b) * Hq + h) * D + i] += s[t] / l * vc[row * D + i];
      }
    }
  }
}

}  // namespace mindie_ascendc_test
