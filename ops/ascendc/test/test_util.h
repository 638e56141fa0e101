// SPDX-License-Identifier: Apache-2.0
// Helpers of the Ascend C emulator tests: seeded random data in fp32 or fp16, the relative-norm
// error measure and tolerances of the CUDA kernel tests (fp32 1e-4, fp16 3e-3), and the launch of a
// kernel under a SoC spec.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "../emu/ascendc_emu.h"

namespace mindie_ascendc_test {

inline double Tol(uint32_t dtype_bytes) { return dtype_bytes == 2 ? 3e-3 : 1e-4; }

// A host buffer of fp32 or fp16 elements (the GM image a kernel reads or writes).
struct Buf {
  uint32_t dtype_bytes = 4;
  std::vector<uint8_t> bytes;
  Buf() = default;
  Buf(size_t n, uint32_t db) : dtype_bytes(db), bytes(n * db + 64, 0) {}
  size_t size() const { return (bytes.size() - 64) / dtype_bytes; }
  uint8_t* ptr() { return bytes.data(); }
  double get(size_t i) const {
    if (dtype_bytes == 2) {
      half h;
      std::memcpy(&h, bytes.data() + 2 * i, 2);
      return static_cast<double>(static_cast<float>(h));
    }
    float f;
    std::memcpy(&f, bytes.data() + 4 * i, 4);
    return f;
  }
  void set(size_t i, double v) {
    if (dtype_bytes == 2) {
      half h = static_cast<half>(static_cast<float>(v));
      std::memcpy(bytes.data() + 2 * i, &h, 2);
    } else {
      float f = static_cast<float>(v);
      std::memcpy(bytes.data() + 4 * i, &f, 4);
    }
  }
  std::vector<double> values() const {
    std::vector<double> v(size());
    for (size_t i = 0; i < v.size(); ++i) v[i] = get(i);
    return v;
  }
};

inline Buf RandomBuf(size_t n, uint32_t db, uint32_t seed, double lo = -1.0, double hi = 1.0) {
  Buf b(n, db);
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> d(lo, hi);
  for (size_t i = 0; i < n; ++i) b.set(i, d(gen));
  return b;
}

// ||out - ref|| / ||ref||; NaN never passes.
inline double RelErr(const std::vector<double>& out, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isnan(out[i])) return INFINITY;
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

}  // namespace mindie_ascendc_test
