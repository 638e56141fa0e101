// SPDX-License-Identifier: Apache-2.0
// Included first by every op_kernel file: the Ascend C API (the real kernel_operator.h under
// CANN, the project's CPU emulation with -DASCENDC_EMU) and small helpers the kernels share.
#pragma once

#ifdef ASCENDC_EMU
#include "../emu/ascendc_emu.h"
#define MINDIE_LOAD_TILING(Type, var, ptr) \
  Type var;                                \
  ascendc_emu::LoadTiling(&var, ptr)
#else
#include "kernel_operator.h"
// Under CANN the host launcher (op_host/) copies the same POD tiling struct to device memory; the
// kernel reads it back with scalar GM loads (the structs hold 32- and 64-bit fields only).
#define MINDIE_LOAD_TILING(Type, var, ptr) \
  Type var;                                \
  mindie_ascendc::CopyTilingFromGm(&var, ptr)
namespace mindie_ascendc {
template <typename T>
__aicore__ inline void CopyTilingFromGm(T* dst, GM_ADDR src) {
  auto* d = reinterpret_cast<uint32_t*>(dst);
  auto* s = reinterpret_cast<__gm__ uint32_t*>(src);
  for (uint32_t i = 0; i < sizeof(T) / 4; ++i) d[i] = s[i];
}
}  // namespace mindie_ascendc
#endif

namespace mindie_ascendc {

// Orders two pipes on hardware (e.g. V_S before a scalar GetValue of a vector result, S_V after
// scalar SetValue writes a vector op reads). The emulator runs pipes in program order: a no-op.
template <AscendC::HardEvent E>
__aicore__ inline void WaitEvent() {
#ifndef ASCENDC_EMU
  event_t e = static_cast<event_t>(GetTPipePtr()->FetchEventID(E));
  AscendC::SetFlag<E>(e);
  AscendC::WaitFlag<E>(e);
#endif
}

// Loads `n` elements of T (any n) from GM into a 32-byte padded UB tile.
template <typename T>
__aicore__ inline void CopyInPad(const AscendC::LocalTensor<T>& dst, const AscendC::GlobalTensor<T>& src, uint32_t n) {
  AscendC::DataCopyExtParams p{1, static_cast<uint32_t>(n * sizeof(T)), 0, 0, 0};
  AscendC::DataCopyPadExtParams<T> pad{false, 0, 0, static_cast<T>(0)};
  AscendC::DataCopyPad(dst, src, p, pad);
}

// Stores exactly `n` elements of T from UB to GM.
template <typename T>
__aicore__ inline void CopyOutPad(const AscendC::GlobalTensor<T>& dst, const AscendC::LocalTensor<T>& src, uint32_t n) {
  AscendC::DataCopyExtParams p{1, static_cast<uint32_t>(n * sizeof(T)), 0, 0, 0};
  AscendC::DataCopyPad(dst, src, p);
}

// T tile -> fp32 working tile (a copy for fp32).
template <typename T>
__aicore__ inline void ToFp32(const AscendC::LocalTensor<float>& dst, const AscendC::LocalTensor<T>& src, uint32_t n) {
  if constexpr (sizeof(T) == 4) {
    AscendC::Adds(dst, src.template ReinterpretCast<float>(), 0.0f, n);
  } else {
    AscendC::Cast(dst, src, AscendC::RoundMode::CAST_NONE, n);
  }
}

// fp32 working tile -> T tile (round to nearest for fp16).
template <typename T>
__aicore__ inline void FromFp32(const AscendC::LocalTensor<T>& dst, const AscendC::LocalTensor<float>& src, uint32_t n) {
  if constexpr (sizeof(T) == 4) {
    AscendC::Adds(dst.template ReinterpretCast<float>(), src, 0.0f, n);
  } else {
    AscendC::Cast(dst, src, AscendC::RoundMode::CAST_ROUND, n);
  }
}

}  // namespace mindie_ascendc
