// Dispatch + threading for the SwiGLU element kernels; also their scalar build.
#define PYENGINE_ISA_NS scalar
#include "swiglu_impl.h"

#include "cpu_features.h"
#include "parallel.h"

namespace pyengine {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per task at least: ~64 KB of fp32 traffic

using RangeFn = void (*)(const SwigluArgs&, int64_t, int64_t);

void run(const SwigluArgs& a, int num_threads, RangeFn scalar_fn, RangeFn avx2_fn,
         RangeFn avx512_fn) {
  RangeFn fn = scalar_fn;
  switch (active_isa()) {
    case Isa::kAvx512: fn = avx512_fn; break;
    case Isa::kAvx2: fn = avx2_fn; break;
    default: break;
  }
  parallel_for(a.n, num_threads, kGrain, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

}  // namespace

void swiglu_forward(const SwigluArgs& a, int num_threads) {
  run(a, num_threads, scalar::swiglu_forward_range, avx2::swiglu_forward_range,
      avx512::swiglu_forward_range);
}

void swiglu_backward(const SwigluArgs& a, int num_threads) {
  run(a, num_threads, scalar::swiglu_backward_range, avx2::swiglu_backward_range,
      avx512::swiglu_backward_range);
}

}  // namespace pyengine
