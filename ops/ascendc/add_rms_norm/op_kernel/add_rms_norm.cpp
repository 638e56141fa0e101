// SPDX-License-Identifier: Apache-2.0
// AddRmsNorm kernel (vector cores): x = x1 + x2 (rounded to T), y = x * rstd * gamma,
// rstd = 1 / sqrt(mean(x^2) + eps) per row (fp32). Same outputs as torch_npu.npu_add_rms_norm
// (y, rstd, x). x1, x2, y, x: [num_row, num_col] T; gamma: [num_col] T; rstd: [num_row] fp32.
//
// CopyIn -> Compute -> CopyOut with double-buffered queues; math in fp32. Tiling: tiling_core.h.
#include "../../common/kernel_common.h"
#include "../tiling_core.h"

using namespace AscendC;

namespace mindie_ascendc {

template <typename T>
class AddRmsNormKernel {
 public:
  __aicore__ inline void Init(GM_ADDR x1, GM_ADDR x2, GM_ADDR gamma, GM_ADDR y, GM_ADDR rstd, GM_ADDR x,
                              const AddRmsNormTilingData& t) {
    t_ = t;
    const uint64_t row0 = static_cast<uint64_t>(GetBlockIdx()) * t.rows_per_block;
    rows_ = row0 >= t.num_row ? 0 : static_cast<uint32_t>(
        (t.num_row - row0) < t.rows_per_block ? (t.num_row - row0) : t.rows_per_block);
    const uint64_t n = static_cast<uint64_t>(rows_) * t.num_col, off = row0 * t.num_col;
    x1_.SetGlobalBuffer((__gm__ T*)x1 + off, n);
    x2_.SetGlobalBuffer((__gm__ T*)x2 + off, n);
    y_.SetGlobalBuffer((__gm__ T*)y + off, n);
    x_.SetGlobalBuffer((__gm__ T*)x + off, n);
    rstd_.SetGlobalBuffer((__gm__ float*)rstd + row0, rows_);
    gamma_.SetGlobalBuffer((__gm__ T*)gamma, t.num_col);
    const uint32_t tb = t.col_tile * sizeof(T), fb = t.col_tile * sizeof(float);
    pipe_.InitBuffer(in1_, 2, tb);
    pipe_.InitBuffer(in2_, 2, tb);
    pipe_.InitBuffer(outY_, 2, tb);
    pipe_.InitBuffer(outX_, 2, tb);
    pipe_.InitBuffer(gammaQ_, 1, tb);
    pipe_.InitBuffer(xf_, fb);
    pipe_.InitBuffer(tmp_, fb);
    pipe_.InitBuffer(work_, fb);
    pipe_.InitBuffer(outR_, 2, 32);
    pipe_.InitBuffer(scalar_, 32);
  }

  __aicore__ inline void Process() {
    if (rows_ == 0) return;
    if (t_.num_col_tiles == 1) {
      LocalTensor<T> g = gammaQ_.AllocTensor<T>();
      CopyInPad(g, gamma_, t_.num_col);
      gammaQ_.EnQue(g);
      g = gammaQ_.DeQue<T>();
      for (uint32_t r = 0; r < rows_; ++r) OneTileRow(r, g);
      gammaQ_.FreeTensor(g);
    } else {
      for (uint32_t r = 0; r < rows_; ++r) SplitRow(r);
    }
  }

 private:
  __aicore__ inline uint32_t TileLen(uint32_t i) const {
    return i + 1 == t_.num_col_tiles ? t_.last_col_tile : t_.col_tile;
  }

  __aicore__ inline void CopyIn(uint64_t off, uint32_t n) {
    LocalTensor<T> a = in1_.AllocTensor<T>();
    LocalTensor<T> b = in2_.AllocTensor<T>();
    CopyInPad(a, x1_[off], n);
    CopyInPad(b, x2_[off], n);
    in1_.EnQue(a);
    in2_.EnQue(b);
  }

  // x tile (rounded to T, en-queued for CopyOut) and its fp32 copy in xf_; returns sum(x^2).
  __aicore__ inline float AddTile(uint32_t n, bool store_x) {
    LocalTensor<T> a = in1_.DeQue<T>();
    LocalTensor<T> b = in2_.DeQue<T>();
    LocalTensor<float> xf = xf_.Get<float>();
    LocalTensor<float> tmp = tmp_.Get<float>();
    ToFp32(xf, a, n);
    ToFp32(tmp, b, n);
    Add(xf, xf, tmp, n);
    LocalTensor<T> xo = outX_.AllocTensor<T>();
    FromFp32(xo, xf, n);
    ToFp32(xf, xo, n);  // the normalized value is the rounded sum (as ops/reference.py)
    if (store_x) {
      outX_.EnQue(xo);
    } else {
      outX_.FreeTensor(xo);
    }
    in1_.FreeTensor(a);
    in2_.FreeTensor(b);
    Mul(tmp, xf, xf, n);
    LocalTensor<float> s = scalar_.Get<float>();
    ReduceSum(s, tmp, work_.Get<float>(), n);
    WaitEvent<HardEvent::V_S>();
    return s.GetValue(0);
  }

  __aicore__ inline void StoreX(uint64_t off, uint32_t n) {
    LocalTensor<T> xo = outX_.DeQue<T>();
    CopyOutPad(x_[off], xo, n);
    outX_.FreeTensor(xo);
  }

  // y tile = xf * rstd * gamma, from xf_ and a gamma tile.
  __aicore__ inline void Normalize(uint64_t off, uint32_t n, float rstd, const LocalTensor<T>& gamma) {
    LocalTensor<float> xf = xf_.Get<float>();
    LocalTensor<float> g = tmp_.Get<float>();
    ToFp32(g, gamma, n);
    Muls(xf, xf, rstd, n);
    Mul(xf, xf, g, n);
    LocalTensor<T> yo = outY_.AllocTensor<T>();
    FromFp32(yo, xf, n);
    outY_.EnQue(yo);
    LocalTensor<T> yd = outY_.DeQue<T>();
    CopyOutPad(y_[off], yd, n);
    outY_.FreeTensor(yd);
  }

  __aicore__ inline float Rstd(float sumsq) {
    LocalTensor<float> s = scalar_.Get<float>();
    Duplicate(s, sumsq * t_.avg_factor + t_.epsilon, 8);
    Sqrt(s, s, 8);
    Reciprocal(s, s, 8);
    WaitEvent<HardEvent::V_S>();
    return s.GetValue(0);
  }

  __aicore__ inline void StoreRstd(uint32_t r, float rstd) {
    LocalTensor<float> ro = outR_.AllocTensor<float>();
    Duplicate(ro, rstd, 8);
    outR_.EnQue(ro);
    LocalTensor<float> rd = outR_.DeQue<float>();
    CopyOutPad(rstd_[r], rd, 1);
    outR_.FreeTensor(rd);
  }

  __aicore__ inline void OneTileRow(uint32_t r, const LocalTensor<T>& gamma) {
    const uint64_t off = static_cast<uint64_t>(r) * t_.num_col;
    const uint32_t n = t_.num_col;
    CopyIn(off, n);
    float rstd = Rstd(AddTile(n, true));
    StoreX(off, n);
    Normalize(off, n, rstd, gamma);
    StoreRstd(r, rstd);
  }

  __aicore__ inline void SplitRow(uint32_t r) {
    const uint64_t row = static_cast<uint64_t>(r) * t_.num_col;
    float sumsq = 0.0f;
    for (uint32_t i = 0; i < t_.num_col_tiles; ++i) {  // pass 1: x and sum of squares
      const uint64_t off = row + static_cast<uint64_t>(i) * t_.col_tile;
      CopyIn(off, TileLen(i));
      sumsq += AddTile(TileLen(i), true);
      StoreX(off, TileLen(i));
    }
    const float rstd = Rstd(sumsq);
    for (uint32_t i = 0; i < t_.num_col_tiles; ++i) {  // pass 2: re-read x1, x2 (no GM read-after-write)
      const uint64_t off = row + static_cast<uint64_t>(i) * t_.col_tile;
      CopyIn(off, TileLen(i));
      AddTile(TileLen(i), false);
      LocalTensor<T> g = gammaQ_.AllocTensor<T>();
      CopyInPad(g, gamma_[static_cast<uint64_t>(i) * t_.col_tile], TileLen(i));
      gammaQ_.EnQue(g);
      g = gammaQ_.DeQue<T>();
      Normalize(off, TileLen(i), rstd, g);
      gammaQ_.FreeTensor(g);
    }
    StoreRstd(r, rstd);
  }

  AddRmsNormTilingData t_{};
  uint32_t rows_ = 0;
  TPipe pipe_;
  TQue<TPosition::VECIN, 2> in1_, in2_;
  TQue<TPosition::VECIN, 1> gammaQ_;
  TQue<TPosition::VECOUT, 2> outY_, outX_, outR_;
  TBuf<TPosition::VECCALC> xf_, tmp_, work_, scalar_;
  GlobalTensor<T> x1_, x2_, y_, x_, gamma_;
  GlobalTensor<float> rstd_;
};

}  // namespace mindie_ascendc

extern "C" __global__ __aicore__ void add_rms_norm(GM_ADDR x1, GM_ADDR x2, GM_ADDR gamma, GM_ADDR y, GM_ADDR rstd,
                                                   GM_ADDR x, GM_ADDR workspace, GM_ADDR tiling) {
  (void)workspace;
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
  MINDIE_LOAD_TILING(mindie_ascendc::AddRmsNormTilingData, t, tiling);
  if (t.dtype_bytes == 2) {
    mindie_ascendc::AddRmsNormKernel<half> k;
    k.Init(x1, x2, gamma, y, rstd, x, t);
    k.Process();
  } else {
    mindie_ascendc::AddRmsNormKernel<float> k;
    k.Init(x1, x2, gamma, y, rstd, x, t);
    k.Process();
  }
}
