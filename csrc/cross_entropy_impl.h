// Row kernel of cross_entropy.h, written once and compiled per ISA: each including TU
// defines PYENGINE_ISA_NS (scalar / avx2 / avx512) and its own compiler flags; the loops
// are `omp simd` reductions (-fopenmp-simd: vectorisation only, no OpenMP runtime).
#include <algorithm>
#include <vector>

#include "common.h"
#include "cross_entropy.h"

namespace pyengine {
namespace PYENGINE_ISA_NS {
namespace {


// Math type A is float for fp32/bf16/fp16 logits (vectorised exp below) and double for
// fp64 logits (libm; a precise path for gradcheck, not a fast one).
static inline float exp_a(float x) { return exp_approx(x); }
static inline double exp_a(double x) { return std::exp(x); }
// tanh via exp: tanh(x) = 1 - 2 / (exp(2x) + 1); saturates cleanly at +-1.
static inline float tanh_a(float x) { return 1.0f - 2.0f / (exp_approx(2.0f * x) + 1.0f); }
static inline double tanh_a(double x) { return std::tanh(x); }

// Fill z from one logits row; returns max, adds sum_j z_j to zsum.
template <typename A, typename LoadFn, typename T>
A load_row(const T* row, int64_t V, A cap, A* z, A& zsum, LoadFn ld) {
  A m = -INFINITY, zs = 0;
  if (cap > 0) {
    A inv = A(1) / cap;
#pragma omp simd reduction(max : m) reduction(+ : zs)
    for (int64_t j = 0; j < V; ++j) {
      A v = cap * tanh_a(ld(row, j) * inv);
      z[j] = v;
      m = std::max(m, v);
      zs += v;
    }
  } else {
#pragma omp simd reduction(max : m) reduction(+ : zs)
    for (int64_t j = 0; j < V; ++j) {
      A v = ld(row, j);
      z[j] = v;
      m = std::max(m, v);
      zs += v;
    }
  }
  zsum = zs;
  return m;
}

template <typename T, typename A, typename LoadFn, typename StoreFn>
void rows(const CeArgs& a, int64_t begin, int64_t end, LoadFn ld, StoreFn st) {
  const int64_t V = a.vocab;
  const A eps = a.label_smoothing, zl = a.z_loss, cap = a.softcap;
  // per-thread scratch (L2-resident): z = softcapped logits, e = exp(z - max)
  std::vector<A> zbuf(V), ebuf(V);
  A* z = zbuf.data();
  A* e = ebuf.data();
  A* loss = static_cast<A*>(a.loss);
  A* lse_out = static_cast<A*>(a.lse);
  for (int64_t i = begin; i < end; ++i) {
    T* row = static_cast<T*>(a.logits) + i * a.ld;
    const int64_t t = a.target[i];
    if (t == a.ignore_index) {
      loss[i] = 0;
      if (lse_out) lse_out[i] = 0;
      if (a.write_grad)
        for (int64_t j = 0; j < V; ++j) st(row, j, 0.f);
      continue;
    }
    A zsum;
    const A m = load_row<A>(row, V, cap, z, zsum, ld);
    A sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < V; ++j) {
      e[j] = exp_a(z[j] - m);
      sum += e[j];
    }
    const A lse = m + std::log(sum);
    loss[i] = (1 - eps) * (lse - z[t]) + eps * (lse - zsum / A(V)) + zl * lse * lse;
    if (lse_out) lse_out[i] = lse;
    if (!a.write_grad) continue;
    const A s = a.scale * (a.row_scale ? a.row_scale[i] : 1.0);
    const A pscale = s * (1 + 2 * zl * lse) / sum, off = s * eps / A(V);  // p_j = e_j / sum
    if (cap > 0) {
      const A inv_cap2 = 1 / (cap * cap);
#pragma omp simd
      for (int64_t j = 0; j < V; ++j)
        st(row, j, (pscale * e[j] - off) * (1 - z[j] * z[j] * inv_cap2));
      st(row, t, (pscale * e[t] - off - s * (1 - eps)) * (1 - z[t] * z[t] * inv_cap2));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) st(row, j, pscale * e[j] - off);
      st(row, t, pscale * e[t] - off - s * (1 - eps));  // the one-hot term
    }
  }
}

}  // namespace

void ce_rows_range(const CeArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case kF32:
      rows<float, float>(a, begin, end, [](const float* p, int64_t j) { return p[j]; },
                         [](float* p, int64_t j, float v) { p[j] = v; });
      break;
    case kF64:
      rows<double, double>(a, begin, end, [](const double* p, int64_t j) { return p[j]; },
                           [](double* p, int64_t j, double v) { p[j] = v; });
      break;
    case kBF16:
      rows<uint16_t, float>(a, begin, end, [](const uint16_t* p, int64_t j) { return bf16_to_f32(p[j]); },
                     [](uint16_t* p, int64_t j, float v) { p[j] = f32_to_bf16(v); });
      break;
    default:
      rows<uint16_t, float>(a, begin, end, [](const uint16_t* p, int64_t j) { return f16_to_f32(p[j]); },
                     [](uint16_t* p, int64_t j, float v) { p[j] = f32_to_f16(v); });
      break;
  }
}

void accumulate_range(float* acc, const void* src, int dtype, int64_t b, int64_t e) {
  if (dtype == kF32) {
    const float* s = static_cast<const float*>(src);
#pragma omp simd
    for (int64_t i = b; i < e; ++i) acc[i] += s[i];
  } else if (dtype == kBF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t i = b; i < e; ++i) acc[i] += bf16_to_f32(s[i]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = b; i < e; ++i) acc[i] += f16_to_f32(s[i]);
  }
}

namespace {
template <typename T, typename LoadFn>
void keep_cols(const T* g, int64_t rows, int64_t ld, float thr, int64_t j0, int64_t j1,
               uint8_t* keep, LoadFn ld_fn) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = g + i * ld;
#pragma omp simd
    for (int64_t j = j0; j < j1; ++j) keep[j] |= std::fabs(ld_fn(row, j)) > thr;
  }
}
}  // namespace

void keep_range(const void* grad, int dtype, int64_t rows, int64_t ld, double thr, int64_t j0,
                int64_t j1, uint8_t* keep) {
  switch (dtype) {
    case kF32:
      keep_cols(static_cast<const float*>(grad), rows, ld, float(thr), j0, j1, keep,
                [](const float* p, int64_t j) { return p[j]; });
      break;
    case kF64: {  // fp64 compared in fp64
      const double* g = static_cast<const double*>(grad);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = j0; j < j1; ++j) keep[j] |= std::fabs(g[i * ld + j]) > thr;
      break;
    }
    case kBF16:
      keep_cols(static_cast<const uint16_t*>(grad), rows, ld, float(thr), j0, j1, keep,
                [](const uint16_t* p, int64_t j) { return bf16_to_f32(p[j]); });
      break;
    default:
      keep_cols(static_cast<const uint16_t*>(grad), rows, ld, float(thr), j0, j1, keep,
                [](const uint16_t* p, int64_t j) { return f16_to_f32(p[j]); });
      break;
  }
}

}  // namespace PYENGINE_ISA_NS
}  // namespace pyengine
