// Persistent pool with dynamic claiming.  A job is split into tasks; the caller and any
// awake worker claim tasks from one atomic word until none are left, so the caller never
// waits for a worker that has not woken yet (on a busy machine, or right after torch's
// OpenMP threads ran, a late worker simply finds nothing to do).  Workers spin briefly on
// the job generation, then sleep on a condition variable.
#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>
#include <immintrin.h>

namespace pyengine {
namespace {

// claim word: generation (24 bits) | task count (20 bits) | next task index (20 bits)
constexpr int kIdxBits = 20;
constexpr uint64_t kIdxMask = (uint64_t(1) << kIdxBits) - 1;
constexpr int64_t kMaxTasks = int64_t(kIdxMask);

uint64_t pack(uint64_t gen, uint64_t n, uint64_t idx) {
  return (gen << (2 * kIdxBits)) | (n << kIdxBits) | idx;
}

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      wake_gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  void run(int n_tasks, int n_threads, const std::function<void(int)>& task) {
    std::lock_guard<std::mutex> one_job_at_a_time(run_mu_);
    ensure_workers(n_threads - 1);
    const uint64_t gen = (++job_gen_) & ((uint64_t(1) << 24) - 1);
    task_ = &task;
    done_.store(0, std::memory_order_relaxed);
    claim_.store(pack(gen, uint64_t(n_tasks), 0), std::memory_order_release);
    {
      std::lock_guard<std::mutex> lk(mu_);
      wake_gen_.store(gen, std::memory_order_release);
    }
    cv_.notify_all();
    work(gen);
    while (done_.load(std::memory_order_acquire) != n_tasks) _mm_pause();
  }

 private:
  // Claim and run tasks of job `gen` until none are left (or a newer job is published).
  void work(uint64_t gen) {
    uint64_t v = claim_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t n = (v >> kIdxBits) & kIdxMask, idx = v & kIdxMask;
      if ((v >> (2 * kIdxBits)) != gen || idx >= n) return;
      if (claim_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) {
        (*task_)(int(idx));  // job `gen` cannot finish before this task: task_ is its own
        done_.fetch_add(1, std::memory_order_acq_rel);
        v = claim_.load(std::memory_order_acquire);
      }
    }
  }

  void ensure_workers(int n) {
    while (int(threads_.size()) < n)
      threads_.emplace_back([this, seen = wake_gen_.load()] { worker(seen); });
  }

  void worker(uint64_t seen) {
    for (;;) {
      uint64_t g;
      int spins = 0;
      while ((g = wake_gen_.load(std::memory_order_acquire)) == seen && spins < 4000) {
        _mm_pause();
        ++spins;
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return wake_gen_.load() != seen; });
        g = wake_gen_.load();
      }
      seen = g;
      if (stop_) return;
      work(g);
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> wake_gen_{0}, claim_{0};
  std::atomic<int> done_{0};
  const std::function<void(int)>* task_ = nullptr;
  uint64_t job_gen_ = 0;
  bool stop_ = false;
};

Pool& pool() {
  static Pool* p = new Pool();  // leaked on purpose: no join at interpreter exit
  return *p;
}

}  // namespace

void parallel_for(int64_t n, int num_threads, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t by_grain = (n + grain - 1) / grain;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(std::max(num_threads, 1), by_grain)));
  if (threads == 1) {
    fn(0, n);
    return;
  }
  // a few tasks per thread so a late or slow thread costs little
  const int64_t tasks = std::min<int64_t>({by_grain, int64_t(threads) * 4, kMaxTasks});
  const int64_t chunk = (n + tasks - 1) / tasks;
  pool().run(int((n + chunk - 1) / chunk), threads, [&](int i) {
    const int64_t b = i * chunk, e = std::min(n, b + chunk);
    if (b < e) fn(b, e);
  });
}

void parallel_sum_rows(int64_t n, int num_threads, int64_t grain, const std::vector<SumOut>& outs,
                       const std::function<void(int64_t, int64_t, float*)>& fn) {
  if (n <= 0) return;
  int64_t total = 0;
  for (const SumOut& o : outs) total += o.size;
  grain = std::max<int64_t>(grain, 1);
  const int64_t partial_bytes = std::max<int64_t>(total, 1) * int64_t(sizeof(float));
  const int64_t max_blocks =
      std::clamp(kPartialBudgetBytes / partial_bytes, kMinRowBlocks, kMaxRowBlocks);
  const int64_t per_block = (n + max_blocks - 1) / max_blocks;
  const int64_t block = (per_block + grain - 1) / grain * grain;
  const int64_t blocks = (n + block - 1) / block;
  std::vector<float> partials(size_t(blocks * total), 0.f);
  parallel_for(blocks, num_threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b)
      fn(b * block, std::min(n, (b + 1) * block), partials.data() + b * total);
  });
  if (!total) return;
  // element j of the concatenated outputs: sum over blocks in block order
  parallel_for(total, num_threads, 1 << 14, [&](int64_t begin, int64_t end) {
    int64_t base = 0;
    for (const SumOut& o : outs) {
      const int64_t b = std::max(begin, base), e = std::min(end, base + o.size);
      for (int64_t k = 0; k < blocks; ++k) {
        const float* p = partials.data() + k * total;
        for (int64_t j = b; j < e; ++j) o.data[j - base] += p[j];
      }
      base += o.size;
    }
  });
}

}  // namespace pyengine
