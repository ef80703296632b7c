// Row kernel of lowrank_rows.h, written once and compiled per ISA (PYENGINE_ISA_NS and the
// flags come from the including TU).  The driver walks rows in blocks of kRowBlock; per
// block: proj over its src rows (full K per accumulator, one horizontal sum per output),
// grad into the block's partial (64-column strips, 4 ranks at a time, rows inner), then
// the add over its dst rows (4 rows x 64 columns per register block, ranks inner).  The
// block's src rows are read from memory once and stay in L1/L2 between proj and grad.
// Micro-kernels: explicit AVX-512 register blocks (16 zmm accumulators each, so every
// loaded vector feeds 2-4 FMAs) in the avx512 build; fixed-size `omp simd` blocks of the
// same shapes (-fopenmp-simd: vectorisation only, no OpenMP runtime) in scalar and avx2.
#include <algorithm>
#include <type_traits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "lowrank_rows.h"
#include "lowrank_tiles.h"  // F32 / BF16 / F16 element access

namespace pyengine {
namespace PYENGINE_ISA_NS {
namespace {

constexpr int64_t kRowBlock = 16;  // rows per driver block
constexpr int kRows = 4;           // rows (add) or ranks (grad) per register block
constexpr int kCols = 64;          // columns per register block

// p[0, len) as fp32 into t, zero where the keep-mask is 0
template <typename D>
inline void load_row(const typename D::T* p, const uint8_t* mask, int64_t len, float* t) {
  if (mask) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) t[j] = mask[j] ? D::load(p, j) : 0.f;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) t[j] = D::load(p, j);
  }
}

#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 bf16_bits(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
template <typename D>
inline __m512 load16(const uint16_t* p, __mmask16 m = 0xffff) {
  const __m256i v = _mm256_maskz_loadu_epi16(m, p);
  if constexpr (std::is_same_v<D, F16>) return _mm512_cvtph_ps(v);
  else return bf16_bits(v);
}
template <typename D>
inline __m512 load16t(const typename D::T* p, __mmask16 m = 0xffff) {
  if constexpr (std::is_same_v<D, F32>) return load16(p, m);
  else return load16<D>(p, m);
}
template <typename D>
inline void store16(typename D::T* p, __m512 v) {
  if constexpr (std::is_same_v<D, F32>) {
    _mm512_storeu_ps(p, v);
  } else if constexpr (std::is_same_v<D, F16>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {  // round to nearest even, as f32_to_bf16
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
  }
}
inline __mmask16 keep_bits(const uint8_t* m) {
  return _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m)),
                            _mm_set1_epi8(-1));
}

// proj_out[n0 + i, k0 + q] for i < rb <= 8, q < 2: 16 accumulators over the full row;
// tails reuse the last row / rank (computed twice, stored once)
template <typename D>
void proj_avx512(const LowRankRowsArgs& a, int64_t n0, int64_t rb) {
  constexpr int kR = 8, kQ = 2;
  const int64_t K = a.cols, R = a.proj_rank;
  const typename D::T* x[kR];
  const uint8_t* mk[kR];
  for (int i = 0; i < kR; ++i) {
    const int64_t n = n0 + std::min<int64_t>(i, rb - 1);
    x[i] = static_cast<const typename D::T*>(a.src) + n * K;
    mk[i] = a.src_mask ? a.src_mask + n * K : nullptr;
  }
  for (int64_t k0 = 0; k0 < R; k0 += kQ) {
    const float* w[kQ];
    for (int q = 0; q < kQ; ++q) w[q] = a.proj_w + std::min<int64_t>(k0 + q, R - 1) * K;
    __m512 acc[kR][kQ];
    for (int i = 0; i < kR; ++i)
      for (int q = 0; q < kQ; ++q) acc[i][q] = _mm512_setzero_ps();
    for (int64_t j = 0; j < K; j += 16) {
      const __mmask16 tail = K - j >= 16 ? 0xffff : __mmask16((1u << (K - j)) - 1);
      __m512 wv[kQ];
      for (int q = 0; q < kQ; ++q) wv[q] = load16(w[q] + j, tail);
      for (int i = 0; i < kR; ++i) {
        const __mmask16 m = mk[i] ? __mmask16(tail & keep_bits(mk[i] + j)) : tail;
        const __m512 xv = load16t<D>(x[i] + j, m);
        for (int q = 0; q < kQ; ++q) acc[i][q] = _mm512_fmadd_ps(xv, wv[q], acc[i][q]);
      }
    }
    for (int64_t i = 0; i < rb; ++i)
      for (int q = 0; q < kQ && k0 + q < R; ++q)
        a.proj_out[(n0 + i) * R + k0 + q] = a.scale * _mm512_reduce_add_ps(acc[i][q]);
  }
}

// acc[k0 + i, j0 : j0 + 64] += sum_{n in [n0, n1)} coef[n, k0 + i] * src[n, j0 : j0 + 64]
template <typename D>
void grad_avx512(const LowRankRowsArgs& a, int64_t n0, int64_t n1, int64_t k0, int64_t kb,
                 int64_t j0, float* acc) {
  const int64_t K = a.cols, R = a.grad_rank;
  __m512 s[kRows][4];
  for (int i = 0; i < kRows; ++i)
    for (int c = 0; c < 4; ++c) s[i][c] = _mm512_setzero_ps();
  int64_t rank[kRows];
  for (int i = 0; i < kRows; ++i) rank[i] = k0 + std::min<int64_t>(i, kb - 1);
  for (int64_t n = n0; n < n1; ++n) {
    const typename D::T* xr = static_cast<const typename D::T*>(a.src) + n * K + j0;
    __m512 xv[4];
    if (a.src_mask) {
      const uint8_t* mr = a.src_mask + n * K + j0;
      for (int c = 0; c < 4; ++c) xv[c] = load16t<D>(xr + 16 * c, keep_bits(mr + 16 * c));
    } else {
      for (int c = 0; c < 4; ++c) xv[c] = load16t<D>(xr + 16 * c);
    }
    const float* cn = a.grad_coef + n * R;
    for (int i = 0; i < kRows; ++i) {
      const __m512 coef = _mm512_set1_ps(cn[rank[i]]);
      for (int c = 0; c < 4; ++c) s[i][c] = _mm512_fmadd_ps(coef, xv[c], s[i][c]);
    }
  }
  for (int64_t i = 0; i < kb; ++i) {
    float* g = acc + (k0 + i) * K + j0;
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(g + 16 * c, _mm512_add_ps(load16(g + 16 * c), s[i][c]));
  }
}

// dst[n0 + i, j0 : j0 + 64] += alpha * (coef @ add_w)[...] * mask, i < rb <= 4
template <typename D>
void add_avx512(const LowRankRowsArgs& a, const float* coef, int64_t n0, int64_t rb,
                int64_t j0) {
  const int64_t M = a.dst_cols, R = a.add_rank;
  __m512 s[kRows][4];
  for (int i = 0; i < kRows; ++i)
    for (int c = 0; c < 4; ++c) s[i][c] = _mm512_setzero_ps();
  const float* cr[kRows];
  for (int i = 0; i < kRows; ++i) cr[i] = coef + (n0 + std::min<int64_t>(i, rb - 1)) * R;
  for (int64_t k = 0; k < R; ++k) {
    const float* wk = a.add_w + k * M + j0;
    const __m512 w[4] = {load16(wk), load16(wk + 16), load16(wk + 32), load16(wk + 48)};
    for (int i = 0; i < kRows; ++i) {
      const __m512 c = _mm512_set1_ps(cr[i][k]);
      for (int q = 0; q < 4; ++q) s[i][q] = _mm512_fmadd_ps(c, w[q], s[i][q]);
    }
  }
  const __m512 alpha = _mm512_set1_ps(a.alpha);
  for (int64_t i = 0; i < rb; ++i) {
    typename D::T* o = static_cast<typename D::T*>(a.dst) + (n0 + i) * M + j0;
    for (int q = 0; q < 4; ++q) {
      const __m512 old = load16t<D>(o + 16 * q);
      const __mmask16 keep =
          a.dst_mask ? keep_bits(a.dst_mask + (n0 + i) * M + j0 + 16 * q) : 0xffff;
      store16<D>(o + 16 * q, _mm512_mask3_fmadd_ps(alpha, s[i][q], old, keep));
    }
  }
}
#endif  // __AVX512F__

// proj_out rows [n0, n1): the generic build loads 4 rows (masked, fp32) and runs 2 ranks
// at a time, 8 `omp simd` reductions over the full row
template <typename D>
void proj_rows(const LowRankRowsArgs& a, int64_t n0, int64_t n1, std::vector<float>& buf) {
#ifdef __AVX512F__
  (void)buf;
  for (int64_t b = n0; b < n1; b += 8) proj_avx512<D>(a, b, std::min<int64_t>(8, n1 - b));
#else
  const int64_t K = a.cols, R = a.proj_rank;
  const auto* x = static_cast<const typename D::T*>(a.src);
  for (int64_t b = n0; b < n1; b += kRows) {
    const int64_t rb = std::min<int64_t>(kRows, n1 - b);
    std::fill(buf.begin(), buf.end(), 0.f);
    for (int64_t i = 0; i < rb; ++i)
      load_row<D>(x + (b + i) * K, a.src_mask ? a.src_mask + (b + i) * K : nullptr, K,
                  &buf[i * K]);
    const float *b0 = &buf[0], *b1 = &buf[K], *b2 = &buf[2 * K], *b3 = &buf[3 * K];
    for (int64_t k = 0; k < R; k += 2) {
      const float* w0 = a.proj_w + k * K;
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
        a.proj_out[(b + i) * R + k] = a.scale * s0[i];
        if (k + 1 < R) a.proj_out[(b + i) * R + k + 1] = a.scale * s1[i];
      }
    }
  }
#endif
}

// acc[k0 + i, j0 : j0 + len] += sum_{n in [n0, n1)} coef[n, k0 + i] * (src * mask)[n, ...]
template <typename D, int kLen>
void grad_block(const LowRankRowsArgs& a, int64_t n0, int64_t n1, int64_t k0, int64_t kb,
                int64_t j0, int64_t dyn_len, float* acc) {
  const int64_t len = kLen ? kLen : dyn_len, K = a.cols, R = a.grad_rank;
  const auto* x = static_cast<const typename D::T*>(a.src);
  float s[kRows][kCols] = {};
  float xv[kCols];
  float coef[kRows];
  for (int64_t n = n0; n < n1; ++n) {
    load_row<D>(x + n * K + j0, a.src_mask ? a.src_mask + n * K + j0 : nullptr, len, xv);
    for (int i = 0; i < kRows; ++i) coef[i] = i < kb ? a.grad_coef[n * R + k0 + i] : 0.f;
    for (int i = 0; i < kRows; ++i) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) s[i][j] += coef[i] * xv[j];
    }
  }
  for (int64_t i = 0; i < kb; ++i) {
    float* g = acc + (k0 + i) * K + j0;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) g[j] += s[i][j];
  }
}

template <typename D>
void grad_rows(const LowRankRowsArgs& a, int64_t n0, int64_t n1, float* acc) {
  const int64_t K = a.cols, R = a.grad_rank;
  for (int64_t j0 = 0; j0 < K; j0 += kCols) {  // strip outer: it stays in L1 across ranks
    const int64_t len = std::min<int64_t>(kCols, K - j0);
    for (int64_t k0 = 0; k0 < R; k0 += kRows) {
      const int64_t kb = std::min<int64_t>(kRows, R - k0);
      if (len < kCols) {
        grad_block<D, 0>(a, n0, n1, k0, kb, j0, len, acc);
      } else {
#ifdef __AVX512F__
        grad_avx512<D>(a, n0, n1, k0, kb, j0, acc);
#else
        grad_block<D, kCols>(a, n0, n1, k0, kb, j0, kCols, acc);
#endif
      }
    }
  }
}

// dst[b + i, j0 : j0 + len] += alpha * (coef @ add_w)[...] * mask, for i < rb
template <typename D, int kLen>
void add_block(const LowRankRowsArgs& a, const float* coef_rows, int64_t b, int64_t rb,
               int64_t j0, int64_t dyn_len) {
  const int64_t len = kLen ? kLen : dyn_len, M = a.dst_cols, R = a.add_rank;
  float s[kRows][kCols] = {};
  float coef[kRows];
  for (int64_t k = 0; k < R; ++k) {
    for (int i = 0; i < kRows; ++i) coef[i] = i < rb ? a.alpha * coef_rows[(b + i) * R + k] : 0.f;
    const float* wk = a.add_w + k * M + j0;
    for (int i = 0; i < kRows; ++i) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) s[i][j] += coef[i] * wk[j];
    }
  }
  auto* out = static_cast<typename D::T*>(a.dst);
  for (int64_t i = 0; i < rb; ++i) {
    typename D::T* o = out + (b + i) * M + j0;
    const uint8_t* mk = a.dst_mask ? a.dst_mask + (b + i) * M + j0 : nullptr;
    if (mk) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) D::store(o, j, D::load(o, j) + (mk[j] ? s[i][j] : 0.f));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) D::store(o, j, D::load(o, j) + s[i][j]);
    }
  }
}

template <typename D>
void add_rows(const LowRankRowsArgs& a, int64_t n0, int64_t n1) {
  const float* coef = a.add_coef ? a.add_coef : a.proj_out;  // chained: this pass's proj
  const int64_t M = a.dst_cols;
  int64_t j0 = 0;
  for (; j0 + kCols <= M; j0 += kCols)
    for (int64_t b = n0; b < n1; b += kRows) {
#ifdef __AVX512F__
      add_avx512<D>(a, coef, b, std::min<int64_t>(kRows, n1 - b), j0);
#else
      add_block<D, kCols>(a, coef, b, std::min<int64_t>(kRows, n1 - b), j0, kCols);
#endif
    }
  if (j0 < M)
    for (int64_t b = n0; b < n1; b += kRows)
      add_block<D, 0>(a, coef, b, std::min<int64_t>(kRows, n1 - b), j0, M - j0);
}

template <typename D>
void rows(const LowRankRowsArgs& a, int64_t begin, int64_t end, float* acc) {
  std::vector<float> buf;  // the generic proj's 4 fp32 rows
#ifndef __AVX512F__
  if (a.proj_rank) buf.resize(size_t(kRows * a.cols));
#endif
  for (int64_t n0 = begin; n0 < end; n0 += kRowBlock) {
    const int64_t n1 = std::min(end, n0 + kRowBlock);
    if (a.proj_rank) proj_rows<D>(a, n0, n1, buf);
    if (a.grad_rank) grad_rows<D>(a, n0, n1, acc);
    if (a.add_rank) add_rows<D>(a, n0, n1);
  }
}

}  // namespace

void lowrank_rows_range(const LowRankRowsArgs& a, int64_t begin, int64_t end, float* acc) {
  switch (a.dtype) {
    case kF32: rows<F32>(a, begin, end, acc); break;
    case kBF16: rows<BF16>(a, begin, end, acc); break;
    default: rows<F16>(a, begin, end, acc); break;
  }
}

}  // namespace PYENGINE_ISA_NS
}  // namespace pyengine
