// The micro-kernels of the low-rank engine (lowrank_rows_impl.h) and of the LoRA-fused
// SwiGLU (swiglu_impl.h).  Included by *_impl.h inside each ISA build:
// PYENGINE_ISA_NS must be defined, and every function is static inline in that namespace.
// Element access per DType (load to fp32, store rounded) and the tile loops: all tile
// operands fp32; `mat` rows are contiguous with leading dimension ld; loops are `omp simd`
// over a column tile of `len` entries.
#pragma once
#include <cstdint>

#include "common.h"

namespace pyengine {
namespace PYENGINE_ISA_NS {

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


// Column tile width of every kernel using these loops.  A full tile runs with a
// compile-time trip count (unrolled, no peeling); only a row's last tile is generic.
constexpr int64_t kTile = 64;

template <int64_t kLen>
static inline void add_rows_n(float* acc, const float* coef, const float* mat, int64_t rank,
                              int64_t ld, int64_t len) {
  const int64_t n = kLen ? kLen : len;
  for (int64_t k = 0; k < rank; ++k) {
    const float c = coef[k];
    const float* m = mat + k * ld;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) acc[j] += c * m[j];
  }
}

template <int64_t kLen>
static inline void dot_rows_n(float* out, const float* v, const float* mat, int64_t rank,
                              int64_t ld, int64_t len) {
  const int64_t n = kLen ? kLen : len;
  for (int64_t k = 0; k < rank; ++k) {
    const float* m = mat + k * ld;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) sum += v[j] * m[j];
    out[k] += sum;
  }
}

// Block versions: `rows` rows at once, per-row tiles of kTile floats (acc / v laid out
// [rows][kTile]), per-row coefficients coef[r * stride + k].  Each `mat` row tile is
// loaded once per block instead of once per row (mat usually lives in L2).

// acc[r * kTile + j] += sum_k coef[r * stride + k] * mat[k * ld + j]
template <int64_t kLen>
static inline void add_rows_block_n(float* acc, const float* coef, int64_t stride,
                                    const float* mat, int64_t rows, int64_t rank, int64_t ld,
                                    int64_t len) {
  const int64_t n = kLen ? kLen : len;
  for (int64_t k = 0; k < rank; ++k) {
    const float* m = mat + k * ld;
    for (int64_t r = 0; r < rows; ++r) {
      const float c = coef[r * stride + k];
      float* a = acc + r * kTile;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) a[j] += c * m[j];
    }
  }
}

// out[r * ostride + k] += sum_j v[r * kTile + j] * mat[k * ld + j]
template <int64_t kLen>
static inline void dot_rows_block_n(float* out, int64_t ostride, const float* v,
                                    const float* mat, int64_t rows, int64_t rank, int64_t ld,
                                    int64_t len) {
  const int64_t n = kLen ? kLen : len;
  for (int64_t k = 0; k < rank; ++k) {
    const float* m = mat + k * ld;
    for (int64_t r = 0; r < rows; ++r) {
      const float* vr = v + r * kTile;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < n; ++j) sum += vr[j] * m[j];
      out[r * ostride + k] += sum;
    }
  }
}

static inline void add_rows_block(float* acc, const float* coef, int64_t stride,
                                  const float* mat, int64_t rows, int64_t rank, int64_t ld,
                                  int64_t len) {
  if (len == kTile) add_rows_block_n<kTile>(acc, coef, stride, mat, rows, rank, ld, len);
  else add_rows_block_n<0>(acc, coef, stride, mat, rows, rank, ld, len);
}

static inline void dot_rows_block(float* out, int64_t ostride, const float* v,
                                  const float* mat, int64_t rows, int64_t rank, int64_t ld,
                                  int64_t len) {
  if (len == kTile) dot_rows_block_n<kTile>(out, ostride, v, mat, rows, rank, ld, len);
  else dot_rows_block_n<0>(out, ostride, v, mat, rows, rank, ld, len);
}

// acc[k * ld + j] += sum_r coef[r * stride + k] * v[r * kTile + j] for r < rows: the
// accumulator row stays in registers across the rows (one load/store per k, not per row)
template <int64_t kLen>
static inline void outer_add_block_n(float* acc, const float* coef, int64_t stride,
                                     const float* v, int64_t rows, int64_t rank, int64_t ld,
                                     int64_t len) {
  const int64_t n = kLen ? kLen : len;
  for (int64_t k = 0; k < rank; ++k) {
    float* m = acc + k * ld;
    float t[kTile];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) t[j] = m[j];
    for (int64_t r = 0; r < rows; ++r) {
      const float c = coef[r * stride + k];
      const float* vr = v + r * kTile;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) t[j] += c * vr[j];
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) m[j] = t[j];
  }
}

// acc[j] += sum_k coef[k] * mat[k * ld + j]   for j < len <= kTile
static inline void add_rows(float* acc, const float* coef, const float* mat, int64_t rank,
                            int64_t ld, int64_t len) {
  if (len == kTile) add_rows_n<kTile>(acc, coef, mat, rank, ld, len);
  else add_rows_n<0>(acc, coef, mat, rank, ld, len);
}

// out[k] += sum_j v[j] * mat[k * ld + j]   for j < len <= kTile
static inline void dot_rows(float* out, const float* v, const float* mat, int64_t rank,
                            int64_t ld, int64_t len) {
  if (len == kTile) dot_rows_n<kTile>(out, v, mat, rank, ld, len);
  else dot_rows_n<0>(out, v, mat, rank, ld, len);
}

static inline void outer_add_block(float* acc, const float* coef, int64_t stride,
                                   const float* v, int64_t rows, int64_t rank, int64_t ld,
                                   int64_t len) {
  if (len == kTile) outer_add_block_n<kTile>(acc, coef, stride, v, rows, rank, ld, len);
  else outer_add_block_n<0>(acc, coef, stride, v, rows, rank, ld, len);
}

}  // namespace PYENGINE_ISA_NS
}  // namespace pyengine
