// AMX build of the quantized GEMM for prefill-sized fp32 inputs (quant.h,
// quant_matmul_amx): y[m, n] = bf16(x) @ bf16(dequant(w)).T + bias, fp32 accumulate and
// output, as bf16 x bf16 -> fp32 AMX tile products (_tile_dpbf16ps).
//   w is dequantized a panel of rows at a time (the bits of dequantize().to(bfloat16),
//   quant_impl.h's AVX-512 row decoder) into a cache-resident bf16 buffer: the A operand,
//   so the [n, k] weight is never materialised; each row is dequantized once per call.
//   x is rounded to bf16 once per call into B tiles (pairs of reduction elements
//   interleaved, x rows m..mp zero).
// Per panel of up to 128 weight rows, k in chunks of 2048 (a chunk of the panel and of x
// stay in L2): blocks of 32 weight rows x 32 x rows, four 16 x 16 fp32 accumulator tiles
// (carried across chunks in a per-thread buffer), k in steps of 32 (two A tiles, two B
// tiles, four products); after the last chunk the block (y transposed) is written to y
// with the bias.  Every output comes from one thread in a fixed k order: the same bits
// for any thread count.
// Numerics: y is plain bf16 GEMM math (x and W rounded to bf16, exact products, fp32
// sums), i.e. what torch's bf16 F.linear on dequantize(bfloat16) computes before its
// final rounding to bf16; more exact in x than the int8 kernel (8 significant bits per
// element, not 8 bits of the block's absmax).
// Floor: 2*m*n*k flops at the AMX bf16 rate; bytes: the quantized weight once, x once.
#define PYENGINE_ISA_NS amx
#include "quant_impl.h"

#include <atomic>
#include <vector>

#include "amx_tiles.h"
#include "parallel.h"

namespace pyengine {
namespace amx {
namespace {

using bf16 = uint16_t;
constexpr int64_t kBlk = 32;                         // x rows, weight rows per block
constexpr int64_t kChunk = 2048;                     // k per pass over a panel
constexpr int64_t kPanelBytes = int64_t(512) << 10;  // a panel's k chunk stays in L2
constexpr int64_t kMaxPanel = 128;                   // weight rows per panel

// Operands are stored as whole tiles, 1 KB each and contiguous (16 rows of 64 bytes), in
// k order: tile (block, ks) at (block * nks + ks) * 1 KB, nks = k / 32.  A tile loads are
// then sequential (no 4 KB-strided rows aliasing in L1).
inline __m512i iota16(int step) {
  return _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(step));
}

// x rows [b, e) (fp32 [m, k]) -> xp, B tiles of 16 x rows: row kk of tile (t / 16, ks) holds
// the bf16 pairs (x[t][32 ks + 2 kk], x[t][32 ks + 2 kk + 1]) of its 16 rows t.
void pack_x(const float* x, int64_t k, int64_t b, int64_t e, uint32_t* xp) {
  const int64_t nks = k / 32;
  const __m512i rows = iota16(16);
  for (int64_t t = b; t < e; ++t)
    for (int64_t ks = 0; ks < nks; ++ks) {
      const float* src = x + t * k + ks * 32;
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
      _mm512_i32scatter_epi32(xp + ((t / 16) * nks + ks) * 256 + t % 16, rows, (__m512i)v, 4);
    }
}

// Weight rows [n0, n0 + np) -> panel, A tiles of 16 weight rows (rows np..npp zero): row r
// of tile (i / 16, ks) is dequant(w)[n0 + i][32 ks, 32 ks + 32) in bf16.
template <int FMT>
void pack_w(const QuantWeights& w, int64_t n0, int64_t np, int64_t npp, bf16* row, bf16* panel) {
  constexpr Layout L = layout_of(FMT);
  const int64_t nb = w.k / L.block, nks = w.k / 32;
  if (np < npp) std::memset(panel, 0, size_t(npp * w.k * 2));
  for (int64_t i = 0; i < np; ++i) {
    dequant_row_avx512<FMT>(w.qs + (n0 + i) * nb * L.qbytes, w.scales + (n0 + i) * nb, nb, row);
    bf16* dst = panel + (i / 16) * nks * 512 + (i % 16) * 32;
    for (int64_t ks = 0; ks < nks; ++ks)
      _mm512_storeu_si512(dst + ks * 512, _mm512_loadu_si512(row + ks * 32));
  }
}

// y rows [0, m) x columns [n0, n0 + np) from the panel (A tiles) and xp (B tiles),
// k in chunks of kc (their A and B slices stay in L2); acc [mp / 32][npp / 32][32][32]
// carries each block's fp32 sums (c[weight row][x row]) from chunk to chunk.
void panel_gemm(const uint32_t* xp, int64_t m, int64_t mp, int64_t k, int64_t kc,
                const bf16* panel, int64_t np, int64_t npp, int64_t n0, int64_t n,
                const float* bias, float* acc, float* y) {
  const __m512i col = iota16(int(kBlk));
  const int64_t nks = k / 32;
  for (int64_t k0 = 0; k0 < k; k0 += kc) {
    const int64_t k1 = std::min(k, k0 + kc);
    for (int64_t m0 = 0; m0 < mp; m0 += kBlk) {
      for (int64_t s = 0; s < npp; s += kBlk) {
        float* c = acc + (m0 / kBlk * npp + s) * kBlk;  // [32][32]
        c_block_start(c, kBlk, k0 == 0);
        const bf16* a = panel + s / 16 * nks * 512;     // tiles of rows s.., s + 16..
        const uint32_t* b = xp + m0 / 16 * nks * 256;  // tiles of x rows m0.., m0 + 16..
        for (int64_t ks = k0 / 32; ks < k1 / 32; ++ks) {
          _tile_loadd(4, a + ks * 512, 64);
          _tile_loadd(5, a + (nks + ks) * 512, 64);
          _tile_loadd(6, b + ks * 256, 64);
          _tile_loadd(7, b + (nks + ks) * 256, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        c_block_store(c, kBlk);
        if (k1 < k) continue;
        const int64_t cols = std::min(kBlk, np - s), rows = std::min(kBlk, m - m0);
        for (int h = 0; h < 2; ++h) {  // y[m0 + r][n0 + s + 16 h + i] = c[16 h + i][r] + bias
          const int64_t live = std::max<int64_t>(0, std::min<int64_t>(16, cols - 16 * h));
          const __mmask16 mask = __mmask16((1u << live) - 1);
          if (!mask) continue;
          const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + n0 + s + 16 * h)
                                 : _mm512_setzero_ps();
          for (int64_t r = 0; r < rows; ++r)
            _mm512_mask_storeu_ps(
                y + (m0 + r) * n + n0 + s + 16 * h, mask,
                _mm512_add_ps(_mm512_i32gather_ps(col, c + 16 * h * kBlk + r, 4), bv));
        }
      }
    }
  }
}

template <int FMT>
void gemm(const QuantWeights& w, const float* x, int64_t m, const float* bias, float* y,
          int num_threads) {
  const int64_t k = w.k, mp = (m + kBlk - 1) / kBlk * kBlk;
  std::vector<uint32_t> xp(static_cast<size_t>(k / 2 * mp));  // zeroed: rows m..mp
  parallel_for(m, num_threads, 16, [&](int64_t b, int64_t e) { pack_x(x, k, b, e, xp.data()); });
  const int64_t kc = std::min(k, kChunk);
  const int64_t panel = std::clamp(kPanelBytes / (kc * 2) / kBlk * kBlk, kBlk, kMaxPanel);
  const int64_t n_panels = (w.n + panel - 1) / panel;
  const int n_tasks = int(std::min<int64_t>(std::max(num_threads, 1), n_panels));
  // panels from a shared counter: a descheduled thread does not hold up the others
  std::atomic<int64_t> next{0};
  parallel_for(n_tasks, n_tasks, 1, [&](int64_t, int64_t) {
    const AmxTiles tiles;
    std::vector<bf16> row(static_cast<size_t>(k)), buf(static_cast<size_t>(panel * k));
    std::vector<float> acc(static_cast<size_t>(mp * panel));
    for (int64_t n0; (n0 = next.fetch_add(panel)) < w.n;) {
      const int64_t np = std::min(panel, w.n - n0), npp = (np + kBlk - 1) / kBlk * kBlk;
      pack_w<FMT>(w, n0, np, npp, row.data(), buf.data());
      panel_gemm(xp.data(), m, mp, k, kc, buf.data(), np, npp, n0, w.n, bias, acc.data(), y);
    }
  });
}

}  // namespace
}  // namespace amx

void quant_matmul_amx(const QuantWeights& w, const float* x, int64_t m, const float* bias,
                      float* y, int num_threads) {
  switch (w.fmt) {
    case kQ8_0: amx::gemm<kQ8_0>(w, x, m, bias, y, num_threads); break;
    case kQ4_0: amx::gemm<kQ4_0>(w, x, m, bias, y, num_threads); break;
    default: amx::gemm<kNF4>(w, x, m, bias, y, num_threads); break;
  }
}

}  // namespace pyengine
