// SPDX-License-Identifier: Apache-2.0
// C entry points over the emulated kernels for ctypes (tests/unit/backends/npu/ascendc_emu.py):
// each computes the tiling for the Ascend910B3 spec (or a forced split count), runs the kernel
// under ascendc_emu::Launch and returns 0, or 1 with the violation / tiling error in `err`.
// Test-only; built by the test itself with -DASCENDC_EMU.
#include <cstdio>
#include <exception>
#include <vector>

#include "kernels.h"

namespace {

template <typename F>
int Guard(char* err, int errlen, F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, errlen, "%s", e.what());
    return 1;
  }
}

const ascendc_emu::SocSpec& Soc() { return ascendc_emu::kAscend910B3; }

}  // namespace

extern "C" {

int mindie_emu_add_rms_norm(void* x1, void* x2, void* g, void* y, void* rstd, void* x, uint32_t rows, uint32_t cols,
                            uint32_t db, float eps, char* err, int errlen) {
  return Guard(err, errlen, [&] {
    auto t = mindie_ascendc::ComputeAddRmsNormTiling(rows, cols, db, eps, mindie_ascendc_test::CoreOf(Soc()));
    mindie_ascendc_test::LaunchAddRmsNorm(Soc(), t, (uint8_t*)x1, (uint8_t*)x2, (uint8_t*)g, (uint8_t*)y,
                                          (uint8_t*)rstd, (uint8_t*)x);
  });
}

int mindie_emu_swiglu(void* x, void* y, uint32_t rows, uint32_t cols, uint32_t db, char* err, int errlen) {
  return Guard(err, errlen, [&] {
    auto t = mindie_ascendc::ComputeSwiGluTiling(rows, cols, db, mindie_ascendc_test::CoreOf(Soc()));
    mindie_ascendc_test::LaunchSwiGlu(Soc(), t, (uint8_t*)x, (uint8_t*)y);
  });
}

int mindie_emu_rotary_kv_write(void* pos, void* q, void* k, void* v, void* cs, void* slots, void* kc, void* vc,
                               void* qo, void* ko, uint32_t tokens, uint32_t hq, uint32_t hk, uint32_t d, uint32_t rot,
                               int neox, uint32_t db, uint64_t num_slots, uint64_t max_pos, char* err, int errlen) {
  return Guard(err, errlen, [&] {
    auto t = mindie_ascendc::ComputeRotaryKvWriteTiling(tokens, hq, hk, d, rot, neox != 0, db, num_slots, max_pos,
                                                        mindie_ascendc_test::CoreOf(Soc()));
    mindie_ascendc_test::LaunchRotaryKvWrite(Soc(), t, (uint8_t*)pos, (uint8_t*)q, (uint8_t*)k, (uint8_t*)v,
                                             (uint8_t*)cs, (uint8_t*)slots, (uint8_t*)kc, (uint8_t*)vc, (uint8_t*)qo,
                                             (uint8_t*)ko);
  });
}

int mindie_emu_paged_decode(void* q, void* kc, void* vc, void* tables, void* lens, void* out, uint32_t seqs,
                            uint32_t hq, uint32_t hk, uint32_t d, uint32_t bs, uint32_t w, uint64_t nblocks,
                            uint32_t db, float scale, uint32_t forced_splits, char* err, int errlen) {
  return Guard(err, errlen, [&] {
    auto t = mindie_ascendc::ComputePagedDecodeTiling(seqs, hq, hk, d, bs, w, nblocks, db, scale,
                                                      mindie_ascendc_test::CoreOf(Soc()), forced_splits);
    std::vector<uint8_t> ws(t.workspace_bytes + 64);
    mindie_ascendc_test::LaunchPagedDecode(Soc(), t, (uint8_t*)q, (uint8_t*)kc, (uint8_t*)vc, (uint8_t*)tables,
                                           (uint8_t*)lens, ws.data(), (uint8_t*)out);
  });
}

}  // extern "C"
