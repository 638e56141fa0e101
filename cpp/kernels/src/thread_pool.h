// SPDX-License-Identifier: Apache-2.0
// A small work-claiming thread pool for the CPU kernels. The caller is worker 0 and always takes
// part, so a job finishes even when no other worker gets a core; items are claimed one at a time
// from an atomic ticket (generation << 32 | next item), so a worker that was descheduled delays a
// job by at most the item it holds, never by a static share. Idle workers spin for `spin_us`
// microseconds (short gaps between the kernels of one decode step) and then sleep on a condition
// variable (passive waiting: a busy machine gets its cores back).
//
// Shared machines: when the caller keeps waiting for workers that hold an item but have lost
// their core (its wait after its own share exceeds kLateFraction of the job, averaged over recent
// jobs), the pool runs jobs on the caller alone for kSoloMs and then tries the workers again:
// one thread on a free core beats two threads that share a core with another process.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace mindie_kernels {

class ThreadPool {
 public:
  using ItemFn = void (*)(void* ctx, std::int64_t item, int worker);

  ThreadPool(int n_threads, int spin_us);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Runs fn(ctx, i, worker) for i in [0, n_items); returns when all have run. One caller at a time.
  void run(std::int64_t n_items, ItemFn fn, void* ctx);
  int size() const { return static_cast<int>(workers_.size()) + 1; }
  bool solo() const;  // currently running jobs on the caller alone (degraded by contention)
  bool workers_asleep() const { return sleepers_.load(std::memory_order_relaxed) > 0; }  // past their spin

 private:
  struct Slot {
    std::atomic<ItemFn> fn{nullptr};   // atomics: a stale reader may race the next job's writer
    std::atomic<void*> ctx{nullptr};
    std::atomic<std::int64_t> n{0};
    std::atomic<std::int64_t> done{0};
  };
  bool try_work(int worker);
  void worker_loop(int id);

  std::vector<std::thread> workers_;
  Slot slots_[2];
  std::atomic<std::uint64_t> ticket_{0};
  std::uint32_t gen_ = 0;
  std::mutex run_mu_;  // one caller at a time
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  int spin_us_;
  double late_ewma_ = 0.0;                 // caller's wait after its own items / job time
  std::int64_t solo_until_ns_ = 0;          // steady-clock ns until which jobs run on the caller
};

}  // namespace mindie_kernels
