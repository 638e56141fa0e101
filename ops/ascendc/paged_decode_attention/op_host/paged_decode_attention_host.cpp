// SPDX-License-Identifier: Apache-2.0
// CANN host launcher of the two FlashDecoding kernels (split, then combine, on one stream: the
// stream orders them). CANN-only; UNVERIFIED (no CANN here).
#include "aclrtlaunch_paged_decode_attention_combine.h"
#include "aclrtlaunch_paged_decode_attention_split.h"
#include "../../common/host_launch.h"
#include "../tiling_core.h"

namespace mindie_ascendc {

// Workspace bytes the caller must allocate for these shapes.
uint64_t PagedDecodeWorkspaceBytes(uint32_t seqs, uint32_t q_heads, uint32_t kv_heads, uint32_t head_dim,
                                   uint32_t block_size, uint32_t max_blocks, uint64_t num_blocks, uint32_t dtype_bytes) {
  return ComputePagedDecodeTiling(seqs, q_heads, kv_heads, head_dim, block_size, max_blocks, num_blocks, dtype_bytes,
                                  1.0f, QueryCoreInfo())
      .workspace_bytes;
}

aclError LaunchPagedDecode(void* q, void* kc, void* vc, void* tables, void* lens, void* workspace, void* out,
                           void* tiling_dev, uint32_t seqs, uint32_t q_heads, uint32_t kv_heads, uint32_t head_dim,
                           uint32_t block_size, uint32_t max_blocks, uint64_t num_blocks, uint32_t dtype_bytes,
                           float scale, aclrtStream stream) {
  PagedDecodeTilingData t = ComputePagedDecodeTiling(seqs, q_heads, kv_heads, head_dim, block_size, max_blocks,
                                                     num_blocks, dtype_bytes, scale, QueryCoreInfo());
  aclError e = UploadTiling(t, tiling_dev, stream);
  if (e != ACL_SUCCESS) return e;
  e = ACLRT_LAUNCH_KERNEL(paged_decode_attention_split)(t.split_block_dim, stream, q, kc, vc, tables, lens, workspace,
                                                        tiling_dev);
  if (e != ACL_SUCCESS) return e;
  return ACLRT_LAUNCH_KERNEL(paged_decode_attention_combine)(t.combine_block_dim, stream, workspace, out, tiling_dev);
}

}  // namespace mindie_ascendc
