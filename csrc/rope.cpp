// Dispatch + threading for RoPE; also its scalar build.
#define PYENGINE_ISA_NS scalar
#include "rope_impl.h"

#include "cpu_features.h"
#include "parallel.h"

namespace pyengine {
namespace {

constexpr int64_t kRowGrain = 256;  // rows (one head at one position) per task at least

using RangeFn = void (*)(const RopeArgs&, int64_t, int64_t);

void run(const RopeArgs& a, int num_threads, RangeFn scalar_fn, RangeFn avx2_fn,
         RangeFn avx512_fn) {
  RangeFn fn = pick_isa(scalar_fn, avx2_fn, avx512_fn);
  const int64_t rows = a.batch * a.seq * (a.q.heads + a.k.heads);
  parallel_for(rows, num_threads, kRowGrain, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

}  // namespace

void rope_forward(const RopeArgs& a, int num_threads) {
  run(a, num_threads, scalar::rope_forward_range, avx2::rope_forward_range,
      avx512::rope_forward_range);
}

void rope_backward(const RopeArgs& a, int num_threads) {
  run(a, num_threads, scalar::rope_backward_range, avx2::rope_backward_range,
      avx512::rope_backward_range);
}

}  // namespace pyengine
