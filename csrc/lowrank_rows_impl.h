// Row kernel of lowrank_rows.h, written once and compiled per ISA (PYENGINE_ISA_NS and the
// flags come from the including TU).  Rows go in blocks of kRowBlock and columns in tiles
// of kChunk, so the [rg, kChunk] accumulator tile stays in L1 across a block's rows.
#include <algorithm>
#include <vector>

#include "lowrank_rows.h"
#include "lowrank_tiles.h"

namespace pyengine {
namespace PYENGINE_ISA_NS {
namespace {

constexpr int64_t kChunk = kTile;
constexpr int64_t kRowBlock = 8;

template <typename D>
void rows(const LowRankRowsArgs& a, int64_t begin, int64_t end, float* acc) {
  using T = typename D::T;
  const int64_t K = a.cols, rp = a.proj_rank, rg = a.grad_rank, ra = a.add_rank;
  const T* src = static_cast<const T*>(a.src);
  T* dst = static_cast<T*>(a.dst);
  float sv[kChunk], dv[kChunk];
  std::vector<float> proj(kRowBlock * rp);
  for (int64_t n0 = begin; n0 < end; n0 += kRowBlock) {
    const int64_t n1 = std::min(end, n0 + kRowBlock);
    std::fill(proj.begin(), proj.end(), 0.f);
    for (int64_t j0 = 0; j0 < K; j0 += kChunk) {
      const int64_t len = std::min(kChunk, K - j0);
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t off = n * K + j0;
        if (rp || rg) {
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) sv[j] = D::load(src, off + j);
          if (rp) dot_rows(proj.data() + (n - n0) * rp, sv, a.proj_w + j0, rp, K, len);
          if (rg) outer_add(acc + j0, a.grad_coef + n * rg, sv, rg, K, len);
        }
        if (ra) {
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) dv[j] = D::load(dst, off + j);
          add_rows(dv, a.add_coef + n * ra, a.add_w + j0, ra, K, len);
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) D::store(dst, off + j, dv[j]);
        }
      }
    }
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < rp; ++k) a.proj_out[n * rp + k] = a.scale * proj[(n - n0) * rp + k];
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
