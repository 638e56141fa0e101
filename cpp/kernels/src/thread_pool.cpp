// SPDX-License-Identifier: Apache-2.0
#include "thread_pool.h"

#include <chrono>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MK_PAUSE() _mm_pause()
#else
#define MK_PAUSE() std::this_thread::yield()
#endif

namespace mindie_kernels {

namespace {
constexpr double kLateFraction = 0.35;   // EWMA of (wait for workers) / (job time) that means contention
constexpr double kEwma = 0.05;
constexpr std::int64_t kSoloMs = 200;    // then the workers are tried again
constexpr std::int64_t kMinJobNs = 20000;  // shorter jobs are too noisy to judge by
std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

bool ThreadPool::solo() const { return now_ns() < solo_until_ns_; }

ThreadPool::ThreadPool(int n_threads, int spin_us) : spin_us_(spin_us < 0 ? 0 : spin_us) {
  for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_.store(true);
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

bool ThreadPool::try_work(int worker) {
  // Claims and runs items of the current job; false when there was nothing to claim.
  bool did = false;
  for (;;) {
    std::uint64_t t = ticket_.load(std::memory_order_acquire);
    const std::uint32_t g = static_cast<std::uint32_t>(t >> 32);
    const std::int64_t idx = static_cast<std::int64_t>(t & 0xffffffffu);
    Slot& s = slots_[g & 1];
    const std::int64_t n = s.n.load(std::memory_order_relaxed);
    const ItemFn fn = s.fn.load(std::memory_order_relaxed);
    void* ctx = s.ctx.load(std::memory_order_relaxed);
    if (g == 0 || idx >= n) return did;
    if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) continue;
    fn(ctx, idx, worker);  // the job cannot end (nor its slot be reused) before this item is done
    s.done.fetch_add(1, std::memory_order_acq_rel);
    did = true;
  }
}

void ThreadPool::worker_loop(int id) {
  using clock = std::chrono::steady_clock;
  while (!stop_.load(std::memory_order_relaxed)) {
    if (try_work(id)) continue;
    // Spin briefly for the next kernel, then sleep until the ticket changes.
    const std::uint64_t seen = ticket_.load(std::memory_order_acquire);
    const auto until = clock::now() + std::chrono::microseconds(spin_us_);
    bool changed = false;
    while (!changed) {
      for (int i = 0; i < 64 && !changed; ++i) {
        MK_PAUSE();
        changed = ticket_.load(std::memory_order_acquire) != seen;
      }
      if (changed || clock::now() >= until) break;
    }
    if (changed) continue;
    std::unique_lock<std::mutex> lk(mu_);
    sleepers_.fetch_add(1);
    cv_.wait(lk, [&] { return stop_.load() || ticket_.load() != seen; });
    sleepers_.fetch_sub(1);
  }
}

void ThreadPool::run(std::int64_t n_items, ItemFn fn, void* ctx) {
  if (n_items <= 0) return;
  if (workers_.empty() || n_items == 1) {
    for (std::int64_t i = 0; i < n_items; ++i) fn(ctx, i, 0);
    return;
  }
  std::lock_guard<std::mutex> run_lk(run_mu_);
  const std::int64_t t_start = now_ns();
  if (t_start < solo_until_ns_) {
    for (std::int64_t i = 0; i < n_items; ++i) fn(ctx, i, 0);
    return;
  }
  ++gen_;
  if (gen_ == 0) ++gen_;  // 0 means "no job"
  Slot& s = slots_[gen_ & 1];
  s.fn.store(fn, std::memory_order_relaxed);
  s.ctx.store(ctx, std::memory_order_relaxed);
  s.n.store(n_items, std::memory_order_relaxed);
  s.done.store(0, std::memory_order_relaxed);
  ticket_.store(static_cast<std::uint64_t>(gen_) << 32);  // seq_cst: pairs with sleepers_
  if (sleepers_.load() > 0) {
    std::lock_guard<std::mutex> lk(mu_);
    cv_.notify_all();
  }
  try_work(0);
  const std::int64_t t_own = now_ns();
  int spins = 0;
  while (s.done.load(std::memory_order_acquire) < n_items) {
    if (++spins < 4096) {
      MK_PAUSE();
    } else {
      std::this_thread::yield();  // a worker holding the last item may need this core
    }
  }
  const std::int64_t t_end = now_ns();
  if (t_end - t_start >= kMinJobNs) {
    const double late = static_cast<double>(t_end - t_own) / static_cast<double>(t_end - t_start);
    late_ewma_ = (1.0 - kEwma) * late_ewma_ + kEwma * late;
    if (late_ewma_ > kLateFraction) {
      solo_until_ns_ = t_end + kSoloMs * 1000000;
      late_ewma_ = 0.0;
    }
  }
}

}  // namespace mindie_kernels
