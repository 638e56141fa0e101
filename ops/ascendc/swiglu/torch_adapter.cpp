// SPDX-License-Identifier: Apache-2.0
// torch binding of swiglu: torch.ops.mindie_ascendc.swiglu(x) -> silu(x[..., :I]) * x[..., I:]
// (torch_npu.npu_swiglu(x, dim=-1)). PrivateUse1 through OpCommand; Meta for shapes. CANN-only;
// UNVERIFIED (no CANN here).
#include <torch/library.h>

#include "torch_npu/csrc/core/npu/NPUStream.h"
#include "torch_npu/csrc/framework/OpCommand.h"

namespace mindie_ascendc {
aclError LaunchSwiGlu(void* x, void* y, void* tiling_dev, uint32_t rows, uint32_t cols, uint32_t dtype_bytes,
                      aclrtStream stream);
}

namespace {

at::Tensor SwiGluMeta(const at::Tensor& x) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() /= 2;
  return at::empty(s, x.options());
}

at::Tensor SwiGluNpu(const at::Tensor& x) {
  TORCH_CHECK(x.size(-1) % 2 == 0, "swiglu: the last dimension must be even");
  at::Tensor xc = x.contiguous(), y = SwiGluMeta(x).to(x.device());
  at::Tensor tiling = at::empty({256}, x.options().dtype(at::kByte));
  const uint32_t cols = static_cast<uint32_t>(x.size(-1)), rows = static_cast<uint32_t>(x.numel() / cols);
  const uint32_t db = static_cast<uint32_t>(x.element_size());
  at_npu::native::OpCommand cmd;
  cmd.Name("mindie_swiglu");
  cmd.SetCustomHandler([=]() -> int {
    return mindie_ascendc::LaunchSwiGlu(xc.data_ptr(), y.data_ptr(), tiling.data_ptr(), rows, cols, db,
                                        c10_npu::getCurrentNPUStream().stream(false));
  });
  cmd.Run();
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mindie_ascendc, m) { m.def("swiglu(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(mindie_ascendc, PrivateUse1, m) { m.impl("swiglu", &SwiGluNpu); }
TORCH_LIBRARY_IMPL(mindie_ascendc, Meta, m) { m.impl("swiglu", &SwiGluMeta); }
