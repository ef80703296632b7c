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


// tanh via exp: tanh(x) = 1 - 2 / (exp(2x) + 1); saturates cleanly at +-1.
static inline float tanh_approx(float x) { return 1.0f - 2.0f / (exp_approx(2.0f * x) + 1.0f); }

// Fill z (fp32) from one logits row; returns max.
template <typename LoadFn, typename T>
float load_row(const T* row, int64_t V, float cap, float* z, LoadFn ld) {
  float m = -INFINITY;
  if (cap > 0.f) {
    float inv = 1.0f / cap;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < V; ++j) {
      float v = cap * tanh_approx(ld(row, j) * inv);
      z[j] = v;
      m = std::max(m, v);
    }
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < V; ++j) {
      float v = ld(row, j);
      z[j] = v;
      m = std::max(m, v);
    }
  }
  return m;
}

template <typename T, typename LoadFn, typename StoreFn>
void rows(const CeArgs& a, int64_t begin, int64_t end, LoadFn ld, StoreFn st) {
  const int64_t V = a.vocab;
  const float eps = a.label_smoothing, zl = a.z_loss, cap = a.softcap;
  std::vector<float> zbuf(V);
  float* z = zbuf.data();
  for (int64_t i = begin; i < end; ++i) {
    T* row = static_cast<T*>(a.logits) + i * a.ld;
    const int64_t t = a.target[i];
    if (t == a.ignore_index) {
      a.loss[i] = 0.f;
      if (a.lse) a.lse[i] = 0.f;
      if (a.write_grad)
        for (int64_t j = 0; j < V; ++j) st(row, j, 0.f);
      continue;
    }
    const float m = load_row(row, V, cap, z, ld);
    float sum = 0.f, zsum = 0.f;
#pragma omp simd reduction(+ : sum, zsum)
    for (int64_t j = 0; j < V; ++j) {
      sum += exp_approx(z[j] - m);
      zsum += z[j];
    }
    const float lse = m + std::log(sum);
    a.loss[i] = (1.f - eps) * (lse - z[t]) + eps * (lse - zsum / float(V)) + zl * lse * lse;
    if (a.lse) a.lse[i] = lse;
    if (!a.write_grad) continue;
    const float s = a.scale * (a.row_scale ? a.row_scale[i] : 1.f);
    const float pscale = s * (1.f + 2.f * zl * lse), off = s * eps / float(V);
    const float inv_cap2 = cap > 0.f ? 1.f / (cap * cap) : 0.f;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      float g = pscale * exp_approx(z[j] - lse) - off;
      st(row, j, cap > 0.f ? g * (1.f - z[j] * z[j] * inv_cap2) : g);
    }
    // the one-hot term, applied after the vector loop
    float gt = pscale * exp_approx(z[t] - lse) - off - s * (1.f - eps);
    st(row, t, cap > 0.f ? gt * (1.f - z[t] * z[t] * inv_cap2) : gt);
  }
}

}  // namespace

void ce_rows_range(const CeArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case kF32:
      rows<float>(a, begin, end, [](const float* p, int64_t j) { return p[j]; },
                  [](float* p, int64_t j, float v) { p[j] = v; });
      break;
    case kBF16:
      rows<uint16_t>(a, begin, end, [](const uint16_t* p, int64_t j) { return bf16_to_f32(p[j]); },
                     [](uint16_t* p, int64_t j, float v) { p[j] = f32_to_bf16(v); });
      break;
    default:
      rows<uint16_t>(a, begin, end, [](const uint16_t* p, int64_t j) { return f16_to_f32(p[j]); },
                     [](uint16_t* p, int64_t j, float v) { p[j] = f32_to_f16(v); });
      break;
  }
}

}  // namespace PYENGINE_ISA_NS
}  // namespace pyengine
