// SPDX-License-Identifier: Apache-2.0
// Portable kernels (1 lane, std::fma): the reference instruction set, bit-identical to the SIMD
// ones. Compiled with -ffp-contract=off.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace {
using VF = float;
using VI = std::int32_t;
inline VF vzero() { return 0.0f; }
inline VF vset1(float x) { return x; }
inline VF vload(const float* p) { return *p; }
inline void vstore(float* p, VF v) { *p = v; }
inline VF vfma(VF a, VF b, VF c) { return std::fma(a, b, c); }
inline VF vmul(VF a, VF b) { return a * b; }
inline VF vadd(VF a, VF b) { return a + b; }
inline VF vcvt(VI v) { return static_cast<float>(v); }
inline VI load_u8(const std::uint8_t* p) { return *p; }
inline VI load_i8(const std::int8_t* p) { return *p; }
inline VI vand15(VI v) { return v & 15; }
inline VI vshr4(VI v) { return v >> 4; }
inline VI vor(VI a, VI b) { return a | b; }
inline VI vandc(VI v, int c) { return v & c; }
inline VI vsubc(VI v, int c) { return v - c; }
inline VI vshl2(VI v) { return v << 2; }
inline VI vshl4(VI v) { return v << 4; }
inline VI vshr2(VI v) { return v >> 2; }
inline VF vmin(VF a, VF b) { return a < b ? a : b; }  // the SIMD min/max semantics
inline VF vmax(VF a, VF b) { return a > b ? a : b; }
inline VF vdiv(VF a, VF b) { return a / b; }
inline VF vround(VF a) { return std::nearbyint(a); }  // round half to even, as the SIMD paths
inline VF vpow2i(VF n) {  // 2^n for integral n in [-126, 127]
  const std::uint32_t bits = static_cast<std::uint32_t>(static_cast<std::int32_t>(n) + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline VF load_f16(const std::uint16_t* p) { return mindie_kernels::half_to_float(*p); }
}  // namespace

#define MK_NS portable
#define MK_W 1
#include "kernels_impl.h"
