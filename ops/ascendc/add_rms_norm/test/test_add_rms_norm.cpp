// SPDX-License-Identifier: Apache-2.0
// AddRmsNorm: the tiling core on its own (UB budget, core split, tail tiles) and the kernel under
// the emulator against the double-precision reference (test/reference.h) on a grid of shapes.
#include <gtest/gtest.h>

#include "../../test/kernels.h"
#include "../../test/reference.h"
#include "../../test/test_util.h"

using namespace mindie_ascendc;
using namespace mindie_ascendc_test;

namespace {

constexpr ascendc_emu::SocSpec kSmallUb{"test-8KiB-UB", 8 * 1024, 8};

TEST(AddRmsNormTiling, FitsUbAndSplitsRows) {
  for (uint32_t db : {2u, 4u}) {
    for (uint32_t cols : {1u, 7u, 64u, 576u, 4095u, 5000u, 20000u, 100000u}) {
      for (uint32_t rows : {1u, 3u, 40u, 41u, 1000u}) {
        CoreInfo core = CoreOf(ascendc_emu::kAscend910B3);
        AddRmsNormTilingData t = ComputeAddRmsNormTiling(rows, cols, db, 1e-6f, core);
        EXPECT_LE(AddRmsNormUbBytes(t.col_tile, db), core.ub_bytes) << cols;
        EXPECT_EQ(t.col_tile % TileAlign(db), 0u);
        EXPECT_LE(t.block_dim, core.vector_cores);
        EXPECT_GE(uint64_t(t.block_dim) * t.rows_per_block, rows);
        EXPECT_LT(uint64_t(t.block_dim - 1) * t.rows_per_block, rows);  // no empty block
        EXPECT_EQ(uint64_t(t.num_col_tiles - 1) * t.col_tile + t.last_col_tile, cols);
        EXPECT_GE(t.last_col_tile, 1u);
        EXPECT_LE(t.last_col_tile, t.col_tile);
      }
    }
  }
}

TEST(AddRmsNormTiling, SingleTileWhenRowFits) {
  AddRmsNormTilingData t = ComputeAddRmsNormTiling(5, 576, 2, 1e-6f, CoreOf(ascendc_emu::kAscend910B3));
  EXPECT_EQ(t.num_col_tiles, 1u);
  EXPECT_EQ(t.col_tile, 576u);
  EXPECT_EQ(t.block_dim, 5u);
  EXPECT_EQ(t.rows_per_block, 1u);
  t = ComputeAddRmsNormTiling(5, 20000, 4, 1e-6f, CoreOf(ascendc_emu::kAscend910B3));
  EXPECT_GT(t.num_col_tiles, 1u);  // 20000 fp32 columns do not fit 192 KiB with double buffering
}

TEST(AddRmsNormTiling, RefusesImpossibleShapes) {
  CoreInfo core = CoreOf(ascendc_emu::kAscend910B3);
  EXPECT_THROW(ComputeAddRmsNormTiling(4, 0, 4, 1e-6f, core), TilingError);
  EXPECT_THROW(ComputeAddRmsNormTiling(4, 8, 8, 1e-6f, core), TilingError);
  EXPECT_THROW(ComputeAddRmsNormTiling(4, 8, 4, 1e-6f, CoreInfo{0, 1 << 20}), TilingError);
}

struct Case {
  uint32_t rows, cols, db;
  bool small_ub;
};

void RunCase(const Case& c) {
  const ascendc_emu::SocSpec& soc = c.small_ub ? kSmallUb : ascendc_emu::kAscend910B3;
  AddRmsNormTilingData t = ComputeAddRmsNormTiling(c.rows, c.cols, c.db, 1e-6f, CoreOf(soc));
  if (c.small_ub) {
    ASSERT_GT(t.num_col_tiles, 1u);
  }
  size_t n = size_t(c.rows) * c.cols;
  Buf x1 = RandomBuf(n, c.db, 1), x2 = RandomBuf(n, c.db, 2), g = RandomBuf(c.cols, c.db, 3, 0.5, 1.5);
  Buf y(n, c.db), x(n, c.db), rstd(c.rows, 4);
  LaunchAddRmsNorm(soc, t, x1.ptr(), x2.ptr(), g.ptr(), y.ptr(), rstd.ptr(), x.ptr());
  auto round = [&](double v) {
    Buf one(1, c.db);
    one.set(0, v);
    return one.get(0);
  };
  std::vector<double> ry, rr, rx;
  RefAddRmsNorm(x1.values(), x2.values(), g.values(), c.rows, c.cols, 1e-6, round, ry, rr, rx);
  EXPECT_LT(RelErr(x.values(), rx), Tol(c.db)) << c.rows << "x" << c.cols;
  EXPECT_LT(RelErr(y.values(), ry), Tol(c.db)) << c.rows << "x" << c.cols;
  EXPECT_LT(RelErr(rstd.values(), rr), 1e-5) << c.rows << "x" << c.cols;
}

TEST(AddRmsNormKernel, MatchesReferenceOnGrid) {
  for (uint32_t db : {4u, 2u}) {
    for (Case c : {Case{1, 8, db, false}, Case{3, 7, db, false}, Case{41, 576, db, false}, Case{7, 1001, db, false},
                   Case{2, 5000, db, false}, Case{9, 300, db, true}, Case{5, 1003, db, true}}) {
      SCOPED_TRACE(testing::Message() << c.rows << "x" << c.cols << " dtype_bytes=" << db << " small_ub=" << c.small_ub);
      RunCase(c);
    }
  }
}

}  // namespace
