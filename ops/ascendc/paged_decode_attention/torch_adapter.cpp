// SPDX-License-Identifier: Apache-2.0
// torch binding of FlashDecoding: torch.ops.mindie_ascendc.paged_decode_attention(query, key_cache,
// value_cache, block_tables, context_lens, scale) -> out [B, Hq, D], the contract of
// torch_npu._npu_paged_attention (caches [num_blocks, block_size, Hk, D], int32 tables and lengths).
// The split-KV workspace is allocated here. PrivateUse1 through OpCommand; Meta for shapes.
// CANN-only; UNVERIFIED (no CANN here).
#include <torch/library.h>

#include "torch_npu/csrc/core/npu/NPUStream.h"
#include "torch_npu/csrc/framework/OpCommand.h"

namespace mindie_ascendc {
uint64_t PagedDecodeWorkspaceBytes(uint32_t seqs, uint32_t q_heads, uint32_t kv_heads, uint32_t head_dim,
                                   uint32_t block_size, uint32_t max_blocks, uint64_t num_blocks, uint32_t dtype_bytes);
aclError LaunchPagedDecode(void* q, void* kc, void* vc, void* tables, void* lens, void* workspace, void* out,
                           void* tiling_dev, uint32_t seqs, uint32_t q_heads, uint32_t kv_heads, uint32_t head_dim,
                           uint32_t block_size, uint32_t max_blocks, uint64_t num_blocks, uint32_t dtype_bytes,
                           float scale, aclrtStream stream);
}

namespace {

at::Tensor PagedDecodeMeta(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  return at::empty_like(query);
}

at::Tensor PagedDecodeNpu(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                          const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt, "int32 tables/lens");
  at::Tensor q = query.contiguous(), bt = block_tables.contiguous(), lens = context_lens.contiguous();
  const uint32_t b = static_cast<uint32_t>(q.size(0)), hq = static_cast<uint32_t>(q.size(1));
  const uint32_t d = static_cast<uint32_t>(q.size(2)), hk = static_cast<uint32_t>(key_cache.size(2));
  const uint32_t bs = static_cast<uint32_t>(key_cache.size(1)), w = static_cast<uint32_t>(bt.size(1));
  const uint64_t nb = static_cast<uint64_t>(key_cache.size(0));
  const uint32_t db = static_cast<uint32_t>(q.element_size());
  const uint64_t ws_bytes = mindie_ascendc::PagedDecodeWorkspaceBytes(b, hq, hk, d, bs, w, nb, db);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  at::Tensor tiling = at::empty({256}, q.options().dtype(at::kByte));
  at::Tensor out = at::empty_like(q);
  at_npu::native::OpCommand cmd;
  cmd.Name("mindie_paged_decode_attention");
  cmd.SetCustomHandler([=]() -> int {
    return mindie_ascendc::LaunchPagedDecode(q.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), bt.data_ptr(),
                                             lens.data_ptr(), ws.data_ptr(), out.data_ptr(), tiling.data_ptr(), b, hq,
                                             hk, d, bs, w, nb, db, static_cast<float>(scale),
                                             c10_npu::getCurrentNPUStream().stream(false));
  });
  cmd.Run();
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mindie_ascendc, m) {
  m.def("paged_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
        "Tensor context_lens, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(mindie_ascendc, PrivateUse1, m) { m.impl("paged_decode_attention", &PagedDecodeNpu); }
TORCH_LIBRARY_IMPL(mindie_ascendc, Meta, m) { m.impl("paged_decode_attention", &PagedDecodeMeta); }
