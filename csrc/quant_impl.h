// Kernels of quant.h, written once and compiled per ISA (PYENGINE_ISA_NS = scalar / avx2 /
// avx512).  The portable code below is the spec and the scalar/avx2 path; the AVX-512
// block (VNNI) computes the same integers and the same fp32 operations in the same order
// per lane, so every ISA gives bit-identical outputs.
//
// Weights (pyengine/quant.py): per row, groups of 16 blocks with their quant bytes
// interleaved in 4-byte words (word c of block l at (c * n + l) * 4, n = blocks in the
// group).  So one 64-byte load ("step" c) holds word c of 16 blocks and lane l of a
// vpdpbusd accumulates block l's integer dot product over the block's words:
//            block  quant bytes  steps  weight u8 value per byte           offset
//   q8_0      32       32          8    w ^ 0x80 (= w + 128)               128
//   q4_0      32       16          4    low nibble, high nibble            8
//   nf4       64       32          8    code8[low], code8[high] (+128)     128
// Byte j of a nibble block holds elements j (low) and j + B/2 (high).
//
// Activation row layout (per token, per group of 16 blocks, 64-byte aligned):
//   da[16] fp32      post * d_a of each block (post = 1/127 for nf4's int8 codes, else 1)
//   osum[16] int32   offset * sum(q_a) of each block (removes the weight offset exactly)
//   per step c: lo[64] int8 (lane l = the 4 activations meeting word c of block l) and,
//   for nibble formats, hi[64] (those meeting the high nibbles).
// Per group: isum[l] = sum_c dot4(w_l, a_l) - osum[l] (exact int32), then
//   acc[l] = fma(float(isum[l]), dw[l] * da[l], acc[l]);   y = tree sum of the 16 lanes.
// GEMM loop order: panels of weight rows and of tokens that both stay in L2, token tiles
// inside, so weights are read from memory once and activations come from L2.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "common.h"
#include "quant.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace pyengine {
namespace PYENGINE_ISA_NS {
namespace {

// A format's kernel layout, derived from its row of kQuantFormats (quant_formats.h):
// quants become unsigned bytes u = value + offset for vpdpbusd (signed quants and int8
// codebook values: + 128; unsigned quants already are value + zero).
struct Layout {
  int block, qbytes, offset;
  bool nibbles;
  float post;
  constexpr int steps() const { return qbytes / 4; }
  constexpr int step_bytes() const { return nibbles ? 128 : 64; }
  constexpr int64_t group_bytes() const { return 128 + int64_t(steps()) * step_bytes(); }
};

constexpr Layout layout_of(int fmt) {
  const QuantFormat f = kQuantFormats[fmt];
  const bool to_int8 = f.is_signed || f.codebook != nullptr;
  return {f.block, f.block * f.bits / 8, to_int8 ? 128 : f.zero, f.bits == 4,
          f.codebook != nullptr ? 1.0f / 127.0f : 1.0f};
}

// The nf4 code values: fp32 (dequantize) and round(127 * NF4[i]) (ties away from zero) as
// int8 and as unsigned bytes (+ 128), for integer dot products.
constexpr const float* kNf4Code = kQuantFormats[kNF4].codebook;
struct Code8 {
  int8_t s[16];
  uint8_t u[16];
};
constexpr Code8 make_code8() {
  Code8 c{};
  for (int i = 0; i < 16; ++i) {
    const float v = 127.0f * kNf4Code[i];
    c.s[i] = int8_t(v < 0 ? int(v - 0.5f) : int(v + 0.5f));
    c.u[i] = uint8_t(c.s[i] + 128);
  }
  return c;
}
constexpr Code8 kNf4Code8 = make_code8();
static_assert(kQuantFormats[kNF4].codebook_size == 16, "nf4 kernels index 16 codes");

inline int64_t n_groups(const Layout& L, int64_t k) { return (k / L.block + 15) / 16; }

// ------------------------------------------------------------------ activations
#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {  // bf16 -> fp32 (exact)
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#endif

// One block: q[j] = round-half-even(x[j] / d), d = absmax / 127; returns d, sets sum(q).
template <typename T, typename Load>
float quantize_block(const T* xb, int block, int8_t* q, int& sum, Load ld) {
#ifdef __AVX512F__
  (void)ld;
  __m512 v[4], mx = _mm512_setzero_ps();
  for (int i = 0; i < block / 16; ++i) {
    v[i] = load16(xb + 16 * i);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v[i]));
  }
  const float d = _mm512_reduce_max_ps(mx) / 127.0f;
  const __m512 id = _mm512_set1_ps(d != 0.f ? 1.0f / d : 0.f);
  __m512i s = _mm512_setzero_si512();
  for (int i = 0; i < block / 16; ++i) {
    const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], id));
    s = _mm512_add_epi32(s, qi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * i), _mm512_cvtepi32_epi8(qi));
  }
  sum = _mm512_reduce_add_epi32(s);
  return d;
#else
  float amax = 0.f;
  for (int j = 0; j < block; ++j) amax = std::max(amax, std::fabs(ld(xb[j])));
  const float d = amax / 127.0f;
  const float id = d != 0.f ? 1.0f / d : 0.f;
  sum = 0;
  for (int j = 0; j < block; ++j) {
    const int v = int(std::lrint(ld(xb[j]) * id));
    sum += v;
    q[j] = int8_t(v);
  }
  return d;
#endif
}

template <typename T, typename Load>
void quantize_row(const Layout& L, const T* x, int64_t k, uint8_t* out, Load ld) {
  const int64_t nb = k / L.block;
  const int half = L.block / 2;
  std::memset(out, 0, size_t(n_groups(L, k) * L.group_bytes()));
  int8_t q[64];
  for (int64_t b = 0; b < nb; ++b) {
    int sum;
    const float d = quantize_block(x + b * L.block, L.block, q, sum, ld);
    const int l = int(b % 16);
    uint8_t* grp = out + (b / 16) * L.group_bytes();
    uint8_t* steps = grp + 128;
    for (int j = 0; j < L.block; j += 4) {  // word of 4 elements -> lane l of its step
      const bool high = L.nibbles && j >= half;
      const int byte = high ? j - half : j;  // the weight byte these elements meet
      std::memcpy(steps + (byte / 4) * L.step_bytes() + (high ? 64 : 0) + 4 * l, q + j, 4);
    }
    reinterpret_cast<float*>(grp)[l] = d * L.post;
    reinterpret_cast<int32_t*>(grp + 64)[l] = L.offset * sum;
  }
}

// A group: its first block and how many blocks it has (16, or fewer at the row end).
struct GroupGeom {
  int64_t first_block;
  int nblk;
};

inline GroupGeom group_geom(int64_t nb, int64_t g) {
  return {g * 16, int(std::min<int64_t>(16, nb - g * 16))};
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
  constexpr Layout L = layout_of(FMT);
  const int64_t nb = w.k / L.block;
  const uint8_t* qrow = w.qs + n * nb * L.qbytes;
  const uint16_t* srow = w.scales + n * nb;
  float acc[16] = {0.f};
  for (int64_t g = 0; g < n_groups(L, w.k); ++g) {
    const GroupGeom geo = group_geom(nb, g);
    const uint8_t* grp = act_row + g * L.group_bytes();
    const uint8_t* wg = qrow + geo.first_block * L.qbytes;
    int32_t isum[16] = {0};
    for (int c = 0; c < L.steps(); ++c) {
      const int8_t* a = reinterpret_cast<const int8_t*>(grp + 128 + c * L.step_bytes());
      for (int l = 0; l < geo.nblk; ++l) {
        for (int i = 0; i < 4; ++i) {
          const uint8_t b = wg[(c * geo.nblk + l) * 4 + i];
          const int p = 4 * l + i;
          if (FMT == kQ8_0) {
            isum[l] += int32_t(uint8_t(b ^ 0x80)) * a[p];
          } else if (FMT == kQ4_0) {
            isum[l] += int32_t(b & 15) * a[p] + int32_t(b >> 4) * a[64 + p];
          } else {
            isum[l] += int32_t(kNf4Code8.u[b & 15]) * a[p] +
                       int32_t(kNf4Code8.u[b >> 4]) * a[64 + p];
          }
        }
      }
    }
    const float* da = reinterpret_cast<const float*>(grp);
    const int32_t* osum = reinterpret_cast<const int32_t*>(grp + 64);
    for (int l = 0; l < 16; ++l) {
      const float dw = l < geo.nblk ? f16_to_f32(srow[geo.first_block + l]) : 0.f;
      acc[l] = std::fma(float(isum[l] - osum[l]), dw * da[l], acc[l]);
    }
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
  const int64_t act_row = n_groups(layout_of(FMT), w.k) * layout_of(FMT).group_bytes();
  for (int64_t n = r0; n < r1; ++n)
    for (int64_t t = 0; t < m; ++t)
      store(y, y_dtype, t * w.n + n,
            dot_row_portable<FMT>(w, act + t * act_row, n) + (bias ? bias[n] : 0.f));
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// ------------------------------------------------------------------ AVX2 tiles
// No vpdpbusd: u8 x s8 pair products via vpmaddubsw (int16, so kept below saturation:
// q4_0 nibbles are <= 15; q8_0 weights and nf4 codes use the abs/sign trick on signed
// values) and vpmaddwd by ones to int32.  The signed forms give sum(w * a) directly, the
// same integer as the offset form minus osum, so results match the other ISAs exactly.
inline __m256i dot_s8(__m256i w, __m256i a, __m256i ones) {  // signed w in [-127, 127]
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w)), ones);
}

template <int FMT, int T>
void tile_avx2(const QuantWeights& w, const uint8_t* act, int64_t act_row, int64_t n,
               int64_t t0, const float* bias, void* y, int y_dtype) {
  constexpr Layout L = layout_of(FMT);
  const int64_t nb = w.k / L.block;
  const uint8_t* qrow = w.qs + n * nb * L.qbytes;
  const __m256i nib = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  const __m256i code = _mm256_broadcastsi128_si256(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(kNf4Code8.s)));
  __m256 acc[T][2];
  for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  alignas(32) uint8_t wtmp[64];
  alignas(32) uint16_t stmp[16];
  for (int64_t g = 0; g < n_groups(L, w.k); ++g) {
    const GroupGeom geo = group_geom(nb, g);
    const uint8_t* wg = qrow + geo.first_block * L.qbytes;
    const uint8_t* grp[T];
    for (int t = 0; t < T; ++t) grp[t] = act + (t0 + t) * act_row + g * L.group_bytes();
    __m256i is[T][2];
    for (int t = 0; t < T; ++t) is[t][0] = is[t][1] = _mm256_setzero_si256();
    for (int c = 0; c < L.steps(); ++c) {
      const uint8_t* src = wg + c * 4 * geo.nblk;
      if (geo.nblk < 16) {  // partial group: zero-padded copy instead of a masked load
        std::memset(wtmp, 0, 64);
        std::memcpy(wtmp, src, size_t(4 * geo.nblk));
        src = wtmp;
      }
      for (int h = 0; h < 2; ++h) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * h));
        const __m256i lo = _mm256_and_si256(b, nib);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
        for (int t = 0; t < T; ++t) {
          const uint8_t* rec = grp[t] + 128 + c * L.step_bytes() + 32 * h;
          const __m256i a_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(rec));
          __m256i d;
          if (FMT == kQ8_0) {
            d = dot_s8(b, a_lo, ones);
          } else {
            const __m256i a_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(rec + 64));
            if (FMT == kQ4_0) {
              d = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, a_lo),
                                                     _mm256_maddubs_epi16(hi, a_hi)), ones);
            } else {
              d = _mm256_add_epi32(dot_s8(_mm256_shuffle_epi8(code, lo), a_lo, ones),
                                   dot_s8(_mm256_shuffle_epi8(code, hi), a_hi, ones));
            }
          }
          is[t][h] = _mm256_add_epi32(is[t][h], d);
        }
      }
    }
    std::memset(stmp, 0, sizeof(stmp));
    std::memcpy(stmp, w.scales + n * nb + geo.first_block, size_t(2 * geo.nblk));
    for (int h = 0; h < 2; ++h) {
      const __m256 dw = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(stmp + 8 * h)));
      for (int t = 0; t < T; ++t) {
        const __m256 da = _mm256_load_ps(reinterpret_cast<const float*>(grp[t]) + 8 * h);
        __m256i v = is[t][h];
        if (FMT == kQ4_0)  // only q4_0 used the offset form
          v = _mm256_sub_epi32(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(grp[t] + 64 + 32 * h)));
        acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_mul_ps(dw, da), acc[t][h]);
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    const __m256 s8 = _mm256_add_ps(acc[t][0], acc[t][1]);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    const float sum = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
    store(y, y_dtype, (t0 + t) * w.n + n, sum + (bias ? bias[n] : 0.f));
  }
}

template <int FMT>
void matmul_rows_avx2(const QuantWeights& w, const uint8_t* act, int64_t m, int64_t r0,
                      int64_t r1, const float* bias, void* y, int y_dtype) {
  const int64_t act_row = n_groups(layout_of(FMT), w.k) * layout_of(FMT).group_bytes();
  for (int64_t n = r0; n < r1; ++n) {
    int64_t t = 0;
    for (; t + 2 <= m; t += 2) tile_avx2<FMT, 2>(w, act, act_row, n, t, bias, y, y_dtype);
    if (t < m) tile_avx2<FMT, 1>(w, act, act_row, n, t, bias, y, y_dtype);
  }
}
#endif  // __AVX2__ && !__AVX512F__

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
  constexpr Layout L = layout_of(FMT);
  const int64_t nb = w.k / L.block, row_qbytes = nb * L.qbytes;
  const __m512i nib_mask = _mm512_set1_epi8(0x0f), flip = _mm512_set1_epi8(char(0x80));
  const __m512i code8 = _mm512_broadcast_i32x4(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(kNf4Code8.u)));
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t ng = n_groups(L, w.k);
  for (int64_t g = 0; g < ng; ++g) {
    const GroupGeom geo = group_geom(nb, g);
    const __mmask64 bmask = geo.nblk == 16 ? ~__mmask64(0) : (__mmask64(1) << (4 * geo.nblk)) - 1;
    const uint8_t* wg[R];
    for (int r = 0; r < R; ++r) wg[r] = w.qs + (n0 + r) * row_qbytes + geo.first_block * L.qbytes;
    const uint8_t* grp[T];
    for (int t = 0; t < T; ++t) grp[t] = act + (t0 + t) * act_row + g * L.group_bytes();
    __m512i is[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) is[r][t] = _mm512_setzero_si512();
    for (int c = 0; c < L.steps(); ++c) {
      __m512i lo[R], hi[R];
      for (int r = 0; r < R; ++r) {
        if (T == 1)  // decode: memory-bound, fetch the same spot 4 rows ahead
          _mm_prefetch(reinterpret_cast<const char*>(wg[r] + c * 64 + 4 * row_qbytes),
                       _MM_HINT_T1);
        const __m512i b = _mm512_maskz_loadu_epi8(bmask, wg[r] + c * 4 * geo.nblk);
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
        const uint8_t* rec = grp[t] + 128 + c * L.step_bytes();
        const __m512i a_lo = _mm512_load_si512(rec);
        for (int r = 0; r < R; ++r) is[r][t] = _mm512_dpbusd_epi32(is[r][t], lo[r], a_lo);
        if (L.nibbles) {
          const __m512i a_hi = _mm512_load_si512(rec + 64);
          for (int r = 0; r < R; ++r) is[r][t] = _mm512_dpbusd_epi32(is[r][t], hi[r], a_hi);
        }
      }
    }
    const __mmask16 smask = __mmask16((1u << geo.nblk) - 1);
    for (int r = 0; r < R; ++r) {
      if (T == 1)  // the scale plane is a second stream: prefetch it too
        _mm_prefetch(
            reinterpret_cast<const char*>(w.scales + (n0 + r + 4) * nb + geo.first_block),
            _MM_HINT_T0);
      const __m512 dw = _mm512_cvtph_ps(
          _mm256_maskz_loadu_epi16(smask, w.scales + (n0 + r) * nb + geo.first_block));
      for (int t = 0; t < T; ++t) {
        const __m512 da = _mm512_load_ps(reinterpret_cast<const float*>(grp[t]));
        const __m512i osum = _mm512_load_si512(grp[t] + 64);
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(is[r][t], osum)),
                                    _mm512_mul_ps(dw, da), acc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t)
      store(y, y_dtype, (t0 + t) * w.n + n0 + r,
            tree_sum16(acc[r][t]) + (bias ? bias[n0 + r] : 0.f));
}

// Rows [p0, p1) (a panel) x tokens [t0, t1): token tiles of T outside, row blocks of R
// inside; the last tokens go to tiles of T-1, T-2, ...
template <int FMT, int R, int T>
void panel_avx512(const QuantWeights& w, const uint8_t* act, int64_t act_row, int64_t t0,
                  int64_t t1, int64_t p0, int64_t p1, const float* bias, void* y, int y_dtype) {
  int64_t t = t0;
  for (; t + T <= t1; t += T) {
    int64_t n = p0;
    for (; n + R <= p1; n += R) tile_avx512<FMT, R, T>(w, act, act_row, n, t, bias, y, y_dtype);
    for (; n < p1; ++n) tile_avx512<FMT, 1, T>(w, act, act_row, n, t, bias, y, y_dtype);
  }
  if constexpr (T > 1) {
    if (t < t1) panel_avx512<FMT, R, T - 1>(w, act, act_row, t, t1, p0, p1, bias, y, y_dtype);
  }
}

template <int FMT>
void matmul_rows_avx512(const QuantWeights& w, const uint8_t* act, int64_t m, int64_t r0,
                        int64_t r1, const float* bias, void* y, int y_dtype) {
  constexpr Layout L = layout_of(FMT);
  const int64_t act_row = n_groups(L, w.k) * L.group_bytes();
  const int64_t row_bytes = w.k / L.block * (L.qbytes + 2);
  // ~256 KB of weight rows and ~256 KB of activation rows: both stay in L2
  const int64_t panel = std::max<int64_t>(4, (256 << 10) / row_bytes / 4 * 4);
  const int64_t tokens = std::max<int64_t>(6, (256 << 10) / act_row / 6 * 6);
  for (int64_t p0 = r0; p0 < r1; p0 += panel) {
    const int64_t p1 = std::min(r1, p0 + panel);
    if (m == 1) {  // GEMV
      // one row at a time: a single sequential stream (plus scales) prefetches best
      panel_avx512<FMT, 1, 1>(w, act, act_row, 0, 1, p0, p1, bias, y, y_dtype);
      continue;
    }
    for (int64_t t0 = 0; t0 < m; t0 += tokens)
      panel_avx512<FMT, 2, 6>(w, act, act_row, t0, std::min(m, t0 + tokens), p0, p1, bias, y,
                              y_dtype);
  }
}
#endif  // __AVX512F__

// ------------------------------------------------------------------ dequantize
// Block l of an interleaved group of nblk blocks (grp: the group's first quant byte) ->
// out[B] fp32: word c of the block sits at (c * nblk + l) * 4.  The spec (and scalar/avx2).
template <int FMT>
void dequant_block(const uint8_t* grp, int nblk, int l, float d, float* out) {
  constexpr Layout L = layout_of(FMT);
  uint8_t q[32];
  for (int c = 0; c < L.steps(); ++c) std::memcpy(q + 4 * c, grp + (c * nblk + l) * 4, 4);
  const int half = L.block / 2;
  for (int j = 0; j < L.qbytes; ++j) {
    if (FMT == kQ8_0) {
      out[j] = float(int8_t(q[j])) * d;
    } else if (FMT == kQ4_0) {
      out[j] = float(int(q[j] & 15) - 8) * d;
      out[j + half] = float(int(q[j] >> 4) - 8) * d;
    } else {
      out[j] = kNf4Code[q[j] & 15] * d;
      out[j + half] = kNf4Code[q[j] >> 4] * d;
    }
  }
}

#ifdef __AVX512F__
// 16 fp32 -> out (fp32, or bf16 rounded to nearest even: vcvtneps2bf16 equals f32_to_bf16
// here, NaN included; it flushes fp32 denormals, which q * d never is: |q * d| >= 0.079 *
// 2^-24 or 0).
inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
inline void store16(uint16_t* out, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(v));
}

// Nibble formats: a block's 16 possible values value(i) * d (value = NF4 code, or i - 8
// for q4_0), rounded once to the output dtype, then looked up per weight (the same
// product and rounding as the spec, so the same bits).
inline void store_lut(float* o, __m512 tab, __m512i idx) {
  _mm512_storeu_ps(o, _mm512_permutexvar_ps(idx, tab));
}

// One row: per group, the 16 fp16 scales converted at once; per block, one gather of its
// interleaved words (from L1); q8_0: int8 -> fp32, times d; nibble formats: the table above.
template <int FMT, typename OutT>
void dequant_row_avx512(const uint8_t* qrow, const uint16_t* srow, int64_t nb, OutT* out) {
  constexpr Layout L = layout_of(FMT);
  constexpr bool bf16 = std::is_same_v<OutT, uint16_t>;
  const __m512 values = FMT == kNF4
      ? _mm512_loadu_ps(kNf4Code)
      : _mm512_cvtepi32_ps(_mm512_setr_epi32(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7));
  const __m512i nib32 = _mm512_set1_epi32(15), nib16 = _mm512_set1_epi16(15);
  for (int64_t g = 0; g < n_groups(L, nb * L.block); ++g) {
    const GroupGeom geo = group_geom(nb, g);
    const int* grp = reinterpret_cast<const int*>(qrow + geo.first_block * L.qbytes);
    const __m512 dg = _mm512_cvtph_ps(
        _mm256_maskz_loadu_epi16(__mmask16((1u << geo.nblk) - 1), srow + geo.first_block));
    const __m256i steps = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                             _mm256_set1_epi32(geo.nblk));
    for (int l = 0; l < geo.nblk; ++l) {
      const __m512 d = _mm512_permutexvar_ps(_mm512_set1_epi32(l), dg);
      const __m256i idx = _mm256_add_epi32(steps, _mm256_set1_epi32(l));
      OutT* o = out + (geo.first_block + l) * L.block;
      if (FMT == kQ8_0) {
        const __m256i q = _mm256_i32gather_epi32(grp, idx, 4);
        store16(o, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                     _mm256_castsi256_si128(q))), d));
        store16(o + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                          _mm256_extracti128_si256(q, 1))), d));
        continue;
      }
      const __m512 tab = _mm512_mul_ps(values, d);
      // the block's quant bytes: 16 (q4_0) or 32 (nf4); byte j = element j | element j + B/2
      const __m256i q = FMT == kQ4_0
          ? _mm256_castsi128_si256(_mm_i32gather_epi32(grp, _mm256_castsi256_si128(idx), 4))
          : _mm256_i32gather_epi32(grp, idx, 4);
      if constexpr (bf16) {
        const __m512i tab16 = _mm512_zextsi256_si512((__m256i)_mm512_cvtneps_pbh(tab));
        if (FMT == kQ4_0) {
          const __m256i u = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(q));
          const __m256i t = _mm512_castsi512_si256(tab16), n = _mm256_set1_epi16(15);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o),
                              _mm256_permutexvar_epi16(_mm256_and_si256(u, n), t));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16),
                              _mm256_permutexvar_epi16(_mm256_srli_epi16(u, 4), t));
        } else {
          const __m512i u = _mm512_cvtepu8_epi16(q);
          _mm512_storeu_si512(o, _mm512_permutexvar_epi16(_mm512_and_si512(u, nib16), tab16));
          _mm512_storeu_si512(o + 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(u, 4), tab16));
        }
      } else {
        for (int h = 0; h < L.qbytes / 16; ++h) {
          const __m512i u = _mm512_cvtepu8_epi32(
              h ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q));
          store_lut(o + 16 * h, tab, _mm512_and_si512(u, nib32));
          store_lut(o + L.block / 2 + 16 * h, tab, _mm512_srli_epi32(u, 4));
        }
      }
    }
  }
}
#endif

template <int FMT>
void dequantize_rows_fmt(const QuantWeights& w, int64_t r0, int64_t r1, void* out, int out_dtype) {
  constexpr Layout L = layout_of(FMT);
  const int64_t nb = w.k / L.block;
  for (int64_t n = r0; n < r1; ++n) {
    const uint8_t* qrow = w.qs + n * nb * L.qbytes;
    const uint16_t* srow = w.scales + n * nb;
    const int64_t o = (n - r0) * w.k;
#ifdef __AVX512F__
    if (out_dtype == kF32) dequant_row_avx512<FMT>(qrow, srow, nb, static_cast<float*>(out) + o);
    else dequant_row_avx512<FMT>(qrow, srow, nb, static_cast<uint16_t*>(out) + o);
#else
    float tmp[64];
    for (int64_t b = 0; b < nb; ++b) {
      const GroupGeom geo = group_geom(nb, b / 16);
      float* dst = out_dtype == kF32 ? static_cast<float*>(out) + o + b * L.block : tmp;
      dequant_block<FMT>(qrow + geo.first_block * L.qbytes, geo.nblk, int(b % 16),
                         f16_to_f32(srow[b]), dst);
      if (out_dtype != kF32)
        for (int j = 0; j < L.block; ++j)
          static_cast<uint16_t*>(out)[o + b * L.block + j] = f32_to_bf16(tmp[j]);
    }
#endif
  }
}

template <int FMT>
void matmul_rows_fmt(const QuantWeights& w, const uint8_t* act, int64_t m, int64_t r0,
                     int64_t r1, const float* bias, void* y, int y_dtype) {
#if defined(__AVX512F__)
  matmul_rows_avx512<FMT>(w, act, m, r0, r1, bias, y, y_dtype);
#elif defined(__AVX2__)
  matmul_rows_avx2<FMT>(w, act, m, r0, r1, bias, y, y_dtype);
#else
  matmul_rows_portable<FMT>(w, act, m, r0, r1, bias, y, y_dtype);
#endif
}

}  // namespace

void quantize_act_rows(int fmt, const void* x, int x_dtype, int64_t k, int64_t r0, int64_t r1,
                       uint8_t* act) {
  const Layout L = layout_of(fmt);
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

void dequantize_rows(const QuantWeights& w, int64_t r0, int64_t r1, void* out, int out_dtype) {
  switch (w.fmt) {
    case kQ8_0: dequantize_rows_fmt<kQ8_0>(w, r0, r1, out, out_dtype); break;
    case kQ4_0: dequantize_rows_fmt<kQ4_0>(w, r0, r1, out, out_dtype); break;
    default: dequantize_rows_fmt<kNF4>(w, r0, r1, out, out_dtype); break;
  }
}

}  // namespace PYENGINE_ISA_NS
}  // namespace pyengine
