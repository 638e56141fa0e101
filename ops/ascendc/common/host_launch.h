// SPDX-License-Identifier: Apache-2.0
// Host side of the direct-launch path under CANN (op_host/*_host.cpp): the SoC's vector cores and
// UB from the platform API, and the upload of a POD tiling struct to device memory. Built only
// with CANN (ascendc_library); never compiled on the CPU-only CI machines, so UNVERIFIED.
#pragma once

#include <cstdint>
#include <cstring>

#include "acl/acl.h"
#include "tiling/platform/platform_ascendc.h"
#include "tiling_common.h"

namespace mindie_ascendc {

inline CoreInfo QueryCoreInfo() {
  auto* plat = platform_ascendc::PlatformAscendCManager::GetInstance();
  uint64_t ub = 0;
  plat->GetCoreMemSize(platform_ascendc::CoreMemType::UB, ub);
  return CoreInfo{static_cast<uint32_t>(plat->GetCoreNumAiv()), static_cast<uint32_t>(ub)};
}

// Copies `t` into `dev` (device memory of at least sizeof(T) bytes) on `stream`.
template <typename T>
inline aclError UploadTiling(const T& t, void* dev, aclrtStream stream) {
  return aclrtMemcpyAsync(dev, sizeof(T), &t, sizeof(T), ACL_MEMCPY_HOST_TO_DEVICE, stream);
}

}  // namespace mindie_ascendc
