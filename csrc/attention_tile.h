// Softmax, masking and task helpers of the attention tile loops, shared by the per-ISA
// fp32 build (attention_impl.h) and the AMX bf16 build (attention_amx.cpp).  The including
// TU defines PYENGINE_ISA_NS and gets its own flags.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "attention.h"
#include "common.h"
#include "lowrank_tiles.h"

namespace pyengine {
namespace PYENGINE_ISA_NS {
namespace {

constexpr int64_t BQ = kAttnBQ, BK = kAttnBK;
constexpr float kNegInf = -INFINITY;

// SIMD width of this build (GCC vector extensions: zmm / ymm / xmm registers).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

constexpr int kRowVecs = int(BK) / kLanes;  // vectors per tile row

static inline float hmax(vfloat x) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps(__m512(x));
#else
  float m = x[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, x[i]);
  return m;
#endif
}

static inline float hsum(vfloat x) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(__m512(x));
#else
  float t = 0.f;
  for (int i = 0; i < kLanes; ++i) t += x[i];
  return t;
#endif
}

// exp_approx (common.h) on a vector: same reduction and polynomial, so same values.
static inline vfloat vexp(vfloat x) {
  typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const vfloat n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  vfloat r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vfloat p = 1.9875691500e-4f + vfloat{};
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vint e = (__builtin_convertvector(n, vint) + 127) << 23;
  return p * __builtin_bit_cast(vfloat, e);
}

// s[0, BK) = exp(scale s - m) (0 where s = -inf); returns the row sum.
static inline float exp_row(float* s, float m, float scale) {
  vfloat sum{};
#pragma GCC unroll 16
  for (int v = 0; v < kRowVecs; ++v) {
    vfloat& x = *reinterpret_cast<vfloat*>(s + v * kLanes);
    x = x == kNegInf ? vfloat{} : vexp(x * scale - m);
    sum += x;
  }
  return hsum(sum);
}

static inline float max_row(const float* s) {
  vfloat m = *reinterpret_cast<const vfloat*>(s);
#pragma GCC unroll 16
  for (int v = 1; v < kRowVecs; ++v) {
    const vfloat x = *reinterpret_cast<const vfloat*>(s + v * kLanes);
    m = x > m ? x : m;
  }
  return hmax(m);
}

// Which (row, key) pairs of a tile are masked: keys past S or padded (a per-key bias of 0
// or -inf, built once per tile) and, when causal, keys above the diagonal.
struct TileMask {
  bool any = false, causal = false;
  int64_t i0 = 0, j0 = 0;
  alignas(64) float bias[BK];
  TileMask(const AttnArgs& a, int64_t b, int64_t i0_, int64_t j0_) : i0(i0_), j0(j0_) {
    causal = a.causal && j0 + BK - 1 > i0;
    any = causal || j0 + BK > a.S || a.key_mask != nullptr;
    if (!any) return;
    const uint8_t* km = a.key_mask ? a.key_mask + b * a.S : nullptr;
    for (int64_t c = 0; c < BK; ++c) {
      const int64_t j = j0 + c;
      bias[c] = (j >= a.S || (km && !km[j])) ? kNegInf : 0.f;
    }
  }
  // row r of the tile: s[c] = -inf where masked
  void apply(float* s, int64_t r) const {
    const int64_t last = causal ? i0 + r - j0 : BK;  // keys c > last are above the diagonal
#pragma omp simd
    for (int64_t c = 0; c < BK; ++c) s[c] = c > last ? kNegInf : s[c] + bias[c];
  }
};

// Per task: a query block of one (batch, head); a head's blocks are consecutive tasks (its
// K / V stay in cache, and the GQA group's next), heavy (late, causal) blocks first.
struct QTask {
  int64_t b, h, kvh, qb;
  QTask(const AttnArgs& a, int64_t nqb, int64_t t) {
    const int64_t bh = t / nqb;
    qb = nqb - 1 - t % nqb;
    b = bh / a.Hq;
    h = bh % a.Hq;
    kvh = h / (a.Hq / a.Hkv);
  }
};

template <typename D>
void store_rows(void* dst_v, const float* src, int64_t rows, int64_t Dd, int64_t Dp, float mul) {
  using T = typename D::T;
  T* dst = static_cast<T*>(dst_v);
  for (int64_t r = 0; r < rows; ++r)
#pragma omp simd
    for (int64_t d = 0; d < Dd; ++d) D::store(dst, r * Dd + d, mul * src[r * Dp + d]);
}

// One key block of the online softmax: each row of the score tile s (scores / scale) is
// masked, its running max m and sum l are updated, and s becomes exp(scale s - m);
// alpha[r] = exp(m_old - m_new) is what the row's output accumulator must be scaled by (1
// where the max did not change).
static inline void online_softmax(const TileMask& mask, float scale, float* s, float* m,
                                  float* l, float* alpha) {
  for (int64_t r = 0; r < BQ; ++r) {
    float* sr = s + r * BK;
    if (mask.any) mask.apply(sr, r);
    const float m_new = std::max(m[r], scale * max_row(sr));  // scale > 0
    alpha[r] = 1.f;
    if (m_new == kNegInf) {  // nothing to attend to yet
      std::fill(sr, sr + BK, 0.f);
      continue;
    }
    const float sum = exp_row(sr, m_new, scale);
    if (m_new != m[r]) {
      alpha[r] = m[r] == kNegInf ? 0.f : exp_approx(m[r] - m_new);
      l[r] *= alpha[r];
      m[r] = m_new;
    }
    l[r] += sum;
  }
}

// End of a query block: o /= l and lse = m + log l (o = 0, lse = -inf for rows without keys).
static inline void finish_rows(float* o, const float* m, const float* l, int64_t rows,
                               int64_t Dp, float* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = l[r] > 0.f ? 1.0f / l[r] : 0.f;
    float* orow = o + r * Dp;
#pragma omp simd
    for (int64_t d = 0; d < Dp; ++d) orow[d] *= inv;
    lse[r] = l[r] > 0.f ? m[r] + std::log(l[r]) : kNegInf;
  }
}

// P (into s) and dS (into dp) of one tile from the recomputed scores s (/ scale) and
// dp = dO V^T.
static inline void probs_and_dscores(const TileMask& mask, float scale, const float* lse,
                                     const float* delta, int64_t rows, float* s, float* dp) {
  for (int64_t r = 0; r < BQ; ++r) {
    float* sr = s + r * BK;
    float* dr = dp + r * BK;
    if (r >= rows || lse[r] == kNegInf) {
      std::fill(sr, sr + BK, 0.f);
      std::fill(dr, dr + BK, 0.f);
      continue;
    }
    if (mask.any) mask.apply(sr, r);
    exp_row(sr, lse[r], scale);
    const float dl = delta[r];
#pragma omp simd
    for (int64_t c = 0; c < BK; ++c) dr[c] = sr[c] * (dr[c] - dl);
  }
}

}  // namespace
}  // namespace PYENGINE_ISA_NS
}  // namespace pyengine
