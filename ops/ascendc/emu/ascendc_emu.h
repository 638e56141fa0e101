// SPDX-License-Identifier: Apache-2.0
// A CPU emulation of the Ascend C vector programming model, written from the public Ascend C API
// documentation (no CANN header is copied or needed). It lets the kernels under ops/ascendc compile
// with g++ and run block by block, and it checks what the hardware or the toolchain would enforce:
//
//   * unified-buffer (UB) capacity of the chosen SoC (TPipe::InitBuffer totals);
//   * 32-byte alignment of DataCopy lengths and of UB operand addresses;
//   * queue depth (EnQue beyond the TQue depth), buffer count (AllocTensor with every buffer out);
//   * the Alloc -> EnQue -> DeQue -> Free life cycle of every queue buffer, balanced at block end;
//   * use of a LocalTensor after FreeTensor; GM and UB bounds of every copy and vector op;
//   * the launch's block count within the SoC's vector-core count.
//
// A violation throws ascendc_emu::Violation (a std::logic_error) naming the rule; the kernels run
// sequentially, so pipeline concurrency (SetFlag/WaitFlag hazards) is NOT modelled: a kernel that
// passes here can still race on hardware. Vector instructions are modelled by their "count"
// (tensor-level) form, in float arithmetic; real repeat/mask/stride semantics and fp16 rounding of
// intermediate results are not. See docs/npu.md for what stays unverified.
//
// Compile with -DASCENDC_EMU. Include only from kernel code (op_kernel/) and tests.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifndef ASCENDC_EMU
#error "ascendc_emu.h is the CPU emulation of Ascend C: build with -DASCENDC_EMU"
#endif

// Kernel-language qualifiers are no-ops on the CPU.
#define __aicore__
#define __global__
#define __gm__
#define __inline__ inline
#define GM_ADDR uint8_t*
#define KERNEL_TASK_TYPE_DEFAULT(x)

using half = _Float16;

namespace ascendc_emu {

class Violation : public std::logic_error {
 public:
  explicit Violation(const std::string& what) : std::logic_error(what) {}
};

[[noreturn]] inline void Fail(const std::string& rule, const std::string& detail) {
  throw Violation("ascendc-emu: " + rule + ": " + detail);
}

// What a SoC gives one vector core. UB sizes and core counts are taken from public Ascend
// material and are NOT verified on hardware here (docs/npu.md).
struct SocSpec {
  const char* name;
  uint32_t ub_bytes;      // unified buffer per vector core
  uint32_t vector_cores;  // AIV cores a kernel may use as blocks
};

inline constexpr SocSpec kAscend910B3{"Ascend910B3", 192 * 1024, 40};
inline constexpr SocSpec kAscend910B4{"Ascend910B4", 192 * 1024, 40};
inline constexpr SocSpec kAscend310P3{"Ascend310P3", 256 * 1024, 8};

constexpr uint32_t kBlockBytes = 32;  // DataCopy granule and UB address alignment

struct BufferSlot;  // one buffer carved out of UB by InitBuffer

// Per-block state: the UB arena and the objects that must be balanced when the block ends.
struct BlockContext {
  SocSpec soc{kAscend910B3};
  int64_t block_idx = 0;
  int64_t block_num = 1;
  std::unique_ptr<uint8_t, void (*)(void*)> ub{nullptr, std::free};
  uint32_t ub_used = 0;
  bool pipe_alive = false;
  std::vector<std::string> deferred;  // violations found in destructors (reported by Launch)

  uint8_t* Carve(uint32_t bytes, const char* what) {
    uint32_t rounded = (bytes + kBlockBytes - 1) / kBlockBytes * kBlockBytes;
    if (static_cast<uint64_t>(ub_used) + rounded > soc.ub_bytes) {
      Fail("UB overflow", std::string(what) + " needs " + std::to_string(rounded) + " bytes with " +
                              std::to_string(ub_used) + " of " + std::to_string(soc.ub_bytes) + " (" +
                              soc.name + ") already used");
    }
    uint8_t* p = ub.get() + ub_used;
    ub_used += rounded;
    return p;
  }
  bool InUb(const void* p, uint64_t bytes) const {
    auto* b = static_cast<const uint8_t*>(p);
    return b >= ub.get() && b + bytes <= ub.get() + soc.ub_bytes;
  }
  uint64_t UbOffset(const void* p) const { return static_cast<const uint8_t*>(p) - ub.get(); }
};

inline BlockContext*& CurrentBlock() {
  static thread_local BlockContext* ctx = nullptr;
  return ctx;
}

inline BlockContext& Block() {
  BlockContext* c = CurrentBlock();
  if (c == nullptr) Fail("launch", "kernel code ran outside ascendc_emu::Launch");
  return *c;
}

enum class SlotState { kFree, kAllocated, kQueued, kDequeued };

struct BufferSlot {
  uint8_t* addr = nullptr;
  uint32_t bytes = 0;
  SlotState state = SlotState::kFree;
  uint64_t generation = 0;  // bumped at every Alloc/Free: stale LocalTensors are caught
};

// Runs kernel() once per block with GetBlockIdx() = 0..block_dim-1, each with a fresh UB.
// Throws Violation if block_dim exceeds the SoC's vector cores or a block broke a rule.
inline void Launch(const SocSpec& soc, uint32_t block_dim, const std::function<void()>& kernel) {
  if (block_dim == 0 || block_dim > soc.vector_cores) {
    Fail("block count", "blockDim " + std::to_string(block_dim) + " is outside [1, " +
                            std::to_string(soc.vector_cores) + "] vector cores of " + soc.name);
  }
  for (uint32_t b = 0; b < block_dim; ++b) {
    BlockContext ctx;
    ctx.soc = soc;
    ctx.block_idx = b;
    ctx.block_num = block_dim;
    ctx.ub.reset(static_cast<uint8_t*>(std::aligned_alloc(kBlockBytes, soc.ub_bytes)));
    std::memset(ctx.ub.get(), 0xA5, soc.ub_bytes);  // UB is not zeroed on hardware either
    CurrentBlock() = &ctx;
    try {
      kernel();
    } catch (...) {
      CurrentBlock() = nullptr;
      throw;
    }
    CurrentBlock() = nullptr;
    if (!ctx.deferred.empty()) Fail("block " + std::to_string(b), ctx.deferred.front());
  }
}

template <typename T>
void LoadTiling(T* dst, const uint8_t* src) {
  static_assert(std::is_trivially_copyable<T>::value, "tiling data must be POD");
  std::memcpy(dst, src, sizeof(T));
}

template <typename T>
inline float ToFloat(T v) { return static_cast<float>(v); }

}  // namespace ascendc_emu

namespace AscendC {

using ascendc_emu::Fail;

enum class TPosition { GM, A1, A2, B1, B2, C1, C2, CO1, CO2, VECIN, VECOUT, VECCALC };
enum class RoundMode { CAST_NONE, CAST_RINT, CAST_ROUND, CAST_FLOOR, CAST_CEIL, CAST_TRUNC };
enum PipeType { PIPE_S, PIPE_V, PIPE_M, PIPE_MTE1, PIPE_MTE2, PIPE_MTE3, PIPE_ALL };
enum HardEvent { MTE2_V, V_MTE3, MTE3_V, V_MTE2, MTE2_S, S_V, V_S, MTE3_MTE2 };

inline int64_t GetBlockIdx() { return ascendc_emu::Block().block_idx; }
inline int64_t GetBlockNum() { return ascendc_emu::Block().block_num; }

// Synchronization is a no-op: blocks and pipes run sequentially in the emulator.
template <PipeType P>
inline void PipeBarrier() {}
template <HardEvent E>
inline void SetFlag(int32_t) {}
template <HardEvent E>
inline void WaitFlag(int32_t) {}

template <typename T>
class GlobalTensor {
 public:
  void SetGlobalBuffer(__gm__ T* ptr, uint64_t len) {
    base_ = ptr;
    len_ = len;
    off_ = 0;
  }
  GlobalTensor operator[](uint64_t offset) const {
    if (off_ + offset > len_) Fail("GM bounds", "offset " + std::to_string(off_ + offset) + " past " + std::to_string(len_));
    GlobalTensor g = *this;
    g.off_ = off_ + offset;
    return g;
  }
  T GetValue(uint64_t i) const { Check(i, 1); return base_[off_ + i]; }
  void SetValue(uint64_t i, T v) { Check(i, 1); base_[off_ + i] = v; }
  uint64_t GetSize() const { return len_ - off_; }
  T* Address(uint64_t count) const { Check(0, count); return base_ + off_; }
  void Check(uint64_t i, uint64_t count) const {
    if (base_ == nullptr) Fail("GM", "GlobalTensor used before SetGlobalBuffer");
    if (off_ + i + count > len_) {
      Fail("GM bounds", "access [" + std::to_string(off_ + i) + ", " + std::to_string(off_ + i + count) +
                            ") past a buffer of " + std::to_string(len_) + " elements");
    }
  }

 private:
  T* base_ = nullptr;
  uint64_t len_ = 0;
  uint64_t off_ = 0;
};

template <typename T>
class LocalTensor {
 public:
  LocalTensor() = default;
  LocalTensor(T* addr, uint32_t len, ascendc_emu::BufferSlot* slot, uint64_t gen)
      : addr_(addr), len_(len), slot_(slot), gen_(gen) {}

  LocalTensor operator[](uint32_t offset) const {
    Live();
    if (offset > len_) Fail("UB bounds", "sub-tensor offset " + std::to_string(offset) + " past " + std::to_string(len_));
    return LocalTensor(addr_ + offset, len_ - offset, slot_, gen_);
  }
  T GetValue(uint32_t i) const { Check(i, 1); return addr_[i]; }
  void SetValue(uint32_t i, T v) const { Check(i, 1); addr_[i] = v; }
  uint32_t GetSize() const { return len_; }
  template <typename U>
  LocalTensor<U> ReinterpretCast() const {
    Live();
    return LocalTensor<U>(reinterpret_cast<U*>(addr_), static_cast<uint32_t>(len_ * sizeof(T) / sizeof(U)), slot_, gen_);
  }
  // Emulator access (vector ops): checks liveness, bounds and, for operands, 32-byte alignment.
  T* Data(uint32_t count, bool operand = true) const {
    Check(0, count);
    if (operand && ascendc_emu::Block().UbOffset(addr_) % ascendc_emu::kBlockBytes != 0) {
      Fail("UB alignment", "vector operand at UB offset " + std::to_string(ascendc_emu::Block().UbOffset(addr_)) +
                               " is not 32-byte aligned");
    }
    return addr_;
  }
  void Check(uint32_t i, uint32_t count) const {
    Live();
    if (static_cast<uint64_t>(i) + count > len_) {
      Fail("UB bounds", "access [" + std::to_string(i) + ", " + std::to_string(i + count) + ") past a tensor of " +
                            std::to_string(len_) + " elements");
    }
  }
  void Live() const {
    if (addr_ == nullptr) Fail("LocalTensor", "used before it was allocated");
    if (slot_ != nullptr && (slot_->generation != gen_ || slot_->state == ascendc_emu::SlotState::kFree)) {
      Fail("use after free", "LocalTensor used after FreeTensor");
    }
  }
  ascendc_emu::BufferSlot* Slot() const { return slot_; }
  uint64_t Generation() const { return gen_; }

 private:
  T* addr_ = nullptr;
  uint32_t len_ = 0;
  ascendc_emu::BufferSlot* slot_ = nullptr;
  uint64_t gen_ = 0;
};

class TPipe;

// A queue between pipeline stages: `num` buffers (InitBuffer), at most `depth` en-queued at once.
template <TPosition POS, int32_t DEPTH>
class TQue {
 public:
  TQue() = default;
  TQue(const TQue&) = delete;
  TQue& operator=(const TQue&) = delete;
  ~TQue() {
    if (slots_.empty() || ascendc_emu::CurrentBlock() == nullptr) return;
    int out = 0;
    for (auto& s : slots_) out += s.state != ascendc_emu::SlotState::kFree;
    if (out != 0 || queued_ != 0) {
      ascendc_emu::Block().deferred.push_back(
          "unbalanced queue: " + std::to_string(out) + " buffer(s) not freed, " + std::to_string(queued_) +
          " still en-queued when the kernel ended (every AllocTensor needs EnQue/DeQue/FreeTensor)");
    }
  }

  template <typename T>
  LocalTensor<T> AllocTensor() {
    if (slots_.empty()) Fail("TQue", "AllocTensor before TPipe::InitBuffer");
    for (auto& s : slots_) {
      if (s.state == ascendc_emu::SlotState::kFree) {
        s.state = ascendc_emu::SlotState::kAllocated;
        ++s.generation;
        return LocalTensor<T>(reinterpret_cast<T*>(s.addr), s.bytes / sizeof(T), &s, s.generation);
      }
    }
    Fail("unbalanced queue", "AllocTensor with all " + std::to_string(slots_.size()) + " buffers in use");
  }
  template <typename T>
  bool EnQue(const LocalTensor<T>& t) {
    auto* s = Own(t, "EnQue");
    if (s->state != ascendc_emu::SlotState::kAllocated) Fail("unbalanced queue", "EnQue of a tensor that is not freshly allocated");
    if (queued_ >= DEPTH) Fail("queue depth", "EnQue beyond depth " + std::to_string(DEPTH));
    s->state = ascendc_emu::SlotState::kQueued;
    order_.push_back(s);
    ++queued_;
    return true;
  }
  template <typename T>
  LocalTensor<T> DeQue() {
    if (queued_ == 0) Fail("unbalanced queue", "DeQue from an empty queue");
    ascendc_emu::BufferSlot* s = order_.front();
    order_.erase(order_.begin());
    --queued_;
    s->state = ascendc_emu::SlotState::kDequeued;
    return LocalTensor<T>(reinterpret_cast<T*>(s->addr), s->bytes / sizeof(T), s, s->generation);
  }
  template <typename T>
  void FreeTensor(const LocalTensor<T>& t) {
    auto* s = Own(t, "FreeTensor");
    if (s->state == ascendc_emu::SlotState::kQueued) Fail("unbalanced queue", "FreeTensor of a tensor still en-queued");
    if (s->state == ascendc_emu::SlotState::kFree) Fail("unbalanced queue", "FreeTensor twice");
    s->state = ascendc_emu::SlotState::kFree;
    ++s->generation;
  }

 private:
  friend class TPipe;
  template <typename T>
  ascendc_emu::BufferSlot* Own(const LocalTensor<T>& t, const char* what) {
    for (auto& s : slots_) {
      if (&s == t.Slot()) {
        if (t.Generation() != s.generation) Fail("use after free", std::string(what) + " of a stale tensor");
        return &s;
      }
    }
    Fail("unbalanced queue", std::string(what) + " of a tensor this queue did not allocate");
  }
  std::vector<ascendc_emu::BufferSlot> slots_;
  std::vector<ascendc_emu::BufferSlot*> order_;
  int32_t queued_ = 0;
};

// A calculation buffer (no queue semantics): Get<T>() views it whole.
template <TPosition POS = TPosition::VECCALC>
class TBuf {
 public:
  template <typename T>
  LocalTensor<T> Get() const {
    if (slot_.addr == nullptr) Fail("TBuf", "Get before TPipe::InitBuffer");
    return LocalTensor<T>(reinterpret_cast<T*>(slot_.addr), slot_.bytes / sizeof(T), nullptr, 0);
  }
  template <typename T>
  LocalTensor<T> Get(uint32_t len) const {
    if (len * sizeof(T) > slot_.bytes) Fail("UB bounds", "TBuf::Get beyond its InitBuffer size");
    return LocalTensor<T>(reinterpret_cast<T*>(slot_.addr), len, nullptr, 0);
  }

 private:
  friend class TPipe;
  ascendc_emu::BufferSlot slot_;
};

// Owns the block's UB: every InitBuffer carves from the SoC's capacity.
class TPipe {
 public:
  TPipe() {
    auto& b = ascendc_emu::Block();
    if (b.pipe_alive) Fail("TPipe", "a second TPipe in one kernel");
    b.pipe_alive = true;
  }
  ~TPipe() {
    if (ascendc_emu::CurrentBlock() != nullptr) ascendc_emu::Block().pipe_alive = false;
  }
  template <TPosition POS, int32_t DEPTH>
  void InitBuffer(TQue<POS, DEPTH>& q, uint32_t num, uint32_t len) {
    if (!q.slots_.empty()) Fail("TQue", "InitBuffer twice");
    if (num == 0 || len == 0) Fail("TQue", "InitBuffer with num or len 0");
    q.slots_.resize(num);
    for (auto& s : q.slots_) {
      s.addr = ascendc_emu::Block().Carve(len, "TQue buffer");
      s.bytes = len;
    }
  }
  template <TPosition POS>
  void InitBuffer(TBuf<POS>& buf, uint32_t len) {
    if (buf.slot_.addr != nullptr) Fail("TBuf", "InitBuffer twice");
    buf.slot_.addr = ascendc_emu::Block().Carve(len, "TBuf");
    buf.slot_.bytes = len;
    buf.slot_.state = ascendc_emu::SlotState::kAllocated;
  }
};

// ------------------------------------------------------------------------------------ data movement
struct DataCopyParams {  // units of 32-byte blocks (both sides), as in the Ascend C API
  uint16_t blockCount = 1;
  uint16_t blockLen = 0;
  uint16_t srcStride = 0;  // gap between blocks, in 32-byte blocks
  uint16_t dstStride = 0;
};

struct DataCopyExtParams {  // DataCopyPad: blockLen in bytes; GM stride in bytes, UB stride in 32B blocks
  uint16_t blockCount = 1;
  uint32_t blockLen = 0;
  uint32_t srcStride = 0;
  uint32_t dstStride = 0;
  uint32_t rsv = 0;
};

template <typename T>
struct DataCopyPadExtParams {
  bool isPad = false;
  uint8_t leftPadding = 0;
  uint8_t rightPadding = 0;
  T paddingValue = 0;
};

namespace detail {
inline void CheckGranule(uint64_t bytes, const char* what) {
  if (bytes % ascendc_emu::kBlockBytes != 0) {
    Fail("unaligned copy", std::string(what) + " of " + std::to_string(bytes) +
                               " bytes is not a multiple of 32 (use DataCopyPad)");
  }
}
}  // namespace detail

// GM -> UB, `count` elements: count * sizeof(T) must be a multiple of 32 bytes.
template <typename T>
void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, uint32_t count) {
  detail::CheckGranule(uint64_t(count) * sizeof(T), "DataCopy GM->UB");
  std::memcpy(dst.Data(count), src.Address(count), count * sizeof(T));
}
// UB -> GM
template <typename T>
void DataCopy(const GlobalTensor<T>& dst, const LocalTensor<T>& src, uint32_t count) {
  detail::CheckGranule(uint64_t(count) * sizeof(T), "DataCopy UB->GM");
  std::memcpy(dst.Address(count), src.Data(count), count * sizeof(T));
}
// UB -> UB
template <typename T>
void DataCopy(const LocalTensor<T>& dst, const LocalTensor<T>& src, uint32_t count) {
  detail::CheckGranule(uint64_t(count) * sizeof(T), "DataCopy UB->UB");
  std::memmove(dst.Data(count), src.Data(count), count * sizeof(T));
}
// Strided GM -> UB: blockCount bursts of blockLen 32-byte blocks.
template <typename T>
void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const DataCopyParams& p) {
  const uint32_t per = ascendc_emu::kBlockBytes / sizeof(T);
  for (uint32_t i = 0; i < p.blockCount; ++i) {
    uint32_t n = p.blockLen * per;
    DataCopy(dst[i * (p.blockLen + p.dstStride) * per], src[uint64_t(i) * (p.blockLen + p.srcStride) * per], n);
  }
}
// Strided UB -> GM.
template <typename T>
void DataCopy(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const DataCopyParams& p) {
  const uint32_t per = ascendc_emu::kBlockBytes / sizeof(T);
  for (uint32_t i = 0; i < p.blockCount; ++i) {
    uint32_t n = p.blockLen * per;
    DataCopy(dst[uint64_t(i) * (p.blockLen + p.dstStride) * per], src[i * (p.blockLen + p.srcStride) * per], n);
  }
}
// GM -> UB of any byte length (Atlas A2 and later): each burst lands 32-byte aligned in UB; the
// tail of the last 32-byte block is padded (with paddingValue if isPad, else left undefined).
template <typename T>
void DataCopyPad(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const DataCopyExtParams& p,
                 const DataCopyPadExtParams<T>& pad) {
  if (p.blockLen % sizeof(T) != 0) Fail("DataCopyPad", "blockLen is not a whole number of elements");
  const uint32_t n = p.blockLen / sizeof(T);
  const uint32_t padded_bytes = (p.blockLen + 31) / 32 * 32;
  const uint32_t ub_stride = padded_bytes / sizeof(T) + p.dstStride * (32 / sizeof(T));
  for (uint32_t i = 0; i < p.blockCount; ++i) {
    T* d = dst[i * ub_stride].Data(padded_bytes / sizeof(T));
    std::memcpy(d, src[uint64_t(i) * (n + p.srcStride / sizeof(T))].Address(n), p.blockLen);
    if (pad.isPad) {
      for (uint32_t j = n; j < padded_bytes / sizeof(T); ++j) d[j] = pad.paddingValue;
    }
  }
}
// UB -> GM of any byte length: writes exactly blockLen bytes per burst.
template <typename T>
void DataCopyPad(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const DataCopyExtParams& p) {
  if (p.blockLen % sizeof(T) != 0) Fail("DataCopyPad", "blockLen is not a whole number of elements");
  const uint32_t n = p.blockLen / sizeof(T);
  const uint32_t padded = (p.blockLen + 31) / 32 * 32 / sizeof(T);
  const uint32_t ub_stride = padded + p.srcStride * (32 / sizeof(T));
  for (uint32_t i = 0; i < p.blockCount; ++i) {
    std::memcpy(dst[uint64_t(i) * (n + p.dstStride / sizeof(T))].Address(n), src[i * ub_stride].Data(n), p.blockLen);
  }
}

// ------------------------------------------------------------------------------------ vector ops
// Tensor-level ("count") forms. Arithmetic is done in float and stored in T.
namespace detail {
template <typename T, typename F>
void Unary(const LocalTensor<T>& dst, const LocalTensor<T>& src, int32_t count, F f) {
  if (count < 0) Fail("vector op", "negative count");
  T* d = dst.Data(count);
  const T* s = src.Data(count);
  for (int32_t i = 0; i < count; ++i) d[i] = static_cast<T>(f(static_cast<float>(s[i])));
}
template <typename T, typename F>
void Binary(const LocalTensor<T>& dst, const LocalTensor<T>& a, const LocalTensor<T>& b, int32_t count, F f) {
  if (count < 0) Fail("vector op", "negative count");
  T* d = dst.Data(count);
  const T* x = a.Data(count);
  const T* y = b.Data(count);
  for (int32_t i = 0; i < count; ++i) d[i] = static_cast<T>(f(static_cast<float>(x[i]), static_cast<float>(y[i])));
}
}  // namespace detail

template <typename T>
void Add(const LocalTensor<T>& d, const LocalTensor<T>& a, const LocalTensor<T>& b, int32_t n) {
  detail::Binary(d, a, b, n, [](float x, float y) { return x + y; });
}
template <typename T>
void Sub(const LocalTensor<T>& d, const LocalTensor<T>& a, const LocalTensor<T>& b, int32_t n) {
  detail::Binary(d, a, b, n, [](float x, float y) { return x - y; });
}
template <typename T>
void Mul(const LocalTensor<T>& d, const LocalTensor<T>& a, const LocalTensor<T>& b, int32_t n) {
  detail::Binary(d, a, b, n, [](float x, float y) { return x * y; });
}
template <typename T>
void Div(const LocalTensor<T>& d, const LocalTensor<T>& a, const LocalTensor<T>& b, int32_t n) {
  detail::Binary(d, a, b, n, [](float x, float y) { return x / y; });
}
template <typename T>
void Max(const LocalTensor<T>& d, const LocalTensor<T>& a, const LocalTensor<T>& b, int32_t n) {
  detail::Binary(d, a, b, n, [](float x, float y) { return x > y ? x : y; });
}
template <typename T>
void Muls(const LocalTensor<T>& d, const LocalTensor<T>& s, T scalar, int32_t n) {
  float c = static_cast<float>(scalar);
  detail::Unary(d, s, n, [c](float x) { return x * c; });
}
template <typename T>
void Adds(const LocalTensor<T>& d, const LocalTensor<T>& s, T scalar, int32_t n) {
  float c = static_cast<float>(scalar);
  detail::Unary(d, s, n, [c](float x) { return x + c; });
}
template <typename T>
void Exp(const LocalTensor<T>& d, const LocalTensor<T>& s, int32_t n) {
  detail::Unary(d, s, n, [](float x) { return std::exp(x); });
}
template <typename T>
void Sqrt(const LocalTensor<T>& d, const LocalTensor<T>& s, int32_t n) {
  detail::Unary(d, s, n, [](float x) { return std::sqrt(x); });
}
template <typename T>
void Reciprocal(const LocalTensor<T>& d, const LocalTensor<T>& s, int32_t n) {
  detail::Unary(d, s, n, [](float x) { return 1.0f / x; });
}
// dst = src * scalar + dst
template <typename T>
void Axpy(const LocalTensor<T>& d, const LocalTensor<T>& s, T scalar, int32_t n) {
  if (n < 0) Fail("vector op", "negative count");
  T* dp = d.Data(n);
  const T* sp = s.Data(n);
  float c = static_cast<float>(scalar);
  for (int32_t i = 0; i < n; ++i) dp[i] = static_cast<T>(static_cast<float>(sp[i]) * c + static_cast<float>(dp[i]));
}
template <typename T>
void Duplicate(const LocalTensor<T>& d, T scalar, int32_t n) {
  T* dp = d.Data(n);
  for (int32_t i = 0; i < n; ++i) dp[i] = scalar;
}
// dst[0] = sum(src[0:n]); work must hold at least n elements (the API's scratch).
template <typename T>
void ReduceSum(const LocalTensor<T>& d, const LocalTensor<T>& s, const LocalTensor<T>& work, int32_t n) {
  work.Data(n);
  const T* sp = s.Data(n);
  double acc = 0;  // the hardware sums in a tree; double here keeps the oracle comparison honest
  for (int32_t i = 0; i < n; ++i) acc += static_cast<float>(sp[i]);
  d.Data(1)[0] = static_cast<T>(acc);
}
template <typename T>
void ReduceMax(const LocalTensor<T>& d, const LocalTensor<T>& s, const LocalTensor<T>& work, int32_t n,
               bool calIndex = false) {
  (void)calIndex;
  work.Data(n);
  const T* sp = s.Data(n);
  float m = -std::numeric_limits<float>::infinity();
  for (int32_t i = 0; i < n; ++i) m = std::max(m, static_cast<float>(sp[i]));
  d.Data(1)[0] = static_cast<T>(m);
}
// dst[i] = src[offset[i] / sizeof(T)] with byte offsets relative to srcBaseAddr (bytes).
template <typename T>
void Gather(const LocalTensor<T>& d, const LocalTensor<T>& s, const LocalTensor<uint32_t>& offs, uint32_t base,
            uint32_t n) {
  T* dp = d.Data(n);
  const uint32_t* op = offs.Data(n);
  for (uint32_t i = 0; i < n; ++i) {
    uint32_t byte = base + op[i];
    if (byte % sizeof(T) != 0) Fail("Gather", "offset not a multiple of the element size");
    dp[i] = s.GetValue(byte / sizeof(T));
  }
}
// Element type conversion; RoundMode is honoured for float -> half (round to nearest) and
// float -> int32 paths the kernels use.
template <typename D, typename S>
void Cast(const LocalTensor<D>& d, const LocalTensor<S>& s, RoundMode mode, int32_t n) {
  D* dp = d.Data(n);
  const S* sp = s.Data(n);
  for (int32_t i = 0; i < n; ++i) {
    float v = static_cast<float>(sp[i]);
    switch (mode) {
      case RoundMode::CAST_FLOOR: v = std::floor(v); break;
      case RoundMode::CAST_CEIL: v = std::ceil(v); break;
      case RoundMode::CAST_TRUNC: v = std::trunc(v); break;
      case RoundMode::CAST_ROUND: case RoundMode::CAST_RINT:
        if (std::is_integral<D>::value) v = std::nearbyint(v);
        break;
      case RoundMode::CAST_NONE: break;
    }
    dp[i] = static_cast<D>(v);
  }
}

}  // namespace AscendC
