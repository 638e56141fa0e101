// SPDX-License-Identifier: Apache-2.0
// Self-tests of the Ascend C emulator: each rule it enforces is broken once by a tiny kernel and
// must be caught (unaligned copy, UB overflow, unbalanced queue, queue depth, block count, use
// after free, GM bounds, misaligned operand), and a well-formed kernel must pass.
#include <gtest/gtest.h>

#include <vector>

#include "ascendc_emu.h"
#include "../add_rms_norm/tiling_core.h"
#include "../test/kernels.h"

using namespace AscendC;

namespace {

template <typename F>
std::string ViolationOf(uint32_t blocks, F kernel) {
  try {
    ascendc_emu::Launch(ascendc_emu::kAscend910B3, blocks, kernel);
  } catch (const ascendc_emu::Violation& v) {
    return v.what();
  }
  return "";
}

// Doubles 8 floats per block: Alloc -> DataCopy -> EnQue -> DeQue -> compute -> Free.
void GoodKernel(float* gm, uint32_t n) {
  TPipe pipe;
  TQue<TPosition::VECIN, 2> q;
  pipe.InitBuffer(q, 2, n * sizeof(float));
  GlobalTensor<float> g;
  g.SetGlobalBuffer(gm + GetBlockIdx() * n, n);
  LocalTensor<float> t = q.AllocTensor<float>();
  DataCopy(t, g, n);
  q.EnQue(t);
  t = q.DeQue<float>();
  Muls(t, t, 2.0f, n);
  DataCopy(g, t, n);
  q.FreeTensor(t);
}

TEST(Emulator, WellFormedKernelRunsEveryBlock) {
  std::vector<float> x(32, 1.5f);
  EXPECT_EQ(ViolationOf(4, [&] { GoodKernel(x.data(), 8); }), "");
  for (float v : x) EXPECT_EQ(v, 3.0f);
}

TEST(Emulator, CatchesUnalignedCopy) {
  std::vector<float> x(7, 1.0f);
  std::string v = ViolationOf(1, [&] { GoodKernel(x.data(), 7); });  // 28 bytes
  EXPECT_NE(v.find("unaligned copy"), std::string::npos) << v;
}

TEST(Emulator, CatchesUbOverflow) {
  std::string v = ViolationOf(1, [] {
    TPipe pipe;
    TQue<TPosition::VECIN, 2> a, b;
    pipe.InitBuffer(a, 2, 64 * 1024);
    pipe.InitBuffer(b, 2, 64 * 1024);  // 256 KiB > 192 KiB of Ascend910B3
  });
  EXPECT_NE(v.find("UB overflow"), std::string::npos) << v;
}

TEST(Emulator, CatchesUbOverflowOfARealKernelWithABadTiling) {
  mindie_ascendc::AddRmsNormTilingData t =
      mindie_ascendc::ComputeAddRmsNormTiling(2, 64, 4, 1e-6f, {40, 192 * 1024});
  t.col_tile = 8192;  // what a wrong tiling would hand the kernel: 8192 fp32 columns per tile
  std::vector<float> x(128), y(128), g(64), r(2);
  std::string v;
  try {
    mindie_ascendc_test::LaunchAddRmsNorm(ascendc_emu::kAscend910B3, t, reinterpret_cast<uint8_t*>(x.data()),
                                          reinterpret_cast<uint8_t*>(x.data()), reinterpret_cast<uint8_t*>(g.data()),
                                          reinterpret_cast<uint8_t*>(y.data()), reinterpret_cast<uint8_t*>(r.data()),
                                          reinterpret_cast<uint8_t*>(y.data()));
  } catch (const ascendc_emu::Violation& e) {
    v = e.what();
  }
  EXPECT_NE(v.find("UB overflow"), std::string::npos) << v;
}

TEST(Emulator, CatchesUnbalancedQueue) {
  std::string v = ViolationOf(1, [] {  // allocated, en-queued, never de-queued or freed
    TPipe pipe;
    TQue<TPosition::VECIN, 2> q;
    pipe.InitBuffer(q, 2, 32);
    q.EnQue(q.AllocTensor<float>());
  });
  EXPECT_NE(v.find("unbalanced queue"), std::string::npos) << v;
  v = ViolationOf(1, [] {  // DeQue without EnQue
    TPipe pipe;
    TQue<TPosition::VECIN, 2> q;
    pipe.InitBuffer(q, 2, 32);
    q.DeQue<float>();
  });
  EXPECT_NE(v.find("DeQue from an empty queue"), std::string::npos) << v;
  v = ViolationOf(1, [] {  // FreeTensor while still en-queued
    TPipe pipe;
    TQue<TPosition::VECIN, 2> q;
    pipe.InitBuffer(q, 2, 32);
    LocalTensor<float> t = q.AllocTensor<float>();
    q.EnQue(t);
    q.FreeTensor(t);
  });
  EXPECT_NE(v.find("still en-queued"), std::string::npos) << v;
  v = ViolationOf(1, [] {  // a third AllocTensor with two buffers
    TPipe pipe;
    TQue<TPosition::VECIN, 2> q;
    pipe.InitBuffer(q, 2, 32);
    q.AllocTensor<float>();
    q.AllocTensor<float>();
    q.AllocTensor<float>();
  });
  EXPECT_NE(v.find("all 2 buffers in use"), std::string::npos) << v;
}

TEST(Emulator, CatchesQueueDepth) {
  std::string v = ViolationOf(1, [] {
    TPipe pipe;
    TQue<TPosition::VECIN, 1> q;
    pipe.InitBuffer(q, 2, 32);
    q.EnQue(q.AllocTensor<float>());
    q.EnQue(q.AllocTensor<float>());
  });
  EXPECT_NE(v.find("queue depth"), std::string::npos) << v;
}

TEST(Emulator, CatchesBlockCountBeyondCores) {
  std::vector<float> x(8 * 41, 1.0f);
  std::string v = ViolationOf(41, [&] { GoodKernel(x.data(), 8); });
  EXPECT_NE(v.find("block count"), std::string::npos) << v;
}

TEST(Emulator, CatchesUseAfterFreeGmBoundsAndMisalignedOperand) {
  std::string v = ViolationOf(1, [] {
    TPipe pipe;
    TQue<TPosition::VECIN, 1> q;
    pipe.InitBuffer(q, 1, 32);
    LocalTensor<float> t = q.AllocTensor<float>();
    q.FreeTensor(t);
    Muls(t, t, 2.0f, 8);
  });
  EXPECT_NE(v.find("use after free"), std::string::npos) << v;
  std::vector<float> x(8);
  v = ViolationOf(1, [&] {
    TPipe pipe;
    TQue<TPosition::VECIN, 1> q;
    pipe.InitBuffer(q, 1, 64);
    GlobalTensor<float> g;
    g.SetGlobalBuffer(x.data(), 8);
    LocalTensor<float> t = q.AllocTensor<float>();
    DataCopy(t, g, 16);  // 16 floats from an 8-float buffer
    q.FreeTensor(t);
  });
  EXPECT_NE(v.find("GM bounds"), std::string::npos) << v;
  v = ViolationOf(1, [] {
    TPipe pipe;
    TBuf<TPosition::VECCALC> b;
    pipe.InitBuffer(b, 64);
    LocalTensor<float> t = b.Get<float>();
    Adds(t[3], t[3], 1.0f, 8);  // operand at UB offset 12 bytes
  });
  EXPECT_NE(v.find("UB alignment"), std::string::npos) << v;
}

}  // namespace
