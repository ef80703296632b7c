// Kernels of quant.h, written once and compiled per ISA (PYENGINE_ISA_NS = scalar / avx2 /
// avx512).  The portable code below is the spec and the scalar/avx2 path; the AVX-512
// block (VNNI) computes exactly the same integers and the same fp32 operations in the same
// order per lane, so every ISA gives bit-identical outputs.
//
// Work unit: a "chunk" = one 64-byte load of a row's quant bytes = `bpc` weight blocks;
// its 16 int32 lanes hold 4-byte partial dot products, G = 16/bpc lanes per block.
// A "group" = 16 blocks (one 32-byte load of fp16 scales).  Per format:
//            block  quant bytes  bpc  lanes/block  weight u8 value         offset
//   q8_0      32       32         2       8        w ^ 0x80 (= w + 128)     128
//   q4_0      32       16         4       4        low / high nibble        8
//   nf4       64       32         2       8        code8[nibble] + 128      128
// With nibbles, the low nibbles of a chunk give elements [0, B/2) of each block and the
// high nibbles elements [B/2, B), so the activation chunk is stored as two 64-byte halves
// "lo" and "hi" in that order: lo[s*B/2 + j] = a[block s][j], hi[...] = a[block s][B/2 + j].
//
// Activation row layout (per token, per group, all 64-byte aligned):
//   dsum[16] fp32 : -offset * post * d_a * sum(q_a) of each block   (offset removal)
//   da[16] fp32   : post * d_a of each block
//   per chunk: q_a int8 [64 (q8_0) or 128 (lo, hi)]
// post = 1/127 for nf4 (int8 codes are 127 * NF4), else 1.
// Per group s[b] = dw[b] * da[b]; per chunk acc[l] = fma(float(isum[l]), s[block(l)], acc[l]);
// per group acc[l] = fma(dw[l], dsum[l], acc[l]); y = tree sum of the 16 lanes.
// GEMM loop order: panels of weight rows that stay in L2, token tiles inside, so weights
// are read from memory once and each activation tile is reused by a whole panel.
#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstring>

#include "common.h"
#include "quant.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace pyengine {
namespace PYENGINE_ISA_NS {
namespace {

struct Layout {
  int block, qbytes, bpc, lanes_per_block, offset;
  bool nibbles;
  float post;
  constexpr int chunk_acts() const { return nibbles ? 128 : 64; }
  constexpr int chunk_bytes() const { return chunk_acts(); }
  constexpr int chunks_per_group() const { return 16 / bpc; }
  constexpr int64_t group_bytes() const { return 128 + int64_t(chunks_per_group()) * chunk_bytes(); }
};

constexpr Layout kLayouts[3] = {
    {32, 32, 2, 8, 128, false, 1.0f},          // q8_0
    {32, 16, 4, 4, 8, true, 1.0f},             // q4_0
    {64, 32, 2, 8, 128, true, 1.0f / 127.0f},  // nf4
};

// round(127 * NF4[i]) + 128: the nf4 codes as unsigned bytes for u8 x s8 dot products.
constexpr uint8_t kNf4Code8[16] = {1,   40,  61,  78,  92,  105, 116, 128,
                                   138, 148, 159, 171, 184, 199, 220, 255};

inline int64_t n_groups(const Layout& L, int64_t k) { return (k / L.block + 15) / 16; }

// ------------------------------------------------------------------ activations
template <typename T, typename Load>
void quantize_row(const Layout& L, const T* x, int64_t k, uint8_t* out, Load ld) {
  const int64_t nb = k / L.block;
  const int half = L.block / 2;
  std::memset(out, 0, size_t(n_groups(L, k) * L.group_bytes()));
  for (int64_t b = 0; b < nb; ++b) {
    const T* xb = x + b * L.block;
    float amax = 0.f;
    for (int j = 0; j < L.block; ++j) amax = std::max(amax, std::fabs(ld(xb[j])));
    const float d = amax / 127.0f;
    const float id = d != 0.f ? 1.0f / d : 0.f;
    const int64_t g = b / 16, bb = b % 16, c = bb / L.bpc, s = bb % L.bpc;
    uint8_t* grp = out + g * L.group_bytes();
    uint8_t* rec = grp + 128 + c * L.chunk_bytes();
    int8_t* q = reinterpret_cast<int8_t*>(rec);
    int sum = 0;
    for (int j = 0; j < L.block; ++j) {
      const int v = int(std::lrint(ld(xb[j]) * id));
      sum += v;
      const int64_t pos = !L.nibbles ? s * L.block + j
                          : j < half ? s * half + j
                                     : 64 + s * half + (j - half);
      q[pos] = int8_t(v);
    }
    const float dp = d * L.post;
    reinterpret_cast<float*>(grp)[bb] = -float(L.offset) * (dp * float(sum));
    reinterpret_cast<float*>(grp)[16 + bb] = dp;
  }
}

// ------------------------------------------------------------------ portable matmul
inline float tree_sum16(const float* a) {
  float s8[8], s4[4];
  for (int i = 0; i < 8; ++i) s8[i] = a[i] + a[i + 8];
  for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
  const float s0 = s4[0] + s4[2], s1 = s4[1] + s4[3];
  return s0 + s1;
}

template <int FMT>
float dot_row_portable(const QuantWeights& w, const uint8_t* act_row, int64_t n) {
  constexpr Layout L = kLayouts[FMT];
  const int64_t nb = w.k / L.block, row_qbytes = nb * L.qbytes;
  const uint8_t* qrow = w.qs + n * row_qbytes;
  const uint16_t* srow = w.scales + n * nb;
  float acc[16] = {0.f};
  for (int64_t g = 0; g < n_groups(L, w.k); ++g) {
    const int nblk = int(std::min<int64_t>(16, nb - g * 16));
    float dw[16];
    for (int l = 0; l < 16; ++l) dw[l] = l < nblk ? f16_to_f32(srow[g * 16 + l]) : 0.f;
    const uint8_t* grp = act_row + g * L.group_bytes();
    const float* da = reinterpret_cast<const float*>(grp) + 16;
    float sc[16];
    for (int l = 0; l < 16; ++l) sc[l] = dw[l] * da[l];
    const int n_chunks = (nblk + L.bpc - 1) / L.bpc;
    for (int c = 0; c < n_chunks; ++c) {
      const uint8_t* wq = qrow + (g * 16 + c * L.bpc) * L.qbytes;
      const int valid = std::min(L.bpc, nblk - c * L.bpc) * L.qbytes;
      const uint8_t* rec = grp + 128 + c * L.chunk_bytes();
      const int8_t* a = reinterpret_cast<const int8_t*>(rec);
      int32_t isum[16] = {0};
      for (int p = 0; p < 64; ++p) {
        const uint8_t b = p < valid ? wq[p] : 0;
        int32_t v;
        if (FMT == kQ8_0) {
          v = int32_t(uint8_t(b ^ 0x80)) * a[p];
        } else if (FMT == kQ4_0) {
          v = int32_t(b & 15) * a[p] + int32_t(b >> 4) * a[64 + p];
        } else {
          v = int32_t(kNf4Code8[b & 15]) * a[p] + int32_t(kNf4Code8[b >> 4]) * a[64 + p];
        }
        isum[p / 4] += v;
      }
      for (int l = 0; l < 16; ++l)
        acc[l] = std::fma(float(isum[l]), sc[c * L.bpc + l / L.lanes_per_block], acc[l]);
    }
    const float* dsum = reinterpret_cast<const float*>(grp);
    for (int l = 0; l < 16; ++l) acc[l] = std::fma(dw[l], dsum[l], acc[l]);
  }
  return tree_sum16(acc);
}

inline void store(void* y, int y_dtype, int64_t i, float v) {
  if (y_dtype == kF32) static_cast<float*>(y)[i] = v;
  else static_cast<uint16_t*>(y)[i] = f32_to_bf16(v);
}

template <int FMT>
void matmul_rows_portable(const QuantWeights& w, const uint8_t* act, int64_t m, int64_t r0,
                          int64_t r1, const float* bias, void* y, int y_dtype) {
  const int64_t act_row = n_groups(kLayouts[FMT], w.k) * kLayouts[FMT].group_bytes();
  for (int64_t n = r0; n < r1; ++n)
    for (int64_t t = 0; t < m; ++t)
      store(y, y_dtype, t * w.n + n,
            dot_row_portable<FMT>(w, act + t * act_row, n) + (bias ? bias[n] : 0.f));
}

#ifdef __AVX512F__
// ------------------------------------------------------------------ AVX-512 VNNI tiles
inline float tree_sum16(__m512 v) {
  __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v),
                            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

// R weight rows x T tokens; every (row, token) keeps its own 16-lane accumulator.
template <int FMT, int R, int T>
void tile_avx512(const QuantWeights& w, const uint8_t* act, int64_t act_row, int64_t n0,
                 int64_t t0, const float* bias, void* y, int y_dtype) {
  constexpr Layout L = kLayouts[FMT];
  constexpr int CPG = L.chunks_per_group();
  const int64_t nb = w.k / L.block, row_qbytes = nb * L.qbytes;
  const __m512i nib_mask = _mm512_set1_epi8(0x0f), flip = _mm512_set1_epi8(char(0x80));
  const __m512i code8 = _mm512_broadcast_i32x4(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(kNf4Code8)));
  alignas(64) int32_t expand[CPG][16];  // lane -> block-in-group index, per chunk
  for (int c = 0; c < CPG; ++c)
    for (int l = 0; l < 16; ++l) expand[c][l] = c * L.bpc + l / L.lanes_per_block;
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  const uint8_t* qrow[R];
  for (int r = 0; r < R; ++r) qrow[r] = w.qs + (n0 + r) * row_qbytes;
  const int64_t ng = n_groups(L, w.k);
  for (int64_t g = 0; g < ng; ++g) {
    const int nblk = int(std::min<int64_t>(16, nb - g * 16));
    const __mmask16 smask = __mmask16((1u << nblk) - 1);
    __m512 dw[R], sc[R][T];
    const uint8_t* grp[T];
    for (int t = 0; t < T; ++t) grp[t] = act + (t0 + t) * act_row + g * L.group_bytes();
    for (int r = 0; r < R; ++r) {
      dw[r] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(smask, w.scales + (n0 + r) * nb + g * 16));
      for (int t = 0; t < T; ++t)
        sc[r][t] = _mm512_mul_ps(dw[r], _mm512_load_ps(reinterpret_cast<const float*>(grp[t]) + 16));
    }
    const int n_chunks = (nblk + L.bpc - 1) / L.bpc;
    for (int c = 0; c < n_chunks; ++c) {
      const int valid = std::min(L.bpc, nblk - c * L.bpc) * L.qbytes;
      const __mmask64 bmask = valid >= 64 ? ~__mmask64(0) : (__mmask64(1) << valid) - 1;
      const __m512i idx = _mm512_load_si512(expand[c]);
      __m512i lo[R], hi[R];
      for (int r = 0; r < R; ++r) {
        const __m512i b = _mm512_maskz_loadu_epi8(bmask, qrow[r] + (g * 16 + c * L.bpc) * L.qbytes);
        if (FMT == kQ8_0) {
          lo[r] = _mm512_xor_si512(b, flip);
        } else {
          lo[r] = _mm512_and_si512(b, nib_mask);
          hi[r] = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib_mask);
          if (FMT == kNF4) {
            lo[r] = _mm512_shuffle_epi8(code8, lo[r]);
            hi[r] = _mm512_shuffle_epi8(code8, hi[r]);
          }
        }
      }
      for (int t = 0; t < T; ++t) {
        const uint8_t* rec = grp[t] + 128 + c * L.chunk_bytes();
        const __m512i a_lo = _mm512_load_si512(rec);
        const __m512i a_hi = L.nibbles ? _mm512_load_si512(rec + 64) : a_lo;
        for (int r = 0; r < R; ++r) {
          __m512i is = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], a_lo);
          if (L.nibbles) is = _mm512_dpbusd_epi32(is, hi[r], a_hi);
          acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is),
                                      _mm512_permutexvar_ps(idx, sc[r][t]), acc[r][t]);
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      const __m512 ds = _mm512_load_ps(reinterpret_cast<const float*>(grp[t]));
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(dw[r], ds, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t)
      store(y, y_dtype, (t0 + t) * w.n + n0 + r,
            tree_sum16(acc[r][t]) + (bias ? bias[n0 + r] : 0.f));
}

// Rows [p0, p1) (a panel) x all tokens: token tiles of T outside, row blocks of R inside.
template <int FMT, int R, int T>
void panel_avx512(const QuantWeights& w, const uint8_t* act, int64_t act_row, int64_t m,
                  int64_t p0, int64_t p1, const float* bias, void* y, int y_dtype) {
  auto rows = [&](auto tile) {
    int64_t n = p0;
    for (; n + R <= p1; n += R) tile(n, std::integral_constant<int, R>());
    for (; n < p1; ++n) tile(n, std::integral_constant<int, 1>());
  };
  int64_t t = 0;
  for (; t + T <= m; t += T)
    rows([&](int64_t n, auto r) { tile_avx512<FMT, decltype(r)::value, T>(w, act, act_row, n, t, bias, y, y_dtype); });
  for (; t < m; ++t)
    rows([&](int64_t n, auto r) { tile_avx512<FMT, decltype(r)::value, 1>(w, act, act_row, n, t, bias, y, y_dtype); });
}

template <int FMT>
void matmul_rows_avx512(const QuantWeights& w, const uint8_t* act, int64_t m, int64_t r0,
                        int64_t r1, const float* bias, void* y, int y_dtype) {
  constexpr Layout L = kLayouts[FMT];
  const int64_t act_row = n_groups(L, w.k) * L.group_bytes();
  const int64_t row_bytes = w.k / L.block * (L.qbytes + 2);
  const int64_t panel = std::max<int64_t>(4, (256 << 10) / row_bytes / 4 * 4);  // ~256 KB
  for (int64_t p0 = r0; p0 < r1; p0 += panel) {
    const int64_t p1 = std::min(r1, p0 + panel);
    if (m == 1) panel_avx512<FMT, 4, 1>(w, act, act_row, m, p0, p1, bias, y, y_dtype);  // GEMV
    else panel_avx512<FMT, 2, 4>(w, act, act_row, m, p0, p1, bias, y, y_dtype);
  }
}
#endif  // __AVX512F__

template <int FMT>
void matmul_rows_fmt(const QuantWeights& w, const uint8_t* act, int64_t m, int64_t r0,
                     int64_t r1, const float* bias, void* y, int y_dtype) {
#ifdef __AVX512F__
  matmul_rows_avx512<FMT>(w, act, m, r0, r1, bias, y, y_dtype);
#else
  matmul_rows_portable<FMT>(w, act, m, r0, r1, bias, y, y_dtype);
#endif
}

}  // namespace

void quantize_act_rows(int fmt, const void* x, int x_dtype, int64_t k, int64_t r0, int64_t r1,
                       uint8_t* act) {
  const Layout& L = kLayouts[fmt];
  const int64_t row_bytes = n_groups(L, k) * L.group_bytes();
  for (int64_t i = r0; i < r1; ++i) {
    if (x_dtype == kF32) {
      quantize_row(L, static_cast<const float*>(x) + i * k, k, act + i * row_bytes,
                   [](float v) { return v; });
    } else {
      quantize_row(L, static_cast<const uint16_t*>(x) + i * k, k, act + i * row_bytes,
                   [](uint16_t v) { return bf16_to_f32(v); });
    }
  }
}

void matmul_rows(const QuantWeights& w, const uint8_t* act, int64_t m, int64_t r0, int64_t r1,
                 const float* bias, void* y, int y_dtype) {
  switch (w.fmt) {
    case kQ8_0: matmul_rows_fmt<kQ8_0>(w, act, m, r0, r1, bias, y, y_dtype); break;
    case kQ4_0: matmul_rows_fmt<kQ4_0>(w, act, m, r0, r1, bias, y, y_dtype); break;
    default: matmul_rows_fmt<kNF4>(w, act, m, r0, r1, bias, y, y_dtype); break;
  }
}

}  // namespace PYENGINE_ISA_NS
}  // namespace pyengine
