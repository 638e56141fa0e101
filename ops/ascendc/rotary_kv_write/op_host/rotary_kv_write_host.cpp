// SPDX-License-Identifier: Apache-2.0
// CANN host launcher of rotary_kv_write (direct launch). CANN-only; UNVERIFIED (no CANN here).
#include "aclrtlaunch_rotary_kv_write.h"
#include "../../common/host_launch.h"
#include "../tiling_core.h"

namespace mindie_ascendc {

aclError LaunchRotaryKvWrite(void* positions, void* q, void* k, void* v, void* cos_sin, void* slots, void* kc,
                             void* vc, void* q_out, void* k_out, void* tiling_dev, uint32_t tokens, uint32_t q_heads,
                             uint32_t kv_heads, uint32_t head_dim, uint32_t rot_dim, bool is_neox,
                             uint32_t dtype_bytes, uint64_t num_slots, uint64_t max_position, aclrtStream stream) {
  RotaryKvWriteTilingData t = ComputeRotaryKvWriteTiling(tokens, q_heads, kv_heads, head_dim, rot_dim, is_neox,
                                                         dtype_bytes, num_slots, max_position, QueryCoreInfo());
  aclError e = UploadTiling(t, tiling_dev, stream);
  if (e != ACL_SUCCESS) return e;
  return ACLRT_LAUNCH_KERNEL(rotary_kv_write)(t.block_dim, stream, positions, q, k, v, cos_sin, slots, kc, vc, q_out,
                                              k_out, nullptr, tiling_dev);
}

}  // namespace mindie_ascendc
