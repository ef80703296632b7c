// Tile loops of attention.h, written once and compiled per ISA: each including TU defines
// PYENGINE_ISA_NS (scalar / avx2 / avx512) and gets its own flags.  Every product is
// gemm_acc (C += A B, fp32) over padded tiles whose widths are multiples of 16, so the
// inner loops have compile-time trip counts and vectorise; rows are register-blocked by 4.
#include <vector>

#include "attention_tile.h"

namespace pyengine {
namespace PYENGINE_ISA_NS {
namespace {

// C[4, NV * kLanes] += A[4, K] B[K, NV * kLanes]; A(m, k) = A[m * sam + k * sak], B rows
// ldb apart.  The 4 x NV accumulators stay in registers.
template <int NV>
static inline void kern4(int64_t K, const float* A, int64_t sam, int64_t sak, const float* B,
                         int64_t ldb, float* C, int64_t ldc) {
  vfloat c[4][NV];
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      c[r][v] = *reinterpret_cast<const vfloat*>(C + r * ldc + v * kLanes);
  for (int64_t k = 0; k < K; ++k) {
    vfloat b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const vfloat*>(B + k * ldb + v * kLanes);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const float a = A[r * sam + k * sak];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) *reinterpret_cast<vfloat*>(C + r * ldc + v * kLanes) = c[r][v];
}

// C[M, N] += A[M, K] B[K, N]; M % 4 == 0, N % 16 == 0.  Register tile 4 x 4 vectors.
static void gemm_acc(int64_t M, int64_t N, int64_t K, const float* A, int64_t sam, int64_t sak,
                     const float* B, int64_t ldb, float* C, int64_t ldc) {
  constexpr int64_t W = 4 * kLanes;
  for (int64_t m = 0; m < M; m += 4) {
    const float* a = A + m * sam;
    float* c = C + m * ldc;
    int64_t n = 0;
    for (; n + W <= N; n += W) kern4<4>(K, a, sam, sak, B + n, ldb, c + n, ldc);
    for (; n < N; n += 16) kern4<16 / kLanes>(K, a, sam, sak, B + n, ldb, c + n, ldc);
  }
}

template <typename D>
void pack(const AttnPackJob& j, int64_t begin, int64_t end) {
  using T = typename D::T;
  const T* src = static_cast<const T*>(j.src);
  const T* o = static_cast<const T*>(j.o);
  for (int64_t h = begin; h < end; ++h) {
    float* dst = j.dst + h * j.Sp * j.Dp;
    std::fill(dst, dst + j.Sp * j.Dp, 0.f);
    for (int64_t i = 0; i < j.S; ++i) {
      const int64_t off = (h * j.S + i) * j.D;
      if (j.transpose) {  // [Sp / BK][Dp][BK]
        float* blk = dst + (i / BK) * j.Dp * BK + i % BK;
        for (int64_t d = 0; d < j.D; ++d) blk[d * BK] = j.scale * D::load(src, off + d);
      } else {
        float* row = dst + i * j.Dp;
#pragma omp simd
        for (int64_t d = 0; d < j.D; ++d) row[d] = j.scale * D::load(src, off + d);
      }
      if (j.delta) {
        float acc = 0.f;
        const float* row = dst + i * j.Dp;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < j.D; ++d) acc += row[d] * D::load(o, off + d);
        j.delta[h * j.Sp + i] = acc;
      }
    }
  }
}

template <typename D>
void forward(const AttnArgs& a, const AttnPacked& p, int64_t begin, int64_t end) {
  const int64_t Sp = p.Sp, Dp = p.Dp, nqb = (a.S + BQ - 1) / BQ, nkb = Sp / BK;
  std::vector<float> s_buf(BQ * BK), o_buf(BQ * Dp);
  float m[BQ], l[BQ], alpha[BQ];
  float* s = s_buf.data();
  float* o = o_buf.data();
  for (int64_t t = begin; t < end; ++t) {
    const QTask q(a, nqb, t);
    const int64_t i0 = q.qb * BQ, rows = std::min(BQ, a.S - i0);
    const float* Q = p.q + ((q.b * a.Hq + q.h) * Sp + i0) * Dp;
    const int64_t kvbase = (q.b * a.Hkv + q.kvh) * Sp;
    const int64_t kb_end = a.causal ? (i0 + rows - 1) / BK + 1 : nkb;
    std::fill(o, o + BQ * Dp, 0.f);
    std::fill(m, m + BQ, kNegInf);
    std::fill(l, l + BQ, 0.f);
    for (int64_t kb = 0; kb < kb_end; ++kb) {
      std::fill(s, s + BQ * BK, 0.f);
      gemm_acc(BQ, BK, Dp, Q, Dp, 1, p.kt + (kvbase + kb * BK) * Dp, BK, s, BK);
      online_softmax(TileMask(a, q.b, i0, kb * BK), 1.f, s, m, l, alpha);
      for (int64_t r = 0; r < BQ; ++r) {
        if (alpha[r] == 1.f) continue;
        float* orow = o + r * Dp;
#pragma omp simd
        for (int64_t d = 0; d < Dp; ++d) orow[d] *= alpha[r];
      }
      gemm_acc(BQ, Dp, BK, s, BK, 1, p.v + (kvbase + kb * BK) * Dp, Dp, o, Dp);
    }
    finish_rows(o, m, l, rows, Dp, a.lse + (q.b * a.Hq + q.h) * a.S + i0);
    using T = typename D::T;
    T* out = static_cast<T*>(a.o) + ((q.b * a.Hq + q.h) * a.S + i0) * a.D;
    store_rows<D>(out, o, rows, a.D, Dp, 1.f);
  }
}

// dK, dV of one key block of one (batch, kv head): tasks ordered heavy (early keys) first.
template <typename D>
void dkdv(const AttnArgs& a, const AttnPacked& p, int64_t begin, int64_t end) {
  const int64_t Sp = p.Sp, Dp = p.Dp, nqb = (a.S + BQ - 1) / BQ, G = a.Hq / a.Hkv;
  std::vector<float> buf(2 * BQ * BK + 2 * BK * Dp);
  float* s = buf.data();
  float* dp = s + BQ * BK;
  float* dk = dp + BQ * BK;
  float* dv = dk + BK * Dp;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t kb = t / (a.B * a.Hkv), bkv = t % (a.B * a.Hkv), b = bkv / a.Hkv;
    const int64_t j0 = kb * BK, keys = std::min(BK, a.S - j0);
    const int64_t kvbase = bkv * Sp;
    std::fill(dk, dk + 2 * BK * Dp, 0.f);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = bkv % a.Hkv * G + g, qh = b * a.Hq + h;
      for (int64_t qb = a.causal ? j0 / BQ : 0; qb < nqb; ++qb) {
        const int64_t i0 = qb * BQ, rows = std::min(BQ, a.S - i0);
        const float* Q = p.q + (qh * Sp + i0) * Dp;
        const float* dO = p.dout + (qh * Sp + i0) * Dp;
        std::fill(s, s + 2 * BQ * BK, 0.f);
        gemm_acc(BQ, BK, Dp, Q, Dp, 1, p.kt + (kvbase + j0) * Dp, BK, s, BK);
        gemm_acc(BQ, BK, Dp, dO, Dp, 1, p.vt + (kvbase + j0) * Dp, BK, dp, BK);
        probs_and_dscores(TileMask(a, b, i0, j0), 1.f, a.lse + qh * a.S + i0,
                          p.delta + qh * Sp + i0, rows, s, dp);
        gemm_acc(BK, Dp, BQ, s, 1, BK, dO, Dp, dv, Dp);
        gemm_acc(BK, Dp, BQ, dp, 1, BK, Q, Dp, dk, Dp);
      }
    }
    const int64_t off = (bkv * a.S + j0) * a.D;
    using T = typename D::T;
    store_rows<D>(static_cast<T*>(a.dk) + off, dk, keys, a.D, Dp, 1.f);
    store_rows<D>(static_cast<T*>(a.dv) + off, dv, keys, a.D, Dp, 1.f);
  }
}

template <typename D>
void dq(const AttnArgs& a, const AttnPacked& p, int64_t begin, int64_t end) {
  const int64_t Sp = p.Sp, Dp = p.Dp, nqb = (a.S + BQ - 1) / BQ, nkb = Sp / BK;
  std::vector<float> buf(2 * BQ * BK + BQ * Dp);
  float* s = buf.data();
  float* dp = s + BQ * BK;
  float* acc = dp + BQ * BK;
  for (int64_t t = begin; t < end; ++t) {
    const QTask q(a, nqb, t);
    const int64_t i0 = q.qb * BQ, rows = std::min(BQ, a.S - i0), qh = q.b * a.Hq + q.h;
    const float* Q = p.q + (qh * Sp + i0) * Dp;
    const float* dO = p.dout + (qh * Sp + i0) * Dp;
    const int64_t kvbase = (q.b * a.Hkv + q.kvh) * Sp;
    const int64_t kb_end = a.causal ? (i0 + rows - 1) / BK + 1 : nkb;
    std::fill(acc, acc + BQ * Dp, 0.f);
    for (int64_t kb = 0; kb < kb_end; ++kb) {
      const int64_t j0 = kb * BK;
      std::fill(s, s + 2 * BQ * BK, 0.f);
      gemm_acc(BQ, BK, Dp, Q, Dp, 1, p.kt + (kvbase + j0) * Dp, BK, s, BK);
      gemm_acc(BQ, BK, Dp, dO, Dp, 1, p.vt + (kvbase + j0) * Dp, BK, dp, BK);
      probs_and_dscores(TileMask(a, q.b, i0, j0), 1.f, a.lse + qh * a.S + i0,
                        p.delta + qh * Sp + i0, rows, s, dp);
      gemm_acc(BQ, Dp, BK, dp, BK, 1, p.k + (kvbase + j0) * Dp, Dp, acc, Dp);
    }
    using T = typename D::T;
    store_rows<D>(static_cast<T*>(a.dq) + (qh * a.S + i0) * a.D, acc, rows, a.D, Dp, a.scale);
  }
}

}  // namespace

#define PYENGINE_ATTN_DISPATCH(fn, ...)         \
  switch (a.dtype) {                             \
    case kF32: fn<F32>(__VA_ARGS__); break;      \
    case kBF16: fn<BF16>(__VA_ARGS__); break;    \
    default: fn<F16>(__VA_ARGS__); break;        \
  }

void attn_pack_range(const AttnPackJob& a, int64_t begin, int64_t end) {
  PYENGINE_ATTN_DISPATCH(pack, a, begin, end)
}
void attn_forward_range(const AttnArgs& a, const AttnPacked& p, int64_t begin, int64_t end) {
  PYENGINE_ATTN_DISPATCH(forward, a, p, begin, end)
}
void attn_dkdv_range(const AttnArgs& a, const AttnPacked& p, int64_t begin, int64_t end) {
  PYENGINE_ATTN_DISPATCH(dkdv, a, p, begin, end)
}
void attn_dq_range(const AttnArgs& a, const AttnPacked& p, int64_t begin, int64_t end) {
  PYENGINE_ATTN_DISPATCH(dq, a, p, begin, end)
}
#undef PYENGINE_ATTN_DISPATCH

}  // namespace PYENGINE_ISA_NS
}  // namespace pyengine
