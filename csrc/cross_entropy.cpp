// Dispatch + threading for the cross-entropy row kernel; also its scalar build.
#define PYENGINE_ISA_NS scalar
#include "cross_entropy_impl.h"

#include "cpu_features.h"
#include "parallel.h"

namespace pyengine {

template <typename Fn>
static Fn pick(Fn scalar_fn, Fn avx2_fn, Fn avx512_fn) {
  switch (active_isa()) {
    case Isa::kAvx512: return avx512_fn;
    case Isa::kAvx2: return avx2_fn;
    default: return scalar_fn;
  }
}

void ce_rows(const CeArgs& a, int num_threads) {
  auto range = pick(scalar::ce_rows_range, avx2::ce_rows_range, avx512::ce_rows_range);
  parallel_for(a.n_rows, num_threads, 1, [&](int64_t b, int64_t e) { range(a, b, e); });
}

void accumulate_f32(float* acc, const void* src, int src_dtype, int64_t n, int num_threads) {
  auto range = pick(scalar::accumulate_range, avx2::accumulate_range, avx512::accumulate_range);
  parallel_for(n, num_threads, 1 << 16,
               [&](int64_t b, int64_t e) { range(acc, src, src_dtype, b, e); });
}

}  // namespace pyengine
