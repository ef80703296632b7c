// Dispatch + threading for the quantized matmul; also its scalar build.
#define PYENGINE_ISA_NS scalar
#include "quant_impl.h"

#include <atomic>
#include <cstdlib>
#include <memory>

#include "cpu_features.h"
#include "parallel.h"

namespace pyengine {
namespace {

struct Kernels {
  decltype(&scalar::quantize_act_rows) quantize;
  decltype(&scalar::matmul_rows) matmul;
  decltype(&scalar::dequantize_rows) dequantize;
};

Kernels kernels() {
  switch (active_isa()) {
    case Isa::kAvx512:
      return {avx512::quantize_act_rows, avx512::matmul_rows, avx512::dequantize_rows};
    case Isa::kAvx2: return {avx2::quantize_act_rows, avx2::matmul_rows, avx2::dequantize_rows};
    default: return {scalar::quantize_act_rows, scalar::matmul_rows, scalar::dequantize_rows};
  }
}

struct FreeDeleter {
  void operator()(uint8_t* p) const { std::free(p); }
};

}  // namespace

int64_t quant_act_row_bytes(int fmt, int64_t k) {
  const scalar::Layout L = scalar::layout_of(fmt);
  return scalar::n_groups(L, k) * L.group_bytes();
}

void quant_quantize_activations(int fmt, const void* x, int x_dtype, int64_t m, int64_t k,
                                uint8_t* act, int num_threads) {
  auto quantize = kernels().quantize;
  parallel_for(m, num_threads, 4,
               [&](int64_t b, int64_t e) { quantize(fmt, x, x_dtype, k, b, e, act); });
}

void quant_matmul_act(const QuantWeights& w, const uint8_t* act, int64_t m, const float* bias,
                      void* y, int y_dtype, int num_threads) {
  auto matmul = kernels().matmul;
  // Threads take chunks of rows from a shared counter instead of fixed halves, so on a
  // shared machine a descheduled thread does not hold up the others.
  const int64_t chunk = 64, n_chunks = (w.n + chunk - 1) / chunk;
  const int n_tasks = int(std::min<int64_t>(std::max(num_threads, 1), n_chunks));
  std::atomic<int64_t> next{0};
  parallel_for(n_tasks, n_tasks, 1, [&](int64_t, int64_t) {
    for (int64_t r0; (r0 = next.fetch_add(chunk)) < w.n;)
      matmul(w, act, m, r0, std::min(w.n, r0 + chunk), bias, y, y_dtype);
  });
}

void quant_matmul(const QuantWeights& w, const void* x, int x_dtype, int64_t m,
                  const float* bias, void* y, int num_threads) {
  const int64_t row_bytes = quant_act_row_bytes(w.fmt, w.k);
  const size_t bytes = size_t(((m * row_bytes + 63) / 64) * 64);
  std::unique_ptr<uint8_t, FreeDeleter> act(static_cast<uint8_t*>(std::aligned_alloc(64, bytes)));
  quant_quantize_activations(w.fmt, x, x_dtype, m, w.k, act.get(), num_threads);
  quant_matmul_act(w, act.get(), m, bias, y, x_dtype, num_threads);
}

void quant_dequantize(const QuantWeights& w, int64_t row_begin, int64_t row_end, void* out,
                      int out_dtype, int num_threads) {
  auto dequantize = kernels().dequantize;
  const int64_t row_bytes = w.k * (out_dtype == kF32 ? 4 : 2);
  parallel_for(row_end - row_begin, num_threads, 16, [&](int64_t b, int64_t e) {
    dequantize(w, row_begin + b, row_begin + e, static_cast<uint8_t*>(out) + b * row_bytes,
               out_dtype);
  });
}

}  // namespace pyengine
