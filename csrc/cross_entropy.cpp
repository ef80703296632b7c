// Dispatch + threading for the cross-entropy row kernel; also its scalar build.
#define PYENGINE_ISA_NS scalar
#include "cross_entropy_impl.h"

#include <vector>

#include "cpu_features.h"
#include "parallel.h"

namespace pyengine {

void ce_rows(const CeArgs& a, int num_threads) {
  auto range = pick_isa(scalar::ce_rows_range, avx2::ce_rows_range, avx512::ce_rows_range);
  parallel_for(a.n_rows, num_threads, 1, [&](int64_t b, int64_t e) { range(a, b, e); });
}

void accumulate_f32(float* acc, const void* src, int src_dtype, int64_t n, int num_threads) {
  auto range = pick_isa(scalar::accumulate_range, avx2::accumulate_range, avx512::accumulate_range);
  parallel_for(n, num_threads, 1 << 16,
               [&](int64_t b, int64_t e) { range(acc, src, src_dtype, b, e); });
}

int64_t ce_keep_columns(const void* grad, int dtype, int64_t rows, int64_t vocab, int64_t ld,
                        const int64_t* target, int64_t ignore_index, double thr, int64_t* cols,
                        int num_threads) {
  auto range = pick_isa(scalar::keep_range, avx2::keep_range, avx512::keep_range);
  std::vector<uint8_t> keep(vocab, 0);
  // column ranges of 1024: each thread streams its columns over all rows (L1-sized strips)
  parallel_for(vocab, num_threads, 1024, [&](int64_t b, int64_t e) {
    range(grad, dtype, rows, ld, thr, b, e, keep.data());
  });
  for (int64_t i = 0; i < rows; ++i)
    if (target[i] != ignore_index) keep[target[i]] = 1;
  int64_t k = 0;
  for (int64_t j = 0; j < vocab; ++j)
    if (keep[j]) cols[k++] = j;
  return k;
}

void accumulate_rows_f32(float* acc, const int64_t* idx, const void* src, int src_dtype,
                         int64_t k, int64_t n, int num_threads) {
  auto range = pick_isa(scalar::accumulate_range, avx2::accumulate_range, avx512::accumulate_range);
  const int64_t elem = src_dtype == kF32 ? 4 : 2;
  parallel_for(k, num_threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)  // row r of src onto row idx[r] of acc
      range(acc + idx[r] * n, static_cast<const char*>(src) + r * n * elem, src_dtype, 0, n);
  });
}

}  // namespace pyengine
