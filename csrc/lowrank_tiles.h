// The micro-kernels of the low-rank engine, shared by the row pass of lowrank_rows.h and
// the LoRA-fused SwiGLU of swiglu.h.  Included by *_impl.h inside each ISA build:
// PYENGINE_ISA_NS must be defined.  Three skinny products over n rows (n small: a row
// block), every low-rank operand fp32 with explicit leading dimensions, src / dst of a
// DType (element access F32 / BF16 / F16 below), optional uint8 keep-masks laid out as
// src / dst:
//   proj: out[i, k]  += scale * sum_j (src * mask)[i, j] w[k, j]       i < n, k < R, j < K
//   grad: acc[k, j]  += sum_i coef[i, k] (src * mask)[i, j]
//   add:  dst[i, j]  += alpha * (sum_k coef[i, k] w[k, j]) * mask[i, j]   (rounded once)
// AVX-512 build: explicit register blocks of 16 zmm accumulators (proj 8 rows x 2 ranks, or
// 4 x 4 / 2 x 8 for fewer rows, over the whole row, one horizontal sum per output; grad 4
// ranks x 64 columns, rows inner; add 4 rows x 64 columns, ranks inner), so each loaded
// vector feeds 2-8 FMAs.
// scalar / avx2 builds: `omp simd` blocks of the same shapes (-fopenmp-simd: vectorisation
// only).  Tails reuse the last row / rank (computed twice, stored once) or run the generic
// blocks.  Summation order is fixed by the code, never by threads.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

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

namespace lowrank {

constexpr int kBlk = 4;    // rows (add) or ranks (grad) per register block
constexpr int kCols = 64;  // columns per register block

template <typename D>
inline float load_masked(const typename D::T* p, const uint8_t* m, int64_t j) {
  return (!m || m[j]) ? D::load(p, j) : 0.f;
}

#ifdef __AVX512F__
inline __mmask16 keep_bits(const uint8_t* m) {
  return _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m)),
                            _mm_set1_epi8(-1));
}
template <typename D>
inline __m512 load16(const typename D::T* p, __mmask16 m = 0xffff) {
  if constexpr (std::is_same_v<D, F32>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    const __m256i v = _mm256_maskz_loadu_epi16(m, p);
    if constexpr (std::is_same_v<D, F16>) return _mm512_cvtph_ps(v);
    else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  }
}
template <typename D>
inline void store16(typename D::T* p, __m512 v) {
  if constexpr (std::is_same_v<D, F32>) {
    _mm512_storeu_ps(p, v);
  } else if constexpr (std::is_same_v<D, F16>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {  // round to nearest even, as f32_to_bf16
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
  }
}
#endif

// ---------------------------------------------------------------- proj
// One block of up to kProjRows rows, given by pointers (so callers may gather rows: the
// batched gather-LoRA of lora_gather.h); the tail of x / mk repeats the last row:
//   out[i][k] += scale * sum_j (x[i] * mk[i])[j] w[k, j]     i < rb, k < R, j < K
#ifdef __AVX512F__
constexpr int kProjRows = 8;
#else
constexpr int kProjRows = kBlk;
#endif
template <typename T>
using ProjRows = const T* [kProjRows];

#ifdef __AVX512F__
// kR rows x kQ ranks of 16-lane accumulators (kR * kQ = 16); the dot products' bits do not
// depend on the block shape (each is its own accumulator, then one horizontal sum)
template <typename D, int kR, int kQ>
void proj_block_avx512(const ProjRows<typename D::T>& x, const ProjRows<uint8_t>& mk,
                       int64_t rb, int64_t K, const float* w, int64_t ldw, int64_t R,
                       float scale, float* const (&out)[kProjRows]) {
  for (int64_t k0 = 0; k0 < R; k0 += kQ) {
    const float* wq[kQ];
    for (int q = 0; q < kQ; ++q) wq[q] = w + std::min<int64_t>(k0 + q, R - 1) * ldw;
    __m512 acc[kR][kQ];
    for (int i = 0; i < kR; ++i)
      for (int q = 0; q < kQ; ++q) acc[i][q] = _mm512_setzero_ps();
    for (int64_t j = 0; j < K; j += 16) {
      const __mmask16 tail = K - j >= 16 ? 0xffff : __mmask16((1u << (K - j)) - 1);
      __m512 wv[kQ];
      for (int q = 0; q < kQ; ++q) wv[q] = _mm512_maskz_loadu_ps(tail, wq[q] + j);
      for (int i = 0; i < kR; ++i) {
        const __mmask16 m = mk[i] ? __mmask16(tail & keep_bits(mk[i] + j)) : tail;
        const __m512 xv = load16<D>(x[i] + j, m);
        for (int q = 0; q < kQ; ++q) acc[i][q] = _mm512_fmadd_ps(xv, wv[q], acc[i][q]);
      }
    }
    for (int64_t i = 0; i < rb; ++i)
      for (int q = 0; q < kQ && k0 + q < R; ++q)
        out[i][k0 + q] += scale * _mm512_reduce_add_ps(acc[i][q]);
  }
}
#endif

template <typename D>
void proj_block(const ProjRows<typename D::T>& x, const ProjRows<uint8_t>& mk, int64_t rb,
                int64_t K, const float* w, int64_t ldw, int64_t R, float scale,
                float* const (&out)[kProjRows]) {
#ifdef __AVX512F__
  // few rows (a tail, or one adapter's rows in lora_gather): fewer rows, more ranks per
  // block, so no FMA is spent on repeated rows
  if (rb <= 2) proj_block_avx512<D, 2, 8>(x, mk, rb, K, w, ldw, R, scale, out);
  else if (rb <= 4) proj_block_avx512<D, 4, 4>(x, mk, rb, K, w, ldw, R, scale, out);
  else proj_block_avx512<D, 8, 2>(x, mk, rb, K, w, ldw, R, scale, out);
#else
  for (int64_t k = 0; k < R; k += 2) {
    const float* w0 = w + k * ldw;
    const float* w1 = k + 1 < R ? w0 + ldw : w0;  // odd R: last rank computed twice
    float s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13)
    for (int64_t j = 0; j < K; ++j) {
      const float p = w0[j], q = w1[j];
      const float x0 = load_masked<D>(x[0], mk[0], j), x1 = load_masked<D>(x[1], mk[1], j);
      const float x2 = load_masked<D>(x[2], mk[2], j), x3 = load_masked<D>(x[3], mk[3], j);
      s00 += p * x0; s01 += p * x1; s02 += p * x2; s03 += p * x3;
      s10 += q * x0; s11 += q * x1; s12 += q * x2; s13 += q * x3;
    }
    const float s0[kBlk] = {s00, s01, s02, s03}, s1[kBlk] = {s10, s11, s12, s13};
    for (int64_t i = 0; i < rb; ++i) {
      out[i][k] += scale * s0[i];
      if (k + 1 < R) out[i][k + 1] += scale * s1[i];
    }
  }
#endif
}

// proj over rows 0 .. n-1 of src (leading dim ld) into out (leading dim ld_out)
template <typename D>
void proj(const typename D::T* src, int64_t ld, const uint8_t* mask, int64_t n, int64_t K,
          const float* w, int64_t ldw, int64_t R, float scale, float* out, int64_t ld_out) {
  for (int64_t n0 = 0; n0 < n; n0 += kProjRows) {
    const int64_t rb = std::min<int64_t>(kProjRows, n - n0);
    const typename D::T* x[kProjRows];
    const uint8_t* mk[kProjRows];
    float* o[kProjRows];
    for (int i = 0; i < kProjRows; ++i) {
      const int64_t r = n0 + std::min<int64_t>(i, rb - 1);
      x[i] = src + r * ld;
      mk[i] = mask ? mask + r * ld : nullptr;
      o[i] = out + r * ld_out;
    }
    proj_block<D>(x, mk, rb, K, w, ldw, R, scale, o);
  }
}

// ---------------------------------------------------------------- grad
template <typename D, int kLen>
void grad_block(const typename D::T* src, int64_t ld, const uint8_t* mask, int64_t n,
                const float* coef, int64_t ld_coef, int64_t k0, int64_t kb, int64_t j0,
                int64_t dyn_len, float* acc, int64_t ld_acc) {
  const int64_t len = kLen ? kLen : dyn_len;
  float s[kBlk][kCols] = {};
  float xv[kCols];
  float c[kBlk];
  for (int64_t i = 0; i < n; ++i) {
    const typename D::T* xr = src + i * ld + j0;
    const uint8_t* mr = mask ? mask + i * ld + j0 : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) xv[j] = load_masked<D>(xr, mr, j);
    for (int q = 0; q < kBlk; ++q) c[q] = q < kb ? coef[i * ld_coef + k0 + q] : 0.f;
    for (int q = 0; q < kBlk; ++q) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) s[q][j] += c[q] * xv[j];
    }
  }
  for (int64_t q = 0; q < kb; ++q) {
    float* g = acc + (k0 + q) * ld_acc + j0;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) g[j] += s[q][j];
  }
}

#ifdef __AVX512F__
template <typename D>
void grad_avx512(const typename D::T* src, int64_t ld, const uint8_t* mask, int64_t n,
                 const float* coef, int64_t ld_coef, int64_t k0, int64_t kb, int64_t j0,
                 float* acc, int64_t ld_acc) {
  __m512 s[kBlk][4];
  for (int q = 0; q < kBlk; ++q)
    for (int c = 0; c < 4; ++c) s[q][c] = _mm512_setzero_ps();
  int64_t rank[kBlk];
  for (int q = 0; q < kBlk; ++q) rank[q] = k0 + std::min<int64_t>(q, kb - 1);
  for (int64_t i = 0; i < n; ++i) {
    const typename D::T* xr = src + i * ld + j0;
    __m512 xv[4];
    if (mask) {
      const uint8_t* mr = mask + i * ld + j0;
      for (int c = 0; c < 4; ++c) xv[c] = load16<D>(xr + 16 * c, keep_bits(mr + 16 * c));
    } else {
      for (int c = 0; c < 4; ++c) xv[c] = load16<D>(xr + 16 * c);
    }
    const float* ci = coef + i * ld_coef;
    for (int q = 0; q < kBlk; ++q) {
      const __m512 cv = _mm512_set1_ps(ci[rank[q]]);
      for (int c = 0; c < 4; ++c) s[q][c] = _mm512_fmadd_ps(cv, xv[c], s[q][c]);
    }
  }
  for (int64_t q = 0; q < kb; ++q) {
    float* g = acc + (k0 + q) * ld_acc + j0;
    for (int c = 0; c < 4; ++c)
      _mm512_storeu_ps(g + 16 * c, _mm512_add_ps(_mm512_loadu_ps(g + 16 * c), s[q][c]));
  }
}
#endif

template <typename D>
void grad(const typename D::T* src, int64_t ld, const uint8_t* mask, int64_t n, int64_t K,
          const float* coef, int64_t ld_coef, int64_t R, float* acc, int64_t ld_acc) {
  for (int64_t j0 = 0; j0 < K; j0 += kCols) {  // strip outer: it stays in L1 across ranks
    const int64_t len = std::min<int64_t>(kCols, K - j0);
    for (int64_t k0 = 0; k0 < R; k0 += kBlk) {
      const int64_t kb = std::min<int64_t>(kBlk, R - k0);
      if (len < kCols) {
        grad_block<D, 0>(src, ld, mask, n, coef, ld_coef, k0, kb, j0, len, acc, ld_acc);
      } else {
#ifdef __AVX512F__
        grad_avx512<D>(src, ld, mask, n, coef, ld_coef, k0, kb, j0, acc, ld_acc);
#else
        grad_block<D, kCols>(src, ld, mask, n, coef, ld_coef, k0, kb, j0, kCols, acc, ld_acc);
#endif
      }
    }
  }
}

// ---------------------------------------------------------------- add
template <typename D, int kLen>
void add_block(typename D::T* dst, int64_t ld, const uint8_t* mask, const float* coef,
               int64_t ld_coef, int64_t R, const float* w, int64_t ldw, float alpha, int64_t i0,
               int64_t rb, int64_t j0, int64_t dyn_len) {
  const int64_t len = kLen ? kLen : dyn_len;
  float s[kBlk][kCols] = {};
  float c[kBlk];
  for (int64_t k = 0; k < R; ++k) {
    for (int i = 0; i < kBlk; ++i) c[i] = i < rb ? alpha * coef[(i0 + i) * ld_coef + k] : 0.f;
    const float* wk = w + k * ldw + j0;
    for (int i = 0; i < kBlk; ++i) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) s[i][j] += c[i] * wk[j];
    }
  }
  for (int64_t i = 0; i < rb; ++i) {
    typename D::T* o = dst + (i0 + i) * ld + j0;
    const uint8_t* mk = mask ? mask + (i0 + i) * ld + j0 : nullptr;
    if (mk) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) D::store(o, j, D::load(o, j) + (mk[j] ? s[i][j] : 0.f));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) D::store(o, j, D::load(o, j) + s[i][j]);
    }
  }
}

#ifdef __AVX512F__
template <typename D>
void add_avx512(typename D::T* dst, int64_t ld, const uint8_t* mask, const float* coef,
                int64_t ld_coef, int64_t R, const float* w, int64_t ldw, float alpha, int64_t i0,
                int64_t rb, int64_t j0) {
  __m512 s[kBlk][4];
  for (int i = 0; i < kBlk; ++i)
    for (int c = 0; c < 4; ++c) s[i][c] = _mm512_setzero_ps();
  const float* cr[kBlk];
  for (int i = 0; i < kBlk; ++i) cr[i] = coef + (i0 + std::min<int64_t>(i, rb - 1)) * ld_coef;
  for (int64_t k = 0; k < R; ++k) {
    const float* wk = w + k * ldw + j0;
    const __m512 wv[4] = {_mm512_loadu_ps(wk), _mm512_loadu_ps(wk + 16),
                          _mm512_loadu_ps(wk + 32), _mm512_loadu_ps(wk + 48)};
    for (int i = 0; i < kBlk; ++i) {
      const __m512 cv = _mm512_set1_ps(cr[i][k]);
      for (int c = 0; c < 4; ++c) s[i][c] = _mm512_fmadd_ps(cv, wv[c], s[i][c]);
    }
  }
  const __m512 av = _mm512_set1_ps(alpha);
  for (int64_t i = 0; i < rb; ++i) {
    typename D::T* o = dst + (i0 + i) * ld + j0;
    for (int c = 0; c < 4; ++c) {
      const __m512 old = load16<D>(o + 16 * c);
      const __mmask16 keep = mask ? keep_bits(mask + (i0 + i) * ld + j0 + 16 * c) : 0xffff;
      store16<D>(o + 16 * c, _mm512_mask3_fmadd_ps(av, s[i][c], old, keep));
    }
  }
}
#endif

template <typename D>
void add(typename D::T* dst, int64_t ld, const uint8_t* mask, int64_t n, int64_t M,
         const float* coef, int64_t ld_coef, int64_t R, const float* w, int64_t ldw,
         float alpha) {
  int64_t j0 = 0;
  for (; j0 + kCols <= M; j0 += kCols)
    for (int64_t i0 = 0; i0 < n; i0 += kBlk) {
      const int64_t rb = std::min<int64_t>(kBlk, n - i0);
#ifdef __AVX512F__
      add_avx512<D>(dst, ld, mask, coef, ld_coef, R, w, ldw, alpha, i0, rb, j0);
#else
      add_block<D, kCols>(dst, ld, mask, coef, ld_coef, R, w, ldw, alpha, i0, rb, j0, kCols);
#endif
    }
  if (j0 < M)
    for (int64_t i0 = 0; i0 < n; i0 += kBlk)
      add_block<D, 0>(dst, ld, mask, coef, ld_coef, R, w, ldw, alpha, i0,
                      std::min<int64_t>(kBlk, n - i0), j0, M - j0);
}

}  // namespace lowrank
}  // namespace PYENGINE_ISA_NS
}  // namespace pyengine
