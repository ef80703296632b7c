// Element loops of swiglu.h, written once and compiled per ISA: each including TU defines
// PYENGINE_ISA_NS (scalar / avx2 / avx512) and gets its own compiler flags; the loops are
// `omp simd` (-fopenmp-simd: vectorisation only, no OpenMP runtime).
#include <algorithm>
#include <vector>

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

constexpr int64_t kChunk = kTile;  // columns per register/L1 tile
constexpr int64_t kRowBlock = 8;   // rows sharing one L1 tile of the backward accumulators

template <typename D>
void lora_forward(const LoraSwigluArgs& a, int64_t begin, int64_t end) {
  using T = typename D::T;
  const int64_t I = a.inter, rgu = a.rg + a.ru;
  T* g = static_cast<T*>(a.g);
  T* u = static_cast<T*>(a.u);
  T* h = static_cast<T*>(a.h);
  float gv[kChunk], uv[kChunk], hv[kChunk];
  std::vector<float> ha(a.rd);
  for (int64_t n = begin; n < end; ++n) {
    const float* xa = a.xa + n * rgu;
    std::fill(ha.begin(), ha.end(), 0.f);
    for (int64_t j0 = 0; j0 < I; j0 += kChunk) {
      const int64_t len = std::min(kChunk, I - j0), off = n * I + j0;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        gv[j] = D::load(g, off + j);
        uv[j] = D::load(u, off + j);
      }
      add_rows(gv, xa, a.bg_t + j0, a.rg, I, len);
      add_rows(uv, xa + a.rg, a.bu_t + j0, a.ru, I, len);
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        hv[j] = gv[j] * sigmoid(gv[j]) * uv[j];
        D::store(g, off + j, gv[j]);
        D::store(u, off + j, uv[j]);
        D::store(h, off + j, hv[j]);
      }
      dot_rows(ha.data(), hv, a.a_down + j0, a.rd, I, len);
    }
    for (int64_t k = 0; k < a.rd; ++k) a.ha[n * a.rd + k] = a.scale * ha[k];
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
  // per row of the block: dh, dg, du, h of the current column tile (fp32)
  float dhv[kRowBlock][kChunk], dgv[kRowBlock][kChunk], duv[kRowBlock][kChunk],
      hv[kRowBlock][kChunk];
  std::vector<float> p(kRowBlock * rgu);
  for (int64_t n0 = begin; n0 < end; n0 += kRowBlock) {
    const int64_t n1 = std::min(end, n0 + kRowBlock), rows = n1 - n0;
    const float* pd = a.p_down + n0 * rd;
    const float* xa = a.xa + n0 * rgu;
    std::fill(p.begin(), p.end(), 0.f);
    for (int64_t j0 = 0; j0 < I; j0 += kChunk) {
      const int64_t len = std::min(kChunk, I - j0);
      for (int64_t b = 0; b < rows; ++b) {
        const int64_t off = (n0 + b) * I + j0;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) dhv[b][j] = D::load(dh, off + j);
      }
      add_rows_block(dhv[0], pd, rd, a.a_down + j0, rows, rd, I, len);
      for (int64_t b = 0; b < rows; ++b) {
        const int64_t off = (n0 + b) * I + j0;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          const float gj = D::load(g, off + j), uj = D::load(u, off + j);
          const float sg = sigmoid(gj), silu = gj * sg;
          dgv[b][j] = dhv[b][j] * uj * sg * (1.0f + gj * (1.0f - sg));
          duv[b][j] = dhv[b][j] * silu;
          hv[b][j] = silu * uj;
          D::store(dh, off + j, dgv[b][j]);
          D::store(du, off + j, duv[b][j]);
        }
      }
      dot_rows_block(p.data(), rgu, dgv[0], a.bg_t + j0, rows, rg, I, len);
      dot_rows_block(p.data() + rg, rgu, duv[0], a.bu_t + j0, rows, ru, I, len);
      // weight-gradient tiles: each accumulator row updated once per block of rows
      outer_add_block(acc_a_down + j0, pd, rd, hv[0], rows, rd, I, len);
      outer_add_block(acc_bg + j0, xa, rgu, dgv[0], rows, rg, I, len);
      outer_add_block(acc_bu + j0, xa + rg, rgu, duv[0], rows, ru, I, len);
    }
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < rgu; ++k) a.p_gu[n * rgu + k] = a.scale * p[(n - n0) * rgu + k];
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
