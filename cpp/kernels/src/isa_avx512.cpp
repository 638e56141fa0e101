// SPDX-License-Identifier: Apache-2.0
// AVX-512F kernels (16 lanes). Compiled with -mavx512f -mfma -mf16c -ffp-contract=off.
#include <immintrin.h>

#include <cstdint>

namespace {
using VF = __m512;
using VI = __m512i;
inline VF vzero() { return _mm512_setzero_ps(); }
inline VF vset1(float x) { return _mm512_set1_ps(x); }
inline VF vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VF vfma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF vmul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF vadd(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF vcvt(VI v) { return _mm512_cvtepi32_ps(v); }
inline VI load_u8(const std::uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline VI load_i8(const std::int8_t* p) {
  return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline VI vand15(VI v) { return _mm512_and_si512(v, _mm512_set1_epi32(15)); }
inline VI vshr4(VI v) { return _mm512_srli_epi32(v, 4); }
inline VI vor(VI a, VI b) { return _mm512_or_si512(a, b); }
inline VI vandc(VI v, int c) { return _mm512_and_si512(v, _mm512_set1_epi32(c)); }
inline VI vsubc(VI v, int c) { return _mm512_sub_epi32(v, _mm512_set1_epi32(c)); }
inline VI vshl2(VI v) { return _mm512_slli_epi32(v, 2); }
inline VI vshl4(VI v) { return _mm512_slli_epi32(v, 4); }
inline VI vshr2(VI v) { return _mm512_srli_epi32(v, 2); }
inline VF vmin(VF a, VF b) { return _mm512_min_ps(a, b); }
inline VF vmax(VF a, VF b) { return _mm512_max_ps(a, b); }
inline VF vdiv(VF a, VF b) { return _mm512_div_ps(a, b); }
inline VF vround(VF a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VF vpow2i(VF n) {  // 2^n for integral n in [-126, 127]
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline VF load_f16(const std::uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
}  // namespace

#define MK_NS avx512
#define MK_W 16
#include "kernels_impl.h"
