// SPDX-License-Identifier: Apache-2.0
// CANN host launcher of add_rms_norm (direct launch of the ascendc_library() kernel): tiling from
// the platform's core count and UB, tiling upload, launch on the caller's stream. CANN-only;
// UNVERIFIED (no CANN here).
#include "aclrtlaunch_add_rms_norm.h"
#include "../../common/host_launch.h"
#include "../tiling_core.h"

namespace mindie_ascendc {

// x1, x2, y, x: [rows, cols]; gamma [cols]; rstd [rows] fp32; tiling_dev: sizeof(tiling) bytes.
aclError LaunchAddRmsNorm(void* x1, void* x2, void* gamma, void* y, void* rstd, void* x, void* tiling_dev,
                          uint32_t rows, uint32_t cols, uint32_t dtype_bytes, float eps, aclrtStream stream) {
  AddRmsNormTilingData t = ComputeAddRmsNormTiling(rows, cols, dtype_bytes, eps, QueryCoreInfo());
  aclError e = UploadTiling(t, tiling_dev, stream);
  if (e != ACL_SUCCESS) return e;
  return ACLRT_LAUNCH_KERNEL(add_rms_norm)(t.block_dim, stream, x1, x2, gamma, y, rstd, x, nullptr, tiling_dev);
}

}  // namespace mindie_ascendc
