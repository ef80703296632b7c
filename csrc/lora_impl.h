// Kernels of lora.h, written once and compiled per ISA: each including TU defines
// PYENGINE_ISA_NS (scalar / avx2 / avx512) and gets its own compiler flags.  The scalar and
// avx2 builds use fixed-size `omp simd` blocks (-fopenmp-simd: vectorisation only, no OpenMP
// runtime): 4 rows x 64 columns for up_add and outer, 4 rows x 2 ranks for down.  The
// avx512 build uses explicit intrinsics with 16 zmm accumulators per block (below).
#include <algorithm>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "common.h"
#include "lora.h"
#include "lowrank_tiles.h"  // F32 / BF16 element access

namespace pyengine {
namespace PYENGINE_ISA_NS {
namespace {

constexpr int kRows = 4;   // rows of x / out per block
constexpr int kCols = 64;  // columns per register block

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

#ifdef __AVX512F__
// Explicit AVX-512 blocks: 16 zmm accumulators (up_add: 4 rows x 64 columns, outer:
// 4 ranks x 64 columns, down: 8 rows x 2 ranks), so each loaded vector feeds 2-4 FMAs.
// Tails reuse the last row / rank (computed twice, stored once) or fall back to the
// generic blocks above.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(uint16_t* p, __m512 v) {  // round to nearest even, as f32_to_bf16
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}
inline __mmask16 keep_bits(const uint8_t* m) {
  return _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m)),
                            _mm_set1_epi8(-1));
}

template <typename T>
void up_add_avx512(const LoraUpAddArgs& a, int64_t n0, int64_t rb, int64_t j0) {
  __m512 acc[kRows][4];
  for (int i = 0; i < kRows; ++i)
    for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_setzero_ps();
  const float* u[kRows];
  for (int i = 0; i < kRows; ++i) u[i] = a.u + (n0 + std::min<int64_t>(i, rb - 1)) * a.r;
  for (int64_t k = 0; k < a.r; ++k) {
    const float* wk = a.w + k * a.m + j0;
    __m512 w[4] = {load16(wk), load16(wk + 16), load16(wk + 32), load16(wk + 48)};
    for (int i = 0; i < kRows; ++i) {
      const __m512 coef = _mm512_set1_ps(u[i][k]);
      for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_fmadd_ps(coef, w[c], acc[i][c]);
    }
  }
  const __m512 alpha = _mm512_set1_ps(a.alpha);
  for (int64_t i = 0; i < rb; ++i) {
    T* o = static_cast<T*>(a.out) + (n0 + i) * a.m + j0;
    for (int c = 0; c < 4; ++c) {
      const __m512 old = load16(o + 16 * c);
      const __mmask16 keep = a.mask ? keep_bits(a.mask + (n0 + i) * a.m + j0 + 16 * c) : 0xffff;
      store16(o + 16 * c, _mm512_mask3_fmadd_ps(alpha, acc[i][c], old, keep));
    }
  }
}

constexpr int kDownRows = 8, kDownRanks = 2;  // 16 accumulators; x rows from L1, w from L2

template <typename T>
void down_avx512(const LoraDownArgs& a, int64_t n0, int64_t rb) {
  const int64_t K = a.k, R = a.r;
  const T* x[kDownRows];
  const uint8_t* mk[kDownRows];
  for (int i = 0; i < kDownRows; ++i) {
    const int64_t n = n0 + std::min<int64_t>(i, rb - 1);
    x[i] = static_cast<const T*>(a.x) + n * K;
    mk[i] = a.mask ? a.mask + n * K : nullptr;
  }
  for (int64_t k0 = 0; k0 < R; k0 += kDownRanks) {
    const float* w[kDownRanks];
    for (int q = 0; q < kDownRanks; ++q) w[q] = a.w + std::min<int64_t>(k0 + q, R - 1) * K;
    __m512 acc[kDownRows][kDownRanks];
    for (int i = 0; i < kDownRows; ++i)
      for (int q = 0; q < kDownRanks; ++q) acc[i][q] = _mm512_setzero_ps();
    for (int64_t j = 0; j < K; j += 16) {
      const __mmask16 tail = K - j >= 16 ? 0xffff : __mmask16((1u << (K - j)) - 1);
      __m512 wv[kDownRanks];
      for (int q = 0; q < kDownRanks; ++q) wv[q] = load16(w[q] + j, tail);
      for (int i = 0; i < kDownRows; ++i) {
        const __mmask16 m = mk[i] ? __mmask16(tail & keep_bits(mk[i] + j)) : tail;
        const __m512 xv = load16(x[i] + j, m);
        for (int q = 0; q < kDownRanks; ++q) acc[i][q] = _mm512_fmadd_ps(xv, wv[q], acc[i][q]);
      }
    }
    for (int64_t i = 0; i < rb; ++i)
      for (int q = 0; q < kDownRanks && k0 + q < R; ++q)
        a.u[(n0 + i) * R + k0 + q] = a.keep * _mm512_reduce_add_ps(acc[i][q]);
  }
}

template <typename T>
void outer_avx512(const LoraOuterArgs& a, int64_t k0, int64_t kb, int64_t j0) {
  __m512 acc[kRows][4];
  for (int i = 0; i < kRows; ++i)
    for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_setzero_ps();
  int64_t rank[kRows];
  for (int i = 0; i < kRows; ++i) rank[i] = k0 + std::min<int64_t>(i, kb - 1);
  const T* x = static_cast<const T*>(a.x) + j0;
  for (int64_t n = 0; n < a.n; ++n) {
    __m512 xv[4];
    const T* xr = x + n * a.k;
    if (a.mask) {
      const uint8_t* mr = a.mask + n * a.k + j0;
      for (int c = 0; c < 4; ++c) xv[c] = load16(xr + 16 * c, keep_bits(mr + 16 * c));
    } else {
      for (int c = 0; c < 4; ++c) xv[c] = load16(xr + 16 * c);
    }
    const float* un = a.u + n * a.r;
    for (int i = 0; i < kRows; ++i) {
      const __m512 coef = _mm512_set1_ps(un[rank[i]]);
      for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_fmadd_ps(coef, xv[c], acc[i][c]);
    }
  }
  const __m512 alpha = _mm512_set1_ps(a.alpha);
  for (int64_t i = 0; i < kb; ++i)
    for (int c = 0; c < 4; ++c)
      _mm512_storeu_ps(a.g + (k0 + i) * a.k + j0 + 16 * c, _mm512_mul_ps(alpha, acc[i][c]));
}
#endif  // __AVX512F__

template <typename D>
void down(const LoraDownArgs& a, int64_t begin, int64_t end) {
#ifdef __AVX512F__
  for (int64_t n0 = begin; n0 < end; n0 += kDownRows)
    down_avx512<typename D::T>(a, n0, std::min<int64_t>(kDownRows, end - n0));
#else
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
#endif
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
  // tiles of kTileRows rows: a 64-column strip of w (r x 64 floats) is loaded from L2 once
  // per tile and reused from L1 by its row groups; the tile of out stays in L2
  constexpr int64_t kTileRows = 32;
  for (int64_t t0 = begin; t0 < end; t0 += kTileRows) {
    const int64_t t1 = std::min(end, t0 + kTileRows);
    int64_t j0 = 0;
    for (; j0 + kCols <= a.m; j0 += kCols) {
      for (int64_t n0 = t0; n0 < t1; n0 += kRows) {
        const int64_t rb = std::min<int64_t>(kRows, t1 - n0);
#ifdef __AVX512F__
        up_add_avx512<typename D::T>(a, n0, rb, j0);
#else
        up_add_block<D, kCols>(a, n0, rb, j0, kCols);
#endif
      }
    }
    if (j0 < a.m)
      for (int64_t n0 = t0; n0 < t1; n0 += kRows)
        up_add_block<D, 0>(a, n0, std::min<int64_t>(kRows, t1 - n0), j0, a.m - j0);
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
  // column strip outer, ranks inner: the strip x[:, j0 : j0 + 64] stays in L2 across ranks
  for (int64_t j0 = begin; j0 < end; j0 += kCols) {
    const int64_t len = std::min<int64_t>(kCols, end - j0);
    for (int64_t k0 = 0; k0 < a.r; k0 += kRows) {
      const int64_t kb = std::min<int64_t>(kRows, a.r - k0);
      if (len < kCols) {
        outer_block<D, 0>(a, k0, kb, j0, len);
      } else {
#ifdef __AVX512F__
        outer_avx512<typename D::T>(a, k0, kb, j0);
#else
        outer_block<D, kCols>(a, k0, kb, j0, kCols);
#endif
      }
    }
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
