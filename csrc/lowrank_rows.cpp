// Dispatch + threading for the fused low-rank row pass; also its scalar build.
#define PYENGINE_ISA_NS scalar
#include "lowrank_rows_impl.h"

#include <mutex>

#include "cpu_features.h"
#include "parallel.h"

namespace pyengine {

// Each task accumulates grad privately, then adds it into the caller's (zeroed) grad_out
// under a lock: at most num_threads reductions of rg * K floats.
void lowrank_rows(const LowRankRowsArgs& a, int num_threads) {
  auto fn = scalar::lowrank_rows_range;
  switch (active_isa()) {
    case Isa::kAvx512: fn = avx512::lowrank_rows_range; break;
    case Isa::kAvx2: fn = avx2::lowrank_rows_range; break;
    default: break;
  }
  const int64_t acc_size = a.grad_rank * a.cols;
  std::mutex mu;
  parallel_for(a.n_rows, num_threads, 16, [&](int64_t b, int64_t e) {
    std::vector<float> acc(acc_size, 0.f);
    fn(a, b, e, acc.data());
    if (!acc_size) return;
    std::lock_guard<std::mutex> lock(mu);
    for (int64_t j = 0; j < acc_size; ++j) a.grad_out[j] += acc[j];
  });
}

}  // namespace pyengine
