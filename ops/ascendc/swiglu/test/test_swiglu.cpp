// SPDX-License-Identifier: Apache-2.0
// SwiGLU: tiling on its own and the kernel under the emulator against test/reference.h.
#include <gtest/gtest.h>

#include "../../test/kernels.h"
#include "../../test/reference.h"
#include "../../test/test_util.h"

using namespace mindie_ascendc;
using namespace mindie_ascendc_test;

namespace {

constexpr ascendc_emu::SocSpec kSmallUb{"test-8KiB-UB", 8 * 1024, 8};

TEST(SwiGluTiling, FitsUbSplitsRowsAndTails) {
  for (uint32_t db : {2u, 4u}) {
    for (uint32_t cols : {2u, 14u, 1536u, 2002u, 22016u, 100000u}) {
      for (uint32_t rows : {1u, 39u, 40u, 41u, 777u}) {
        CoreInfo core = CoreOf(ascendc_emu::kAscend910B3);
        SwiGluTilingData t = ComputeSwiGluTiling(rows, cols, db, core);
        EXPECT_LE(SwiGluUbBytes(t.col_tile, db), core.ub_bytes);
        EXPECT_LE(t.block_dim, core.vector_cores);
        EXPECT_GE(uint64_t(t.block_dim) * t.rows_per_block, rows);
        EXPECT_LT(uint64_t(t.block_dim - 1) * t.rows_per_block, rows);
        EXPECT_EQ(uint64_t(t.num_col_tiles - 1) * t.col_tile + t.last_col_tile, cols / 2);
      }
    }
  }
  EXPECT_THROW(ComputeSwiGluTiling(2, 7, 4, CoreOf(ascendc_emu::kAscend910B3)), TilingError);
}

TEST(SwiGluKernel, MatchesReferenceOnGrid) {
  struct Case {
    uint32_t rows, cols;
    bool small;
  };
  for (uint32_t db : {4u, 2u}) {
    for (Case c : {Case{1, 16, false}, Case{3, 14, false}, Case{45, 1536, false}, Case{5, 2002, false},
                   Case{6, 3000, true}}) {
      SCOPED_TRACE(testing::Message() << c.rows << "x" << c.cols << " db=" << db << " small=" << c.small);
      const auto& soc = c.small ? kSmallUb : ascendc_emu::kAscend910B3;
      SwiGluTilingData t = ComputeSwiGluTiling(c.rows, c.cols, db, CoreOf(soc));
      if (c.small) {
        ASSERT_GT(t.num_col_tiles, 1u);
      }
      Buf x = RandomBuf(size_t(c.rows) * c.cols, db, 7, -4.0, 4.0);
      Buf y(size_t(c.rows) * c.cols / 2, db);
      LaunchSwiGlu(soc, t, x.ptr(), y.ptr());
      std::vector<double> ref;
      RefSwiGlu(x.values(), c.rows, c.cols / 2, ref);
      EXPECT_LT(RelErr(y.values(), ref), Tol(db));
    }
  }
}

}  // namespace
