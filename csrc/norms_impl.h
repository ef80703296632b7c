// Row loops of norms.h, written once and compiled per ISA (see swiglu_impl.h): each
// including TU defines PYENGINE_ISA_NS; loops are `omp simd` (vectorisation only).
#include <cmath>
#include <vector>

#include "common.h"
#include "lowrank_tiles.h"
#include "norms.h"

namespace pyengine {
namespace PYENGINE_ISA_NS {
namespace {

// v rounded to D's dtype and back (identity for fp32)
template <typename D>
static inline float round_to(float v) {
  typename D::T t;
  D::store(&t, 0, v);
  return D::load(&t, 0);
}

// buf = x (+ residual) of row r in fp32; s written when there is a residual
template <typename D>
static inline void load_row(const NormArgs& a, int64_t r, float* buf) {
  using T = typename D::T;
  const int64_t C = a.cols, off = r * C;
  const T* x = static_cast<const T*>(a.x);
  if (a.residual) {
    const T* res = static_cast<const T*>(a.residual);
    T* s = static_cast<T*>(a.s);
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) {
      const float v = D::load(x, off + j) + D::load(res, off + j);
      D::store(s, off + j, v);
      buf[j] = D::load(s, off + j);  // the rounded sum: what backward will read
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) buf[j] = D::load(x, off + j);
  }
}

template <typename D>
void rms_forward(const NormArgs& a, int64_t begin, int64_t end) {
  using T = typename D::T;
  const int64_t C = a.cols;
  const T* w = static_cast<const T*>(a.weight);
  T* y = static_cast<T*>(a.y);
  std::vector<float> buf(C);
  for (int64_t r = begin; r < end; ++r) {
    load_row<D>(a, r, buf.data());
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < C; ++j) ss += buf[j] * buf[j];
    const float rstd = 1.0f / std::sqrt(ss / float(C) + a.eps);
    a.rstd[r] = rstd;
#pragma omp simd
    for (int64_t j = 0; j < C; ++j)
      D::store(y, r * C + j, D::load(w, j) * round_to<D>(buf[j] * rstd));
  }
}

template <typename D, bool kAcc>
void rms_backward(const NormArgs& a, int64_t begin, int64_t end, float* acc) {
  using T = typename D::T;
  const int64_t C = a.cols;
  const T* w = static_cast<const T*>(a.weight);
  const T* s = static_cast<const T*>(a.s);
  const T* dy = static_cast<const T*>(a.dy);
  const T* ds = static_cast<const T*>(a.ds);
  T* dx = static_cast<T*>(a.dx);
  std::vector<float> n(C), dn(C);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t off = r * C;
    const float rstd = a.rstd[r];
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < C; ++j) {
      const float nj = D::load(s, off + j) * rstd, dyj = D::load(dy, off + j);
      n[j] = nj;
      dn[j] = dyj * D::load(w, j);
      if (kAcc) acc[j] += dyj * round_to<D>(nj);
      dot += dn[j] * nj;
    }
    const float c = dot / float(C);
    if (ds) {
#pragma omp simd
      for (int64_t j = 0; j < C; ++j)
        D::store(dx, off + j, rstd * (dn[j] - n[j] * c) + D::load(ds, off + j));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) D::store(dx, off + j, rstd * (dn[j] - n[j] * c));
    }
  }
}

template <typename D>
void ln_forward(const NormArgs& a, int64_t begin, int64_t end) {
  using T = typename D::T;
  const int64_t C = a.cols;
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  std::vector<float> buf(C);
  for (int64_t r = begin; r < end; ++r) {
    load_row<D>(a, r, buf.data());
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < C; ++j) sum += buf[j];
    const float mean = sum / float(C);
    float var = 0.f;  // two-pass: stable for rows far from zero mean
#pragma omp simd reduction(+ : var)
    for (int64_t j = 0; j < C; ++j) var += (buf[j] - mean) * (buf[j] - mean);
    const float rstd = 1.0f / std::sqrt(var / float(C) + a.eps);
    a.mean[r] = mean;
    a.rstd[r] = rstd;
#pragma omp simd
    for (int64_t j = 0; j < C; ++j)
      D::store(y, r * C + j, (buf[j] - mean) * rstd * D::load(w, j) + D::load(b, j));
  }
}

template <typename D, bool kAcc>
void ln_backward(const NormArgs& a, int64_t begin, int64_t end, float* acc) {
  using T = typename D::T;
  const int64_t C = a.cols;
  const T* w = static_cast<const T*>(a.weight);
  const T* s = static_cast<const T*>(a.s);
  const T* dy = static_cast<const T*>(a.dy);
  const T* ds = static_cast<const T*>(a.ds);
  T* dx = static_cast<T*>(a.dx);
  float* acc_w = acc;
  float* acc_b = kAcc ? acc + C : nullptr;
  std::vector<float> xh(C), g(C);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t off = r * C;
    const float mean = a.mean[r], rstd = a.rstd[r];
    float sum_g = 0.f, dot = 0.f;
#pragma omp simd reduction(+ : sum_g, dot)
    for (int64_t j = 0; j < C; ++j) {
      const float xj = (D::load(s, off + j) - mean) * rstd, dyj = D::load(dy, off + j);
      xh[j] = xj;
      g[j] = dyj * D::load(w, j);
      if (kAcc) {
        acc_w[j] += dyj * xj;
        acc_b[j] += dyj;
      }
      sum_g += g[j];
      dot += g[j] * xj;
    }
    const float c1 = sum_g / float(C), c2 = dot / float(C);
    if (ds) {
#pragma omp simd
      for (int64_t j = 0; j < C; ++j)
        D::store(dx, off + j, rstd * (g[j] - c1 - xh[j] * c2) + D::load(ds, off + j));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) D::store(dx, off + j, rstd * (g[j] - c1 - xh[j] * c2));
    }
  }
}

// fn(D{}) for the element type of `dtype`
template <typename Fn>
static inline void by_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case kF32: fn(F32{}); break;
    case kBF16: fn(BF16{}); break;
    default: fn(F16{}); break;
  }
}

}  // namespace

void rms_norm_forward_range(const NormArgs& a, int64_t begin, int64_t end) {
  by_dtype(a.dtype, [&](auto d) { rms_forward<decltype(d)>(a, begin, end); });
}

// acc == nullptr: the weight gradients are not wanted (a frozen norm), only dx
void rms_norm_backward_range(const NormArgs& a, int64_t begin, int64_t end, float* acc) {
  by_dtype(a.dtype, [&](auto d) {
    if (acc) rms_backward<decltype(d), true>(a, begin, end, acc);
    else rms_backward<decltype(d), false>(a, begin, end, acc);
  });
}

void layer_norm_forward_range(const NormArgs& a, int64_t begin, int64_t end) {
  by_dtype(a.dtype, [&](auto d) { ln_forward<decltype(d)>(a, begin, end); });
}

void layer_norm_backward_range(const NormArgs& a, int64_t begin, int64_t end, float* acc) {
  by_dtype(a.dtype, [&](auto d) {
    if (acc) ln_backward<decltype(d), true>(a, begin, end, acc);
    else ln_backward<decltype(d), false>(a, begin, end, acc);
  });
}

}  // namespace PYENGINE_ISA_NS
}  // namespace pyengine
