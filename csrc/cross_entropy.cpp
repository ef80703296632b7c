// Dispatch + threading for the cross-entropy row kernel; also its scalar build.
#define PYENGINE_ISA_NS scalar
#include "cross_entropy_impl.h"

#include "cpu_features.h"
#include "parallel.h"

namespace pyengine {

void ce_rows(const CeArgs& a, int num_threads) {
  auto range = scalar::ce_rows_range;
  switch (active_isa()) {
    case Isa::kAvx512: range = avx512::ce_rows_range; break;
    case Isa::kAvx2: range = avx2::ce_rows_range; break;
    default: break;
  }
  parallel_for(a.n_rows, num_threads, 1, [&](int64_t b, int64_t e) { range(a, b, e); });
}

}  // namespace pyengine
