// Element loops of swiglu.h, written once and compiled per ISA: each including TU defines
// PYENGINE_ISA_NS (scalar / avx2 / avx512) and gets its own compiler flags; the loops are
// `omp simd` (-fopenmp-simd: vectorisation only, no OpenMP runtime).
#include <algorithm>

#include "common.h"
#include "lowrank_tiles.h"
#include "swiglu.h"

namespace pyengine {
namespace PYENGINE_ISA_NS {
namespace {

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

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

// LoRA variants: rows in blocks of kRowBlock, columns in chunks of kChunk; a chunk's fp32
// values (pre-activations, gradients, h) live in a stack scratch (L1/L2) and feed the
// low-rank engine's micro-kernels (lowrank_tiles.h), so no [N, I] fp32 temporary is made.
constexpr int64_t kRowBlock = 8;
constexpr int64_t kChunk = 256;

template <typename D>
void lora_forward(const LoraSwigluArgs& a, int64_t begin, int64_t end) {
  using T = typename D::T;
  const int64_t I = a.inter, rgu = a.rg + a.ru;
  T* g = static_cast<T*>(a.g);
  T* u = static_cast<T*>(a.u);
  T* h = static_cast<T*>(a.h);
  alignas(64) float gv[kRowBlock * kChunk], uv[kRowBlock * kChunk], hv[kRowBlock * kChunk];
  for (int64_t n0 = begin; n0 < end; n0 += kRowBlock) {
    const int64_t n = std::min(end - n0, kRowBlock);
    const float* xa = a.xa + n0 * rgu;
    std::fill(a.ha + n0 * a.rd, a.ha + (n0 + n) * a.rd, 0.f);
    for (int64_t c0 = 0; c0 < I; c0 += kChunk) {
      const int64_t len = std::min(kChunk, I - c0);
      for (int64_t b = 0; b < n; ++b) {
        const int64_t off = (n0 + b) * I + c0;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          gv[b * kChunk + j] = D::load(g, off + j);
          uv[b * kChunk + j] = D::load(u, off + j);
        }
      }
      lowrank::add<F32>(gv, kChunk, nullptr, n, len, xa, rgu, a.rg, a.bg_t + c0, I, 1.f);
      lowrank::add<F32>(uv, kChunk, nullptr, n, len, xa + a.rg, rgu, a.ru, a.bu_t + c0, I, 1.f);
      for (int64_t b = 0; b < n; ++b) {
        const int64_t off = (n0 + b) * I + c0;
        float* gb = gv + b * kChunk;
        float* ub = uv + b * kChunk;
        float* hb = hv + b * kChunk;
        // two loops: fused with the stores, gcc's avx512 code raised denormal-operand /
        // underflow assists (10x slower; seen with MXCSR flags, gone with FTZ/DAZ)
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) hb[j] = gb[j] * sigmoid(gb[j]) * ub[j];
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          D::store(g, off + j, gb[j]);
          D::store(u, off + j, ub[j]);
          D::store(h, off + j, hb[j]);
        }
      }
      lowrank::proj<F32>(hv, kChunk, nullptr, n, len, a.a_down + c0, I, a.rd, a.scale,
                         a.ha + n0 * a.rd, a.rd);
    }
  }
}

template <typename D>
void lora_backward(const LoraSwigluArgs& a, int64_t begin, int64_t end, float* acc) {
  using T = typename D::T;
  const int64_t I = a.inter, rg = a.rg, ru = a.ru, rd = a.rd, rgu = rg + ru;
  const T* g = static_cast<const T*>(a.g);
  const T* u = static_cast<const T*>(a.u);
  T* dh = static_cast<T*>(a.dh);
  T* du = static_cast<T*>(a.du);
  float* acc_a_down = acc;
  float* acc_bg = acc + rd * I;
  float* acc_bu = acc_bg + rg * I;
  // a chunk of the block's rows: dh then dg (in place), du, h (fp32)
  alignas(64) float dgv[kRowBlock * kChunk], duv[kRowBlock * kChunk], hv[kRowBlock * kChunk];
  for (int64_t n0 = begin; n0 < end; n0 += kRowBlock) {
    const int64_t n = std::min(end - n0, kRowBlock);
    const float* pd = a.p_down + n0 * rd;
    const float* xa = a.xa + n0 * rgu;
    float* p_gu = a.p_gu + n0 * rgu;
    std::fill(p_gu, p_gu + n * rgu, 0.f);
    for (int64_t c0 = 0; c0 < I; c0 += kChunk) {
      const int64_t len = std::min(kChunk, I - c0);
      for (int64_t b = 0; b < n; ++b) {
        const int64_t off = (n0 + b) * I + c0;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) dgv[b * kChunk + j] = D::load(dh, off + j);
      }
      lowrank::add<F32>(dgv, kChunk, nullptr, n, len, pd, rd, rd, a.a_down + c0, I, 1.f);
      for (int64_t b = 0; b < n; ++b) {
        const int64_t off = (n0 + b) * I + c0;
        float* gb = dgv + b * kChunk;
        float* ub = duv + b * kChunk;
        float* hb = hv + b * kChunk;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          const float gj = D::load(g, off + j), uj = D::load(u, off + j), dhj = gb[j];
          const float sg = sigmoid(gj), silu = gj * sg;
          gb[j] = dhj * uj * sg * (1.0f + gj * (1.0f - sg));
          ub[j] = dhj * silu;
          hb[j] = silu * uj;
          D::store(dh, off + j, gb[j]);
          D::store(du, off + j, ub[j]);
        }
      }
      lowrank::proj<F32>(dgv, kChunk, nullptr, n, len, a.bg_t + c0, I, rg, a.scale, p_gu, rgu);
      lowrank::proj<F32>(duv, kChunk, nullptr, n, len, a.bu_t + c0, I, ru, a.scale, p_gu + rg,
                         rgu);
      lowrank::grad<F32>(hv, kChunk, nullptr, n, len, pd, rd, rd, acc_a_down + c0, I);
      lowrank::grad<F32>(dgv, kChunk, nullptr, n, len, xa, rgu, rg, acc_bg + c0, I);
      lowrank::grad<F32>(duv, kChunk, nullptr, n, len, xa + rg, rgu, ru, acc_bu + c0, I);
    }
  }
}

}  // namespace

void lora_swiglu_forward_range(const LoraSwigluArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case kF32: lora_forward<F32>(a, begin, end); break;
    case kBF16: lora_forward<BF16>(a, begin, end); break;
    default: lora_forward<F16>(a, begin, end); break;
  }
}

void lora_swiglu_backward_range(const LoraSwigluArgs& a, int64_t begin, int64_t end,
                                float* acc) {
  switch (a.dtype) {
    case kF32: lora_backward<F32>(a, begin, end, acc); break;
    case kBF16: lora_backward<BF16>(a, begin, end, acc); break;
    default: lora_backward<F16>(a, begin, end, acc); break;
  }
}

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
