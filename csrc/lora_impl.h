// Kernels of lora.h, written once and compiled per ISA: each including TU defines
// PYENGINE_ISA_NS (scalar / avx2 / avx512) and gets its own compiler flags.  The loops are
// fixed-size `omp simd` blocks (-fopenmp-simd: vectorisation only, no OpenMP runtime) whose
// accumulators the compiler keeps in vector registers: 4 rows x 64 columns for up_add and
// outer, 4 rows x 2 ranks for down.
#include <algorithm>
#include <vector>

#include "common.h"
#include "lora.h"

namespace pyengine {
namespace PYENGINE_ISA_NS {
namespace {

constexpr int kRows = 4;   // rows of x / out per block
constexpr int kCols = 64;  // columns per register block

struct F32 {
  using T = float;
  static float load(const float* p, int64_t j) { return p[j]; }
  static void store(float* p, int64_t j, float v) { p[j] = v; }
};
struct BF16 {
  using T = uint16_t;
  static float load(const uint16_t* p, int64_t j) { return bf16_to_f32(p[j]); }
  static void store(uint16_t* p, int64_t j, float v) { p[j] = f32_to_bf16(v); }
};

// Row i of x as fp32 (times the keep-mask) into dst[0, len).
template <typename D>
inline void load_row(const typename D::T* x, const uint8_t* mask, int64_t len, float* dst) {
  if (mask) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) dst[j] = mask[j] ? D::load(x, j) : 0.f;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) dst[j] = D::load(x, j);
  }
}

template <typename D>
void down(const LoraDownArgs& a, int64_t begin, int64_t end) {
  const int64_t K = a.k, R = a.r;
  std::vector<float> buf(kRows * K, 0.f);
  const auto* x = static_cast<const typename D::T*>(a.x);
  for (int64_t n0 = begin; n0 < end; n0 += kRows) {
    const int64_t rb = std::min<int64_t>(kRows, end - n0);
    for (int64_t i = 0; i < rb; ++i)
      load_row<D>(x + (n0 + i) * K, a.mask ? a.mask + (n0 + i) * K : nullptr, K, &buf[i * K]);
    const float *b0 = &buf[0], *b1 = &buf[K], *b2 = &buf[2 * K], *b3 = &buf[3 * K];
    for (int64_t k = 0; k < R; k += 2) {
      const float* w0 = a.w + k * K;
      const float* w1 = k + 1 < R ? w0 + K : w0;  // odd r: last rank computed twice
      float s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13)
      for (int64_t j = 0; j < K; ++j) {
        const float p = w0[j], q = w1[j];
        s00 += p * b0[j]; s01 += p * b1[j]; s02 += p * b2[j]; s03 += p * b3[j];
        s10 += q * b0[j]; s11 += q * b1[j]; s12 += q * b2[j]; s13 += q * b3[j];
      }
      const float s0[kRows] = {s00, s01, s02, s03}, s1[kRows] = {s10, s11, s12, s13};
      for (int64_t i = 0; i < rb; ++i) {
        a.u[(n0 + i) * R + k] = a.keep * s0[i];
        if (k + 1 < R) a.u[(n0 + i) * R + k + 1] = a.keep * s1[i];
      }
    }
  }
}

// out[n0 + i, j0 : j0 + len] += alpha * (u @ w)[...] * mask, for i < rb.
template <typename D, int kLen>
inline void up_add_block(const LoraUpAddArgs& a, int64_t n0, int64_t rb, int64_t j0,
                         int64_t dyn_len) {
  const int64_t len = kLen ? kLen : dyn_len;
  float acc[kRows][kCols] = {};
  float coef[kRows];
  for (int64_t k = 0; k < a.r; ++k) {
    for (int i = 0; i < kRows; ++i) coef[i] = i < rb ? a.alpha * a.u[(n0 + i) * a.r + k] : 0.f;
    const float* wk = a.w + k * a.m + j0;
    for (int i = 0; i < kRows; ++i) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) acc[i][j] += coef[i] * wk[j];
    }
  }
  auto* out = static_cast<typename D::T*>(a.out);
  for (int64_t i = 0; i < rb; ++i) {
    typename D::T* o = out + (n0 + i) * a.m + j0;
    const uint8_t* mk = a.mask ? a.mask + (n0 + i) * a.m + j0 : nullptr;
    if (mk) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) D::store(o, j, D::load(o, j) + (mk[j] ? acc[i][j] : 0.f));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) D::store(o, j, D::load(o, j) + acc[i][j]);
    }
  }
}

template <typename D>
void up_add(const LoraUpAddArgs& a, int64_t begin, int64_t end) {
  for (int64_t n0 = begin; n0 < end; n0 += kRows) {
    const int64_t rb = std::min<int64_t>(kRows, end - n0);
    int64_t j0 = 0;
    for (; j0 + kCols <= a.m; j0 += kCols) up_add_block<D, kCols>(a, n0, rb, j0, kCols);
    if (j0 < a.m) up_add_block<D, 0>(a, n0, rb, j0, a.m - j0);
  }
}

// g[k0 + kk, j0 : j0 + len] = alpha * sum_n u[n, k0 + kk] * x[n, j0 : j0 + len] * mask.
template <typename D, int kLen>
inline void outer_block(const LoraOuterArgs& a, int64_t k0, int64_t kb, int64_t j0,
                        int64_t dyn_len) {
  const int64_t len = kLen ? kLen : dyn_len;
  const auto* x = static_cast<const typename D::T*>(a.x);
  float acc[kRows][kCols] = {};
  float xv[kCols];
  float coef[kRows];
  for (int64_t n = 0; n < a.n; ++n) {
    load_row<D>(x + n * a.k + j0, a.mask ? a.mask + n * a.k + j0 : nullptr, len, xv);
    for (int i = 0; i < kRows; ++i) coef[i] = i < kb ? a.u[n * a.r + k0 + i] : 0.f;
    for (int i = 0; i < kRows; ++i) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) acc[i][j] += coef[i] * xv[j];
    }
  }
  for (int64_t i = 0; i < kb; ++i) {
    float* g = a.g + (k0 + i) * a.k + j0;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) g[j] = a.alpha * acc[i][j];
  }
}

template <typename D>
void outer(const LoraOuterArgs& a, int64_t begin, int64_t end) {
  for (int64_t k0 = 0; k0 < a.r; k0 += kRows) {
    const int64_t kb = std::min<int64_t>(kRows, a.r - k0);
    int64_t j0 = begin;
    for (; j0 + kCols <= end; j0 += kCols) outer_block<D, kCols>(a, k0, kb, j0, kCols);
    if (j0 < end) outer_block<D, 0>(a, k0, kb, j0, end - j0);
  }
}

}  // namespace

void lora_down_rows(const LoraDownArgs& a, int64_t begin, int64_t end) {
  if (a.dtype == kBF16) down<BF16>(a, begin, end);
  else down<F32>(a, begin, end);
}

void lora_up_add_rows(const LoraUpAddArgs& a, int64_t begin, int64_t end) {
  if (a.dtype == kBF16) up_add<BF16>(a, begin, end);
  else up_add<F32>(a, begin, end);
}

void lora_outer_cols(const LoraOuterArgs& a, int64_t begin, int64_t end) {
  if (a.dtype == kBF16) outer<BF16>(a, begin, end);
  else outer<F32>(a, begin, end);
}

}  // namespace PYENGINE_ISA_NS
}  // namespace pyengine
