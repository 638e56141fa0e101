// SPDX-License-Identifier: Apache-2.0
// torch binding of add_rms_norm: torch.ops.mindie_ascendc.add_rms_norm(x1, x2, gamma, eps)
// -> (y, rstd, x), the contract of torch_npu.npu_add_rms_norm. PrivateUse1 (NPU) runs the kernel
// through OpCommand's custom handler on the current NPU stream; Meta gives shapes for graph
// capture. Built only with CANN + torch_npu; UNVERIFIED (no CANN here).
#include <torch/library.h>

#include "torch_npu/csrc/core/npu/NPUStream.h"
#include "torch_npu/csrc/framework/OpCommand.h"

namespace mindie_ascendc {
aclError LaunchAddRmsNorm(void* x1, void* x2, void* gamma, void* y, void* rstd, void* x, void* tiling_dev,
                          uint32_t rows, uint32_t cols, uint32_t dtype_bytes, float eps, aclrtStream stream);
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> AddRmsNormMeta(const at::Tensor& x1, const at::Tensor& x2,
                                                              const at::Tensor& gamma, double eps) {
  std::vector<int64_t> rs(x1.sizes().begin(), x1.sizes().end() - 1);
  rs.push_back(1);
  return {at::empty_like(x1), at::empty(rs, x1.options().dtype(at::kFloat)), at::empty_like(x1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> AddRmsNormNpu(const at::Tensor& x1, const at::Tensor& x2,
                                                             const at::Tensor& gamma, double eps) {
  TORCH_CHECK(x1.sizes() == x2.sizes() && x1.scalar_type() == x2.scalar_type(), "x1 and x2 must match");
  TORCH_CHECK(x1.scalar_type() == at::kHalf || x1.scalar_type() == at::kFloat, "float16 or float32 only");
  auto out = AddRmsNormMeta(x1, x2, gamma, eps);
  at::Tensor y = std::get<0>(out).to(x1.device()), rstd = std::get<1>(out).to(x1.device());
  at::Tensor x = std::get<2>(out).to(x1.device());
  at::Tensor tiling = at::empty({256}, x1.options().dtype(at::kByte));
  const uint32_t cols = static_cast<uint32_t>(x1.size(-1)), rows = static_cast<uint32_t>(x1.numel() / cols);
  const uint32_t db = static_cast<uint32_t>(x1.element_size());
  at::Tensor a = x1.contiguous(), b = x2.contiguous(), g = gamma.contiguous();
  at_npu::native::OpCommand cmd;
  cmd.Name("mindie_add_rms_norm");
  cmd.SetCustomHandler([=]() -> int {
    auto stream = c10_npu::getCurrentNPUStream().stream(false);
    return mindie_ascendc::LaunchAddRmsNorm(a.data_ptr(), b.data_ptr(), g.data_ptr(), y.data_ptr(), rstd.data_ptr(),
                                            x.data_ptr(), tiling.data_ptr(), rows, cols, db,
                                            static_cast<float>(eps), stream);
  });
  cmd.Run();
  return {y, rstd, x};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mindie_ascendc, m) {
  m.def("add_rms_norm(Tensor x1, Tensor x2, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(mindie_ascendc, PrivateUse1, m) { m.impl("add_rms_norm", &AddRmsNormNpu); }
TORCH_LIBRARY_IMPL(mindie_ascendc, Meta, m) { m.impl("add_rms_norm", &AddRmsNormMeta); }
