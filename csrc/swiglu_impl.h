// Element loops of swiglu.h, written once and compiled per ISA: each including TU defines
// PYENGINE_ISA_NS (scalar / avx2 / avx512) and gets its own compiler flags; the loops are
// `omp simd` (-fopenmp-simd: vectorisation only, no OpenMP runtime).
#include "common.h"
#include "swiglu.h"

namespace pyengine {
namespace PYENGINE_ISA_NS {
namespace {

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

struct F32 {
  using T = float;
  static float load(const T* p, int64_t i) { return p[i]; }
  static void store(T* p, int64_t i, float v) { p[i] = v; }
};
struct BF16 {
  using T = uint16_t;
  static float load(const T* p, int64_t i) { return bf16_to_f32(p[i]); }
  static void store(T* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
};
struct F16 {
  using T = uint16_t;
  static float load(const T* p, int64_t i) { return f16_to_f32(p[i]); }
  static void store(T* p, int64_t i, float v) { p[i] = f32_to_f16(v); }
};

template <typename D>
void forward(const SwigluArgs& a, int64_t begin, int64_t end) {
  using T = typename D::T;
  const T* g = static_cast<const T*>(a.g);
  const T* u = static_cast<const T*>(a.u);
  T* h = static_cast<T*>(a.h);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float gv = D::load(g, i);
    D::store(h, i, gv * sigmoid(gv) * D::load(u, i));
  }
}

template <typename D, bool kWriteH>
void backward(const SwigluArgs& a, int64_t begin, int64_t end) {
  using T = typename D::T;
  const T* g = static_cast<const T*>(a.g);
  const T* u = static_cast<const T*>(a.u);
  const T* dh = static_cast<const T*>(a.dh);
  T* dg = static_cast<T*>(a.dg);
  T* du = static_cast<T*>(a.du);
  T* h = static_cast<T*>(a.h);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float gv = D::load(g, i), uv = D::load(u, i), dhv = D::load(dh, i);
    const float s = sigmoid(gv), silu = gv * s;
    D::store(du, i, dhv * silu);
    D::store(dg, i, dhv * uv * s * (1.0f + gv * (1.0f - s)));
    if (kWriteH) D::store(h, i, silu * uv);
  }
}

template <typename D>
void backward_dispatch(const SwigluArgs& a, int64_t begin, int64_t end) {
  if (a.h) backward<D, true>(a, begin, end);
  else backward<D, false>(a, begin, end);
}

}  // namespace

void swiglu_forward_range(const SwigluArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case kF32: forward<F32>(a, begin, end); break;
    case kBF16: forward<BF16>(a, begin, end); break;
    default: forward<F16>(a, begin, end); break;
  }
}

void swiglu_backward_range(const SwigluArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case kF32: backward_dispatch<F32>(a, begin, end); break;
    case kBF16: backward_dispatch<BF16>(a, begin, end); break;
    default: backward_dispatch<F16>(a, begin, end); break;
  }
}

}  // namespace PYENGINE_ISA_NS
}  // namespace pyengine
