// SPDX-License-Identifier: Apache-2.0
// CANN host launcher of swiglu (direct launch). CANN-only; UNVERIFIED (no CANN here).
#include "aclrtlaunch_swiglu.h"
#include "../../common/host_launch.h"
#include "../tiling_core.h"

namespace mindie_ascendc {

// x: [rows, cols] (cols even), y: [rows, cols / 2].
aclError LaunchSwiGlu(void* x, void* y, void* tiling_dev, uint32_t rows, uint32_t cols, uint32_t dtype_bytes,
                      aclrtStream stream) {
  SwiGluTilingData t = ComputeSwiGluTiling(rows, cols, dtype_bytes, QueryCoreInfo());
  aclError e = UploadTiling(t, tiling_dev, stream);
  if (e != ACL_SUCCESS) return e;
  return ACLRT_LAUNCH_KERNEL(swiglu)(t.block_dim, stream, x, y, nullptr, tiling_dev);
}

}  // namespace mindie_ascendc
