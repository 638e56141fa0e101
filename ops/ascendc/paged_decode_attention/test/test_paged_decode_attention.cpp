// SPDX-License-Identifier: Apache-2.0
// Paged decode attention (FlashDecoding): the split/UB tiling on its own and both kernels under
// the emulator against test/reference.h, with one split and many (forced), GQA, shuffled blocks,
// context lengths that end mid-block and requests shorter than a split.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>

#include "../../test/kernels.h"
#include "../../test/reference.h"
#include "../../test/test_util.h"

using namespace mindie_ascendc;
using namespace mindie_ascendc_test;

namespace {

TEST(PagedDecodeTiling, SplitsFillCoresAndFitUb) {
  CoreInfo core = CoreOf(ascendc_emu::kAscend910B3);
  // 1 request, 1 KV head, 64 blocks: the splits are what fills 40 cores.
  PagedDecodeTilingData t = ComputePagedDecodeTiling(1, 8, 1, 128, 128, 64, 1000, 2, 0.1f, core);
  EXPECT_EQ(t.blocks_per_split, 2u);
  EXPECT_EQ(t.num_splits, 32u);
  EXPECT_EQ(t.split_block_dim, 32u);
  EXPECT_LE(PagedSplitUbBytes(8, 128, 2, t.chunk), core.ub_bytes);
  EXPECT_LE(PagedCombineUbBytes(t.num_splits, 128, 2), core.ub_bytes);
  EXPECT_EQ(t.workspace_bytes, uint64_t(8) * 32 * (128 + 16) * 4);
  // A large batch needs no split.
  t = ComputePagedDecodeTiling(64, 32, 8, 128, 128, 16, 4096, 2, 0.1f, core);
  EXPECT_EQ(t.num_splits, 1u);
  EXPECT_EQ(t.split_block_dim, 40u);
  EXPECT_EQ(t.combine_block_dim, 40u);
  // chunk shrinks until a group of 64 query heads fits; never crosses a cache block.
  t = ComputePagedDecodeTiling(1, 64, 1, 128, 128, 4, 100, 4, 0.1f, core);
  EXPECT_LT(t.chunk, 128u);
  EXPECT_EQ(128u % t.chunk, 0u);
  EXPECT_LE(PagedSplitUbBytes(64, 128, 4, t.chunk), core.ub_bytes);
  EXPECT_THROW(ComputePagedDecodeTiling(1, 65, 1, 128, 128, 4, 100, 4, 0.1f, core), TilingError);
  EXPECT_THROW(ComputePagedDecodeTiling(1, 8, 3, 128, 128, 4, 100, 4, 0.1f, core), TilingError);
  EXPECT_THROW(ComputePagedDecodeTiling(1, 8, 1, 100, 128, 4, 100, 2, 0.1f, core), TilingError);
  EXPECT_THROW(ComputePagedDecodeTiling(1, 8, 1, 128, 96, 4, 100, 2, 0.1f, core), TilingError);
}

struct Case {
  uint32_t seqs, hq, hk, d, bs;
  std::vector<int32_t> lens;
  uint32_t forced_splits;
};

void RunCase(const Case& c, uint32_t db) {
  const int32_t max_len = *std::max_element(c.lens.begin(), c.lens.end());
  const uint32_t W = (max_len + c.bs - 1) / c.bs + 1;  // one spare column of padding
  const uint32_t nblocks = c.seqs * W + 1;
  std::mt19937 gen(5);
  std::vector<int32_t> perm(nblocks - 1);
  std::iota(perm.begin(), perm.end(), 1);  // block 0 stays the null block
  std::shuffle(perm.begin(), perm.end(), gen);
  std::vector<int32_t> tables(size_t(c.seqs) * W, 0);
  size_t next = 0;
  for (uint32_t b = 0; b < c.seqs; ++b) {
    for (int32_t i = 0; i < (c.lens[b] + int32_t(c.bs) - 1) / int32_t(c.bs); ++i) tables[b * W + i] = perm[next++];
  }
  const double scale = 1.0 / std::sqrt(double(c.d));
  PagedDecodeTilingData t = ComputePagedDecodeTiling(c.seqs, c.hq, c.hk, c.d, c.bs, W, nblocks, db, float(scale),
                                                     CoreOf(ascendc_emu::kAscend910B3), c.forced_splits);
  if (c.forced_splits > 1) {
    ASSERT_GT(t.num_splits, 1u);
  }
  const size_t cn = size_t(nblocks) * c.bs * c.hk * c.d;
  Buf q = RandomBuf(size_t(c.seqs) * c.hq * c.d, db, 1, -2, 2), kc = RandomBuf(cn, db, 2), vc = RandomBuf(cn, db, 3);
  Buf out(size_t(c.seqs) * c.hq * c.d, db);
  std::vector<uint8_t> ws(t.workspace_bytes + 64);
  std::vector<int32_t> lens = c.lens;
  LaunchPagedDecode(ascendc_emu::kAscend910B3, t, q.ptr(), kc.ptr(), vc.ptr(),
                    reinterpret_cast<uint8_t*>(tables.data()), reinterpret_cast<uint8_t*>(lens.data()), ws.data(),
                    out.ptr());
  std::vector<double> ref;
  RefPagedDecode(q.values(), kc.values(), vc.values(), tables, c.lens, c.seqs, c.hq, c.hk, c.d, c.bs, W, scale, ref);
  EXPECT_LT(RelErr(out.values(), ref), Tol(db));
}

TEST(PagedDecodeKernel, MatchesReferenceOnGrid) {
  for (uint32_t db : {4u, 2u}) {
    for (const Case& c : {Case{1, 1, 1, 16, 16, {1}, 0}, Case{3, 9, 3, 64, 16, {1, 17, 40}, 0},
                          Case{2, 4, 4, 32, 8, {33, 5}, 3}, Case{1, 8, 2, 64, 16, {100}, 0},
                          Case{4, 6, 2, 16, 32, {31, 64, 65, 2}, 2}}) {
      SCOPED_TRACE(testing::Message() << c.seqs << " seqs, " << c.hq << "/" << c.hk << " heads, d=" << c.d
                                      << " bs=" << c.bs << " forced_splits=" << c.forced_splits << " db=" << db);
      RunCase(c, db);
    }
  }
}

}  // namespace
