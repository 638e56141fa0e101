// SPDX-License-Identifier: Apache-2.0
// RotaryKvWrite: tiling on its own and the kernel under the emulator against test/reference.h
// (neox and interleaved, partial rotary, padding slots, GQA, several blocks, fp32 and fp16).
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

TEST(RotaryKvWriteTiling, ChecksShapesAndSplitsTokens) {
  CoreInfo core = CoreOf(ascendc_emu::kAscend910B3);
  RotaryKvWriteTilingData t = ComputeRotaryKvWriteTiling(77, 9, 3, 64, 64, true, 2, 1024, 2048, core);
  EXPECT_EQ(t.block_dim, 39u);  // 77 tokens: 2 per block
  EXPECT_EQ(t.tokens_per_block, 2u);
  EXPECT_LE(RotaryKvWriteUbBytes(64, 2, t.cs_tile), core.ub_bytes);
  EXPECT_THROW(ComputeRotaryKvWriteTiling(4, 9, 3, 60, 60, true, 2, 64, 64, core), TilingError);   // 120 B rows
  EXPECT_THROW(ComputeRotaryKvWriteTiling(4, 9, 3, 64, 63, true, 4, 64, 64, core), TilingError);   // odd rot
  EXPECT_THROW(ComputeRotaryKvWriteTiling(4, 9, 2, 64, 64, true, 4, 64, 64, core), TilingError);   // 9 % 2
  EXPECT_THROW(ComputeRotaryKvWriteTiling(4, 1, 1, 1 << 16, 64, true, 4, 64, 64, core), TilingError);  // UB
}

struct Case {
  uint32_t tokens, hq, hk, d, rot;
  bool neox;
};

void RunCase(const Case& c, uint32_t db) {
  const uint32_t nblocks = 6, bs = 16, maxpos = 300;
  const uint64_t slots = uint64_t(nblocks) * bs;
  auto core = CoreOf(ascendc_emu::kAscend910B3);
  RotaryKvWriteTilingData t =
      ComputeRotaryKvWriteTiling(c.tokens, c.hq, c.hk, c.d, c.rot, c.neox, db, slots, maxpos, core);
  std::mt19937 gen(11);
  std::vector<int64_t> pos(c.tokens), slot(c.tokens);
  std::vector<int64_t> perm(slots);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), gen);
  for (uint32_t i = 0; i < c.tokens; ++i) {
    pos[i] = gen() % maxpos;
    slot[i] = i % 5 == 3 ? -1 : perm[i];  // some padding rows
  }
  Buf cs(size_t(maxpos) * c.rot, 4);
  for (uint32_t p = 0; p < maxpos; ++p) {
    for (uint32_t i = 0; i < c.rot / 2; ++i) {
      double f = p * std::pow(10000.0, -2.0 * i / c.rot);
      cs.set(size_t(p) * c.rot + i, std::cos(f));
      cs.set(size_t(p) * c.rot + c.rot / 2 + i, std::sin(f));
    }
  }
  const size_t qn = size_t(c.tokens) * c.hq * c.d, kn = size_t(c.tokens) * c.hk * c.d, cn = slots * c.hk * c.d;
  Buf q = RandomBuf(qn, db, 1), k = RandomBuf(kn, db, 2), v = RandomBuf(kn, db, 3);
  Buf kc = RandomBuf(cn, db, 4), vc = RandomBuf(cn, db, 5);
  std::vector<double> kc_ref = kc.values(), vc_ref = vc.values();
  Buf qo(qn, db), ko(kn, db);
  LaunchRotaryKvWrite(ascendc_emu::kAscend910B3, t, reinterpret_cast<uint8_t*>(pos.data()), q.ptr(), k.ptr(),
                      v.ptr(), cs.ptr(), reinterpret_cast<uint8_t*>(slot.data()), kc.ptr(), vc.ptr(), qo.ptr(),
                      ko.ptr());
  std::vector<double> qv = q.values(), kv = k.values(), vv = v.values(), csv = cs.values();
  std::vector<double> q_ref(qn), k_ref(kn);
  for (uint32_t i = 0; i < c.tokens; ++i) {
    const double* row = &csv[size_t(pos[i]) * c.rot];
    for (uint32_t h = 0; h < c.hq; ++h) {
      size_t o = (size_t(i) * c.hq + h) * c.d;
      RefRotateHead(&qv[o], &q_ref[o], c.d, c.rot, row, c.neox);
    }
    for (uint32_t h = 0; h < c.hk; ++h) {
      size_t o = (size_t(i) * c.hk + h) * c.d;
      RefRotateHead(&kv[o], &k_ref[o], c.d, c.rot, row, c.neox);
      if (slot[i] >= 0) {
        size_t co = (size_t(slot[i]) * c.hk + h) * c.d;
        for (uint32_t e = 0; e < c.d; ++e) {
          kc_ref[co + e] = k_ref[o + e];
          vc_ref[co + e] = vv[o + e];
        }
      }
    }
  }
  EXPECT_LT(RelErr(qo.values(), q_ref), Tol(db));
  EXPECT_LT(RelErr(ko.values(), k_ref), Tol(db));
  EXPECT_LT(RelErr(kc.values(), kc_ref), Tol(db));   // untouched slots keep their old values
  EXPECT_EQ(vc.values(), [&] {                       // V is copied bit for bit
    Buf r(cn, db);
    for (size_t i = 0; i < cn; ++i) r.set(i, vc_ref[i]);
    return r.values();
  }());
}

TEST(RotaryKvWriteKernel, MatchesReferenceOnGrid) {
  for (uint32_t db : {4u, 2u}) {
    for (Case c : {Case{1, 1, 1, 16, 16, true}, Case{7, 9, 3, 64, 64, true}, Case{7, 9, 3, 64, 64, false},
                   Case{45, 4, 2, 32, 16, true}, Case{45, 4, 2, 32, 16, false}, Case{13, 8, 1, 128, 128, true}}) {
      SCOPED_TRACE(testing::Message() << c.tokens << " tok, " << c.hq << "/" << c.hk << " heads, d=" << c.d
                                      << " rot=" << c.rot << " neox=" << c.neox << " db=" << db);
      RunCase(c, db);
    }
  }
}

}  // namespace
