// Dispatch + threading for the SwiGLU element kernels; also their scalar build.
#define PYENGINE_ISA_NS scalar
#include "swiglu_impl.h"

#include "cpu_features.h"
#include "parallel.h"

namespace pyengine {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per task at least: ~64 KB of fp32 traffic

constexpr int64_t kRowGrain = 8;     // rows per task at least (LoRA variants)

using RangeFn = void (*)(const SwigluArgs&, int64_t, int64_t);

void run(const SwigluArgs& a, int num_threads, RangeFn scalar_fn, RangeFn avx2_fn,
         RangeFn avx512_fn) {
  RangeFn fn = pick_isa(scalar_fn, avx2_fn, avx512_fn);
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

void lora_swiglu_forward(const LoraSwigluArgs& a, int num_threads) {
  auto fn = pick_isa(scalar::lora_swiglu_forward_range, avx2::lora_swiglu_forward_range,
                     avx512::lora_swiglu_forward_range);
  parallel_for(a.n_rows, num_threads, kRowGrain, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

// The weight gradients are a deterministic row reduction (parallel_sum_rows): fixed row
// blocks, partials added in block order, so bits do not depend on the thread count.
void lora_swiglu_backward(const LoraSwigluArgs& a, int num_threads) {
  auto fn = pick_isa(scalar::lora_swiglu_backward_range, avx2::lora_swiglu_backward_range,
                     avx512::lora_swiglu_backward_range);
  const int64_t I = a.inter;
  parallel_sum_rows(a.n_rows, num_threads, kRowGrain,
                    {{a.d_a_down, a.rd * I}, {a.d_bg_t, a.rg * I}, {a.d_bu_t, a.ru * I}},
                    [&](int64_t b, int64_t e, float* acc) { fn(a, b, e, acc); });
}

}  // namespace pyengine
