// Dispatch + threading for the fused low-rank row pass; also its scalar build.
#define PYENGINE_ISA_NS scalar
#include "lowrank_rows_impl.h"

#include "cpu_features.h"
#include "parallel.h"

namespace pyengine {

// grad_out is a deterministic row reduction (parallel_sum_rows): fixed row blocks, partials
// added in block order, so bits do not depend on the thread count.
void lowrank_rows(const LowRankRowsArgs& a, int num_threads) {
  auto fn = pick_isa(scalar::lowrank_rows_range, avx2::lowrank_rows_range,
                     avx512::lowrank_rows_range);
  parallel_sum_rows(a.n_rows, num_threads, 16, {{a.grad_out, a.grad_rank * a.cols}},
                    [&](int64_t b, int64_t e, float* acc) { fn(a, b, e, acc); });
}

}  // namespace pyengine
