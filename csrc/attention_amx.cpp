// AMX build of bf16 attention (attention.h), used when amx_active(): the tile products are
// bf16 x bf16 -> fp32 AMX dot products (_tile_dpbf16ps, 32 x 32 fp32 blocks of four 16 x 16
// tiles); masking, softmax, online rescale and dS stay fp32 AVX-512 (attention_tile.h).  P
// and dS are rounded to bf16 before their products (as torch's flash CPU kernel does);
// every accumulator is fp32.  Operands are packed once per call (bf16 bits copied,
// zero-padded to Sp rows and Dp = D rounded up to 32 columns), per head:
//   kRows   [Sp][Dp]             A operands: Q, dO
//   kCols   [Dp][Sp]             A operands: Q^T, dO^T
//   kPairs  [Sp/2][Dp][2]        B operands reduced over keys: V (O += P V), K (dQ += dS K)
//   kDPairs [Sp/BK][Dp/2][BK][2] B operands reduced over d: K (S = Q K^T), V (dP = dO V^T)
// (an AMX B tile interleaves pairs of reduction rows: the VNNI layout).  dK and dV are
// accumulated transposed (dK^T = Q^T dS, dV^T = dO^T P) so that P and dS are B operands,
// which needs only an interleave of row pairs.  Tasks and reduction order are those of
// attention_impl.h, and AMX sums in a fixed order, so bits do not depend on the thread count.
#define PYENGINE_ISA_NS amx
#include <immintrin.h>

#include <vector>

#include "amx_tiles.h"
#include "attention_tile.h"
#include "parallel.h"

namespace pyengine {
namespace amx {
namespace {

using bf16 = uint16_t;
enum Layout { kRows, kCols, kPairs, kDPairs };

// C[M, N] (fp32, ldc) = (zero ? 0 : C) + A B with A [M, K] bf16 rows lda apart and B in pair
// layout (row kk of ldb elements interleaves B rows 2 kk and 2 kk + 1); M, N, K % 32 == 0.
void gemm(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t lda, const bf16* B,
          int64_t ldb, float* C, int64_t ldc, bool zero) {
  for (int64_t m = 0; m < M; m += 32)
    for (int64_t n = 0; n < N; n += 32) {
      float* c = C + m * ldc + n;
      c_block_start(c, ldc, zero);
      for (int64_t k = 0; k < K; k += 32) {
        const bf16* b = B + k / 2 * ldb + 2 * n;
        _tile_loadd(4, A + m * lda + k, lda * 2);
        _tile_loadd(5, A + (m + 16) * lda + k, lda * 2);
        _tile_loadd(6, b, ldb * 2);
        _tile_loadd(7, b + 32, ldb * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      c_block_store(c, ldc);
    }
}

// A BQ x BK fp32 tile rounded to bf16 rows (an A operand).
void to_rows(const float* s, bf16* dst) {
  for (int64_t i = 0; i < BQ * BK; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + i)));
}

// A BQ x BK fp32 tile rounded to bf16 in pair layout (a B operand reduced over its rows).
void to_pairs(const float* s, bf16* dst) {
  alignas(64) int16_t order[32];  // cvtne2ps gives row r in lanes 0-15, row r + 1 in 16-31
  for (int c = 0; c < 16; ++c) {
    order[2 * c] = int16_t(c);
    order[2 * c + 1] = int16_t(16 + c);
  }
  const __m512i idx = _mm512_load_si512(order);
  for (int64_t r = 0; r < BQ; r += 2)
    for (int64_t c = 0; c < BK; c += 16) {
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + (r + 1) * BK + c),
                                             _mm512_loadu_ps(s + r * BK + c));
      _mm512_storeu_si512(dst + r * BK + 2 * c, _mm512_permutexvar_epi16(idx, (__m512i)v));
    }
}

// Heads [begin, end) of src [heads, S, D] into dst [heads][Sp * Dp] (zeroed) in `layout`.
void pack(const bf16* src, int64_t S, int64_t D, int64_t Sp, int64_t Dp, Layout layout,
          bf16* dst, int64_t begin, int64_t end) {
  for (int64_t h = begin; h < end; ++h) {
    bf16* out = dst + h * Sp * Dp;
    const bf16* rows = src + h * S * D;
    switch (layout) {
      case kRows:
        for (int64_t i = 0; i < S; ++i) std::copy(rows + i * D, rows + (i + 1) * D, out + i * Dp);
        break;
      case kCols:
        for (int64_t i = 0; i < S; ++i)
          for (int64_t d = 0; d < D; ++d) out[d * Sp + i] = rows[i * D + d];
        break;
      case kPairs:
        for (int64_t i = 0; i < S; ++i) {
          bf16* o = out + i / 2 * 2 * Dp + i % 2;
          for (int64_t d = 0; d < D; ++d) o[2 * d] = rows[i * D + d];
        }
        break;
      case kDPairs:
        for (int64_t i = 0; i < S; ++i) {
          bf16* o = out + i / BK * BK * Dp + i % BK * 2;
          for (int64_t d = 0; d < D; ++d) o[d / 2 * 2 * BK + d % 2] = rows[i * D + d];
        }
        break;
    }
  }
}

// The packed operands of one call; empty where the pass does not use them.
struct Packed {
  const AttnArgs& a;
  int num_threads;
  int64_t Sp, Dp;
  struct Operand {
    std::vector<bf16> buf;
    const bf16* data = nullptr;
  } q, qt, dout, doutt, kd, kp, vd, vp;
  std::vector<float> delta;  // [B Hq][Sp] rowsum(dO * O) (backward)

  Packed(const AttnArgs& a_, int threads)
      : a(a_), num_threads(threads), Sp((a.S + BK - 1) / BK * BK), Dp((a.D + 31) / 32 * 32) {}

  // src [heads, S, D] as an operand in `layout`: the input itself where it needs no padding.
  void add(Operand& dst, const void* src, int64_t heads, Layout layout) {
    if (layout == kRows && a.S == Sp && a.D == Dp) {
      dst.data = static_cast<const bf16*>(src);
      return;
    }
    dst.buf.resize(size_t(heads * Sp * Dp));  // zeros: the padding
    parallel_for(heads, num_threads, 1, [&](int64_t b, int64_t e) {
      pack(static_cast<const bf16*>(src), a.S, a.D, Sp, Dp, layout, dst.buf.data(), b, e);
    });
    dst.data = dst.buf.data();
  }

  void add_delta() {
    delta.assign(size_t(a.B * a.Hq * Sp), 0.f);
    parallel_for(a.B * a.Hq, num_threads, 1, [&](int64_t b, int64_t e) {
      for (int64_t h = b; h < e; ++h)
        for (int64_t i = 0; i < a.S; ++i) {
          const int64_t off = (h * a.S + i) * a.D;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t d = 0; d < a.D; ++d)
            acc += BF16::load(static_cast<const bf16*>(a.dout), off + d) *
                   BF16::load(static_cast<const bf16*>(a.o), off + d);
          delta[size_t(h * Sp + i)] = acc;
        }
    });
  }
};

int64_t num_q_blocks(const AttnArgs& a) { return (a.S + BQ - 1) / BQ; }

void forward_range(const Packed& p, int64_t begin, int64_t end) {
  const AttnArgs& a = p.a;
  const int64_t Sp = p.Sp, Dp = p.Dp, nqb = num_q_blocks(a), nkb = Sp / BK;
  const AmxTiles tiles;
  std::vector<float> buf(BQ * BK + 2 * BQ * Dp);
  std::vector<bf16> pb(BQ * BK);
  float m[BQ], l[BQ], alpha[BQ];
  float* s = buf.data();
  float* o = s + BQ * BK;
  float* pv = o + BQ * Dp;
  for (int64_t t = begin; t < end; ++t) {
    const QTask q(a, nqb, t);
    const int64_t i0 = q.qb * BQ, rows = std::min(BQ, a.S - i0), qh = q.b * a.Hq + q.h;
    const bf16* Q = p.q.data + (qh * Sp + i0) * Dp;
    const int64_t kv = (q.b * a.Hkv + q.kvh) * Sp * Dp;
    const int64_t kb_end = a.causal ? (i0 + rows - 1) / BK + 1 : nkb;
    std::fill(o, o + BQ * Dp, 0.f);
    std::fill(m, m + BQ, kNegInf);
    std::fill(l, l + BQ, 0.f);
    for (int64_t kb = 0; kb < kb_end; ++kb) {
      const int64_t j0 = kb * BK;
      gemm(BQ, BK, Dp, Q, Dp, p.kd.data + kv + j0 * Dp, 2 * BK, s, BK, true);
      online_softmax(TileMask(a, q.b, i0, j0), a.scale, s, m, l, alpha);
      to_rows(s, pb.data());
      // P V into fresh tiles, then o = alpha o + P V (no tile load of o after its store)
      gemm(BQ, Dp, BK, pb.data(), BK, p.vp.data + kv + j0 * Dp, 2 * Dp, pv, Dp, true);
      for (int64_t r = 0; r < BQ; ++r) {
        const __m512 al = _mm512_set1_ps(alpha[r]);
        for (int64_t d = 0; d < Dp; d += 16) {
          float* od = o + r * Dp + d;
          _mm512_storeu_ps(od, _mm512_fmadd_ps(_mm512_loadu_ps(od), al,
                                               _mm512_loadu_ps(pv + r * Dp + d)));
        }
      }
    }
    finish_rows(o, m, l, rows, Dp, a.lse + qh * a.S + i0);
    store_rows<BF16>(static_cast<bf16*>(a.o) + (qh * a.S + i0) * a.D, o, rows, a.D, Dp, 1.f);
  }
}

// S and dP of one tile (into s, dp), then P and dS in their place.
void recompute(const Packed& p, int64_t b, int64_t qh, int64_t kv, int64_t i0, int64_t j0,
               float* s, float* dp) {
  const AttnArgs& a = p.a;
  const int64_t Sp = p.Sp, Dp = p.Dp;
  gemm(BQ, BK, Dp, p.q.data + (qh * Sp + i0) * Dp, Dp, p.kd.data + kv + j0 * Dp, 2 * BK, s,
       BK, true);
  gemm(BQ, BK, Dp, p.dout.data + (qh * Sp + i0) * Dp, Dp, p.vd.data + kv + j0 * Dp, 2 * BK,
       dp, BK, true);
  probs_and_dscores(TileMask(a, b, i0, j0), a.scale, a.lse + qh * a.S + i0,
                    p.delta.data() + qh * Sp + i0, std::min(BQ, a.S - i0), s, dp);
}

// dst[j][d] = mul * src[d][j] for keys j < keys, d < D (src: a transposed Dp x BK block).
void store_transposed(bf16* dst, const float* src, int64_t keys, int64_t D, float mul) {
  for (int64_t j = 0; j < keys; ++j)
    for (int64_t d = 0; d < D; ++d) BF16::store(dst, j * D + d, mul * src[d * BK + j]);
}

// Backward of one (batch, kv head) in one pass: key blocks in order, each over the GQA
// group's query heads and query blocks (S, dP, P, dS computed once per tile), giving that
// key block's dK, dV and adding dS K into an fp32 dQ of the group owned by this task.
void backward_range(const Packed& p, int64_t begin, int64_t end) {
  const AttnArgs& a = p.a;
  const int64_t Sp = p.Sp, Dp = p.Dp, nqb = num_q_blocks(a), G = a.Hq / a.Hkv;
  const AmxTiles tiles;
  std::vector<float> buf(2 * BQ * BK + 2 * BK * Dp), dq(G * Sp * Dp);
  std::vector<bf16> tiles_bf16(3 * BQ * BK);
  float* s = buf.data();
  float* dp = s + BQ * BK;
  float* dkt = dp + BQ * BK;
  float* dvt = dkt + BK * Dp;
  bf16* ps = tiles_bf16.data();
  bf16* dss = ps + BQ * BK;
  bf16* ds_rows = dss + BQ * BK;
  for (int64_t bkv = begin; bkv < end; ++bkv) {
    const int64_t b = bkv / a.Hkv, h0 = b * a.Hq + bkv % a.Hkv * G, kv = bkv * Sp * Dp;
    std::fill(dq.begin(), dq.end(), 0.f);
    for (int64_t j0 = 0; j0 < a.S; j0 += BK) {
      std::fill(dkt, dkt + 2 * BK * Dp, 0.f);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t qb = a.causal ? j0 / BQ : 0; qb < nqb; ++qb) {
          const int64_t i0 = qb * BQ, qh = h0 + g;
          recompute(p, b, qh, kv, i0, j0, s, dp);
          to_pairs(s, ps);
          to_pairs(dp, dss);
          to_rows(dp, ds_rows);
          gemm(Dp, BK, BQ, p.doutt.data + qh * Sp * Dp + i0, Sp, ps, 2 * BK, dvt, BK, false);
          gemm(Dp, BK, BQ, p.qt.data + qh * Sp * Dp + i0, Sp, dss, 2 * BK, dkt, BK, false);
          gemm(BQ, Dp, BK, ds_rows, BK, p.kp.data + kv + j0 * Dp, 2 * Dp,
               dq.data() + (g * Sp + i0) * Dp, Dp, false);
        }
      const int64_t off = (bkv * a.S + j0) * a.D, keys = std::min(BK, a.S - j0);
      store_transposed(static_cast<bf16*>(a.dk) + off, dkt, keys, a.D, a.scale);
      store_transposed(static_cast<bf16*>(a.dv) + off, dvt, keys, a.D, 1.f);
    }
    for (int64_t g = 0; g < G; ++g)
      store_rows<BF16>(static_cast<bf16*>(a.dq) + (h0 + g) * a.S * a.D, dq.data() + g * Sp * Dp,
                       a.S, a.D, Dp, a.scale);
  }
}

}  // namespace

void attention_forward(const AttnArgs& a, int num_threads) {
  Packed p(a, num_threads);
  const int64_t hq = a.B * a.Hq, hkv = a.B * a.Hkv;
  p.add(p.q, a.q, hq, kRows);
  p.add(p.kd, a.k, hkv, kDPairs);
  p.add(p.vp, a.v, hkv, kPairs);
  parallel_for(hq * num_q_blocks(a), num_threads, 1,
               [&](int64_t b, int64_t e) { forward_range(p, b, e); });
}

void attention_backward(const AttnArgs& a, int num_threads) {
  Packed p(a, num_threads);
  const int64_t hq = a.B * a.Hq, hkv = a.B * a.Hkv;
  p.add(p.q, a.q, hq, kRows);
  p.add(p.qt, a.q, hq, kCols);
  p.add(p.dout, a.dout, hq, kRows);
  p.add(p.doutt, a.dout, hq, kCols);
  p.add(p.kd, a.k, hkv, kDPairs);
  p.add(p.kp, a.k, hkv, kPairs);
  p.add(p.vd, a.v, hkv, kDPairs);
  p.add_delta();
  parallel_for(hkv, num_threads, 1, [&](int64_t b, int64_t e) { backward_range(p, b, e); });
}

}  // namespace amx
}  // namespace pyengine
