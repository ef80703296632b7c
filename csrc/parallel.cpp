// Persistent pool: workers spin briefly on a generation counter (cheap hand-off for the
// many small decode-time calls), then sleep on a condition variable.
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

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  void run(int n_tasks, const std::function<void(int)>& task) {
    std::lock_guard<std::mutex> one_job_at_a_time(run_mu_);
    ensure_workers(n_tasks - 1);
    task_ = &task;
    n_tasks_ = n_tasks;
    pending_.store(n_tasks - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    task(0);
    while (pending_.load(std::memory_order_acquire) != 0) _mm_pause();
    task_ = nullptr;
  }

 private:
  void ensure_workers(int n) {
    while (int(threads_.size()) < n) {
      int id = int(threads_.size()) + 1;
      uint64_t gen = gen_.load();  // read before run() bumps it: the new worker takes that job
      threads_.emplace_back([this, id, gen] { worker(id, gen); });
    }
  }

  void worker(int id, uint64_t seen) {
    for (;;) {
      uint64_t g;
      int spins = 0;
      while ((g = gen_.load(std::memory_order_acquire)) == seen && spins < 4000) {
        _mm_pause();
        ++spins;
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return gen_.load() != seen; });
        g = gen_.load();
      }
      seen = g;
      if (stop_) return;
      if (id < n_tasks_) {
        (*task_)(id);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mu_, run_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int)>* task_ = nullptr;
  int n_tasks_ = 0;
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
  int64_t by_grain = (n + grain - 1) / grain;
  int t = int(std::max<int64_t>(1, std::min<int64_t>(std::max(num_threads, 1), by_grain)));
  if (t == 1) {
    fn(0, n);
    return;
  }
  int64_t chunk = (n + t - 1) / t;
  pool().run(t, [&](int i) {
    int64_t b = i * chunk, e = std::min(n, b + chunk);
    if (b < e) fn(b, e);
  });
}

}  // namespace pyengine
