// SPDX-License-Identifier: Apache-2.0
// Paged decode attention with split-KV (FlashDecoding), two kernels (vector cores):
//   paged_decode_attention_split: partial online-softmax results per KV split into the workspace;
//   paged_decode_attention_combine: merges the splits of each (request, query head).
// query [B, Hq, D] T (one token per request); key_cache/value_cache [num_blocks, block_size, Hk, D]
// T; block_tables [B, W] int32; context_lens [B] int32 (>= 1); out [B, Hq, D] T. Softmax in fp32.
// Same contract as torch_npu._npu_paged_attention and ops.paged_attention for decode rows.
#include "../../common/kernel_common.h"
#include "../tiling_core.h"

using namespace AscendC;

namespace mindie_ascendc {

template <typename T>
class PagedDecodeSplitKernel {
 public:
  __aicore__ inline void Init(GM_ADDR q, GM_ADDR kc, GM_ADDR vc, GM_ADDR tables, GM_ADDR lens, GM_ADDR ws,
                              const PagedDecodeTilingData& t) {
    t_ = t;
    G_ = t.num_q_heads / t.num_kv_heads;
    const uint32_t D = t.head_dim;
    const uint64_t kw = uint64_t(t.num_kv_heads) * D;
    q_.SetGlobalBuffer((__gm__ T*)q, uint64_t(t.num_seqs) * t.num_q_heads * D);
    kc_.SetGlobalBuffer((__gm__ T*)kc, t.num_cache_blocks * t.block_size * kw);
    vc_.SetGlobalBuffer((__gm__ T*)vc, t.num_cache_blocks * t.block_size * kw);
    tables_.SetGlobalBuffer((__gm__ int32_t*)tables, uint64_t(t.num_seqs) * t.max_blocks_per_seq);
    lens_.SetGlobalBuffer((__gm__ int32_t*)lens, t.num_seqs);
    ws_.SetGlobalBuffer((__gm__ float*)ws, t.workspace_bytes / 4);
    ca_ = static_cast<uint32_t>(AlignUp(t.chunk, 8));
    pipe_.InitBuffer(qQ_, 1, G_ * D * sizeof(T));
    pipe_.InitBuffer(qf_, G_ * D * 4);
    pipe_.InitBuffer(acc_, G_ * D * 4);
    pipe_.InitBuffer(kQ_, 2, t.chunk * D * sizeof(T));
    pipe_.InitBuffer(vQ_, 2, t.chunk * D * sizeof(T));
    pipe_.InitBuffer(kf_, t.chunk * D * 4);
    pipe_.InitBuffer(vf_, t.chunk * D * 4);
    pipe_.InitBuffer(scores_, G_ * ca_ * 4);
    pipe_.InitBuffer(tmp_, D * 4);
    pipe_.InitBuffer(work_, (D > t.chunk ? D : t.chunk) * 4);
    pipe_.InitBuffer(scalar_, 32);
    pipe_.InitBuffer(recQ_, 2, t.record * 4);
  }

  __aicore__ inline void Process() {
    const uint64_t items = uint64_t(t_.num_seqs) * t_.num_kv_heads * t_.num_splits;
    const uint64_t w0 = uint64_t(GetBlockIdx()) * t_.items_per_block;
    for (uint64_t w = w0; w < w0 + t_.items_per_block && w < items; ++w) {
      const uint32_t s = static_cast<uint32_t>(w % t_.num_splits);
      const uint32_t g = static_cast<uint32_t>((w / t_.num_splits) % t_.num_kv_heads);
      const uint32_t b = static_cast<uint32_t>(w / (uint64_t(t_.num_splits) * t_.num_kv_heads));
      Item(b, g, s);
    }
  }

 private:
  __aicore__ inline float VecExp(float x) {
    LocalTensor<float> sc = scalar_.Get<float>();
    Duplicate(sc, x, 8);
    Exp(sc, sc, 8);
    WaitEvent<HardEvent::V_S>();
    return sc.GetValue(0);
  }

  __aicore__ inline void Item(uint32_t b, uint32_t g, uint32_t s) {
    const uint32_t D = t_.head_dim, G = G_;
    const int64_t len = lens_.GetValue(b);
    const int64_t split_len = int64_t(t_.blocks_per_split) * t_.block_size;
    const int64_t start = int64_t(s) * split_len;
    const int64_t end = start + split_len < len ? start + split_len : len;
    float m[kMaxGroup], l[kMaxGroup];
    for (uint32_t j = 0; j < G; ++j) {
      m[j] = -INFINITY;
      l[j] = 0.0f;
    }
    LocalTensor<float> acc = acc_.Get<float>();
    Duplicate(acc, 0.0f, G * D);
    if (start < end) {
      LocalTensor<T> qt = qQ_.AllocTensor<T>();
      DataCopy(qt, q_[(uint64_t(b) * t_.num_q_heads + uint64_t(g) * G) * D], G * D);
      qQ_.EnQue(qt);
      qt = qQ_.DeQue<T>();
      ToFp32(qf_.Get<float>(), qt, G * D);
      qQ_.FreeTensor(qt);
      for (int64_t pos = start; pos < end; pos += t_.chunk) {
        const uint32_t n = static_cast<uint32_t>(end - pos < t_.chunk ? end - pos : t_.chunk);
        Chunk(b, g, pos, n, m, l);
      }
    }
    for (uint32_t j = 0; j < G; ++j) {  // one record per query head
      LocalTensor<float> rec = recQ_.AllocTensor<float>();
      DataCopy(rec, acc[j * D], D);
      Duplicate(rec[D], m[j], 8);
      Duplicate(rec[D + 8], l[j], 8);
      recQ_.EnQue(rec);
      rec = recQ_.DeQue<float>();
      const uint64_t h = uint64_t(g) * G + j;
      DataCopy(ws_[((uint64_t(b) * t_.num_q_heads + h) * t_.num_splits + s) * t_.record], rec, t_.record);
      recQ_.FreeTensor(rec);
    }
  }

  // n (<= chunk) KV tokens from position pos, all inside one cache block.
  __aicore__ inline void Chunk(uint32_t b, uint32_t g, int64_t pos, uint32_t n, float* m, float* l) {
    const uint32_t D = t_.head_dim, G = G_;
    const int64_t blk = tables_.GetValue(uint64_t(b) * t_.max_blocks_per_seq + pos / t_.block_size);
    const uint64_t row = (uint64_t(blk) * t_.block_size + pos % t_.block_size) * t_.num_kv_heads + g;
    const uint16_t burst = static_cast<uint16_t>(D * sizeof(T) / 32);
    DataCopyParams p{static_cast<uint16_t>(n), burst, static_cast<uint16_t>((t_.num_kv_heads - 1) * burst), 0};
    LocalTensor<T> k = kQ_.AllocTensor<T>();
    LocalTensor<T> v = vQ_.AllocTensor<T>();
    DataCopy(k, kc_[row * D], p);
    DataCopy(v, vc_[row * D], p);
    kQ_.EnQue(k);
    vQ_.EnQue(v);
    k = kQ_.DeQue<T>();
    v = vQ_.DeQue<T>();
    LocalTensor<float> kf = kf_.Get<float>(), vf = vf_.Get<float>(), qf = qf_.Get<float>();
    ToFp32(kf, k, n * D);
    ToFp32(vf, v, n * D);
    kQ_.FreeTensor(k);
    vQ_.FreeTensor(v);
    LocalTensor<float> tmp = tmp_.Get<float>(), work = work_.Get<float>(), sc = scalar_.Get<float>();
    LocalTensor<float> acc = acc_.Get<float>(), scores = scores_.Get<float>();
    for (uint32_t j = 0; j < G; ++j) {
      LocalTensor<float> sj = scores[j * ca_];
      for (uint32_t t = 0; t < n; ++t) {  // s_t = q . k_t * scale
        Mul(tmp, qf[j * D], kf[t * D], D);
        ReduceSum(sc, tmp, work, D);
        WaitEvent<HardEvent::V_S>();
        const float dot = sc.GetValue(0);
        sj.SetValue(t, dot * t_.scale);
      }
      WaitEvent<HardEvent::S_V>();
      ReduceMax(sc, sj, work, n);
      WaitEvent<HardEvent::V_S>();
      const float mloc = sc.GetValue(0);
      const float mnew = m[j] > mloc ? m[j] : mloc;
      const float alpha = VecExp(m[j] - mnew);  // 0 on the first chunk (m = -inf)
      Adds(sj, sj, -mnew, n);
      Exp(sj, sj, n);
      ReduceSum(sc, sj, work, n);
      WaitEvent<HardEvent::V_S>();
      l[j] = l[j] * alpha + sc.GetValue(0);
      m[j] = mnew;
      LocalTensor<float> aj = acc[j * D];
      Muls(aj, aj, alpha, D);
      for (uint32_t t = 0; t < n; ++t) Axpy(aj, vf[t * D], sj.GetValue(t), D);
    }
  }

  PagedDecodeTilingData t_{};
  uint32_t G_ = 1, ca_ = 8;
  TPipe pipe_;
  TQue<TPosition::VECIN, 1> qQ_;
  TQue<TPosition::VECIN, 2> kQ_, vQ_;
  TQue<TPosition::VECOUT, 2> recQ_;
  TBuf<TPosition::VECCALC> qf_, acc_, kf_, vf_, scores_, tmp_, work_, scalar_;
  GlobalTensor<T> q_, kc_, vc_;
  GlobalTensor<int32_t> tables_, lens_;
  GlobalTensor<float> ws_;
};

template <typename T>
class PagedDecodeCombineKernel {
 public:
  __aicore__ inline void Init(GM_ADDR ws, GM_ADDR out, const PagedDecodeTilingData& t) {
    t_ = t;
    ws_.SetGlobalBuffer((__gm__ float*)ws, t.workspace_bytes / 4);
    out_.SetGlobalBuffer((__gm__ T*)out, uint64_t(t.num_seqs) * t.num_q_heads * t.head_dim);
    pipe_.InitBuffer(recQ_, 2, t.num_splits * t.record * 4);
    pipe_.InitBuffer(outQ_, 2, t.head_dim * sizeof(T));
    pipe_.InitBuffer(num_, t.head_dim * 4);
    pipe_.InitBuffer(wv_, t.num_splits * 4);
  }

  __aicore__ inline void Process() {
    const uint64_t items = uint64_t(t_.num_seqs) * t_.num_q_heads;
    const uint64_t i0 = uint64_t(GetBlockIdx()) * t_.combine_per_block;
    for (uint64_t i = i0; i < i0 + t_.combine_per_block && i < items; ++i) Item(i);
  }

 private:
  __aicore__ inline void Item(uint64_t bh) {
    const uint32_t D = t_.head_dim, S = t_.num_splits, R = t_.record;
    LocalTensor<float> recs = recQ_.AllocTensor<float>();
    DataCopy(recs, ws_[bh * S * R], S * R);
    recQ_.EnQue(recs);
    recs = recQ_.DeQue<float>();
    WaitEvent<HardEvent::MTE2_S>();  // scalar reads of what MTE2 just loaded
    float M = -INFINITY;
    for (uint32_t s = 0; s < S; ++s) {
      const float ms = recs.GetValue(s * R + D);
      M = ms > M ? ms : M;
    }
    LocalTensor<float> wv = wv_.Get<float>(), num = num_.Get<float>();
    for (uint32_t s = 0; s < S; ++s) wv.SetValue(s, recs.GetValue(s * R + D) - M);
    WaitEvent<HardEvent::S_V>();
    Exp(wv, wv, S);  // split weights; empty splits (m = -inf) weigh 0
    Duplicate(num, 0.0f, D);
    WaitEvent<HardEvent::V_S>();
    float den = 0.0f;
    for (uint32_t s = 0; s < S; ++s) {
      const float w = wv.GetValue(s);
      den += w * recs.GetValue(s * R + D + 8);
      Axpy(num, recs[s * R], w, D);
    }
    recQ_.FreeTensor(recs);
    Muls(num, num, 1.0f / den, D);
    LocalTensor<T> o = outQ_.AllocTensor<T>();
    FromFp32(o, num, D);
    outQ_.EnQue(o);
    o = outQ_.DeQue<T>();
    DataCopy(out_[bh * D], o, D);
    outQ_.FreeTensor(o);
  }

  PagedDecodeTilingData t_{};
  TPipe pipe_;
  TQue<TPosition::VECIN, 2> recQ_;
  TQue<TPosition::VECOUT, 2> outQ_;
  TBuf<TPosition::VECCALC> num_, wv_;
  GlobalTensor<float> ws_;
  GlobalTensor<T> out_;
};

}  // namespace mindie_ascendc

extern "C" __global__ __aicore__ void paged_decode_attention_split(GM_ADDR query, GM_ADDR key_cache,
                                                                   GM_ADDR value_cache, GM_ADDR block_tables,
                                                                   GM_ADDR context_lens, GM_ADDR workspace,
                                                                   GM_ADDR tiling) {
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
  MINDIE_LOAD_TILING(mindie_ascendc::PagedDecodeTilingData, t, tiling);
  if (t.dtype_bytes == 2) {
    mindie_ascendc::PagedDecodeSplitKernel<half> k;
    k.Init(query, key_cache, value_cache, block_tables, context_lens, workspace, t);
    k.Process();
  } else {
    mindie_ascendc::PagedDecodeSplitKernel<float> k;
    k.Init(query, key_cache, value_cache, block_tables, context_lens, workspace, t);
    k.Process();
  }
}

extern "C" __global__ __aicore__ void paged_decode_attention_combine(GM_ADDR workspace, GM_ADDR out, GM_ADDR tiling) {
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
  MINDIE_LOAD_TILING(mindie_ascendc::PagedDecodeTilingData, t, tiling);
  if (t.dtype_bytes == 2) {
    mindie_ascendc::PagedDecodeCombineKernel<half> k;
    k.Init(workspace, out, t);
    k.Process();
  } else {
    mindie_ascendc::PagedDecodeCombineKernel<float> k;
    k.Init(workspace, out, t);
    k.Process();
  }
}
