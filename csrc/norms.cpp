// Dispatch + threading for the row normalisations; also their scalar build.
#define PYENGINE_ISA_NS scalar
#include "norms_impl.h"

#include "cpu_features.h"
#include "parallel.h"

namespace pyengine {
namespace {

constexpr int64_t kRowGrain = 16;  // rows per task at least

using FwdFn = void (*)(const NormArgs&, int64_t, int64_t);
using BwdFn = void (*)(const NormArgs&, int64_t, int64_t, float*);

void forward(const NormArgs& a, int num_threads, FwdFn fn) {
  parallel_for(a.rows, num_threads, kRowGrain, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

// dweight (and dbias) are a deterministic row reduction (parallel_sum_rows): fixed row
// blocks, partials added in block order, so bits do not depend on the thread count.
// Without dweight (a frozen norm) only dx is computed, rows in parallel.
void backward(const NormArgs& a, int num_threads, BwdFn fn) {
  if (!a.dweight) {
    parallel_for(a.rows, num_threads, kRowGrain,
                 [&](int64_t b, int64_t e) { fn(a, b, e, nullptr); });
    return;
  }
  std::vector<SumOut> outs{{a.dweight, a.cols}};
  if (a.dbias) outs.push_back({a.dbias, a.cols});
  parallel_sum_rows(a.rows, num_threads, kRowGrain, outs,
                    [&](int64_t b, int64_t e, float* acc) { fn(a, b, e, acc); });
}

}  // namespace

void rms_norm_forward(const NormArgs& a, int num_threads) {
  forward(a, num_threads, pick_isa(scalar::rms_norm_forward_range, avx2::rms_norm_forward_range,
                                   avx512::rms_norm_forward_range));
}

void rms_norm_backward(const NormArgs& a, int num_threads) {
  backward(a, num_threads, pick_isa(scalar::rms_norm_backward_range, avx2::rms_norm_backward_range,
                                    avx512::rms_norm_backward_range));
}

void layer_norm_forward(const NormArgs& a, int num_threads) {
  forward(a, num_threads, pick_isa(scalar::layer_norm_forward_range, avx2::layer_norm_forward_range,
                                   avx512::layer_norm_forward_range));
}

void layer_norm_backward(const NormArgs& a, int num_threads) {
  backward(a, num_threads, pick_isa(scalar::layer_norm_backward_range,
                                    avx2::layer_norm_backward_range,
                                    avx512::layer_norm_backward_range));
}

}  // namespace pyengine
