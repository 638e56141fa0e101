// SPDX-License-Identifier: Apache-2.0
// SwiGLU kernel (vector cores): y[r, :] = silu(a) * b with a = x[r, :I], b = x[r, I:2I]
// (torch_npu.npu_swiglu(x, dim=-1); ops.silu_and_mul). x: [num_row, 2I] T; y: [num_row, I] T.
// silu(a) = a / (1 + exp(-a)), in fp32.
#include "../../common/kernel_common.h"
#include "../tiling_core.h"

using namespace AscendC;

namespace mindie_ascendc {

template <typename T>
class SwiGluKernel {
 public:
  __aicore__ inline void Init(GM_ADDR x, GM_ADDR y, const SwiGluTilingData& t) {
    t_ = t;
    const uint64_t row0 = static_cast<uint64_t>(GetBlockIdx()) * t.rows_per_block;
    rows_ = row0 >= t.num_row ? 0 : static_cast<uint32_t>(
        (t.num_row - row0) < t.rows_per_block ? (t.num_row - row0) : t.rows_per_block);
    x_.SetGlobalBuffer((__gm__ T*)x + row0 * 2 * t.half_col, uint64_t(rows_) * 2 * t.half_col);
    y_.SetGlobalBuffer((__gm__ T*)y + row0 * t.half_col, uint64_t(rows_) * t.half_col);
    const uint32_t tb = t.col_tile * sizeof(T), fb = t.col_tile * sizeof(float);
    pipe_.InitBuffer(inA_, 2, tb);
    pipe_.InitBuffer(inB_, 2, tb);
    pipe_.InitBuffer(outY_, 2, tb);
    pipe_.InitBuffer(af_, fb);
    pipe_.InitBuffer(bf_, fb);
    pipe_.InitBuffer(tmp_, fb);
  }

  __aicore__ inline void Process() {
    for (uint32_t r = 0; r < rows_; ++r) {
      for (uint32_t i = 0; i < t_.num_col_tiles; ++i) {
        const uint32_t n = i + 1 == t_.num_col_tiles ? t_.last_col_tile : t_.col_tile;
        const uint64_t col = static_cast<uint64_t>(i) * t_.col_tile;
        CopyIn(uint64_t(r) * 2 * t_.half_col + col, n);
        Compute(n);
        CopyOut(uint64_t(r) * t_.half_col + col, n);
      }
    }
  }

 private:
  __aicore__ inline void CopyIn(uint64_t off, uint32_t n) {
    LocalTensor<T> a = inA_.AllocTensor<T>();
    LocalTensor<T> b = inB_.AllocTensor<T>();
    CopyInPad(a, x_[off], n);
    CopyInPad(b, x_[off + t_.half_col], n);
    inA_.EnQue(a);
    inB_.EnQue(b);
  }
  __aicore__ inline void Compute(uint32_t n) {
    LocalTensor<T> a = inA_.DeQue<T>();
    LocalTensor<T> b = inB_.DeQue<T>();
    LocalTensor<float> af = af_.Get<float>(), bf = bf_.Get<float>(), tmp = tmp_.Get<float>();
    ToFp32(af, a, n);
    ToFp32(bf, b, n);
    inA_.FreeTensor(a);
    inB_.FreeTensor(b);
    Muls(tmp, af, -1.0f, n);   // -a
    Exp(tmp, tmp, n);          // exp(-a)
    Adds(tmp, tmp, 1.0f, n);   // 1 + exp(-a)
    Div(tmp, af, tmp, n);      // silu(a)
    Mul(tmp, tmp, bf, n);      // silu(a) * b
    LocalTensor<T> y = outY_.AllocTensor<T>();
    FromFp32(y, tmp, n);
    outY_.EnQue(y);
  }
  __aicore__ inline void CopyOut(uint64_t off, uint32_t n) {
    LocalTensor<T> y = outY_.DeQue<T>();
    CopyOutPad(y_[off], y, n);
    outY_.FreeTensor(y);
  }

  SwiGluTilingData t_{};
  uint32_t rows_ = 0;
  TPipe pipe_;
  TQue<TPosition::VECIN, 2> inA_, inB_;
  TQue<TPosition::VECOUT, 2> outY_;
  TBuf<TPosition::VECCALC> af_, bf_, tmp_;
  GlobalTensor<T> x_, y_;
};

}  // namespace mindie_ascendc

extern "C" __global__ __aicore__ void swiglu(GM_ADDR x, GM_ADDR y, GM_ADDR workspace, GM_ADDR tiling) {
  (void)workspace;
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
  MINDIE_LOAD_TILING(mindie_ascendc::SwiGluTilingData, t, tiling);
  if (t.dtype_bytes == 2) {
    mindie_ascendc::SwiGluKernel<half> k;
    k.Init(x, y, t);
    k.Process();
  } else {
    mindie_ascendc::SwiGluKernel<float> k;
    k.Init(x, y, t);
    k.Process();
  }
}
