// SPDX-License-Identifier: Apache-2.0
// torch binding of rotary_kv_write: torch.ops.mindie_ascendc.rotary_kv_write(positions, query, key,
// value, key_cache, value_cache, slot_mapping, head_dim, cos_sin_cache, is_neox) -> (query, key),
// rotated; K and V written into the caches ([num_blocks, block_size, Hk, D] each) in place, as
// ops.rotary_embedding_write_kv. PrivateUse1 through OpCommand; Meta for shapes. CANN-only;
// UNVERIFIED (no CANN here).
#include <torch/library.h>

#include "torch_npu/csrc/core/npu/NPUStream.h"
#include "torch_npu/csrc/framework/OpCommand.h"

namespace mindie_ascendc {
aclError LaunchRotaryKvWrite(void* positions, void* q, void* k, void* v, void* cos_sin, void* slots, void* kc,
                             void* vc, void* q_out, void* k_out, void* tiling_dev, uint32_t tokens, uint32_t q_heads,
                             uint32_t kv_heads, uint32_t head_dim, uint32_t rot_dim, bool is_neox,
                             uint32_t dtype_bytes, uint64_t num_slots, uint64_t max_position, aclrtStream stream);
}

namespace {

std::tuple<at::Tensor, at::Tensor> RotaryKvWriteMeta(const at::Tensor& positions, const at::Tensor& query,
                                                     const at::Tensor& key, const at::Tensor& value,
                                                     at::Tensor& key_cache, at::Tensor& value_cache,
                                                     const at::Tensor& slot_mapping, int64_t head_dim,
                                                     const at::Tensor& cos_sin_cache, bool is_neox) {
  return {at::empty_like(query), at::empty_like(key)};
}

std::tuple<at::Tensor, at::Tensor> RotaryKvWriteNpu(const at::Tensor& positions, const at::Tensor& query,
                                                    const at::Tensor& key, const at::Tensor& value,
                                                    at::Tensor& key_cache, at::Tensor& value_cache,
                                                    const at::Tensor& slot_mapping, int64_t head_dim,
                                                    const at::Tensor& cos_sin_cache, bool is_neox) {
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slot_mapping.scalar_type() == at::kLong, "int64 indices");
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat, "cos_sin_cache must be float32");
  at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  at::Tensor qo = at::empty_like(q), ko = at::empty_like(k);
  at::Tensor tiling = at::empty({256}, q.options().dtype(at::kByte));
  const uint32_t t = static_cast<uint32_t>(q.size(0)), d = static_cast<uint32_t>(head_dim);
  const uint32_t hq = static_cast<uint32_t>(q.size(1) / d), hk = static_cast<uint32_t>(k.size(1) / d);
  const uint64_t slots = static_cast<uint64_t>(key_cache.size(0)) * key_cache.size(1);
  const uint32_t rot = static_cast<uint32_t>(cos_sin_cache.size(1));
  const uint64_t maxpos = static_cast<uint64_t>(cos_sin_cache.size(0));
  const uint32_t db = static_cast<uint32_t>(q.element_size());
  at_npu::native::OpCommand cmd;
  cmd.Name("mindie_rotary_kv_write");
  cmd.SetCustomHandler([=]() -> int {
    return mindie_ascendc::LaunchRotaryKvWrite(positions.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                               cos_sin_cache.data_ptr(), slot_mapping.data_ptr(),
                                               key_cache.data_ptr(), value_cache.data_ptr(), qo.data_ptr(),
                                               ko.data_ptr(), tiling.data_ptr(), t, hq, hk, d, rot, is_neox, db, slots,
                                               maxpos, c10_npu::getCurrentNPUStream().stream(false));
  });
  cmd.Run();
  return {qo, ko};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mindie_ascendc, m) {
  m.def("rotary_kv_write(Tensor positions, Tensor query, Tensor key, Tensor value, Tensor(a!) key_cache, "
        "Tensor(b!) value_cache, Tensor slot_mapping, int head_dim, Tensor cos_sin_cache, bool is_neox) "
        "-> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(mindie_ascendc, PrivateUse1, m) { m.impl("rotary_kv_write", &RotaryKvWriteNpu); }
TORCH_LIBRARY_IMPL(mindie_ascendc, Meta, m) { m.impl("rotary_kv_write", &RotaryKvWriteMeta); }
