// SPDX-License-Identifier: Apache-2.0
// RotaryKvWrite kernel (vector cores): for each token t (positions[t], slot_mapping[t]):
//   q_out[t, h] = rotate(q[t, h]), k_out[t, h] = rotate(k[t, h]) with cos/sin = cos_sin_cache[pos];
//   when slot >= 0: key_cache[slot, h] = k_out[t, h], value_cache[slot, h] = v[t, h].
// query [T, Hq*D], key/value [T, Hk*D] T; cos_sin_cache [max_pos, rot] fp32 = cat(cos, sin);
// positions, slot_mapping [T] int64; key_cache/value_cache [num_blocks, block_size, Hk, D] T
// (flat slot = block * block_size + offset). q_out/k_out may alias query/key (in place).
//
// Rotation as one formula for both styles: out = x * cosF + gather(x, partner) * sinF, where the
// per-dim tables (partner, cos/sin index, sign) are built once per block; dims >= rot pass
// through (cosF = 1, sinF = 0).
#include "../../common/kernel_common.h"
#include "../tiling_core.h"

using namespace AscendC;

namespace mindie_ascendc {

template <typename T>
class RotaryKvWriteKernel {
 public:
  __aicore__ inline void Init(GM_ADDR positions, GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR cs, GM_ADDR slots,
                              GM_ADDR kc, GM_ADDR vc, GM_ADDR qo, GM_ADDR ko, const RotaryKvWriteTilingData& t) {
    t_ = t;
    tok0_ = static_cast<uint64_t>(GetBlockIdx()) * t.tokens_per_block;
    ntok_ = tok0_ >= t.num_tokens ? 0 : static_cast<uint32_t>(
        (t.num_tokens - tok0_) < t.tokens_per_block ? (t.num_tokens - tok0_) : t.tokens_per_block);
    const uint64_t qw = uint64_t(t.num_q_heads) * t.head_dim, kw = uint64_t(t.num_kv_heads) * t.head_dim;
    pos_.SetGlobalBuffer((__gm__ int64_t*)positions, t.num_tokens);
    slot_.SetGlobalBuffer((__gm__ int64_t*)slots, t.num_tokens);
    q_.SetGlobalBuffer((__gm__ T*)q, t.num_tokens * qw);
    k_.SetGlobalBuffer((__gm__ T*)k, t.num_tokens * kw);
    v_.SetGlobalBuffer((__gm__ T*)v, t.num_tokens * kw);
    qo_.SetGlobalBuffer((__gm__ T*)qo, t.num_tokens * qw);
    ko_.SetGlobalBuffer((__gm__ T*)ko, t.num_tokens * kw);
    cs_.SetGlobalBuffer((__gm__ float*)cs, t.max_position * t.rot_dim);
    kc_.SetGlobalBuffer((__gm__ T*)kc, t.num_slots * kw);
    vc_.SetGlobalBuffer((__gm__ T*)vc, t.num_slots * kw);
    const uint32_t hb = t.head_dim * sizeof(T), fb = t.head_dim * 4;
    pipe_.InitBuffer(inQ_, 2, hb);
    pipe_.InitBuffer(outQ_, 2, hb);
    pipe_.InitBuffer(csQ_, 1, t.cs_tile * 4);
    pipe_.InitBuffer(xf_, fb);
    pipe_.InitBuffer(xs_, fb);
    pipe_.InitBuffer(cosF_, fb);
    pipe_.InitBuffer(sinF_, fb);
    pipe_.InitBuffer(sign_, fb);
    pipe_.InitBuffer(partner_, fb);
    pipe_.InitBuffer(cosIdx_, fb);
    pipe_.InitBuffer(sinIdx_, fb);
    BuildTables();
  }

  __aicore__ inline void Process() {
    const uint32_t D = t_.head_dim;
    for (uint32_t i = 0; i < ntok_; ++i) {
      const uint64_t tok = tok0_ + i;
      const int64_t pos = pos_.GetValue(tok);
      const int64_t slot = slot_.GetValue(tok);
      LoadCosSin(pos);
      for (uint32_t h = 0; h < t_.num_q_heads; ++h) {
        const uint64_t off = (tok * t_.num_q_heads + h) * D;
        RotateHead(q_[off], qo_[off], nullptr);
      }
      for (uint32_t h = 0; h < t_.num_kv_heads; ++h) {
        const uint64_t off = (tok * t_.num_kv_heads + h) * D;
        const uint64_t coff = (static_cast<uint64_t>(slot) * t_.num_kv_heads + h) * D;
        GlobalTensor<T> dst = kc_;
        RotateHead(k_[off], ko_[off], slot >= 0 ? &dst : nullptr, coff);
        if (slot >= 0) CopyHead(v_[off], vc_[coff]);
      }
    }
  }

 private:
  // Per-dim gather tables (byte offsets) and signs; built with scalar writes once per block.
  __aicore__ inline void BuildTables() {
    const uint32_t D = t_.head_dim, rot = t_.rot_dim, h = rot / 2, ra = static_cast<uint32_t>(AlignUp(rot, 8));
    LocalTensor<uint32_t> partner = partner_.Get<uint32_t>(), ci = cosIdx_.Get<uint32_t>(), si = sinIdx_.Get<uint32_t>();
    LocalTensor<float> sign = sign_.Get<float>();
    for (uint32_t d = 0; d < D; ++d) {
      uint32_t p = d, c = ra, s = ra + 8;
      float sg = 0.0f;
      if (d < rot) {
        if (t_.is_neox) {
          p = d < h ? d + h : d - h;
          c = d < h ? d : d - h;
          sg = d < h ? -1.0f : 1.0f;
        } else {
          p = d % 2 == 0 ? d + 1 : d - 1;
          c = d / 2;
          sg = d % 2 == 0 ? -1.0f : 1.0f;
        }
        s = h + c;
      }
      partner.SetValue(d, p * 4);
      ci.SetValue(d, c * 4);
      si.SetValue(d, s * 4);
      sign.SetValue(d, sg);
    }
    WaitEvent<HardEvent::S_V>();
  }

  // cosF/sinF of this token's position (sinF carries the sign; 1 / 0 past rot_dim).
  __aicore__ inline void LoadCosSin(int64_t pos) {
    const uint32_t ra = static_cast<uint32_t>(AlignUp(t_.rot_dim, 8));
    LocalTensor<float> cs = csQ_.AllocTensor<float>();
    CopyInPad(cs, cs_[static_cast<uint64_t>(pos) * t_.rot_dim], t_.rot_dim);
    csQ_.EnQue(cs);
    cs = csQ_.DeQue<float>();
    Duplicate(cs[ra], 1.0f, 8);
    Duplicate(cs[ra + 8], 0.0f, 8);
    LocalTensor<float> cosF = cosF_.Get<float>(), sinF = sinF_.Get<float>();
    Gather(cosF, cs, cosIdx_.Get<uint32_t>(), 0, t_.head_dim);
    Gather(sinF, cs, sinIdx_.Get<uint32_t>(), 0, t_.head_dim);
    Mul(sinF, sinF, sign_.Get<float>(), t_.head_dim);
    csQ_.FreeTensor(cs);
  }

  __aicore__ inline void RotateHead(const GlobalTensor<T>& src, const GlobalTensor<T>& dst, GlobalTensor<T>* cache,
                                    uint64_t coff = 0) {
    const uint32_t D = t_.head_dim;
    LocalTensor<T> x = inQ_.AllocTensor<T>();
    DataCopy(x, src, D);
    inQ_.EnQue(x);
    x = inQ_.DeQue<T>();
    LocalTensor<float> xf = xf_.Get<float>(), xs = xs_.Get<float>();
    ToFp32(xf, x, D);
    inQ_.FreeTensor(x);
    Gather(xs, xf, partner_.Get<uint32_t>(), 0, D);
    Mul(xf, xf, cosF_.Get<float>(), D);
    Mul(xs, xs, sinF_.Get<float>(), D);
    Add(xf, xf, xs, D);
    LocalTensor<T> o = outQ_.AllocTensor<T>();
    FromFp32(o, xf, D);
    outQ_.EnQue(o);
    o = outQ_.DeQue<T>();
    DataCopy(dst, o, D);
    if (cache != nullptr) DataCopy((*cache)[coff], o, D);
    outQ_.FreeTensor(o);
  }

  __aicore__ inline void CopyHead(const GlobalTensor<T>& src, const GlobalTensor<T>& dst) {
    const uint32_t D = t_.head_dim;
    LocalTensor<T> x = inQ_.AllocTensor<T>();
    DataCopy(x, src, D);
    inQ_.EnQue(x);
    x = inQ_.DeQue<T>();
    LocalTensor<T> o = outQ_.AllocTensor<T>();
    DataCopy(o, x, D);
    inQ_.FreeTensor(x);
    outQ_.EnQue(o);
    o = outQ_.DeQue<T>();
    DataCopy(dst, o, D);
    outQ_.FreeTensor(o);
  }

  RotaryKvWriteTilingData t_{};
  uint64_t tok0_ = 0;
  uint32_t ntok_ = 0;
  TPipe pipe_;
  TQue<TPosition::VECIN, 2> inQ_;
  TQue<TPosition::VECIN, 1> csQ_;
  TQue<TPosition::VECOUT, 2> outQ_;
  TBuf<TPosition::VECCALC> xf_, xs_, cosF_, sinF_, sign_, partner_, cosIdx_, sinIdx_;
  GlobalTensor<int64_t> pos_, slot_;
  GlobalTensor<float> cs_;
  GlobalTensor<T> q_, k_, v_, qo_, ko_, kc_, vc_;
};

}  // namespace mindie_ascendc

extern "C" __global__ __aicore__ void rotary_kv_write(GM_ADDR positions, GM_ADDR query, GM_ADDR key, GM_ADDR value,
                                                      GM_ADDR cos_sin_cache, GM_ADDR slot_mapping, GM_ADDR key_cache,
                                                      GM_ADDR value_cache, GM_ADDR query_out, GM_ADDR key_out,
                                                      GM_ADDR workspace, GM_ADDR tiling) {
  (void)workspace;
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
  MINDIE_LOAD_TILING(mindie_ascendc::RotaryKvWriteTilingData, t, tiling);
  if (t.dtype_bytes == 2) {
    mindie_ascendc::RotaryKvWriteKernel<half> k;
    k.Init(positions, query, key, value, cos_sin_cache, slot_mapping, key_cache, value_cache, query_out, key_out, t);
    k.Process();
  } else {
    mindie_ascendc::RotaryKvWriteKernel<float> k;
    k.Init(positions, query, key, value, cos_sin_cache, slot_mapping, key_cache, value_cache, query_out, key_out, t);
    k.Process();
  }
}
