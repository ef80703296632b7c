// The two sides of lora_gather.h, written once and compiled per ISA (PYENGINE_ISA_NS and the
// flags come from the including TU).  lowrank::proj_block on blocks of kProjRows rows of one
// adapter, given by pointers: x rows gathered by `order` for the A side, y rows scattered by
// it for the B side (AVX2 / AVX-512: its own column blocks, see Lanes).
#include <algorithm>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "lora_gather.h"
#include "lowrank_tiles.h"

namespace pyengine {
namespace PYENGINE_ISA_NS {

using lowrank::kProjRows;

// task = (group, chunk of kLoraRankChunk ranks): t[p, k0:k1] = x[order[p]] @ a_g[k0:k1]^T
void lora_gather_a_range(const LoraGatherPlan& p, int64_t begin, int64_t end) {
  const int64_t chunks = (p.rank + kLoraRankChunk - 1) / kLoraRankChunk;
  for (int64_t task = begin; task < end; ++task) {
    const LoraGroup& g = p.groups[task / chunks];
    const int64_t k0 = task % chunks * kLoraRankChunk;
    const int64_t kc = std::min(kLoraRankChunk, p.rank - k0);
    const float* w = p.a + (g.adapter * p.rank + k0) * p.k;
    for (int64_t i0 = 0; i0 < g.count; i0 += kProjRows) {
      const int64_t rb = std::min<int64_t>(kProjRows, g.count - i0);
      const float* x[kProjRows];
      const uint8_t* mk[kProjRows] = {};
      float* out[kProjRows];
      for (int i = 0; i < kProjRows; ++i) {
        const int64_t pos = g.begin + i0 + std::min<int64_t>(i, rb - 1);
        x[i] = p.x + p.order[pos] * p.k;
        out[i] = p.t + pos * p.rank + k0;
      }
      for (int64_t i = 0; i < rb; ++i) std::fill(out[i], out[i] + kc, 0.f);
      lowrank::proj_block<F32>(x, mk, rb, p.k, w, p.k, kc, 1.f, out);
    }
  }
}

#if defined(__AVX512F__) || defined(__AVX2__)
// The vector width of this build, for the B side.  sum(v): lane q = the sum of v[q]'s lanes,
// by one tree for every q ((l0 + l2) + (l1 + l3) within each 128-bit block, then across
// blocks: (b0 + b1) + (b2 + b3) / b0 + b1), so an output's bits do not depend on the lane
// it lands in (hence not on how threads split the columns).
#ifdef __AVX512F__
struct Lanes {
  static constexpr int kW = 16;
  using V = __m512;
  using M = __mmask16;
  static M first(int64_t n) { return n >= kW ? M(0xffff) : M((1u << n) - 1); }
  static V load(M m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(M m, float* p, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static V zero() { return _mm512_setzero_ps(); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sum(const V (&v)[kW]) {
    V s1[8], s2[4], s3[2];
    for (int i = 0; i < 8; ++i)
      s1[i] = add(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                  _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {
      const __m512d a = _mm512_castps_pd(s1[2 * i]), b = _mm512_castps_pd(s1[2 * i + 1]);
      s2[i] = add(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                  _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; ++i)
      s3[i] = add(_mm512_shuffle_f32x4(s2[2 * i], s2[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                  _mm512_shuffle_f32x4(s2[2 * i], s2[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return add(_mm512_shuffle_f32x4(s3[0], s3[1], _MM_SHUFFLE(2, 0, 2, 0)),
               _mm512_shuffle_f32x4(s3[0], s3[1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
};
#else
struct Lanes {
  static constexpr int kW = 8;
  using V = __m256;
  using M = __m256i;
  static M first(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(n, kW))),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V load(M m, const float* p) { return _mm256_maskload_ps(p, m); }
  static void store(M m, float* p, V v) { _mm256_maskstore_ps(p, m, v); }
  static V zero() { return _mm256_setzero_ps(); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sum(const V (&v)[kW]) {
    V s1[4], s2[2];
    for (int i = 0; i < 4; ++i)
      s1[i] = add(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                  _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 2; ++i) {
      const __m256d a = _mm256_castps_pd(s1[2 * i]), b = _mm256_castps_pd(s1[2 * i + 1]);
      s2[i] = add(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)),
                  _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
    }
    return add(_mm256_permute2f128_ps(s2[0], s2[1], 0x20),
               _mm256_permute2f128_ps(s2[0], s2[1], 0x31));
  }
};
#endif

// y[order[p], c] += sum_j b_g[c, j] t[p, j] for columns c in [begin, end), group by group:
// kW columns x one row per register block, their kW dot products summed by Lanes::sum (the
// tail block repeats its last column and stores only its own)
void lora_gather_b_range(const LoraGatherPlan& p, int64_t begin, int64_t end) {
  using L = Lanes;
  const int64_t R = p.rank;
  for (int64_t gi = 0; gi < p.n_groups; ++gi) {
    const LoraGroup& g = p.groups[gi];
    const float* b = p.b + g.adapter * p.n * R;
    for (int64_t c0 = begin; c0 < end; c0 += L::kW) {
      const int64_t nb = std::min<int64_t>(L::kW, end - c0);
      const L::M keep = L::first(nb);
      const float* w[L::kW];
      for (int q = 0; q < L::kW; ++q) w[q] = b + (c0 + std::min<int64_t>(q, nb - 1)) * R;
      for (int64_t i = 0; i < g.count; ++i) {
        const float* t = p.t + (g.begin + i) * R;
        L::V acc[L::kW];
        for (int q = 0; q < L::kW; ++q) acc[q] = L::zero();
        for (int64_t j = 0; j < R; j += L::kW) {
          const L::M m = L::first(R - j);
          const L::V tv = L::load(m, t + j);
          for (int q = 0; q < L::kW; ++q) acc[q] = L::fma(L::load(m, w[q] + j), tv, acc[q]);
        }
        float* y = p.y + p.order[g.begin + i] * p.n + c0;
        L::store(keep, y, L::add(L::load(keep, y), L::sum(acc)));
      }
    }
  }
}
#else
// y[order[p], c] += sum_j b_g[c, j] t[p, j] for columns c in [begin, end), group by group
void lora_gather_b_range(const LoraGatherPlan& p, int64_t begin, int64_t end) {
  for (int64_t gi = 0; gi < p.n_groups; ++gi) {
    const LoraGroup& g = p.groups[gi];
    const float* w = p.b + (g.adapter * p.n + begin) * p.rank;
    for (int64_t i0 = 0; i0 < g.count; i0 += kProjRows) {
      const int64_t rb = std::min<int64_t>(kProjRows, g.count - i0);
      const float* t[kProjRows];
      const uint8_t* mk[kProjRows] = {};
      float* out[kProjRows];
      for (int i = 0; i < kProjRows; ++i) {
        const int64_t pos = g.begin + i0 + std::min<int64_t>(i, rb - 1);
        t[i] = p.t + pos * p.rank;
        out[i] = p.y + p.order[pos] * p.n + begin;
      }
      lowrank::proj_block<F32>(t, mk, rb, p.rank, w, p.rank, end - begin, 1.f, out);
    }
  }
}
#endif

}  // namespace PYENGINE_ISA_NS
}  // namespace pyengine
