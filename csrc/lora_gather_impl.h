// The two sides of lora_gather.h, written once and compiled per ISA (PYENGINE_ISA_NS and the
// flags come from the including TU).  lowrank::proj_block on blocks of kProjRows rows of one
// adapter, given by pointers: x rows gathered by `order` for the A side, y rows scattered by
// it for the B side (AVX-512: its own 16-column blocks, see sum16).
#include <algorithm>

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

#ifdef __AVX512F__
// lane q of the result = the sum of v[q]'s 16 lanes, by one tree for every q
// ((l0 + l2) + (l1 + l3) within each 128-bit block, then (b0 + b1) + (b2 + b3)), so an
// output's bits do not depend on which lane it lands in
inline __m512 sum16(const __m512 (&v)[16]) {
  __m512 s1[8], s2[4], s3[2];
  for (int i = 0; i < 8; ++i)
    s1[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                          _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(s1[2 * i]), b = _mm512_castps_pd(s1[2 * i + 1]);
    s2[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                          _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)
    s3[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2 * i], s2[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_f32x4(s2[2 * i], s2[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s3[0], s3[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(s3[0], s3[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// y[order[p], c] += sum_j b_g[c, j] t[p, j] for columns c in [begin, end), group by group:
// 16 columns x one row per register block, the 16 dot products summed by sum16 (the tail
// block repeats its last column and stores only its own)
void lora_gather_b_range(const LoraGatherPlan& p, int64_t begin, int64_t end) {
  const int64_t R = p.rank;
  for (int64_t gi = 0; gi < p.n_groups; ++gi) {
    const LoraGroup& g = p.groups[gi];
    const float* b = p.b + g.adapter * p.n * R;
    for (int64_t c0 = begin; c0 < end; c0 += 16) {
      const int64_t nb = std::min<int64_t>(16, end - c0);
      const __mmask16 keep = __mmask16((1u << nb) - 1);
      const float* w[16];
      for (int q = 0; q < 16; ++q) w[q] = b + (c0 + std::min<int64_t>(q, nb - 1)) * R;
      for (int64_t i = 0; i < g.count; ++i) {
        const float* t = p.t + (g.begin + i) * R;
        __m512 acc[16];
        for (int q = 0; q < 16; ++q) acc[q] = _mm512_setzero_ps();
        for (int64_t j = 0; j < R; j += 16) {
          const __mmask16 m = R - j >= 16 ? 0xffff : __mmask16((1u << (R - j)) - 1);
          const __m512 tv = _mm512_maskz_loadu_ps(m, t + j);
          for (int q = 0; q < 16; ++q)
            acc[q] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w[q] + j), tv, acc[q]);
        }
        float* y = p.y + p.order[g.begin + i] * p.n + c0;
        _mm512_mask_storeu_ps(y, keep, _mm512_add_ps(_mm512_maskz_loadu_ps(keep, y), sum16(acc)));
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
