// SPDX-License-Identifier: Apache-2.0
// The kernel entry points (op_kernel/*.cpp) as the emulator build exports them, and host-side
// launchers that run a kernel on every block of its tiling under a SoC spec.
#pragma once

#include <cstdint>

#include "../add_rms_norm/tiling_core.h"
#include "../emu/ascendc_emu.h"
#include "../paged_decode_attention/tiling_core.h"
#include "../rotary_kv_write/tiling_core.h"
#include "../swiglu/tiling_core.h"

extern "C" {
void add_rms_norm(GM_ADDR x1, GM_ADDR x2, GM_ADDR gamma, GM_ADDR y, GM_ADDR rstd, GM_ADDR x, GM_ADDR workspace,
                  GM_ADDR tiling);
void swiglu(GM_ADDR x, GM_ADDR y, GM_ADDR workspace, GM_ADDR tiling);
void rotary_kv_write(GM_ADDR positions, GM_ADDR query, GM_ADDR key, GM_ADDR value, GM_ADDR cos_sin_cache,
                     GM_ADDR slot_mapping, GM_ADDR key_cache, GM_ADDR value_cache, GM_ADDR query_out,
                     GM_ADDR key_out, GM_ADDR workspace, GM_ADDR tiling);
void paged_decode_attention_split(GM_ADDR query, GM_ADDR key_cache, GM_ADDR value_cache, GM_ADDR block_tables,
                                  GM_ADDR context_lens, GM_ADDR workspace, GM_ADDR tiling);
void paged_decode_attention_combine(GM_ADDR workspace, GM_ADDR out, GM_ADDR tiling);
}

namespace mindie_ascendc_test {

inline mindie_ascendc::CoreInfo CoreOf(const ascendc_emu::SocSpec& soc) { return {soc.vector_cores, soc.ub_bytes}; }

inline void LaunchAddRmsNorm(const ascendc_emu::SocSpec& soc, const mindie_ascendc::AddRmsNormTilingData& t,
                             uint8_t* x1, uint8_t* x2, uint8_t* g, uint8_t* y, uint8_t* rstd, uint8_t* x) {
  auto td = t;
  ascendc_emu::Launch(soc, t.block_dim, [&] {
    add_rms_norm(x1, x2, g, y, rstd, x, nullptr, reinterpret_cast<uint8_t*>(&td));
  });
}

inline void LaunchSwiGlu(const ascendc_emu::SocSpec& soc, const mindie_ascendc::SwiGluTilingData& t, uint8_t* x,
                         uint8_t* y) {
  auto td = t;
  ascendc_emu::Launch(soc, t.block_dim, [&] { swiglu(x, y, nullptr, reinterpret_cast<uint8_t*>(&td)); });
}

inline void LaunchRotaryKvWrite(const ascendc_emu::SocSpec& soc, const mindie_ascendc::RotaryKvWriteTilingData& t,
                                uint8_t* pos, uint8_t* q, uint8_t* k, uint8_t* v, uint8_t* cs, uint8_t* slots,
                                uint8_t* kc, uint8_t* vc, uint8_t* qo, uint8_t* ko) {
  auto td = t;
  ascendc_emu::Launch(soc, t.block_dim, [&] {
    rotary_kv_write(pos, q, k, v, cs, slots, kc, vc, qo, ko, nullptr, reinterpret_cast<uint8_t*>(&td));
  });
}

// Both phases of FlashDecoding: split (partial softmax per KV split into the workspace), combine.
inline void LaunchPagedDecode(const ascendc_emu::SocSpec& soc, const mindie_ascendc::PagedDecodeTilingData& t,
                              uint8_t* q, uint8_t* kc, uint8_t* vc, uint8_t* tables, uint8_t* lens, uint8_t* ws,
                              uint8_t* out) {
  auto td = t;
  ascendc_emu::Launch(soc, t.split_block_dim, [&] {
    paged_decode_attention_split(q, kc, vc, tables, lens, ws, reinterpret_cast<uint8_t*>(&td));
  });
  ascendc_emu::Launch(soc, t.combine_block_dim, [&] {
    paged_decode_attention_combine(ws, out, reinterpret_cast<uint8_t*>(&td));
  });
}

}  // namespace mindie_ascendc_test
